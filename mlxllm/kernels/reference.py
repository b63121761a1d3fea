"""Pure-MLX reference dequantizers for the GGUF quant types MLX cannot hold natively.

Each ``_<type>`` function maps raw GGUF blocks, a uint8 ``mx.array`` of shape
``(n_blocks, type_size)``, to float32 weights of shape ``(n_blocks, block_size)``.
They mirror gguf-py's numpy implementation (``gguf/quants.py``) op for op, in the
same float32 operation order, so their output is bit-identical to
``gguf.quants.dequantize``.  Codebooks (IQ grids, sign tables, non-linear value
tables) are taken from gguf-py at first use, never retyped here.

These are slow-but-obviously-right references (tests, CPU fallback), not a fast path.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import mlx.core as mx
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf import quants as gq

from .source import codebook

__all__ = ["DEQUANTIZE", "dequantize"]

_F32 = mx.float32

# Exactness note: fp16 scales carry 11 significant bits and every factor multiplied
# onto them (sub-block scales, codes, grid/kvalue entries) at most 12 more, so every
# product here is exact in float32 (<= 24 bits).  The only rounding step is the final
# `d * q - dm` subtraction of Q2_K/Q4_K/Q5_K, rounded once from exact operands, so
# an FMA or a different multiplication order (e.g. a fused GPU kernel) gives the same
# bits too.


# ---------------------------------------------------------------------------
# helpers


def _c(values, dtype, shape) -> mx.array:
    """Small constant (shift amounts, multipliers) reshaped for broadcasting."""
    return mx.array(list(values), dtype=dtype).reshape(shape)


def _half(b: mx.array) -> mx.array:
    """(n, 2k) uint8 little-endian fp16 fields -> (n, k) float32 (exact, incl. subnormals)."""
    return b.view(mx.float16).astype(_F32)


def _pm_one(bits: mx.array) -> mx.array:
    """0/1 sign bits -> +1.0/-1.0 float32 (same as gguf's np.where(signs == 0, 1, -1))."""
    return mx.where(bits == 0, mx.array(1.0, _F32), mx.array(-1.0, _F32))


@functools.cache
def _grid(cls: type) -> mx.array:
    """IQ codebook of a gguf-py quant class as (n_entries, entry_width) float32."""
    return mx.array(codebook(cls).astype("float32"))


@functools.cache
def _ksigns() -> mx.array:
    """ksigns_iq2xs (128,) uint8: 7 sign bits + parity bit."""
    return mx.array(list(gq.IQ2_XXS.ksigns), dtype=mx.uint8)


@functools.cache
def _kvalues(cls: type) -> mx.array:
    """Non-linear 4-bit value table (IQ4_NL / NVFP4 kvalues) as (16,) float32."""
    return mx.array(list(cls.kvalues), dtype=mx.int8).astype(_F32)


# ---------------------------------------------------------------------------
# k-quants


def _q2_k(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_q2_K
    n_blocks = blocks.shape[0]

    scales, qs, d, dmin = mx.split(blocks, [QK_K // 16, QK_K // 16 + QK_K // 4, QK_K // 16 + QK_K // 4 + 2], axis=1)

    d = _half(d)
    dmin = _half(dmin)

    # (n_blocks, 16, 1)
    dl = (d * (scales & 0xF).astype(_F32)).reshape((n_blocks, QK_K // 16, 1))
    ml = (dmin * (scales >> 4).astype(_F32)).reshape((n_blocks, QK_K // 16, 1))

    # (n_blocks, 2, 4, 32)
    qs = (qs.reshape((n_blocks, -1, 1, 32)) >> _c([0, 2, 4, 6], mx.uint8, (1, 1, 4, 1))) & 3
    # (n_blocks, 16, 16)
    qs = qs.reshape((n_blocks, QK_K // 16, 16)).astype(_F32)

    return (dl * qs - ml).reshape((n_blocks, QK_K))


def _q3_k(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_q3_K
    n_blocks = blocks.shape[0]

    hmask, qs, scales, d = mx.split(blocks, [QK_K // 8, QK_K // 8 + QK_K // 4, QK_K // 8 + QK_K // 4 + 12], axis=1)

    d = _half(d)

    # 16 6-bit scales: low nibbles in bytes 0..7, high 2-bit pairs in bytes 8..11
    lscales, hscales = mx.split(scales, [8], axis=1)
    # (n_blocks, 2, 8) -> (n_blocks, 16)
    lscales = (lscales.reshape((n_blocks, 1, 8)) >> _c([0, 4], mx.uint8, (1, 2, 1))).reshape((n_blocks, 16))
    # (n_blocks, 4, 4) -> (n_blocks, 16)
    hscales = (hscales.reshape((n_blocks, 1, 4)) >> _c([0, 2, 4, 6], mx.uint8, (1, 4, 1))).reshape((n_blocks, 16))
    scales = (lscales & 0x0F) | ((hscales & 0x03) << 4)
    scales = (scales.astype(mx.int8) - 32).astype(_F32)

    # (n_blocks, 16, 1)
    dl = (d * scales).reshape((n_blocks, 16, 1))

    # (n_blocks, 2, 4, 32)
    ql = qs.reshape((n_blocks, -1, 1, 32)) >> _c([0, 2, 4, 6], mx.uint8, (1, 1, 4, 1))
    # (n_blocks, 1, 8, 32)
    qh = hmask.reshape((n_blocks, -1, 1, 32)) >> _c(range(8), mx.uint8, (1, 1, 8, 1))
    # (n_blocks, 16, 16)
    ql = ql.reshape((n_blocks, 16, QK_K // 16)) & 3
    qh = qh.reshape((n_blocks, 16, QK_K // 16)) & 1
    qh = qh ^ 1  # the -4 offset applies when the hmask bit is 0
    q = (ql.astype(mx.int8) - (qh << 2).astype(mx.int8)).astype(_F32)

    return (dl * q).reshape((n_blocks, QK_K))


def _k_scale_min(scales: mx.array) -> tuple[mx.array, mx.array]:
    # ggml-quants.c get_scale_min_k4: 8 6-bit scales and 8 6-bit mins packed in 12 bytes
    n_blocks = scales.shape[0]
    # 3 x (n_blocks, 1, 4)
    d, m, m_d = mx.split(scales.reshape((n_blocks, 3, 4)), 3, axis=-2)

    sc = mx.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = mx.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)

    # (n_blocks, 8) each
    return sc.reshape((n_blocks, 8)), mn.reshape((n_blocks, 8))


def _q4_k(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_q4_K
    n_blocks = blocks.shape[0]

    d, dmin, scales, qs = mx.split(blocks, [2, 4, 4 + 12], axis=1)

    d = _half(d)
    dmin = _half(dmin)

    sc, m = _k_scale_min(scales)

    # (n_blocks, 8, 1)
    d = (d * sc.astype(_F32)).reshape((n_blocks, -1, 1))
    dm = (dmin * m.astype(_F32)).reshape((n_blocks, -1, 1))

    # (n_blocks, 4, 2, 32)
    qs = qs.reshape((n_blocks, -1, 1, 32)) >> _c([0, 4], mx.uint8, (1, 1, 2, 1))
    # (n_blocks, 8, 32)
    qs = (qs & 0x0F).reshape((n_blocks, -1, 32)).astype(_F32)

    return (d * qs - dm).reshape((n_blocks, QK_K))


def _q5_k(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_q5_K
    n_blocks = blocks.shape[0]

    d, dmin, scales, qh, qs = mx.split(blocks, [2, 4, 4 + 12, 4 + 12 + QK_K // 8], axis=1)

    d = _half(d)
    dmin = _half(dmin)

    sc, m = _k_scale_min(scales)

    # (n_blocks, 8, 1)
    d = (d * sc.astype(_F32)).reshape((n_blocks, -1, 1))
    dm = (dmin * m.astype(_F32)).reshape((n_blocks, -1, 1))

    # (n_blocks, 4, 2, 32)
    ql = qs.reshape((n_blocks, -1, 1, 32)) >> _c([0, 4], mx.uint8, (1, 1, 2, 1))
    # (n_blocks, 1, 8, 32)
    qh = qh.reshape((n_blocks, -1, 1, 32)) >> _c(range(8), mx.uint8, (1, 1, 8, 1))
    # (n_blocks, 8, 32)
    ql = (ql & 0x0F).reshape((n_blocks, -1, 32))
    qh = (qh & 0x01).reshape((n_blocks, -1, 32))
    q = (ql | (qh << 4)).astype(_F32)

    return (d * q - dm).reshape((n_blocks, QK_K))


def _q6_k(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_q6_K
    n_blocks = blocks.shape[0]

    ql, qh, scales, d = mx.split(blocks, [QK_K // 2, QK_K // 2 + QK_K // 4, QK_K // 2 + QK_K // 4 + QK_K // 16], axis=1)

    scales = scales.view(mx.int8).astype(_F32)
    d = _half(d)
    # (n_blocks, 16, 1)
    d = (d * scales).reshape((n_blocks, QK_K // 16, 1))

    # (n_blocks, 2, 2, 64) -> (n_blocks, 8, 32)
    ql = ql.reshape((n_blocks, -1, 1, 64)) >> _c([0, 4], mx.uint8, (1, 1, 2, 1))
    ql = (ql & 0x0F).reshape((n_blocks, -1, 32))
    # (n_blocks, 2, 4, 32) -> (n_blocks, 8, 32)
    qh = qh.reshape((n_blocks, -1, 1, 32)) >> _c([0, 2, 4, 6], mx.uint8, (1, 1, 4, 1))
    qh = (qh & 0x03).reshape((n_blocks, -1, 32))
    q = (ql | (qh << 4)).astype(mx.int8) - 32
    # (n_blocks, 16, 16)
    q = q.reshape((n_blocks, QK_K // 16, -1)).astype(_F32)

    return (d * q).reshape((n_blocks, QK_K))


# ---------------------------------------------------------------------------
# ternary


def _tq1_0(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_tq1_0: base-3 digits extracted as (q * 3^i * 3) >> 8 in uint8/uint16
    n_blocks = blocks.shape[0]

    qs, qh, d = mx.split(blocks, [(QK_K - 4 * QK_K // 64) // 5, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64], axis=1)

    d = _half(d)

    pow3 = _c([1, 3, 9, 27, 81], mx.uint8, (1, 1, 5, 1))
    qs0, qs1 = mx.split(qs, [32], axis=1)
    # (n_blocks, 1, 5, 32) -> (n_blocks, 160); uint8 products wrap mod 256 as in C
    qs0 = (qs0.reshape((n_blocks, -1, 1, 32)) * pow3).reshape((n_blocks, -1))
    # (n_blocks, 1, 5, 16) -> (n_blocks, 80)
    qs1 = (qs1.reshape((n_blocks, -1, 1, 16)) * pow3).reshape((n_blocks, -1))
    # (n_blocks, 1, 4, 4) -> (n_blocks, 16)
    qh = (qh.reshape((n_blocks, -1, 1, 4)) * _c([1, 3, 9, 27], mx.uint8, (1, 1, 4, 1))).reshape((n_blocks, -1))
    # (n_blocks, 256)
    qs = mx.concatenate([qs0, qs1, qh], axis=-1)
    qs = ((qs.astype(mx.uint16) * 3) >> 8).astype(mx.int8) - 1

    return d * qs.astype(_F32)


def _tq2_0(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_tq2_0
    n_blocks = blocks.shape[0]

    qs, d = mx.split(blocks, [QK_K // 4], axis=1)

    d = _half(d)

    # (n_blocks, 2, 4, 32) -> (n_blocks, 256)
    qs = qs.reshape((n_blocks, -1, 1, 32)) >> _c([0, 2, 4, 6], mx.uint8, (1, 1, 4, 1))
    qs = (qs & 0x03).reshape((n_blocks, -1)).astype(mx.int8) - 1

    return d * qs.astype(_F32)


# ---------------------------------------------------------------------------
# i-quants


def _iq2_xxs(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq2_xxs
    n_blocks = blocks.shape[0]

    d, qs = mx.split(blocks, [2], axis=1)

    d = _half(d)

    # (n_blocks, 8, 2): [4 grid indices as bytes, 4x7 sign bits | 4-bit scale]
    qs = qs.view(mx.uint32).reshape((n_blocks, -1, 2))

    db = d * (0.5 + (qs[..., 1] >> 28).astype(_F32)) * 0.25
    # (n_blocks, 8, 1, 1)
    db = db.reshape((n_blocks, -1, 1, 1))

    # (n_blocks, 8, 4) sign indices -> ksigns bytes -> (n_blocks, 8, 4, 8)
    signs = (qs[..., 1].reshape((n_blocks, -1, 1)) >> _c([0, 7, 14, 21], mx.uint32, (1, 1, 4))) & 0x7F
    signs = mx.take(_ksigns(), signs, axis=0)
    signs = _pm_one((signs.reshape((n_blocks, -1, 4, 1)) >> _c(range(8), mx.uint8, (1, 1, 1, 8))) & 1)

    # (n_blocks, 8, 4) grid indices -> (n_blocks, 8, 4, 8)
    grid = mx.take(_grid(gq.IQ2_XXS), qs[..., 0].view(mx.uint8).reshape((n_blocks, -1, 4)), axis=0)

    return (db * grid * signs).reshape((n_blocks, -1))


def _iq2_xs(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq2_xs
    n_blocks = blocks.shape[0]

    d, qs, scales = mx.split(blocks, [2, 2 + 2 * QK_K // 8], axis=1)

    d = _half(d)
    # (n_blocks, 32): 9-bit grid index | 7-bit sign index
    qs = qs.view(mx.uint16)

    # (n_blocks, 8, 2) -> (n_blocks, 16)
    scales = scales.reshape((n_blocks, -1, 1)) >> _c([0, 4], mx.uint8, (1, 1, 2))
    scales = (scales & 0x0F).reshape((n_blocks, -1))
    db = d * (0.5 + scales.astype(_F32)) * 0.25
    # (n_blocks, 16, 1, 1)
    db = db.reshape((n_blocks, -1, 1, 1))

    # (n_blocks, 32) -> (n_blocks, 32, 8) -> (n_blocks, 16, 2, 8)
    signs = mx.take(_ksigns(), qs >> 9, axis=0)
    signs = _pm_one((signs.reshape((n_blocks, -1, 1)) >> _c(range(8), mx.uint8, (1, 1, 8))) & 1)
    signs = signs.reshape((n_blocks, -1, 2, 8))

    # (n_blocks, 32, 8) -> (n_blocks, 16, 2, 8)
    grid = mx.take(_grid(gq.IQ2_XS), qs & 511, axis=0)
    grid = grid.reshape((n_blocks, -1, 2, 8))

    return (db * grid * signs).reshape((n_blocks, -1))


def _iq2_s(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq2_s
    n_blocks = blocks.shape[0]

    d, qs, signs, qh, scales = mx.split(
        blocks, [2, 2 + QK_K // 8, 2 + QK_K // 4, 2 + QK_K // 4 + QK_K // 32], axis=1
    )

    d = _half(d)

    # (n_blocks, 8, 2) -> (n_blocks, 16)
    scales = scales.reshape((n_blocks, -1, 1)) >> _c([0, 4], mx.uint8, (1, 1, 2))
    scales = (scales & 0x0F).reshape((n_blocks, -1))
    db = d * (0.5 + scales.astype(_F32)) * 0.25
    # (n_blocks, 16, 1, 1)
    db = db.reshape((n_blocks, -1, 1, 1))

    # (n_blocks, 32, 8) -> (n_blocks, 16, 2, 8)
    signs = _pm_one((signs.reshape((n_blocks, -1, 1)) >> _c(range(8), mx.uint8, (1, 1, 8))) & 1)
    signs = signs.reshape((n_blocks, -1, 2, 8))

    # (n_blocks, 8, 4) -> (n_blocks, 32) 10-bit grid indices
    qh = qh.reshape((n_blocks, -1, 1)) >> _c([0, 2, 4, 6], mx.uint8, (1, 1, 4))
    qs = qs.astype(mx.uint16) | ((qh & 0x03).astype(mx.uint16) << 8).reshape((n_blocks, -1))

    # (n_blocks, 32, 8) -> (n_blocks, 16, 2, 8)
    grid = mx.take(_grid(gq.IQ2_S), qs, axis=0)
    grid = grid.reshape((n_blocks, -1, 2, 8))

    return (db * grid * signs).reshape((n_blocks, -1))


def _iq3_xxs(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq3_xxs
    n_blocks = blocks.shape[0]

    d, qs, scales = mx.split(blocks, [2, 2 + QK_K // 4], axis=1)

    d = _half(d)
    # (n_blocks, 8): 4x7 sign bits | 4-bit scale
    scales = scales.view(mx.uint32)

    db = d * (0.5 + (scales >> 28).astype(_F32)) * 0.5
    # (n_blocks, 8, 1, 1)
    db = db.reshape((n_blocks, -1, 1, 1))

    # (n_blocks, 8, 4) sign indices -> ksigns bytes -> (n_blocks, 8, 4, 8)
    signs = (scales.reshape((n_blocks, -1, 1)) >> _c([0, 7, 14, 21], mx.uint32, (1, 1, 4))) & 0x7F
    signs = mx.take(_ksigns(), signs, axis=0)
    signs = _pm_one((signs.reshape((n_blocks, -1, 4, 1)) >> _c(range(8), mx.uint8, (1, 1, 1, 8))) & 1)

    # (n_blocks, 64, 4) -> (n_blocks, 8, 4, 8)
    grid = mx.take(_grid(gq.IQ3_XXS), qs, axis=0)
    grid = grid.reshape((n_blocks, -1, 4, 8))

    return (db * grid * signs).reshape((n_blocks, -1))


def _iq3_s(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq3_s
    n_blocks = blocks.shape[0]

    d, qs, qh, signs, scales = mx.split(
        blocks, [2, 2 + QK_K // 4, 2 + QK_K // 4 + QK_K // 32, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8], axis=1
    )

    d = _half(d)

    # (n_blocks, 4, 2) -> (n_blocks, 8)
    scales = scales.reshape((n_blocks, -1, 1)) >> _c([0, 4], mx.uint8, (1, 1, 2))
    scales = (scales & 0x0F).reshape((n_blocks, -1))
    db = d * (1 + 2 * scales).astype(_F32)
    # (n_blocks, 8, 1, 1)
    db = db.reshape((n_blocks, -1, 1, 1))

    # (n_blocks, 32, 8) -> (n_blocks, 8, 4, 8)
    signs = _pm_one((signs.reshape((n_blocks, -1, 1)) >> _c(range(8), mx.uint8, (1, 1, 8))) & 1)
    signs = signs.reshape((n_blocks, -1, 4, 8))

    # (n_blocks, 8, 8) -> (n_blocks, 64) 9-bit grid indices
    qh = qh.reshape((n_blocks, -1, 1)) >> _c(range(8), mx.uint8, (1, 1, 8))
    qh = (qh & 0x01).astype(mx.uint16).reshape((n_blocks, -1))
    qs = qs.astype(mx.uint16) | (qh << 8)

    # (n_blocks, 64, 4) -> (n_blocks, 8, 4, 8)
    grid = mx.take(_grid(gq.IQ3_S), qs, axis=0)
    grid = grid.reshape((n_blocks, -1, 4, 8))

    return (db * grid * signs).reshape((n_blocks, -1))


def _iq1_s(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq1_s
    n_blocks = blocks.shape[0]

    d, qs, qh = mx.split(blocks, [2, 2 + QK_K // 8], axis=1)

    d = _half(d)
    # (n_blocks, 8): 4x3 grid-index high bits | 3-bit scale | delta sign
    qh = qh.view(mx.uint16)

    dl = d * (2 * ((qh >> 12) & 7) + 1).astype(_F32)
    # (n_blocks, 8, 1, 1)
    dl = dl.reshape((n_blocks, -1, 1, 1))
    delta = mx.where((qh & 0x8000) == 0, mx.array(gq.IQ1_S.delta), mx.array(-gq.IQ1_S.delta))
    delta = delta.reshape((n_blocks, -1, 1, 1))

    # (n_blocks, 8, 4) -> (n_blocks, 32) 11-bit grid indices
    qh = qh.reshape((n_blocks, -1, 1)) >> _c([0, 3, 6, 9], mx.uint16, (1, 1, 4))
    qs = qs.astype(mx.uint16) | ((qh & 7) << 8).reshape((n_blocks, -1))

    # (n_blocks, 32, 8) -> (n_blocks, 8, 4, 8)
    grid = mx.take(_grid(gq.IQ1_S), qs, axis=0)
    grid = grid.reshape((n_blocks, -1, 4, 8))

    return (dl * (grid + delta)).reshape((n_blocks, -1))


def _iq1_m(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq1_m
    n_blocks = blocks.shape[0]

    qs, qh, scales = mx.split(blocks, [QK_K // 8, QK_K // 8 + QK_K // 16], axis=1)

    # (n_blocks, 4); the fp16 super-block scale is the top nibble of each of these
    scales = scales.view(mx.uint16)
    d = (scales.reshape((n_blocks, 4)) & 0xF000) >> _c([12, 8, 4, 0], mx.uint16, (1, 4))
    d = d[..., 0] | d[..., 1] | d[..., 2] | d[..., 3]
    # (n_blocks, 1)
    d = d.view(mx.float16).astype(_F32).reshape((n_blocks, 1))

    # (n_blocks, 4, 4) -> (n_blocks, 16) 3-bit sub-block scales
    scales = scales.reshape((n_blocks, -1, 1)) >> _c([0, 3, 6, 9], mx.uint16, (1, 1, 4))
    scales = (scales & 0x07).reshape((n_blocks, -1))
    dl = d * (2 * scales + 1).astype(_F32)
    # (n_blocks, 8, 2, 1, 1)
    dl = dl.reshape((n_blocks, -1, 2, 1, 1))

    # (n_blocks, 16, 2) -> (n_blocks, 32) 11-bit grid indices
    qh = qh.reshape((n_blocks, -1, 1)) >> _c([0, 4], mx.uint8, (1, 1, 2))
    qs = qs.astype(mx.uint16) | ((qh & 0x07).astype(mx.uint16) << 8).reshape((n_blocks, -1))

    delta = mx.where((qh & 0x08) == 0, mx.array(gq.IQ1_M.delta), mx.array(-gq.IQ1_M.delta))
    # (n_blocks, 8, 2, 2, 1)
    delta = delta.reshape((n_blocks, -1, 2, 2, 1))

    # (n_blocks, 32, 8) -> (n_blocks, 8, 2, 2, 8)
    grid = mx.take(_grid(gq.IQ1_M), qs, axis=0)
    grid = grid.reshape((n_blocks, -1, 2, 2, 8))

    return (dl * (grid + delta)).reshape((n_blocks, -1))


def _iq4_nl(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq4_nl
    n_blocks = blocks.shape[0]
    block_size = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL][0]

    d, qs = mx.split(blocks, [2], axis=1)

    d = _half(d)

    # (n_blocks, 1, 2, 16) -> (n_blocks, 32)
    qs = qs.reshape((n_blocks, -1, 1, block_size // 2)) >> _c([0, 4], mx.uint8, (1, 1, 2, 1))
    qs = (qs & 0x0F).reshape((n_blocks, -1))

    qs = mx.take(_kvalues(gq.IQ4_NL), qs, axis=0)

    return d * qs


def _iq4_xs(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_iq4_xs
    n_blocks = blocks.shape[0]

    d, scales_h, scales_l, qs = mx.split(blocks, [2, 4, 4 + QK_K // 64], axis=1)

    d = _half(d)
    # (n_blocks, 1)
    scales_h = scales_h.view(mx.uint16)

    # (n_blocks, 4, 2) -> (n_blocks, 8)
    scales_l = scales_l.reshape((n_blocks, -1, 1)) >> _c([0, 4], mx.uint8, (1, 1, 2))
    # (n_blocks, 8, 1) -> (n_blocks, 8)
    scales_h = scales_h.reshape((n_blocks, 1, -1)) >> _c(range(0, 2 * (QK_K // 32), 2), mx.uint16, (1, -1, 1))
    scales_l = scales_l.reshape((n_blocks, -1)) & 0x0F
    scales_h = scales_h.reshape((n_blocks, -1)).astype(mx.uint8) & 0x03

    scales = (scales_l | (scales_h << 4)).astype(mx.int8) - 32
    # (n_blocks, 8, 1)
    dl = (d * scales.astype(_F32)).reshape((n_blocks, -1, 1))

    # (n_blocks, 8, 2, 16) -> (n_blocks, 8, 32)
    qs = qs.reshape((n_blocks, -1, 1, 16)) >> _c([0, 4], mx.uint8, (1, 1, 2, 1))
    qs = qs.reshape((n_blocks, -1, 32)) & 0x0F

    qs = mx.take(_kvalues(gq.IQ4_NL), qs, axis=0)

    return (dl * qs).reshape((n_blocks, -1))


# ---------------------------------------------------------------------------
# fp4


def _ue4m3_to_fp32(x: mx.array) -> mx.array:
    # ggml-impl.h ggml_ue4m3_to_fp32, times 0.5 for the doubled-kvalues convention.
    # Mirrors gguf-py NVFP4.ue4m3_to_fp32 (bit 7 ignored, 0x7F -> 0). Every step is
    # exact in float32 (values have <= 4 significant bits), so order cannot matter;
    # 2**(exp - 7) is built from its exponent bits rather than via pow().
    exp = (x >> 3).astype(mx.int32) & 0xF
    man = (x & 0x7).astype(_F32)
    pow2 = ((exp + (127 - 7)) << 23).view(_F32)
    raw = mx.where(exp == 0, man * 2**-9, (1.0 + man / 8.0) * pow2)
    return mx.where((x == 0) | (x == 0x7F), mx.array(0.0, _F32), raw * 0.5)


def _nvfp4(blocks: mx.array) -> mx.array:
    # ggml-quants.c dequantize_row_nvfp4: 4 sub-blocks of 16 with a UE4M3 scale each
    n_blocks = blocks.shape[0]

    d, qs = mx.split(blocks, [4], axis=1)
    # (n_blocks, 4, 1)
    d = _ue4m3_to_fp32(d).reshape((n_blocks, 4, 1))

    # (n_blocks, 4, 8) -> (n_blocks, 4, 16): low nibbles first, then high nibbles
    qs = qs.reshape((n_blocks, 4, 8))
    vals = mx.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    vals = mx.take(_kvalues(gq.NVFP4), vals, axis=0)

    return (d * vals).reshape((n_blocks, 64))


# ---------------------------------------------------------------------------
# public interface

_Q = GGMLQuantizationType

DEQUANTIZE: dict[GGMLQuantizationType, Callable[[mx.array], mx.array]] = {
    _Q.Q2_K: _q2_k,
    _Q.Q3_K: _q3_k,
    _Q.Q4_K: _q4_k,
    _Q.Q5_K: _q5_k,
    _Q.Q6_K: _q6_k,
    _Q.IQ1_S: _iq1_s,
    _Q.IQ1_M: _iq1_m,
    _Q.IQ2_XXS: _iq2_xxs,
    _Q.IQ2_XS: _iq2_xs,
    _Q.IQ2_S: _iq2_s,
    _Q.IQ3_XXS: _iq3_xxs,
    _Q.IQ3_S: _iq3_s,
    _Q.IQ4_NL: _iq4_nl,
    _Q.IQ4_XS: _iq4_xs,
    _Q.TQ1_0: _tq1_0,
    _Q.TQ2_0: _tq2_0,
    _Q.NVFP4: _nvfp4,
}


def dequantize(qtype: GGMLQuantizationType, data: mx.array, shape: tuple[int, ...]) -> mx.array:
    """data: uint8 raw bytes (any shape whose total size is n_blocks*type_size); returns float32 of `shape` (GGUF/numpy order, i.e. rows x cols, last dim contiguous)."""
    qtype = GGMLQuantizationType(qtype)
    fn = DEQUANTIZE.get(qtype)
    if fn is None:
        raise NotImplementedError(f"no reference dequantizer for {qtype.name}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % block_size != 0:
        raise ValueError(f"{qtype.name}: last dim of {shape} is not a multiple of block size {block_size}")
    n_blocks = math.prod(shape) // block_size
    if data.dtype != mx.uint8:
        data = data.view(mx.uint8)
    if data.size != n_blocks * type_size:
        raise ValueError(
            f"{qtype.name}: {data.size} bytes given, {shape} needs {n_blocks} blocks x {type_size} = {n_blocks * type_size}"
        )
    return fn(data.reshape((n_blocks, type_size))).reshape(shape)
