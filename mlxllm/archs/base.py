"""What architecture modules share: reading the hyperparameters every decoder has
(llama.cpp's llama_model::load_hparams common part) into `nn.DecoderArgs`."""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import Keys

from ..gguf import GGUFFile
from ..nn import DecoderArgs, RopeArgs
from ..nn.decoder import ROPE_FACTOR_TENSORS
from ..nn.moe import MoEArgs


def require(gf: GGUFFile, key: str) -> Any:
    """A metadata value the architecture cannot run without (gguf.Keys name or arch-relative)."""
    if key not in gf.metadata:
        raise KeyError(f"{key.replace('{arch}', gf.metadata.architecture or '?')} is missing")
    return gf.metadata[key]


def is_array(value: Any) -> bool:
    """Whether a metadata value is a GGUF array (read as a list or a numpy array)."""
    return isinstance(value, (list, tuple, np.ndarray))


def per_layer(value: Any, n_layers: int) -> Any:
    """A per-layer array from the file as a tuple (a scalar stays a scalar)."""
    return tuple(int(v) for v in value) if is_array(value) else value


def decoder_args(gf: GGUFFile, *, norm: str = "rms", rope: str | None = "norm", rope_options: dict | None = None,
                 moe: dict | None = None, **overrides: Any) -> DecoderArgs:
    """The common hyperparameters of a decoder file, then the architecture's `overrides`.

    norm: "rms" (eps from attention.layer_norm_rms_epsilon) or "layer"
    (attention.layer_norm_epsilon). rope: llama.cpp's rope type for the architecture,
    "norm" (adjacent pairs), "neox" (halves) or None, over rope.dimension_count entries;
    rope_options: `RopeArgs.from_gguf`'s, for the keys only some architectures read.
    moe: `MoEArgs` fields the architecture fixes (gating, normalize, scale), for a file with
    experts (expert_count > 0); counts and groups come from the file.
    Frequency factors: rope_freqs (Llama 3.1) where the file has it, else LongRoPE's short
    factors: llama.cpp takes the long ones only for a context past the original one, and
    mlxllm runs at the original context (as Ollama's default 4096 does for Phi-3).
    """
    m = gf.metadata
    dim = require(gf, Keys.LLM.EMBEDDING_LENGTH)
    n_layers = require(gf, Keys.LLM.BLOCK_COUNT)
    n_heads = per_layer(require(gf, Keys.Attention.HEAD_COUNT), n_layers)
    if isinstance(n_heads, tuple):  # uniform in every dense file we read: one count
        if len(set(n_heads)) != 1:
            raise ValueError("per-layer query head counts that differ are not supported")
        n_heads = n_heads[0]
    n_kv = per_layer(m.get(Keys.Attention.HEAD_COUNT_KV, n_heads), n_layers)
    blocks = {name.split(".")[1] for name in gf.tensors if name.startswith("blk.")}
    # Absurd metadata is refused here, before any layer is built (a huge block_count would
    # otherwise allocate modules for blocks the file does not hold).
    if not (isinstance(dim, int) and dim > 0 and isinstance(n_heads, int) and n_heads > 0):
        raise ValueError(f"embedding_length {dim!r} and head_count {n_heads!r} must be positive integers")
    if not isinstance(n_layers, int) or not 0 < n_layers <= len(blocks):
        raise ValueError(f"block_count {n_layers!r} does not match the {len(blocks)} blocks the file holds")
    if any(not isinstance(h, int) or h <= 0 or n_heads % h for h in (n_kv if isinstance(n_kv, tuple) else (n_kv,))):
        raise ValueError(f"head_count_kv {n_kv!r} must divide head_count {n_heads}")
    head_dim = m.get(Keys.Attention.KEY_LENGTH, dim // n_heads)
    eps_key = Keys.Attention.LAYERNORM_RMS_EPS if norm == "rms" else Keys.Attention.LAYERNORM_EPS
    kw: dict[str, Any] = dict(
        vocab_size=gf.tensors["token_embd.weight"].shape[0],
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        head_dim_v=m.get(Keys.Attention.VALUE_LENGTH, head_dim),
        norm=norm,
        norm_eps=m.get(eps_key, 1e-5),
        tensors={name: tuple(t.shape) for name, t in gf.tensors.items()},
        attn_softcap=m.get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, 0.0),
        final_softcap=m.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 0.0),
        context_length=m.get(Keys.LLM.CONTEXT_LENGTH, 4096),
    )
    if rope is not None:
        dims = m.get(Keys.Rope.DIMENSION_COUNT, head_dim)
        kw["rope"] = RopeArgs.from_gguf(m, dims, traditional=rope == "norm", **(rope_options or {}))
        for factors in ROPE_FACTOR_TENSORS:  # one divisor per rotated pair, as llama.cpp loads them
            shape = gf.tensors[f"{factors}.weight"].shape if f"{factors}.weight" in gf.tensors else None
            if shape is not None and tuple(shape) != (dims // 2,):
                raise ValueError(f"{factors} holds {list(shape)} values, rope.dimension_count = {dims} rotates "
                                 f"{dims // 2} pairs")
        for factors in ("rope_freqs", "rope_factors_short"):
            if f"{factors}.weight" in gf.tensors:
                kw["rope_factors"] = factors
                break
    n_experts = m.get(Keys.LLM.EXPERT_COUNT, 0)
    if n_experts:
        used = per_layer(require(gf, Keys.LLM.EXPERT_USED_COUNT), n_layers)
        if isinstance(used, tuple):
            if len(set(used)) != 1:
                raise ValueError("per-layer expert_used_count values that differ are not supported")
            used = used[0]
        if not 0 < used <= n_experts:
            raise ValueError(f"expert_used_count {used} is not in 1..{n_experts}")
        # the routers and experts the file holds, {n_expert, ...} in llama.cpp, and the
        # per-expert router biases, {n_expert} (some converters write {n_expert, 1})
        for name, info in gf.tensors.items():
            held = info.shape[0] if name.endswith(("ffn_gate_inp.weight", "_exps.weight", "_exps.bias")) else \
                info.shape[-1] if name.endswith(("ffn_gate_inp.bias", "exp_probs_b.bias")) else n_experts
            if held != n_experts:
                raise ValueError(f"{name} holds {held} experts, expert_count = {n_experts}")
        kw["moe"] = MoEArgs(n_experts=n_experts, n_used=used, n_groups=m.get(Keys.LLM.EXPERT_GROUP_COUNT, 0),
                            n_group_used=m.get(Keys.LLM.EXPERT_GROUP_USED_COUNT, 0), **(moe or {}))
    kw.update(overrides)
    return DecoderArgs(**kw)


# expert_gating_func values (llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE)
EXPERT_GATING = {1: "softmax", 2: "sigmoid", 3: "softmax_weight"}


def routing_from_file(gf: GGUFFile, default_gating: str | None) -> dict[str, Any]:
    """`MoEArgs` fields for the architectures whose routing the file states (DeepSeek V3
    style): gating (expert_gating_func; 0 or absent means `default_gating`, and None means
    the file must say), normalization and scale."""
    m = gf.metadata
    code = m.get(Keys.LLM.EXPERT_GATING_FUNC, 0)
    if code == 0 and default_gating is None:
        raise ValueError("expert_gating_func is missing")
    if code and code not in EXPERT_GATING:
        raise ValueError(f"expert_gating_func {code} is not supported")
    return dict(gating=EXPERT_GATING.get(code, default_gating),
                normalize=bool(m.get(Keys.LLM.EXPERT_WEIGHTS_NORM, False)),
                scale=m.get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 0.0) or 1.0)


def sliding_pattern(n_layers: int, period: int, dense_first: bool = False) -> tuple[bool, ...]:
    """llama_hparams::set_swa_pattern(period, dense_first): every period-th layer attends to
    the whole history, the others slide (period 0: all slide). dense_first puts the full
    layer first in each period instead of last."""
    if period == 0:
        return (True,) * n_layers
    if dense_first:
        return tuple(i % period != 0 for i in range(n_layers))
    return tuple(i % period < period - 1 for i in range(n_layers))


def file_sliding_pattern(gf: GGUFFile, n_layers: int, default_period: int) -> tuple[bool, ...]:
    """The sliding layers as the file states them (attention.sliding_window_pattern: a
    period, or one bool per layer), else the architecture's fixed period."""
    pattern = gf.metadata.get(Keys.Attention.SLIDING_WINDOW_PATTERN, default_period)
    if is_array(pattern):
        if len(pattern) != n_layers:
            raise ValueError(f"sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return tuple(bool(p) for p in pattern)
    return sliding_pattern(n_layers, int(pattern))
