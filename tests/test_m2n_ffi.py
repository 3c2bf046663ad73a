"""The m2n_send / m2n_recv XLA FFI custom calls between two processes, each with its own JAX.

The "attention" process's jitted step sends a packet (only rows[:count] travel) and receives the reply; the
"expert" process's jitted step receives it, doubles the rows and sends them back. Both lowered programs must
contain the custom calls: the data path has no Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_jitted_programs_exchange_packets_through_the_custom_calls(transport):
    run_pair(transport)


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


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_one_custom_call_receives_from_every_sender(transport):
    """m2n_recv_all: a packet from each of several senders in one call, each into its own buffer shape (rows past
    its count zero), the counts as one array; tags checked against the traced operand."""
    name = f"f{uuid.uuid4().hex[:10]}"
    with native.Receiver(transport, name if transport == "shm" else "127.0.0.1:0", 0, 2, 1024,
                         timeout_s=5) as rx:
        address = name if transport == "shm" else rx.address
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
