"""DeepSeek V2 / V2-Lite / V3 / R1 and the files llama.cpp runs as `deepseek2` (Kimi K2,
GLM-4.7-Flash): multi-head latent attention, leading dense layers, routed and shared
experts (src/models/deepseek2.cpp).

The layouts the attention block reads (nn/mla.py): query through q-LoRA (attn_q_a,
attn_q_a_norm, attn_q_b) or directly (attn_q: V2-Lite; llama.cpp itself accepts a file
without attention.q_lora_rank only at 26 or 27 layers, mlxllm goes by the tensors); keys and
values from today's split attn_k_b / attn_v_b, or from one attn_kv_b in files converted
before llama.cpp's MLA support (key_length then is qk_nope + qk_rope and no *_mla keys exist,
so the scale below comes out the same)."""

from __future__ import annotations

import dataclasses
import math

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn import DecoderArgs
from ..nn.mla import MLADecoder
from ..registry import Arch
from .base import decoder_args, require, routing_from_file


def deepseek2(gf: GGUFFile) -> DecoderArgs:
    m = gf.metadata
    # llama.cpp's default without a gating key is softmax (V2), except GLM-4.7-Flash's sigmoid
    args = decoder_args(gf, rope="norm", moe=routing_from_file(gf, "softmax"))
    k_mla = m.get(Keys.Attention.KEY_LENGTH_MLA, require(gf, Keys.Attention.KEY_LENGTH))
    # llama.cpp: kq_scale = mscale^2 / sqrt(key_length_mla), mscale = YaRN's
    # 1 + 0.1 * mscale_all_dim * ln(factor) (the file stores 0.1 * mscale_all_dim); the
    # rotation itself is then multiplied by rope.scaling.attn_factor only.
    rope = args.rope
    mscale = rope.attn_factor
    if rope.yarn is not None:
        log_mul = m.get(Keys.Rope.SCALING_YARN_LOG_MUL, 0.0) / 0.1
        mscale = m.get(Keys.Rope.SCALING_ATTN_FACTOR, 1.0)
        rope = dataclasses.replace(rope, attn_factor=mscale)
        mscale *= 1 + 0.1 * log_mul * math.log(1 / rope.freq_scale)
    return dataclasses.replace(args, rope=rope, attn_scale=mscale ** 2 / math.sqrt(k_mla))


ARCH = Arch(name="deepseek2", args=deepseek2, model=MLADecoder,
            hf_architectures=("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
            description="DeepSeek V2/V3/R1, Kimi K2: latent attention, routed + shared experts",
            convert=convert_hooks.DeepSeek2)
