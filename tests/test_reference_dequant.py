"""Bit-exactness of mlxllm.kernels.reference against gguf-py's numpy dequantizers."""

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from mlxllm.kernels.reference import DEQUANTIZE, dequantize
from quant_blocks import HALF_FIELDS, assert_bit_identical, random_blocks

N_BLOCKS = 4096

REQUIRED = [
    Q.Q2_K, Q.Q3_K, Q.Q6_K,
    Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS,
    Q.TQ1_0, Q.TQ2_0,
]
OPTIONAL = [Q.Q4_K, Q.Q5_K, Q.NVFP4]
TYPES = REQUIRED + OPTIONAL


def test_covers_required_types():
    assert set(TYPES) <= set(DEQUANTIZE)
    assert set(DEQUANTIZE) <= set(HALF_FIELDS)


@pytest.mark.parametrize("edge", [False, True], ids=["scales", "edge_scales"])
@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_blocks_bit_exact(qtype: Q, edge: bool):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, N_BLOCKS, seed=0, edge=edge)
    ref = gguf_dequantize(raw, qtype)
    ours = DEQUANTIZE[qtype](mx.array(raw))
    assert ours.dtype == mx.float32
    assert ours.shape == (N_BLOCKS, block_size)
    assert_bit_identical(np.asarray(ours), ref)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_dequantize_2d(qtype: Q):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 24, 5
    cols = blocks_per_row * block_size
    raw = random_blocks(qtype, rows * blocks_per_row, seed=1).reshape(rows, blocks_per_row * type_size)
    ref = gguf_dequantize(raw, qtype)
    assert ref.shape == (rows, cols)

    ours = dequantize(qtype, mx.array(raw), (rows, cols))
    assert ours.shape == (rows, cols) and ours.dtype == mx.float32
    assert_bit_identical(np.asarray(ours), ref)

    # the byte layout of `data` does not matter, only its total size
    flat = dequantize(qtype, mx.array(raw.reshape(-1)), (rows, cols))
    assert_bit_identical(np.asarray(flat), ref)


def test_dequantize_rejects_bad_shapes():
    block_size, type_size = GGML_QUANT_SIZES[Q.Q6_K]
    data = mx.zeros((4 * type_size,), dtype=mx.uint8)
    with pytest.raises(ValueError):
        dequantize(Q.Q6_K, data, (2, block_size + 1))
    with pytest.raises(ValueError):
        dequantize(Q.Q6_K, data, (3, block_size))
    with pytest.raises(NotImplementedError):
        dequantize(Q.Q8_0, data, (1, 32))
