"""What the Anthropic Messages and OpenAI Responses routes share: the request's tools and
template switches as a `generation.Chat`, an assistant prefill (Anthropic's final
assistant message), and the prompt's token count (count_tokens; a started Run keeps it as
prompt_tokens, which Anthropic's message_start reports before any token)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..chat_template import ChatTemplateError
from ..generate import encode_prompt
from ..tools import Choice, ToolError, choice_of, tools_of
from .common import ApiError
from .generation import Chat, Request, render_chat
from .pool import Loaded, ModelPool, refuse_embedding_model


@dataclass
class Tooling:
    """A request's tools (OpenAI's normalized form), its tool_choice, whether calls may come
    several at once, the template's switches (enable_thinking, more variables), and a
    prefill: text the answer continues."""

    tools: list[dict] = field(default_factory=list)
    choice: Choice = field(default_factory=lambda: Choice("none"))
    parallel: bool = True
    think: bool | None = None
    variables: dict = field(default_factory=dict)
    prefill: str = ""

    @classmethod
    def of(cls, tools: Any, choice: Any, parallel: bool = True) -> Tooling:
        try:
            listed = tools_of(tools)
            chosen = choice_of(choice, listed)
        except ToolError as e:
            raise ApiError(400, str(e), "tool_choice" if "tool_choice" in str(e) else "tools") from None
        return cls(listed, chosen, parallel)

    def chat(self, messages: list[dict]) -> Chat:
        return Chat(messages, tools=self.tools, choice=self.choice, parallel=self.parallel, think=self.think,
                    variables=dict(self.variables))

    def request(self, messages: list[dict], **fields: Any) -> Request:
        """A Request for these messages: rendered by generation (tools, reasoning, grammar),
        or, with a prefill, by the chat template then the prefill (a plain-text reply)."""
        if not self.prefill:
            return Request(build=None, chat=self.chat(messages), **fields)
        if self.tools:
            raise ApiError(400, "a final assistant message (a prefill) cannot be combined with tools in mlxllm",
                           "messages")

        def build(tokenizer, limit: int | None) -> list[int]:
            options = dict(self.variables, **({} if self.think is None else {"enable_thinking": self.think}))
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **options)
            except ChatTemplateError as e:
                raise ApiError(400, str(e), "messages") from None
            return encode_prompt(tokenizer, text + self.prefill, limit)

        return Request(build=build, **fields)


def prompt_ids(loaded: Loaded, request: Request) -> list[int]:
    """The prompt a request would run on (on a worker thread)."""
    if request.chat is not None:
        return encode_prompt(loaded.tokenizer, render_chat(loaded, request.chat))
    return request.build(loaded.tokenizer, None)


async def count_prompt(app: web.Application, request: Request) -> int:
    """The prompt's token count, the model loaded for its tokenizer and template."""
    await refuse_embedding_model(request.model)
    pool: ModelPool = app["pool"]
    loaded, _ = await pool.acquire(request.model, request.keep_alive)
    try:
        return len(await asyncio.get_running_loop().run_in_executor(None, prompt_ids, loaded, request))
    finally:
        pool.release(loaded)

