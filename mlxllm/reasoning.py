"""Reasoning ("thinking") in a reply: the text between a template's reasoning markers
(`<think>` ... `</think>` in DeepSeek-R1, Qwen 3, SmolLM3, ...) is the model's reasoning,
returned apart from the answer (OpenAI-style `reasoning_content`, Ollama's
`message.thinking`). gpt-oss's harmony channels are read by `mlxllm.tools.HarmonyFormat`.

`Reasoning.for_template(template)` finds the markers; `inside(prompt)` tells whether the
rendered prompt already opened a block (templates that write `<think>` at the start of the
assistant's turn), so the reply starts in it; `ReasoningStream` splits a reply as it
streams, holding back text that may still become a marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Delta:
    """One piece of a reply: kind "content" or "reasoning" with `text`, or "call" with
    `call` (an `mlxllm.tools.ToolCall`)."""

    kind: str
    text: str = ""
    call: Any = None


@dataclass(frozen=True)
class Reasoning:
    open: str = "<think>"
    close: str = "</think>"

    @staticmethod
    def for_template(template: str | None) -> Reasoning | None:
        """The reasoning markers a chat template writes or strips, or None: it does not think."""
        if template and "<think>" in template and "</think>" in template:
            return THINK
        return None

    def inside(self, prompt: str) -> bool:
        """Whether the prompt ends inside an open reasoning block."""
        at = prompt.rfind(self.open)
        return at >= 0 and prompt.find(self.close, at) < 0 and not prompt[at + len(self.open):].strip()

    def split(self, text: str, inside: bool = False) -> tuple[str, str]:
        """(reasoning, content) of a whole reply."""
        stream = ReasoningStream(self, inside)
        pieces = stream.feed(text) + stream.close()
        return ("".join(p.text for p in pieces if p.kind == "reasoning"),
                "".join(p.text for p in pieces if p.kind == "content"))


THINK = Reasoning()


class ReasoningStream:
    """One reply split into reasoning and content as it arrives. A reply may also open the
    block itself (at its start, after whitespace); whitespace right after the block, which
    templates strip, is dropped."""

    def __init__(self, reasoning: Reasoning, inside: bool = False) -> None:
        self.r = reasoning
        self.state = "reasoning" if inside else "start"  # start -> reasoning -> content
        self.pending = ""
        self.after_close = False

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        self.pending += text
        while self.pending:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(self.r.open):
                    self.pending, self.state = head[len(self.r.open):].lstrip("\n"), "reasoning"
                    continue
                if self.r.open.startswith(head):  # may still become the opening marker
                    return out
                self.state = "content"
                continue
            if self.state == "reasoning":
                at = self.pending.find(self.r.close)
                if at >= 0:
                    if at:
                        out.append(Delta("reasoning", self.pending[:at]))
                    self.pending, self.state, self.after_close = self.pending[at + len(self.r.close):], "content", True
                    continue
                keep = _partial_suffix(self.pending, self.r.close)
                ready = self.pending[:len(self.pending) - keep]
                if ready:
                    out.append(Delta("reasoning", ready))
                self.pending = self.pending[len(ready):]
                return out
            if self.after_close:  # the blank lines a template puts between thinking and answer
                stripped = self.pending.lstrip()
                if not stripped:
                    self.pending = ""
                    return out
                self.pending, self.after_close = stripped, False
            out.append(Delta("content", self.pending))
            self.pending = ""
        return out

    def close(self) -> list[Delta]:
        rest, self.pending = self.pending, ""
        if not rest or (self.after_close and not rest.strip()):
            return []
        kind = "reasoning" if self.state == "reasoning" else "content"
        return [Delta(kind, rest)]


def _partial_suffix(text: str, marker: str) -> int:
    """How many trailing characters of text are a proper prefix of marker."""
    return max((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), default=0)
