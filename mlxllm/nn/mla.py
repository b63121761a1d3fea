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
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .decoder import Block, Decoder, DecoderArgs
from .moe import SwitchLinear
from .norm import RMSNorm


class MLABlock(Block):
    def _init_attention(self, args: DecoderArgs, i: int) -> None:
        t, d, H = args.tensors, args.dim, args.n_heads
        p = f"blk.{i}."
        self.kv_lora = t[p + "attn_kv_a_norm.weight"][0]
        self.d_rope = args.rope.dims
        _, _, self.d_nope = t[p + "attn_k_b.weight"]  # (heads, kv_lora, d_nope)
        _, self.d_v, _ = t[p + "attn_v_b.weight"]  # (heads, d_v, kv_lora)
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
        self.attn_k_b = SwitchLinear(H, self.d_nope, self.kv_lora)  # per head: q_nope -> latent
        self.attn_v_b = SwitchLinear(H, self.kv_lora, self.d_v)  # per head: latent -> value
        self.attn_output = nn.Linear(H * self.d_v, d, bias=False)

    def attention(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        a = self.args
        B, L, _ = x.shape
        H = a.n_heads
        q = self.attn_q_b(self.attn_q_a_norm(self.attn_q_a(x))) if "attn_q_a" in self else self.attn_q(x)
        q = q.reshape(B, L, H, self.d_nope + self.d_rope)
        q_nope, q_pe = q[..., :self.d_nope], q[..., self.d_nope:]
        ckv = self.attn_kv_a_mqa(x)
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
