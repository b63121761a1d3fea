"""Embeddings end to end: the real server (`python -m mlxllm serve`) driven by the official
`ollama` and `openai` clients (and raw HTTP for what the clients hide), and `mlxllm embed`.

The vectors the routes give are `mlxllm.embed`'s for the same file (which
tests/test_encoders.py holds to llama.cpp's; one check against llama.cpp is repeated here
so the chain closes in this file); reranking scores are llama.cpp's rank pooling over the
query and document joined as llama-server's format_prompt_rerank joins them."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

from server_proc import Server

import mlxllm
from mlxllm.embeddings import embed_tokens

FIXTURES = Path(__file__).parent / "fixtures" / "archs"
BERT = str(FIXTURES / "bert.f32.gguf")  # mean pooling, WordPiece, context 512
BERT_CLS = str(FIXTURES / "bert-cls.q8_0.gguf")  # CLS pooling, quantized
DECODER = str(FIXTURES / "qwen3.f32.gguf")
RERANKER = str(FIXTURES / "roberta-rerank.f32.gguf")  # one-score classifier head, byte-level BPE
TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog, twice!", "def f(x): return x * 2", "a",
         "Embeddings of many texts run as one batch."]
# The server runs the same function on the same file: only batching differs, whose float
# noise the 16-bit activation blocks of a quantized file's products (the CPU default) turn
# into steps of 1/32767 of a block's largest (measured up to 4e-6 on the Q8_0 encoder).
ATOL = 2e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the fixtures by path: requests name files only in folders the operator named
    srv = Server(tmp_path_factory.mktemp("embed-server"), "--keep-alive", "5m", "--models-dir", str(FIXTURES))
    yield srv
    srv.stop()  # (its exit status is tests/test_server.py's concern)
    assert "stopped" in srv.log_path.read_text()


@pytest.fixture(scope="module")
def ol(server):
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def local():
    cache = {}

    def get(path: str):
        if path not in cache:
            cache[path] = mlxllm.load(path)
        return cache[path]
    return get


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def close(a, b, atol: float = ATOL) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.abs(a - b).max() <= atol


# ---------------------------------------------------------------------------- Ollama

@pytest.mark.parametrize("path", [BERT, BERT_CLS, DECODER])
def test_ollama_embed_equals_mlxllm_embed(ol, local, path):
    """Many inputs in one request: each vector is mlxllm.embed's (normalized), for an encoder
    (F32 mean, Q8_0 CLS) and for a decoder, which embeds too."""
    model, tokenizer = local(path)
    r = ol.embed(path, input=TEXTS)
    assert close(r.embeddings, mlxllm.embed(model, tokenizer, TEXTS))
    assert np.allclose(np.linalg.norm(r.embeddings, axis=1), 1, atol=1e-5)
    assert r.prompt_eval_count == sum(len(tokenizer.encode(t)) for t in TEXTS)
    assert isinstance(r.total_duration, int) and isinstance(r.load_duration, int)
    assert r.total_duration >= r.load_duration >= 0
    one = ol.embed(path, input=TEXTS[1])
    assert close(one.embeddings, [r.embeddings[1]])


def test_ollama_embed_is_llama_cpp_embedding(ol):
    """The server's vectors against llama.cpp's on the same file (normalized, its pooling)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=BERT, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2,
                          verbose=False)
    try:
        ref = np.array(llm.embed(TEXTS, normalize=True))
    finally:
        llm.close()
    ours = np.array(ol.embed(BERT, input=TEXTS).embeddings)
    assert (ours * ref).sum(1).min() >= 0.99999


def test_ollama_legacy_embeddings_are_not_normalized(ol, local):
    model, tokenizer = local(BERT)
    r = ol.embeddings(BERT, prompt=TEXTS[1])
    assert close(r.embedding, mlxllm.embed(model, tokenizer, TEXTS[1], normalize=False)[0], 1e-5)
    assert abs(np.linalg.norm(r.embedding) - 1) > 0.1


def test_ollama_truncate_and_num_ctx(ol, local):
    model, tokenizer = local(BERT)
    long = " ".join(["word"] * 600)  # past the 512-token context
    ids = tokenizer.encode(long)
    first = ids[:511] + ids[-1:]  # cut to the context, the closing [SEP] kept
    assert close(ol.embed(BERT, input=long).embeddings[0], embed_tokens(model, [first])[0])
    with pytest.raises(ollama.ResponseError) as e:
        ol.embed(BERT, input=["fine", long], truncate=False)
    assert e.value.status_code == 400 and "context" in e.value.error
    # num_ctx narrows the context: the first 8 tokens
    short = ol.embed(BERT, input=TEXTS[1], options={"num_ctx": 8})
    assert short.prompt_eval_count == 8
    ids = tokenizer.encode(TEXTS[1])
    assert close(short.embeddings[0], embed_tokens(model, [ids[:7] + ids[-1:]])[0])
    with pytest.raises(ollama.ResponseError) as e:
        ol.embed(BERT, input=TEXTS[1], options={"num_ctx": 8}, truncate=False)
    assert e.value.status_code == 400


def test_ollama_dimensions_shorten_and_renormalize(ol):
    full = np.array(ol.embed(BERT, input=TEXTS[:2]).embeddings)
    short = np.array(ol.embed(BERT, input=TEXTS[:2], dimensions=16).embeddings)
    assert short.shape == (2, 16)
    assert np.allclose(short, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-6)
    assert close(ol.embed(BERT, input=TEXTS[:2], dimensions=1000).embeddings, full)


def test_ollama_empty_input_loads_the_model(ol, server):
    r = post(server, "/api/generate", {"model": BERT, "keep_alive": 0})  # unloads it, if loaded
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"
    assert BERT not in [m.model for m in ol.ps().models]
    r = ol.embed(BERT)  # input "": Ollama's load-only request
    assert r.embeddings == []
    assert BERT in [m.model for m in ol.ps().models]
    assert ol.embeddings(BERT, prompt="").embedding == []


@pytest.mark.parametrize("body, status, words", [
    ({"model": BERT, "input": []}, 400, "empty"),
    ({"model": BERT, "input": ["a", 3]}, 400, "input"),
    ({"model": BERT, "input": 3}, 400, "input"),
    ({"model": BERT, "input": [["a"]]}, 400, "input"),
    ({"model": BERT, "input": "a", "truncate": "no"}, 400, "truncate"),
    ({"model": BERT, "input": "a", "dimensions": 0}, 400, "dimensions"),
    ({"model": BERT, "input": "a", "options": {"num_ctx": 0}}, 400, "num_ctx"),
    ({"model": BERT, "input": "a", "keep_alive": "soon"}, 400, "keep_alive"),
    ({"input": "a"}, 400, "model"),
    ({"model": str(FIXTURES / "no-such.gguf"), "input": "a"}, 404, "not found"),  # (a 404 names no server path)
])
def test_ollama_embed_bad_requests(server, body, status, words):
    r = post(server, "/api/embed", body)
    assert r.status_code == status
    assert set(r.json()) == {"error"} and words in r.json()["error"]


def test_ollama_legacy_bad_requests(server):
    for body in ({"model": BERT, "prompt": 3}, {"model": BERT, "prompt": ["a"]}):
        r = post(server, "/api/embeddings", body)
        assert r.status_code == 400 and "prompt" in r.json()["error"]


def test_show_capabilities(ol):
    assert ol.show(BERT).capabilities == ["embedding"]
    assert ol.show(RERANKER).capabilities == ["embedding"]
    assert ol.show(DECODER).capabilities == ["completion"]


def test_generation_routes_refuse_an_embedding_model(ol, oa, server):
    for call in (lambda: ol.generate(BERT, "hi"), lambda: ol.chat(BERT, [{"role": "user", "content": "hi"}]),
                 lambda: ol.generate(BERT)):  # an empty generate would load it for generating
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 400 and "is an embedding model" in e.value.error
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        oa.chat.completions.create(model=BERT, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        oa.completions.create(model=BERT, prompt="hi")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------- OpenAI

def test_openai_embeddings_float_and_base64(oa, server, local):
    model, tokenizer = local(BERT)
    expected = mlxllm.embed(model, tokenizer, TEXTS)
    floats = oa.embeddings.create(model=BERT, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    assert close([d.embedding for d in floats.data], expected)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)
    assert floats.model == BERT and floats.object == "list"
    # the client asks for base64 by default and decodes it itself
    default = oa.embeddings.create(model=BERT, input=TEXTS)
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    # base64 is the float32 little-endian bytes of the same floats, bit for bit
    raw = post(server, "/v1/embeddings", {"model": BERT, "input": TEXTS, "encoding_format": "base64"}).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]]
    assert all(np.array_equal(b, np.asarray(d.embedding, np.float32)) for b, d in zip(decoded, floats.data))


def test_openai_embeddings_from_token_ids(oa, local):
    _, tokenizer = local(BERT)
    ids = [tokenizer.encode(t) for t in TEXTS]
    texts = [d.embedding for d in oa.embeddings.create(model=BERT, input=TEXTS, encoding_format="float").data]
    many = oa.embeddings.create(model=BERT, input=ids, encoding_format="float")
    assert close([d.embedding for d in many.data], texts)
    assert many.usage.prompt_tokens == sum(map(len, ids))
    one = oa.embeddings.create(model=BERT, input=ids[2], encoding_format="float")
    assert close(one.data[0].embedding, texts[2])


def test_openai_dimensions_only_the_models_own(oa):
    assert len(oa.embeddings.create(model=BERT, input="a", dimensions=64).data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oa.embeddings.create(model=BERT, input="a", dimensions=32)


def test_openai_decoder_embeddings(oa, local):
    model, tokenizer = local(DECODER)
    r = oa.embeddings.create(model=DECODER, input=TEXTS, encoding_format="float")
    assert close([d.embedding for d in r.data], mlxllm.embed(model, tokenizer, TEXTS))


@pytest.mark.parametrize("body, param", [
    ({"model": BERT, "input": []}, "input"),
    ({"model": BERT, "input": ""}, "input"),
    ({"model": BERT, "input": ["a", ""]}, "input"),
    ({"model": BERT, "input": ["a", 3]}, "input"),
    ({"model": BERT, "input": [1, "a"]}, "input"),
    ({"model": BERT, "input": [[]]}, "input"),
    ({"model": BERT, "input": [[1, 2], [-1]]}, "input"),
    ({"model": BERT, "input": [[1, 2], [100000]]}, "input"),
    ({"model": BERT, "input": None}, "input"),
    ({"model": BERT, "input": ["a"] * 2049}, "input"),
    ({"model": BERT, "input": " ".join(["word"] * 600)}, "input"),
    ({"model": BERT, "input": [list(range(5, 605))]}, "input"),
    ({"model": BERT, "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"model": BERT, "input": "a", "dimensions": 0}, "dimensions"),
    ({"model": BERT, "input": "a", "dimensions": "64"}, "dimensions"),
    ({"input": "a"}, "model"),
])
def test_openai_embeddings_bad_requests(server, body, param):
    r = post(server, "/v1/embeddings", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_openai_past_the_context_is_context_length_exceeded(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.embeddings.create(model=BERT, input=["fine", " ".join(["word"] * 600)])
    assert e.value.code == "context_length_exceeded"


def test_openai_unknown_model_is_404(oa):
    with pytest.raises(openai.NotFoundError):
        oa.embeddings.create(model=str(FIXTURES / "no-such.gguf"), input="a")


def test_many_inputs_in_one_request(ol, local):
    """More texts than one forward pass takes: the server splits them into several worker
    calls; every vector is still mlxllm.embed's, in input order."""
    model, tokenizer = local(BERT)
    texts = [f"text number {i} " + "word " * (i % 50) for i in range(300)]
    r = ol.embed(BERT, input=texts)
    assert close(r.embeddings, mlxllm.embed(model, tokenizer, texts))


# ---------------------------------------------------------------------------- rerank

def llama_rerank_scores(path: str, query: str, documents: list[str]) -> list[float]:
    """llama.cpp's rank score per document, the pair joined as llama-server's
    format_prompt_rerank joins it (the vocabulary's add_bos/add_eos/add_sep; EOS falling back
    to SEP); llama-server reports the first classifier output."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK,
                          n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llama_cpp.llama_model_chat_template(llm.model, b"rerank") is None
        eos = llama_cpp.llama_vocab_eos(vocab)
        eos = llama_cpp.llama_vocab_sep(vocab) if eos == llama_cpp.LLAMA_TOKEN_NULL else eos
        add_bos, add_eos, add_sep = (f(vocab) for f in (llama_cpp.llama_vocab_get_add_bos,
                                                         llama_cpp.llama_vocab_get_add_eos,
                                                         llama_cpp.llama_vocab_get_add_sep))
        scores = []
        for doc in documents:
            ids = [llama_cpp.llama_vocab_bos(vocab)] if add_bos else []
            ids += llm.tokenize(query.encode(), add_bos=False, special=False)
            ids += [eos] if add_eos else []
            ids += [llama_cpp.llama_vocab_sep(vocab)] if add_sep else []
            ids += llm.tokenize(doc.encode(), add_bos=False, special=False)
            ids += [eos] if add_eos else []
            llm._batch.reset()
            llm._batch.add_sequence(ids, 0, True)
            llm._ctx.decode(llm._batch)
            scores.append(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)[0])
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
        return scores
    finally:
        llm.close()


QUERY = "what do cats eat?"
DOCUMENTS = ["Cats eat fish and mice.", "The stock market fell today.", "def f(x): return x * 2",
             "Dogs and cats are pets.", "a", "Embeddings of many texts run as one batch."]


def test_rerank_orders_documents_as_llama_cpp(server):
    ref = llama_rerank_scores(RERANKER, QUERY, DOCUMENTS)
    r = post(server, "/v1/rerank", {"model": RERANKER, "query": QUERY, "documents": DOCUMENTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == RERANKER and body["usage"]["prompt_tokens"] > 0
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCUMENTS)))
    scores = {x["index"]: x["relevance_score"] for x in results}
    # F32 tolerance of tests/test_encoders.py's rank test: 5e-3 of the largest score
    tolerance = 5e-3 * max(map(abs, ref))
    assert max(abs(scores[i] - ref[i]) for i in scores) <= tolerance
    ranks = [x["index"] for x in results]
    assert [scores[i] for i in ranks] == sorted(scores.values(), reverse=True)
    # every pair llama.cpp tells apart by more than the tolerance comes in llama.cpp's order
    apart = [(i, j) for i in range(len(ref)) for j in range(len(ref)) if ref[i] > ref[j] + 2 * tolerance]
    assert len(apart) >= 12  # of the 15 pairs: the order is a test
    assert all(ranks.index(i) < ranks.index(j) for i, j in apart)
    top = post(server, "/v1/rerank", {"model": RERANKER, "query": QUERY, "documents": DOCUMENTS, "top_n": 2}).json()
    assert top["results"] == results[:2]


def test_rerank_pair_tokens_are_llama_servers(local):
    """The pair's tokens: [BOS] query [EOS] [SEP] document [EOS] as the vocabulary asks."""
    from mlxllm.server import rerank_tokens

    _, tokenizer = local(RERANKER)
    ids = rerank_tokens(tokenizer, None, QUERY, DOCUMENTS[0])
    q, d = tokenizer.encode(QUERY, add_special=False), tokenizer.encode(DOCUMENTS[0], add_special=False)
    eos = tokenizer.eos_id
    expected = ([tokenizer.bos_id] if tokenizer.add_bos else []) + q + ([eos] if tokenizer.add_eos else []) \
        + ([tokenizer.sep_id] if tokenizer.add_sep else []) + d + ([eos] if tokenizer.add_eos else [])
    assert ids == expected
    template = "<q>{query}</q><d>{document}</d>"
    assert rerank_tokens(tokenizer, template, "x", "y") == tokenizer.encode("<q>x</q><d>y</d>", add_special=False,
                                                                           parse_special=True)


@pytest.mark.parametrize("body, status, words", [
    ({"model": BERT, "query": "q", "documents": ["a"]}, 400, "classifier"),
    ({"model": DECODER, "query": "q", "documents": ["a"]}, 400, "classifier"),
    ({"model": RERANKER, "documents": ["a"]}, 400, "query"),
    ({"model": RERANKER, "query": 3, "documents": ["a"]}, 400, "query"),
    ({"model": RERANKER, "query": "q", "documents": []}, 400, "documents"),
    ({"model": RERANKER, "query": "q", "documents": ["a", 3]}, 400, "documents"),
    ({"model": RERANKER, "query": "q", "documents": ["a"], "top_n": -1}, 400, "top_n"),
    ({"model": RERANKER, "query": "q", "documents": [" ".join(["word"] * 600)]}, 400, "context"),
])
def test_rerank_bad_requests(server, body, status, words):
    r = post(server, "/v1/rerank", body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_encoder_unloads_on_keep_alive_zero(ol, server):
    ol.embed(BERT_CLS, input="a", keep_alive=0)
    deadline = time.time() + 10
    while BERT_CLS in [m.model for m in ol.ps().models] and time.time() < deadline:
        time.sleep(0.1)
    assert BERT_CLS not in [m.model for m in ol.ps().models]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------- CLI

def cli_embed(*args: str, stdin: str | None = None) -> list:
    out = subprocess.run([sys.executable, "-m", "mlxllm", "embed", *args], input=stdin, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_cli_embed(local):
    model, tokenizer = local(BERT)
    assert close(cli_embed(BERT, *TEXTS[:3]), mlxllm.embed(model, tokenizer, TEXTS[:3]))
    assert close(cli_embed(BERT, stdin="\n".join(TEXTS) + "\n"), mlxllm.embed(model, tokenizer, TEXTS))
    raw = cli_embed(BERT, "--pooling", "cls", "--no-normalize", TEXTS[1])
    assert close(raw, mlxllm.embed(model, tokenizer, TEXTS[1], pooling="cls", normalize=False), 1e-5)


def test_cli_embed_errors():
    out = subprocess.run([sys.executable, "-m", "mlxllm", "embed", BERT, "--no-truncate", " ".join(["w"] * 600)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert out.returncode == 1 and "past the context" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "mlxllm", "embed", BERT], input="", capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode != 0 and "no texts" in out.stderr
