"""The quant table: every GGML tensor type and how its blocks live in MLX.

Three ways a GGUF tensor can land in MLX:
- "float":  F32 / F16 / BF16 become plain arrays of the same dtype.
- "affine", "mxfp4": the block format is exactly one of MLX's own quantized layouts
  (`w = scale * q + bias` per group of 32, or OCP MX-FP4), so the codes are re-packed into
  MLX's bit order and no float copy of the weight ever exists. `mx.quantized_matmul` and
  `mx.dequantize` read them directly.
- "packed": everything MLX cannot express (sub-blocks of 16, codebooks, ternary packs) keeps
  the GGUF bytes unchanged, uint8 (rows, bytes_per_row). `mlxllm.kernels` reads them; its
  pure-MLX reference dequantizer is the portable path. On the CPU with mlxllm's kernels,
  2-D tensors of the native types stay packed too (`keeps_blocks_on_cpu`): the kernels
  there read GGUF blocks as stored, so memory is the file's.

Every converter below mirrors the block layout in ggml-quants.c / gguf-py's quants.py, and
the tests check each type bit for bit against `gguf.quants.dequantize`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType as T

from . import kernels

GROUP = 32  # every native GGUF layout here quantizes in groups of 32

# (codes uint8 (n_blocks, block_size), scales f32 (n_blocks, block_size/32), biases f32 | None)
Converted = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class Layout:
    """One row of the table."""

    kind: str  # "float" | "affine" | "mxfp4" | "packed"
    bits: int = 0  # code width in MLX's layout (affine / mxfp4)
    convert: Callable[[np.ndarray], Converted] | None = None  # GGUF blocks -> MLX groups


# -- block converters: GGUF blocks (n, type_size) uint8 -> MLX groups of 32 -------------------

def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian half fields (n, 2) -> float32 (n, 1)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml packs element i in the low nibble of qs[i], element i+16 in the high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (n, 32)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: bit j of the little-endian uint32 qh is the fifth bit of element j."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return bits << 4  # (n, 32)


def _q4_0(b: np.ndarray) -> Converted:  # dequantize_row_q4_0: d * (q - 8)
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), d, d * -8


def _q4_1(b: np.ndarray) -> Converted:  # dequantize_row_q4_1: d * q + m
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b: np.ndarray) -> Converted:  # dequantize_row_q5_0: d * (q - 16)
    d = _f16(b[:, :2])
    return _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6]), d, d * -16


def _q5_1(b: np.ndarray) -> Converted:  # dequantize_row_q5_1: d * q + m
    return _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b: np.ndarray) -> Converted:  # dequantize_row_q8_0: d * q, q int8 -> q + 128 unsigned
    d = _f16(b[:, :2])
    return b[:, 2:] ^ 0x80, d, d * -128


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4: eight 6-bit scales and mins packed in 12 bytes -> (n, 8) each."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 32-byte chunk k holds sub-block 2k (low nibbles) and 2k+1 (high)."""
    n = qs.shape[0]
    qs = qs.reshape(n, QK_K // 64, 1, 32)  # (n, 4, 1, 32)
    return ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, QK_K)


def _q4_k(b: np.ndarray) -> Converted:  # dequantize_row_q4_K: d*sc_j * q - dmin*m_j
    sc, mn = _k_scale_min(b[:, 4:16])
    return _k_low_nibbles(b[:, 16:]), _f16(b[:, :2]) * sc, -(_f16(b[:, 2:4]) * mn)


def _q5_k(b: np.ndarray) -> Converted:  # dequantize_row_q5_K: as Q4_K, plus bit j of qh for sub-block j
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # (n, 8, 32)
    codes = _k_low_nibbles(b[:, 48:]) | ((qh & 1) << 4).reshape(n, QK_K)
    return codes, _f16(b[:, :2]) * sc, -(_f16(b[:, 2:4]) * mn)


def _mxfp4(b: np.ndarray) -> Converted:
    # ggml's kvalues_mxfp4 are the E2M1 codes doubled, and its scale is e8m0 halved
    # (ggml_e8m0_to_fp32_half), so the nibble and exponent byte are MLX's mxfp4 as they are.
    return _nibbles(b[:, 1:]), b[:, :1], None


FLOAT = Layout("float")
PACKED = Layout("packed")

# Half-precision weights. On a GPU they load as MLX arrays. On the CPU, whose matmul wants
# float32, a matrix whose rows hold whole groups of 32 stays as stored, like a quantized
# type (`keeps_blocks_on_cpu`), and the block kernels widen it exactly as they read it:
# memory is the file's, not twice it. Elsewhere they load as float32.
HALF_TYPES = (T.F16, T.BF16)

QUANT_TABLE: dict[T, Layout] = {
    T.F32: FLOAT, T.F16: FLOAT, T.BF16: FLOAT,
    T.Q4_0: Layout("affine", 4, _q4_0),
    T.Q4_1: Layout("affine", 4, _q4_1),
    T.Q5_0: Layout("affine", 5, _q5_0),
    T.Q5_1: Layout("affine", 5, _q5_1),
    T.Q8_0: Layout("affine", 8, _q8_0),
    T.Q4_K: Layout("affine", 4, _q4_k),
    T.Q5_K: Layout("affine", 5, _q5_k),
    T.MXFP4: Layout("mxfp4", 4, _mxfp4),
    # Sub-blocks of 16, codebooks, ternary packs, and NVFP4's UE4M3 scale per 16: kept as
    # GGUF bytes for the GPU kernels. Each also has an exact image in wider native layouts
    # (kernels/widen.py), which the CPU uses; it costs more bits than the GGUF blocks.
    **{t: PACKED for t in (T.Q2_K, T.Q3_K, T.Q6_K, T.TQ1_0, T.TQ2_0, T.IQ1_S, T.IQ1_M,
                           T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS,
                           T.NVFP4)},
}


def cpu_blocks_mode() -> str:
    """MLXLLM_CPU_BLOCKS: "1" (the default: the types with dedicated kernels stay blocks),
    "all" (every type the kernels read stays blocks, memory = file; the types without
    dedicated kernels decode each block to floats, slower), "0" (MLX's affine / widened
    layouts); "int8" is "1" with int8 activations (`cpu_activations`), its older spelling."""
    choice = os.environ.get("MLXLLM_CPU_BLOCKS", "1")
    if choice not in ("0", "1", "int8", "all"):
        raise ValueError(f"MLXLLM_CPU_BLOCKS={choice!r}: expected 0, 1, int8 or all")
    return choice


CPU_ACTIVATIONS = ("float", "int16", "int8")


def cpu_activations() -> str:
    """MLXLLM_CPU_ACTIVATIONS: what the CPU kernels' products over GGUF blocks multiply.
    "int16" (the default): each activation row rounded per block of 32 to 16-bit integers
    (an element moves by at most 1/65534 of its block's largest), which meet the weights'
    integer codes in integer multiply-adds: 1.2-2.7x the float kernels' speed on one core,
    and the same agreement with llama.cpp's F32 logits as float activations (Gemma 3 270M
    Q4_K_M: 99.93% of 1532 positions either way); F16 / BF16, and builds without AVX2,
    multiply floats. "float": the activations as they are, each weight's dequantized value
    multiplied in (bit for bit the dequantized weight's product). "int8": llama.cpp's CPU
    arithmetic (8-bit blocks, integer dots; the types without them multiply floats), which
    moves Gemma 3's agreement with llama.cpp's F32 logits to 93%. MLXLLM_CPU_BLOCKS=int8
    means int8."""
    if cpu_blocks_mode() == "int8":
        return "int8"
    choice = os.environ.get("MLXLLM_CPU_ACTIVATIONS", "int16")
    if choice not in CPU_ACTIVATIONS:
        raise ValueError(f"MLXLLM_CPU_ACTIVATIONS={choice!r}: expected one of {', '.join(CPU_ACTIVATIONS)}")
    return choice


def keeps_blocks_on_cpu(qtype: T, shape: tuple[int, ...]) -> bool:
    """Whether a tensor loads as its GGUF blocks, unchanged, for mlxllm's CPU kernels
    (kernels/cpu/gguf.cpp): on MLX's CPU with the kernels built, for a 2-D tensor of a type
    with dedicated kernels there (every packed type on an AVX2 build; in int8 mode, the
    integer-dot types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS and
    MXFP4 on any build, the others multiplying float activations in either mode), and on
    the same terms F16 / BF16 matrices whose rows hold whole groups of 32 (`HALF_TYPES`).
    Memory is then the file's, and no affine scale/bias overhead is read. Experts (3-D) of those types
    too, where the build has the float kernels (`kernels.gather_matmul`; in int8 mode as
    well: the experts' products stay float; MLX's CPU gather_qmm read gpt-oss's MXFP4 experts
    at 75-98 ms a token). A build without them (NEON) keeps the widened image
    (kernels/widen.py) unless MLXLLM_CPU_BLOCKS=all: the block decoders run 3-20x slower per
    decoded token than the widened matvec (measured, one core), so there memory is traded
    for that speed.
    What the products multiply is `cpu_activations`'s choice."""
    cpu = kernels.cpu.active()
    if cpu is None or len(shape) not in (2, 3):
        return False
    choice = cpu_blocks_mode()
    if choice == "0":
        return False
    if qtype in HALF_TYPES:
        if shape[-1] % GROUP:  # the kernels read halves in blocks of 32
            return False
    elif QUANT_TABLE.get(qtype, FLOAT).kind not in ("affine", "mxfp4", "packed"):
        return False
    if len(shape) == 3:  # experts: gguf_gather_matmul multiplies float activations only
        return cpu.gguf_float_kernel(int(qtype))
    if choice == "all":
        return cpu.gguf_has_kernel(int(qtype))
    # A build without AVX2 (NEON) multiplies float activations through the block decoders,
    # 3-20x slower than the affine matvec: there only int8 mode keeps the blocks (of the
    # types with integer dots; the others multiply float activations in either mode).
    return cpu.gguf_float_kernel(int(qtype)) or (cpu_activations() == "int8" and cpu.gguf_integer_dots(int(qtype)))


def mode_of(qtype: T, weight: mx.array | None, widened: bool) -> str:
    """A quantized weight's layout: "widened" (parts), "packed" (GGUF blocks as uint8,
    which the native and half-precision types also take on the CPU, see
    `keeps_blocks_on_cpu`), else its type's kind."""
    if widened:
        return "widened"
    kind = QUANT_TABLE[qtype].kind
    blocks = kind in ("affine", "mxfp4", "float") and weight is not None and weight.dtype == mx.uint8
    return "packed" if blocks else kind


class UnsupportedTypeError(ValueError):
    pass


def layout_of(qtype: T) -> Layout:
    try:
        return QUANT_TABLE[qtype]
    except KeyError:
        known = ", ".join(t.name for t in QUANT_TABLE)
        raise UnsupportedTypeError(f"ggml type {qtype.name} is not supported (supported: {known})") from None


# -- MLX-side tensors ---------------------------------------------------------------------

@dataclass
class QuantizedTensor:
    """A weight kept in a quantized layout. `shape` is the logical float shape (rows, cols).

    affine / mxfp4: `weight` is MLX's packed uint32 codes, `scales`/`biases` per group of 32,
    ready for `mx.quantized_matmul`. packed: `weight` is the GGUF blocks as uint8
    (rows, bytes_per_row), read by `mlxllm.kernels`. widened: a packed type held as the
    native parts of its exact image (`kernels.widen`), `weight` is None.
    """

    qtype: T
    shape: tuple[int, ...]
    weight: mx.array | None
    scales: mx.array | None = None
    biases: mx.array | None = None
    parts: list | None = None  # kernels.widen.Part, for the widened layout

    @property
    def mode(self) -> str:
        return mode_of(self.qtype, self.weight, bool(self.parts))

    @property
    def bits(self) -> int:
        return QUANT_TABLE[self.qtype].bits

    @property
    def nbytes(self) -> int:
        arrays = [self.weight, self.scales, self.biases]
        arrays += [a for p in self.parts or () for a in (p.weight, p.scales, p.biases)]
        return sum(a.nbytes for a in arrays if a is not None)

    def dequantize(self) -> mx.array:
        """float32 of `shape`."""
        return kernels.dequantize(self).reshape(self.shape)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, cols) < 2**bits -> MLX's packing: one little-endian bit stream per row,
    element j at bits [j*bits, (j+1)*bits), viewed as uint32 (rows, cols*bits/32)."""
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8).view(np.uint32)
    if bits == 4:
        pairs = codes.reshape(rows, cols // 2, 2)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4), dtype=np.uint8).view(np.uint32)
    # Eight codes fill exactly `bits` bytes: build them in a uint64, keep the low bytes.
    eight = codes.reshape(rows, cols // 8, 8).astype(np.uint64)
    word = np.zeros((rows, cols // 8), np.uint64)
    for k in range(8):
        word |= eight[:, :, k] << np.uint64(bits * k)
    stream = word[..., None].view(np.uint8)[..., :bits]  # (rows, cols/8, bits) little-endian
    return np.ascontiguousarray(stream).reshape(rows, cols * bits // 8).view(np.uint32)


def _writable(a: mx.array) -> np.ndarray:
    """A numpy view onto a freshly evaluated MLX buffer, so converted chunks are written
    into MLX memory directly and no second full-size copy exists during loading."""
    mx.eval(a)
    view = np.array(a, copy=False)
    assert view.flags.writeable and view.flags.c_contiguous and 0 not in view.strides
    return view


CHUNK_BYTES = 1 << 22  # GGUF bytes converted per slice: bounds every temporary


def _affine_rows(layout: Layout, type_size: int, cols: int) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """GGUF rows (r, bytes_per_row) -> (packed codes, scales[, biases]) rows for MLX."""
    def convert(rows: np.ndarray) -> tuple[np.ndarray, ...]:
        r = rows.shape[0]
        codes, scales, biases = layout.convert(rows.reshape(-1, type_size))  # (n_blocks, ...)
        out = (pack_bits(codes.reshape(r, cols), layout.bits), scales.reshape(r, -1))
        return out if biases is None else (*out, biases.reshape(r, -1))
    return convert


def to_mlx(raw: np.ndarray, qtype: T, shape: tuple[int, ...],
           consumed: Callable[[int, int], None] | None = None, blocks: bool = False) -> mx.array | QuantizedTensor:
    """GGUF bytes (rows..., bytes_per_row) -> a plain MLX array or a QuantizedTensor.
    blocks: a quantized type stays GGUF blocks as stored (see `keeps_blocks_on_cpu`).

    Rows are converted in slices straight into MLX-owned buffers, and `consumed(start, end)`
    is told each byte range of `raw` that is done, so a caller reading from a memory map
    can drop those pages: loading never holds a tensor twice.
    """
    layout = layout_of(qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    raw2d = raw.reshape(rows, -1)  # (rows, bytes_per_row)
    groups = cols // GROUP
    blocks = blocks and qtype != T.F32
    if layout.kind == "float" and not blocks:
        # numpy has no bfloat16: BF16 travels as its bits and is viewed at the end.
        np_dtype = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[qtype]
        outputs = [((rows, cols), mx.float32 if qtype == T.F32 else mx.float16 if qtype == T.F16 else mx.uint16)]
        convert = lambda r: (r.view(np_dtype),)  # noqa: E731
    elif layout.kind == "packed" or blocks:
        outputs = [((rows, raw2d.shape[1]), mx.uint8)]
        convert = lambda r: (r,)  # noqa: E731
    else:
        outputs = [((rows, cols * layout.bits // 32), mx.uint32),
                   ((rows, groups), mx.uint8 if layout.kind == "mxfp4" else mx.float32)]
        if layout.kind == "affine":
            outputs.append(((rows, groups), mx.float32))
        convert = _affine_rows(layout, type_size, cols)

    arrays = [mx.zeros(s, d) for s, d in outputs]
    views = [_writable(a) for a in arrays]
    row_bytes = max(1, raw2d.shape[1])
    step = max(1, CHUNK_BYTES // row_bytes)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        for view, part in zip(views, convert(raw2d[r0:r1])):
            view[r0:r1] = part
        if consumed is not None:
            consumed(r0 * row_bytes, r1 * row_bytes)

    if layout.kind == "float" and not blocks:
        out = arrays[0].view(mx.bfloat16) if qtype == T.BF16 else arrays[0]
        return out.reshape(shape)
    return QuantizedTensor(qtype, tuple(shape), *arrays)
