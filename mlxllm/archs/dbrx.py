"""Databricks DBRX (src/models/dbrx.cpp): a fused qkv projection clamped to [-clamp_kqv,
clamp_kqv] before the split, NEOX RoPE, LayerNorms without bias, and every layer's FFN a
mixture of experts (softmax over all, the top k renormalized) behind the norm the file
calls attn_output_norm."""

from __future__ import annotations

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, require


def dbrx(gf: GGUFFile) -> DecoderArgs:
    # llama.cpp reads no expert_weights_scale for DBRX: the renormalized weights are used as they are
    return decoder_args(gf, norm="layer", rope="neox", moe={"normalize": True},
                        clamp_qkv=require(gf, Keys.Attention.CLAMP_KQV), ffn_input_norm="attn_output_norm")


ARCH = Arch(name="dbrx", args=dbrx, model=Decoder, hf_architectures=("DbrxForCausalLM",),
            description="Databricks DBRX (16x12B): clamped fused qkv, 16 experts top-4",
            convert=convert_hooks.Dbrx)
