"""Tool calling: each model family's call format, chosen from its chat template.

A model calls a tool by writing text in the format it was trained on; the chat template
that renders the `tools` list also shows which one. `ToolFormat.for_template(template)`
picks it (None: the template renders no tools, and the model cannot be offered any):

- `hermes`: Hermes / Qwen 2.5 / Qwen 3 ChatML templates,
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call;
- `llama3`: Llama 3.1-3.3's JSON, `{"name": ..., "parameters": {...}}` as the whole reply
  (optionally after `<|python_tag|>`);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, and the newer
  `[TOOL_CALLS]name[ARGS]{...}` form when parsing;
- `harmony`: gpt-oss, `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}`,
  which also carries the reasoning (the analysis channel) and the answer (final).

Each format gives:
- `grammar(tools, choice, ...)`: a Lark grammar for llguidance (`mlxllm.constrain`) that
  admits free text or calls (`auto`), only text (`none`), or only calls (`required`, or a
  `named` function), each call's arguments a JSON value of that tool's parameters schema;
  so a constrained reply always parses, and every call matches its schema;
- `parse(text) -> (content, calls)`: a whole reply;
- `stream() -> CallStream`: the same, incrementally (`feed(text)` / `close()` give
  `Delta`s: content text, reasoning text, or a finished `ToolCall`).

`Reply` puts reasoning (`mlxllm.reasoning`) and a tool format together for one reply.
Request-side helpers: `tools_of(value)` checks an OpenAI/Ollama `tools` list, `choice_of`
a `tool_choice`; both raise `ToolError` (a ValueError) with a message fit for a 400.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .reasoning import Delta, Reasoning, ReasoningStream

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_TEXT = r"(?s:.*)"


# ---------------------------------------------------------------------------- values


class ToolError(ValueError):
    """A tools request that cannot be served; the message says which field and why."""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    """A parsed call: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict
    id: str = field(default_factory=new_call_id)

    @property
    def arguments_json(self) -> str:
        """The arguments as OpenAI sends them: a JSON string."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class Choice:
    """tool_choice: mode "auto", "none" or "required"; `name` when one function is forced."""

    mode: str = "auto"
    name: str | None = None

    @property
    def calls_only(self) -> bool:
        return self.mode == "required" or self.name is not None


def tools_of(value: Any) -> list[dict]:
    """An OpenAI/Ollama `tools` array checked and normalized to
    [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ToolError("tools must be an array of function tools")
    out, names = [], set()
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise ToolError(f"tools[{i}].function.name {name!r} is given twice")
        names.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        from .constrain import GrammarError, check_depth

        try:
            check_depth(params, what=f"tools[{i}].function.parameters schema")
        except GrammarError as e:
            raise ToolError(str(e)) from None
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        entry = {"name": name, "parameters": params}
        if description is not None:
            entry["description"] = description
        out.append({"type": "function", "function": entry})
    return out


def choice_of(value: Any, tools: Sequence[dict]) -> Choice:
    """tool_choice: "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    (also Anthropic's {"type": "tool", "name"} and {"type": "any"})."""
    if value is None:
        return Choice("auto" if tools else "none")
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise ToolError("tool_choice is required but no tools are given")
        return Choice(value)
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "any":
            return choice_of("required", tools)
        if kind in ("auto", "none"):
            return choice_of(kind, tools)
        name = (value.get("function") or {}).get("name") if kind == "function" else value.get("name")
        if kind in ("function", "tool") and isinstance(name, str):
            if name not in {t["function"]["name"] for t in tools}:
                raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
            return Choice("required", name)
    raise ToolError('tool_choice must be "auto", "none", "required" or {"type": "function", '
                     '"function": {"name": ...}}')


def arguments_of(value: Any) -> dict:
    """A call's arguments as a dict: OpenAI sends a JSON string, Ollama an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ToolError("a tool call's arguments must be a JSON object") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ToolError("a tool call's arguments must be a JSON object")
    return value


# ---------------------------------------------------------------------------- grammar helpers


def _lark_str(text: str) -> str:
    return json.dumps(text)


def _schema(schema: dict) -> str:
    """`%json` of a schema, in the compact JSON style the calls are written in."""
    from .constrain import check_depth  # a GrammarError past MAX_SCHEMA_DEPTH

    check_depth(schema, what="tool's parameters schema")
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def _params(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object"}


def _chosen(tools: Sequence[dict], choice: Choice) -> list[dict]:
    return [t for t in tools if choice.name is None or t["function"]["name"] == choice.name]


def _lark_regex(text: str) -> str:
    """text as a literal inside a Lark /regex/."""
    return re.escape(text).replace("/", "\\/")


def _text_without(*markers: str) -> str:
    """A terminal's body: any text that holds none of the markers."""
    return " & ".join([f"/{ANY_TEXT}/"] + [f"~/(?s:.*{_lark_regex(m)}.*)/" for m in markers])


def _literal(text: str, special: Callable[[str], int | None] | None) -> str:
    """A grammar literal: a special token where the vocabulary has it as one (the model was
    trained on the token, not on its spelling), else the text."""
    token = special(text) if special is not None else None
    return f"<[{token}]>" if token is not None else _lark_str(text)


def _wrap(start: str, rules: list[str], think: Reasoning | None, inside: bool,
          special: Callable[[str], int | None] | None) -> str:
    """The grammar file: `start` after the reasoning the prompt opened, if it did."""
    if think is not None and inside:
        rules.append(f"reasoning[lazy]: /{ANY_TEXT}/ {_literal(think.close, special)}")
        rules.append(r"BLANK: /[ \t\r\n]*/")
        start = f"reasoning BLANK ({start})"
    return "%llguidance {}\n" + f"start: {start}\n" + "\n".join(rules) + "\n"


class _HeldText:
    """Text that may still turn into a marker waits: `take(text, markers)` returns the text
    safe to pass on now."""

    def __init__(self) -> None:
        self.pending = ""

    def take(self, text: str, markers: Sequence[str]) -> str:
        self.pending += text
        hold = max((k for m in markers for k in range(min(len(m) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(m[:k])), default=0)
        ready, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return ready


def _json_prefix(text: str) -> tuple[Any, int]:
    """The JSON value at the start of text (after whitespace) and where it ends."""
    stripped = len(text) - len(text.lstrip())
    value, end = json.JSONDecoder().raw_decode(text, stripped)
    return value, end


def _call_from(obj: Any, arguments_key: str = "arguments") -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    try:
        return ToolCall(obj["name"], arguments_of(args))
    except ValueError:
        return None


# ---------------------------------------------------------------------------- formats


class ToolFormat:
    """A family's call format (see the module docstring)."""

    name = ""
    handles_reasoning = False  # harmony: the channels carry the reasoning too

    @staticmethod
    def for_template(template: str | None) -> ToolFormat | None:
        """The call format a chat template renders and expects; None when it has no tools
        section (its text never reads `tools`)."""
        if not template or not re.search(r"\btools\b", template):
            return None
        if "<|channel|>" in template and "functions." in template:
            return HARMONY
        if "<tool_call>" in template:
            return HERMES
        if "[TOOL_CALLS]" in template:
            return MISTRAL
        if "<|python_tag|>" in template or '"parameters"' in template or "<|eom_id|>" in template:
            return LLAMA3
        return HERMES if "<|im_start|>" in template else None

    def grammar(self, tools: Sequence[dict], choice: Choice = Choice(), parallel: bool = True,
                think: Reasoning | None = None, inside: bool = False,
                special: Callable[[str], int | None] | None = None) -> str:
        """A Lark grammar (llguidance) for the reply. think/inside: the reasoning format and
        whether the prompt left a reasoning block open (it must close before the answer).
        special(text): the id of a special token spelled `text`, or None."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole reply; text that does not parse as a call stays content."""
        stream = self.stream()
        deltas = stream.feed(text) + stream.close()
        content = "".join(d.text for d in deltas if d.kind == "content")
        return content, [d.call for d in deltas if d.kind == "call"]

    def stream(self) -> CallStream:
        raise NotImplementedError


class CallStream:
    """Incremental parsing of one reply: `feed(text)` and finally `close()` return Deltas."""

    def feed(self, text: str) -> list[Delta]:
        raise NotImplementedError

    def close(self) -> list[Delta]:
        raise NotImplementedError


def _content(text: str) -> list[Delta]:
    return [Delta("content", text)] if text else []


# -- Hermes / Qwen


class HermesFormat(ToolFormat):
    name = "hermes"
    open, close = "<tool_call>", "</tool_call>"

    def grammar(self, tools, choice=Choice(), parallel=True, think=None, inside=False, special=None):
        text = _text_without(self.open)
        chosen = _chosen(tools, choice)
        call_schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                                   "arguments": _params(t)},
                                  "required": ["name", "arguments"], "additionalProperties": False}
                                 for t in chosen]}
        rules = [f"TEXT: {text}",
                 f'body: "\\n" {_schema(call_schema)} "\\n" {_literal(self.close, special)}']
        if choice.mode == "none":
            return _wrap("TEXT", rules, think, inside, special)
        rules.append(f"opening[lazy]: TEXT {_literal(self.open, special)}")
        repeat = "*" if parallel else ""
        if choice.calls_only:
            rules.append(f'call: {_literal(self.open, special)} body')
            more = '("\\n" call)*' if parallel else ""
            return _wrap(f"call {more}", rules, think, inside, special)
        rules.append("call: opening body")
        start = f"(call {repeat}) TEXT | TEXT" if parallel else "call TEXT | TEXT"
        return _wrap(start, rules, think, inside, special)

    def stream(self) -> CallStream:
        return _TaggedStream(self.open, self.close)


class _TaggedStream(CallStream):
    """Calls between an opening and a closing marker, content around them."""

    def __init__(self, open_: str, close: str) -> None:
        self.open, self.close_tag = open_, close
        self.held = _HeldText()
        self.call: str | None = None  # text of the call being read
        self.after_call = False  # the newlines between calls are not content

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        if self.call is None:
            self.held.pending += text
            text = ""
        else:
            self.call += text
        while True:
            if self.call is None and self.after_call:
                self.held.pending = self.held.pending.lstrip("\n")
                if not self.held.pending:
                    return out
                self.after_call = False
            if self.call is None:
                at = self.held.pending.find(self.open)
                if at < 0:
                    out += _content(self.held.take("", [self.open]))
                    return out
                out += _content(self.held.pending[:at])
                self.call, self.held.pending = self.held.pending[at + len(self.open):], ""
            at = self.call.find(self.close_tag)
            if at < 0:
                return out
            out += self._finish(self.call[:at])
            self.held.pending, self.call, self.after_call = self.call[at + len(self.close_tag):], None, True

    def _finish(self, body: str) -> list[Delta]:
        try:
            value, end = _json_prefix(body)
            call = _call_from(value) if not body[end:].strip() else None
        except ValueError:
            call = None
        if call is None:  # not a call after all: the model's text, as it wrote it
            return _content(self.open + body + self.close_tag)
        return [Delta("call", call=call)]

    def close(self) -> list[Delta]:
        if self.call is not None:  # no closing marker (it was a stop string, or EOS came first)
            body, self.call = self.call, None
            out = self._finish(body)
            if out and out[0].kind == "content":
                out = _content(self.open + body)
            return out
        rest, self.held.pending = self.held.pending, ""
        return _content(rest)


# -- Llama 3 JSON


class Llama3Format(ToolFormat):
    name = "llama3"
    tag = "<|python_tag|>"

    def grammar(self, tools, choice=Choice(), parallel=True, think=None, inside=False, special=None):
        chosen = _chosen(tools, choice)
        call_schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                                   "parameters": _params(t)},
                                  "required": ["name", "parameters"], "additionalProperties": False}
                                 for t in chosen]}
        # A reply is a call when it starts with "{" (or the python tag): text starts otherwise.
        rules = [f"TEXT: /{ANY_TEXT}/ & ~/(?s:\\s*\\{{.*)/ & ~/(?s:\\s*{_lark_regex(self.tag)}.*)/",
                 f"call: {_schema(call_schema)}"]
        calls = 'call ("; " call)*' if parallel else "call"
        if choice.mode == "none":
            return _wrap("TEXT", rules, think, inside, special)
        if choice.calls_only:
            return _wrap(calls, rules, think, inside, special)
        return _wrap(f"{calls} | TEXT", rules, think, inside, special)

    def stream(self) -> CallStream:
        return _WholeReplyStream(self._calls, lambda text: text.lstrip().startswith(("{", self.tag)))

    def _calls(self, text: str) -> list[ToolCall] | None:
        text = text.strip().removeprefix(self.tag).strip()
        calls, at = [], 0
        while at < len(text):
            try:
                value, end = _json_prefix(text[at:])
            except ValueError:
                return None
            call = _call_from(value, "parameters")
            if call is None:
                return None
            calls.append(call)
            at += end
            rest = text[at:].lstrip()
            at = len(text) - len(rest.removeprefix(";"))
        return calls or None


class _WholeReplyStream(CallStream):
    """A reply that is either calls, recognized from its first characters, or content."""

    def __init__(self, parse: Callable[[str], list[ToolCall] | None], looks_like_call: Callable[[str], bool],
                 decide_after: int = 16) -> None:
        self.parse, self.looks_like_call = parse, looks_like_call
        self.buffer = ""
        self.mode: str | None = None  # "content" or "call" once known
        self.decide_after = decide_after

    def feed(self, text: str) -> list[Delta]:
        if self.mode == "content":
            return _content(text)
        self.buffer += text
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head:
                return []
            if self.looks_like_call(head):
                self.mode = "call"
            elif len(head) >= self.decide_after or not _could_become_marker(head):
                self.mode = "content"
                out, self.buffer = _content(self.buffer), ""
                return out
        return []

    def close(self) -> list[Delta]:
        text, self.buffer = self.buffer, ""
        if self.mode == "call":
            calls = self.parse(text)
            if calls is not None:
                return [Delta("call", call=c) for c in calls]
        return _content(text)


def _could_become_marker(head: str) -> bool:
    return any(m.startswith(head) for m in ("<|python_tag|>", "[TOOL_CALLS]"))


# -- Mistral


class MistralFormat(ToolFormat):
    name = "mistral"
    tag = "[TOOL_CALLS]"

    def grammar(self, tools, choice=Choice(), parallel=True, think=None, inside=False, special=None):
        chosen = _chosen(tools, choice)
        one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                           "arguments": _params(t)},
                          "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]}
        listing = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        tag = _literal(self.tag, special)
        rules = [f"TEXT: {_text_without(self.tag)}", f"call: {tag} {_schema(listing)}"]
        if choice.mode == "none":
            return _wrap("TEXT", rules, think, inside, special)
        if choice.calls_only:
            return _wrap("call", rules, think, inside, special)
        rules.append(f"opening[lazy]: TEXT {tag}")
        rules.append(f"text_call: opening {_schema(listing)}")
        return _wrap("text_call | TEXT", rules, think, inside, special)

    def stream(self) -> CallStream:
        return _MarkedTailStream(self.tag, self._calls)

    def _calls(self, text: str) -> list[ToolCall] | None:
        text = text.strip()
        try:
            value, end = _json_prefix(text)
            if text[end:].strip():
                return None
            items = value if isinstance(value, list) else [value]
            calls = [_call_from(v) for v in items]
            return calls if calls and all(c is not None for c in calls) else None
        except ValueError:
            pass
        calls = []  # the newer form: name[ARGS]{...}, repeated after [TOOL_CALLS]
        for part in text.split(self.tag):
            name, sep, args = part.partition("[ARGS]")
            if not sep:
                return None
            try:
                value, end = _json_prefix(args)
                calls.append(ToolCall(name.strip(), arguments_of(value)))
            except ValueError:
                return None
        return calls or None


class _MarkedTailStream(CallStream):
    """Content, then a marker after which everything to the end is calls."""

    def __init__(self, tag: str, parse: Callable[[str], list[ToolCall] | None]) -> None:
        self.tag, self.parse = tag, parse
        self.held = _HeldText()
        self.tail: str | None = None

    def feed(self, text: str) -> list[Delta]:
        if self.tail is not None:
            self.tail += text
            return []
        self.held.pending += text
        at = self.held.pending.find(self.tag)
        if at >= 0:
            out = _content(self.held.pending[:at])
            self.tail, self.held.pending = self.held.pending[at + len(self.tag):], ""
            return out
        return _content(self.held.take("", [self.tag]))

    def close(self) -> list[Delta]:
        if self.tail is None:
            rest, self.held.pending = self.held.pending, ""
            return _content(rest)
        calls = self.parse(self.tail)
        if calls is None:
            return _content(self.tag + self.tail)
        return [Delta("call", call=c) for c in calls]


# -- harmony (gpt-oss)


class HarmonyFormat(ToolFormat):
    """gpt-oss's channels: analysis (reasoning), commentary (calls to `functions.NAME`, or
    preambles: content), final (content). The prompt ends at `<|start|>assistant`."""

    name = "harmony"
    handles_reasoning = True
    markers = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|call|>", "<|return|>", "<|constrain|>")

    def grammar(self, tools, choice=Choice(), parallel=True, think=None, inside=False, special=None):
        def tok(text: str) -> str:
            token = special(text) if special is not None else None
            if token is None:
                from .constrain import GrammarError

                raise GrammarError(f"the vocabulary has no {text} token: not a harmony model")
            return f"<[{token}]>"

        ch, msg, end, start = tok("<|channel|>"), tok("<|message|>"), tok("<|end|>"), tok("<|start|>")
        rules = [f"TEXT: /{ANY_TEXT}/",
                 f'analysis[lazy]: {ch} "analysis" {msg} /{ANY_TEXT}/ {end} {start} "assistant"',
                 f'final: {ch} "final" {msg} TEXT']
        chosen = _chosen(tools, choice)
        calls = [f'{ch} "commentary to=functions.{t["function"]["name"]} " {tok("<|constrain|>")} "json" {msg} '
                 f'{_schema(_params(t))}' for t in chosen]
        rules.append("call: " + " | ".join(f"({c})" for c in calls))
        if choice.mode == "none":
            return "%llguidance {}\nstart: analysis* final\n" + "\n".join(rules) + "\n"
        body = "call" if choice.calls_only else "(final | call)"
        return "%llguidance {}\n" + f"start: analysis* {body}\n" + "\n".join(rules) + "\n"

    def stream(self) -> CallStream:
        return HarmonyStream()


_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")
_HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|channel|>")


class HarmonyStream(CallStream):
    """Routes each message's text by its channel's header."""

    def __init__(self) -> None:
        self.held = _HeldText()
        self.header: str | None = ""  # header text being read; None while in a message body
        self.channel = ""
        self.body = ""  # a call's arguments being read

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        self.held.pending += text
        while True:
            pending = self.held.pending
            if self.header is not None:  # reading a header up to <|message|>
                at = pending.find("<|message|>")
                if at < 0:
                    return out
                self.header += pending[:at]
                self.held.pending = pending[at + len("<|message|>"):]
                self.channel, self.header = self.header, None
                continue
            ends = [(i, m) for i, m in ((pending.find(m), m) for m in _HARMONY_ENDS) if i >= 0]
            if not ends:
                out += self._body(self.held.take("", HarmonyFormat.markers))
                return out
            at, marker = min(ends)
            out += self._body(pending[:at])
            out += self._end_message()
            # a new message's header follows (a new channel marker is part of it)
            self.held.pending = pending[at + len(marker):] if marker != "<|channel|>" else pending[at:]
            self.header = ""

    def _route(self) -> str:
        if _RECIPIENT.search(self.channel):
            return "call"
        channel = self.channel.rpartition("<|channel|>")[2].split()
        return "reasoning" if channel and channel[0] == "analysis" else "content"

    def _body(self, text: str) -> list[Delta]:
        if not text:
            return []
        kind = self._route()
        if kind == "call":
            self.body += text
            return []
        return [Delta(kind, text)]

    def _end_message(self) -> list[Delta]:
        if self.header is not None or self._route() != "call":
            return []
        name = _RECIPIENT.search(self.channel).group(1)
        body, self.body = self.body, ""
        try:
            return [Delta("call", call=ToolCall(name, arguments_of(body)))]
        except ValueError:
            return _content(body)

    def close(self) -> list[Delta]:
        out: list[Delta] = []
        if self.header is None:
            out += self._body(self.held.pending)
            out += self._end_message()
        elif self.header or self.held.pending:  # no channel header: plain text
            out += _content(self.header + self.held.pending)
        self.held.pending, self.header = "", ""
        return out


HERMES, LLAMA3, MISTRAL, HARMONY = HermesFormat(), Llama3Format(), MistralFormat(), HarmonyFormat()
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, HARMONY)}


# ---------------------------------------------------------------------------- a whole reply


class Reply:
    """One reply's text split as it streams: reasoning (if the template thinks), content,
    and tool calls (if tools were offered). `feed(text)` / `close()` return Deltas.

    tool_format: parse calls in this format (None: no tools offered, all is content);
    reasoning/inside: the template's reasoning markers, and whether the prompt opened a
    reasoning block (the reply starts inside it)."""

    def __init__(self, tool_format: ToolFormat | None = None, reasoning: Reasoning | None = None,
                 inside: bool = False) -> None:
        self.harmony = tool_format is not None and tool_format.handles_reasoning
        self.calls = tool_format.stream() if tool_format is not None else None
        self.thinking = None if self.harmony or reasoning is None else ReasoningStream(reasoning, inside)

    def _content(self, deltas: list[Delta]) -> list[Delta]:
        out = []
        for d in deltas:
            if d.kind == "content" and self.calls is not None and not self.harmony:
                out += self.calls.feed(d.text)
            else:
                out.append(d)
        return out

    def feed(self, text: str) -> list[Delta]:
        if self.harmony:
            return self.calls.feed(text)
        if self.thinking is not None:
            return self._content(self.thinking.feed(text))
        return self._content([Delta("content", text)]) if text else []

    def close(self) -> list[Delta]:
        out: list[Delta] = []
        if self.thinking is not None and not self.harmony:
            out += self._content(self.thinking.close())
        if self.calls is not None:
            out += self.calls.close()
        return out


def split_reply(text: str, tool_format: ToolFormat | None = None, reasoning: Reasoning | None = None,
                inside: bool = False) -> tuple[str, str, list[ToolCall]]:
    """(reasoning, content, calls) of a whole reply."""
    reply = Reply(tool_format, reasoning, inside)
    deltas = reply.feed(text) + reply.close()
    return ("".join(d.text for d in deltas if d.kind == "reasoning"),
            "".join(d.text for d in deltas if d.kind == "content"),
            [d.call for d in deltas if d.kind == "call"])
