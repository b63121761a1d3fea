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

from arch_reference import (FIXTURES, check_long_continuation, check_prefix_cache_reuses_a_state,
                            check_rows_get_llama_cpp_greedy_tokens, token_ids)
from mlxllm.cache import RecurrentCache
from mlxllm.loader import load_model


# grouped (qwen3next) and tiled (qwen35) key heads per value head
@pytest.mark.parametrize("name", ["qwen3next", "qwen35"])
def test_long_continuation_matches_llama_cpp(name):
    """A 100-token prompt (two chunks, the second partial), then 1,000 tokens one at a time
    through the caches: the last position's logits are llama.cpp's."""
    check_long_continuation(name, (RecurrentCache,))


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
