"""Grouped GEMM and expert FFN rows for bench/kernels.py (run that; this module has no main).

Mixtral-8x7B expert shapes: 8 experts, hidden 4096, FFN 14336, bf16. The up-projection GEMM x[M, 4096] @
w[8, 4096, 14336] at 64, 256 and 1024 tokens per expert and at the skewed split of 2048 tokens
(1024, 512, 256, 128, 64, 32, 32, 0), by: msjax's kernel, `jax.lax.ragged_dot`, JAX's `ragged_dot_mgpu`,
tokamax's `ragged_dot` (when it imports) and the dense batched einsum (equal groups only). Then the whole
expert FFN (gate-up + SwiGLU + down) at 256 tokens per expert, against the sum of its two GEMMs' floors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bench.kernels import measure, row
from pallas_kernels.grouped_gemm import grouped_ffn, grouped_ffn_reference, grouped_gemm

EXPERTS, HIDDEN, FFN = 8, 4096, 14336
GEMM_CASES = {
    "64 tok/expert": [64] * EXPERTS,
    "256 tok/expert": [256] * EXPERTS,
    "1024 tok/expert": [1024] * EXPERTS,
    "skewed 2048 tok": [1024, 512, 256, 128, 64, 32, 32, 0],
}
FFN_TOKENS_PER_EXPERT = 256


def gemm_floor_us(sizes, k: int, n: int, ceilings: dict, itemsize: int = 2) -> float:
    """max(FLOPs / matmul rate, bytes / copy bandwidth); bytes: x, the weights of non-empty groups, the output."""
    tokens = int(sum(sizes))
    flops = 2 * tokens * k * n
    nbytes = itemsize * (tokens * k + sum(1 for s in sizes if s) * k * n + tokens * n)
    return max(flops / (ceilings["matmul_TFLOPs"] * 1e12), nbytes / (ceilings["copy_GBps"] * 1e9)) * 1e6


def _tokamax_ragged_dot():
    try:
        import tokamax
    except ImportError:
        return None
    return tokamax.ragged_dot


def gemm_rows(ceilings: dict) -> list[dict]:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    w = (jax.random.normal(jax.random.key(0), (EXPERTS, HIDDEN, FFN), jnp.float32) * 0.02).astype(jnp.bfloat16)
    tokamax_ragged_dot = _tokamax_ragged_dot()
    rows = []
    for case, sizes in GEMM_CASES.items():
        tokens = sum(sizes)
        x = jax.random.normal(jax.random.key(1), (tokens, HIDDEN), jnp.bfloat16)
        gs = jnp.asarray(sizes, jnp.int32)
        want = jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32))(x, w, gs)
        floor = gemm_floor_us(sizes, HIDDEN, FFN, ceilings)

        def run(name, fn, note=""):
            rows.append(measure(name, case, fn, (x, w, gs), want, floor, note))

        run("msjax grouped_gemm (Mosaic GPU kernel)", jax.jit(functools.partial(grouped_gemm, impl="kernel")),
            "default_tiling")
        run("jax.lax.ragged_dot", jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs)))
        run("jax ragged_dot_mgpu", jax.jit(lambda x, w, gs: ragged_dot_mgpu.ragged_dot(
            x, w, group_sizes=gs, block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=2)),
            "block 128x128x64, 4 stages, grid_block_n 2 (as in the anchors)")
        if tokamax_ragged_dot is None:
            rows.append(row("tokamax.ragged_dot", case, floor_us=floor, note="skipped: tokamax does not import"))
        else:
            run("tokamax.ragged_dot", jax.jit(lambda x, w, gs: tokamax_ragged_dot(x, w, gs)))
        if len(set(sizes)) == 1:
            run("dense batched einsum (XLA)", jax.jit(lambda x, w, gs: jnp.einsum(
                "etk,ekn->etn", x.reshape(EXPERTS, -1, HIDDEN), w).reshape(x.shape[0], FFN)), "equal groups only")
        del x, want
    return rows


def ffn_rows(ceilings: dict) -> list[dict]:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    sizes = [FFN_TOKENS_PER_EXPERT] * EXPERTS
    tokens = sum(sizes)
    case = f"expert FFN, {FFN_TOKENS_PER_EXPERT} tok/expert"
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (tokens, HIDDEN), jnp.bfloat16)
    w_gate_up = (jax.random.normal(keys[1], (EXPERTS, HIDDEN, 2 * FFN), jnp.float32) * 0.02).astype(jnp.bfloat16)
    w_down = (jax.random.normal(keys[2], (EXPERTS, FFN, HIDDEN), jnp.float32) * 0.02).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    args = (x, gs, w_gate_up, w_down)
    want = jax.jit(grouped_ffn_reference)(*args)
    floor = gemm_floor_us(sizes, HIDDEN, 2 * FFN, ceilings) + gemm_floor_us(sizes, FFN, HIDDEN, ceilings)

    def mgpu_ffn(x, gs, w_gate_up, w_down):
        rd = functools.partial(ragged_dot_mgpu.ragged_dot, group_sizes=gs, block_m=128, block_n=128, block_k=64,
                               max_concurrent_steps=4, grid_block_n=2)
        gate, up = jnp.split(rd(x, w_gate_up), 2, axis=-1)
        return rd((jax.nn.silu(gate.astype(jnp.float32)) * up).astype(x.dtype), w_down)

    note = "floor: sum of the gate-up and down GEMM floors"
    return [
        measure("msjax grouped_ffn (kernel: gate-up with SwiGLU epilogue, then down)", case,
                jax.jit(functools.partial(grouped_ffn, impl="kernel")), args, want, floor, note),
        measure("grouped_ffn_reference (lax.ragged_dot + XLA SwiGLU)", case, jax.jit(grouped_ffn_reference), args,
                want, floor, note),
        measure("jax ragged_dot_mgpu x2 + XLA SwiGLU", case, jax.jit(mgpu_ffn), args, want, floor,
                note + "; gate-up rounded to bf16 before SwiGLU"),
    ]


def run(ceilings: dict) -> list[dict]:
    """Rows with the keys of bench.kernels.COLUMNS; `ceilings`: {"copy_GBps", "matmul_TFLOPs"}."""
    return gemm_rows(ceilings) + ffn_rows(ceilings)
