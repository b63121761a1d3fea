"""Samplers and penalties on hand-made logits: the math llama.cpp's samplers apply."""

import mlx.core as mx
import numpy as np
import pytest

from mlxllm.sample import (SamplingParams, make_logits_processors, make_sampler, min_p_filter,
                           top_k_filter, top_p_filter)

LOGITS = mx.array([[2.0, 1.0, 0.5, 0.0, -1.0]])


def kept(filtered):
    return [i for i, v in enumerate(np.array(filtered)[0]) if np.isfinite(v)]


def test_top_k():
    assert kept(top_k_filter(LOGITS, 2)) == [0, 1]
    assert kept(top_k_filter(LOGITS, 0)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_token_that_crosses_p():
    p = np.exp(np.array(LOGITS[0])) / np.exp(np.array(LOGITS[0])).sum()  # 0.54, 0.20, 0.12, ...
    assert kept(top_p_filter(LOGITS, 0.5)) == [0]
    assert kept(top_p_filter(LOGITS, p[0] + 0.01)) == [0, 1]
    assert kept(top_p_filter(LOGITS, 1.0)) == [0, 1, 2, 3, 4]


def test_min_p_is_relative_to_the_top_token():
    # exp(1 - 2) = 0.37, exp(0.5 - 2) = 0.22: min_p 0.3 keeps the first two
    assert kept(min_p_filter(LOGITS, 0.3)) == [0, 1]


def test_greedy_and_seeded_draws():
    assert make_sampler(SamplingParams(temperature=0))(LOGITS).item() == 0
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7)
    s1, s2 = make_sampler(params), make_sampler(params)
    draws = [s1(LOGITS).item() for _ in range(50)]
    assert draws == [s2(LOGITS).item() for _ in range(50)]
    assert len(set(draws)) > 1  # a draw, not an argmax


def test_penalties_match_llama_cpp():
    params = SamplingParams(repeat_penalty=2.0, repeat_last_n=3, presence_penalty=0.5, frequency_penalty=0.25)
    (penalize,) = make_logits_processors(params)
    history = mx.array([4, 0, 0, 3])  # last 3: 0, 0, 3
    out = np.array(penalize(history, LOGITS[0]))
    # token 0: 2.0/2 - 2*0.25 - 0.5 = 0.0 ; token 3: 0.0*2 - 0.25 - 0.5 = -0.75 ; token 4 is out of the window
    np.testing.assert_allclose(out, [0.0, 1.0, 0.5, -0.75, -1.0])


def test_no_penalties_no_processors():
    assert make_logits_processors(SamplingParams(repeat_penalty=1.0)) == []


def test_negative_seed_is_random():
    """-1 (llama.cpp's and Ollama's "random") draws unseeded: two samplers differ."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=-1)
    params.validate()
    logits = mx.zeros((1, 1000))
    draws = [[make_sampler(params)(logits).item() for _ in range(20)] for _ in range(2)]
    assert draws[0] != draws[1]


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 1.5), ("min_p", -1), ("repeat_penalty", 0),
                                         ("seed", 2 ** 64)])
def test_invalid_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()
