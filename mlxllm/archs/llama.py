"""Llama (2, 3, Mistral-style, SmolLM2): GQA attention with RoPE, SwiGLU MLP, RMSNorm.

Module attributes are GGUF tensor names (llama-arch.cpp LLM_ARCH_LLAMA). llama.cpp's
converter permutes the rows of attn_q / attn_k so that RoPE rotates adjacent pairs
(LLAMA_ROPE_TYPE_NORM); MLX's `traditional=True` RoPE is that rotation, so the weights are
used as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from ..gguf import GGUFFile
from ..registry import Arch
from .base import RMSNorm, attention, project, require, rope, swiglu


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
    rope_base: float
    rope_dims: int
    rope_scale: float  # position multiplier: 1 / linear scaling factor
    context_length: int
    tied_embeddings: bool  # no output.weight: the token embedding is the output projection
    rope_freqs: bool  # Llama 3.1 long-context frequency factors stored as rope_freqs.weight

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelArgs:
        m = gf.metadata
        dim = require(gf, "embedding_length")
        n_heads = require(gf, "attention.head_count")
        head_dim = m.get("attention.key_length", dim // n_heads)
        scaling = m.get("rope.scaling.type", "none")
        if scaling not in ("none", "linear", "llama3"):
            raise ValueError(f"rope scaling {scaling!r} is not supported by llama")
        factor = m.get("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        return cls(
            vocab_size=gf.tensors["token_embd.weight"].shape[0],
            dim=dim,
            n_layers=require(gf, "block_count"),
            n_heads=n_heads,
            n_kv_heads=m.get("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            ffn_dim=require(gf, "feed_forward_length"),
            norm_eps=m.get("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=m.get("rope.freq_base", 10000.0),
            rope_dims=m.get("rope.dimension_count", head_dim),
            rope_scale=1.0 / factor if factor else 1.0,
            context_length=m.get("context_length", 4096),
            tied_embeddings="output.weight" not in gf.tensors,
            rope_freqs="rope_freqs.weight" in gf.tensors,
        )


class Block(nn.Module):
    """One decoder layer; attention projections sit directly on the block, as in GGUF."""

    SHARED_INPUT_PROJECTIONS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.attn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attn_q = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.attn_k = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.attn_v = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.attn_output = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_gate = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.ffn_up = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.ffn_down = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def attention(self, x: mx.array, mask, cache: KVCache | None, rope_freqs: mx.array | None) -> mx.array:
        a = self.args
        B, L, _ = x.shape
        # (B, L, H*D) -> (B, L, H, D), rotated, -> (B, H, L, D)
        q, k, v = project(x, self.attn_q, self.attn_k, self.attn_v)
        q = q.reshape(B, L, a.n_heads, a.head_dim)
        k = k.reshape(B, L, a.n_kv_heads, a.head_dim)
        v = v.reshape(B, L, a.n_kv_heads, a.head_dim).transpose(0, 2, 1, 3)
        rot = dict(traditional=True, base=None if rope_freqs is not None else a.rope_base, scale=a.rope_scale,
                   offset=cache.offset if cache is not None else 0, freqs=rope_freqs)
        q = rope(q, a.rope_dims, **rot).transpose(0, 2, 1, 3)
        k = rope(k, a.rope_dims, **rot).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, a.head_dim ** -0.5, mask)
        return self.attn_output(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, H*D)

    def __call__(self, x, mask, cache, rope_freqs):
        h = x + self.attention(self.attn_norm(x), mask, cache, rope_freqs)
        y = self.ffn_norm(h)
        return h + self.ffn_down(swiglu(*project(y, self.ffn_gate, self.ffn_up)))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.token_embd = nn.Embedding(args.vocab_size, args.dim)
        self.blk = [Block(args) for _ in range(args.n_layers)]
        self.output_norm = RMSNorm(args.dim, eps=args.norm_eps)
        if not args.tied_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.rope_freqs:
            # llama.cpp divides each rotation frequency by this factor; mx.fast.rope takes
            # per-pair wavelengths, so the factors multiply base**(2i/d).
            self.rope_freqs = {"weight": mx.ones((args.rope_dims // 2,))}

    @property
    def layers(self) -> list[Block]:
        return self.blk

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blk]

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.token_embd(tokens)
        mask = (cache[0] if cache else KVCache()).make_mask(h.shape[1])
        freqs = None
        if self.args.rope_freqs:
            d = self.args.rope_dims
            freqs = self.args.rope_base ** (mx.arange(0, d, 2, dtype=mx.float32) / d) * self.rope_freqs["weight"]
        for i, block in enumerate(self.blk):
            h = block(h, mask, cache[i] if cache else None, freqs)
        h = self.output_norm(h)
        return self.token_embd.as_linear(h) if self.args.tied_embeddings else self.output(h)


ARCH = Arch(
    name="llama",
    args=ModelArgs,
    model=Model,
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    description="Llama 2/3, Mistral-style and SmolLM2 decoders",
)
