"""Embeddings: a model's last hidden states pooled per text, then L2-normalized.

    model, tokenizer = mlxllm.load("tests/fixtures/archs/bert.f32.gguf")
    vectors = mlxllm.embed(model, tokenizer, ["a text", "another"])   # list of lists

The hidden states come from an encoder (`Arch.kind == "encoder"`: `model(tokens, lengths)`
returns them after its final norm) or from a plain decoder stack (its blocks and final
norm, the output projection left out, as llama.cpp's t_embd). Pooling is llama.cpp's
(LLAMA_POOLING_TYPE, read from the file's `pooling_type`): mean over a text's tokens, cls
(its first token), last (its last token), none (one vector per token), or rank (a
cross-encoder's classifier head: one score per label for each input, never normalized; the
input is the query and document already joined, as the caller formats them). A file that
names no pooling (most decoders) is pooled by mean. Normalization is L2, as llama.cpp's
embd_normalize default and Ollama's /api/embed do; `normalize=False` keeps the raw pooled
vectors.

Texts run in batches of similar length, padded on the right: an encoder masks the padding
keys (`lengths`), a decoder's causal mask already keeps real tokens from seeing it.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from .nn.decoder import Decoder
from .nn.encoder import Encoder
from .nn.pooling import l2_normalize, pool

POOLINGS = ("mean", "cls", "last", "none", "rank")
DEFAULT_POOLING = "mean"  # where the file names none
BATCH_TOKENS = 8192  # padded tokens per forward pass


def pooling_of(model: nn.Module) -> str:
    """The pooling the model's file asks for (mean where it names none)."""
    kind = getattr(model.args, "pooling", "none")
    return DEFAULT_POOLING if kind == "none" else kind


def hidden_states(model: nn.Module, tokens: mx.array, lengths: mx.array | None = None) -> mx.array:
    """(B, L, D) last hidden states after the final norm; rows padded past `lengths`."""
    if isinstance(model, Encoder):
        return model(tokens, lengths=lengths)
    if isinstance(model, Decoder) and type(model).__call__ is Decoder.__call__:
        # Decoder.__call__ without the output projection: padding sits after every real
        # token, so the causal mask keeps it out of them.
        h = model.input_embeddings(tokens, None)
        caches = [None] * len(model.blk)
        factors = model[model.args.rope_factors]["weight"] if model.args.rope_factors else None
        for block, mask in zip(model.blk, model.masks(tokens.shape[1], caches)):
            h = block(h, mask, None, factors)
        return model.output_norm(h) if model.output_norm is not None else h
    raise TypeError(f"{type(model).__name__} gives no hidden states to embed")


def tokenize(tokenizer, texts: Sequence[str], limit: int, truncate: bool = True) -> list[list[int]]:
    """Each text's tokens with the file's special tokens ([CLS] ... [SEP] for BERT); a text
    past `limit` tokens keeps its first `limit` (truncate) or is an error. Cut, it keeps the
    closing token the tokenizer adds (SEP or EOS), as Ollama re-adds it: encoders are trained
    with it, and last-token pooling reads it."""
    closing = {t for t, added in ((getattr(tokenizer, "sep_id", None), getattr(tokenizer, "add_sep", False)),
                                  (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "add_eos", False)))
               if added and t is not None}
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"input {i} is {type(text).__name__}, not a string")
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"input {i} has no tokens")
        if len(ids) > limit:
            if not truncate:
                raise ValueError(f"input {i} has {len(ids)} tokens, past the context of {limit}")
            ids = ids[:limit - 1] + ids[-1:] if ids[-1] in closing else ids[:limit]
        out.append(ids)
    return out


def embed_tokens(model: nn.Module, token_lists: Sequence[Sequence[int]], pooling: str | None = None,
                 normalize: bool = True) -> list:
    """Pooled vectors (pooling "none": per-token vectors) for lists of token ids."""
    kind = pooling or pooling_of(model)
    if kind not in POOLINGS:
        raise ValueError(f"unknown pooling {kind!r} (one of {POOLINGS})")
    if kind == "rank" and not hasattr(model, "rank"):
        raise ValueError(f"{type(model).__name__} has no classifier head to rank with")
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    results: list = [None] * len(token_lists)
    start = 0
    while start < len(order):
        width = len(token_lists[order[start]])
        end = start + 1  # rows sorted by length: the batch is as wide as its last row
        while end < len(order) and len(token_lists[order[end]]) * (end - start + 1) <= max(BATCH_TOKENS, width):
            end += 1
        rows = [token_lists[i] for i in order[start:end]]
        L = len(rows[-1])
        tokens = mx.array([list(r) + [0] * (L - len(r)) for r in rows], mx.int32)
        lengths = mx.array([len(r) for r in rows], mx.int32)
        h = hidden_states(model, tokens, lengths if isinstance(model, Encoder) else None).astype(mx.float32)
        if kind == "none":
            h = l2_normalize(h) if normalize else h
            mx.eval(h)
            for j, i in enumerate(order[start:end]):
                results[i] = h[j, : len(rows[j])].tolist()
        else:
            if kind == "rank":  # scores, not directions: never normalized
                v = model.rank(h, lengths)
            else:
                v = pool(h, lengths, kind)
                v = l2_normalize(v) if normalize else v
            mx.eval(v)
            for j, i in enumerate(order[start:end]):
                results[i] = v[j].tolist()
        start = end
    return results


def embed(model: nn.Module, tokenizer, texts: str | Sequence[str], *, pooling: str | None = None,
          normalize: bool = True, truncate: bool = True) -> list[list[float]]:
    """One vector per text (a single string is one text): the model's hidden states pooled
    as its file says (or `pooling`), L2-normalized unless `normalize=False`. Texts longer
    than the model's context keep their first tokens (`truncate=False`: ValueError)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("no texts to embed")
    token_lists = tokenize(tokenizer, texts, model.args.context_length, truncate)
    return embed_tokens(model, token_lists, pooling, normalize)
