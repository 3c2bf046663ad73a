"""Shardings from one table: each weight's logical axes, and per deployment a map from logical axes to mesh axes.

A new parallelism strategy changes the rules, not the model code. A logical axis is sharded only where its size
divides the mesh axis; otherwise that dimension is replicated (e.g. 2 KV heads on 4 devices: KV heads are
replicated, which is what tensor parallelism beyond the KV head count needs anyway). XLA's SPMD partitioner
inserts the collectives, so any rule set computes the same result; the rules decide only where work and bytes go.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axes of each parameter (leading axis: layers).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": (None, None),
    "input_norm": (None, None),
    "post_norm": (None, None),
    "final_norm": (None,),
    "wq": (None, None, "heads"),
    "wk": (None, None, "kv_heads"),
    "wv": (None, None, "kv_heads"),
    "wo": (None, "heads", None),
    "bq": (None, "heads"),
    "bk": (None, "kv_heads"),
    "bv": (None, "kv_heads"),
    "bo": (None, None),
    "q_norm": (None, None),
    "k_norm": (None, None),
    "router": (None, None, None),
    "shared_gate_up": (None, None, "ffn"),
    "shared_down": (None, "ffn", None),
    "shared_gate": (None, None, None),
    "lm_head": (None, None),
    "w_gate_up": (None, "experts", None, "ffn"),
    "w_down": (None, "experts", "ffn", None),
}
KV_AXES = (None, None, "kv_heads", None)  # [pages, page_size, kv_heads, head_dim]

# Rules: logical axes in order of preference -> mesh axis. The first that divides wins; one mesh axis per array.
ATTENTION_TP_RULES = {"heads": "tp", "kv_heads": "tp", "ffn": "tp"}
EXPERT_TP_RULES = {"ffn": "tp"}
COLOCATED_RULES = {"heads": "x", "kv_heads": "x", "experts": "x", "ffn": "x"}


def partition_spec(shape: tuple[int, ...], axes: tuple[str | None, ...], rules: dict[str, str],
                   mesh: Mesh) -> PartitionSpec:
    spec: list[str | None] = [None] * len(shape)
    used: set[str] = set()
    for dim, (size, logical) in enumerate(zip(shape, axes)):
        mesh_axis = rules.get(logical) if logical else None
        if mesh_axis and mesh_axis not in used and size % mesh.shape[mesh_axis] == 0:
            spec[dim] = mesh_axis
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def shard_state(state, rules: dict[str, str], mesh: Mesh):
    """Place a role's `nnx.State` on `mesh` following PARAM_AXES and `rules` (asynchronous device_put)."""
    def place(path, leaf):
        name = path[0].key
        spec = partition_spec(leaf.shape, PARAM_AXES[name], rules, mesh)
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, state)


def kv_sharding(shape: tuple[int, ...], rules: dict[str, str], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(shape, KV_AXES, rules, mesh))


def kv_cache(cfg, pages_per_layer: int, page_size: int, dtype, rules: dict[str, str], mesh: Mesh):
    """A zero KV cache on `mesh`, its KV heads placed by `rules`."""
    from msjax.kv_cache import KVCache
    shape = KVCache.shape(cfg, pages_per_layer, page_size)
    return KVCache.create(cfg, pages_per_layer, page_size, dtype=dtype, sharding=kv_sharding(shape, rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
