"""The m2n custom calls of one node's program, over however many devices the node has.

A node with tensor parallelism (tp > 1) runs its program SPMD over its devices, and GSPMD runs a custom call it
cannot partition on every device: each device would send the packet (tp messages where the receiver expects
one) and each would wait for its own copy of every reply. `NodeM2N` issues each call from the node's first
device only, inside a `shard_map` over the node's mesh (`lax.cond` on the device's index), and gives every
device what the first one received (a `psum` over the mesh with the other devices' zeros: the broadcast the
tensor-parallel layers after it need anyway). With one device it is the plain calls.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from msjax.comm import native


class NodeM2N:
    """`send` / `recv_all` with `native.m2n_send` / `native.m2n_recv_all`'s signatures, for a program over
    `mesh` (None or one device: the calls as they are)."""

    def __init__(self, mesh: Mesh | None = None):
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None

    def send(self, rows: jax.Array, count: jax.Array, sender, **kwargs) -> jax.Array:
        """-> the ordering token (on the devices that do not send, a zero of the same type: only the first
        device's tokens order calls)."""
        after = _token(kwargs.pop("after", None))
        return self._on_first_device(lambda r, c, t: native.m2n_send(r, c, sender, after=t, **kwargs),
                                     (rows, jnp.asarray(count, jnp.int32), after), broadcast=False)

    def recv_all(self, receiver, *, senders: list[int], likes: list, **kwargs):
        """-> (received buffers, counts int32 [len(senders)]), the same on every device of the node."""
        after = _token(kwargs.pop("after", None))
        return self._on_first_device(
            lambda t: native.m2n_recv_all(receiver, senders=senders, likes=likes, after=t, **kwargs), (after,),
            broadcast=True)

    def _on_first_device(self, call, args: tuple, *, broadcast: bool):
        if self.mesh is None:
            return call(*args)
        axes = self.mesh.axis_names

        def body(*args):
            first = functools.reduce(operator.and_, [jax.lax.axis_index(a) == 0 for a in axes])
            shapes = jax.eval_shape(call, *args)
            out = jax.lax.cond(first, call, lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                               *args)
            # only the first device holds what arrived: the sum with the others' zeros gives it to every device
            return jax.tree.map(lambda x: jax.lax.psum(x, axes), out) if broadcast else out

        # in: replicated over the node (GSPMD gathers a sharded operand); out: declared replicated, which the
        # broadcast makes true for received data; a send's token differs per device and orders only device 0
        return jax.shard_map(body, mesh=self.mesh, in_specs=P(), out_specs=P(), check_vma=False)(*args)


def _token(after) -> jax.Array:
    return jnp.zeros((), jnp.int32) if after is None else jnp.asarray(after, jnp.int32).reshape(())
