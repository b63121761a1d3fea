"""Random GGUF blocks for every ggml type: every bit random except the scale fields,
which are set to finite values (a NaN or Inf scale is not a weight anyone stores)."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

# Byte offsets of the fp16 scale fields (d, dmin) inside one block (ggml-common.h).
# IQ1_M has no contiguous fp16 field (its d is spread over 4 nibbles, handled below);
# NVFP4's UE4M3 scale bytes decode to a finite value for every bit pattern in gguf-py
# (0x7F -> 0, bit 7 ignored), so they stay fully random.
HALF_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ1_S: (0,), Q.IQ1_M: (), Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,),
    Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
    Q.TQ1_0: (52,), Q.TQ2_0: (64,), Q.NVFP4: (), Q.MXFP4: (),
}
IQ1_M_SCALES = 48  # 4 x uint16; the top nibble of each holds 4 bits of the fp16 d
FLOATS = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}


def scale_bits(rng: np.random.Generator, n: int, edge: bool) -> np.ndarray:
    """fp16 bit patterns: random magnitudes in [1e-3, 10] of random sign, or (edge)
    any finite fp16 including +-0, subnormals and +-65504."""
    if edge:
        bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
        finite = (bits & 0x7C00) != 0x7C00
        return np.where(finite, bits, bits & 0x83FF)  # inf/nan -> same-sign subnormal
    mag = np.exp(rng.uniform(np.log(1e-3), np.log(10.0), size=n))
    sign = np.where(rng.integers(0, 2, size=n) == 0, 1.0, -1.0)
    return (mag * sign).astype(np.float16).view(np.uint16)


def random_blocks(qtype: Q, n_blocks: int, seed: int, edge: bool = False) -> np.ndarray:
    """(n_blocks, type_size) uint8: all bits random except finite scales."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng([seed, int(qtype), int(edge)])
    if qtype in FLOATS and edge and qtype != Q.F32:  # any finite value: +-0, subnormals, the largest
        bits = rng.integers(0, 1 << 16, size=n_blocks, dtype=np.uint32).astype(np.uint16)
        exponent = 0x7C00 if qtype == Q.F16 else 0x7F80
        bits = np.where((bits & exponent) != exponent, bits, bits & ~np.uint16(exponent))  # inf/nan -> subnormal
        return bits.view(np.uint8).reshape(n_blocks, 2)
    if qtype in FLOATS:
        values = rng.standard_normal(n_blocks).astype(np.float32) * 10
        if qtype == Q.BF16:  # truncate float32 to its top half: a finite bfloat16
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
        return values.astype(FLOATS[qtype]).view(np.uint8).reshape(n_blocks, type_size)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        raw[:, off:off + 2] = scale_bits(rng, n_blocks, edge).reshape(n_blocks, 1).view(np.uint8)
    if qtype == Q.IQ1_M:
        d = scale_bits(rng, n_blocks, edge).reshape(n_blocks, 1)
        sc = raw[:, IQ1_M_SCALES:IQ1_M_SCALES + 8].copy().view(np.uint16)  # (n_blocks, 4)
        nib = (d >> np.array([0, 4, 8, 12], dtype=np.uint16)) & 0xF
        sc = (sc & 0x0FFF) | (nib << 12).astype(np.uint16)
        raw[:, IQ1_M_SCALES:IQ1_M_SCALES + 8] = sc.view(np.uint8)
    if qtype == Q.MXFP4:
        # Exponents whose products stay finite (2**-64 .. 2**63). e8m0 255 is NaN in the OCP
        # MX spec (and in MLX) but 2**127 in ggml; no quantizer writes it.
        raw[:, 0] = rng.integers(64, 192, size=n_blocks, dtype=np.uint8)
    return raw


def with_zero_scales(qtype: Q, raw: np.ndarray) -> np.ndarray:
    """A copy of `raw` whose blocks alternate scales of +0 and -0 in every fp16 scale field:
    the sign of each zero weight then depends on the order the decoder multiplies in."""
    raw = raw.copy()
    zero = np.where(np.arange(raw.shape[0]) % 2 == 0, 0x0000, 0x8000).astype(np.uint16).reshape(-1, 1)
    for off in HALF_FIELDS[qtype]:
        raw[:, off:off + 2] = zero.view(np.uint8)
    if qtype == Q.IQ1_M:  # d's 16 bits are the top nibbles of the 4 scale words; sign in the last
        sc = raw[:, IQ1_M_SCALES:IQ1_M_SCALES + 8].copy().view(np.uint16) & 0x0FFF
        sc[:, 3:] |= zero
        raw[:, IQ1_M_SCALES:IQ1_M_SCALES + 8] = sc.view(np.uint8)
    return raw


def assert_bit_identical(ours: np.ndarray, ref: np.ndarray, signed_zero: bool = True) -> None:
    """Equal float32 bit patterns. signed_zero=False also accepts +0 for -0: see
    test_quant.py for the one layout where the sign of a zero differs."""
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    assert ours.shape == ref.shape
    assert np.isfinite(ref).all()
    diff = ours.view(np.uint32) != ref.view(np.uint32)
    if not signed_zero:
        diff &= ~((ours == 0) & (ref == 0))
    if diff.any():
        i = np.flatnonzero(diff.ravel())
        raise AssertionError(
            f"{i.size} of {diff.size} values differ; first at flat index {i[0]}: "
            f"ours={ours.ravel()[i[0]]!r} ref={ref.ravel()[i[0]]!r}"
        )
