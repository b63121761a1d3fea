"""Anthropic's Messages API on the real server (`python -m mlxllm serve`), driven by the
official `anthropic` client and by raw HTTP for the event stream: text equal to greedy
decoding through Ollama's route on the same messages, streaming equal to the whole
answer, stop sequences, max_tokens, prefill, structured output, count_tokens equal to the
rendered prompt's tokens, and Anthropic's error shape on bad requests."""

from __future__ import annotations

import json

import pytest

anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")
pytest.importorskip("ollama")  # tool_server's ol fixture
jsonschema = pytest.importorskip("jsonschema")

import tool_server
from tool_server import MODEL, THINK_MODEL, TOOLS_MODEL, greedy_chat

from mlxllm.generate import encode_prompt
from mlxllm.gguf import GGUFFile
from mlxllm.models import resolve
from mlxllm.tokenizer import Tokenizer

tool_server.require_model()
# tool_server's fixtures, named here for pytest to find: this module's own server
models_dir, server, tool_models, ol = tool_server.models_dir, tool_server.server, tool_server.tool_models, tool_server.ol

# Greedy: the current anthropic client has no temperature argument (the API deprecated
# sampling parameters), so it travels in the body as older clients and agents send it.
GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM = "Answer in one short sentence."


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_metadata(GGUFFile(resolve(MODEL)).metadata)


def create(client, extra: dict | None = None, model: str = MODEL, **kwargs):
    return client.messages.create(model=model, extra_body={**GREEDY, **(extra or {})}, **kwargs)


def sse_events(server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a raw streamed /v1/messages answer."""
    events, name = [], None
    with httpx.stream("POST", server.url + "/v1/messages", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                name = None
    return events


# ---------------------------------------------------------------------------- text

def test_text_equals_greedy_decoding(client, ol, tokenizer):
    m = create(client, max_tokens=16, system=SYSTEM, messages=QUESTION)
    messages = [{"role": "system", "content": SYSTEM}, *QUESTION]
    assert m.content[0].text == greedy_chat(ol, messages, 16)
    assert m.content[0].text and len(m.content) == 1 and m.content[0].type == "text"
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    prompt = len(encode_prompt(tokenizer, tokenizer.apply_chat_template(messages)))
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == prompt
    assert m.usage.cache_creation_input_tokens == 0 and 0 < m.usage.output_tokens <= 16


def test_end_turn_at_eos(client, ol):
    m = create(client, max_tokens=200, system=SYSTEM, messages=QUESTION)
    assert m.stop_reason == "end_turn" and m.usage.output_tokens < 200


def test_count_tokens_is_the_rendered_prompt(client, tokenizer):
    messages = [{"role": "system", "content": SYSTEM}, *QUESTION]
    expected = len(encode_prompt(tokenizer, tokenizer.apply_chat_template(messages)))
    counted = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=QUESTION)
    assert counted.input_tokens == expected
    m = create(client, max_tokens=4, system=SYSTEM, messages=QUESTION)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == expected


def test_system_blocks_and_content_blocks_equal_strings(client):
    plain = create(client, max_tokens=12, system=SYSTEM, messages=QUESTION)
    blocks = create(client, max_tokens=12, system=[{"type": "text", "text": SYSTEM}],
                    messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}])
    assert blocks.content[0].text == plain.content[0].text


def test_multi_turn(client, ol):
    turns = [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    m = create(client, max_tokens=12, system=SYSTEM, messages=turns)
    assert m.content[0].text == greedy_chat(ol, [{"role": "system", "content": SYSTEM}, *turns], 12)


def test_prefill_continues_the_assistant_turn(client, ol, tokenizer):
    """A final assistant message is the start of the answer: the prompt is the rendered
    chat then its text, and the answer holds what follows."""
    prefill = "The capital of France is"
    m = create(client, max_tokens=8, messages=[*QUESTION, {"role": "assistant", "content": prefill}])
    prompt = tokenizer.apply_chat_template(QUESTION) + prefill
    expected = ol.generate(MODEL, prompt, raw=True, options={"temperature": 0, "repeat_penalty": 1.0,
                                                            "num_predict": 8}).response
    assert m.content[0].text == expected and "Paris" in expected


# ---------------------------------------------------------------------------- streaming

def test_stream_equals_the_whole_answer(client):
    whole = create(client, max_tokens=16, system=SYSTEM, messages=QUESTION)
    with client.messages.stream(model=MODEL, max_tokens=16, system=SYSTEM, messages=QUESTION,
                                extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == whole.content[0].text
    assert final.content[0].text == whole.content[0].text and final.id.startswith("msg_")
    assert (final.stop_reason, final.stop_sequence) == (whole.stop_reason, whole.stop_sequence)
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_stream_events_as_anthropic_sends_them(server, client):
    body = {"model": MODEL, "max_tokens": 6, "messages": QUESTION, "system": SYSTEM, **GREEDY}
    events = sse_events(server, body)
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert deltas >= 1
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    counted = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=QUESTION).input_tokens
    assert start["usage"]["input_tokens"] == counted
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for n, d in events if n == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == create(client, max_tokens=6, system=SYSTEM, messages=QUESTION).content[0].text


# ---------------------------------------------------------------------------- stops

def test_stop_sequences(client, server):
    whole = create(client, max_tokens=16, system=SYSTEM, messages=QUESTION).content[0].text
    assert "Paris" in whole
    m = create(client, max_tokens=16, system=SYSTEM, messages=QUESTION, stop_sequences=["nowhere", "Paris"])
    assert m.content[0].text == whole[:whole.index("Paris")]
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "Paris")
    events = sse_events(server, {"model": MODEL, "max_tokens": 16, "system": SYSTEM, "messages": QUESTION,
                                 "stop_sequences": ["Paris"], **GREEDY})
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "Paris"}
    missed = create(client, max_tokens=200, system=SYSTEM, messages=QUESTION, stop_sequences=["Berlin"])
    assert (missed.stop_reason, missed.stop_sequence) == ("end_turn", None)


def test_max_tokens_stop_reason(client):
    m = create(client, max_tokens=3, messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_sampling_defaults_are_anthropics():
    """Unset, the sampling is the API's own: temperature 1, no top-k, top-p or repetition
    penalty (mlxllm's own defaults are llama.cpp's); what the request sets replaces them."""
    from mlxllm.server.anthropic import messages_request
    from mlxllm.server.tooluse import Tooling

    def params(**extra):
        p = messages_request({**BODY, **extra}, MODEL, Tooling()).params
        return (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.presence_penalty, p.frequency_penalty)

    assert params() == (1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0)
    assert params(temperature=0.5, top_k=5, top_p=0.7) == (0.5, 5, 0.7, 0.0, 1.0, 0.0, 0.0)


def test_structured_output(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    m = create(client, max_tokens=40, messages=[{"role": "user", "content": "Name a city in Europe as JSON."}],
               extra={"output_config": {"format": {"type": "json_schema", "schema": schema}}})
    jsonschema.validate(json.loads(m.content[0].text), schema)


# ---------------------------------------------------------------------------- tools

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                            "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "The current time in a time zone",
        "input_schema": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                         "required": ["zone"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ONE_CALL = {"type": "any", "disable_parallel_tool_use": True}


def check_calls(message, tools=(WEATHER, TIME)) -> list:
    """The message's tool_use blocks, each checked against its tool's schema."""
    schemas = {t["name"]: t["input_schema"] for t in tools}
    uses = [b for b in message.content if b.type == "tool_use"]
    for use in uses:
        assert use.id.startswith("toolu_") and use.name in schemas
        jsonschema.validate(use.input, schemas[use.name])
    return uses


def test_tool_use_forced_streaming_and_not(client, server, tool_models):
    m = create(client, model=TOOLS_MODEL, max_tokens=60, tools=[WEATHER, TIME], tool_choice=ONE_CALL, messages=ASK)
    uses = check_calls(m)
    assert m.stop_reason == "tool_use" and len(uses) == 1 and len(m.content) == 1
    with client.messages.stream(model=TOOLS_MODEL, max_tokens=60, tools=[WEATHER, TIME], tool_choice=ONE_CALL,
                                messages=ASK, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    streamed = check_calls(final)
    assert final.stop_reason == "tool_use" and [(u.name, u.input) for u in streamed] == [(u.name, u.input) for u in uses]
    events = sse_events(server, {"model": TOOLS_MODEL, "max_tokens": 60, "tools": [WEATHER, TIME],
                                 "tool_choice": ONE_CALL, "messages": ASK, **GREEDY})
    names = [n for n, _ in events]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    block = events[1][1]["content_block"]
    assert block["type"] == "tool_use" and block["input"] == {} and block["name"] == uses[0].name
    delta = events[3][1]["delta"]
    assert delta["type"] == "input_json_delta" and json.loads(delta["partial_json"]) == uses[0].input
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_tool_choice_names_the_tool(client, tool_models):
    m = create(client, model=TOOLS_MODEL, max_tokens=60, tools=[WEATHER, TIME], messages=ASK,
               tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True})
    assert [u.name for u in check_calls(m)] == ["get_time"] and m.stop_reason == "tool_use"


def test_tool_choice_none_and_auto(client, tool_models):
    none = create(client, model=TOOLS_MODEL, max_tokens=40, tools=[WEATHER], tool_choice={"type": "none"}, messages=ASK)
    assert not check_calls(none, (WEATHER,)) and none.stop_reason != "tool_use"
    assert "<tool_call>" not in "".join(b.text for b in none.content)
    auto = create(client, model=TOOLS_MODEL, max_tokens=80, tools=[WEATHER], messages=ASK)  # auto: text or calls, both parse
    assert bool(check_calls(auto, (WEATHER,))) == (auto.stop_reason == "tool_use")


def test_tool_result_round_trip(client, tool_models):
    """The call and its result go back as tool_use and tool_result blocks: the prompt is the
    template's rendering of the assistant's tool call and a tool message."""
    from mlxllm.tools import tools_of

    first = create(client, model=TOOLS_MODEL, max_tokens=60, tools=[WEATHER], tool_choice=ONE_CALL, messages=ASK)
    use = check_calls(first, (WEATHER,))[0]
    turns = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees, sunny"}]}]
    second = create(client, model=TOOLS_MODEL, max_tokens=30, tools=[WEATHER], messages=turns)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    tokenizer = Tokenizer.from_metadata(GGUFFile(str(tool_models / f"{TOOLS_MODEL}.gguf")).metadata)
    tools = tools_of([{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                        "parameters": WEATHER["input_schema"]}}])
    expected = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": use.input}}]},
        {"role": "tool", "tool_call_id": use.id, "name": use.name, "content": "18 degrees, sunny"}]
    text = tokenizer.apply_chat_template(expected, tools=tools)
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in text and '"city": "Paris"' in text
    counted = client.messages.count_tokens(model=TOOLS_MODEL, tools=[WEATHER], messages=turns).input_tokens
    assert counted == len(encode_prompt(tokenizer, text))
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == counted


def test_thinking_blocks(client, ol, tool_models):
    """With thinking enabled QwQ's template opens <think> in the prompt: the reply's reasoning
    is a thinking block; disabled, it closes the block at once and the reply is text."""
    from mlxllm.reasoning import THINK

    on = {"type": "enabled", "budget_tokens": 1024}
    m = client.messages.create(model=THINK_MODEL, max_tokens=24, messages=QUESTION, extra_body=GREEDY, thinking=on)
    tokenizer = Tokenizer.from_metadata(GGUFFile(str(tool_models / f"{THINK_MODEL}.gguf")).metadata)
    prompt = tokenizer.apply_chat_template(QUESTION, enable_thinking=True)
    assert THINK.inside(prompt) and not THINK.inside(tokenizer.apply_chat_template(QUESTION))
    raw = ol.generate(THINK_MODEL, prompt, raw=True,
                      options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 24}).response
    thinking, text = THINK.split(raw, inside=True)
    assert m.content[0].type == "thinking" and m.content[0].thinking == thinking
    assert "".join(b.text for b in m.content[1:]) == text.lstrip()
    with client.messages.stream(model=THINK_MODEL, max_tokens=24, messages=QUESTION, extra_body=GREEDY,
                                thinking=on) as stream:
        assert [b.model_dump() for b in stream.get_final_message().content] == [b.model_dump() for b in m.content]
    off = client.messages.create(model=THINK_MODEL, max_tokens=24, messages=QUESTION, extra_body=GREEDY,
                                 thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]


def test_thinking_budget_closes_the_block(client, tool_models):
    """budget_tokens: the loop closes the thinking block after that many tokens; the answer follows."""
    m = client.messages.create(model=THINK_MODEL, max_tokens=40, messages=QUESTION, extra_body=GREEDY,
                               thinking={"type": "enabled", "budget_tokens": 5})
    tokenizer = Tokenizer.from_metadata(GGUFFile(str(tool_models / f"{THINK_MODEL}.gguf")).metadata)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert len(tokenizer.encode(m.content[0].thinking, add_special=False)) <= 6


TOOL_BAD = [
    {"tools": [{"name": "f"}]},  # no input_schema
    {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
    {"tools": [WEATHER], "tool_choice": {"type": "sometimes"}},
    {"tool_choice": {"type": "any"}},  # no tools to call
    {"tools": [WEATHER, WEATHER]},
    {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}]},
    {"tools": [WEATHER], "messages": [*ASK, {"role": "assistant", "content": "Let me"}]},  # a prefill with tools
]


@pytest.mark.parametrize("extra", TOOL_BAD)
def test_bad_tool_requests(server, tool_models, extra):
    r = httpx.post(server.url + "/v1/messages", json={**BODY, "model": TOOLS_MODEL, **extra}, timeout=60)
    anthropic_error(r, 400, "invalid_request_error")


def test_tools_need_a_template_that_renders_them(server):
    r = httpx.post(server.url + "/v1/messages", json={**BODY, "tools": [WEATHER]}, timeout=60)
    assert "does not support tools" in anthropic_error(r, 400, "invalid_request_error")


# ---------------------------------------------------------------------------- bad requests

BODY = {"model": MODEL, "max_tokens": 8, "messages": QUESTION}
BAD = [
    ("/v1/messages", None, b"{not json", 400, "invalid_request_error"),
    ("/v1/messages", None, b"[1]", 400, "invalid_request_error"),
    ("/v1/messages", {"model": MODEL, "messages": QUESTION}, None, 400, "invalid_request_error"),  # no max_tokens
    ("/v1/messages", {"max_tokens": 8, "messages": QUESTION}, None, 400, "invalid_request_error"),  # no model
    ("/v1/messages", {**BODY, "messages": [{"role": "system", "content": "hi"}]}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "messages": []}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "messages": "hi"}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "messages": [{"role": "user"}]}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}]}]},
     None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "max_tokens": 0}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "max_tokens": "8"}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "max_tokens": 10 ** 9}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "temperature": 1.5}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "top_k": -1}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "stop_sequences": "x"}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "system": 5}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "messages": [*QUESTION, {"role": "assistant", "content": "Well "}]}, None, 400,
     "invalid_request_error"),  # a prefill may not end in whitespace
    ("/v1/messages", {**BODY, "output_config": {"format": {"type": "xml"}}}, None, 400, "invalid_request_error"),
    ("/v1/messages", {**BODY, "model": "no-such-model:1b"}, None, 404, "not_found_error"),
    ("/v1/messages/count_tokens", {"model": MODEL}, None, 400, "invalid_request_error"),
    ("/v1/messages/count_tokens", None, b"{not json", 400, "invalid_request_error"),
    ("/v1/messages/count_tokens", {"model": "no-such-model:1b", "messages": QUESTION}, None, 404, "not_found_error"),
    ("/v1/messages", {**BODY, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, None, 413,
     "request_too_large"),  # the server takes 1 MiB
]


def anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]["message"]


@pytest.mark.parametrize("path,body,raw,status,kind", BAD)
def test_bad_request_has_anthropics_error_shape(server, path, body, raw, status, kind):
    content = raw if raw is not None else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=120)
    anthropic_error(r, status, kind)


def test_missing_max_tokens_says_so(server):
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "messages": QUESTION}, timeout=60)
    assert "max_tokens" in anthropic_error(r, 400, "invalid_request_error")


def test_wrong_method_has_anthropics_error_shape(server):
    anthropic_error(httpx.get(server.url + "/v1/messages"), 405, "invalid_request_error")


def test_client_raises_the_api_errors(client):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model:1b", max_tokens=8, messages=QUESTION)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "role" in e.value.body["error"]["message"]


def test_still_serving_after_bad_requests(client):
    assert create(client, max_tokens=3, messages=QUESTION).usage.output_tokens == 3
