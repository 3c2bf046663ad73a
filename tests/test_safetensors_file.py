"""The safetensors header parser: valid files read back exactly; every malformed header is a CheckpointError."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from msjax.errors import CheckpointError
from msjax.safetensors_file import SafetensorsFile, parse_header


def _blob(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2, 3], np.int64)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(f.read("a"), tensors["a"])
    np.testing.assert_array_equal(f.read("b"), tensors["b"])
    np.testing.assert_array_equal(f.read("a", slice(1, 3)), tensors["a"][1:3])


def test_reads_bfloat16(tmp_path):
    x = np.linspace(-2, 2, 8, dtype=np.float32).astype(ml_dtypes.bfloat16)
    header = {"x": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}
    (tmp_path / "m.safetensors").write_bytes(_blob(header, x.tobytes()))
    np.testing.assert_array_equal(SafetensorsFile(tmp_path / "m.safetensors").read("x"), x)


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "needs 16 bytes"),
    ({"x": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "malformed header entry"),
    ({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, "negative dimension"),
    ({"x": {"shape": [4]}}, b"", "malformed header entry"),
])
def test_malformed_entries_are_named(header, data, message):
    blob = _blob(header, data)
    with pytest.raises(CheckpointError, match=message):
        parse_header(blob, len(blob))


def test_truncated_and_garbage_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="cut.safetensors|junk.safetensors"):
        SafetensorsFile(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsFile(empty)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_crash(blob):
    try:
        parse_header(blob, len(blob))
    except CheckpointError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(
    st.none(), st.integers(), st.text(max_size=4),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "X"]),
                           "shape": st.lists(st.integers(-2, 5), max_size=3),
                           "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3)})),
    max_size=4), st.integers(0, 64))
def test_random_headers_never_crash(header, data_len):
    blob = _blob(header, b"\0" * data_len)
    try:
        entries, start = parse_header(blob, len(blob))
    except CheckpointError:
        return
    for _, shape, begin, end in entries.values():  # whatever was accepted lies inside the file
        assert start <= begin <= end <= len(blob)
