"""What the Anthropic Messages and OpenAI Responses routes share for tools and reasoning:
the prompt rendered with the request's tools, the reply split into reasoning, text and
tool calls (`mlxllm.tools.Reply`), and the tool_choice grammar every reply keeps to.

`start_run` is `generation.start` with one addition: a grammar built from the prompt on
the worker thread (the call format and whether the prompt opened a reasoning block are
known only once the model's template has rendered it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..chat_template import ChatTemplateError
from ..constrain import GrammarError, vocabulary_for
from ..generate import encode_prompt
from ..reasoning import Reasoning
from ..tools import Choice, Reply, ToolError, ToolFormat, choice_of, tools_of
from .common import ApiError
from .engine import Job
from .generation import Request, Run, _prepare, start
from .pool import ModelPool, refuse_embedding_model


@dataclass
class Tooling:
    """A request's tools (OpenAI's normalized form), its tool_choice, whether calls may come
    several at once; and, once the prompt is built, the call format and reasoning markers
    the model's template uses."""

    tools: list[dict] = field(default_factory=list)
    choice: Choice = field(default_factory=Choice)
    parallel: bool = True
    prefill: str = ""  # text the answer continues (Anthropic's final assistant message)
    think: bool | None = None  # the template's enable_thinking (None: its default)
    # filled in by build (on the worker thread):
    prompt_tokens: int = 0
    format: ToolFormat | None = None
    reasoning: Reasoning | None = None
    inside: bool = False
    special: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def of(cls, tools: Any, choice: Any, parallel: bool = True, param: str = "tools") -> Tooling:
        try:
            listed = tools_of(tools)
            chosen = choice_of(choice, listed)
        except ToolError as e:
            raise ApiError(400, str(e), param) from None
        return cls(listed, chosen, parallel)

    def build(self, messages: list[dict]):
        """The Request's build: the chat template's rendering (with the tools, when there
        are any), then the prefill, tokenized."""
        def build(tokenizer, limit: int | None) -> list[int]:
            template = tokenizer.chat_template
            if self.tools:
                self.format = ToolFormat.for_template(template)
                if self.format is None:
                    raise ApiError(400, "this model does not support tools: its chat template renders none", "tools")
            options = {} if self.think is None else {"enable_thinking": self.think}
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=self.tools or None,
                                                     **options)
            except ChatTemplateError as e:
                raise ApiError(400, str(e), "template") from None
            text += self.prefill
            self.reasoning = Reasoning.for_template(template)
            self.inside = self.reasoning is not None and self.reasoning.inside(text)
            ids = encode_prompt(tokenizer, text, limit)
            self.prompt_tokens = len(ids)
            return ids
        return build

    def grammar(self, tokenizer) -> str | None:
        """The tool_choice grammar for this reply (None: no tools, free text)."""
        if not self.tools or self.format is None:
            return None

        def special(text: str) -> int | None:
            if text not in self.special:
                ids = tokenizer.encode(text, add_special=False, parse_special=True)
                self.special[text] = ids[0] if len(ids) == 1 and tokenizer.is_special(ids[0]) else None
            return self.special[text]

        return self.format.grammar(self.tools, self.choice, self.parallel, self.reasoning, self.inside, special)

    def reply(self) -> Reply:
        """The reply's splitter: reasoning, text and (when tools were offered) calls."""
        return Reply(self.format if self.tools else None, self.reasoning, self.inside)


async def start_run(app: web.Application, request: Request, tooling: Tooling) -> Run:
    """generation.start, with the tool_choice grammar (when there are tools) as the constraint."""
    if not tooling.tools:
        return await start(app, request)
    await refuse_embedding_model(request.model)
    pool: ModelPool = app["pool"]
    loaded, load_ns = await pool.acquire(request.model, request.keep_alive)
    run = Run(pool, loaded, load_ns, request)
    loop = asyncio.get_running_loop()

    def prepare():  # on a worker thread: tokenizing and compiling the grammar take a while
        ids, max_tokens, _ = _prepare(loaded, request)
        try:
            grammar = tooling.grammar(loaded.tokenizer)
            constraint = vocabulary_for(loaded, loaded.tokenizer).constraint(grammar) if grammar else None
        except GrammarError as e:
            raise ApiError(400, f"the tools cannot be enforced: {e}", "tools") from None
        return ids, max_tokens, constraint

    try:
        ids, max_tokens, constraint = await loop.run_in_executor(None, prepare)

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
