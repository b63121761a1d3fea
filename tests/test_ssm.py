"""Recurrent-state models (Mamba, Mamba-2, LFM2's short convolutions) over long sequences and
in the generation loop, against llama.cpp on the same fixture files (tests/fixtures/archs).

A state carries everything a layer knows about the past, so an error in how it is updated
or handed from one forward pass to the next compounds with every token: after a prompt,
1,000 tokens go in one at a time through the caches and the last position's logits must
still be llama.cpp's."""

from __future__ import annotations

import mlxllm  # noqa: F401  (first: puts an optimized BLAS under mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from arch_reference import FIXTURES, llama_cpp_greedy, token_ids
from mlxllm.cache import KVRecurrentCache, RecurrentCache, batch_window
from mlxllm.generate import BatchGenerator, GenerationRequest, generate_step
from mlxllm.loader import load_model
from mlxllm.sample import SamplingParams

# One fixture per way of carrying state (the others share these mixers; tests/test_archs.py
# runs each through the cache in chunks): Mamba-1 (token by token), Mamba-2 (prompts in
# chunks), LFM2's short convolution beside KV caches, Falcon-H1's KV cache and state in one
# layer, Nemotron-H MoE's single-branch layers (FFN layers with an empty state)
RECURRENT = ["mamba", "mamba2", "lfm2", "falcon-h1", "nemotron_h_moe"]
PROMPT, CONTINUATION = 100, 1000
TOLERANCE = 5e-3  # max |Δlogit| / std, as tests/test_archs.py's F32 check
GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)


def long_ids(name: str) -> list[int]:
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    return [int(t) for t in rng.integers(4, 384, PROMPT + CONTINUATION)]


def llama_cpp_last_logits(path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("name", RECURRENT)
def test_long_continuation_matches_llama_cpp(name):
    path = FIXTURES / f"{name}.f32.gguf"
    ids = long_ids(name)
    ref = llama_cpp_last_logits(path, ids)
    model = load_model(str(path))[0]
    cache = model.make_cache()
    assert any(isinstance(c, (RecurrentCache, KVRecurrentCache)) for c in cache)
    model(mx.array([ids[:PROMPT]]), cache=cache)
    for token in ids[PROMPT:-1]:
        model(mx.array([[token]]), cache=cache)
        mx.eval([c.state for c in cache])
    ours = np.array(model(mx.array([ids[-1:]]), cache=cache)[0, -1])
    assert all(c.offset == len(ids) for c in cache)
    diff = np.abs(ours - ref).max() / ref.std()
    assert ours.argmax() == ref.argmax() and diff <= TOLERANCE, f"{name}: {diff:.2e} × std after {len(ids)} tokens"


def test_recurrent_state_has_a_fixed_size():
    """A layer's state is the same size after 10 tokens and after 60."""
    model = load_model(str(FIXTURES / "mamba2.f32.gguf"))[0]
    sizes = []
    for n in (10, 60):
        cache = model.make_cache()
        model(mx.array([token_ids("mamba2", n)]), cache=cache)
        sizes.append([c.nbytes for c in cache])
    assert sizes[0] == sizes[1] and all(sizes[0])


def run(generator: BatchGenerator, prompts: list[list[int]], limits: list[int], joins: dict[int, list[int]]) -> dict:
    """Steps until idle, inserting prompts[i] at the steps `joins` gives; tokens by uid."""
    out: dict[int, list[int]] = {}
    step = 0
    while generator.busy or any(s >= step for s in joins):
        for i in joins.pop(step, []):
            out[generator.insert(GenerationRequest(prompts[i], GREEDY, limits[i]))] = []
        for event in generator.step():
            assert event.error is None, event.error
            if event.token is not None:
                out[event.uid].append(event.token)
        step += 1
    return out


# mamba, lfm2, nemotron_h (whose FFN layers hold an empty state) and falcon-h1 (whose layers
# hold keys, values and a state together) batch their rows.
@pytest.mark.parametrize("name", ["mamba", "lfm2", "nemotron_h", "falcon-h1"])
def test_generation_loop_rows_get_llama_cpp_greedy_tokens(name):
    """Rows join while others decode and leave at different lengths; each gets llama.cpp's
    greedy tokens and what it gets alone. Batched rows share one forward pass (each row's
    state its own)."""
    import llama_cpp

    path = FIXTURES / f"{name}.f32.gguf"
    model = load_model(str(path))[0]
    generator = BatchGenerator(model, None, max_batch=4, prefill_step=16)
    assert generator.batched
    assert all(batch_window(kind) is not False for kind in model.make_cache())
    prompts = [token_ids(name, n) for n in (5, 37, 20)]
    limits = [12, 6, 9]
    out = run(generator, prompts, limits, {0: [0, 1], 4: [2]})
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, type_k=0, type_v=0,
                          verbose=False)
    try:
        for uid, (prompt, n) in enumerate(zip(prompts, limits)):
            assert out[uid] == llama_cpp_greedy(llm, prompt, n), f"row {uid}"
            assert out[uid] == list(generate_step(model, prompt, GREEDY, max_tokens=n))
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["mamba2", "lfm2", "falcon-h1"])
def test_prefix_cache_reuses_a_state_at_its_exact_length(name):
    """A finished row's state serves a prompt that continues everything the row fed (a
    chat's next turn): the prompt starts past it and decodes what a fresh prefill does. A
    prompt that forks earlier starts fresh (a state holds no earlier position)."""
    model = load_model(str(FIXTURES / f"{name}.f32.gguf"))[0]
    generator = BatchGenerator(model, None, max_batch=2, prefix_cache_bytes=1 << 24)
    first = token_ids(name, 30)
    out = run(generator, [first], [6], {0: [0]})
    turn = first + out[0] + long_ids(name)[:12]
    fork = first[:20] + long_ids(name)[12:24]
    # the state holds the prompt and the generated tokens, the last one too where the step
    # launched ahead fed it
    held = {len(first) + len(out[0]) - 1, len(first) + len(out[0])}
    for prompt, reused in ((turn, held), (fork, {0})):
        generator.insert(GenerationRequest(prompt, GREEDY, 8))
        tokens, stats = [], None
        while generator.busy:
            for event in generator.step():
                assert event.error is None, event.error
                if event.token is not None:
                    tokens.append(event.token)
                stats = event.stats or stats
        assert stats.cached_tokens in reused
        assert tokens == list(generate_step(model, prompt, GREEDY, max_tokens=8))


def test_mamba2_prompt_scan_in_chunks_equals_token_by_token():
    """Mamba-2's prompt scan (whole chunks as matrix products, one decay per head) computes
    the outputs and final state of the token-by-token recurrence, from a given state, with
    a partial last chunk and groups shared by several heads."""
    from mlxllm.nn import ssm

    mx.random.seed(0)
    b, L, H, P, G, N = 2, ssm.SSD_CHUNK * 2 + 13, 6, 8, 2, 16
    x, dt = mx.random.normal((b, L, H, P)), mx.random.normal((b, L, H)) - 1
    A = -mx.exp(mx.random.normal((H, 1)))
    B, C, h0 = mx.random.normal((b, L, G, N)), mx.random.normal((b, L, G, N)), mx.random.normal((b, H, P, N))
    y, h = ssm.selective_scan(x, dt, A, B, C, h0)
    ys, state = [], h0
    for t in range(L):
        y_t, state = ssm.selective_scan(x[:, t:t + 1], dt[:, t:t + 1], A, B[:, t:t + 1], C[:, t:t + 1], state)
        ys.append(y_t)
    steps = np.array(mx.concatenate(ys, axis=1))
    assert np.abs(np.array(y) - steps).max() <= 1e-5 * np.abs(steps).max()
    assert np.abs(np.array(h - state)).max() <= 1e-5 * np.abs(np.array(state)).max()
