"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens, thin routes over
the same generation loop as the other APIs. Anthropic's own shapes throughout: content
blocks, stop reasons, the streamed event sequence, and {"type": "error", ...} errors."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from aiohttp import web

from ..generate import encode_prompt
from .common import (
    ApiError,
    anthropic_error,
    field_of,
    in_range,
    json_body,
    sampling,
    sse_stream,
    stop_list,
)
from .generation import Request, Run, render, start
from .pool import ModelPool, refuse_embedding_model

log = logging.getLogger("mlxllm.server")

# Anthropic's sampling has no repetition penalty, top-k or top-p unless asked, and samples
# at temperature 1 by default; mlxllm's SamplingParams carry llama.cpp's defaults instead.
ANTHROPIC_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repeat_penalty": 1.0}

def event(name: str, data: dict) -> bytes:
    """One server-sent event as Anthropic writes it: the event name, then its JSON."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# ---------------------------------------------------------------------------- requests

def _text_of(content: Any, where: str) -> str:
    """A system prompt or tool result: a string, or text blocks (joined by blank lines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise ApiError(400, f"{where}.{i}: each content block must be an object with a type", where)
            if block["type"] != "text":
                raise ApiError(400, f"{where}.{i}: {block['type']} blocks are not supported here: mlxllm "
                                    "reads text only", where)
            if not isinstance(block.get("text"), str):
                raise ApiError(400, f"{where}.{i}.text: Field required", where)
            texts.append(block["text"])
        return "\n\n".join(texts)
    raise ApiError(400, f"{where}: Input should be a string or a list of content blocks", where)


def chat_messages(body: dict) -> tuple[list[dict], str | None]:
    """Anthropic's system and messages as chat-template messages, and the text of a final
    assistant message (a prefill: the answer continues it)."""
    out = []
    if body.get("system") is not None:
        system = _text_of(body["system"], "system")
        if system:
            out.append({"role": "system", "content": system})
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages: Field required", "messages")
    if not isinstance(messages, list):
        raise ApiError(400, "messages: Input should be a valid list", "messages")
    if not messages:
        raise ApiError(400, "messages: at least one message is required", "messages")
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: Input should be an object", "messages")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role: Input should be 'user' or 'assistant', not {json.dumps(role)}",
                           "messages")
        content = m.get("content")
        if content is None:
            raise ApiError(400, f"{where}.content: Field required", "messages")
        if isinstance(content, list):  # thinking blocks a client hands back are left out of the prompt
            content = [b for b in content if not (isinstance(b, dict) and b.get("type") in
                                                  ("thinking", "redacted_thinking"))]
        out.append({"role": role, "content": _text_of(content, f"{where}.content")})
    prefill = None
    if out[-1]["role"] == "assistant":
        prefill = out.pop()["content"]
        if prefill != prefill.rstrip():
            raise ApiError(400, "final assistant content cannot end with trailing whitespace", "messages")
    return out, prefill


def prompt_builder(messages: list[dict], prefill: str | None, counted: dict):
    """The Request's build: the chat template's rendering (then the prefill), tokenized; the
    prompt's length is kept in counted["prompt_tokens"] for message_start."""
    def build(tokenizer, limit: int) -> list[int]:
        text = render(tokenizer, messages, None) + (prefill or "")
        ids = encode_prompt(tokenizer, text, limit)
        counted["prompt_tokens"] = len(ids)
        return ids
    return build


def messages_request(body: dict, model: str, counted: dict) -> Request:
    messages, prefill = chat_messages(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise ApiError(400, "max_tokens: Field required", "max_tokens")
    max_tokens = field_of(body, "max_tokens", "int")
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens: Input should be greater than or equal to 1, not {max_tokens}", "max_tokens")
    values = dict(ANTHROPIC_DEFAULTS)
    for key, kind in (("temperature", "number"), ("top_p", "number"), ("top_k", "int")):
        value = field_of(body, key, kind)
        if value is not None:
            values[key] = value
    in_range(values["temperature"], "temperature", 0, 1)
    in_range(values["top_p"], "top_p", 0, 1)
    if values["top_k"] < 0:
        raise ApiError(400, f"top_k must be at least 0, not {values['top_k']}", "top_k")
    field_of(body, "stream", "bool")
    field_of(body, "metadata", "object")  # accepted, not used
    if isinstance(body.get("stop_sequences"), str):
        raise ApiError(400, "stop_sequences: Input should be a valid list", "stop_sequences")
    stops = stop_list(body.get("stop_sequences"), "stop_sequences")
    return Request(model=model, build=prompt_builder(messages, prefill, counted), params=sampling(values),
                   max_tokens=max_tokens, num_ctx=None, stop=stops, schema=output_schema(body))


def output_schema(body: dict) -> dict | None:
    """Structured outputs: output_config.format {"type": "json_schema", "schema": ...},
    enforced by the grammar engine."""
    config = field_of(body, "output_config", "object", {})
    fmt = field_of(config, "format", "object", None, "output_config.")
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, "output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}",
                       "output_config")
    return fmt["schema"]


def model_field(body: dict) -> str:
    name = field_of(body, "model", "string")
    if not name:
        raise ApiError(400, "model: Field required", "model")
    return name


# ---------------------------------------------------------------------------- answers

def matched_stop(run: Run, stats: dict) -> str | None:
    """The stop sequence that ended the output, if one did: the engine reports "stop" for
    EOS and stop strings alike, so the generated tokens are read again (the earliest
    stop string in them is the one the engine cut at)."""
    stops = [s for s in run.request.stop if s]
    if stats["finish_reason"] != "stop" or not stops:
        return None
    text = run.loaded.tokenizer.decode(stats["context"][stats["prompt_tokens"]:])
    found = [(text.find(s), -len(s), s) for s in stops if s in text]
    return min(found)[2] if found else None


def stop_reason(run: Run, stats: dict) -> tuple[str, str | None]:
    if stats["finish_reason"] == "length":
        return "max_tokens", None
    sequence = matched_stop(run, stats)
    return ("stop_sequence", sequence) if sequence is not None else ("end_turn", None)


def usage(stats: dict) -> dict:
    """Anthropic counts prompt tokens read from a cache apart from input_tokens: the prefix
    cache's reused tokens are cache_read_input_tokens."""
    cached = stats["cached_tokens"]
    return {"input_tokens": stats["prompt_tokens"] - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": stats["completion_tokens"]}


def message_head(ident: str, model: str) -> dict:
    return {"id": ident, "type": "message", "role": "assistant", "model": model, "content": []}


async def messages_respond(request: web.Request, body: dict, req: Request, counted: dict) -> web.StreamResponse:
    ident = "msg_" + uuid.uuid4().hex[:24]
    run = await start(request.app, req)
    try:
        if not body.get("stream"):
            pieces = []
            async for kind, value in run.events():
                if kind == "text":
                    pieces.append(value)
                    continue
                reason, sequence = stop_reason(run, value)
                text = "".join(pieces)
                return web.json_response({**message_head(ident, req.model),
                                          "content": [{"type": "text", "text": text}] if text else [],
                                          "stop_reason": reason, "stop_sequence": sequence, "usage": usage(value)})
        response = await sse_stream(request)
        try:
            start_usage = {"input_tokens": counted["prompt_tokens"], "cache_creation_input_tokens": 0,
                           "cache_read_input_tokens": 0, "output_tokens": 0}
            await response.write(event("message_start", {"type": "message_start", "message": {
                **message_head(ident, req.model), "stop_reason": None, "stop_sequence": None, "usage": start_usage}}))
            await response.write(event("content_block_start", {"type": "content_block_start", "index": 0,
                                                               "content_block": {"type": "text", "text": ""}}))
            await response.write(event("ping", {"type": "ping"}))
            async for kind, value in run.events():
                if kind == "text":
                    if value:
                        await response.write(event("content_block_delta", {
                            "type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": value}}))
                    continue
                await response.write(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
                reason, sequence = stop_reason(run, value)
                await response.write(event("message_delta", {
                    "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": usage(value)}))
                await response.write(event("message_stop", {"type": "message_stop"}))
        except ApiError as e:  # headers are sent: the error goes in the stream
            await response.write(event("error", anthropic_error(e.status, e.message)))
        await response.write_eof()
        return response
    except ConnectionResetError:
        log.info("%s %s: client went away", request.method, request.path)
        return web.Response(status=499)
    finally:
        run.close()


# ---------------------------------------------------------------------------- routes

async def v1_messages(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_field(body)
    counted: dict = {}
    req = messages_request(body, model, counted)
    return await messages_respond(request, body, req, counted)


async def v1_count_tokens(request: web.Request) -> web.Response:
    """The prompt's token count as /v1/messages would build it (the model is loaded for
    its tokenizer and chat template)."""
    body = await json_body(request)
    model = model_field(body)
    messages, prefill = chat_messages(body)
    counted: dict = {}
    build = prompt_builder(messages, prefill, counted)
    await refuse_embedding_model(model)
    pool: ModelPool = request.app["pool"]
    loaded, _ = await pool.acquire(model)
    try:
        await asyncio.get_running_loop().run_in_executor(None, build, loaded.tokenizer, None)
    finally:
        pool.release(loaded)
    return web.json_response({"input_tokens": counted["prompt_tokens"]})


ROUTES = [("POST", "/v1/messages", v1_messages), ("POST", "/v1/messages/count_tokens", v1_count_tokens)]
