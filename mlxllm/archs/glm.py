"""Zhipu GLM-4-0414 and ChatGLM / GLM-4-9B (src/models/glm4.cpp, chatglm.cpp): NORM RoPE over
the first half of each head, fused gate+up FFN (gate first)."""

from __future__ import annotations

import dataclasses

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, routing_from_file


def glm(gf: GGUFFile) -> DecoderArgs:
    """GLM-4 adds norms after attention and FFN; ChatGLM fuses qkv with a bias: both are
    what the file holds."""
    return decoder_args(gf, rope="norm")


def glm4moe(gf: GGUFFile) -> DecoderArgs:
    """GLM-4.5: partial NEOX RoPE, optional q/k norms, the FFN's pre-norm stored as
    post_attention_norm, leading dense layers, DeepSeek-V3-style routing (sigmoid by
    default, selection bias, groups, normalization, scale) plus shared experts. The
    trailing multi-token-prediction layers are loaded by llama.cpp but never run: skipped."""
    m = gf.metadata
    nextn = m.get(Keys.LLM.NEXTN_PREDICT_LAYERS, 0)
    args = decoder_args(gf, rope="neox", ffn_input_norm="post_attention_norm", moe=routing_from_file(gf, "sigmoid"))
    return dataclasses.replace(args, n_layers=args.n_layers - nextn, extra_layers=nextn)


ARCHS = (
    Arch(name="glm4", args=glm, model=Decoder, hf_architectures=("Glm4ForCausalLM",), description="GLM-4-0414 / GLM-Z1",
         convert=convert_hooks.Glm4),
    Arch(name="glm4moe", args=glm4moe, model=Decoder, hf_architectures=("Glm4MoeForCausalLM",),
         description="GLM-4.5 / 4.6 / 4.7 (Air) MoE", convert=convert_hooks.Glm4Moe),
    Arch(name="chatglm", args=glm, model=Decoder, hf_architectures=("GlmForCausalLM", "ChatGLMModel"),
         description="ChatGLM3 / GLM-4-9B", convert=convert_hooks.ChatGLM),
)
