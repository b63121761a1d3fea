"""OpenAI gpt-oss (src/models/openai-moe.cpp): NEOX RoPE with YaRN, attention sinks, sliding
windows on even layers, biases on attention and every expert, top-k experts weighted by a
softmax over the chosen router logits, the clamped SwiGLU."""

from __future__ import annotations

import dataclasses

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, file_sliding_pattern, require

SWA_PERIOD = 2  # llama.cpp load_swa_pattern(2): even layers slide


def gpt_oss(gf: GGUFFile) -> DecoderArgs:
    # HF's post_attention_layernorm is the FFN's pre-norm: stored as post_attention_norm
    args = decoder_args(gf, rope="neox", ffn_input_norm="post_attention_norm",
                        moe=dict(gating="softmax_weight", activation="swiglu_oai"))
    return dataclasses.replace(args, sliding_window=require(gf, Keys.Attention.SLIDING_WINDOW),
                               sliding=file_sliding_pattern(gf, args.n_layers, SWA_PERIOD))


ARCH = Arch(name="gpt-oss", args=gpt_oss, model=Decoder, hf_architectures=("GptOssForCausalLM",),
            description="OpenAI gpt-oss (20b, 120b)", convert=convert_hooks.GptOss)
