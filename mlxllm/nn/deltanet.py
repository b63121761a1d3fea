"""Gated delta net, the linear-attention mixer of Qwen3-Next and Qwen3.5, as llama.cpp runs it
(src/models/delta-net-base.cpp: build_delta_net_chunking / _autoregressive; qwen3next.cpp,
qwen35.cpp: build_layer_attn_linear), and the hybrid decoder layer that holds it beside gated
full attention.

Per layer: attn_qkv projects to q, k (n_k_heads x head_k_dim each) and v (n_v_heads x
head_v_dim) (Qwen3-Next files from the first converters: ssm_in, HF's in_proj_qkvz, which also
yields z, per key head), which run through a depthwise causal convolution (ssm_conv1d) and SiLU; q and k
are L2-normalized, and each value head reads one key head (grouped, Qwen3-Next: value head j
reads key head j // (n_v / n_k); tiled, Qwen3.5, whose converter reorders the value heads:
j % n_k). Per value head and token, beta = sigmoid(b) and the log decay
g = softplus(a + ssm_dt.bias) * ssm_a (ssm_a = -exp(A_log), so g < 0), from ssm_ba (Qwen3-Next:
b and a interleaved per key head) or ssm_beta / ssm_alpha (Qwen3.5). The state S (head_v_dim x
head_k_dim per value head) follows the gated delta rule

    S <- exp(g) S;  S <- S + beta (v - S k) k^T;  o = S q / sqrt(head_k_dim)

and the output is RMSNorm(o) * ssm_norm * silu(z), z = attn_gate(x), projected by ssm_out.
Between forward passes a layer keeps a `mlxllm.cache.RecurrentCache`: the convolution's last
d_conv - 1 inputs (`conv`) and S (`ssm`, (B, n_v_heads, head_v_dim, head_k_dim)).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from gguf import Keys

from .. import kernels
from .hybrid import HybridArgs, HybridBlock, HybridDecoder
from .ssm import causal_conv, softplus

# Positions per chunk of the prompt form (llama.cpp's CS for a scalar decay per head)
DELTA_CHUNK = 64


@dataclass(frozen=True)
class DeltaNetArgs:
    d_conv: int  # convolution kernel width
    head_k_dim: int  # ssm.state_size: queries' and keys' head width
    n_k_heads: int  # ssm.group_count
    n_v_heads: int  # ssm.time_step_rank
    head_v_dim: int  # ssm.inner_size / n_v_heads
    norm_eps: float
    tiled: bool  # value head j reads key head j % n_k_heads (Qwen3.5), else j // (n_v / n_k)

    @classmethod
    def from_metadata(cls, m, norm_eps: float, tiled: bool) -> DeltaNetArgs:
        n_k, n_v = m[Keys.SSM.GROUP_COUNT], m[Keys.SSM.TIME_STEP_RANK]
        head_k, inner = m[Keys.SSM.STATE_SIZE], m[Keys.SSM.INNER_SIZE]
        if not (n_k > 0 and n_v % n_k == 0 and inner % n_v == 0):
            raise ValueError(f"ssm.time_step_rank {n_v} must be a multiple of ssm.group_count {n_k} "
                             f"and divide ssm.inner_size {inner}")
        if inner // n_v != head_k:  # llama.cpp asserts S_k == S_v
            raise ValueError(f"value heads of {inner // n_v} and key heads of {head_k} differ")
        return cls(d_conv=m[Keys.SSM.CONV_KERNEL], head_k_dim=head_k, n_k_heads=n_k, n_v_heads=n_v,
                   head_v_dim=inner // n_v, norm_eps=norm_eps, tiled=tiled)

    @property
    def key_dim(self) -> int:
        return self.n_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.head_v_dim

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_dim + self.value_dim


# ---------------------------------------------------------------------------- the delta rule

@mx.compile
def _step(S: mx.array, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array
          ) -> tuple[mx.array, mx.array]:
    """One token: S (b, H, V, K), q and k (b, H, K), v (b, H, V), g and beta (b, H)."""
    S = S * mx.exp(g)[..., None, None]
    delta = (v - (S @ k[..., None])[..., 0]) * beta[..., None]  # (b, H, V)
    S = S + delta[..., None] * k[..., None, :]
    return S, (S @ q[..., None])[..., 0]


def _chunked(S: mx.array, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, size: int
             ) -> tuple[mx.array, mx.array]:
    """The recurrence over chunks of `size` positions (the WY form of DeltaNet, arXiv
    2406.06484, with a decay as Gated DeltaNet, arXiv 2412.06464), llama.cpp's chunked graph:
    heads-first q, k (b, H, L, K), v (b, H, L, V), g and beta (b, H, L); L a multiple of size.

    Within a chunk, with G_t = sum of g up to t and D[t, u] = exp(G_t - G_u) for u <= t:
        A = strictly lower part of (beta k) k^T * D,  T = (I + A)^-1
        U = T (beta v),  W = T (beta k exp(G))      (what each position writes, and how it
                                                     reads the state before the chunk)
    then chunk by chunk, from the state S before it:
        V' = U - W S^T;  o = (q exp(G)) S^T + (q k^T * D) V'
        S  = exp(G_last) S + V'^T (k exp(G_last - G))
    Every exponent is <= 0."""
    b, H, L, _ = k.shape
    n = L // size
    q, k, v = (t.reshape(b, H, n, size, t.shape[-1]) for t in (q, k, v))
    g, beta = g.reshape(b, H, n, size), beta.reshape(b, H, n, size)
    G = mx.cumsum(g, axis=-1)
    causal = mx.tril(mx.ones((size, size), mx.bool_))
    decay = mx.exp(mx.where(causal, G[..., :, None] - G[..., None, :], -mx.inf))  # (b, H, n, C, C)
    k_beta = k * beta[..., None]
    A = mx.tril((k_beta @ k.swapaxes(-1, -2)) * decay, -1)
    # a unit lower-triangular inverse; MLX has it on the CPU stream only (any device can read it)
    T = mx.linalg.tri_inv(A + mx.eye(size), upper=False, stream=mx.cpu)
    U = T @ (v * beta[..., None])  # (b, H, n, C, V)
    W = T @ (k_beta * mx.exp(G)[..., None])  # (b, H, n, C, K)
    scores = (q @ k.swapaxes(-1, -2)) * decay  # (b, H, n, C, C), zero above the diagonal
    q_decayed = q * mx.exp(G)[..., None]
    last = G[..., -1:]  # (b, H, n, 1)
    k_to_end = k * mx.exp(last - G)[..., None]
    outs = []
    for c in range(n):
        St = S.swapaxes(-1, -2)  # (b, H, K, V)
        v_new = U[:, :, c] - W[:, :, c] @ St
        outs.append(q_decayed[:, :, c] @ St + scores[:, :, c] @ v_new)
        S = S * mx.exp(last[:, :, c])[..., None] + v_new.swapaxes(-1, -2) @ k_to_end[:, :, c]
    return S, mx.stack(outs, axis=2).reshape(b, H, L, -1)


def gated_delta_rule(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array | None
                     ) -> tuple[mx.array, mx.array]:
    """q and k (b, L, H, K) (queries already scaled), v (b, L, H, V), g (the log decay, <= 0)
    and beta (b, L, H), state (b, H, V, K) (None: zeros) -> (o (b, L, H, V), the new state).
    One token steps the recurrence; more run in chunks of DELTA_CHUNK (the last one padded
    with positions that change nothing: k = v = beta = g = 0)."""
    b, L, H, K = k.shape
    S = mx.zeros((b, H, v.shape[-1], K), v.dtype) if state is None else state
    if L == 1:
        S, o = _step(S, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
        return o[:, None], S
    size = min(DELTA_CHUNK, L)
    pad = -L % size
    q, k, v = (mx.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for t in (q, k, v))
    g, beta = (mx.pad(t, ((0, 0), (0, pad), (0, 0))).transpose(0, 2, 1) for t in (g, beta))
    S, o = _chunked(S, q, k, v, g, beta, size)
    return o[:, :, :L].transpose(0, 2, 1, 3), S


# ---------------------------------------------------------------------------- the mixer

def init_delta_net(block: nn.Module, d: int, args: DeltaNetArgs, has) -> None:
    """Set the tensors of a gated delta net from and to width d on `block` (has(leaf):
    whether the file holds blk.N.leaf)."""
    a = args
    if has("ssm_in.weight"):  # Qwen3-Next files from converters before the split: HF's in_proj_qkvz
        block.ssm_in = nn.Linear(d, a.conv_channels + a.value_dim, bias=False)
    else:
        block.attn_qkv = nn.Linear(d, a.conv_channels, bias=False)
        block.attn_gate = nn.Linear(d, a.value_dim, bias=False)
    if has("ssm_ba.weight"):  # per key head: its value heads' b, then their a
        block.ssm_ba = nn.Linear(d, 2 * a.n_v_heads, bias=False)
    else:
        block.ssm_beta = nn.Linear(d, a.n_v_heads, bias=False)
        block.ssm_alpha = nn.Linear(d, a.n_v_heads, bias=False)
    block.ssm_conv1d = {"weight": mx.zeros((a.conv_channels, a.d_conv))}
    block.ssm_dt = {"bias": mx.zeros((a.n_v_heads,))}
    block.ssm_a = mx.zeros((a.n_v_heads,))
    block.ssm_norm = {"weight": mx.ones((a.head_v_dim,))}
    block.ssm_out = nn.Linear(a.value_dim, d, bias=False)


def l2_norm(x: mx.array, eps: float) -> mx.array:
    """x / sqrt(sum x² + eps) over the last axis (llama.cpp's build_gdn_l2_norm)."""
    return x * mx.rsqrt(mx.sum(x * x, axis=-1, keepdims=True) + eps)


def _qkv_and_gate(block: nn.Module, x: mx.array, a: DeltaNetArgs) -> tuple[mx.array, mx.array]:
    """The convolution's input (q, k, v of all heads in turn) and the output gate z."""
    if "attn_qkv" in block:
        return block.attn_qkv(x), block.attn_gate(x)
    # ssm_in: per key head, its q, k, then its value heads' v and z (llama.cpp's legacy path)
    B, L, _ = x.shape
    r = a.n_v_heads // a.n_k_heads
    mixed = block.ssm_in(x).reshape(B, L, a.n_k_heads, -1)
    q, k, v, z = mx.split(mixed, [a.head_k_dim, 2 * a.head_k_dim, 2 * a.head_k_dim + r * a.head_v_dim], axis=-1)
    qkv = mx.concatenate([t.reshape(B, L, -1) for t in (q, k, v)], axis=-1)
    return qkv, z.reshape(B, L, a.value_dim)


def delta_net(block: nn.Module, x: mx.array, cache, args: DeltaNetArgs) -> mx.array:
    """The gated delta net of `block` on x (B, L, D), reading and advancing `cache` (a
    RecurrentCache, or None for a prompt on its own)."""
    a = args
    B, L, _ = x.shape
    if "ssm_ba" in block:
        r = a.n_v_heads // a.n_k_heads
        b_, alpha = mx.split(block.ssm_ba(x).reshape(B, L, a.n_k_heads, 2 * r), 2, axis=-1)
        b_, alpha = b_.reshape(B, L, a.n_v_heads), alpha.reshape(B, L, a.n_v_heads)
    else:
        b_, alpha = block.ssm_beta(x), block.ssm_alpha(x)
    beta = mx.sigmoid(b_)
    g = softplus(alpha + block.ssm_dt["bias"]) * block.ssm_a  # (B, L, n_v): log decay
    qkv, z = _qkv_and_gate(block, x, a)
    qkv, state = causal_conv(qkv, block.ssm_conv1d["weight"], cache.conv if cache is not None else None)
    qkv = nn.silu(qkv)
    q, k, v = mx.split(qkv, [a.key_dim, 2 * a.key_dim], axis=-1)
    q = l2_norm(q.reshape(B, L, a.n_k_heads, a.head_k_dim), a.norm_eps)
    k = l2_norm(k.reshape(B, L, a.n_k_heads, a.head_k_dim), a.norm_eps)
    if a.n_v_heads != a.n_k_heads:
        r = a.n_v_heads // a.n_k_heads
        q, k = ((mx.tile(t, (1, 1, r, 1)) if a.tiled else mx.repeat(t, r, axis=2)) for t in (q, k))
    o, ssm = gated_delta_rule(q * a.head_k_dim ** -0.5, k, v.reshape(B, L, a.n_v_heads, a.head_v_dim), g, beta,
                              cache.ssm if cache is not None else None)
    if cache is not None:
        cache.conv, cache.ssm = state, ssm
        cache.advance(L)
    z = z.reshape(B, L, a.n_v_heads, a.head_v_dim)
    o = kernels.rms_norm(o, block.ssm_norm["weight"], a.norm_eps) * nn.silu(z)
    return block.ssm_out(o.reshape(B, L, a.value_dim))


# ---------------------------------------------------------------------------- the layer

@dataclass
class DeltaNetHybridArgs(HybridArgs):
    delta: DeltaNetArgs | None = None  # the gated delta net layers' (mixer "deltanet")


class DeltaNetBlock(HybridBlock):
    """A hybrid layer whose mixer may also be a gated delta net ("deltanet")."""

    def _init_attention(self, args: DeltaNetHybridArgs, i: int) -> None:
        if args.mixers[i] != "deltanet":
            return super()._init_attention(args, i)
        self.mixer = "deltanet"
        init_delta_net(self, args.dim, args.delta, self._has)

    def attention(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        if self.mixer == "deltanet":
            return delta_net(self, x, cache, self.args.delta)
        return super().attention(x, mask, cache, factors)


class DeltaNetDecoder(HybridDecoder):
    """Gated delta net layers (a RecurrentCache each) and attention layers (KV caches)."""

    block = DeltaNetBlock
