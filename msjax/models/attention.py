"""Attention over the paged KV cache for both step kinds.

Decode steps (one token per sequence) go through `paged_gqa_decode`'s Pallas kernel on Hopper GPUs; elsewhere
decode, and prefill steps (whole prompts or chunks, several sequences in one flat token batch) everywhere, use
`blocked_paged_attention`, which reads only the blocks of context the batch's rows hold. `paged_prefill_attention`
(and the decode kernel's reference) read the page table's full width: the references, under
kernels="reference".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models.blocked_attention import blocked_paged_attention
from pallas_kernels.paged_gqa_decode import paged_gqa_decode
from pallas_kernels.platform import is_hopper, kernel_args


def paged_prefill_attention(
    q: jax.Array,  # [tokens, q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    v_pages: jax.Array,
    page_table: jax.Array,  # [seqs, max_pages_per_seq] int32 (already offset to this layer)
    seq_ids: jax.Array,  # [tokens] int32
    positions: jax.Array,  # [tokens] int32, -1 for padding
    *,
    scale: float,
) -> jax.Array:  # [tokens, q_heads, head_dim]
    """Token t attends to positions 0..positions[t] of its sequence, which must already be in the pages.

    Memory is O(tokens x context): the prefill kernel is future work; this is the reference it will match.
    """
    tokens, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    group = q_heads // kv_heads
    context = page_table.shape[1] * page_size
    tok_pages = page_table[seq_ids]  # [t, p]
    k = k_pages[tok_pages].reshape(tokens, context, kv_heads, head_dim)
    v = v_pages[tok_pages].reshape(tokens, context, kv_heads, head_dim)
    qg = q.reshape(tokens, kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("thgd,tchd->thgc", qg, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale  # [t, kvh, g, c]
    visible = jnp.arange(context)[None, :] <= positions[:, None]  # [t, c]; padding (-1) sees nothing
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("thgc,tchd->thgd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(tokens, q_heads, head_dim).astype(q.dtype)


def paged_attention(q: jax.Array, kv: KVCache, layer: jax.Array, batch: AttentionBatch, *, scale: float,
                    decode: bool, kernels: str = "auto") -> jax.Array:
    """Attention of q [tokens, q_heads, head_dim] for one layer whose new K/V are already written.

    kernels: "auto" (decode: the Pallas kernel on Hopper GPUs; otherwise `blocked_paged_attention`), "kernel",
    "reference" (both references), or "interpret" (the decode kernel under the Mosaic GPU interpreter, for CPU
    tests)."""
    page_table = batch.page_table + layer * kv.pages_per_layer
    lengths = jnp.where(batch.positions >= 0, batch.positions + 1, 0)  # a token sees positions 0..its own
    if decode and (kernels != "auto" or is_hopper()):  # the Pallas kernel, or a reference asked for by name
        return paged_gqa_decode(q, kv.k, kv.v, page_table[batch.seq_ids], lengths, scale=scale,
                                **kernel_args(kernels))
    if kernels == "reference":  # prefill's reference, for tests that compare against it
        return paged_prefill_attention(q, kv.k, kv.v, page_table, batch.seq_ids, batch.positions, scale=scale)
    # decode off Hopper, and prefill: only the blocks of context the rows hold (each token is a row)
    return blocked_paged_attention(q, kv.k, kv.v, page_table[batch.seq_ids], lengths, scale=scale)
