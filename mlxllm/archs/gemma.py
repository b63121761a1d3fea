"""Gemma 1, 2 and 3 text decoders (src/models/gemma.cpp, gemma2.cpp, gemma3.cpp): NEOX
RoPE, GELU-gated FFN, embeddings scaled by sqrt(dim), tied output; Gemma 2 and 3 add norms
after attention and FFN and sliding-window layers, Gemma 2 soft-capped scores and logits,
Gemma 3 per-head q/k norms.

The converter stores Gemma's RMSNorm weights as 1 + w, so the plain RMSNorm uses them as
they are.
"""

from __future__ import annotations

import dataclasses
import math

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs, RopeArgs
from ..registry import Arch
from .base import decoder_args, file_sliding_pattern

GEMMA2_SWA_PERIOD = 2  # llama.cpp load_swa_pattern(2): even layers slide
GEMMA2_ATTN_SOFTCAP = 50.0  # llama.cpp's defaults when the file has no softcap keys
GEMMA2_FINAL_SOFTCAP = 30.0
GEMMA3_SWA_PERIOD = 6  # five sliding layers, then one global
GEMMA3_SWA_ROPE_BASE = 10000.0  # llama.cpp rope_freq_base_train_swa for gemma3; not in the GGUF

def gemma(gf: GGUFFile) -> DecoderArgs:
    args = decoder_args(gf, rope="neox", activation="gelu_tanh")
    return dataclasses.replace(args, embed_scale=math.sqrt(args.dim))

def _query_scale(args: DecoderArgs, big_layers: int) -> float:
    """GGUF has no query_pre_attn_scalar; llama.cpp infers it from the size: the 27B scales
    by dim / n_heads, every other size by head_dim."""
    return (args.dim // args.n_heads if args.n_layers == big_layers else args.head_dim) ** -0.5

def _sliding(gf: GGUFFile, args: DecoderArgs, period: int, swa_base: float) -> dict:
    window = gf.metadata.get(Keys.Attention.SLIDING_WINDOW, 0)
    if window <= 0:
        return {}
    return dict(sliding_window=window, sliding=file_sliding_pattern(gf, args.n_layers, period),
                swa_rope=RopeArgs(args.rope.dims, traditional=False, base=swa_base))  # unscaled

def gemma2(gf: GGUFFile) -> DecoderArgs:
    m = gf.metadata
    args = gemma(gf)
    return dataclasses.replace(
        args,
        attn_scale=_query_scale(args, 46),
        attn_softcap=m.get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, GEMMA2_ATTN_SOFTCAP),
        final_softcap=m.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, GEMMA2_FINAL_SOFTCAP),
        **_sliding(gf, args, GEMMA2_SWA_PERIOD, m.get(Keys.Rope.FREQ_BASE_SWA, args.rope.base)),
    )

def gemma3(gf: GGUFFile) -> DecoderArgs:
    args = gemma(gf)
    return dataclasses.replace(args, attn_scale=_query_scale(args, 62),
                               **_sliding(gf, args, GEMMA3_SWA_PERIOD, GEMMA3_SWA_ROPE_BASE))

ARCHS = (
    Arch(name="gemma", args=gemma, model=Decoder, hf_architectures=("GemmaForCausalLM",), convert=convert_hooks.Gemma,
         description="Gemma 1"),
    Arch(name="gemma2", args=gemma2, model=Decoder, hf_architectures=("Gemma2ForCausalLM",), convert=convert_hooks.Gemma2,
         description="Gemma 2: sliding windows, soft-capped attention and logits"),
    Arch(name="gemma3", args=gemma3, model=Decoder, hf_architectures=("Gemma3ForCausalLM",), convert=convert_hooks.Gemma3,
         description="Gemma 3 text decoders (270M to 27B), sliding-window attention"),
)
