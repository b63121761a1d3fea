"""Gemma 3 text decoder (src/models/gemma3-iswa.cpp): per-head q/k RMSNorm, sliding-window
attention on five of every six layers, GELU-gated FFN, norms before and after both attention
and FFN, embeddings scaled by sqrt(dim), tied output.

The converter stores Gemma's RMSNorm weights as 1 + w, so the plain RMSNorm uses them as
they are; Q/K rows are not permuted (LLAMA_ROPE_TYPE_NEOX).
"""

from __future__ import annotations

import dataclasses
import math

from gguf import Keys

from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs, RopeArgs
from ..registry import Arch
from .base import decoder_args, file_sliding_pattern

SWA_ROPE_BASE = 10000.0  # llama.cpp rope_freq_base_train_swa for gemma3; not in the GGUF
SWA_PERIOD = 6  # llama.cpp set_swa_pattern(6): five sliding layers, then one global


def hparams(gf: GGUFFile) -> DecoderArgs:
    args = decoder_args(gf, rope="neox", activation="gelu_tanh")
    window = gf.metadata.get(Keys.Attention.SLIDING_WINDOW, 0)
    # GGUF has no query_pre_attn_scalar; llama.cpp infers it from the size: the 27B
    # (62 layers) scales by dim / n_heads, every other size by head_dim.
    scale_dim = args.dim // args.n_heads if args.n_layers == 62 else args.head_dim
    return dataclasses.replace(
        args,
        embed_scale=math.sqrt(args.dim),
        attn_scale=scale_dim ** -0.5,
        sliding_window=window,
        sliding=file_sliding_pattern(gf, args.n_layers, SWA_PERIOD) if window > 0 else None,
        swa_rope=RopeArgs(args.rope.dims, traditional=False, base=SWA_ROPE_BASE),  # unscaled
    )


ARCH = Arch(
    name="gemma3",
    args=hparams,
    model=Decoder,
    hf_architectures=("Gemma3ForCausalLM",),
    description="Gemma 3 text decoders (270M to 27B), sliding-window attention",
)
