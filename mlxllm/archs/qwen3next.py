"""Qwen3-Next and Qwen3.5 (src/models/qwen3next.cpp, qwen35.cpp, qwen35moe.cpp): gated delta
net layers (nn/deltanet.py) and, every few layers, gated full attention: attn_q yields per head
the query and a gate, sigmoid(gate) multiplies the attention's output; q/k RMSNorm per head,
NEOX RoPE on the first rope.dimension_count entries of each head. Every layer then has its
FFN behind post_attention_norm: routed experts (softmax, top-k renormalized) plus a shared
expert behind a sigmoid gate (Qwen3-Next, Qwen3.5-MoE), or a SwiGLU FFN (Qwen3.5).

Qwen3.5 rotates with interleaved M-RoPE; for text, llama.cpp gives each rotated pair the
token's position in the section it falls in (time, height or width alike) or 0 in the fourth
one: where no pair falls in the fourth, that is NEOX RoPE, and it is refused otherwise. Its
converter reorders value heads so that value head j reads key head j % n_k (tiled); in
Qwen3-Next's files value head j reads key head j // (n_v / n_k).

The files carry the multi-token-prediction block (nextn_predict_layers) past the trunk's
layers: it is loaded by neither llama.cpp's main graph nor this one.
"""

from __future__ import annotations

import dataclasses

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import DecoderArgs
from ..nn.deltanet import DeltaNetArgs, DeltaNetDecoder, DeltaNetHybridArgs
from ..registry import Arch
from .base import decoder_args, is_array, require

# gguf-py 0.19 predates the key (the converter writes it; llama.cpp prefers it to the interval)
RECURRENT_LAYERS = getattr(Keys.Attention, "RECURRENT_LAYERS", "{arch}.attention.recurrent_layers")


def _text_rope_is_neox(gf: GGUFFile, dims: int) -> None:
    """ggml's interleaved M-RoPE sectors (ggml_mrope_cache_init): pair i of the rotated
    entries reads position t, h, w (all the token's position, for text) or e (0)."""
    sections = gf.metadata.get(Keys.Rope.DIMENSION_SECTIONS)
    if sections is None:
        raise KeyError(f"{Keys.Rope.DIMENSION_SECTIONS.replace('{arch}', gf.architecture)} is missing")
    s = [int(x) for x in sections] + [0] * (4 - len(sections))
    total = sum(s)
    for pair in range(dims // 2):
        sector = pair % total if total else 0
        if not any(sector % 3 == j and sector < 3 * s[j] for j in range(3)):
            raise ValueError(f"rope.dimension_sections {s[:4]} leave rotated pair {pair} on the fourth "
                             "position axis, which is not supported")


def qwen3next(gf: GGUFFile) -> DeltaNetHybridArgs:
    m = gf.metadata
    arch = gf.architecture
    total = require(gf, Keys.LLM.BLOCK_COUNT)
    nextn = m.get(Keys.LLM.NEXTN_PREDICT_LAYERS, 0)
    n_layers = total - nextn
    recurrent = m.get(RECURRENT_LAYERS)
    if recurrent is not None:
        if not is_array(recurrent) or len(recurrent) != total:
            raise ValueError(f"attention.recurrent_layers must list the {total} layers")
        recurrent = [bool(r) for r in recurrent]
    else:  # llama.cpp's default: every full_attention_interval-th layer attends
        interval = m.get(Keys.LLM.FULL_ATTENTION_INTERVAL, 4)
        recurrent = [(i + 1) % interval != 0 for i in range(total)]
    moe = {"gating": "softmax", "normalize": True, "scale": m.get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 0.0) or 1.0}
    args = decoder_args(gf, rope="neox", moe=moe, ffn_input_norm="post_attention_norm", attn_output_gate=True)
    if arch != "qwen3next":
        _text_rope_is_neox(gf, args.rope.dims)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecoderArgs)}
    fields |= {"n_layers": n_layers, "extra_layers": nextn}
    delta = DeltaNetArgs.from_metadata(m, args.norm_eps, tiled=arch != "qwen3next")
    mixers = tuple("deltanet" if r else "attention" for r in recurrent[:n_layers])
    return DeltaNetHybridArgs(**fields, mixers=mixers, delta=delta)


ARCHS = (
    Arch(name="qwen3next", args=qwen3next, model=DeltaNetDecoder, hf_architectures=("Qwen3NextForCausalLM",),
         description="Qwen3-Next (gated delta net + gated attention, MoE)", convert=convert_hooks.Qwen3Next),
    Arch(name="qwen35", args=qwen3next, model=DeltaNetDecoder,
         hf_architectures=("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"),
         description="Qwen3.5 dense (gated delta net + gated attention)", convert=convert_hooks.Qwen35),
    Arch(name="qwen35moe", args=qwen3next, model=DeltaNetDecoder,
         hf_architectures=("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
         description="Qwen3.5 MoE (gated delta net + gated attention, MoE)", convert=convert_hooks.Qwen35),
)
