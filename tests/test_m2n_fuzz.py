"""Fuzzing the M2N header parser and receive path (hypothesis), through the Python binding of the core.

Oracle: a message is accepted exactly when every header field is what the receiver expects, and then its bytes
arrive intact; anything else is a clear M2NError, never a crash or a hang.
"""

from __future__ import annotations

import socket
import struct
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msjax.comm import native

MAGIC = native.message_magic()
HELLO_MAGIC = 0x484E324D
CAPACITY = 256

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def near(valid: int, bits: int):
    """Mostly the valid value, sometimes a neighbour, sometimes anything."""
    top = 2**bits - 1
    return st.one_of(st.just(valid), st.integers(max(valid - 2, 0), min(valid + 2, top)), st.integers(0, top))


@st.composite
def headers(draw, num_senders=1, sender=0, seq=0, layer=0, micro_batch=0, capacity=CAPACITY):
    fields = dict(magic=draw(st.one_of(st.just(MAGIC), u32)), sender=draw(near(sender, 32)),
                  layer=draw(near(layer, 32)), micro_batch=draw(near(micro_batch, 32)), seq=draw(near(seq, 64)),
                  nbytes=draw(st.one_of(st.integers(0, capacity + 8), u64)))
    return fields


def pack(h: dict) -> bytes:
    return struct.pack("<IIIIQQ", h["magic"], h["sender"], h["layer"], h["micro_batch"], h["seq"], h["nbytes"])


def accepted(h: dict, *, sender=0, num_senders=1, seq=0, layer=0, micro_batch=0, capacity=CAPACITY) -> bool:
    return (h["magic"] == MAGIC and h["sender"] < num_senders and h["sender"] == sender and h["seq"] == seq
            and h["nbytes"] <= capacity and h["layer"] == layer and h["micro_batch"] == micro_batch)


@settings(max_examples=400, deadline=None)
@given(raw=st.one_of(st.binary(max_size=48), headers(num_senders=4, sender=2, seq=7, layer=3).map(pack)),
       num_senders=st.integers(1, 8))
def test_header_parser(raw, num_senders):
    expect = dict(sender=2, num_senders=num_senders, seq=7, layer=3, micro_batch=0, capacity=CAPACITY)
    try:
        native.validate_header(raw, **expect)
        ok = True
    except native.M2NError as e:
        ok = False
        assert e.code == "malformed message"
        assert "malformed M2N message rejected" in str(e) or "out of step" in str(e)
    if len(raw) < 32:
        assert not ok
    else:
        fields = dict(zip(["magic", "sender", "layer", "micro_batch", "seq", "nbytes"],
                          struct.unpack("<IIIIQQ", raw[:32])))
        assert ok == accepted(fields, **expect)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=headers(), payload=st.binary(max_size=CAPACITY + 64), out_capacity=st.sampled_from([CAPACITY, 16]))
def test_shm_receive_path(h, payload, out_capacity):
    """A faulty sender with the mapping writes any header and bytes into its slot.

    This is loopback's receive path too, exactly: both transports' receivers are DirectReceivers
    (ffi/transports/region.h) that take messages through the same Mailbox::Receive; loopback differs only in where
    the region's memory comes from and in using process-private futexes. (Its malformed-header cases run in the
    conformance suite, tests/test_m2n_transports.py.)"""
    with native.Receiver("shm", f"z{uuid.uuid4().hex[:10]}", 0, 1, CAPACITY, depth=2, timeout_s=2) as rx:
        rx.inject(0, 0, pack(h) + payload)
        out = np.zeros(out_capacity, np.uint8)
        if accepted(h, capacity=min(CAPACITY, out_capacity)):
            n = rx.recv_into(out, 0)
            assert n == h["nbytes"]
            assert out[:n].tobytes() == (payload + bytes(CAPACITY))[:n]
        else:
            with pytest.raises(native.M2NError) as info:
                rx.recv_into(out, 0)
            assert info.value.code == "malformed message"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=headers(), payload=st.binary(max_size=CAPACITY + 64), garbage=st.booleans(),
       junk=st.binary(min_size=1, max_size=80))
def test_tcp_receive_path(h, payload, garbage, junk):
    """Whatever follows a valid hello on the wire: a well-formed message arrives, anything else is an error."""
    with native.Receiver("tcp", "127.0.0.1:0", 0, 1, CAPACITY, depth=2, timeout_s=2) as rx:
        host, port = rx.address.split(":")
        wire = junk if garbage else pack(h) + payload
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(struct.pack("<IIII", HELLO_MAGIC, 0, 0, 1) + wire)
            sock.shutdown(socket.SHUT_WR)  # the "sender" is done: what was sent is all there is
            fields = h
            if garbage:
                fields = None if len(junk) < 32 else dict(zip(
                    ["magic", "sender", "layer", "micro_batch", "seq", "nbytes"], struct.unpack("<IIIIQQ", junk[:32])))
            if fields is None:
                expected = "unavailable"  # the connection closed inside the header
            elif not accepted({**fields, "layer": 0, "micro_batch": 0}):
                expected = "malformed message"  # rejected by the receiver thread as it comes off the wire
            elif len(wire) - 32 < fields["nbytes"]:
                expected = "unavailable"  # the connection closed inside the payload
            elif not accepted(fields):
                expected = "malformed message"  # tags out of step, rejected by the consumer
            else:
                expected = None
            if expected is None:
                assert rx.recv(0) == wire[32:32 + fields["nbytes"]]
            else:
                with pytest.raises(native.M2NError) as info:
                    rx.recv(0)
                assert info.value.code == expected, str(info.value)
