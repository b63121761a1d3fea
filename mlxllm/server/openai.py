"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .. import __version__
from ..constrain import ANY_OBJECT
from ..generate import encode_prompt
from .common import (
    ApiError,
    field_of,
    in_range,
    json_body,
    model_of,
    sampling,
    sse,
    sse_stream,
    stop_list,
)
from .generation import Request, render, start
from .pool import listed_models, model_path

log = logging.getLogger("mlxllm.server")
FINGERPRINT = f"fp_mlxllm_{__version__}"


def openai_common(body: dict, model: str, build: Callable[[Any, int], list[int]], default_max: int | None) -> Request:
    n = field_of(body, "n", "int", 1)
    if n != 1:
        raise ApiError(400, "n must be 1: mlxllm returns one choice per request", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs are not supported by mlxllm yet", "logprobs")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported by mlxllm yet", "tools")
    max_tokens = field_of(body, "max_completion_tokens", "int") or field_of(body, "max_tokens", "int")
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None and value < 1:
            raise ApiError(400, f"{key} must be at least 1, not {value}", key, "invalid_value")
    values = {k: field_of(body, k, "number") for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty")}
    in_range(values["temperature"], "temperature", 0, 2)
    in_range(values["top_p"], "top_p", 0, 1)
    in_range(values["presence_penalty"], "presence_penalty", -2, 2)
    in_range(values["frequency_penalty"], "frequency_penalty", -2, 2)
    values["seed"] = field_of(body, "seed", "int")
    field_of(body, "stream", "bool")
    options = field_of(body, "stream_options", "object", {})
    field_of(options, "include_usage", "bool", where="stream_options.")
    return Request(model=model, build=build, params=sampling(values),
                   max_tokens=max_tokens if max_tokens is not None else default_max, num_ctx=None,
                   stop=stop_list(body.get("stop")), schema=response_schema(body.get("response_format")))


def response_schema(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "response_format must be an object", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a schema object", "response_format")
        return spec.get("schema", {})
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", "response_format")


def openai_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user, assistant or tool, "
                                f"not {json.dumps(role)}", "messages")
        out.append({"role": "system" if role == "developer" else role, "content": message_text(m.get("content"), i)})
    return out


def message_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content parts must be text parts: mlxllm has no image input",
                               "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", "messages")


def usage(stats: dict) -> dict:
    return {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": stats["cached_tokens"]}}


async def openai_respond(request: web.Request, body: dict, req: Request, kind: str) -> web.StreamResponse:
    """Run a generation and answer as chat.completion(.chunk) or text_completion objects."""
    chat = kind == "chat"
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model, "system_fingerprint": FINGERPRINT}
    echo = body.get("prompt") if not chat and body.get("echo") and isinstance(body.get("prompt"), str) else ""

    def choice(text: str | None, finish: str | None, streaming: bool) -> dict:
        if not chat:
            return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        if streaming:
            delta = {"content": text} if text is not None else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish}

    run = await start(request.app, req)
    try:
        if not body.get("stream"):
            pieces = [echo]
            async for event, value in run.events():
                if event == "text":
                    pieces.append(value)
                else:
                    return web.json_response({**head, "choices": [choice("".join(pieces), value["finish_reason"], False)],
                                              "usage": usage(value)})
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = await sse_stream(request)
        try:
            if chat:
                first = choice("", None, True)
                first["delta"] = {"role": "assistant", "content": ""}
                await response.write(sse({**chunk_head, "choices": [first]}))
            elif echo:
                await response.write(sse({**chunk_head, "choices": [choice(echo, None, True)]}))
            async for event, value in run.events():
                if event == "text":
                    await response.write(sse({**chunk_head, "choices": [choice(value, None, True)]}))
                    continue
                await response.write(sse({**chunk_head, "choices": [choice(None, value["finish_reason"], True)]}))
                if include_usage:
                    await response.write(sse({**chunk_head, "choices": [], "usage": usage(value)}))
        except ApiError as e:
            await response.write(sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}}))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response
    except ConnectionResetError:
        log.info("%s %s: client went away", request.method, request.path)
        return web.Response(status=499)
    finally:
        run.close()


async def v1_chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    messages = openai_messages(body)
    req = openai_common(body, model, lambda tokenizer, limit: encode_prompt(tokenizer, render(tokenizer, messages, None), limit), None)
    return await openai_respond(request, body, req, "chat")


def completion_prompt(value: Any) -> str | list[int]:
    """OpenAI's prompt: a string or token ids, alone or as a one-element array."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return value
    raise ApiError(400, "prompt must be a non-empty string or array of token ids (one prompt per request)", "prompt")


async def v1_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    prompt = completion_prompt(body.get("prompt"))
    if body.get("suffix"):
        raise ApiError(400, "suffix is not supported by mlxllm", "suffix")
    if field_of(body, "best_of", "int", 1) != 1:
        raise ApiError(400, "best_of must be 1", "best_of")
    field_of(body, "echo", "bool")

    def build(tokenizer, limit: int) -> list[int]:
        if isinstance(prompt, str):
            return encode_prompt(tokenizer, prompt, limit)
        if max(prompt) >= tokenizer.vocab_size:
            raise ApiError(400, "prompt holds a token id outside the vocabulary", "prompt")
        return list(prompt)

    req = openai_common(body, model, build, 16)  # OpenAI's default max_tokens for completions
    return await openai_respond(request, body, req, "completion")


async def v1_models(request: web.Request) -> web.Response:
    def collect() -> list[dict]:
        return [{"id": name, "object": "model", "created": int(os.stat(path).st_mtime), "owned_by": "mlxllm"}
                for name, path in listed_models()]

    return web.json_response({"object": "list", "data": await asyncio.get_running_loop().run_in_executor(None, collect)})


async def v1_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    path = await asyncio.get_running_loop().run_in_executor(None, model_path, name)
    return web.json_response({"id": name, "object": "model", "created": int(os.stat(path).st_mtime), "owned_by": "mlxllm"})


ROUTES = [("POST", "/v1/chat/completions", v1_chat_completions), ("POST", "/v1/completions", v1_completions),
          ("GET", "/v1/models", v1_models), ("GET", "/v1/models/{name:.+}", v1_model)]
