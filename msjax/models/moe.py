"""Token dispatch to experts and the weighted combine of their outputs.

Each (token, k) assignment becomes one row; rows are sorted by expert so the experts run as one grouped GEMM.
Padding tokens are given the out-of-range expert id `num_experts`, which sorts them to the tail, past the sum of
the group sizes, where the grouped GEMM contract leaves them out.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.tree_util.register_dataclass, data_fields=["rows", "group_sizes", "order"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Dispatch:
    rows: jax.Array  # [tokens * k, hidden], sorted by expert
    group_sizes: jax.Array  # [num_experts] int32
    order: jax.Array  # [tokens * k] int32: row r holds assignment order[r] (= token * k + slot)


def dispatch(x: jax.Array, topk_ids: jax.Array, num_experts: int, valid: jax.Array | None = None) -> Dispatch:
    """x [tokens, hidden], topk_ids [tokens, k] int32, valid [tokens] bool (None: all valid)."""
    tokens, k = topk_ids.shape
    ids = topk_ids if valid is None else jnp.where(valid[:, None], topk_ids, num_experts)
    flat = ids.reshape(-1)  # [tokens * k]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.sum(flat[:, None] == jnp.arange(num_experts)[None, :], axis=0, dtype=jnp.int32)
    return Dispatch(rows=x[order // k], group_sizes=group_sizes, order=order)


def combine(expert_rows: jax.Array, order: jax.Array, topk_weights: jax.Array) -> jax.Array:
    """Weighted sum over each token's k expert outputs: expert_rows [tokens * k, hidden] in dispatch order,
    topk_weights [tokens, k] float32 -> [tokens, hidden] in the rows' dtype."""
    tokens, k = topk_weights.shape
    per_assignment = jnp.zeros_like(expert_rows).at[order].set(expert_rows).reshape(tokens, k, -1)
    out = jnp.einsum("tkh,tk->th", per_assignment.astype(jnp.float32), topk_weights,
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(expert_rows.dtype)
