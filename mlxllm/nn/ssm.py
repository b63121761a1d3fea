"""State-space mixers as llama.cpp runs them (src/models/mamba-base.cpp: build_mamba_layer,
build_mamba2_layer; ggml's ssm_conv and ssm_scan CPU ops), for Mamba, Mamba-2 and the hybrids
that hold Mamba layers.

A mixer's tensors sit on the block that owns it, under their GGUF names (ssm_in, ssm_conv1d,
ssm_x, ssm_dt, ssm_a, ssm_d, ssm_norm, ssm_out), so `init_mamba` sets them on the block and
`mamba` runs them, the way nn/moe.py's `experts` runs a block's experts. What a layer carries
between forward passes is a `mlxllm.cache.RecurrentCache`: the last d_conv - 1 inputs of the
causal convolution and the scan's state.

    Mamba 1   in -> x, z; x -> conv -> silu -> x_proj -> dt (rank r), B, C (one group), RMS-normed
              in Falcon-Mamba (no weights) and Jamba (weights);
              dt -> dt_proj; per channel and state: h = h * exp(softplus(dt) * A) + softplus(dt) * x * B,
              y = h . C + D * x; out = ssm_out(y * silu(z))
    Mamba 2   in -> z, xBC, dt; xBC -> conv -> silu -> x (heads x head_dim), B, C (n_groups);
              A is one scalar per head; y as above, then y * silu(z) and an RMSNorm per group
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from gguf import Keys

from .norm import unit_rms_norm

# ggml_compute_softplus_f32 returns x itself above this
SOFTPLUS_LINEAR = 20.0


@dataclass(frozen=True)
class SSMArgs:
    d_conv: int  # convolution kernel width
    d_inner: int  # channels of the scan (heads x head_dim)
    d_state: int  # state size per channel
    n_heads: int  # Mamba 2: scan heads (the file's time_step_rank); Mamba 1: d_inner (head_dim 1)
    dt_rank: int = 0  # Mamba 1: width of dt before ssm_dt projects it
    n_groups: int = 1  # Mamba 2: groups of heads that share B and C
    dt_b_c_rms: bool = False  # Falcon-Mamba: weightless RMSNorm on dt, B and C
    norm_eps: float = 1e-5
    version: int = 1

    @classmethod
    def from_metadata(cls, m, version: int, norm_eps: float) -> SSMArgs:
        """The ssm.* keys of a file (llama.cpp's load_arch_hparams for the Mamba family)."""
        d_inner = m[Keys.SSM.INNER_SIZE]
        rank = m[Keys.SSM.TIME_STEP_RANK]
        return cls(d_conv=m[Keys.SSM.CONV_KERNEL], d_inner=d_inner, d_state=m[Keys.SSM.STATE_SIZE],
                   n_heads=rank if version == 2 else d_inner, dt_rank=rank if version == 1 else 0,
                   n_groups=m.get(Keys.SSM.GROUP_COUNT, 1) if version == 2 else 1,
                   dt_b_c_rms=bool(m.get(Keys.SSM.DT_B_C_RMS, False)), norm_eps=norm_eps, version=version)

    @property
    def conv_channels(self) -> int:
        """Channels the convolution runs over: x alone (Mamba 1), x, B and C (Mamba 2)."""
        return self.d_inner if self.version == 1 else self.d_inner + 2 * self.n_groups * self.d_state


def softplus(x: mx.array) -> mx.array:
    """ggml's softplus, log(1 + exp(x)) rounded as it rounds it (not log1p: at the small
    steps Mamba's dt takes, the two differ by ~1e-4 of the value)."""
    return mx.where(x > SOFTPLUS_LINEAR, x, mx.log(1 + mx.exp(mx.minimum(x, SOFTPLUS_LINEAR))))


def causal_conv(x: mx.array, weight: mx.array, state: mx.array | None) -> tuple[mx.array, mx.array]:
    """Depthwise causal convolution over time (ggml_ssm_conv): x (B, L, C), weight (C, K),
    state (B, K - 1, C) the inputs before x (None: zeros) -> (y (B, L, C), the new state).
    y[t] = sum_k in[t + k] * weight[:, k] over in = state ++ x, summed in k order as ggml does."""
    B, L, C = x.shape
    K = weight.shape[-1]
    if state is None:
        state = mx.zeros((B, K - 1, C), x.dtype)
    padded = mx.concatenate([state, x], axis=1)  # (B, K - 1 + L, C)
    y = padded[:, :L] * weight[:, 0]
    for k in range(1, K):
        y = y + padded[:, k:k + L] * weight[:, k]
    return y, padded[:, L:]


@mx.compile
def _scan_step(h: mx.array, x_dt: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array
               ) -> tuple[mx.array, mx.array]:
    """One token: h (b, H, P, N), x_dt (b, H, P), dt (b, H), A (H, N or 1), B, C (b, H, N)."""
    decay = mx.exp(dt[..., None] * A)  # (b, H, N or 1)
    h = h * decay[:, :, None, :] + x_dt[..., None] * B[:, :, None, :]
    return h, (h * C[:, :, None, :]).sum(axis=-1)


def selective_scan(x: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array, state: mx.array | None
                   ) -> tuple[mx.array, mx.array]:
    """ggml_ssm_scan, token by token: x (b, L, H, P), dt (b, L, H) before softplus, A (H, N)
    per state (Mamba 1) or (H, 1) one per head (Mamba 2), B and C (b, L, G, N) shared by
    H / G consecutive heads, state (b, H, P, N) (None: zeros) -> (y (b, L, H, P), new state).
    h = h * exp(softplus(dt) * A) + (x * softplus(dt)) * B;  y = sum over N of h * C."""
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    dt = softplus(dt)
    x_dt = x * dt[..., None]
    if G != H:  # group g serves heads g * H / G ... (ggml: g = h / (H / G))
        B, C = mx.repeat(B, H // G, axis=2), mx.repeat(C, H // G, axis=2)
    h = mx.zeros((b, H, P, N), x.dtype) if state is None else state
    if A.shape[-1] == 1 and L > 1:  # one decay per head: whole chunks at once
        ys = []
        for start in range(0, L, SSD_CHUNK):
            end = min(start + SSD_CHUNK, L)
            y, h = _ssd_chunk(h, x_dt[:, start:end], dt[:, start:end], A[:, 0], B[:, start:end], C[:, start:end])
            ys.append(y)
        return mx.concatenate(ys, axis=1), h
    ys = []
    for t in range(L):
        h, y = _scan_step(h, x_dt[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return mx.stack(ys, axis=1), h


# Positions per chunk of the Mamba-2 prompt scan: (T, T) decay and score matrices per head
# (512 tokens, 24 heads of 64, state 128, 2 cores: 0.10 s at 32, 0.14 s at 64, 0.67 s token by token)
SSD_CHUNK = 32


def _ssd_chunk(h: mx.array, x_dt: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array
               ) -> tuple[mx.array, mx.array]:
    """T tokens of the scan with one scalar decay per head (Mamba-2's state-space duality,
    arXiv 2405.21060): the sequential recurrence unrolled, as matrix products.
    h (b, H, P, N) before the chunk, x_dt (b, T, H, P), dt (b, T, H) after softplus, A (H,),
    B and C (b, T, H, N). With S_t = sum_{r <= t} dt_r A (the log of the decay from the
    chunk's start through t):
        y_t = sum_{u <= t} exp(S_t - S_u) (C_t . B_u) x_dt_u + exp(S_t) C_t . h
        h'  = exp(S_T) h + sum_u exp(S_T - S_u) x_dt_u B_u^T
    Every exponent is <= 0, so nothing overflows; the products round differently from
    ggml's token-by-token loop (~1e-7 relative)."""
    T = x_dt.shape[1]
    S = mx.cumsum(dt * A, axis=1).transpose(0, 2, 1)  # (b, H, T)
    causal = mx.tril(mx.ones((T, T), mx.bool_))
    decay = mx.exp(mx.where(causal, S[..., :, None] - S[..., None, :], -mx.inf))  # (b, H, T, T): t, u
    Bh, Ch = B.transpose(0, 2, 1, 3), C.transpose(0, 2, 1, 3)  # (b, H, T, N)
    xh = x_dt.transpose(0, 2, 1, 3)  # (b, H, T, P)
    y = (decay * (Ch @ Bh.swapaxes(-1, -2))) @ xh  # (b, H, T, P)
    y = y + mx.exp(S)[..., None] * (Ch @ h.swapaxes(-1, -2))  # the state before the chunk
    to_end = mx.exp(S[..., -1:] - S)  # (b, H, T)
    h = mx.exp(S[..., -1])[..., None, None] * h + (xh * to_end[..., None]).swapaxes(-1, -2) @ Bh  # (b, H, P, N)
    return y.transpose(0, 2, 1, 3), h


def init_mamba(block: nn.Module, d: int, args: SSMArgs, has) -> None:
    """Set the tensors of a Mamba mixer from and to width d on `block` (has(leaf): whether
    the file holds blk.N.leaf)."""
    a = args
    if a.version == 1:
        block.ssm_in = nn.Linear(d, 2 * a.d_inner, bias=has("ssm_in.bias"))
        block.ssm_x = nn.Linear(a.d_inner, a.dt_rank + 2 * a.d_state, bias=False)
        block.ssm_dt = nn.Linear(a.dt_rank, a.d_inner, bias=True)
        block.ssm_a = mx.zeros((a.d_inner, a.d_state))
        for leaf, width in (("ssm_dt_norm", a.dt_rank), ("ssm_b_norm", a.d_state), ("ssm_c_norm", a.d_state)):
            if has(f"{leaf}.weight"):  # Jamba: RMSNorms with weights on dt, B and C
                setattr(block, leaf, {"weight": mx.ones((width,))})
    else:  # z, xBC, dt in one projection
        block.ssm_in = nn.Linear(d, 2 * a.d_inner + 2 * a.n_groups * a.d_state + a.n_heads, bias=has("ssm_in.bias"))
        block.ssm_dt = {"bias": mx.zeros((a.n_heads,))}
        block.ssm_a = mx.zeros((a.n_heads, 1))
        if has("ssm_norm.weight"):
            block.ssm_norm = {"weight": mx.zeros((a.n_groups, a.d_inner // a.n_groups))}
    block.ssm_conv1d = {"weight": mx.zeros((a.conv_channels, a.d_conv))}
    if has("ssm_conv1d.bias"):
        block.ssm_conv1d["bias"] = mx.zeros((a.conv_channels,))
    block.ssm_d = mx.zeros((a.d_inner,) if a.version == 1 else (a.n_heads, 1))
    block.ssm_out = nn.Linear(a.d_inner, d, bias=has("ssm_out.bias"))


def _conv(block: nn.Module, x: mx.array, cache) -> mx.array:
    conv = block.ssm_conv1d
    y, state = causal_conv(x, conv["weight"], cache.conv if cache is not None else None)
    if cache is not None:
        cache.conv = state
    if "bias" in conv:
        y = y + conv["bias"]
    return nn.silu(y)


def mamba(block: nn.Module, x: mx.array, cache, args: SSMArgs) -> mx.array:
    """The Mamba mixer of `block` on x (B, L, D), reading and advancing `cache` (a
    RecurrentCache, or None for a prompt on its own)."""
    Bt, L, _ = x.shape
    a = args
    state = cache.ssm if cache is not None else None
    if a.version == 1:
        x, z = mx.split(block.ssm_in(x), [a.d_inner], axis=-1)
        x = _conv(block, x, cache)
        dt, B, C = mx.split(block.ssm_x(x), [a.dt_rank, a.dt_rank + a.d_state], axis=-1)
        if "ssm_dt_norm" in block:
            dt, B, C = (unit_rms_norm(t, a.norm_eps) * block[leaf]["weight"]
                        for t, leaf in ((dt, "ssm_dt_norm"), (B, "ssm_b_norm"), (C, "ssm_c_norm")))
        elif a.dt_b_c_rms:
            dt, B, C = (unit_rms_norm(t, a.norm_eps) for t in (dt, B, C))
        dt = block.ssm_dt(dt)  # (B, L, d_inner): one head per channel
        # (B, L, d_inner) -> (B, L, H = d_inner, P = 1); B, C (B, L, 1 group, N)
        y, state = selective_scan(x[..., None], dt, block.ssm_a, B[:, :, None], C[:, :, None], state)
        y = y[..., 0] + x * block.ssm_d
    else:
        H, P, G, N = a.n_heads, a.d_inner // a.n_heads, a.n_groups, a.d_state
        z, xBC, dt = mx.split(block.ssm_in(x), [a.d_inner, 2 * a.d_inner + 2 * G * N], axis=-1)
        xBC = _conv(block, xBC, cache)
        x, B, C = mx.split(xBC, [a.d_inner, a.d_inner + G * N], axis=-1)
        x = x.reshape(Bt, L, H, P)
        y, state = selective_scan(x, dt + block.ssm_dt["bias"], block.ssm_a, B.reshape(Bt, L, G, N),
                                  C.reshape(Bt, L, G, N), state)
        y = (y + x * block.ssm_d).reshape(Bt, L, a.d_inner)
    y = nn.silu(z) * y
    if "ssm_norm" in block:  # RMSNorm within each group of d_inner / n_groups channels
        w = block.ssm_norm["weight"]
        y = (unit_rms_norm(y.reshape(Bt, L, *w.shape), a.norm_eps) * w).reshape(Bt, L, a.d_inner)
    if cache is not None:
        cache.ssm = state
        cache.advance(L)
    return block.ssm_out(y)
