"""Zhipu GLM-4-0414 and ChatGLM / GLM-4-9B (src/models/glm4.cpp, chatglm.cpp): NORM RoPE over
the first half of each head, fused gate+up FFN (gate first)."""

from __future__ import annotations

from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args


def glm(gf: GGUFFile) -> DecoderArgs:
    """GLM-4 adds norms after attention and FFN; ChatGLM fuses qkv with a bias: both are
    what the file holds."""
    return decoder_args(gf, rope="norm")


ARCHS = (
    Arch(name="glm4", args=glm, model=Decoder, hf_architectures=("Glm4ForCausalLM",), description="GLM-4-0414 / GLM-Z1"),
    Arch(name="chatglm", args=glm, model=Decoder, hf_architectures=("GlmForCausalLM", "ChatGLMModel"),
         description="ChatGLM3 / GLM-4-9B"),
)
