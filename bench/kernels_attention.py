"""Paged GQA decode attention on one GPU: our Mosaic GPU kernel against what a JAX user could pick today.

    .venv/bin/python bench/kernels_attention.py [--repeats 20] [--inner 10]

As a module of the kernel benchmark driver: `run(ceilings)` with the driver's measured `copy_GBps` and
`matmul_TFLOPs`; standalone, `main()` measures those ceilings first and writes a dated table under bench/results/.

Implementations, each timed in the same run on the same inputs:
- `msjax kernel`: `pallas_kernels.paged_gqa_decode` (impl="kernel"), default tiling, plus two tiling variants;
- `XLA reference`: `paged_gqa_decode_reference` (page gather + float32 einsums) under jit;
- `jax paged_attention`: `jax.experimental.pallas.ops.gpu.paged_attention` (deprecated Triton backend; it applies
  no softmax scale, so q is pre-scaled; its KV layout [kv_heads, pages, page_size, head_dim] is built once, untimed);
- `tokamax dot_product_attention`: over contiguous [batch, context, kv_heads, head_dim] KV built once, untimed,
  with key_value_seq_lengths; skipped with a note when tokamax is not importable.

Cases: 64 sequences x 2048 tokens, 32 query / 8 KV heads, head_dim 128, bf16, with 16- and 64-token pages; and a
ragged batch of 32 lengths drawn from 16..8192 (the same draw as shared/anchors/gpu_anchors.py). Page tables are
shuffled so pages are not contiguous. GB/s counts the KV bytes a call must read (K and V of the valid tokens,
once); the share is that over the measured copy bandwidth (read + write), the ceiling for a streaming kernel. The
error is max|out - ref| / max|ref| against the float32 reference.

Timing: inputs are random (never zeros), 1 GB-scale KV (far past L2); 3 warm-up calls, then `repeats` samples
of `inner` back-to-back calls each closed by block_until_ready; the row reports the median sample / inner.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.paged_gqa_decode import (choose_tiling, paged_gqa_decode,  # noqa: E402
                                             paged_gqa_decode_reference)

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = jnp.bfloat16
# Rows also carry the driver's keys (bench/kernels.py: floor_us, share, max_rel_error), so its table shows them;
# share = floor / time = (GB/s) / (copy GB/s).
COLUMNS = [("implementation", "implementation"), ("case", "case"), ("us", "µs"), ("GBps", "GB/s (KV read)"),
           ("floor_us", "floor µs (KV bytes / copy bandwidth)"), ("share", "share of copy bandwidth"),
           ("max_rel_error", "max rel. error"), ("note", "note")]


def _cases() -> list[tuple[str, list[int], int]]:
    ragged = np.sort(np.random.default_rng(0).integers(16, 8193, 32)).tolist()
    return [("b64_ctx2048_p16", [2048] * 64, 16),
            ("b64_ctx2048_p64", [2048] * 64, 64),
            ("ragged32_16to8192_p16", ragged, 16)]


def time_us(fn, *args, repeats: int = 20, inner: int = 10) -> float:
    """Median over `repeats` samples of the mean time of `inner` back-to-back calls, in µs."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples) * 1e6


def _max_rel_error(out, ref) -> float:
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def _row(implementation: str, case: str, kv_bytes: int, copy_gbps: float, *, us=None, error=None,
         note="") -> dict:
    floor_us = kv_bytes / copy_gbps / 1e3
    gbps = None if us is None else kv_bytes / us / 1e3
    return {"implementation": implementation, "case": case, "us": "" if us is None else round(us, 1),
            "GBps": "" if gbps is None else round(gbps), "floor_us": round(floor_us, 1),
            "share": "" if us is None else f"{floor_us / us:.0%}",
            "max_rel_error": "" if error is None else f"{error:.1e}",
            "note": note if gbps is None else f"{gbps:,.0f} GB/s" + (f"; {note}" if note else "")}


def _make_inputs(lengths: list[int], page_size: int, key: jax.Array):
    batch = len(lengths)
    pages_per_seq = -(-max(lengths) // page_size)
    num_pages = batch * pages_per_seq
    kq, kk, kv, kp = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, Q_HEADS, HEAD_DIM), DTYPE)
    k_pages = jax.random.normal(kk, (num_pages, page_size, KV_HEADS, HEAD_DIM), DTYPE)
    v_pages = jax.random.normal(kv, (num_pages, page_size, KV_HEADS, HEAD_DIM), DTYPE)
    page_table = jax.random.permutation(kp, num_pages).reshape(batch, pages_per_seq).astype(jnp.int32)
    return q, k_pages, v_pages, page_table, jnp.asarray(lengths, jnp.int32)


def _tokamax():
    try:
        import tokamax
    except ImportError as error:
        return None, f"tokamax not importable ({error})"
    return tokamax, ""


def _rows_for_case(name: str, lengths: list[int], page_size: int, copy_gbps: float, timing: dict,
                   key: jax.Array) -> list[dict]:
    q, k_pages, v_pages, page_table, lens = _make_inputs(lengths, page_size, key)
    scale = HEAD_DIM ** -0.5
    kv_bytes = 2 * sum(lengths) * KV_HEADS * HEAD_DIM * jnp.dtype(DTYPE).itemsize
    ref = jax.jit(functools.partial(paged_gqa_decode_reference, scale=scale))(q, k_pages, v_pages, page_table, lens)
    rows = []

    def measure(implementation: str, fn, *args, note: str = ""):
        try:
            error = _max_rel_error(jax.block_until_ready(fn(*args)), ref)
            row = _row(implementation, name, kv_bytes, copy_gbps, us=time_us(fn, *args, **timing), error=error,
                       note=note)
        except Exception as failure:  # noqa: BLE001 — one failing implementation must not lose the other rows
            row = _row(implementation, name, kv_bytes, copy_gbps,
                       note=(note + "; " if note else "") + f"failed: {type(failure).__name__}: {failure}"[:300])
        rows.append(row)
        print(row, flush=True)

    batch, max_pages = page_table.shape
    default = choose_tiling(batch, KV_HEADS, HEAD_DIM, page_size, max_pages,
                            num_sms=getattr(jax.devices()[0], "core_count", None) or 132)
    variants = [("default", {}),  # the stage count is re-chosen to fit SMEM when block_kv changes
                ("block_kv=128", {"block_kv": max(128, default.block_kv), "num_stages": None}),
                ("2x splits", {"num_splits": 2 * default.num_splits})]
    for label, tiling in variants:
        t = choose_tiling(batch, KV_HEADS, HEAD_DIM, page_size, max_pages, **{**vars(default), **tiling})
        fn = jax.jit(functools.partial(paged_gqa_decode, scale=scale, impl="kernel", block_kv=t.block_kv,
                                       num_stages=t.num_stages, num_splits=t.num_splits))
        measure(f"msjax kernel ({label})", fn, q, k_pages, v_pages, page_table, lens,
                note=f"block_kv={t.block_kv} stages={t.num_stages} splits={t.num_splits}")

    measure("XLA reference", jax.jit(functools.partial(paged_gqa_decode_reference, scale=scale)),
            q, k_pages, v_pages, page_table, lens)

    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged  # deprecated: warns on import
    k_heads_first = jnp.transpose(k_pages, (2, 0, 1, 3))  # [kv_heads, pages, page_size, head_dim]
    v_heads_first = jnp.transpose(v_pages, (2, 0, 1, 3))
    q_scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)
    pages_per_block = math.gcd(8, max_pages)  # it wants whole compute blocks per sequence
    measure("jax paged_attention (Triton)",
            jax.jit(functools.partial(jax_paged.paged_attention, pages_per_compute_block=pages_per_block)),
            q_scaled, k_heads_first, v_heads_first, page_table, lens,
            note=f"q pre-scaled; pages_per_compute_block={pages_per_block}")
    del k_heads_first, v_heads_first

    tokamax, why_not = _tokamax()
    if tokamax is None:
        rows.append(_row("tokamax dot_product_attention", name, kv_bytes, copy_gbps, note=f"skipped: {why_not}"))
        print(rows[-1], flush=True)
    else:
        context = max_pages * page_size
        k_contiguous = k_pages[page_table].reshape(batch, context, KV_HEADS, HEAD_DIM)
        v_contiguous = v_pages[page_table].reshape(batch, context, KV_HEADS, HEAD_DIM)

        def tokamax_decode(q, k, v, lens):
            out = tokamax.dot_product_attention(q[:, None], k, v, scale=scale, key_value_seq_lengths=lens)
            return out[:, 0]

        measure("tokamax dot_product_attention", jax.jit(tokamax_decode), q, k_contiguous, v_contiguous, lens,
                note="contiguous KV (no page table), implementation chosen by tokamax")
    return rows


def run(ceilings: dict, *, repeats: int | None = None, inner: int | None = None) -> list[dict]:
    """Time every implementation on every case; `ceilings` holds the driver's `copy_GBps` and `matmul_TFLOPs`.

    repeats / inner default to the driver's settings (bench.kernels.TIMING) when it runs us, else to 20 / 10.
    """
    device = jax.devices()[0]
    if device.platform != "gpu":
        raise RuntimeError(f"bench/kernels_attention.py times GPU kernels; jax.devices()[0] is a "
                           f"{device.platform!r} device ({device.device_kind}). Run it on a GPU machine.")
    driver_timing = getattr(sys.modules.get("bench.kernels"), "TIMING", {})
    timing = {"repeats": repeats or driver_timing.get("repeats", 20), "inner": inner or driver_timing.get("inner", 10)}
    copy_gbps = float(ceilings["copy_GBps"])
    rows = []
    for index, (name, lengths, page_size) in enumerate(_cases()):
        rows += _rows_for_case(name, lengths, page_size, copy_gbps, timing, jax.random.key(index))
    return rows


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and a bf16 8192³ matmul, as the driver measures."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (1 << 30,), jnp.bfloat16)
    copy_us = time_us(jax.jit(lambda x: x * 2), x)
    copy_gbps = 2 * x.nbytes / copy_us / 1e3
    del x
    a = jax.random.normal(key, (8192, 8192), jnp.bfloat16)
    matmul_us = time_us(jax.jit(lambda a: a @ a), a, inner=5)
    return {"copy_GBps": round(copy_gbps), "matmul_TFLOPs": round(2 * 8192 ** 3 / matmul_us / 1e6)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inner", type=int, default=10)
    args = parser.parse_args()
    if jax.devices()[0].platform != "gpu":
        sys.exit(f"bench/kernels_attention.py needs a GPU; jax.devices()[0].platform is "
                 f"{jax.devices()[0].platform!r}")
    from bench.common import write_results

    ceilings = measure_ceilings()
    print(ceilings, flush=True)
    rows = run(ceilings, repeats=args.repeats, inner=args.inner)
    notes = (f"Paged GQA decode, {Q_HEADS} query / {KV_HEADS} KV heads, head_dim {HEAD_DIM}, bf16, shuffled page "
             f"tables. Ceilings measured in this run: copy {ceilings['copy_GBps']} GB/s (read + write), bf16 matmul "
             f"{ceilings['matmul_TFLOPs']} TFLOP/s. GB/s = KV bytes of the valid tokens / time; share = that / copy "
             "bandwidth; error = max|out - ref| / max|ref| vs the float32 reference. Median of "
             f"{args.repeats} samples of {args.inner} back-to-back calls, after warm-up.")
    path = write_results("kernels-attention", rows, COLUMNS, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
