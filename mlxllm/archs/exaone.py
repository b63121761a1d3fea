"""LG EXAONE 4 (src/models/exaone4.cpp): norms after attention and FFN only, per-head q/k
RMSNorms, NEOX RoPE; the 32B (64 layers) slides three layers of four and gives its global
layers no positions."""

from __future__ import annotations

import dataclasses

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, file_sliding_pattern

SWA_LAYERS = 64  # llama.cpp turns sliding windows on only for this depth (the 32B)
SWA_PERIOD = 4


def exaone4(gf: GGUFFile) -> DecoderArgs:
    args = decoder_args(gf, rope="neox")
    if args.n_layers != SWA_LAYERS:
        return args
    sliding = file_sliding_pattern(gf, args.n_layers, SWA_PERIOD)
    return dataclasses.replace(args, sliding_window=gf.metadata.get(Keys.Attention.SLIDING_WINDOW, 4096),
                               sliding=sliding, rope_layers=sliding)


ARCH = Arch(name="exaone4", args=exaone4, model=Decoder, hf_architectures=("Exaone4ForCausalLM",),
            description="LG EXAONE 4.0", convert=convert_hooks.Exaone4)
