"""Exact images of the packed GGUF types in MLX's native quantized layouts.

MLX's CPU backend runs no custom kernels, so a packed type (sub-blocks of 16, codebooks,
ternary packs, NVFP4's UE4M3 scales) can only be multiplied there by dequantizing it or by
re-expressing it in a layout MLX's own `quantized_matmul` reads. This module does the
latter wherever it can be done EXACTLY: every entry of `WIDEN` turns GGUF blocks into one or
two native matrices ("parts") whose `mx.dequantize` outputs, summed in float32, equal
`gguf.quants.dequantize` bit for bit (up to the sign of some zeros, listed per type below,
which cannot change any nonzero dot product). A wider layout costs memory (see
`bits_per_weight`); it buys a fused quantized matmul on every MLX backend.

Facts about MLX 0.32.4 this rests on (checked on this machine's CPU backend):
- affine: `w = scale * q + bias` per group of 32/64/128 along a row, bits 1, 2, 3, 4, 5, 6
  or 8, scales and biases float32 here, biases required. `mx.dequantize` computes it as a
  multiply then an add (not fused); either way every product below is exact, so the only
  rounding is the add.
- group_size=16 is NOT usable: `mx.quantize` rejects it; `mx.dequantize` computes it
  correctly; but `mx.quantized_matmul`'s CPU dispatch only has 32/64/128 (it throws
  "Quantization group size must be 32, 64 or 128." inside the evaluation, which often does
  not reach Python: the call silently returns garbage/uninitialised memory). So per-16 types
  take two group-32 parts, each holding every other sub-block of 16 and an exact zero (or
  an exact complement) on the others.
- mode "nvfp4" (group 16, E2M1 codes, one FP8 E4M3 scale byte per 16, no bias) decodes the
  scale byte as IEEE-style e4m3fn: bit 7 is a sign and 0x7F / 0xFF are NaN. GGUF's UE4M3
  ignores bit 7 and maps only 0x7F to 0, so 0x80..0xFE are re-encoded as byte & 0x7F, 0x7F
  as 0x00, and 0xFF (= 480, above e4m3fn's 448) as 240 twice: a second nvfp4 part that only
  a tensor holding a 0xFF scale byte gets (ggml's quantizer never writes bit 7).

Why each product is exact: an fp16 d has at most 11 significant bits (subnormal fp16 are
normal float32, and nothing here divides by more than 8), and the largest products are
IQ4_XS's d * (ls - 32) * code (11 + 5 + 8 bits) and Q6_K's d * sc * q (11 + 7 + 6): within
float32's 24. A sum `scale*q + bias` of two exact terms whose true value
is representable is then exact too; Q2_K's true value is not representable, but gguf-py
rounds the same two exact terms once (`dl*q - ml`) and so does the sum of our two parts.

Sign of zero: IEEE addition of x and -x gives +0, so an affine group whose zero point lies
inside its code range cannot give -0 where ggml's `d * (q - k)` does (d < 0). Types where
that happens for ordinary data: TQ1_0, TQ2_0, Q3_K, Q6_K, IQ4_XS (a sub-block scale of 0).
Every codebook type (IQ1/2/3/4) does it only when the block's fp16 d is +-0. Q2_K and NVFP4
are exact including every zero's sign.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType as T
from gguf import quants as gq

from ..quant import CHUNK_BYTES, _f16, _writable, pack_bits
from .source import codebook

__all__ = ["WIDEN", "Native", "Part", "Widening", "bits_per_weight", "dequantize", "matmul", "widen"]

_F32 = np.float32

# Float temporaries of a converter are a few times the weights of a chunk: bound those too.
CHUNK_WEIGHTS = 1 << 20

# (codes uint8 (n_blocks, block_size), scales (n_blocks, block_size/group) float32 or uint8,
#  biases float32 like scales, or None): one native part of n GGUF blocks.
Converted = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class Native:
    """One native MLX layout."""

    bits: int
    group_size: int = 32
    mode: str = "affine"

    @property
    def bits_per_weight(self) -> float:
        # affine: fp32 scale + fp32 bias per group; nvfp4: one fp8 scale byte per group.
        side = 64 if self.mode == "affine" else 8
        return self.bits + side / self.group_size


@dataclass(frozen=True)
class Widening:
    """One row of the table: the parts always produced, the converter, and for NVFP4 an
    extra part that only tensors containing a particular bit pattern need."""

    parts: tuple[Native, ...]
    convert: Callable[[np.ndarray], list[Converted]]  # GGUF blocks (n, type_size) -> per part
    extra: Native | None = None
    needs_extra: Callable[[np.ndarray], bool] | None = None  # blocks -> bool
    note: str = ""


class Part(NamedTuple):
    """Arguments for `mx.quantized_matmul(x, weight, scales, biases, transpose=True,
    group_size=group_size, bits=bits, mode=mode)` and `mx.dequantize`."""

    weight: mx.array
    scales: mx.array
    biases: mx.array | None
    bits: int
    group_size: int
    mode: str


# -- field decoding (as gguf-py's quants.py / ggml-quants.c) -------------------------------

def _u16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.uint16)


def _u32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.uint32)


def _bits(b: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8k) bits, bit i of byte j at 8j + i."""
    return np.unpackbits(np.ascontiguousarray(b), axis=-1, bitorder="little")


def _per_group(a: np.ndarray, groups: int) -> np.ndarray:
    """(n, 1) per-block value -> (n, groups)."""
    return np.broadcast_to(a, (a.shape[0], groups))


@functools.cache
def _ksign_bits() -> np.ndarray:
    """ksigns_iq2xs as (128, 8) int16 of +-1: 7 sign bits + parity bit."""
    bits = _bits(np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).reshape(128, 1))
    return (1 - 2 * bits.astype(np.int16)).reshape(128, 8)


def _signed_bits(b: np.ndarray) -> np.ndarray:
    """Explicit sign bytes (IQ2_S, IQ3_S) -> +-1 int16, one per element."""
    return 1 - 2 * _bits(b).astype(np.int16)


_IQ4_KVALUES = np.array(gq.IQ4_NL.kvalues, dtype=np.int16)


# -- k-quants --------------------------------------------------------------------------

def _q2_k_q(qs: np.ndarray) -> np.ndarray:
    """Q2_K 2-bit codes, (n, 16 sub-blocks, 16)."""
    n = qs.shape[0]
    q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return q.reshape(n, 16, 16)


def _q2_k(b: np.ndarray) -> list[Converted]:
    # dequantize_row_q2_K: y = (d*sc_j) * q - dmin*m_j per sub-block j of 16, rounded once.
    # Part 0 (6-bit): d * (sc_j*q) with bias -0.0, i.e. exactly the product dl*q including
    # the sign of a zero (sc_j*q <= 45). Part 1 (1-bit) is exactly -(dmin*m_j): per group of
    # 32 its bias is the sub-block with the smaller m, its scale the (exact) difference to
    # the other, coded 1 there. The float32 sum rounds the same two exact terms once.
    # With the smaller m as base every zero has the right sign too (see the module notes).
    n = b.shape[0]
    sc, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    scale, m = sc & 0x0F, sc >> 4  # (n, 16)
    codes0 = (scale[..., None] * _q2_k_q(qs)).reshape(n, QK_K)
    groups = QK_K // 32
    m_a, m_b = m[:, 0::2], m[:, 1::2]  # (n, 8): the two sub-blocks of each group of 32
    codes1 = np.stack([m_a > m_b, m_b > m_a], axis=-1).astype(np.uint8)  # (n, 8, 2)
    codes1 = np.repeat(codes1, 16, axis=-1).reshape(n, QK_K)
    m_lo, m_hi = np.minimum(m_a, m_b), np.maximum(m_a, m_b)
    bias1 = -(dmin * m_lo.astype(_F32))
    scale1 = -(dmin * (m_hi - m_lo).astype(_F32))
    zero = np.full((n, groups), -0.0, _F32)
    return [(codes0, _per_group(d, groups), zero), (codes1, scale1, bias1)]


def _q3_k(b: np.ndarray) -> list[Converted]:
    # dequantize_row_q3_K: y = (d*sc_j) * q, sc_j in [-32, 31], q in [-4, 3]. Over a group
    # of 32 the common scale is d and sc_j*q lies in [-124, 128]: one 8-bit part, code
    # sc_j*q + 124, bias -124*d. d*code <= 19 significant bits, exact.
    n = b.shape[0]
    hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lsc = (sc[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    hsc = (sc[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    scale = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).astype(np.int16) - 32  # (n, 16)
    ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    q = ql.reshape(n, 16, 16).astype(np.int16) - 4 * (1 - qh.reshape(n, 16, 16).astype(np.int16))
    codes = (scale[..., None] * q + 124).reshape(n, QK_K).astype(np.uint8)
    groups = QK_K // 32
    return [(codes, _per_group(d, groups), _per_group(d * _F32(-124), groups))]


def _q6_k(b: np.ndarray) -> list[Converted]:
    # dequantize_row_q6_K: y = (d*sc_j) * (q - 32), sc_j int8, q 6-bit. Two 6-bit parts: part
    # k holds the sub-blocks 2g+k (scale d*sc, bias -32*scale) and code 32 on the others,
    # which is exactly 0. (d*sc) * q <= 24 significant bits, exact.
    n = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    s = d * sc.view(np.int8).astype(_F32)  # (n, 16), exact
    lo = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << 4)).reshape(n, 8, 2, 16)  # (group, half, 16)
    parts = []
    for k in (0, 1):
        codes = np.full_like(q, 32)
        codes[:, :, k] = q[:, :, k]
        scale = s[:, k::2]
        parts.append((codes.reshape(n, QK_K), scale, scale * _F32(-32)))
    return parts


# -- ternary ---------------------------------------------------------------------------

def _ternary(digits: np.ndarray, d: np.ndarray) -> list[Converted]:
    # y = d * (q - 1): 2-bit code q, scale d, bias -d.
    groups = digits.shape[1] // 32
    return [(digits, _per_group(d, groups), _per_group(-d, groups))]


def _tq1_0(b: np.ndarray) -> list[Converted]:
    # dequantize_row_tq1_0: base-3 digits as ((q * 3^i mod 256) * 3) >> 8, values 0..2.
    n = b.shape[0]
    qs, qh, d = b[:, :48], b[:, 48:52], _f16(b[:, 52:54])
    pow3 = np.array([1, 3, 9, 27, 81], np.uint8)
    q0 = (qs[:, :32].reshape(n, 1, 32) * pow3.reshape(1, 5, 1)).reshape(n, 160)
    q1 = (qs[:, 32:].reshape(n, 1, 16) * pow3.reshape(1, 5, 1)).reshape(n, 80)
    q2 = (qh.reshape(n, 1, 4) * pow3[:4].reshape(1, 4, 1)).reshape(n, 16)
    q = np.concatenate([q0, q1, q2], axis=-1)  # uint8 products wrap mod 256 as in C
    digits = ((q.astype(np.uint16) * 3) >> 8).astype(np.uint8)
    return _ternary(digits, d)


def _tq2_0(b: np.ndarray) -> list[Converted]:
    # dequantize_row_tq2_0: 2-bit q in 0..3, y = d * (q - 1).
    n = b.shape[0]
    qs, d = b[:, :64], _f16(b[:, 64:66])
    q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return _ternary(q.reshape(n, QK_K), d)


# -- i-quants --------------------------------------------------------------------------

def _iq2_db(d: np.ndarray, ls: np.ndarray) -> np.ndarray:
    # db = d * (0.5 + ls) * 0.25 as gguf-py computes it: <= 16 significant bits, exact.
    return d * (_F32(0.5) + ls.astype(_F32)) * _F32(0.25)


def _iq2_one_part(v: np.ndarray, db: np.ndarray) -> list[Converted]:
    # y = db * v, v = grid * sign in {+-8, +-25, +-43}: code v + 43 (7 bits -> 8-bit part).
    return [((v + 43).astype(np.uint8), db, db * _F32(-43))]


def _iq2_two_parts(v: np.ndarray, db: np.ndarray) -> list[Converted]:
    # Per-16 scales db (n, 16): part k holds sub-blocks 2g+k; code 43 (exact 0) elsewhere.
    n = v.shape[0]
    v = v.reshape(n, 8, 2, 16)
    parts = []
    for k in (0, 1):
        codes = np.full(v.shape, 43, np.uint8)
        codes[:, :, k] = v[:, :, k] + 43
        scale = db[:, k::2]
        parts.append((codes.reshape(n, QK_K), scale, scale * _F32(-43)))
    return parts


def _iq2_xxs(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq2_xxs: per 32, 4 grid bytes + uint32 (4x7 sign indices | 4-bit scale).
    n = b.shape[0]
    d = _f16(b[:, :2])
    q = b[:, 2:66].reshape(n, 8, 8)
    aux = _u32(q[:, :, 4:]).reshape(n, 8)
    db = _iq2_db(d, aux >> 28)  # (n, 8)
    signs = _ksign_bits()[(aux[..., None] >> np.array([0, 7, 14, 21], np.uint32)) & 0x7F]  # (n, 8, 4, 8)
    grid = codebook(gq.IQ2_XXS)[q[:, :, :4]]  # (n, 8, 4, 8)
    return _iq2_one_part((grid * signs).reshape(n, QK_K), db)


def _iq2_xs(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq2_xs: uint16 (9-bit grid index | 7-bit sign index) per 8, 4-bit scale per 16.
    n = b.shape[0]
    d, qs, sc = _f16(b[:, :2]), _u16(b[:, 2:66]), b[:, 66:74]
    ls = np.stack([sc & 0x0F, sc >> 4], axis=-1).reshape(n, 16)
    signs = _ksign_bits()[qs >> 9]  # (n, 32, 8)
    grid = codebook(gq.IQ2_XS)[qs & 511]  # (n, 32, 8)
    return _iq2_two_parts((grid * signs).reshape(n, QK_K), _iq2_db(d, ls))


def _iq2_s(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq2_s: 10-bit grid index (qs | 2 bits of qh) per 8, explicit sign bits.
    n = b.shape[0]
    d, qs, sgn, qh, sc = _f16(b[:, :2]), b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
    ls = np.stack([sc & 0x0F, sc >> 4], axis=-1).reshape(n, 16)
    high = (qh.reshape(n, 8, 1) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4)) & 3
    idx = qs.astype(np.uint16) | (high.reshape(n, 32).astype(np.uint16) << 8)
    grid = codebook(gq.IQ2_S)[idx].reshape(n, QK_K)
    return _iq2_two_parts(grid * _signed_bits(sgn), _iq2_db(d, ls))


def _iq3_xxs(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq3_xxs: y = db * grid * sign, db = d * (0.5 + ls) * 0.5 per 32. The grid
    # values {4, 12, ..., 52, 62} are even: y = (2 db) * (grid/2 * sign), grid/2 * sign in
    # [-31, 31] -> 6-bit code + 31, scale 2 db, bias -31 * (2 db).
    n = b.shape[0]
    d, qs, aux = _f16(b[:, :2]), b[:, 2:66], _u32(b[:, 66:98])
    db = d * (_F32(0.5) + (aux >> 28).astype(_F32)) * _F32(0.5)  # (n, 8)
    signs = _ksign_bits()[(aux[..., None] >> np.array([0, 7, 14, 21], np.uint32)) & 0x7F]  # (n, 8, 4, 8)
    half_grid = codebook(gq.IQ3_XXS)[qs] >> 1  # (n, 64, 4)
    v = half_grid.reshape(n, 8, 4, 8) * signs
    scale = db * _F32(2)
    return [((v + 31).reshape(n, QK_K).astype(np.uint8), scale, scale * _F32(-31))]


def _iq3_s(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq3_s: y = db * grid * sign, db = d * (1 + 2 ls) per 32, grid values odd
    # 1..15: grid*sign = 2k + 1 with k in [-8, 7] -> 4-bit code k + 8, scale 2 db, bias -15 db.
    n = b.shape[0]
    d, qs, qh, sgn, sc = _f16(b[:, :2]), b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    ls = np.stack([sc & 0x0F, sc >> 4], axis=-1).reshape(n, 8)
    db = d * (1 + 2 * ls).astype(_F32)  # (n, 8), exact
    idx = qs.astype(np.uint16) | (_bits(qh).astype(np.uint16) << 8)  # (n, 64)
    v = codebook(gq.IQ3_S)[idx].reshape(n, QK_K) * _signed_bits(sgn)
    return [(((v + 15) >> 1).astype(np.uint8), db * _F32(2), db * _F32(-15))]


def _iq1_s(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq1_s: y = dl * (grid + delta), grid in {-1, 0, 1}, dl = d * (2 ls + 1) and
    # delta = +-1/8 per 32: 2-bit code grid + 1, scale dl, bias dl * (delta - 1).
    n = b.shape[0]
    d, qs, qh = _f16(b[:, :2]), b[:, 2:34], _u16(b[:, 34:50])
    dl = d * (2 * ((qh >> 12) & 7) + 1).astype(_F32)  # (n, 8), exact
    bias = dl * np.where((qh & 0x8000) == 0, _F32(-0.875), _F32(-1.125))
    high = (qh[..., None] >> np.array([0, 3, 6, 9], np.uint16)) & 7  # (n, 8, 4)
    idx = qs.astype(np.uint16) | (high.reshape(n, 32) << 8)
    codes = (codebook(gq.IQ1_S)[idx] + 1).reshape(n, QK_K).astype(np.uint8)
    return [(codes, dl, bias)]


def _iq1_m(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq1_m: y = d * (2 ls + 1) * (grid + delta), ls per 16, delta = +-1/8 per 8.
    # (2 ls + 1) * (8 grid + 8 delta) = p is odd in [-135, 135]: y = (d/4) * (p + 135)/2
    # - 135 d/8 -> one 8-bit part, code (p + 135)/2, scale d/4, bias -16.875 d.
    n = b.shape[0]
    qs, qh, sc = b[:, :32], b[:, 32:48], _u16(b[:, 48:56])  # sc (n, 4)
    d_bits = (sc >> 12) << np.array([0, 4, 8, 12], np.uint16)
    d = np.bitwise_or.reduce(d_bits, axis=-1).astype(np.uint16).view(np.float16).astype(_F32).reshape(n, 1)
    ls = ((sc[..., None] >> np.array([0, 3, 6, 9], np.uint16)) & 7).reshape(n, 16)
    nib = np.stack([qh & 0x0F, qh >> 4], axis=-1).reshape(n, 32)  # per 8: 3 index bits | delta bit
    idx = qs.astype(np.uint16) | ((nib & 7).astype(np.uint16) << 8)
    eighths = 8 * codebook(gq.IQ1_M)[idx] + np.where(nib & 8, -1, 1).astype(np.int16)[..., None]  # (n, 32, 8)
    p = (2 * ls.astype(np.int16) + 1).reshape(n, 16, 1) * eighths.reshape(n, 16, 16)
    codes = ((p + 135) >> 1).reshape(n, QK_K).astype(np.uint8)
    groups = QK_K // 32
    return [(codes, _per_group(d * _F32(0.25), groups), _per_group(d * _F32(-16.875), groups))]


def _iq4(idx: np.ndarray, dl: np.ndarray) -> list[Converted]:
    # y = dl * kvalue, kvalues in [-127, 113]: 8-bit code kvalue + 128, bias -128 dl.
    codes = (_IQ4_KVALUES[idx] + 128).astype(np.uint8)
    return [(codes, dl, dl * _F32(-128))]


def _iq4_nl(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq4_nl: low nibbles are elements 0..15, high nibbles 16..31.
    qs = b[:, 2:]
    return _iq4(np.concatenate([qs & 0x0F, qs >> 4], axis=-1), _f16(b[:, :2]))


def _iq4_xs(b: np.ndarray) -> list[Converted]:
    # dequantize_row_iq4_xs: 6-bit sub-block scale ls - 32 per 32, dl = d * (ls - 32) exact.
    n = b.shape[0]
    d, sh, sl, qs = _f16(b[:, :2]), _u16(b[:, 2:4]), b[:, 4:8], b[:, 8:136]
    low = np.stack([sl & 0x0F, sl >> 4], axis=-1).reshape(n, 8)
    high = ((sh >> np.arange(0, 16, 2, dtype=np.uint16)) & 3).astype(np.uint8)  # (n, 8)
    dl = d * ((low | (high << 4)).astype(np.int16) - 32).astype(_F32)
    qs = qs.reshape(n, 8, 16)
    idx = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, QK_K)
    return _iq4(idx, dl)


# -- NVFP4 -----------------------------------------------------------------------------

_NVFP4_480 = 0xFF  # UE4M3 1.875 * 2^8 (bit 7 ignored): twice e4m3 0x77 (240), above e4m3fn's max
_E4M3_240 = 0x77


def _nvfp4(b: np.ndarray) -> list[Converted]:
    # dequantize_row_nvfp4: y = ue4m3(s)/2 * kvalue, kvalues = E2M1 doubled, i.e. E2M1(code) *
    # UE4M3(s): MLX's nvfp4 with the scale byte re-encoded as e4m3fn. E2M1 code 8 is -0 in MLX
    # and +0 in ggml: written as code 0. Every product has <= 6 significant bits.
    n = b.shape[0]
    s, qs = b[:, :4], b[:, 4:36].reshape(n, 4, 8)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (n, 4, 16)
    codes[codes == 8] = 0
    big = s == _NVFP4_480
    s0 = np.where(s == 0x7F, 0, np.where(big, _E4M3_240, s & 0x7F)).astype(np.uint8)
    # The extra part: the 0xFF sub-blocks again at 240, elsewhere code 8 at scale 0, i.e. -0.0,
    # the one additive identity that keeps every sign.
    codes1 = np.where(big[..., None], codes, 8).astype(np.uint8)
    s1 = np.where(big, _E4M3_240, 0).astype(np.uint8)
    return [(codes.reshape(n, 64), s0, None), (codes1.reshape(n, 64), s1, None)]


def _nvfp4_needs_extra(b: np.ndarray) -> bool:
    return bool((b[:, :4] == _NVFP4_480).any())


# -- the table -------------------------------------------------------------------------

A32 = functools.partial(Native, group_size=32, mode="affine")

WIDEN: dict[T, Widening] = {
    T.Q2_K: Widening((A32(6), A32(1)), _q2_k, note="d*(sc*q) + 1-bit -(dmin*m)"),
    T.Q3_K: Widening((A32(8),), _q3_k, note="common scale d, code sc*q + 124"),
    T.Q6_K: Widening((A32(6), A32(6)), _q6_k, note="even / odd sub-blocks of 16"),
    T.TQ1_0: Widening((A32(2),), _tq1_0, note="ternary digit, bias -d"),
    T.TQ2_0: Widening((A32(2),), _tq2_0, note="q - 1, bias -d"),
    T.IQ1_S: Widening((A32(2),), _iq1_s, note="grid + 1, bias dl*(delta-1)"),
    T.IQ1_M: Widening((A32(8),), _iq1_m, note="odd eighths of d"),
    T.IQ2_XXS: Widening((A32(8),), _iq2_xxs, note="grid*sign + 43"),
    T.IQ2_XS: Widening((A32(8), A32(8)), _iq2_xs, note="grid*sign + 43, even / odd sub-blocks"),
    T.IQ2_S: Widening((A32(8), A32(8)), _iq2_s, note="grid*sign + 43, even / odd sub-blocks"),
    T.IQ3_XXS: Widening((A32(6),), _iq3_xxs, note="grid/2*sign + 31"),
    T.IQ3_S: Widening((A32(4),), _iq3_s, note="(grid*sign + 15)/2"),
    T.IQ4_NL: Widening((A32(8),), _iq4_nl, note="kvalue + 128"),
    T.IQ4_XS: Widening((A32(8),), _iq4_xs, note="kvalue + 128"),
    T.NVFP4: Widening((Native(4, 16, "nvfp4"),), _nvfp4, extra=Native(4, 16, "nvfp4"),
                      needs_extra=_nvfp4_needs_extra, note="scale byte as e4m3fn; 0xFF: a second part"),
}


def bits_per_weight(qtype: T) -> float:
    """Storage of the widened weight per weight, all parts with their scales and biases
    (NVFP4: without the extra part, which only a 0xFF scale byte brings; it doubles it)."""
    return sum(p.bits_per_weight for p in WIDEN[T(qtype)].parts)


def widen(qtype: T, raw: np.ndarray, shape: tuple[int, ...]) -> list[Part]:
    """GGUF bytes of a tensor (rows..., bytes_per_row) uint8 -> its native parts, whose
    dequantized sum is the tensor. Rows are converted in chunks straight into MLX buffers."""
    qtype = T(qtype)
    try:
        widening = WIDEN[qtype]
    except KeyError:
        known = ", ".join(t.name for t in WIDEN)
        raise ValueError(f"{qtype.name} has no exact native image (widenable: {known})") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    rows, cols = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    if cols % block_size:
        raise ValueError(f"{qtype.name}: row length {cols} is not a multiple of {block_size}")
    raw = np.asarray(raw).view(np.uint8)
    if raw.size != rows * (cols // block_size) * type_size:
        raise ValueError(f"{qtype.name}: {raw.size} bytes given, {shape} needs "
                         f"{rows * (cols // block_size) * type_size}")
    raw2d = raw.reshape(rows, -1)
    row_bytes = raw2d.shape[1]
    step = max(1, min(CHUNK_BYTES // max(1, row_bytes), CHUNK_WEIGHTS // cols))
    chunks = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    natives = list(widening.parts)
    if widening.extra is not None and any(
            widening.needs_extra(raw2d[r0:r1].reshape(-1, type_size)) for r0, r1 in chunks):
        natives.append(widening.extra)

    arrays, views = [], []
    for nat in natives:
        groups = cols // nat.group_size
        a = [mx.zeros((rows, cols * nat.bits // 32), mx.uint32),
             mx.zeros((rows, groups), mx.float32 if nat.mode == "affine" else mx.uint8)]
        if nat.mode == "affine":
            a.append(mx.zeros((rows, groups), mx.float32))
        arrays.append(a)
        views.append([_writable(x) for x in a])

    for r0, r1 in chunks:
        r = r1 - r0
        converted = widening.convert(raw2d[r0:r1].reshape(-1, type_size))
        for nat, view, (codes, scales, biases) in zip(natives, views, converted):
            view[0][r0:r1] = pack_bits(codes.reshape(r, cols), nat.bits)
            view[1][r0:r1] = scales.reshape(r, -1)
            if nat.mode == "affine":
                view[2][r0:r1] = biases.reshape(r, -1)

    return [Part(a[0], a[1], a[2] if len(a) > 2 else None, nat.bits, nat.group_size, nat.mode)
            for nat, a in zip(natives, arrays)]


def sum_in_order(arrays: Iterable[mx.array]) -> mx.array:
    """a0 + a1 + ...: per-part results add in part order, as the exactness argument assumes."""
    out = None
    for a in arrays:
        out = a if out is None else out + a
    return out


def dequantize(parts: list[Part]) -> mx.array:
    """The widened weight as float32 (rows, cols): the sum of the parts in order."""
    return sum_in_order(mx.dequantize(p.weight, p.scales, p.biases, group_size=p.group_size, bits=p.bits,
                                      mode=p.mode, dtype=mx.float32) for p in parts)


def matmul(x: mx.array, parts: list[Part]) -> mx.array:
    """x (..., in) @ W.T for the widened W (out, in): one quantized_matmul per part."""
    return sum_in_order(mx.quantized_matmul(x, p.weight, p.scales, p.biases, transpose=True,
                                            group_size=p.group_size, bits=p.bits, mode=p.mode) for p in parts)
