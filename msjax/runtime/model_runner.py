"""Runs steps on the colocated model: every module in one program, on one device or, for the colocated
baseline `DeploymentPlan.colocated(n)`, over n devices (attention heads and experts sharded where they divide).

The runner owns the KV cache arrays; the engine owns the pages. One host transfer per step brings the sampled
tokens (and logprobs when asked) back.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from msjax.config import DeploymentPlan, EngineConfig
from msjax.engine.batch import StepBatch
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models import sharding
from msjax.models.programs import MoEModel, colocated_logits
from msjax.runtime.sampler import Sampled, sample


@partial(jax.jit, static_argnames=("attention_def", "expert_def", "decode", "num_logprobs"),
         donate_argnames=("kv",))
def _step(attention_def, attention_state, expert_def, expert_state, kv, tokens, positions, seq_ids, page_table,
          logit_rows, temperature, top_p, top_k, seeds, steps, *, decode, num_logprobs):
    batch = AttentionBatch(positions, seq_ids, page_table)
    logits, kv = colocated_logits(nnx.merge(attention_def, attention_state), nnx.merge(expert_def, expert_state),
                                  tokens, batch, kv, logit_rows, decode=decode)
    return sample(logits, temperature, top_k, top_p, seeds, steps, num_logprobs=num_logprobs), kv


class ModelRunner:
    def __init__(self, model: MoEModel, cfg: EngineConfig, plan: DeploymentPlan | None = None, devices=None):
        self.model = model
        devices = list(devices if devices is not None else jax.devices())
        n = plan.colocated_devices if plan is not None and plan.is_colocated else 1
        if plan is not None:
            plan.validate(model.cfg, len(devices))
        self.attention_state, self.expert_state = model.attention_state, model.expert_state
        kv_sharding = None
        if n > 1:
            mesh = Mesh(np.array(devices[:n]), ("x",))
            rules = sharding.COLOCATED_RULES
            self.attention_state = sharding.shard_state(model.attention_state, rules, mesh)
            self.expert_state = sharding.shard_state(model.expert_state, rules, mesh)
            shape = (model.cfg.num_layers * cfg.num_pages, cfg.page_size, model.cfg.num_kv_heads,
                     model.cfg.head_dim)
            kv_sharding = sharding.kv_sharding(shape, rules, mesh)
        self.kv = KVCache.create(model.cfg, cfg.num_pages, cfg.page_size, dtype=model.dtype, sharding=kv_sharding)

    def run(self, batches: list[list[StepBatch]]) -> list[list[Sampled]]:
        """batches[replica][micro_batch] (one replica here); the result holds numpy arrays, same layout."""
        return jax.tree.map(np.asarray, [[self._run_one(b) for b in node] for node in batches])

    def _run_one(self, b: StepBatch) -> Sampled:
        m = self.model
        out, self.kv = _step(m.attention_def, self.attention_state, m.expert_def, self.expert_state, self.kv,
                             b.tokens, b.positions, b.seq_ids, b.page_table, b.logit_rows, b.temperature, b.top_p,
                             b.top_k, b.seeds, b.steps, decode=b.decode, num_logprobs=b.num_logprobs)
        return out

    @staticmethod
    def num_compiled() -> int:
        """Programs compiled so far (all runners share the cache): tests use it to check bucketing."""
        return _step._cache_size()
