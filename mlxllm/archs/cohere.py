"""Cohere Command-R and Command-R7B / Command-A (src/models/command-r.cpp, cohere2.cpp):
LayerNorm without bias, attention and FFN in parallel off one norm, NORM RoPE (HF's
rotary is interleaved: no converter permutation), tied output times logit_scale."""

from __future__ import annotations

import dataclasses

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, file_sliding_pattern, require

COHERE2_SWA_PERIOD = 4  # three sliding layers, then a global one


def command_r(gf: GGUFFile) -> DecoderArgs:
    return decoder_args(gf, norm="layer", rope="norm", parallel=True,
                        logit_scale=gf.metadata.get(Keys.LLM.LOGIT_SCALE, 0.0) or 1.0)


def cohere2(gf: GGUFFile) -> DecoderArgs:
    """Sliding layers rotate; the global ones have no positions at all."""
    args = decoder_args(gf, norm="layer", rope="norm", parallel=True, logit_scale=require(gf, Keys.LLM.LOGIT_SCALE))
    sliding = file_sliding_pattern(gf, args.n_layers, COHERE2_SWA_PERIOD)
    return dataclasses.replace(args, sliding_window=require(gf, Keys.Attention.SLIDING_WINDOW), sliding=sliding,
                               rope_layers=sliding)


ARCHS = (
    Arch(name="command-r", args=command_r, model=Decoder, hf_architectures=("CohereForCausalLM",), convert=convert_hooks.CommandR,
         description="Cohere Command-R / R+ / Aya 23"),
    Arch(name="cohere2", args=cohere2, model=Decoder, hf_architectures=("Cohere2ForCausalLM",), convert=convert_hooks.Cohere2,
         description="Cohere Command-R7B / Command-A (sliding windows, NoPE global layers)"),
)
