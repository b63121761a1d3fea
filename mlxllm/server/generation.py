"""One generation request, API-neutral: the prompt rendered through the model's chat
template (or a request's own), the job submitted to the model's engine, and its events
read back on the event loop."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..chat_template import ChatTemplateError, render_chat_template
from ..constrain import Constraint, GrammarError, vocabulary_for
from ..generate import PromptTooLong
from ..sample import SamplingParams
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
class Request:
    """A generation request in API-neutral terms (the routes fill it in)."""

    model: str
    build: Callable[[Any, int], list[int]]  # (tokenizer, context) -> prompt ids (runs in a worker thread)
    params: SamplingParams
    max_tokens: int | None  # None: until the context is full
    num_ctx: int | None
    stop: list[str]
    schema: dict | None
    keep_alive: float | None | str = "default"
    started: float = field(default_factory=time.perf_counter)


class Run:
    """A submitted job seen from the event loop: its events, in order, then done."""

    def __init__(self, pool: ModelPool, loaded: Loaded, load_ns: int, request: Request) -> None:
        self.pool, self.loaded, self.load_ns, self.request = pool, loaded, load_ns, request
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.job: Job | None = None
        self.finished = False
        self._released = False

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """("text", str) pieces, then ("done", stats); an engine error raises ApiError 500."""
        while True:
            kind, value = await self.queue.get()
            if kind == "error":
                self.finished = True
                raise ApiError(500, value)
            if kind == "done":
                self.finished = True
                value["load_ns"] = self.load_ns
                value["total_ns"] = int((time.perf_counter() - self.request.started) * 1e9)
            yield kind, value
            if kind == "done":
                return

    def close(self) -> None:
        """The handler is done with it: a job still running is cancelled (its client went
        away) and the model is released to its keep_alive timer."""
        if self.job is not None and not self.finished:
            self.job.cancelled = True
        if not self._released:
            self._released = True
            self.pool.release(self.loaded)


def _prepare(loaded: Loaded, request: Request) -> tuple[list[int], int, Constraint | None]:
    """(prompt ids, max tokens, constraint), in a worker thread: tokenizing and compiling
    a grammar can take a while."""
    limit = loaded.context_length
    if request.max_tokens is not None and request.max_tokens > limit:
        raise ApiError(400, f"the token limit {request.max_tokens} is more than {loaded.name}'s context "
                            f"length {limit}", "max_tokens")
    num_ctx = min(request.num_ctx or limit, limit)
    try:
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
    constraint = None
    if request.schema is not None:
        vocab = vocabulary_for(loaded, loaded.tokenizer)
        try:
            constraint = vocab.constraint(vocab.json_grammar(request.schema))
        except GrammarError as e:
            raise ApiError(400, str(e), "format") from None
    return ids, max_tokens, constraint


async def start(app: web.Application, request: Request) -> Run:
    """Load the model, build the prompt and submit the job; the caller must close() the Run."""
    await refuse_embedding_model(request.model)
    pool: ModelPool = app["pool"]
    loaded, load_ns = await pool.acquire(request.model, request.keep_alive)
    run = Run(pool, loaded, load_ns, request)
    try:
        ids, max_tokens, constraint = await asyncio.get_running_loop().run_in_executor(
            None, _prepare, loaded, request)
        loop = asyncio.get_running_loop()

        def emit(event: tuple[str, Any]) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(run.queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is stopping
                pass

        run.job = Job(ids, request.params, max_tokens, request.stop, emit, constraint)
        pool.worker.submit(loaded.engine, run.job)
    except BaseException:
        run.close()
        raise
    return run
