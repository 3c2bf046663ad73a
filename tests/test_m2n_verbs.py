"""The RDMA verbs transport: set-up code tested without a device; the live loopback test needs one.

No machine here has an RDMA device, so the live test skips with that reason; the transport is unverified on
hardware until it has run on one.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from msjax.comm import native

CONN_MAGIC = 0x434E324D


def conn_blob(qp_num=0x1234, psn=0x42, lid=7, port=1, gid_index=0, gid=bytes(range(16)), addr=0x7F0000001000,
              rkey=0xABCD, mtu=5, magic=CONN_MAGIC) -> bytes:
    return struct.pack("<IIIHBB16sQII", magic, qp_num, psn, lid, port, gid_index, gid, addr, rkey, mtu)


def rdma_devices() -> list[str]:
    try:
        return native.verbs_devices()
    except native.M2NError:
        return []


def test_verbs_transport_is_compiled_where_libibverbs_is_installed():
    if not Path("/usr/include/infiniband/verbs.h").exists():
        pytest.skip("libibverbs-dev not installed (tools/setup.sh installs it)")
    assert native.has_verbs()


def test_immediate_names_sender_and_low_sequence_bits():
    assert native.verbs_imm(0, 0) == 0
    assert native.verbs_imm(3, 5) == (3 << 24) | 5
    assert native.verbs_imm(255, 2**24 - 1) == 0xFFFFFFFF
    assert native.verbs_imm(1, 2**24 + 9) == (1 << 24) | 9  # the receiver tracks the high bits itself


def test_connection_info_round_trips():
    blob = conn_blob()
    assert len(blob) == 48
    assert native.verbs_conninfo_roundtrip(blob) == blob


@pytest.mark.parametrize("blob, message", [
    (conn_blob()[:40], "must be 48 bytes, got 40"),
    (conn_blob(magic=0), "bad magic"),
    (conn_blob(qp_num=0), "queue-pair number"),
    (conn_blob(psn=1 << 24), "psn must be"),
    (conn_blob(mtu=9), "mtu enum"),
])
def test_malformed_connection_info_is_rejected(blob, message):
    with pytest.raises(native.M2NError, match=message):
        native.verbs_conninfo_roundtrip(blob)


def test_no_device_is_a_clear_error():
    if rdma_devices():
        pytest.skip("this machine has an RDMA device")
    with pytest.raises(native.M2NError, match="no RDMA device"):
        native.verbs_devices()
    with pytest.raises(native.M2NError, match="no RDMA device"):
        native.VerbsReceiver(num_senders=1, index=0, capacity=4096)


@pytest.mark.skipif(not rdma_devices(), reason="no RDMA device")
def test_verbs_loopback_live():
    """One receiver, one sender on the same device, queue pairs connected through their ConnInfo blobs."""
    capacity, depth = 1 << 16, 4
    rx = native.VerbsReceiver(num_senders=1, index=0, capacity=capacity, depth=depth, timeout_s=5)
    tx = native.VerbsSender(num_receivers=1, index=0, capacity=capacity, depth=depth, timeout_s=5)
    try:
        rx.connect(0, tx.local_info(0))
        tx.connect(0, rx.local_info(0))
        for k in range(3 * depth):  # wraps the ring: credits must come back
            data = bytes([k]) * (100 * k + 1)
            tx.send(0, data, layer=k)
            assert rx.recv(0, layer=k) == data
        with pytest.raises(native.M2NTimeout):
            rx.recv(0, layer=99, timeout_s=0.2)
    finally:
        tx.close()
        rx.close()
