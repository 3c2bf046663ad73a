"""The m2n_send / m2n_recv XLA FFI custom calls between two processes, each with its own JAX, and (loopback) between
two programs of one process.

The "attention" process's jitted step sends a packet (only rows[:count] travel) and receives the reply; the
"expert" process's jitted step receives it, doubles the rows and sends them back. Both lowered programs must
contain the custom calls: the data path has no Python. Over loopback both programs run in this process, on two
devices, as an in-process deployment places its nodes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.comm import native

ROOT = Path(__file__).resolve().parents[1]
COMMON = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from msjax.comm import native
    T, NAME = os.environ["T"], os.environ["NAME"]
    CAP, HIDDEN, LAYERS = 16, 8, 3
    like = jax.ShapeDtypeStruct((CAP, HIDDEN), jnp.float32)
""")

EXPERT = COMMON + textwrap.dedent("""
    rx = native.Receiver(T, NAME if T == "shm" else "127.0.0.1:0", 0, 1, CAP * HIDDEN * 4, timeout_s=30)
    print(rx.address, flush=True)
    back = native.Sender(T, [NAME + "-back" if T == "shm" else sys.stdin.readline().strip()], 0,
                         CAP * HIDDEN * 4, timeout_s=30)

    @jax.jit
    def step(layer):  # the layer is an operand: one compiled program serves every layer
        rows, count = native.m2n_recv(rx, sender=0, like=like, layer=layer)
        return native.m2n_send(rows * 2, count, back, receiver=0, layer=layer)

    text = step.lower(jnp.int32(0)).as_text()
    assert "m2n_recv" in text and "m2n_send" in text, text
    for layer in range(LAYERS):
        step(jnp.int32(layer)).block_until_ready()
    assert step._cache_size() == 1
    print("expert done", flush=True)
""")

ATTENTION = COMMON + textwrap.dedent("""
    back = native.Receiver(T, NAME + "-back" if T == "shm" else "127.0.0.1:0", 0, 1, CAP * HIDDEN * 4,
                           timeout_s=30)
    print(back.address, flush=True)
    tx = native.Sender(T, [NAME if T == "shm" else os.environ["EXPERT_ADDR"]], 0, CAP * HIDDEN * 4, timeout_s=30)

    @jax.jit
    def step(rows, count, layer):
        sent = native.m2n_send(rows, count, tx, receiver=0, layer=layer)
        return native.m2n_recv(back, sender=0, like=like, layer=layer, after=sent)

    text = step.lower(like, jnp.int32(0), jnp.int32(0)).as_text()
    assert "m2n_send" in text and "m2n_recv" in text, text
    for layer in range(LAYERS):
        count = 5 + layer
        rows = jnp.arange(CAP * HIDDEN, dtype=jnp.float32).reshape(CAP, HIDDEN) + 100 * layer
        out, got = step(rows, jnp.int32(count), jnp.int32(layer))
        assert int(got) == count, (int(got), count)
        np.testing.assert_array_equal(np.asarray(out[:count]), 2 * np.asarray(rows[:count]))
        assert not np.asarray(out[count:]).any(), "rows past count must be zero (they never travelled)"
    assert step._cache_size() == 1
    print("attention done", flush=True)
""")


def run_pair(transport: str) -> None:
    env = {**os.environ, "T": transport, "NAME": f"f{uuid.uuid4().hex[:10]}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    expert = subprocess.Popen([sys.executable, "-c", EXPERT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    attention = None
    try:
        expert_addr = expert.stdout.readline().strip()
        attention = subprocess.Popen([sys.executable, "-c", ATTENTION], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**env, "EXPERT_ADDR": expert_addr})
        back_addr = attention.stdout.readline().strip()
        expert.stdin.write(back_addr + "\n")
        expert.stdin.flush()
        a_out, a_err = attention.communicate(timeout=90)
        e_out, e_err = expert.communicate(timeout=30)
    finally:
        for p in (expert, attention):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert attention.returncode == 0 and "attention done" in a_out, a_err[-3000:]
    assert expert.returncode == 0 and "expert done" in e_out, e_err[-3000:]


CAP, HIDDEN, LAYERS = 16, 8, 3
LIKE = jax.ShapeDtypeStruct((CAP, HIDDEN), jnp.float32)


def two_devices() -> tuple[jax.Device, jax.Device]:
    devices = jax.devices("cpu")
    assert len(devices) >= 2, "tests/conftest.py forces 8 host devices (XLA_FLAGS), so there must be two"
    return devices[0], devices[1]


def run_in_one_process() -> None:
    """run_pair's two programs over loopback in this process: the expert's loop on its own thread (it waits inside
    its receive while the attention step, which sends and then receives the reply, runs on the main thread), each
    program on its own device."""
    attention_device, expert_device = two_devices()
    name = f"f{uuid.uuid4().hex[:10]}"
    nbytes = CAP * HIDDEN * 4
    with native.Receiver("loopback", name, 0, 1, nbytes, timeout_s=30) as rx, \
            native.Receiver("loopback", name + "-back", 0, 1, nbytes, timeout_s=30) as back, \
            native.Sender("loopback", [rx.address], 0, nbytes, timeout_s=30) as tx, \
            native.Sender("loopback", [back.address], 0, nbytes, timeout_s=30) as back_tx:

        @jax.jit
        def expert_step(layer):
            rows, count = native.m2n_recv(rx, sender=0, like=LIKE, layer=layer)
            return native.m2n_send(rows * 2, count, back_tx, receiver=0, layer=layer)

        @jax.jit
        def attention_step(rows, count, layer):
            sent = native.m2n_send(rows, count, tx, receiver=0, layer=layer)
            return native.m2n_recv(back, sender=0, like=LIKE, layer=layer, after=sent)

        text = expert_step.lower(jnp.int32(0)).as_text()
        assert "m2n_recv" in text and "m2n_send" in text, text
        text = attention_step.lower(LIKE, jnp.int32(0), jnp.int32(0)).as_text()
        assert "m2n_send" in text and "m2n_recv" in text, text
        errors = []

        def expert():
            try:
                for layer in range(LAYERS):
                    expert_step(jax.device_put(np.int32(layer), expert_device)).block_until_ready()
            except Exception as e:  # surfaced below
                errors.append(e)

        thread = threading.Thread(target=expert)
        thread.start()
        try:
            for layer in range(LAYERS):
                count = 5 + layer
                rows = jax.device_put(np.arange(CAP * HIDDEN, dtype=np.float32).reshape(CAP, HIDDEN) + 100 * layer,
                                      attention_device)
                out, got = attention_step(rows, jnp.int32(count), jnp.int32(layer))
                assert int(got) == count, (int(got), count)
                np.testing.assert_array_equal(np.asarray(out[:count]), 2 * np.asarray(rows[:count]))
                assert not np.asarray(out[count:]).any(), "rows past count must be zero (they never travelled)"
        finally:
            thread.join(60)
        assert not errors, errors
        assert attention_step._cache_size() == 1 and expert_step._cache_size() == 1


@pytest.mark.parametrize("transport", ["shm", "tcp", "loopback"])
def test_jitted_programs_exchange_packets_through_the_custom_calls(transport):
    if transport == "loopback":
        run_in_one_process()  # loopback endpoints cannot reach another process
    else:
        run_pair(transport)


def test_programs_on_two_devices_of_one_process_exchange_packets_both_ways():
    """The in-process deployment's pattern over loopback: an attention program on one device sends a packet, an
    expert program on another receives it and sends its answer back, and a second attention program receives
    that, for every (layer, micro-batch) round; one host thread dispatches all of them asynchronously, in
    dependency order (every receive's message comes from a program dispatched before it), and waits once at the
    end. Each program chains its call to the previous call of its node (`after=`), as the runner does."""
    attention_device, expert_device = two_devices()
    name = f"f{uuid.uuid4().hex[:10]}"
    nbytes = CAP * HIDDEN * 4
    rounds = [(layer, mb) for layer in range(LAYERS) for mb in range(2)]
    with native.Receiver("loopback", name + "-e", 0, 1, nbytes, timeout_s=30) as expert_rx, \
            native.Receiver("loopback", name + "-a", 0, 1, nbytes, timeout_s=30) as attention_rx, \
            native.Sender("loopback", [expert_rx.address], 0, nbytes, timeout_s=30) as attention_tx, \
            native.Sender("loopback", [attention_rx.address], 0, nbytes, timeout_s=30) as expert_tx:
        dispatch = jax.jit(lambda rows, count, layer, mb, after: native.m2n_send(
            rows, count, attention_tx, receiver=0, layer=layer, micro_batch=mb, after=after))

        @jax.jit
        def expert(layer, mb, after):
            rows, count = native.m2n_recv(expert_rx, sender=0, like=LIKE, layer=layer, micro_batch=mb, after=after)
            return native.m2n_send(rows * 2 + 1, count, expert_tx, receiver=0, layer=layer, micro_batch=mb,
                                   after=count)

        combine = jax.jit(lambda layer, mb, after: native.m2n_recv(attention_rx, sender=0, like=LIKE, layer=layer,
                                                                   micro_batch=mb, after=after))

        def on(device, value):
            return jax.device_put(np.int32(value), device)

        sent = []
        attention_token, expert_token = on(attention_device, 0), on(expert_device, 0)
        results = []
        for layer, mb in rounds:
            count = 2 + layer + 3 * mb
            rows = jax.device_put(np.arange(CAP * HIDDEN, dtype=np.float32).reshape(CAP, HIDDEN) + 100 * layer + mb,
                                  attention_device)
            sent.append((rows, count))
            token = dispatch(rows, on(attention_device, count), on(attention_device, layer), on(attention_device, mb),
                             attention_token)
            expert_token = expert(on(expert_device, layer), on(expert_device, mb), expert_token)
            out, attention_token = combine(on(attention_device, layer), on(attention_device, mb), token)
            results.append((out, attention_token))
        jax.block_until_ready((results, expert_token))
        for (rows, count), (out, got) in zip(sent, results):
            assert int(got) == count
            assert out.devices() == {attention_device}
            np.testing.assert_array_equal(np.asarray(out[:count]), 2 * np.asarray(rows[:count]) + 1)
            assert not np.asarray(out[count:]).any(), "rows past count must be zero (they never travelled)"
        assert expert_token.devices() == {expert_device}
        assert dispatch._cache_size() == expert._cache_size() == combine._cache_size() == 1


def test_custom_call_errors_are_clear_in_process():
    name = f"f{uuid.uuid4().hex[:10]}"
    with native.Receiver("shm", name, 0, 1, 1024, timeout_s=5) as rx, \
            native.Sender("shm", [name], 0, 1024, timeout_s=5) as tx:
        rows = jnp.ones((4, 8), jnp.float32)
        with pytest.raises(Exception, match="count 9 not in \\[0, 4\\]"):
            jax.jit(lambda r: native.m2n_send(r, 9, tx, receiver=0))(rows).block_until_ready()
        with pytest.raises(Exception, match="timed out waiting for sender 0"):
            jax.jit(lambda: native.m2n_recv(rx, sender=0, like=rows, timeout_s=0.2))()[0].block_until_ready()
        recv = jax.jit(lambda layer: native.m2n_recv(rx, sender=0, like=rows, layer=layer)[1])
        jax.jit(lambda r, layer: native.m2n_send(r, 2, tx, receiver=0, layer=layer))(rows, 1).block_until_ready()
        with pytest.raises(Exception, match="expected layer 2 micro-batch 0 from sender 0, got .*layer=1"):
            recv(2).block_until_ready()  # the tag is checked against the traced operand
        with pytest.raises(Exception, match="is broken"):
            recv(1).block_until_ready()

    name = f"f{uuid.uuid4().hex[:10]}"
    with native.Receiver("shm", name, 0, 1, 1024, timeout_s=5) as rx, \
            native.Sender("shm", [name], 0, 1024, timeout_s=5) as tx:
        with pytest.raises(Exception, match="layer and micro-batch must be >= 0"):
            jax.jit(lambda r: native.m2n_send(r, 1, tx, receiver=0, layer=-1))(rows).block_until_ready()
        tx.send(0, b"x" * 12)  # 12 bytes is not a whole number of 32-byte rows
        with pytest.raises(Exception, match="not a whole number of 32-byte rows"):
            jax.jit(lambda: native.m2n_recv(rx, sender=0, like=rows))()[0].block_until_ready()


@pytest.mark.parametrize("transport", ["shm", "tcp", "loopback"])
def test_one_custom_call_receives_from_every_sender(transport):
    """m2n_recv_all: a packet from each of several senders in one call, each into its own buffer shape (rows past
    its count zero), the counts as one array; tags checked against the traced operand."""
    name = f"f{uuid.uuid4().hex[:10]}"
    by_name = transport in ("shm", "loopback")
    with native.Receiver(transport, name if by_name else "127.0.0.1:0", 0, 2, 1024, timeout_s=5) as rx:
        address = name if by_name else rx.address
        with native.Sender(transport, [address], 0, 1024, timeout_s=5) as tx0, \
                native.Sender(transport, [address], 1, 1024, timeout_s=5) as tx1:
            likes = [jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((6, 2), jnp.int32)]
            recv = jax.jit(lambda layer: native.m2n_recv_all(rx, senders=[1, 0], likes=likes[::-1], layer=layer))
            assert "m2n_recv_all" in recv.lower(0).as_text()
            a = jnp.arange(32, dtype=jnp.float32).reshape(4, 8)
            b = jnp.arange(12, dtype=jnp.int32).reshape(6, 2)
            jax.jit(lambda r, layer: native.m2n_send(r, 3, tx0, receiver=0, layer=layer))(a, 7).block_until_ready()
            jax.jit(lambda r, layer: native.m2n_send(r, 2, tx1, receiver=0, layer=layer))(b, 7).block_until_ready()
            (from1, from0), counts = recv(7)
            assert counts.tolist() == [2, 3]
            np.testing.assert_array_equal(np.asarray(from1), np.concatenate([np.asarray(b[:2]), np.zeros((4, 2))]))
            np.testing.assert_array_equal(np.asarray(from0), np.concatenate([np.asarray(a[:3]), np.zeros((1, 8))]))
            jax.jit(lambda r: native.m2n_send(r, 1, tx0, receiver=0, layer=8))(a).block_until_ready()
            jax.jit(lambda r: native.m2n_send(r, 1, tx1, receiver=0, layer=9))(b).block_until_ready()
            with pytest.raises(Exception, match="expected layer 8 micro-batch 0 from sender 1, got .*layer=9"):
                recv(8)[1].block_until_ready()
    with pytest.raises(ValueError, match="one buffer shape per sender"):
        native.m2n_recv_all(rx, senders=[0, 1], likes=likes[:1])
