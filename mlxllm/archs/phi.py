"""Microsoft Phi-2 and Phi-3 (src/models/phi2.cpp, phi3.cpp)."""

from __future__ import annotations

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args


def phi2(gf: GGUFFile) -> DecoderArgs:
    """LayerNorm, partial NEOX RoPE, attention and a plain GELU FFN in parallel off one norm,
    biases throughout, an output bias."""
    return decoder_args(gf, norm="layer", rope="neox", gated=False, activation="gelu_tanh", parallel=True)


def phi3(gf: GGUFFile) -> DecoderArgs:
    """Fused qkv and gate+up tensors, LongRoPE factors with rope.scaling.attn_factor on the
    rotation. llama.cpp reads attention.sliding_window and then turns sliding off: so do we."""
    return decoder_args(gf, rope="neox")


def phimoe(gf: GGUFFile) -> DecoderArgs:
    """Phi-3 attention with biases, RMSNorms with a bias (what llama.cpp computes; HF uses
    LayerNorm), renormalized softmax top-2 experts (HF's sparsemixer weights differ)."""
    return decoder_args(gf, rope="neox", moe=dict(normalize=True))


ARCHS = (
    Arch(name="phi2", args=phi2, model=Decoder, hf_architectures=("PhiForCausalLM",), description="Phi-2",
         convert=convert_hooks.Phi2),
    Arch(name="phi3", args=phi3, model=Decoder, hf_architectures=("Phi3ForCausalLM",), convert=convert_hooks.Phi3,
         description="Phi-3 / Phi-4 mini, LongRoPE"),
    Arch(name="phimoe", args=phimoe, model=Decoder, hf_architectures=("PhiMoEForCausalLM",), convert=convert_hooks.PhiMoe,
         description="Phi-3.5 MoE"),
)
