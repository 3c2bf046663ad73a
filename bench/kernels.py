"""Kernel benchmarks on one GPU: the measured ceilings, then every kernel bench against its alternatives.

    .venv/bin/python bench/kernels.py [--repeats 10] [--inner 10]

First the ceilings of this device, measured in the same run: device-to-device copy bandwidth (a 2 GiB bf16
array through `x * 2`, read + write) and the bf16 8192³ matmul rate. Then `bench/kernels_gemm.run(ceilings)`
and, when `bench/kernels_attention.py` exists and imports, its `run(ceilings)`. Each `run` returns rows with the
keys of `COLUMNS`; the floor of a GEMM row is max(FLOPs / matmul rate, bytes / copy bandwidth), of an attention
row bytes / copy bandwidth, and share = floor / measured time. Writes
`bench/results/kernels-<hardware>-<yyyy-mm-dd>.md` and `.json`. Needs a GPU: on a CPU it exits with a message.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

COLUMNS = [("implementation", "implementation"), ("case", "case"), ("us", "µs"), ("floor_us", "floor µs"),
           ("share", "share of floor"), ("max_rel_error", "max rel. error"), ("note", "note")]
TIMING = {"repeats": 10, "inner": 10}  # set by main(); the bench modules time through `time_us`


def time_us(fn: Callable, *args) -> float:
    """Median over repeats of the mean time of `inner` back-to-back calls, in µs; warm-up (and compilation)
    first. Back-to-back calls keep the host's dispatch off the device's critical path, as in serving."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(TIMING["repeats"]):
        start = time.perf_counter()
        for _ in range(TIMING["inner"]):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / TIMING["inner"])
    return statistics.median(times) * 1e6


def max_rel_error(got: jax.Array, want: jax.Array) -> float:
    """max |got - want| / max |want|, in float32: one number that large-magnitude rows cannot hide."""
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))


def row(implementation: str, case: str, *, us=None, floor_us=None, error=None, note="") -> dict:
    return {"implementation": implementation, "case": case,
            "us": "" if us is None else round(us, 1),
            "floor_us": "" if floor_us is None else round(floor_us, 1),
            "share": "" if us is None or floor_us is None else f"{floor_us / us:.0%}",
            "max_rel_error": "" if error is None else f"{error:.1e}", "note": note}


def measure(implementation: str, case: str, fn: Callable, args: tuple, want: jax.Array | None,
            floor_us: float | None, note: str = "") -> dict:
    """One row: time `fn(*args)` and compare it to `want`; a failure becomes a row that says why."""
    try:
        got = jax.block_until_ready(fn(*args))
        error = None if want is None else max_rel_error(got, want)
        return row(implementation, case, us=time_us(fn, *args), floor_us=floor_us, error=error, note=note)
    except Exception as e:  # noqa: BLE001 — one failing implementation must not lose the others' rows
        traceback.print_exc()
        return row(implementation, case, floor_us=floor_us, note=f"failed: {type(e).__name__}: {e}"[:200])


def measure_ceilings() -> tuple[dict, list[dict]]:
    key = jax.random.key(0)
    x = jax.random.normal(key, (1 << 30,), jnp.bfloat16)  # 2 GiB
    copy_us = time_us(jax.jit(lambda x: x * 2), x)
    copy_gbps = 2 * x.nbytes / (copy_us * 1e-6) / 1e9
    del x
    a = jax.random.normal(key, (8192, 8192), jnp.bfloat16)
    matmul_us = time_us(jax.jit(lambda a: a @ a), a)
    matmul_tflops = 2 * 8192**3 / (matmul_us * 1e-6) / 1e12
    ceilings = {"copy_GBps": copy_gbps, "matmul_TFLOPs": matmul_tflops}
    rows = [row("ceiling: device-to-device copy", "2 GiB bf16, x * 2 (read + write)", us=copy_us,
                note=f"{copy_gbps:,.0f} GB/s"),
            row("ceiling: bf16 matmul (XLA)", "8192³", us=matmul_us, note=f"{matmul_tflops:,.0f} TFLOP/s")]
    return ceilings, rows


def bench_modules() -> list:
    """kernels_gemm always; kernels_attention when it exists and imports."""
    modules = [importlib.import_module("bench.kernels_gemm")]
    if (Path(__file__).parent / "kernels_attention.py").exists():
        try:
            modules.append(importlib.import_module("bench.kernels_attention"))
        except Exception:  # noqa: BLE001 — report it, and still run the GEMM bench
            traceback.print_exc()
            print("bench/kernels_attention.py did not import; its rows are skipped", file=sys.stderr)
    return modules


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=TIMING["repeats"])
    parser.add_argument("--inner", type=int, default=TIMING["inner"])
    args = parser.parse_args()
    if jax.devices()[0].platform != "gpu":
        sys.exit(f"bench/kernels.py needs a GPU: jax sees {jax.devices()[0].platform} devices only. Run it on the "
                 "GPU machine (the kernels' correctness on CPU is covered by tests/test_grouped_gemm_kernel.py).")
    TIMING.update(repeats=args.repeats, inner=args.inner)
    from bench.common import write_results

    ceilings, rows = measure_ceilings()
    print(f"ceilings: {ceilings}", flush=True)
    for module in bench_modules():
        rows += module.run(ceilings)
    rows = [{key: r.get(key, "") for key, _ in COLUMNS} for r in rows]
    notes = (f"Ceilings measured in this run: copy {ceilings['copy_GBps']:,.0f} GB/s, bf16 matmul "
             f"{ceilings['matmul_TFLOPs']:,.0f} TFLOP/s. Floor: GEMM rows max(FLOPs / matmul rate, bytes / copy "
             "bandwidth), bytes = x + the weights of non-empty groups + output; attention rows bytes / copy "
             "bandwidth. Share = floor / time. Time: median of "
             f"{TIMING['repeats']} repeats of {TIMING['inner']} back-to-back calls, after warm-up. Max rel. error = "
             "max |out - ref| / max |ref| against a float32-accumulated reference.")
    path = write_results("kernels", rows, COLUMNS, notes)
    print(path.read_text())


if __name__ == "__main__":
    # Run as the module `bench.kernels`, the one the bench modules import, so that they all see one TIMING.
    importlib.import_module("bench.kernels").main()
