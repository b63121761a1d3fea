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

RECURRENT = ["mamba", "falcon-mamba", "mamba2", "lfm2", "lfm2moe", "granitehybrid", "falcon-h1", "nemotron_h"]
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


@pytest.mark.parametrize("name", ["mamba", "lfm2"])
def test_generation_loop_runs_rows_one_at_a_time(name):
    """The loop has no batched form of a recurrent state: each row runs its own forward on
    its own caches, interleaved, and gets llama.cpp's greedy tokens; rows join while others
    decode and leave at different lengths."""
    import llama_cpp

    path = FIXTURES / f"{name}.f32.gguf"
    model = load_model(str(path))[0]
    assert any(batch_window(kind) is False for kind in model.make_cache())
    generator = BatchGenerator(model, None, max_batch=4, prefill_step=16)
    assert not generator.batched
    prompts = [token_ids(name, n) for n in (5, 37, 20)]
    limits = [12, 6, 9]
    out: dict[int, list[int]] = {}
    step, joins = 0, {0: [0, 1], 4: [2]}
    while generator.busy or any(s >= step for s in joins):
        for i in joins.pop(step, []):
            out[generator.insert(GenerationRequest(prompts[i], GREEDY, limits[i]))] = []
        for event in generator.step():
            assert event.error is None, event.error
            if event.token is not None:
                out[event.uid].append(event.token)
        step += 1
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, type_k=0, type_v=0,
                          verbose=False)
    try:
        for uid, (prompt, n) in enumerate(zip(prompts, limits)):
            assert out[uid] == llama_cpp_greedy(llm, prompt, n), f"row {uid}"
            assert out[uid] == list(generate_step(model, prompt, GREEDY, max_tokens=n))
    finally:
        llm.close()
