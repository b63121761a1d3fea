"""Hybrid decoders: the decoder stack (decoder.py) whose layers mix with attention, a Mamba
mixer (ssm.py) or a short convolution (shortconv.py), one kind per layer, each followed by
the layer's FFN or experts as in any decoder (llama.cpp's granite-hybrid.cpp, lfm2.cpp).

Attention layers keep keys and values (KVCache, or RotatingKVCache where they slide); the
others carry a RecurrentCache. No row of a batch can share a forward pass with another
(a recurrent state has no padding to hide a later start), so the model is not batchable
and the generation loop runs its rows one at a time."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..cache import KVCache, RecurrentCache, RotatingKVCache
from .decoder import Block, Decoder, DecoderArgs
from .shortconv import ShortConv
from .ssm import SSMArgs, init_mamba, mamba

MIXERS = ("attention", "mamba", "shortconv")


@dataclass
class HybridArgs(DecoderArgs):
    mixers: tuple[str, ...] = ()  # per layer, one of MIXERS
    ssm: SSMArgs | None = None  # the Mamba layers'
    conv_l_cache: int = 0  # the short-convolution layers' kernel width


class HybridBlock(Block):
    """A decoder layer whose mixer is attention, Mamba or a short convolution; the rest
    (norms, residual scale, FFN or experts) is `Block`'s."""

    def _init_attention(self, args: HybridArgs, i: int) -> None:
        self.mixer = args.mixers[i]
        if self.mixer == "attention":
            super()._init_attention(args, i)
        elif self.mixer == "mamba":
            init_mamba(self, args.dim, args.ssm, self._has)
        elif self.mixer == "shortconv":
            self.shortconv = ShortConv(args.dim, args.conv_l_cache)
        else:
            raise ValueError(f"unknown mixer {self.mixer!r} (one of {MIXERS})")

    def attention(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        if self.mixer == "mamba":
            return mamba(self, x, cache, self.args.ssm)
        if self.mixer == "shortconv":
            return self.shortconv(x, cache)
        return super().attention(x, mask, cache, factors)


class HybridDecoder(Decoder):
    block = HybridBlock
    batchable = False

    def make_cache(self) -> list:
        def kind(b: HybridBlock):
            if b.mixer != "attention":
                return RecurrentCache()
            return RotatingKVCache(self.args.sliding_window) if b.sliding else KVCache()
        return [kind(b) for b in self.blk]

    def masks(self, L: int, caches: list) -> list:
        """Decoder.masks over the attention layers; the others need none."""
        by_kind: dict[bool, object] = {}
        for b, c in zip(self.blk, caches):
            if b.mixer == "attention" and b.sliding not in by_kind:
                probe = c if c is not None else RotatingKVCache(self.args.sliding_window) if b.sliding else KVCache()
                by_kind[b.sliding] = probe.make_mask(L)
        return [by_kind[b.sliding] if b.mixer == "attention" else None for b in self.blk]
