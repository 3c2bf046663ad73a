"""The paged KV cache: the host-side page allocator, the device arrays, and the per-step metadata that
addresses them.

Pages of every layer live in one array per K and V, layer-major: layer l owns pages
[l * pages_per_layer, (l + 1) * pages_per_layer). A sequence's page table holds layer-local page ids, so one
host-side table serves all layers and the attention program offsets it by `layer * pages_per_layer`. This keeps
the kernel contract's `[num_pages, page_size, kv_heads, head_dim]` layout without slicing out (and copying) a
layer's pages per call.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from msjax.config import ModelConfig


class OutOfPagesError(RuntimeError):
    """The allocator has fewer free pages than asked for (the scheduler checks first; this is a bug guard)."""


class PageAllocator:
    """Hands out layer-local page ids from a free list. Pure host code: no device, no JAX.

    A page is either free or owned by exactly one sequence; `free` returns pages the moment a sequence finishes,
    is aborted or is preempted.
    """

    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be > 0, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if page not in self._used:
                raise ValueError(f"page {page} is not allocated (double free?)")
            self._used.remove(page)
            self._free.append(page)


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=["pages_per_layer"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [num_layers * pages_per_layer, page_size, kv_heads, head_dim]
    v: jax.Array  # [num_layers * pages_per_layer, page_size, kv_heads, head_dim]
    pages_per_layer: int

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @staticmethod
    def shape(cfg: ModelConfig, pages_per_layer: int, page_size: int) -> tuple[int, int, int, int]:
        """[num_layers * pages_per_layer, page_size, kv_heads, head_dim]: of K and of V."""
        return cfg.num_layers * pages_per_layer, page_size, cfg.num_kv_heads, cfg.head_dim

    @classmethod
    def create(cls, cfg: ModelConfig, pages_per_layer: int, page_size: int, dtype=jnp.float32,
               sharding=None) -> "KVCache":
        """Zeros, on `sharding` (`msjax.models.sharding.kv_cache` derives it from a deployment's rules)."""
        zeros = partial(jnp.zeros, cls.shape(cfg, pages_per_layer, page_size), dtype, device=sharding)
        return cls(k=zeros(), v=zeros(), pages_per_layer=pages_per_layer)

    def write(self, layer: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array) -> "KVCache":
        """Store k, v [tokens, kv_heads, head_dim] at layer-local flat slots [tokens] (page * page_size +
        offset); a negative slot (batch padding) is dropped."""
        num_slots = self.k.shape[0] * self.page_size
        flat = jnp.where(slots >= 0, slots + layer * self.pages_per_layer * self.page_size, num_slots)

        def put(pages, new):
            flat_pages = pages.reshape(num_slots, *pages.shape[2:])
            return flat_pages.at[flat].set(new.astype(pages.dtype), mode="drop").reshape(pages.shape)

        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))


@partial(jax.tree_util.register_dataclass, data_fields=["positions", "seq_ids", "page_table"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class AttentionBatch:
    """Which sequence each token of a step belongs to, where it sits in it, and where its pages are.

    Decode steps have one token per sequence (token i is sequence i); prefill steps have any number of tokens
    per sequence (a prompt or a chunk of one). Padding tokens have position -1: they write nothing and attend
    to nothing.
    """

    positions: jax.Array  # [tokens] int32, -1 for padding
    seq_ids: jax.Array  # [tokens] int32: row of page_table
    page_table: jax.Array  # [seqs, max_pages_per_seq] int32, layer-local page ids

    def slots(self, page_size: int) -> jax.Array:  # [tokens] int32, -1 for padding
        pos = jnp.maximum(self.positions, 0)
        page = self.page_table[self.seq_ids, pos // page_size]
        return jnp.where(self.positions >= 0, page * page_size + pos % page_size, -1)
