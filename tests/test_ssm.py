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

from arch_reference import (FIXTURES, check_long_continuation, check_prefix_cache_reuses_a_state,
                            check_rows_get_llama_cpp_greedy_tokens, token_ids)
from mlxllm.cache import KVRecurrentCache, RecurrentCache
from mlxllm.loader import load_model

# One fixture per way of carrying state (the others share these mixers; tests/test_archs.py
# runs each through the cache in chunks): Mamba-1 (token by token), Mamba-2 (prompts in
# chunks), LFM2's short convolution beside KV caches, Falcon-H1's KV cache and state in one
# layer, Nemotron-H MoE's single-branch layers (FFN layers with an empty state); and
# Falcon-Mamba's files (Mamba-1 with RMS norms on dt, B and C), which the issue names.
RECURRENT = ["mamba", "falcon-mamba", "mamba2", "lfm2", "falcon-h1", "nemotron_h_moe"]


@pytest.mark.parametrize("name", RECURRENT)
def test_long_continuation_matches_llama_cpp(name):
    check_long_continuation(name, (RecurrentCache, KVRecurrentCache))


def test_recurrent_state_has_a_fixed_size():
    """A layer's state is the same size after 10 tokens and after 60."""
    model = load_model(str(FIXTURES / "mamba2.f32.gguf"))[0]
    sizes = []
    for n in (10, 60):
        cache = model.make_cache()
        model(mx.array([token_ids("mamba2", n)]), cache=cache)
        sizes.append([c.nbytes for c in cache])
    assert sizes[0] == sizes[1] and all(sizes[0])


# mamba, lfm2, nemotron_h (whose FFN layers hold an empty state) and falcon-h1 (whose layers
# hold keys, values and a state together) batch their rows.
@pytest.mark.parametrize("name", ["mamba", "lfm2", "nemotron_h", "falcon-h1"])
def test_generation_loop_rows_get_llama_cpp_greedy_tokens(name):
    """Rows join while others decode and leave at different lengths; each gets llama.cpp's
    greedy tokens and what it gets alone. Batched rows share one forward pass (each row's
    state its own)."""
    check_rows_get_llama_cpp_greedy_tokens(name)


@pytest.mark.parametrize("name", ["mamba2", "lfm2", "falcon-h1"])
def test_prefix_cache_reuses_a_state_at_its_exact_length(name):
    """A finished row's state serves a prompt that continues everything the row fed (a
    chat's next turn): the prompt starts past it and decodes what a fresh prefill does. A
    prompt that forks earlier starts fresh (a state holds no earlier position)."""
    check_prefix_cache_reuses_a_state(name)


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
