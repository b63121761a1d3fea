"""Packed-type kernels on MLX's GPU backends: a dequantize kernel and a fused
dequantize-and-multiply matrix-vector kernel per type, from one body per kernel.

The bodies below are backend-neutral: they call the shared block decoders of blocks/*.h
(`dq8_<type>`, `rowdot_<type>`) and name the few things Metal and CUDA spell differently
through a `Backend` (metal.py, cuda.py): the thread indices, the SIMD-group / warp sum, the
prelude that defines the address-space macros, and the `mx.fast.*_kernel` constructor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from gguf import GGMLQuantizationType

from .source import KERNEL_NAMES, block_shape, block_source, table

SIMD_WIDTH = 32  # lanes that share one weight row in the matvec (a Metal SIMD group, a CUDA warp)
ROWS_PER_GROUP = 4  # weight rows per threadgroup / CUDA block in the matvec
DEQUANT_GROUP = 256  # threads per threadgroup in the dequantize kernel (8 weights each)
MAX_BATCH = 8  # QMAX_BATCH in common.h: activation rows one matvec call takes


@dataclass(frozen=True)
class Backend:
    name: str
    prelude: str  # defines QDEV / QTHR / QFN / qhalf before blocks/*.h
    index_x: str  # global thread index along x
    index_y: str  # global thread index along y
    index_z: str  # global thread index along z
    lane: str  # index within the SIMD group / warp (x extent is SIMD_WIDTH)
    simd_sum: str  # expression summing a float over the SIMD group / warp, "{}" = operand
    nan: str  # a quiet NaN
    make_kernel: Callable[..., Callable]  # mx.fast.metal_kernel / mx.fast.cuda_kernel

    def header(self) -> str:
        return self.prelude + block_source()


# Chunk c of the flattened weight is 8 consecutive elements of block c / (QK / 8).
DEQUANTIZE_BODY = """
    const size_t chunk = {index_x};
    const size_t chunks_per_block = QK_{NAME} / 8;
    const size_t n_chunks = (size_t)w_shape[0] * w_shape[1] / BYTES_{NAME} * chunks_per_block;
    if (chunk >= n_chunks) return;
    float v[8];
    dq8_{name}(w + chunk / chunks_per_block * BYTES_{NAME}, (int)(chunk % chunks_per_block), table, v);
    for (int k = 0; k < 8; ++k) out[8 * chunk + k] = v[k];
"""

# One SIMD group / warp per weight row: lane i takes the row's chunks i, i + 32, ... for every
# activation row at once (the weight is read once per batch), then the lanes are summed.
MATVEC_BODY = """
    const int row = {index_y};
    const int lane = {lane};
    const int out_features = w_shape[0];
    const int batch = x_shape[0];
    const int in_features = x_shape[1];
    if (row >= out_features) return;  // whole SIMD groups / warps only: rows are per group
    float acc[QMAX_BATCH] = {{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}};
    rowdot_{name}(w + (size_t)row * w_shape[1], x, in_features, batch, lane, {simd}, table, acc);
    for (int r = 0; r < batch; ++r) {{
        const float total = {sum};
        if (lane == 0) out[r * out_features + row] = total;
    }}
"""


# Experts (E, out, row bytes): grid z is the (row of x, chosen expert) slot, y the weight row;
# the matvec's lanes over that expert's row alone. An index past the experts writes NaN and
# reads nothing (the CPU kernels' rule).
GATHER_MATVEC_BODY = """
    const int row = {index_y};
    const int slot = {index_z};
    const int lane = {lane};
    const int out_features = w_shape[1];
    const int in_features = x_shape[1];
    if (row >= out_features) return;  // whole SIMD groups / warps only: rows are per group
    const uint expert = indices[slot];
    if (expert >= (uint)w_shape[0]) {{
        if (lane == 0) out[(size_t)slot * out_features + row] = {nan};
        return;
    }}
    float acc[QMAX_BATCH] = {{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}};
    rowdot_{name}(w + ((size_t)expert * out_features + row) * w_shape[2],
                  x + (size_t)(slot / indices_shape[1]) * in_features, in_features, 1, lane, {simd}, table, acc);
    const float total = {sum};
    if (lane == 0) out[(size_t)slot * out_features + row] = total;
"""


def dequantize_source(backend: Backend, qtype: GGMLQuantizationType) -> str:
    name = KERNEL_NAMES[qtype]
    return DEQUANTIZE_BODY.format(name=name, NAME=name.upper(), index_x=backend.index_x)


def matvec_source(backend: Backend, qtype: GGMLQuantizationType) -> str:
    name = KERNEL_NAMES[qtype]
    return MATVEC_BODY.format(name=name, NAME=name.upper(), index_y=backend.index_y, lane=backend.lane,
                              simd=SIMD_WIDTH, sum=backend.simd_sum.format("acc[r]"))


def gather_matvec_source(backend: Backend, qtype: GGMLQuantizationType) -> str:
    name = KERNEL_NAMES[qtype]
    return GATHER_MATVEC_BODY.format(name=name, index_y=backend.index_y, index_z=backend.index_z, lane=backend.lane,
                                     simd=SIMD_WIDTH, sum=backend.simd_sum.format("acc[0]"), nan=backend.nan)


SOURCES = {"dequantize": (dequantize_source, ["w", "table"]), "matvec": (matvec_source, ["w", "x", "table"]),
           "gather_matvec": (gather_matvec_source, ["w", "x", "indices", "table"])}


class GpuKernels:
    """The packed-type kernels of one backend, compiled on first use per type."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @functools.cache
    def _kernel(self, kind: str, qtype: GGMLQuantizationType) -> Callable:
        make_source, inputs = SOURCES[kind]
        source = make_source(self.backend, qtype)
        return self.backend.make_kernel(name=f"mlxllm_{kind}_{KERNEL_NAMES[qtype]}", input_names=inputs,
                                        output_names=["out"], source=source, header=self.backend.header())

    @functools.cache
    def _table(self, qtype: GGMLQuantizationType) -> mx.array:
        return mx.array(table(qtype))

    def dequantize(self, qtype: GGMLQuantizationType, w: mx.array, shape: tuple[int, ...]) -> mx.array:
        """Packed rows w (rows, row_bytes) uint8 -> float32 of `shape`."""
        elements, nbytes = block_shape(qtype)
        n_chunks = w.size // nbytes * (elements // 8)
        (out,) = self._kernel("dequantize", qtype)(
            inputs=[w, self._table(qtype)], grid=(n_chunks, 1, 1), threadgroup=(DEQUANT_GROUP, 1, 1),
            output_shapes=[shape], output_dtypes=[mx.float32])
        return out

    def matvec(self, qtype: GGMLQuantizationType, w: mx.array, x: mx.array, out_features: int) -> mx.array:
        """x (batch <= MAX_BATCH, in) float32 @ W.T for packed W (out_features, in)."""
        (out,) = self._kernel("matvec", qtype)(
            inputs=[w, x, self._table(qtype)], grid=(SIMD_WIDTH, out_features, 1),
            threadgroup=(SIMD_WIDTH, ROWS_PER_GROUP, 1), output_shapes=[(x.shape[0], out_features)],
            output_dtypes=[mx.float32])
        return out

    def gather_matvec(self, qtype: GGMLQuantizationType, w: mx.array, x: mx.array, indices: mx.array) -> mx.array:
        """x (N, in) float32 @ W[e].T for each expert e in indices (N, k), packed experts w
        (E, out, row_bytes) -> (N, k, out): only the chosen experts' rows are read."""
        N, k = indices.shape
        out_features = w.shape[1]
        (out,) = self._kernel("gather_matvec", qtype)(
            inputs=[w, x, indices.astype(mx.uint32), self._table(qtype)], grid=(SIMD_WIDTH, out_features, N * k),
            threadgroup=(SIMD_WIDTH, ROWS_PER_GROUP, 1), output_shapes=[(N, k, out_features)],
            output_dtypes=[mx.float32])
        return out
