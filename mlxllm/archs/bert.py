"""Encoders: BERT (and the DistilBERT and RoBERTa files the converter writes as bert),
nomic-bert, jina-bert-v2, ModernBERT and EuroBERT (src/models/bert.cpp, modern-bert.cpp,
eurobert.cpp). Their model returns per-token hidden states, not logits (`Arch.kind`).

- bert: learned positions, token types, post-norm layers, GELU FFN, biases throughout.
- nomic-bert: bert's layers with NEOX RoPE instead of a position table, fused qkv, SwiGLU.
- jina-bert-v2: bert's layers with symmetric ALiBi (max bias 8, fixed in llama.cpp), optional
  q/k LayerNorms, a GELU-gated FFN (gate and up apart, or fused in ffn_up) and an optional
  second norm after attention.
- modern-bert: pre-norm LayerNorms without biases (none before layer 0's attention), fused
  qkv, NEOX RoPE, GeGLU (or SwiGLU per hidden_act), every third layer global and the others
  in a symmetric sliding window with their own rope base.
- eurobert: a Llama-shaped pre-norm RMSNorm stack with bidirectional attention.
"""

from __future__ import annotations

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import RopeArgs
from ..nn.encoder import Encoder, EncoderArgs
from ..nn.pooling import POOLING
from ..registry import Arch
from .base import decoder_args, is_array, sliding_pattern

JINA_ALIBI_MAX_BIAS = 8.0  # llama.cpp jina-bert-v2 load_arch_hparams; the file has no key for it
MODERN_BERT_SWA_PERIOD = 3  # load_swa_pattern(3, dense_first): layers 0, 3, 6... are global
SWA_ROPE_BASE = 10000.0  # llama_hparams.rope_freq_base_train_swa when the file has no key
# hidden_act values llama.cpp's llm_ffn_op_type_from_string maps to a SiLU gate; others GELU
SILU_ACTS = ("silu", "swiglu", "swish")
# ModernBERT's FFN activation key: gguf-py names it Keys.LLM.HIDDEN_ACT from the version
# vendored with llama.cpp 0.3.36 on; the installed gguf-py may predate it.
HIDDEN_ACT = getattr(Keys.LLM, "HIDDEN_ACT", "{arch}.hidden_activation")
# What a classifier head reads (llama.cpp pooling_type_cls), same story
CLASSIFIER_POOLING = getattr(Keys.Classifier, "POOLING_TYPE", "{arch}.classifier.pooling_type")


def _pooling(gf: GGUFFile, key: str, default: int = 0) -> str:
    code = gf.metadata.get(key, default)
    if not 0 <= code < len(POOLING):
        raise ValueError(f"{key.replace('{arch}.', '')} {code} is not supported")
    return POOLING[code]


def _encoder(gf: GGUFFile, post_norm: bool, classifier_pooling: str = "cls", **kw) -> EncoderArgs:
    """The decoder's hyperparameters plus the pooling the file names and what its classifier
    head (if any) reads: the mean where the file says so, else the first token."""
    if _pooling(gf, CLASSIFIER_POOLING, POOLING.index(classifier_pooling)) == "mean":
        classifier_pooling = "mean"
    return EncoderArgs.extend(decoder_args(gf, **kw), post_norm=post_norm, pooling=_pooling(gf, Keys.LLM.POOLING_TYPE),
                              classifier_pooling=classifier_pooling)


def bert(gf: GGUFFile) -> EncoderArgs:
    return _encoder(gf, True, norm="layer", rope=None, gated=False, activation="gelu_tanh")


def nomic_bert(gf: GGUFFile) -> EncoderArgs:
    if any(".ffn_gate_inp." in name for name in gf.tensors):
        raise ValueError("nomic-bert with experts (nomic-bert-moe) is not supported")
    return _encoder(gf, True, norm="layer", rope="neox", activation="silu")


def jina_bert_v2(gf: GGUFFile) -> EncoderArgs:
    t = gf.tensors
    ff = t["blk.0.ffn_down.weight"].shape[-1]
    # llama.cpp: GELU(gate) * up with a separate gate or with both fused in ffn_up, else plain GELU
    gated = "blk.0.ffn_gate.weight" in t or t["blk.0.ffn_up.weight"].shape[0] == 2 * ff
    return _encoder(gf, True, norm="layer", rope=None, gated=gated, activation="gelu_tanh",
                    alibi_max_bias=JINA_ALIBI_MAX_BIAS)


def modern_bert(gf: GGUFFile) -> EncoderArgs:
    m = gf.metadata
    act = "silu" if m.get(HIDDEN_ACT, "gelu") in SILU_ACTS else "gelu_tanh"
    # a classifier head pools by mean where the file names no pooling for it (llama.cpp), and
    # takes GELU after its dense layer
    args = _encoder(gf, False, classifier_pooling="mean", norm="layer", rope="neox", activation=act)
    args.classifier_activation = "gelu_tanh"
    window = m.get(Keys.Attention.SLIDING_WINDOW, 0)
    if window <= 0:
        return args
    pattern = m.get(Keys.Attention.SLIDING_WINDOW_PATTERN, MODERN_BERT_SWA_PERIOD)
    sliding = tuple(bool(p) for p in pattern) if is_array(pattern) else \
        sliding_pattern(args.n_layers, int(pattern), dense_first=True)
    if len(sliding) != args.n_layers:
        raise ValueError(f"sliding_window_pattern has {len(sliding)} entries for {args.n_layers} layers")
    args.sliding_window, args.sliding = window, sliding
    args.swa_rope = RopeArgs(args.rope.dims, traditional=False, base=m.get(Keys.Rope.FREQ_BASE_SWA, SWA_ROPE_BASE))
    return args


def eurobert(gf: GGUFFile) -> EncoderArgs:
    return _encoder(gf, False, norm="rms", rope="neox")


def _arch(name: str, args, hf: tuple[str, ...], description: str, convert=None) -> Arch:
    return Arch(name=name, args=args, model=Encoder, kind="encoder", hf_architectures=hf, description=description,
                convert=convert)


ARCHS = (
    _arch("bert", bert, tuple(c for hook in (convert_hooks.Bert, *convert_hooks.Bert.variants) for c in hook.hf_classes),
          "BERT, DistilBERT, RoBERTa encoders (MiniLM, bge, e5)", convert=convert_hooks.Bert),
    _arch("nomic-bert", nomic_bert, ("NomicBertModel",), "nomic-embed-text v1 / v1.5", convert=convert_hooks.NomicBert),
    _arch("jina-bert-v2", jina_bert_v2, convert_hooks.JinaBertV2.hf_classes, "jina-embeddings-v2 (ALiBi)",
          convert=convert_hooks.JinaBertV2),
    _arch("modern-bert", modern_bert, convert_hooks.ModernBert.hf_classes,
          "ModernBERT (granite-embedding, gte-modernbert)", convert=convert_hooks.ModernBert),
    _arch("eurobert", eurobert, ("EuroBertModel",), "EuroBERT", convert=convert_hooks.EuroBert),
)
