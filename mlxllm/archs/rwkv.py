"""RWKV-6 (Finch; src/models/rwkv6.cpp) and RWKV-7 (Goose; rwkv7.cpp): attention-free layers
on nn/rwkv.py, a time mix (token shift, a WKV recurrence: RWKV-6's with a data-dependent decay,
RWKV-7's generalized delta rule) and a channel mix, each behind a LayerNorm; the embeddings
LayerNorm'd (token_embd_norm) before the first layer."""

from __future__ import annotations

from gguf import Keys

from .. import convert_hooks
from ..gguf import GGUFFile
from ..nn.rwkv import RWKV6, RWKV7, RWKV6Args, RWKV7Args
from ..registry import Arch
from .base import require


def _common(gf: GGUFFile) -> dict:
    """What both versions read: sizes, the LayerNorms' eps, the tensor shapes."""
    m = gf.metadata
    dim, head = require(gf, Keys.LLM.EMBEDDING_LENGTH), require(gf, Keys.WKV.HEAD_SIZE)
    if m.get(Keys.LLM.TOKEN_SHIFT_COUNT, 2) != 2:  # 1: the hybrids with RMSNorm (rwkv6qwen2, arwkv7)
        raise ValueError("RWKV files with a token_shift_count other than 2 are not supported")
    if not (head > 0 and dim % head == 0):
        raise ValueError(f"wkv.head_size {head} must divide embedding_length {dim}")
    n_layers = require(gf, Keys.LLM.BLOCK_COUNT)
    blocks = {name.split(".")[1] for name in gf.tensors if name.startswith("blk.")}
    if not isinstance(n_layers, int) or not 0 < n_layers <= len(blocks):
        raise ValueError(f"block_count {n_layers!r} does not match the {len(blocks)} blocks the file holds")
    return dict(vocab_size=gf.tensors["token_embd.weight"].shape[0], dim=dim, n_layers=n_layers, head_size=head,
                ffn_dim=require(gf, Keys.LLM.FEED_FORWARD_LENGTH), norm_eps=m.get(Keys.Attention.LAYERNORM_EPS, 1e-5),
                tensors={name: tuple(t.shape) for name, t in gf.tensors.items()})


def rwkv6(gf: GGUFFile) -> RWKV6Args:
    m = gf.metadata
    return RWKV6Args(**_common(gf), mix_dim=require(gf, Keys.LLM.TIME_MIX_EXTRA_DIM),
                     decay_dim=require(gf, Keys.LLM.TIME_DECAY_EXTRA_DIM),
                     rescale_every=m.get(Keys.LLM.RESCALE_EVERY_N_LAYERS, 0))


def rwkv7(gf: GGUFFile) -> RWKV7Args:
    return RWKV7Args(**_common(gf), lora_decay=require(gf, Keys.Attention.DECAY_LORA_RANK),
                     lora_iclr=require(gf, Keys.Attention.ICLR_LORA_RANK),
                     lora_value=require(gf, Keys.Attention.VALUE_RESIDUAL_MIX_LORA_RANK),
                     lora_gate=require(gf, Keys.Attention.GATE_LORA_RANK))


ARCHS = (
    Arch(name="rwkv6", args=rwkv6, model=RWKV6, hf_architectures=("Rwkv6ForCausalLM",),
         description="RWKV-6 Finch (attention-free: WKV-6 recurrence)", convert=convert_hooks.Rwkv6),
    Arch(name="rwkv7", args=rwkv7, model=RWKV7, hf_architectures=("Rwkv7ForCausalLM", "RWKV7ForCausalLM"),
         description="RWKV-7 Goose (attention-free: generalized delta rule)", convert=convert_hooks.Rwkv7),
)
