"""Profiler: measure T_a(b) and T_e(b) of the configured model on the local device with the real programs,
and fit the performance model's coefficients (paper §4.2: "obtained through profiling and interpolation").

T_a(b): one layer of one attention node for a decode micro-batch of b sequences at a given context: the combine
of the previous layer's expert outputs, then the attention program (which ends with the dispatch packing).
T_e(b): one layer of one expert node holding all experts, for the rows of that micro-batch (b x top-k).
T_c(b): one direction of the transport (the packet to the expert node and its outputs back, halved).
T_o(b): what a step does once, not per layer: embedding, LM head and sampling of b sequences.
Each is timed on the device it would run on, synchronised per call, median over repeats; successive calls cycle
through the model's layers, as a step does, so weights come from memory and not from a warm cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msjax.config import DeploymentPlan, EngineConfig, ModelConfig
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models.layer_states import split_layers
from msjax.models.modules import AttentionRole
from msjax.models.programs import MoEModel
from msjax.planner.profile import fit_linear


def _median_seconds(fn, repeats: int, chain: int = 1) -> float:
    """Median seconds per call. chain > 1 times `chain` calls dispatched back to back with one wait at the end:
    the cost of a call inside the asynchronous host loop, where dispatch overlaps the previous call's work."""
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(chain - 1):
            fn()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) / chain)
    return statistics.median(times)


def measure_layer_times(model: MoEModel, batches: list[int], context: int, repeats: int = 20,
                        devices=None, chain: int = 1, whole_step: bool = False,
                        max_model_len: int | None = None) -> dict[str, list[float]]:
    """Seconds per layer of attention (with its combine) and of the expert node, for each decode batch.
    `context`: the tokens each sequence holds; `max_model_len`: the engine's, which sets how wide its page
    tables are (pages per sequence; default: room for `context`). Give both as the engine being modelled has
    them: the XLA:CPU attention reads every page of the table, so there its cost follows max_model_len, while a
    GPU kernel stops at each sequence's length.
    chain > 1 measures calls dispatched back to back (see `_median_seconds`), as the host loop issues them.
    whole_step=True times one program over every layer (chained, divided by the layer count), as the
    multi-process runner and its expert workers run a step, instead of one program call per layer as the
    in-process runner does: XLA compiles the two differently (on this project's CPU an expert layer cost up to
    2x more inside a program that runs every layer)."""
    from msjax.runtime.disaggregated import (DisaggregatedRunner, attention_step, combine_step, embed_step,
                                             expert_step, head_step)
    cfg = model.cfg
    page_size = 16
    max_model_len = max(max_model_len or 0, context + page_size)
    per_seq = -(-max_model_len // page_size)  # the engine's page-table width
    runner = DisaggregatedRunner(model, EngineConfig(page_size=page_size, num_pages=max(batches) * per_seq,
                                                     max_model_len=max_model_len),
                                 DeploymentPlan(1, 1, 1, 1, 1), devices)
    put = runner.transport.send
    amesh, emesh = runner.attention_meshes[0], runner.expert_meshes[0]
    layers_a, layers_e = runner.attention_layers[0], runner.expert_layers[0]  # [layer] -> that layer's weights
    out = {"batch": list(batches), "attention_s": [], "expert_s": [], "transfer_s": [], "step_fixed_s": []}
    rng = np.random.default_rng(0)
    layers = [(jnp.int32(layer), layers_a[layer], layers_e[layer]) for layer in range(cfg.num_layers)]
    for b in batches:
        table = np.arange(b * per_seq, dtype=np.int32).reshape(b, per_seq)
        batch = put(AttentionBatch(jnp.full(b, context - 1, jnp.int32), jnp.arange(b, dtype=jnp.int32),
                                   jnp.asarray(table)), amesh)
        h = put(jnp.asarray(rng.standard_normal((b, cfg.hidden_size)), model.dtype), amesh)
        layer = jnp.int32(0)
        first = attention_step(runner.attention_def, layers_a[0], layer, h, jnp.zeros_like(h),
                               batch, runner.kv[0], decode=True, routing=runner.routing)
        runner.kv[0] = first[-1]
        packets, orders, weights = first[1], first[2], first[4]
        received = put(packets[0], emesh)
        returned = put(expert_step(runner.expert_defs[0], layers_e[0], layer, (received,))[0], amesh)

        # Each call moves on to the next layer, as a decode step does, so it reads that layer's weights from
        # memory and not from a cache the previous call warmed: repeating one layer made an expert layer half as
        # expensive as the same layers in a step on this project's CPU machine (its L3 holds one layer's
        # experts, not four).
        next_a, next_e = itertools.cycle(layers), itertools.cycle(layers)

        def attention():
            moe = combine_step((returned,), orders, weights)
            index, weights_a, _ = next(next_a)
            result = attention_step(runner.attention_def, weights_a, index, h, moe, batch,
                                    runner.kv[0], decode=True, routing=runner.routing)
            runner.kv[0] = result[-1]
            return result[0]

        if whole_step:
            attention_s, expert_s = _whole_step_seconds(runner, layers_a, layers_e, h, batch, returned, orders,
                                                        weights, received, repeats, chain)
        else:
            attention_s = _median_seconds(attention, repeats, chain)

            def experts():
                index, _, weights_e = next(next_e)
                return expert_step(runner.expert_defs[0], weights_e, index, (received,))
            expert_s = _median_seconds(experts, repeats, chain)
        out["attention_s"].append(attention_s)
        out["expert_s"].append(expert_s)
        outputs = expert_step(runner.expert_defs[0], layers_e[0], layer, (received,))
        out["transfer_s"].append(_median_seconds(
            lambda: (put(packets[0], emesh), put(outputs[0], amesh)), repeats, chain) / 2)
        tokens = put(jnp.zeros(b, jnp.int32), amesh)
        zeros_f, zeros_i = put(jnp.zeros(b, jnp.float32), amesh), put(jnp.zeros(b, jnp.int32), amesh)

        def fixed():
            h0 = embed_step(runner.attention_def, layers_a[0], tokens)
            return head_step(runner.attention_def, layers_a[0], h0, h0, jnp.arange(b), zeros_f,
                             zeros_f + 1, zeros_i, zeros_i.astype(jnp.uint32), zeros_i, num_logprobs=0)

        out["step_fixed_s"].append(_median_seconds(fixed, repeats, chain))
    return out


def _whole_step_seconds(runner, layers_a, layers_e, h, batch, returned, orders, weights, received, repeats: int,
                        chain: int):
    """(attention, expert) seconds per layer when one program runs every layer, each layer's input the previous
    layer's output (as in a step): attention with its combine on the attention device, the experts on theirs."""
    from msjax.runtime.disaggregated import attention_step, combine_step, expert_step
    num_layers = runner.cfg.num_layers

    def attention_layers(layers, h, kv):
        for layer in range(num_layers):
            moe = combine_step((returned,), orders, weights)
            h, *_, kv = attention_step(runner.attention_def, layers[layer], layer, h, moe, batch, kv, decode=True,
                                       routing=runner.routing)
        return h, kv

    def expert_layers(layers, packet):
        rows = packet.rows  # [capacity, hidden]: each layer's output is the next layer's rows
        for layer in range(num_layers):
            rows = expert_step(runner.expert_defs[0], layers[layer], layer,
                               (dataclasses.replace(packet, rows=rows),))[0]
        return rows

    attention_program = jax.jit(attention_layers, donate_argnums=2)
    expert_program = jax.jit(expert_layers)

    def attention():
        out, runner.kv[0] = attention_program(layers_a, h, runner.kv[0])
        return out

    return (_median_seconds(attention, repeats, chain) / num_layers,
            _median_seconds(lambda: expert_program(layers_e, received), repeats, chain) / num_layers)


# untimed calls of a loopback-profiled program: the first compiles, and the second may compile again (its
# token and cache are then the first call's outputs, committed to the device, a different jit cache key)
_WARM_CALLS = 2


def _loopback_seconds(num_layers: int, m: int, inbound_bytes: int, outbound_bytes: int, message: np.ndarray,
                      make_step, repeats: int) -> float:
    """Median seconds of one step of a node's step program with its peer replaced by a loopback through shared
    memory. `make_step(rx, tx)` builds the program on the node's endpoints (rx: what the peer sends it, messages
    of up to `inbound_bytes`; tx: what it sends the peer, up to `outbound_bytes`) and returns a function that
    runs one step and waits for it. Before each step the peer's `message` for every (layer, micro-batch) goes
    into a ring deep enough for all of them, in the order the program receives them; after it, everything the
    node sent is drained in the same order, so sequence numbers line up from one step to the next."""
    import uuid

    from msjax.comm import native
    messages = num_layers * m
    channel = f"profile{uuid.uuid4().hex[:10]}"
    with native.Receiver("shm", f"{channel}-in", 0, 1, inbound_bytes, depth=messages) as rx, \
            native.Receiver("shm", f"{channel}-out", 0, 1, outbound_bytes, depth=messages) as peer_rx, \
            native.Sender("shm", [rx.address], 0, inbound_bytes) as peer_tx, \
            native.Sender("shm", [peer_rx.address], 0, outbound_bytes) as tx:
        step = make_step(rx, tx)
        drained = np.empty(outbound_bytes, np.uint8)
        times = []
        for r in range(repeats + _WARM_CALLS):
            for layer in range(num_layers):
                for i in range(m):
                    peer_tx.send(0, message, layer=layer, micro_batch=i)
            t0 = time.perf_counter()
            step()
            if r >= _WARM_CALLS:
                times.append(time.perf_counter() - t0)
            for layer in range(num_layers):
                for i in range(m):
                    peer_rx.recv_into(drained, 0, layer=layer, micro_batch=i)
    return statistics.median(times)


def measure_expert_program(model: MoEModel, points: list[tuple[int, int]], repeats: int = 10,
                           seed: int = 0) -> list[float]:
    """T_e as the expert node of the multi-process runtime runs it: that node's own step program
    (`expert_worker.StepPrograms`, m2n receives and sends included) for a step of m micro-batches of b
    sequences, for each (b, m) of `points`, with the attention node replaced by a loopback (`_loopback_seconds`:
    each step's packets, every layer and micro-batch, sent ahead; the outputs collected after it). One node
    holding every expert, one attention node; rows routed uniformly over the experts. -> seconds per (layer,
    micro-batch), median over `repeats` steps.

    Per-call timing (`measure_layer_times`) runs one expert layer per program call; the node runs every layer
    and micro-batch of a step in one program, which XLA compiles and schedules differently. This loopback is how
    the layer-weight copies in that program were found (`msjax.models.layer_states`); since they are gone, the
    two agree within a few percent for the expert node on this project's CPU."""
    from msjax.runtime import multiprocess as mp
    from msjax.runtime.expert_worker import StepPrograms
    cfg = model.cfg
    dtype = jnp.dtype(model.dtype)
    graphdef, layers = model.expert_def, split_layers(model.expert_state, cfg.num_layers)
    rng = np.random.default_rng(seed)
    out = []
    for b, m in points:
        cap = b * cfg.top_k
        rows = jnp.asarray(rng.standard_normal((cap, cfg.hidden_size)), dtype)
        ids = jnp.asarray(rng.integers(0, cfg.num_experts, cap), jnp.int32)
        packet = np.asarray(mp.pack_rows(rows, ids))  # uint8 [cap, row bytes]: every row valid

        def make_step(rx, tx, cap=cap, m=m):
            program = StepPrograms(cfg, graphdef, tuple(range(cfg.num_experts)), rx, tx, dtype)((((0, cap),),) * m)
            token = [jnp.zeros((), jnp.int32)]

            def step():
                token[0] = program(layers, token[0])
                token[0].block_until_ready()
            return step

        seconds = _loopback_seconds(cfg.num_layers, m, packet.nbytes, cap * cfg.hidden_size * dtype.itemsize, packet,
                                    make_step, repeats)
        out.append(seconds / (cfg.num_layers * m))
    return out


def measure_attention_program(model: MoEModel, points: list[tuple[int, int]], context: int,
                              max_model_len: int | None = None, repeats: int = 10) -> list[float]:
    """Seconds of one decode step of the attention node as the multi-process runtime runs it: the node's own
    step program (`AttentionStepProgram`: embeddings, every layer's attention with its m2n sends and receives and
    combines, LM heads, sampling) for m micro-batches of b sequences at `context`, for each (b, m) of `points`,
    with the expert node replaced by a loopback (`_loopback_seconds`: every (layer, micro-batch)'s expert
    outputs sent ahead, the packets collected after). One expert node holding every expert; `max_model_len`
    sets the page-table width as in `measure_layer_times`. -> seconds per step, median over `repeats`.

    Per-call timing pays the host's dispatch of two programs per layer (combine, attention), which on a node
    whose host shares the core (as in `bench/pipeline_pinned.py`) lands on the step; the step program has one
    dispatch per step. Predictions from this profile came within 10% of the pinned pipeline for m = 1..4 where
    the per-call ones were 10-36% high."""
    from msjax.comm.m2n import Routing
    from msjax.engine.batch import StepBatch
    from msjax.runtime import multiprocess as mp
    cfg = model.cfg
    dtype = jnp.dtype(model.dtype)
    page_size = 16
    per_seq = -(-max(max_model_len or 0, context + page_size) // page_size)  # the engine's page-table width
    layers = split_layers(model.attention_state, cfg.num_layers, AttentionRole.SHARED_PARAMS)
    routing = Routing.from_placement((tuple(range(cfg.num_experts)),), cfg.num_experts)
    device = jax.devices()[0]
    out = []
    for b, m in points:
        cap = b * cfg.top_k  # every row of the micro-batch goes to the one expert node
        outputs = np.zeros((cap, cfg.hidden_size), dtype)  # what the expert node would return
        node = [StepBatch(decode=True, num_logprobs=0, tokens=np.zeros(b, np.int32),
                          positions=np.full(b, context - 1, np.int32), seq_ids=np.arange(b, dtype=np.int32),
                          page_table=np.arange(i * b * per_seq, (i + 1) * b * per_seq, dtype=np.int32)
                          .reshape(b, per_seq), logit_rows=np.arange(b, dtype=np.int32),
                          temperature=np.zeros(b, np.float32), top_p=np.ones(b, np.float32),
                          top_k=np.zeros(b, np.int32), seeds=np.zeros(b, np.uint32), steps=np.zeros(b, np.int32))
                for i in range(m)]

        def make_step(rx, tx, node=node, b=b, m=m):
            program = mp.AttentionStepProgram(cfg, tx, rx, dtype)
            args = mp.step_args(node, device, routing)
            carry = {"kv": KVCache.create(cfg, m * b * per_seq, page_size, dtype=model.dtype),
                     "token": jnp.zeros((), jnp.int32), "load_total": jnp.zeros(cfg.num_experts, jnp.int32)}

            def step():
                sampled, carry["kv"], carry["token"], carry["load_total"] = program.jitted(
                    model.attention_def, layers, **carry, **args)
                jax.block_until_ready(sampled)
            return step

        out.append(_loopback_seconds(cfg.num_layers, m, outputs.nbytes, cap * mp.row_bytes(cfg.hidden_size, dtype),
                                     outputs, make_step, repeats))
    return out


class _NoDeviceRunner:
    """Stands in for the device: returns sampled tokens of the right shapes at once, so timing `Engine.step`
    with it measures only the engine's host work (scheduling, batch building, post-processing)."""

    def run(self, batches):
        from msjax.runtime.sampler import Sampled

        def sampled(b):
            n = len(b.logit_rows)
            return Sampled(np.ones(n, np.int32), np.zeros(n, np.float32), np.zeros((n, b.num_logprobs), np.int32),
                           np.zeros((n, b.num_logprobs), np.float32))
        return [[sampled(b) for b in node] for node in batches]


def time_decode_steps(engine, batch: int, context: int, steps: int, warm_decode_steps: int = 3,
                      around: Callable[[str], None] | None = None) -> float:
    """Queue `batch` requests of `context` prompt tokens, step through their prefill and `warm_decode_steps`
    decode steps (which compile), then return the median seconds of `steps` more decode steps. Each request
    has room for 8 steps past those, for a caller's traced step. `around("start")` / `around("stop")` are
    called right before and after each timed step (a caller's CPU-time probe)."""
    probe = None if around is None else (lambda _, when: around(when))
    return time_decode_step_variants(engine, batch, context, steps, {None: lambda: None}, warm_decode_steps,
                                     around=probe)[None]


def time_decode_step_variants(engine, batch: int, context: int, steps: int, variants: dict,
                              warm_decode_steps: int = 3, around: Callable | None = None,
                              after: Callable[[], None] | None = None, spare_steps: int = 8) -> dict:
    """Like `time_decode_steps`, for several settings of one engine timed step by step in turn: `variants` maps
    a key to a function that sets the engine up for the next step (say, its number of micro-batches). Each
    variant gets `warm_decode_steps` untimed steps (its compiles), then the timed steps go round the variants
    `steps` times, so a slow spell of the machine lands on every variant alike and all of them run in the same
    processes with the same memory. -> {key: median seconds}. `around(key, "start" | "stop")` is called right
    before and after each timed step; `after()` once after the timed steps, while the requests still decode
    (each has room for `spare_steps` more steps)."""
    from msjax.engine.sampling_params import SamplingParams
    rounds = (warm_decode_steps + steps) * len(variants)
    sp = SamplingParams(max_tokens=rounds + spare_steps, temperature=0.0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        engine.add_request(str(i), [(i * 7 + j) % vocab for j in range(context)], sp)
    while engine.stats.num_decode_steps == 0:  # prefill, and the first decode step
        engine.step()
    for setup in variants.values():
        setup()
        for _ in range(warm_decode_steps):
            engine.step()
    times = {key: [] for key in variants}
    for _ in range(steps):
        for key, setup in variants.items():
            setup()
            if around is not None:
                around(key, "start")
            t0 = time.perf_counter()
            engine.step()
            times[key].append(time.perf_counter() - t0)
            if around is not None:
                around(key, "stop")
    if after is not None:
        after()
    return {key: statistics.median(t) for key, t in times.items()}


def traced_host_seconds(engine, variants: dict, rounds: int = 2) -> dict:
    """T_host of the real engine: the host work of a decode step that no device overlaps (scheduling, batch
    building, moving the inputs, dispatch, output handling), as the step's wall time minus the span of the device
    programs it ran (`timeline.executions`), read from a profiler trace of `rounds` steps per variant (no
    Python tracer, whose overhead would land on exactly this). The engine must have requests decoding.
    `variants` as in `time_decode_step_variants`. -> {key: median seconds}."""
    import tempfile
    from pathlib import Path

    from msjax.runtime.timeline import executions, read_trace_events
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    keys = []
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True, profiler_options=options):
            for _ in range(rounds):
                for key, setup in variants.items():
                    setup()
                    with jax.profiler.TraceAnnotation(f"msjax-host-probe-{len(keys)}"):
                        engine.step()
                    keys.append(key)
        (path,) = Path(folder).glob("plugins/profile/*/perfetto_trace.json.gz")
        events = read_trace_events(path)
    runs = [span for spans in executions(events).values() for span in spans]  # (start µs, end µs)
    steps = {int(e["name"].rsplit("-", 1)[1]): e for e in events
             if e.get("ph") == "X" and e["name"].startswith("msjax-host-probe-")}
    host = {key: [] for key in variants}
    for i, key in enumerate(keys):
        start, end = steps[i]["ts"], steps[i]["ts"] + steps[i]["dur"]
        inside = [(a, b) for a, b in runs if start <= a <= end]
        if not inside:
            raise RuntimeError("traced_host_seconds: the trace shows no device program in a step")
        busy = max(b for _, b in inside) - min(a for a, _ in inside)
        host[key].append((steps[i]["dur"] - busy) * 1e-6)  # the trace's times are µs
    return {key: statistics.median(t) for key, t in host.items()}


def measure_host_seconds(model_cfg: ModelConfig, batch: int, context: int, m: int, steps: int = 20) -> float:
    """Median seconds of the engine's host work in one decode step of `batch` sequences in m micro-batches
    (T_host: what no device overlaps in the one-process loop)."""
    import types

    from msjax.engine.engine import Engine
    page_size = 16
    cfg = EngineConfig(page_size=page_size, num_pages=batch * (context // page_size + 2), max_num_seqs=batch,
                       max_num_batched_tokens=max(2048, context), max_model_len=context + steps + 2 * page_size)
    engine = Engine(types.SimpleNamespace(cfg=model_cfg), cfg, plan=DeploymentPlan(1, 1, 1, 1, m),
                    runner=_NoDeviceRunner(), eos_token_ids=())
    return time_decode_steps(engine, batch, context, steps, warm_decode_steps=2)


def fit(measured: dict[str, list[float]]):
    """T_a, T_e (and, when measured, T_c and T_o) as `LinearCost`s in seconds over the micro-batch size."""
    costs = [fit_linear(measured["batch"], measured["attention_s"]),
             fit_linear(measured["batch"], measured["expert_s"])]
    for key in ("transfer_s", "step_fixed_s"):
        if measured.get(key):
            costs.append(fit_linear(measured["batch"], measured[key]))
    return tuple(costs)


@dataclasses.dataclass(frozen=True)
class MeasuredCost:
    """Seconds over the micro-batch size through measured points (the paper's "profiling and interpolation"):
    piecewise linear between them and along the end segments beyond, instead of one line through all of them,
    which misses where a cost is not linear in the batch (small batches on a CPU)."""

    batch: tuple[float, ...]  # ascending
    seconds: tuple[float, ...]
    source: str = "measured"

    def __call__(self, tokens: float) -> float:
        x, y = np.asarray(self.batch, float), np.asarray(self.seconds, float)
        if len(x) == 1:
            return float(y[0])
        k = int(np.clip(np.searchsorted(x, tokens) - 1, 0, len(x) - 2))  # the segment holding `tokens`
        return float(y[k] + (y[k + 1] - y[k]) * (tokens - x[k]) / (x[k + 1] - x[k]))


def interpolate(measured: dict[str, list[float]]):
    """Like `fit`, as `MeasuredCost`s through the measured points."""
    order = np.argsort(measured["batch"])
    keys = ["attention_s", "expert_s"] + [k for k in ("transfer_s", "step_fixed_s") if measured.get(k)]
    return tuple(MeasuredCost(tuple(float(measured["batch"][i]) for i in order),
                              tuple(float(measured[k][i]) for i in order)) for k in keys)


def predicted_step_seconds(t_a, t_e, layers: int, batch: int, m: int, overlap: bool, t_c=None,
                           t_o=None, t_host: float = 0.0) -> float:
    """One decode step of `batch` sequences in m micro-batches with one attention and one expert node.

    overlap=True is the paper's pipeline (Eq. 5). overlap=False is what one process of XLA:CPU devices does:
    the two groups share the cores, so every program and copy runs after the other. t_o (per micro-batch: embed,
    head, sampling) is added once per micro-batch, less, with overlap, what hides behind the expert node's last
    layer: the multi-process attention node runs each micro-batch's head right after its last receive, while the
    experts still work on the next micro-batches. t_host (the engine's host work per step) is added once."""
    b = batch / m
    a, e = t_a(b), t_e(b)
    c = t_c(b) if t_c is not None else 0.0
    o = t_o(b) if t_o is not None else 0.0
    if not overlap:
        return layers * m * (a + e + 2 * c) + m * o + t_host
    fixed = m * o - min((m - 1) * o, e + 2 * c) + t_host  # the heads of micro-batches 0..m-2 overlap the tail
    t_f = max(a, e)
    round_trip = a + e + 2 * c
    return round_trip - t_f + max(m * t_f, round_trip) * layers + fixed


def profile_toml(measured: dict[str, list[float]], gpu: str = "local") -> str:
    """The measurements as a profile file that `msjax plan --profile` reads."""
    def entry(role, key):
        times = ", ".join(f"{1e3 * t:.4f}" for t in measured[key])
        return (f"[[{role}]]\ngpu = \"{gpu}\"\ntp = 1\nbatch = [{', '.join(map(str, measured['batch']))}]\n"
                f"time_ms = [{times}]\n")
    return entry("attention", "attention_s") + "\n" + entry("expert", "expert_s")


__all__ = ["fit", "interpolate", "MeasuredCost", "measure_attention_program", "measure_expert_program",
           "measure_host_seconds", "measure_layer_times", "predicted_step_seconds", "profile_toml",
           "time_decode_step_variants", "time_decode_steps", "traced_host_seconds", "ModelConfig"]
