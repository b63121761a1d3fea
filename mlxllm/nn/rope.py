"""Rotary position embeddings as llama.cpp's ggml_rope_ext applies them.

One rule covers every variant: pair i of the first `dims` entries of a head turns by
position * inv_freq[i], where inv_freq[i] = base**(-2i/dims), divided by a per-pair factor
from the file where it has one (`rope_freqs`: Llama 3.1; `rope_factors_long/short`:
Phi-3's LongRoPE), then scaled: linearly (every pair by 1/factor) or by YaRN (pairs blend
between the scaled and unscaled frequency along a ramp, and the rotated entries grow by
mscale). NORM rotation turns adjacent pairs (2i, 2i+1); NEOX turns (i, i + dims/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
from gguf import Keys

from .. import kernels


@dataclass(frozen=True)
class Yarn:
    """YaRN (ggml rope_yarn): the ramp between corr_dims, from the original context."""

    orig_ctx: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    ext_factor: float = 1.0


@dataclass(frozen=True)
class RopeArgs:
    dims: int  # rotated entries of a head (partial rotary: fewer than head_dim)
    traditional: bool  # True: LLAMA_ROPE_TYPE_NORM (adjacent pairs); False: NEOX (halves)
    base: float
    freq_scale: float = 1.0  # ggml freq_scale: 1 / the linear or YaRN factor
    yarn: Yarn | None = None
    attn_factor: float = 1.0  # multiplies the rotated entries' cos/sin (the net YaRN mscale)
    factors: str | None = None  # GGUF tensor of per-pair frequency divisors, on the model

    @classmethod
    def from_gguf(cls, meta, dims: int, traditional: bool, base: float | None = None,
                  yarn_betas: bool = False, yarn_log_mul: bool = False) -> RopeArgs:
        """The rope the file describes, as llama_context sets it up: rope.freq_base and
        rope.scaling.* (linear, yarn; "llama3" and "longrope" files carry their factors as
        tensors). yarn_betas / yarn_log_mul: the architecture reads those keys (mistral3)."""
        base = meta.get(Keys.Rope.FREQ_BASE, 10000.0) if base is None else base
        kind = meta.get(Keys.Rope.SCALING_TYPE, "linear")  # llama.cpp's default type
        factor = meta.get(Keys.Rope.SCALING_FACTOR, 1.0) or 1.0
        attn_factor = meta.get(Keys.Rope.SCALING_ATTN_FACTOR, 1.0)  # hparams.rope_attn_factor
        if kind in ("none", "llama3", "longrope") or (kind == "linear" and factor == 1.0):
            return cls(dims, traditional, base, attn_factor=attn_factor)
        if kind == "linear":
            return cls(dims, traditional, base, freq_scale=1.0 / factor, attn_factor=attn_factor)
        if kind == "yarn":
            yarn = Yarn(orig_ctx=meta.get(Keys.Rope.SCALING_ORIG_CTX_LEN, meta.get(Keys.LLM.CONTEXT_LENGTH, 4096)))
            if yarn_betas:
                yarn = Yarn(yarn.orig_ctx, meta.get(Keys.Rope.SCALING_YARN_BETA_FAST, 32.0),
                            meta.get(Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0))
            # llama_context: the cos/sin multiplier is get_mscale(factor, 1), divided by
            # get_mscale(factor, log_mul) where the architecture reads a log multiplier.
            mscale = _mscale(factor, 1.0)
            log_mul = meta.get(Keys.Rope.SCALING_YARN_LOG_MUL, 0.0) if yarn_log_mul else 0.0
            if log_mul:
                mscale /= _mscale(factor, log_mul)
            # YaRN's ramp divides by log(freq_base) and takes logs of the original context
            if not (isinstance(base, (int, float)) and base > 1.0):
                raise ValueError(f"rope.freq_base = {base} must be above 1 for YaRN scaling")
            if not (yarn.orig_ctx > 0 and yarn.beta_fast > 0 and yarn.beta_slow > 0):
                raise ValueError("YaRN's original context and betas must be positive")
            return cls(dims, traditional, base, freq_scale=1.0 / factor, yarn=yarn, attn_factor=mscale * attn_factor)
        raise ValueError(f"rope scaling {kind!r} is not supported")


def _mscale(scale: float, m: float) -> float:
    """llama_context's get_mscale: YaRN's attention magnitude for a context `scale`."""
    return 1.0 if scale <= 1.0 else 1.0 + 0.1 * m * math.log(scale)


def yarn_corr_dims(dims: int, orig_ctx: int, base: float, beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the pairs where the ramp starts and ends."""
    def corr_dim(n_rot: float) -> float:
        return dims * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    start = math.floor(corr_dim(beta_fast))
    end = math.ceil(corr_dim(beta_slow))
    return max(0.0, start), min(dims - 1.0, end)


class Rope:
    """Applies one `RopeArgs`; holds the per-pair wavelengths it derives (once per factor
    tensor), so the kernels' rotation tables are shared by every layer of a forward pass."""

    def __init__(self, args: RopeArgs):
        self.args = args
        self._derived: tuple[int | None, mx.array | None, float] | None = None

    def _wavelengths(self, factors: mx.array | None) -> tuple[mx.array | None, float]:
        """(per-pair wavelengths or None for plain base/scale, mscale)."""
        a = self.args
        key = None if factors is None else id(factors)
        if self._derived is not None and self._derived[0] == key:
            return self._derived[1], self._derived[2]
        mscale = a.attn_factor
        if factors is None and a.yarn is None:
            freqs = None
        else:
            i = mx.arange(0, a.dims // 2, dtype=mx.float32)
            inv = a.base ** (-2.0 * i / a.dims)  # theta_extrap per unit position
            if factors is not None:
                inv = inv / factors.astype(mx.float32)
            if a.yarn is not None and a.yarn.ext_factor != 0:
                low, high = yarn_corr_dims(a.dims, a.yarn.orig_ctx, a.base, a.yarn.beta_fast, a.yarn.beta_slow)
                ramp = (1 - mx.clip((i - low) / max(0.001, high - low), 0, 1)) * a.yarn.ext_factor
                inv = inv * (a.freq_scale * (1 - ramp) + ramp)
            else:
                inv = inv * a.freq_scale
            freqs = 1.0 / inv
            mx.eval(freqs)
        self._derived = (key, freqs, mscale)
        return freqs, mscale

    def tables(self, L: int, offset: int | mx.array, factors: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """cos and sin for L positions from offset (kernels.rope_tables): what the fused
        decode attention rotates by."""
        a = self.args
        freqs, mscale = self._wavelengths(factors)
        return kernels.rope_tables(L, offset, a.dims, a.base if freqs is None else None,
                                   a.freq_scale if freqs is None else 1.0, freqs, mscale)

    def __call__(self, x: mx.array, offset: int | mx.array, factors: mx.array | None = None) -> mx.array:
        """x (B, L, H, D) at positions offset + l -> (B, L, H, D)."""
        a = self.args
        freqs, mscale = self._wavelengths(factors)
        if freqs is None:
            return kernels.rope(x, a.dims, traditional=a.traditional, base=a.base, scale=a.freq_scale,
                                offset=offset, mscale=mscale)
        return kernels.rope(x, a.dims, traditional=a.traditional, base=None, scale=1.0, offset=offset,
                            freqs=freqs, mscale=mscale)
