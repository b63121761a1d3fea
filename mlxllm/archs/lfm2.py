"""LFM2 and LFM2-MoE (src/models/lfm2.cpp, lfm2moe.cpp): a decoder whose layers are either
GQA attention (per-head q/k RMSNorm, NEOX RoPE) or a short convolution (nn/shortconv.py), each
followed by a SwiGLU FFN, or routed experts past the leading dense layers (LFM2-MoE: sigmoid
scores plus a selection bias, the chosen weights renormalized). A layer with no KV heads in
attention.head_count_kv is a convolution layer. The final norm is stored as token_embd_norm
(llama.cpp's LLM_TENSOR_OUTPUT_NORM_LFM2) and acts after the last layer, not on the embeddings."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import mlx.core as mx
from gguf import Keys

from ..cache import KVCache, RecurrentCache, RotatingKVCache
from ..gguf import GGUFFile, Metadata
from ..nn import Block, Decoder, DecoderArgs
from ..nn.shortconv import ShortConv
from ..registry import Arch
from .base import decoder_args, is_array, require


@dataclasses.dataclass
class Lfm2Args(DecoderArgs):
    conv_layers: tuple[bool, ...] = ()
    conv_l_cache: int = 3


def lfm2(gf: GGUFFile) -> Lfm2Args:
    m = gf.metadata
    n_layers = require(gf, Keys.LLM.BLOCK_COUNT)
    n_kv = require(gf, Keys.Attention.HEAD_COUNT_KV)
    if not is_array(n_kv):
        raise ValueError("attention.head_count_kv must list the layers (0: a convolution layer)")
    conv_layers = tuple(int(h) == 0 for h in n_kv)
    attention_kv = {int(h) for h in n_kv if h}
    if len(attention_kv) > 1:
        raise ValueError(f"attention layers with different KV head counts {sorted(attention_kv)} are not supported")
    if not m.get(Keys.Attention.CAUSAL, True):
        raise ValueError("bidirectional LFM2 (embedding) files are not supported")
    # decoder_args reads the attention layers' hyperparameters: give the convolution layers
    # the attention layers' KV heads (they build no attention)
    kv = attention_kv.pop() if attention_kv else require(gf, Keys.Attention.HEAD_COUNT)
    key = Keys.Attention.HEAD_COUNT_KV.replace("{arch}", gf.architecture)
    view = SimpleNamespace(metadata=Metadata({**{k: m[k] for k in m}, key: [kv] * n_layers}), tensors=gf.tensors)
    window = m.get(Keys.Attention.SLIDING_WINDOW, 0)
    args = decoder_args(view, rope="neox", moe={"gating": "sigmoid", "normalize": True})  # lfm2moe: norm_w true, no scale
    return Lfm2Args(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DecoderArgs)}
                    | {"sliding_window": window, "sliding": tuple(not c for c in conv_layers) if window else None},
                    conv_layers=conv_layers, conv_l_cache=require(gf, Keys.ShortConv.L_CACHE))


class Lfm2Block(Block):
    """A decoder layer whose mixer is attention or, on convolution layers, `ShortConv`."""

    def _init_attention(self, args: Lfm2Args, i: int) -> None:
        self.conv = args.conv_layers[i]
        if self.conv:
            self.shortconv = ShortConv(args.dim, args.conv_l_cache)
        else:
            super()._init_attention(args, i)

    def attention(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        if self.conv:
            return self.shortconv(x, cache)
        return super().attention(x, mask, cache, factors)


class Lfm2(Decoder):
    block = Lfm2Block
    # Convolution layers' state cannot be batched with rows that started elsewhere.
    batchable = False

    def make_cache(self) -> list:
        return [RecurrentCache() if b.conv else RotatingKVCache(self.args.sliding_window) if b.sliding else KVCache()
                for b in self.blk]

    def masks(self, L: int, caches: list) -> list:
        """Decoder.masks over the attention layers; convolution layers need none."""
        by_kind: dict[bool, object] = {}
        for b, c in zip(self.blk, caches):
            if not b.conv and b.sliding not in by_kind:
                probe = c if c is not None else RotatingKVCache(self.args.sliding_window) if b.sliding else KVCache()
                by_kind[b.sliding] = probe.make_mask(L)
        return [None if b.conv else by_kind[b.sliding] for b in self.blk]

    def input_embeddings(self, tokens: mx.array, cache: list | None) -> mx.array:
        return self.token_embd(tokens)  # token_embd_norm is the final norm here

    def head(self, h: mx.array) -> mx.array:
        return super().head(self.token_embd_norm(h))


ARCHS = (
    Arch(name="lfm2", args=lfm2, model=Lfm2, hf_architectures=("Lfm2ForCausalLM", "LFM2ForCausalLM"),
         description="Liquid LFM2 / LFM2.5 (short convolutions + attention)"),
    Arch(name="lfm2moe", args=lfm2, model=Lfm2, hf_architectures=("Lfm2MoeForCausalLM",),
         description="Liquid LFM2-MoE (8B-A1B, 24B-A2B)"),
)
