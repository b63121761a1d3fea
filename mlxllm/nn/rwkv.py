"""RWKV-6 (Finch) as llama.cpp runs it (src/models/rwkv6-base.cpp: build_rwkv6_time_mix,
build_rwkv6_channel_mix; rwkv6.cpp; ggml's rwkv_wkv6 CPU op): a stack of LayerNorm'd time
mixes (the WKV recurrence in place of attention) and channel mixes, no positions.

Token shift: each mix reads its normed input x and the previous token's, x_prev (the last
token of the previous forward pass, zero at the start), through sx = x_prev - x.
    time mix     data-dependent interpolations x + sx * (lerp + LoRA(x + sx * lerp_x)) for
                 w, k, v, r, g (time_mix_w1 / w2, time_mix_lerp_fused); decay
                 w = exp(-exp(time_mix_decay + LoRA(xw))) per channel; per head of
                 head_size, with the bonus u (time_mix_first) and state S (key x value):
                     y = r . (u * k v^T + S);  S <- w * S + k v^T
                 then a LayerNorm per head (eps 64e-5) with time_mix_ln's weight and bias,
                 times silu(g), through time_mix_output
    channel mix  sigmoid(receptance(xr)) * value(relu(key(xk))²)
Between forward passes a layer keeps a `mlxllm.cache.RecurrentCache`: `conv` (B, 2, dim) the
two mixes' last normed inputs, `ssm` (B, heads, head_size, head_size) the WKV state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..cache import RecurrentCache
from .norm import LayerNorm, unit_rms_norm

GROUP_NORM_EPS = 64e-5  # llama.cpp's ggml_norm per head after the WKV (HF: 1e-5 * head_size_divisor²)
LERPS = 5  # w, k, v, r, g, in this order in time_mix_w1 / w2 and time_mix_lerp_fused


@dataclass
class RWKV6Args:
    vocab_size: int
    dim: int
    n_layers: int
    head_size: int  # wkv.head_size
    ffn_dim: int
    norm_eps: float
    mix_dim: int  # time_mix_extra_dim: rank of the token-shift LoRA
    decay_dim: int  # time_decay_extra_dim: rank of the decay LoRA
    rescale_every: int = 0  # halve the residual stream after every n-th layer (0: never)
    tensors: Mapping[str, tuple[int, ...]] | None = None


@mx.compile
def _wkv6_step(S: mx.array, r: mx.array, k: mx.array, v: mx.array, w: mx.array, u: mx.array
               ) -> tuple[mx.array, mx.array]:
    """One token: S (b, H, K, V), r, k, w (b, H, K), v (b, H, V), u (H, K)."""
    kv = k[..., :, None] * v[..., None, :]
    y = (r[..., None, :] @ (u[..., :, None] * kv + S))[..., 0, :]  # (b, H, V)
    return S * w[..., :, None] + kv, y


def wkv6(r: mx.array, k: mx.array, v: mx.array, w: mx.array, u: mx.array, state: mx.array | None
         ) -> tuple[mx.array, mx.array]:
    """ggml_rwkv_wkv6, token by token: r, k, v, w (b, L, H, S), u (H, S), state (b, H, S, S)
    (None: zeros) -> (y (b, L, H, S), the new state)."""
    b, L, H, S = k.shape
    state = mx.zeros((b, H, S, v.shape[-1]), v.dtype) if state is None else state
    ys = []
    for t in range(L):
        state, y = _wkv6_step(state, r[:, t], k[:, t], v[:, t], w[:, t], u)
        ys.append(y)
    return mx.stack(ys, axis=1), state


class RWKV6Block(nn.Module):
    """One layer; its tensors sit on it under their GGUF names (blk.N.time_mix_*, ...)."""

    def __init__(self, args: RWKV6Args, i: int):
        super().__init__()
        self.args = args
        a, D = args, args.dim
        has = (lambda leaf: f"blk.{i}.{leaf}" in a.tensors) if a.tensors is not None else (lambda leaf: True)
        if not has("time_mix_lerp_fused.weight"):
            raise ValueError("RWKV-6 files with separate time_mix_lerp_{w,k,v,r,g} are not supported")
        self.attn_norm = LayerNorm(D, a.norm_eps)
        self.attn_norm_2 = LayerNorm(D, a.norm_eps)
        self.time_mix_lerp_x = {"weight": mx.zeros((D,))}
        self.time_mix_lerp_fused = {"weight": mx.zeros((LERPS, 1, 1, D))}
        self.time_mix_w1 = nn.Linear(D, LERPS * a.mix_dim, bias=False)
        self.time_mix_w2 = {"weight": mx.zeros((LERPS, D, a.mix_dim))}
        self.time_mix_decay = {"weight": mx.zeros((D,))}
        self.time_mix_decay_w1 = nn.Linear(D, a.decay_dim, bias=False)
        self.time_mix_decay_w2 = nn.Linear(a.decay_dim, D, bias=False)
        self.time_mix_first = {"weight": mx.zeros((D // a.head_size, a.head_size))}
        for leaf in ("key", "value", "receptance", "gate", "output"):
            setattr(self, f"time_mix_{leaf}", nn.Linear(D, D, bias=False))
        self.time_mix_ln = {"weight": mx.ones((D,)), "bias": mx.zeros((D,))}  # after the per-head norm
        self.channel_mix_lerp_k = {"weight": mx.zeros((D,))}
        self.channel_mix_lerp_r = {"weight": mx.zeros((D,))}
        self.channel_mix_key = nn.Linear(D, a.ffn_dim, bias=False)
        self.channel_mix_value = nn.Linear(a.ffn_dim, D, bias=False)
        self.channel_mix_receptance = nn.Linear(D, D, bias=False)

    @staticmethod
    def _previous(x: mx.array, last: mx.array | None) -> mx.array:
        """Each position's previous input: `last` (B, 1, D) (zeros: none) before x[:, :-1]."""
        last = mx.zeros_like(x[:, :1]) if last is None else last
        return mx.concatenate([last, x[:, :-1]], axis=1)

    def time_mix(self, x: mx.array, x_prev: mx.array, state: mx.array | None) -> tuple[mx.array, mx.array]:
        a = self.args
        B, L, D = x.shape
        H = D // a.head_size
        sx = x_prev - x
        lora = mx.tanh(self.time_mix_w1(x + sx * self.time_mix_lerp_x["weight"])).reshape(B, L, LERPS, a.mix_dim)
        lora = (lora[..., None, :] @ self.time_mix_w2["weight"].swapaxes(-1, -2))[..., 0, :]  # (B, L, 5, D)
        lerp = self.time_mix_lerp_fused["weight"].reshape(LERPS, D)
        xw, xk, xv, xr, xg = (x + sx * (lora[:, :, j] + lerp[j]) for j in range(LERPS))
        r, k, v = self.time_mix_receptance(xr), self.time_mix_key(xk), self.time_mix_value(xv)
        g = nn.silu(self.time_mix_gate(xg))
        w = self.time_mix_decay_w2(mx.tanh(self.time_mix_decay_w1(xw))) + self.time_mix_decay["weight"]
        w = mx.exp(-mx.exp(w))
        heads = (B, L, H, a.head_size)
        y, state = wkv6(r.reshape(heads), k.reshape(heads), v.reshape(heads), w.reshape(heads),
                        self.time_mix_first["weight"], state)
        y = y - y.mean(axis=-1, keepdims=True)  # a LayerNorm per head, then time_mix_ln's weight and bias
        y = unit_rms_norm(y, GROUP_NORM_EPS).reshape(B, L, D) * self.time_mix_ln["weight"] + self.time_mix_ln["bias"]
        return self.time_mix_output(y * g), state

    def channel_mix(self, x: mx.array, x_prev: mx.array) -> mx.array:
        sx = x_prev - x
        xk = x + sx * self.channel_mix_lerp_k["weight"]
        xr = x + sx * self.channel_mix_lerp_r["weight"]
        k = mx.square(nn.relu(self.channel_mix_key(xk)))
        return mx.sigmoid(self.channel_mix_receptance(xr)) * self.channel_mix_value(k)

    def __call__(self, x: mx.array, cache: RecurrentCache | None) -> mx.array:
        shifts = cache.conv if cache is not None else None  # (B, 2, D): the mixes' last inputs
        att = self.attn_norm(x)
        mixed, state = self.time_mix(att, self._previous(att, None if shifts is None else shifts[:, :1]),
                                     cache.ssm if cache is not None else None)
        h = x + mixed
        ffn = self.attn_norm_2(h)
        out = h + self.channel_mix(ffn, self._previous(ffn, None if shifts is None else shifts[:, 1:]))
        if cache is not None:
            cache.conv = mx.concatenate([att[:, -1:], ffn[:, -1:]], axis=1)
            cache.ssm = state
            cache.advance(x.shape[1])
        return out


class RWKV6(nn.Module):
    """token_embd -> token_embd_norm -> the layers -> output_norm -> output."""

    batchable = True  # no masks, no positions: every row's state is its own

    def __init__(self, args: RWKV6Args):
        super().__init__()
        self.args = args
        D = args.dim
        self.token_embd = nn.Embedding(args.vocab_size, D)
        self.token_embd_norm = LayerNorm(D, args.norm_eps)
        self.blk = [RWKV6Block(args, i) for i in range(args.n_layers)]
        self.output_norm = LayerNorm(D, args.norm_eps)
        self.output = nn.Linear(D, args.vocab_size, bias=False)

    @property
    def layers(self) -> list[RWKV6Block]:
        return self.blk

    def make_cache(self) -> list[RecurrentCache]:
        return [RecurrentCache() for _ in self.blk]

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        h = self.token_embd_norm(self.token_embd(tokens))
        caches = cache if cache else [None] * len(self.blk)
        every = self.args.rescale_every
        for i, (block, c) in enumerate(zip(self.blk, caches)):
            h = block(h, c)
            if every and (i + 1) % every == 0:
                h = h * 0.5
        return self.output(self.output_norm(h))
