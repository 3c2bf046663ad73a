"""Endpoints of the native M2N library through ctypes (numpy only, no JAX, no msjax imports): loadable on its own
by file path, which keeps benchmark and test worker processes light. msjax.comm.native re-exports all of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from pathlib import Path

import numpy as np

LIBRARY = "libmsjax_m2n.so"
CUDA_LIBRARY = "libmsjax_m2n_cuda.so"
TRANSPORTS = ("shm", "tcp", "loopback")  # loopback: endpoints of one process, through private memory
_ERR_LEN = 1024
_NOT_RECEIVED = 2**64 - 1  # a recv_all byte count: that sender's message was not received
_CODES = {1: "invalid argument", 2: "deadline exceeded", 3: "unavailable", 4: "malformed message", 5: "internal",
          6: "not taken"}


class M2NError(RuntimeError):
    """An M2N operation failed; `code` is one of "invalid argument", "deadline exceeded", "unavailable",
    "malformed message", "internal"."""

    def __init__(self, code: int, message: str):
        self.code = _CODES.get(code, f"code {code}")
        super().__init__(message)


class M2NTimeout(M2NError, TimeoutError):
    """A peer did not deliver (or free a slot) before the timeout: it died, hung, or never sent."""


class LibraryNotBuilt(ImportError):
    """The native library is missing: msjax was installed without its CMake build."""


def _candidates(name: str) -> list[Path]:
    found = []
    if os.environ.get("MSJAX_M2N_LIB") and name == LIBRARY:
        found.append(Path(os.environ["MSJAX_M2N_LIB"]))
    found.append(Path(__file__).parent / "_native" / name)  # regular install, in-place build
    # editable installs keep the sources here and the built library in site-packages
    found += [Path(entry) / "msjax" / "comm" / "_native" / name for entry in sys.path if entry]
    found.append(Path(__file__).resolve().parents[2] / "build" / "m2n" / name)  # cmake -B build/m2n
    return found


_lib = None


def _warn_if_stale(path: Path) -> None:
    """In a source checkout, warn when ffi/ changed after the library was built (an editable install does not
    rebuild it by itself)."""
    sources = Path(__file__).resolve().parents[2] / "ffi"
    if not sources.is_dir():
        return
    built = path.stat().st_mtime
    newer = [p.name for p in sources.rglob("*") if p.suffix in (".cc", ".h", ".cu") and p.stat().st_mtime > built]
    if newer:
        warnings.warn(f"{path} is older than ffi/{newer[0]} (and {len(newer) - 1} more): rebuild it with "
                      "`pip install -e .` (tools/setup.sh)", stacklevel=3)


def library() -> ctypes.CDLL:
    """The loaded native library (loaded once, argument types declared)."""
    global _lib
    if _lib is None:
        path = next((p for p in _candidates(LIBRARY) if p.is_file()), None)
        if path is None:
            raise LibraryNotBuilt(f"{LIBRARY} not found (looked in msjax/comm/_native on sys.path and build/m2n); "
                                  "build it with `pip install -e .` (tools/setup.sh) or set MSJAX_M2N_LIB")
        _warn_if_stale(path)
        lib = ctypes.CDLL(str(path))
        c = ctypes
        err = [c.c_char_p, c.c_size_t]
        lib.m2n_open_sender.argtypes = [c.c_char_p, c.c_char_p, c.c_uint32, c.c_uint32, c.c_uint64, c.c_double,
                                        c.POINTER(c.c_int64), *err]
        lib.m2n_open_receiver.argtypes = [c.c_char_p, c.c_char_p, c.c_uint32, c.c_uint32, c.c_uint32, c.c_uint64,
                                          c.c_double, c.POINTER(c.c_int64), *err]
        lib.m2n_close.argtypes = [c.c_int64]
        lib.m2n_address.argtypes = [c.c_int64, c.c_char_p, c.c_size_t]
        lib.m2n_send.argtypes = [c.c_int64, c.c_uint32, c.c_uint32, c.c_uint32, c.c_void_p, c.c_uint64,
                                 c.c_double, *err]
        lib.m2n_recv.argtypes = [c.c_int64, c.c_uint32, c.c_uint32, c.c_uint32, c.c_void_p, c.c_uint64,
                                 c.POINTER(c.c_uint64), c.c_double, *err]
        lib.m2n_recv_all.argtypes = [c.c_int64, c.POINTER(c.c_uint32), c.c_uint32, c.c_uint32, c.c_uint32,
                                     c.POINTER(c.c_void_p), c.POINTER(c.c_uint64), c.POINTER(c.c_uint64), c.c_double,
                                     *err]
        lib.m2n_validate_header.argtypes = [c.c_void_p, c.c_size_t, c.c_uint32, c.c_uint32, c.c_uint64, c.c_uint32,
                                            c.c_uint32, c.c_uint64, *err]
        lib.m2n_debug_inject.argtypes = [c.c_int64, c.c_uint32, c.c_uint64, c.c_void_p, c.c_size_t, *err]
        lib.m2n_set_tolerant.argtypes = [c.c_int64, c.c_int]
        lib.m2n_lost.argtypes = [c.c_int64, c.POINTER(c.c_uint8), c.c_uint32]
        lib.m2n_mark_lost.argtypes = [c.c_int64, c.c_uint32]
        lib.m2n_adopt.argtypes = [c.c_int64, c.c_int64]
        lib.m2n_set_thread_poll_us.argtypes = [c.c_long]
        lib.m2n_set_thread_poll_us.restype = c.c_long
        lib.m2n_header_bytes.restype = c.c_uint32
        lib.m2n_message_magic.restype = c.c_uint32
        lib.m2n_verbs_devices.argtypes = [c.c_char_p, c.c_size_t]
        for name in ("verbs_encode_imm", "verbs_conninfo_roundtrip"):
            if not hasattr(lib, f"m2n_{name}"):
                raise LibraryNotBuilt(f"{path} is out of date (no m2n_{name}); rebuild it")
        lib.m2n_verbs_encode_imm.argtypes = [c.c_uint32, c.c_uint64]
        lib.m2n_verbs_encode_imm.restype = c.c_uint32
        lib.m2n_verbs_conninfo_roundtrip.argtypes = [c.c_char_p, c.c_size_t, c.c_char_p, c.c_size_t]
        lib.m2n_verbs_open.argtypes = [c.c_int, c.c_char_p, c.c_uint32, c.c_uint32, c.c_uint32, c.c_uint64,
                                       c.c_double, c.POINTER(c.c_int64), *err]
        lib.m2n_verbs_local_info.argtypes = [c.c_int64, c.c_uint32, c.c_char_p, c.c_size_t, *err]
        lib.m2n_verbs_connect.argtypes = [c.c_int64, c.c_uint32, c.c_char_p, c.c_size_t, *err]
        _lib = lib
    return _lib


@contextlib.contextmanager
def thread_poll_us(us: int):
    """Within the block, the calling thread's M2N waits poll at most `us` µs before sleeping on the futex
    (MSJAX_M2N_POLL_US is the process-wide budget): for a wait that lasts a whole step, on a core the peer it
    waits for needs (the engine's process waiting on an attention process)."""
    previous = library().m2n_set_thread_poll_us(int(us))
    try:
        yield
    finally:
        library().m2n_set_thread_poll_us(previous)


def is_built() -> bool:
    try:
        library()
        return True
    except LibraryNotBuilt:
        return False


def _check(rc: int, err) -> None:
    if rc != 0:
        message = err.value.decode(errors="replace") if err is not None else ""
        raise (M2NTimeout if rc == 2 else M2NError)(rc, message)


def _err():
    return ctypes.create_string_buffer(_ERR_LEN)


def _contiguous(data) -> np.ndarray:
    if isinstance(data, np.ndarray) and data.flags.c_contiguous:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, np.uint8)
    return np.ascontiguousarray(data)


class _Endpoint:
    handle: int = 0

    def _peers(self) -> int:
        return self.num_receivers if isinstance(self, Sender) else self.num_senders

    def set_tolerant(self, on: bool = True) -> None:
        """Tolerant: a peer that is gone (exited, closed its connection, timed out) is marked lost instead of
        failing the call; sends to it are dropped, its messages read as 0 bytes (zeros inside a program), so a
        program runs to its end past a peer's death and its host reads `lost()` afterwards."""
        _check(library().m2n_set_tolerant(self.handle, int(on)), None)

    def adopt(self, other: "_Endpoint") -> None:
        """Take over `other`'s connection (an endpoint of the same kind and shape, e.g. the next generation of
        this channel) under this endpoint's handle, and close `other` with the old one: programs compiled
        against this handle use the new connection without a recompile. This endpoint keeps its tolerance; the
        new connection starts with no peer lost."""
        shape = lambda e: (isinstance(e, Sender), e.index, e._peers(), e.capacity)  # noqa: E731
        if shape(self) != shape(other):
            raise ValueError(f"cannot adopt an endpoint of another kind or shape: {shape(other)} for {shape(self)}")
        _check(library().m2n_adopt(self.handle, other.handle), None)
        other.close()

    def mark_lost(self, peer: int) -> None:
        """Treat `peer` as gone from now on (the caller took it out of the deployment): sends to it are dropped
        and its messages read as 0 bytes at once, without a wait."""
        _check(library().m2n_mark_lost(self.handle, peer), None)

    def lost(self) -> list[int]:
        """The peers marked lost so far (tolerant endpoints only)."""
        n = self._peers()
        flags = (ctypes.c_uint8 * n)()
        _check(library().m2n_lost(self.handle, flags, n), None)
        return [i for i in range(n) if flags[i]]

    def close(self) -> None:
        if self.handle:
            library().m2n_close(self.handle)
            self.handle = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


class Sender(_Endpoint):
    """Sender `index` of M, talking to len(addresses) receivers. Opening waits (up to `timeout_s`) for every
    receiver to exist (loopback: to be open in this process)."""

    def __init__(self, transport: str, addresses: list[str], index: int, capacity: int, timeout_s: float = 10.0):
        _check_transport(transport)
        handle, err = ctypes.c_int64(0), _err()
        _check(library().m2n_open_sender(transport.encode(), ",".join(addresses).encode(), index, len(addresses),
                                         capacity, timeout_s, ctypes.byref(handle), err, _ERR_LEN), err)
        self.handle, self.index, self.num_receivers, self.capacity = handle.value, index, len(addresses), capacity
        self.timeout_s = timeout_s
        self._send, self._err = library().m2n_send, _err()  # the hot path: no per-call lookups or allocations

    def send(self, receiver: int, data, layer: int = 0, micro_batch: int = 0, timeout_s: float = -1) -> None:
        """Sends the bytes of `data` (bytes or a C-contiguous array)."""
        buf = _contiguous(data)
        rc = self._send(self.handle, receiver, layer, micro_batch, buf.__array_interface__["data"][0], buf.nbytes,
                        timeout_s, self._err, _ERR_LEN)
        if rc:
            _check(rc, self._err)

    def send_raw(self, receiver: int, address: int, nbytes: int, layer: int = 0, micro_batch: int = 0,
                 timeout_s: float = -1) -> None:
        """`send` from a raw address (the caller keeps the memory alive): no per-call array inspection."""
        rc = self._send(self.handle, receiver, layer, micro_batch, address, nbytes, timeout_s, self._err, _ERR_LEN)
        if rc:
            _check(rc, self._err)


class RecvAllBatch:
    """The C arrays of a `Receiver.recv_all_raw` call: senders, output addresses and capacities (kept alive by
    whoever holds the batch, as the buffers must be), and the byte counts it fills."""

    def __init__(self, senders: list[int], addresses: list[int], capacities: list[int]):
        n = len(senders)
        self.count = n
        self.senders = (ctypes.c_uint32 * n)(*senders)
        self.outs = (ctypes.c_void_p * n)(*addresses)
        self.capacities = (ctypes.c_uint64 * n)(*capacities)
        self.nbytes = (ctypes.c_uint64 * n)()


class Receiver(_Endpoint):
    """Receiver `index` of N with a registered region of `depth` slots of `capacity` bytes per sender."""

    def __init__(self, transport: str, address: str, index: int, num_senders: int, capacity: int,
                 depth: int = 4, timeout_s: float = 10.0):
        _check_transport(transport)
        handle, err = ctypes.c_int64(0), _err()
        _check(library().m2n_open_receiver(transport.encode(), address.encode(), index, num_senders, depth,
                                           capacity, timeout_s, ctypes.byref(handle), err, _ERR_LEN), err)
        self.handle, self.index, self.num_senders, self.capacity = handle.value, index, num_senders, capacity
        self.timeout_s = timeout_s
        self._recv, self._err, self._nbytes = library().m2n_recv, _err(), ctypes.c_uint64(0)

    @property
    def address(self) -> str:
        """What senders pass for this receiver: tcp "ip:port" as bound; shm and loopback the channel name."""
        out = _err()
        _check(library().m2n_address(self.handle, out, _ERR_LEN), out)
        return out.value.decode()

    def recv_into(self, out: np.ndarray, sender: int, layer: int = 0, micro_batch: int = 0,
                  timeout_s: float = -1) -> int:
        """Receives the next message from `sender` into `out` (C-contiguous, writeable); returns its byte count."""
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("recv_into needs a C-contiguous, writeable array")
        rc = self._recv(self.handle, sender, layer, micro_batch, out.__array_interface__["data"][0], out.nbytes,
                        ctypes.byref(self._nbytes), timeout_s, self._err, _ERR_LEN)
        if rc:
            _check(rc, self._err)
        return self._nbytes.value

    def recv_raw(self, sender: int, address: int, capacity: int, layer: int = 0, micro_batch: int = 0,
                 timeout_s: float = -1) -> int:
        """`recv_into` a raw address of `capacity` writable bytes: no per-call array inspection."""
        rc = self._recv(self.handle, sender, layer, micro_batch, address, capacity, ctypes.byref(self._nbytes),
                        timeout_s, self._err, _ERR_LEN)
        if rc:
            _check(rc, self._err)
        return self._nbytes.value

    def recv_all(self, outs: list[np.ndarray], senders: list[int], layer: int = 0, micro_batch: int = 0,
                 timeout_s: float = -1) -> list[int]:
        """One message from each of `senders` (distinct) into the matching array of `outs` (C-contiguous,
        writeable), taken as they come rather than in sender order; their byte counts. Errors: see
        `recv_all_raw` (the exception says which messages did arrive)."""
        if len(outs) != len(senders):
            raise ValueError(f"recv_all needs one output per sender: {len(outs)} outputs, {len(senders)} senders")
        if not all(o.flags.c_contiguous and o.flags.writeable for o in outs):
            raise ValueError("recv_all needs C-contiguous, writeable arrays")
        batch = RecvAllBatch(senders, [o.__array_interface__["data"][0] for o in outs], [o.nbytes for o in outs])
        return self.recv_all_raw(batch, layer, micro_batch, timeout_s)

    def recv_all_raw(self, batch: "RecvAllBatch", layer: int = 0, micro_batch: int = 0,
                     timeout_s: float = -1) -> list[int]:
        """`recv_all` into the raw buffers of a prepared batch (no per-call array inspection). On an error the
        messages that did arrive are still consumed: the exception's `received` lists each sender's byte count,
        or None where its message was not received (wait again for just those)."""
        rc = library().m2n_recv_all(self.handle, batch.senders, batch.count, layer, micro_batch, batch.outs,
                                    batch.capacities, batch.nbytes, timeout_s, self._err, _ERR_LEN)
        if rc:
            try:
                _check(rc, self._err)
            except M2NError as error:
                error.received = [None if n == _NOT_RECEIVED else n for n in batch.nbytes]
                raise
        return list(batch.nbytes)

    def recv(self, sender: int, layer: int = 0, micro_batch: int = 0, timeout_s: float = -1) -> bytes:
        out = np.empty(self.capacity, np.uint8)
        return out[:self.recv_into(out, sender, layer, micro_batch, timeout_s)].tobytes()

    def inject(self, sender: int, seq: int, raw: bytes) -> None:
        """Test hook (shm, loopback and tcp): write raw bytes (header, then payload) into a slot as a faulty sender
        would."""
        buf = np.frombuffer(raw, np.uint8) if raw else np.zeros(1, np.uint8)
        err = _err()
        _check(library().m2n_debug_inject(self.handle, sender, seq, buf.ctypes.data, len(raw), err, _ERR_LEN), err)


def _check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"M2N transport must be one of {', '.join(TRANSPORTS)}, got {transport!r} "
                         "(verbs endpoints are set up through msjax.comm.native.verbs_devices first)")


def header_bytes() -> int:
    return library().m2n_header_bytes()


def message_magic() -> int:
    return library().m2n_message_magic()


def validate_header(raw: bytes, *, sender: int, num_senders: int, seq: int, layer: int, micro_batch: int,
                    capacity: int) -> None:
    """The core's header parser: raises M2NError (code "malformed message") saying what is wrong."""
    buf = np.frombuffer(raw, np.uint8) if raw else np.zeros(1, np.uint8)
    err = _err()
    _check(library().m2n_validate_header(buf.ctypes.data, len(raw), sender, num_senders, seq, layer, micro_batch,
                                         capacity, err, _ERR_LEN), err)


def has_verbs() -> bool:
    """Whether the library was built against libibverbs."""
    return bool(library().m2n_has_verbs())


def verbs_devices() -> list[str]:
    """RDMA device names; M2NError("no RDMA device ...") when there is none."""
    out = _err()
    _check(library().m2n_verbs_devices(out, _ERR_LEN), out)
    return [name for name in out.value.decode().split(",") if name]


# -- RDMA verbs (UNVERIFIED ON HARDWARE) -------------------------------------------------------------------------

CONN_INFO_BYTES = 48


class _Verbs:
    def local_info(self, peer: int) -> bytes:
        """This side's queue-pair description for `peer`, to hand to the peer out of band."""
        out, err = ctypes.create_string_buffer(CONN_INFO_BYTES), _err()
        _check(library().m2n_verbs_local_info(self.handle, peer, out, CONN_INFO_BYTES, err, _ERR_LEN), err)
        return out.raw

    def connect(self, peer: int, info: bytes) -> None:
        err = _err()
        _check(library().m2n_verbs_connect(self.handle, peer, info, len(info), err, _ERR_LEN), err)


def _verbs_open(is_sender: bool, device: str, index: int, num_peers: int, depth: int, capacity: int,
                timeout_s: float) -> int:
    handle, err = ctypes.c_int64(0), _err()
    _check(library().m2n_verbs_open(int(is_sender), device.encode(), index, num_peers, depth, capacity, timeout_s,
                                    ctypes.byref(handle), err, _ERR_LEN), err)
    return handle.value


class VerbsSender(_Verbs, Sender):
    """A verbs sender: connect every receiver (local_info / connect), then `send` as with shm and tcp. Depth and
    capacity must equal the receivers'."""

    def __init__(self, num_receivers: int, index: int, capacity: int, depth: int = 4, device: str = "",
                 timeout_s: float = 10.0):
        self.handle = _verbs_open(True, device, index, num_receivers, depth, capacity, timeout_s)
        self.index, self.num_receivers, self.capacity, self.timeout_s = index, num_receivers, capacity, timeout_s
        self._send, self._err = library().m2n_send, _err()


class VerbsReceiver(_Verbs, Receiver):
    def __init__(self, num_senders: int, index: int, capacity: int, depth: int = 4, device: str = "",
                 timeout_s: float = 10.0):
        self.handle = _verbs_open(False, device, index, num_senders, depth, capacity, timeout_s)
        self.index, self.num_senders, self.capacity, self.timeout_s = index, num_senders, capacity, timeout_s
        self._recv, self._err, self._nbytes = library().m2n_recv, _err(), ctypes.c_uint64(0)


def verbs_imm(sender: int, seq: int) -> int:
    """The 32-bit immediate a verbs write carries: 8 bits of sender, 24 low bits of the sequence number."""
    return library().m2n_verbs_encode_imm(sender, seq)


def verbs_conninfo_roundtrip(blob: bytes) -> bytes:
    """Parses connection info and serialises it again (M2NError "invalid argument" when malformed)."""
    out = ctypes.create_string_buffer(_ERR_LEN)
    _check(library().m2n_verbs_conninfo_roundtrip(blob, len(blob), out, _ERR_LEN), out)
    return out.raw[:CONN_INFO_BYTES]
