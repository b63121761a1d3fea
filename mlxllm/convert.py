"""Hugging Face checkpoints to GGUF: one driver on gguf-py, a small hook per architecture.

    mlxllm.convert("path/to/hf-model", "model.gguf", outtype="q8_0")
    mlxllm convert path/to/hf-model -o model.gguf --outtype q8_0

The driver reads `config.json`, finds the registered architecture whose `hf_architectures`
lists the checkpoint's class, and hands each safetensors tensor, one at a time, to that
architecture's `Converter` (the `Arch.convert` field), which renames it through gguf-py's
`TensorNameMap` and transforms what differs (Q/K row order, norm offsets, experts stacked).
It writes what llama.cpp's `convert_hf_to_gguf.py` writes for the same checkpoint: the same
tensors, types and bytes, and the same metadata (tests/test_convert.py compares them).

Reading: the safetensors header is parsed here and each tensor is a `numpy.memmap` slice,
so neither torch nor the `safetensors` package is needed, bfloat16 (which numpy lacks) is
widened exactly, and the peak memory is about the largest tensor being written (the
tensors are lazy until the writer asks for their bytes). The file is written under a
temporary name in the output's folder and renamed at the end.

Tokenizers: `tokenizer.model` (SentencePiece), or `tokenizer.json` byte-level BPE whose
pre-tokenizer is identified as llama.cpp identifies it (the hash of the ids of a fixed
text, which needs the `tokenizers` package: the `convert` extra) or, failing that, from the
pre-tokenizer's own description where it is plain GPT-2 splitting.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_TENSOR, LlamaFileType, TokenType
from gguf import GGMLQuantizationType as QT

log = logging.getLogger(__name__)

# outtype -> (general.file_type, the type of every tensor that may be quantized)
OUTTYPES = {
    "f32": (LlamaFileType.ALL_F32, QT.F32),
    "f16": (LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
}

# Tensors llama.cpp's converter and quantizer keep in F32 whatever the outtype (routers,
# positions, convolutions: small, and read as F32 by the runtime).
ALWAYS_F32 = (MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_GATE_INP_SHEXP, MODEL_TENSOR.POS_EMBD,
              MODEL_TENSOR.TOKEN_TYPES, MODEL_TENSOR.SSM_CONV1D, MODEL_TENSOR.SHORTCONV_CONV,
              MODEL_TENSOR.TIME_MIX_FIRST, MODEL_TENSOR.TIME_MIX_W1, MODEL_TENSOR.TIME_MIX_W2,
              MODEL_TENSOR.TIME_MIX_DECAY_W1, MODEL_TENSOR.TIME_MIX_DECAY_W2, MODEL_TENSOR.TIME_MIX_LERP_FUSED)

# Checkpoint tensors no GGUF holds (buffers transformers saves along).
IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message is one line."""


# --------------------------------------------------------------------------------------
# lazy tensors


@dataclass(frozen=True)
class Tensor:
    """A tensor not read yet: its shape and dtype, and how to produce it. Hooks transform
    it with `map`, `stack` and `split`; nothing is read until the writer asks."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]
    # set when the checkpoint holds the tensor quantized already (gpt-oss's MXFP4 experts):
    # `load` gives that type's bytes, `shape` is in elements, and it is written as it is
    # whatever the outtype (as llama.cpp's converter writes it)
    qtype: QT | None = None

    def map(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...] | None = None,
            dtype: Any = None) -> Tensor:
        return Tensor(tuple(self.shape if shape is None else shape),
                      np.dtype(self.dtype if dtype is None else dtype), lambda: fn(self.load()))

    @staticmethod
    def stack(tensors: list[Tensor]) -> Tensor:
        first = tensors[0]
        if any(t.shape != first.shape for t in tensors):
            raise ConvertError(f"cannot stack tensors of shapes {sorted({t.shape for t in tensors})}")
        dtype = np.result_type(*(t.dtype for t in tensors))
        return Tensor((len(tensors), *first.shape), dtype, lambda: np.stack([t.load() for t in tensors]))

    def split(self, sizes: list[int], axis: int = 0) -> list[Tensor]:
        if sum(sizes) != self.shape[axis]:
            raise ConvertError(f"cannot split axis {axis} of {self.shape} into {sizes}")
        out, start = [], 0
        for size in sizes:
            index = (slice(None),) * (axis % len(self.shape)) + (slice(start, start + size),)
            shape = self.shape[:axis % len(self.shape)] + (size,) + self.shape[axis % len(self.shape) + 1:]
            out.append(self.map(lambda a, index=index: np.ascontiguousarray(a[index]), shape=shape))
            start += size
        return out


# --------------------------------------------------------------------------------------
# safetensors


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def _widen_bf16(a: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) to float32, exactly: they are float32's top half."""
    wide = a.astype(np.uint32)
    wide <<= 16  # in place: one float32-sized copy at the peak
    return wide.view(np.float32)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of one safetensors file, lazily, by name; raises
    ConvertError naming the file when the header or an offset is broken."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise TypeError("its header is not a JSON object")
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path.name}: not a readable safetensors file ({e})") from None
    base = 8 + n
    tensors: dict[str, Tensor] = {}
    for name, info in sorted(header.items()):  # by name, as safetensors lists them
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path.name}: tensor {name} has a malformed header entry (corrupt shard)") from None
        if dtype_name not in _ST_DTYPES:
            raise ConvertError(f"{path.name}: tensor {name} has dtype {dtype_name}, which the converter does not read")
        raw = np.dtype(_ST_DTYPES[dtype_name])
        if end - begin != math.prod(shape) * raw.itemsize or base + end > size:
            raise ConvertError(f"{path.name}: tensor {name} lies outside the file or has the wrong size (truncated or corrupt shard)")
        bf16 = dtype_name == "BF16"

        def load(path=path, offset=base + begin, raw=raw, shape=shape, bf16=bf16) -> np.ndarray:
            a = np.memmap(path, dtype=raw, mode="r", offset=offset, shape=shape) if math.prod(shape) else np.zeros(shape, raw)
            return _widen_bf16(a) if bf16 else np.array(a)

        # llama.cpp computes in float16 or float32 and widens any other dtype to float32 first;
        # bytes (U8) stay bytes: they are packed quantized data (MXFP4 blocks and scales),
        # which hooks repack without a float32 copy four times their size
        dtype = np.dtype(np.float32) if bf16 or (raw.kind != "f" and raw != np.uint8) or raw == np.float64 else raw
        loader = load if dtype == raw or bf16 else (lambda load=load, dtype=dtype: load().astype(dtype))
        tensors[name] = Tensor(shape, dtype, loader)
    return tensors


def checkpoint_tensors(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint, shard by shard (sorted by file name, as llama.cpp)."""
    index_path = hf_dir / "model.safetensors.index.json"
    shards = sorted(p.name for p in hf_dir.glob("model*.safetensors"))
    expected: dict[str, str] | None = None
    if index_path.is_file():
        try:
            expected = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConvertError(f"{index_path.name}: no readable weight_map ({e})") from None
        missing = sorted(set(expected.values()) - set(shards))
        if missing:
            raise ConvertError(f"missing shard {missing[0]} (listed in {index_path.name}){f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
        shards = sorted(set(expected.values()))
    if not shards:
        raise ConvertError(f"{hf_dir}: no model*.safetensors file (only safetensors checkpoints are converted)")
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        for name, t in read_safetensors(hf_dir / shard).items():
            if expected is not None and expected.get(name) != shard:
                raise ConvertError(f"{shard}: tensor {name} is not listed for this shard in {index_path.name}")
            tensors[name] = t
    if expected is not None and len(tensors) != len(expected):
        lost = sorted(set(expected) - set(tensors))
        raise ConvertError(f"tensor {lost[0]} listed in {index_path.name} is in no shard (corrupt shard?)")
    return tensors


# --------------------------------------------------------------------------------------
# the per-architecture hook


class Converter:
    """The conversion of one architecture: the generic parts here, what differs in a
    subclass registered as the `Arch.convert` of the runtime it feeds.

    The driver calls, in order: `extra_tensors()`, `tensors(name, t, bid)` for each
    checkpoint tensor (after `rename`) that `skip` keeps (bid: its layer number), `finish()`, then
    `hparams(writer)` and `vocab(writer)`. Tensors are `Tensor`s: transforms stay lazy.
    """

    # the Hugging Face classes this hook converts, where it serves only some of its
    # architecture's hf_architectures (None: all of them)
    hf_classes: tuple[str, ...] | None = None
    # hooks for other Hugging Face classes of the same architecture that convert differently
    # (bert's DistilBERT and RoBERTa): the driver picks the one whose hf_classes names the
    # checkpoint's class, else this hook
    variants: tuple[type[Converter], ...] = ()

    def __init__(self, hf_dir: Path, config: dict, arch_name: str) -> None:
        self.dir = hf_dir
        self.raw_config = config
        # multimodal checkpoints keep the language model's settings in text_config
        self.config = {**config, **config.get("text_config", {})}
        self.arch_name = arch_name
        self.gguf_arch = _model_arch(arch_name)
        self.n_layers = self.find("n_layers", "num_hidden_layers", "n_layer", "num_layers")
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)
        self.rope = self._rope_parameters()
        self._experts: dict[tuple[int, str], dict[str, Tensor]] = {}

    # ---- config

    def find(self, *keys: str, default: Any = ...) -> Any:
        for key in keys:
            if key in self.config:
                return self.config[key]
        if default is ...:
            raise ConvertError(f"config.json has none of {', '.join(keys)}")
        return default

    def _rope_parameters(self) -> dict:
        """transformers 5's `rope_parameters`, or the older `rope_scaling` + `rope_theta`."""
        rope = dict(self.config.get("rope_parameters") or self.config.get("rope_scaling") or {})
        if "full_attention" in rope or "sliding_attention" in rope:
            return rope
        extra = {
            "rope_theta": self.find("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                                    "rotary_emb_base", default=None),
            "rope_type": rope.get("type"),
            "partial_rotary_factor": self.find("partial_rotary_factor", "rope_pct", "rope_percent", default=None),
            "original_max_position_embeddings": self.find("original_max_position_embeddings", default=None),
        }
        local = self.find("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                          "rope_local_base_freq", default=None)
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        for k, v in extra.items():
            if v is not None:
                rope.setdefault(k, v)
        return rope

    # ---- names

    def tensor_name(self, key: MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
        return gguf.TENSOR_NAMES[key].format(bid=bid) + suffix

    def is_tensor(self, name: str, key: MODEL_TENSOR, bid: int | None = None) -> bool:
        if key not in gguf.MODEL_TENSORS[self.gguf_arch]:
            return False
        pattern = gguf.TENSOR_NAMES[key]
        if ("{bid}" in pattern) != (bid is not None):
            return False
        pattern = pattern.format(bid=bid)
        return name == pattern or name.rsplit(".", 1)[0] == pattern  # with or without .weight/.bias

    def is_any(self, name: str, bid: int | None, *keys: MODEL_TENSOR) -> bool:
        return any(self.is_tensor(name, key, bid) for key in keys)

    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConvertError(f"tensor {name} has no GGUF name for {self.arch_name}")
        return new

    # ---- hooks

    def rename(self, name: str) -> str:
        """A checkpoint name as TensorNameMap knows it: multimodal wrappers' language_model.
        prefix dropped, DeepSeek-style e_score_correction_bias as a bias."""
        return name.replace("language_model.", "").replace("e_score_correction_bias", "e_score_correction.bias")

    def skip(self, name: str) -> bool:
        return name.endswith(IGNORED_SUFFIXES)

    def tensors(self, name: str, t: Tensor, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        """The GGUF tensors made from one checkpoint tensor (none while it is buffered)."""
        return [(self.map_name(name), t)]

    def extra_tensors(self) -> Iterable[tuple[str, Tensor]]:
        return ()

    def finish(self) -> None:
        left = sorted(n for group in self._experts.values() for n in group)
        if left:
            raise ConvertError(f"experts never completed: {left[0]} and {len(left) - 1} more (missing expert tensors?)")

    def file_type(self, file_type: LlamaFileType) -> LlamaFileType:
        """general.file_type for the outtype's (a checkpoint quantized already may say otherwise)."""
        return file_type

    def keep_f32(self, name: str, bid: int | None) -> bool:
        """Whether a GGUF tensor stays F32 whatever the outtype."""
        return any(self.is_tensor(name, key, bid) for key in ALWAYS_F32)

    def stack_experts(self, name: str, t: Tensor, bid: int, experts: int, pattern: str,
                      stacked: str) -> Iterable[tuple[str, Tensor]]:
        """Buffer per-expert matrices `pattern` (a regex with groups `xid` and `w`) until a
        layer's set is complete, then emit one [n_expert, ...] tensor per `w`, renamed
        through `stacked` (formatted with bid and w) and the tensor map."""
        m = re.search(pattern, name)
        if m is None:
            raise ConvertError(f"tensor {name} is not an expert matrix the {self.arch_name} converter knows")
        group = self._experts.setdefault((bid, m["w"]), {})
        group[m["xid"]] = t
        if len(group) < experts:
            return []
        del self._experts[(bid, m["w"])]
        try:
            ordered = [group[str(x)] for x in range(experts)]
        except KeyError as e:
            raise ConvertError(f"layer {bid}: expert {e} of {m['w']} is missing") from None
        # renamed as is: the hook's own transforms were applied to each expert already
        return Converter.tensors(self, stacked.format(bid=bid, w=m["w"]), Tensor.stack(ordered), bid)

    def hparams(self, w: gguf.GGUFWriter) -> None:
        """The hyperparameters every decoder shares (llama.cpp's TextModel keys)."""
        c = self.find
        w.add_block_count(self.n_layers)
        for add, keys in ((w.add_context_length, ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                                  "max_sequence_length", "model_max_length")),
                          (w.add_embedding_length, ("hidden_size", "n_embd", "dim")),
                          (w.add_feed_forward_length, ("prefix_dense_intermediate_size", "dense_intermediate_size",
                                                       "intermediate_size", "n_inner", "hidden_dim")),
                          (w.add_head_count, ("num_attention_heads", "n_head", "n_heads")),
                          (w.add_head_count_kv, ("num_key_value_heads", "n_kv_heads"))):
            if (value := c(*keys, default=None)) is not None:
                add(value)
        if self.config.get("is_causal") is False:
            w.add_causal_attention(False)
        self._rope_hparams(w)
        for add, keys in ((w.add_layer_norm_rms_eps, ("rms_norm_eps", "norm_eps")),
                          (w.add_layer_norm_eps, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")),
                          (w.add_expert_count, ("num_local_experts", "num_experts", "n_routed_experts")),
                          (w.add_expert_used_count, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))):
            if (value := c(*keys, default=None)) is not None:
                add(value)
        if (groups := self.config.get("n_group")) is not None:
            w.add_expert_group_count(groups)
        if (used := self.config.get("topk_group")) is not None:
            w.add_expert_group_used_count(used)
        score = c("score_function", "scoring_func", "score_func", "moe_router_activation",
                  "moe_router_activation_func", "expert_selection_fn", default=None)
        if score is not None:
            gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
            if score not in gating:
                raise ConvertError(f"expert gating function {score!r} is not supported")
            w.add_expert_gating_func(gating[score])
        if (head_dim := self.config.get("head_dim")) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)

    @staticmethod
    def forget(w: gguf.GGUFWriter, *keys: str) -> None:
        """Drop keys written already (gguf.Keys names), for a hook to write its own values."""
        for key in keys:
            w.kv_data[0].pop(key.format(arch=w.arch), None)

    def _rope_hparams(self, w: gguf.GGUFWriter) -> None:
        rope = self.rope.get("full_attention", self.rope)
        kind, factor = rope.get("rope_type"), rope.get("factor")
        if kind == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif kind == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            for add, keys in ((w.add_rope_scaling_yarn_ext_factor, ("extrapolation_factor",)),
                              (w.add_rope_scaling_yarn_attn_factor, ("attention_factor", "attn_factor")),
                              (w.add_rope_scaling_yarn_beta_fast, ("beta_fast",)),
                              (w.add_rope_scaling_yarn_beta_slow, ("beta_slow",))):
                value = next((rope[k] for k in keys if rope.get(k) is not None), None)
                if value is not None:
                    add(value)
        elif kind in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        elif kind not in (None, "default", "llama3", "dynamic"):
            raise ConvertError(f"rope type {kind!r} is not supported by the converter")
        if (theta := rope.get("rope_theta")) is not None:
            w.add_rope_freq_base(theta)
        if (local := self.rope.get("sliding_attention", {}).get("rope_theta")) is not None:
            w.add_rope_freq_base_swa(local)

    def vocab(self, w: gguf.GGUFWriter) -> None:
        """SentencePiece when the checkpoint has tokenizer.model, else tokenizer.json BPE."""
        if (self.dir / "tokenizer.model").is_file():
            sentencepiece_vocab(self, w)
        else:
            bpe_vocab(self, w)


def _model_arch(name: str) -> gguf.MODEL_ARCH:
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ConvertError(f"gguf-py knows no architecture {name!r}")


# --------------------------------------------------------------------------------------
# tokenizers

# Tokenizer class names llama.cpp's converter treats as control tokens although their
# tokenizer does not mark them special (command-r, deepseek-coder, gemma).
_LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def looks_special(token: str) -> bool:
    return (token in _LOOKS_SPECIAL or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


# The text whose token ids identify a BPE pre-tokenizer (llama.cpp's chktxt: PR 6920).
PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")


def pre_tokenizer_hash(tokenizer_json: Path) -> str | None:
    """sha256 of the ids of PRE_CHECK_TEXT, or None when `tokenizers` is not installed."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(PRE_CHECK_TEXT).ids
    return sha256(str(ids).encode()).hexdigest()


def _plain_gpt2(pre: dict | None) -> bool:
    """GPT-2's own splitting: one ByteLevel pre-tokenizer with its regex, no prefix space."""
    if pre and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def identify_pre_tokenizer(tokenizer_json: Path, spec: dict) -> str:
    from ._bpe_pre import BPE_PRE_HASHES

    digest = pre_tokenizer_hash(tokenizer_json)
    if digest is not None and digest in BPE_PRE_HASHES:
        return BPE_PRE_HASHES[digest]
    pre = spec.get("pre_tokenizer")
    if _plain_gpt2(pre):
        return "gpt-2"
    described = json.dumps(pre, separators=(",", ":"))
    described = described if len(described) <= 200 else described[:197] + "..."
    hint = "" if digest is not None else " (install mlxllm[convert] to identify it by its ids, as llama.cpp does)"
    raise ConvertError(f"unknown BPE pre-tokenizer {described}{hint}")


def bpe_vocab(conv: Converter, w: gguf.GGUFWriter) -> None:
    """tokenizer.json byte-level BPE: ids, added tokens (control when special), merges."""
    path = conv.dir / "tokenizer.json"
    if not path.is_file():
        raise ConvertError(f"{conv.dir}: no tokenizer.model or tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") + (" with byte fallback" if model.get("byte_fallback") else "")
        raise ConvertError(f"tokenizer.json model {kind} is not supported (byte-level BPE only)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n_vocab = conv.config.get("vocab_size", len(vocab))
    if max(vocab.values()) >= n_vocab:
        raise ConvertError(f"tokenizer.json has id {max(vocab.values())} but vocab_size is {n_vocab}")
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif token in added:
            if added[token].get("special") or looks_special(token):
                types.append(TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # user-defined tokens are stored pre-normalized
                types.append(TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(identify_pre_tokenizer(path, spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special_vocab(conv, load_merges=True).add_to_gguf(w, quiet=True)
    normalizer_flags(conv, w)


def sentencepiece_vocab(conv: Converter, w: gguf.GGUFWriter, literal_added: bool = False) -> None:
    """tokenizer.model: pieces, scores and kinds, then added tokens over them.

    literal_added: Phi-3's reading of added tokens (tokenizer_config.json's, then
    tokenizer.json's): control exactly when marked special, text kept as written."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(conv.dir / "tokenizer.model"))
    n_vocab = conv.find("vocab_size_per_layer_input", "vocab_size", default=None) or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [TokenType.UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i] = sp.IdToPiece(i).encode()
        scores[i] = sp.GetScore(i)
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                    else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                    else TokenType.NORMAL)
    added_path = conv.dir / "added_tokens.json"
    if added_path.is_file():
        for content, i in json.loads(added_path.read_text(encoding="utf-8")).items():
            if i < n_vocab:
                tokens[i], scores[i], types[i] = content.encode(), -1000.0, TokenType.USER_DEFINED
    config_path = conv.dir / "tokenizer_config.json"
    if config_path.is_file():
        decoder = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for key, t in decoder.items():
            i, content = int(key), t["content"]
            if i >= n_vocab:
                continue
            if literal_added:
                types[i] = TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED
            elif t.get("special") or looks_special(content):
                types[i] = TokenType.CONTROL
            else:
                content = content.replace("\u2581", " ")
                types[i] = TokenType.USER_DEFINED
            tokens[i], scores[i] = content.encode(), -1000.0
    json_path = conv.dir / "tokenizer.json"
    if literal_added and json_path.is_file():
        for t in json.loads(json_path.read_text(encoding="utf-8")).get("added_tokens", []):
            i = int(t["id"])
            tokens[i], scores[i] = t["content"].encode(), -1000.0
            types[i] = TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special_vocab(conv, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    normalizer_flags(conv, w)


def wordpiece_vocab(conv: Converter, w: gguf.GGUFWriter) -> None:
    """WordPiece (BERT): tokenizer.json's vocabulary, or vocab.txt's lines, in llama.cpp's
    phantom-space form (word starts get U+2581, continuations lose their ##)."""
    json_path, txt_path = conv.dir / "tokenizer.json", conv.dir / "vocab.txt"
    added: dict[str, dict] = {}
    if json_path.is_file():
        spec = json.loads(json_path.read_text(encoding="utf-8"))
        if spec.get("model", {}).get("type") != "WordPiece":
            raise ConvertError(f"tokenizer.json model {spec.get('model', {}).get('type')} is not WordPiece")
        vocab = dict(spec["model"]["vocab"])
        added = {t["content"]: t for t in spec.get("added_tokens", [])}
        for content, t in added.items():
            vocab[content] = t["id"]
        digest = pre_tokenizer_hash(json_path)
        from ._bpe_pre import BPE_PRE_HASHES

        pre = BPE_PRE_HASHES.get(digest, "default")  # llama.cpp's WordPiece tokenizer ignores it
    elif txt_path.is_file():
        vocab = {line.rstrip("\n"): i for i, line in enumerate(txt_path.read_text(encoding="utf-8").splitlines(True))}
        config_path = conv.dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        specials = {config.get(f"{k}_token", d) for k, d in (("unk", "[UNK]"), ("sep", "[SEP]"), ("pad", "[PAD]"),
                                                              ("cls", "[CLS]"), ("mask", "[MASK]"))}
        added = {t: {"content": t, "special": True} for t in specials if t in vocab}
        pre = "default"
    else:
        raise ConvertError(f"{conv.dir}: no tokenizer.json or vocab.txt for a WordPiece vocabulary")
    n_vocab = conv.config.get("vocab_size", len(vocab))
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        control = token in added and (added[token].get("special") or looks_special(token))
        types.append(TokenType.CONTROL if control else TokenType.USER_DEFINED if token in added else TokenType.NORMAL)
        tokens.append(token if control else token[2:] if token.startswith("##") else "\u2581" + token)
    w.add_token_type_count(conv.config.get("type_vocab_size", 1))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special_vocab(conv, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    normalizer_flags(conv, w)


# gguf-py names these keys from release 0.20; mlxllm's tokenizer reads them by these names
NORMALIZER_LOWERCASE = getattr(gguf.Keys.Tokenizer, "NORMALIZER_LOWERCASE", "tokenizer.ggml.normalizer.lowercase")
NORMALIZER_STRIP_ACCENTS = getattr(gguf.Keys.Tokenizer, "NORMALIZER_STRIP_ACCENTS",
                                   "tokenizer.ggml.normalizer.strip_accents")


def normalizer_flags(conv: Converter, w: gguf.GGUFWriter) -> None:
    """Lowercasing and accent stripping from tokenizer.json's normalizer, as llama.cpp's
    gguf-py reads them (Lowercase, StripAccents, BertNormalizer, nested in Sequence)."""
    path = conv.dir / "tokenizer.json"
    if not path.is_file():
        return
    flags: dict[str, bool | None] = {}

    def visit(n: dict | None) -> None:
        kind = (n or {}).get("type")
        if kind == "Lowercase":
            flags["lowercase"] = True
        elif kind == "StripAccents":
            flags["strip_accents"] = True
        elif kind == "BertNormalizer":
            for key in ("lowercase", "strip_accents"):
                if key in n:
                    flags[key] = n[key]
        elif kind == "Sequence":
            for inner in n.get("normalizers", []):
                visit(inner)

    visit(json.loads(path.read_text(encoding="utf-8")).get("normalizer"))
    for key, name in ((NORMALIZER_LOWERCASE, "lowercase"), (NORMALIZER_STRIP_ACCENTS, "strip_accents")):
        if flags.get(name) is not None:
            w.add_bool(key, bool(flags[name]))


def special_vocab(conv: Converter, generation_eos: bool = True, **kw: Any) -> gguf.SpecialVocab:
    """gguf-py's reading of special ids, add_bos/add_eos, merges and the chat template;
    generation_config.json's EOS id where nothing else names one (unless generation_eos is
    false: converters of llama.cpp that build their SpecialVocab themselves do not look)."""
    # only the kinds this gguf-py can write (it has no key for e.g. a CLS id)
    kw.setdefault("special_token_types", [t for t in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
                                          if hasattr(gguf.GGUFWriter, f"add_{t}_token_id")])
    sv = gguf.SpecialVocab(conv.dir, **kw)
    gen_path = conv.dir / "generation_config.json"
    if generation_eos and "eos" not in sv.special_token_ids and gen_path.is_file():
        eos = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            sv._set_special_token("eos", eos)
    return sv


# --------------------------------------------------------------------------------------
# the driver


def find_converter(config: dict) -> tuple[str, type[Converter]]:
    """The registered architecture serving config.json's `architectures`, and its hook."""
    from .registry import REGISTRY

    text = config.get("text_config", {})
    names = [*(text.get("architectures") or []), *(config.get("architectures") or [])]
    if not names:
        raise ConvertError("config.json names no architectures")
    for entry in REGISTRY.all():
        arch = entry.arch
        if arch is None or not any(n in arch.hf_architectures for n in names):
            continue
        hook = arch.convert
        if hook is not None:
            hook = next((v for v in hook.variants if any(n in v.hf_classes for n in names)), hook)
        classes = getattr(hook, "hf_classes", None)
        if hook is None or (classes is not None and not any(n in classes for n in names)):
            raise ConvertError(f"{names[0]} runs as {arch.name!r} but has no converter yet")
        return arch.name, hook
    raise ConvertError(f"unsupported architecture {names[0]}: no registered architecture converts it")


def _block_id(name: str) -> int | None:
    return next((int(part) for part in name.split(".") if part.isdecimal()), None)


def _plan(conv: Converter, tensors: dict[str, Tensor]) -> Iterator[tuple[str, Tensor, bool]]:
    """(GGUF name, tensor, may be quantized) for every tensor of the output, in order."""
    seen: set[str] = set()

    def checked(items: Iterable[tuple[str, Tensor]], bid: int | None) -> Iterator[tuple[str, Tensor, bool]]:
        for new_name, t in items:
            if new_name in seen:
                raise ConvertError(f"two checkpoint tensors map to {new_name}")
            seen.add(new_name)
            bid_out = _block_id(new_name)
            f32 = (len(t.shape) <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight")
                   or conv.keep_f32(new_name, bid_out))
            yield new_name, t, not f32

    yield from checked(conv.extra_tensors(), None)
    for name, t in tensors.items():
        name = conv.rename(name)
        if conv.skip(name):
            continue
        bid = _block_id(name)
        yield from checked(conv.tensors(name, t, bid), bid)
    conv.finish()


def _lazy_output(t: Tensor, qtype: QT) -> tuple[gguf.LazyNumpyTensor, QT]:
    """What the writer holds: a gguf-py lazy array whose bytes are made at write time."""
    if qtype in (QT.F32, QT.F16) and t.qtype is None:
        dtype, shape = np.dtype(np.float32 if qtype == QT.F32 else np.float16), t.shape
    else:
        dtype, shape = np.dtype(np.uint8), gguf.quant_shape_to_byte_shape(t.shape, qtype)

    def make() -> np.ndarray:
        if t.qtype is not None:
            data = t.load()
            if data.dtype != np.uint8 or data.shape != tuple(shape):
                raise ConvertError(f"pre-quantized {t.qtype.name} tensor has {data.dtype} {data.shape}, not uint8 {tuple(shape)}")
            return data
        return gguf.quants.quantize(t.load(), qtype)

    meta = gguf.LazyNumpyTensor.meta_with_dtype_and_shape(dtype, tuple(shape))
    return gguf.LazyNumpyTensor(meta=meta, args=(), func=make), qtype


def _choose_type(t: Tensor, quantizable: bool, outtype: QT) -> QT:
    if not quantizable or outtype == QT.F32:
        return QT.F32
    if outtype in (QT.F16, QT.BF16):
        return outtype
    block = gguf.GGML_QUANT_SIZES[outtype][0]
    # as llama.cpp's converter: rows that are not whole blocks fall back to F16
    return outtype if t.shape[-1] % block == 0 else QT.F16


def convert(hf_dir: str | os.PathLike, out: str | os.PathLike | None = None, outtype: str = "f16",
            progress: bool = True) -> Path:
    """Convert a Hugging Face checkpoint folder to GGUF; returns the written path
    (default: `<folder name>-<outtype>.gguf` beside the folder)."""
    hf_dir = Path(hf_dir)
    if outtype not in OUTTYPES:
        raise ConvertError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConvertError(f"{config_path}: not valid JSON ({e})") from None
    arch_name, hook = find_converter(config)
    file_type, qtype = OUTTYPES[outtype]
    out = Path(out) if out is not None else hf_dir.resolve().parent / f"{hf_dir.resolve().name}-{outtype}.gguf"

    try:
        conv = hook(hf_dir, config, arch_name)
        file_type = conv.file_type(file_type)
        # (a hook may pick another architecture of the same Hugging Face class: Nemotron-H's MoE)
        writer = gguf.GGUFWriter(path=None, arch=conv.arch_name)
        for name, t, quantizable in _plan(conv, checkpoint_tensors(hf_dir)):
            chosen = t.qtype if t.qtype is not None else _choose_type(t, quantizable, qtype)
            data, raw = _lazy_output(t, chosen)
            writer.add_tensor(name, data, raw_shape=None, raw_dtype=raw)

        _general_metadata(writer, hf_dir, file_type)
        conv.hparams(writer)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        conv.vocab(writer)
    except KeyError as e:  # a hook reads config[key] where llama.cpp's converter requires it
        key = e.args[0] if e.args else None
        if not isinstance(key, str) or key in config:
            raise
        raise ConvertError(f"{config_path}: no {key!r}, which the {arch_name} converter needs") from None

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _general_metadata(w: gguf.GGUFWriter, hf_dir: Path, file_type: LlamaFileType) -> None:
    """general.*: gguf-py's model-card heuristics (name, size label, ...), as llama.cpp."""
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, hf_dir, None, total)
    if meta.name is None:
        meta.name = hf_dir.resolve().name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
