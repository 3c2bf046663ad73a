"""The Mosaic GPU grouped GEMM and expert FFN kernels against their references.

On CPU the kernels run in the Mosaic GPU interpreter (TMA, barriers, warp specialization and the persistent
loop are simulated; wgmma runs synchronously). The `gpu` tests run the compiled kernels and skip elsewhere.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

from pallas_kernels.grouped_gemm import (GemmTiling, _grouped_matmul, _tile_schedule, default_tiling, grouped_ffn,
                                         grouped_ffn_reference, grouped_gemm, grouped_gemm_dense, grouped_gemm_reference)

ON_GPU = jax.devices()[0].platform == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU: jax.devices()[0].platform != 'gpu'")

# Interpreted tiles: 64-row windows, two 64-column warpgroups per CTA (128 columns), two 64-deep stages, two
# persistent CTAs so that each walks several work items.
SMALL = GemmTiling(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, epilogue_n=64, num_sms=2)

# (group sizes, rows): each case names what it covers. Groups start at rows that are not multiples of 8.
GEMM_CASES = {
    "empty_groups_small_groups_padding": ([40, 0, 21, 3], 80),
    "groups_larger_than_a_tile": ([5, 130, 0, 70], 205),
    "all_tokens_in_one_group": ([0, 96, 0], 96),
    "no_tokens_only_padding": ([0, 0, 0], 24),
    "fewer_rows_than_a_tile": ([7, 0, 9], 20),
}


def _inputs(sizes, rows, k, n, dtype=jnp.bfloat16, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (rows, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (len(sizes), k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w, jnp.asarray(sizes, jnp.int32)


def _assert_close(got, want, sizes, *, tol=2e-2):
    """Kernel and reference round the same float32 sums to 16 bits; only the summation order differs."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    assert np.all(got[sum(sizes):] == 0), "padding rows must be exactly zero"
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max() + 1e-6))


# ---- the tile schedule (plain XLA, no kernel) ------------------------------------------------------------------

@pytest.mark.parametrize("sizes, rows", [*GEMM_CASES.values(), ([64] * 8, 512), ([1024, 512, 256, 128, 64, 32, 32, 0],
                                                                                   2048), ([300, 0], 301)])
@pytest.mark.parametrize("block_m", [64, 128])
def test_schedule_stores_every_row_once_from_its_own_group(sizes, rows, block_m):
    schedule = np.asarray(_tile_schedule(jnp.asarray(sizes, jnp.int32), rows, block_m))
    group, window, offset, count, num_tiles = schedule
    num_tiles = int(num_tiles[0])
    owner = np.full(rows, -2)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for t in range(num_tiles):
        assert window[t] % 8 == 0 and 1 <= count[t] and offset[t] + count[t] <= block_m
        lo = window[t] + offset[t]
        assert np.all(owner[lo:lo + count[t]] == -2), "a row stored twice"
        owner[lo:lo + count[t]] = group[t]
        if group[t] >= 0:
            assert starts[group[t]] <= lo and lo + count[t] <= starts[group[t] + 1]
    expected = np.repeat(np.arange(len(sizes)), sizes).tolist() + [-1] * (rows - sum(sizes))
    assert owner.tolist() == expected
    for g, size in enumerate(sizes):  # a group's weights are streamed as few times as its 8-aligned window allows
        assert np.sum(group[:num_tiles] == g) == (-(-(size + starts[g] % 8) // block_m) if size else 0)


# ---- the kernels in the interpreter ----------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, rows", GEMM_CASES.values(), ids=GEMM_CASES.keys())
def test_grouped_gemm_kernel_interpreted(sizes, rows):
    x, w, gs = _inputs(sizes, rows, k=128, n=256)
    got = grouped_gemm(x, w, gs, impl="kernel", interpret=True, tiling=SMALL)
    _assert_close(got, grouped_gemm_reference(x, w, gs, preferred_element_type=jnp.float32), sizes)


def test_grouped_gemm_kernel_f16_wide_tiles_one_cta():
    """128-row windows, two epilogue stores per warpgroup, three stages, one CTA walking every work item."""
    sizes, rows = [33, 0, 150, 1], 190
    x, w, gs = _inputs(sizes, rows, k=192, n=256, dtype=jnp.float16, seed=1)
    tiling = GemmTiling(block_m=128, block_n=128, block_k=64, max_concurrent_steps=3, epilogue_n=64, num_sms=1)
    got = grouped_gemm(x, w, gs, impl="kernel", interpret=True, tiling=tiling)
    _assert_close(got, grouped_gemm_reference(x, w, gs, preferred_element_type=jnp.float32), sizes)


def test_swiglu_epilogue_has_no_races():
    """The gate-up kernel under the interpreter's race detector: SMEM reuse across tiles, barriers, TMA."""
    sizes, rows = [21, 0, 70, 2], 100
    x, w, gs = _inputs(sizes, rows, k=128, n=256, seed=2)
    got = _grouped_matmul(x, w, gs, swiglu=True, tiling=SMALL,
                          interpret=plgpu.InterpretGPUParams(detect_races=True))[:rows]
    assert not get_races().races_found
    gate, up = jnp.split(grouped_gemm_reference(x, w, gs, preferred_element_type=jnp.float32), 2, axis=-1)
    _assert_close(got, jax.nn.silu(gate) * up, sizes)


@pytest.mark.parametrize("sizes, rows", [([40, 0, 21, 3], 80), ([0, 96, 0], 96)], ids=["ragged_padding", "one_group"])
def test_grouped_ffn_kernel_interpreted(sizes, rows):
    hidden, ffn = 128, 128
    x, w_gate_up, gs = _inputs(sizes, rows, k=hidden, n=2 * ffn, seed=3)
    w_down = (jax.random.normal(jax.random.key(4), (len(sizes), ffn, hidden)) / np.sqrt(ffn)).astype(x.dtype)
    got = grouped_ffn(x, gs, w_gate_up, w_down, impl="kernel", interpret=True, tiling=(SMALL, SMALL))
    _assert_close(got, grouped_ffn_reference(x, gs, w_gate_up, w_down), sizes, tol=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("sizes, rows", [([100, 0, 300, 37, 0, 64], 600), ([0] * 5 + [257], 300)])
def test_grouped_ffn_kernel_interpreted_default_tiling(sizes, rows):
    hidden, ffn = 256, 256
    x, w_gate_up, gs = _inputs(sizes, rows, k=hidden, n=2 * ffn, seed=5)
    w_down = (jax.random.normal(jax.random.key(6), (len(sizes), ffn, hidden)) / np.sqrt(ffn)).astype(x.dtype)
    got = grouped_ffn(x, gs, w_gate_up, w_down, impl="kernel", interpret=True)
    _assert_close(got, grouped_ffn_reference(x, gs, w_gate_up, w_down), sizes, tol=3e-2)


# ---- the kernels lower to Mosaic GPU for Hopper (no GPU needed) -------------------------------------------------

@pytest.mark.parametrize("rows, k, n_w, swiglu", [
    (512, 4096, 14336, False), (2048, 4096, 2 * 14336, True), (2048, 14336, 4096, False),  # Mixtral 8x7B experts
    (256, 4096, 14336, False),  # 64-row tiles (decode)
    (1100, 1024, 4096, True), (205, 128, 256, False),  # rows that are not multiples of 8
])
def test_kernel_lowers_for_hopper(rows, k, n_w, swiglu):
    """Pallas -> Mosaic GPU lowering with its layout inference, for sm_90, on this host: catches what the
    interpreter does not check (TMA tiling and alignment of GMEM windows, register layouts). Not PTX compilation."""
    n_out = n_w // 2 if swiglu else n_w
    tiling = default_tiling(rows, 8, k, n_out, num_rhs=2 if swiglu else 1)
    tiling = dataclasses.replace(tiling, num_sms=132)
    fn = jax.jit(lambda x, w, gs: _grouped_matmul(x, w, gs, swiglu=swiglu, tiling=tiling, interpret=False))
    args = (jax.ShapeDtypeStruct((rows, k), jnp.bfloat16), jax.ShapeDtypeStruct((8, k, n_w), jnp.bfloat16),
            jax.ShapeDtypeStruct((8,), jnp.int32))
    assert "mosaic_gpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# ---- the public API's choices ----------------------------------------------------------------------------------

def test_auto_is_the_cpu_fallback_without_a_gpu():
    if ON_GPU:
        pytest.skip("checks the CPU-only fallback; on a GPU auto takes the kernel (covered by the GPU variants)")
    x, w, gs = _inputs([3, 5], 10, k=128, n=256)
    np.testing.assert_array_equal(grouped_gemm(x, w, gs), grouped_gemm_dense(x, w, gs))  # the dense form on CPU
    _assert_close(grouped_gemm(x, w, gs), grouped_gemm_reference(x, w, gs, preferred_element_type=jnp.float32),
                  [3, 5])
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    np.testing.assert_array_equal(grouped_gemm(x32, w32, gs, interpret=True),  # f32: no kernel
                                  grouped_gemm_dense(x32, w32, gs))


def test_kernel_without_gpu_or_interpreter_is_refused():
    if ON_GPU:
        pytest.skip("checks the refusal that only happens without a GPU")
    x, w, gs = _inputs([3, 5], 10, k=128, n=256)
    with pytest.raises(ValueError, match="interpret=True"):
        grouped_gemm(x, w, gs, impl="kernel")
    with pytest.raises(ValueError, match="impl must be"):
        grouped_gemm(x, w, gs, impl="fast")


def test_default_tiling_fits_shared_memory_or_declines():
    for rows, groups, k, n, rhs in [(512, 8, 4096, 14336, 1), (2048, 8, 4096, 14336, 2), (256, 8, 14336, 4096, 1),
                                    (64, 8, 128, 256, 1)]:
        tiling = default_tiling(rows, groups, k, n, num_rhs=rhs)
        assert tiling is not None and tiling.smem_bytes(2, rhs) <= 227 * 1024
        assert k % tiling.block_k == 0 and n % (2 * tiling.block_n) == 0
    assert default_tiling(64, 8, 128, 192, num_rhs=2) is None  # tiny-moe's 192-wide FFN: the reference serves it
    with pytest.raises(ValueError, match="multiple of 64"):
        GemmTiling(block_m=32)


# ---- the compiled kernels on a GPU -----------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("sizes, rows", GEMM_CASES.values(), ids=GEMM_CASES.keys())
@pytest.mark.parametrize("tiling", [None, SMALL], ids=["default_tiling", "small_tiling"])
def test_grouped_gemm_kernel_gpu(sizes, rows, tiling):
    x, w, gs = _inputs(sizes, rows, k=128, n=256)
    got = grouped_gemm(x, w, gs, impl="kernel", tiling=tiling)
    _assert_close(got, grouped_gemm_reference(x, w, gs, preferred_element_type=jnp.float32), sizes)


@needs_gpu
@pytest.mark.parametrize("sizes", [[64] * 8, [1024, 512, 256, 128, 64, 32, 32, 0], [3, 0, 200, 77, 0, 0, 5, 1]])
def test_grouped_gemm_kernel_gpu_mixtral_width(sizes):
    x, w, gs = _inputs(sizes, sum(sizes) + 13, k=4096, n=1792)  # Mixtral's 4096 x 14336, an eighth of the columns
    got = grouped_gemm(x, w, gs, impl="kernel")
    _assert_close(got, grouped_gemm_reference(x, w, gs, preferred_element_type=jnp.float32), sizes)


@needs_gpu
@pytest.mark.parametrize("sizes, rows", [([40, 0, 21, 3], 80), ([300, 0, 700, 24], 1100)])
def test_grouped_ffn_kernel_gpu(sizes, rows):
    hidden, ffn = 1024, 2048
    x, w_gate_up, gs = _inputs(sizes, rows, k=hidden, n=2 * ffn, seed=3)
    w_down = (jax.random.normal(jax.random.key(4), (len(sizes), ffn, hidden)) / np.sqrt(ffn)).astype(x.dtype)
    got = grouped_ffn(x, gs, w_gate_up, w_down, impl="kernel")
    _assert_close(got, grouped_ffn_reference(x, gs, w_gate_up, w_down), sizes, tol=3e-2)
