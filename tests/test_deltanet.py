"""Gated delta net models (Qwen3-Next, Qwen3.5) over long sequences and in the generation loop,
against llama.cpp on the same fixture files (tests/fixtures/archs), and the delta rule's
prompt form (chunks) against its decode form (one token at a time).

As in tests/test_ssm.py: a state carries everything a layer knows about the past, so an
error in how it is updated or handed between forward passes compounds with every token."""

from __future__ import annotations

import mlxllm  # noqa: F401  (first: puts an optimized BLAS under mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from arch_reference import FIXTURES, llama_cpp_greedy, token_ids
from mlxllm.cache import RecurrentCache, batch_window
from mlxllm.generate import BatchGenerator, GenerationRequest, generate_step
from mlxllm.loader import load_model
from mlxllm.sample import SamplingParams
from test_ssm import CONTINUATION, PROMPT, TOLERANCE, llama_cpp_last_logits, long_ids, run

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)


# grouped (qwen3next) and tiled (qwen35) key heads per value head
@pytest.mark.parametrize("name", ["qwen3next", "qwen35"])
def test_long_continuation_matches_llama_cpp(name):
    """A 100-token prompt (two chunks, the second partial), then 1,000 tokens one at a time
    through the caches: the last position's logits are llama.cpp's."""
    path = FIXTURES / f"{name}.f32.gguf"
    ids = long_ids(name)
    ref = llama_cpp_last_logits(path, ids)
    model = load_model(str(path))[0]
    cache = model.make_cache()
    assert any(isinstance(c, RecurrentCache) for c in cache)
    model(mx.array([ids[:PROMPT]]), cache=cache)
    for token in ids[PROMPT:-1]:
        model(mx.array([[token]]), cache=cache)
        mx.eval([c.state for c in cache])
    ours = np.array(model(mx.array([ids[-1:]]), cache=cache)[0, -1])
    assert all(c.offset == PROMPT + CONTINUATION for c in cache)
    diff = np.abs(ours - ref).max() / ref.std()
    assert ours.argmax() == ref.argmax() and diff <= TOLERANCE, f"{name}: {diff:.2e} × std after {len(ids)} tokens"


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
    model = load_model(str(FIXTURES / "qwen35.f32.gguf"))[0]
    generator = BatchGenerator(model, None, max_batch=2, prefix_cache_bytes=1 << 24)
    first = token_ids("qwen35", 30)
    out = run(generator, [first], [6], {0: [0]})
    turn = first + out[0] + long_ids("qwen35")[:12]
    fork = first[:20] + long_ids("qwen35")[12:24]
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
