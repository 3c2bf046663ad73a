"""Where a small decode step's time goes (issue 20 part 3): the engine's host work against the program itself.

    .venv/bin/python -m bench.step_overhead                      # tiny-moe, batch 1 and 8
    .venv/bin/python -m bench.step_overhead --model olmoe-2l --batches 1,8,32

One Engine (colocated, one device, the default options), `batch` requests decoding together (greedy, ignore_eos);
after a warm-up, each phase of `Engine.step` is timed over `--steps` decode steps: `schedule` (the scheduler
picks the step's sequences and pages), `build` (the fixed-shape host arrays), `dispatch` (the jitted step call
returning: argument handling and enqueueing the program, which runs asynchronously), `wait` (until the sampled
tokens are on the host: the program's remaining run time), `postprocess` (tokens appended, stop checks,
detokenization, deltas) and `other` (the rest of `step`). Then the same program alone: the step's jitted call on
the same inputs back to back, blocking on each result (`program alone`: the step with no engine work around it).
Also counted: compiles during the measured steps (the jit cache size before and after: must be 0). A step has one
device-to-host transfer, the sampled tokens (ColocatedRunner.step), and sampling runs inside the program.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("schedule", "build", "dispatch", "wait", "postprocess", "other")


class PhaseTimer:
    """Wraps the functions Engine.step calls, adding each call's wall time to its phase; `restore()` puts the
    originals back (a second measurement, or a test after this one, then runs the plain engine)."""

    def __init__(self):
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._wrapped = []  # (owner, name, what owner itself held under name, or None: a method of its class)

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)
        totals = self.totals

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - start

        self._wrapped.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, own in reversed(self._wrapped):
            if own is None:
                delattr(owner, name)  # the class's method shows through again
            else:
                setattr(owner, name, own)
        self._wrapped.clear()


def measure(engine, batch: int, steps: int, prompt: list[int]) -> dict:
    import jax

    from msjax.engine import engine as engine_module
    from msjax.engine.sampling_params import SamplingParams
    from msjax.runtime import colocated

    sampling = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", prompt, sampling)
    while any(not s.is_decoding for r in engine.replicas for s in r.scheduler.running) or \
            any(r.scheduler.waiting for r in engine.replicas):
        engine.step()  # prefill
    for _ in range(5):
        engine.step()  # warm decode steps (compiled by now)

    timer = PhaseTimer()
    runner = engine.runner
    compiled_before = colocated._step._cache_size()
    totals = []
    try:
        timer.wrap(engine.replicas[0].scheduler, "schedule", "schedule")
        timer.wrap(engine_module, "split_micro_batches", "build")
        timer.wrap(engine_module, "build_micro_batches", "build")
        timer.wrap(runner, "_run_one", "dispatch")
        timer.wrap(runner, "step", "wait")  # minus dispatch below: the runner's step is dispatch + the host copy
        timer.wrap(engine, "_postprocess", "postprocess")
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            totals.append(time.perf_counter() - start)
    finally:
        timer.restore()
    compiles = colocated._step._cache_size() - compiled_before
    per_step = {k: 1e3 * v / steps for k, v in timer.totals.items()}
    per_step["wait"] -= per_step["dispatch"]
    step_ms = 1e3 * statistics.median(totals)
    mean_ms = 1e3 * statistics.mean(totals)
    per_step["other"] = mean_ms - sum(per_step[k] for k in PHASES if k != "other")

    # the program alone: the next step's batch, run back to back (the KV pool is donated and taken back each call)
    captured = []
    run_one = runner._run_one
    runner._run_one = lambda b: captured.append(b) or run_one(b)
    try:
        engine.step()
    finally:
        del runner._run_one  # the method again
    b = captured[-1]
    program = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run_one(b))
        program.append(time.perf_counter() - start)
    for i in range(batch):
        engine.abort(f"b{batch}-{i}")
    engine.step()
    program_ms = 1e3 * statistics.median(program)
    host_ms = sum(per_step[k] for k in ("schedule", "build", "postprocess", "other"))
    return dict(batch=batch, step_ms=round(step_ms, 3), mean_step_ms=round(mean_ms, 3),
                **{f"{k}_ms": round(per_step[k], 3) for k in PHASES}, program_ms=round(program_ms, 3),
                host_ms=round(host_ms, 3), host_share=f"{host_ms / mean_ms:.0%}",
                compiles=compiles, steps=steps, rows=int(b.tokens.shape[0]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-moe", help="preset, HF directory, or olmoe-2l")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-model-len", default="default",
                        help="comma-separated EngineConfig.max_model_len values to run each batch under ('default': "
                             "the model's context; attention reading the table's full width made this matter)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from msjax.engine.engine import Engine
    model = args.model
    if model == "olmoe-2l":
        from bench.hf_models import model_dir
        model = str(model_dir(model))
    prompt = list(range(1, 17))  # 16 token ids: any vocabulary has them
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for length in args.max_model_len.split(","):
        options = {} if length == "default" else {"max_model_len": int(length)}
        options["max_num_seqs"] = max(16, *batches)  # EngineConfig's default, or every batch in one step
        engine = Engine.from_pretrained(model, **options)
        for batch in batches:
            row = measure(engine, batch, args.steps, prompt)
            row.update(model=args.model, max_model_len=engine.max_model_len)
            rows.append(row)
            print(row, flush=True)
        engine.close()
    if not args.no_write:
        from bench.common import write_results
        columns = [("model", "model"), ("max_model_len", "max_model_len"), ("batch", "batch"), ("rows", "rows"),
                   ("step_ms", "step p50 ms"),
                   ("mean_step_ms", "step mean ms"), *[(f"{k}_ms", f"{k} ms") for k in PHASES],
                   ("program_ms", "program alone ms"), ("host_ms", "host ms"),
                   ("host_share", "host share"), ("compiles", "compiles"), ("steps", "steps")]
        notes = (__doc__.split("\n\n", 2)[2].strip() + "\n\nPhases are means per step (ms); `step mean` is their "
                 "sum. `host ms` = schedule + build + postprocess + other: the engine's Python work around the "
                 "jitted call, "
                 "which runs while no program does (on this CPU backend the program and the host share the same "
                 "cores). `program alone` includes its dispatch, like `dispatch + wait`.")
        print("wrote", write_results(f"step-overhead-{args.model}", rows, columns, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
