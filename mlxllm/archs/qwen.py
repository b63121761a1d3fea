"""Qwen 2 and 3, and the decoders shaped like them: NEOX RoPE, RMSNorm, SwiGLU
(src/models/qwen2.cpp, qwen3.cpp, seed-oss.cpp, hunyuan-dense.cpp)."""

from __future__ import annotations

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, routing_from_file


def qwen(gf: GGUFFile) -> DecoderArgs:
    """Qwen 2 (q/k/v biases, optional output bias) and Qwen 3 (per-head q/k norms): what
    differs is which tensors the file holds."""
    return decoder_args(gf, rope="neox")


def qwen2moe(gf: GGUFFile) -> DecoderArgs:
    """Experts weighted by their softmax probabilities as they are (llama.cpp never
    renormalizes them here), plus a shared expert behind a sigmoid gate."""
    return decoder_args(gf, rope="neox", moe=dict(normalize=False))


def qwen3moe(gf: GGUFFile) -> DecoderArgs:
    return decoder_args(gf, rope="neox", moe=dict(normalize=True))


def seed_oss(gf: GGUFFile) -> DecoderArgs:
    # The file has no ffn_norm: HF's post_attention_layernorm (the FFN's pre-norm) is stored
    # as post_attention_norm.
    return decoder_args(gf, rope="neox", ffn_input_norm="post_attention_norm")


def hunyuan_dense(gf: GGUFFile) -> DecoderArgs:
    # q/k norms act on rotated heads; NTK-alpha is baked into rope.freq_base by the converter
    return decoder_args(gf, rope="neox", qk_norm_after_rope=True)


def hunyuan_moe(gf: GGUFFile) -> DecoderArgs:
    return decoder_args(gf, rope="neox", qk_norm_after_rope=True, moe=dict(normalize=True))


def dots1(gf: GGUFFile) -> DecoderArgs:
    """Qwen 3 attention, leading dense layers, DeepSeek-V3-style routing (the file must
    name its gating: llama.cpp has no default) plus shared experts."""
    return decoder_args(gf, rope="neox", moe=routing_from_file(gf, None))


ARCHS = (
    Arch(name="qwen2", args=qwen, model=Decoder, hf_architectures=("Qwen2ForCausalLM",), convert=convert_hooks.Qwen2,
         description="Qwen 2 / 2.5 dense"),
    Arch(name="qwen3", args=qwen, model=Decoder, hf_architectures=("Qwen3ForCausalLM",), convert=convert_hooks.Qwen2,
         description="Qwen 3 dense"),
    Arch(name="qwen2moe", args=qwen2moe, model=Decoder, hf_architectures=("Qwen2MoeForCausalLM",),
         convert=convert_hooks.QwenMoe,
         description="Qwen 1.5 / 2 MoE (shared expert)"),
    Arch(name="qwen3moe", args=qwen3moe, model=Decoder, hf_architectures=("Qwen3MoeForCausalLM",),
         convert=convert_hooks.QwenMoe,
         description="Qwen 3 MoE (30B-A3B, 235B-A22B, Coder)"),
    Arch(name="seed_oss", args=seed_oss, model=Decoder, hf_architectures=("SeedOssForCausalLM",), convert=convert_hooks.Converter,
         description="ByteDance Seed-OSS"),
    Arch(name="hunyuan-dense", args=hunyuan_dense, model=Decoder, hf_architectures=("HunYuanDenseV1ForCausalLM",), convert=convert_hooks.HunYuanDense,
         description="Tencent Hunyuan dense"),
    Arch(name="hunyuan-moe", args=hunyuan_moe, model=Decoder, hf_architectures=("HunYuanMoEV1ForCausalLM",),
         convert=convert_hooks.HunYuanMoe, description="Tencent Hunyuan-A13B"),
    Arch(name="dots1", args=dots1, model=Decoder, hf_architectures=("Dots1ForCausalLM",), convert=convert_hooks.Dots1,
         description="rednote dots.llm1"),
)
