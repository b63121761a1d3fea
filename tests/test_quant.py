"""The quant table, end to end: GGUF bytes -> our MLX layout -> float32, bit for bit
against gguf-py's `gguf.quants.dequantize` for every type the table holds."""

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from mlxllm.quant import QUANT_TABLE, QuantizedTensor, UnsupportedTypeError, layout_of, pack_bits, to_mlx
from quant_blocks import assert_bit_identical, random_blocks

# The issue's list: everything gguf-py can dequantize (NVFP4 arrived in gguf-py later).
REQUIRED = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K,
            Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS,
            Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0, Q.MXFP4]
TYPES = list(QUANT_TABLE)

# Affine layouts compute scale*q + bias; ggml computes d*(q - 8). Where q - 8 == 0 and d < 0
# ggml's product is -0.0 and MLX's sum is +0.0. Every nonzero value is identical; a zero's
# sign cannot change a dot product's nonzero sum. MXFP4's E2M1 code 0b1000 is -0 in MLX (the
# OCP spec) and integer 0 in ggml's table: the same.
SIGNED_ZERO_EXEMPT = {Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.MXFP4}


def test_table_covers_the_issue_list():
    assert set(REQUIRED) <= set(TYPES)


@pytest.mark.parametrize("edge", [False, True], ids=["scales", "edge_scales"])
@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_bit_exact(qtype, edge, quant_report):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = 64
    cols = max(block_size, 256) * 3  # several blocks and several groups of 32 per row
    raw = random_blocks(qtype, rows * cols // block_size, seed=7, edge=edge).reshape(rows, -1)
    ref = gguf_dequantize(raw, qtype).astype(np.float32)
    value = to_mlx(raw, qtype, (rows, cols))
    ours = value.dequantize() if isinstance(value, QuantizedTensor) else value.astype(mx.float32)
    ours = np.array(ours)
    assert ours.shape == (rows, cols)
    assert_bit_identical(ours, ref, signed_zero=qtype not in SIGNED_ZERO_EXEMPT)
    layout = layout_of(qtype)
    nbytes = value.nbytes if isinstance(value, QuantizedTensor) else value.nbytes
    quant_report[qtype.name] = (layout.kind, f"{8 * nbytes / (rows * cols):.3g}",
                                f"{8 * type_size / block_size:.3g}", "bit-exact" +
                                (" (sign of 0)" if qtype in SIGNED_ZERO_EXEMPT else ""))


@pytest.mark.parametrize("qtype", [t for t in TYPES if layout_of(t).kind in ("affine", "mxfp4")],
                         ids=lambda t: t.name)
def test_native_layouts_run_in_quantized_matmul(qtype):
    """The native layouts are what MLX's own quantized_matmul reads: same result as a dense
    matmul on the dequantized weight."""
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rows, cols = 48, 512
    raw = random_blocks(qtype, rows * cols // block_size, seed=3).reshape(rows, -1)
    w = to_mlx(raw, qtype, (rows, cols))
    x = mx.random.normal((5, cols), key=mx.random.key(0))
    got = mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True, group_size=32,
                              bits=w.bits, mode=w.mode)
    w_ref = gguf_dequantize(raw, qtype).astype(np.float32)
    want = np.array(x) @ w_ref.T
    # Two float32 sums of 512 products in different orders differ by up to ~n*eps times the
    # sum of |products| (not of the result, which can cancel to near zero).
    bound = 512 * np.finfo(np.float32).eps * (np.abs(np.array(x)) @ np.abs(w_ref).T)
    assert (np.abs(np.array(got) - want) <= bound).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_bits_is_mlx_order(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, (8, 128), dtype=np.uint8)
    w = mx.array(pack_bits(codes, bits))
    ones, zeros = mx.ones((8, 4)), mx.zeros((8, 4))
    np.testing.assert_array_equal(np.array(mx.dequantize(w, ones, zeros, group_size=32, bits=bits)), codes)


def test_native_types_keep_no_float_copy():
    raw = random_blocks(Q.Q4_0, 64 * 8, seed=1).reshape(64, -1)
    w = to_mlx(raw, Q.Q4_0, (64, 256))
    assert w.weight.dtype == mx.uint32 and w.weight.shape == (64, 256 * 4 // 32)
    assert w.nbytes < raw.nbytes * 1.5  # 4-bit codes + fp32 scale/bias per 32: 6 bits/weight


def test_unknown_type_is_a_clear_error():
    with pytest.raises(UnsupportedTypeError, match="I32 is not supported"):
        layout_of(Q.I32)
