"""OpenAI's Responses API on the real server (`python -m mlxllm serve`), driven by the
official `openai` client and by raw HTTP for the event stream: text equal to greedy
decoding through Ollama's route on the same messages, streaming equal to the whole
answer, input items, instructions, max_output_tokens, previous_response_id, structured
output, function tools and their outputs, reasoning items, and OpenAI's error shape."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
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

QUESTION = "What is the capital of France?"
INSTRUCTIONS = "Answer in one short sentence."
STREAM_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added"]


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def create(oa, **kwargs):
    return oa.responses.create(**{"model": MODEL, "temperature": 0, **kwargs})


def sse_events(server, body: dict) -> list[dict]:
    """The data of a raw streamed /v1/responses answer, each checked against its event line."""
    events, name = [], None
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# ---------------------------------------------------------------------------- text

def test_text_equals_greedy_decoding(oa, ol):
    r = create(oa, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=16)
    expected = greedy_chat(ol, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}], 16)
    assert r.output_text == expected and expected
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL and r.created_at > 0
    assert r.status in ("completed", "incomplete") and r.instructions == INSTRUCTIONS
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_") and item.content[0].type == "output_text"
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens and 0 < r.usage.output_tokens <= 16


def test_usage_counts_the_rendered_prompt(oa):
    tokenizer = Tokenizer.from_metadata(GGUFFile(resolve(MODEL)).metadata)
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    r = create(oa, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=4)
    assert r.usage.input_tokens == len(encode_prompt(tokenizer, tokenizer.apply_chat_template(messages)))


def test_input_items_equal_the_chat(oa, ol):
    items = [{"role": "developer", "content": INSTRUCTIONS},
             {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris."}]},
             {"role": "user", "content": "And of Spain?"}]
    r = create(oa, input=items, max_output_tokens=12)
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    assert r.output_text == greedy_chat(ol, messages, 12)
    with_instructions = create(oa, input=items[1:], instructions=INSTRUCTIONS, max_output_tokens=12)
    assert with_instructions.output_text == r.output_text


def test_max_output_tokens_is_incomplete(oa, server):
    r = create(oa, input="Write a long story about a dragon.", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    events = sse_events(server, {"model": MODEL, "input": "Write a long story about a dragon.", "temperature": 0,
                                 "max_output_tokens": 3})
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"


# ---------------------------------------------------------------------------- streaming

def test_stream_equals_the_whole_answer(oa):
    whole = create(oa, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=40)
    assert whole.status == "completed"
    with oa.responses.stream(model=MODEL, input=QUESTION, instructions=INSTRUCTIONS, temperature=0,
                             max_output_tokens=40) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.status == "completed"
    assert final.usage.output_tokens == whole.usage.output_tokens
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == [*STREAM_EVENTS, *["response.output_text.delta"] * deltas, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]


def test_stream_events_as_openai_sends_them(oa, server):
    events = sse_events(server, {"model": MODEL, "input": QUESTION, "instructions": INSTRUCTIONS, "temperature": 0,
                                 "max_output_tokens": 40})
    created, progress, added, part = events[:4]
    assert created["response"]["status"] == "in_progress" and created["response"]["output"] == []
    assert progress["response"]["id"] == created["response"]["id"]
    assert added["output_index"] == 0 and added["item"]["status"] == "in_progress" and added["item"]["content"] == []
    assert part["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(d["item_id"] == added["item"]["id"] and d["content_index"] == 0 for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == text
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == text and final["usage"]["output_tokens"] > 0
    assert text == create(oa, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=40).output_text


# ---------------------------------------------------------------------------- state

def test_previous_response_id_continues_the_conversation(oa):
    first = create(oa, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=16)
    follow = create(oa, input="And of Spain?", instructions=INSTRUCTIONS, previous_response_id=first.id,
                    max_output_tokens=12)
    whole = create(oa, input=[{"role": "user", "content": QUESTION},
                              {"role": "assistant", "content": first.output_text},
                              {"role": "user", "content": "And of Spain?"}], instructions=INSTRUCTIONS,
                   max_output_tokens=12)
    assert follow.output_text == whole.output_text and follow.previous_response_id == first.id
    assert follow.usage.input_tokens == whole.usage.input_tokens
    assert oa.responses.retrieve(first.id).output_text == first.output_text
    oa.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as e:
        create(oa, input="hi", previous_response_id=first.id)
    assert e.value.body["code"] == "previous_response_not_found"
    unstored = create(oa, input=QUESTION, max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(unstored.id)


def test_sampling_defaults_are_openais():
    """Unset, the sampling is OpenAI's: temperature 1, top-p 1, no top-k or repetition
    penalty (mlxllm's own defaults are llama.cpp's); what the request sets replaces them."""
    from mlxllm.server.responses import responses_request
    from mlxllm.server.tooluse import Tooling

    def params(**extra):
        p = responses_request({**BODY, **extra}, MODEL, [{"role": "user", "content": "hi"}], Tooling()).params
        return (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.presence_penalty, p.frequency_penalty)

    assert params() == (1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0)
    assert params(temperature=0.5, top_p=0.7) == (0.5, 0, 0.7, 0.0, 1.0, 0.0, 0.0)


def test_structured_output(oa):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    r = create(oa, input="Name a city in Europe as JSON.", max_output_tokens=40,
               text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)


# ---------------------------------------------------------------------------- tools

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"type": "function", "name": "get_time", "description": "The current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                       "required": ["zone"], "additionalProperties": False}}
ASK = "What is the weather in Paris?"


def check_calls(response, tools=(WEATHER, TIME)) -> list:
    schemas = {t["name"]: t["parameters"] for t in tools}
    calls = [o for o in response.output if o.type == "function_call"]
    for call in calls:
        assert call.id.startswith("fc_") and call.call_id and call.name in schemas and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    return calls


def test_function_call_forced_streaming_and_not(oa, server, tool_models):
    kwargs = {"model": TOOLS_MODEL, "input": ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
              "parallel_tool_calls": False, "max_output_tokens": 60}
    r = create(oa, **kwargs)
    [call] = check_calls(r)
    assert r.status == "completed" and len(r.output) == 1
    with oa.responses.stream(temperature=0, **kwargs) as stream:
        final = stream.get_final_response()
    [streamed] = check_calls(final)
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    events = sse_events(server, {**kwargs, "temperature": 0})
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.function_call_arguments.delta",
                                           "response.function_call_arguments.done", "response.output_item.done",
                                           "response.completed"]
    added = events[2]["item"]
    assert added["type"] == "function_call" and added["arguments"] == "" and added["status"] == "in_progress"
    assert events[3]["delta"] == events[4]["arguments"] == call.arguments


def test_tool_choice_names_the_function(oa, tool_models):
    r = create(oa, model=TOOLS_MODEL, input=ASK, tools=[WEATHER, TIME], parallel_tool_calls=False,
               tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=60)
    assert [c.name for c in check_calls(r)] == ["get_time"]


def test_tool_choice_none_and_auto(oa, tool_models):
    none = create(oa, model=TOOLS_MODEL, input=ASK, tools=[WEATHER], tool_choice="none", max_output_tokens=40)
    assert not check_calls(none, (WEATHER,)) and "<tool_call>" not in none.output_text
    auto = create(oa, model=TOOLS_MODEL, input=ASK, tools=[WEATHER], max_output_tokens=80)
    check_calls(auto, (WEATHER,))  # text or calls: whichever came parses


def test_function_call_output_round_trip(oa, tool_models):
    """The call and its output go back as input items (or through previous_response_id):
    the prompt is the template's rendering of the assistant's tool call and a tool message."""
    from mlxllm.tools import tools_of

    first = create(oa, model=TOOLS_MODEL, input=ASK, tools=[WEATHER], tool_choice="required",
                   parallel_tool_calls=False, max_output_tokens=60)
    [call] = check_calls(first, (WEATHER,))
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees, sunny"}
    items = [{"role": "user", "content": ASK},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             output]
    second = create(oa, model=TOOLS_MODEL, input=items, tools=[WEATHER], max_output_tokens=30)
    chained = create(oa, model=TOOLS_MODEL, input=[output], previous_response_id=first.id, tools=[WEATHER],
                     max_output_tokens=30)
    assert chained.output_text == second.output_text
    tokenizer = Tokenizer.from_metadata(GGUFFile(str(tool_models / f"{TOOLS_MODEL}.gguf")).metadata)
    tools = tools_of([{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}])
    expected = [{"role": "user", "content": ASK}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": json.loads(call.arguments)}}]},
        {"role": "tool", "tool_call_id": call.call_id, "name": call.name, "content": "18 degrees, sunny"}]
    text = tokenizer.apply_chat_template(expected, tools=tools)
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in text
    assert second.usage.input_tokens == chained.usage.input_tokens == len(encode_prompt(tokenizer, text))


def test_reasoning_items(oa, ol, tool_models):
    """With reasoning asked for, QwQ's template opens <think>: the reasoning is a reasoning item."""
    from mlxllm.reasoning import THINK

    r = create(oa, model=THINK_MODEL, input=QUESTION, reasoning={"effort": "medium"}, max_output_tokens=24)
    tokenizer = Tokenizer.from_metadata(GGUFFile(str(tool_models / f"{THINK_MODEL}.gguf")).metadata)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], enable_thinking=True)
    raw = ol.generate(THINK_MODEL, prompt, raw=True,
                      options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 24}).response
    thinking, text = THINK.split(raw, inside=True)
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text == thinking
    assert r.output_text == text.lstrip()
    with oa.responses.stream(model=THINK_MODEL, input=QUESTION, reasoning={"effort": "medium"}, temperature=0,
                             max_output_tokens=24) as stream:
        final = stream.get_final_response()
    assert [o.model_dump(exclude={"id"}) for o in final.output] == [o.model_dump(exclude={"id"}) for o in r.output]


# ---------------------------------------------------------------------------- bad requests

BODY = {"model": MODEL, "input": "hi"}
BAD = [
    (None, b"{not json", 400),
    (None, b"[1]", 400),
    ({"input": "hi"}, None, 400),  # no model
    ({"model": MODEL}, None, 400),  # no input
    ({**BODY, "input": 5}, None, 400),
    ({**BODY, "input": []}, None, 400),
    ({**BODY, "input": [{"role": "wizard", "content": "hi"}]}, None, 400),
    ({**BODY, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, None, 400),
    ({**BODY, "input": [{"type": "web_search_call"}]}, None, 400),
    ({**BODY, "input": [{"type": "function_call", "name": "f"}]}, None, 400),  # no call_id
    ({**BODY, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]}, None, 400),
    ({**BODY, "max_output_tokens": 0}, None, 400),
    ({**BODY, "max_output_tokens": "many"}, None, 400),
    ({**BODY, "max_output_tokens": 10 ** 9}, None, 400),
    ({**BODY, "temperature": 3}, None, 400),
    ({**BODY, "top_p": 2}, None, 400),
    ({**BODY, "stream": "yes"}, None, 400),
    ({**BODY, "instructions": 5}, None, 400),
    ({**BODY, "text": {"format": {"type": "xml"}}}, None, 400),
    ({**BODY, "previous_response_id": "resp_nope"}, None, 400),
    ({**BODY, "tools": [{"type": "web_search"}]}, None, 400),
    ({**BODY, "tools": [{"type": "function", "name": "bad name!"}]}, None, 400),
    ({**BODY, "tool_choice": "required"}, None, 400),  # no tools
    ({**BODY, "tools": [WEATHER]}, None, 400),  # SmolLM2's own template renders no tools
    ({**BODY, "background": True}, None, 400),
    ({**BODY, "model": "no-such-model:1b"}, None, 404),
    ({**BODY, "input": "x" * (2 << 20)}, None, 413),  # the server takes 1 MiB
]


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body,raw,status", BAD)
def test_bad_request_has_openais_error_shape(server, body, raw, status):
    content = raw if raw is not None else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/responses", content=content, headers={"Content-Type": "application/json"},
                   timeout=120)
    error = openai_error(r, status)
    assert error["type"] == "invalid_request_error"


def test_unknown_response_is_404(server):
    openai_error(httpx.get(server.url + "/v1/responses/resp_nope"), 404)
    openai_error(httpx.delete(server.url + "/v1/responses/resp_nope"), 404)


def test_client_raises_the_api_errors(oa):
    with pytest.raises(openai.NotFoundError):
        oa.responses.create(model="no-such-model:1b", input="hi")
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model=MODEL, input="hi", max_output_tokens=-3)
    assert e.value.body["param"] == "max_output_tokens"


def test_still_serving_after_bad_requests(oa):
    assert create(oa, input="hi", max_output_tokens=3).usage.output_tokens == 3
