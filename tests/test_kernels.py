"""The Metal/CUDA kernels' shared math, checked without a GPU.

- blocks/*.h compiled for the host (kernel_host.py): every packed type's decoder equals
  gguf.quants.dequantize bit for bit, and the fused row-dot loop equals
  dequantize-then-matmul within float tolerance, batch 1 to 8, and over chosen experts.
- The Metal and CUDA kernel sources, wrapped exactly as mx.fast.metal_kernel /
  mx.fast.cuda_kernel wrap them, compile: CUDA with nvcc (skipped where it is absent),
  Metal through a syntax check with g++ and a header declaring the Metal names they use.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from kernel_host import host_kernels
from mlxllm.kernels.cuda import CUDA
from mlxllm.kernels.gpu import SOURCES
from mlxllm.kernels.metal import METAL
from mlxllm.kernels.source import KERNEL_NAMES, kernel_types, table
from quant_blocks import assert_bit_identical, random_blocks, with_zero_scales

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


@pytest.mark.parametrize("scales", ["scales", "edge_scales", "zero_scales"])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_shared_decoder_bit_exact(host, qtype, scales):
    raw = random_blocks(qtype, 2048, seed=7, edge=scales == "edge_scales")
    if scales == "zero_scales":  # +-0 scales: the sign of each zero output checks operation order
        raw = with_zero_scales(qtype, raw)
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


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_gather_rowdot_reads_the_chosen_experts(host, qtype):
    """The gather kernel's indexing: each (row, chosen expert) slot against that expert's
    weight; repeated choices; an index past the experts is NaN."""
    block_size, _ = GGML_QUANT_SIZES[qtype]
    experts, out_features, in_features = 4, 8, 2 * 256
    raw = random_blocks(qtype, experts * out_features * in_features // block_size, seed=5)
    weight = gguf_dequantize(raw, qtype).astype(np.float64).reshape(experts, out_features, in_features)
    x = np.random.default_rng(5).standard_normal((3, in_features)).astype(np.float32)
    indices = np.array([[3, 0], [1, 1], [2, experts]])
    ours = host.gather_matvec(qtype, raw.reshape(experts, out_features, -1), x, indices)
    for n, j in np.ndindex(*indices.shape):
        e = indices[n, j]
        if e == experts:
            assert np.isnan(ours[n, j]).all()
            continue
        expected = weight[e] @ x[n].astype(np.float64)
        scale = np.abs(weight[e]) @ np.abs(x[n]).astype(np.float64)
        assert np.all(np.abs(ours[n, j] - expected) <= 1e-5 * scale + 1e-30), (qtype.name, n, j)


def test_codebook_layouts():
    # The byte offsets blocks/iquants.h reads its sign masks and codebooks at.
    from gguf import GGMLQuantizationType as Q
    sizes = {Q.IQ2_XXS: 2048 + 128, Q.IQ2_XS: 4096 + 128, Q.IQ2_S: 8192, Q.IQ3_XXS: 1024 + 128,
             Q.IQ3_S: 2048, Q.IQ1_S: 2048 * 8, Q.IQ1_M: 2048 * 8, Q.IQ4_NL: 16, Q.IQ4_XS: 16, Q.NVFP4: 16}
    for qtype, size in sizes.items():
        assert table(qtype).size == size, qtype.name
    assert table(Q.Q6_K).size == 1


# ---------------------------------------------------------------------------- compile checks

SHIMS = Path(__file__).parent / "shims"
METAL_ATTRIBUTES = ("thread_position_in_grid", "thread_index_in_simdgroup")  # those our kernels use


def _kernel_parts(kind: str, qtype) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(inputs, outputs) as (name, element type) in the order gpu.py passes them."""
    types = {"w": "uint8_t", "x": "float", "indices": "uint32_t", "table": "uint8_t"}
    return [(name, types[name]) for name in SOURCES[kind][1]], [("out", "float")]


def metal_translation_unit(kind: str, qtype) -> str:
    """What mx.fast.metal_kernel hands the Metal compiler: its preamble, our header, then a
    generated [[kernel]] signature (inputs, their _shape where the body names it, outputs,
    the thread attributes the body names) around our body."""
    body = SOURCES[kind][0](METAL, qtype)
    inputs, outputs = _kernel_parts(kind, qtype)
    params, slot = [], 0
    for name, ctype in inputs:
        params.append(f"  const device {ctype}* {name} [[buffer({slot})]]")
        slot += 1
        if f"{name}_shape" in body:
            params.append(f"  const constant int* {name}_shape [[buffer({slot})]]")
            slot += 1
    for name, ctype in outputs:
        params.append(f"  device {ctype}* {name} [[buffer({slot})]]")
        slot += 1
    for attribute in METAL_ATTRIBUTES:
        if attribute in body:
            kind_of = "uint3" if attribute.startswith("thread_position") else "uint"
            params.append(f"  {kind_of} {attribute} [[{attribute}]]")
    return ("#include <metal_stdlib>\nusing namespace metal;\ntypedef bfloat bfloat16_t;\ntypedef half float16_t;\n"
            + METAL.header() + f"\n[[kernel]] void custom_kernel_mlxllm_{kind}(\n" + ",\n".join(params)
            + ") {\n" + body + "\n}\n")


def cuda_translation_unit(kind: str, qtype) -> str:
    """What mx.fast.cuda_kernel hands NVRTC: MLX's default header, our header, then a
    __global__ function in mlx::core::cu with the inputs (and their Shape where the body names
    it) and outputs around our body."""
    body = SOURCES[kind][0](CUDA, qtype)
    inputs, outputs = _kernel_parts(kind, qtype)
    params = []
    for name, ctype in inputs:
        params.append(f"    const {ctype}* {name}")
        if f"{name}_shape" in body:
            params.append(f"    const __grid_constant__ Shape {name}_shape")
    params += [f"    {ctype}* {name}" for name, ctype in outputs]
    return ('#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
            "#define inf cuda::std::numeric_limits<float>::infinity()\n\n" + CUDA.header()
            + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
            + f"__global__ void custom_kernel_mlxllm_{kind}(\n" + ",\n".join(params) + ") {\n"
            + body + "\n}\n\n} // namespace mlx::core::cu\n")


def test_metal_sources_pass_a_syntax_check(tmp_path):
    # Every kernel of every type in one g++ run (-fsyntax-only): each unit in its own namespace.
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    for kind in SOURCES:
        for qtype in TYPES:
            unit = tmp_path / f"{kind}_{qtype.name}.metal.cpp"
            unit.write_text(metal_translation_unit(kind, qtype))
            run = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-attributes",
                                  "-Wno-unused-variable", "-Wno-unused-function", "-isystem", str(SHIMS / "metal"),
                                  "-x", "c++", str(unit)], capture_output=True, text=True)
            assert run.returncode == 0, f"{kind} {qtype.name}:\n{run.stderr[-3000:]}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    units = []
    for kind in SOURCES:
        for qtype in TYPES:
            unit = tmp_path / f"{kind}_{qtype.name}.cu"
            unit.write_text(cuda_translation_unit(kind, qtype))
            units.append(unit)
    # One nvcc per unit, two at a time; -ptx runs the whole front and middle end (every
    # type and syntax error), sm_80 is the oldest architecture MLX's CUDA backend targets.
    def compile_unit(unit: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["nvcc", "-std=c++17", "-arch=sm_80", "-ptx", "-Werror", "all-warnings",
                               "-I", str(SHIMS / "cuda"), str(unit), "-o", str(unit.with_suffix(".ptx"))],
                              capture_output=True, text=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for unit, run in zip(units, pool.map(compile_unit, units)):
            assert run.returncode == 0, f"{unit.name}:\n{run.stderr[-3000:]}"
            assert "custom_kernel_mlxllm_" in unit.with_suffix(".ptx").read_text()
