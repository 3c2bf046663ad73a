"""The rendezvous key-value store (msjax.comm.rendezvous): exchange, waiting, failure modes, hostile input."""

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from msjax.comm import rendezvous
from msjax.comm.rendezvous import (MAX_FRAME_BYTES, PROTOCOL_VERSION, RendezvousClient, RendezvousError,
                                   RendezvousServer, RendezvousTimeout)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    with RendezvousServer(token="secret") as srv:
        yield srv


def client(srv, **kw) -> RendezvousClient:
    return RendezvousClient(srv.address, token=kw.pop("token", "secret"), timeout_s=kw.pop("timeout_s", 5.0), **kw)


def raw(srv) -> socket.socket:
    host, port = srv.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=2.0)
    return sock


def frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def read_reply(sock: socket.socket) -> dict:
    (n,) = struct.unpack(">I", rendezvous._recv_exact(sock, 4))
    return msgpack.unpackb(rendezvous._recv_exact(sock, n), raw=False)


def still_serves(srv) -> None:
    with client(srv) as c:
        c.set("probe", "ok")
        assert c.get("probe", 1.0) == "ok"


# -- exchange ---------------------------------------------------------------------------------------------------


def test_set_get_across_clients_keeps_str_and_bytes(server):
    with client(server) as a, client(server) as b:
        a.set("addr/0", "10.0.0.1:5000")
        a.set("blob", b"\x00\xffbinary")
        assert b.get("addr/0", 1.0) == "10.0.0.1:5000"
        assert b.get("blob", 1.0) == b"\x00\xffbinary"
        assert b.get_many(["blob", "addr/0"], 1.0) == [b"\x00\xffbinary", "10.0.0.1:5000"]
        assert b.get_many([], 1.0) == []


def test_get_blocks_until_another_client_sets(server):
    with client(server) as reader, client(server) as writer:
        timer = threading.Timer(0.2, writer.set, args=("late", "here"))
        start = time.monotonic()
        timer.start()
        try:
            assert reader.get("late", 3.0) == "here"
        finally:
            timer.join()
        assert 0.15 < time.monotonic() - start < 1.5  # woken by the set, not by a later poll


def test_get_many_waits_for_all_keys(server):
    with client(server) as reader, client(server) as writer:
        writer.set("k/0", "a")

        def later():
            time.sleep(0.1)
            writer.set("k/2", "c")
            writer.set("k/1", "b")

        thread = threading.Thread(target=later)
        thread.start()
        assert reader.get_many(["k/0", "k/1", "k/2"], 3.0) == ["a", "b", "c"]
        thread.join()


def test_many_concurrent_clients(server):
    n = 16
    results, errors = [None] * n, []

    def node(i):
        try:
            with client(server) as c:
                c.set(f"node/{i}", f"127.0.0.1:{6000 + i}")
                results[i] = c.get_many([f"node/{j}" for j in range(n)], 5.0)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    assert not errors
    expected = [f"127.0.0.1:{6000 + j}" for j in range(n)]
    assert all(r == expected for r in results)


# -- waiting and failing fast -------------------------------------------------------------------------------------


def test_timeout_names_missing_keys_and_server(server):
    with client(server) as c:
        c.set("here", "1")
        start = time.monotonic()
        with pytest.raises(RendezvousTimeout) as info:
            c.get_many(["here", "absent/7"], timeout_s=0.3)
        assert 0.25 < time.monotonic() - start < 1.0
        assert info.value.missing == ("absent/7",)
        assert "absent/7" in str(info.value) and server.address in str(info.value)
        assert isinstance(info.value, TimeoutError)
        assert c.get("here", 0.0) == "1"  # the connection is still good after a timeout


def test_alive_raising_stops_the_wait_with_that_exception(server):
    class NodeDied(Exception):
        pass

    start = time.monotonic()
    calls = []

    def alive():
        calls.append(time.monotonic())
        if time.monotonic() - start > 0.3:
            raise NodeDied("expert node 3 exited with code 1")

    with client(server) as c:
        with pytest.raises(NodeDied, match="expert node 3"):
            c.get("never", timeout_s=30.0, alive=alive)
        assert time.monotonic() - start < 1.0
        assert max(b - a for a, b in zip(calls, calls[1:])) < 0.25  # checked every round, not once
        c.set("after", "x")  # the wait was between requests: the connection is still usable
        assert c.get("after", 1.0) == "x"


def test_server_close_unblocks_a_waiting_client():
    srv = RendezvousServer()
    c = RendezvousClient(srv.address, timeout_s=5.0)
    box = {}

    def wait():
        try:
            c.get("never", timeout_s=30.0)
        except RendezvousError as err:
            box["error"], box["at"] = err, time.monotonic()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)
    closed_at = time.monotonic()
    srv.close()
    srv.close()  # idempotent
    thread.join(2.0)
    assert not thread.is_alive()
    assert box["at"] - closed_at < 1.0
    assert srv.address in str(box["error"]) and "closed" in str(box["error"])
    with pytest.raises(RendezvousError, match="closed"):
        c.get("never", 0.1)
    c.close()
    c.close()  # idempotent


def test_unreachable_server_is_a_clear_error():
    srv = RendezvousServer()
    address = srv.address
    srv.close()
    with pytest.raises(RendezvousError, match=f"cannot reach the rendezvous server at {address}"):
        RendezvousClient(address, timeout_s=1.0)


def test_server_that_never_replies_does_not_hang_the_client():
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts (backlog) but never answers
        address = "127.0.0.1:%d" % mute.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(RendezvousError, match="no reply"):
            RendezvousClient(address, timeout_s=0.3)
        assert time.monotonic() - start < 1.5


# -- rules --------------------------------------------------------------------------------------------------------


def test_conflicting_set_is_an_error_identical_set_is_fine(server):
    with client(server) as a, client(server) as b:
        a.set("addr", "host-a:1")
        b.set("addr", "host-a:1")  # a retry of the same value
        with pytest.raises(RendezvousError, match="'addr' already set"):
            b.set("addr", "host-b:2")
        assert a.get("addr", 1.0) == "host-a:1"
        b.set("other", "fine")  # the refusal left the connection usable


def test_bad_arguments_are_refused_before_sending(server):
    with client(server) as c:
        with pytest.raises(TypeError, match="non-empty string"):
            c.set("", "x")
        with pytest.raises(TypeError, match="str or bytes"):
            c.set("k", 5)
        with pytest.raises(RendezvousError, match="exceeds the"):
            c.set("big", b"x" * (MAX_FRAME_BYTES + 1))
        c.set("k", "still connected")


# -- hostile peers ------------------------------------------------------------------------------------------------


def test_token_mismatch_is_refused_and_others_are_unaffected(server):
    with client(server) as good:
        good.set("a", "1")
        with pytest.raises(RendezvousError, match="wrong or missing token"):
            client(server, token="guess")
        with pytest.raises(RendezvousError, match="wrong or missing token"):
            RendezvousClient(server.address, timeout_s=2.0)
        assert good.get("a", 1.0) == "1"
    still_serves(server)


def test_requests_before_hello_are_refused(server):
    with raw(server) as sock:
        sock.sendall(frame({"v": PROTOCOL_VERSION, "op": "set", "key": "x", "value": "y"}))
        reply = read_reply(sock)
        assert not reply["ok"] and "hello" in reply["error"]
    with client(server) as c:
        with pytest.raises(RendezvousTimeout):
            c.get("x", 0.0)  # the unauthenticated set did not land


def test_oversized_frame_is_refused_without_reading_it(server):
    with raw(server) as sock:
        sock.sendall(struct.pack(">I", 64 * MAX_FRAME_BYTES))  # a 64 MiB promise, no body
        reply = read_reply(sock)
        assert not reply["ok"] and reply["kind"] == "protocol"
        assert f"{64 * MAX_FRAME_BYTES} bytes exceeds" in reply["error"]
        assert sock.recv(1) == b""  # then the connection is closed
    still_serves(server)


def test_garbage_does_not_kill_the_server(server):
    samples = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00\x00\x03\xc1\xc1\xc1", b"\x00\x00\x00\x01\x05",
               frame({"v": 99, "op": "hello"}), frame([1, 2, 3]), frame({"v": PROTOCOL_VERSION, "op": "hello",
                                                                            "token": 12})]
    samples += [os.urandom(n) for n in (1, 7, 64, 300)]
    for data in samples:
        with raw(server) as sock, contextlib.suppress(OSError):  # the server may close first: that is fine
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
    with client(server) as c:  # an authenticated client sending nonsense ops loses only its own connection
        with pytest.raises(RendezvousError, match="unknown op"):
            c._request({"op": "delete", "key": "a"})
    still_serves(server)


def test_protocol_version_is_checked(server):
    with raw(server) as sock:
        sock.sendall(frame({"v": PROTOCOL_VERSION + 1, "op": "hello", "token": "secret"}))
        reply = read_reply(sock)
        assert not reply["ok"] and f"this end speaks {PROTOCOL_VERSION}" in reply["error"]


# -- across processes ---------------------------------------------------------------------------------------------

_CHILD = """
import sys
from msjax.comm.rendezvous import RendezvousClient
with RendezvousClient(sys.argv[1], token=sys.argv[2], timeout_s=20) as c:
    c.set("child/address", "child-host:7001")
    print(c.get("parent/address", 20), flush=True)
"""


def test_exchange_with_another_process(server):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                                     if os.environ.get("PYTHONPATH") else "")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, server.address, "secret"], env=env, cwd="/",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with client(server) as c:
            c.set("parent/address", "parent-host:7000")
            assert c.get("child/address", 20.0, alive=lambda: _check_alive(child)) == "child-host:7001"
        out, err = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert out.strip() == "parent-host:7000"


def _check_alive(child: subprocess.Popen) -> None:
    """What the runner passes as `alive`: a child that failed ends the wait at once, with its stderr."""
    if child.poll() not in (None, 0):
        raise RuntimeError(f"child exited with {child.returncode}: {child.stderr.read()}")


def test_module_imports_without_jax():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('rdv', {str(ROOT / 'msjax/comm/rendezvous.py')!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)
