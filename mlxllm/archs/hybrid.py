"""Hybrids of attention with recurrent layers, on nn/hybrid.py: a layer with no KV heads in
attention.head_count_kv is a recurrent one.

LFM2 and LFM2-MoE (src/models/lfm2.cpp, lfm2moe.cpp): GQA attention (per-head q/k RMSNorm,
NEOX RoPE) or a short convolution, each followed by a SwiGLU FFN, or routed experts past the
leading dense layers (LFM2-MoE: sigmoid scores plus a selection bias, the chosen weights
renormalized). The final norm is stored as token_embd_norm (llama.cpp's
LLM_TENSOR_OUTPUT_NORM_LFM2) and acts after the last layer, not on the embeddings.

Granite 4.0 hybrids and Bamba (src/models/granite-hybrid.cpp): Mamba-2 layers and attention
(NORM RoPE only where rope.scaling.finetuned says so, Bamba), Granite's embedding, residual,
attention and logit multipliers, a dense SwiGLU FFN or softmax top-k experts plus a shared one.

Jamba (src/models/jamba.cpp): Mamba-1 layers and attention without RoPE, each followed by a
SwiGLU FFN or softmax top-k experts.

Nemotron-H (src/models/nemotron-h.cpp; nemotron_h_moe runs the same graph): one branch per
layer, x + mixer(norm(x)), the mixer Mamba-2, attention without RoPE, a plain ReLU² FFN, or
ReLU² experts (sigmoid routing with a selection bias) plus an ungated shared expert.

Falcon-H1 (src/models/falcon-h1.cpp): every layer runs NEOX-RoPE attention and a Mamba-2 mixer
on the same normed input and adds them, then a SwiGLU FFN; the converter bakes the muP
multipliers into the weights.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import mlx.core as mx
from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile, Metadata
from ..nn import DecoderArgs
from ..nn.hybrid import HybridArgs, HybridDecoder
from ..nn.ssm import SSMArgs
from ..registry import Arch
from .base import decoder_args, is_array, require, routing_from_file


def hybrid_args(gf: GGUFFile, recurrent: str, mixers: tuple[str, ...] | None = None, **decoder_kw) -> HybridArgs:
    """`decoder_args` for the attention layers, the others (0 KV heads) given the mixer
    `recurrent` (or each layer's from `mixers`); with attention.sliding_window, the
    attention layers slide."""
    m = gf.metadata
    n_layers = require(gf, Keys.LLM.BLOCK_COUNT)
    n_kv = require(gf, Keys.Attention.HEAD_COUNT_KV)
    if not is_array(n_kv) or len(n_kv) != n_layers:
        raise ValueError("attention.head_count_kv must list the layers (0: a recurrent layer)")
    mixers = mixers or tuple("attention" if h else recurrent for h in n_kv)
    attention_kv = {int(h) for h in n_kv if h}
    if len(attention_kv) > 1:
        raise ValueError(f"attention layers with different KV head counts {sorted(attention_kv)} are not supported")
    # decoder_args checks the KV heads of every layer: give the recurrent ones the attention
    # layers' count (they build no attention)
    kv = attention_kv.pop() if attention_kv else require(gf, Keys.Attention.HEAD_COUNT)
    key = Keys.Attention.HEAD_COUNT_KV.replace("{arch}", gf.architecture)
    view = SimpleNamespace(metadata=Metadata({**{k: m[k] for k in m}, key: [kv] * n_layers}), tensors=gf.tensors)
    args = decoder_args(view, **decoder_kw)
    window = m.get(Keys.Attention.SLIDING_WINDOW, 0)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecoderArgs)}
    if window:
        fields |= {"sliding_window": window, "sliding": tuple(k == "attention" for k in mixers)}
    return HybridArgs(**fields, mixers=mixers)


def lfm2(gf: GGUFFile) -> HybridArgs:
    if not gf.metadata.get(Keys.Attention.CAUSAL, True):
        raise ValueError("bidirectional LFM2 (embedding) files are not supported")
    # lfm2moe: llama.cpp renormalizes the chosen weights (norm_w true) and scales nothing
    args = hybrid_args(gf, "shortconv", rope="neox", moe={"gating": "sigmoid", "normalize": True})
    return dataclasses.replace(args, conv_l_cache=require(gf, Keys.ShortConv.L_CACHE))


class Lfm2(HybridDecoder):
    def input_embeddings(self, tokens: mx.array, cache: list | None) -> mx.array:
        return self.token_embd(tokens)  # token_embd_norm is the final norm here

    def head(self, h: mx.array) -> mx.array:
        return super().head(self.token_embd_norm(h))


def granite_hybrid(gf: GGUFFile) -> HybridArgs:
    m = gf.metadata
    logit_scale = m.get(Keys.LLM.LOGIT_SCALE, 0.0)
    args = hybrid_args(
        gf, "mamba", rope="norm", moe={"gating": "softmax", "normalize": True},
        embed_scale=m.get(Keys.LLM.EMBEDDING_SCALE, 0.0) or 1.0,
        residual_scale=m.get(Keys.LLM.RESIDUAL_SCALE, 0.0) or 1.0,
        attn_scale=m.get(Keys.Attention.SCALE, 0.0) or None,
        logit_scale=1.0 / logit_scale if logit_scale else 1.0)  # llama.cpp divides by it
    if not m.get(Keys.Rope.SCALING_FINETUNED, True):  # Granite's switch for RoPE: off in Granite 4.0-H
        args = dataclasses.replace(args, rope=None)
    ssm = SSMArgs.from_metadata(m, 2, args.norm_eps)
    return dataclasses.replace(args, ssm=ssm)


def falcon_h1(gf: GGUFFile) -> HybridArgs:
    args = decoder_args(gf, rope="neox")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecoderArgs)}
    return HybridArgs(**fields, mixers=("attention+mamba",) * args.n_layers,
                      ssm=SSMArgs.from_metadata(gf.metadata, 2, args.norm_eps))


def nemotron_h(gf: GGUFFile) -> HybridArgs:
    """Each layer one branch: attention where it has KV heads, a ReLU² FFN where it has a
    feed_forward_length, else Mamba-2 (llama.cpp's is_recr: neither)."""
    m = gf.metadata
    n_kv, n_ff = require(gf, Keys.Attention.HEAD_COUNT_KV), require(gf, Keys.LLM.FEED_FORWARD_LENGTH)
    if not (is_array(n_kv) and is_array(n_ff) and len(n_kv) == len(n_ff)):
        raise ValueError("attention.head_count_kv and feed_forward_length must list the layers")
    if m.get(Keys.LLM.NEXTN_PREDICT_LAYERS, 0):
        raise ValueError("Nemotron-H files with multi-token-prediction layers are not supported")
    mixers = tuple("attention" if kv else "ffn" if ff else "mamba" for kv, ff in zip(n_kv, n_ff))
    eps = m.get(Keys.Attention.LAYERNORM_RMS_EPS, m.get(Keys.Attention.LAYERNORM_EPS, 1e-5))
    # nemotron_h_moe: sigmoid scores plus a selection bias, normalization and scale as the file
    # says, ReLU² experts and shared expert without gates
    moe = routing_from_file(gf, "sigmoid") | {"gating": "sigmoid", "activation": "relu2"}
    args = hybrid_args(gf, "mamba", mixers, rope=None, activation="relu2", gated=False, norm_eps=eps, moe=moe)
    return dataclasses.replace(args, ssm=SSMArgs.from_metadata(m, 2, eps))


def jamba(gf: GGUFFile) -> HybridArgs:
    """Mamba-1 layers (dt, B and C RMS-normed with weights) and attention without RoPE, each
    followed by a SwiGLU FFN or softmax top-k experts (not renormalized)."""
    args = hybrid_args(gf, "mamba", rope=None, moe={"gating": "softmax", "normalize": False})
    return dataclasses.replace(args, ssm=SSMArgs.from_metadata(gf.metadata, 1, args.norm_eps))


ARCHS = (
    Arch(name="lfm2", args=lfm2, model=Lfm2, hf_architectures=("Lfm2ForCausalLM", "LFM2ForCausalLM"),
         description="Liquid LFM2 / LFM2.5 (short convolutions + attention)", convert=convert_hooks.Lfm2),
    Arch(name="lfm2moe", args=lfm2, model=Lfm2, hf_architectures=("Lfm2MoeForCausalLM",),
         description="Liquid LFM2-MoE (8B-A1B, 24B-A2B)", convert=convert_hooks.Lfm2Moe),
    Arch(name="granitehybrid", args=granite_hybrid, model=HybridDecoder,
         hf_architectures=("GraniteMoeHybridForCausalLM", "BambaForCausalLM"), convert=convert_hooks.GraniteHybrid,
         description="IBM Granite 4.0-H (Mamba-2 + attention, dense or MoE) and Bamba"),
    Arch(name="falcon-h1", args=falcon_h1, model=HybridDecoder, hf_architectures=("FalconH1ForCausalLM",),
         description="TII Falcon-H1 (attention and Mamba-2 side by side in every layer)", convert=convert_hooks.FalconH1),
    Arch(name="nemotron_h", args=nemotron_h, model=HybridDecoder, hf_architectures=("NemotronHForCausalLM",),
         description="NVIDIA Nemotron-H (Mamba-2, attention and ReLU² FFN layers)", convert=convert_hooks.NemotronH),
    Arch(name="jamba", args=jamba, model=HybridDecoder, hf_architectures=("JambaForCausalLM",), convert=convert_hooks.Jamba,
         description="AI21 Jamba (Mamba-1 + attention, MoE every other layer)"),
    Arch(name="nemotron_h_moe", args=nemotron_h, model=HybridDecoder, hf_architectures=("NemotronHForCausalLM",),
         description="NVIDIA Nemotron 3 Nano / Super (Mamba-2, attention and ReLU² expert layers)", convert=convert_hooks.NemotronH),
)
