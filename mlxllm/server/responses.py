"""OpenAI's Responses API: /v1/responses, a thin route over the same generation loop as
the other APIs. Input as a string or items (messages, function calls and their outputs),
instructions, the streamed event sequence, and previous_response_id over a bounded
in-memory store of recent responses."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

from aiohttp import web

from ..constrain import ANY_OBJECT
from ..generate import encode_prompt
from .common import (
    ApiError,
    field_of,
    in_range,
    json_body,
    model_of,
    sampling,
    sse_stream,
)
from .generation import Request, render, start

log = logging.getLogger("mlxllm.server")

# OpenAI's sampling: temperature 1, top_p 1, no top-k and no repetition penalty unless asked;
# mlxllm's SamplingParams carry llama.cpp's defaults instead.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repeat_penalty": 1.0}
TEXT_PARTS = ("input_text", "output_text", "text")


class Store:
    """Recent responses by id, for previous_response_id and GET: at most `entries` of them
    and `chars` characters of conversation in all; the oldest go first."""

    def __init__(self, entries: int = 256, chars: int = 32 << 20) -> None:
        self.entries, self.chars = entries, chars
        self.items: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()
        self.used = 0

    def put(self, response: dict, conversation: list[dict]) -> None:
        size = len(json.dumps(conversation, ensure_ascii=False)) + len(json.dumps(response, ensure_ascii=False))
        if size > self.chars:
            return
        self.items[response["id"]] = (response, conversation, size)
        self.used += size
        while len(self.items) > self.entries or self.used > self.chars:
            _, (_, _, dropped) = self.items.popitem(last=False)
            self.used -= dropped

    def get(self, ident: str) -> tuple[dict, list[dict]] | None:
        found = self.items.get(ident)
        if found is None:
            return None
        self.items.move_to_end(ident)
        return found[0], found[1]

    def delete(self, ident: str) -> bool:
        found = self.items.pop(ident, None)
        if found is not None:
            self.used -= found[2]
        return found is not None


STORE = Store()


# ---------------------------------------------------------------------------- requests

def _part_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS + ("refusal",):
                kind = part.get("type") if isinstance(part, dict) else part
                raise ApiError(400, f"{where}[{j}]: {json.dumps(kind)} content is not supported: mlxllm reads text only",
                               "input")
            text = part.get("refusal" if part["type"] == "refusal" else "text")
            if not isinstance(text, str):
                raise ApiError(400, f"{where}[{j}].text must be a string", "input")
            texts.append(text)
        return "".join(texts)
    raise ApiError(400, f"{where} must be a string or an array of content parts", "input")


def _arguments(text: Any, where: str) -> Any:
    """A function call's arguments for the chat template: parsed JSON, as HF templates expect."""
    if not isinstance(text, str):
        raise ApiError(400, f"{where}.arguments must be a JSON string", "input")
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        raise ApiError(400, f"{where}.arguments is not valid JSON", "input") from None


def input_messages(value: Any) -> list[dict]:
    """Responses input (a string, or items) as chat-template messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ApiError(400, "input must be a string or an array of input items", "input")
    out: list[dict] = []
    names: dict[str, str] = {}  # call_id -> function name, for the tool messages that answer them
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}.role must be user, assistant, system or developer, not "
                                    f"{json.dumps(role)}", "input")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _part_text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise ApiError(400, f"{where}: a function_call needs call_id and name strings", "input")
            names[call_id] = name
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": _arguments(item.get("arguments"), where)}}
            if out and out[-1]["role"] == "assistant":  # the same turn: text, then its calls
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise ApiError(400, f"{where}.call_id must be a string", "input")
            message = {"role": "tool", "tool_call_id": call_id,
                       "content": _part_text(item.get("output"), f"{where}.output")}
            if call_id in names:
                message["name"] = names[call_id]
            out.append(message)
        elif kind == "reasoning":
            continue  # a reasoning item handed back: not part of the prompt
        else:
            raise ApiError(400, f"{where}.type {json.dumps(kind)} is not supported by mlxllm", "input")
    return out


def text_schema(body: dict) -> dict | None:
    text = field_of(body, "text", "object", {})
    fmt = field_of(text, "format", "object", None, "text.")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return ANY_OBJECT
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "text.format.schema must be a JSON schema object", "text.format.schema")
        return schema
    raise ApiError(400, "text.format.type must be text, json_object or json_schema", "text.format.type")


def conversation_of(body: dict) -> tuple[list[dict], list[dict]]:
    """(the prompt's messages, the conversation to store: the same without instructions)."""
    history: list[dict] = []
    previous = field_of(body, "previous_response_id", "string")
    if previous:
        found = STORE.get(previous)
        if found is None:
            raise ApiError(400, f"previous response with id {previous!r} not found (mlxllm keeps recent "
                                "responses in memory only)", "previous_response_id", "previous_response_not_found")
        history = list(found[1])
    if body.get("input") is None:
        raise ApiError(400, "input is required", "input")
    conversation = history + input_messages(body["input"])
    if not conversation:
        raise ApiError(400, "input must not be empty", "input")
    instructions = field_of(body, "instructions", "string")
    prompt = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    return prompt, conversation


def responses_request(body: dict, model: str, messages: list[dict]) -> Request:
    if body.get("tools"):
        raise ApiError(400, "tools are not supported by mlxllm's Responses API yet", "tools")
    if body.get("background"):
        raise ApiError(400, "background responses are not supported by mlxllm", "background")
    if body.get("top_logprobs"):
        raise ApiError(400, "top_logprobs is not supported by mlxllm yet", "top_logprobs")
    max_tokens = field_of(body, "max_output_tokens", "int")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_output_tokens must be at least 1, not {max_tokens}", "max_output_tokens")
    values = dict(OPENAI_DEFAULTS)
    for key in ("temperature", "top_p"):
        value = field_of(body, key, "number")
        if value is not None:
            values[key] = value
    in_range(values["temperature"], "temperature", 0, 2)
    in_range(values["top_p"], "top_p", 0, 1)
    for key in ("stream", "store", "parallel_tool_calls"):
        field_of(body, key, "bool")
    field_of(body, "metadata", "object")

    def build(tokenizer, limit: int) -> list[int]:
        return encode_prompt(tokenizer, render(tokenizer, messages, None), limit)

    return Request(model=model, build=build, params=sampling(values), max_tokens=max_tokens, num_ctx=None,
                   stop=[], schema=text_schema(body))


# ---------------------------------------------------------------------------- answers

def usage(stats: dict) -> dict:
    return {"input_tokens": stats["prompt_tokens"], "input_tokens_details": {"cached_tokens": stats["cached_tokens"]},
            "output_tokens": stats["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}


def response_object(ident: str, body: dict, model: str, created: int) -> dict:
    """The response as created (in_progress, no output yet); the request's settings echoed."""
    return {"id": ident, "object": "response", "created_at": created, "status": "in_progress", "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": body.get("temperature", OPENAI_DEFAULTS["temperature"]),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p", OPENAI_DEFAULTS["top_p"]),
            "truncation": body.get("truncation", "disabled"), "usage": None, "user": body.get("user"),
            "metadata": body.get("metadata") or {}}


def message_item(ident: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": ident, "type": "message", "status": status, "role": "assistant", "content": content}


def finish(response: dict, output: list[dict], stats: dict) -> dict:
    incomplete = stats["finish_reason"] == "length"
    return {**response, "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": output, "usage": usage(stats)}


def remember(body: dict, response: dict, conversation: list[dict], text: str) -> None:
    if body.get("store", True):
        STORE.put(response, conversation + [{"role": "assistant", "content": text}])


async def responses_respond(request: web.Request, body: dict, req: Request, conversation: list[dict]) -> web.StreamResponse:
    ident = "resp_" + uuid.uuid4().hex
    item_id = "msg_" + uuid.uuid4().hex
    response = response_object(ident, body, req.model, int(time.time()))
    run = await start(request.app, req)
    try:
        if not body.get("stream"):
            pieces = []
            async for kind, value in run.events():
                if kind == "text":
                    pieces.append(value)
                    continue
                text = "".join(pieces)
                final = finish(response, [message_item(item_id, text, "completed")], value)
                remember(body, final, conversation, text)
                return web.json_response(final)
        stream = await sse_stream(request)
        sequence = 0

        async def send(kind: str, data: dict) -> None:
            nonlocal sequence
            payload = {"type": kind, "sequence_number": sequence, **data}
            sequence += 1
            await stream.write(f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        try:
            await send("response.created", {"response": response})
            await send("response.in_progress", {"response": response})
            await send("response.output_item.added", {"output_index": 0,
                                                      "item": message_item(item_id, None, "in_progress")})
            await send("response.content_part.added", {**where, "part": {"type": "output_text", "text": "",
                                                                         "annotations": [], "logprobs": []}})
            pieces = []
            async for kind, value in run.events():
                if kind == "text":
                    if value:
                        pieces.append(value)
                        await send("response.output_text.delta", {**where, "delta": value, "logprobs": []})
                    continue
                text = "".join(pieces)
                item = message_item(item_id, text, "completed")
                await send("response.output_text.done", {**where, "text": text, "logprobs": []})
                await send("response.content_part.done", {**where, "part": item["content"][0]})
                await send("response.output_item.done", {"output_index": 0, "item": item})
                final = finish(response, [item], value)
                remember(body, final, conversation, text)
                await send("response.completed" if final["status"] == "completed" else "response.incomplete",
                           {"response": final})
        except ApiError as e:  # headers are sent: the error goes in the stream
            await send("error", {"code": e.code or "server_error", "message": e.message, "param": e.param})
            await send("response.failed", {"response": {**response, "status": "failed", "error": {
                "code": "server_error", "message": e.message}}})
        await stream.write_eof()
        return stream
    except ConnectionResetError:
        log.info("%s %s: client went away", request.method, request.path)
        return web.Response(status=499)
    finally:
        run.close()


# ---------------------------------------------------------------------------- routes

async def v1_responses(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    messages, conversation = conversation_of(body)
    req = responses_request(body, model, messages)
    return await responses_respond(request, body, req, conversation)


def _stored(request: web.Request) -> tuple[str, dict]:
    ident = request.match_info["ident"]
    found = STORE.get(ident)
    if found is None:
        raise ApiError(404, f"no response with id {ident!r} (mlxllm keeps recent responses in memory only)",
                       "response_id", "not_found")
    return ident, found[0]


async def v1_response(request: web.Request) -> web.Response:
    return web.json_response(_stored(request)[1])


async def v1_delete_response(request: web.Request) -> web.Response:
    ident, _ = _stored(request)
    STORE.delete(ident)
    return web.json_response({"id": ident, "object": "response.deleted", "deleted": True})


ROUTES = [("POST", "/v1/responses", v1_responses), ("GET", "/v1/responses/{ident}", v1_response),
          ("DELETE", "/v1/responses/{ident}", v1_delete_response)]
