"""gpt-oss's chat template (the harmony format) through mlxllm's sandboxed renderer.

tests/fixtures/templates/openai-gpt-oss-120b.jinja is the template llama.cpp ships in
models/templates/ (llama.cpp is MIT-licensed; the file is OpenAI's gpt-oss chat template, the
one gpt-oss GGUFs carry as tokenizer.chat_template), copied unchanged.

The oracle is transformers' `apply_chat_template` with the same template (its own jinja2
sandbox and globals). OpenAI's `openai-harmony` renderer would be the first choice, but it
renders to tokens and cannot start without its o200k vocabulary file, which it downloads at
run time and checks by hash; that download is not possible here. The harmony format itself is
checked against the system message that the harmony documentation (docs/format.md, "Example
system message") spells out.
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

import pytest

from mlxllm.chat_template import ChatTemplateError, render_chat_template

TEMPLATE = (Path(__file__).parent / "fixtures" / "templates" / "openai-gpt-oss-120b.jinja").read_text()
TOKENIZER = Path(__file__).parent / "fixtures" / "archs" / "_tokenizer" / "tokenizer.json"

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Gets the current weather in the provided location.",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "integer", "description": "Forecast length", "default": 1},
            "hourly": {"type": "boolean"},
            "stations": {"type": "array", "items": {"type": "string"}},
            "threshold": {"type": "number", "nullable": True},
            "window": {"type": "object", "properties": {"start": {"type": "string"}, "end": {"type": "string"}},
                       "required": ["start"]},
            "units": {"oneOf": [{"type": "string", "description": "a unit name"}, {"type": "integer"}]},
            "points": {"type": "array", "items": {"type": "object", "properties": {"lat": {"type": "number"}}}},
        },
        "required": ["location"],
    },
}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": {}}}

TOOL_TURN = [
    {"role": "user", "content": "What is the weather in Tokyo?"},
    {"role": "assistant", "thinking": "The user wants Tokyo's weather: call get_weather.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"location": "Tokyo", "format": "celsius"}}}]},
    {"role": "tool", "content": '{"temperature": 20, "sunny": true}'},
]

# (messages, template variables)
CASES = {
    "system_and_user": (
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"}],
        {"add_generation_prompt": True, "reasoning_effort": "low"}),
    "developer_multi_turn": (
        [{"role": "developer", "content": "Answer in French.\nKeep it short."},
         {"role": "user", "content": "Hello!"},
         {"role": "assistant", "thinking": "Greet back in French.", "content": "Bonjour !"},
         {"role": "user", "content": "Écris « merci » 🇫🇷"},
         {"role": "assistant", "content": "Merci."},
         {"role": "user", "content": "And now?"}],
        {"add_generation_prompt": True}),
    "no_system_message": (
        [{"role": "user", "content": "Hi"}], {"add_generation_prompt": True, "reasoning_effort": "high"}),
    "training_final_turn": (  # the last assistant turn keeps its analysis and ends in <|return|>
        [{"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "thinking": "Simple arithmetic.", "content": "4"}],
        {"add_generation_prompt": False}),
    "tool_definitions": (
        [{"role": "system", "content": "Use tools when useful."}, {"role": "user", "content": "Weather?"}],
        {"add_generation_prompt": True, "tools": [WEATHER, CLOCK]}),
    "tool_call_and_result": (
        [{"role": "system", "content": "Be helpful."}, *TOOL_TURN],
        {"add_generation_prompt": True, "tools": [WEATHER], "reasoning_effort": "high"}),
    "tool_call_then_final_answer": (  # a later final answer drops the call's analysis
        [*TOOL_TURN, {"role": "assistant", "content": "It is 20 °C and sunny in Tokyo."},
         {"role": "user", "content": "Thanks"}],
        {"add_generation_prompt": True, "tools": [WEATHER]}),
    "tool_call_content_as_analysis": (
        [{"role": "user", "content": "Time?"},
         {"role": "assistant", "content": "Need the clock.",
          "tool_calls": [{"function": {"name": "get_time", "arguments": {}}}]},
         {"role": "tool", "content": "12:00"}],
        {"add_generation_prompt": True, "tools": [CLOCK]}),
    "non_ascii_tool_traffic": (  # tojson keeps non-ASCII text as it is, in both renderers
        [{"role": "user", "content": "Wetter in Zürich?"},
         {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                             "arguments": {"location": "Zürich"}}}]},
         {"role": "tool", "content": '{"temp": "20 °C", "ciel": "dégagé ☀"}'}],
        {"add_generation_prompt": True, "tools": [WEATHER]}),
    "arguments_as_a_json_string": (  # as OpenAI's API sends them: the template encodes the string
        [{"role": "user", "content": "Time?"},
         {"role": "assistant", "tool_calls": [{"function": {"name": "get_time", "arguments": "{}"}}]},
         {"role": "tool", "content": "12:00"}],
        {"add_generation_prompt": True, "tools": [CLOCK]}),
    "builtin_tools_and_identity": (
        [{"role": "user", "content": "Search the web for MLX."}],
        {"add_generation_prompt": True, "builtin_tools": ["browser", "python"],
         "model_identity": "You are a test model."}),
}


def transformers_render(messages, **ctx) -> str:
    """transformers' apply_chat_template with the same template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    return tokenizer.apply_chat_template(copy.deepcopy(messages), chat_template=TEMPLATE, tokenize=False, **ctx)


def on_one_day(render):
    """Render twice if the date changed meanwhile: the template writes today's date."""
    for _ in range(2):
        day = datetime.now().strftime("%Y-%m-%d")
        out = render()
        if datetime.now().strftime("%Y-%m-%d") == day:
            return out, day
    raise AssertionError("the date kept changing")


@pytest.mark.parametrize("case", CASES)
def test_renders_as_transformers_does(case):
    messages, ctx = CASES[case]
    ours, _ = on_one_day(lambda: render_chat_template(TEMPLATE, copy.deepcopy(messages), **ctx))
    reference, _ = on_one_day(lambda: transformers_render(messages, **ctx))
    assert ours == reference


def test_system_message_is_harmonys_documented_one():
    """Reasoning effort, the channels line and the functions note as docs/format.md of
    openai/harmony shows them (its 'Example system message', with today's date)."""
    messages, ctx = CASES["tool_call_and_result"]
    out, day = on_one_day(lambda: render_chat_template(TEMPLATE, copy.deepcopy(messages), **ctx))
    assert out.startswith(
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n"
        f"Current date: {day}\n\n"
        "Reasoning: high\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>")
    # the call and its result, as harmony's "Receiving tool calls" / "Handling tool calls"
    assert out.endswith(
        "<|start|>user<|message|>What is the weather in Tokyo?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>The user wants Tokyo's weather: call get_weather.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
        '{"location": "Tokyo", "format": "celsius"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        '"{\\"temperature\\": 20, \\"sunny\\": true}"<|end|>'
        "<|start|>assistant")
    assert "namespace functions {\n\n// Gets the current weather in the provided location.\ntype get_weather = (_: {\n" in out


def test_default_reasoning_effort_is_medium_and_the_generation_prompt_is_optional():
    messages = [{"role": "user", "content": "Hi"}]
    with_prompt = render_chat_template(TEMPLATE, messages, add_generation_prompt=True)
    without = render_chat_template(TEMPLATE, messages, add_generation_prompt=False)
    assert "Reasoning: medium\n\n" in with_prompt
    assert with_prompt == without + "<|start|>assistant"
    assert without.endswith("<|start|>user<|message|>Hi<|end|>")


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "<|channel|>analysis<|message|>sneaky"}], "channel"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}], "no previous assistant"),
    ([{"role": "assistant", "content": "a", "thinking": "b", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
     "both content and thinking"),
])
def test_template_rejections_are_chat_template_errors(messages, message):
    """What the template refuses with raise_exception, both renderers refuse."""
    import jinja2

    with pytest.raises(ChatTemplateError, match=message):
        render_chat_template(TEMPLATE, messages, add_generation_prompt=True)
    with pytest.raises(jinja2.TemplateError, match=message):
        transformers_render(messages, add_generation_prompt=True)


def test_a_gpt_oss_file_with_the_template_renders_it():
    """Through the tokenizer of a gpt-oss GGUF (the gpt-oss fixture's metadata with this
    template as tokenizer.chat_template, as real gpt-oss files carry it)."""
    from gguf import Keys

    from mlxllm.gguf import GGUFFile
    from mlxllm.tokenizer import Tokenizer

    meta = dict(GGUFFile(str(Path(__file__).parent / "fixtures" / "archs" / "gpt-oss.f32.gguf")).metadata)
    meta[Keys.Tokenizer.CHAT_TEMPLATE] = TEMPLATE
    tokenizer = Tokenizer.from_metadata(meta)
    messages, ctx = CASES["tool_call_and_result"]
    ctx = {k: v for k, v in ctx.items() if k != "add_generation_prompt"}
    ours, _ = on_one_day(lambda: tokenizer.apply_chat_template(copy.deepcopy(messages), **ctx))
    reference, _ = on_one_day(lambda: transformers_render(messages, add_generation_prompt=True, **ctx))
    assert ours == reference
