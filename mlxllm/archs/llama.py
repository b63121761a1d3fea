"""Llama (2, 3, 3.1 with rope_freqs, Mistral-style, SmolLM2) and the llama-shaped families
that differ only in hyperparameters (src/models/llama.cpp).

llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE rotates adjacent
pairs (LLAMA_ROPE_TYPE_NORM); the kernels' `traditional` rotation is that one, so the
weights are used as stored.
"""

from __future__ import annotations

from ..gguf import GGUFFile
from ..nn import Decoder, DecoderArgs
from ..registry import Arch
from .base import decoder_args


def hparams(gf: GGUFFile) -> DecoderArgs:
    return decoder_args(gf, rope="norm")


ARCH = Arch(
    name="llama",
    args=hparams,
    model=Decoder,
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    description="Llama 2/3, Mistral-style and SmolLM2 decoders",
)
