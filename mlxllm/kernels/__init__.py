"""Matrix products over GGUF weights: the one dispatch between architectures and kernels.

Architectures call `matmul(x, w)` / `embed(ids, w)` with a `QuantizedTensor`; this module
picks how: MLX's own `quantized_matmul` for the layouts MLX holds natively, and for the
packed GGUF types the pure-MLX reference dequantizer (`reference.py`) followed by a dense
matmul. Metal / CUDA kernels for the packed types plug in here, behind the same calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from . import reference

if TYPE_CHECKING:
    from ..quant import QuantizedTensor

GROUP = 32


# On MLX's CPU backend quantized_matmul has no optimized kernel: for a batch of rows,
# dequantizing the weight once and handing the product to BLAS is ~7x faster at 64 rows
# (measured, 4096x4096, 2 cores); for a single row quantized_matmul still wins.
CPU_DEQUANTIZE_ROWS = 8


def dequantize(w: QuantizedTensor, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The whole weight as floats, (out, in)."""
    if w.mode == "packed":
        return reference.dequantize(w.qtype, w.weight, w.shape).astype(dtype)
    return mx.dequantize(w.weight, w.scales, w.biases, group_size=GROUP, bits=w.bits, mode=w.mode, dtype=dtype)


def matmul(x: mx.array, w: QuantizedTensor) -> mx.array:
    """x (..., in) @ W.T for W of shape (out, in) -> (..., out)."""
    rows = x.size // x.shape[-1]
    if w.mode == "packed" or (rows >= CPU_DEQUANTIZE_ROWS and mx.default_device() == mx.cpu):
        return x @ dequantize(w, x.dtype).T
    return mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                               group_size=GROUP, bits=w.bits, mode=w.mode)


def embed(ids: mx.array, w: QuantizedTensor) -> mx.array:
    """Rows `ids` of W (vocab, dim), dequantized to float32: only the looked-up rows."""
    rows = w.weight[ids]  # (..., packed_row)
    dim = w.shape[-1]
    if w.mode == "packed":
        return reference.dequantize(w.qtype, rows, (*ids.shape, dim))
    scales = w.scales[ids]
    biases = w.biases[ids] if w.biases is not None else None
    return mx.dequantize(rows, scales, biases, group_size=GROUP, bits=w.bits, mode=w.mode,
                         dtype=mx.float32)
