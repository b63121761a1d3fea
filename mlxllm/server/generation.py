"""One generation request, API-neutral: the prompt rendered through the model's chat
template (or a request's own), with tools and reasoning switches where the request has
them; the job(s) submitted to the model's engine (n choices: n jobs on the batched loop),
each under a grammar when the reply is constrained (a JSON schema, tool_choice); and the
events read back on the event loop, which the routes split with `mlxllm.tools.Reply`
(reasoning, content, tool calls)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..chat_template import (
    ChatTemplateError,
    fallback_chat_template,
    render_chat_template,
)
from ..constrain import Constraint, GrammarError, special_token_id, vocabulary_for
from ..generate import PromptTooLong, encode_prompt
from ..reasoning import Reasoning
from ..sample import SamplingParams
from ..tools import JSON_STYLE, Choice, Reply, ToolFormat
from .common import ApiError
from .engine import Job
from .pool import Loaded, ModelPool, refuse_embedding_model

_GO_IF = re.compile(r"\{\{(-?)\s*if\s+\.(\w+)\s*(-?)\}\}")
_GO_ELSE = re.compile(r"\{\{(-?)\s*else\s*(-?)\}\}")
_GO_END = re.compile(r"\{\{(-?)\s*end\s*(-?)\}\}")
_GO_VAR = re.compile(r"\{\{(-?)\s*\.(\w+)\s*(-?)\}\}")


def go_to_jinja(template: str) -> str:
    """Ollama's simplest Go templates (`{{ .System }}`, `{{ .Prompt }}`, `{{ if .X }}...
    {{ else }}...{{ end }}`) in Jinja, which renders the rest; anything else is Jinja."""
    template = _GO_IF.sub(lambda m: f"{{%{m[1]} if {m[2].lower()} {m[3]}%}}", template)
    template = _GO_ELSE.sub(lambda m: f"{{%{m[1]} else {m[2]}%}}", template)
    template = _GO_END.sub(lambda m: f"{{%{m[1]} endif {m[2]}%}}", template)
    return _GO_VAR.sub(lambda m: f"{{{{{m[1]} {m[2].lower()} {m[3]}}}}}", template)


def special_text(tokenizer, token_id: int | None) -> str:
    return tokenizer.token_to_bytes(token_id).decode("utf-8", "replace") if token_id is not None else ""


def render(tokenizer, messages: list[dict], template: str | None) -> str:
    """The prompt text: the model's chat template, or a request's own template."""
    try:
        if template is None:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        system = next((m["content"] for m in reversed(messages) if m["role"] == "system"), "")
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return render_chat_template(go_to_jinja(template), messages, add_generation_prompt=True,
                                    system=system, prompt=prompt, response="",
                                    bos_token=special_text(tokenizer, tokenizer.bos_id),
                                    eos_token=special_text(tokenizer, tokenizer.eos_id))
    except ChatTemplateError as e:
        raise ApiError(400, str(e), "template") from None


@dataclass
class Chat:
    """A conversation to render with the model's chat template (or `template`, a request's
    own), its tools, and the template switches a request sets.

    tools: [{"type": "function", "function": {...}}] (`mlxllm.tools.tools_of`); choice:
    what the reply may do with them; think: None (the template's default), True or False
    (rendered as `enable_thinking`; a model that cannot think refuses True); variables:
    more template variables (`chat_template_kwargs`, `reasoning_effort`)."""

    messages: list[dict]
    template: str | None = None
    tools: list[dict] = field(default_factory=list)
    choice: Choice = field(default_factory=lambda: Choice("none"))
    parallel: bool = True
    think: bool | None = None
    variables: dict = field(default_factory=dict)


@dataclass
class Request:
    """A generation request in API-neutral terms (the routes fill it in). The prompt comes
    from `chat` when it is set, else from `build`."""

    model: str
    build: Callable[[Any, int], list[int]] | None  # (tokenizer, context) -> prompt ids (runs in a worker thread)
    params: SamplingParams
    max_tokens: int | None  # None: until the context is full
    num_ctx: int | None
    stop: list[str]
    schema: dict | None
    keep_alive: float | None | str = "default"
    started: float = field(default_factory=time.perf_counter)
    chat: Chat | None = None
    n: int = 1  # choices: jobs on the same prompt (seed + i for choice i when seeded)
    logprobs: int | None = None  # None: none; k: the chosen token's and k alternatives
    reasoning_budget: int | None = None  # tokens of reasoning before the close marker is written for the model


@dataclass
class ReplyShape:
    """How to read a reply: its tool format (None: no tools offered), the template's
    reasoning markers, and whether the prompt left a reasoning block open."""

    tools: ToolFormat | None = None
    reasoning: Reasoning | None = None
    inside: bool = False
    show_reasoning: bool = True  # False: Ollama's think=false drops reasoning text

    def reply(self) -> Reply:
        return Reply(self.tools, self.reasoning, self.inside)


class Run:
    """Submitted jobs seen from the event loop: their events, in order, then done."""

    def __init__(self, pool: ModelPool, loaded: Loaded, load_ns: int, request: Request) -> None:
        self.pool, self.loaded, self.load_ns, self.request = pool, loaded, load_ns, request
        self.queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self.jobs: list[Job] = []
        self.shape = ReplyShape()
        self.prompt_tokens = 0  # the prompt's length once start() has built it (before any token)
        self.finished = False
        self._released = False

    @property
    def job(self) -> Job | None:
        """The first choice's job."""
        return self.jobs[0] if self.jobs else None

    @job.setter
    def job(self, job: Job) -> None:  # a route that submits its one job itself
        self.jobs[:1] = [job]

    async def choice_events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice, kind, value): ("text", str) pieces, ("logprobs", entry) before the text of
        a token when asked for, then ("done", stats) for each choice; an engine error raises
        ApiError 500."""
        left = len(self.jobs)
        while left:
            item = await self.queue.get()
            index, kind, value = item if len(item) == 3 else (0, *item)  # (kind, value): a lone job's
            if kind == "error":
                self.finished = True
                raise ApiError(500, value)
            if kind == "done":
                left -= 1
                self.finished = not left
                value["load_ns"] = self.load_ns
                value["total_ns"] = int((time.perf_counter() - self.request.started) * 1e9)
            yield index, kind, value

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """The first choice's ("text", str) pieces, then ("done", stats)."""
        async for index, kind, value in self.choice_events():
            if index == 0:
                yield kind, value

    def close(self) -> None:
        """The handler is done with it: jobs still running are cancelled (the client went
        away) and the model is released to its keep_alive timer."""
        if not self.finished:
            for job in self.jobs:
                job.cancelled = True
        if not self._released:
            self._released = True
            self.pool.release(self.loaded)


def template_of(tokenizer, chat: Chat) -> str:
    """The template a chat renders with: the request's own, the model's, or the fallback."""
    return chat.template or tokenizer.chat_template or fallback_chat_template(tokenizer._tok2id)


def reply_shape(loaded: Loaded, chat: Chat | None, prompt: str) -> ReplyShape:
    """How a reply to `prompt` reads: tool format, reasoning markers, open block."""
    if chat is None:
        return ReplyShape()
    template = template_of(loaded.tokenizer, chat)
    tools = ToolFormat.for_template(template)
    if not chat.tools and not (tools and tools.handles_reasoning):  # harmony's channels: always read
        tools = None
    reasoning = Reasoning.for_template(template)
    if chat.think and reasoning is None and not (tools and tools.handles_reasoning):
        raise ApiError(400, f"{loaded.name!r} does not support thinking", "think")
    return ReplyShape(tools, reasoning, reasoning is not None and reasoning.inside(prompt),
                      chat.think is not False)


def render_chat(loaded: Loaded, chat: Chat) -> str:
    """The prompt text of a chat: tools and switches passed as the template expects them."""
    tokenizer = loaded.tokenizer
    if chat.tools and ToolFormat.for_template(template_of(tokenizer, chat)) is None:
        raise ApiError(400, f"{loaded.name!r} does not support tools", "tools")
    if chat.template is not None:
        return render(tokenizer, chat.messages, chat.template)
    variables = dict(chat.variables)
    if chat.think is not None:
        variables.setdefault("enable_thinking", chat.think)
    try:
        return tokenizer.apply_chat_template(chat.messages, add_generation_prompt=True, tools=chat.tools or None,
                                             **variables)
    except ChatTemplateError as e:
        raise ApiError(400, str(e), "messages") from None
    except TypeError as e:  # a template variable that collides with the renderer's own arguments
        raise ApiError(400, f"chat template variables: {e}", "chat_template_kwargs") from None


def _grammar(loaded: Loaded, request: Request, shape: ReplyShape) -> str | None:
    """The reply's grammar: tool calls per tool_choice, or a JSON schema; either after the
    reasoning block the prompt opened. None: free text."""
    vocab = vocabulary_for(loaded, loaded.tokenizer)
    chat = request.chat
    try:
        if shape.tools is not None and chat is not None and chat.tools:
            grammar = shape.tools.grammar(chat.tools, chat.choice, chat.parallel, shape.reasoning, shape.inside,
                                          lambda text: special_token_id(loaded.tokenizer, text))
            return vocab.lark_grammar(grammar)
        if request.schema is None:
            return None
        grammar = vocab.json_grammar(request.schema)
        if shape.reasoning is not None and shape.inside:  # the answer's JSON follows the reasoning
            close = special_token_id(loaded.tokenizer, shape.reasoning.close)
            close = f"<[{close}]>" if close is not None else json.dumps(shape.reasoning.close)
            schema = {**request.schema, "x-guidance": JSON_STYLE}
            grammar = vocab.lark_grammar(f"%llguidance {{}}\nstart: reasoning BLANK %json {json.dumps(schema)}\n"
                                         f"reasoning[lazy]: /(?s:.*)/ {close}\n"
                                         "BLANK: /[ \\t\\r\\n]*/\n")
        return grammar
    except GrammarError as e:
        raise ApiError(400, str(e), "tools" if chat is not None and chat.tools else "format") from None


def _prepare(loaded: Loaded, request: Request) -> tuple[list[int], int, Constraint | None]:
    """(prompt ids, max tokens, the first choice's constraint): `prepare`'s for one job."""
    ids, max_tokens, constraints, _, _ = prepare(loaded, request)
    return ids, max_tokens, constraints[0]


def prepare(loaded: Loaded, request: Request) -> tuple[list[int], int, list[Constraint | None], ReplyShape,
                                                       tuple[int, list[int]] | None]:
    """(prompt ids, max tokens, a constraint per choice, the reply's shape, the reasoning
    budget), in a worker thread: rendering, tokenizing and compiling a grammar can take a
    while."""
    limit = loaded.context_length
    if request.max_tokens is not None and request.max_tokens > limit:
        raise ApiError(400, f"the token limit {request.max_tokens} is more than {loaded.name}'s context "
                            f"length {limit}", "max_tokens")
    num_ctx = min(request.num_ctx or limit, limit)
    prompt_text = ""
    try:
        if request.chat is not None:
            prompt_text = render_chat(loaded, request.chat)
            ids = encode_prompt(loaded.tokenizer, prompt_text, num_ctx)
        else:
            ids = request.build(loaded.tokenizer, num_ctx)
    except PromptTooLong as e:
        raise ApiError(400, f"{e}; the context holds {num_ctx}", "messages", "context_length_exceeded") from None
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    if len(ids) >= num_ctx:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; the context holds {num_ctx}", "messages",
                       "context_length_exceeded")
    room = num_ctx - len(ids)
    max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
    shape = reply_shape(loaded, request.chat, prompt_text)
    grammar = _grammar(loaded, request, shape)
    constraints: list[Constraint | None] = [None] * request.n
    if grammar is not None:
        vocab = vocabulary_for(loaded, loaded.tokenizer)
        try:
            constraints = [vocab.constraint(grammar) for _ in range(request.n)]
        except GrammarError as e:
            raise ApiError(400, str(e), "format") from None
    budget = None
    if request.reasoning_budget is not None and shape.reasoning is not None and shape.inside:
        close = loaded.tokenizer.encode(shape.reasoning.close, add_special=False, parse_special=True)
        budget = (request.reasoning_budget, close)
    return ids, max_tokens, constraints, shape, budget


async def start(app: web.Application, request: Request) -> Run:
    """Load the model, build the prompt and submit the job; the caller must close() the Run."""
    await refuse_embedding_model(request.model)
    pool: ModelPool = app["pool"]
    loaded, load_ns = await pool.acquire(request.model, request.keep_alive)
    run = Run(pool, loaded, load_ns, request)
    try:
        ids, max_tokens, constraints, run.shape, budget = await asyncio.get_running_loop().run_in_executor(
            None, prepare, loaded, request)
        run.prompt_tokens = len(ids)
        loop = asyncio.get_running_loop()

        def emitter(index: int) -> Callable[[tuple[str, Any]], None]:
            def emit(event: tuple[str, Any]) -> None:  # on the worker thread
                try:
                    loop.call_soon_threadsafe(run.queue.put_nowait, (index, *event))
                except RuntimeError:  # the event loop is closed: the server is stopping
                    pass
            return emit

        seed = request.params.seed
        for i, constraint in enumerate(constraints):
            params = request.params
            if i and seed is not None and seed >= 0:  # each choice its own draws, reproducibly
                params = dataclasses.replace(params, seed=(seed + i) % 2 ** 64)
            run.jobs.append(Job(ids, params, max_tokens, request.stop, emitter(i), constraint,
                                logprobs=request.logprobs, reasoning_budget=budget))
        for job in run.jobs:
            pool.worker.submit(loaded.engine, job)
    except BaseException:
        run.close()
        raise
    return run
