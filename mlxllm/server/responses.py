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
from ..reasoning import Delta
from .common import (
    ApiError,
    field_of,
    in_range,
    json_body,
    model_of,
    sampling,
    sse_stream,
)
from .generation import Request, start
from .tooluse import Tooling

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


def input_messages(value: Any, names: dict[str, str]) -> list[dict]:
    """Responses input (a string, or items) as chat-template messages. names: call_id ->
    function name of the calls seen so far (a tool message names the function it answers)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ApiError(400, "input must be a string or an array of input items", "input")
    out: list[dict] = []
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
    names = {c["id"]: c["function"]["name"] for m in history for c in m.get("tool_calls", [])}
    conversation = history + input_messages(body["input"], names)
    if not conversation:
        raise ApiError(400, "input must not be empty", "input")
    instructions = field_of(body, "instructions", "string")
    prompt = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    return prompt, conversation


def tooling_of(body: dict) -> Tooling:
    """Responses' function tools ({"type": "function", name, description, parameters}) and
    tool_choice ("auto" | "none" | "required" | {"type": "function", "name"})."""
    tools = field_of(body, "tools", "list", [])
    listed = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise ApiError(400, f"tools[{i}]: only function tools are supported by mlxllm, not {json.dumps(kind)}",
                           "tools")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        listed.append({"type": "function", "function": function})
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    tooling = Tooling.of(listed, choice, field_of(body, "parallel_tool_calls", "bool", True))
    effort = field_of(body, "reasoning", "object", {}).get("effort")
    if effort is not None:  # the template's enable_thinking, and gpt-oss's reasoning_effort
        if effort not in ("none", "minimal", "low", "medium", "high"):
            raise ApiError(400, "reasoning.effort must be none, minimal, low, medium or high", "reasoning.effort")
        if effort == "none":
            tooling.think = False
        else:  # template variables: a model that does not reason answers as it would without them
            tooling.variables.update(enable_thinking=True, reasoning_effort=effort)
    return tooling


def responses_request(body: dict, model: str, messages: list[dict], tooling: Tooling) -> Request:
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
    for key in ("stream", "store"):
        field_of(body, key, "bool")
    field_of(body, "metadata", "object")
    return tooling.request(messages, model=model, params=sampling(values), max_tokens=max_tokens, num_ctx=None,
                           stop=[], schema=text_schema(body))


# ---------------------------------------------------------------------------- answers

def usage(stats: dict) -> dict:
    return {"input_tokens": stats["prompt_tokens"], "input_tokens_details": {"cached_tokens": stats["cached_tokens"]},
            "output_tokens": stats["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}


def response_object(ident: str, body: dict, model: str, created: int, tooling: Tooling) -> dict:
    """The response as created (in_progress, no output yet); the request's settings echoed."""
    return {"id": ident, "object": "response", "created_at": created, "status": "in_progress", "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
            "parallel_tool_calls": tooling.parallel,
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": body.get("temperature", OPENAI_DEFAULTS["temperature"]),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p", OPENAI_DEFAULTS["top_p"]),
            "truncation": body.get("truncation", "disabled"), "usage": None, "user": body.get("user"),
            "metadata": body.get("metadata") or {}}


class Items:
    """A reply's pieces (`Delta`s: reasoning, text, calls) as Responses output items
    (reasoning, message, function_call) and the stream events that build them. Text that
    is only whitespace waits: it opens no message of its own."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.open: str | None = None  # the open item's type
        self.blank = ""
        self.calls: list[dict] = []

    def _where(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1, "content_index": 0}

    def _start(self, item: dict, part: dict | None) -> list[tuple[str, dict]]:
        out = self._stop()
        self.items.append(item)
        self.open = item["type"]
        shown = {**item, "status": "in_progress", **({"arguments": ""} if item["type"] == "function_call" else {}),
                 **({"content": []} if "content" in item else {})}
        out.append(("response.output_item.added", {"output_index": len(self.items) - 1, "item": shown}))
        if part is not None:
            item["content"].append(part)
            out.append(("response.content_part.added", {**self._where(), "part": dict(part)}))
        return out

    def _stop(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        item, out = self.items[-1], []
        if self.open in ("message", "reasoning"):
            part = item["content"][0]
            kind = "output_text" if self.open == "message" else "reasoning_text"
            extra = {"logprobs": []} if self.open == "message" else {}
            out.append((f"response.{kind}.done", {**self._where(), "text": part["text"], **extra}))
            out.append(("response.content_part.done", {**self._where(), "part": part}))
        item["status"] = "completed"
        out.append(("response.output_item.done", {"output_index": len(self.items) - 1, "item": item}))
        self.open = None
        return out

    def add(self, piece: Delta) -> list[tuple[str, dict]]:
        if piece.kind == "call":
            self.blank = ""
            call = piece.call
            item = {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": "completed",
                    "call_id": call.id, "name": call.name, "arguments": call.arguments_json}
            self.calls.append(item)
            out = self._start(item, None)
            out.append(("response.function_call_arguments.delta", {"item_id": item["id"],
                                                                    "output_index": len(self.items) - 1,
                                                                    "delta": item["arguments"]}))
            out.append(("response.function_call_arguments.done", {"item_id": item["id"], "name": item["name"],
                                                                   "output_index": len(self.items) - 1,
                                                                   "arguments": item["arguments"]}))
            return out + self._stop()
        if piece.kind == "reasoning":
            self.blank = ""
            out = [] if self.open == "reasoning" else self._start(
                {"id": "rs_" + uuid.uuid4().hex, "type": "reasoning", "status": "completed", "summary": [],
                 "content": []}, {"type": "reasoning_text", "text": ""})
            self.items[-1]["content"][0]["text"] += piece.text
            return out + [("response.reasoning_text.delta", {**self._where(), "delta": piece.text})]
        text = piece.text
        out = []
        if self.open != "message":
            self.blank += text
            if not self.blank.strip():
                return []
            text, self.blank = self.blank, ""
            out = self._start({"id": "msg_" + uuid.uuid4().hex, "type": "message", "status": "completed",
                               "role": "assistant", "content": []},
                              {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self.items[-1]["content"][0]["text"] += text
        return out + [("response.output_text.delta", {**self._where(), "delta": text, "logprobs": []})]

    def close(self) -> list[tuple[str, dict]]:
        return self._stop()

    def said(self) -> dict:
        """The assistant's turn as a chat message, for previous_response_id."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": c["call_id"], "type": "function",
                  "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}} for c in self.calls]
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


def finish(response: dict, output: list[dict], stats: dict) -> dict:
    incomplete = stats["finish_reason"] == "length"
    return {**response, "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": output, "usage": usage(stats)}


def remember(body: dict, response: dict, conversation: list[dict], items: Items) -> None:
    if body.get("store", True):
        STORE.put(response, conversation + [items.said()])


async def responses_respond(request: web.Request, body: dict, req: Request, tooling: Tooling,
                            conversation: list[dict]) -> web.StreamResponse:
    ident = "resp_" + uuid.uuid4().hex
    response = response_object(ident, body, req.model, int(time.time()), tooling)
    run = await start(request.app, req)
    reply, items = run.shape.reply(), Items()
    try:
        if not body.get("stream"):
            async for kind, value in run.events():
                if kind == "text":
                    for piece in reply.feed(value):
                        items.add(piece)
                    continue
                for piece in reply.close():
                    items.add(piece)
                items.close()
                final = finish(response, items.items, value)
                remember(body, final, conversation, items)
                return web.json_response(final)
        stream = await sse_stream(request)
        sequence = 0

        async def send(events: list[tuple[str, dict]]) -> None:
            nonlocal sequence
            for kind, data in events:
                payload = {"type": kind, "sequence_number": sequence, **data}
                sequence += 1
                await stream.write(f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

        try:
            await send([("response.created", {"response": response}), ("response.in_progress", {"response": response})])
            async for kind, value in run.events():
                if kind == "text":
                    for piece in reply.feed(value):
                        await send(items.add(piece))
                    continue
                for piece in reply.close():
                    await send(items.add(piece))
                await send(items.close())
                final = finish(response, items.items, value)
                remember(body, final, conversation, items)
                await send([("response.completed" if final["status"] == "completed" else "response.incomplete",
                             {"response": final})])
        except ApiError as e:  # headers are sent: the error goes in the stream
            await send([("error", {"code": e.code or "server_error", "message": e.message, "param": e.param}),
                        ("response.failed", {"response": {**response, "status": "failed",
                                                          "error": {"code": "server_error", "message": e.message}}})])
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
    tooling = tooling_of(body)
    req = responses_request(body, model, messages, tooling)
    return await responses_respond(request, body, req, tooling, conversation)


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
