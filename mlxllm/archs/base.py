"""Pieces shared by architecture modules: metadata reading helpers and attention."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import kernels, layers
from ..gguf import GGUFFile


def require(gf: GGUFFile, key: str) -> Any:
    """A metadata value the architecture cannot run without (arch prefix implied)."""
    if key not in gf.metadata:
        raise KeyError(f"{gf.metadata.architecture}.{key} is missing")
    return gf.metadata[key]


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, `weight`) through the kernel dispatch."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, self.weight, self.eps)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """(B, H, L, D) queries against (B, H_kv, T, D) keys/values; grouped-query heads share
    their key/value head without copies. mask: None, "causal", or bool (L, T) / broadcastable."""
    return kernels.attention(q, k, v, scale, mask)


def rope(x: mx.array, dims: int, *, traditional: bool, base: float | None, scale: float,
         offset, freqs: mx.array | None = None) -> mx.array:
    """Rotary embedding of x (B, L, H, D), before the heads move to axis 1; the
    parameters are mx.fast.rope's."""
    return kernels.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up: the Llama feed-forward gate."""
    return kernels.gated(gate, up, "silu")


def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """gelu(gate) * up with ggml's tanh-approximated GELU: the Gemma feed-forward gate."""
    return kernels.gated(gate, up, "gelu_tanh")


def project(x: mx.array, *linears: nn.Module) -> list[mx.array]:
    """x through several projections of that same x (q/k/v, gate/up). Where a block lists
    them in its `SHARED_INPUT_PROJECTIONS`, the loader stacks their weights and this is
    one product."""
    return layers.project(x, linears)
