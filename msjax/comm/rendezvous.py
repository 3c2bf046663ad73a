"""A small TCP key-value store through which node processes swap the addresses of their M2N receivers.

Why our own: the runner used to borrow JAX's coordination service (`jax._src.lib._jax`, a private API that can
change in any JAX release) only as a key-value store. That needs a JAX "cluster" (client ids fixed in advance,
heartbeats, a shutdown barrier) that we do not otherwise use, and it ties every peer to JAX's process model.
This module is standard library plus msgpack, imports no JAX, and works from anything that can open a TCP
connection: the node processes the runner spawns today, Ray actors on other hosts later.

Shape:
  - `RendezvousServer` lives in the deploying process: a listening socket, one accept thread, one daemon thread
    per connection; the store is a dict guarded by one condition variable that setters notify and getters wait on.
  - `RendezvousClient` holds one connection. `set` publishes a key once (setting it again to the same value is a
    harmless retry; to another value, an error). `get` / `get_many` wait for keys on the server in rounds of at
    most `_MAX_WAIT_S` (`_ALIVE_ROUND_S` when an `alive` check is given), so the caller can stop waiting between
    rounds when a peer has died, and no server thread waits long for a client that has gone.

Wire format: each frame is a 4-byte big-endian length, then that many bytes of msgpack holding a map with
`"v": PROTOCOL_VERSION`. Requests carry `"op"`; replies carry `"ok"` and, when not ok, `"error"` (readable) and
`"kind"` (`"auth"`, `"conflict"`, `"protocol"`, `"closed"`). The first request on a connection must be `hello`
with the shared token. A malformed or oversized frame gets an error reply and the connection is closed: after a
bad length prefix the stream cannot be resynchronised.

  hello  {"token": str | None}                        -> {}
  set    {"key": str, "value": str | bytes}           -> {}
  get    {"keys": [str, ...], "wait_s": float}        -> {"values": [...]} once all exist, else {"missing": [...]}
"""

from __future__ import annotations

import hmac
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

import msgpack

__all__ = ["LocalRendezvous", "MAX_FRAME_BYTES", "PROTOCOL_VERSION", "RendezvousClient", "RendezvousError", "RendezvousServer",
           "RendezvousTimeout"]

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # values are addresses (tens of bytes to a few KiB): a bigger frame is a bug or an attack
_HEADER = struct.Struct(">I")
_MAX_WAIT_S = 1.0  # longest a server thread waits in one `get` round: bounds how long it outlives its client
_ALIVE_ROUND_S = 0.1  # round length when the caller checks a liveness callback between rounds
_HELLO_TIMEOUT_S = 10.0  # a peer that connects must say hello within this, or its thread is freed

_log = logging.getLogger(__name__)

Value = str | bytes


class RendezvousError(RuntimeError):
    """The rendezvous failed: the server is unreachable or gone, refused the client, or rejected a request."""


class RendezvousTimeout(RendezvousError, TimeoutError):
    """Keys were not published in time. `missing` names them, `address` is the server's."""

    def __init__(self, missing: Sequence[str], address: str, timeout_s: float):
        self.missing = tuple(missing)
        self.address = address
        super().__init__(f"rendezvous at {address}: {len(self.missing)} key(s) not published within "
                         f"{timeout_s:g} s: {', '.join(self.missing)}")


class _ProtocolError(Exception):
    """A peer broke the wire format; the connection cannot go on."""


# -- framing ----------------------------------------------------------------------------------------------------


def _encode(message: dict) -> bytes:
    body = msgpack.packb({"v": PROTOCOL_VERSION, **message}, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise RendezvousError(f"rendezvous message of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _HEADER.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed by the peer")
        got += k
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> dict:
    """The next frame's map. Raises `_ProtocolError` for a frame that breaks the format (checked before the
    body is read, so a bogus length allocates nothing) and `ConnectionError` / `OSError` when the peer is gone."""
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if n > MAX_FRAME_BYTES:
        raise _ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    body = _recv_exact(sock, n)
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as err:  # msgpack's format, extra-data and depth errors are ValueErrors
        raise _ProtocolError(f"frame is not valid msgpack: {err}") from None
    if not isinstance(message, dict):
        raise _ProtocolError(f"frame holds a {type(message).__name__}, not a map")
    if message.get("v") != PROTOCOL_VERSION:
        raise _ProtocolError(f"protocol version {message.get('v')!r}; this end speaks {PROTOCOL_VERSION}")
    return message


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rendezvous address {address!r} is not host:port")
    return host.strip("[]"), int(port)


# -- server -----------------------------------------------------------------------------------------------------


def _error(kind: str, message: str) -> dict:
    return {"ok": False, "kind": kind, "error": message}


class RendezvousServer:
    """A threaded TCP key-value store, serving from construction until `close()`.

    `host` is the address to bind: "127.0.0.1" for processes on this host, this host's name or "0.0.0.0" for
    peers on other hosts (with a wildcard bind, `address` reads "0.0.0.0:port" and the caller must advertise a
    name the peers can reach). `port=0` picks a free port. With a `token`, only clients that present it are served.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self._token = token
        self._store: dict[str, Value] = {}
        self._cond = threading.Condition()  # guards _store and _closed; setters notify, getters wait
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._listener = socket.create_server((host, port), family=_family(host), backlog=128)
        self._wake_r, self._wake_w = socket.socketpair()  # close() writes here to end the accept loop
        bound = self._listener.getsockname()
        self.address = _format_address(bound[0], bound[1])
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"rendezvous-accept {self.address}",
                                          daemon=True)
        self._acceptor.start()

    def __enter__(self) -> RendezvousServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RendezvousServer({self.address}, {'closed' if self._closed else 'serving'})"

    def has(self, *keys: str) -> bool:
        """Whether every key is published (from the serving process, without waiting)."""
        with self._cond:
            return all(k in self._store for k in keys)

    def close(self) -> None:
        """Stops serving: waiting clients get a "closed" error (or see their connection close). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._wake_w.send(b"x")
        self._acceptor.join(timeout=1.0)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:  # unblocks handlers reading the next request; each closes its own socket
            _shutdown(conn)

    # -- threads --

    def _accept_loop(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._listener, self._wake_r], [], [])
                if self._wake_r in ready or self._closed:
                    return
                conn, _peer = self._listener.accept()
            except OSError as err:
                if self._closed:  # close() got there first
                    return
                _log.debug("rendezvous %s: accept failed: %s", self.address, err)  # e.g. a reset before accept
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._conns_lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve_connection, args=(conn,), name=f"rendezvous {self.address}",
                             daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(_HELLO_TIMEOUT_S)
            if not self._handshake(conn):
                return
            conn.settimeout(None)  # clients may sit idle between calls for as long as they like
            while True:
                reply = self._handle(_recv_frame(conn))
                conn.sendall(_encode(reply))
                if reply.get("kind") == "closed":
                    return
        except _ProtocolError as err:
            _log.warning("rendezvous %s: dropping a client: %s", self.address, err)
            _reply_quietly(conn, _error("protocol", f"rendezvous server at {self.address}: {err}"))
        except OSError:  # the client went away (ConnectionError, timeouts) or close() shut the socket
            pass
        except Exception:  # noqa: BLE001 - a bug here must cost one connection, never the server
            _log.exception("rendezvous %s: unexpected error serving a client", self.address)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        """Reads the hello; True when the client may go on. A refusal is replied before the connection closes."""
        hello = _recv_frame(conn)
        if hello.get("op") != "hello":
            raise _ProtocolError(f"the first request must be hello, not {hello.get('op')!r}")
        token = hello.get("token")
        if self._token is not None and not (isinstance(token, str) and hmac.compare_digest(token, self._token)):
            _log.warning("rendezvous %s: refused a client with a wrong or missing token", self.address)
            _reply_quietly(conn, _error("auth", f"rendezvous server at {self.address} refused the client: "
                                                "wrong or missing token"))
            return False
        conn.sendall(_encode({"ok": True}))
        return True

    # -- requests --

    def _handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "set":
            return self._set(request.get("key"), request.get("value"))
        if op == "get":
            return self._get(request.get("keys"), request.get("wait_s"))
        raise _ProtocolError(f"unknown op {op!r}")

    def _set(self, key, value) -> dict:
        if not isinstance(key, str) or not key:
            raise _ProtocolError(f"set: key must be a non-empty string, not {key!r}")
        if not isinstance(value, (str, bytes)):
            raise _ProtocolError(f"set {key!r}: value must be str or bytes, not {type(value).__name__}")
        with self._cond:
            if self._closed:
                return self._closed_error()
            old = self._store.get(key)
            if old is not None and old != value:
                return _error("conflict", f"rendezvous key {key!r} already set to {_preview(old)}; "
                                          f"refusing {_preview(value)}")
            self._store[key] = value
            self._cond.notify_all()
        return {"ok": True}

    def _get(self, keys, wait_s) -> dict:
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise _ProtocolError(f"get: keys must be a list of non-empty strings, not {keys!r}")
        if not isinstance(wait_s, (int, float)) or wait_s != wait_s:  # NaN fails the comparison with itself
            raise _ProtocolError(f"get: wait_s must be a number, not {wait_s!r}")
        deadline = time.monotonic() + min(max(float(wait_s), 0.0), _MAX_WAIT_S)
        with self._cond:
            while True:
                if self._closed:
                    return self._closed_error()
                missing = [k for k in keys if k not in self._store]
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    break
                self._cond.wait(left)
            if missing:
                return {"ok": True, "missing": missing}
            return {"ok": True, "values": [self._store[k] for k in keys]}

    def _closed_error(self) -> dict:
        return _error("closed", f"rendezvous server at {self.address} closed")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by its handler, or never fully connected
        pass


def _reply_quietly(conn: socket.socket, reply: dict) -> None:
    """Sends a last reply before the connection closes; the peer may already be gone, which is fine."""
    try:
        conn.sendall(_encode(reply))
    except OSError:
        pass


def _preview(value: Value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(value)} long)"


# -- client -----------------------------------------------------------------------------------------------------


class RendezvousClient:
    """One connection to a `RendezvousServer`, opened (and the token presented) on construction.

    `timeout_s` bounds connecting, each reply, and is the default wait of `get` / `get_many`. Thread-safe: calls
    from several threads take turns on the connection. Once the connection breaks, every call raises.
    """

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 60.0):
        self.address = address
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        try:
            self._sock = socket.create_connection(_parse_address(address), timeout=timeout_s)
        except OSError as err:
            raise RendezvousError(f"cannot reach the rendezvous server at {address}: {err}") from err
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._request({"op": "hello", "token": token})
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RendezvousClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RendezvousClient({self.address}, {'closed' if self._sock is None else 'connected'})"

    def close(self) -> None:
        """Closes the connection. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def set(self, key: str, value: Value) -> None:
        """Publishes `key`. Setting it again to the same value is fine (a retry); to another, RendezvousError."""
        if not isinstance(key, str) or not key:
            raise TypeError(f"rendezvous key must be a non-empty string, not {key!r}")
        if not isinstance(value, (str, bytes)):
            raise TypeError(f"rendezvous value for {key!r} must be str or bytes, not {type(value).__name__}")
        self._request({"op": "set", "key": key, "value": value})

    def get(self, key: str, timeout_s: float | None = None, alive: Callable[[], object] | None = None) -> Value:
        """The value of `key` (str or bytes, as it was set), waiting until it is published. See `get_many`."""
        return self.get_many([key], timeout_s, alive)[0]

    def get_many(self, keys: Sequence[str], timeout_s: float | None = None,
                 alive: Callable[[], object] | None = None) -> list[Value]:
        """The values of `keys`, in order, once all are published.

        Waits up to `timeout_s` (default: the client's), then raises RendezvousTimeout naming the missing keys.
        `alive`, when given, is called before every wait round of at most `_ALIVE_ROUND_S`: whatever it raises
        ends the wait and propagates (how the runner fails fast when a node process has exited).
        """
        keys = list(keys)
        if not keys:
            return []
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        round_s = _ALIVE_ROUND_S if alive is not None else _MAX_WAIT_S
        deadline = time.monotonic() + timeout_s
        while True:
            if alive is not None:
                alive()
            left = deadline - time.monotonic()
            reply = self._request({"op": "get", "keys": keys, "wait_s": max(0.0, min(round_s, left))})
            if "values" in reply:
                return reply["values"]
            if time.monotonic() >= deadline:
                raise RendezvousTimeout(reply["missing"], self.address, timeout_s)

    # -- wire --

    def _request(self, message: dict) -> dict:
        """Sends `message` and returns the server's ok reply; any failure raises RendezvousError and, when the
        connection can no longer be trusted, closes it."""
        frame = _encode(message)  # raises before sending when too large: the connection stays usable
        with self._lock:
            sock = self._sock
            if sock is None:
                raise RendezvousError(f"rendezvous client for {self.address} is closed")
            # a reply may take the server's wait round plus the usual network time
            sock.settimeout(self.timeout_s + float(message.get("wait_s", 0.0)))
            try:
                sock.sendall(frame)
                reply = _recv_frame(sock)
            except (OSError, _ProtocolError) as err:
                self.close()
                raise RendezvousError(_describe_failure(self.address, err)) from err
        if not reply.get("ok"):
            if reply.get("kind") in ("auth", "closed", "protocol"):  # the server closes the connection after these
                self.close()
            raise RendezvousError(str(reply.get("error") or f"rendezvous server at {self.address} refused "
                                                            f"{message.get('op')!r}"))
        return reply


def _describe_failure(address: str, err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return f"no reply from the rendezvous server at {address} in time (it hangs or the network is down)"
    if isinstance(err, ConnectionError):
        return f"the rendezvous server at {address} closed the connection (it was closed or has exited): {err}"
    if isinstance(err, _ProtocolError):
        return f"the rendezvous server at {address} sent a malformed reply: {err}"
    return f"rendezvous with the server at {address} failed: {err}"


class LocalRendezvous:
    """The rendezvous of a deployment whose every party is in this process: a dict, with the interface of
    `msjax.comm.rendezvous.RendezvousClient`. A key read before it is set is an error, not a wait: in one
    process every receiver is published (phase 1) before any sender is opened (phase 2)."""

    def __init__(self):
        self._values: dict[str, str] = {}

    def set(self, key: str, value: str) -> None:
        if self._values.get(key, value) != value:
            raise RendezvousError(f"rendezvous key {key!r} already set to another value")
        self._values[key] = value

    def get(self, key: str, timeout_s: float | None = None, alive=None) -> str:
        if key not in self._values:
            raise RendezvousError(f"rendezvous key {key!r} was never published (phase 1 of its party did not run)")
        return self._values[key]

    def get_many(self, keys: list[str], timeout_s: float | None = None, alive=None) -> list[str]:
        return [self.get(k) for k in keys]

    def close(self) -> None:
        pass
