"""Dispatch and combine between M attention nodes and N expert nodes (paper §5's M2N pattern).

Per (attention node, expert node) pair and per (layer, micro-batch), the attention node packs one send buffer of
fixed capacity — the worst case, tokens x top-k rows, so no token is ever dropped — whose first `count` rows are
the (token, k) assignments routed to that node, sorted by its local expert id, with `count` kept on the device.
The expert node returns one output row per received row; the attention node scatters them back to their
assignments and takes the weighted sum.

The native M2N library (ffi/) moves them between nodes, only the valid rows, from inside the nodes' programs
(`msjax.comm.native`), over whichever transport the plan resolves to (`msjax.comm.transports`).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


GOLDEN = 0.6180339887498949  # low-discrepancy sequence: assignments spread over replicas close to their shares


@dataclasses.dataclass(frozen=True)
class Routing:
    """Where each global expert lives: its replicas (node, local index) and the share of its tokens each serves.
    Hashable: a static argument of the attention program."""

    replicas: tuple[tuple[tuple[int, int], ...], ...]  # per expert: ((node, local index), ...)
    cum_shares: tuple[tuple[float, ...], ...]  # per expert: cumulative share up to each replica (last is 1)
    num_local: tuple[int, ...]  # experts held by each node (0: a node out of the exchange, e.g. one that was lost)

    @classmethod
    def from_placement(cls, placement: tuple[tuple[int, ...], ...], num_experts: int,
                       shares: tuple[tuple[float, ...], ...] | None = None) -> "Routing":
        """`shares[j][i]`: share of expert placement[j][i]'s tokens served by node j (default: equal split)."""
        replicas: list[list[tuple[int, int]]] = [[] for _ in range(num_experts)]
        weights: list[list[float]] = [[] for _ in range(num_experts)]
        for node, experts in enumerate(placement):
            for local, e in enumerate(experts):
                replicas[e].append((node, local))
                weights[e].append(1.0 if shares is None else float(shares[node][local]))
        cum = []
        for e, w in enumerate(weights):
            total = sum(w) or 1.0
            running = np.cumsum(np.asarray(w) / total)
            running[-1] = 1.0
            cum.append(tuple(float(c) for c in running))
        return cls(tuple(tuple(r) for r in replicas), tuple(cum), tuple(len(p) for p in placement))

    def tables(self) -> tuple[np.ndarray, ...]:
        """The routing as arrays, an operand of the attention programs (a re-placement changes values, not
        shapes: no compile): node [E, N], local [E, N] int32 and cumulative shares [E, N] float32 over the N
        expert nodes (an expert has at most one replica per node; unused slots never chosen), and num_local [N]
        int32 (a node's padding expert id)."""
        width = len(self.num_local)
        node = np.zeros((len(self.replicas), width), np.int32)
        local = np.zeros_like(node)
        cum = np.full(node.shape, 2.0, np.float32)
        for e, (reps, c) in enumerate(zip(self.replicas, self.cum_shares)):
            node[e, :len(reps)] = [n for n, _ in reps]
            local[e, :len(reps)] = [i for _, i in reps]
            cum[e, :len(reps)] = c
        return node, local, cum, np.asarray(self.num_local, np.int32)


@partial(jax.tree_util.register_dataclass, data_fields=["rows", "expert_ids", "count"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Packet:
    """What one attention node sends one expert node for one (layer, micro-batch)."""

    rows: jax.Array  # [capacity, hidden]: the first `count` rows are real, sorted by local expert
    expert_ids: jax.Array  # [capacity] int32 local expert of each row; padding rows hold num_local
    count: jax.Array  # [] int32


def pack(x: jax.Array, topk_ids: jax.Array, valid: jax.Array, tables, node: int):
    """The packet for expert node `node`, and each of its rows' assignment index (token * k + slot; -1 for
    padding), which stays on the attention node for the combine.

    x [tokens, hidden]; topk_ids [tokens, k] int32 (global experts); valid [tokens] bool; tables: a `Routing`'s
    `tables()` (arrays, traced or not).
    """
    tokens, k = topk_ids.shape
    node_table, local_table, cum_table, num_local = (jnp.asarray(t) for t in tables)
    # each assignment picks one replica of its expert, in proportion to the replicas' shares
    u = jnp.mod((jnp.arange(tokens * k, dtype=jnp.float32) + 0.5) * GOLDEN, 1.0).reshape(tokens, k)
    replica = jnp.sum(cum_table[topk_ids] <= u[..., None], axis=-1)  # [t, k]
    chosen_node = jnp.take_along_axis(node_table[topk_ids], replica[..., None], axis=-1)[..., 0]
    chosen_local = jnp.take_along_axis(local_table[topk_ids], replica[..., None], axis=-1)[..., 0]
    mine = (valid[:, None] & (chosen_node == node)).reshape(-1)  # [t*k]
    pad_id = num_local[node]
    local = jnp.where(mine, chosen_local.reshape(-1), pad_id)
    order = jnp.argsort(local, stable=True).astype(jnp.int32)
    count = jnp.sum(mine, dtype=jnp.int32)
    real = jnp.arange(tokens * k) < count
    packet = Packet(rows=x[order // k], expert_ids=jnp.where(real, local[order], pad_id), count=count)
    return packet, jnp.where(real, order, -1)


def combine_returned(outputs: tuple[jax.Array, ...], orders: tuple[jax.Array, ...],
                     topk_weights: jax.Array) -> jax.Array:
    """The weighted sum [tokens, hidden] of each token's expert outputs: outputs[e] [capacity, hidden] came back
    from expert node e in the order of its packet, orders[e] the assignment index of each row."""
    tokens, k = topk_weights.shape
    acc = jnp.zeros((tokens * k, outputs[0].shape[-1]), jnp.float32)
    for out, order in zip(outputs, orders):
        acc = acc.at[jnp.where(order >= 0, order, tokens * k)].add(out.astype(jnp.float32), mode="drop")
    moe = jnp.einsum("tkh,tk->th", acc.reshape(tokens, k, -1), topk_weights, precision=jax.lax.Precision.HIGHEST)
    return moe.astype(outputs[0].dtype)
