"""Attention over the paged KV cache that reads only the context the batch holds: the XLA path of decode off
Hopper and of prefill everywhere.

The references (`paged_gqa_decode_reference`, `paged_prefill_attention`) gather every page of the page table
for every query row, so a step costs the table's full width (`max_model_len`), not the tokens cached: on
olmoe-2l with its 4096-token context a batch-1 decode step took 2x, a batch-8 step 3x the time it takes at
`max_model_len` 64 (bench/results/step-overhead-olmoe-2l-...-2026-12-07.md), and a 256-token prefill chunk would
gather 8.6 GB. Here a loop walks the context in blocks of whole pages up to the longest row of the batch (a
trip count the program computes, so no shape depends on it and nothing recompiles), with an online softmax in
float32, so a step reads what its rows can see, in blocks of bounded size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

BLOCK_BYTES = 64 << 20  # one block's gathered K (and as much V): the working set per loop step
# tiny-moe decode at ~220 of 512 tokens, 2026-12-07: blocks of 128 and 64 tokens read least (a batch-16 step
# 2.9 ms; 512-token blocks, the whole table: 4.4 ms)
MAX_BLOCK_TOKENS = 128


def block_pages(rows: int, page_size: int, kv_heads: int, head_dim: int, max_pages: int,
                max_block_tokens: int = MAX_BLOCK_TOKENS) -> int:
    """Pages per loop step: as many as keep one block's K of every row under BLOCK_BYTES (float32), a power of
    two from 1 up to `max_block_tokens` tokens' worth, and no more than the table holds."""
    per_token = rows * kv_heads * head_dim * 4
    pages = 1
    while pages * 2 * page_size <= max_block_tokens and pages * 2 * page_size * per_token <= BLOCK_BYTES:
        pages *= 2
    return max(1, min(pages, max_pages))


def blocked_paged_attention(
    q: jax.Array,  # [rows, q_heads, head_dim]: one query token per row
    k_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    v_pages: jax.Array,
    row_pages: jax.Array,  # [rows, max_pages] int32: the page ids of each row's sequence, in order
    lengths: jax.Array,  # [rows] int32: the cached tokens row r attends to (positions 0..lengths[r]-1); 0: none
    *,
    scale: float,
    max_block_tokens: int = MAX_BLOCK_TOKENS,
) -> jax.Array:  # [rows, q_heads, head_dim], q's dtype
    """Softmax(q·kᵀ·scale)·v over the first `lengths[r]` tokens of row r's pages, in float32; a row of length
    0 returns zeros. Query head h reads KV head h // (q_heads // kv_heads). Pages of blocks past the longest row
    are never read."""
    rows, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    group = q_heads // kv_heads
    max_pages = row_pages.shape[1]
    per_block = block_pages(rows, page_size, kv_heads, head_dim, max_pages, max_block_tokens)
    padded = -(-max_pages // per_block) * per_block
    if padded != max_pages:  # whole blocks: the extra columns lie past every length, never counted
        row_pages = jnp.pad(row_pages, ((0, 0), (0, padded - max_pages)))
    block = per_block * page_size  # tokens per loop step
    qg = q.reshape(rows, kv_heads, group, head_dim).astype(jnp.float32)
    num_blocks = (jnp.max(lengths) + block - 1) // block  # only as far as the longest row

    def body(carry):
        b, m, l, acc = carry
        pages = lax.dynamic_slice_in_dim(row_pages, b * per_block, per_block, axis=1)  # [rows, per_block]
        k = k_pages[pages].reshape(rows, block, kv_heads, head_dim).astype(jnp.float32)
        v = v_pages[pages].reshape(rows, block, kv_heads, head_dim).astype(jnp.float32)
        s = jnp.einsum("rhgd,rthd->rhgt", qg, k, precision=lax.Precision.HIGHEST) * scale  # [rows, kvh, g, t]
        visible = (b * block + jnp.arange(block))[None, :] < lengths[:, None]  # [rows, t]
        s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        base = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet: no inf - inf
        p = jnp.exp(s - base)
        correction = jnp.exp(m - base)  # exp(-inf) = 0 for the first visible block
        l = l * correction + jnp.sum(p, axis=-1, keepdims=True)
        acc = acc * correction + jnp.einsum("rhgt,rthd->rhgd", p, v, precision=lax.Precision.HIGHEST)
        return b + 1, m_new, l, acc

    init = (jnp.int32(0), jnp.full((rows, kv_heads, group, 1), -jnp.inf, jnp.float32),
            jnp.zeros((rows, kv_heads, group, 1), jnp.float32), jnp.zeros((rows, kv_heads, group, head_dim),
                                                                            jnp.float32))
    _, _, l, acc = lax.while_loop(lambda c: c[0] < num_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)
    return out.reshape(rows, q_heads, head_dim).astype(q.dtype)
