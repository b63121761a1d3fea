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
from ..reasoning import Delta
from ..sample import SamplingParams
from ..tools import (
    Reply,
    ToolCall,
    ToolError,
    arguments_of,
    choice_of,
    new_call_id,
    tools_of,
)
from .common import (
    ApiError,
    field_of,
    in_range,
    json_body,
    model_of,
    sse,
    sse_stream,
    stop_list,
)
from .generation import Chat, Request, start
from .pool import listed_models, model_path

log = logging.getLogger("mlxllm.server")
FINGERPRINT = f"fp_mlxllm_{__version__}"


MAX_OPENAI_STOPS = 4  # OpenAI's limit on stop sequences
MAX_CHOICES = 128  # OpenAI's limit on n
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
EXTENSIONS = {"top_k": "int", "min_p": "number", "repeat_penalty": "number", "repeat_last_n": "int"}  # as llama-server


def max_tokens_of(body: dict) -> int | None:
    """max_completion_tokens, else max_tokens; each checked, whichever is given."""
    values = {key: field_of(body, key, "int") for key in ("max_completion_tokens", "max_tokens")}
    for key, value in values.items():
        if value is not None and value < 1:
            raise ApiError(400, f"{key} must be at least 1, not {value}", key, "invalid_value")
    return values["max_completion_tokens"] if values["max_completion_tokens"] is not None else values["max_tokens"]


def openai_sampling(body: dict) -> SamplingParams:
    """OpenAI's sampling: its defaults (temperature 1, top-p 1, no top-k, no repetition
    penalty) under what the request sets, llama-server's extensions included."""
    values = {k: field_of(body, k, "number") for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty")}
    in_range(values["temperature"], "temperature", 0, 2)
    in_range(values["top_p"], "top_p", 0, 1)
    in_range(values["presence_penalty"], "presence_penalty", -2, 2)
    in_range(values["frequency_penalty"], "frequency_penalty", -2, 2)
    values.update({k: field_of(body, k, kind) for k, kind in EXTENSIONS.items()})
    values["seed"] = field_of(body, "seed", "int")
    params = SamplingParams.openai(**{k: v for k, v in values.items() if v is not None})
    try:
        params.validate()
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split()[0]) from None
    return params


def openai_common(body: dict, model: str, build: Callable[[Any, int], list[int]] | None,
                  default_max: int | None, chat: Chat | None = None) -> Request:
    n = field_of(body, "n", "int", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}, not {n}", "n")
    if chat is not None:  # chat: logprobs a boolean, top_logprobs how many alternatives
        wanted = field_of(body, "logprobs", "bool", False)
        top = field_of(body, "top_logprobs", "int")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
        if top and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if wanted else None
    else:  # completions: logprobs is how many alternatives
        logprobs = field_of(body, "logprobs", "int")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
    max_tokens = max_tokens_of(body)
    params = openai_sampling(body)
    field_of(body, "stream", "bool")
    options = field_of(body, "stream_options", "object", {})
    field_of(options, "include_usage", "bool", where="stream_options.")
    stop = stop_list(body.get("stop"))
    if len(stop) > MAX_OPENAI_STOPS:
        raise ApiError(400, f"stop has {len(stop)} strings; at most {MAX_OPENAI_STOPS} are allowed", "stop")
    budget = field_of(body, "reasoning_budget", "int")
    if budget is not None and budget < 0:
        raise ApiError(400, "reasoning_budget must be >= 0", "reasoning_budget")
    return Request(model=model, build=build, params=params,
                   max_tokens=max_tokens if max_tokens is not None else default_max, num_ctx=None,
                   stop=stop, schema=response_schema(body.get("response_format")), chat=chat, n=n,
                   logprobs=logprobs, reasoning_budget=budget)


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


def openai_tool_calls(value: Any, i: int) -> list[dict]:
    """An assistant message's tool_calls as templates read them: arguments as objects."""
    if not isinstance(value, list):
        raise ApiError(400, f"messages[{i}].tool_calls must be an array", "messages")
    calls = []
    for call in value:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"messages[{i}].tool_calls entries must be {{\"type\": \"function\", "
                                "\"function\": {\"name\", \"arguments\"}}", "messages")
        try:
            arguments = arguments_of(fn.get("arguments"))
        except ToolError as e:
            raise ApiError(400, f"messages[{i}]: {e}", "messages") from None
        calls.append({"id": call.get("id") or new_call_id(), "type": "function",
                      "function": {"name": fn["name"], "arguments": arguments}})
    return calls


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
        message = {"role": "system" if role == "developer" else role, "content": message_text(m.get("content"), i)}
        if role == "assistant":
            if m.get("tool_calls"):
                message["tool_calls"] = openai_tool_calls(m["tool_calls"], i)
            reasoning = m.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                message["reasoning_content"] = reasoning
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    message[key] = m[key]
        out.append(message)
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


def usage(stats: list[dict]) -> dict:
    """Usage over all choices: the prompt once, every choice's completion tokens."""
    prompt = stats[0]["prompt_tokens"]
    completion = sum(s["completion_tokens"] for s in stats)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stats[0]["cached_tokens"]}}


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """Legacy completions' logprobs object for a run of tokens starting at text offset."""
    tokens, offsets = [], []
    for entry in entries:
        tokens.append(entry["token"])
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def public_entry(entry: dict) -> dict:
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": entry["bytes"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                             for t in entry["top_logprobs"]]}


class ChoiceState:
    """One choice's reply as it streams: its text split into reasoning, content and tool
    calls, and its token logprobs."""

    def __init__(self, index: int, reply: Reply | None) -> None:
        self.index, self.reply = index, reply
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCall] = []
        self.logprobs: list[dict] = []
        self.pending_logprobs: list[dict] = []  # not yet sent (streaming)
        self.stats: dict | None = None
        self.offset = 0  # characters sent (completions' text_offset)

    def feed(self, text: str) -> list[Delta]:
        deltas = self.reply.feed(text) if self.reply is not None else [Delta("content", text)]
        self._keep(deltas)
        return deltas

    def close(self) -> list[Delta]:
        deltas = self.reply.close() if self.reply is not None else []
        self._keep(deltas)
        return deltas

    def _keep(self, deltas: list[Delta]) -> None:
        for d in deltas:
            if d.kind == "content":
                self.content.append(d.text)
            elif d.kind == "reasoning":
                self.reasoning.append(d.text)
            else:
                self.calls.append(d.call)

    def finish_reason(self) -> str:
        reason = self.stats["finish_reason"]
        return "tool_calls" if self.calls and reason == "stop" else reason


def call_json(call: ToolCall, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
    return out if index is None else {"index": index, **out}


async def openai_respond(request: web.Request, body: dict, req: Request, kind: str) -> web.StreamResponse:
    """Run a generation and answer as chat.completion(.chunk) or text_completion objects."""
    chat = kind == "chat"
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model, "system_fingerprint": FINGERPRINT}
    echo = body.get("prompt") if not chat and body.get("echo") and isinstance(body.get("prompt"), str) else ""
    run = await start(request.app, req)
    shape = run.shape
    choices = [ChoiceState(i, shape.reply() if chat else None) for i in range(req.n)]
    if echo:
        for c in choices:
            c.content.append(echo)
            c.offset = len(echo)

    def logprobs_of(c: ChoiceState, entries: list[dict]) -> dict | None:
        if req.logprobs is None:
            return None
        if chat:
            return {"content": [public_entry(e) for e in entries], "refusal": None}
        out = completion_logprobs(entries, c.offset)
        return out

    def whole(c: ChoiceState) -> dict:
        if not chat:
            return {"text": "".join(c.content), "index": c.index, "logprobs": logprobs_of(c, c.logprobs),
                    "finish_reason": c.finish_reason()}
        message = {"role": "assistant", "content": "".join(c.content) if c.content or not c.calls else None,
                   "refusal": None}
        if c.reasoning and shape.show_reasoning:
            message["reasoning_content"] = "".join(c.reasoning)
        if c.calls:
            message["tool_calls"] = [call_json(call) for call in c.calls]
        return {"index": c.index, "message": message, "logprobs": logprobs_of(c, c.logprobs),
                "finish_reason": c.finish_reason()}

    try:
        if not body.get("stream"):
            async for index, event, value in run.choice_events():
                c = choices[index]
                if event == "text":
                    c.feed(value)
                elif event == "logprobs":
                    c.logprobs.append(value)
                elif event == "done":
                    c.close()
                    c.stats = value
            return web.json_response({**head, "choices": [whole(c) for c in choices],
                                      "usage": usage([c.stats for c in choices])})
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = await sse_stream(request)

        async def send(c: ChoiceState, delta: dict | None, text: str | None, finish: str | None) -> None:
            entries, c.pending_logprobs = c.pending_logprobs, []
            if chat:
                piece = {"index": c.index, "delta": delta or {}, "logprobs": logprobs_of(c, entries) if entries else None,
                         "finish_reason": finish}
            else:
                piece = {"text": text or "", "index": c.index,
                         "logprobs": logprobs_of(c, entries) if entries else None, "finish_reason": finish}
                c.offset += len(text or "")
            await response.write(sse({**chunk_head, "choices": [piece]}))

        async def send_deltas(c: ChoiceState, deltas: list[Delta]) -> None:
            for d in deltas:
                if d.kind == "content" and d.text:
                    await send(c, {"content": d.text}, d.text, None)
                elif d.kind == "reasoning" and d.text and shape.show_reasoning:
                    await send(c, {"reasoning_content": d.text}, None, None)
                elif d.kind == "call":
                    await send(c, {"tool_calls": [call_json(d.call, c.calls.index(d.call))]}, None, None)

        try:
            for c in choices:
                if chat:
                    await send(c, {"role": "assistant", "content": ""}, None, None)
                elif echo:
                    c.offset = 0
                    await send(c, None, echo, None)
            async for index, event, value in run.choice_events():
                c = choices[index]
                if event == "logprobs":
                    c.logprobs.append(value)
                    c.pending_logprobs.append(value)
                elif event == "text":
                    await send_deltas(c, c.feed(value))
                elif event == "done":
                    await send_deltas(c, c.close())
                    c.stats = value
                    await send(c, {}, None, c.finish_reason())
            if include_usage:
                await response.write(sse({**chunk_head, "choices": [], "usage": usage([c.stats for c in choices])}))
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


def chat_of(body: dict, messages: list[dict]) -> Chat:
    """The chat to render: messages, tools and tool_choice, template switches."""
    try:
        tools = tools_of(body.get("tools"))
        choice = choice_of(body.get("tool_choice"), tools)
    except ToolError as e:
        raise ApiError(400, str(e), "tools" if "tool_choice" not in str(e) else "tool_choice") from None
    parallel = field_of(body, "parallel_tool_calls", "bool", True)
    variables = dict(field_of(body, "chat_template_kwargs", "object", {}))
    effort = field_of(body, "reasoning_effort", "string")
    if effort is not None:
        if effort not in ("minimal", "low", "medium", "high"):
            raise ApiError(400, "reasoning_effort must be minimal, low, medium or high", "reasoning_effort")
        variables.setdefault("reasoning_effort", effort)
    think = variables.pop("enable_thinking", None)
    if think is not None and not isinstance(think, bool):
        raise ApiError(400, "chat_template_kwargs.enable_thinking must be a boolean", "chat_template_kwargs")
    return Chat(messages, tools=tools, choice=choice, parallel=parallel,
                think=think, variables=variables)


async def v1_chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    messages = openai_messages(body)
    req = openai_common(body, model, None, None, chat_of(body, messages))
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
