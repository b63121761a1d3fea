"""Shared building blocks of every architecture: norms, rotary positions, attention,
feed-forward activations and the decoder stack that composes them (see decoder.py)."""

from .decoder import Block, Decoder, DecoderArgs, alibi_slopes
from .ffn import XIELU, activate, gate
from .norm import LayerNorm, RMSNorm, norm
from .rope import Rope, RopeArgs, Yarn

__all__ = ["Block", "Decoder", "DecoderArgs", "alibi_slopes", "XIELU", "activate", "gate", "LayerNorm", "RMSNorm",
           "norm", "Rope", "RopeArgs", "Yarn"]
