"""The kernel contract's plain-jnp references against straightforward numpy loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_ffn_reference, grouped_gemm_reference, paged_gqa_decode_reference
from pallas_kernels.grouped_gemm import grouped_gemm_dense


def _numpy_decode(q, k_pages, v_pages, page_table, lengths, scale):
    batch, q_heads, d = q.shape
    kv_heads = k_pages.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        k = np.concatenate([k_pages[p] for p in page_table[b]])[: lengths[b]]  # [len, kvh, d]
        v = np.concatenate([v_pages[p] for p in page_table[b]])[: lengths[b]]
        for h in range(q_heads):
            kh = h // (q_heads // kv_heads)
            s = k[:, kh] @ q[b, h] * scale
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[:, kh]
    return out


@pytest.mark.parametrize("q_heads, kv_heads, page_size", [(4, 4, 4), (6, 3, 5), (8, 1, 16)])
def test_paged_decode_matches_loop(q_heads, kv_heads, page_size):
    rng = np.random.default_rng(0)
    batch, d, pages_per_seq, num_pages = 3, 8, 4, 20
    q = rng.standard_normal((batch, q_heads, d), np.float32)
    k = rng.standard_normal((num_pages, page_size, kv_heads, d), np.float32)
    v = rng.standard_normal((num_pages, page_size, kv_heads, d), np.float32)
    table = rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq).astype(np.int32)
    lengths = np.array([1, page_size + 1, pages_per_seq * page_size - 1], np.int32)  # not page multiples
    got = paged_gqa_decode_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(table),
                                     jnp.asarray(lengths), scale=0.3)
    np.testing.assert_allclose(np.asarray(got), _numpy_decode(q, k, v, table, lengths, 0.3), rtol=1e-5, atol=1e-5)


def test_paged_decode_zero_length_row_is_zero():
    q = jnp.ones((2, 2, 4))
    k = jnp.ones((3, 2, 1, 4))
    out = paged_gqa_decode_reference(q, k, k, jnp.zeros((2, 2), jnp.int32), jnp.array([0, 3], jnp.int32), scale=1.0)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(np.asarray(out)))


def _numpy_grouped(x, w, sizes):
    out = np.zeros((x.shape[0], w.shape[2]), np.float32)
    start = 0
    for g, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


@pytest.mark.parametrize("gemm", [grouped_gemm_reference, grouped_gemm_dense])
@pytest.mark.parametrize("sizes, rows", [([3, 0, 5, 1], 9), ([0, 0, 7, 0], 10), ([2, 2, 2, 2], 12), ([0, 0, 0, 0], 4)])
def test_grouped_gemm_groups_and_padding(sizes, rows, gemm):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, 6), np.float32)
    w = rng.standard_normal((4, 6, 5), np.float32)
    got = np.asarray(gemm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32)))
    np.testing.assert_allclose(got, _numpy_grouped(x, w, sizes), rtol=1e-5, atol=1e-5)
    assert np.all(got[sum(sizes):] == 0)  # padding rows past the groups are zero


def test_grouped_ffn_is_swiglu_per_expert():
    rng = np.random.default_rng(2)
    sizes, hidden, ffn = [2, 0, 3], 6, 4
    x = rng.standard_normal((7, hidden), np.float32)
    wgu = rng.standard_normal((3, hidden, 2 * ffn), np.float32)
    wd = rng.standard_normal((3, ffn, hidden), np.float32)
    got = np.asarray(grouped_ffn_reference(jnp.asarray(x), jnp.asarray(sizes, jnp.int32), jnp.asarray(wgu),
                                           jnp.asarray(wd)))
    gu = _numpy_grouped(x, wgu, sizes)
    gate, up = gu[:, :ffn], gu[:, ffn:]
    act = gate / (1 + np.exp(-gate)) * up
    want = _numpy_grouped(act, wd, sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[5:] == 0)
