"""Linear and embedding layers over GGUF weights kept in a quantized layout.

The loader swaps these in for `nn.Linear` / `nn.Embedding` wherever a GGUF tensor is
quantized, so architectures are written once, with plain MLX layers. Each layer exposes
the `QuantizedTensor` interface (`qtype`, `shape`, `mode`, `bits`, arrays, `parts`) and hands itself
to `mlxllm.kernels`, which picks the kernel.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .kernels.widen import Part
from .quant import QUANT_TABLE, QuantizedTensor


class _Quantized(nn.Module):
    def __init__(self, w: QuantizedTensor):
        super().__init__()
        self.qtype = w.qtype
        self.rows, self.cols = w.shape  # (out, in) / (vocab, dim)
        if w.weight is not None:
            self.weight = w.weight
        if w.scales is not None:
            self.scales = w.scales
        if w.biases is not None:
            self.biases = w.biases
        if w.parts:
            # Arrays as module state (so they count, evaluate and move with the model); each
            # part's layout beside them as plain values.
            self.part_arrays = [{k: a for k, a in (("weight", p.weight), ("scales", p.scales),
                                                   ("biases", p.biases)) if a is not None} for p in w.parts]
            self.part_layouts = tuple((p.bits, p.group_size, p.mode) for p in w.parts)
        self.freeze()

    @property
    def parts(self) -> list[Part] | None:
        if "part_arrays" not in self:
            return None
        return [Part(a["weight"], a["scales"], a.get("biases"), *layout)
                for a, layout in zip(self.part_arrays, self.part_layouts)]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def mode(self) -> str:
        return "widened" if "part_arrays" in self else QUANT_TABLE[self.qtype].kind

    @property
    def bits(self) -> int:
        return QUANT_TABLE[self.qtype].bits

    def _extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, {self.qtype.name}"


class QuantizedLinear(_Quantized):
    def __init__(self, w: QuantizedTensor, bias: mx.array | None = None):
        super().__init__(w)
        if bias is not None:
            self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = kernels.matmul(x, self)
        return y + self.bias if "bias" in self else y


class QuantizedEmbedding(_Quantized):
    def __call__(self, ids: mx.array) -> mx.array:
        return kernels.embed(ids, self)

    def as_linear(self, x: mx.array) -> mx.array:
        """Tied output projection: x @ E.T."""
        return kernels.matmul(x, self)
