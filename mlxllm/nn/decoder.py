"""A decoder-only transformer stack assembled from the shared pieces, the way llama.cpp's
src/models/*.cpp compose build_norm, build_attn and build_ffn.

An architecture module reads its GGUF metadata into `DecoderArgs` and, where it has no
oddity of its own, uses `Decoder` as its model. What a layer holds follows the file, as
llama.cpp's loader does with TENSOR_NOT_REQUIRED: a bias, a q/k norm, a post-norm, a fused
qkv or gate+up tensor, an untied output exist on the module exactly when the file has
them (`DecoderArgs.tensors`). Module attributes are GGUF tensor names, so the loader fills
them by name.

Residual topologies (llama.cpp's graphs):
    sequential   h = x + post_attn(attn(attn_norm(x)));  out = h + post_ffn(ffn(ffn_norm(h)))
    parallel     out = x + attn(attn_norm(x)) + ffn(ffn_norm(x)), ffn_norm being attn_norm's
                 output where the file has no separate FFN norm (Falcon, Phi-2, Command-R)
A missing pre-norm tensor means no pre-norm (OLMo 2's post-norm-only layers) unless the
norms carry no parameters at all (OLMo's `parametric_norms=False`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels, layers
from ..cache import KVCache, RotatingKVCache
from .ffn import XIELU, activate, gate_halves, gated_projection
from .moe import MoEArgs, SwitchLinear, experts
from .norm import RMSNorm, norm, unit_rms_norm
from .rope import Rope, RopeArgs


# Per-pair rotation frequency divisors a file may hold (llama3's rope_freqs, Phi-3's LongRoPE).
ROPE_FACTOR_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")


@dataclass
class DecoderArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | tuple[int, ...]  # per layer where the file lists them
    head_dim: int  # keys (and queries)
    norm_eps: float
    tensors: Mapping[str, tuple[int, ...]]  # the file's tensor shapes (numpy order, (out, in))
    head_dim_v: int | None = None  # values, when they differ from keys
    norm: str = "rms"  # "rms" | "layer"
    parametric_norms: bool = True  # False: LayerNorms without weight or bias (OLMo)
    qk_norm: str | None = None  # the q/k norms' kind when the file has them (default: `norm`)
    qk_norm_after_rope: bool = False  # Hunyuan: the norms act on rotated queries and keys
    activation: str | tuple[str | XIELU, ...] = "silu"  # one, or one per layer
    gated: bool = True  # activation(gate) * up; False: activation(up)
    rope: RopeArgs | None = None  # None: no rotary positions (ALiBi, learned positions)
    rope_layers: tuple[bool, ...] | None = None  # which layers rotate (NoPE layers: False)
    swa_rope: RopeArgs | None = None  # sliding layers' rope, where it differs
    rope_factors: str | None = None  # tensor of per-pair frequency divisors (rope_freqs, LongRoPE)
    sliding_window: int = 0
    sliding: tuple[bool, ...] | None = None  # per layer; None: none slide
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float = 0.0
    clamp_qkv: float = 0.0  # clip q, k and v to [-c, c] (llama.cpp clamp_kqv)
    alibi_max_bias: float = 0.0  # ALiBi slopes (Bloom, MPT)
    parallel: bool = False
    ffn_input_norm: str = "ffn_norm"  # the FFN's pre-norm tensor (Seed-OSS: post_attention_norm; DBRX: attn_output_norm)
    attn_temperature: tuple[float, int] | None = None  # (scale, floor): Llama-4-style query scaling
    attn_temperature_offset: float = 0.0  # added to the position before the floor division (Llama 4: 1)
    attn_temperature_layers: tuple[bool, ...] | None = None  # the layers it scales (Llama 4: NoPE ones); None: all
    qk_unit_norm: bool = False  # rotating layers: weightless RMSNorm of rotated q and k (Llama 4's L2 norm)
    attn_output_gate: bool = False  # attn_q holds per head the query, then a gate: output * sigmoid(gate) (Qwen3-Next)
    moe: MoEArgs | None = None  # routing of the layers whose file has experts (ffn_gate_inp)
    extra_layers: int = 0  # trailing blocks in the file the forward pass skips (MTP / NextN layers)
    embed_scale: float = 1.0  # multiplies token embeddings (Gemma sqrt(dim), Granite)
    residual_scale: float = 1.0  # multiplies each branch before it is added (Granite)
    logit_scale: float = 1.0  # multiplies the logits (Command-R; Granite's 1 / logit_scale)
    final_softcap: float = 0.0
    context_length: int = 4096

    def layer_list(self, value, name: str) -> tuple:
        if isinstance(value, (tuple, list)):
            if len(value) != self.n_layers:
                raise ValueError(f"{name} has {len(value)} entries for {self.n_layers} layers")
            return tuple(value)
        return (value,) * self.n_layers

    def has(self, name: str) -> bool:
        return name in self.tensors


def alibi_slopes(n_heads: int, max_bias: float) -> mx.array:
    """ggml's ALiBi slopes (ggml_soft_max_ext with max_bias), one per head."""
    n_log2 = 2 ** math.floor(math.log2(n_heads))
    m0 = 2.0 ** (-max_bias / n_log2)
    m1 = 2.0 ** (-max_bias / 2.0 / n_log2)
    return mx.array([m0 ** (h + 1) if h < n_log2 else m1 ** (2 * (h - n_log2) + 1) for h in range(n_heads)],
                    mx.float32)


class Block(nn.Module):
    """One decoder layer; its projections and norms sit directly on it, named as in GGUF."""

    def __init__(self, args: DecoderArgs, i: int):
        super().__init__()
        self.args = args
        self.index = i
        a, d, has = args, args.dim, self._has
        self.n_kv_heads = args.layer_list(args.n_kv_heads, "head_count_kv")[i]
        self.head_dim_v = args.head_dim_v or args.head_dim
        self.sliding = bool(args.sliding and args.sliding[i])
        rotates = args.rope is not None and (args.rope_layers is None or args.rope_layers[i])
        rope_args = args.swa_rope if self.sliding and args.swa_rope is not None else args.rope
        self.rope = Rope(rope_args) if rotates else None
        self.activation = args.layer_list(args.activation, "activation")[i]

        def norm_if(leaf: str, dims: int) -> nn.Module | None:
            """The norm where the file has it (always, for OLMo's parameterless pre-norms)."""
            if not has(f"{leaf}.weight") and (a.parametric_norms or leaf not in ("attn_norm", "ffn_norm")):
                return None
            return norm(a.norm, dims, a.norm_eps, args.tensors, f"blk.{i}.{leaf}")

        self.attn_norm = norm_if("attn_norm", d)
        self.attn_norm_2 = norm_if("attn_norm_2", d)  # Falcon 40B: the attention's own norm
        self._init_attention(args, i)
        self.post_attention_norm = norm_if("post_attention_norm", d)
        # Seed-OSS keeps the FFN's pre-norm under post_attention_norm: then that is its role
        self.ffn_norm = norm_if(a.ffn_input_norm, d) if a.ffn_input_norm == "ffn_norm" else None
        if a.ffn_input_norm not in ("ffn_norm", "post_attention_norm"):  # DBRX: attn_output_norm
            setattr(self, a.ffn_input_norm, norm_if(a.ffn_input_norm, d))
        self.moe = a.moe if has("ffn_gate_inp.weight") else None
        if self.moe is not None:
            self._init_experts(args, i)
        else:
            self._init_ffn(args, i)
        self.post_ffw_norm = norm_if("post_ffw_norm", d)
        # Slopes as numpy, not a parameter: the file has no such tensor.
        self.alibi = np.array(alibi_slopes(a.n_heads, a.alibi_max_bias)) if a.alibi_max_bias else None
        # Whether a decode step's attention can run on the kernels that write the cache and
        # attend in place (kernels.cached_attention): per-head RMS q/k norms before the
        # rope at most, and none of the variants they do not implement.
        plain_qk_norms = "attn_q_norm" not in self or (
            not self.qk_norm_full_width and not a.qk_norm_after_rope
            and all(isinstance(self[n], RMSNorm) and "bias" not in self[n] and self[n].weight.ndim == 1
                    for n in ("attn_q_norm", "attn_k_norm")))
        scaled_queries = a.attn_temperature is not None and (
            a.attn_temperature_layers is None or a.attn_temperature_layers[i])
        self.cached_attention = plain_qk_norms and not (
            a.clamp_qkv or a.attn_output_gate or a.qk_unit_norm or scaled_queries or self.alibi is not None
            or a.attn_softcap or "attn_sinks" in self)

    def _init_attention(self, args: DecoderArgs, i: int) -> None:
        """Projections (split or fused qkv), q/k norms, output, sinks: as the file has them."""
        a, d, has, linear = args, args.dim, self._has, self._linear
        q_out, kv_out = a.n_heads * a.head_dim * (2 if a.attn_output_gate else 1), self.n_kv_heads * a.head_dim
        v_out = self.n_kv_heads * self.head_dim_v
        self.split = (q_out, q_out + kv_out)  # [q | k | v]: a fused or stacked projection's columns
        if has("attn_qkv.weight"):
            self.attn_qkv = linear("attn_qkv", d, q_out + kv_out + v_out)
        else:
            self.attn_q = linear("attn_q", d, q_out)
            self.attn_k = linear("attn_k", d, kv_out)
            self.attn_v = linear("attn_v", d, v_out)
        # q/k norms per head (head_dim wide; Command-R's hold one weight row per head) or
        # across all heads (OLMo 2: as wide as the projection)
        self.qk_norm_full_width = False
        for leaf in ("attn_q_norm", "attn_k_norm"):
            if has(f"{leaf}.weight"):
                shape = args.tensors[f"blk.{i}.{leaf}.weight"]
                setattr(self, leaf, norm(a.qk_norm or a.norm, shape[-1], a.norm_eps, args.tensors, f"blk.{i}.{leaf}"))
                if len(shape) == 2:
                    getattr(self, leaf).weight = mx.ones(shape)
                self.qk_norm_full_width = shape[-1] != a.head_dim
        self.attn_output = linear("attn_output", a.n_heads * self.head_dim_v, d)
        if has("attn_sinks.weight"):  # gpt-oss: a per-head logit in every softmax
            self.attn_sinks = {"weight": mx.zeros((a.n_heads,))}

    def _has(self, leaf: str) -> bool:
        """Whether the file holds this layer's tensor `leaf` (e.g. "attn_q.bias")."""
        return self.args.has(f"blk.{self.index}.{leaf}")

    def _linear(self, leaf: str, fan_in: int, fan_out: int) -> nn.Linear:
        return nn.Linear(fan_in, fan_out, bias=self._has(f"{leaf}.bias"))

    def _init_ffn(self, args: DecoderArgs, i: int) -> None:
        """A dense FFN: gated (separate or fused gate+up) or plain."""
        a, d, linear = args, args.dim, self._linear
        ff = args.tensors[f"blk.{i}.ffn_down.weight"][-1]
        if a.gated and self._has("ffn_gate.weight"):
            self.ffn_gate = linear("ffn_gate", d, ff)
            self.ffn_up = linear("ffn_up", d, ff)
        else:  # plain, or gate and up fused in ffn_up (Phi-3, ChatGLM): gate first
            self.ffn_up = linear("ffn_up", d, 2 * ff if a.gated else ff)
        self.ffn_down = linear("ffn_down", ff, d)

    def _init_experts(self, args: DecoderArgs, i: int) -> None:
        """Router, the experts as 3-D tensors, and a shared expert where the file has one."""
        d, t, has = args.dim, args.tensors, self._has
        E, ff, _ = t[f"blk.{i}.ffn_up_exps.weight"]
        self.ffn_gate_inp = self._linear("ffn_gate_inp", d, E)
        if has("ffn_gate_exps.weight"):
            self.ffn_gate_exps = SwitchLinear(E, d, ff, bias=has("ffn_gate_exps.bias"))
        self.ffn_up_exps = SwitchLinear(E, d, ff, bias=has("ffn_up_exps.bias"))
        self.ffn_down_exps = SwitchLinear(E, ff, d, bias=has("ffn_down_exps.bias"))
        if has("exp_probs_b.bias"):  # (E,), or (1, E) as ERNIE's converter writes it
            self.exp_probs_b = {"bias": mx.zeros(t[f"blk.{i}.exp_probs_b.bias"])}
        if has("ffn_up_shexp.weight"):
            shared = t[f"blk.{i}.ffn_up_shexp.weight"][0]
            self.ffn_gate_shexp = self._linear("ffn_gate_shexp", d, shared)
            self.ffn_up_shexp = self._linear("ffn_up_shexp", d, shared)
            self.ffn_down_shexp = self._linear("ffn_down_shexp", shared, d)
        if has("ffn_gate_inp_shexp.weight"):  # Qwen2-MoE: a sigmoid gate on the shared expert
            shape = t[f"blk.{i}.ffn_gate_inp_shexp.weight"]  # {n_embd} in llama.cpp ({n_embd, 1} too)
            if math.prod(shape) != d:
                raise ValueError(f"blk.{i}.ffn_gate_inp_shexp holds {list(shape)}, not one weight per {d} dims")
            self.ffn_gate_inp_shexp = {"weight": mx.zeros(shape)}

    @property
    def SHARED_INPUT_PROJECTIONS(self) -> tuple[tuple[str, ...], ...]:  # noqa: N802 (the loader's name)
        groups = []
        if "attn_q" in self:
            groups.append(("attn_q", "attn_k", "attn_v"))
        if "ffn_gate" in self:
            groups.append(("ffn_gate", "ffn_up"))
        if "ffn_gate_shexp" in self:
            groups.append(("ffn_gate_shexp", "ffn_up_shexp"))
        return tuple(groups)

    def attention(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        a = self.args
        B, L, _ = x.shape
        separate = () if "attn_qkv" in self else (self.attn_q, self.attn_k, self.attn_v)
        fused = self.attn_qkv(x) if not separate else layers.stacked_product(x, separate)
        scale = a.attn_scale if a.attn_scale is not None else a.head_dim ** -0.5
        if self.cached_attention and cache is not None:
            rope = None if self.rope is None else \
                lambda: (*self.rope.tables(L, cache.offset, factors), self.rope.args.traditional)
            norms = (self.attn_q_norm.weight, self.attn_k_norm.weight, self.attn_q_norm.eps) \
                if "attn_q_norm" in self else None
            projections = [fused] if fused is not None else layers.project(x, separate)
            out = kernels.cached_attention(projections, cache, a.n_heads, self.n_kv_heads, a.head_dim,
                                           self.head_dim_v, scale, mask, rope, norms)
            if out is not None:
                return self.attn_output(out)
            q, k, v = projections if fused is None else mx.split(fused, self.split, axis=-1)
        else:
            q, k, v = layers.project(x, separate) if fused is None else mx.split(fused, self.split, axis=-1)
        if a.clamp_qkv:
            q, k, v = (mx.clip(t, -a.clamp_qkv, a.clamp_qkv) for t in (q, k, v))
        if a.attn_output_gate:
            q, out_gate = mx.split(q.reshape(B, L, a.n_heads, 2 * a.head_dim), 2, axis=-1)
        qk_norm = "attn_q_norm" in self
        if qk_norm and self.qk_norm_full_width:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        # (B, L, H*D) -> (B, L, H, D)
        q = q.reshape(B, L, a.n_heads, a.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, a.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim_v)
        if qk_norm and not self.qk_norm_full_width and not a.qk_norm_after_rope:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        if self.rope is not None:
            offset = cache.offset if cache is not None else 0
            q, k = self.rope(q, offset, factors), self.rope(k, offset, factors)
        if qk_norm and a.qk_norm_after_rope:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        if a.qk_unit_norm and self.rope is not None:
            q, k = unit_rms_norm(q, a.norm_eps), unit_rms_norm(k, a.norm_eps)
        if a.attn_temperature is not None and (a.attn_temperature_layers is None or a.attn_temperature_layers[self.index]):
            # llm_graph_input_attn_temp: 1 + scale * ln(floor((p + offset) / floor) + 1)
            temperature, floor = a.attn_temperature
            offset = cache.offset if cache is not None else 0
            positions = mx.arange(L) + (offset[:, None] if isinstance(offset, mx.array) else offset)
            positions = positions + a.attn_temperature_offset
            q = q * (1 + temperature * mx.log(mx.floor(positions / floor) + 1)).reshape(-1, L, 1, 1).astype(q.dtype)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, D)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        bias = None
        if self.alibi is not None:
            # -slope * |key - query|, llama.cpp's ALiBi mask: under a causal mask it is
            # slope * (key - query); an encoder's keys after the query lose alike
            T = k.shape[2]
            distance = mx.abs(mx.arange(T)[None, :] - mx.arange(T - L, T)[:, None])  # (L, T)
            bias = -mx.array(self.alibi)[:, None, None] * distance.astype(mx.float32)  # (H, L, T)
        sinks = self.attn_sinks["weight"] if "attn_sinks" in self else None
        out = kernels.attention(q, k, v, scale, mask, softcap=a.attn_softcap, bias=bias, sinks=sinks)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, H*Dv)
        if a.attn_output_gate:
            out = out * mx.sigmoid(out_gate.reshape(B, L, -1))
        return self.attn_output(out)

    def feed_forward(self, x: mx.array) -> mx.array:
        if self.moe is not None:
            return self.mixture(x)
        if "ffn_gate" in self:
            return self.ffn_down(gated_projection(x, self.ffn_gate, self.ffn_up, self.activation))
        if self.args.gated:
            return self.ffn_down(gate_halves(self.ffn_up(x), self.activation))
        return self.ffn_down(activate(self.ffn_up(x), self.activation))

    def mixture(self, x: mx.array) -> mx.array:
        """Routed experts plus the shared expert (llama.cpp: moe + shexp, in that order)."""
        out = experts(self, x, self.moe)
        if "ffn_up_shexp" in self:
            shared = self.ffn_down_shexp(gated_projection(x, self.ffn_gate_shexp, self.ffn_up_shexp, "silu"))
            if "ffn_gate_inp_shexp" in self:
                shared = shared * mx.sigmoid(x @ self.ffn_gate_inp_shexp["weight"].reshape(-1, 1))
            out = out + shared
        return out

    def __call__(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        rs = self.args.residual_scale
        attn_in = self.attn_norm(x) if self.attn_norm is not None else x
        # Falcon 40B: attention reads attn_norm_2, the parallel FFN attn_norm
        a = self.attention(self.attn_norm_2(x) if self.attn_norm_2 is not None else attn_in, mask, cache, factors)
        if self.post_attention_norm is not None and self.args.ffn_input_norm != "post_attention_norm":
            a = self.post_attention_norm(a)
        if self.args.parallel:
            f = self.feed_forward(self.ffn_norm(x) if self.ffn_norm is not None else attn_in)
            return x + (a + f) * rs if rs != 1.0 else kernels.residual_add(kernels.residual_add(x, a), f)
        h = x + a * rs if rs != 1.0 else kernels.residual_add(x, a)
        ffn_norm = getattr(self, self.args.ffn_input_norm)  # None: the file has no such norm (as for the others)
        f = self.feed_forward(ffn_norm(h) if ffn_norm is not None else h)
        if self.post_ffw_norm is not None:
            f = self.post_ffw_norm(f)
        return h + f * rs if rs != 1.0 else kernels.residual_add(h, f)


class Decoder(nn.Module):
    """Embeddings, the blocks, the output head: `model(tokens[B, L], cache) -> logits`."""

    block = Block
    # Rows of different lengths can share a forward pass: every mask comes from
    # `cache.make_mask` and every position from `cache.offset` (mlxllm.generate).
    batchable = True

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        self.token_embd = nn.Embedding(args.vocab_size, args.dim)
        if args.has("token_embd_norm.weight"):  # Bloom: a LayerNorm right after the lookup
            self.token_embd_norm = norm(args.norm, args.dim, args.norm_eps, args.tensors, "token_embd_norm")
        if args.has("position_embd.weight"):  # learned absolute positions (GPT-2, StarCoder)
            self.position_embd = nn.Embedding(*args.tensors["position_embd.weight"])
        for factors in ROPE_FACTOR_TENSORS:  # every one the file has; args.rope_factors is the one used
            if args.has(f"{factors}.weight"):
                setattr(self, factors, {"weight": mx.ones(args.tensors[f"{factors}.weight"])})
        self.blk = [self.block(args, i) for i in range(args.n_layers)]
        # llama.cpp loads multi-token-prediction layers past n_layers but never runs them
        self.ignored_tensors = frozenset(
            name for name in args.tensors
            if name.startswith("blk.") and args.n_layers <= int(name.split(".")[1]) < args.n_layers + args.extra_layers)
        self.output_norm = norm(args.norm, args.dim, args.norm_eps, args.tensors, "output_norm") \
            if args.has("output_norm.weight") or not args.parametric_norms else None
        if args.has("output.weight"):
            self.output = nn.Linear(args.dim, args.vocab_size, bias=args.has("output.bias"))

    @property
    def layers(self) -> list[Block]:
        return self.blk

    def make_cache(self) -> list[KVCache | RotatingKVCache]:
        return [RotatingKVCache(self.args.sliding_window) if b.sliding else KVCache() for b in self.blk]

    def input_embeddings(self, tokens: mx.array, cache: list | None) -> mx.array:
        h = self.token_embd(tokens)
        if self.args.embed_scale != 1.0:
            h = h * self.args.embed_scale
        if "position_embd" in self:
            offset = cache[0].offset if cache else 0
            positions = mx.arange(tokens.shape[1])
            positions = positions + (offset[:, None] if isinstance(offset, mx.array) else offset)
            h = h + self.position_embd(positions)
        if "token_embd_norm" in self:
            h = self.token_embd_norm(h)
        return h

    def masks(self, L: int, caches: list) -> list:
        """One mask per kind of layer (full or sliding), from the first cache of that kind:
        every cache of a kind holds the same positions. Without a cache, an empty one gives
        the mask of a prompt starting at position 0."""
        by_kind: dict[bool, object] = {}
        for block, c in zip(self.blk, caches):
            if block.sliding not in by_kind:
                probe = c if c is not None else (RotatingKVCache(self.args.sliding_window) if block.sliding else KVCache())
                by_kind[block.sliding] = probe.make_mask(L)
        return [by_kind[b.sliding] for b in self.blk]

    def head(self, h: mx.array) -> mx.array:
        a = self.args
        if self.output_norm is not None:
            h = self.output_norm(h)
        logits = self.output(h) if "output" in self else self.token_embd.as_linear(h)
        if a.logit_scale != 1.0:
            logits = logits * a.logit_scale
        if a.final_softcap:
            logits = a.final_softcap * mx.tanh(logits / a.final_softcap)
        return logits

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        h = self.input_embeddings(tokens, cache)
        caches = cache if cache else [None] * len(self.blk)
        factors = self[self.args.rope_factors]["weight"] if self.args.rope_factors else None
        for block, c, mask in zip(self.blk, caches, self.masks(tokens.shape[1], caches)):
            h = block(h, mask, c, factors)
        return self.head(h)
