"""Attention and expert nodes as services: each owns its programs, its share of the weights (and an attention
node its KV cache and expert-load counter) and its M2N endpoints, and is driven by the typed requests of
`msjax.runtime.protocol`. A node does not know how it was started: the runner's process (`LocalHost`) and a node
process (`msjax.runtime.node_process`) call the same three methods.

    node.step(request)    AttentionStep / ExpertStep -> a generator that dispatches one program per `next`
                          (see below) and returns the step's reply, its arrays possibly still on the devices
    node.result(reply)    that reply with its arrays on the host (waits for the node's programs)
    node.control(request) any other request -> its reply, at once

The step generators yield the phase of the program they dispatch next: attention programs have the even
phases (first 0, layer l 2l, head 2L), an expert node's layer l the odd phase 2l + 1. Every receive of a phase
waits only for sends of lower phases, so a host that dispatches every node's programs in phase order (the
runner's process, for the nodes it holds) never waits on a program it has not dispatched yet, however the
devices share a process.
"""

from __future__ import annotations

from typing import Callable, Generator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from msjax.comm.m2n import Routing
from msjax.models import sharding
from msjax.models.layer_states import split_layers
from msjax.models.modules import AttentionRole
from msjax.runtime import protocol as p
from msjax.runtime import step_inputs
from msjax.runtime.layer_programs import AttentionPrograms, ExpertPrograms


def _mesh(devices) -> Mesh:
    return Mesh(np.array(list(devices)), ("tp",))


class _Node:
    role = ""

    def __init__(self, index: int, cfg, devices, endpoints, dtype):
        self.index, self.cfg, self.endpoints, self.dtype = index, cfg, endpoints, jnp.dtype(dtype)
        self.mesh = _mesh(devices)  # tensor parallelism inside the node over these devices
        self.replicated = sharding.replicated(self.mesh)
        self.token = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)  # orders this node's m2n calls
        self.layer_ids = [jax.device_put(jnp.int32(layer), self.replicated) for layer in range(cfg.num_layers)]
        self.steps = 0
        self.timeline = None  # a msjax.runtime.timeline.Timeline logs each program launch

    def _log(self, program: str, layer: int) -> None:
        if self.timeline is not None:
            self.timeline.launch(program, "attention" if self.role == "attention" else "experts", self.index,
                                 layer, -1, self.mesh)

    def control(self, request):
        if isinstance(request, p.Ping):
            return p.Pong(self.role, self.index, self.steps, getattr(self, "experts", ()))
        handler = getattr(self, f"_on_{type(request).__name__}", None)
        if handler is None:
            return p.Failed(f"{self.role} node {self.index} does not take {type(request).__name__} requests")
        return handler(request)

    def _on_Stop(self, request: p.Stop):
        return p.Ok()

    def rewire(self, packets) -> None:
        """Move this node's packet channels onto `packets` (an `Endpoints` of the next generation, connected),
        between steps: each endpoint takes over its new connection under its old handle (`adopt`), so the
        compiled programs, which name endpoints by handle, run on as they are; the old connections close."""
        for name, endpoint in packets.senders.items():
            self.endpoints.senders[name].adopt(endpoint)
        for name, endpoint in packets.receivers.items():
            self.endpoints.receivers[name].adopt(endpoint)
        packets.senders.clear()
        packets.receivers.clear()

    def close(self) -> None:
        self.endpoints.close()


def _layer_layouts(layouts):
    """The layouts without num_logprobs, which only the head program uses: a step that asks for logprobs
    compiles a head of its own, not every layer's program again."""
    return tuple(layout[:4] for layout in layouts)


class AttentionNode(_Node):
    """Attention node `index`: `graphdef` / `state` the attention role (every layer stacked; the node splits
    and shards it over `devices`, heads and KV heads tensor-parallel), its KV cache of the engine's pages, the
    expert placement it routes by."""

    role = "attention"

    def __init__(self, index: int, cfg, engine_config, graphdef, state, devices, endpoints, placement, dtype):
        super().__init__(index, cfg, devices, endpoints, dtype)
        rules = sharding.ATTENTION_TP_RULES
        # each layer's weights as their own arrays: a program given a stacked array and a layer index copies
        # that layer's weights out of it first, on every call
        self.layers = split_layers(sharding.shard_state(state, rules, self.mesh), cfg.num_layers,
                                   AttentionRole.SHARED_PARAMS)
        self.kv = sharding.kv_cache(cfg, engine_config.num_pages, engine_config.page_size, dtype, rules, self.mesh)
        self.load = jax.device_put(jnp.zeros(cfg.num_experts, jnp.int32), self.replicated)  # tokens per expert
        tx, back = endpoints.senders.get("dispatch"), endpoints.receivers["back"]
        self.programs = AttentionPrograms(cfg, graphdef, tx, back, dtype, self.mesh)
        # an expert node that dies mid-step must not fail this node's programs: that would lose the KV cache
        # (donated to them) and with it every request here. Tolerant, the programs run to their end with the
        # lost node's outputs as zeros, and the step's reply names the lost node (`result`)
        self._tolerant = [ep for ep in (tx, back) if ep is not None]
        for ep in self._tolerant:
            ep.set_tolerant()
        self._route(tuple(placement))
        self.traffic: list[dict] | None = None  # a list records what each (layer, micro-batch) routed and sent

    def _route(self, placement, shares=None) -> None:
        """Route by `placement` from the next step: the tables are an operand of the programs (no compile);
        an expert node that holds nothing is out of the deployment, so no call waits for it."""
        routing = Routing.from_placement(placement, self.cfg.num_experts, shares)
        self.tables = jax.device_put(tuple(jnp.asarray(t) for t in routing.tables()), self.replicated)
        for node, experts in enumerate(placement):
            if not experts:
                for ep in self._tolerant:
                    ep.mark_lost(node)

    def _check(self, request: p.AttentionStep) -> None:
        if not request.micro_batches:
            raise ValueError("a step needs at least one micro-batch")
        for i, mb in enumerate(request.micro_batches):
            t, s, pages = mb.tokens, mb.seqs, mb.pages
            if min(t, s, pages) < 1 or mb.num_logprobs < 0:
                raise ValueError(f"micro-batch {i}: sizes must be positive, got tokens {t}, seqs {s}, pages {pages}")
            if mb.ints.dtype != np.int32 or mb.ints.shape != (3 * t + s * (pages + 4),):
                raise ValueError(f"micro-batch {i}: ints must be int32 [{3 * t + s * (pages + 4)}], got "
                                 f"{mb.ints.dtype}{list(mb.ints.shape)}")
            if mb.floats.dtype != np.float32 or mb.floats.shape != (2 * s,):
                raise ValueError(f"micro-batch {i}: floats must be float32 [{2 * s}], got "
                                 f"{mb.floats.dtype}{list(mb.floats.shape)}")

    def step(self, request: p.AttentionStep) -> Generator[int, None, p.StepDone]:
        self._check(request)  # before any program: a refused step leaves every channel in step
        layouts = tuple(step_inputs.layout(mb) for mb in request.micro_batches)
        inputs = jax.device_put(tuple((mb.ints, mb.floats) for mb in request.micro_batches), self.replicated)
        record, num_layers = self.traffic is not None, self.cfg.num_layers
        statics = dict(layouts=_layer_layouts(layouts), record=record)
        yield 0
        self._log("attention_first", 0)
        h, sent, self.kv, self.token, self.load, traffic = self.programs.first(
            self.layers[0], inputs, self.kv, self.token, self.load, self.tables, **statics)
        self._record(0, traffic)
        for layer in range(1, num_layers):
            yield 2 * layer
            self._log("attention_layer", layer)
            h, sent, self.kv, self.token, self.load, traffic = self.programs.layer(
                self.layers[layer], self.layer_ids[layer], h, sent, inputs, self.kv, self.token, self.load,
                self.tables, **statics)
            self._record(layer, traffic)
        yield 2 * num_layers
        self._log("attention_head", num_layers - 1)
        sampled, self.token = self.programs.head(self.layers[0], self.layer_ids[-1], h, sent, inputs, self.token,
                                                 layouts=layouts)
        self.steps += 1
        return p.StepDone(request.step, tuple(p.SampledTokens(s.tokens, s.logprobs, s.top_ids, s.top_logprobs)
                                              for s in sampled))

    def _record(self, layer: int, traffic) -> None:
        for i, t in enumerate(traffic):
            self.traffic.append({"layer": layer, "micro_batch": i, "attention_node": self.index, **t})

    def result(self, reply):
        """The sampled tokens on the host (the step's one sync), and the expert nodes lost so far."""
        if isinstance(reply, p.StepDone):
            sampled = tuple(p.SampledTokens(*(np.asarray(a) for a in (s.tokens, s.logprobs, s.top_ids,
                                                                         s.top_logprobs))) for s in reply.sampled)
            return p.StepDone(reply.step, sampled, self.lost())
        return reply

    def lost(self) -> tuple[int, ...]:
        """Expert nodes this node's endpoints found gone (sends dropped, outputs read as zeros)."""
        return tuple(sorted({e for ep in self._tolerant for e in ep.lost()}))

    def _on_SetRouting(self, request: p.SetRouting):
        self._route(request.placement, request.shares)
        return p.Ok()

    def _on_ReadLoad(self, request: p.ReadLoad):
        load, self.load = np.asarray(self.load), jnp.zeros_like(self.load)
        return p.Load(load)

    def lower(self, request: p.AttentionStep, *, compiled: bool = False) -> str:
        """HLO text of this node's layer program for `request` (it holds the custom calls): as lowered, or with
        `compiled` as XLA scheduled it. Needs a model of at least two layers."""
        layouts = tuple(step_inputs.layout(mb) for mb in request.micro_batches)
        inputs = jax.device_put(tuple((mb.ints, mb.floats) for mb in request.micro_batches), self.replicated)
        statics = dict(layouts=_layer_layouts(layouts), record=False)
        h, sent, *_ = jax.eval_shape(lambda *a: self.programs.first(*a, **statics), self.layers[0], inputs, self.kv,
                                     self.token, self.load, self.tables)
        lowered = self.programs.layer.lower(self.layers[1], self.layer_ids[1], h, sent, inputs, self.kv, self.token,
                                            self.load, self.tables, **statics)
        return lowered.compile().as_text() if compiled else lowered.as_text()


WeightSource = Callable[[tuple[int, ...], str | None], tuple]  # (experts, weights file) -> (graphdef, state)


class ExpertNode(_Node):
    """Expert node `index` holding experts `experts` (replicas of hot experts allowed after a re-placement),
    their weights from `load_weights(experts, weights_file)` -> (graphdef, state) with every layer stacked
    (`weights_file` at start: what the runner wrote for it, if anything); split and sharded over `devices`
    (expert FFN tensor-parallel)."""

    role = "expert"

    def __init__(self, index: int, cfg, experts, devices, endpoints, dtype, load_weights: WeightSource,
                 weights_file: str | None = None):
        super().__init__(index, cfg, devices, endpoints, dtype)
        self.load_weights = load_weights
        self.max_rows = endpoints.receivers["dispatch"].capacity // (cfg.hidden_size * self.dtype.itemsize + 4)
        self._hold(tuple(int(e) for e in experts), weights_file)

    def _hold(self, experts: tuple[int, ...], weights_file: str | None) -> None:
        graphdef, state = self.load_weights(experts, weights_file)
        layers = split_layers(sharding.shard_state(state, sharding.EXPERT_TP_RULES, self.mesh), self.cfg.num_layers)
        programs = ExpertPrograms(self.cfg, graphdef, experts, self.endpoints.receivers["dispatch"],
                                  self.endpoints.senders.get("back"), self.dtype, self.mesh)
        self.experts, self.layers, self.programs = experts, layers, programs

    def _check(self, request: p.ExpertStep) -> None:
        senders = self.endpoints.receivers["dispatch"].num_senders
        for i, caps in enumerate(request.rounds):
            nodes = [a for a, _ in caps]
            if not caps or len(set(nodes)) != len(nodes) or not all(0 <= a < senders for a in nodes):
                raise ValueError(f"round {i}: needs distinct attention nodes in [0, {senders}), got {nodes}")
            if not all(0 < cap <= self.max_rows for _, cap in caps):
                raise ValueError(f"round {i}: packet capacities must be in [1, {self.max_rows}] rows, got "
                                 f"{[cap for _, cap in caps]}")

    def step(self, request: p.ExpertStep) -> Generator[int, None, p.StepDone]:
        self._check(request)
        for layer in range(self.cfg.num_layers):
            yield 2 * layer + 1
            self._log("expert_layer", layer)
            self.token = self.programs.layer(self.layers[layer], self.layer_ids[layer], self.token,
                                             rounds=request.rounds)
        self.steps += 1
        return p.StepDone(request.step)

    def result(self, reply):
        """Waits for the node's programs: its next request must not overtake this step's receives."""
        jax.block_until_ready(self.token)
        return reply

    def _on_Place(self, request: p.Place):
        """Load experts `request.experts` and serve them from the next step; on failure keep the old ones."""
        try:
            self._hold(tuple(request.experts), request.weights)
        except Exception as err:  # noqa: BLE001 - reported to the runner, which puts the other nodes back
            return p.Failed(f"expert node {self.index} cannot load experts {list(request.experts)}: "
                            f"{type(err).__name__}: {err}")
        return p.Ok()
