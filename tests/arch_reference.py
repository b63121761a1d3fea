"""llama.cpp and mlxllm side by side on the architecture fixtures (tests/fixtures/archs):
the same file, the same token ids, llama.cpp with an F32 KV cache; and the checks the
recurrent-state models share (tests/test_ssm.py, test_rwkv.py, test_deltanet.py)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxllm.cache import batch_window
from mlxllm.generate import BatchGenerator, GenerationRequest, generate_step
from mlxllm.loader import load_model
from mlxllm.sample import SamplingParams

FIXTURES = Path(__file__).parent / "fixtures" / "archs"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
PROMPT_LEN = 48  # past every fixture's sliding window (16)
GREEDY = 32
# A state carries everything a layer knows about the past, so an error in how it is updated
# or handed from one forward pass to the next compounds with every token: after a prompt of
# STATE_PROMPT tokens, STATE_CONTINUATION go in one at a time.
STATE_PROMPT, STATE_CONTINUATION = 100, 1000
STATE_TOLERANCE = 5e-3  # max |Δlogit| / std, as tests/test_archs.py's F32 check
GREEDY_PARAMS = SamplingParams(temperature=0.0, repeat_penalty=1.0)


def token_ids(name: str, n: int = PROMPT_LEN) -> list[int]:
    """A fixed pseudo-random sequence inside the fixture's vocabulary (ids 0-3 are specials)."""
    vocab = MANIFEST[name]["config"].get("vocab_size") or 384
    rng = np.random.default_rng(sum(map(ord, name)))
    return [int(t) for t in rng.integers(4, vocab, n)]


def long_ids(name: str) -> list[int]:
    """STATE_PROMPT + STATE_CONTINUATION pseudo-random ids (another seed than token_ids')."""
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    return [int(t) for t in rng.integers(4, 384, STATE_PROMPT + STATE_CONTINUATION)]


def llama_cpp(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                           type_k=0, type_v=0, verbose=False)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm, ids: list[int], n: int = GREEDY) -> list[int]:
    llm.reset()
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def llama_cpp_last_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    finally:
        llm.close()


def mlxllm_logits(model, ids: list[int], chunk: int = 0) -> np.ndarray:
    """Logits of every position; chunk > 0 feeds the ids through the KV cache in pieces."""
    if not chunk:
        return np.array(model(mx.array([ids]))[0])
    cache = model.make_cache()
    return np.concatenate([np.array(model(mx.array([ids[s:s + chunk]]), cache=cache)[0])
                           for s in range(0, len(ids), chunk)])


def mlxllm_greedy(model, ids: list[int], n: int = GREEDY) -> list[int]:
    from mlxllm.generate import generate_step
    from mlxllm.sample import SamplingParams

    return list(generate_step(model, ids, SamplingParams(temperature=0.0, repeat_penalty=1.0), max_tokens=n))


def run_rows(generator: BatchGenerator, prompts: list[list[int]], limits: list[int],
             joins: dict[int, list[int]]) -> dict[int, list[int]]:
    """Steps until idle, inserting prompts[i] (greedy, limits[i] tokens) at the steps
    `joins` gives; tokens by uid."""
    out: dict[int, list[int]] = {}
    step = 0
    while generator.busy or any(s >= step for s in joins):
        for i in joins.pop(step, []):
            out[generator.insert(GenerationRequest(prompts[i], GREEDY_PARAMS, limits[i]))] = []
        for event in generator.step():
            assert event.error is None, event.error
            if event.token is not None:
                out[event.uid].append(event.token)
        step += 1
    return out


def check_long_continuation(name: str, state: tuple[type, ...] = (), path: Path | None = None) -> None:
    """The fixture's STATE_PROMPT-token prompt, then STATE_CONTINUATION tokens one at a time
    through the caches (some of them of the `state` types): the last position's logits are
    llama.cpp's (its argmax, within STATE_TOLERANCE × std). `path`: a file in place of the
    fixture's F32 one (a copy with other weights), the fixture's ids still."""
    path = path or FIXTURES / f"{name}.f32.gguf"
    ids = long_ids(name)
    ref = llama_cpp_last_logits(path, ids)
    model = load_model(str(path))[0]
    cache = model.make_cache()
    if state:
        assert any(isinstance(c, state) for c in cache)
    model(mx.array([ids[:STATE_PROMPT]]), cache=cache)
    for token in ids[STATE_PROMPT:-1]:
        model(mx.array([[token]]), cache=cache)
        mx.eval([c.state for c in cache])
    ours = np.array(model(mx.array([ids[-1:]]), cache=cache)[0, -1])
    assert all(c.offset == STATE_PROMPT + STATE_CONTINUATION for c in cache)
    diff = np.abs(ours - ref).max() / ref.std()
    assert ours.argmax() == ref.argmax() and diff <= STATE_TOLERANCE, \
        f"{name}: {diff:.2e} × std after {len(ids)} tokens"


def check_rows_get_llama_cpp_greedy_tokens(name: str) -> None:
    """Three rows on the batched loop: two join at once, the third while they decode, and
    they leave at different lengths; each gets llama.cpp's greedy tokens and what it gets
    alone."""
    import llama_cpp

    path = FIXTURES / f"{name}.f32.gguf"
    model = load_model(str(path))[0]
    generator = BatchGenerator(model, None, max_batch=4, prefill_step=16)
    assert generator.batched
    assert all(batch_window(kind) is not False for kind in model.make_cache())
    prompts = [token_ids(name, n) for n in (5, 37, 20)]
    limits = [12, 6, 9]
    out = run_rows(generator, prompts, limits, {0: [0, 1], 4: [2]})
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, type_k=0, type_v=0,
                          verbose=False)
    try:
        for uid, (prompt, n) in enumerate(zip(prompts, limits)):
            assert out[uid] == llama_cpp_greedy(llm, prompt, n), f"row {uid}"
            assert out[uid] == list(generate_step(model, prompt, GREEDY_PARAMS, max_tokens=n))
    finally:
        llm.close()


def check_prefix_cache_reuses_a_state(name: str) -> None:
    """A finished row's caches serve a prompt that continues everything the row fed (a
    chat's next turn): the prompt starts past them and decodes what a fresh prefill does.
    A prompt that forks earlier starts fresh (a state holds no earlier position)."""
    model = load_model(str(FIXTURES / f"{name}.f32.gguf"))[0]
    generator = BatchGenerator(model, None, max_batch=2, prefix_cache_bytes=1 << 24)
    first = token_ids(name, 30)
    out = run_rows(generator, [first], [6], {0: [0]})
    turn = first + out[0] + long_ids(name)[:12]
    fork = first[:20] + long_ids(name)[12:24]
    # the state holds the prompt and the generated tokens, the last one too where the step
    # launched ahead fed it
    held = {len(first) + len(out[0]) - 1, len(first) + len(out[0])}
    for prompt, reused in ((turn, held), (fork, {0})):
        generator.insert(GenerationRequest(prompt, GREEDY_PARAMS, 8))
        tokens, stats = [], None
        while generator.busy:
            for event in generator.step():
                assert event.error is None, event.error
                if event.token is not None:
                    tokens.append(event.token)
                stats = event.stats or stats
        assert stats.cached_tokens in reused
        assert tokens == list(generate_step(model, prompt, GREEDY_PARAMS, max_tokens=8))
