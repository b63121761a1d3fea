"""Meta Llama 4 text decoders, Scout and Maverick (src/models/llama4.cpp).

Three of every four layers attend in chunks of 8192 positions (a query sees only its own
chunk) and rotate with interleaved RoPE, followed by a weightless RMS ("L2") norm of the
rotated queries and keys (except in the 128-expert Maverick); every fourth layer attends
to the whole history with no RoPE, its queries scaled by the attention temperature
1 + 0.1 ln(floor((p + 1) / 8192) + 1). Dense and MoE feed-forward layers interleave
(interleave_moe_layer_step); a MoE layer picks its top experts on the raw router logits,
multiplies each expert's input by the sigmoid of its logit, and adds an always-on shared
expert. llama.cpp fixes the chunk, the temperature constants and the NoPE period; the file
does not carry them.
"""

from __future__ import annotations

import dataclasses

from gguf import Keys

from .. import convert_hooks
from ..cache import KVCache
from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..nn.chunked import ChunkedKVCache
from ..registry import Arch
from .base import decoder_args, file_sliding_pattern, require

CHUNK = 8192  # llama.cpp n_swa for LLAMA_SWA_TYPE_CHUNKED, whatever the file says
CHUNKED_PERIOD = 4  # load_swa_pattern(4): three chunked layers, then one full
NOPE_PERIOD = 4  # n_no_rope_layer_step: every fourth layer has no RoPE
TEMPERATURE = (0.1, CHUNK)  # f_attn_temp_scale, n_attn_temp_floor_scale
TEMPERATURE_OFFSET = 1.0  # f_attn_temp_offset
NO_QK_NORM_EXPERTS = 128  # Maverick (17B-128E) has no q/k L2 norm


def llama4(gf: GGUFFile) -> DecoderArgs:
    m = gf.metadata
    if not m.get(Keys.LLM.EXPERT_COUNT, 0):
        raise ValueError("llama4 needs expert_count > 0 (llama.cpp refuses a file without experts)")
    require(gf, Keys.LLM.INTERLEAVE_MOE_LAYER_STEP)  # llama.cpp requires it; the file's tensors place the experts
    if m.get(Keys.Attention.SLIDING_WINDOW, None) == 0:
        # llama.cpp then turns chunking off but still scales the last (NoPE) layer's queries
        # with temperature constants of 0 (floor((p + 0) / 0)): it cannot run such a file
        raise ValueError("llama4 files without chunked attention (sliding_window 0) are not supported")
    args = decoder_args(gf, rope="norm",
                        moe={"gating": "sigmoid", "select_logits": True, "weight_input": True, "normalize": False})
    n = args.n_layers
    rotates = tuple((i + 1) % NOPE_PERIOD != 0 for i in range(n))
    swa_base = m.get(Keys.Rope.FREQ_BASE_SWA)  # the chunked layers' base, where the file sets one
    return dataclasses.replace(
        args,
        sliding=file_sliding_pattern(gf, n, CHUNKED_PERIOD), sliding_window=CHUNK,
        swa_rope=dataclasses.replace(args.rope, base=swa_base) if swa_base is not None else None,
        rope_layers=rotates,
        qk_unit_norm=m[Keys.LLM.EXPERT_COUNT] != NO_QK_NORM_EXPERTS,
        attn_temperature=TEMPERATURE, attn_temperature_offset=TEMPERATURE_OFFSET,
        attn_temperature_layers=tuple(not r for r in rotates),
    )


class Llama4Decoder(Decoder):
    """The decoder whose sliding layers attend in chunks of `args.sliding_window` positions."""

    batchable = False  # a chunked cache has no batched form

    def make_cache(self) -> list[KVCache | ChunkedKVCache]:
        return [ChunkedKVCache(self.args.sliding_window) if b.sliding else KVCache() for b in self.blk]

    def masks(self, L: int, caches: list) -> list:
        # Decoder.masks probes a fresh cache of a layer's kind where none is given: chunked ones here
        return super().masks(L, [c if c is not None else new for c, new in zip(caches, self.make_cache())])


ARCH = Arch(name="llama4", args=llama4, model=Llama4Decoder,
            hf_architectures=("Llama4ForConditionalGeneration", "Llama4ForCausalLM"),
            description="Meta Llama 4 Scout / Maverick (text): chunked attention, interleaved MoE",
            convert=convert_hooks.Llama4)
