"""Ollama's API: /api/generate, /api/chat, /api/ps, /api/version (models_api has the model routes)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import mlx.core as mx
import numpy as np
from aiohttp import web

from .. import __version__
from ..generate import encode_prompt
from ..models import ModelConfig
from ..reasoning import Delta
from ..sample import SamplingParams
from ..tools import Choice, ToolError, arguments_of, new_call_id, tools_of
from .common import (
    ApiError,
    field_of,
    json_body,
    json_schema_of,
    keep_alive_of,
    line,
    model_of,
    ndjson_stream,
    now_rfc3339,
    sampling,
    stop_list,
)
from .generation import Chat, Request, render, start
from .pool import (
    NO_DEFAULTS,
    ModelPool,
    describe,
    model_defaults,
    model_path,
    refuse_embedding_model,
)

log = logging.getLogger("mlxllm.server")
OLLAMA_OPTIONS = {"num_ctx": "int", "num_predict": "int", "temperature": "number", "top_k": "int",
                  "top_p": "number", "min_p": "number", "repeat_penalty": "number", "repeat_last_n": "int",
                  "presence_penalty": "number", "frequency_penalty": "number", "seed": "int",
                  "reasoning_budget": "int"}  # (mlxllm's: reasoning tokens before the model is made to answer)
SAMPLING_KEYS = set(SamplingParams.__dataclass_fields__)


def ollama_request(body: dict, model: str, build: Callable[[Any, int], list[int]] | None,
                   defaults: ModelConfig = NO_DEFAULTS, chat: Chat | None = None) -> Request:
    # a pulled model's parameters, under the request's options key by key (as Ollama merges)
    options = defaults.options(field_of(body, "options", "object", {}))
    values = {k: field_of(options, k, kind, where="options.") for k, kind in OLLAMA_OPTIONS.items()}
    ignored = sorted(set(options) - set(OLLAMA_OPTIONS) - {"stop"})
    if ignored:
        log.info("ignoring options mlxllm does not use: %s", ", ".join(ignored))
    predict = values.pop("num_predict")
    if predict is not None and predict < 0 and predict not in (-1, -2):
        raise ApiError(400, f"options.num_predict must be positive, or -1 (no limit) or -2 (fill the context), "
                            f"not {predict}", "num_predict")
    if predict == 0:
        raise ApiError(400, "options.num_predict must not be 0", "num_predict")
    num_ctx = values.pop("num_ctx")
    if num_ctx is not None and num_ctx < 1:
        raise ApiError(400, "options.num_ctx must be positive", "num_ctx")
    budget = values.pop("reasoning_budget")
    if budget is not None and budget < 0:
        raise ApiError(400, "options.reasoning_budget must be >= 0", "reasoning_budget")
    params = sampling({k: v for k, v in values.items() if k in SAMPLING_KEYS})
    for key in ("images",):
        if body.get(key):
            raise ApiError(400, f"{model} does not support images", key)
    if chat is None and body.get("think"):
        raise ApiError(400, f"{model!r} does not support thinking", "think")
    if chat is None and body.get("tools"):
        raise ApiError(400, "tools are given to /api/chat", "tools")
    return Request(model=model, build=build, params=params,
                   max_tokens=predict if predict is not None and predict > 0 else None, num_ctx=num_ctx,
                   stop=stop_list(options.get("stop"), "options.stop"),
                   schema=json_schema_of(body.get("format"), "format"), keep_alive=keep_alive_of(body),
                   chat=chat, reasoning_budget=budget)


def ollama_final(model: str, stats: dict) -> dict:
    return {"model": model, "created_at": now_rfc3339(), "done": True, "done_reason": stats["finish_reason"],
            "total_duration": stats["total_ns"], "load_duration": stats["load_ns"],
            "prompt_eval_count": stats["prompt_tokens"], "prompt_eval_duration": stats["prompt_ns"],
            "eval_count": stats["completion_tokens"], "eval_duration": stats["eval_ns"]}


async def ollama_respond(request: web.Request, req: Request, stream: bool,
                         chunk: Callable[[str], dict], final: Callable[[str, dict], dict]) -> web.StreamResponse:
    """Run a generation and answer in Ollama's shape: NDJSON chunks, or one object; the
    reasoning of a thinking template's reply, split off, goes in `thinking`."""
    run = await start(request.app, req)
    reply = run.shape.reply()
    show = run.shape.show_reasoning

    def shaped(make: Callable[..., dict], deltas: list[Delta], *args) -> dict:
        out = make("".join(d.text for d in deltas if d.kind == "content"), *args)
        thinking = "".join(d.text for d in deltas if d.kind == "reasoning")
        if thinking and show:
            out["thinking"] = thinking
        return out

    try:
        if not stream:
            deltas: list[Delta] = []
            async for kind, value in run.events():
                if kind == "text":
                    deltas += reply.feed(value)
                else:
                    return web.json_response(shaped(final, deltas + reply.close(), value))
        response = await ndjson_stream(request)
        try:
            async for kind, value in run.events():
                if kind == "text":
                    deltas = reply.feed(value)
                    if deltas:
                        await response.write(line(shaped(chunk, deltas)))
                else:
                    await response.write(line(shaped(final, reply.close(), value)))
        except ApiError as e:  # headers are sent: the error goes in the stream
            await response.write(line({"error": e.message}))
        await response.write_eof()
        return response
    except ConnectionResetError:
        log.info("%s %s: client went away", request.method, request.path)
        return web.Response(status=499)
    finally:
        run.close()


async def ollama_load_only(request: web.Request, body: dict, model: str, shape: dict) -> web.Response:
    """Ollama's empty request: load the model (or, with keep_alive 0, unload it)."""
    pool: ModelPool = request.app["pool"]
    keep_alive = keep_alive_of(body)
    reason = "unload" if keep_alive == 0 else "load"
    loaded = await asyncio.get_running_loop().run_in_executor(None, pool.find, model)
    if reason == "unload" and loaded is None:  # nothing to unload: do not load it first
        await asyncio.get_running_loop().run_in_executor(None, model_path, model)  # 404 if unknown
    else:
        if reason == "load":  # unloading needs no capability (Ollama checks after it too)
            await refuse_embedding_model(model)
        loaded, _ = await pool.acquire(model, keep_alive)
        pool.release(loaded)
    return web.json_response({"model": model, "created_at": now_rfc3339(), **shape, "done": True, "done_reason": reason})


async def api_generate(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    defaults = await model_defaults(model)  # a pulled model's manifest: template, system, parameters
    prompt = field_of(body, "prompt", "string", "")
    system = field_of(body, "system", "string") or defaults.system
    template = field_of(body, "template", "string") or defaults.prompt_template
    raw = field_of(body, "raw", "bool", False)
    stream = field_of(body, "stream", "bool", True)
    context = field_of(body, "context", "list", [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in context):
        raise ApiError(400, "context must be an array of token ids", "context")
    if field_of(body, "suffix", "string"):
        raise ApiError(400, f"{model!r} does not support insert (suffix)", "suffix")

    def build(tokenizer, limit: int) -> list[int]:
        if any(t >= tokenizer.vocab_size for t in context):
            raise ApiError(400, "context holds a token id outside the vocabulary", "context")
        if raw:
            text = prompt
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = render(tokenizer, messages, template)
        return list(context) + encode_prompt(tokenizer, text, limit)

    chat = None
    if body.get("think") is not None and not raw and not context:  # rendered with the template's switch
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        chat = ollama_chat({"think": body["think"]}, messages, template)
    req = ollama_request(body, model, None if chat else build, defaults, chat)
    if not prompt and not context:
        return await ollama_load_only(request, body, model, {"response": ""})

    def final(text: str, stats: dict) -> dict:
        return {**ollama_final(model, stats), "response": text, "context": stats["context"]}

    return await ollama_respond(request, req, stream,
                                lambda text: {"model": model, "created_at": now_rfc3339(), "response": text, "done": False},
                                final)


def ollama_messages(body: dict) -> list[dict]:
    messages = field_of(body, "messages", "list", [])
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, user, assistant or tool, not {json.dumps(role)}",
                           "messages")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        if m.get("images"):
            raise ApiError(400, "this model does not support images", "messages")
        message = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = ollama_tool_calls(m["tool_calls"], i)
        if role == "assistant" and isinstance(m.get("thinking"), str) and m["thinking"]:
            message["reasoning_content"] = m["thinking"]  # the name HF templates read
        if role == "tool":
            name = m.get("tool_name") or m.get("name")
            if isinstance(name, str):
                message["name"] = message["tool_name"] = name
        out.append(message)
    return out


def ollama_tool_calls(value: Any, i: int) -> list[dict]:
    """An assistant message's tool_calls ({"function": {"name", "arguments": {...}}}) as
    templates read them."""
    if not isinstance(value, list):
        raise ApiError(400, f"messages[{i}].tool_calls must be an array", "messages")
    calls = []
    for call in value:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"messages[{i}].tool_calls entries must be {{\"function\": {{\"name\", "
                                "\"arguments\"}}}}", "messages")
        try:
            arguments = arguments_of(fn.get("arguments"))
        except ToolError as e:
            raise ApiError(400, f"messages[{i}]: {e}", "messages") from None
        calls.append({"id": call.get("id") or new_call_id(), "type": "function",
                      "function": {"name": fn["name"], "arguments": arguments}})
    return calls


def ollama_chat(body: dict, messages: list[dict], template: str | None) -> Chat:
    """The chat to render: tools (Ollama's: always offered, the model chooses), and `think`
    (true/false; "low"/"medium"/"high" set gpt-oss's reasoning effort)."""
    try:
        tools = tools_of(body.get("tools"))
    except ToolError as e:
        raise ApiError(400, str(e), "tools") from None
    think = body.get("think")
    variables = {}
    if isinstance(think, str) and think in ("low", "medium", "high"):
        variables["reasoning_effort"], think = think, True
    elif think is not None and not isinstance(think, bool):
        raise ApiError(400, 'think must be true, false, "low", "medium" or "high"', "think")
    return Chat(messages, template=template, tools=tools, choice=Choice("auto" if tools else "none"),
                think=think, variables=variables)


async def ollama_chat_respond(request: web.Request, req: Request, stream: bool, model: str) -> web.StreamResponse:
    """/api/chat's answer: message.content, message.thinking and message.tool_calls, as
    NDJSON chunks or one object."""
    run = await start(request.app, req)
    reply = run.shape.reply()
    show = run.shape.show_reasoning

    def message(deltas: list[Delta]) -> dict:
        out = {"role": "assistant", "content": "".join(d.text for d in deltas if d.kind == "content")}
        thinking = "".join(d.text for d in deltas if d.kind == "reasoning")
        if thinking and show:
            out["thinking"] = thinking
        calls = [d.call for d in deltas if d.kind == "call"]
        if calls:
            out["tool_calls"] = [{"id": c.id, "function": {"index": len(seen) + k, "name": c.name,
                                                            "arguments": c.arguments}}
                                 for k, c in enumerate(calls)]
            seen.extend(calls)
        return out

    seen: list = []
    try:
        if not stream:
            deltas: list[Delta] = []
            async for kind, value in run.events():
                if kind == "text":
                    deltas += reply.feed(value)
                elif kind == "done":
                    deltas += reply.close()
                    return web.json_response({**ollama_final(model, value), "message": message(deltas)})
        response = await ndjson_stream(request)
        try:
            async for kind, value in run.events():
                if kind == "text":
                    piece = message(reply.feed(value))
                    if piece["content"] or len(piece) > 2:
                        await response.write(line({"model": model, "created_at": now_rfc3339(), "message": piece,
                                                   "done": False}))
                elif kind == "done":
                    await response.write(line({**ollama_final(model, value), "message": message(reply.close())}))
        except ApiError as e:  # headers are sent: the error goes in the stream
            await response.write(line({"error": e.message}))
        await response.write_eof()
        return response
    except ConnectionResetError:
        log.info("%s %s: client went away", request.method, request.path)
        return web.Response(status=499)
    finally:
        run.close()


async def api_chat(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    defaults = await model_defaults(model)  # a pulled model's manifest: template, system, parameters
    messages = ollama_messages(body)
    template = field_of(body, "template", "string") or defaults.prompt_template
    stream = field_of(body, "stream", "bool", True)
    req = ollama_request(body, model, None, defaults, ollama_chat(body, defaults.with_system(messages), template))
    if not messages:
        return await ollama_load_only(request, body, model, {"message": {"role": "assistant", "content": ""}})
    return await ollama_chat_respond(request, req, stream, model)


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def quantization_level(info: dict) -> str:
    import gguf

    ftype = info["metadata"].get("general.file_type")
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return next(iter(info["tensor_types"]), "unknown")


def details(info: dict) -> dict:
    arch = info["architecture"]
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": _human_count(info["parameters"]), "quantization_level": quantization_level(info)}


def model_info(info: dict) -> dict:
    """GGUF metadata for /api/show: scalars and short arrays (Ollama leaves out the
    vocabulary arrays too)."""
    out = {}
    for key, value in info["metadata"].items():
        if isinstance(value, (list, np.ndarray)) and len(value) > 64:
            continue
        out[key] = value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
    out["general.parameter_count"] = info["parameters"]
    return out


def rfc3339(seconds: float | None) -> str:
    if seconds is None:  # loaded forever: Ollama shows a far-future time
        return "2318-01-01T00:00:00Z"
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


async def api_ps(request: web.Request) -> web.Response:
    pool: ModelPool = request.app["pool"]
    models = []
    for loaded in list(pool.loaded.values()):
        info = await asyncio.get_running_loop().run_in_executor(None, describe, loaded.path)
        expires = loaded.expires
        if expires is None and loaded.keep_alive is not None:  # in use: keep_alive after now at least
            expires = time.time() + loaded.keep_alive
        models.append({"name": loaded.name, "model": loaded.name, "size": loaded.nbytes, "digest": loaded.digest,
                       "details": details(info), "expires_at": rfc3339(expires),
                       "size_vram": 0 if mx.default_device() == mx.cpu else loaded.nbytes,
                       "context_length": loaded.context_length})
    return web.json_response({"models": models})


async def api_version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


# /api/tags and /api/show are models_api's (from the store), with /api/pull, /api/delete, /api/copy
ROUTES = [("POST", "/api/generate", api_generate), ("POST", "/api/chat", api_chat), ("GET", "/api/ps", api_ps),
          ("GET", "/api/version", api_version)]
