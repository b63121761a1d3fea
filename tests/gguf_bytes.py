"""A byte-level GGUF builder for tests that need files no honest writer produces:
each header field is written as given, so a test can lie about any count or offset."""

from __future__ import annotations

import struct

from gguf import GGUFValueType as V

_FMT = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
        V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


class Raw(bytes):
    """A value written exactly as given, whatever its declared type says."""


def _value(vtype: V, value) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if vtype == V.STRING:
        return _str(value)
    if vtype == V.ARRAY:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_value(item_type, v) for v in items)
    return struct.pack("<" + _FMT[vtype], value)


def build(kvs=(), tensors=(), *, magic=b"GGUF", version=3, n_kv=None, n_tensors=None,
          alignment=32, data=b"") -> bytes:
    """kvs: (key, V, value); tensors: (name, ggml_dims, type_id, offset). `data` follows the
    header at the next multiple of `alignment`."""
    out = bytearray(magic + struct.pack("<IQQ", version,
                                        len(tensors) if n_tensors is None else n_tensors,
                                        len(kvs) if n_kv is None else n_kv))
    for key, vtype, value in kvs:
        out += _str(key) + struct.pack("<I", vtype) + _value(vtype, value)
    for name, dims, type_id, offset in tensors:
        out += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", type_id, offset)
    out += b"\0" * (-len(out) % alignment)
    return bytes(out + data)


ARCH = ("general.architecture", V.STRING, "llama")


def valid(n_floats: int = 64) -> bytes:
    """A well-formed file: one F32 tensor `t.weight` of n_floats zeros."""
    return build([ARCH], [("t.weight", [n_floats], 0, 0)], data=b"\0" * (4 * n_floats))
