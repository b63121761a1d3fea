"""Bidirectional encoders (BERT and its descendants) from the decoder's pieces, the way
llama.cpp's src/models/bert.cpp, modern-bert.cpp and eurobert.cpp compose them.

An encoder is a `Decoder` whose attention sees every token of its sequence (no mask, no
cache) and which stops at the hidden states: `model(tokens[B, L]) -> hidden[B, L, D]` after
the final norm; pooling and normalization sit on top (mlxllm/embed.py). What it adds:

- token types: the file's `token_types` table, row 0 added to every token (llama.cpp feeds
  every token as "sentence A"); learned absolute positions come from `position_embd` as
  in GPT-2, rotary ones from the blocks' rope;
- post-norm layers (BERT, nomic-bert, jina-bert-v2): each residual sum is normalized,
  h = attn_output_norm(x + attn(x)); out = layer_output_norm(h + ffn(h)); pre-norm encoders
  (ModernBERT, EuroBERT) use the decoder's own `Block`;
- symmetric sliding windows (ModernBERT's local layers): a query sees keys within
  window // 2 positions either side (llama.cpp LLAMA_SWA_TYPE_SYMMETRIC);
- padding: `lengths` (B,) masks the keys past each row's length, so rows of different
  lengths run as one batch;
- a classifier head where the file has one (cross-encoders, rerankers): `rank(hidden,
  lengths)` is llama.cpp's LLAMA_POOLING_TYPE_RANK, the scores of each row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
from gguf import MODEL_TENSOR, TENSOR_NAMES

from .decoder import Block, Decoder, DecoderArgs
from .ffn import activate
from .norm import norm
from .pooling import pool


def _leaf(tensor: MODEL_TENSOR) -> str:
    """A per-layer tensor's name without its "blk.{bid}." prefix."""
    return TENSOR_NAMES[tensor].removeprefix("blk.{bid}.")


ATTN_OUT_NORM = _leaf(MODEL_TENSOR.ATTN_OUT_NORM)
LAYER_OUT_NORM = _leaf(MODEL_TENSOR.LAYER_OUT_NORM)
TOKEN_TYPES = TENSOR_NAMES[MODEL_TENSOR.TOKEN_TYPES]
POSITION_EMBD = TENSOR_NAMES[MODEL_TENSOR.POS_EMBD]
CLS = TENSOR_NAMES[MODEL_TENSOR.CLS]  # the head's dense layer; its other parts hang off it
CLS_OUT = TENSOR_NAMES[MODEL_TENSOR.CLS_OUT].removeprefix(f"{CLS}.")
CLS_NORM = TENSOR_NAMES[MODEL_TENSOR.CLS_NORM].removeprefix(f"{CLS}.")


@dataclass
class EncoderArgs(DecoderArgs):
    post_norm: bool = False  # BERT-style layers: norms after each residual sum
    pooling: str = "none"  # the file's pooling_type (nn.pooling.POOLING); the embed module applies it
    classifier_pooling: str = "cls"  # what the classifier head reads: "cls" or "mean" (rank pooling)
    classifier_activation: str = "tanh"  # after the head's dense layer (ModernBERT: gelu_tanh)

    @classmethod
    def extend(cls, args: DecoderArgs, **kw) -> EncoderArgs:
        """An encoder's arguments from a decoder's (`archs.base.decoder_args`) plus `kw`."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(DecoderArgs)}, **kw)


class LabelProjection(nn.Linear):
    """A classifier's layer, weight (out, D), or (D,) for one output: files write a one-row
    matrix as a vector (the quantizer drops the unit axis)."""

    def __init__(self, shape: tuple[int, ...], bias: bool):
        super().__init__(shape[-1], 1 if len(shape) == 1 else shape[0], bias=bias)
        self.weight = mx.zeros(shape)

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.reshape(-1, x.shape[-1])
        return x @ w.T + self.bias if "bias" in self else x @ w.T

    def _extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, bias={'bias' in self}"


class PostNormBlock(Block):
    """A BERT layer: attention and FFN each added to their input, then normalized."""

    def __init__(self, args: EncoderArgs, i: int):
        super().__init__(args, i)
        for leaf in (ATTN_OUT_NORM, LAYER_OUT_NORM):
            setattr(self, leaf, norm(args.norm, args.dim, args.norm_eps, args.tensors, f"blk.{i}.{leaf}"))

    def __call__(self, x: mx.array, mask, cache, factors: mx.array | None) -> mx.array:
        h = self[ATTN_OUT_NORM](x + self.attention(x, mask, None, factors))
        if self.attn_norm_2 is not None:  # jina-bert-v2: the layer input added and normalized again
            h = self.attn_norm_2(h + x)
        return self[LAYER_OUT_NORM](h + self.feed_forward(h))


class Encoder(Decoder):
    """Embeddings (+ token type 0, + learned positions), bidirectional blocks, final norm:
    `model(tokens[B, L], lengths=None) -> hidden states[B, L, D]`."""

    batchable = False  # not for the generation loop: no cache, no logits (it pads by `lengths`)

    def __init__(self, args: EncoderArgs):
        super().__init__(args)
        shape = args.tensors.get(f"{TOKEN_TYPES}.weight")
        if shape is not None:  # one row is written as a vector (the quantizer drops the unit axis)
            setattr(self, TOKEN_TYPES, nn.Embedding(*shape) if len(shape) == 2 else {"weight": mx.zeros(shape)})

        if args.has(f"{CLS}.weight") or args.has(f"{CLS}.{CLS_OUT}.weight"):
            self._init_classifier(args)

    def _init_classifier(self, args: EncoderArgs) -> None:
        """llama.cpp's rank head, each part where the file has it: cls (dense), cls.norm,
        cls.output (the scores; one label is written as a vector)."""
        t = args.tensors
        if args.has(f"{CLS}.weight"):  # (D, D), or one score as (D,) (jina-reranker-v1)
            setattr(self, CLS, LabelProjection(t[f"{CLS}.weight"], bias=args.has(f"{CLS}.bias")))
        else:  # a direct projection (BertForSequenceClassification): the head holds only cls.output
            setattr(self, CLS, nn.Module())
        head = self[CLS]
        if args.has(f"{CLS}.{CLS_NORM}.weight"):
            setattr(head, CLS_NORM, norm("layer", t[f"{CLS}.{CLS_NORM}.weight"][0], args.norm_eps, t, f"{CLS}.{CLS_NORM}"))
        if args.has(f"{CLS}.{CLS_OUT}.weight"):
            shape = t[f"{CLS}.{CLS_OUT}.weight"]
            setattr(head, CLS_OUT, LabelProjection(shape, bias=args.has(f"{CLS}.{CLS_OUT}.bias")))

    def __setitem__(self, key: str, value) -> None:  # (attribute assignment lands here too)
        # The loader swaps a layer whose weight is quantized for a QuantizedLinear: the
        # classifier's parts that hang off its dense layer move to the swapped one.
        old = self.get(key) if key == CLS else None
        if isinstance(old, nn.Module) and isinstance(value, nn.Module) and value is not old:
            for name in (CLS_OUT, CLS_NORM):
                if name in old and name not in value:
                    value[name] = old[name]
        super().__setitem__(key, value)

    def rank(self, hidden: mx.array, lengths: mx.array) -> mx.array:
        """(B, L, D) hidden states -> (B, labels) classifier scores (llama.cpp's rank pooling)."""
        if CLS not in self:
            raise ValueError("the file has no classifier head (cls / cls.output) to rank with")
        head = self[CLS]
        x = pool(hidden, lengths, self.args.classifier_pooling)
        if "weight" in head:
            y, act = head(x), self.args.classifier_activation
            x = mx.tanh(y) if act == "tanh" else activate(y, act)
            if CLS_NORM in head:
                x = head[CLS_NORM](x)
        if CLS_OUT in head:
            x = head[CLS_OUT](x).reshape(x.shape[0], -1)
        return x

    def block(self, args: EncoderArgs, i: int) -> Block:
        return PostNormBlock(args, i) if args.post_norm else Block(args, i)

    def make_cache(self) -> list:
        raise TypeError("an encoder attends in both directions and keeps no cache; call it on whole sequences")

    def input_embeddings(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        h = self.token_embd(tokens)
        if self.args.embed_scale != 1.0:
            h = h * self.args.embed_scale
        if TOKEN_TYPES in self:
            types = self[TOKEN_TYPES]
            h = h + (types(mx.zeros((1,), mx.int32)) if isinstance(types, nn.Module) else types["weight"])
        if POSITION_EMBD in self:
            h = h + self[POSITION_EMBD](mx.arange(tokens.shape[1]))
        if "token_embd_norm" in self:
            h = self.token_embd_norm(h)
        return h

    def attention_masks(self, L: int, lengths: mx.array | None) -> list[mx.array | None]:
        """Per block: None (every key), the symmetric window (L, L) of a sliding block, and
        with `lengths` each row's real keys only (B, 1, 1 or L, L)."""
        keys = None if lengths is None else (mx.arange(L)[None, :] < lengths[:, None])[:, None, None, :]
        window = None
        if any(b.sliding for b in self.blk):
            distance = mx.abs(mx.arange(L)[None, :] - mx.arange(L)[:, None])
            window = distance <= self.args.sliding_window // 2
        masks = []
        for b in self.blk:
            m = window if b.sliding else None
            if keys is not None:
                m = keys if m is None else keys & m
            masks.append(m)
        return masks

    def __call__(self, tokens: mx.array, cache: list | None = None, lengths: mx.array | None = None) -> mx.array:
        if cache:
            raise TypeError("an encoder keeps no cache: call it on whole sequences")
        h = self.input_embeddings(tokens)
        factors = self[self.args.rope_factors]["weight"] if self.args.rope_factors else None
        for block, mask in zip(self.blk, self.attention_masks(tokens.shape[1], lengths)):
            h = block(h, mask, None, factors)
        return self.output_norm(h) if self.output_norm is not None else h
