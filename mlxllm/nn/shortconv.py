"""LFM2's short-convolution mixer (src/models/lfm2.cpp, build_shortconv_block): in_proj
splits into B, C and x; B * x runs through a depthwise causal convolution of a few taps
(shortconv.l_cache); C gates its output before out_proj. Between forward passes the layer
keeps the last l_cache - 1 inputs of the convolution (`mlxllm.cache.RecurrentCache.conv`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .ssm import causal_conv


class ShortConv(nn.Module):
    """Attributes are the GGUF names under blk.N.shortconv: conv (dim, l_cache), in_proj,
    out_proj."""

    def __init__(self, dim: int, l_cache: int):
        super().__init__()
        self.conv = {"weight": mx.zeros((dim, l_cache))}
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, cache) -> mx.array:
        b, c, x = mx.split(self.in_proj(x), 3, axis=-1)  # (B, L, dim) each
        y, state = causal_conv(b * x, self.conv["weight"], cache.conv if cache is not None else None)
        if cache is not None:
            cache.conv = state
            cache.advance(x.shape[1])
        return self.out_proj(c * y)
