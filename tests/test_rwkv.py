"""RWKV-6 and RWKV-7 over a long sequence and in the generation loop, against llama.cpp on the
fixture files (tests/fixtures/archs/rwkv6.*, rwkv7.*): their layers carry token-shift and WKV
states only (as tests/test_ssm.py checks the state-space models)."""

from __future__ import annotations

import mlxllm  # noqa: F401  (first: puts an optimized BLAS under mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from arch_reference import FIXTURES, check_long_continuation, check_rows_get_llama_cpp_greedy_tokens, token_ids
from mlxllm.cache import RecurrentCache
from mlxllm.loader import load_model

RWKV = ["rwkv6", "rwkv7"]


@pytest.mark.parametrize("name", RWKV)
def test_long_continuation_matches_llama_cpp(name):
    check_long_continuation(name)


def test_state_has_a_fixed_size():
    model = load_model(str(FIXTURES / "rwkv6.f32.gguf"))[0]
    sizes = []
    for n in (10, 60):
        cache = model.make_cache()
        model(mx.array([token_ids("rwkv6", n)]), cache=cache)
        sizes.append([c.nbytes for c in cache])
    assert sizes[0] == sizes[1] and all(sizes[0])
    assert all(isinstance(c, RecurrentCache) for c in cache)


@pytest.mark.parametrize("name", RWKV)
def test_generation_loop_rows_get_llama_cpp_greedy_tokens(name):
    """Rows join while others decode and leave at different lengths, sharing forward passes
    (each row's states its own): each gets llama.cpp's greedy tokens and what it gets alone."""
    check_rows_get_llama_cpp_greedy_tokens(name)


@pytest.mark.parametrize("version", [6, 7])
def test_prompt_in_chunks_equals_token_by_token(version):
    """The WKV recurrences' prompt forms (chunks of WKV_CHUNK, the last one padded; RWKV-7's
    with a triangular solve for what the state gives back) compute the outputs and final
    state of the token-by-token recurrence, from a given state, decays near 0 and near 1."""
    from mlxllm.nn import rwkv

    mx.random.seed(version)
    b, L, H, S = 2, rwkv.WKV_CHUNK * 2 + 5, 3, 8
    r, k, v = (mx.random.normal((b, L, H, S)) for _ in range(3))
    S0 = mx.random.normal((b, H, S, S))
    if version == 6:
        # decays from ~1 to 0.03, within what the chunked form takes (CHUNK_LOG_DECAY_MIN)
        log_w = -mx.minimum(mx.exp(mx.random.normal((b, L, H, S)) * 2), 3.5)
        assert mx.min(log_w).item() * rwkv.WKV_CHUNK >= -rwkv.CHUNK_LOG_DECAY_MIN
        u = mx.random.normal((H, S))
        run = lambda sl, state: rwkv.wkv6(r[:, sl], k[:, sl], v[:, sl], log_w[:, sl], u, state)
    else:
        log_w = rwkv.DECAY_SCALE * mx.sigmoid(mx.random.normal((b, L, H, S)) * 2)
        kk = mx.random.normal((b, L, H, S))
        kk = kk / mx.linalg.norm(kk, axis=-1, keepdims=True)
        iclr = mx.sigmoid(mx.random.normal((b, L, H, S)))
        run = lambda sl, state: rwkv.wkv7(r[:, sl], log_w[:, sl], k[:, sl], v[:, sl], -kk[:, sl],
                                          (kk * iclr)[:, sl], state)
    y, state = run(slice(None), S0)
    ys, step = [], S0
    for t in range(L):
        y_t, step = run(slice(t, t + 1), step)
        ys.append(y_t)
    steps = np.array(mx.concatenate(ys, axis=1))
    assert np.abs(np.array(y) - steps).max() <= 1e-4 * np.abs(steps).max()
    assert np.abs(np.array(state - step)).max() <= 1e-4 * np.abs(np.array(step)).max()
