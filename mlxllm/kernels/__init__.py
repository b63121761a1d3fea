"""Matrix products over GGUF weights: the one dispatch between architectures and kernels.

Architectures call `matmul(x, w)` / `embed(ids, w)` with a `QuantizedTensor`; this module
picks how. Layouts MLX holds natively go to MLX's own `quantized_matmul`. The packed GGUF
types go, on a GPU, to our kernels (gpu.py through metal.py or cuda.py): the fused
dequantize-and-multiply for up to 8 activation rows (decode), and dequantize-then-GEMM in
row tiles above that (prefill); on the CPU, where MLX runs no custom kernels, to the pure-MLX
reference dequantizer (reference.py) and a dense matmul, unless the loader gave them their
exact image in native layouts (widen.py, the CPU default): then `quantized_matmul` per part.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import mlx.core as mx

from . import reference, widen
from .gpu import MAX_BATCH, GpuKernels

if TYPE_CHECKING:
    from ..quant import QuantizedTensor

GROUP = 32


# On MLX's CPU backend quantized_matmul has no optimized kernel: for a batch of rows,
# dequantizing the weight once and handing the product to BLAS is ~7x faster at 64 rows
# (measured, 4096x4096, 2 cores); for a single row quantized_matmul still wins.
CPU_DEQUANTIZE_ROWS = 8


# Prefill on a GPU dequantizes a packed weight this many output rows at a time, so the
# float copy in flight stays small next to the packed weight.
PREFILL_TILE_ROWS = 4096


@functools.cache
def _gpu_kernels(backend: str) -> GpuKernels | None:
    if backend == "metal":
        from .metal import METAL
        return GpuKernels(METAL)
    if backend == "cuda":
        from .cuda import CUDA
        return GpuKernels(CUDA)
    return None


def gpu_kernels() -> GpuKernels | None:
    """The packed-type kernels for the default device, or None on the CPU."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return _gpu_kernels("metal")
    if mx.cuda.is_available():
        return _gpu_kernels("cuda")
    return None


def _dequantize_packed(w: QuantizedTensor, data: mx.array, shape: tuple[int, ...]) -> mx.array:
    kernels = gpu_kernels()
    if kernels is not None:
        return kernels.dequantize(w.qtype, data, shape)
    return reference.dequantize(w.qtype, data, shape)


def dequantize(w: QuantizedTensor, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The whole weight as floats, (out, in)."""
    if w.mode == "packed":
        return _dequantize_packed(w, w.weight, w.shape).astype(dtype)
    if w.mode == "widened":
        return widen.dequantize(w.parts).astype(dtype)
    return mx.dequantize(w.weight, w.scales, w.biases, group_size=GROUP, bits=w.bits, mode=w.mode, dtype=dtype)


def _packed_matmul(x: mx.array, w: QuantizedTensor) -> mx.array:
    kernels = gpu_kernels()
    if kernels is None:
        return x @ dequantize(w, x.dtype).T
    out_features, in_features = w.shape
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] <= MAX_BATCH:
        y = kernels.matvec(w.qtype, w.weight, x2.astype(mx.float32), out_features).astype(x.dtype)
    else:
        tiles = []
        for start in range(0, out_features, PREFILL_TILE_ROWS):
            rows = w.weight[start:start + PREFILL_TILE_ROWS]
            tile = kernels.dequantize(w.qtype, rows, (rows.shape[0], in_features))
            tiles.append(x2 @ tile.astype(x.dtype).T)
        y = tiles[0] if len(tiles) == 1 else mx.concatenate(tiles, axis=-1)
    return y.reshape(*x.shape[:-1], out_features)


def matmul(x: mx.array, w: QuantizedTensor) -> mx.array:
    """x (..., in) @ W.T for W of shape (out, in) -> (..., out)."""
    if w.mode == "packed":
        return _packed_matmul(x, w)
    rows = x.size // x.shape[-1]
    if rows >= CPU_DEQUANTIZE_ROWS and mx.default_device() == mx.cpu:
        return x @ dequantize(w, x.dtype).T
    if w.mode == "widened":
        return widen.matmul(x, w.parts)
    return mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                               group_size=GROUP, bits=w.bits, mode=w.mode)


def embed(ids: mx.array, w: QuantizedTensor) -> mx.array:
    """Rows `ids` of W (vocab, dim), dequantized to float32: only the looked-up rows."""
    if w.mode == "widened":
        return widen.dequantize([p._replace(weight=p.weight[ids], scales=p.scales[ids],
                                            biases=None if p.biases is None else p.biases[ids])
                                 for p in w.parts])
    rows = w.weight[ids]  # (..., packed_row)
    if w.mode == "packed":
        return _dequantize_packed(w, rows.reshape(-1, rows.shape[-1]), (*ids.shape, w.shape[-1]))
    scales = w.scales[ids]
    biases = w.biases[ids] if w.biases is not None else None
    return mx.dequantize(rows, scales, biases, group_size=GROUP, bits=w.bits, mode=w.mode,
                         dtype=mx.float32)
