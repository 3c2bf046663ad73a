"""Profiler: measure T_a(b) and T_e(b) of the configured model on the local device with the real programs,
and fit the performance model's coefficients (paper §4.2: "obtained through profiling and interpolation").

Each node is timed running its own programs (`msjax.runtime.nodes`: one program per layer, the m2n sends and
receives inside them) with its peer replaced by a loopback: the peer's messages for a whole step sent ahead into
a shared-memory ring deep enough for all of them, what the node sends collected after (`_loopback_seconds`).

T_a(b): one layer of one attention node for a decode micro-batch of b sequences at a given context (its receive
and combine of the previous layer's expert outputs, attention, packing, sends), from the difference of a step
with 1 + L layers and a step with 1 layer. T_e(b): one layer of one expert node holding all experts, for the
rows of that micro-batch (b x top-k). T_o(b): what a step does once, not per layer (embedding, LM head,
sampling). T_c(b): 0 — the copies into and out of the M2N rings run inside both nodes' programs, so the two
times above hold them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msjax.config import DeploymentPlan, EngineConfig, ModelConfig
from msjax.models.modules import AttentionRole
from msjax.models.programs import MoEModel
from msjax.planner.profile import fit_linear


def with_layers(model: MoEModel, num_layers: int) -> MoEModel:
    """`model` with `num_layers` layers: layer i has the weights of the model's layer i mod L (embeddings and LM
    head as they are). What profiling by layer differencing needs: the same layers, one or several of them."""
    from flax import nnx

    from msjax.models.modules import ExpertRole
    cfg = dataclasses.replace(model.cfg, num_layers=num_layers)
    index = np.arange(num_layers) % model.cfg.num_layers

    def relayer(state, shared=()):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x if str(getattr(path[0], "key", path[0])) in shared else x[index], state)
    attention = nnx.merge(nnx.split(nnx.eval_shape(lambda: AttentionRole(cfg, dtype=model.dtype, rngs=nnx.Rngs(0),
                                                                           kernels=model.kernels)))[0],
                          relayer(model.attention_state, AttentionRole.SHARED_PARAMS))
    experts = nnx.merge(nnx.split(nnx.eval_shape(lambda: ExpertRole(cfg, dtype=model.dtype, rngs=nnx.Rngs(0),
                                                                      kernels=model.kernels)))[0],
                        relayer(model.expert_state))
    return MoEModel.from_modules(attention, experts)


def measure_layer_times(model: MoEModel, batches: list[int], context: int, repeats: int = 10,
                        max_model_len: int | None = None, layers: int = 2,
                        micro_batches: list[int] | None = None) -> dict[str, list[float]]:
    """Seconds per (layer, micro-batch) of an attention node and of an expert node, and per micro-batch of what a
    step does once, for each decode micro-batch size of `batches` (with `micro_batches[i]` micro-batches of that
    size per step: default one), from each node's own programs over a loopback. `context`: the tokens each
    sequence holds; `max_model_len`: the engine's, which sets how wide its page tables are (pages per sequence;
    default: room for `context`). Give both as the engine being modelled has them: the XLA:CPU attention reads
    every page of the table, so there its cost follows max_model_len, while a GPU kernel stops at each
    sequence's length. T_a comes from `layers` layers past the first (layer differencing cancels what a step
    does once). -> {"batch", "attention_s", "expert_s", "transfer_s", "step_fixed_s"}."""
    ms = list(micro_batches or [1] * len(batches))
    points = list(zip(batches, ms))
    once = measure_attention_program(with_layers(model, 1), points, context, max_model_len, repeats)
    deep = with_layers(model, 1 + layers)
    steps = measure_attention_program(deep, points, context, max_model_len, repeats)
    attention = [(s - o) / (layers * m) for s, o, m in zip(steps, once, ms)]
    return {"batch": list(batches), "attention_s": attention,
            "expert_s": measure_expert_program(deep, points, repeats=repeats),
            "transfer_s": [0.0] * len(batches),  # inside both nodes' programs
            "step_fixed_s": [max(o / m - a, 0.0) for o, a, m in zip(once, attention, ms)]}


# untimed calls of a loopback-profiled program: the first compiles, and the second may compile again (its
# token and cache are then the first call's outputs, committed to the device, a different jit cache key)
_WARM_CALLS = 2


def _loopback_seconds(num_layers: int, m: int, inbound_bytes: int, outbound_bytes: int, message: np.ndarray,
                      make_step, repeats: int) -> float:
    """Median seconds of one step of a node's layer programs with its peer replaced by a loopback through shared
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


def _loopback_endpoints(rx, tx, role: str):
    """A node's endpoints of a loopback profile: its receiver `rx`, its sender `tx`."""
    from msjax.comm.endpoints import Endpoints
    ep = Endpoints("shm", "profile", None, depth=1, timeout_s=rx.timeout_s, startup_timeout_s=0)
    inbound, outbound = ("dispatch", "back") if role == "expert" else ("back", "dispatch")
    ep.receivers[inbound], ep.senders[outbound] = rx, tx
    return ep


def _run_step(node, request) -> None:
    """One step of `node` (a `msjax.runtime.nodes` node), waited for."""
    steps = node.step(request)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        node.result(done.value)


def measure_expert_program(model: MoEModel, points: list[tuple[int, int]], repeats: int = 10,
                           seed: int = 0) -> list[float]:
    """T_e as an expert node runs it: the node's own layer programs (m2n receives and sends included) for a step
    of m micro-batches of b sequences, for each (b, m) of `points`, with the attention node replaced by a
    loopback (`_loopback_seconds`). One node holding every expert, one attention node; rows routed uniformly
    over the experts. -> seconds per (layer, micro-batch), median over `repeats` steps."""
    from msjax.comm.wire import pack_rows
    from msjax.runtime import protocol as p
    from msjax.runtime.nodes import ExpertNode
    cfg = model.cfg
    dtype = jnp.dtype(model.dtype)
    rng = np.random.default_rng(seed)
    every = tuple(range(cfg.num_experts))
    out = []
    for b, m in points:
        cap = b * cfg.top_k
        rows = jnp.asarray(rng.standard_normal((cap, cfg.hidden_size)), dtype)
        ids = jnp.asarray(rng.integers(0, cfg.num_experts, cap), jnp.int32)
        packet = np.asarray(pack_rows(rows, ids))  # uint8 [cap, row bytes]: every row valid
        request = p.ExpertStep(0, (((0, cap),),) * m)

        def make_step(rx, tx):
            node = ExpertNode(0, cfg, every, jax.devices()[:1], _loopback_endpoints(rx, tx, "expert"), dtype,
                              lambda experts, _file: model.expert_subset(experts))
            return lambda: _run_step(node, request)

        seconds = _loopback_seconds(cfg.num_layers, m, packet.nbytes, cap * cfg.hidden_size * dtype.itemsize, packet,
                                    make_step, repeats)
        out.append(seconds / (cfg.num_layers * m))
    return out


def measure_attention_program(model: MoEModel, points: list[tuple[int, int]], context: int,
                              max_model_len: int | None = None, repeats: int = 10) -> list[float]:
    """Seconds of one decode step of an attention node as it runs one: its own programs (embedding, every
    layer's attention with its m2n sends and receives and combines, LM heads, sampling) for m micro-batches of
    b sequences at `context`, for each (b, m) of `points`, with the expert node replaced by a loopback
    (`_loopback_seconds`: every (layer, micro-batch)'s expert outputs sent ahead, the packets collected after).
    One expert node holding every expert; `max_model_len` sets the page-table width as in
    `measure_layer_times`. -> seconds per step, median over `repeats`."""
    from msjax.comm.wire import row_bytes
    from msjax.runtime import protocol as p
    from msjax.runtime import step_inputs
    from msjax.runtime.nodes import AttentionNode
    cfg = model.cfg
    dtype = jnp.dtype(model.dtype)
    page_size = 16
    per_seq = -(-max(max_model_len or 0, context + page_size) // page_size)  # the engine's page-table width
    every = (tuple(range(cfg.num_experts)),)
    out = []
    for b, m in points:
        cap = b * cfg.top_k  # every row of the micro-batch goes to the one expert node
        outputs = np.zeros((cap, cfg.hidden_size), dtype)  # what the expert node would return
        batches = [step_inputs.StepBatch(
            decode=True, num_logprobs=0, tokens=np.zeros(b, np.int32), positions=np.full(b, context - 1, np.int32),
            seq_ids=np.arange(b, dtype=np.int32),
            page_table=np.arange(i * b * per_seq, (i + 1) * b * per_seq, dtype=np.int32).reshape(b, per_seq),
            logit_rows=np.arange(b, dtype=np.int32), temperature=np.zeros(b, np.float32),
            top_p=np.ones(b, np.float32), top_k=np.zeros(b, np.int32), seeds=np.zeros(b, np.uint32),
            steps=np.zeros(b, np.int32)) for i in range(m)]
        request = p.AttentionStep(0, tuple(step_inputs.pack(x) for x in batches))
        engine = EngineConfig(page_size=page_size, num_pages=m * b * per_seq, max_model_len=per_seq * page_size)

        def make_step(rx, tx, engine=engine, request=request):
            node = AttentionNode(0, cfg, engine, model.attention_def, model.attention_state, jax.devices()[:1],
                                 _loopback_endpoints(rx, tx, "attention"), every, dtype)
            return lambda: _run_step(node, request)

        out.append(_loopback_seconds(cfg.num_layers, m, outputs.nbytes, cap * row_bytes(cfg.hidden_size, dtype),
                                     outputs, make_step, repeats))
    return out


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
    from msjax.runtime.runner import NoDeviceRunner
    page_size = 16
    cfg = EngineConfig(page_size=page_size, num_pages=batch * (context // page_size + 2), max_num_seqs=batch,
                       max_num_batched_tokens=max(2048, context), max_model_len=context + steps + 2 * page_size)
    engine = Engine(types.SimpleNamespace(cfg=model_cfg), cfg, plan=DeploymentPlan(1, 1, 1, 1, m),
                    runner=NoDeviceRunner(), eos_token_ids=())
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
