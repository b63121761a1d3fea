"""Hybrid decoders: the decoder stack (decoder.py) whose layers mix with attention, a Mamba
mixer (ssm.py) or a short convolution (shortconv.py), one kind per layer, each followed by
the layer's FFN or experts as in any decoder (llama.cpp's granite-hybrid.cpp, lfm2.cpp).

Attention layers keep keys and values (KVCache, or RotatingKVCache where they slide); the
others carry a RecurrentCache, Falcon-H1's layers a KVRecurrentCache. Rows of a batch share a
forward pass (every kind has a batched form, `mlxllm.cache.batch_window`): attention masks
come from the attention layers' caches, a recurrent state is each row's own."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .. import kernels
from ..cache import KVCache, KVRecurrentCache, RecurrentCache, RotatingKVCache
from .decoder import Block, Decoder, DecoderArgs
from .ffn import activate
from .moe import route
from .shortconv import ShortConv
from .ssm import SSMArgs, init_mamba, mamba

# "attention+mamba": both on the same input, their outputs added (Falcon-H1); "ffn": the
# layer's FFN is its only branch (Nemotron-H)
MIXERS = ("attention", "mamba", "shortconv", "attention+mamba", "ffn")


@dataclass
class HybridArgs(DecoderArgs):
    mixers: tuple[str, ...] = ()  # per layer, one of MIXERS
    ssm: SSMArgs | None = None  # the Mamba layers'
    conv_l_cache: int = 0  # the short-convolution layers' kernel width


class HybridBlock(Block):
    """A decoder layer whose mixer is attention, Mamba, a short convolution or attention and
    Mamba side by side; the rest (norms, residual scale, FFN or experts) is `Block`'s."""

    def __init__(self, args: HybridArgs, i: int):
        super().__init__(args, i)
        # Falcon-H1's FFN norm is stored without a .weight suffix (llama.cpp loads blk.N.ffn_norm)
        self.bare_ffn_norm = self._has("ffn_norm")
        if self.bare_ffn_norm:
            self.ffn_norm = mx.ones((args.dim,))

    def _init_attention(self, args: HybridArgs, i: int) -> None:
        self.mixer = args.mixers[i]
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r} (one of {MIXERS})")
        if self.mixer.startswith("attention"):
            super()._init_attention(args, i)
        if self.mixer.endswith("mamba"):
            init_mamba(self, args.dim, args.ssm, self._has)
        if self.mixer == "shortconv":
            self.shortconv = ShortConv(args.dim, args.conv_l_cache)

    def _init_ffn(self, args: HybridArgs, i: int) -> None:
        # Nemotron-H's mixer layers have no FFN: the layer is its one residual branch
        if self._has("ffn_down.weight"):
            super()._init_ffn(args, i)

    def _init_experts(self, args: HybridArgs, i: int) -> None:
        super()._init_experts(args, i)
        if "ffn_gate_shexp" in self and not self._has("ffn_gate_shexp.weight"):
            self.pop("ffn_gate_shexp")  # Nemotron-H's shared expert is ungated: up, activation, down
        if self._has("ffn_latent_down.weight"):
            raise ValueError("experts on a latent projection (moe_latent_size) are not supported")

    def mixture(self, x: mx.array) -> mx.array:
        """Gated experts as `Block` runs them; Nemotron-H's (no gate tensors) as llama.cpp's
        build_ffn_layer: activation(up) -> down for the chosen experts, weighted and added in
        order, plus the ungated shared expert."""
        if "ffn_gate_exps" in self or "ffn_gate_shexp" in self:
            return super().mixture(x)
        moe = self.moe
        B, L, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        bias = self["exp_probs_b"]["bias"].reshape(-1) if "exp_probs_b" in self else None
        chosen, weights = route(self.ffn_gate_inp(flat), moe, bias)  # (N, k)
        h = activate(self.ffn_up_exps(flat, chosen), moe.activation)  # (N, k, ff)
        y = self.ffn_down_exps(h.reshape(-1, h.shape[-1]), chosen.reshape(-1, 1)).reshape(-1, moe.n_used, D)
        out = kernels.expert_sum(y, weights).reshape(B, L, D)  # weighted, added in llama.cpp's order
        if "ffn_up_shexp" in self:
            out = out + self.ffn_down_shexp(activate(self.ffn_up_shexp(x), moe.activation))
        return out

    @property
    def single_branch(self) -> bool:
        return self.mixer == "ffn" or not (self._has("ffn_down.weight") or self._has("ffn_down_exps.weight"))

    @property
    def attends(self) -> bool:
        return self.mixer.startswith("attention")

    def attention(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        if self.mixer == "mamba":
            return mamba(self, x, cache, self.args.ssm)
        if self.mixer == "shortconv":
            return self.shortconv(x, cache)
        if self.mixer == "ffn":
            if cache is not None:
                cache.advance(x.shape[1])  # an empty state that counts positions like the others
            return self.feed_forward(x)
        out = super().attention(x, mask, cache, factors)
        if self.mixer == "attention+mamba":  # llama.cpp adds attn_out + ssm_out
            out = out + mamba(self, x, cache, self.args.ssm)
        return out

    def __call__(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        if self.single_branch:
            return kernels.residual_add(x, self.attention(self.attn_norm(x), mask, cache, factors))
        if not self.bare_ffn_norm:
            return super().__call__(x, mask, cache, factors)
        h = kernels.residual_add(x, self.attention(self.attn_norm(x), mask, cache, factors))
        return kernels.residual_add(h, self.feed_forward(kernels.rms_norm(h, self.ffn_norm, self.args.norm_eps)))


class HybridDecoder(Decoder):
    block = HybridBlock
    batchable = True

    def make_cache(self) -> list:
        def kind(b: HybridBlock):
            if b.mixer == "attention+mamba":
                return KVRecurrentCache()
            if not b.attends:
                return RecurrentCache()
            return RotatingKVCache(self.args.sliding_window) if b.sliding else KVCache()
        return [kind(b) for b in self.blk]

    def masks(self, L: int, caches: list) -> list:
        """Decoder.masks over the attention layers; the others need none."""
        by_kind: dict[bool, object] = {}
        for b, c in zip(self.blk, caches):
            if b.attends and b.sliding not in by_kind:
                probe = c if c is not None else RotatingKVCache(self.args.sliding_window) if b.sliding else KVCache()
                by_kind[b.sliding] = probe.make_mask(L)
        return [by_kind[b.sliding] if b.attends else None for b in self.blk]
