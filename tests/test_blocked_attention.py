"""blocked_paged_attention against the references it replaces off Hopper (decode) and everywhere (prefill)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.models.attention import paged_prefill_attention
from msjax.models.blocked_attention import BLOCK_BYTES, block_pages, blocked_paged_attention
from pallas_kernels.paged_gqa_decode import paged_gqa_decode_reference

PAGE, KVH, D = 4, 2, 8


def pool(num_pages, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((num_pages, PAGE, KVH, D), np.float32)
    v = rng.standard_normal((num_pages, PAGE, KVH, D), np.float32)
    return jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("lengths", [[1, 5, 17, 40], [0, 3, 0, 64], [64, 64, 64, 64]])
def test_decode_matches_the_reference(lengths):
    k, v = pool(80)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((4, 2 * KVH, D), np.float32))
    table = jnp.asarray(rng.permutation(80)[:4 * 16].reshape(4, 16).astype(np.int32))  # 16 pages = 64 tokens
    lengths = jnp.asarray(lengths, jnp.int32)
    want = paged_gqa_decode_reference(q, k, v, table, lengths, scale=0.3)
    got = blocked_paged_attention(q, k, v, table, lengths, scale=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[np.asarray(lengths) == 0] == 0)


def test_prefill_matches_the_reference_causally():
    k, v = pool(40, seed=2)
    rng = np.random.default_rng(3)
    table = jnp.asarray(rng.permutation(40)[:3 * 10].reshape(3, 10).astype(np.int32))
    # three sequences' chunks in one flat batch: positions 0..12 of seq 0, 20..29 of seq 1, 5 of seq 2, padding
    seq_ids = np.array([0] * 13 + [1] * 10 + [2] + [0] * 2, np.int32)
    positions = np.array(list(range(13)) + list(range(20, 30)) + [5] + [-1, -1], np.int32)
    q = jnp.asarray(rng.standard_normal((len(seq_ids), 2 * KVH, D), np.float32))
    want = paged_prefill_attention(q, k, v, table, jnp.asarray(seq_ids), jnp.asarray(positions), scale=0.5)
    lengths = jnp.asarray(np.where(positions >= 0, positions + 1, 0))
    got = blocked_paged_attention(q, k, v, table[seq_ids], lengths, scale=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pages_past_the_longest_row_are_never_read():
    k, v = pool(64, seed=4)
    table = jnp.arange(64, dtype=jnp.int32).reshape(2, 32)
    lengths = jnp.asarray([6, 7], jnp.int32)  # both within their first block of 2 pages (8 tokens)
    assert block_pages(2, PAGE, KVH, D, 32, max_block_tokens=8) == 2
    first_blocks = jnp.isin(jnp.arange(64), jnp.asarray([0, 1, 32, 33]))
    k_bad = jnp.where(first_blocks[:, None, None, None], k, jnp.nan)  # every later page holds NaN
    v_bad = jnp.where(first_blocks[:, None, None, None], v, jnp.nan)
    q = jnp.ones((2, 2 * KVH, D), jnp.float32)
    got = jax.jit(lambda *a: blocked_paged_attention(*a, scale=0.1, max_block_tokens=8))(q, k_bad, v_bad, table,
                                                                                        lengths)
    want = paged_gqa_decode_reference(q, k, v, table, lengths, scale=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_block_tokens", [4, 8, 512])
def test_any_block_size_gives_the_same_result(max_block_tokens):
    k, v = pool(80, seed=5)
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.standard_normal((3, 2 * KVH, D), np.float32))
    table = jnp.asarray(rng.permutation(80)[:3 * 10].reshape(3, 10).astype(np.int32))  # 10 pages: not a power of 2
    lengths = jnp.asarray([40, 13, 1], jnp.int32)
    want = paged_gqa_decode_reference(q, k, v, table, lengths, scale=0.2)
    got = blocked_paged_attention(q, k, v, table, lengths, scale=0.2, max_block_tokens=max_block_tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_block_size_bounds_the_working_set():
    for rows, kvh, d in [(2, 16, 128), (256, 16, 128), (4096, 8, 128)]:
        pages = block_pages(rows, 16, kvh, d, 256)
        assert pages >= 1 and (pages == 1 or pages * 16 * rows * kvh * d * 4 <= BLOCK_BYTES)
        assert pages * 16 <= 512
    assert block_pages(2, 16, 2, 8, 3) == 3  # never more than the table holds
