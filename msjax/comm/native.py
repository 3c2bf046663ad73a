"""The native M2N library (ffi/) from Python: endpoints through ctypes, and the `m2n_send` / `m2n_recv` XLA FFI
custom calls that move a packet's valid rows from inside a jitted program.

    rx = Receiver("shm", "demo", index=0, num_senders=1, capacity=1 << 20)       # process B
    tx = Sender("shm", ["demo"], index=0, capacity=1 << 20)                       # process A
    jax.jit(lambda rows, n: m2n_send(rows, n, tx, receiver=0, layer=3))(rows, n)  # A: only rows[:n] travel
    rows, n = jax.jit(lambda: m2n_recv(rx, sender=0, layer=3, like=rows))()       # B

A sender's addresses are one per receiver: the channel name for shm and loopback (every receiver of a channel
shares it), "host:port" for tcp; `Receiver.address` gives either (for tcp, after binding port 0). Transport
"loopback" connects endpoints of one process (nodes hosted together) through private memory, by the same calls.
Sequence numbers are per (sender, receiver) channel, so both sides must issue their sends and receives of a
channel in the same order.
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

from msjax.comm._lib import (CUDA_LIBRARY, LIBRARY, TRANSPORTS, LibraryNotBuilt, M2NError, M2NTimeout, Receiver,
                             Sender, VerbsReceiver, VerbsSender, _candidates, has_verbs, header_bytes, is_built,
                             library, message_magic, thread_poll_us, validate_header, verbs_conninfo_roundtrip,
                             verbs_devices, verbs_imm)

__all__ = ["CUDA_LIBRARY", "LIBRARY", "TRANSPORTS", "LibraryNotBuilt", "M2NError", "M2NTimeout", "Receiver", "Sender",
           "VerbsReceiver", "VerbsSender", "has_verbs", "header_bytes", "is_built", "library", "m2n_recv",
           "m2n_recv_all", "m2n_send", "message_magic", "register_ffi_targets", "thread_poll_us", "validate_header",
           "verbs_conninfo_roundtrip", "verbs_devices", "verbs_imm"]


# -- XLA FFI ---------------------------------------------------------------------------------------------------

_registered: set[str] = set()


def register_ffi_targets() -> None:
    """Registers m2n_send / m2n_recv / m2n_recv_all with XLA for the CPU platform (and m2n_send / m2n_recv for
    CUDA when the CUDA variant is built and a GPU backend exists). Idempotent."""
    if "cpu" not in _registered:
        lib = library()
        jax.ffi.register_ffi_target("m2n_send", jax.ffi.pycapsule(lib.M2nSend), platform="cpu")
        jax.ffi.register_ffi_target("m2n_recv", jax.ffi.pycapsule(lib.M2nRecv), platform="cpu")
        jax.ffi.register_ffi_target("m2n_recv_all", jax.ffi.pycapsule(lib.M2nRecvAll), platform="cpu")
        _registered.add("cpu")
    if "cuda" not in _registered and _has_gpu():
        path = next((p for p in _candidates(CUDA_LIBRARY) if p.is_file()), None)
        if path is not None:
            library()  # the CUDA handlers link against the core library
            cuda = ctypes.CDLL(str(path))
            jax.ffi.register_ffi_target("m2n_send", jax.ffi.pycapsule(cuda.M2nSendCuda), platform="CUDA")
            jax.ffi.register_ffi_target("m2n_recv", jax.ffi.pycapsule(cuda.M2nRecvCuda), platform="CUDA")
        _registered.add("cuda")


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _tag(layer, micro_batch) -> jax.Array:
    """(layer, micro-batch) as an int32 [2] operand: Python ints or traced scalars (one program, every layer)."""
    return jnp.stack([jnp.asarray(layer, jnp.int32).reshape(()), jnp.asarray(micro_batch, jnp.int32).reshape(())])


def _after(token) -> jax.Array:
    """The int32 [] ordering operand: a data dependence is the only order XLA keeps between these calls (an
    `optimization_barrier` whose token output goes unused is pruned, and with it the order)."""
    return jnp.zeros((), jnp.int32) if token is None else jnp.asarray(token, jnp.int32).reshape(())


def m2n_send(rows: jax.Array, count: jax.Array, sender: Sender, *, receiver: int, layer: int | jax.Array = 0,
             micro_batch: int | jax.Array = 0, timeout_s: float | None = None,
             after: jax.Array | None = None) -> jax.Array:
    """Sends rows[:count] of a packet buffer rows [capacity, ...] to `receiver`, from inside a jitted program,
    tagged (layer, micro_batch) — ints or traced int32 scalars. Returns `count` as an int32 scalar, to order later
    work (e.g. `m2n_recv(after=...)`) after the send. `after` (an earlier m2n call's result) orders this send
    after that call; chain every call of a channel this way when one program holds several of them."""
    register_ffi_targets()
    # Not has_side_effect: a side-effecting call gives the program an effect, and JAX then dispatches every call
    # of it through its Python path (no C++ fast path: about 1 ms of host time per call here, on the core the
    # programs run on). The result, which callers return or feed to `m2n_recv(after=...)`, keeps the call alive
    # and ordered; distinct attributes (receiver, handle) keep XLA from merging two sends.
    call = jax.ffi.ffi_call("m2n_send", jax.ShapeDtypeStruct((), jnp.int32))
    return call(rows, jnp.asarray(count, jnp.int32).reshape(()), _tag(layer, micro_batch), _after(after),
                handle=np.int64(sender.handle), receiver=np.int32(receiver),
                timeout_s=np.float32(sender.timeout_s if timeout_s is None else timeout_s))


def m2n_recv(receiver: Receiver, *, sender: int, like: jax.ShapeDtypeStruct | jax.Array,
             layer: int | jax.Array = 0, micro_batch: int | jax.Array = 0, timeout_s: float | None = None,
             after: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Receives the next packet from `sender` into a buffer shaped like `like` [capacity, ...]: (rows, count),
    rows past `count` zero. The message must be tagged (layer, micro_batch) (ints or traced scalars), else a
    clear error. `after` (e.g. an m2n_send result) orders the receive after the op that made it: XLA orders
    these calls only by data dependence, and keeps them only while their results are used."""
    register_ffi_targets()
    shape = jax.ShapeDtypeStruct(like.shape, like.dtype)
    call = jax.ffi.ffi_call("m2n_recv", (shape, jax.ShapeDtypeStruct((), jnp.int32)))  # see m2n_send
    return call(_tag(layer, micro_batch), _after(after), handle=np.int64(receiver.handle), sender=np.int32(sender),
                timeout_s=np.float32(receiver.timeout_s if timeout_s is None else timeout_s))


def m2n_recv_all(receiver: Receiver, *, senders: list[int], likes: list, layer: int | jax.Array = 0,
                 micro_batch: int | jax.Array = 0, timeout_s: float | None = None,
                 after: jax.Array | None = None) -> tuple[list[jax.Array], jax.Array]:
    """`m2n_recv` from each of `senders` (distinct) in one call, into buffers shaped like `likes` (one each):
    ([rows_j], counts [k] int32). The messages are taken as they come rather than in sender order (over tcp the
    receive reads every one that has not begun straight from its socket), so a slow first sender does not hold
    up the others' bytes. CPU only for now (no CUDA handler yet)."""
    if len(likes) != len(senders) or not senders:
        raise ValueError(f"m2n_recv_all needs one buffer shape per sender: {len(likes)} for {len(senders)}")
    register_ffi_targets()
    shapes = [jax.ShapeDtypeStruct(like.shape, like.dtype) for like in likes]
    call = jax.ffi.ffi_call("m2n_recv_all", (jax.ShapeDtypeStruct((len(senders),), jnp.int32), *shapes))
    counts, *rows = call(_tag(layer, micro_batch), _after(after), handle=np.int64(receiver.handle),
                         senders=np.asarray(senders, np.int32),
                         timeout_s=np.float32(receiver.timeout_s if timeout_s is None else timeout_s))
    return rows, counts
