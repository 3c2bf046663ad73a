"""The wire formats of a deployment, defined once: typed messages (one codec, versioned) and packet rows.

Typed messages are frozen dataclasses registered with `@message`; `encode` / `decode` turn them into msgpack
bytes and back:

    {"v": VERSION, "t": "<type name>", "b": {field: value, ...}}

Values are msgpack's own (None, bool, int, float, str, bytes, lists), numpy arrays (an extension type carrying
dtype, shape and the raw bytes), and nested registered dataclasses ({"t": ..., "b": ...}). `decode` checks
everything against the dataclass's annotations: the version, a known type, exactly its fields, each value's type
and each array's dtype and size. Whatever is wrong raises `ProtocolError` naming the type and field, so a node
that receives garbage answers with an error instead of crashing. No pickle: a message can only build the
registered types.

Packet rows: what an attention node sends an expert node per (layer, micro-batch) is one uint8 buffer
[capacity, hidden * itemsize + 4], each row its hidden vector then its local expert id (int32) — `pack_rows` /
`unpack_rows`, used inside the jitted programs on both sides.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import numpy as np

VERSION = 1
_ARRAY_EXT = 1
# dtypes an array may carry (names as numpy / ml_dtypes spell them); anything else is refused on decode
_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
           "float32", "float64", "bfloat16")
MAX_MESSAGE_BYTES = 1 << 31  # a sanity bound on what decode accepts (channel capacities are far smaller)


class ProtocolError(ValueError):
    """A message that cannot be decoded, or a value that does not fit its type: says which and why."""


_TYPES: dict[str, type] = {}
_HINTS: dict[type, dict[str, Any]] = {}


def message(cls: type) -> type:
    """Register a frozen dataclass as a wire type (decorator). Its name is its wire name: unique."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass to be a wire type")
    name = cls.__name__
    if name in _TYPES and _TYPES[name] is not cls:
        raise TypeError(f"two wire types named {name}")
    _TYPES[name] = cls
    return cls


def register(*classes: type) -> None:
    """Register dataclasses defined elsewhere (configs a node spec carries) as wire types."""
    for cls in classes:
        message(cls)


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# -- encode -----------------------------------------------------------------------------------------------------

def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ProtocolError(f"arrays of dtype {name} cannot travel (allowed: {', '.join(_DTYPES)})")
    return name


def _to_wire(value):
    if isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "dtype")
                                         and not isinstance(value, (np.generic, bool, int, float))):
        import msgpack
        array = np.ascontiguousarray(np.asarray(value))
        body = msgpack.packb([_dtype_name(array.dtype), list(array.shape), array.tobytes()], use_bin_type=True)
        return msgpack.ExtType(_ARRAY_EXT, body)
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _TYPES.get(name) is not type(value):
            raise ProtocolError(f"{name} is not a registered wire type")
        return {"t": name, "b": {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise ProtocolError(f"a value of type {type(value).__name__} cannot travel")


def encode(msg) -> bytes:
    """A registered message as bytes."""
    import msgpack
    if not dataclasses.is_dataclass(msg) or isinstance(msg, type):
        raise ProtocolError(f"only registered message types can be sent, not {type(msg).__name__}")
    wire = _to_wire(msg)
    return msgpack.packb({"v": VERSION, **wire}, use_bin_type=True)


# -- decode -----------------------------------------------------------------------------------------------------

def _ext_hook(code: int, data: bytes):
    import msgpack
    if code != _ARRAY_EXT:
        raise ProtocolError(f"unknown extension type {code}")
    try:
        dtype_name, shape, raw = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as err:
        raise ProtocolError(f"malformed array: {err}") from None
    if dtype_name not in _DTYPES:
        raise ProtocolError(f"array of dtype {dtype_name!r} refused (allowed: {', '.join(_DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ProtocolError(f"array shape {shape!r} is not a list of sizes")
    dtype = np.dtype(_bfloat16() if dtype_name == "bfloat16" else dtype_name)
    if not isinstance(raw, bytes) or len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ProtocolError(f"array {dtype_name}{shape} carries {len(raw) if isinstance(raw, bytes) else 'no'} "
                            "bytes, not what its shape needs")
    return np.frombuffer(raw, dtype).reshape(shape)


def _bfloat16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check(value, hint, where: str):
    """`value` as decoded from msgpack -> the value the annotation `hint` asks for, or ProtocolError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check(value, option, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: expected {_describe(hint)}, got {type(value).__name__}")
    if hint is type(None):
        if value is not None:
            raise ProtocolError(f"{where}: expected None, got {type(value).__name__}")
        return None
    if origin is typing.Literal:
        if value not in args:
            raise ProtocolError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ProtocolError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is np.ndarray:
        if not isinstance(value, np.ndarray):
            raise ProtocolError(f"{where}: expected an array, got {type(value).__name__}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint in (str, bytes):
        if not isinstance(value, hint):
            raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(value, where, expect=hint)
    raise ProtocolError(f"{where}: the annotation {_describe(hint)} has no wire form")


def _build(wire, where: str, expect: type | None = None):
    if not isinstance(wire, dict) or set(wire) - {"v"} != {"t", "b"}:
        raise ProtocolError(f"{where}: expected a typed message {{t, b}}, got {type(wire).__name__}")
    name, body = wire["t"], wire["b"]
    cls = _TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"{where}: unknown message type {name!r}")
    if expect is not None and cls is not expect:
        raise ProtocolError(f"{where}: expected {expect.__name__}, got {name}")
    if not isinstance(body, dict):
        raise ProtocolError(f"{name}: its body must be a map of fields")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(body) - set(fields))
    if unknown:
        raise ProtocolError(f"{name}: unknown field {unknown[0]!r} (fields: {', '.join(fields)})")
    values = {}
    for field_name, f in fields.items():
        if field_name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{name}: missing field {field_name!r}")
            continue
        values[field_name] = _check(body[field_name], hints[field_name], f"{name}.{field_name}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:  # the dataclass's own validation (a ConfigError is a ValueError)
        raise ProtocolError(f"{name}: {err}") from None


def decode(data: bytes | bytearray | memoryview):
    """Bytes -> the message they encode, checked against its type; ProtocolError when anything is off."""
    import msgpack
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        wire = msgpack.unpackb(bytes(data), raw=False, ext_hook=_ext_hook, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as err:  # noqa: BLE001 - msgpack raises several types for garbage; all mean "malformed"
        raise ProtocolError(f"not a message ({type(err).__name__}: {err})") from None
    if not isinstance(wire, dict):
        raise ProtocolError(f"not a message: a msgpack {type(wire).__name__}, not a map")
    if wire.get("v") != VERSION:
        raise ProtocolError(f"protocol version {wire.get('v')!r}, this node speaks {VERSION}")
    return _build(wire, "message")


# -- packet rows ------------------------------------------------------------------------------------------------

def row_bytes(hidden: int, dtype) -> int:
    """Bytes of one packet row: the hidden vector, then its local expert id (int32)."""
    return hidden * np.dtype(dtype).itemsize + 4


def pack_rows(rows, ids):
    """rows [cap, hidden] (any float dtype) and ids [cap] int32 -> uint8 [cap, hidden*itemsize + 4]."""
    import jax
    import jax.numpy as jnp
    cap = rows.shape[0]
    r = jax.lax.bitcast_convert_type(rows, jnp.uint8).reshape(cap, -1)
    i = jax.lax.bitcast_convert_type(ids.astype(jnp.int32), jnp.uint8).reshape(cap, 4)
    return jnp.concatenate([r, i], axis=1)


def unpack_rows(buf, hidden: int, dtype):
    """`pack_rows` undone: (rows [cap, hidden] dtype, ids [cap] int32)."""
    import jax
    import jax.numpy as jnp
    dtype = jnp.dtype(dtype)
    cap = buf.shape[0]
    nb = hidden * dtype.itemsize
    r = buf[:, :nb].reshape(cap, hidden, dtype.itemsize)
    rows = jax.lax.bitcast_convert_type(r if dtype.itemsize > 1 else r[..., 0], dtype)
    ids = jax.lax.bitcast_convert_type(buf[:, nb:].reshape(cap, 4), jnp.int32)
    return rows, ids
