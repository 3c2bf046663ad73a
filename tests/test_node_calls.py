"""`NodeM2N`: the m2n custom calls of a tensor-parallel node's program go out once per node, not once per device,
and what one device receives reaches every device. One process, a shm loopback, two of the eight host devices."""

from __future__ import annotations

import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from msjax.comm import native
from msjax.comm.node_calls import NodeM2N

pytestmark = pytest.mark.skipif(not native.is_built(), reason="native M2N library not built")

CAP, HIDDEN = 8, 4


@pytest.fixture
def loopback():
    name = f"nodecalls-{uuid.uuid4().hex[:8]}"
    rx = native.Receiver("shm", name, 0, 1, CAP * HIDDEN * 4, timeout_s=5)
    tx = native.Sender("shm", [name], 0, CAP * HIDDEN * 4, timeout_s=5)
    yield tx, rx
    tx.close()
    rx.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_tensor_parallel_node_sends_one_message(loopback, devices):
    tx, rx = loopback
    mesh = Mesh(np.array(jax.devices()[:devices]), ("tp",))
    m2n = NodeM2N(mesh)
    rows = jax.device_put(jnp.arange(CAP * HIDDEN, dtype=jnp.float32).reshape(CAP, HIDDEN),
                          NamedSharding(mesh, P(None, "tp")))  # sharded: the call needs it whole

    @jax.jit
    def step(rows):
        token = m2n.send(rows, 3, tx, receiver=0, layer=1)
        return m2n.send(rows * 2, 2, tx, receiver=0, layer=2, after=token)

    assert int(step(rows)) in (2, 0)
    first = np.frombuffer(rx.recv(0, layer=1), np.float32).reshape(-1, HIDDEN)
    second = np.frombuffer(rx.recv(0, layer=2), np.float32).reshape(-1, HIDDEN)
    np.testing.assert_array_equal(first, np.asarray(rows)[:3])
    np.testing.assert_array_equal(second, 2 * np.asarray(rows)[:2])
    with pytest.raises(native.M2NTimeout):  # no second copy from the other device
        rx.recv(0, layer=1, timeout_s=0.3)


@pytest.mark.parametrize("devices", [1, 2])
def test_what_the_first_device_receives_reaches_every_device(loopback, devices):
    tx, rx = loopback
    mesh = Mesh(np.array(jax.devices()[:devices]), ("tp",))
    m2n = NodeM2N(mesh)
    like = jax.ShapeDtypeStruct((CAP, HIDDEN), jnp.float32)
    sent = np.random.default_rng(0).normal(size=(5, HIDDEN)).astype(np.float32)
    tx.send(0, sent, layer=4)

    @jax.jit
    def step():
        (out,), counts = m2n.recv_all(rx, senders=[0], likes=[like], layer=4)
        return out, counts

    out, counts = step()
    assert len(out.addressable_shards) == devices
    for shard in out.addressable_shards:  # every device holds the whole packet, not a zero or a partial sum
        np.testing.assert_array_equal(np.asarray(shard.data)[:5], sent)
        assert not np.asarray(shard.data)[5:].any()
    assert [int(c) for c in np.asarray(counts)] == [5]
    with pytest.raises(native.M2NTimeout):  # the message was consumed once
        rx.recv(0, layer=4, timeout_s=0.3)
