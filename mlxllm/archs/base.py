"""Pieces shared by architecture modules: metadata reading helpers and attention."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..gguf import GGUFFile


def require(gf: GGUFFile, key: str) -> Any:
    """A metadata value the architecture cannot run without (arch prefix implied)."""
    if key not in gf.metadata:
        raise KeyError(f"{gf.metadata.architecture}.{key} is missing")
    return gf.metadata[key]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """(B, H, L, D) queries against (B, H_kv, T, D) keys/values; grouped-query heads are
    handled by MLX's fused kernel without repeating K/V."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
