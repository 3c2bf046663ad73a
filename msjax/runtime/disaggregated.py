"""Disaggregated expert parallelism in one process: attention nodes and expert nodes as separate jitted programs
on separate device groups, with the ping-pong host loop over layers x micro-batches (paper §3, §4.1).

Per layer and micro-batch, on attention node a:   h += combine(previous layer)  ->  attention  ->  pack
                                  on expert node e:   experts over the rows every attention node sent to e
Program boundaries: the attention program ends where dispatch starts (it packs one fixed-capacity send buffer
per expert node, `msjax.comm.pack`); the expert program starts where dispatch ends. The buffers move between
device groups through the plan's transport (`msjax.comm`); the M2N work replaces the transport, not the
boundaries.

The host loop never waits on a device inside the layer loop: JAX dispatch is asynchronous, so attention for
micro-batch i+1 is enqueued while the experts still work on micro-batch i.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from msjax.comm import Packet, Routing, combine_returned, pack, transport_for
from msjax.config import DeploymentPlan, EngineConfig
from msjax.engine.batch import StepBatch
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models import sharding
from msjax.models.layer_states import split_layers
from msjax.models.modules import AttentionRole, ExpertRole
from msjax.models.programs import MoEModel
from msjax.runtime.sampler import Sampled, sample


@partial(jax.jit, static_argnames=("graphdef",))
def embed_step(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed_tokens(tokens)


@partial(jax.jit, static_argnames=("graphdef", "decode", "routing"), donate_argnames=("kv",))
def attention_step(graphdef, state, layer, h, moe, batch: AttentionBatch, kv: KVCache, *, decode: bool,
                   routing: Routing):
    """-> (h, packets per expert node, assignment orders per expert node, topk_ids, topk_weights, tokens per
    expert [num_experts] int32, kv)."""
    attention = nnx.merge(graphdef, state)
    h, x, topk_ids, topk_weights, kv = attention(layer, h + moe, batch, kv, decode=decode)
    valid = batch.positions >= 0
    packed = [pack(x, topk_ids, valid, routing, node) for node in range(len(routing.num_local))]
    num_experts = len(routing.replicas)
    load = jnp.sum((topk_ids[..., None] == jnp.arange(num_experts)) & valid[:, None, None], axis=(0, 1),
                   dtype=jnp.int32)
    return h, tuple(p for p, _ in packed), tuple(o for _, o in packed), topk_ids, topk_weights, load, kv


@partial(jax.jit, static_argnames=("graphdef",))
def expert_step(graphdef, state, layer, packets: tuple[Packet, ...]):
    """Experts of one node over the packets of every attention node -> one output buffer per packet."""
    experts = nnx.merge(graphdef, state)
    num_local = len(experts.expert_ids)
    rows = jnp.concatenate([p.rows for p in packets])
    ids = jnp.concatenate([p.expert_ids for p in packets])
    order = jnp.argsort(ids, stable=True)
    group_sizes = jnp.sum(ids[:, None] == jnp.arange(num_local)[None, :], axis=0, dtype=jnp.int32)
    out_sorted = experts(layer, rows[order], group_sizes)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    splits = np.cumsum([p.rows.shape[0] for p in packets])[:-1]
    return tuple(jnp.split(out, splits))


@jax.jit
def combine_step(outputs: tuple[jax.Array, ...], orders: tuple[jax.Array, ...], topk_weights: jax.Array):
    """The attention node's weighted sum of its tokens' expert outputs: [tokens, hidden]."""
    return combine_returned(outputs, orders, topk_weights)


@partial(jax.jit, static_argnames=("graphdef", "num_logprobs"))
def head_step(graphdef, state, h, moe, logit_rows, temperature, top_p, top_k, seeds, steps, *, num_logprobs):
    logits = nnx.merge(graphdef, state).logits((h + moe)[logit_rows])
    return sample(logits, temperature, top_k, top_p, seeds, steps, num_logprobs=num_logprobs)


def sample_heads(attention_def, attention_states, batches: list[list[StepBatch]], state) -> list[list[Sampled]]:
    """LM head and sampling of every micro-batch (state[a, i] = (h, moe) after the last layer), fetched to the
    host: the step's one sync."""
    results = [[None] * len(node) for node in batches]
    for a, node in enumerate(batches):
        for i, b in enumerate(node):
            h, moe = state[a, i]
            results[a][i] = head_step(attention_def, attention_states[a], h, moe, b.logit_rows, b.temperature,
                                      b.top_p, b.top_k, b.seeds, b.steps, num_logprobs=b.num_logprobs)
    return jax.tree.map(np.asarray, results)


def carve_devices(plan: DeploymentPlan, devices=None) -> tuple[list[Mesh], list[Mesh]]:
    """Attention node meshes (tp_a devices each), then expert node meshes (tp_e each), in device order."""
    devices = list(devices if devices is not None else jax.devices())
    need = plan.num_devices
    if need > len(devices):
        raise ValueError(f"the plan needs {need} devices, only {len(devices)} exist")
    cut = plan.attention_nodes * plan.attention_tp
    attention = [Mesh(np.array(devices[i * plan.attention_tp:(i + 1) * plan.attention_tp]), ("tp",))
                 for i in range(plan.attention_nodes)]
    experts = [Mesh(np.array(devices[cut + i * plan.expert_tp:cut + (i + 1) * plan.expert_tp]), ("tp",))
               for i in range(plan.expert_nodes)]
    return attention, experts


def expert_subset(model: MoEModel, expert_ids: tuple[int, ...]) -> tuple[nnx.GraphDef, nnx.State]:
    """The expert role holding only `expert_ids`, sliced from the model's full expert state (host side)."""
    module = nnx.eval_shape(lambda: ExpertRole(model.cfg, expert_ids=expert_ids, dtype=model.dtype,
                                               rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(module)
    index = np.asarray(expert_ids)
    state = jax.tree.map(lambda a, full: full[:, index], abstract, model.expert_state)
    return graphdef, state


class DisaggregatedRunner:
    """Runs steps with attention on `plan.attention_nodes` data-parallel replicas and experts on
    `plan.expert_nodes` nodes, each node a jitted program over its own devices."""

    def __init__(self, model: MoEModel, cfg: EngineConfig, plan: DeploymentPlan, devices=None):
        plan.validate(model.cfg, len(devices if devices is not None else jax.devices()))
        self.cfg, self.plan = model.cfg, plan
        self.attention_meshes, self.expert_meshes = carve_devices(plan, devices)
        self.model = model  # host-side source of expert weights for (re)placement
        self.transport = transport_for(plan)
        self.attention_def = model.attention_def
        # each layer's weights as their own arrays (`split_layers`): a program given a stacked array and a layer
        # index copies that layer's weights out of it first, on every call
        self.attention_layers = [
            split_layers(sharding.shard_state(model.attention_state, sharding.ATTENTION_TP_RULES, mesh),
                         model.cfg.num_layers, AttentionRole.SHARED_PARAMS) for mesh in self.attention_meshes]
        self.set_placement(plan.expert_placement(model.cfg.num_experts))
        # [num_experts] tokens routed per expert since the last read, one counter per attention node on its
        # devices (an add there per layer, no transfer)
        self._loads = [jax.device_put(jnp.zeros(model.cfg.num_experts, jnp.int32), NamedSharding(mesh, P()))
                       for mesh in self.attention_meshes]
        shape = (model.cfg.num_layers * cfg.num_pages, cfg.page_size, model.cfg.num_kv_heads, model.cfg.head_dim)
        self.kv = [KVCache.create(model.cfg, cfg.num_pages, cfg.page_size, dtype=model.dtype,
                                  sharding=sharding.kv_sharding(shape, sharding.ATTENTION_TP_RULES, mesh))
                   for mesh in self.attention_meshes]
        self.traffic: list[dict] | None = None  # set to [] to record what moves (costs a host sync per step)
        self.timeline = None  # a msjax.runtime.timeline.Timeline to log launches for device timelines

    def set_placement(self, placement: tuple[tuple[int, ...], ...],
                      shares: tuple[tuple[float, ...], ...] | None = None) -> None:
        """Put each expert node's experts (replicas allowed) on its devices and route tokens accordingly.
        Called between steps: the KV caches live on the attention nodes, so requests in flight are untouched."""
        if len(placement) != len(self.expert_meshes):
            raise ValueError(f"placement lists {len(placement)} nodes, the plan has {len(self.expert_meshes)}")
        self.placement = tuple(tuple(node) for node in placement)
        self.routing = Routing.from_placement(self.placement, self.cfg.num_experts, shares)
        self.expert_defs, self.expert_layers = [], []  # expert_layers[e][l]: node e's weights of layer l
        for experts, mesh in zip(self.placement, self.expert_meshes):
            graphdef, state = expert_subset(self.model, experts)
            self.expert_defs.append(graphdef)
            self.expert_layers.append(split_layers(sharding.shard_state(state, sharding.EXPERT_TP_RULES, mesh),
                                                   self.cfg.num_layers))

    def read_expert_load(self) -> np.ndarray:
        """Tokens routed to each expert (summed over layers) since the last read; one host sync."""
        load = sum(np.asarray(x) for x in self._loads)
        self._loads = [jnp.zeros_like(x) for x in self._loads]
        return load

    def _log(self, program: str, group: str, node: int, layer: int, micro_batch: int) -> None:
        if self.timeline is not None:
            mesh = (self.attention_meshes if group == "attention" else self.expert_meshes)[node]
            self.timeline.launch(program, group, node, layer, micro_batch, mesh)

    def run(self, batches: list[list[StepBatch]]) -> list[list[Sampled]]:
        """batches[a][i]: micro-batch i of attention replica a. Returns sampled tokens in the same layout."""
        put = self.transport.send
        work = [(a, i, b) for a, node in enumerate(batches) for i, b in enumerate(node)]
        if not work:
            return [[] for _ in batches]
        state, meta = {}, {}
        for a, i, b in work:
            mesh = self.attention_meshes[a]
            inputs = put((b.tokens, AttentionBatch(b.positions, b.seq_ids, b.page_table)), mesh)
            h = embed_step(self.attention_def, self.attention_layers[a][0], inputs[0])
            state[a, i] = (h, jnp.zeros_like(h))
            meta[a, i] = (inputs[1], b.decode)
        rounds = max(len(node) for node in batches)
        for layer in range(self.cfg.num_layers):
            layer_index = jnp.int32(layer)
            for i in range(rounds):
                active = [a for a in range(len(batches)) if i < len(batches[a])]
                sent = {}
                for a in active:  # attention for micro-batch i on every attention node
                    h, moe = state[a, i]
                    batch, decode = meta[a, i]
                    self._log("attention_step", "attention", a, layer, i)
                    h, packets, orders, topk_ids, weights, load, self.kv[a] = attention_step(
                        self.attention_def, self.attention_layers[a][layer], layer_index, h, moe, batch, self.kv[a],
                        decode=decode, routing=self.routing)
                    sent[a] = (h, packets, orders, weights)
                    self._loads[a] = self._loads[a] + load
                    if self.traffic is not None:
                        self.traffic.append({"layer": layer, "micro_batch": i, "attention_node": a,
                                             "topk_ids": topk_ids, "valid": batch.positions >= 0,
                                             "orders": orders, "counts": [p.count for p in packets]})
                outputs = {}
                for e, mesh in enumerate(self.expert_meshes):  # experts of micro-batch i
                    received = tuple(put(sent[a][1][e], mesh) for a in active)
                    self._log("expert_step", "experts", e, layer, i)
                    outs = expert_step(self.expert_defs[e], self.expert_layers[e][layer], layer_index, received)
                    for a, out in zip(active, outs):
                        outputs[a, e] = out
                for a in active:  # combine on the attention node
                    h, _, orders, weights = sent[a]
                    mesh = self.attention_meshes[a]
                    back = tuple(put(outputs[a, e], mesh) for e in range(len(self.expert_meshes)))
                    self._log("combine_step", "attention", a, layer, i)
                    state[a, i] = (h, combine_step(back, orders, weights))
        return sample_heads(self.attention_def, [layers[0] for layers in self.attention_layers], batches, state)
