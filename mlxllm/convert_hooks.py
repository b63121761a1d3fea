"""What each architecture's conversion does beyond the generic one (mlxllm/convert.py):
the `Arch.convert` hooks the architecture modules register. Each mirrors what llama.cpp's
convert_hf_to_gguf.py writes for that Hugging Face class, so that both converters give the
same file (tests/test_convert.py)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_TENSOR, TokenType

from .convert import (
    Converter,
    ConvertError,
    Tensor,
    bpe_vocab,
    normalizer_flags,
    sentencepiece_vocab,
    special_vocab,
    wordpiece_vocab,
)

# Per-expert checkpoint matrices: (pattern with groups xid and w, the stacked name to map)
MIXTRAL_EXPERTS = (r"block_sparse_moe\.experts\.(?P<xid>\d+)\.(?P<w>w[123])\.weight$",
                   "layers.{bid}.feed_forward.experts.{w}.weight")
CODEGEMMA_EOT = 107  # <end_of_turn>
QWEN_EXPERTS = (r"mlp\.experts\.(?P<xid>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight$",
                "model.layers.{bid}.mlp.experts.{w}.weight")


def rope_pairs_adjacent(t: Tensor, n_head: int) -> Tensor:
    """Reorder each head's rows from HF's rotate-half layout to adjacent pairs, which is
    what llama.cpp's NORM RoPE (and the weights of the original Llama) expect."""
    rows = t.shape[0]

    def permute(a: np.ndarray) -> np.ndarray:
        return a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    return t.map(permute)


def plus_one(t: Tensor) -> Tensor:
    """Gemma's RMSNorm scales by 1 + w: the file stores 1 + w, the runtime a plain RMSNorm."""
    return t.map(lambda a: a + a.dtype.type(1))


def llama3_rope_factors(rope: dict, head_dim: int, default_factor: float = 8.0) -> Tensor:
    """The per-frequency divisors of Llama 3.1's rope scaling (the `rope_freqs` tensor):
    1 for short wavelengths, `factor` for long ones, a smooth blend between.

    Computed in float32 step by step as llama.cpp's converter computes them in torch, where
    a number divided by a tensor is the tensor's reciprocal times the number: the factors
    come out bit-identical (plain float64 arithmetic differs in the last bit)."""
    f32 = np.float32

    def over(number: float, x: np.float32) -> np.float32:  # torch's `number / tensor`
        return (f32(1) / x) * f32(number)

    base = rope.get("rope_theta", 10000.0)
    factor = rope.get("factor", default_factor)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = over(1.0, f32(base) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    out = []
    for freq in freqs:
        wavelen = over(2 * math.pi, freq)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (over(old_ctx, wavelen) - f32(low)) / f32(high - low)
            out.append(over(1.0, (f32(1) - smooth) / f32(factor) + smooth))
    values = np.array(out, dtype=np.float32)
    return Tensor(values.shape, values.dtype, lambda: values)


class Llama(Converter):
    """Llama, Mistral-style, SmolLM2 and Mixtral (experts stacked per layer)."""

    permute_qk = True  # HF's rotate-half rows back to adjacent pairs (NORM RoPE)

    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"]

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_vocab_size(self.config["vocab_size"])
        w.add_rope_dimension_count(self.head_dim())

    def vocab(self, w: gguf.GGUFWriter) -> None:
        config_path = self.dir / "tokenizer_config.json"
        if config_path.is_file():
            prefix = json.loads(config_path.read_text(encoding="utf-8")).get("add_prefix_space")
            if prefix is not None:
                w.add_add_space_prefix(prefix)
        super().vocab(w)
        if self.config.get("vocab_size") == 49152:  # as llama.cpp: Granite-small / SmolLM vocabularies add no BOS
            w.add_add_bos_token(False)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        n_head = self.find("n_heads", "num_attention_heads")
        if self.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = rope_pairs_adjacent(t, n_head)
        elif self.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = rope_pairs_adjacent(t, self.find("n_kv_heads", "num_key_value_heads", default=n_head))
        if "block_sparse_moe.experts." in name:
            return self.stack_experts(name, t, bid, self.config["num_local_experts"], *MIXTRAL_EXPERTS)
        return super().tensors(name, t, bid)

    def extra_tensors(self) -> Iterable[tuple[str, Tensor]]:
        rope = self.rope.get("full_attention", self.rope)
        if str(rope.get("rope_type", "")).lower() == "llama3":
            yield self.tensor_name(MODEL_TENSOR.ROPE_FREQS), llama3_rope_factors(rope, self.head_dim())


class Qwen2(Converter):
    """Qwen 2 and Qwen 3 dense: the generic conversion."""


class QwenMoe(Converter):
    """Qwen 2 MoE and Qwen 3 MoE: per-expert matrices stacked per layer, or the fused
    [n_expert, 2 * n_ff, n_embd] gate_up_proj of newer checkpoints split."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        if (n_ff := self.config.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n_ff)
        if (n_ff := self.config.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n_ff)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        base = name.removesuffix(".weight")
        if base.endswith("mlp.experts.down_proj"):
            return super().tensors(f"{base}.weight", t, bid)
        if base.endswith("mlp.experts.gate_up_proj"):
            n_ff = t.shape[-2] // 2
            gate, up = t.split([n_ff, n_ff], axis=-2)
            stem = base.removesuffix(".gate_up_proj")
            return [*super().tensors(f"{stem}.gate_proj.weight", gate, bid),
                    *super().tensors(f"{stem}.up_proj.weight", up, bid)]
        if ".experts." in name:
            return self.stack_experts(name, t, bid, self.find("num_local_experts", "num_experts"), *QWEN_EXPERTS)
        return super().tensors(name, t, bid)


class Gemma(Converter):
    """Gemma 1: its own short list of hyperparameters, norms stored as 1 + w, no lm_head."""

    def skip(self, name: str) -> bool:
        return name == "lm_head.weight" or super().skip(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(c.get("num_key_value_heads", c["num_attention_heads"]))
        w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])

    def vocab(self, w: gguf.GGUFWriter) -> None:
        sentencepiece_vocab(self, w)
        # llama.cpp gives every Gemma 1 vocabulary CodeGemma's end-of-turn id (its
        # fill-in-the-middle ids have no GGUF key in gguf-py, so neither converter writes them)
        if self.config.get("vocab_size", 0) > CODEGEMMA_EOT:
            w.add_eot_token_id(CODEGEMMA_EOT)
        w.add_add_space_prefix(False)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if name.endswith("norm.weight"):
            t = plus_one(t)
        return super().tensors(name, t, bid)


class Gemma2(Gemma):
    """Gemma 2: Gemma's keys plus soft-capping and the sliding window."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_attn_logit_softcapping(self.config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(self.config["final_logit_softcapping"])
        w.add_sliding_window(self.config["sliding_window"])

    def vocab(self, w: gguf.GGUFWriter) -> None:
        sentencepiece_vocab(self, w)
        w.add_add_space_prefix(False)


class Gemma3(Converter):
    """Gemma 3 text: the generic keys with Gemma 3's defaults, q/k norms too stored as
    1 + w, embedding rows past the tokenizer's vocabulary dropped."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        c = self.config
        K = gguf.Keys
        self.forget(w, K.LLM.CONTEXT_LENGTH, K.Attention.HEAD_COUNT, K.Attention.LAYERNORM_RMS_EPS, K.Attention.KEY_LENGTH,
                    K.Attention.VALUE_LENGTH, K.Rope.FREQ_BASE, K.Attention.HEAD_COUNT_KV)  # rewritten with Gemma 3's defaults
        w.add_context_length(c.get("max_position_embeddings", 131072))
        w.add_head_count(c.get("num_attention_heads", 8))
        w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
        w.add_key_length(c.get("head_dim", 256))
        w.add_value_length(c.get("head_dim", 256))
        w.add_rope_freq_base(self.rope.get("full_attention", self.rope).get("rope_theta", 1_000_000.0))
        if c.get("attn_logit_softcapping") is not None:
            raise ValueError("Gemma 3 has no attention soft-capping; attn_logit_softcapping is set")
        if final := c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(final)
        if c.get("sliding_window_pattern") != 1:
            w.add_sliding_window(c["sliding_window"])
        w.add_head_count_kv(c.get("num_key_value_heads", 4))

    def vocab(self, w: gguf.GGUFWriter) -> None:
        if (self.dir / "tokenizer.model").is_file():
            sentencepiece_vocab(self, w)
            w.add_add_space_prefix(False)
        else:
            bpe_vocab(self, w)

    def _tokenizer_size(self) -> int:
        if (self.dir / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            sp = SentencePieceProcessor()
            sp.LoadFromFile(str(self.dir / "tokenizer.model"))
            return self.find("vocab_size_per_layer_input", "vocab_size", default=None) or sp.vocab_size()
        spec = json.loads((self.dir / "tokenizer.json").read_text(encoding="utf-8"))
        return len(spec["model"]["vocab"]) + len(spec["added_tokens"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "embed_tokens.weight" in name:
            n = self._tokenizer_size()
            if n < t.shape[0]:
                t = t.map(lambda a: np.ascontiguousarray(a[:n]), shape=(n, *t.shape[1:]))
        if name.endswith("norm.weight"):
            t = plus_one(t)
        return super().tensors(name, t, bid)


class Granite(Llama):
    """Granite 3: Llama with multipliers; llama.cpp ignores head_dim for it."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        head_dim = self.config.pop("head_dim", None)
        try:
            super().hparams(w)
        finally:
            if head_dim is not None:
                self.config["head_dim"] = head_dim
        for add, key in ((w.add_attention_scale, "attention_multiplier"), (w.add_embedding_scale, "embedding_multiplier"),
                         (w.add_residual_scale, "residual_multiplier"), (w.add_logit_scale, "logits_scaling")):
            if value := self.config.get(key):
                add(value)


class Olmo(Converter):
    """OLMo 1: Llama's Q/K row order (weights only), a fixed LayerNorm epsilon, clip_qkv."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        self.forget(w, gguf.Keys.Attention.LAYERNORM_EPS)
        w.add_layer_norm_eps(1e-5)
        if (clip := self.config.get("clip_qkv")) is not None:
            w.add_clamp_kqv(clip)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        n_head = self.config["num_attention_heads"]
        if name.endswith("q_proj.weight"):
            t = rope_pairs_adjacent(t, n_head)
        elif name.endswith("k_proj.weight"):
            t = rope_pairs_adjacent(t, self.config.get("num_key_value_heads") or n_head)
        return super().tensors(name, t, bid)


class Olmo2(Converter):
    """OLMo 2 and 3: OLMo 3's sliding window and its per-layer pattern."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        if "sliding_window" in self.config:
            w.add_sliding_window(self.config["sliding_window"])
            if "layer_types" in self.config:
                pattern = [t == "sliding_attention" for t in self.config["layer_types"]]
            else:  # OLMo 3's default: every 4th layer global
                pattern = [(i + 1) % 4 != 0 for i in range(self.n_layers)]
            w.add_sliding_window_pattern(pattern)


class Olmoe(Converter):
    """OLMoE: per-expert matrices stacked per layer, a fixed RMSNorm epsilon."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        self.forget(w, gguf.Keys.Attention.LAYERNORM_RMS_EPS)
        w.add_layer_norm_rms_eps(1e-5)  # llama.cpp's, whatever the config says

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if ".experts." in name:
            return self.stack_experts(name, t, bid, self.find("num_local_experts", "num_experts"), *QWEN_EXPERTS)
        return super().tensors(name, t, bid)


POOLING_MODES = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}


def pooling_type(conv: Converter) -> gguf.PoolingType | None:
    """sentence-transformers' pooling (modules.json -> its Pooling module's config.json)."""
    modules_path = conv.dir / "modules.json"
    if not modules_path.is_file():
        return None
    modules = json.loads(modules_path.read_text(encoding="utf-8"))
    path = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
    if path is None:
        return None
    pooling = json.loads((conv.dir / path / "config.json").read_text(encoding="utf-8"))
    for flag, kind in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                       ("pooling_mode_lasttoken", "lasttoken")):
        if pooling.get(flag):
            return POOLING_MODES[kind]
    if pooling.get("pooling_mode") in POOLING_MODES:
        return POOLING_MODES[pooling["pooling_mode"]]
    raise ConvertError(f"{path}/config.json: pooling other than mean, CLS or last token is not supported")


class Bert(Converter):
    """BERT encoders (MiniLM, bge, e5): bidirectional, pooling from sentence-transformers'
    files, WordPiece vocabulary; the pooler and the masked-LM head are not kept. A sequence
    classifier keeps its head and labels. DistilBERT and RoBERTa checkpoints convert to the
    same architecture through their own hooks (`variants`, set below them)."""

    hf_classes = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")
    DROPPED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")

    def skip(self, name: str) -> bool:
        name = name.removeprefix("bert.")
        return name in self.DROPPED or name.startswith(("cls.predictions", "cls.seq_relationship")) or super().skip(name)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        name = name.removeprefix("bert.")
        if name.endswith(".gamma"):
            name = name.removesuffix(".gamma") + ".weight"
        elif name.endswith(".beta"):
            name = name.removesuffix(".beta") + ".bias"
        if name in ("classifier.weight", "classifier.bias") and classifier_labels(self) is not None:
            # a classifier straight on the pooled state: the head's output projection
            name = name.replace("classifier.", "classifier.out_proj.")
        return super().tensors(name, t, bid)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_causal_attention(False)
        if (pooling := pooling_type(self)) is not None:
            w.add_pooling_type(pooling)
        if (labels := classifier_labels(self)) is not None:
            w.add_classifier_output_labels(labels)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        wordpiece_vocab(self, w)


# DistilBERT's LayerNorm epsilon: fixed in its modeling code, absent from its config
DISTILBERT_NORM_EPS = 1e-12


class DistilBert(Bert):
    """DistilBERT as bert: no token-type table, the `distilbert.` prefix and the masked-LM
    head (vocab_transform, vocab_layer_norm, vocab_projector) dropped, its fixed norm epsilon
    written; a sequence classifier's pre_classifier and classifier become cls and cls.output."""

    hf_classes = ("DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification")

    def rename(self, name: str) -> str:
        return super().rename(name.removeprefix("distilbert."))

    def skip(self, name: str) -> bool:
        return name.startswith("vocab_") or super().skip(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        if self.config.get("layer_norm_eps") is None:
            w.add_layer_norm_eps(DISTILBERT_NORM_EPS)
        super().hparams(w)


class Roberta(Bert):
    """RoBERTa as bert: the `roberta.` prefix dropped, the position table cut by
    pad_token_id + 1 rows (RoBERTa numbers positions from there; llama.cpp from 0) and the
    context length with it; a byte-level BPE vocabulary from tokenizer.json, else vocab.txt's
    WordPiece."""

    hf_classes = ("RobertaModel", "RobertaForSequenceClassification")

    def __init__(self, hf_dir: Path, config: dict, arch_name: str) -> None:
        super().__init__(hf_dir, config, arch_name)
        pad = self.config.get("pad_token_id")
        self.position_offset = None if pad is None else pad + 1
        if self.position_offset is not None and "max_position_embeddings" in self.config:
            self.config["max_position_embeddings"] -= self.position_offset  # (self.config is a copy)

    def rename(self, name: str) -> str:
        return super().rename(name.removeprefix("roberta."))

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if name == "embeddings.position_embeddings.weight" and self.position_offset:
            cut = self.position_offset
            if cut >= t.shape[0]:
                raise ConvertError(f"pad_token_id {cut - 1} leaves no rows of the {t.shape[0]}-row position table")
            t = t.map(lambda a: np.ascontiguousarray(a[cut:]), shape=(t.shape[0] - cut, *t.shape[1:]))
        return super().tensors(name, t, bid)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        if not (self.dir / "tokenizer.json").is_file():
            return super().vocab(w)
        bpe_vocab(self, w)
        w.add_token_type_count(self.config.get("type_vocab_size", 1))


# XLM-R's tokenizer ids are sentencepiece's shifted by one, with fairseq's four specials
# first (transformers' XLMRobertaTokenizer): <s> <pad> </s> <unk>, then piece 3 onwards
XLMR_SPECIALS = ((b"<s>", TokenType.CONTROL), (b"<pad>", TokenType.CONTROL), (b"</s>", TokenType.CONTROL),
                 (b"<unk>", TokenType.UNKNOWN))
SPM_UNIGRAM = 1  # sentencepiece's TrainerSpec.ModelType.UNIGRAM


class XLMRoberta(Roberta):
    """XLM-RoBERTa (bge-m3, multilingual-e5) as bert: RoBERTa's prefix and position cut,
    with sentencepiece.bpe.model's unigram vocabulary realigned to the ids transformers
    gives (llama.cpp's UGM tokenizer, "t5") and its normalizer settings."""

    hf_classes = ("XLMRobertaModel", "XLMRobertaForSequenceClassification")

    def __init__(self, hf_dir: Path, config: dict, arch_name: str) -> None:
        if config.get("lora_adaptations"):
            raise ConvertError("jina-embeddings-v3 (XLM-RoBERTa with LoRA adapters) is not converted yet")
        super().__init__(hf_dir, config, arch_name)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        path = self.dir / "sentencepiece.bpe.model"
        if not path.is_file():
            raise ConvertError(f"{self.dir}: no sentencepiece.bpe.model (an XLM-RoBERTa tokenizer.json alone is not converted yet)")
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as spm_proto

        proto = spm_proto.ModelProto()
        proto.ParseFromString(path.read_bytes())
        if proto.trainer_spec.model_type != SPM_UNIGRAM:
            raise ConvertError(f"{path.name}: sentencepiece model type {proto.trainer_spec.model_type} is not unigram")
        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(path))
        n_vocab = max(self.config.get("vocab_size", 0), sp.vocab_size())
        tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
        scores = [-10000.0] * n_vocab
        types = [TokenType.UNUSED] * n_vocab
        for i in range(sp.vocab_size()):
            tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
            types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                        else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                        else TokenType.NORMAL)
        # (the last entry drops off the end, as in llama.cpp: the list keeps n_vocab entries)
        tokens = [t for t, _ in XLMR_SPECIALS] + tokens[3:-1]
        scores = [0.0] * len(XLMR_SPECIALS) + scores[3:-1]
        types = [k for _, k in XLMR_SPECIALS] + types[3:-1]
        w.add_tokenizer_model("t5")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
        w.add_token_type_count(self.config.get("type_vocab_size", 1))
        w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
        if proto.normalizer_spec.precompiled_charsmap:
            w.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
        special_vocab(self, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
        normalizer_flags(self, w)


Bert.variants = (DistilBert, Roberta, XLMRoberta)


def sentence_pooling(conv: Converter, w: gguf.GGUFWriter) -> None:
    """Pooling as llama.cpp's converter reads it: sentence-transformers' files, and the
    pooling before a classification head (`classifier_pooling`)."""
    if (pooling := pooling_type(conv)) is not None:
        w.add_pooling_type(pooling)
    if (before_head := conv.config.get("classifier_pooling")) is not None:
        if before_head not in ("cls", "mean"):
            raise ConvertError(f"classifier_pooling {before_head!r} is not supported (cls or mean)")
        from .archs.bert import (
            CLASSIFIER_POOLING,  # (a key newer than this gguf-py's tables)
        )

        w.add_uint32(CLASSIFIER_POOLING.format(arch=w.arch), POOLING_MODES[before_head])


def classifier_labels(conv: Converter) -> list[str] | None:
    """A sequence classifier's labels, unless they are the two placeholders AutoConfig adds."""
    labels = conv.config.get("id2label")
    if labels and not (len(labels) == 2 and labels.get("0", labels.get(0)) == "LABEL_0"):
        return [v for _, v in sorted(labels.items(), key=lambda kv: int(kv[0]))]
    return None


class ModernBert(Converter):
    """ModernBERT: fused Wqkv, GLU feed-forward (its activation written), alternating local
    and global attention (window and pattern), byte-level BPE with BOS, EOS and SEP added;
    a sequence classifier keeps its head and pooling."""

    hf_classes = ("ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification")

    def rename(self, name: str) -> str:
        name = super().rename(name.removeprefix("model."))
        if name in ("classifier.weight", "classifier.bias") and self.config.get("id2label"):
            name = name.replace("classifier.", "classifier.out_proj.")
        return name

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_causal_attention(False)
        sentence_pooling(self, w)
        if (labels := classifier_labels(self)) is not None:
            w.add_classifier_output_labels(labels)
        w.add_sliding_window(self.config["local_attention"])
        if (pattern := self.config.get("global_attn_every_n_layers")) is not None:
            w.add_sliding_window_pattern(pattern)
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_vocab_size(self.config["vocab_size"])
        if act := self.config.get("hidden_activation"):
            from .archs.bert import HIDDEN_ACT

            w.add_string(HIDDEN_ACT.format(arch=w.arch), act)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        w.add_add_bos_token(True)
        w.add_add_eos_token(True)
        w.add_add_sep_token(True)
        bpe_vocab(self, w)


class EuroBert(Converter):
    """EuroBERT: a Llama-shaped encoder (bidirectional), byte-level BPE without BOS."""

    hf_classes = ("EuroBertModel",)

    def rename(self, name: str) -> str:
        return super().rename(name.removeprefix("model."))

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_causal_attention(False)
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        sentence_pooling(self, w)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        w.add_add_bos_token(False)
        bpe_vocab(self, w)


class Lfm2(Converter):
    """LFM2: short-convolution and attention layers (kv heads 0 on conv layers), the
    feed-forward width adjusted as the checkpoint's block_* settings say, conv kernels 2-D."""

    hf_classes = ("Lfm2ForCausalLM", "LFM2ForCausalLM")

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        kv = c["num_key_value_heads"]
        c["num_key_value_heads"] = [kv if kind != "conv" else 0 for kind in c["layer_types"]]
        try:
            super().hparams(w)
        finally:
            c["num_key_value_heads"] = kv
        w.add_vocab_size(c["vocab_size"])
        w.add_shortconv_l_cache(c["conv_L_cache"])
        self.forget(w, gguf.Keys.Attention.LAYERNORM_RMS_EPS, gguf.Keys.LLM.FEED_FORWARD_LENGTH)
        w.add_layer_norm_rms_eps(c["norm_eps"])
        n_ff = self.find("block_ff_dim", "intermediate_size")
        if c["block_auto_adjust_ff_dim"]:
            n_ff = int(2 * n_ff / 3)
            if (multiplier := c["block_ffn_dim_multiplier"]) is not None:
                n_ff = int(multiplier * n_ff)
            n_ff = c["block_multiple_of"] * ((n_ff + c["block_multiple_of"] - 1) // c["block_multiple_of"])
        w.add_feed_forward_length(n_ff)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "conv.conv" in name:  # [d, 1, L] -> [d, L]
            t = t.map(lambda a: a.reshape(a.shape[0], a.shape[-1]), shape=(t.shape[0], t.shape[-1]))
        return super().tensors(name, t, bid)


class NomicBert(Bert):
    """nomic-embed-text v1 / v1.5: fused Wqkv, SwiGLU, post-norm, RoPE; trained for 2,048
    positions whatever n_positions says (the MoE v2 and XLM-R vocabularies are not
    converted yet)."""

    hf_classes = ("NomicBertModel",)
    variants = ()  # (not bert's DistilBERT/RoBERTa hooks)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        if c.get("moe_every_n_layers"):
            raise ConvertError("nomic-embed-text v2 (MoE) is not converted yet")
        npos, trained = c["n_positions"], c.get("max_trained_positions", 2048)
        if (npos, trained) != (8192, 2048):
            raise ConvertError(f"unrecognized nomic-bert positions: n_positions={npos}, "
                               f"max_trained_positions={trained}")
        c["n_positions"] = 2048
        try:
            super().hparams(w)
        finally:
            c["n_positions"] = npos

    def vocab(self, w: gguf.GGUFWriter) -> None:
        spec = json.loads((self.dir / "tokenizer.json").read_text(encoding="utf-8"))
        if spec["model"]["type"] != "WordPiece":
            raise ConvertError(f"nomic-bert with a {spec['model']['type']} tokenizer is not converted yet")
        super().vocab(w)


class JinaBertV2(Bert):
    """jina-embeddings-v2: ALiBi, GLU feed-forward; WordPiece (BertTokenizer) or byte-level
    BPE (RobertaTokenizer, the code model) vocabularies."""

    hf_classes = ("JinaBertModel", "JinaBertForMaskedLM")
    variants = ()  # (not bert's DistilBERT/RoBERTa hooks)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        kind = json.loads((self.dir / "tokenizer_config.json").read_text(encoding="utf-8"))["tokenizer_class"]
        if kind == "BertTokenizer":
            return super().vocab(w)
        if kind != "RobertaTokenizer":
            raise ConvertError(f"jina-bert-v2 with {kind} is not supported")
        spec = json.loads((self.dir / "tokenizer.json").read_text(encoding="utf-8"))
        if (spec.get("pre_tokenizer") or {}).get("type") == "Whitespace":
            raise ConvertError("jina-bert-v2 with a whitespace pre-tokenizer is not converted yet")
        bpe_vocab(self, w)
        w.add_token_type_count(2)


class Lfm2Moe(Converter):
    """LFM2-MoE: LFM2's layers with sigmoid-routed experts (stacked per layer, a selection
    bias) after the leading dense layers."""

    hf_classes = ("Lfm2MoeForCausalLM",)
    EXPERTS = (r"feed_forward\.experts\.(?P<xid>\d+)\.(?P<w>w[123])\.weight$", "layers.{bid}.feed_forward.experts.{w}.weight")

    def rename(self, name: str) -> str:
        return super().rename(name.replace(".expert_bias", ".expert_bias.bias"))

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        kv = c["num_key_value_heads"]
        c["num_key_value_heads"] = [kv if kind == "full_attention" else 0 for kind in c["layer_types"]]
        try:
            super().hparams(w)
        finally:
            c["num_key_value_heads"] = kv
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        w.add_leading_dense_block_count(c["num_dense_layers"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_vocab_size(c["vocab_size"])
        w.add_shortconv_l_cache(c["conv_L_cache"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "conv.conv" in name:  # [d, 1, L] -> [d, L]
            t = t.map(lambda a: a.reshape(a.shape[0], a.shape[-1]), shape=(t.shape[0], t.shape[-1]))
        if "experts" in name:
            return self.stack_experts(name, t, bid, self.find("num_local_experts", "num_experts"), *self.EXPERTS)
        return super().tensors(name, t, bid)


class CommandR(Converter):
    """Command R: trained past config.json's max_position_embeddings (model_max_length
    says how far), logits scaled."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config["max_position_embeddings"] = self.find("model_max_length", "max_position_embeddings")

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_logit_scale(self.config["logit_scale"])
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


class Cohere2(Converter):
    """Command R7B: sliding windows, partial rotary, all-zero biases left out (the runtime
    has none)."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        c = self.config
        w.add_logit_scale(c["logit_scale"])
        w.add_sliding_window(c["sliding_window"])
        w.add_vocab_size(c["vocab_size"])
        w.add_rope_dimension_count(int(c["rotary_pct"] * (c["hidden_size"] // c["num_attention_heads"])))
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if name.endswith(".bias"):
            if np.any(t.load() != 0):
                raise ConvertError(f"tensor {name}: Cohere 2 runs without biases, but this one is not zero")
            return []
        return super().tensors(name, t, bid)


class StableLM(Converter):
    """StableLM 2: its own key list, and the 12B's per-head q/k LayerNorms stacked."""

    NORMS = (r"self_attn\.(?P<w>[qk]_layernorm)\.norms\.(?P<xid>\d+)\.weight$", "model.layers.{bid}.self_attn.{w}.weight")

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(c["intermediate_size"])
        head_dim = c["hidden_size"] // c["num_attention_heads"]
        w.add_rope_dimension_count(int(self.rope["partial_rotary_factor"] * head_dim))
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(c["num_key_value_heads"])
        w.add_parallel_residual(c.get("use_parallel_residual", True))
        w.add_layer_norm_eps(self.find("layer_norm_eps", "norm_eps"))

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "_layernorm.norms." in name:
            heads = self.config["num_attention_heads" if ".q_layernorm." in name else "num_key_value_heads"]
            return self.stack_experts(name, t, bid, heads, *self.NORMS)
        return super().tensors(name, t, bid)


class Exaone4(Converter):
    """EXAONE 4: the sliding-window pattern in any of its config spellings, Llama 3 rope
    factors."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        c = self.config
        w.add_vocab_size(c["vocab_size"])
        if c.get("sliding_window") is None:
            return
        w.add_sliding_window(c["sliding_window"])
        pattern: list[bool] = []
        if "layer_types" in c:
            pattern = [t == "sliding_attention" for t in c["layer_types"]]
        elif isinstance(spec := c.get("sliding_window_pattern"), str):  # e.g. "LLLG"
            pattern = [spec[i % len(spec)] == "L" for i in range(self.n_layers)]
        elif isinstance(spec, int):
            pattern = [(i + 1) % spec != 0 for i in range(self.n_layers)]
        if len(pattern) == self.n_layers:
            w.add_sliding_window_pattern(pattern)

    def extra_tensors(self) -> Iterable[tuple[str, Tensor]]:
        rope = self.rope.get("full_attention", self.rope)
        if str(rope.get("rope_type", "")).lower() == "llama3":
            head_dim = self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"]
            yield self.tensor_name(MODEL_TENSOR.ROPE_FREQS), llama3_rope_factors(rope, head_dim, 16.0)


class GraniteMoe(Granite):
    """Granite 3 MoE (and its shared-expert variant): JetMoE's fused input_linear split
    into gate and up, for the experts and the shared MLP."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        if n_ff := self.config.get("shared_intermediate_size"):
            w.add_expert_shared_feed_forward_length(n_ff)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        T = MODEL_TENSOR
        experts = bool(self.config.get("num_local_experts"))
        if name.endswith("block_sparse_moe.input_linear.weight"):
            n_ff = self.config["intermediate_size"]
            gate, up = t.split([n_ff, n_ff], axis=-2)
            return [(self.tensor_name(T.FFN_GATE_EXP, bid), gate), (self.tensor_name(T.FFN_UP_EXP, bid), up)]
        if name.endswith("shared_mlp.input_linear.weight"):
            n_ff = self.config["shared_intermediate_size"]
            gate, up = t.split([n_ff, n_ff], axis=-2)
            kinds = (T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP) if experts else (T.FFN_GATE, T.FFN_UP)
            return [(self.tensor_name(kinds[0], bid), gate), (self.tensor_name(kinds[1], bid), up)]
        if not experts and name.endswith("shared_mlp.output_linear.weight"):
            return [(self.tensor_name(T.FFN_DOWN, bid), t)]
        return super().tensors(name, t, bid)


class GraniteHybrid(GraniteMoe):
    """Granite 4.0-H (and Bamba): Mamba-2 layers converted as Mamba-2's (A = -exp(A_log) and
    D as [n_head, 1], conv1d squeezed, the gated norm per group), attention layers as
    Granite's; kv heads 0 on Mamba layers; no RoPE unless Bamba or no Mamba layer at all."""

    hf_classes = ("GraniteMoeHybridForCausalLM", "BambaForCausalLM")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        if kinds := c.get("layer_types"):  # transformers 5 names them linear_attention / full_attention
            self.attn_layers = [i for i, kind in enumerate(kinds) if kind in ("attention", "full_attention")]
        elif c.get("attn_layer_indices"):
            self.attn_layers = list(c["attn_layer_indices"])
        else:
            self.attn_layers = [i for i in range(self.n_layers) if i % c["attn_layer_period"] == c["attn_layer_offset"]]
        self.ssm_layers = [i for i in range(self.n_layers) if i not in self.attn_layers]
        if not self.ssm_layers:
            raise ConvertError("a Granite hybrid without Mamba layers is Granite (MoE): not converted yet")
        self.n_group = self.find("n_groups", "num_groups", "mamba_n_groups")
        self.d_inner = self.find("expand", "num_heads", "mamba_expand", "mamba_num_heads") * \
            self.find("mamba_head_dim", "hidden_size", "d_model")

    def rename(self, name: str) -> str:
        if name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        return super().rename(name)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        pad = 8  # (Mamba-2's rounding, at the multiple llama.cpp sets for hybrids)
        self.config["vocab_size"] = -(self.config["vocab_size"] // -pad) * pad
        super().vocab(w)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        super().hparams(w)
        w.add_ssm_conv_kernel(self.find("conv_kernel", "d_conv", "mamba_conv_kernel", "mamba_d_conv"))
        w.add_ssm_state_size(self.find("state_size", "d_state", "state_dim", "ssm_state_size", "mamba_state_size",
                                       "mamba_d_state"))
        w.add_ssm_group_count(self.n_group)
        w.add_ssm_inner_size(self.d_inner)
        w.add_ssm_time_step_rank(self.find("n_heads", "num_heads", "mamba_n_heads", "mamba_num_heads"))
        self.forget(w, gguf.Keys.Attention.HEAD_COUNT_KV)
        n_kv = self.find("num_key_value_heads", "n_head_kv")
        if rope_dim := c.get("attn_rotary_emb"):
            w.add_rope_dimension_count(rope_dim)
        w.add_head_count_kv([n_kv if i in self.attn_layers else 0 for i in range(self.n_layers)])
        use_rope = "BambaForCausalLM" in c.get("architectures", [])
        w.add_rope_scaling_finetuned(use_rope)
        if not use_rope:
            self.forget(w, gguf.Keys.LLM.CONTEXT_LENGTH)
            w.add_context_length(2**20)
        if c.get("hidden_act") not in (None, "silu"):
            raise ConvertError(f"Granite hybrid with hidden_act {c['hidden_act']!r}: only SiLU is supported")

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if bid not in self.ssm_layers or name.endswith("block_sparse_moe.input_linear.weight") or "shared_mlp" in name:
            return super().tensors(name, t, bid)
        return Mamba2.mamba2_tensors(self, name, t, bid)  # (needs n_group and d_inner, which it sets)


class Ernie4_5(Converter):
    """ERNIE 4.5 dense: SentencePiece, fused qkv_proj and up_gate_proj split."""

    def vocab(self, w: gguf.GGUFWriter) -> None:
        sentencepiece_vocab(self, w)
        config_path = self.dir / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if "add_prefix_space" in config:
                w.add_add_space_prefix(config["add_prefix_space"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        name = name.replace("ernie.", "model.")
        c = self.config
        if "qkv_proj" in name:
            head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
            sizes = [c["num_attention_heads"] * head_dim] + [c["num_key_value_heads"] * head_dim] * 2
            parts = t.split(sizes, axis=0)
            return [item for x, part in zip("qkv", parts)
                    for item in super().tensors(name.replace("qkv_proj.weight", f"{x}_proj.weight"), part, bid)]
        if "up_gate_proj" in name:
            half = t.shape[0] // 2
            gate, up = t.split([half, half], axis=0)
            return [*super().tensors(name.replace("up_gate_proj.weight", "gate_proj.weight"), gate, bid),
                    *super().tensors(name.replace("up_gate_proj.weight", "up_proj.weight"), up, bid)]
        return super().tensors(name, t, bid)


def neg_exp(a: np.ndarray) -> np.ndarray:
    """Mamba's A = -exp(A_log), rounded from float64: within one unit in the last place of
    torch's float32 exp, which llama.cpp's converter uses (numpy's float32 exp: two)."""
    return (-np.exp(a.astype(np.float64))).astype(a.dtype)


def transposed(t: Tensor) -> Tensor:
    return t.map(lambda a: np.ascontiguousarray(a.T), shape=t.shape[::-1])


class GPT2(Converter):
    """GPT-2: Conv1D weights stored [in, out], transposed; n_ff is 4 * n_embd."""

    CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")

    def skip(self, name: str) -> bool:
        return name.endswith((".attn.bias", ".attn.masked_bias")) or super().skip(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_block_count(self.n_layers)
        w.add_context_length(c["n_ctx"])
        w.add_embedding_length(c["n_embd"])
        w.add_feed_forward_length(4 * c["n_embd"])
        w.add_head_count(c["n_head"])
        w.add_layer_norm_eps(c["layer_norm_epsilon"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        return super().tensors(name, transposed(t) if name.endswith(self.CONV1D) else t, bid)


class StarCoder(Converter):
    """GPTBigCode (StarCoder 1, SantaCoder): multi-query, n_ff 4 * n_embd."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_context_length(c["n_positions"])
        w.add_embedding_length(c["n_embd"])
        w.add_feed_forward_length(4 * c["n_embd"])
        w.add_block_count(self.n_layers)
        w.add_head_count(c["n_head"])
        w.add_head_count_kv(1)
        w.add_layer_norm_eps(c["layer_norm_epsilon"])


class GPTNeoX(Converter):
    """GPT-NeoX / Pythia: the fused qkv interleaved per head ([h][q|k|v]) regrouped as
    [q | k | v], partial rotary from rotary_pct."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_rope_dimension_count(int(c["rotary_pct"] * (c["hidden_size"] // c["num_attention_heads"])))
        w.add_head_count(c["num_attention_heads"])
        w.add_parallel_residual(c.get("use_parallel_residual", True))
        w.add_layer_norm_eps(c["layer_norm_eps"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if ".attention.query_key_value." in name:
            t = qkv_regrouped(t, self.find("n_head", "num_attention_heads"))
        return super().tensors(name, t, bid)


def qkv_regrouped(t: Tensor, n_head: int) -> Tensor:
    """A fused qkv stored head by head ([h][q|k|v] rows) as [q | k | v] (GPT-NeoX, BLOOM)."""
    def regroup(a: np.ndarray) -> np.ndarray:
        heads = a.reshape(n_head, 3, a.shape[0] // n_head // 3, *a.shape[1:])
        return np.concatenate([heads[:, i].reshape(-1, *a.shape[1:]) for i in range(3)])

    return t.map(regroup)


class Bloom(Converter):
    """BLOOM: GPT-NeoX's per-head fused qkv, its own key list (no position limit of its own:
    seq_length, else n_embd, as llama.cpp)."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        n_embd, n_head = self.find("hidden_size", "n_embed"), self.find("n_head", "num_attention_heads")
        w.add_context_length(self.config.get("seq_length", n_embd))
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(4 * n_embd)
        w.add_block_count(self.n_layers)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head)
        w.add_layer_norm_eps(self.config["layer_norm_epsilon"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        name = name.replace("transformer.", "")
        if ".self_attention.query_key_value." in name:
            t = qkv_regrouped(t, self.find("n_head", "num_attention_heads"))
        return super().tensors(name, t, bid)


class Phi2(Converter):
    """Phi-2: its own key list (n_ff 4 * n_embd, partial rotary), no BOS added."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        n_embd, n_head = self.find("hidden_size", "n_embd"), self.find("num_attention_heads", "n_head")
        w.add_context_length(self.find("n_positions", "max_position_embeddings"))
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(4 * n_embd)
        w.add_block_count(self.n_layers)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head)
        w.add_layer_norm_eps(self.find("layer_norm_epsilon", "layer_norm_eps"))
        w.add_rope_dimension_count(int(self.rope["partial_rotary_factor"] * n_embd) // n_head)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        super().vocab(w)
        w.add_add_bos_token(False)


class Nemotron(Converter):
    """Nemotron-4 / Minitron: LayerNorm1p stored as 1 + w, partial rotary, linear scaling."""

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_vocab_size(self.config["vocab_size"])
        w.add_layer_norm_eps(self.find("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps"))
        n_embd, n_head = self.find("hidden_size", "n_embd"), self.find("num_attention_heads", "n_head")
        w.add_rope_dimension_count(int(self.rope["partial_rotary_factor"] * n_embd) // n_head)
        factor = self.config.get("factor") or self.rope.get("factor")
        if factor is None:
            w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        else:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        sentencepiece_vocab(self, w)
        w.add_pad_token_id(0)
        w.add_unk_token_id(1)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        return super().tensors(name, plus_one(t) if name.endswith("norm.weight") else t, bid)


class Phi3(Converter):
    """Phi-3 / Phi-4-mini: its own key list, LongRoPE's long and short factors as tensors
    with their attention factor, SentencePiece with literal added tokens (Phi-4's GPT-2
    tokenizer as BPE)."""

    def _rope_dims(self) -> int:
        n_embd, n_head = self.find("hidden_size", "n_embd"), self.find("num_attention_heads", "n_head")
        return int(self.rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head

    def hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_context_length(self.find("n_positions", "max_position_embeddings"))
        w.add_rope_scaling_orig_ctx_len(self.rope["original_max_position_embeddings"])
        w.add_embedding_length(self.find("hidden_size", "n_embd"))
        w.add_feed_forward_length(self.config["intermediate_size"])
        w.add_block_count(self.n_layers)
        w.add_head_count(self.find("num_attention_heads", "n_head"))
        w.add_head_count_kv(self.find("num_key_value_heads", "n_head_kv"))
        w.add_layer_norm_rms_eps(self.config["rms_norm_eps"])
        w.add_rope_dimension_count(self._rope_dims())
        w.add_rope_freq_base(self.rope.get("full_attention", self.rope)["rope_theta"])
        w.add_sliding_window(self.config.get("sliding_window") or 0)  # 0 tells Phi-4 apart
        if (attn_factor := self._long_rope_attn_factor()) is not None:
            w.add_rope_scaling_attn_factors(attn_factor)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        config_path = self.dir / "tokenizer_config.json"
        if config_path.is_file() and json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class") == "GPT2Tokenizer":
            bpe_vocab(self, w)
        elif not (self.dir / "tokenizer.model").is_file():
            raise ConvertError(f"{self.dir}: Phi-3 needs tokenizer.model")
        else:
            sentencepiece_vocab(self, w, literal_added=True)

    def _long_rope_attn_factor(self) -> float | None:
        if not self.rope.get("long_factor"):
            return None
        orig = self.rope["original_max_position_embeddings"]
        scale = self.find("n_positions", "max_position_embeddings") / orig
        kind = str(self.rope.get("rope_type", "")).lower()
        if kind in ("su", "longrope"):
            return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        if kind == "yarn":
            return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        raise ConvertError(f"Phi-3 rope scaling {kind!r} is not supported")

    def extra_tensors(self) -> Iterable[tuple[str, Tensor]]:
        if self._long_rope_attn_factor() is None:
            return
        for key, field in ((MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"), (MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
            values = np.array(self.rope[field], dtype=np.float32)
            if values.shape != (self._rope_dims() // 2,):
                raise ConvertError(f"rope {field} has {values.size} entries, not {self._rope_dims() // 2}")
            yield self.tensor_name(key), Tensor(values.shape, values.dtype, lambda values=values: values)


class Falcon(Converter):
    """Falcon 7B/40B: the fused qkv's kv groups ([q * (n_head / n_kv), k, v] per group)
    regrouped as [all q | all k | all v] (llama.cpp's "jploski" layout)."""

    def _heads(self) -> tuple[int, int]:
        return (self.find("num_attention_heads", "n_head"),
                self.find("num_kv_heads", "n_head_kv", default=None) or 1)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        n_head, n_kv = self._heads()
        w.add_context_length(2048)  # not in config.json
        w.add_tensor_data_layout("jploski")
        w.add_embedding_length(self.config["hidden_size"])
        w.add_feed_forward_length(4 * self.config["hidden_size"])
        w.add_block_count(self.n_layers)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_eps(self.config["layer_norm_epsilon"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "query_key_value" in name:
            n_head, n_kv = self._heads()
            head_dim = self.config["hidden_size"] // n_head

            def regroup(a: np.ndarray) -> np.ndarray:
                groups = a.reshape(n_kv, n_head // n_kv + 2, head_dim, -1)
                return np.concatenate([groups[:, :-2].reshape(n_head * head_dim, -1),
                                       groups[:, -2].reshape(n_kv * head_dim, -1),
                                       groups[:, -1].reshape(n_kv * head_dim, -1)]).reshape(a.shape)

            t = t.map(regroup)
        return super().tensors(name, t, bid)


class Mistral3(Llama):
    """Ministral 3 text (Ministral3ForCausalLM): Llama with YaRN's log multiplier and Llama 4's
    attention temperature. Mistral3ForConditionalGeneration (with a vision tower) is not
    converted yet."""

    hf_classes = ("Ministral3ForCausalLM",)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        if self.config.get("model_type") == "ministral3":
            if self.rope.get("rope_type") != "yarn":
                raise ConvertError("Ministral 3 expects yarn rope_parameters")
            w.add_rope_scaling_yarn_log_mul(self.rope["mscale_all_dim"])
            w.add_attn_temperature_scale(self.rope["llama_4_scaling_beta"])


class Apertus(Llama):
    """Apertus: NEOX RoPE (rows kept as they are), xIELU's per-layer scalars collected into
    metadata arrays."""

    permute_qk = False
    XIELU = ("alpha_n", "alpha_p", "beta", "eps")  # written by GGUFWriter.add_xielu_<name>

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._xielu: dict[str, dict[int, float]] = {k: {} for k in self.XIELU}

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        for key in self.XIELU:
            if name.endswith(f".act_fn.{key}"):
                self._xielu[key][bid] = float(np.asarray(t.load(), dtype=np.float32).reshape(-1)[0])
                return []
        return super().tensors(name, t, bid)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        for key in self.XIELU:
            values = self._xielu[key]
            if len(values) == self.n_layers:
                getattr(w, f"add_xielu_{key}")([values[i] for i in sorted(values)])


class PhiMoe(Phi3):
    """Phi-3.5-MoE: Phi-3's conversion with Mixtral-style experts stacked per layer."""

    EXPERTS = (MIXTRAL_EXPERTS[0], "model.layers.{bid}.block_sparse_moe.experts.{w}.weight")

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_expert_used_count(self.find("num_experts_per_tok", "num_experts_per_token"))
        w.add_expert_count(self.find("num_local_experts", "num_experts"))

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "block_sparse_moe.experts." in name:
            return self.stack_experts(name, t, bid, self.find("num_local_experts", "num_experts"), *self.EXPERTS)
        return super().tensors(name, t, bid)


class Dbrx(Converter):
    """DBRX: experts stored flat ([n_expert * n_ff, n_embd], no .weight suffix) viewed as
    3-D, w2 transposed per expert; llama.cpp quantizes every DBRX matrix, the router too."""

    EXPERTS = (("ffn.experts.mlp.w1", False), ("ffn.experts.mlp.w2", True), ("ffn.experts.mlp.v1", False))

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c, ffn, attn = self.config, self.config["ffn_config"], self.config["attn_config"]
        w.add_block_count(self.n_layers)
        w.add_context_length(c["max_seq_len"])
        w.add_embedding_length(c["d_model"])
        w.add_feed_forward_length(ffn["ffn_hidden_size"])
        w.add_head_count(c["n_heads"])
        w.add_head_count_kv(attn["kv_n_heads"])
        w.add_rope_freq_base(attn["rope_theta"])
        w.add_clamp_kqv(attn["clip_qkv"])
        w.add_expert_count(ffn["moe_num_experts"])
        w.add_expert_used_count(ffn["moe_top_k"])
        w.add_layer_norm_eps(1e-5)

    def keep_f32(self, name: str, bid: int | None) -> bool:
        return False

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        ffn = self.config["ffn_config"]
        n_expert, n_ff, n_embd = ffn["moe_num_experts"], ffn["ffn_hidden_size"], self.config["d_model"]
        for key, transpose in self.EXPERTS:
            if key in name and ".weight" not in name:
                t = t.map(lambda a: a.reshape(n_expert, n_ff, n_embd), shape=(n_expert, n_ff, n_embd))
                if transpose:
                    t = t.map(lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)), shape=(n_expert, n_embd, n_ff))
                name += ".weight"
                break
        return super().tensors(name, t, bid)


class Ernie4_5Moe(Ernie4_5):
    """ERNIE 4.5 MoE: leading dense layers, experts stacked per layer, shared experts; the
    multi-token-prediction layers are not kept."""

    MTP = re.compile(r"model\.(mtp_block|mtp_emb_norm|mtp_hidden_norm|mtp_linear_proj)\.\d+")

    def skip(self, name: str) -> bool:
        return bool(self.MTP.match(name)) or super().skip(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        c = self.config
        w.add_expert_count(c["moe_num_experts"])
        w.add_expert_used_count(c["moe_k"])
        w.add_interleave_moe_layer_step(c["moe_layer_interval"])
        w.add_leading_dense_block_count(c["moe_layer_start_index"])
        if (n_ff := c.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n_ff)
        if (shared := c.get("moe_num_shared_experts")) is not None:
            w.add_expert_shared_count(shared)
            if shared > 0 and c.get("intermediate_size") is not None and c.get("num_key_value_heads") is not None:
                # llama.cpp's reading of the shared experts' width
                w.add_expert_shared_feed_forward_length(c["intermediate_size"] // c["num_key_value_heads"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "mlp.experts" in name:
            return self.stack_experts(name, t, bid, self.config["moe_num_experts"], *QWEN_EXPERTS)
        return Converter.tensors(self, name, t, bid)  # as llama.cpp: no fused-qkv split here


class Llama4(Llama):
    """Llama 4 text: q/k rows kept as stored (llama.cpp does not permute them), fused
    experts stored [E, in, out] (gate_up split, both transposed), the dense and expert
    widths swapped back. The multimodal checkpoint (with its vision tower) is not converted yet."""

    permute_qk = False
    hf_classes = ("Llama4ForCausalLM",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # HF names the dense FFN width intermediate_size_mlp and the experts' intermediate_size
        self.config["intermediate_size_moe"] = self.config["intermediate_size"]
        self.config["intermediate_size"] = self.config["intermediate_size_mlp"]

    def vocab(self, w: gguf.GGUFWriter) -> None:
        bpe_vocab(self, w)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_interleave_moe_layer_step(self.config["interleave_moe_layer_step"])
        w.add_expert_feed_forward_length(self.config["intermediate_size_moe"])
        if "layer_types" in self.config and all(t == "full_attention" for t in self.config["layer_types"]):
            w.add_sliding_window(0)  # MobileLLM-style: no sliding window at all

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        def swap_last(x: Tensor) -> Tensor:
            return x.map(lambda a: np.ascontiguousarray(np.swapaxes(a, -1, -2)), shape=(*x.shape[:-2], x.shape[-1], x.shape[-2]))

        if "gate_up_proj" in name:
            half = t.shape[-1] // 2
            gate, up = swap_last(t).split([half, half], axis=-2)
            return [*super().tensors(name.replace("gate_up_proj", "gate_proj.weight"), gate, bid),
                    *super().tensors(name.replace("gate_up_proj", "up_proj.weight"), up, bid)]
        if name.endswith("down_proj"):
            return super().tensors(name + ".weight", swap_last(t), bid)
        return super().tensors(name, t, bid)


class Mamba(Converter):
    """Mamba 1 (and Falcon-Mamba): A stored as -exp(A_log), conv1d weights squeezed to
    [d_inner, kernel], an output head equal to the embeddings left out."""

    def vocab(self, w: gguf.GGUFWriter) -> None:
        pad = self.config.get("pad_vocab_size_multiple", 8)
        self.config["vocab_size"] = -(self.config["vocab_size"] // -pad) * pad  # rounded up, as llama.cpp
        super().vocab(w)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        d_model = self.find("hidden_size", "d_model")
        d_inner = self.find("intermediate_size", "d_inner", default=None) or 2 * d_model
        if d_inner != 2 * d_model:
            raise ConvertError(f"Mamba with d_inner {d_inner} != 2 * d_model is not supported (as llama.cpp)")
        w.add_context_length(2**20)  # Mamba has no position limit; llama.cpp's placeholder
        w.add_embedding_length(d_model)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_block_count(self.n_layers)
        w.add_ssm_conv_kernel(self.find("conv_kernel", "d_conv", default=None) or 4)
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(self.find("state_size", "d_state", default=None) or 16)
        w.add_ssm_time_step_rank(self.find("time_step_rank", "dt_rank", default=None) or -(d_model // -16))
        w.add_layer_norm_rms_eps(self.find("layer_norm_epsilon", "rms_norm_eps", default=None) or 1e-5)
        w.add_ssm_dt_b_c_rms(self.config.get("model_type") == "falcon_mamba")

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        new_name = self.map_name(name)
        if name.endswith(".A_log"):
            t = t.map(neg_exp)
        if self.is_tensor(new_name, MODEL_TENSOR.SSM_CONV1D, bid):
            squeezed = tuple(n for n in t.shape if n != 1)
            t = t.map(lambda a: a.reshape(squeezed), shape=squeezed)
        if new_name == self.tensor_name(MODEL_TENSOR.OUTPUT):
            embd = self._embeddings
            if embd is not None and embd.shape == t.shape and np.array_equal(embd.load(), t.load()):
                return []  # tied: the runtime reuses token_embd
        elif new_name == self.tensor_name(MODEL_TENSOR.TOKEN_EMBD):
            self._embeddings = t
        return [(new_name, t)]

    _embeddings: Tensor | None = None


class Mamba2(Converter):
    """Mamba-2: A = -exp(A_log) and D as [n_head, 1], conv1d squeezed, the gated norm as
    [n_group, d_inner / n_group]; vocabulary rounded up to 16."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.d_model = self.find("hidden_size", "d_model", "dim")
        expand = self.find("mamba_expand", "expand", default=None) or 2
        self.d_inner = self.find("mamba_d_ssm", "intermediate_size", "d_inner", default=None) or expand * self.d_model
        self.n_group = self.find("n_groups", default=None) or 1
        if self.d_inner != expand * self.d_model:
            raise ConvertError(f"Mamba-2 with d_inner {self.d_inner} != expand * d_model is not supported (as llama.cpp)")

    def rename(self, name: str) -> str:
        if name.startswith(("model.backbone", "model.lm_head")):  # Mamba-Codestral's names
            name = name.removeprefix("model.")
        if name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        return super().rename(name)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        pad = self.config.get("pad_vocab_size_multiple", 16)
        self.config["vocab_size"] = -(self.config["vocab_size"] // -pad) * pad
        super().vocab(w)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        head_dim = self.find("mamba_d_head", "head_dim", default=None) or 64
        if self.d_inner % head_dim:
            raise ConvertError(f"Mamba-2 d_inner {self.d_inner} is not a multiple of its head size {head_dim}")
        w.add_context_length(2**20)
        w.add_embedding_length(self.d_model)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_block_count(self.n_layers)
        w.add_ssm_conv_kernel(self.find("conv_kernel", "d_conv", default=None) or 4)
        w.add_ssm_inner_size(self.d_inner)
        w.add_ssm_state_size(self.find("state_size", "d_state", default=None) or 128)
        w.add_ssm_time_step_rank(self.d_inner // head_dim)
        w.add_ssm_group_count(self.n_group)
        w.add_layer_norm_rms_eps(self.find("layer_norm_epsilon", "rms_norm_eps", default=None) or 1e-5)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        return self.mamba2_tensors(name, t, bid)

    def mamba2_tensors(self, name: str, t: Tensor, bid: int | None) -> list[tuple[str, Tensor]]:
        """A Mamba-2 mixer's tensor as llama.cpp's Mamba2Model writes it (Granite 4.0-H's too)."""
        new_name = self.map_name(name)
        if self.is_tensor(new_name, MODEL_TENSOR.SSM_CONV1D, bid):
            squeezed = tuple(n for n in t.shape if n != 1)
            t = t.map(lambda a: a.reshape(squeezed), shape=squeezed)
        elif new_name in (self.tensor_name(MODEL_TENSOR.SSM_A, bid, ""), self.tensor_name(MODEL_TENSOR.SSM_D, bid, "")):
            t = t.map(lambda a: a.reshape(*a.shape, 1), shape=(*t.shape, 1))
        elif self.is_tensor(new_name, MODEL_TENSOR.SSM_NORM, bid):
            shape = (self.n_group, self.d_inner // self.n_group)
            t = t.map(lambda a: a.reshape(shape), shape=shape)
        if name.endswith(".A_log"):
            t = t.map(neg_exp)
        return [(new_name, t)]



class Jamba(Converter):
    """Jamba: Mamba-1 layers (A = -exp(A_log), conv1d squeezed) with attention every
    attn_layer_period layers (kv heads 0 elsewhere) and experts every expert_layer_period
    layers (stacked; the other layers' single expert is a plain feed-forward)."""

    hf_classes = ("JambaForCausalLM",)
    EXPERTS = (r"feed_forward\.experts\.(?P<xid>\d+)\.(?P<w>down_proj|gate_proj|up_proj)\.weight$",
               "model.layers.{bid}.mlp.experts.{w}.weight")

    def rename(self, name: str) -> str:
        name = name.replace(".moe.", ".feed_forward.")  # Mini-Jamba's names
        m = re.search(r"layers\.(\d+)\.", name)
        offset, period = self.config["expert_layer_offset"], self.config["expert_layer_period"]
        if m and not (int(m[1]) >= offset and (int(m[1]) - offset) % period == 0):
            name = name.replace(".experts.0.", ".")
        return super().rename(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        d_model = self.find("hidden_size", "mamba_d_model")
        offset, period = c["attn_layer_offset"], c["attn_layer_period"]
        w.add_block_count(self.n_layers)
        w.add_context_length(self.find("max_position_embeddings", "n_ctx"))
        w.add_embedding_length(d_model)
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv([c["num_key_value_heads"] if i >= offset and (i - offset) % period == 0 else 0
                             for i in range(self.n_layers)])
        w.add_ssm_conv_kernel(c.get("mamba_d_conv") or 4)
        w.add_ssm_inner_size(c["mamba_expand"] * d_model)
        w.add_ssm_state_size(c.get("mamba_d_state") or 16)
        w.add_ssm_time_step_rank(c.get("mamba_dt_rank") or -(d_model // -16))
        w.add_layer_norm_rms_eps(self.find("layer_norm_epsilon", "rms_norm_eps", default=None) or 1e-6)
        w.add_expert_count(self.find("num_local_experts", "num_experts"))
        w.add_expert_used_count(self.find("num_experts_per_tok", "num_experts_per_token"))

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if ".feed_forward.experts." in name:
            return self.stack_experts(name, t, bid, self.find("num_local_experts", "num_experts"), *self.EXPERTS)
        new_name = self.map_name(name)
        if self.is_tensor(new_name, MODEL_TENSOR.SSM_CONV1D, bid):
            squeezed = tuple(n for n in t.shape if n != 1)
            t = t.map(lambda a: a.reshape(squeezed), shape=squeezed)
        if name.endswith(".A_log"):
            t = t.map(neg_exp)
        return [(new_name, t)]


class HunYuanDense(Converter):
    """Hunyuan dense (tokenizer.json checkpoints): NTK-alpha rope scaling baked into the
    base frequency, EOS from eod_token_id, EOT from generation_config's first EOS id."""

    def skip(self, name: str) -> bool:
        return (name == "lm_head.weight" and self.config.get("tie_word_embeddings", False)) or super().skip(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        experts = self.config.pop("num_experts", None)  # some variants say 1 without being MoE
        try:
            super().hparams(w)
        finally:
            if experts is not None:
                self.config["num_experts"] = experts
        if experts is not None and experts > 1:
            w.add_expert_count(experts)
        if self.rope.get("rope_type") in ("dynamic", "xdrope"):
            alpha, base, dim = self.rope.get("alpha", 50), self.rope.get("rope_theta", 10000.0), self.config["head_dim"]
            self.forget(w, gguf.Keys.Rope.FREQ_BASE)
            w.add_rope_freq_base(base * alpha ** (dim / (dim - 2)))
            w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
            w.add_rope_scaling_factor(1)
            if self.rope.get("rope_type") == "dynamic":  # the configs understate it; llama.cpp's 256k
                self.forget(w, gguf.Keys.LLM.CONTEXT_LENGTH)
                w.add_rope_scaling_orig_ctx_len(256 * 1024)
                w.add_context_length(256 * 1024)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        if not (self.dir / "tokenizer.json").is_file():
            raise ConvertError("Hunyuan checkpoints without tokenizer.json (tiktoken) are not converted yet")
        bpe_vocab(self, w)
        if (eod := self.config.get("eod_token_id")) is not None:
            self.forget(w, gguf.Keys.Tokenizer.EOS_ID)
            w.add_eos_token_id(eod)
        gen_path = self.dir / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
            if isinstance(eos, list) and len(eos) >= 2:
                w.add_eot_token_id(eos[0])


class HunYuanMoe(HunYuanDense):
    """Hunyuan-A13B-style MoE (tokenizer.json checkpoints): experts stacked per layer, a
    shared expert as wide as the dense FFN, per-layer expert settings that must agree, and
    NTK-alpha scaling baked into the base frequency for a 256k context."""

    hf_classes = ("HunYuanMoEV1ForCausalLM",)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        Converter.hparams(self, w)
        w.add_expert_shared_feed_forward_length(c["intermediate_size"])
        for add, key in ((w.add_expert_feed_forward_length, "moe_intermediate_size"),
                         (w.add_expert_used_count, "moe_topk"), (w.add_expert_shared_count, "num_shared_expert")):
            values = c[key] if isinstance(c[key], list) else [c[key]]
            if any(v != values[0] for v in values):
                raise ConvertError(f"{key} differs between layers ({values}): not supported (as llama.cpp)")
            add(values[0])
        if self.rope.get("rope_type") == "dynamic":
            alpha, base = self.rope.get("alpha", 1000), self.rope.get("rope_theta", 10000.0)
            dim = c["hidden_size"] // c["num_attention_heads"]
            self.forget(w, gguf.Keys.Rope.FREQ_BASE, gguf.Keys.LLM.CONTEXT_LENGTH)
            w.add_rope_freq_base(base * alpha ** (dim / (dim - 2)))
            w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
            w.add_rope_scaling_factor(1)
            w.add_rope_scaling_orig_ctx_len(256 * 1024)
            w.add_context_length(256 * 1024)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if ".mlp.experts." in name:
            return self.stack_experts(name, t, bid, self.find("num_local_experts", "num_experts"), *QWEN_EXPERTS)
        return super().tensors(name, t, bid)


class Glm4(Converter):
    """GLM-4-0414: partial rotary; where the configs name no BOS, EOS, UNK or EOT, llama.cpp
    takes <|endoftext|> for the first three and <|user|> for EOT."""

    hf_classes = ("Glm4ForCausalLM",)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        if "mrope_section" in self.rope:
            raise ConvertError("GLM-4 with M-RoPE (GLM-4V) is not converted yet")
        super().hparams(w)
        head_dim = self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"]
        w.add_rope_dimension_count(int(head_dim * self.rope.get("partial_rotary_factor", 0.5)))

    def vocab(self, w: gguf.GGUFWriter) -> None:
        bpe_vocab(self, w)
        spec = json.loads((self.dir / "tokenizer.json").read_text(encoding="utf-8"))
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        K = gguf.Keys.Tokenizer
        for key, add, token in ((K.EOS_ID, w.add_eos_token_id, "<|endoftext|>"), (K.EOT_ID, w.add_eot_token_id, "<|user|>"),
                                (K.UNK_ID, w.add_unk_token_id, "<|endoftext|>"), (K.BOS_ID, w.add_bos_token_id, "<|endoftext|>")):
            if key in w.kv_data[0]:
                continue  # the configs' own id wins, as in gguf-py's SpecialVocab
            if token not in added:
                raise ConvertError(f"GLM-4 tokenizer has no {token} token")
            add(added[token])


class Glm4Moe(Glm4):
    """GLM-4.5 / 4.6 MoE: sigmoid-routed experts (stacked per layer, selection bias, scaled
    and normalized weights) after the leading dense layers, a shared expert; the
    multi-token-prediction block kept as the last layer; GLM's special tokens ([gMASK] as
    BOS, <|observation|> as EOM)."""

    hf_classes = ("Glm4MoeForCausalLM",)
    SPECIALS = ((gguf.Keys.Tokenizer.BOS_ID, "add_bos_token_id", "[gMASK]"),
                (gguf.Keys.Tokenizer.EOT_ID, "add_eot_token_id", "<|user|>"),
                (gguf.Keys.Tokenizer.UNK_ID, "add_unk_token_id", "<|endoftext|>"),
                (gguf.Keys.Tokenizer.EOM_ID, "add_eom_token_id", "<|observation|>"))

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if nextn := self.config.get("num_nextn_predict_layers", 0):
            self.n_layers += nextn
            self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        super().hparams(w)
        for add, key in ((w.add_expert_feed_forward_length, "moe_intermediate_size"),
                         (w.add_expert_shared_count, "n_shared_experts"),
                         (w.add_leading_dense_block_count, "first_k_dense_replace")):
            if (value := c.get(key)) is not None:
                add(value)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        if (scale := c.get("routed_scaling_factor")) is not None:
            w.add_expert_weights_scale(scale)
        if (norm := c.get("norm_topk_prob")) is not None:
            w.add_expert_weights_norm(norm)
        if (nextn := c.get("num_nextn_predict_layers")) is not None:
            w.add_nextn_predict_layers(nextn)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        bpe_vocab(self, w)
        spec = json.loads((self.dir / "tokenizer.json").read_text(encoding="utf-8"))
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        for key, add, token in self.SPECIALS:
            if key not in w.kv_data[0] and token in added:  # the configs' own id wins, as in SpecialVocab
                getattr(w, add)(added[token])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if ".mlp.experts." in name:
            return self.stack_experts(name, t, bid, self.config["n_routed_experts"], *QWEN_EXPERTS)
        return super().tensors(name, t, bid)


class DeepSeek2(Converter):
    """DeepSeek V2/V3 (and R1): latent attention written as MQA (one kv head of width
    kv_lora_rank + qk_rope), kv_b_proj split into k_b (transposed) and v_b for absorption,
    routed experts stacked per layer, multi-token-prediction layers left out."""

    def skip(self, name: str) -> bool:
        if self.config.get("tie_word_embeddings", False) and name in ("lm_head.weight", "model.lm_head.weight"):
            return True
        m = re.match(r"model\.layers\.(\d+)", name)
        return bool(m and int(m[1]) >= self.config["num_hidden_layers"]) or super().skip(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        kv = c.get("num_key_value_heads")
        c["num_key_value_heads"] = 1  # MLA runs as MQA
        c.setdefault("rms_norm_eps", 1e-6)
        try:
            super().hparams(w)
        finally:
            c["num_key_value_heads"] = kv
        moe = c.get("n_routed_experts") is not None
        dense = c.get("first_k_dense_replace")
        w.add_leading_dense_block_count(dense if dense is not None else (0 if moe else c["num_hidden_layers"]))
        kv_lora = c.get("kv_lora_rank", 512)
        w.add_vocab_size(c["vocab_size"])
        if c.get("q_lora_rank") is not None:
            w.add_q_lora_rank(c["q_lora_rank"])
        w.add_kv_lora_rank(kv_lora)
        self.forget(w, gguf.Keys.Attention.KEY_LENGTH, gguf.Keys.Attention.VALUE_LENGTH)
        w.add_key_length(kv_lora + c["qk_rope_head_dim"])
        w.add_value_length(kv_lora)
        w.add_key_length_mla(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
        w.add_value_length_mla(c["v_head_dim"])
        w.add_expert_feed_forward_length(self.find("moe_intermediate_size", "intermediate_size"))
        if moe:
            self.forget(w, gguf.Keys.LLM.EXPERT_COUNT)
            w.add_expert_count(c["n_routed_experts"])
        w.add_expert_shared_count(c.get("n_shared_experts", 0))
        if (scale := c.get("routed_scaling_factor")) is not None:
            w.add_expert_weights_scale(scale)
        if c.get("norm_topk_prob"):
            w.add_expert_weights_norm(c["norm_topk_prob"])
        w.add_rope_dimension_count(c["qk_rope_head_dim"])
        if (mscale_all := self.rope.get("mscale_all_dim")) is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all)  # llama.cpp's legacy DeepSeek reading

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        c = self.config
        if "mlp.experts" in name:
            return self.stack_experts(name, t, bid, c["n_routed_experts"], *QWEN_EXPERTS)
        if name.endswith("kv_b_proj.weight"):
            n_kv, v_dim, nope = c["num_key_value_heads"], c["v_head_dim"], c["qk_nope_head_dim"]
            if t.shape[0] != n_kv * (v_dim + nope):
                raise ConvertError(f"{name}: {t.shape[0]} rows, not {n_kv} heads x ({nope} + {v_dim})")
            kv_b = t.map(lambda a: a.reshape(n_kv, nope + v_dim, a.shape[-1]), shape=(n_kv, nope + v_dim, t.shape[-1]))
            k_b, v_b = kv_b.split([nope, v_dim], axis=1)
            k_b = k_b.map(lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)), shape=(n_kv, t.shape[-1], nope))
            return [*super().tensors(name.replace("kv_b_proj", "k_b_proj"), k_b, bid),
                    *super().tensors(name.replace("kv_b_proj", "v_b_proj"), v_b, bid)]
        return super().tensors(name, t, bid)


class Dots1(QwenMoe):
    """dots.llm1: Qwen MoE with leading dense layers, shared experts (kept apart from the
    stacking) and DeepSeek-V3-style weight scaling."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config["num_experts"] = self.config["n_routed_experts"]

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        c = self.config
        w.add_leading_dense_block_count(c["first_k_dense_replace"])
        w.add_expert_shared_count(c["n_shared_experts"])
        w.add_expert_weights_scale(c["routed_scaling_factor"])
        w.add_expert_weights_norm(c["norm_topk_prob"])


class BailingMoe(Converter):
    """Ling (v1) MoE: fused query_key_value split and q/k rows reordered as Llama's,
    experts stacked per layer, an optionally column-normalized output head."""

    def vocab(self, w: gguf.GGUFWriter) -> None:
        bpe_vocab(self, w)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        c = self.config
        w.add_rope_dimension_count(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
        w.add_leading_dense_block_count(c["first_k_dense_replace"])
        w.add_vocab_size(c["vocab_size"])
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        w.add_expert_weights_scale(1.0)
        w.add_expert_shared_count(c["num_shared_experts"])
        w.add_expert_weights_norm(c["norm_topk_prob"])

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        c, T = self.config, MODEL_TENSOR
        n_head, n_kv = c["num_attention_heads"], c.get("num_key_value_heads")
        head_dim = c.get("head_dim") or c["hidden_size"] // n_head
        if name.endswith("attention.dense.weight"):
            return [(self.tensor_name(T.ATTN_OUT, bid), t)]
        if name.endswith("query_key_value.weight"):
            q, k, v = t.split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim], axis=-2)
            return [(self.tensor_name(T.ATTN_Q, bid), rope_pairs_adjacent(q, n_head)),
                    (self.tensor_name(T.ATTN_K, bid), rope_pairs_adjacent(k, n_kv)),
                    (self.tensor_name(T.ATTN_V, bid), v)]
        if "mlp.experts" in name:
            return self.stack_experts(name, t, bid, self.find("num_local_experts", "num_experts"), *QWEN_EXPERTS)
        new_name = self.map_name(name)
        if new_name == self.tensor_name(T.OUTPUT) and c.get("norm_head"):
            def normalized(a: np.ndarray) -> np.ndarray:
                a = a.astype(np.float32)
                return a / (np.linalg.norm(a, axis=0, keepdims=True) + np.float32(1e-7))
            t = t.map(normalized, dtype=np.float32)
        return [(new_name, t)]


class MPT(Converter):
    """MPT: its own key list (ALiBi's maximum bias, clip_qkv from attn_config), activation
    scales renamed act.scales; SEA-LION's SentencePiece variant with its fixed ids."""

    def vocab(self, w: gguf.GGUFWriter) -> None:
        if (self.dir / "tokenizer.json").is_file():
            bpe_vocab(self, w)
            return
        sentencepiece_vocab(self, w)
        self.forget(w, gguf.Keys.Tokenizer.ADD_BOS, gguf.Keys.Tokenizer.PAD_ID, gguf.Keys.Tokenizer.EOS_ID,
                    gguf.Keys.Tokenizer.UNK_ID)
        w.add_add_bos_token(False)
        w.add_pad_token_id(3)
        w.add_eos_token_id(1)
        w.add_unk_token_id(0)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c, attn = self.config, self.config["attn_config"]
        w.add_context_length(c["max_seq_len"])
        w.add_embedding_length(c["d_model"])
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(4 * c["d_model"])
        w.add_head_count(c["n_heads"])
        if kv := attn.get("kv_n_heads"):
            w.add_head_count_kv(kv)
        w.add_layer_norm_eps(1e-5)
        if attn.get("clip_qkv") is not None:
            w.add_clamp_kqv(attn["clip_qkv"])
        w.add_max_alibi_bias(attn["alibi_bias_max"] if attn.get("alibi") else 0.0)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "scales" in name:
            new = self.tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias", ".scales"))
            if new is None:
                raise ConvertError(f"tensor {name} has no GGUF name for mpt")
            return [(new.replace("scales", "act.scales"), t)]
        return super().tensors(name, t, bid)


class InternLM2(Converter):
    """InternLM2: the fused wqkv, stored per kv group ([q heads of the group, k, v]), split
    into q, k and v with Llama's row order; its own SentencePiece reading (a NUL piece
    stored as U+1F409, [UNUSED pieces unused, added tokens literal, <|im_end|> as EOS)."""

    CHAT_EOS = "<|im_end|>"
    NUL_STANDIN = "\U0001F409"  # llama.cpp cannot hold an empty string as a token text

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if bid is None or not name.endswith("attention.wqkv.weight"):
            return super().tensors(name, t, bid)
        c = self.config
        n_head, n_kv, n_embd = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
        per_kv, head_dim = n_head // n_kv, n_embd // n_head
        if t.shape != ((per_kv + 2) * n_kv * head_dim, n_embd):
            raise ConvertError(f"{name}: shape {t.shape} is not {n_kv} groups of {per_kv} q + k + v heads of {head_dim}")

        def part(a: np.ndarray, rows: slice) -> np.ndarray:
            return np.ascontiguousarray(a.reshape(n_kv, per_kv + 2, head_dim, n_embd)[:, rows].reshape(-1, n_embd))

        q = t.map(lambda a: part(a, slice(0, per_kv)), shape=(n_head * head_dim, n_embd))
        k = t.map(lambda a: part(a, slice(per_kv, per_kv + 1)), shape=(n_kv * head_dim, n_embd))
        v = t.map(lambda a: part(a, slice(per_kv + 1, per_kv + 2)), shape=(n_kv * head_dim, n_embd))
        T = MODEL_TENSOR
        return [(self.tensor_name(T.ATTN_Q, bid), rope_pairs_adjacent(q, n_head)),
                (self.tensor_name(T.ATTN_K, bid), rope_pairs_adjacent(k, n_kv)),
                (self.tensor_name(T.ATTN_V, bid), v)]

    def vocab(self, w: gguf.GGUFWriter) -> None:
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as spm_proto

        from gguf import TokenType

        path = self.dir / "tokenizer.model"
        if not path.is_file():
            raise ConvertError(f"{self.dir}: InternLM2 needs tokenizer.model")
        proto = spm_proto.ModelProto()
        proto.ParseFromString(path.read_bytes())
        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(path))
        n_vocab = self.config.get("vocab_size", sp.vocab_size())
        if n_vocab > sp.vocab_size():
            raise ConvertError(f"vocab_size {n_vocab} exceeds tokenizer.model's {sp.vocab_size()} pieces")
        tokens, scores, types = [], [], []
        for i in range(n_vocab):
            piece = sp.IdToPiece(i)
            tokens.append((self.NUL_STANDIN if piece == "\x00" else piece).encode())
            scores.append(sp.GetScore(i))
            types.append(TokenType.UNUSED if piece.startswith("[UNUSED") else
                         TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                         else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                         else TokenType.NORMAL)
        added_path = self.dir / "added_tokens.json"
        if added_path.is_file():  # appended in the file's order, as llama.cpp does (ids not read)
            for content in json.loads(added_path.read_text(encoding="utf-8")):
                tokens.append(content.encode())
                scores.append(-1000.0)
                types.append(TokenType.USER_DEFINED)
        chat_eos = None
        added: list[dict] = []
        config_path, json_path = self.dir / "tokenizer_config.json", self.dir / "tokenizer.json"
        if config_path.is_file():
            decoder = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
            added += [{**t, "id": int(i)} for i, t in decoder.items()]
        if json_path.is_file():
            added += json.loads(json_path.read_text(encoding="utf-8")).get("added_tokens", [])
        for t in added:
            i = int(t["id"])
            if i >= len(tokens):
                raise ConvertError(f"added token {t['content']!r} has id {i}, past the {len(tokens)} tokens")
            if t["content"] == self.CHAT_EOS:
                chat_eos = i
            tokens[i], scores[i] = t["content"].encode(), -1000.0
            types[i] = TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
        sv = special_vocab(self, generation_eos=False, n_vocab=len(tokens))
        if chat_eos is not None:  # chat models end a turn with <|im_end|>: llama.cpp makes it the EOS
            sv.special_token_ids["eos"] = chat_eos
        sv.add_to_gguf(w, quiet=True)


class ChatGLM(Converter):
    """GLM-4-9B in transformers' layout (GlmForCausalLM) and ChatGLM's remote-code layout
    (transformer.* names): llama.cpp's own key list (context from seq_length, else n_embd;
    the RMS epsilon from layernorm_epsilon; base 10000 times rope_ratio; half the head
    rotated), no BOS added; <|endoftext|> as EOS and UNK, <|user|> as EOT where the configs
    name none. ChatGLM3's SentencePiece tokenizer (remote code) is not converted."""

    def rename(self, name: str) -> str:
        return super().rename(name.removeprefix("transformer."))

    def skip(self, name: str) -> bool:
        return name.endswith(".rotary_pos_emb.inv_freq") or super().skip(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        n_embd = c.get("hidden_size", c.get("n_embed"))
        n_head = c.get("n_head", c.get("num_attention_heads"))
        if n_embd is None or n_head is None:
            raise ConvertError("config.json names no hidden_size/n_embed or num_attention_heads/n_head")
        w.add_context_length(c.get("seq_length", n_embd))
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(c.get("ffn_hidden_size", c.get("intermediate_size", 4 * n_embd)))
        w.add_block_count(self.n_layers)
        w.add_head_count(n_head)
        w.add_head_count_kv(c.get("multi_query_group_num", c.get("num_key_value_heads", n_head)))
        w.add_layer_norm_rms_eps(c.get("layernorm_epsilon", 1e-5))
        rope_dim = c["attention_dim"] if "attention_dim" in c else c["hidden_size"] // c["num_attention_heads"]
        w.add_rope_dimension_count(int(rope_dim * self.rope.get("partial_rotary_factor", 0.5)))
        w.add_add_bos_token(False)
        w.add_rope_freq_base(10000 * c.get("rope_ratio", 1))

    def vocab(self, w: gguf.GGUFWriter) -> None:
        if "THUDM/chatglm3-6b" in self.config.get("_name_or_path", ""):
            raise ConvertError("ChatGLM3's tokenizer (remote code over SentencePiece) is not converted yet")
        if not (self.dir / "tokenizer.json").is_file():
            raise ConvertError(f"{self.dir}: ChatGLM needs tokenizer.json (the tiktoken tokenizer is not converted yet)")
        spec = json.loads((self.dir / "tokenizer.json").read_text(encoding="utf-8"))
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        for token in ("<|endoftext|>", "<|user|>"):
            if token not in added:
                raise ConvertError(f"ChatGLM tokenizer has no {token} token")
        n_vocab = self.config.get("padded_vocab_size", self.config["vocab_size"])
        if max(max(spec["model"]["vocab"].values()), *added.values()) >= n_vocab:
            raise ConvertError(f"tokenizer.json has ids past the vocabulary size {n_vocab}")
        bpe_vocab(self, w)
        K = gguf.Keys.Tokenizer
        for key, add, token in ((K.EOS_ID, w.add_eos_token_id, "<|endoftext|>"), (K.EOT_ID, w.add_eot_token_id, "<|user|>"),
                                (K.UNK_ID, w.add_unk_token_id, "<|endoftext|>")):
            if key not in w.kv_data[0]:  # the configs' own id wins, as in gguf-py's SpecialVocab
                add(added[token])


class MiniMaxM2(Converter):
    """MiniMax-M2: per-expert w1/w2/w3 stacked per layer, the experts' width from
    intermediate_size, partial rotary from rotary_dim; the selection bias renamed as
    DeepSeek's (the driver's rename)."""

    EXPERTS = (MIXTRAL_EXPERTS[0], "model.layers.{bid}.block_sparse_moe.experts.{w}.weight")

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_expert_feed_forward_length(self.find("intermediate_size"))
        w.add_rope_dimension_count(self.find("rotary_dim"))

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "block_sparse_moe.experts." in name:
            return self.stack_experts(name, t, bid, self.find("num_local_experts", "num_experts"), *self.EXPERTS)
        return super().tensors(name, t, bid)


def mxfp4_repacked(blocks: Tensor, scales: Tensor) -> Tensor:
    """OpenAI's MXFP4 ([..., rows, n_block, 16] bytes holding values 2j and 2j + 1 in the low
    and high nibble, [..., rows, n_block] exponent bytes) as ggml's block_mxfp4 rows (the
    exponent byte, then 16 bytes holding values j and j + 16): the same codes and exponents,
    moved, as llama.cpp's converter moves them."""
    *lead, rows, n_block, width = blocks.shape
    if width != 16 or tuple(scales.shape) != (*lead, rows, n_block):
        raise ConvertError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair")

    def repack(b: np.ndarray, e: np.ndarray) -> np.ndarray:
        b = b.astype(np.uint8, copy=False)
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], 32)
        packed = codes[..., :16] | (codes[..., 16:] << 4)
        out = np.concatenate([e.astype(np.uint8, copy=False)[..., None], packed], axis=-1)
        return np.ascontiguousarray(out.reshape(*b.shape[:-2], n_block * 17))

    return Tensor((*lead, rows, n_block * 32), np.dtype(np.uint8), lambda: repack(blocks.load(), scales.load()),
                  qtype=gguf.GGMLQuantizationType.MXFP4)


class GptOss(Converter):
    """gpt-oss: attention sinks, the experts' fused gate_up (gate and up interleaved row by
    row) split; MXFP4 experts (blocks + scales) repacked into ggml's MXFP4 and kept so at
    every outtype (the file type then says MXFP4 MoE), unquantized ones ([E, in, out])
    transposed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mxfp4 = (self.raw_config.get("quantization_config") or {}).get("quant_method") == "mxfp4"
        self._blocks: dict[str, dict[str, Tensor]] = {}  # MXFP4 blocks / scales waiting for their partner

    def file_type(self, file_type: gguf.LlamaFileType) -> gguf.LlamaFileType:
        LFT = gguf.LlamaFileType
        if self.mxfp4 and file_type in (LFT.ALL_F32, LFT.MOSTLY_F16, LFT.MOSTLY_BF16):
            return LFT.MOSTLY_MXFP4_MOE
        return file_type

    def rename(self, name: str) -> str:
        if name.endswith(".sinks"):
            name += ".weight"
        return super().rename(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        w.add_sliding_window(self.config["sliding_window"])
        w.add_expert_feed_forward_length(self.config["intermediate_size"])

    def finish(self) -> None:
        for key, group in self._blocks.items():
            raise ConvertError(f"{key}_{next(iter(group))} has no {'_scales' if 'blocks' in group else '_blocks'} tensor")
        super().finish()

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        def swap_last(x: Tensor) -> Tensor:
            return x.map(lambda a: np.ascontiguousarray(np.swapaxes(a, -1, -2)),
                         shape=(*x.shape[:-2], x.shape[-1], x.shape[-2]))

        def rows(x: Tensor, start: int, axis: int) -> Tensor:  # every other row along an axis
            shape = list(x.shape)
            shape[axis] //= 2
            index = (slice(None),) * (axis % len(x.shape)) + (slice(start, None, 2),)
            return x.map(lambda a: np.ascontiguousarray(a[index]), shape=tuple(shape))

        stem = name.rsplit(".", 1)[0]
        if name.endswith(("_blocks", "_scales")):
            if not self.mxfp4:
                raise ConvertError(f"{name}: MXFP4 blocks, but config.json's quantization_config is not mxfp4")
            key, part = name.rsplit("_", 1)
            group = self._blocks.setdefault(key, {})
            group[part] = t
            if len(group) < 2:  # (its partner may come later, from another shard)
                return []
            del self._blocks[key]
            blocks, scales = group["blocks"], group["scales"]
            if key.endswith("down_proj"):
                return [(self.map_name(f"{key}.weight"), mxfp4_repacked(blocks, scales))]
            gate_up = key.removesuffix(".gate_up_proj")
            return [(self.map_name(f"{gate_up}.{w}_proj.weight"), mxfp4_repacked(rows(blocks, i, 1), rows(scales, i, 1)))
                    for i, w in enumerate(("gate", "up"))]
        if name.endswith("experts.down_proj_bias"):
            return super().tensors(f"{stem}.down_proj.bias", t, bid)
        if name.endswith("experts.down_proj"):
            return super().tensors(f"{name}.weight", swap_last(t), bid)
        if name.endswith("experts.gate_up_proj_bias"):
            return [item for i, w in enumerate(("gate", "up"))  # (a comprehension: no zero-argument super)
                    for item in Converter.tensors(self, f"{stem}.{w}_proj.bias", rows(t, i, -1), bid)]
        if name.endswith("experts.gate_up_proj"):
            return [item for i, w in enumerate(("gate", "up"))
                    for item in Converter.tensors(self, f"{stem}.{w}_proj.weight", rows(swap_last(t), i, 1), bid)]
        return super().tensors(name, t, bid)


class FalconH1(Converter):
    """Falcon-H1: Mamba-2 mixers converted as Mamba-2's (d_ssm need not be 2 x hidden), the
    muP multipliers baked into the weights in float32 as llama.cpp's converter bakes them
    (k_proj twice rounded, in_proj's z/x/B/C/dt row blocks each scaled), Mamba-2's keys
    with the attention's over them; byte-level BPE."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_group = self.find("n_groups", "mamba_n_groups")
        self.d_inner = self.find("mamba_d_ssm")
        self.d_head = self.find("d_head", "mamba_d_head")
        if self.d_inner % self.d_head:
            raise ConvertError(f"Falcon-H1 SSM inner size {self.d_inner} is not a multiple of its head size {self.d_head}")
        if self.config.get("hidden_act") not in (None, "silu"):
            raise ConvertError(f"Falcon-H1 with hidden_act {self.config['hidden_act']!r}: only SiLU is supported")

    def rename(self, name: str) -> str:
        if name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        return super().rename(name)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        bpe_vocab(self, w)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_context_length(c.get("max_position_embeddings", 0))
        w.add_embedding_length(self.find("hidden_size", "d_model", "dim"))
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(c["num_attention_heads"])
        w.add_block_count(self.n_layers)
        w.add_ssm_conv_kernel(self.find("conv_kernel", "d_conv", "mamba_conv_kernel", "mamba_d_conv", default=None) or 4)
        w.add_ssm_inner_size(self.d_inner)
        w.add_ssm_state_size(self.find("state_size", "d_state", "mamba_state_size", "mamba_d_state", default=None) or 128)
        head_dim = self.find("mamba_d_head", "head_dim", default=None) or 64  # (Mamba-2's reading, as llama.cpp)
        w.add_ssm_time_step_rank(self.d_inner // head_dim)
        w.add_ssm_group_count(self.n_group)
        w.add_layer_norm_rms_eps(self.find("layer_norm_epsilon", "rms_norm_eps", default=None) or 1e-5)
        w.add_vocab_size(c["vocab_size"])
        w.add_head_count_kv(c["num_key_value_heads"])
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
        w.add_rope_freq_base(self.rope["rope_theta"])

    def _multipliers(self, name: str) -> list[tuple[slice, tuple[float, ...]]] | None:
        """The factors llama.cpp multiplies a tensor by, in order, per row range."""
        c, f = self.config, self.find
        every = slice(None)
        for key, factors in (("down_proj", lambda: (c["mlp_multipliers"][1],)),
                             ("gate_proj", lambda: (c["mlp_multipliers"][0],)),
                             ("k_proj", lambda: (f("key_multiplier"), f("attention_in_multiplier"))),
                             ("q_proj", lambda: (f("attention_in_multiplier"),)),
                             ("v_proj", lambda: (f("attention_in_multiplier"),)),
                             ("o_proj", lambda: (f("attention_out_multiplier"),)),
                             ("out_proj", lambda: (f("ssm_out_multiplier"),)),
                             ("in_proj", None),
                             ("lm_head", lambda: (c["lm_head_multiplier"],)),
                             ("embed_tokens", lambda: (c["embedding_multiplier"],))):
            if key not in name:
                continue
            if factors is not None:
                return [(every, factors())]
            d, gs = c["mamba_d_ssm"], c["mamba_n_groups"] * c["mamba_d_state"]
            bounds = (0, d, 2 * d, 2 * d + gs, 2 * d + 2 * gs, None)
            return [(every, (f("ssm_in_multiplier"),))] + [
                (slice(lo, hi), (m,)) for lo, hi, m in zip(bounds, bounds[1:], c["ssm_multipliers"])]
        return None

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        [(new_name, t)] = Mamba2.mamba2_tensors(self, name, t, bid)
        steps = self._multipliers(name)
        if steps is None:
            return [(new_name, t)]

        def scaled(a: np.ndarray) -> np.ndarray:
            a = a.astype(np.float32)  # (a new array: the reader's may be a view of the file)
            for rows, factors in steps:
                for factor in factors:  # one float32 rounding per factor, as torch computes them
                    a[rows] *= np.float32(factor)
            return a

        return [(new_name, t.map(scaled, dtype=np.float32))]


class NemotronH(GraniteHybrid):
    """Nemotron-H (dense) and Nemotron 3 (MoE, written as nemotron_h_moe): one mixer per layer
    (Mamba-2, attention or a feed-forward / expert layer) as the layer pattern says (NVIDIA's
    string, or transformers' layers_block_type); converted as llama.cpp's NemotronHModel,
    which builds on Granite hybrid's (q/k rows in Llama's order, Mamba-2 mixers as
    Mamba-2's); ReLU² experts (up and down) stacked per layer. A checkpoint is MoE when its
    config has num_experts_per_tok, unless layers_block_type lists no "moe" layer
    (transformers 5 writes the MoE keys for every Nemotron-H). MTP heads are not converted."""

    hf_classes = None
    MOE_KEYS = ("num_experts_per_tok", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
                "moe_shared_expert_intermediate_size", "n_group", "topk_group")
    SSM_KINDS, ATTN_KINDS = ("mamba", "linear_attention"), ("attention", "full_attention")
    EXPERTS = (r"mixer\.experts\.(?P<xid>\d+)\.(?P<w>up_proj|down_proj)\.weight$", "model.layers.{bid}.mlp.experts.{w}.weight")

    def __init__(self, hf_dir, config: dict, arch_name: str) -> None:
        config = {**config, **(config.get("llm_config") or {})}
        kinds = config.get("layers_block_type")
        self.is_moe = "num_experts_per_tok" in config and not (isinstance(kinds, list) and "moe" not in kinds)
        if not self.is_moe:
            config = {k: v for k, v in config.items() if k not in self.MOE_KEYS}
        if kinds is not None:
            config["num_hidden_layers"] = len(kinds)
        Converter.__init__(self, hf_dir, config, "nemotron_h_moe" if self.is_moe else "nemotron_h")
        c = self.config
        self.head_dim_attn = c.get("head_dim", c.get("attention_head_dim"))
        if self.head_dim_attn is None:
            raise ConvertError("config.json names no head_dim or attention_head_dim")
        pattern = c.get("hybrid_override_pattern") or kinds
        if pattern is None:
            raise ConvertError("Nemotron-H config has neither hybrid_override_pattern nor layers_block_type")
        if len(pattern) != self.n_layers:
            raise ConvertError(f"Nemotron-H layer pattern has {len(pattern)} layers, not {self.n_layers}")
        if isinstance(pattern, str):
            mlp = "E" if self.is_moe else "-"
            is_ssm, is_attn, is_mlp = (lambda k: k == "M"), (lambda k: k == "*"), (lambda k: k == mlp)
        else:
            mlp = "moe" if self.is_moe else "mlp"
            is_ssm, is_attn, is_mlp = (lambda k: k in self.SSM_KINDS), (lambda k: k in self.ATTN_KINDS), (lambda k: k == mlp)
        self.attn_layers = [i for i, k in enumerate(pattern) if is_attn(k)]
        self.ssm_layers = [i for i, k in enumerate(pattern) if is_ssm(k)]
        self.mlp_layers = [i for i, k in enumerate(pattern) if is_mlp(k)]
        self.n_group = self.find("n_groups", "num_groups", "mamba_n_groups", "mamba_num_groups")
        self.d_inner = self.find("num_heads", "mamba_num_heads") * self.find("mamba_head_dim", "hidden_size", "d_model")
        if self.d_inner % (self.find("d_head", "mamba_d_head", default=None) or 64):
            raise ConvertError(f"Nemotron-H SSM inner size {self.d_inner} is not a multiple of its head size")

    def skip(self, name: str) -> bool:
        if name.startswith("mtp."):
            raise ConvertError("Nemotron-H multi-token-prediction heads (mtp.*) are not converted yet")
        return super().skip(name)

    def rename(self, name: str) -> str:
        if name.startswith("model.layers.") and ".mixer." in name:  # PEFT's names
            name = name.replace("model.layers.", "backbone.layers.", 1)
        return super().rename(name)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        pad = 8
        self.config["vocab_size"] = -(self.config["vocab_size"] // -pad) * pad
        bpe_vocab(self, w)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        super().hparams(w)
        w.add_key_length(self.head_dim_attn)
        w.add_value_length(self.head_dim_attn)
        self.forget(w, gguf.Keys.LLM.FEED_FORWARD_LENGTH)
        if not self.is_moe:
            n_ff = self.find("intermediate_size", "n_inner", "hidden_dim", "mamba_intermediate_size", "mamba_n_inner",
                             "mamba_hidden_dim")
            w.add_feed_forward_length([n_ff if i in self.mlp_layers else 0 for i in range(self.n_layers)])
            return
        for key in (gguf.Keys.LLM.EXPERT_USED_COUNT, gguf.Keys.LLM.EXPERT_COUNT, gguf.Keys.LLM.EXPERT_GROUP_COUNT):
            self.forget(w, key)
        n_ff = c["moe_intermediate_size"]
        w.add_feed_forward_length([n_ff if i in self.mlp_layers else 0 for i in range(self.n_layers)])
        w.add_expert_used_count(c["num_experts_per_tok"])
        w.add_expert_feed_forward_length(n_ff)
        w.add_expert_shared_feed_forward_length(c["moe_shared_expert_intermediate_size"])
        w.add_expert_count(c["n_routed_experts"])
        w.add_expert_shared_count(c["n_shared_experts"])
        w.add_expert_weights_norm(c["norm_topk_prob"])
        w.add_expert_weights_scale(c["routed_scaling_factor"])
        w.add_expert_group_count(c["n_group"])
        if (latent := c.get("moe_latent_size")) is not None:
            w.add_moe_latent_size(latent)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if self.is_moe and bid is not None and "mixer.experts." in name:
            return self.stack_experts(name, t, bid, self.config["n_routed_experts"], *self.EXPERTS)
        if bid is not None and bid not in self.ssm_layers and bid not in self.attn_layers:
            return Converter.tensors(self, name, t, bid)  # feed-forward / expert layers: names only
        return super().tensors(name, t, bid)


class Qwen3Next(QwenMoe):
    """Qwen3-Next: gated delta net layers (A = -exp(A_log), conv1d squeezed, in_proj_qkvz's
    per-key-head [q, k, v, z] regrouped into one qkv and the z gate) beside gated attention;
    RMSNorms stored as 1 + w (not the delta net's own norm); experts as Qwen MoE's; the
    multi-token-prediction block kept as the last layer (llama.cpp's converter refuses a
    checkpoint without one)."""

    hf_classes = ("Qwen3NextForCausalLM",)
    MTP_RENAMES = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
                   "norm": "shared_head.norm"}
    NEXTN = {"eh_proj.weight": MODEL_TENSOR.NEXTN_EH_PROJ, "enorm.weight": MODEL_TENSOR.NEXTN_ENORM,
             "hnorm.weight": MODEL_TENSOR.NEXTN_HNORM, "shared_head.norm.weight": MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from .convert import checkpoint_tensors

        self.base_layers = self.config["num_hidden_layers"]
        self.n_mtp = self.config.get("mtp_num_hidden_layers", 0)
        if not self.n_mtp:  # Qwen3-Next's config does not say: the checkpoint's mtp.layers.N do
            found = {int(m[1]) for n in checkpoint_tensors(self.dir)
                     if (m := re.match(r"(?:model\.)?mtp\.layers\.(\d+)\.", n))}
            self.n_mtp = max(found) + 1 if found else 0
        if not self.n_mtp:
            raise ConvertError(f"{self.config.get('architectures', ['Qwen3-Next'])[0]} checkpoint without its "
                               "multi-token-prediction layers (mtp.*): llama.cpp's converter refuses it too")
        self.n_layers = self.base_layers + self.n_mtp
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    def skip(self, name: str) -> bool:  # the vision tower of the multimodal checkpoints
        return "visual." in name or "vision." in name or "vision_" in name or super().skip(name)

    def rename(self, name: str) -> str:
        name = super().rename(name)
        if name.startswith("model.mtp."):
            name = name.removeprefix("model.")
        if name.startswith("mtp."):
            parts = name.split(".", 3)
            if len(parts) == 4 and parts[1] == "layers" and parts[2].isdecimal():
                return f"model.layers.{self.base_layers + int(parts[2])}.{parts[3]}"
            if len(parts) == 3 and parts[1] in self.MTP_RENAMES:
                return f"model.layers.{self.base_layers}.{self.MTP_RENAMES[parts[1]]}.{parts[2]}"
        return name

    def hparams(self, w: gguf.GGUFWriter) -> None:
        from .archs.qwen3next import RECURRENT_LAYERS

        c = self.config
        super().hparams(w)
        w.add_nextn_predict_layers(self.n_mtp)
        w.add_ssm_conv_kernel(c["linear_conv_kernel_dim"])
        w.add_ssm_state_size(c["linear_key_head_dim"])
        w.add_ssm_group_count(c["linear_num_key_heads"])
        w.add_ssm_time_step_rank(c["linear_num_value_heads"])
        w.add_ssm_inner_size(c["linear_value_head_dim"] * c["linear_num_value_heads"])
        if (kinds := c.get("layer_types")) is not None:
            if len(kinds) != self.base_layers:
                raise ConvertError(f"layer_types has {len(kinds)} entries, not num_hidden_layers ({self.base_layers})")
            w.add_array(RECURRENT_LAYERS.format(arch=w.arch), [k == "linear_attention" for k in kinds] + [False] * self.n_mtp)
        w.add_full_attention_interval(c.get("full_attention_interval", 4))
        rope_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        w.add_rope_dimension_count(int(rope_dim * self.rope.get("partial_rotary_factor", 0.25)))

    def reordered(self, name: str, t: Tensor) -> Tensor:
        """Qwen3.5's value heads reordered (Qwen3-Next keeps HF's order)."""
        return t

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "linear_attn." in name:
            t = self.reordered(name, t)
        if name.endswith(".A_log"):
            t = t.map(neg_exp)
        elif name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif "conv1d" in name:
            squeezed = tuple(n for n in t.shape if n != 1)
            t = t.map(lambda a: a.reshape(squeezed), shape=squeezed)
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            t = plus_one(t)
        if bid is not None and (nextn := self.NEXTN.get(name.removeprefix(f"model.layers.{bid}."))) is not None:
            # (named directly: gguf-py releases before the MTP tensors' mapping lack them)
            return [(self.tensor_name(nextn, bid), t)]
        if "in_proj_qkvz.weight" in name:
            c = self.config
            hk, hv = c["linear_key_head_dim"], c["linear_value_head_dim"]
            n_k, n_v, n_embd = c["linear_num_key_heads"], c["linear_num_value_heads"], c["hidden_size"]
            sizes = [hk, hk, n_v // n_k * hv, n_v // n_k * hv]
            if t.shape != (n_k * sum(sizes), n_embd):
                raise ConvertError(f"{name}: shape {t.shape} is not {n_k} key heads of q, k, v, z {sizes} x {n_embd}")
            bounds = np.cumsum([0, *sizes])

            def part(a: np.ndarray, i: int) -> np.ndarray:
                return a.reshape(n_k, sum(sizes), n_embd)[:, bounds[i]:bounds[i + 1]].reshape(-1, n_embd)

            qkv = t.map(lambda a: np.ascontiguousarray(np.concatenate([part(a, i) for i in range(3)])),
                        shape=(n_k * sum(sizes[:3]), n_embd))
            z = t.map(lambda a: np.ascontiguousarray(part(a, 3)), shape=(n_k * sizes[3], n_embd))
            return [(self.tensor_name(MODEL_TENSOR.ATTN_QKV, bid), qkv), (self.tensor_name(MODEL_TENSOR.ATTN_GATE, bid), z)]
        return super().tensors(name, t, bid)


class Qwen35(Qwen3Next):
    """Qwen3.5 dense and MoE: Qwen3-Next's conversion with the delta net's value heads
    reordered from grouped by key head to tiled (where there are more value heads than
    key heads) and M-RoPE's sections written (llama.cpp's default 11, 11, 10)."""

    hf_classes = None
    DEFAULT_MROPE_SECTIONS = [11, 11, 10, 0]

    def hparams(self, w: gguf.GGUFWriter) -> None:
        super().hparams(w)
        sections = self.rope.get("mrope_section")
        w.add_rope_dimension_sections((list(sections) + [0] * 4)[:4] if sections is not None
                                      else self.DEFAULT_MROPE_SECTIONS)

    def reordered(self, name: str, t: Tensor) -> Tensor:
        c = self.config
        n_k, n_v = c.get("linear_num_key_heads", 0), c.get("linear_num_value_heads", 0)
        if not (n_k and n_v and n_k != n_v):
            return t
        hk, hv, per_k = c["linear_key_head_dim"], c["linear_value_head_dim"], n_v // n_k

        def tiled(a: np.ndarray, axis: int, head_dim: int) -> np.ndarray:
            """[n_k, per_k, head_dim] along `axis` as [per_k, n_k, head_dim]."""
            axis %= a.ndim
            shape = a.shape[:axis] + (n_k, per_k, head_dim) + a.shape[axis + 1:]
            return np.ascontiguousarray(np.swapaxes(a.reshape(shape), axis, axis + 1).reshape(a.shape))

        if ".in_proj_qkv." in name:
            qk = 2 * n_k * hk
            return t.map(lambda a: np.concatenate([a[:qk], tiled(a[qk:], 0, hv)]))
        if ".in_proj_z." in name:
            return t.map(lambda a: tiled(a, 0, hv))
        if ".in_proj_b." in name or ".in_proj_a." in name:
            return t.map(lambda a: tiled(a, 0, 1))
        if ".A_log" in name or ".dt_bias" in name or ".dt_proj" in name:
            return t.map(lambda a: tiled(a, 0 if a.ndim == 1 else -1, 1))
        if ".conv1d" in name:
            squeezed = tuple(n for n in t.shape if n != 1)
            qk = 2 * n_k * hk
            return t.map(lambda a: np.concatenate([a.reshape(squeezed)[:qk], tiled(a.reshape(squeezed)[qk:], 0, hv)]),
                          shape=squeezed)
        if ".out_proj." in name:
            return t.map(lambda a: tiled(a, 1, hv))
        return t


# The RWKV "world" chat format (User: / Assistant: turns separated by blank lines, the last
# system message first, an assistant's reasoning before </think> dropped), for checkpoints
# whose files carry no chat template: what llama.cpp's converter writes from its own template
# file (tests/test_convert.py renders both on the same conversations).
RWKV_WORLD_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- if ns.system != '' -%}{{- 'System: ' + ns.system + '\\n\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- 'User: ' + m['content'] | trim + '\\n\\n' -}}"
    "{%- elif m['role'] == 'assistant' and m['content'] is not none -%}"
    "{{- 'Assistant: ' + m['content'].split('</think>')[-1] | trim + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt is not defined or add_generation_prompt -%}"
    "{{- 'Assistant:' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- ' <think>\\n</think>' -}}"
    "{%- elif enable_thinking is defined and enable_thinking is true -%}{{- ' <think>' -}}{%- endif -%}"
    "{%- endif -%}")
RWKV_WORLD_EOT = 261  # "\n\n" in the world vocabulary: llama.cpp's end of a turn


def rwkv_world_vocab(conv: Converter, w: gguf.GGUFWriter) -> None:
    """rwkv_vocab_v20230424.txt (`id repr(bytes) length` per line) after a <s> control token,
    each token stored as its escaped repr text (which llama.cpp's RWKV tokenizer unescapes);
    BOS = EOS = 0 and "\\n\\n" as EOT, as llama.cpp's converter sets them."""
    import ast

    path = conv.dir / "rwkv_vocab_v20230424.txt"
    if not path.is_file():
        raise ConvertError(f"{conv.dir}: no rwkv_vocab_v20230424.txt (the RWKV world vocabulary)")
    tokens, types = [b"<s>"], [gguf.TokenType.CONTROL]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(True), 1):
        parts = line.split(" ")
        try:
            token, length = ast.literal_eval(" ".join(parts[1:-1])), int(parts[-1])
        except (ValueError, SyntaxError, IndexError):
            raise ConvertError(f"{path.name} line {number}: not `id token length`") from None
        token = token.encode("utf-8") if isinstance(token, str) else token
        if not isinstance(token, bytes) or len(token) != length:
            raise ConvertError(f"{path.name} line {number}: the token is not {length} bytes")
        tokens.append(repr(token)[2:-1].encode("utf-8"))
        types.append(gguf.TokenType.NORMAL)
    n_vocab = conv.config.get("vocab_size", 65536)
    if len(tokens) > n_vocab:
        raise ConvertError(f"{path.name} has {len(tokens)} tokens, more than vocab_size {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("rwkv")
    w.add_token_list(tokens)
    w.add_token_types(types)
    sv = special_vocab(conv, generation_eos=False, load_merges=False)
    if sv.chat_template is None:
        sv.chat_template = RWKV_WORLD_TEMPLATE
    sv._set_special_token("eot", RWKV_WORLD_EOT)
    sv.special_token_ids["bos"] = sv.special_token_ids["eos"] = 0
    sv.add_to_gguf(w, quiet=True)


class Rwkv6(Converter):
    """RWKV-6 (Finch), the remote code's layout: LoRA matrices transposed, token-shift mixes
    squeezed and the five data-dependent ones fused into one tensor, the output and FFN value
    of layer i divided by 2^(i // rescale_every); the world vocabulary."""

    LERPS = (MODEL_TENSOR.TIME_MIX_LERP_W, MODEL_TENSOR.TIME_MIX_LERP_K, MODEL_TENSOR.TIME_MIX_LERP_V,
             MODEL_TENSOR.TIME_MIX_LERP_R, MODEL_TENSOR.TIME_MIX_LERP_G)  # fused in this order

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lerps: dict[int, dict[str, Tensor]] = {}

    def vocab(self, w: gguf.GGUFWriter) -> None:
        rwkv_world_vocab(self, w)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        hidden = c["hidden_size"]
        w.add_context_length(1048576)  # no position limit
        w.add_embedding_length(hidden)
        w.add_block_count(self.n_layers)
        w.add_layer_norm_eps(c["layer_norm_epsilon"])
        w.add_rescale_every_n_layers(c["rescale_every"])
        w.add_wkv_head_size(c["head_size"])
        w.add_time_mix_extra_dim(64 if hidden == 4096 else 32)
        w.add_time_decay_extra_dim(128 if hidden == 4096 else 64)
        n_ff = c.get("intermediate_size")
        w.add_feed_forward_length(n_ff if n_ff is not None else int((hidden * 3.5) // 32 * 32))
        w.add_head_count(0)

    def finish(self) -> None:
        if left := [n for group in self._lerps.values() for n in group]:
            raise ConvertError(f"token-shift mixes never completed: {left[0]} and {len(left) - 1} more")
        super().finish()

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        new_name = self.map_name(name)
        if not new_name.endswith((".weight", ".bias")):
            new_name += ".weight"
        if self.is_any(new_name, bid, MODEL_TENSOR.TIME_MIX_W1, MODEL_TENSOR.TIME_MIX_DECAY_W1,
                       MODEL_TENSOR.TIME_MIX_DECAY_W2):
            t = transposed(t)
        elif self.is_tensor(new_name, MODEL_TENSOR.TIME_MIX_W2, bid):
            t = t.map(lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)), shape=(t.shape[0], t.shape[2], t.shape[1]))
        if self.is_tensor(new_name, MODEL_TENSOR.TIME_MIX_DECAY, bid) or "lerp" in new_name:
            squeezed = tuple(n for n in t.shape if n != 1)
            t = t.map(lambda a: a.reshape(squeezed), shape=squeezed)
        every = self.config["rescale_every"]
        if every > 0 and self.is_any(new_name, bid, MODEL_TENSOR.TIME_MIX_OUTPUT, MODEL_TENSOR.CHANNEL_MIX_VALUE):
            t = t.map(lambda a: a / a.dtype.type(2 ** int(bid // every)))  # exact: a power of two
        if bid is not None and "time_mix_lerp" in new_name and "time_mix_lerp_x" not in new_name:
            group = self._lerps.setdefault(bid, {})
            group[new_name] = t
            names = [self.tensor_name(key, bid) for key in self.LERPS]
            if not all(n in group for n in names):
                return []
            parts = [group.pop(n) for n in names]
            del self._lerps[bid]
            fused = Tensor.stack(parts)  # [5, D]
            return [(self.tensor_name(MODEL_TENSOR.TIME_MIX_LERP_FUSED, bid),
                     fused.map(lambda a: a.reshape(len(parts), 1, 1, -1), shape=(len(parts), 1, 1, fused.shape[-1])))]
        return [(new_name, t)]


class Rwkv7(Converter):
    """RWKV-7 (Goose), RWKV7ForCausalLM's and fla-hub's layouts: names unified, LoRA matrices
    transposed (fla-hub's already are), token-shift interpolations fused, r_k flattened,
    layer 0's missing value-residual LoRA filled with its in-context-learning-rate one (as
    llama.cpp fills it: unused there); the world vocabulary."""

    LORAS = (MODEL_TENSOR.TIME_MIX_W1, MODEL_TENSOR.TIME_MIX_W2, MODEL_TENSOR.TIME_MIX_A1, MODEL_TENSOR.TIME_MIX_A2,
             MODEL_TENSOR.TIME_MIX_V1, MODEL_TENSOR.TIME_MIX_V2, MODEL_TENSOR.TIME_MIX_G1, MODEL_TENSOR.TIME_MIX_G2)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lerps: dict[int, dict[str, Tensor]] = {}
        self.lora_transposed = True

    def vocab(self, w: gguf.GGUFWriter) -> None:
        rwkv_world_vocab(self, w)

    def rename(self, name: str) -> str:
        name = name.replace("blocks", "layers").replace("ffn", "feed_forward")
        name = name.replace("self_attn", "attention").replace("attn", "attention").replace("time_mixer.", "")
        name = name.replace("feed_forward_norm", "ln2").replace("g_norm", "ln_x")
        return super().rename(name)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        hidden = c["hidden_size"]

        def rank(value: int | None, exponent: float, multiplier: float) -> int:
            return value if value is not None else max(1, round(hidden ** exponent * multiplier / 32)) * 32

        if all(k in c for k in ("head_size", "layer_norm_epsilon")):
            head_size, eps = c["head_size"], c["layer_norm_epsilon"]
        else:
            head_size, eps = c["head_dim"], c["norm_eps"]
        keys = ("lora_rank_decay", "lora_rank_iclr", "lora_rank_value_residual_mix", "lora_rank_gate")
        if not all(k in c for k in keys):  # fla-hub's names
            keys = ("decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim")
        missing = [k for k in keys if k not in c]
        if missing:
            raise ConvertError(f"config.json has no {missing[0]}")
        w.add_context_length(1048576)  # no position limit
        w.add_embedding_length(hidden)
        w.add_block_count(self.n_layers)
        w.add_layer_norm_eps(eps)
        w.add_wkv_head_size(head_size)
        w.add_decay_lora_rank(rank(c[keys[0]], 0.5, 1.8))
        w.add_iclr_lora_rank(rank(c[keys[1]], 0.5, 1.8))
        w.add_value_residual_mix_lora_rank(rank(c[keys[2]], 0.5, 1.3))
        w.add_gate_lora_rank(rank(c[keys[3]], 0.8, 0.6))
        n_ff = c.get("intermediate_size")
        w.add_feed_forward_length(n_ff if n_ff is not None else hidden * 4)
        w.add_head_count(0)

    def finish(self) -> None:
        if left := [n for group in self._lerps.values() for n in group]:
            raise ConvertError(f"token-shift interpolations never completed: {left[0]} and {len(left) - 1} more")
        super().finish()

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if "_lora.lora" in name:  # fla-hub's LoRA modules hold the matrices transposed already
            self.lora_transposed = False
        name = name.replace("_lora.lora.0.weight", "1.weight").replace("_lora.lora.2.weight", "2.weight")
        name = name.replace("_lora.lora.2.bias", "0.weight")
        if "attention.v" in name and bid == 0 and "value" not in self.map_name(name):
            return []  # some checkpoints hold an unused value-residual LoRA on layer 0
        lerps = ("r", "w", "k", "v", "a", "g") if self.config.get("wkv_has_gate", True) else ("r", "w", "k", "v", "a")
        if bid is not None and "attention.x_" in name:
            fused_name = self.tensor_name(MODEL_TENSOR.TIME_MIX_LERP_FUSED, bid)
            if "attention.x_x" in name:  # fused already
                return [(fused_name, t.map(lambda a: a.reshape(len(lerps), 1, 1, -1),
                                           shape=(len(lerps), 1, 1, math.prod(t.shape) // len(lerps))))]
            group = self._lerps.setdefault(bid, {})
            group[name] = t
            names = [f"model.layers.{bid}.attention.x_{x}" for x in lerps]
            if not all(n in group for n in names):
                return []
            parts = [group.pop(n) for n in names]
            del self._lerps[bid]
            return [(fused_name, Tensor.stack(parts))]
        squeezed = tuple(n for n in t.shape if n != 1)
        t = t.map(lambda a: a.reshape(squeezed), shape=squeezed)
        new_name = self.map_name(name)
        if not new_name.endswith((".weight", ".bias")):
            new_name += ".weight"
        if self.lora_transposed and self.is_any(new_name, bid, *self.LORAS):
            t = transposed(t)
        if "r_k" in new_name:
            t = t.map(lambda a: a.reshape(-1), shape=(math.prod(t.shape),))
        if bid == 0 and "time_mix_a" in new_name:  # layer 0's value-residual LoRA: a stand-in
            return [(new_name.replace("time_mix_a", "time_mix_v"), t), (new_name, t)]
        return [(new_name, t)]
