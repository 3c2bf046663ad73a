"""A minimal, validating reader of the safetensors format, memory-mapped so a role reads only its tensors.

Format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the
data. Every header entry is checked against the file before any tensor is handed out, so a corrupt or
truncated file is a `CheckpointError` naming the file and the entry, never garbage weights.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from msjax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 2**20


def parse_header(blob: bytes, file_size: int, where: str = "<bytes>") -> tuple[dict, int]:
    """Validate a safetensors header. `blob` holds at least the first 8 + N bytes of the file.

    Returns ({name: (dtype, shape, begin, end)} with absolute byte offsets, data start).
    """
    if file_size < 8 or len(blob) < 8:
        raise CheckpointError(f"{where}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise CheckpointError(f"{where}: corrupt safetensors header length {header_len} for a file of "
                              f"{file_size} bytes (truncated file?)")
    if len(blob) < 8 + header_len:
        raise CheckpointError(f"{where}: header is truncated")
    try:
        header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed header entry {info!r}") from None
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has a negative dimension in shape {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise CheckpointError(f"{where}: tensor {name!r} spans bytes [{begin}, {end}) but shape {shape} of "
                                  f"{info['dtype']} needs {nbytes} bytes")
        if data_start + end > file_size:
            raise CheckpointError(f"{where}: tensor {name!r} ends at byte {data_start + end} past the end of the "
                                  f"file ({file_size} bytes): the file is truncated")
        entries[name] = (dtype, shape, data_start + begin, data_start + end)
    return entries, data_start


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensor data mapped lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) == 8:
                    (n,) = struct.unpack("<Q", head)
                    head += f.read(min(n, MAX_HEADER_BYTES))
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot read ({err.strerror})") from None
        self.entries, self._data_start = parse_header(head, size, self.path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or rows [start:stop] of its first axis, reading only those bytes), as a numpy array."""
        dtype, shape, begin, end = self.entries[name]
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            begin, end, shape = begin + start * row_bytes, begin + stop * row_bytes, (stop - start, *shape[1:])
        return np.asarray(self._map[begin:end]).view(dtype).reshape(shape)
