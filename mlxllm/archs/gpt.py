"""The LayerNorm families with plain FFNs or biases throughout: GPT-2, StarCoder 1/2,
GPT-NeoX, Falcon, BLOOM, MPT, StableLM, Nemotron (src/models/<name>.cpp). Positions come
from a learned table (gpt2, starcoder, MPT without ALiBi), ALiBi (bloom, mpt) or NEOX RoPE,
often over part of each head."""

from __future__ import annotations

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, require

BLOOM_ALIBI_MAX_BIAS = 8.0  # fixed in llama.cpp's bloom.cpp; the file has no key for it


def learned_positions(gf: GGUFFile) -> DecoderArgs:
    """GPT-2 and StarCoder: absolute positions from position_embd, fused qkv with biases."""
    return decoder_args(gf, norm="layer", rope=None, gated=False, activation="gelu_tanh")


def starcoder2(gf: GGUFFile) -> DecoderArgs:
    return decoder_args(gf, norm="layer", rope="neox", gated=False, activation="gelu_tanh")


def gptneox(gf: GGUFFile) -> DecoderArgs:
    return decoder_args(gf, norm="layer", rope="neox", gated=False, activation="gelu_tanh",
                        parallel=bool(require(gf, Keys.LLM.USE_PARALLEL_RESIDUAL)))


def falcon(gf: GGUFFile) -> DecoderArgs:
    """Attention and FFN in parallel: off one norm (7B), or attention off attn_norm_2 (40B)."""
    return decoder_args(gf, norm="layer", rope="neox", gated=False, activation="gelu_tanh", parallel=True)


def bloom(gf: GGUFFile) -> DecoderArgs:
    return decoder_args(gf, norm="layer", rope=None, gated=False, activation="gelu_tanh",
                        alibi_max_bias=BLOOM_ALIBI_MAX_BIAS)


def mpt(gf: GGUFFile) -> DecoderArgs:
    m = gf.metadata
    if any(name.endswith("ffn_act.weight") or ".ffn.act." in name for name in gf.tensors):
        raise ValueError("MPT files with AWQ activation scales are not supported")
    return decoder_args(gf, norm="layer", rope=None, gated=False, activation="gelu_tanh",
                        alibi_max_bias=m.get(Keys.Attention.MAX_ALIBI_BIAS, 0.0),
                        clamp_qkv=m.get(Keys.Attention.CLAMP_KQV, 0.0))


def stablelm(gf: GGUFFile) -> DecoderArgs:
    """Partial NEOX RoPE, optional per-head q/k LayerNorms; parallel where the file has no
    FFN norm (StableLM 2 12B: llama.cpp decides by that, not by use_parallel_residual)."""
    return decoder_args(gf, norm="layer", rope="neox", parallel="blk.0.ffn_norm.weight" not in gf.tensors)


def nemotron(gf: GGUFFile) -> DecoderArgs:
    """LayerNorm1p (the converter stores 1 + w), partial NEOX RoPE, plain ReLU² FFN."""
    return decoder_args(gf, norm="layer", rope="neox", gated=False, activation="relu2")


ARCHS = (
    Arch(name="gpt2", args=learned_positions, model=Decoder, hf_architectures=("GPT2LMHeadModel",),
         description="GPT-2",
         convert=convert_hooks.GPT2),
    Arch(name="starcoder", args=learned_positions, model=Decoder, hf_architectures=("GPTBigCodeForCausalLM",),
         description="StarCoder / SantaCoder (GPTBigCode, multi-query)",
         convert=convert_hooks.StarCoder),
    Arch(name="starcoder2", args=starcoder2, model=Decoder, hf_architectures=("Starcoder2ForCausalLM",),
         convert=convert_hooks.Converter,
         description="StarCoder 2"),
    Arch(name="gptneox", args=gptneox, model=Decoder, hf_architectures=("GPTNeoXForCausalLM",),
         description="GPT-NeoX, Pythia",
         convert=convert_hooks.GPTNeoX),
    Arch(name="falcon", args=falcon, model=Decoder, hf_architectures=("FalconForCausalLM", "RWForCausalLM"),
         description="Falcon 7B/40B/180B", convert=convert_hooks.Falcon),
    Arch(name="bloom", args=bloom, model=Decoder, hf_architectures=("BloomForCausalLM",),
         description="BLOOM (ALiBi)", convert=convert_hooks.Bloom),
    Arch(name="mpt", args=mpt, model=Decoder, hf_architectures=("MPTForCausalLM",), convert=convert_hooks.MPT,
         description="MosaicML MPT (ALiBi or learned positions)"),
    Arch(name="stablelm", args=stablelm, model=Decoder,
         hf_architectures=("StableLmForCausalLM", "StableLMEpochForCausalLM"), description="StableLM 2",
         convert=convert_hooks.StableLM),
    Arch(name="nemotron", args=nemotron, model=Decoder, hf_architectures=("NemotronForCausalLM",),
         description="NVIDIA Nemotron-4 / Minitron", convert=convert_hooks.Nemotron),
)
