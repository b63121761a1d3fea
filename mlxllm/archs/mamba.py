"""Mamba, Falcon-Mamba and Mamba-2: a stack of RMSNorm + state-space mixer layers, no
attention (src/models/mamba.cpp; the mixers are nn/ssm.py's). Each layer carries a
`RecurrentCache` (convolution inputs and scan state) instead of keys and values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from gguf import Keys

from .. import convert_hooks, kernels
from ..cache import RecurrentCache
from ..gguf import GGUFFile
from ..nn import RMSNorm
from ..nn.ssm import SSMArgs, init_mamba, mamba
from ..registry import Arch
from .base import require


@dataclass
class MambaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    norm_eps: float
    ssm: SSMArgs
    tensors: Mapping[str, tuple[int, ...]]

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> MambaArgs:
        m = gf.metadata
        version = 2 if gf.architecture == "mamba2" else 1
        eps = m.get(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)
        for key in (Keys.SSM.CONV_KERNEL, Keys.SSM.INNER_SIZE, Keys.SSM.STATE_SIZE, Keys.SSM.TIME_STEP_RANK):
            require(gf, key)
        ssm = SSMArgs.from_metadata(m, version, eps)
        if ssm.d_inner % ssm.n_heads or ssm.n_heads % ssm.n_groups:
            raise ValueError(f"ssm inner size {ssm.d_inner}, {ssm.n_heads} heads and {ssm.n_groups} groups do not divide")
        return cls(vocab_size=gf.tensors["token_embd.weight"].shape[0], dim=require(gf, Keys.LLM.EMBEDDING_LENGTH),
                   n_layers=require(gf, Keys.LLM.BLOCK_COUNT), norm_eps=eps, ssm=ssm,
                   tensors={name: tuple(t.shape) for name, t in gf.tensors.items()})


class MambaBlock(nn.Module):
    def __init__(self, args: MambaArgs, i: int):
        super().__init__()
        self.ssm = args.ssm
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        init_mamba(self, args.dim, args.ssm, lambda leaf: f"blk.{i}.{leaf}" in args.tensors)

    def __call__(self, x: mx.array, cache: RecurrentCache | None) -> mx.array:
        return kernels.residual_add(x, mamba(self, self.attn_norm(x), cache, self.ssm))


class Mamba(nn.Module):
    # Rows share a forward pass: each row's state is its own (BatchRecurrentCache), and no
    # layer needs a mask.
    batchable = True

    def __init__(self, args: MambaArgs):
        super().__init__()
        self.args = args
        self.token_embd = nn.Embedding(args.vocab_size, args.dim)
        self.blk = [MambaBlock(args, i) for i in range(args.n_layers)]
        self.output_norm = RMSNorm(args.dim, args.norm_eps)
        if "output.weight" in args.tensors:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def layers(self) -> list[MambaBlock]:
        return self.blk

    def make_cache(self) -> list[RecurrentCache]:
        return [RecurrentCache() for _ in self.blk]

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        h = self.token_embd(tokens)
        for block, c in zip(self.blk, cache or [None] * len(self.blk)):
            h = block(h, c)
        h = self.output_norm(h)
        return self.output(h) if "output" in self else self.token_embd.as_linear(h)


ARCHS = (
    Arch(name="mamba", args=MambaArgs, model=Mamba,
         hf_architectures=("MambaForCausalLM", "MambaLMHeadModel", "FalconMambaForCausalLM"),
         description="Mamba 1 and Falcon-Mamba (selective state space, no attention)",
         convert=convert_hooks.Mamba),
    Arch(name="mamba2", args=MambaArgs, model=Mamba, hf_architectures=("Mamba2ForCausalLM",),
         description="Mamba 2 (scalar decay per head, grouped B/C, gated RMSNorm)",
         convert=convert_hooks.Mamba2),
)
