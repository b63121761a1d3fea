"""What a GGUF file claims, checked before anything is built from it.

A model file is untrusted input: its metadata sizes every module the loader builds and
every kernel call the forward pass makes. llama.cpp refuses a bad size by comparing each
tensor it creates with the file's; mlxllm does the same, in three steps every architecture
passes through (`loader.load_model`):

1. `check_metadata(gf)`: the architecture's numbers on their own and against the tensors
   the file holds: integers within MLX's int32 sizes, dimensions no larger than the largest
   tensor dimension, block_count no more than the blocks present, a sane context length,
   rope dimensions within a head, finite floats, a vocabulary no larger than the embedding.
2. `check_args(args)`: the hyperparameters the architecture read (a dataclass), generically:
   sizes positive where a layer divides by them, rope within the head.
3. the loader compares each tensor's shape with the one the built (lazy, unallocated)
   model expects before any tensor is read.

Each failure is a `HyperparameterError`, a one-line ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from gguf import Keys

MAX_SIZE = 2**31 - 1  # MLX array dimensions are int32
MAX_CONTEXT = 1 << 27  # 134M positions: 10x the longest context any model states (Llama 4 Scout: 10M)
MAX_QUOTED = 120  # characters of a file's string quoted in an error
MAX_MESSAGE = 1000  # characters of any error about a file


class HyperparameterError(ValueError):
    """A hyperparameter the model cannot be built from; the message names the key."""


def quote(value: Any, limit: int = MAX_QUOTED) -> str:
    """repr(value), cut to `limit` characters: a corrupt length field can make a key or a
    tensor name megabytes long, and it must not end up whole in an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """An error text as one line of at most `limit` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Keys whose values are tensor dimensions (or parts of one): none exceeds the largest
# dimension of any tensor in the file. Not feed_forward_length: a MoE file carries its dense
# sibling's width there with no tensor of it (Qwen3-30B-A3B: 6144, experts 768), and a
# dense FFN's tensors are checked against it anyway.
DIMENSION_KEYS = (
    Keys.LLM.VOCAB_SIZE, Keys.LLM.EMBEDDING_LENGTH, Keys.LLM.EMBEDDING_LENGTH_OUT, Keys.LLM.FEATURES_LENGTH,
    Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH,
    Keys.LLM.EXPERT_COUNT, Keys.LLM.EXPERT_USED_COUNT, Keys.LLM.EXPERT_SHARED_COUNT, Keys.LLM.EXPERT_GROUP_COUNT,
    Keys.LLM.EXPERT_GROUP_USED_COUNT, Keys.LLM.MOE_LATENT_SIZE,
    Keys.Attention.HEAD_COUNT, Keys.Attention.HEAD_COUNT_KV, Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH,
    Keys.Attention.KEY_LENGTH_MLA, Keys.Attention.VALUE_LENGTH_MLA, Keys.Attention.KEY_LENGTH_SWA,
    Keys.Attention.VALUE_LENGTH_SWA, Keys.Attention.Q_LORA_RANK, Keys.Attention.KV_LORA_RANK,
    Keys.Attention.GROUPNORM_GROUPS, Keys.Attention.REL_BUCKETS_COUNT,
    Keys.Rope.DIMENSION_COUNT, Keys.Rope.DIMENSION_COUNT_SWA,
    Keys.SSM.CONV_KERNEL, Keys.SSM.INNER_SIZE, Keys.SSM.STATE_SIZE, Keys.SSM.TIME_STEP_RANK, Keys.SSM.GROUP_COUNT,
)
# Keys a layer divides by (a zero-width linear layer, a zero-size state): positive where present.
POSITIVE_KEYS = (Keys.LLM.EMBEDDING_LENGTH, Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH,
                 Keys.Attention.KEY_LENGTH_MLA, Keys.Attention.VALUE_LENGTH_MLA,
                 Keys.Attention.KEY_LENGTH_SWA, Keys.Attention.VALUE_LENGTH_SWA,
                 Keys.SSM.CONV_KERNEL, Keys.SSM.INNER_SIZE, Keys.SSM.STATE_SIZE, Keys.SSM.TIME_STEP_RANK,
                 Keys.Rope.SCALING_ORIG_CTX_LEN)
# Keys that are layer counts: no more than the file's blocks.
LAYER_KEYS = (Keys.LLM.LEADING_DENSE_BLOCK_COUNT, Keys.LLM.NEXTN_PREDICT_LAYERS, Keys.Attention.SHARED_KV_LAYERS)
# Keys a layer divides by or takes a logarithm of: zero or less is refused where present.
POSITIVE_FLOATS = (Keys.Rope.FREQ_BASE, Keys.Rope.FREQ_BASE_SWA, Keys.Rope.SCALING_YARN_BETA_FAST,
                   Keys.Rope.SCALING_YARN_BETA_SLOW)
NONZERO_FLOATS = (Keys.LLM.LOGIT_SCALE,)


def _ints(value: Any) -> list[int] | None:
    """The integers of a scalar or an integer array, else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return [int(value)]
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return [int(v) for v in value]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return None


def _floats(value: Any) -> list[float] | None:
    if isinstance(value, float):
        return [value]
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return [float(v) for v in value]
    return None


def file_blocks(gf: Any) -> int:
    """How many distinct `blk.N` layers the file holds tensors for."""
    return len({name.split(".")[1] for name in gf.tensors if name.startswith("blk.")})


def check_metadata(gf: Any) -> None:
    """The architecture's metadata, on its own and against the file's tensors."""
    m, arch = gf.metadata, gf.architecture
    prefix = arch + "."
    max_dim = max((max(t.shape) for t in gf.tensors.values() if t.shape), default=0)
    key_of = {k.format(arch=arch): k for k in DIMENSION_KEYS + LAYER_KEYS}
    for key, value in m.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        ints = _ints(value)
        if ints is not None:
            for v in ints:
                if not 0 <= v <= MAX_SIZE:
                    raise HyperparameterError(f"{name} = {v} is out of range (0 to {MAX_SIZE})")
                if key in key_of and key_of[key] in DIMENSION_KEYS and v > max_dim:
                    raise HyperparameterError(f"{name} = {v} is larger than any tensor dimension in the file ({max_dim})")
            continue
        floats = _floats(value)
        if floats is not None:
            for v in floats:
                if not math.isfinite(v):
                    raise HyperparameterError(f"{name} = {v} is not a finite number")
    blocks = file_blocks(gf)
    n_layers = m.get(Keys.LLM.BLOCK_COUNT)
    if n_layers is not None:
        if _ints(n_layers) is None or len(_ints(n_layers)) != 1:
            raise HyperparameterError(f"block_count {quote(n_layers)} is not an integer")
        if not 0 < n_layers <= max(blocks, 1):
            raise HyperparameterError(f"block_count = {n_layers} does not match the {blocks} blocks the file holds")
    for key in LAYER_KEYS:
        v = m.get(key)
        if _ints(v) is not None and any(x > blocks for x in _ints(v)):
            raise HyperparameterError(f"{key.format(arch=arch)[len(prefix):]} = {v} exceeds the {blocks} blocks of the file")
    ctx = m.get(Keys.LLM.CONTEXT_LENGTH)
    if ctx is not None and (_ints(ctx) is None or not 0 < ctx <= MAX_CONTEXT):
        raise HyperparameterError(f"context_length = {quote(ctx)} is not in 1..{MAX_CONTEXT}")
    window = m.get(Keys.Attention.SLIDING_WINDOW)
    # A sliding cache holds its whole window, so the window is bounded by the context; by
    # twice it, as real files state a longer window than context (Phi-3.5: 262,144 for 131,072).
    limit = 2 * ctx if isinstance(ctx, int) else MAX_CONTEXT
    if _ints(window) is not None and any(w > limit for w in _ints(window)):
        raise HyperparameterError(f"attention.sliding_window = {quote(window)} is more than twice the context length")
    for key in POSITIVE_KEYS:
        v = m.get(key)
        if v is not None and _ints(v) is not None and any(x <= 0 for x in _ints(v)):
            raise HyperparameterError(f"{key.format(arch=arch)[len(prefix):]} = {quote(v)} must be positive")
    for key in POSITIVE_FLOATS:
        v = m.get(key)
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise HyperparameterError(f"{key.format(arch=arch)[len(prefix):]} = {quote(v)} must be positive")
    for key in NONZERO_FLOATS:
        v = m.get(key)
        if v is not None and not (isinstance(v, (int, float)) and v != 0):
            raise HyperparameterError(f"{key.format(arch=arch)[len(prefix):]} = {quote(v)} must be nonzero")
    _check_rope_dims(m)
    _check_vocabulary(gf)


def _check_rope_dims(m: Any) -> None:
    """Rotary dimensions: even and within a head (llama.cpp: n_rot <= n_embd_head_k)."""
    for dims_key in (Keys.Rope.DIMENSION_COUNT, Keys.Rope.DIMENSION_COUNT_SWA):
        dims = m.get(dims_key)
        if dims is None or _ints(dims) is None or len(_ints(dims)) != 1:
            continue
        name = dims_key.format(arch=m.architecture).split(".", 1)[1]
        if dims % 2:
            raise HyperparameterError(f"{name} = {dims} must be even (dimensions rotate in pairs)")
        head = m.get(Keys.Attention.KEY_LENGTH_SWA if dims_key == Keys.Rope.DIMENSION_COUNT_SWA else Keys.Attention.KEY_LENGTH)
        if head is None:
            dim, heads = m.get(Keys.LLM.EMBEDDING_LENGTH), m.get(Keys.Attention.HEAD_COUNT)
            if isinstance(dim, int) and isinstance(heads, int) and heads > 0:
                head = dim // heads
                if head == 0:
                    raise HyperparameterError(f"embedding_length = {dim} is smaller than head_count = {heads}")
        if isinstance(head, int) and dims > head:
            raise HyperparameterError(f"{name} = {dims} is larger than the attention head ({head})")


def _check_vocabulary(gf: Any) -> None:
    """Token ids index the embedding rows: the vocabulary may not outnumber them."""
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    embd = gf.tensors.get("token_embd.weight")
    if tokens is None or embd is None or len(embd.shape) != 2:
        return
    if len(tokens) > embd.shape[0]:
        raise HyperparameterError(f"tokenizer.ggml.tokens has {len(tokens)} entries, "
                                  f"more than the {embd.shape[0]} rows of token_embd.weight")


# hyperparameter fields -> the GGUF key they come from, for messages
FIELD_KEYS = {
    "dim": "embedding_length", "n_layers": "block_count", "n_heads": "attention.head_count",
    "n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "head_dim_v": "attention.value_length", "vocab_size": "token_embd.weight rows",
    "context_length": "context_length", "norm_eps": "attention.layer_norm(_rms)_epsilon",
    "sliding_window": "attention.sliding_window", "dims": "rope.dimension_count", "base": "rope.freq_base",
    "n_experts": "expert_count", "n_used": "expert_used_count",
}
POSITIVE_FIELDS = ("dim", "n_layers", "n_heads", "head_dim", "vocab_size", "context_length")


def _field_name(path: Iterable[str]) -> str:
    path = list(path)
    key = FIELD_KEYS.get(path[-1], path[-1])
    return key if len(path) == 1 else f"{key} ({'.'.join(path)})"


def check_args(args: Any) -> None:
    """The hyperparameters an architecture read, generically: every integer a size MLX can
    hold, every float finite, the sizes layers divide by positive, rope within a head."""
    _walk(args, [])
    if not dataclasses.is_dataclass(args):
        return
    for name in POSITIVE_FIELDS:
        v = getattr(args, name, None)
        if isinstance(v, int) and v <= 0:
            raise HyperparameterError(f"{_field_name([name])} = {v} must be positive")
    heads, kv = getattr(args, "n_heads", None), getattr(args, "n_kv_heads", None)
    if isinstance(heads, int) and heads > 0:
        for h in (kv if isinstance(kv, tuple) else (kv,)):
            if isinstance(h, int) and h > 0 and heads % h:
                raise HyperparameterError(f"attention.head_count_kv = {h} does not divide attention.head_count = {heads}")
    _check_qk_norms(args)
    _check_embedding_widths(args)
    _check_expert_groups(getattr(args, "moe", None))
    sliding, window = getattr(args, "sliding", None), getattr(args, "sliding_window", None)
    if isinstance(window, int) and isinstance(sliding, tuple) and any(sliding) and window <= 0:
        raise HyperparameterError(f"attention.sliding_window = {window} must be positive for sliding layers")
    rope, head_dim = getattr(args, "rope", None), getattr(args, "head_dim", None)
    for r in (rope, getattr(args, "swa_rope", None)):
        dims = getattr(r, "dims", None)
        if isinstance(dims, int) and isinstance(head_dim, int) and not 0 < dims <= head_dim:
            raise HyperparameterError(f"rope.dimension_count = {dims} is not in 1..{head_dim} (the head size)")
        if isinstance(dims, int) and dims % 2:
            raise HyperparameterError(f"rope.dimension_count = {dims} must be even")


def _check_qk_norms(args: Any) -> None:
    """Query/key norms take their width from the file (a weight per head dimension, or
    one across all heads): any other width would only fail in the forward pass."""
    tensors, head_dim, heads = getattr(args, "tensors", None), getattr(args, "head_dim", None), getattr(args, "n_heads", None)
    if not isinstance(tensors, dict) or not isinstance(head_dim, int) or not isinstance(heads, int):
        return
    kv = getattr(args, "n_kv_heads", heads)
    for i in range(getattr(args, "n_layers", 0)):
        kv_i = kv[i] if isinstance(kv, tuple) and i < len(kv) else kv
        for leaf, n in (("attn_q_norm", heads), ("attn_k_norm", kv_i)):
            shape = tensors.get(f"blk.{i}.{leaf}.weight")
            if shape is not None and shape[-1] not in (head_dim, n * head_dim):
                raise HyperparameterError(f"blk.{i}.{leaf}.weight has width {shape[-1]}, neither the head size "
                                          f"{head_dim} nor the {n} heads' {n * head_dim}")


def _check_embedding_widths(args: Any) -> None:
    """Embeddings added to the token embedding (learned positions, token types) take their
    shape from the file: their width must be the model's."""
    tensors, dim = getattr(args, "tensors", None), getattr(args, "dim", None)
    if not isinstance(tensors, dict) or not isinstance(dim, int):
        return
    for name in ("position_embd.weight", "token_types.weight"):
        shape = tensors.get(name)
        if shape is not None and shape[-1] != dim:  # (n, dim), or (dim,) for a single token type
            raise HyperparameterError(f"{name} has width {shape[-1]}, not embedding_length = {dim}")


def _check_expert_groups(moe: Any) -> None:
    """Grouped routing (DeepSeek V3, GLM-4.5): groups divide the experts and at most all
    groups are used."""
    groups, used, experts = (getattr(moe, f, None) for f in ("n_groups", "n_group_used", "n_experts"))
    if not isinstance(groups, int) or groups <= 0 or not isinstance(experts, int):
        return
    if experts % groups:
        raise HyperparameterError(f"expert_group_count = {groups} does not divide expert_count = {experts}")
    if isinstance(used, int) and not 0 < used <= groups:
        raise HyperparameterError(f"expert_group_used_count = {used} is not in 1..{groups}")


def _walk(value: Any, path: list[str]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, np.integer)):
        if abs(int(value)) > MAX_SIZE:
            raise HyperparameterError(f"{_field_name(path)} = {int(value)} is out of range")
    elif isinstance(value, float):
        if math.isnan(value):
            raise HyperparameterError(f"{_field_name(path)} is not a number")
    elif isinstance(value, (tuple, list)):
        for v in value:
            _walk(v, path or ["?"])
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.name != "tensors":
                _walk(getattr(value, f.name), [*path, f.name])
