"""Multi-head latent attention (DeepSeek V2/V3, src/models/deepseek2.cpp), as llama.cpp runs
it from the converter's split of kv_b_proj into attn_k_b / attn_v_b.

Per token, the keys and values of every head come from one compressed vector c (kv_lora_rank
wide) and one shared rotary key k_pe; the cache holds only [c | k_pe]
(kv_lora_rank + rope dims per token and layer), the values being its first kv_lora entries. Each head's
query is absorbed into the latent space, q_abs[h] = W_kb[h]^T q_nope[h], so attention runs
as a single-kv-head attention over [c | k_pe], and each head's output o[h] (a latent vector)
is expanded by W_vb[h]:

    q  = q_b(rms(q_a(x)))  (or attn_q(x)),  per head [q_nope | q_pe]
    ckv = kv_a_mqa(x) = [c_raw | k_pe_raw];  c = rms(c_raw);  k_pe = rope(k_pe_raw), one head
    Q[h] = [W_kb[h]^T q_nope[h] | rope(q_pe[h])],  K = [c | k_pe],  V = c
    out = attn_output(concat_h W_vb[h] softmax(scale * Q[h] K^T) V)

The per-head matrices are (heads, out, in) tensors, multiplied per head through the same
gather products the experts use (`SwitchLinear`), so they may be quantized like experts.

Files converted before llama.cpp's MLA support (its PR 12801, April 2025) hold one
`attn_kv_b` (heads * (d_nope + d_v), kv_lora) instead, each head's rows [W_k[h]; W_v[h]] as
Hugging Face's kv_b_proj, with key_length = d_nope + d_rope, value_length = d_v, as many kv
heads as query heads and no *_mla keys. llama.cpp runs those without absorption: it expands
each token's latent into per-head keys and values and caches those (heads * (d_k + d_v)
per token). Here such a file runs through the same absorbed block: attn_kv_b is split into
the per-head W_k[h]^T and W_v[h] once, on the first forward pass (`absorb_kv_b`), so the
cache still holds only [c | k_pe] and there is one attention path to keep right. The two
are the same sums in another order: q_nope[h] . (W_k[h] c) = (W_k[h]^T q_nope[h]) . c, and
W_v[h] (sum_t p_t c_t) = sum_t p_t (W_v[h] c_t).
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from .. import kernels, layers
from .decoder import Block, Decoder, DecoderArgs
from .moe import SwitchLinear
from .norm import RMSNorm


class MLABlock(Block):
    def _init_attention(self, args: DecoderArgs, i: int) -> None:
        t, d, H = args.tensors, args.dim, args.n_heads
        p = f"blk.{i}."
        self.kv_lora = t[p + "attn_kv_a_norm.weight"][0]
        self.d_rope = args.rope.dims
        if args.has(p + "attn_kv_b.weight"):  # a file from before the split (see the module doc)
            self.d_nope, self.d_v = args.head_dim - self.d_rope, args.head_dim_v
            if t[p + "attn_kv_b.weight"] != (H * (self.d_nope + self.d_v), self.kv_lora):
                raise ValueError(f"{p}attn_kv_b.weight has shape {list(t[p + 'attn_kv_b.weight'])}, expected "
                                 f"{[H * (self.d_nope + self.d_v), self.kv_lora]} (key_length {args.head_dim}, "
                                 f"value_length {self.d_v})")
            self.attn_kv_b = nn.Linear(self.kv_lora, H * (self.d_nope + self.d_v), bias=False)
        else:
            _, _, self.d_nope = t[p + "attn_k_b.weight"]  # (heads, kv_lora, d_nope)
            _, self.d_v, _ = t[p + "attn_v_b.weight"]  # (heads, d_v, kv_lora)
            self.attn_k_b = SwitchLinear(H, self.d_nope, self.kv_lora)  # per head: q_nope -> latent
            self.attn_v_b = SwitchLinear(H, self.kv_lora, self.d_v)  # per head: latent -> value
        q_width = H * (self.d_nope + self.d_rope)
        if args.has(p + "attn_q_a.weight"):
            q_lora = t[p + "attn_q_a.weight"][0]
            self.attn_q_a = nn.Linear(d, q_lora, bias=False)
            self.attn_q_a_norm = RMSNorm(q_lora, args.norm_eps)
            self.attn_q_b = nn.Linear(q_lora, q_width, bias=False)
        else:  # V2-Lite: no query compression
            self.attn_q = nn.Linear(d, q_width, bias=False)
        self.attn_kv_a_mqa = nn.Linear(d, self.kv_lora + self.d_rope, bias=False)
        self.attn_kv_a_norm = RMSNorm(self.kv_lora, args.norm_eps)
        self.attn_output = nn.Linear(H * self.d_v, d, bias=False)

    @property
    def SHARED_INPUT_PROJECTIONS(self) -> tuple[tuple[str, ...], ...]:
        """The query's first projection and attn_kv_a_mqa read the same normed input (there
        is no attn_k / attn_v), then the FFN's as in `Block`."""
        groups = [("attn_q_a" if "attn_q_a" in self else "attn_q", "attn_kv_a_mqa")]
        for names in (("ffn_gate", "ffn_up"), ("ffn_gate_shexp", "ffn_up_shexp")):
            if names[0] in self:
                groups.append(names)
        return tuple(groups)

    def absorb_kv_b(self) -> None:
        """Replace a legacy attn_kv_b by the absorbed per-head attn_k_b (W_k[h]^T) and
        attn_v_b (W_v[h]), in the dtype of the other float parameters. The loader fills
        parameters by the file's tensor names and has no step after that, so the first
        forward pass calls this (a second caller racing it finds the work done or redoes the
        same). The float image of the weight is read back by multiplying the identity (exact
        for every layout: one nonzero term per output); the per-head matrices stay floats,
        as the transposed W_k[h]^T has no quantized layout in the file to keep."""
        kv_b = self.get("attn_kv_b")
        if kv_b is None:
            return
        H, nope, dv, r = self.args.n_heads, self.d_nope, self.d_v, self.kv_lora
        dtype = self.attn_kv_a_norm.weight.dtype
        w = kv_b(mx.eye(r, dtype=mx.float32)).T.reshape(H, nope + dv, r)  # (heads, rows, kv_lora)
        k_b, v_b = SwitchLinear(H, nope, r), SwitchLinear(H, r, dv)
        k_b.weight = w[:, :nope].transpose(0, 2, 1).astype(dtype)  # (heads, kv_lora, d_nope)
        v_b.weight = w[:, nope:].astype(dtype)  # (heads, d_v, kv_lora)
        mx.eval(k_b.parameters(), v_b.parameters())
        self.attn_k_b, self.attn_v_b = k_b, v_b
        self.pop("attn_kv_b", None)

    def attention(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        a = self.args
        B, L, _ = x.shape
        H = a.n_heads
        if "attn_k_b" not in self:  # a legacy attn_kv_b file's first call
            self.absorb_kv_b()
        if "attn_q_a" in self:
            q_a, ckv = layers.project(x, (self.attn_q_a, self.attn_kv_a_mqa))
            q = self.attn_q_b(self.attn_q_a_norm(q_a))
        else:
            q, ckv = layers.project(x, (self.attn_q, self.attn_kv_a_mqa))
        q = q.reshape(B, L, H, self.d_nope + self.d_rope)
        q_nope, q_pe = q[..., :self.d_nope], q[..., self.d_nope:]
        c = self.attn_kv_a_norm(ckv[..., :self.kv_lora])  # (B, L, kv_lora)
        k_pe = ckv[..., self.kv_lora:].reshape(B, L, 1, self.d_rope)  # one rotary head for all
        offset = cache.offset if cache is not None else 0
        q_pe, k_pe = self.rope(q_pe, offset, factors), self.rope(k_pe, offset, factors)
        heads = mx.broadcast_to(mx.arange(H), (B * L, H)).reshape(-1, 1)  # each row's head
        q_abs = self.attn_k_b(q_nope.reshape(B * L * H, self.d_nope), heads).reshape(B, L, H, self.kv_lora)
        queries = mx.concatenate([q_abs, q_pe], axis=-1).transpose(0, 2, 1, 3)  # (B, H, L, kv_lora + d_rope)
        keys = mx.concatenate([c[:, :, None], k_pe], axis=-1).transpose(0, 2, 1, 3)  # (B, 1, L, kv_lora + d_rope)
        if cache is not None:  # the cache holds [c | k_pe] only: the values are its first kv_lora entries
            keys, _ = cache.update_and_fetch(keys, keys[..., :0])
        values = keys[..., :self.kv_lora]  # (B, 1, T, kv_lora)
        o = kernels.attention(queries, keys, values, a.attn_scale, mask)  # (B, H, L, kv_lora)
        o = o.transpose(0, 2, 1, 3).reshape(B * L * H, self.kv_lora)
        out = self.attn_v_b(o, heads).reshape(B, L, H * self.d_v)
        return self.attn_output(out)


class MLADecoder(Decoder):
    block = MLABlock
