"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens, thin routes over
the same generation loop as the other APIs. Anthropic's own shapes throughout: content
blocks (text, thinking, tool_use, tool_result), stop reasons, the streamed event sequence,
and {"type": "error", ...} errors."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from aiohttp import web

from ..reasoning import Delta
from ..sample import SamplingParams
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
from .generation import Request, Run, start
from .tooluse import Tooling, count_prompt

log = logging.getLogger("mlxllm.server")

# Anthropic's sampling has no repetition penalty, top-k or top-p unless asked, and samples
# at temperature 1 by default; mlxllm's SamplingParams carry llama.cpp's defaults instead.
ANTHROPIC_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repeat_penalty": 1.0}


def event(name: str, data: dict) -> bytes:
    """One server-sent event as Anthropic writes it: the event name, then its JSON."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# ---------------------------------------------------------------------------- requests

def _blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: Input should be a string or a list of content blocks", "messages")
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ApiError(400, f"{where}.{i}: each content block must be an object with a type", "messages")
    return content


def _text_of(content: Any, where: str) -> str:
    """A system prompt or tool result: a string, or text blocks (joined by blank lines)."""
    texts = []
    for i, block in enumerate(_blocks(content, where)):
        if block["type"] != "text":
            raise ApiError(400, f"{where}.{i}: {block['type']} blocks are not supported here: mlxllm reads text only",
                           "messages")
        if not isinstance(block.get("text"), str):
            raise ApiError(400, f"{where}.{i}.text: Field required", "messages")
        texts.append(block["text"])
    return "\n\n".join(texts)


def chat_messages(body: dict) -> tuple[list[dict], str]:
    """Anthropic's system and messages as chat-template messages (tool_use blocks as the
    assistant's tool_calls, tool_result blocks as tool messages), and the text of a final
    assistant message (a prefill: the answer continues it)."""
    out: list[dict] = []
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
    names: dict[str, str] = {}  # tool_use id -> tool name
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: Input should be an object", "messages")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role: Input should be 'user' or 'assistant', not {json.dumps(role)}",
                           "messages")
        if m.get("content") is None:
            raise ApiError(400, f"{where}.content: Field required", "messages")
        texts, calls, results = [], [], []
        for j, block in enumerate(_blocks(m["content"], f"{where}.content")):
            at, kind = f"{where}.content.{j}", block["type"]
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise ApiError(400, f"{at}.text: Field required", "messages")
                texts.append(block["text"])
            elif kind in ("thinking", "redacted_thinking"):
                continue  # thinking a client hands back is not part of the prompt
            elif kind == "tool_use" and role == "assistant":
                ident, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
                if not isinstance(ident, str) or not isinstance(name, str) or not isinstance(arguments, dict):
                    raise ApiError(400, f"{at}: a tool_use block needs an id, a name and an input object", "messages")
                names[ident] = name
                calls.append({"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}})
            elif kind == "tool_result" and role == "user":
                ident = block.get("tool_use_id")
                if not isinstance(ident, str):
                    raise ApiError(400, f"{at}.tool_use_id: Field required", "messages")
                result = {"role": "tool", "tool_call_id": ident,
                          "content": _text_of(block.get("content") or "", f"{at}.content")}
                if ident in names:
                    result["name"] = names[ident]
                results.append(result)
            else:
                raise ApiError(400, f"{at}: {kind} blocks are not supported in {role} messages by mlxllm",
                               "messages")
        out += results
        if role == "assistant":
            out.append({"role": "assistant", "content": "\n\n".join(texts), **({"tool_calls": calls} if calls else {})})
        elif texts or not results:
            out.append({"role": "user", "content": "\n\n".join(texts)})
    prefill = ""
    if out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
        prefill = out.pop()["content"]
        if prefill != prefill.rstrip():
            raise ApiError(400, "final assistant content cannot end with trailing whitespace", "messages")
    return out, prefill


def tooling_of(body: dict) -> Tooling:
    """Anthropic's tools ({name, description, input_schema}) and tool_choice ({"type":
    "auto" | "any" | "tool" | "none"}, disable_parallel_tool_use)."""
    tools = field_of(body, "tools", "list", [])
    listed = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise ApiError(400, f"tools.{i}: only custom tools (name, description, input_schema) are supported, "
                                f"not {json.dumps(kind)}", "tools")
        if not isinstance(tool.get("input_schema"), dict):
            raise ApiError(400, f"tools.{i}.input_schema: Field required", "tools")
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        listed.append({"type": "function", "function": function})
    choice = field_of(body, "tool_choice", "object")
    if choice is not None and choice.get("type") not in ("auto", "any", "tool", "none"):
        raise ApiError(400, "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'", "tool_choice")
    parallel = not (choice or {}).get("disable_parallel_tool_use", False)
    tooling = Tooling.of(listed, choice, parallel)
    thinking = field_of(body, "thinking", "object")
    if thinking is not None:  # the template's enable_thinking
        if thinking.get("type") not in ("enabled", "disabled", "adaptive"):
            raise ApiError(400, "thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'", "thinking")
        if thinking["type"] == "disabled":
            tooling.think = False
        else:  # as a template variable: a model that does not think answers as it would without it
            tooling.variables["enable_thinking"] = True
    return tooling


def thinking_budget(body: dict) -> int | None:
    """thinking.budget_tokens: the reasoning tokens the loop allows before it closes the block."""
    thinking = body.get("thinking") or {}
    if thinking.get("type") != "enabled" or thinking.get("budget_tokens") is None:
        return None
    budget = field_of(thinking, "budget_tokens", "int", where="thinking.")
    if budget < 0:
        raise ApiError(400, f"thinking.budget_tokens must be at least 0, not {budget}", "thinking")
    return budget


def messages_request(body: dict, model: str, tooling: Tooling) -> Request:
    messages, tooling.prefill = chat_messages(body)
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
    return tooling.request(messages, model=model, params=sampling(values), max_tokens=max_tokens, num_ctx=None,
                           stop=stops, schema=output_schema(body), reasoning_budget=thinking_budget(body))


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


def stop_reason(run: Run, stats: dict, called: bool) -> tuple[str, str | None]:
    if stats["finish_reason"] == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    sequence = matched_stop(run, stats)
    return ("stop_sequence", sequence) if sequence is not None else ("end_turn", None)


def usage(stats: dict) -> dict:
    """Anthropic counts prompt tokens read from a cache apart from input_tokens: the prefix
    cache's reused tokens are cache_read_input_tokens."""
    cached = stats["cached_tokens"]
    return {"input_tokens": stats["prompt_tokens"] - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": stats["completion_tokens"]}


class Blocks:
    """A reply's pieces (`Delta`s: reasoning, text, calls) as Anthropic's content blocks,
    and the stream events that build them. Text that is only whitespace waits: it opens
    no block of its own (the blank lines models write around a tool call)."""

    def __init__(self) -> None:
        self.blocks: list[dict] = []
        self.open: str | None = None  # the open block's type
        self.blank = ""  # whitespace not yet in a block
        self.called = False

    def _start(self, block: dict) -> list[tuple[str, dict]]:
        out = self._stop()
        self.blocks.append(block)
        self.open = block["type"]
        shown = {**block, "input": {}} if block["type"] == "tool_use" else dict(block)  # as it starts
        out.append(("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1,
                                            "content_block": shown}))
        return out

    def _stop(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})]

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}

    def add(self, piece: Delta) -> list[tuple[str, dict]]:
        if piece.kind == "call":
            self.called, self.blank = True, ""
            call = piece.call
            out = self._start({"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": call.name,
                               "input": call.arguments})
            out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments_json}))
            return out + self._stop()
        if piece.kind == "reasoning":
            self.blank = ""
            out = [] if self.open == "thinking" else self._start({"type": "thinking", "thinking": "", "signature": ""})
            self.blocks[-1]["thinking"] += piece.text
            return out + [self._delta({"type": "thinking_delta", "thinking": piece.text})]
        text = piece.text
        if self.open != "text":
            self.blank += text
            if not self.blank.strip():
                return []
            text, self.blank = self.blank, ""
            out = self._start({"type": "text", "text": ""})
        else:
            out = []
        self.blocks[-1]["text"] += text
        return out + [self._delta({"type": "text_delta", "text": text})]

    def close(self) -> list[tuple[str, dict]]:
        return self._stop()


def message_head(ident: str, model: str) -> dict:
    return {"id": ident, "type": "message", "role": "assistant", "model": model, "content": []}


async def messages_respond(request: web.Request, body: dict, req: Request) -> web.StreamResponse:
    ident = "msg_" + uuid.uuid4().hex[:24]
    run = await start(request.app, req)
    reply, blocks = run.shape.reply(), Blocks()

    def pieces(deltas: list[Delta]) -> list[Delta]:  # thinking turned off: its text is dropped
        return [d for d in deltas if d.kind != "reasoning" or run.shape.show_reasoning]

    try:
        if not body.get("stream"):
            async for kind, value in run.events():
                if kind == "text":
                    for piece in pieces(reply.feed(value)):
                        blocks.add(piece)
                    continue
                for piece in pieces(reply.close()):
                    blocks.add(piece)
                reason, sequence = stop_reason(run, value, blocks.called)
                return web.json_response({**message_head(ident, req.model), "content": blocks.blocks,
                                          "stop_reason": reason, "stop_sequence": sequence, "usage": usage(value)})
        response = await sse_stream(request)
        pinged = False

        async def send(events: list[tuple[str, dict]]) -> None:
            nonlocal pinged
            for name, data in events:
                await response.write(event(name, data))
                if name == "content_block_start" and not pinged:  # where Anthropic sends its ping
                    await response.write(event("ping", {"type": "ping"}))
                    pinged = True

        try:
            start_usage = {"input_tokens": run.prompt_tokens, "cache_creation_input_tokens": 0,
                           "cache_read_input_tokens": 0, "output_tokens": 0}
            await send([("message_start", {"type": "message_start", "message": {
                **message_head(ident, req.model), "stop_reason": None, "stop_sequence": None, "usage": start_usage}})])
            async for kind, value in run.events():
                if kind == "text":
                    for piece in pieces(reply.feed(value)):
                        await send(blocks.add(piece))
                    continue
                for piece in pieces(reply.close()):
                    await send(blocks.add(piece))
                await send(blocks.close())
                if not pinged:
                    await send([("ping", {"type": "ping"})])
                reason, sequence = stop_reason(run, value, blocks.called)
                await send([("message_delta", {"type": "message_delta",
                                               "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                               "usage": usage(value)}),
                            ("message_stop", {"type": "message_stop"})])
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
    tooling = tooling_of(body)
    req = messages_request(body, model, tooling)
    return await messages_respond(request, body, req)


async def v1_count_tokens(request: web.Request) -> web.Response:
    """The prompt's token count as /v1/messages would build it, tools included (the model
    is loaded for its tokenizer and chat template)."""
    body = await json_body(request)
    model = model_field(body)
    tooling = tooling_of(body)
    messages, tooling.prefill = chat_messages(body)
    req = tooling.request(messages, model=model, params=SamplingParams(), max_tokens=None, num_ctx=None, stop=[],
                          schema=None)
    return web.json_response({"input_tokens": await count_prompt(request.app, req)})


ROUTES = [("POST", "/v1/messages", v1_messages), ("POST", "/v1/messages/count_tokens", v1_count_tokens)]
