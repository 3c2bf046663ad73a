"""The ping-pong pipeline across processes: the attention node (held by the engine's process) pinned to one core,
the expert node (a node process, plan transport shm) pinned to another, packets through the native M2N library.
Decode step time for m = 1..4, and the performance model's prediction (paper Eq. 5) from T_a, T_e profiled on
one core each (each node's own layer programs over a loopback).

    .venv/bin/python bench/pipeline_pinned.py [--batch 64] [--context 256] [--micro-batches 1,2,3,4]

Unlike bench/pipeline.py (both nodes as XLA:CPU devices of one process, sharing the cores), here the two groups
have a core each, as they would have separate GPUs: m > 1 lets attention of micro-batch i+1 overlap the experts
of micro-batch i.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ATTENTION_CPU, EXPERT_CPU = 0, 1
os.sched_setaffinity(0, {ATTENTION_CPU})  # before JAX starts its threads: they inherit it
# one core per process: one XLA:CPU thread, not a pool whose idle threads compete with the one doing the work
# (the expert processes inherit these flags)
os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                    if "host_platform_device_count" not in f]
                                   + ["--xla_cpu_multi_thread_eigen=false"])
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402
from bench.pipeline import BALANCED  # noqa: E402
from msjax import Engine, EngineConfig  # noqa: E402
from msjax.config import DeploymentPlan  # noqa: E402
from msjax.engine.batch import decode_bucket  # noqa: E402
from msjax.models.programs import MoEModel  # noqa: E402
from msjax.planner.profiler import (interpolate, measure_layer_times, predicted_step_seconds,  # noqa: E402
                                   time_decode_step_variants, traced_host_seconds)
from msjax.runtime.runner import make_runner  # noqa: E402


def pin_process(pid: int, cpu: int) -> None:
    """Every thread of `pid` (and so the threads it starts later) onto one core."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


WARM_STEPS = 3  # untimed decode steps per m (its compile), time_decode_step_variants' default
HOST_ROUNDS = 2  # traced steps per m after the timed ones, for T_host


def engine_config(batch: int, context: int, steps: int, variants: int) -> EngineConfig:
    """Room for the prompts and every decode step of a run: each sequence gains one token per step."""
    max_model_len = context + variants * (WARM_STEPS + steps + HOST_ROUNDS) + 16
    return EngineConfig(page_size=16, num_pages=batch * -(-max_model_len // 16), max_num_seqs=batch,
                        max_num_batched_tokens=max(batch, 256), max_model_len=max_model_len)


def timed_context(context: int, steps: int, variants: int) -> int:
    """The tokens a sequence holds halfway through the timed steps (prompt, first decode step, the warm-up
    steps of every variant, then half the timed rounds): the context the profile should time attention at."""
    return context + 1 + variants * (WARM_STEPS + steps // 2)


def measure(model: MoEModel, ms: list[int], batch: int, context: int, steps: int,
            attention_processes: bool = False) -> dict[int, tuple]:
    """One attention node and one expert process, every m of `ms` timed in turn step by step (the engine's
    micro-batch count changes between steps; the runner takes any number per step). -> {m: (median decode step
    seconds, attention busy, experts busy, T_host seconds)}, busy = CPU time / wall time of each node's process
    over that m's timed steps, the M2N waits' polling phase included (up to MSJAX_M2N_POLL_US before a waiter
    sleeps); T_host from a profiler trace of HOST_ROUNDS more steps per m (`traced_host_seconds`). With
    `attention_processes` the attention node is a process of its own on the engine's core (the engine's process
    only schedules, asleep on the control channel while the nodes run), and T_host is not traced (nan): the
    engine's process runs no program to trace."""
    cfg = engine_config(batch, context, steps, len(ms))
    plan = DeploymentPlan(1, 1, 1, 1, ms[0], transport="shm", attention_processes=attention_processes)
    runner = make_runner(model, cfg, plan)
    try:
        procs = runner.processes.procs
        pin_process(procs["expert", 0].pid, EXPERT_CPU)
        if attention_processes:
            pin_process(procs["attention", 0].pid, ATTENTION_CPU)
        pids = (procs["attention", 0].pid if attention_processes else os.getpid(), procs["expert", 0].pid)
        engine = Engine(model, cfg, plan=plan, runner=runner)
        wall = {m: 0.0 for m in ms}
        cpu = {m: [0.0, 0.0] for m in ms}
        started = {}

        def around(m: int, when: str) -> None:
            now, used = time.perf_counter(), [cpu_seconds(p) for p in pids]
            if when == "start":
                started[m] = (now, used)
                return
            wall[m] += now - started[m][0]
            for j in range(2):
                cpu[m][j] += used[j] - started[m][1][j]

        def use(m: int):
            return lambda: setattr(engine, "micro_batches", m)

        variants = {m: use(m) for m in ms}
        host = {}
        trace = None if attention_processes else lambda: host.update(traced_host_seconds(engine, variants,
                                                                                          HOST_ROUNDS))
        step_s = time_decode_step_variants(engine, batch, context, steps, variants, WARM_STEPS, around=around,
                                           after=trace, spare_steps=8 + HOST_ROUNDS * len(ms))
        return {m: (step_s[m], cpu[m][0] / wall[m], cpu[m][1] / wall[m], host.get(m, float("nan"))) for m in ms}
    finally:
        runner.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batches", default="1,2,3,4")
    parser.add_argument("--expert-ffn", type=int, default=BALANCED.expert_ffn_size,
                        help="expert FFN width: smaller moves T_e towards T_a on one core")
    parser.add_argument("--layers", type=int, default=BALANCED.num_layers,
                        help="decoder layers: a step's fixed costs (host work, LM head, the pipeline's fill) are "
                             "shared by more layers in a deeper model, as in real ones (32-60 layers)")
    parser.add_argument("--poll-us", type=int, default=20000,
                        help="MSJAX_M2N_POLL_US for both processes: how long an M2N wait polls before it sleeps. "
                             "Each node owns its core here (as a GPU's proxy thread polls), and a sleeping vCPU "
                             "can take hundreds of µs to wake; 200 is the library's default")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs, each a fresh pair of processes timing every m in turn; the table gives their "
                             "median and each run")
    parser.add_argument("--compare-attention-processes", action="store_true",
                        help="no profiles or predictions: each run times every m with the attention node in the "
                             "engine's process, then in a process of its own (plan attention_processes), both "
                             "pinned to the same core, and the table compares their step times")
    args = parser.parse_args()
    os.environ["MSJAX_M2N_POLL_US"] = str(args.poll_us)  # read at the first wait; the workers inherit it
    if len(os.sched_getaffinity(0)) != 1 or os.cpu_count() < 2:
        sys.exit("needs two cores")
    model_cfg = dataclasses.replace(BALANCED, expert_ffn_size=args.expert_ffn, num_layers=args.layers)
    model = MoEModel.random(model_cfg, seed=0)
    ms = [int(x) for x in args.micro_batches.split(",")]
    sizes = {m: decode_bucket(-(-args.batch // m), args.batch) for m in ms}
    max_model_len = engine_config(args.batch, args.context, args.steps, len(ms)).max_model_len
    if args.compare_attention_processes:
        return compare_attention_processes(model, ms, sizes, args)

    def profile():
        """T_a, T_e (per layer and micro-batch), T_o (per micro-batch) on one core (this process is pinned), from
        each node's own layer programs over a loopback at each m's micro-batch with m micro-batches per step, at
        the timed steps' context and page-table width (the XLA:CPU attention reads the whole table); T_c = 0
        (the M2N copies run inside the programs)."""
        order = sorted(ms, key=lambda m: sizes[m])
        measured = measure_layer_times(model, [sizes[m] for m in order], timed_context(args.context, args.steps,
                                                                                        len(ms)),
                                       max_model_len=max_model_len, micro_batches=order)
        return interpolate(measured)

    # per run: (step s, attention busy, experts busy, T_host s, predicted s, drift)
    runs = {m: [] for m in ms}
    profiles = []
    for _ in range(args.repeats):
        # profiled right before and right after the run they predict: this machine's speed drifts by tens of
        # percent over minutes, and how far the two profiles disagree says how steady the run was
        before = profile()
        timed = measure(model, ms, args.batch, args.context, args.steps)  # a fresh pair of processes
        after = profile()
        profiles.append(before)
        for m, run in timed.items():
            guesses = [predicted_step_seconds(t_a, t_e, model_cfg.num_layers, sizes[m] * m, m, overlap=True,
                                              t_c=t_c, t_o=t_o, t_host=run[3])
                       for t_a, t_e, t_c, t_o in (before, after)]
            predicted, drift = statistics.mean(guesses), guesses[1] / guesses[0] - 1
            runs[m].append((*run, predicted, drift))
            print(f"m={m}: {1e3 * run[0]:.1f} ms, busy {run[1]:.0%} / {run[2]:.0%}, host {1e3 * run[3]:.1f} ms, "
                  f"predicted {1e3 * predicted:.1f} ms (profiles before / after the run differ by {drift:+.0%})",
                  flush=True)
    rows = []
    for m in ms:
        step_s = statistics.median(r[0] for r in runs[m])
        predicted = statistics.median(r[4] for r in runs[m])
        rows.append({"m": m, "micro_batch": sizes[m], "step_ms": round(1e3 * step_s, 1),
                     "spread_ms": " / ".join(f"{1e3 * r[0]:.1f}" for r in runs[m]),
                     "busy_attention": f"{statistics.median(r[1] for r in runs[m]):.0%}",
                     "busy_experts": f"{statistics.median(r[2] for r in runs[m]):.0%}",
                     "tok_s": round(args.batch / step_s, 1),
                     "speedup": f"{statistics.median(runs[ms[0]][k][0] for k in range(args.repeats)) / step_s:.2f}x",
                     "run_speedups": " / ".join(f"{b[0] / r[0]:.2f}" for b, r in zip(runs[ms[0]], runs[m])),
                     "host_ms": round(1e3 * statistics.median(r[3] for r in runs[m]), 1),
                     "predicted_ms": round(1e3 * predicted, 1),
                     "error": " / ".join(f"{r[4] / r[0] - 1:+.0%}" for r in runs[m]),
                     "drift": " / ".join(f"{r[5]:+.0%}" for r in runs[m])})
        print(rows[-1], flush=True)

    def show(name, c):  # the measured points the prediction interpolates between
        return f"{name} = " + ", ".join(f"{1e3 * t:.2f}" for t in c.seconds) + " ms"

    c = model_cfg
    t_a, t_e, t_c, t_o = profiles[0]
    how_profiled = ("T_a and T_e from each node's own layer programs over a loopback at each m's micro-batch with m "
                    "micro-batches per step, T_a by layer differencing (1 + 2 layers against 1), T_c = 0: the M2N "
                    "copies run inside the programs")
    notes = (f"Attention node = held by the engine's process, pinned to core {ATTENTION_CPU}; expert node = a node process "
             f"pinned to core {EXPERT_CPU}; plan transport shm (m2n custom calls inside the programs). Random MoE "
             f"of bench/pipeline.py: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts top-"
             f"{c.top_k}, expert FFN {c.expert_ffn_size}, float32; decode batch {args.batch}, context {args.context}; "
             f"{args.repeats} runs, each a fresh pair of processes in which the m take turns step by step "
             f"({args.steps} timed steps per m, median); the table gives the median of the runs and each run; "
             f"busy = CPU time / wall time of each process over the timed steps, M2N polling included "
             f"(MSJAX_M2N_POLL_US={args.poll_us}: a wait polls that long before it sleeps, so with a long budget "
             f"busy is near 100% and says little). "
             f"XLA:CPU single-threaded in both processes (one core each). "
             f"Each node runs one program per layer (every micro-batch inside, m2n calls chained in ping-pong "
             f"order; msjax.runtime.layer_programs), each layer's weights given to it as their own arrays. "
             f"Each run profiled on one core right before and right after it ({how_profiled}, at the timed "
             f"steps' mean context {timed_context(args.context, args.steps, len(ms))} and page-table width); "
             f"the prediction is the mean of the two profiles' and the drift column how far the after-profile's "
             f"prediction moved from the before-profile's (large: the machine's speed changed during the run); "
             f"the first run's before-profile at micro-batches {', '.join(map(str, t_a.batch))}: "
             f"{show('T_a', t_a)}, {show('T_e', t_e)}, {show('T_c', t_c)} (in-process copy), {show('T_o', t_o)} per "
             f"micro-batch (the prediction reads them at each m's micro-batch: interpolation, not a line fitted "
             f"through all sizes); "
             f"T_host = the engine's host work per step that no program overlaps (scheduling, inputs, dispatch, "
             f"outputs): step wall time minus the span of the attention node's program, from a profiler trace of "
             f"{HOST_ROUNDS} more steps per m in each run. Predicted = Eq. 5 (overlapped pipeline) + m x T_o (less "
             f"the heads that overlap the expert node's last layer) + T_host, from each run's own profiles (the "
             f"table: the median of the runs' predictions, and each "
             f"run's error). \"vs m=1\": medians; \"per run\": each run's m = 1 step over its step.")
    name = "pipeline-pinned" + ("" if args.expert_ffn == BALANCED.expert_ffn_size else f"-ffn{args.expert_ffn}")
    name += "" if args.layers == BALANCED.num_layers else f"-{args.layers}layers"
    path = write_results(name, rows, [("m", "m"), ("micro_batch", "micro-batch (padded)"),
                                                   ("step_ms", "decode step (ms)"), ("spread_ms", "runs (ms)"),
                                                   ("busy_attention", "attention busy"),
                                                   ("busy_experts", "experts busy"), ("tok_s", "tokens/s"),
                                                   ("speedup", "vs m=1"), ("run_speedups", "per run"),
                                                   ("host_ms", "T_host (ms)"),
                                                   ("predicted_ms", "Eq. 5 predicted (ms)"),
                                                   ("error", "error per run"),
                                                   ("drift", "profile drift per run")], notes)
    print(f"wrote {path}")


def compare_attention_processes(model: MoEModel, ms: list[int], sizes: dict[int, int], args) -> None:
    """Step times with the attention node in the engine's process and in a process of its own, run after run
    in alternation (each run fresh processes), and their ratio: what the extra hop (the step's inputs to the
    attention process, its sampled tokens back, over the M2N control channel) costs per step."""
    runs = {m: [] for m in ms}  # (here, processes) step seconds per run
    for _ in range(args.repeats):
        here = measure(model, ms, args.batch, args.context, args.steps)
        apart = measure(model, ms, args.batch, args.context, args.steps, attention_processes=True)
        for m in ms:
            runs[m].append((here[m][0], apart[m][0], apart[m][1], apart[m][2]))
            print(f"m={m}: here {1e3 * here[m][0]:.1f} ms, attention process {1e3 * apart[m][0]:.1f} ms "
                  f"(busy {apart[m][1]:.0%} / {apart[m][2]:.0%})", flush=True)
    rows = []
    for m in ms:
        here = statistics.median(r[0] for r in runs[m])
        apart = statistics.median(r[1] for r in runs[m])
        base = statistics.median(r[1] for r in runs[ms[0]])
        rows.append({"m": m, "micro_batch": sizes[m], "here_ms": round(1e3 * here, 1),
                     "apart_ms": round(1e3 * apart, 1),
                     "runs": " / ".join(f"{1e3 * r[0]:.1f}, {1e3 * r[1]:.1f}" for r in runs[m]),
                     "extra_ms": round(1e3 * (apart - here), 2),
                     "ratios": " / ".join(f"{r[1] / r[0]:.3f}" for r in runs[m]),
                     "tok_s": round(args.batch / apart, 1), "speedup": f"{base / apart:.2f}x",
                     "busy": f"{statistics.median(r[2] for r in runs[m]):.0%} / "
                             f"{statistics.median(r[3] for r in runs[m]):.0%}"})
        print(rows[-1], flush=True)
    c = model.cfg
    notes = (f"The attention node in the engine's process (\"here\", as in the other pipeline-pinned tables) vs "
             f"in a process of its own (plan attention_processes = true: the engine's process sends it each "
             f"step's packed inputs and reads back the sampled tokens over an M2N control channel, shm), both "
             f"pinned to core {ATTENTION_CPU} with the engine's process, the expert node's process on core "
             f"{EXPERT_CPU}; transport shm. Random MoE of bench/pipeline.py: {c.num_layers} layers, hidden "
             f"{c.hidden_size}, {c.num_experts} experts top-{c.top_k}, expert FFN {c.expert_ffn_size}, float32; "
             f"decode batch {args.batch}, context {args.context}; {args.repeats} runs, each the two deployments "
             f"one after the other in fresh processes, the m taking turns step by step ({args.steps} timed steps "
             f"per m, median); MSJAX_M2N_POLL_US={args.poll_us}; XLA:CPU single-threaded. busy: attention "
             f"process / expert process, CPU time over wall time (polling included).")
    name = "pipeline-pinned-attention-processes"
    name += "" if args.expert_ffn == BALANCED.expert_ffn_size else f"-ffn{args.expert_ffn}"
    name += "" if args.layers == BALANCED.num_layers else f"-{args.layers}layers"
    path = write_results(name, rows, [("m", "m"), ("micro_batch", "micro-batch (padded)"),
                                      ("here_ms", "step, attention in the engine (ms)"),
                                      ("apart_ms", "step, attention process (ms)"),
                                      ("extra_ms", "difference (ms)"), ("runs", "runs (ms): here, process"),
                                      ("ratios", "process / here per run"), ("tok_s", "tokens/s (process)"),
                                      ("speedup", "vs m=1 (process)"), ("busy", "busy (process)")], notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
