"""Attention over the paged KV cache for both step kinds.

Decode steps (one token per sequence) go through `paged_gqa_decode` (the Pallas kernel on Hopper GPUs, its
reference elsewhere); prefill steps (whole
prompts or chunks, several sequences in one flat token batch) use `paged_prefill_attention`, a plain-jnp
causal attention that reads each token's sequence from the pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msjax.kv_cache import AttentionBatch, KVCache
from pallas_kernels.paged_gqa_decode import paged_gqa_decode
from pallas_kernels.platform import kernel_args


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

    kernels: "auto" (the Pallas kernel on Hopper GPUs, the reference elsewhere), "kernel", "reference", or
    "interpret" (the kernel under the Mosaic GPU interpreter, for CPU tests)."""
    page_table = batch.page_table + layer * kv.pages_per_layer
    if decode:
        lengths = jnp.where(batch.positions >= 0, batch.positions + 1, 0)
        return paged_gqa_decode(q, kv.k, kv.v, page_table[batch.seq_ids], lengths, scale=scale,
                                **kernel_args(kernels))
    return paged_prefill_attention(q, kv.k, kv.v, page_table, batch.seq_ids, batch.positions, scale=scale)
