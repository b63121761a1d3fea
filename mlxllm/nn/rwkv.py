"""RWKV-6 (Finch) and RWKV-7 (Goose) as llama.cpp runs them (src/models/rwkv6-base.cpp,
rwkv7-base.cpp: build_rwkv{6,7}_time_mix / _channel_mix; rwkv6.cpp, rwkv7.cpp; ggml's
rwkv_wkv6 / rwkv_wkv7 CPU ops): a stack of LayerNorm'd time mixes (a WKV recurrence in place
of attention) and channel mixes, no positions.

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
RWKV-7's time mix interpolates with fixed weights (time_mix_lerp_fused: r, w, k, v, a, g) and
runs the generalized delta rule per head, with the state S (value x key):
    w = exp(-e^-0.5 sigmoid(w0 + LoRA(xw)));  a = sigmoid(a0 + LoRA(xa));  g = LoRA(xg)
    kk = L2-normalized k * k_k per head;  k <- k (1 + (a - 1) k_a)
    v <- v + (v_first - v) sigmoid(v0 + LoRA(xv)) past the first layer (v_first: its v)
    S <- S diag(w) + v k^T - (S kk)(kk a)^T;  y = S r
then the LayerNorm per head, plus v (r . k r_k) per head, times g, through time_mix_output;
its channel mix has no receptance: value(relu(key(xk))²).
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


# Positions per chunk of the prompt forms
WKV_CHUNK = 16
# The prompt forms factor a decay between positions u < t of a chunk, exp(G_t - G_u), as
# exp(G_t) exp(-G_u): exact, and far from float32's range while a chunk's total log decay
# stays above -CHUNK_LOG_DECAY_MIN. RWKV-7's decays are bounded (>= exp(DECAY_SCALE) per
# token); a RWKV-6 prompt that decays faster runs token by token.
CHUNK_LOG_DECAY_MIN = 60.0


def _heads_first(chunk: int, *ts: mx.array) -> list[mx.array]:
    """(b, L, H, S) -> (b, H, n, chunk, S), L padded to a multiple of chunk with zeros."""
    L = ts[0].shape[1]
    pad = -L % chunk
    out = []
    for t in ts:
        t = mx.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
        out.append(t.reshape(*t.shape[:2], -1, chunk, t.shape[-1]))
    return out


def _scores(x: mx.array, x_decay: mx.array, y: mx.array, G: mx.array, diagonal: bool) -> mx.array:
    """sum_c x[t, c] exp(x_decay[t, c] - G[u, c]) y[u, c] for u < t (u <= t with diagonal),
    0 elsewhere: (..., C, C)."""
    C = x.shape[-2]
    mask = mx.tril(mx.ones((C, C), mx.bool_), 0 if diagonal else -1)
    return mx.where(mask, (x * mx.exp(x_decay)) @ (y * mx.exp(-G)).swapaxes(-1, -2), 0.0)


def _wkv6_chunked(r, k, v, log_w, u, S):
    """The WKV-6 recurrence over chunks: with G the running log decay in a chunk (G_prev: up
    to the token before) and S the state before it,
        y_t = (r_t e^G_prev_t) S + sum_{u<t} (r_t e^(G_prev_t - G_u) . k_u) v_u + (r_t u . k_t) v_t
        S  <- e^G_last S + sum_u (k_u e^(G_last - G_u)) v_u^T"""
    b, L, H, _ = k.shape
    r, k, v, log_w = _heads_first(WKV_CHUNK, r, k, v, log_w)  # padding: nothing written, no decay
    G = mx.cumsum(log_w, axis=-2)
    G_prev = G - log_w
    bonus = mx.sum(r * u[:, None, None] * k, axis=-1)  # (b, H, n, C)
    scores = _scores(r, G_prev, k, G, diagonal=False) + mx.eye(WKV_CHUNK) * bonus[..., None]
    r_decayed = r * mx.exp(G_prev)
    last = G[..., -1:, :]  # (b, H, n, 1, K)
    k_to_end = k * mx.exp(last - G)
    ys = []
    for c in range(k.shape[2]):
        ys.append(r_decayed[:, :, c] @ S + scores[:, :, c] @ v[:, :, c])
        S = S * mx.exp(last[:, :, c]).swapaxes(-1, -2) + k_to_end[:, :, c].swapaxes(-1, -2) @ v[:, :, c]
    return mx.stack(ys, axis=2).reshape(b, H, -1, v.shape[-1])[:, :, :L].transpose(0, 2, 1, 3), S


def wkv6(r: mx.array, k: mx.array, v: mx.array, log_w: mx.array, u: mx.array, state: mx.array | None
         ) -> tuple[mx.array, mx.array]:
    """ggml_rwkv_wkv6: r, k, v and the log decay log_w (b, L, H, S), u (H, S), state
    (b, H, S, S) (key x value; None: zeros) -> (y (b, L, H, S), the new state). One token
    steps; more run in chunks where their decays allow (CHUNK_LOG_DECAY_MIN), else token by
    token. The decay comes as its log, -exp(.), finite where exp(-exp(.)) rounds to 0."""
    b, L, H, S = k.shape
    state = mx.zeros((b, H, S, v.shape[-1]), v.dtype) if state is None else state
    if L > 1 and mx.min(log_w).item() * WKV_CHUNK >= -CHUNK_LOG_DECAY_MIN:
        return _wkv6_chunked(r, k, v, log_w, u, state)
    ys = []
    for t in range(L):
        state, y = _wkv6_step(state, r[:, t], k[:, t], v[:, t], mx.exp(log_w[:, t]), u)
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
        log_w = -mx.exp(w)  # the decay is exp(-exp(.))
        heads = (B, L, H, a.head_size)
        y, state = wkv6(r.reshape(heads), k.reshape(heads), v.reshape(heads), log_w.reshape(heads),
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


# ---------------------------------------------------------------------------- RWKV-7

DECAY_SCALE = -0.606531  # -exp(-0.5): w = exp(DECAY_SCALE * sigmoid(.)) (llama.cpp's constant)
L2_EPS = 1e-12  # ggml_l2_norm's floor on the norm of kk
RWKV7_LERPS = ("r", "w", "k", "v", "a", "g")  # time_mix_lerp_fused's rows


@dataclass
class RWKV7Args:
    vocab_size: int
    dim: int
    n_layers: int
    head_size: int  # wkv.head_size
    ffn_dim: int
    norm_eps: float
    lora_decay: int  # ranks of the decay, in-context learning rate, value residual and gate LoRAs
    lora_iclr: int
    lora_value: int
    lora_gate: int
    tensors: Mapping[str, tuple[int, ...]] | None = None


@mx.compile
def _wkv7_step(S: mx.array, r: mx.array, w: mx.array, k: mx.array, v: mx.array, a: mx.array, b: mx.array
               ) -> tuple[mx.array, mx.array]:
    """One token: S (b, H, V, K), the rest (b, H, S)."""
    sa = (S @ a[..., None])  # (b, H, V, 1)
    S = S * w[..., None, :] + v[..., :, None] * k[..., None, :] + sa * b[..., None, :]
    return S, (S @ r[..., None])[..., 0]


def _wkv7_chunked(r, log_w, k, v, a, b, S):
    """The generalized delta rule over chunks. With G the running log decay in a chunk, S the
    state before it and z_t = S_{t-1} a_t (what the state gives back at t, unknown):
        z_t = S (a_t e^G_prev_t) + sum_{u<t} (a_t e^(G_prev_t - G_u) . k_u) v_u + (... . b_u) z_u
    a unit lower-triangular system for Z; then
        y_t = S (r_t e^G_t) + sum_{u<=t} (r_t e^(G_t - G_u) . k_u) v_u + (... . b_u) z_u
        S  <- S diag(e^G_last) + sum_u v_u (k_u e^(G_last - G_u))^T + z_u (b_u e^(G_last - G_u))^T"""
    B, L, H, _ = k.shape
    r, log_w, k, v, a, b = _heads_first(WKV_CHUNK, r, log_w, k, v, a, b)  # padding: no write, no decay
    G = mx.cumsum(log_w, axis=-2)
    G_prev = G - log_w
    # a unit lower-triangular inverse; MLX has it on the CPU stream only (any device can read it)
    T = mx.linalg.tri_inv(mx.eye(WKV_CHUNK) - _scores(a, G_prev, b, G, diagonal=False), upper=False,
                          stream=mx.cpu)
    a_k = _scores(a, G_prev, k, G, diagonal=False)
    r_k, r_b = _scores(r, G, k, G, diagonal=True), _scores(r, G, b, G, diagonal=True)
    a_decayed, r_decayed = a * mx.exp(G_prev), r * mx.exp(G)
    last = G[..., -1:, :]
    k_to_end, b_to_end = k * mx.exp(last - G), b * mx.exp(last - G)
    ys = []
    for c in range(k.shape[2]):
        St = S.swapaxes(-1, -2)  # (B, H, K, V)
        z = T[:, :, c] @ (a_decayed[:, :, c] @ St + a_k[:, :, c] @ v[:, :, c])  # (B, H, C, V)
        ys.append(r_decayed[:, :, c] @ St + r_k[:, :, c] @ v[:, :, c] + r_b[:, :, c] @ z)
        S = S * mx.exp(last[:, :, c]) + v[:, :, c].swapaxes(-1, -2) @ k_to_end[:, :, c] \
            + z.swapaxes(-1, -2) @ b_to_end[:, :, c]
    return mx.stack(ys, axis=2).reshape(B, H, -1, v.shape[-1])[:, :, :L].transpose(0, 2, 1, 3), S


def wkv7(r: mx.array, log_w: mx.array, k: mx.array, v: mx.array, a: mx.array, b: mx.array,
         state: mx.array | None) -> tuple[mx.array, mx.array]:
    """ggml_rwkv_wkv7: r, the log decay, k, v, a, b (b, L, H, S), state (b, H, S, S) (value x
    key; None: zeros) -> (y (b, L, H, S), the new state). S <- S diag(w) + v k^T + (S a) b^T;
    y = S r. One token steps; more run in chunks."""
    B, L, H, D = k.shape
    state = mx.zeros((B, H, D, D), v.dtype) if state is None else state
    if L > 1:
        return _wkv7_chunked(r, log_w, k, v, a, b, state)
    state, y = _wkv7_step(state, r[:, 0], mx.exp(log_w[:, 0]), k[:, 0], v[:, 0], a[:, 0], b[:, 0])
    return y[:, None], state


class RWKV7Block(RWKV6Block):
    """One RWKV-7 layer (the token shift and its caching are RWKV-6's)."""

    def __init__(self, args: RWKV7Args, i: int):
        nn.Module.__init__(self)
        self.args = args
        a, D = args, args.dim
        self.first = i == 0
        self.attn_norm = LayerNorm(D, a.norm_eps)
        self.attn_norm_2 = LayerNorm(D, a.norm_eps)
        self.time_mix_lerp_fused = {"weight": mx.zeros((len(RWKV7_LERPS), 1, 1, D))}
        for name, rank in (("w", a.lora_decay), ("a", a.lora_iclr), ("v", a.lora_value if i else a.lora_iclr),
                           ("g", a.lora_gate)):
            if name != "g":
                setattr(self, f"time_mix_{name}0", {"weight": mx.zeros((D,))})
            setattr(self, f"time_mix_{name}1", nn.Linear(D, rank, bias=False))
            setattr(self, f"time_mix_{name}2", nn.Linear(rank, D, bias=False))
        for leaf in ("k_k", "k_a", "r_k"):
            setattr(self, f"time_mix_{leaf}", {"weight": mx.zeros((D,))})
        for leaf in ("key", "value", "receptance", "output"):
            setattr(self, f"time_mix_{leaf}", nn.Linear(D, D, bias=False))
        self.time_mix_ln = {"weight": mx.ones((D,)), "bias": mx.zeros((D,))}
        self.channel_mix_lerp_k = {"weight": mx.zeros((D,))}
        self.channel_mix_key = nn.Linear(D, a.ffn_dim, bias=False)
        self.channel_mix_value = nn.Linear(a.ffn_dim, D, bias=False)

    def time_mix(self, x: mx.array, x_prev: mx.array, state: mx.array | None, v_first: mx.array | None
                 ) -> tuple[mx.array, mx.array, mx.array]:
        a = self.args
        B, L, D = x.shape
        heads = (B, L, D // a.head_size, a.head_size)
        sx = x_prev - x
        lerp = self.time_mix_lerp_fused["weight"].reshape(len(RWKV7_LERPS), D)
        xr, xw, xk, xv, xa, xg = (x + sx * lerp[j] for j in range(len(RWKV7_LERPS)))
        r = self.time_mix_receptance(xr)
        w = self.time_mix_w2(mx.tanh(self.time_mix_w1(xw))) + self.time_mix_w0["weight"]
        log_w = DECAY_SCALE * mx.sigmoid(w)  # the decay is exp(.)
        k, v = self.time_mix_key(xk), self.time_mix_value(xv)
        if v_first is None:
            v_first = v
        else:  # a residual from the first layer's values
            mix = mx.sigmoid(self.time_mix_v2(self.time_mix_v1(xv)) + self.time_mix_v0["weight"])
            v = v + (v_first - v) * mix
        g = self.time_mix_g2(mx.sigmoid(self.time_mix_g1(xg)))
        iclr = mx.sigmoid(self.time_mix_a2(self.time_mix_a1(xa)) + self.time_mix_a0["weight"])
        kk = (k * self.time_mix_k_k["weight"]).reshape(heads)
        kk = kk / mx.maximum(mx.sqrt(mx.sum(kk * kk, axis=-1, keepdims=True)), L2_EPS)
        ka = k * self.time_mix_k_a["weight"]
        k = k + iclr * ka - ka
        r, log_w, k, v, iclr = (t.reshape(heads) for t in (r, log_w, k, v, iclr))
        y, state = wkv7(r, log_w, k, v, -kk, kk * iclr, state)
        y = y - y.mean(axis=-1, keepdims=True)  # a LayerNorm per head, then time_mix_ln's weight and bias
        y = unit_rms_norm(y, GROUP_NORM_EPS).reshape(B, L, D) * self.time_mix_ln["weight"] + self.time_mix_ln["bias"]
        bonus = mx.sum(k * r * self.time_mix_r_k["weight"].reshape(heads[2:]), axis=-1, keepdims=True)  # (B, L, H, 1)
        y = y + (v * bonus).reshape(B, L, D)
        return self.time_mix_output(y * g), state, v_first

    def channel_mix(self, x: mx.array, x_prev: mx.array) -> mx.array:
        xk = x + (x_prev - x) * self.channel_mix_lerp_k["weight"]
        return self.channel_mix_value(mx.square(nn.relu(self.channel_mix_key(xk))))

    def __call__(self, x: mx.array, cache: RecurrentCache | None, v_first: mx.array | None
                 ) -> tuple[mx.array, mx.array]:
        shifts = cache.conv if cache is not None else None
        att = self.attn_norm(x)
        mixed, state, v_first = self.time_mix(att, self._previous(att, None if shifts is None else shifts[:, :1]),
                                              cache.ssm if cache is not None else None, v_first)
        h = x + mixed
        ffn = self.attn_norm_2(h)
        out = h + self.channel_mix(ffn, self._previous(ffn, None if shifts is None else shifts[:, 1:]))
        if cache is not None:
            cache.conv = mx.concatenate([att[:, -1:], ffn[:, -1:]], axis=1)
            cache.ssm = state
            cache.advance(x.shape[1])
        return out, v_first


class RWKV7(RWKV6):
    """RWKV6's stack with RWKV-7 layers, the first layer's values passed along; the first
    layer's value-residual LoRA (time_mix_v0/v1/v2, which the converter fills with copies of
    its a LoRA) is loaded by llama.cpp and never used."""

    def __init__(self, args: RWKV7Args):
        nn.Module.__init__(self)
        self.args = args
        D = args.dim
        self.token_embd = nn.Embedding(args.vocab_size, D)
        self.token_embd_norm = LayerNorm(D, args.norm_eps)
        self.blk = [RWKV7Block(args, i) for i in range(args.n_layers)]
        self.output_norm = LayerNorm(D, args.norm_eps)
        self.output = nn.Linear(D, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        h = self.token_embd_norm(self.token_embd(tokens))
        caches = cache if cache else [None] * len(self.blk)
        v_first = None
        for block, c in zip(self.blk, caches):
            h, v_first = block(h, c, v_first)
        return self.output(self.output_norm(h))
