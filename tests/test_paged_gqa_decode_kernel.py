"""The paged GQA decode kernel against its reference: on CPU under the Mosaic GPU interpreter, on a GPU natively.

The interpreter fills fresh SMEM and outputs with NaN and raises on out-of-bounds reads and on barrier misuse, so a
finite result that matches also says every output was written and nothing outside the valid pages was read.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_gqa_decode import (choose_tiling, paged_gqa_decode, paged_gqa_decode_kernel,
                                             paged_gqa_decode_reference)

_PLATFORM = jax.devices()[0].platform
_ON_GPU = _PLATFORM == "gpu"
_ON_HOPPER = _ON_GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")

MODES = [
    pytest.param("interpret", id="interpret"),
    pytest.param("gpu", id="gpu", marks=[
        pytest.mark.skipif(not _ON_GPU, reason=f"needs a GPU: jax.devices()[0].platform is {_PLATFORM!r}"),
        pytest.mark.skipif(_ON_GPU and not _ON_HOPPER, reason="needs a Hopper GPU (sm_90) for wgmma and TMA"),
    ]),
]


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    max_pages: int  # per sequence
    lengths: tuple[int, ...]
    tiling: tuple[tuple[str, int], ...] = ()  # block_kv / num_stages / num_splits

    def __str__(self):
        group = self.q_heads // self.kv_heads
        extra = "".join(f"_{k}{v}" for k, v in self.tiling)
        return f"g{group}_d{self.head_dim}_p{self.page_size}{extra}"


CASES = [
    # MHA (group 1), a length-1 and a zero-length row, two splits, lengths off the page grid.
    Case(4, 2, 2, 64, 16, 10, (1, 0, 77, 160), (("num_splits", 2),)),
    # group 4, head_dim 128, three splits: the short rows leave splits empty.
    Case(3, 8, 2, 128, 32, 10, (300, 33, 1), (("num_splits", 3),)),
    # group 16, one split of eleven steps through a two-slot ring: every slot is refilled several times.
    Case(2, 16, 1, 64, 64, 12, (700, 64), (("num_splits", 1), ("num_stages", 2))),
    # group 8, a page per 128-token step.
    Case(2, 16, 2, 128, 128, 4, (500, 129), (("num_splits", 2),)),
    # group 5 (not a power of two), eight 16-token pages gathered per step, three stages, four splits.
    Case(2, 10, 2, 64, 16, 40, (613, 250), (("block_kv", 128), ("num_stages", 3), ("num_splits", 4))),
    # the default tiling (splits chosen from the grid size)
    Case(2, 8, 4, 128, 16, 12, (190, 65)),
]


def _inputs(case: Case, seed: int, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16):
    """Random q/KV, a shuffled page pool with spare pages, and garbage (out-of-range) ids past each length."""
    rng = np.random.default_rng(seed)
    num_pages = case.batch * case.max_pages + 5
    q = rng.standard_normal((case.batch, case.q_heads, case.head_dim), np.float32)
    k = rng.standard_normal((num_pages, case.page_size, case.kv_heads, case.head_dim), np.float32)
    v = rng.standard_normal((num_pages, case.page_size, case.kv_heads, case.head_dim), np.float32)
    table = rng.permutation(num_pages)[: case.batch * case.max_pages].reshape(case.batch, case.max_pages)
    for b, length in enumerate(case.lengths):
        table[b, -(-length // case.page_size):] = num_pages + 1000  # never read: the interpreter would raise
    return (jnp.asarray(q, q_dtype), jnp.asarray(k, kv_dtype), jnp.asarray(v, kv_dtype),
            jnp.asarray(table, jnp.int32), jnp.asarray(case.lengths, jnp.int32))


def _reference(q, k, v, table, lengths, scale):
    # The reference gathers every table entry; point the garbage ones at page 0 (its result ignores them).
    safe_table = jnp.where(table < k.shape[0], table, 0)
    return paged_gqa_decode_reference(q, k, v, safe_table, lengths, scale=scale)


def _assert_matches(got, want, lengths):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got))
    assert np.all(got[np.asarray(lengths) == 0] == 0)
    # bf16 P·V operands: relative error of a few 1e-3
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-2, rel
    np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2)


def _interpret_arg(mode):
    return mode == "interpret"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case, mode):
    q, k, v, table, lengths = _inputs(case, seed=zlib.crc32(str(case).encode()))
    scale = case.head_dim ** -0.5
    got = paged_gqa_decode(q, k, v, table, lengths, scale=scale, impl="kernel", interpret=_interpret_arg(mode),
                           **dict(case.tiling))
    assert got.shape == q.shape and got.dtype == q.dtype
    _assert_matches(got, _reference(q, k, v, table, lengths, scale), case.lengths)


@pytest.mark.parametrize("mode", MODES)
def test_float32_query_keeps_its_dtype(mode):
    case = Case(2, 4, 2, 64, 16, 6, (90, 17), (("num_splits", 2),))
    q, k, v, table, lengths = _inputs(case, seed=7, q_dtype=jnp.float32)
    got = paged_gqa_decode(q, k, v, table, lengths, scale=0.2, impl="kernel", interpret=_interpret_arg(mode),
                           num_splits=2)
    assert got.dtype == jnp.float32
    _assert_matches(got, _reference(q, k, v, table, lengths, 0.2), case.lengths)


@pytest.mark.parametrize("mode", MODES)
def test_lengths_past_the_table_read_the_whole_table(mode):
    case = Case(2, 2, 1, 64, 16, 4, (64, 64))
    q, k, v, table, _ = _inputs(case, seed=3)
    lengths = jnp.asarray([1000, 64], jnp.int32)  # the reference masks with arange(context) < length
    got = paged_gqa_decode(q, k, v, table, lengths, scale=0.125, impl="kernel", interpret=_interpret_arg(mode))
    _assert_matches(got, _reference(q, k, v, table, lengths, 0.125), (64, 64))


def test_interpreter_sees_no_races():
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    case = Case(2, 4, 2, 64, 16, 12, (150, 190), (("num_splits", 1), ("num_stages", 2)))
    q, k, v, table, lengths = _inputs(case, seed=11)
    got = paged_gqa_decode(q, k, v, table, lengths, scale=0.125, impl="kernel",
                           interpret=plgpu.InterpretGPUParams(detect_races=True), num_splits=1, num_stages=2)
    _assert_matches(got, _reference(q, k, v, table, lengths, 0.125), case.lengths)
    assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("batch, q_heads, kv_heads, head_dim, page_size, max_pages, tiling", [
    (64, 32, 8, 128, 16, 128, {}),  # the bench's shape: 2048 tokens of context
    (64, 32, 8, 128, 64, 32, {}),
    (32, 32, 8, 128, 16, 512, {}),  # 8192 tokens
    (8, 8, 8, 64, 128, 16, {}),
    (4, 64, 4, 128, 16, 16, {"block_kv": 128, "num_stages": 2}),
    (4, 12, 4, 64, 48, 16, {}),  # 48-token pages: four per 192-token step
])
def test_kernel_lowers_for_hopper(batch, q_heads, kv_heads, head_dim, page_size, max_pages, tiling):
    """Mosaic GPU's own lowering (layout inference, TMA and wgmma shape rules) runs without a GPU."""
    q = jax.ShapeDtypeStruct((batch, q_heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch * max_pages, page_size, kv_heads, head_dim), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((batch, max_pages), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    chosen = choose_tiling(batch, kv_heads, head_dim, page_size, max_pages, **tiling)
    fn = jax.jit(lambda *args: paged_gqa_decode_kernel(*args, scale=0.1, tiling=chosen))
    text = fn.trace(q, kv, kv, table, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_auto_picks_the_reference_off_hopper():
    case = Case(2, 4, 2, 64, 16, 4, (40, 9))
    q, k, v, table, lengths = _inputs(case, seed=5)
    table = jnp.where(table < k.shape[0], table, 0)
    want = paged_gqa_decode_reference(q, k, v, table, lengths, scale=0.3)
    if not _ON_HOPPER:
        got = paged_gqa_decode(q, k, v, table, lengths, scale=0.3)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # inputs the kernel does not take (float32 KV) go to the reference even when the kernel is asked for by auto
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    got = paged_gqa_decode(q, k32, v32, table, lengths, scale=0.3, interpret=True)
    want = paged_gqa_decode_reference(q, k32, v32, table, lengths, scale=0.3)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("head_dim, page_size, kv_dtype, tiling, message", [
    (32, 16, jnp.bfloat16, {}, "head_dim=32"),
    (64, 12, jnp.bfloat16, {}, "page_size=12"),
    (64, 16, jnp.float32, {}, "KV dtype"),
    (64, 16, jnp.bfloat16, {"block_kv": 48}, "block_kv=48"),
    (128, 16, jnp.bfloat16, {"block_kv": 256, "num_stages": 4}, "SMEM"),
])
def test_kernel_names_what_it_does_not_take(head_dim, page_size, kv_dtype, tiling, message):
    q = jnp.zeros((1, 2, head_dim), jnp.bfloat16)
    kv = jnp.zeros((4, page_size, 1, head_dim), kv_dtype)
    with pytest.raises(ValueError, match=message):
        paged_gqa_decode(q, kv, kv, jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32), scale=1.0,
                         impl="kernel", interpret=True, **tiling)
    with pytest.raises(ValueError, match="impl="):
        paged_gqa_decode(q, kv, kv, jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32), scale=1.0,
                         impl="triton")


def test_default_tiling():
    # 16-token pages: four per 64-token step, four stages fit in SMEM at head_dim 128
    t = choose_tiling(64, 8, 128, 16, 128)
    assert (t.block_kv, t.num_stages, t.num_splits) == (64, 4, 1)  # 512 blocks already fill 132 SMs
    t = choose_tiling(1, 8, 128, 128, 256)
    assert (t.block_kv, t.num_stages) == (128, 2) and t.num_splits == 33  # long context, one sequence: split it
    assert choose_tiling(1, 1, 64, 16, 2).num_splits == 1  # never more splits than 64-token blocks


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_long_ragged_batch(mode):
    """Lengths from 1 to 3177 over six splits: about 15 s under the interpreter on a 2-core machine."""
    case = Case(4, 8, 2, 128, 16, 200, (1, 513, 1999, 3177), (("num_splits", 6),))
    q, k, v, table, lengths = _inputs(case, seed=13)
    got = paged_gqa_decode(q, k, v, table, lengths, scale=0.0883, impl="kernel", interpret=_interpret_arg(mode),
                           num_splits=6)
    _assert_matches(got, _reference(q, k, v, table, lengths, 0.0883), case.lengths)


@pytest.mark.parametrize("mode", [m for m in MODES if m.id == "gpu"])
def test_bench_shape_on_gpu(mode):
    """The benchmark's shape (64 sequences x 2048 tokens, 32/8 heads, head_dim 128, 16-token pages)."""
    case = Case(64, 32, 8, 128, 16, 128, tuple(range(2048, 2048 - 64 * 29, -29)))
    q, k, v, table, lengths = _inputs(case, seed=17)
    got = paged_gqa_decode(q, k, v, table, lengths, scale=128 ** -0.5, impl="kernel")
    _assert_matches(got, _reference(q, k, v, table, lengths, 128 ** -0.5), case.lengths)
