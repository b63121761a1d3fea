"""Llama and the families that are Llama with other hyperparameters (src/models/llama.cpp,
mistral3.cpp, smollm3.cpp, internlm2.cpp, arcee.cpp, granite.cpp, apertus.cpp,
ernie4-5.cpp).

llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE rotates adjacent
pairs (LLAMA_ROPE_TYPE_NORM); the kernels' `traditional` rotation is that one, so the
weights are used as stored.
"""

from __future__ import annotations

import dataclasses

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import XIELU, Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args, is_array, require, routing_from_file

SMOLLM3_NOPE_PERIOD = 4  # llama.cpp n_no_rope_layer_step: every 4th layer has no RoPE


def llama(gf: GGUFFile) -> DecoderArgs:
    """Dense, or Mixtral-style experts: softmax over all, the top k renormalized."""
    return decoder_args(gf, rope="norm", moe=dict(normalize=True))


def mistral3(gf: GGUFFile) -> DecoderArgs:
    """Llama with YaRN's beta and log-multiplier keys and Llama 4's query temperature."""
    args = decoder_args(gf, rope="norm", rope_options=dict(yarn_betas=True, yarn_log_mul=True))
    temperature = gf.metadata.get(Keys.Attention.TEMPERATURE_SCALE, 0.0)
    if not temperature:
        return args
    floor = gf.metadata.get(Keys.Rope.SCALING_ORIG_CTX_LEN, args.context_length)
    if not floor:
        raise ValueError("attention.temperature_scale needs rope.scaling.original_context_length")
    return dataclasses.replace(args, attn_temperature=(temperature, floor))


def smollm3(gf: GGUFFile) -> DecoderArgs:
    args = decoder_args(gf, rope="norm")
    return dataclasses.replace(args, rope_layers=tuple((i + 1) % SMOLLM3_NOPE_PERIOD != 0 for i in range(args.n_layers)))


def arcee(gf: GGUFFile) -> DecoderArgs:
    return decoder_args(gf, rope="norm", activation="relu2", gated=False)


def granite(gf: GGUFFile) -> DecoderArgs:
    """Llama with multipliers on the embeddings, each residual branch, attention and logits;
    Granite MoE adds renormalized top-k experts and, in the shared variant, a shared expert."""
    m = gf.metadata
    args = decoder_args(
        gf, rope="norm", moe=dict(normalize=True),
        embed_scale=m.get(Keys.LLM.EMBEDDING_SCALE, 0.0) or 1.0,
        residual_scale=m.get(Keys.LLM.RESIDUAL_SCALE, 0.0) or 1.0,
        attn_scale=m.get(Keys.Attention.SCALE, 0.0) or None,
        logit_scale=1.0 / require(gf, Keys.LLM.LOGIT_SCALE),  # llama.cpp divides by it
    )
    if gf.architecture == "granite" and not m.get(Keys.Rope.SCALING_FINETUNED, True):  # rope off altogether
        args = dataclasses.replace(args, rope=None)
    return args


def apertus(gf: GGUFFile) -> DecoderArgs:
    """NEOX RoPE, per-head q/k RMSNorm, a plain FFN with xIELU (per-layer constants under
    unprefixed `xielu.*` keys)."""
    n_layers = require(gf, Keys.LLM.BLOCK_COUNT)

    def layer_values(key: str) -> list[float]:
        v = require(gf, f"xielu.{key}")
        return [float(x) for x in v] if is_array(v) else [float(v)] * n_layers

    an, ap, beta, eps = (layer_values(k) for k in ("alpha_n", "alpha_p", "beta", "eps"))
    return decoder_args(gf, rope="neox", gated=False,
                        activation=tuple(XIELU(*p) for p in zip(an, ap, beta, eps)))


def ernie4_5(gf: GGUFFile) -> DecoderArgs:
    # HF Ernie 4.5's rotary is interleaved already: NORM without a converter permutation
    return decoder_args(gf, rope="norm")


def ernie4_5_moe(gf: GGUFFile) -> DecoderArgs:
    """ERNIE 4.5 MoE: leading dense layers, softmax routing with an optional selection
    bias, normalized, plus a shared expert where the file has one."""
    step = require(gf, Keys.LLM.INTERLEAVE_MOE_LAYER_STEP)
    if step != 1:  # llama.cpp's loader makes every layer past the dense ones MoE: so must the file
        raise ValueError(f"interleave_moe_layer_step {step} is not supported (llama.cpp runs 1)")
    return decoder_args(gf, rope="norm", moe=dict(normalize=True))


def bailingmoe(gf: GGUFFile) -> DecoderArgs:
    """Ling (v1): softmax routing, normalization and scale as the file says, shared experts."""
    return decoder_args(gf, rope="norm", moe=dict(routing_from_file(gf, "softmax"), gating="softmax"))


ARCHS = (
    Arch(name="llama", args=llama, model=Decoder, convert=convert_hooks.Llama,
         hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
         description="Llama 2/3/3.1, Mistral-style, SmolLM2 decoders, Mixtral experts"),
    Arch(name="mistral3", args=mistral3, model=Decoder,
         hf_architectures=("Mistral3ForConditionalGeneration", "Ministral3ForCausalLM"),
         convert=convert_hooks.Mistral3,
         description="Ministral 3 / Mistral Small 3.x text decoders (YaRN, query temperature)"),
    Arch(name="smollm3", args=smollm3, model=Decoder, hf_architectures=("SmolLM3ForCausalLM",), convert=convert_hooks.Llama,
         description="SmolLM3: Llama with no RoPE on every 4th layer"),
    Arch(name="internlm2", args=llama, model=Decoder, hf_architectures=("InternLM2ForCausalLM",),
         convert=convert_hooks.InternLM2, description="InternLM2 (the converter splits its grouped wqkv)"),
    Arch(name="arcee", args=arcee, model=Decoder, hf_architectures=("ArceeForCausalLM",), convert=convert_hooks.Llama,
         description="Arcee AFM: Llama with a plain ReLU² FFN"),
    Arch(name="granite", args=granite, model=Decoder, hf_architectures=("GraniteForCausalLM",), convert=convert_hooks.Granite,
         description="IBM Granite 3 dense: Llama with embedding/residual/attention/logit multipliers"),
    Arch(name="granitemoe", args=granite, model=Decoder,
         hf_architectures=("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"), convert=convert_hooks.GraniteMoe,
         description="IBM Granite 3 MoE (and its shared-expert variant)"),
    Arch(name="apertus", args=apertus, model=Decoder, hf_architectures=("ApertusForCausalLM",), convert=convert_hooks.Apertus,
         description="Apertus: q/k norms and an xIELU FFN"),
    Arch(name="ernie4_5", args=ernie4_5, model=Decoder, hf_architectures=("Ernie4_5ForCausalLM",), convert=convert_hooks.Ernie4_5,
         description="Baidu ERNIE 4.5 dense"),
    Arch(name="ernie4_5-moe", args=ernie4_5_moe, model=Decoder, hf_architectures=("Ernie4_5_MoeForCausalLM",), convert=convert_hooks.Ernie4_5Moe,
         description="Baidu ERNIE 4.5 MoE (21B-A3B, 300B-A47B)"),
    Arch(name="bailingmoe", args=bailingmoe, model=Decoder, hf_architectures=("BailingMoeForCausalLM",), convert=convert_hooks.BailingMoe,
         description="inclusionAI Ling (v1) MoE"),
)
