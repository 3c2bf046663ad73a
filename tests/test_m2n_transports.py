"""Conformance suite of the native M2N transports: every runnable transport passes the same tests.

Messages arrive intact and in sequence, completion flags order sender and receiver, M senders reach N receivers
(processes, and threads of one process), a dead peer or a missing message becomes a clear error within seconds,
and malformed headers are rejected. Worker processes load only the ctypes layer (msjax/comm/_lib.py, by path) so
they start fast. Loopback endpoints live in one process: the tests with a peer in another process skip for it,
and its in-process counterparts (a receiver closed under its sender, a sender that closed) stand beside them.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from msjax.comm import native

TRANSPORTS = ["shm", "tcp", "loopback"]
BY_NAME = ("shm", "loopback")  # transports whose address is the channel name
CROSS_PROCESS = ("loopback endpoints live in one process: a peer in another process cannot reach them (the "
                 "in-process counterpart is {})")
HELLO_MAGIC = 0x484E324D
LIB_PY = Path(native.__file__).with_name("_lib.py")

# A worker: loads the ctypes layer by path, then runs `body` with `m` bound to it.
WORKER = textwrap.dedent("""
    import importlib.util, os, sys, time, numpy as np
    spec = importlib.util.spec_from_file_location("m2n_lib", os.environ["M2N_LIB_PY"])
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
""")


def payload(sender: int, receiver: int, k: int, nbytes: int) -> bytes:
    return np.random.default_rng([sender, receiver, k]).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


class Net:
    """Receivers of one channel, and the addresses senders use to reach them."""

    def __init__(self, transport: str):
        self.transport = transport
        self.name = f"t{uuid.uuid4().hex[:10]}"
        self.receivers: list[native.Receiver] = []

    def receiver(self, index: int = 0, num_senders: int = 1, capacity: int = 1 << 16, depth: int = 4,
                 timeout_s: float = 5.0) -> native.Receiver:
        address = self.name if self.transport in BY_NAME else "127.0.0.1:0"
        rx = native.Receiver(self.transport, address, index, num_senders, capacity, depth, timeout_s)
        self.receivers.append(rx)
        return rx

    def addresses(self) -> list[str]:
        return [rx.address for rx in self.receivers]  # shm, loopback: the channel name; tcp: host:port as bound

    def sender(self, index: int = 0, capacity: int = 1 << 16, timeout_s: float = 5.0) -> native.Sender:
        return native.Sender(self.transport, self.addresses(), index, capacity, timeout_s)

    def close(self):
        for rx in self.receivers:
            rx.close()


@pytest.fixture(params=TRANSPORTS)
def net(request):
    n = Net(request.param)
    yield n
    n.close()
    if n.transport in BY_NAME:  # shm: the receivers unlinked their segments; loopback never made one
        assert not list(Path("/dev/shm").glob(f"msjax-m2n-{n.name}-*"))


def spawn(body: str, **env) -> subprocess.Popen:
    script = WORKER + textwrap.dedent(body)
    env = {**os.environ, "M2N_LIB_PY": str(LIB_PY), **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def reap(*procs: subprocess.Popen, timeout: float = 20) -> list[tuple[int, str, str]]:
    """Waits for the workers (killing any still running after `timeout`); their (returncode, stdout, stderr)."""
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append((p.returncode, out, err))
    return results


def test_messages_arrive_intact(net):
    rx = net.receiver(capacity=8192, depth=8)
    tx = net.sender(capacity=8192)
    sizes = [0, 1, 63, 64, 4097, 8192]
    for k, n in enumerate(sizes):
        tx.send(0, payload(0, 0, k, n), layer=k, micro_batch=k % 2)
    for k, n in enumerate(sizes):
        assert rx.recv(0, layer=k, micro_batch=k % 2) == payload(0, 0, k, n)
    tx.close()


def test_sequence_wraps_the_ring_with_back_pressure(net):
    """50 messages through 2 slots: the sender must wait on the completion flags for the receiver to free them."""
    rx = net.receiver(depth=2)
    tx = net.sender()
    errors = []

    def send_all():
        try:
            for k in range(50):
                tx.send(0, payload(0, 0, k, 100 + k), layer=k)
        except Exception as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=send_all)
    thread.start()
    got = [rx.recv(0, layer=k) for k in range(50)]
    thread.join(10)
    assert not errors
    assert got == [payload(0, 0, k, 100 + k) for k in range(50)]


def test_receive_waits_for_the_completion_flag(net):
    rx = net.receiver()
    tx = net.sender()
    timer = threading.Timer(0.3, lambda: tx.send(0, b"late", layer=7))
    start = time.monotonic()
    timer.start()
    try:
        assert rx.recv(0, layer=7) == b"late"
    finally:
        timer.join()
    assert time.monotonic() - start >= 0.25


def test_many_senders_to_many_receivers_across_processes(net):
    if net.transport == "loopback":
        pytest.skip(CROSS_PROCESS.format("test_many_senders_to_many_receivers_from_threads"))
    num_senders, num_receivers, rounds = 3, 2, 5
    receivers = [net.receiver(r, num_senders, capacity=4096, depth=2) for r in range(num_receivers)]
    procs = [spawn("""
        s, rounds = int(os.environ["S"]), int(os.environ["ROUNDS"])
        tx = m.Sender(os.environ["T"], os.environ["ADDR"].split(","), s, 4096, timeout_s=10)
        for k in range(rounds):
            for r in range(tx.num_receivers):
                data = np.random.default_rng([s, r, k]).integers(0, 256, 1000 + 7 * s + k, dtype=np.uint8)
                tx.send(r, data.tobytes(), layer=k, micro_batch=s)
        print("sent")
        """, S=s, ROUNDS=rounds, T=net.transport, ADDR=",".join(net.addresses())) for s in range(num_senders)]
    try:
        for k in range(rounds):
            for r, rx in enumerate(receivers):
                for s in reversed(range(num_senders)):  # any order: each sender has its own slots
                    assert rx.recv(s, layer=k, micro_batch=s, timeout_s=20) == payload(s, r, k, 1000 + 7 * s + k)
    finally:
        results = reap(*procs)
    assert all(rc == 0 and out.strip() == "sent" for rc, out, _ in results), results


def test_many_senders_to_many_receivers_from_threads(net):
    """M senders to N receivers in one process, every endpoint driven by its own thread at the same time (the
    in-process placement: nodes of one process, each node's calls on its own XLA thread), rings of two slots so
    the senders wait on back-pressure while the others go on."""
    num_senders, num_receivers, rounds = 3, 2, 8
    receivers = [net.receiver(r, num_senders, capacity=4096, depth=2, timeout_s=20) for r in range(num_receivers)]
    senders = [net.sender(s, capacity=4096, timeout_s=20) for s in range(num_senders)]
    errors, got = [], {}

    def send(s):
        try:
            for k in range(rounds):
                for r in range(num_receivers):
                    senders[s].send(r, payload(s, r, k, 1000 + 7 * s + k), layer=k, micro_batch=s)
        except Exception as e:  # surfaced below
            errors.append(e)

    def receive(r):
        try:
            for k in range(rounds):
                for s in reversed(range(num_senders)):  # any order: each sender has its own slots
                    got[r, s, k] = receivers[r].recv(s, layer=k, micro_batch=s)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = ([threading.Thread(target=send, args=(s,)) for s in range(num_senders)]
               + [threading.Thread(target=receive, args=(r,)) for r in range(num_receivers)])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert got == {(r, s, k): payload(s, r, k, 1000 + 7 * s + k)
                   for r in range(num_receivers) for s in range(num_senders) for k in range(rounds)}
    for tx in senders:
        tx.close()


def test_a_message_that_never_arrives_times_out(net):
    rx = net.receiver()
    tx = net.sender()
    start = time.monotonic()
    with pytest.raises(native.M2NTimeout, match="timed out waiting for sender 0 .layer 3"):
        rx.recv(0, layer=3, timeout_s=0.3)
    assert 0.25 <= time.monotonic() - start < 3
    tx.close()


@pytest.mark.parametrize("transport", BY_NAME)
def test_a_threads_poll_budget_decides_whether_its_wait_burns_the_core(transport):
    """`thread_poll_us`: the calling thread's shm (and loopback) waits poll that long before sleeping on the futex
    (the engine waiting a whole step for an attention process on the same core must not take the core from it);
    outside the block the process-wide budget is back. CPU time of a 0.5 s wait in vain: polling 1 s burns most of
    it (half with another process polling on each core), polling 0 almost none."""
    n = Net(transport)
    try:
        rx = n.receiver()
        tx = n.sender()

        def cpu_of_wait(us):
            with native.thread_poll_us(us):
                start = time.thread_time()
                with pytest.raises(native.M2NTimeout):
                    rx.recv(0, timeout_s=0.5)
                return time.thread_time() - start
        assert cpu_of_wait(1_000_000) > 0.15
        assert cpu_of_wait(0) < 0.05
        assert native.library().m2n_set_thread_poll_us(-1) == -1  # restored on leaving the block
        tx.close()
    finally:
        n.close()


def test_a_sender_that_dies_is_detected_within_seconds(net):
    if net.transport == "loopback":
        pytest.skip(CROSS_PROCESS.format("test_loopback_receive_after_its_sender_closed_times_out"))
    rx = net.receiver(timeout_s=60)
    proc = spawn("""
        tx = m.Sender(os.environ["T"], [os.environ["ADDR"]], 0, 1 << 16)
        tx.send(0, b"hello", layer=0)
        print("sent", flush=True)
        time.sleep(60)
        """, T=net.transport, ADDR=net.addresses()[0])
    try:
        assert rx.recv(0, layer=0, timeout_s=20) == b"hello"
        proc.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(native.M2NError, match="exited|closed") as info:
            rx.recv(0, layer=1, timeout_s=30)  # the death must be noticed long before the timeout
        assert time.monotonic() - start < 5
        assert info.value.code == "unavailable"
    finally:
        reap(proc, timeout=1)


def test_a_receiver_that_dies_is_detected_within_seconds(net):
    if net.transport == "loopback":
        pytest.skip(CROSS_PROCESS.format("test_loopback_receiver_closed_under_its_sender_is_a_clear_error"))
    address = net.name if net.transport == "shm" else "127.0.0.1:0"
    proc = spawn("""
        rx = m.Receiver(os.environ["T"], os.environ["ADDR"], 0, 1, 1 << 16, depth=2)
        print(rx.address, flush=True)
        time.sleep(60)
        """, T=net.transport, ADDR=address)
    try:
        reported = proc.stdout.readline().strip()
        addr = net.name if net.transport == "shm" else reported
        tx = native.Sender(net.transport, [addr], 0, 1 << 16, timeout_s=60)
        tx.send(0, b"x" * 1000)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        start = time.monotonic()
        with pytest.raises(native.M2NError, match="exited|failed|Broken pipe|reset") as info:
            for _ in range(100):  # shm: the ring fills (depth 2); tcp: the reset shows on a later write
                tx.send(0, b"x" * 60000)
                time.sleep(0.01)
        assert time.monotonic() - start < 5
        assert info.value.code == "unavailable"
        tx.close()
    finally:
        reap(proc, timeout=1)
        if net.transport == "shm":  # a killed receiver cannot unlink its segment
            for path in Path("/dev/shm").glob(f"msjax-m2n-{net.name}-*"):
                path.unlink()


def test_loopback_receiver_closed_under_its_sender_is_a_clear_error():
    """In-process counterpart of a receiver that dies: a sender blocked on the receiver's full ring when the
    receiver closes fails within a second (not at its timeout), and every later send fails at once; both with
    "unavailable" naming the receiver. A new receiver may then take the same name."""
    n = Net("loopback")
    try:
        rx = n.receiver(depth=2, timeout_s=30)
        tx = n.sender(timeout_s=30)
        tx.send(0, b"a")
        tx.send(0, b"b")  # the ring is full: the next send waits for a slot
        closed = []
        closer = threading.Timer(0.3, lambda: (rx.close(), closed.append(time.monotonic())))
        closer.start()
        try:
            with pytest.raises(native.M2NError, match="loopback receiver 0 of channel .* was closed") as info:
                tx.send(0, b"c")
            assert info.value.code == "unavailable"
            assert time.monotonic() - closed[0] < 1
        finally:
            closer.join()
        start = time.monotonic()
        with pytest.raises(native.M2NError, match="was closed") as info:
            tx.send(0, b"d")
        assert info.value.code == "unavailable" and time.monotonic() - start < 0.1
        again = native.Receiver("loopback", n.name, 0, 1, 1 << 16)  # the name is free again
        n.receivers.append(again)
        with native.Sender("loopback", [n.name], 0, 1 << 16) as fresh:
            fresh.send(0, b"new")
            assert again.recv(0) == b"new"
    finally:
        n.close()


def test_loopback_receive_after_its_sender_closed_times_out():
    """In-process counterpart of a sender that dies: there is no process that could be dead, and a closed sender
    looks like one that has not sent yet, so the receive times out (docs/m2n.md); what it sent before arrives."""
    n = Net("loopback")
    try:
        rx = n.receiver(timeout_s=30)
        tx = n.sender()
        tx.send(0, b"before", layer=0)
        tx.close()
        assert rx.recv(0, layer=0) == b"before"
        start = time.monotonic()
        with pytest.raises(native.M2NTimeout, match="timed out waiting for sender 0"):
            rx.recv(0, layer=1, timeout_s=0.3)
        assert time.monotonic() - start < 3
    finally:
        n.close()


def test_loopback_receiver_name_is_taken_once():
    n = Net("loopback")
    try:
        n.receiver(index=0)
        with pytest.raises(native.M2NError, match="loopback receiver 0 of channel .* is already open") as info:
            n.receiver(index=0)
        assert info.value.code == "invalid argument"
        n.receiver(index=1)  # another index of the same channel is another receiver
        assert n.addresses() == [n.name, n.name]
    finally:
        n.close()


def test_loopback_uses_no_file_descriptor_and_no_segment():
    """Private memory only: opening, using and closing loopback endpoints leaves the process's descriptors and
    /dev/shm as they were."""
    n = Net("loopback")
    fds = set(os.listdir("/proc/self/fd"))
    try:
        rx = n.receiver(num_senders=2)
        senders = [n.sender(index=i) for i in range(2)]
        senders[1].send(0, b"x" * 1000)
        assert rx.recv(1) == b"x" * 1000
        assert set(os.listdir("/proc/self/fd")) == fds
        assert not list(Path("/dev/shm").glob(f"msjax-m2n-{n.name}-*"))
        for tx in senders:
            tx.close()
    finally:
        n.close()
    assert set(os.listdir("/proc/self/fd")) == fds


def raw_header(magic=None, sender=0, layer=0, micro_batch=0, seq=0, nbytes=0) -> bytes:
    return struct.pack("<IIIIQQ", native.message_magic() if magic is None else magic, sender, layer, micro_batch,
                       seq, nbytes)


def deliver_raw(net: Net, rx: native.Receiver, sender: int, raw: bytes):
    """What a faulty sender would put on the wire (tcp) or in its slot (shm, loopback)."""
    if net.transport in BY_NAME:
        rx.inject(sender, 0, raw)
        return None
    host, port = rx.address.split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(struct.pack("<IIII", HELLO_MAGIC, sender, rx.index, 1) + raw)
    return sock


MALFORMED = {
    "magic": (dict(magic=0xDEADBEEF), "bad magic"),
    "sender": (dict(sender=1), "arrived on sender 0's channel"),
    "sequence": (dict(seq=5), "sequence number 5, expected 0"),
    "size": (dict(nbytes=1 << 20), "exceeds the receive capacity"),
}


@pytest.mark.parametrize("field", MALFORMED)
def test_malformed_headers_are_rejected(net, field):
    rx = net.receiver(num_senders=2, capacity=4096)
    fields, message = MALFORMED[field]
    sock = deliver_raw(net, rx, 0, raw_header(**fields) + b"\x01" * 64)
    try:
        with pytest.raises(native.M2NError, match=message) as info:
            rx.recv(0, timeout_s=5)
        assert info.value.code == "malformed message"
        with pytest.raises(native.M2NError, match="is broken"):  # the channel stays refused
            rx.recv(0, timeout_s=5)
    finally:
        if sock is not None:
            sock.close()


def test_tags_out_of_step_are_rejected(net):
    rx = net.receiver()
    tx = net.sender()
    tx.send(0, b"abc", layer=1, micro_batch=0)
    with pytest.raises(native.M2NError, match="expected layer 2 micro-batch 0 from sender 0"):
        rx.recv(0, layer=2)


def test_output_smaller_than_message_is_rejected(net):
    rx = net.receiver()
    tx = net.sender()
    tx.send(0, b"x" * 100)
    with pytest.raises(native.M2NError, match="exceeds the receive capacity 10"):
        rx.recv_into(np.empty(10, np.uint8), 0)


def test_bad_arguments_are_clear_errors(net):
    rx = net.receiver(num_senders=2, capacity=1024)
    tx = net.sender(capacity=1024)
    with pytest.raises(native.M2NError, match="exceeds the slot capacity"):
        tx.send(0, b"x" * 1025)
    with pytest.raises(native.M2NError, match="receiver 3 out of range"):
        tx.send(3, b"x")
    with pytest.raises(native.M2NError, match="sender 2 out of range"):
        rx.recv(2)
    with pytest.raises(ValueError, match="transport must be one of"):
        native.Receiver("udp", "x", 0, 1, 1024)


@pytest.mark.parametrize("transport", BY_NAME)
def test_sender_index_beyond_the_receivers_senders(transport):
    n = Net(transport)
    try:
        n.receiver(num_senders=2)
        with pytest.raises(native.M2NError, match="sender index 2 out of range.*set up for 2 senders"):
            n.sender(index=2)
    finally:
        n.close()


def test_open_sender_times_out_without_receiver():
    start = time.monotonic()
    with pytest.raises(native.M2NTimeout, match="did not appear"):
        native.Sender("shm", [f"none{uuid.uuid4().hex[:8]}"], 0, 1024, timeout_s=0.3)
    with pytest.raises(native.M2NTimeout, match="loopback receiver 0 of channel 'none.*' did not appear.*in this "
                                                "process"):
        native.Sender("loopback", [f"none{uuid.uuid4().hex[:8]}"], 0, 1024, timeout_s=0.3)
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(native.M2NTimeout, match="not reachable"):
        native.Sender("tcp", [f"127.0.0.1:{port}"], 0, 1024, timeout_s=0.3)
    assert time.monotonic() - start < 3


def test_tcp_rejected_sender_sees_an_orderly_close():
    """A sender whose message is rejected gets the end of the stream, not a reset: the receiver stops reading but
    keeps the socket until it closes (closing with unread bytes would reset the connection under the sender)."""
    with native.Receiver("tcp", "127.0.0.1:0", 0, 1, 4096, depth=2, timeout_s=5) as rx:
        host, port = rx.address.split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(struct.pack("<IIII", HELLO_MAGIC, 0, 0, 1) + raw_header(magic=0xDEADBEEF)
                         + b"\x01" * 60000)  # unread bytes behind the bad header
            with pytest.raises(native.M2NError, match="bad magic"):
                rx.recv(0)
            time.sleep(0.05)  # a reset, if one were sent, has arrived by now
            sock.shutdown(socket.SHUT_WR)  # raises "not connected" after a reset
            assert sock.recv(16) == b""


def send_later(sock: socket.socket, data: bytes, delay_s: float = 0.1) -> threading.Thread:
    """Writes `data` after `delay_s`, so the receive the test starts meanwhile is already waiting (reading the
    socket itself)."""
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), sock.sendall(data)))
    thread.start()
    return thread


def test_tcp_receive_withdrawn_in_the_middle_of_a_message_loses_nothing():
    """A consumer whose message has not begun reads it itself, from the socket into its own buffer; when it gives
    up halfway (timeout), the bytes already read move to the slot, the receiver's I/O thread reads the rest, and
    the next receive gets the whole message."""
    data = payload(0, 0, 0, 48000)
    with native.Receiver("tcp", "127.0.0.1:0", 0, 1, 1 << 16, depth=2, timeout_s=5) as rx:
        host, port = rx.address.split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(struct.pack("<IIII", HELLO_MAGIC, 0, 0, 1))
            first = send_later(sock, raw_header(nbytes=len(data)) + data[:20000])
            with pytest.raises(native.M2NTimeout, match="timed out waiting for sender 0"):
                rx.recv(0, timeout_s=0.6)
            first.join()
            sock.sendall(data[20000:])
            assert rx.recv(0, timeout_s=5) == data
            # and the channel goes on: the next message, again to a waiting receive
            second = send_later(sock, raw_header(seq=1, nbytes=5) + b"hello")
            assert rx.recv(0, timeout_s=5) == b"hello"
            second.join()


def test_tcp_message_not_what_the_waiting_receive_expects_is_rejected():
    """A message whose tags or size do not fit the receive reading it does not touch the receive's buffer: it goes
    to the slot, and the slot path rejects it with the usual error."""
    with native.Receiver("tcp", "127.0.0.1:0", 0, 1, 4096, depth=2, timeout_s=5) as rx:
        host, port = rx.address.split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(struct.pack("<IIII", HELLO_MAGIC, 0, 0, 1))
            late = send_later(sock, raw_header(layer=1, nbytes=100) + b"x" * 100)
            out = np.zeros(10, np.uint8)
            with pytest.raises(native.M2NError, match="exceeds the receive capacity 10"):
                rx.recv_into(out, 0, layer=1)
            late.join()
            assert not out.any()


def test_receive_from_every_sender_at_once(net):
    """An M2N round's share of one receiver: one message from each sender, whatever order they come in."""
    rx = net.receiver(num_senders=3, capacity=8192)
    senders = [net.sender(index=i, capacity=8192) for i in range(3)]
    outs = [np.zeros(8192, np.uint8) for _ in range(3)]
    for layer in range(3):
        for i in reversed(range(3)):
            senders[i].send(0, payload(i, 0, layer, 1000 * (i + 1) + layer), layer=layer, micro_batch=1)
        sizes = rx.recv_all(outs, [2, 0, 1], layer=layer, micro_batch=1)
        assert [outs[k][:n].tobytes() for k, n in enumerate(sizes)] == [
            payload(i, 0, layer, 1000 * (i + 1) + layer) for i in (2, 0, 1)]
    with pytest.raises(native.M2NError, match="sender 1 named twice"):
        rx.recv_all(outs[:2], [1, 1])
    with pytest.raises(native.M2NError, match="sender 3 out of range"):
        rx.recv_all(outs[:1], [3])
    with pytest.raises(ValueError, match="one output per sender"):
        rx.recv_all(outs, [0, 1])
    for s in senders:
        s.close()


def test_receive_from_every_sender_gets_what_came_when_one_is_missing(net):
    """One sender never sends: the receive times out naming it, the others' messages are consumed, and the late
    one is there for the next receive."""
    rx = net.receiver(num_senders=2, capacity=4096)
    senders = [net.sender(index=i, capacity=4096) for i in range(2)]
    senders[0].send(0, b"first", layer=4)
    outs = [np.zeros(4096, np.uint8) for _ in range(2)]
    with pytest.raises(native.M2NTimeout, match="waiting for sender 1") as info:
        rx.recv_all(outs, [0, 1], layer=4, timeout_s=0.3)
    assert info.value.received == [5, None] and outs[0][:5].tobytes() == b"first"  # what the caller holds
    senders[1].send(0, b"late", layer=4)
    senders[0].send(0, b"second", layer=5)
    assert rx.recv(1, layer=4) == b"late"
    assert rx.recv(0, layer=5) == b"second"  # sender 0's layer-4 message was consumed by the failed receive
    for s in senders:
        s.close()


def test_a_tolerant_receive_goes_on_without_a_sender_that_died(net):
    """A tolerant receiver (an attention node that survives an expert node's loss): a sender killed mid-stream is
    marked lost within seconds, its messages read as 0 bytes from then on (at once, no more waiting), while the
    live sender's messages still arrive in order; the same receive without tolerance fails naming it."""
    if net.transport == "loopback":
        pytest.skip(CROSS_PROCESS.format("test_a_tolerant_send_drops_what_a_closed_receiver_would_get"))
    rx = net.receiver(num_senders=2, timeout_s=60)
    live = net.sender(index=1)
    proc = spawn("""
        tx = m.Sender(os.environ["T"], [os.environ["ADDR"]], 0, 1 << 16)
        tx.send(0, b"before", layer=0)
        print("sent", flush=True)
        time.sleep(60)
        """, T=net.transport, ADDR=net.addresses()[0])
    outs = [np.zeros(1 << 16, np.uint8) for _ in range(2)]
    try:
        assert proc.stdout.readline().strip() == "sent"
        rx.set_tolerant()
        live.send(0, b"one", layer=0)
        assert rx.recv_all(outs, [0, 1], layer=0) == [6, 3] and rx.lost() == []
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        live.send(0, b"two", layer=1)
        start = time.monotonic()
        assert rx.recv_all(outs, [0, 1], layer=1) == [0, 3] and outs[1][:3].tobytes() == b"two"
        assert time.monotonic() - start < 5 and rx.lost() == [0]
        live.send(0, b"three", layer=2)
        start = time.monotonic()
        assert rx.recv_all(outs, [1, 0], layer=2) == [5, 0]  # the lost sender costs no more waiting
        assert time.monotonic() - start < 0.5
        rx.set_tolerant(False)
        with pytest.raises(native.M2NError):
            rx.recv_all(outs[:1], [0], layer=3, timeout_s=5)
    finally:
        reap(proc, timeout=1)
        live.close()


def test_a_tolerant_send_drops_what_a_closed_receiver_would_get():
    """Loopback (one process): a tolerant sender whose receiver closed marks it lost and drops its messages,
    while its other receiver still gets every one; `lost()` names the closed one."""
    net = Net("loopback")
    gone, kept = net.receiver(index=0, depth=2), net.receiver(index=1, depth=2)
    tx = net.sender(timeout_s=5)
    tx.set_tolerant()
    gone.close()
    for layer in range(4):  # more than the ring holds: the closed receiver would block a strict sender
        tx.send(0, b"lost", layer=layer)
        tx.send(1, b"kept%d" % layer, layer=layer)
        assert kept.recv(0, layer=layer) == b"kept%d" % layer
    assert tx.lost() == [0]
    tx.mark_lost(1)  # the caller took receiver 1 out: its messages are dropped from now on
    tx.send(1, b"dropped", layer=9)
    assert tx.lost() == [0, 1]
    with pytest.raises(native.M2NTimeout):
        kept.recv(0, layer=9, timeout_s=0.2)
    tx.close()
    net.close()


def test_an_endpoint_adopts_the_next_generation_of_its_channel(net):
    """What a rewire does: a sender and a receiver each take over a new channel's connection under their old
    handles (programs name endpoints by handle), messages then travel on the new channel from sequence 0, and
    the old connections close with the endpoints that held the new ones."""
    rx, tx = net.receiver(), net.sender()
    tx.send(0, b"old", layer=0)
    assert rx.recv(0, layer=0) == b"old"
    nxt = Net(net.transport)
    rx2 = nxt.receiver()
    tx2 = nxt.sender()
    handles = (tx.handle, rx.handle)
    tx.adopt(tx2)
    rx.adopt(rx2)
    assert (tx.handle, rx.handle) == handles and tx2.handle == rx2.handle == 0
    tx.send(0, b"new", layer=1)  # sequence 0 of the new channel
    assert rx.recv(0, layer=1) == b"new"
    with pytest.raises(ValueError, match="another kind or shape"):
        tx.adopt(net.receiver(index=1))
    tx.close()
    nxt.close()


def test_tcp_receive_from_every_sender_reads_them_as_they_come():
    """The senders' messages come in reverse order, each after the receive has started: every one is read inline,
    straight into its buffer, and the tags of each are checked against the receive's."""
    with native.Receiver("tcp", "127.0.0.1:0", 0, 3, 1 << 16, depth=2, timeout_s=5) as rx:
        host, port = rx.address.split(":")
        socks = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            for i, sock in enumerate(socks):
                sock.sendall(struct.pack("<IIII", HELLO_MAGIC, i, 0, 1))
            data = [payload(i, 0, 0, 20000 + i) for i in range(3)]
            late = [send_later(socks[i], raw_header(sender=i, layer=2, nbytes=len(data[i])) + data[i],
                               delay_s=0.05 * (3 - i)) for i in range(3)]
            outs = [np.zeros(1 << 16, np.uint8) for _ in range(3)]
            sizes = rx.recv_all(outs, [0, 1, 2], layer=2)
            assert [outs[i][:n].tobytes() for i, n in enumerate(sizes)] == data
            for thread in late:
                thread.join()
            # a message whose tags are not the receive's is rejected for its sender alone
            late = [send_later(socks[i], raw_header(sender=i, seq=1, layer=3 if i != 1 else 9, nbytes=4) + b"abcd")
                    for i in range(3)]
            with pytest.raises(native.M2NError, match="expected layer 3 micro-batch 0 from sender 1"):
                rx.recv_all(outs, [0, 1, 2], layer=3)
            for thread in late:
                thread.join()
            assert [o[:4].tobytes() for o in (outs[0], outs[2])] == [b"abcd", b"abcd"]
        finally:
            for sock in socks:
                sock.close()


def test_tcp_receive_path_under_random_timing():
    """Three senders stream messages of random sizes, each written in pieces with pauses between (so a receive
    often sees half a header or half a payload); the consumer takes each round either with one receive for all
    senders or sender by sender with short timeouts that expire mid-message (the connection then goes back to
    the I/O thread with the bytes read so far) and tries again. Every message arrives whole and in order."""
    n, senders_n, cap = 40, 3, 1 << 16
    sizes = np.random.default_rng(7).integers(0, cap, (senders_n, n))
    with native.Receiver("tcp", "127.0.0.1:0", 0, senders_n, cap, depth=2, timeout_s=10) as rx:
        host, port = rx.address.split(":")
        socks = [socket.create_connection((host, int(port))) for _ in range(senders_n)]
        errors = []

        def stream(i):
            jitter = np.random.default_rng(100 + i)
            try:
                socks[i].sendall(struct.pack("<IIII", HELLO_MAGIC, i, 0, 1))
                for k in range(n):
                    wire = raw_header(sender=i, layer=k, seq=k, nbytes=int(sizes[i, k])) + payload(i, 0, k,
                                                                                                   int(sizes[i, k]))
                    # three pieces; half the time the first ends inside the 32-byte header
                    first = int(jitter.integers(1, 32)) if jitter.random() < 0.5 else int(jitter.integers(0, len(wire)))
                    cuts = sorted([first, int(jitter.integers(0, len(wire)))])
                    for piece in (wire[:cuts[0]], wire[cuts[0]:cuts[1]], wire[cuts[1]:]):
                        socks[i].sendall(piece)
                        time.sleep(jitter.random() * 0.001)
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(senders_n)]
        for thread in threads:
            thread.start()
        try:
            rng = np.random.default_rng(0)
            outs = [np.zeros(cap, np.uint8) for _ in range(senders_n)]
            timeouts = 0
            for k in range(n):
                if rng.random() < 0.4:
                    got = rx.recv_all(outs, list(range(senders_n)), layer=k)
                    assert [outs[i][:g].tobytes() for i, g in enumerate(got)] == [
                        payload(i, 0, k, int(sizes[i, k])) for i in range(senders_n)]
                    continue
                for i in rng.permutation(senders_n):
                    while True:
                        try:
                            data = rx.recv(int(i), layer=k, timeout_s=float(rng.choice([0.0002, 0.0005, 0.002])))
                            break
                        except native.M2NTimeout:
                            timeouts += 1
                    assert data == payload(int(i), 0, k, int(sizes[i, k])), (k, i)
            for thread in threads:
                thread.join(10)
            assert not errors
            assert timeouts > 0  # the retry path ran
        finally:
            for sock in socks:
                sock.close()
