"""Pooling a sequence's hidden states into one vector, as llama.cpp's build_pooling does
(LLAMA_POOLING_TYPE_*): mean over the sequence's tokens, its first token (cls) or its last
(last); rows of a padded batch pool over their own `lengths` only."""

from __future__ import annotations

import mlx.core as mx

POOLING = ("none", "mean", "cls", "last", "rank")  # llama.cpp LLAMA_POOLING_TYPE_* by value


def pool(hidden: mx.array, lengths: mx.array, kind: str) -> mx.array:
    """(B, L, D) hidden states of rows `lengths` long -> (B, D)."""
    if kind == "mean":
        keep = (mx.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(hidden.dtype)
        return (hidden * keep[:, :, None]).sum(axis=1) / lengths[:, None].astype(hidden.dtype)
    if kind == "cls":
        return hidden[:, 0]
    if kind == "last":
        return mx.take_along_axis(hidden, (lengths - 1).reshape(-1, 1, 1), axis=1)[:, 0]
    raise ValueError(f"unknown pooling {kind!r} (mean, cls or last)")


def l2_normalize(x: mx.array) -> mx.array:
    norm = mx.sqrt((x * x).sum(axis=-1, keepdims=True))
    return x / mx.maximum(norm, 1e-12)  # a zero vector stays zero
