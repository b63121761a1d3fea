"""Normalizations as llama.cpp's build_norm applies them: RMSNorm, LayerNorm with or
without weight and bias. Parameters are optional because files differ: OLMo's LayerNorm
has none, GPT-2's has both, Command-R's has no bias; a norm takes what the file holds."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import kernels


def _normalize(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """x / rms(x) * weight on the kernel; a weight with one row per head (H, D) against
    x (..., H, D) multiplies after."""
    if weight is not None and weight.ndim == 1:
        return kernels.rms_norm(x, weight, eps)
    y = kernels.rms_norm(x, mx.ones((x.shape[-1],), x.dtype), eps)
    return y * weight if weight is not None else y


class RMSNorm(nn.Module):
    """x / rms(x) * weight (nn.RMSNorm's parameter), + bias where the file has one (PhiMoE),
    through the kernel dispatch."""

    def __init__(self, dims: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        y = _normalize(x, self.weight, self.eps)
        return y + self.bias if "bias" in self else y


class LayerNorm(nn.Module):
    """(x - mean) / std * weight + bias, each of weight and bias only where the file has it.

    LayerNorm of x is RMSNorm of x minus its mean (the variance is the centred mean square),
    so it runs on the same multi-threaded kernel: MLX's CPU layer_norm runs on one thread."""

    def __init__(self, dims: int, eps: float = 1e-5, weight: bool = True, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.dims = dims
        if weight:
            self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        y = _normalize(x - x.mean(axis=-1, keepdims=True), self.get("weight"), self.eps)
        return y + self.bias if "bias" in self else y


def unit_rms_norm(x: mx.array, eps: float) -> mx.array:
    """x / rms(x) over the last axis, no weight (llama.cpp ggml_rms_norm alone: Llama 4's
    "L2 norm" of queries and keys)."""
    return _normalize(x, None, eps)


def norm(kind: str, dims: int, eps: float, has: set[str] | frozenset[str], prefix: str) -> nn.Module:
    """The norm `kind` ("rms" or "layer") over `dims`, with the parameters `prefix`.weight /
    `prefix`.bias that the file `has` (an RMSNorm always has its weight)."""
    if kind == "rms":
        return RMSNorm(dims, eps, bias=f"{prefix}.bias" in has)
    if kind == "layer":
        return LayerNorm(dims, eps, weight=f"{prefix}.weight" in has, bias=f"{prefix}.bias" in has)
    raise ValueError(f"unknown norm kind {kind!r}")
