"""The colocated runner: every module in one program, on one device or, for the colocated baseline
`DeploymentPlan.colocated(n)`, over n devices (attention heads and experts sharded where they divide).

It owns the KV cache arrays; the engine owns the pages. One host transfer per step brings the sampled tokens
(and logprobs when asked) back.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from msjax.errors import ConfigError
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models import sharding
from msjax.models.programs import MoEModel, colocated_logits
from msjax.runtime.deployment import Deployment
from msjax.runtime.runner import NodeHealth, RunnerHealth
from msjax.runtime.sampler import sample


class _ProgramDefs:
    """The static part of a runner's step program: the modules' graph definitions and the tree structure of
    their weights. jit hashes and compares static arguments on every call; GraphDefs cost ~25 µs a call to hash
    (measured on tiny-moe, 2026-12-07), so one runner passes the same holder each step, hashed by identity."""

    def __init__(self, attention_def, expert_def, states_treedef):
        self.attention_def, self.expert_def, self.states_treedef = attention_def, expert_def, states_treedef

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


@partial(jax.jit, static_argnames=("defs", "decode", "num_logprobs"), donate_argnames=("kv",))
def _step(defs, state_leaves, kv, tokens, positions, seq_ids, page_table, logit_rows, temperature, top_p, top_k,
          seeds, steps, *, decode, num_logprobs):
    # the weights come as a flat tuple of arrays: flattening nnx.State each call costs more than the tuple
    attention_state, expert_state = jax.tree.unflatten(defs.states_treedef, state_leaves)
    batch = AttentionBatch(positions, seq_ids, page_table)
    logits, kv = colocated_logits(nnx.merge(defs.attention_def, attention_state),
                                  nnx.merge(defs.expert_def, expert_state), tokens, batch, kv, logit_rows,
                                  decode=decode)
    return sample(logits, temperature, top_k, top_p, seeds, steps, num_logprobs=num_logprobs), kv


class ColocatedRunner:
    """`Runner` over one program: `deployment.devices` (one, or the colocated baseline's n)."""

    def __init__(self, model: MoEModel, deployment: Deployment):
        self.model, self.deployment = model, deployment
        cfg, ec = model.cfg, deployment.engine
        self.attention_state, self.expert_state = model.attention_state, model.expert_state
        kv_sharding = None
        if len(deployment.devices) > 1:
            mesh = Mesh(np.array(deployment.devices), ("x",))
            rules = sharding.COLOCATED_RULES
            self.attention_state = sharding.shard_state(model.attention_state, rules, mesh)
            self.expert_state = sharding.shard_state(model.expert_state, rules, mesh)
            kv_sharding = sharding.kv_sharding(KVCache.shape(cfg, ec.num_pages, ec.page_size), rules, mesh)
        else:
            self.attention_state, self.expert_state = jax.device_put((self.attention_state, self.expert_state),
                                                                     deployment.devices[0])
        self.kv = KVCache.create(cfg, ec.num_pages, ec.page_size, dtype=model.dtype, sharding=kv_sharding
                                 if kv_sharding is not None else deployment.devices[0])
        self._state_leaves, treedef = jax.tree.flatten((self.attention_state, self.expert_state))
        self._state_leaves = tuple(self._state_leaves)
        self._defs = _ProgramDefs(model.attention_def, model.expert_def, treedef)
        self.closed = False

    def step(self, batches):
        """batches[0][i] (one replica here); the result holds numpy arrays, same layout."""
        return jax.tree.map(np.asarray, [[self._run_one(b) for b in node] for node in batches])

    def _run_one(self, b):
        out, self.kv = _step(self._defs, self._state_leaves, self.kv, b.tokens, b.positions, b.seq_ids,
                             b.page_table, b.logit_rows, b.temperature, b.top_p, b.top_k, b.seeds, b.steps,
                             decode=b.decode, num_logprobs=b.num_logprobs)
        return out

    def expert_load(self):
        return None  # one program: no expert nodes to balance

    def set_placement(self, placement, shares=None) -> None:
        raise ConfigError("plan", "re-placing experts needs a disaggregated plan (expert nodes); this one runs "
                          "every module in one program")

    def health(self) -> RunnerHealth:
        node = NodeHealth("colocated", 0, "local", os.getpid(), not self.closed)
        return RunnerHealth(not self.closed, "closed" if self.closed else "", (node,))

    def attach_timeline(self, timeline) -> None:
        raise ConfigError("plan", "a timeline needs a disaggregated plan: it shows each attention and expert "
                          "node's programs, and this plan runs one program")

    def close(self) -> None:
        self.closed = True

    @staticmethod
    def num_compiled() -> int:
        """Programs compiled so far (over all colocated runners; each compiles its own): tests use it to check
        bucketing."""
        return _step._cache_size()
