"""tinylm: a deliberately small architecture shipped by a separate distribution.

A residual stack of RMSNorm + ReLU MLP blocks over token embeddings. It exists to prove
that a package outside mlxllm can add an architecture through the `mlxllm.archs` entry
point, with nothing in mlxllm changed.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlxllm import Arch


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    hidden: int
    n_layers: int
    eps: float

    @classmethod
    def from_gguf(cls, gf):
        m = gf.metadata
        return cls(vocab_size=gf.tensors["token_embd.weight"].shape[0], dim=m["embedding_length"],
                   hidden=m["feed_forward_length"], n_layers=m["block_count"],
                   eps=m.get("attention.layer_norm_rms_epsilon", 1e-5))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.eps)
        self.ffn_up = nn.Linear(args.dim, args.hidden, bias=False)
        self.ffn_down = nn.Linear(args.hidden, args.dim, bias=False)

    def __call__(self, x):
        return x + self.ffn_down(nn.relu(self.ffn_up(self.ffn_norm(x))))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embd = nn.Embedding(args.vocab_size, args.dim)
        self.blk = [Block(args) for _ in range(args.n_layers)]
        self.output_norm = nn.RMSNorm(args.dim, eps=args.eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.blk

    def make_cache(self):
        return [None] * len(self.blk)  # no attention, nothing to cache

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        h = self.token_embd(tokens)
        for block in self.blk:
            h = block(h)
        return self.output(self.output_norm(h))


ARCH = Arch(name="tinylm", aliases=("tiny-lm",), args=ModelArgs, model=Model,
            description="test plugin: residual MLP language model")
