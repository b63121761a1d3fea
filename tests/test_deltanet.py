"""Gated delta net models (Qwen3-Next, Qwen3.5) over long sequences and in the generation loop,
against llama.cpp on the same fixture files (tests/fixtures/archs), and the delta rule's
prompt form (chunks) against its decode form (one token at a time).

As in tests/test_ssm.py: a state carries everything a layer knows about the past, so an
error in how it is updated or handed between forward passes compounds with every token."""

from __future__ import annotations

from pathlib import Path

import mlxllm  # noqa: F401  (first: puts an optimized BLAS under mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from arch_reference import (FIXTURES, check_long_continuation, check_prefix_cache_reuses_a_state,
                            check_rows_get_llama_cpp_greedy_tokens, token_ids)
from mlxllm.cache import RecurrentCache
from mlxllm.loader import load_model


# The fixtures' random init (transformers': A uniform in [0, 16]) decays a state by e^-9 per
# token on average: it forgets within a token or two, so 1,000 tokens through it would test
# little. Their copies here decay by about 0.997-0.94 per token (g = softplus(α + dt_bias) · a),
# remembering tens to hundreds of tokens: a state 0.1% off per token fails (measured 5e-2 ×
# std, ten times the tolerance).
SLOW_DECAY = (0.002, 0.05)  # -ssm_a over the heads, geometrically spaced


def slow_decay_copy(name: str, out: Path) -> Path:
    """The fixture's F32 file with every layer's ssm_a (a = -exp(A_log)) replaced by slow
    decays, written by gguf-py for both programs to read."""
    import gguf

    reader = gguf.GGUFReader(FIXTURES / f"{name}.f32.gguf")
    writer = gguf.GGUFWriter(out, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    a_suffix = "." + gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.SSM_A].rsplit(".", 1)[-1]
    replaced = 0
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name.endswith(a_suffix):
            data = -np.geomspace(*SLOW_DECAY, data.size).astype(np.float32).reshape(data.shape)
            replaced += 1
        writer.add_tensor(t.name, data, raw_shape=[int(x) for x in reversed(t.shape)], raw_dtype=t.tensor_type)
    assert replaced, f"{name}: no {a_suffix} tensors"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# grouped (qwen3next) and tiled (qwen35) key heads per value head
@pytest.mark.parametrize("name", ["qwen3next", "qwen35"])
def test_long_continuation_matches_llama_cpp(name, tmp_path):
    """A 100-token prompt (two chunks, the second partial), then 1,000 tokens one at a time
    through the caches: the last position's logits are llama.cpp's, on the fixture with
    slowly decaying states (above)."""
    check_long_continuation(name, (RecurrentCache,), slow_decay_copy(name, tmp_path / f"{name}.gguf"))


def test_state_has_a_fixed_size():
    model = load_model(str(FIXTURES / "qwen35.f32.gguf"))[0]
    sizes = []
    for n in (10, 90):
        cache = model.make_cache()
        model(mx.array([token_ids("qwen35", n)]), cache=cache)
        sizes.append([c.nbytes for c in cache if isinstance(c, RecurrentCache)])
    assert sizes[0] == sizes[1] and all(sizes[0])


@pytest.mark.parametrize("name", ["qwen3next", "qwen35moe"])
def test_generation_loop_rows_get_llama_cpp_greedy_tokens(name):
    """Rows join while others decode and leave at different lengths, sharing forward passes
    (each row's state its own, the attention layers' keys padded): each gets llama.cpp's
    greedy tokens and what it gets alone."""
    check_rows_get_llama_cpp_greedy_tokens(name)


def test_prompt_in_chunks_equals_token_by_token():
    """The delta rule's prompt form (chunks of DELTA_CHUNK as matrix products, the last one
    padded) computes the outputs and final state of the token-by-token recurrence, from a
    given state."""
    from mlxllm.nn import deltanet

    mx.random.seed(0)
    b, L, H, K, V = 2, deltanet.DELTA_CHUNK * 2 + 13, 3, 8, 8
    q = deltanet.l2_norm(mx.random.normal((b, L, H, K)), 1e-6) * K ** -0.5
    k = deltanet.l2_norm(mx.random.normal((b, L, H, K)), 1e-6)
    v = mx.random.normal((b, L, H, V))
    g = -mx.exp(mx.random.normal((b, L, H)) - 2)
    beta = mx.sigmoid(mx.random.normal((b, L, H)))
    S0 = mx.random.normal((b, H, V, K))
    o, S = deltanet.gated_delta_rule(q, k, v, g, beta, S0)
    outs, state = [], S0
    for t in range(L):
        o_t, state = deltanet.gated_delta_rule(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
                                               beta[:, t:t + 1], state)
        outs.append(o_t)
    steps = np.array(mx.concatenate(outs, axis=1))
    assert np.abs(np.array(o) - steps).max() <= 1e-5 * np.abs(steps).max()
    assert np.abs(np.array(S - state)).max() <= 1e-5 * np.abs(np.array(state)).max()


def test_prefix_cache_reuses_the_states_and_keys_at_their_exact_length():
    """A finished row's caches (attention layers' keys and values, delta net layers' states)
    serve a prompt that continues everything the row fed: it decodes what a fresh prefill
    does. A prompt that forks earlier starts fresh (a state holds no earlier position)."""
    check_prefix_cache_reuses_a_state("qwen35")



def test_server_batches_rows_and_reuses_a_state(tmp_path):
    """The real server (`mlxllm serve`): concurrent completions of a gated delta net model
    run on its batched loop and each gets llama.cpp's greedy tokens; a next turn that
    continues a finished exchange starts past its stored states (usage's cached_tokens)
    and gets llama.cpp's tokens from scratch."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx")
    from arch_reference import llama_cpp, llama_cpp_greedy
    from server_proc import Server

    from mlxllm.loader import load

    name = "qwen3next"
    path = FIXTURES / f"{name}.f32.gguf"
    tokenizer = load(str(path))[1]
    prompts = [token_ids(name, n) for n in (5, 37, 20)]
    limits = [12, 6, 9]
    llm = llama_cpp(path)
    try:
        expected = [llama_cpp_greedy(llm, p, n) for p, n in zip(prompts, limits)]
        turn = prompts[1] + expected[1] + token_ids(name, 50)[40:]
        expected_turn = llama_cpp_greedy(llm, turn, 8)
    finally:
        llm.close()

    srv = Server(tmp_path, "--models-dir", str(FIXTURES), "--parallel", "4")
    try:
        def complete(prompt: list[int], n: int) -> dict:
            r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
                "model": str(path), "prompt": prompt, "max_tokens": n, "temperature": 0, "repeat_penalty": 1.0})
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(complete, prompts, limits))
        for answer, tokens in zip(answers, expected):
            assert answer["usage"]["completion_tokens"] == len(tokens)  # (no EOS among them)
            assert answer["choices"][0]["text"] == tokenizer.decode(tokens)
        health = httpx.get(srv.url + "/health").json()
        model = next(m for m in health["models"] if m["name"].endswith(path.name))
        assert model["batched"] and model["prefix_cache_bytes"] > 0
        answer = complete(turn, 8)
        held = {len(prompts[1]) + len(expected[1]) - 1, len(prompts[1]) + len(expected[1])}
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] in held
        assert answer["choices"][0]["text"] == tokenizer.decode(expected_turn)
    finally:
        srv.stop()
