"""Gemma 3 text decoder: GQA attention with per-head q/k RMSNorm, sliding-window attention on
most layers, GELU-gated MLP, RMSNorm before and after both attention and MLP.

Follows llama.cpp's graph (src/models/gemma3-iswa.cpp, hparams in llama-model.cpp
LLM_ARCH_GEMMA3). Module attributes are GGUF tensor names (llama-arch.cpp LLM_ARCH_GEMMA3).
Facts about the GGUF file that shape this code:
- the converter stores Gemma's RMSNorm weights as 1 + w, so plain `nn.RMSNorm` uses them
  as they are;
- Q/K rows are not permuted (LLAMA_ROPE_TYPE_NEOX): MLX's `traditional=False` RoPE;
- there is no output.weight: the token embedding is the output projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, RotatingKVCache, window_mask
from ..gguf import GGUFFile
from ..registry import Arch
from .base import RMSNorm, attention, geglu, project, require, rope

SWA_ROPE_BASE = 10000.0  # llama.cpp rope_freq_base_train_swa for gemma3; not in the GGUF
SWA_PATTERN = 6  # llama.cpp set_swa_pattern(6): five sliding layers, then one global


def _sliding_layers(gf: GGUFFile, n_layers: int, window: int) -> tuple[bool, ...]:
    if window <= 0:
        return (False,) * n_layers
    # Newer converters may store the pattern: a period n, or one bool per layer.
    pattern = gf.metadata.get("attention.sliding_window_pattern", SWA_PATTERN)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layers:
            raise ValueError(f"sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return tuple(bool(p) for p in pattern)
    n = int(pattern)
    # llama_hparams::set_swa_pattern: layer i slides unless i % n == n - 1 (n = 0: all slide)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layers))


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_base: float  # global layers; sliding layers use SWA_ROPE_BASE
    rope_scale: float  # position multiplier on global layers: 1 / linear scaling factor
    attn_scale: float  # Gemma's query_pre_attn_scalar ** -0.5
    sliding_window: int  # 0: no sliding layers
    sliding: tuple[bool, ...]  # per layer
    attn_softcap: float  # 0: none
    final_softcap: float  # 0: none
    tied_embeddings: bool

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelArgs:
        m = gf.metadata
        dim = require(gf, "embedding_length")
        n_layers = require(gf, "block_count")
        n_heads = require(gf, "attention.head_count")
        head_dim = m.get("attention.key_length", dim // n_heads)
        scaling = m.get("rope.scaling.type", "linear" if "rope.scaling.factor" in m else "none")
        if scaling not in ("none", "linear"):
            raise ValueError(f"rope scaling {scaling!r} is not supported by gemma3")
        factor = m.get("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        window = m.get("attention.sliding_window", 0)
        # GGUF has no query_pre_attn_scalar; llama.cpp infers it from the size: the 27B
        # (62 layers) scales by dim / n_heads, every other size by head_dim.
        scale_dim = dim // n_heads if n_layers == 62 else head_dim
        return cls(
            vocab_size=gf.tensors["token_embd.weight"].shape[0],
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=m.get("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            ffn_dim=require(gf, "feed_forward_length"),
            norm_eps=m.get("attention.layer_norm_rms_epsilon", 1e-6),
            rope_base=m.get("rope.freq_base", 1e6),
            rope_scale=1.0 / factor if factor else 1.0,
            attn_scale=scale_dim ** -0.5,
            sliding_window=window,
            sliding=_sliding_layers(gf, n_layers, window),
            attn_softcap=m.get("attn_logit_softcapping", 0.0),
            final_softcap=m.get("final_logit_softcapping", 0.0),
            tied_embeddings="output.weight" not in gf.tensors,
        )


def softcapped_attention(q, k, v, scale: float, cap: float, mask) -> mx.array:
    """Attention with scores squashed to (-cap, cap) by cap * tanh(s / cap) before the mask
    (Gemma 2 style); the fused kernel has no such step."""
    B, H, L, D = q.shape
    n_rep = H // k.shape[1]
    q = q.reshape(B, k.shape[1], n_rep, L, D)  # (B, H_kv, rep, L, D): heads share a kv head
    s = (q * scale) @ k[:, :, None].swapaxes(-1, -2)  # (B, H_kv, rep, L, T)
    s = cap * mx.tanh(s / cap)
    if isinstance(mask, str):
        T = k.shape[2]
        mask = window_mask(T - L, L, 0, T, T + 1)
    if mask is not None:
        s = mx.where(mask, s, -mx.inf)
    out = mx.softmax(s, axis=-1, precise=True) @ v[:, :, None]  # (B, H_kv, rep, L, D)
    return out.reshape(B, H, L, -1)


class Block(nn.Module):
    """One decoder layer; projections and norms sit directly on the block, as in GGUF."""

    SHARED_INPUT_PROJECTIONS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))

    def __init__(self, args: ModelArgs, sliding: bool):
        super().__init__()
        self.args = args
        self.sliding = sliding
        self.rope_base = SWA_ROPE_BASE if sliding else args.rope_base
        self.rope_scale = 1.0 if sliding else args.rope_scale
        d, hd = args.dim, args.head_dim
        self.attn_norm = RMSNorm(d, eps=args.norm_eps)
        self.attn_q = nn.Linear(d, args.n_heads * hd, bias=False)
        self.attn_k = nn.Linear(d, args.n_kv_heads * hd, bias=False)
        self.attn_v = nn.Linear(d, args.n_kv_heads * hd, bias=False)
        self.attn_q_norm = RMSNorm(hd, eps=args.norm_eps)
        self.attn_k_norm = RMSNorm(hd, eps=args.norm_eps)
        self.attn_output = nn.Linear(args.n_heads * hd, d, bias=False)
        self.post_attention_norm = RMSNorm(d, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(d, eps=args.norm_eps)
        self.ffn_gate = nn.Linear(d, args.ffn_dim, bias=False)
        self.ffn_up = nn.Linear(d, args.ffn_dim, bias=False)
        self.ffn_down = nn.Linear(args.ffn_dim, d, bias=False)
        self.post_ffw_norm = RMSNorm(d, eps=args.norm_eps)

    def attention(self, x: mx.array, mask, cache) -> mx.array:
        a = self.args
        B, L, _ = x.shape
        # (B, L, H*D) -> (B, L, H, D): q/k norms act per head, before RoPE
        q, k, v = project(x, self.attn_q, self.attn_k, self.attn_v)
        q = self.attn_q_norm(q.reshape(B, L, a.n_heads, a.head_dim))
        k = self.attn_k_norm(k.reshape(B, L, a.n_kv_heads, a.head_dim))
        v = v.reshape(B, L, a.n_kv_heads, a.head_dim)
        rot = dict(traditional=False, base=self.rope_base, scale=self.rope_scale,
                   offset=cache.offset if cache is not None else 0)
        q, k = rope(q, a.head_dim, **rot), rope(k, a.head_dim, **rot)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, D)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if a.attn_softcap:
            out = softcapped_attention(q, k, v, a.attn_scale, a.attn_softcap, mask)
        else:
            out = attention(q, k, v, a.attn_scale, mask)
        return self.attn_output(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, H*D)

    def __call__(self, x, mask, cache):
        h = x + self.post_attention_norm(self.attention(self.attn_norm(x), mask, cache))
        y = self.ffn_norm(h)
        # LLM_FFN_GELU + LLM_FFN_PAR: ggml_gelu is the tanh approximation
        y = self.ffn_down(geglu(*project(y, self.ffn_gate, self.ffn_up)))
        return h + self.post_ffw_norm(y)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.token_embd = nn.Embedding(args.vocab_size, args.dim)
        self.blk = [Block(args, s) for s in args.sliding]
        self.output_norm = RMSNorm(args.dim, eps=args.norm_eps)
        if not args.tied_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def layers(self) -> list[Block]:
        return self.blk

    def make_cache(self) -> list[KVCache | RotatingKVCache]:
        w = self.args.sliding_window
        return [RotatingKVCache(w) if b.sliding else KVCache() for b in self.blk]

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        L = tokens.shape[1]
        # Gemma scales token embeddings by sqrt(dim); llama.cpp uses sqrtf(n_embd) in f32.
        h = self.token_embd(tokens) * math.sqrt(self.args.dim)
        # One mask per kind of layer, from the first cache of that kind: every cache of a
        # kind holds the same positions. Without a cache, an empty one gives the mask of a
        # prompt starting at position 0.
        caches = cache if cache else [None] * len(self.blk)
        masks = {}
        for block, c in zip(self.blk, caches):
            if block.sliding not in masks:
                probe = c if c is not None else (RotatingKVCache(self.args.sliding_window) if block.sliding else KVCache())
                masks[block.sliding] = probe.make_mask(L)
        for block, c in zip(self.blk, caches):
            h = block(h, masks[block.sliding], c)
        h = self.output_norm(h)
        logits = self.token_embd.as_linear(h) if self.args.tied_embeddings else self.output(h)
        if self.args.final_softcap:
            cap = self.args.final_softcap
            logits = cap * mx.tanh(logits / cap)
        return logits


ARCH = Arch(
    name="gemma3",
    args=ModelArgs,
    model=Model,
    hf_architectures=("Gemma3ForCausalLM",),
    description="Gemma 3 text decoders (270M to 27B), sliding-window attention",
)
