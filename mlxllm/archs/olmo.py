"""AllenAI OLMo, OLMo 2 and OLMo 3 (src/models/olmo.cpp, olmo2.cpp). OLMo 3 files say
`olmo2` and add sliding windows with a per-layer pattern."""

from __future__ import annotations

import dataclasses

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs, RopeArgs
from ..registry import Arch
from .base import decoder_args, file_sliding_pattern

OLMO3_SWA_PERIOD = 4  # llama.cpp load_swa_pattern(4) when the file has no pattern


def olmo(gf: GGUFFile) -> DecoderArgs:
    """LayerNorms without parameters, q/k/v clipped to [-clamp_kqv, clamp_kqv]."""
    return decoder_args(gf, norm="layer", rope="norm", parametric_norms=False,
                        clamp_qkv=gf.metadata.get(Keys.Attention.CLAMP_KQV, 0.0))


def olmo2(gf: GGUFFile) -> DecoderArgs:
    """Norms after attention and FFN only, q/k RMSNorms across all heads. OLMo 3's sliding
    layers rotate with the plain base (no scaling), its full layers with the file's."""
    args = decoder_args(gf, rope="neox")
    window = gf.metadata.get(Keys.Attention.SLIDING_WINDOW, 0)
    if window <= 0:
        return args
    return dataclasses.replace(args, sliding_window=window,
                               sliding=file_sliding_pattern(gf, args.n_layers, OLMO3_SWA_PERIOD),
                               swa_rope=RopeArgs(args.rope.dims, traditional=False, base=args.rope.base))


def olmoe(gf: GGUFFile) -> DecoderArgs:
    """q/k RMSNorms across all heads, every layer experts (softmax weights as they are)."""
    return decoder_args(gf, rope="neox", moe=dict(normalize=False))


ARCHS = (
    Arch(name="olmo", args=olmo, model=Decoder, hf_architectures=("OlmoForCausalLM",), description="OLMo 1",
         convert=convert_hooks.Olmo),
    Arch(name="olmo2", args=olmo2, model=Decoder, hf_architectures=("Olmo2ForCausalLM", "Olmo3ForCausalLM"), convert=convert_hooks.Olmo2,
         description="OLMo 2 and OLMo 3 (sliding windows)"),
    Arch(name="olmoe", args=olmoe, model=Decoder, hf_architectures=("OlmoeForCausalLM",), description="OLMoE",
         convert=convert_hooks.Olmoe),
)
