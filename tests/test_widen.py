"""The packed GGUF types widened into MLX's native layouts (mlxllm/kernels/widen.py): the sum
of the parts' `mx.dequantize` is `gguf.quants.dequantize` bit for bit, `mx.quantized_matmul`
over the parts is a float matmul with the oracle, and the storage is what the table says."""

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from mlxllm.kernels import widen as widen_mod
from mlxllm.kernels.widen import WIDEN, bits_per_weight, dequantize, matmul, widen
from mlxllm.quant import QUANT_TABLE
from quant_blocks import HALF_FIELDS, IQ1_M_SCALES, random_blocks

TYPES = list(WIDEN)

# The sign of a zero, the one thing some layouts cannot carry. MLX computes scale*q + bias,
# and IEEE addition of x and -x is +0: where a group's zero point lies inside its code range,
# ggml's d*(q - k) = -0 for d < 0 comes out +0. Nonzero values are all identical, and a
# zero's sign cannot change a nonzero dot product.
# - Any zero of these types may come out +0 for ggml's -0 (ternary q = 1; Q3_K/Q6_K q at the
#   offset or a zero sub-block scale; IQ4_XS a sub-block scale ls - 32 = 0, whose 32 zeros carry
#   the mixed signs of the kvalues: no single affine group can give mixed-sign zeros).
ANY_ZERO = {Q.TQ1_0, Q.TQ2_0, Q.Q3_K, Q.Q6_K, Q.IQ4_XS}
# - Codebook types have no zero value: only a block whose fp16 d is +-0 is all zeros, of mixed
#   signs (sign of d times sign of the value), which the same argument rules out.
ZERO_SCALE = {Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL}
# - Q2_K and NVFP4 are exact including every zero's sign.

# Storage of the widened weight, bits per weight, all parts with their fp32 (affine) or fp8
# (nvfp4) scales and fp32 biases; and the number of parts.
EXPECTED = {
    Q.Q2_K: (11.0, 2), Q.Q3_K: (10.0, 1), Q.Q6_K: (16.0, 2), Q.TQ1_0: (4.0, 1), Q.TQ2_0: (4.0, 1),
    Q.IQ1_S: (4.0, 1), Q.IQ1_M: (10.0, 1), Q.IQ2_XXS: (10.0, 1), Q.IQ2_XS: (20.0, 2),
    Q.IQ2_S: (20.0, 2), Q.IQ3_XXS: (8.0, 1), Q.IQ3_S: (6.0, 1), Q.IQ4_NL: (10.0, 1),
    Q.IQ4_XS: (10.0, 1), Q.NVFP4: (4.5, 1),
}


def _sample(qtype, rows, seed, edge=False):
    block_size, _ = GGML_QUANT_SIZES[qtype]
    cols = max(block_size, 256) * 3  # several blocks and groups per row
    raw = random_blocks(qtype, rows * cols // block_size, seed=seed, edge=edge).reshape(rows, -1)
    return raw, cols


def _no_nvfp4_extra(raw):
    """NVFP4 scale byte 0xFF (UE4M3 480, which e4m3fn cannot hold) -> 0xFE: the common case."""
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[Q.NVFP4][1])
    blocks[:, :4][blocks[:, :4] == 0xFF] = 0xFE
    return raw


def _free_zero_signs(qtype, ref):
    """Where +0 may stand for ggml's -0 (see ANY_ZERO / ZERO_SCALE)."""
    if qtype in ANY_ZERO:
        return ref == 0
    if qtype in ZERO_SCALE:
        block_size, _ = GGML_QUANT_SIZES[qtype]
        zero_blocks = (ref.reshape(-1, block_size) == 0).all(axis=1)
        return np.repeat(zero_blocks, block_size).reshape(ref.shape)
    return np.zeros(ref.shape, bool)


def _assert_exact(ours, ref, free):
    """Equal float32 bits everywhere; at `free` positions both must be zero, of any sign."""
    assert ours.dtype == np.float32 and ref.dtype == np.float32 and ours.shape == ref.shape
    assert np.isfinite(ref).all()
    same_bits = ours.view(np.uint32) == ref.view(np.uint32)
    bad = ~same_bits & ~(free & (ours == 0) & (ref == 0))
    if bad.any():
        i = np.flatnonzero(bad.ravel())
        raise AssertionError(f"{i.size} of {bad.size} values differ; first at flat index {i[0]}: "
                             f"ours={ours.ravel()[i[0]]!r} ref={ref.ravel()[i[0]]!r}")
    return int((~same_bits).sum())  # zeros of the other sign


def test_every_packed_type_widens():
    packed = {t for t, layout in QUANT_TABLE.items() if layout.kind == "packed"}
    assert set(WIDEN) == packed
    assert set(EXPECTED) == packed
    assert ANY_ZERO | ZERO_SCALE <= packed and not ANY_ZERO & ZERO_SCALE


@pytest.mark.parametrize("edge", [False, True], ids=["scales", "edge_scales"])
@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_bit_exact(qtype, edge):
    raw, cols = _sample(qtype, 64, seed=7, edge=edge)
    ref = gguf_dequantize(raw, qtype).astype(np.float32)
    parts = widen(qtype, raw, (64, cols))
    ours = np.array(dequantize(parts))
    free = _free_zero_signs(qtype, ref)
    if qtype in ZERO_SCALE and not edge:
        assert not free.any()  # normal scales are never 0: these types are then exact in full
    _assert_exact(ours, ref, free)


@pytest.mark.parametrize("qtype", [t for t in TYPES if t != Q.NVFP4], ids=lambda t: t.name)
def test_zero_scales(qtype):
    """Blocks whose fp16 scales (d, and Q2_K's dmin) are +0 / -0, in every other row."""
    raw, cols = _sample(qtype, 32, seed=11, edge=True)
    even = raw[0::2].copy()
    blocks = even.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    signs = np.random.default_rng(int(qtype)).integers(0, 2, blocks.shape[0]).astype(np.uint16) << 15
    for off in HALF_FIELDS[qtype]:
        blocks[:, off:off + 2] = signs.view(np.uint8).reshape(-1, 2)
    if qtype == Q.IQ1_M:  # d's nibbles are the tops of four uint16; its sign bit is sc[3]'s top
        sc = blocks[:, IQ1_M_SCALES:IQ1_M_SCALES + 8].copy().view(np.uint16) & np.uint16(0x0FFF)
        sc[:, 3] |= signs
        blocks[:, IQ1_M_SCALES:IQ1_M_SCALES + 8] = sc.view(np.uint8)
    raw[0::2] = even
    ref = gguf_dequantize(raw, qtype).astype(np.float32)
    assert (ref[0::2] == 0).all() and (ref[1::2] != 0).any()
    ours = np.array(dequantize(widen(qtype, raw, (32, cols))))
    _assert_exact(ours, ref, _free_zero_signs(qtype, ref))


def test_q2_k_zero_signs_are_exact():
    """Q2_K keeps even the sign of every zero: no exemption, and the data has such zeros."""
    raw, cols = _sample(Q.Q2_K, 64, seed=5)
    ref = gguf_dequantize(raw, Q.Q2_K).astype(np.float32)
    assert (np.signbit(ref) & (ref == 0)).any() and (~np.signbit(ref) & (ref == 0)).any()
    ours = np.array(dequantize(widen(Q.Q2_K, raw, (64, cols))))
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("with_ff", [False, True], ids=["e4m3_scales", "scale_0xFF"])
def test_nvfp4_extra_part_only_for_0xff(with_ff):
    """GGUF's UE4M3 byte 0xFF decodes to 480 (bit 7 ignored), beyond e4m3fn: only a tensor with
    such a byte gets the second part (240 twice); every other byte maps into one part."""
    raw, cols = _sample(Q.NVFP4, 32, seed=2)
    if not with_ff:
        raw = _no_nvfp4_extra(raw)
    assert ((raw.reshape(-1, 36)[:, :4] == 0xFF).any()) == with_ff
    parts = widen(Q.NVFP4, raw, (32, cols))
    assert len(parts) == (2 if with_ff else 1)
    assert all(p.mode == "nvfp4" and p.group_size == 16 and p.biases is None for p in parts)
    ref = gguf_dequantize(raw, Q.NVFP4).astype(np.float32)
    np.testing.assert_array_equal(np.array(dequantize(parts)).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_quantized_matmul(qtype):
    """mx.quantized_matmul over the parts == x @ oracle.T within float32 summation error."""
    rows, cols = 48, 512
    block_size, _ = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, rows * cols // block_size, seed=3).reshape(rows, -1)
    parts = widen(qtype, raw, (rows, cols))
    x = mx.random.normal((3, cols), key=mx.random.key(int(qtype)))
    got = np.array(matmul(x, parts))
    assert got.shape == (3, rows) and got.dtype == np.float32
    w_ref = gguf_dequantize(raw, qtype).astype(np.float64)
    x64 = np.array(x).astype(np.float64)
    want = x64 @ w_ref.T
    # quantized_matmul sums x*(scale*q) and x*bias terms per part, in its own order: the error
    # is at most ~n*eps times the sum of those terms' magnitudes.
    mags = 0
    for p in parts:
        scales = mx.abs(p.scales) if p.mode == "affine" else p.scales
        biases = mx.abs(p.biases) if p.biases is not None else None
        m = mx.abs(mx.dequantize(p.weight, scales, biases, group_size=p.group_size, bits=p.bits,
                                 mode=p.mode, dtype=mx.float32))
        mags = mags + np.abs(x64) @ np.array(m).astype(np.float64).T
    bound = 2 * cols * np.finfo(np.float32).eps * mags
    assert (np.abs(got - want) <= bound).all()
    # and it is a real product, not a near-zero one
    assert np.abs(want).max() > 0


def test_chunked_conversion_matches(monkeypatch):
    """Rows converted a few at a time land in the same buffers as in one go."""
    raw, cols = _sample(Q.IQ2_XS, 40, seed=9)
    whole = widen(Q.IQ2_XS, raw, (40, cols))
    monkeypatch.setattr(widen_mod, "CHUNK_WEIGHTS", cols * 3)  # 14 chunks
    chunked = widen(Q.IQ2_XS, raw, (40, cols))
    for a, b in zip(whole, chunked):
        for x, y in zip(a[:3], b[:3]):
            np.testing.assert_array_equal(np.array(x), np.array(y))


def test_not_widenable_is_a_clear_error():
    with pytest.raises(ValueError, match="Q4_K has no exact native image"):
        widen(Q.Q4_K, np.zeros((1, 144), np.uint8), (1, 256))


def test_bits_per_weight(capsys):
    lines = [f"{'type':<9}{'parts':>6}{'bits':>8}{'group':>7}{'widened bpw':>13}{'GGUF bpw':>10}"]
    for qtype in TYPES:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        raw, cols = _sample(qtype, 16, seed=1)
        if qtype == Q.NVFP4:
            raw = _no_nvfp4_extra(raw)
        parts = widen(qtype, raw, (16, cols))
        nbytes = sum(a.nbytes for p in parts for a in p[:3] if a is not None)
        measured = 8 * nbytes / (16 * cols)
        bpw, n_parts = EXPECTED[qtype]
        assert len(parts) == n_parts
        assert bits_per_weight(qtype) == measured == bpw
        lines.append(f"{qtype.name:<9}{len(parts):>6}{'+'.join(str(p.bits) for p in parts):>8}"
                     f"{parts[0].group_size:>7}{measured:>13.4g}{8 * type_size / block_size:>10.4g}")
    with capsys.disabled():
        print("\nwidened layouts (bits per weight incl. scales and biases):\n" + "\n".join(lines))


# ---------------------------------------------------------------------------- through the layers

@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q2_K, Q.IQ4_XS, Q.IQ2_XS, Q.TQ1_0, Q.NVFP4], ids=lambda t: t.name)
def test_widened_layers_match_the_packed_reference(qtype):
    # The CPU loads packed types widened: the layers and the dispatch must give what the
    # packed reference gives (decode rows through quantized_matmul, prefill rows through the
    # dequantized weight, embedding rows bit for bit).
    from mlxllm import kernels
    from mlxllm.layers import QuantizedEmbedding, QuantizedLinear
    from mlxllm.quant import QuantizedTensor

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = 40, 2 * 256
    raw = random_blocks(qtype, rows * cols // block_size, seed=3).reshape(rows, -1)
    oracle = gguf_dequantize(raw, qtype)
    widened = QuantizedTensor(qtype, (rows, cols), None, parts=widen(qtype, raw, (rows, cols)))
    packed = QuantizedTensor(qtype, (rows, cols), mx.array(raw))
    assert widened.mode == "widened" and packed.mode == "packed"
    assert widened.nbytes == sum(p.weight.nbytes + p.scales.nbytes + (p.biases.nbytes if p.biases is not None else 0)
                                 for p in widened.parts)

    linear, embedding = QuantizedLinear(widened), QuantizedEmbedding(widened)
    assert linear.mode == "widened" and len(linear.parts) == len(widened.parts)
    for n in (1, 3, 16):  # decode (quantized_matmul per part) and prefill (dequantize + BLAS)
        x = mx.array(np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32))
        expected = np.asarray(x).astype(np.float64) @ oracle.astype(np.float64).T
        bound = np.abs(np.asarray(x)).astype(np.float64) @ np.abs(oracle).astype(np.float64).T
        for got in (linear(x), embedding.as_linear(x)):
            assert np.all(np.abs(np.asarray(got) - expected) <= 1e-5 * bound + 1e-30)
        # The packed blocks on the CPU kernels' integer path round x to 8 bits per block of
        # 32 or 256 first (llama.cpp's arithmetic): within half a step of the largest |x|.
        integer = kernels.cpu.active() is not None and kernels.cpu.KERNELS.gguf_integer_dots(int(qtype)) and n <= 16
        step = np.abs(np.asarray(x)).max(axis=1, keepdims=True) / 127 if integer else 0
        got = np.asarray(kernels.matmul(x, packed))
        assert np.all(np.abs(got - expected) <= 1e-5 * bound + step / 2 * np.abs(oracle).sum(axis=1) + 1e-30)
    ids = mx.array([[5, 0, 39, 5]])
    got = np.asarray(embedding(ids))
    assert got.shape == (1, 4, cols)
    np.testing.assert_array_equal(got[0], oracle[[5, 0, 39, 5]])  # == also equates +0 and -0
    np.testing.assert_array_equal(np.asarray(kernels.dequantize(widened)), oracle)
