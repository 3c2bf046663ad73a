"""The model's two roles composed: `MoEModel` (both roles as graph definitions and state pytrees) and the
colocated forward, every module in one program with a loop over layers (the baseline, the numerics reference,
and what training differentiates).

The disaggregated programs — one per layer, reused for every layer, each node's own — are in
`msjax.runtime.layer_programs`; dispatch and combine between the roles in `msjax.models.moe` (in one program)
and `msjax.comm.m2n` (between nodes).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msjax.config import ModelConfig
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models.modules import AttentionRole, ExpertRole
from msjax.models.moe import combine, dispatch


def colocated_logits(attention: AttentionRole, experts: ExpertRole, tokens: jax.Array, batch: AttentionBatch,
                     kv: KVCache, logit_rows: jax.Array, *, decode: bool) -> tuple[jax.Array, KVCache]:
    """The whole model in one trace: embed, then per layer attention -> dispatch -> experts -> combine, then the
    LM head on the rows `logit_rows`. Plain function (no jit), so training differentiates the serving code."""
    cfg = attention.cfg
    valid = batch.positions >= 0

    def layer_step(layer, carry):
        h, kv = carry
        h, x, topk_ids, topk_weights, kv = attention(layer, h, batch, kv, decode=decode)
        d = dispatch(x, topk_ids, cfg.num_experts, valid)
        rows = experts(layer, d.rows, d.group_sizes)
        return h + combine(rows, d.order, topk_weights), kv

    h = attention.embed_tokens(tokens)
    h, kv = jax.lax.fori_loop(0, cfg.num_layers, layer_step, (h, kv))
    return attention.logits(h[logit_rows]), kv


@partial(jax.jit, static_argnames=("attention_def", "expert_def", "decode"), donate_argnames=("kv",))
def _colocated_forward(attention_def, attention_state, expert_def, expert_state, tokens, batch, kv, logit_rows,
                       *, decode):
    return colocated_logits(nnx.merge(attention_def, attention_state), nnx.merge(expert_def, expert_state),
                            tokens, batch, kv, logit_rows, decode=decode)


@dataclasses.dataclass(frozen=True)
class MoEModel:
    """Both roles of one model as graph definitions and state pytrees (all experts on the expert side)."""

    cfg: ModelConfig
    attention_def: nnx.GraphDef
    attention_state: nnx.State
    expert_def: nnx.GraphDef
    expert_state: nnx.State

    @classmethod
    def from_modules(cls, attention: AttentionRole, experts: ExpertRole) -> "MoEModel":
        if experts.expert_ids != tuple(range(attention.cfg.num_experts)):
            raise ValueError("the colocated model needs every expert on its expert side")
        attention_def, attention_state = nnx.split(attention)
        expert_def, expert_state = nnx.split(experts)
        return cls(attention.cfg, attention_def, attention_state, expert_def, expert_state)

    @classmethod
    def random(cls, cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32) -> "MoEModel":
        rngs = nnx.Rngs(seed)
        return cls.from_modules(AttentionRole(cfg, dtype=dtype, rngs=rngs), ExpertRole(cfg, dtype=dtype, rngs=rngs))

    def with_kernels(self, kernels: str) -> "MoEModel":
        """The same weights with another kernel choice ("auto", "kernel", "reference") for both roles."""
        attention, experts = nnx.merge(self.attention_def, self.attention_state), nnx.merge(self.expert_def,
                                                                                          self.expert_state)
        attention.kernels = experts.kernels = kernels
        return MoEModel.from_modules(attention, experts)

    @property
    def dtype(self):
        return jax.tree.leaves(self.attention_state)[0].dtype

    def expert_subset(self, expert_ids: tuple[int, ...]) -> tuple[nnx.GraphDef, nnx.State]:
        """The expert role holding only `expert_ids` (in that order; repeats allowed: replicas), sliced from the
        full expert state on the host side: what an expert node of this model holds."""
        module = nnx.eval_shape(lambda: ExpertRole(self.cfg, expert_ids=tuple(expert_ids), dtype=self.dtype,
                                                   rngs=nnx.Rngs(0), kernels=self.kernels))
        graphdef, abstract = nnx.split(module)
        index = np.asarray(expert_ids)
        return graphdef, jax.tree.map(lambda a, full: full[:, index], abstract, self.expert_state)

    @property
    def kernels(self) -> str:
        return nnx.merge(self.attention_def, self.attention_state).kernels

    def forward(self, tokens: jax.Array, batch: AttentionBatch, kv: KVCache, logit_rows: jax.Array, *,
                decode: bool) -> tuple[jax.Array, KVCache]:
        """Run all layers on tokens [t] and return (logits [len(logit_rows), vocab] float32, kv).

        `kv` is donated: use the returned cache.
        """
        return _colocated_forward(self.attention_def, self.attention_state, self.expert_def, self.expert_state,
                                  tokens, batch, kv, logit_rows, decode=decode)
