"""The wire codec of the control protocol (`msjax.comm.wire`, messages in `msjax.runtime.protocol`): every
message round-trips exactly; whatever is off in a message decodes to a ProtocolError naming the type and field,
never another exception and never an object of a type the protocol does not define."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msjax.comm import wire
from msjax.comm.wire import ProtocolError, decode, encode
from msjax.config import EngineConfig
from msjax.runtime import protocol as p
from tests.model_utils import tiny_config


def _topology():
    return p.Topology("run1", "tcp", "127.0.0.1:5", "secret", 2, 3, 3, 1 << 16, 4096, 1 << 20, 8192, 60.0, 120.0)


MESSAGES = [
    p.AttentionStep(7, (p.MicroBatch(np.arange(27, dtype=np.int32), np.ones(6, np.float32), 4, 3, 2, True, 20),)),
    p.ExpertStep(7, (((0, 8), (1, 4)), ((0, 8),))),
    p.StepDone(7, (p.SampledTokens(np.array([1, 2], np.int32), np.zeros(2, np.float32),
                                   np.zeros((2, 0), np.int32), np.zeros((2, 0), np.float32)),)),
    p.StepDone(8),
    p.SetRouting(((0, 1), (1, 2)), ((1.0, 0.5), (0.5, 1.0))),
    p.SetRouting(((0, 1), (2,))),
    p.Place((3, 0), "/tmp/w.weights"),
    p.ReadLoad(), p.Load(np.array([3, 0, 5], np.int32)), p.Ping(), p.Pong("expert", 1, 12, (4, 5)), p.Stop(),
    p.Ok(), p.Failed("what went wrong"),
    p.Weights((np.ones((2, 3), ml_dtypes.bfloat16), np.zeros(4, np.float32))),
    p.NodeSpec("expert", 1, tiny_config(eos_token_ids=(2, 3)), EngineConfig(num_pages=9), "bfloat16", "auto", 2,
               "cpu", ((0, 1), (2, 3, 4)), _topology(), checkpoint="/ckpt"),
]


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_equal(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert _equal(decode(encode(msg)), msg)


def _raw(name: str, body: dict, version: int = wire.VERSION) -> bytes:
    return msgpack.packb({"v": version, "t": name, "b": body}, use_bin_type=True)


@pytest.mark.parametrize("raw,error", [
    (b"", "not a message"),
    (b"\xc1garbage", "not a message"),
    (msgpack.packb([1, 2]), "not a map"),
    (_raw("Ping", {}, version=2), "protocol version 2, this node speaks 1"),
    (msgpack.packb({"t": "Ping", "b": {}}), "protocol version None"),
    (_raw("Popen", {}), "unknown message type 'Popen'"),
    (_raw("Failed", {}), "Failed: missing field 'error'"),
    (_raw("Failed", {"error": "x", "extra": 1}), "Failed: unknown field 'extra'"),
    (_raw("Failed", {"error": 3}), "Failed.error: expected str"),
    (_raw("ExpertStep", {"step": True, "rounds": []}), "ExpertStep.step: expected an integer"),
    (_raw("ExpertStep", {"step": 1, "rounds": [[[0]]]}), r"ExpertStep.rounds\[0\]\[0\]: expected 2 items"),
    (_raw("Load", {"tokens": [1, 2]}), "Load.tokens: expected an array"),
    (_raw("StepDone", {"step": 1, "sampled": [{"t": "Ping", "b": {}}]}), "expected SampledTokens, got Ping"),
    (_raw("NodeSpec", {}), "NodeSpec: missing field"),
])
def test_malformed_messages_are_named(raw, error):
    with pytest.raises(ProtocolError, match=error):
        decode(raw)


def _array(dtype: str, shape, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([dtype, shape, data], use_bin_type=True))


@pytest.mark.parametrize("array,error", [
    (_array("object", [1], b"\0" * 8), "dtype 'object' refused"),
    (_array("int32", [3], b"\0" * 8), r"int32\[3\] carries 8 bytes"),
    (_array("int32", [-1], b""), "is not a list of sizes"),
    (msgpack.ExtType(1, b"\xc1"), "malformed array"),
    (msgpack.ExtType(9, b""), "unknown extension type 9"),
])
def test_malformed_arrays_are_named(array, error):
    raw = msgpack.packb({"v": wire.VERSION, "t": "Load", "b": {"tokens": array}}, use_bin_type=True)
    with pytest.raises(ProtocolError, match=error):
        decode(raw)


def test_a_config_that_fails_its_own_validation_is_a_protocol_error():
    body = wire._to_wire(MESSAGES[-1])["b"]
    body["engine"]["b"]["page_size"] = 0
    with pytest.raises(ProtocolError, match="EngineConfig: page_size: must be a positive integer"):
        decode(_raw("NodeSpec", body))


def test_only_registered_types_encode():
    @dataclasses.dataclass(frozen=True)
    class NotAMessage:
        x: int

    with pytest.raises(ProtocolError, match="not a registered wire type"):
        encode(NotAMessage(1))
    with pytest.raises(ProtocolError, match="only registered message types"):
        encode({"t": "Ping"})
    with pytest.raises(ProtocolError, match="cannot travel"):
        encode(p.Failed(object()))


@given(st.binary(max_size=200))
def test_random_bytes_decode_to_a_protocol_error_or_a_message(raw):
    try:
        msg = decode(raw)
    except ProtocolError:
        return
    assert type(msg) in wire._TYPES.values()


@given(st.integers(0, len(MESSAGES) - 1), st.integers(0, 10_000), st.integers(0, 255))
def test_one_flipped_byte_never_escapes_as_another_error(index, at, value):
    raw = bytearray(encode(MESSAGES[index]))
    raw[at % len(raw)] = value
    try:
        decode(bytes(raw))
    except ProtocolError:
        pass
