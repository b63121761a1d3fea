"""Chat templates: render a GGUF `tokenizer.chat_template` the way Hugging Face does, in a sandbox.

The template is Jinja2 code that came with a downloaded file, so it runs in jinja2's
`ImmutableSandboxedEnvironment` with the settings and globals of transformers'
`PreTrainedTokenizerBase.apply_chat_template` (`trim_blocks`, `lstrip_blocks`, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, the `{% generation %}`
block). Any reach for Python internals (`''.__class__`, `cycler.__init__.__globals__`) fails at
once with a `ChatTemplateError` instead of rendering an empty string, and nothing runs.

A template is also bounded in time and size: every `for` loop's iterable and every call is
counted against a deadline (`MAX_RENDER_SECONDS`: a loop that never ends, even one that
writes nothing, is stopped), and the operations that can make a string or list grow
without a loop (`*`, `+`, `~`, `%` and `format` widths, `center`, `indent`, `join`,
`replace`, `tojson`'s indent) are refused past `MAX_OUTPUT_CHARS`, as is the output itself.

A model without a template gets a documented fallback (`fallback_chat_template`): ChatML when
the vocabulary has ChatML's markers (what llama.cpp uses when a file has no template), otherwise
a plain "Role: text" transcript that any base model can continue.
"""

from __future__ import annotations

import json
import re
import string
import threading
import time
from collections.abc import Container, Iterable, Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import filters as jinja_filters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OUTPUT_CHARS = 16 * 1024 * 1024  # a prompt this long is a runaway loop, not a conversation
MAX_SEQUENCE_REPEAT = 1 << 20  # cap on `"x" * n` / `[x] * n` inside a template
MAX_POWER_EXPONENT = 4096  # cap on `a ** b` for integers (a huge power is a cheap CPU/memory bomb)
MAX_RENDER_SECONDS = 5.0  # real templates render in milliseconds
MAX_WIDTH = 4096  # cap on a padding width or indent (`center`, `indent`, `%10s`, `{:>10}`, `tojson(indent=)`)

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
    _check_width(indent if isinstance(indent, int) else len(indent or ""), "tojson indent")
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


class _Budget(threading.local):
    """The deadline of the render running on this thread (templates are shared between
    threads; each render is on one)."""

    deadline = float("inf")
    seconds = 0.0

    def tick(self) -> None:
        # the clock on every tick (~50 ns, next to ~1 us a jinja2 loop item costs): ticks
        # can be far apart (one per outer item of a nested loop the inner filter drives)
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template ran longer than {self.seconds:g} s (a loop that does not end?)")


_BUDGET = _Budget()


class _Counted:
    """A `for` loop's iterable, each item counted against the render's deadline; its
    length stays visible to `loop.length`."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[Any]):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)  # type: ignore[arg-type]  (TypeError: jinja counts by listing)

    def __iter__(self) -> Iterator[Any]:
        tick = _BUDGET.tick
        for item in self._items:
            tick()
            yield item


def _sized(value: Any) -> Any:
    """A string or list built inside the template, refused past MAX_OUTPUT_CHARS."""
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_OUTPUT_CHARS:
        raise SecurityError(f"a value of {len(value)} items is too large")
    return value


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > MAX_WIDTH:
        raise SecurityError(f"{what} {width} is too large")


_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")


def _check_percent_format(fmt: str, args: Any) -> None:
    """`'%10s' % x`: numeric widths and precisions up to MAX_WIDTH, `*` widths too."""
    for m in _PERCENT_SPEC.finditer(fmt):
        for n in m.groups():
            if n and n != "*":
                _check_width(int(n), "format width")
    if "*" in fmt:
        for a in args if isinstance(args, tuple) else (args,):
            _check_width(a, "format width")


def _check_format_string(fmt: str, args: Any, kwargs: Any) -> None:
    """`'{:>10}'.format(x)`: the same bound on widths in format specs, nested ones too."""
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
    except ValueError:
        return  # str.format raises the same error itself
    for spec in specs:
        for n in re.findall(r"\d+", spec):
            _check_width(int(n), "format width")
        if "{" in spec:
            values = kwargs.values() if isinstance(kwargs, dict) else ()
            for a in (*args, *values):
                _check_width(a, "format width")


def _center(value: str, width: int = 80) -> str:
    _check_width(width, "center width")
    return jinja_filters.do_center(value, width)


def _indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    _check_width(width if isinstance(width, int) else len(width), "indent")
    return _sized(jinja_filters.do_indent(s, width, first, blank))


def _replace(eval_ctx: Any, s: str, old: str, new: str, count: int | None = None) -> str:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        n = s.count(old) if old else len(s) + 1
        _sized_length(len(s) + n * len(new))
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


def _join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    if isinstance(d, str) and d and hasattr(value, "__len__"):
        _sized_length(len(d) * len(value))  # type: ignore[arg-type]
    return _sized(jinja_filters.sync_do_join(eval_ctx, value, d, attribute))


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    if isinstance(value, str):
        _check_percent_format(value, args or kwargs)
    return jinja_filters.do_format(value, *args, **kwargs)


def _sized_length(n: int) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise SecurityError(f"a string of {n} characters is too large")


_replace.jinja_pass_arg = jinja_filters.do_replace.jinja_pass_arg  # type: ignore[attr-defined]
_join.jinja_pass_arg = jinja_filters.sync_do_join.jinja_pass_arg  # type: ignore[attr-defined]


class _BoundedCodeGenerator(CodeGenerator):
    """jinja2's code generator with every `for` iterable counted (`_Counted`) and every
    `~` concatenation sized: the two ways a template spends time or memory without a call
    the sandbox sees. (jinja2 allows no custom node types, so the iterable is marked by
    identity and wrapped as it is written.)"""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._counted: set[int] = set()

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._counted.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) not in self._counted:
            return super().visit(node, *args, **kwargs)
        self._counted.discard(id(node))
        self.write("environment.filters['_mlxllm_counted'](")
        super().visit(node, *args, **kwargs)
        self.write(")")
        return None

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.filters['_mlxllm_sized'](")
        super().visit_Concat(node, frame)
        self.write(")")


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, made strict: an unsafe attribute raises instead of
    becoming a silent Undefined, and repetition/power operators are bounded."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

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
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left, right)
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _sized_length(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _BUDGET.tick()  # recursion through macros and `loop(...)` is counted here
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        """`str.format` / `format_map` as jinja2 sandboxes them, with widths bounded."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            _check_format_string(fmt, args, kwargs if value.__name__ == "format" else (args[0] if args else {}))
            return wrapped(*args, **kwargs)
        return bounded_format


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.filters["center"] = _center
    env.filters["indent"] = _indent
    env.filters["replace"] = _replace
    env.filters["join"] = _join
    env.filters["format"] = _format
    env.filters["_mlxllm_counted"] = _Counted
    env.filters["_mlxllm_sized"] = _sized
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()
_COMPILED: dict[str, jinja2.Template] = {}  # templates are few per process; compiling costs ~ms


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


def render_chat_template(template: str, messages: list[dict[str, Any]], *,
                         timeout: float = MAX_RENDER_SECONDS, **ctx: Any) -> str:
    """Render `template` for `messages` with Hugging Face semantics.

    `ctx` holds the other template variables: `add_generation_prompt`, `tools`, `documents`,
    `bos_token`, `eos_token` and any model-specific switches (e.g. `enable_thinking`).
    Raises `ChatTemplateError` (one line) for syntax errors, `raise_exception(...)` calls,
    sandbox violations, runtime errors inside the template, output past MAX_OUTPUT_CHARS
    and a render still running after `timeout` seconds.
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    compiled = _compile(template)
    ctx.setdefault("add_generation_prompt", False)
    ctx.setdefault("tools", None)
    _BUDGET.seconds = timeout
    _BUDGET.deadline = time.monotonic() + timeout
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
    except Exception as e:  # noqa: BLE001 (a template is code: TypeError, KeyError, ... from inside it)
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
    finally:
        _BUDGET.deadline = float("inf")
    return "".join(parts)
