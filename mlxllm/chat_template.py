"""Chat templates: render a GGUF `tokenizer.chat_template` the way Hugging Face does, in a sandbox.

The template is Jinja2 code that came with a downloaded file, so it runs in jinja2's
`ImmutableSandboxedEnvironment` with the settings and globals of transformers'
`PreTrainedTokenizerBase.apply_chat_template` (`trim_blocks`, `lstrip_blocks`, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, the `{% generation %}`
block). Any reach for Python internals (`''.__class__`, `cycler.__init__.__globals__`) fails at
once with a `ChatTemplateError` instead of rendering an empty string, and nothing runs.

A model without a template gets a documented fallback (`fallback_chat_template`): ChatML when
the vocabulary has ChatML's markers (what llama.cpp uses when a file has no template), otherwise
a plain "Role: text" transcript that any base model can continue.
"""

from __future__ import annotations

import json
from collections.abc import Container
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OUTPUT_CHARS = 16 * 1024 * 1024  # a prompt this long is a runaway loop, not a conversation
MAX_SEQUENCE_REPEAT = 1 << 20  # cap on `"x" * n` / `[x] * n` inside a template
MAX_POWER_EXPONENT = 4096  # cap on `a ** b` for integers (a huge power is a cheap CPU/memory bomb)

# ChatML, as llama.cpp's `llm_chat_apply_template` (LLM_CHAT_TEMPLATE_CHATML) writes it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Plain transcript for vocabularies without chat markers: "System: ...\n\nUser: ...\n\nAssistant:".
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template that cannot render; the message is one line."""


def fallback_chat_template(vocabulary: Container[str]) -> str:
    """The template used when a GGUF file has no `tokenizer.chat_template`.

    ChatML if the vocabulary holds `<|im_start|>` and `<|im_end|>`; otherwise `PLAIN_TEMPLATE`.
    """
    if "<|im_start|>" in vocabulary and "<|im_end|>" in vocabulary:
        return CHATML_TEMPLATE
    return PLAIN_TEMPLATE


def _raise_exception(message: str) -> None:
    # The global Hugging Face templates call to reject a conversation they cannot format.
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers overrides jinja2's `tojson` (which HTML-escapes and sorts keys) with plain
    # json.dumps; templates that embed tool schemas depend on that exact text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it for
    training masks; for rendering it is just its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, made strict: an unsafe attribute raises instead of
    becoming a silent Undefined, and repetition/power operators are bounded."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if count > 0 and len(seq) * count > MAX_SEQUENCE_REPEAT:
                        raise SecurityError(f"repetition of {len(seq)} items x {count} is too large")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(right) > MAX_POWER_EXPONENT \
                    and left not in (-1, 0, 1):
                raise SecurityError(f"power with exponent {right} is too large")
        return super().call_binop(context, operator, left, right)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()
_COMPILED: dict[str, jinja2.Template] = {}  # templates are few per process; compiling costs ~ms


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _compile(template: str) -> jinja2.Template:
    compiled = _COMPILED.get(template)
    if compiled is None:
        try:
            compiled = _ENV.from_string(template)
        except TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {_one_line(e.message)}") from None
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        _COMPILED[template] = compiled
    return compiled


def render_chat_template(template: str, messages: list[dict[str, Any]], **ctx: Any) -> str:
    """Render `template` for `messages` with Hugging Face semantics.

    `ctx` holds the other template variables: `add_generation_prompt`, `tools`, `documents`,
    `bos_token`, `eos_token` and any model-specific switches (e.g. `enable_thinking`).
    Raises `ChatTemplateError` (one line) for syntax errors, `raise_exception(...)` calls,
    sandbox violations and runtime errors inside the template.
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    compiled = _compile(template)
    ctx.setdefault("add_generation_prompt", False)
    ctx.setdefault("tools", None)
    try:
        parts: list[str] = []
        size = 0
        for piece in compiled.generate(messages=messages, **ctx):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise ChatTemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS} characters")
            parts.append(piece)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {_one_line(e)}") from None
    except TemplateError as e:
        # `raise_exception(...)` and undefined-variable errors land here.
        raise ChatTemplateError(f"chat template error: {_one_line(e.message or e)}") from None
    except Exception as e:  # a template is code: TypeError, KeyError, ... from inside it
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
    return "".join(parts)
