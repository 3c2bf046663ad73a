"""Losing an expert node mid-decode: time from the kill to its detection, to the first step after the re-route,
and to steady throughput again, with and without replicas of its experts; tokens/s before, during and after.

    python bench/fault.py                       # tiny-moe (shipped checkpoint), 3 expert processes over shm
    python bench/fault.py --batch 16 --before-s 4 --after-s 8

One attention node in this process, three expert node processes (plan 1/1/3/1, m = 2, shm). The engine keeps
`--batch` greedy requests decoding (a finished one is replaced at once); a timer thread SIGKILLs expert node 1
`--before-s` seconds into the measured window, wherever the step happens to be. Detection is the runner's
first fault event; "first step" is the end of the first step after it (the re-run step, including any
compile a rebuild needs); "steady" is the first step from which the next ten are all within 1.25x of
the median step time after the fault. Before / after: tokens/s over the `--window-s` seconds before the kill and
at the end of the run; during: tokens/s from the kill to the first step after it.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402
from msjax import SamplingParams  # noqa: E402
from msjax.config import DeploymentPlan  # noqa: E402
from msjax.engine.engine import Engine  # noqa: E402

REPLICAS = ((0, 1, 2, 3, 6), (3, 4, 5, 0, 7), (6, 7, 1, 2, 4, 5))  # tiny-moe's 8 experts, each on two nodes
VICTIM = 1


def measure(model: str, replicas: bool, restart: bool, batch: int, before_s: float, after_s: float,
            window_s: float) -> dict:
    plan = DeploymentPlan(1, 1, 3, 1, 2, transport="shm", placement=REPLICAS if replicas else None,
                          restart_lost_experts=restart)
    engine = Engine.from_pretrained(model, plan=plan, max_num_seqs=batch, num_pages=batch * 40, page_size=16,
                                    max_num_batched_tokens=max(64, batch * 16), max_model_len=512)
    runner = engine.runner
    sampling = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
    prompt = engine.encode("Beautiful is better than ugly. Explicit is better than implicit.")
    ids = iter(range(1 << 30))
    try:
        def fill():
            while engine.num_running() + engine.num_waiting() < batch:
                engine.add_request(f"r{next(ids)}", prompt, sampling)
        for _ in range(20):  # compile the prefill and decode shapes first
            fill()
            engine.step()
        steps: list[tuple[float, float, int]] = []  # (end, seconds, tokens)
        killed_at: list[float] = []

        def kill():
            proc = runner.processes.procs["expert", VICTIM]
            killed_at.append(time.monotonic())
            os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        timer = threading.Timer(before_s, kill)
        timer.start()
        while time.monotonic() - start < before_s + after_s:
            fill()
            t0 = time.monotonic()
            out = engine.step()
            t1 = time.monotonic()
            steps.append((t1, t1 - t0, sum(len(d.token_ids) for d in out)))
        timer.join()
    finally:
        engine.close()
    kill_t = killed_at[0]
    events = [t for t, text in runner.faults.events if "lost" in text]
    detect = events[0] if events else float("nan")
    rejoined = next((t for t, text in runner.faults.events if "rejoined" in text), float("nan"))
    after = [s for s in steps if s[0] > detect]
    first = after[0][0] if after else float("nan")
    median_after = statistics.median(s[1] for s in after[1:]) if len(after) > 1 else float("nan")
    steady = next((after[i][0] for i in range(1, len(after) - 10)
                   if all(s[1] <= 1.25 * median_after for s in after[i:i + 10])), float("nan"))

    def rate(lo, hi):
        return sum(n for t, _, n in steps if lo < t <= hi) / max(hi - lo, 1e-9)
    end = steps[-1][0]
    faults = runner.faults
    return {"replicas": "yes" if replicas else "no", "restart": "yes" if restart else "no", "batch": batch,
            "detect_ms": round(1e3 * (detect - kill_t), 1), "first_step_ms": round(1e3 * (first - kill_t), 1),
            "steady_ms": round(1e3 * (steady - kill_t), 1),
            "tok_s_before": round(rate(kill_t - window_s, kill_t), 1),
            "tok_s_during": round(rate(kill_t, first), 1), "tok_s_after": round(rate(end - window_s, end), 1),
            "step_ms_before": round(1e3 * statistics.median(s[1] for s in steps if s[0] <= kill_t), 2),
            "step_ms_after": round(1e3 * median_after, 2), "rerun": faults.rerun_steps, "rebuilds": faults.rebuilds,
            "rebuild_ms": round(1e3 * faults.rebuild_s, 1),
            "rejoin_ms": round(1e3 * (rejoined - kill_t), 1) if restart else "-"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--before-s", type=float, default=4.0)
    parser.add_argument("--after-s", type=float, default=8.0)
    parser.add_argument("--window-s", type=float, default=2.0)
    args = parser.parse_args()
    rows = []
    for replicas, restart in ((True, False), (False, False), (False, True)):
        after_s = args.after_s * (2 if restart else 1)  # the restarted process loads while decode goes on
        rows.append(measure(args.model, replicas, restart, args.batch, args.before_s, after_s, args.window_s))
        print(rows[-1], flush=True)
    notes = (f"{args.model}, plan: 1 attention node (this process) + 3 expert node processes, m = 2, shm; "
             f"{args.batch} greedy requests kept decoding; expert node {VICTIM} SIGKILLed {args.before_s:g} s into "
             "the measured window by a timer thread (wherever the step is). Times from the kill: detect = the "
             "runner's first fault event, first step = end of the first step after it (the re-run step; the "
             "routing is an operand of the attention programs, so a re-route compiles nothing, while a rebuild "
             "compiles the live expert nodes' programs for their new experts), steady = first step from which ten in a row are within 1.25x of the "
             f"post-fault median. Tokens/s over {args.window_s:g} s before the kill and at the end, and from the "
             "kill to the first step after it. With replicas every expert is on two nodes (re-route only); "
             "without, the lost node's experts are loaded from the checkpoint onto the live nodes (rebuild). "
             "Restart: the plan's restart_lost_experts starts the node again at once; it loads while the others "
             f"serve and rejoins between steps (rejoin = kill to rejoined; that row runs {2 * args.after_s:g} s "
             "after the kill, and its 'after' is at the end, with the node back; the rewired endpoints keep their "
             "handles, so only the new node compiles its programs). 2 CPU cores are shared by this process and "
             "the node processes.")
    columns = [("replicas", "replicas"), ("batch", "batch"), ("detect_ms", "kill → detected (ms)"),
               ("first_step_ms", "kill → first step after (ms)"), ("steady_ms", "kill → steady (ms)"),
               ("tok_s_before", "tok/s before"), ("tok_s_during", "tok/s during"), ("tok_s_after", "tok/s after"),
               ("step_ms_before", "step before (ms)"), ("step_ms_after", "step after (ms)"),
               ("rerun", "steps re-run"), ("rebuilds", "rebuilds"), ("rebuild_ms", "load time (ms)"),
               ("restart", "restart"), ("rejoin_ms", "kill → rejoined (ms)")]
    print(f"wrote {write_results('fault', rows, columns, notes)}")


if __name__ == "__main__":
    main()
