"""MiniMax-M2 (src/models/minimax-m2.cpp): q/k RMSNorms across all heads' width before the
head split, partial NEOX RoPE, and every layer's FFN a mixture of experts chosen on the
gating function's scores plus a selection-only bias (exp_probs_b), the chosen weights
renormalized."""

from __future__ import annotations

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, routing_from_file


def minimax_m2(gf: GGUFFile) -> DecoderArgs:
    # llama.cpp: the gating function from the file (no default), weights always renormalized,
    # and no expert_weights_scale read for this architecture
    routing = routing_from_file(gf, None) | {"normalize": True, "scale": 1.0}
    return decoder_args(gf, rope="neox", moe=routing)


ARCH = Arch(name="minimax-m2", args=minimax_m2, model=Decoder, hf_architectures=("MiniMaxM2ForCausalLM",),
            description="MiniMax-M2 (230B-A10B): full-width q/k norms, sigmoid routing with a selection bias",
            convert=convert_hooks.MiniMaxM2)
