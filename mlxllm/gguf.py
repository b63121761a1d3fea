"""GGUF reading: a strict, memory-mapped parser built on gguf-py's constants.

gguf-py's `GGUFReader` trusts every count and offset in the file (a hostile header can make
it slice past the end, loop for hours or alias two tensors onto one byte range), and it
builds a numpy view per string, which takes seconds on a 262k-token vocabulary. This parser
checks each size against the bytes that remain before it touches them, allocates nothing
from an unchecked number, and keeps tensor data as views into one read-only mmap.
Names, value types, block sizes and alignment come from gguf-py (`gguf.constants`), so the
format knowledge lives in one place: llama.cpp's Python twin. Writing uses gguf-py's
`GGUFWriter` directly.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

from .validation import one_line, quote

SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and predates every model in use
MAX_DIMS = 4  # GGML_MAX_DIMS in ggml.h
MAX_ARRAY_DEPTH = 4  # arrays of arrays are legal; nothing real nests deeper than 2

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT32: "f", GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "?",
}
_NUMPY_DTYPES = {t: np.dtype("<" + f) for t, f in _SCALAR_FORMATS.items()}
_NUMPY_DTYPES[GGUFValueType.BOOL] = np.dtype(np.bool_)


# tokenizer.ggml.model -> the algorithm's usual name (llama-vocab.cpp LLAMA_VOCAB_TYPE_*)
_TOKENIZER_KINDS = {"llama": "SPM", "gpt2": "BPE", "bert": "WPM", "t5": "UGM", "rwkv": "RWKV", "plamo2": "PLaMo-2"}


class GGUFError(ValueError):
    """A file that is not a readable GGUF; the message is one line naming the file, bounded
    in length (names from a corrupt file are quoted cut short)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: GGUF's ne[] reversed, last axis contiguous
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class Metadata(Mapping[str, Any]):
    """GGUF key/values; a key not found as written is looked up under the architecture
    prefix, so `meta.get("rope.freq_base", 1e4)` reads `llama.rope.freq_base`. gguf-py's
    key names (`gguf.Keys.Rope.FREQ_BASE`, "{arch}.rope.freq_base") are filled in with the
    file's architecture."""

    def __init__(self, values: dict[str, Any]):
        self._values = values
        self.architecture: str | None = values.get("general.architecture")

    def __getitem__(self, key: str) -> Any:
        if "{arch}" in key and self.architecture is not None:
            key = key.replace("{arch}", self.architecture)
        if key in self._values:
            return self._values[key]
        if self.architecture is not None:
            prefixed = f"{self.architecture}.{key}"
            if prefixed in self._values:
                return self._values[prefixed]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class _Cursor:
    """Bounds-checked little-endian reads from the mapped header."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, file has {self.size}")

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        fmt = "<" + _SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar(GGUFValueType.UINT64, what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp keeps vocab entries as raw bytes; a few real vocabularies hold
            # invalid UTF-8 pieces, so keep them readable rather than refuse the file.
            return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise self.fail(f"{what}: unknown value type {vtype}") from None
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(vtype, what)
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item_type = self.scalar(GGUFValueType.UINT32, what)
        count = self.scalar(GGUFValueType.UINT64, what)
        if item_type in _NUMPY_DTYPES:
            dtype = _NUMPY_DTYPES[GGUFValueType(item_type)]
            self.need(count * dtype.itemsize, f"{what} ({count} items)")
            items = np.frombuffer(self.buf, dtype, count, self.pos).copy()
            self.pos += count * dtype.itemsize
            return items
        # Every string or array item takes at least 8 bytes, so a count the rest of the
        # file cannot hold is refused before the loop starts.
        self.need(count * 8, f"{what} ({count} items)")
        if item_type == GGUFValueType.STRING:
            return self._strings(count, what)
        return [self.value(item_type, what, depth + 1) for _ in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        """A string array (vocabularies: 262k entries), read in one tight loop."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > size:
                break
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                break
            out.append(buf[pos:pos + n].decode("utf-8", errors="surrogateescape"))
            pos += n
        else:
            self.pos = pos
            return out
        self.pos = pos
        raise self.fail(f"truncated: {what} item {len(out)} runs past the end of the file")


class GGUFFile:
    """A GGUF file opened read-only: `metadata`, `tensors` (name -> TensorInfo) and
    `tensor_bytes(name)`, a zero-copy uint8 view of one tensor's blocks."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise GGUFError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise GGUFError(f"{self.path}: truncated: {size} bytes is smaller than a GGUF header")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self.file_size = size
        self._parse()

    # -- parsing ---------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._map, self.path)
        magic = cur.scalar(GGUFValueType.UINT32, "magic")
        if magic != GGUF_MAGIC:
            raise cur.fail(f"not a GGUF file (magic {bytes(self._map[:4])!r}, expected b'GGUF')")
        version = cur.scalar(GGUFValueType.UINT32, "version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                raise cur.fail("big-endian GGUF files are not supported")
            raise cur.fail(f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        n_tensors = cur.scalar(GGUFValueType.UINT64, "tensor count")
        n_kv = cur.scalar(GGUFValueType.UINT64, "metadata count")
        # A key/value takes at least 12 bytes and a tensor record at least 28: counts the
        # file cannot hold are refused before any list is sized by them.
        if n_kv * 12 + n_tensors * 28 > self.file_size - cur.pos:
            raise cur.fail(f"truncated or corrupt: header claims {n_kv} metadata entries and {n_tensors} "
                           f"tensors, more than {self.file_size} bytes can hold")

        values: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar(GGUFValueType.UINT32, f"type of {quote(key)}")
            if key in values:
                raise cur.fail(f"duplicate metadata key {quote(key)}")
            values[key] = cur.value(vtype, f"metadata {quote(key)}")
        self.metadata = Metadata(values)

        alignment = values.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment must be a power of two, got {alignment!r}")
        self.alignment = alignment

        infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i} name")
            if name in names:
                raise cur.fail(f"duplicate tensor {quote(name)}")
            names.add(name)
            n_dims = cur.scalar(GGUFValueType.UINT32, f"tensor {quote(name)} rank")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {quote(name)} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            ne = [cur.scalar(GGUFValueType.UINT64, f"tensor {quote(name)} shape") for _ in range(n_dims)]
            type_id = cur.scalar(GGUFValueType.UINT32, f"tensor {quote(name)} type")
            offset = cur.scalar(GGUFValueType.UINT64, f"tensor {quote(name)} offset")
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise cur.fail(f"tensor {quote(name)} has unknown ggml type id {type_id}") from None
            if qtype not in GGML_QUANT_SIZES:
                raise cur.fail(f"tensor {quote(name)} has ggml type {qtype.name}, which has no block layout")
            infos.append((name, tuple(reversed(ne)), qtype, offset))

        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in infos:
            self.tensors[name] = self._check_tensor(cur, name, shape, qtype, offset)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise cur.fail(f"tensors {quote(a)} and {quote(b)} overlap in the file")

    def _check_tensor(self, cur: _Cursor, name: str, shape: tuple[int, ...],
                      qtype: GGMLQuantizationType, offset: int) -> TensorInfo:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        # Python ints do not overflow, so compare the product against what could exist.
        n = 1
        for d in shape:
            n *= d
        if n > self.file_size * block_size:
            raise cur.fail(f"tensor {quote(name)} shape {list(shape)} is larger than the file could hold")
        if shape[-1] % block_size:
            raise cur.fail(f"tensor {quote(name)} row length {shape[-1]} is not a multiple of the {qtype.name} block size {block_size}")
        if offset % self.alignment:
            raise cur.fail(f"tensor {quote(name)} offset {offset} is not aligned to {self.alignment}")
        nbytes = n // block_size * type_size
        start = self.data_offset + offset
        if start + nbytes > self.file_size:
            raise cur.fail(f"truncated: tensor {quote(name)} needs bytes {start}..{start + nbytes}, file has {self.file_size}")
        return TensorInfo(name, shape, qtype, start, nbytes)

    # -- access ----------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.architecture
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no general.architecture in metadata")
        return arch

    def summary(self) -> dict[str, Any]:
        """What `mlxllm show` prints: the facts a user checks before running a file."""
        m = self.metadata
        types: dict[str, int] = {}
        for t in self.tensors.values():
            types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
        tok_model = m.get("tokenizer.ggml.model")
        return {
            "path": self.path,
            "architecture": m.architecture,
            "name": m.get("general.name"),
            "parameters": sum(t.n_elements for t in self.tensors.values()),
            "file_size": self.file_size,
            "context_length": m.get("context_length"),
            "embedding_length": m.get("embedding_length"),
            "layers": m.get("block_count"),
            "heads": m.get("attention.head_count"),
            "kv_heads": m.get("attention.head_count_kv", m.get("attention.head_count")),
            "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
            "tokenizer": _TOKENIZER_KINDS.get(tok_model, tok_model),
            "vocab_size": len(m.get("tokenizer.ggml.tokens", ())),
            "chat_template": "tokenizer.chat_template" in m,
            "gguf_version": self.version,
        }

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw blocks as a read-only uint8 view, shape (*rows, bytes_per_row)."""
        info = self.tensors[name]
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = info.shape[-1] // block_size * type_size
        flat = np.frombuffer(self._map, np.uint8, info.nbytes, info.offset)
        return flat.reshape(*info.shape[:-1], row_bytes)

    def release_through(self, end: int) -> None:
        """Drop every mapped page of tensor data before absolute offset `end` from this
        process's resident set. Call it while converting tensors in file order.

        The mapping is read-only and shared, so a dropped page is only re-mapped from the
        page cache if touched again. The whole prefix is dropped each time, not just the
        last tensor: the kernel maps whole page-cache folios on a fault (fault-around,
        large folios), which re-maps the tail of the tensor before as the next one is read.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        first = self.data_offset // page * page
        last = min(-(-end // page) * page, len(self._map))
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            pass  # views handed out by tensor_bytes() still alive: the GC closes it later

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
