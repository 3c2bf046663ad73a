"""Losing an expert node mid-decode, against a fail-stop deployment (what today's peers do): time from the kill
to its detection, to the first step after it, to steady throughput again, and to the node back; tokens/s before,
during and after.

    python bench/fault.py                       # tiny-moe (shipped checkpoint), 3 expert processes over shm
    python bench/fault.py --batch 16 --before-s 4 --after-s 8

One attention node in this process, three expert node processes (plan 1/1/3/1, m = 2, shm). The engine keeps
`--batch` greedy requests decoding (a finished one is replaced at once); a timer thread SIGKILLs expert node 1
`--before-s` seconds into the measured window, wherever the step happens to be. Four modes (`MODES`): re-route
to replicas, rebuild on the live nodes, rebuild and restart the node (it rejoins), and fail-stop (the loss
stops the deployment, as in vLLM: this bench then starts a fresh one and the requests in flight start over).
Detection is the runner's first fault event; "first step" is the end of the first step after it; "steady" is
the first step from which the next ten are all within 1.25x of the median step time after the fault. Before /
after: tokens/s over the `--window-s` seconds before the kill and at the end of the run; during: tokens/s from
the kill to the first step after it.
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
from msjax.runtime.hosts import WorkerError  # noqa: E402

REPLICAS = ((0, 1, 2, 3, 6), (3, 4, 5, 0, 7), (6, 7, 1, 2, 4, 5))  # tiny-moe's 8 experts, each on two nodes
VICTIM = 1


MODES = {  # name: (placement, restart_lost_experts, what happens)
    "replicas": (REPLICAS, False, "every expert on two nodes: re-route only"),
    "rebuild": (None, False, "no replicas: the lost node's experts loaded onto the live nodes"),
    "restart": (None, True, "rebuild, and the node started again at once (restart_lost_experts): it rejoins"),
    "fail-stop": (None, False, "today's peers (vLLM is fail-stop): the deployment stops; a fresh one is started "
                              "and the requests in flight start over"),
}


def measure(model: str, mode: str, batch: int, before_s: float, after_s: float, window_s: float) -> dict:
    placement, restart, _ = MODES[mode]
    plan = DeploymentPlan(1, 1, 3, 1, 2, transport="shm", placement=placement, restart_lost_experts=restart)

    def start_engine():
        return Engine.from_pretrained(model, plan=plan, max_num_seqs=batch, num_pages=batch * 40, page_size=16,
                                      max_num_batched_tokens=max(64, batch * 16), max_model_len=512)
    engine = start_engine()
    runner = first_runner = engine.runner
    if mode == "fail-stop":  # what a fail-stop deployment does on the loss: stop (the runner closes everything)
        def fail_stop(nodes, when):
            raise WorkerError(f"expert nodes {sorted(nodes)} lost {when} (fail-stop)")
        runner._lose = fail_stop
    sampling = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
    prompt = engine.encode("Beautiful is better than ugly. Explicit is better than implicit.")
    ids = iter(range(1 << 30))
    stopped_at = restarted_at = float("nan")
    failed = 0
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
            proc = first_runner.processes.procs["expert", VICTIM]
            killed_at.append(time.monotonic())
            os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        timer = threading.Timer(before_s, kill)
        timer.start()
        while time.monotonic() - start < before_s + after_s:
            fill()
            t0 = time.monotonic()
            try:
                out = engine.step()
            except WorkerError:  # fail-stop: every request in flight fails; start the deployment again
                stopped_at = time.monotonic()
                failed = engine.num_running() + engine.num_waiting()
                engine.close()
                engine = start_engine()
                restarted_at = time.monotonic()
                continue
            t1 = time.monotonic()
            steps.append((t1, t1 - t0, sum(len(d.token_ids) for d in out)))
        timer.join()
    finally:
        engine.close()
    kill_t = killed_at[0]
    events = [t for t, text in first_runner.faults.events if "lost" in text]
    detect = events[0] if events else stopped_at
    rejoined = next((t for t, text in first_runner.faults.events if "rejoined" in text), float("nan"))
    after = [s for s in steps if s[0] > detect]
    first = after[0][0] if after else float("nan")
    median_after = statistics.median(s[1] for s in after[1:]) if len(after) > 1 else float("nan")
    steady = next((after[i][0] for i in range(1, len(after) - 10)
                   if all(s[1] <= 1.25 * median_after for s in after[i:i + 10])), float("nan"))

    def rate(lo, hi):
        return sum(n for t, _, n in steps if lo < t <= hi) / max(hi - lo, 1e-9)

    def ms(t):
        return round(1e3 * (t - kill_t), 1) if t == t else "-"
    end = steps[-1][0]
    faults = first_runner.faults
    return {"mode": mode, "batch": batch, "detect_ms": ms(detect), "first_step_ms": ms(first),
            "steady_ms": ms(steady), "tok_s_before": round(rate(kill_t - window_s, kill_t), 1),
            "tok_s_during": round(rate(kill_t, first), 1), "tok_s_after": round(rate(end - window_s, end), 1),
            "step_ms_before": round(1e3 * statistics.median(s[1] for s in steps if s[0] <= kill_t), 2),
            "step_ms_after": round(1e3 * median_after, 2), "failed": failed, "rerun": faults.rerun_steps,
            "rebuilds": faults.rebuilds, "rebuild_ms": round(1e3 * faults.rebuild_s, 1),
            "rejoin_ms": ms(rejoined), "restart_ms": ms(restarted_at)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--before-s", type=float, default=4.0)
    parser.add_argument("--after-s", type=float, default=8.0)
    parser.add_argument("--window-s", type=float, default=2.0)
    args = parser.parse_args()
    rows = []
    for mode in MODES:
        after_s = args.after_s * (1 if mode in ("replicas", "rebuild") else 2)  # a process starts meanwhile
        rows.append(measure(args.model, mode, args.batch, args.before_s, after_s, args.window_s))
        print(rows[-1], flush=True)
    modes = "; ".join(f"{name}: {what}" for name, (_, _, what) in MODES.items())
    notes = (f"{args.model}, plan: 1 attention node (this process) + 3 expert node processes, m = 2, shm; "
             f"{args.batch} greedy requests kept decoding; expert node {VICTIM} SIGKILLed {args.before_s:g} s into "
             "the measured window by a timer thread (wherever the step is). Modes: " + modes + ". Times from "
             "the kill: detected = the runner's first fault event (fail-stop: the step's error), first step = "
             "end of the first step after it (the re-run step; the routing is an operand of the attention "
             "programs, so a re-route compiles nothing, while a rebuild compiles the live expert nodes' programs "
             "for their new experts; fail-stop: the first step of the new deployment, compiles included), steady "
             "= first step from which ten in a row are within 1.25x of the post-fault median, rejoined = the "
             "restarted node back in the placement (its endpoints rewired under their old handles, so only it "
             "compiles), restarted = the fresh deployment of fail-stop loaded. Tokens/s over "
             f"{args.window_s:g} s before the kill and at the end (restart and fail-stop run {2 * args.after_s:g} s "
             f"after the kill, the others {args.after_s:g} s), and from the kill to the first step after it. "
             "Failed = requests that errored (fail-stop: all in flight; they start over). 2 CPU cores are shared "
             "by this process and the node processes.")
    columns = [("mode", "mode"), ("batch", "batch"), ("detect_ms", "kill → detected (ms)"),
               ("first_step_ms", "kill → first step after (ms)"), ("steady_ms", "kill → steady (ms)"),
               ("tok_s_before", "tok/s before"), ("tok_s_during", "tok/s during"), ("tok_s_after", "tok/s after"),
               ("step_ms_before", "step before (ms)"), ("step_ms_after", "step after (ms)"),
               ("failed", "requests failed"), ("rerun", "steps re-run"), ("rebuilds", "rebuilds"),
               ("rebuild_ms", "load time (ms)"), ("rejoin_ms", "kill → rejoined (ms)"),
               ("restart_ms", "kill → restarted (ms)")]
    print(f"wrote {write_results('fault', rows, columns, notes)}")


if __name__ == "__main__":
    main()
