"""Embedding routes: Ollama's /api/embed and /api/embeddings, OpenAI's /v1/embeddings and
llama-server's /v1/rerank. `mlxllm.embeddings.embed_tokens` runs on the worker thread, many
inputs per forward pass; an encoder gets no engine and refuses the generation routes."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from .common import ApiError, field_of, json_body, keep_alive_of, model_of
from .engine import Worker
from .pool import ModelPool

MAX_EMBED_INPUTS = 2048  # inputs per OpenAI embeddings request (OpenAI's own limit)


def gives_hidden_states(model) -> bool:
    """What `mlxllm.embeddings.hidden_states` can run: an encoder, or a decoder built on the
    plain `Decoder` forward pass (blocks and final norm without the output projection)."""
    from ..nn.decoder import Decoder
    from ..nn.encoder import Encoder

    return isinstance(model, Encoder) or (isinstance(model, Decoder) and type(model).__call__ is Decoder.__call__)


def has_classifier(model) -> bool:
    from ..nn.encoder import CLS, Encoder

    return isinstance(model, Encoder) and CLS in model


def embedding_width(model) -> int:
    """Floats per pooled vector: the hidden size."""
    return int(model.args.dim)


async def embed_on_worker(worker: Worker, model, token_lists: list[list[int]], pooling: str | None,
                          normalize: bool) -> list[list[float]]:
    """`mlxllm.embeddings.embed_tokens` on the worker thread, one call per forward pass's
    worth of texts (sorted by length, about BATCH_TOKENS padded tokens each), so other
    models' generation steps run between them and a client that leaves stops the rest."""
    from ..embeddings import BATCH_TOKENS, embed_tokens

    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: list = [None] * len(token_lists)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(token_lists[order[end]]) * (end - start + 1) <= BATCH_TOKENS:
            end += 1
        rows = order[start:end]
        vectors = await worker.call(embed_tokens, model, [token_lists[i] for i in rows], pooling, normalize)
        for i, vector in zip(rows, vectors):
            out[i] = vector
        start = end
    return out


def tokenize_texts(tokenizer, texts: list[str], limit: int, truncate: bool, param: str) -> list[list[int]]:
    """Each text's tokens (with the file's special tokens); ApiError 400 for one with none,
    or past `limit` tokens when not truncating."""
    from ..embeddings import tokenize

    try:
        return tokenize(tokenizer, texts, limit, truncate)
    except ValueError as e:
        code = "context_length_exceeded" if "past the context" in str(e) else None
        raise ApiError(400, f"{param}: {e}", param, code) from None


def check_token_lists(token_lists: list[list[int]], vocab_size: int, limit: int, param: str) -> None:
    for i, ids in enumerate(token_lists):
        if not ids:
            raise ApiError(400, f"{param}[{i}] has no tokens", param)
        if max(ids) >= vocab_size:
            raise ApiError(400, f"{param}[{i}] holds a token id outside the vocabulary of {vocab_size}", param)
        if len(ids) > limit:
            raise ApiError(400, f"{param}[{i}] has {len(ids)} tokens, past the context of {limit}", param,
                           "context_length_exceeded")


@dataclass
class Embedded:
    vectors: list[list[float]]
    tokens: int  # tokens evaluated, all inputs together
    load_ns: int
    total_ns: int


async def run_embeddings(app: web.Application, name: str, inputs: list[str] | list[list[int]], *,
                         keep_alive: float | None | str = "default", pooling: str | None = None,
                         normalize: bool = True, truncate: bool = True, num_ctx: int | None = None,
                         param: str = "input") -> Embedded:
    """Load the model, tokenize the inputs (strings, or lists of token ids taken as they
    are) and pool their hidden states on the worker thread, all inputs batched."""
    started = time.perf_counter()
    pool: ModelPool = app["pool"]
    loaded, load_ns = await pool.acquire(name, keep_alive)
    try:
        model = loaded.model
        if not gives_hidden_states(model):
            raise ApiError(400, f"{name!r} does not support embeddings ({type(model).__name__} gives no hidden "
                                "states)", "model")
        if pooling == "rank" and not has_classifier(model):
            raise ApiError(400, f"{name!r} has no classifier head to rerank with: it is not a reranker", "model")
        limit = model.args.context_length
        limit = min(num_ctx, limit) if num_ctx else limit
        if inputs and isinstance(inputs[0], str):
            token_lists = await asyncio.get_running_loop().run_in_executor(
                None, tokenize_texts, loaded.tokenizer, inputs, limit, truncate, param)
        else:
            token_lists = [list(ids) for ids in inputs]
            check_token_lists(token_lists, model.args.vocab_size, limit, param)
        vectors = await embed_on_worker(pool.worker, model, token_lists, pooling, normalize) if token_lists else []
    finally:
        pool.release(loaded)
    return Embedded(vectors, sum(map(len, token_lists)), load_ns, int((time.perf_counter() - started) * 1e9))


def ollama_embed_options(body: dict) -> int | None:
    """num_ctx from Ollama's options (the others are sampling options: nothing to embed)."""
    options = field_of(body, "options", "object", {})
    num_ctx = field_of(options, "num_ctx", "int", where="options.")
    if num_ctx is not None and num_ctx < 1:
        raise ApiError(400, "options.num_ctx must be positive", "num_ctx")
    return num_ctx


def shorten(vector: list[float], dimensions: int) -> list[float]:
    """Ollama's `dimensions`: the first `dimensions` floats, L2-normalized again."""
    head = np.asarray(vector[:dimensions], np.float32)
    return (head / max(float(np.linalg.norm(head)), 1e-12)).tolist()


async def api_embed(request: web.Request) -> web.Response:
    """Ollama's /api/embed: L2-normalized vectors, one per input, the inputs batched; an
    empty string (or no input) only loads the model, as in Ollama."""
    body = await json_body(request)
    model = model_of(body)
    inputs = body.get("input")
    if inputs is None or inputs == "":
        texts = []
    elif isinstance(inputs, str):
        texts = [inputs]
    elif isinstance(inputs, list) and all(isinstance(s, str) for s in inputs):
        if not inputs:
            raise ApiError(400, "input is an empty array: give a string or an array of strings", "input")
        texts = inputs
    else:
        raise ApiError(400, "invalid input type: input must be a string or an array of strings", "input")
    truncate = field_of(body, "truncate", "bool", True)
    dimensions = field_of(body, "dimensions", "int")
    if dimensions is not None and dimensions < 1:
        raise ApiError(400, f"dimensions must be a positive integer, not {dimensions}", "dimensions")
    num_ctx = ollama_embed_options(body)
    done = await run_embeddings(request.app, model, texts, keep_alive=keep_alive_of(body), truncate=truncate,
                                num_ctx=num_ctx)
    vectors = done.vectors
    if dimensions is not None:
        vectors = [shorten(v, dimensions) if dimensions < len(v) else v for v in vectors]
    return web.json_response({"model": model, "embeddings": vectors, "total_duration": done.total_ns,
                              "load_duration": done.load_ns, "prompt_eval_count": done.tokens})


async def api_embeddings(request: web.Request) -> web.Response:
    """Ollama's legacy /api/embeddings: one prompt, its pooled vector as the model gives it
    (not normalized, as in Ollama); an empty prompt only loads the model."""
    body = await json_body(request)
    model = model_of(body)
    prompt = field_of(body, "prompt", "string", "")
    num_ctx = ollama_embed_options(body)
    done = await run_embeddings(request.app, model, [prompt] if prompt else [], keep_alive=keep_alive_of(body),
                                normalize=False, num_ctx=num_ctx, param="prompt")
    return web.json_response({"embedding": done.vectors[0] if done.vectors else []})


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def openai_embedding_inputs(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's input: a string, an array of strings, an array of token ids, or an array of
    such arrays; none of them empty, at most MAX_EMBED_INPUTS."""
    if isinstance(value, str) or _is_token_ids(value):  # one input
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "input must be a non-empty string, array of strings, array of token ids or array of "
                            "token id arrays", "input")
    if len(value) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"input has {len(value)} entries; at most {MAX_EMBED_INPUTS} are allowed", "input")
    if all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            if not v:
                raise ApiError(400, f"input[{i}] is an empty string", "input")
        return value
    if all(_is_token_ids(v) for v in value):
        return value
    raise ApiError(400, "input must be a non-empty string, array of strings, array of token ids or array of "
                        "token id arrays (each non-empty, not mixed)", "input")


async def v1_embeddings(request: web.Request) -> web.Response:
    """OpenAI's /v1/embeddings: L2-normalized vectors as floats or base64 (little-endian
    float32), the inputs batched; a text past the context is refused, as OpenAI does."""
    body = await json_body(request)
    model = model_of(body)
    inputs = openai_embedding_inputs(body.get("input"))
    encoding = field_of(body, "encoding_format", "string", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be float or base64, not {encoding!r}", "encoding_format")
    dimensions = field_of(body, "dimensions", "int")
    if dimensions is not None and dimensions < 1:
        raise ApiError(400, f"dimensions must be at least 1, not {dimensions}", "dimensions", "invalid_value")
    field_of(body, "user", "string")
    if dimensions is not None:
        # Only a model trained for shorter vectors (Matryoshka) can give them, and a GGUF
        # file does not say whether it was; its own width is the one size it can give.
        loaded, _ = await request.app["pool"].acquire(model)
        width = embedding_width(loaded.model)
        request.app["pool"].release(loaded)
        if dimensions != width:
            raise ApiError(400, f"{model!r} does not support specifying dimensions: its vectors have {width}",
                           "dimensions", "invalid_value")
    done = await run_embeddings(request.app, model, inputs, truncate=False)

    def encoded(vector: list[float]) -> list[float] | str:
        if encoding == "float":
            return vector
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")

    return web.json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(done.vectors)],
        "model": model,
        "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
    })


def rerank_tokens(tokenizer, template: str | None, query: str, document: str) -> list[int]:
    """A query and a document as one cross-encoder input, as llama-server's
    format_prompt_rerank joins them: the file's rerank template (tokenizer.chat_template.rerank)
    with {query} and {document} filled in, else BOS? query EOS? SEP? document EOS? per the
    vocabulary's add_bos / add_eos / add_sep (EOS falling back to SEP)."""
    if template is not None:
        text = template.replace("{query}", query).replace("{document}", document)
        return tokenizer.encode(text, add_special=False, parse_special=True)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    ids = [tokenizer.bos_id] if tokenizer.add_bos else []
    ids += tokenizer.encode(query, add_special=False)
    ids += [eos] if tokenizer.add_eos else []
    ids += [tokenizer.sep_id] if tokenizer.add_sep else []
    ids += tokenizer.encode(document, add_special=False)
    ids += [eos] if tokenizer.add_eos else []
    return ids


RERANK_TEMPLATE = "tokenizer.chat_template.rerank"


async def v1_rerank(request: web.Request) -> web.Response:
    """llama-server's /v1/rerank: {query, documents, top_n} -> results {index,
    relevance_score} best first; the score is the classifier's first output, as llama.cpp
    reports it (a logit: no sigmoid). Only for files with a classifier head."""
    body = await json_body(request)
    model = model_of(body)
    query = body.get("query")
    if not isinstance(query, str):
        raise ApiError(400, "query must be a string" if "query" in body else "query must be provided", "query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise ApiError(400, "documents must be a non-empty array of strings", "documents")
    top_n = field_of(body, "top_n", "int", len(documents))
    if top_n < 0:
        raise ApiError(400, f"top_n must not be negative, not {top_n}", "top_n")
    pool: ModelPool = request.app["pool"]
    loaded, _ = await pool.acquire(model, "default")
    try:
        template = loaded.model.gguf.metadata.get(RERANK_TEMPLATE)
        token_lists = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [rerank_tokens(loaded.tokenizer, template, query, d) for d in documents])
        done = await run_embeddings(request.app, model, token_lists, pooling="rank", normalize=False,
                                    param="documents")
    finally:
        pool.release(loaded)
    scores = [v[0] for v in done.vectors]
    order = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n]
    return web.json_response({
        "model": model, "object": "list", "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
        "results": [{"index": i, "relevance_score": scores[i]} for i in order],
    })


ROUTES = [("POST", "/api/embed", api_embed), ("POST", "/api/embeddings", api_embeddings),
          ("POST", "/v1/embeddings", v1_embeddings), ("POST", "/v1/rerank", v1_rerank)]
