"""The generation loop (`mlxllm.generate.BatchGenerator`) on tiny fixture models: rows in a
batch produce what each produces alone, requests join and leave between steps, a long
prompt does not hold up a short one, sliding-window memory stays at the window, and
llama.cpp agrees with the batched caches past the window."""

from __future__ import annotations

import mlxllm  # noqa: F401  (first: puts an optimized BLAS under mlx.core)
import numpy as np
import pytest

from arch_reference import FIXTURES, llama_cpp, llama_cpp_greedy, token_ids
from mlxllm.cache import BatchKVCache
from mlxllm.generate import BatchGenerator, GenerationRequest, generate_step
from mlxllm.loader import load_model
from mlxllm.sample import SamplingParams

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)
PENALIZED = SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=8)


@pytest.fixture(scope="module", params=["llama", "gemma2"])  # full attention; alternating 16-token windows
def model(request):
    return load_model(str(FIXTURES / f"{request.param}.f32.gguf"))[0]


def alone(model, ids, params=GREEDY, n=12) -> list[int]:
    return list(generate_step(model, ids, params, max_tokens=n))


def run(generator: BatchGenerator, inserts: dict[int, list[GenerationRequest]]) -> tuple[dict, int]:
    """Steps until idle, inserting requests at the given steps; (tokens by uid, steps)."""
    out: dict[int, list[int]] = {}
    step = 0
    while generator.busy or any(s >= step for s in inserts):
        for request in inserts.pop(step, []):
            out[generator.insert(request)] = []
        for event in generator.step():
            assert event.error is None, event.error
            if event.token is not None:
                out[event.uid].append(event.token)
        step += 1
    return out, step


def test_rows_joining_and_leaving_match_each_alone(model):
    """Prompts of different lengths (left padding), rows joining while others decode,
    rows leaving at different lengths, penalties on one row: each row's tokens are the
    ones it gets alone."""
    prompts = [token_ids("gemma2", n)[:n] for n in (5, 30, 17, 41)]
    limits = [12, 7, 12, 9]
    params = [GREEDY, GREEDY, PENALIZED, GREEDY]
    requests = [GenerationRequest(p, s, m) for p, s, m in zip(prompts, params, limits)]
    generator = BatchGenerator(model, None, max_batch=8, prefill_step=16)
    assert generator.batched
    out, _ = run(generator, {0: requests[:2], 3: [requests[2]], 9: [requests[3]]})
    for uid, request in enumerate(requests):
        assert out[uid] == alone(model, request.prompt, request.params, request.max_tokens), f"row {uid}"


def test_prompts_arriving_together_prefill_as_one_batch(model, monkeypatch):
    """Prompts waiting at once are prefilled in one left-padded forward pass (their padding
    masked and stored as zeros, each row's positions from 0) and decode together from the
    next step; with penalties on one row, past gemma2's 16-token window, and beside rows
    already decoding, each row's tokens are the ones it gets alone."""
    calls = []
    together = BatchGenerator._prefill_together
    monkeypatch.setattr(BatchGenerator, "_prefill_together", lambda self, rows, events: (
        calls.append(len(rows)), together(self, rows, events)))
    prompts = [token_ids("gemma2", n)[:n] for n in (5, 30, 17, 41, 9, 3)]
    params = [GREEDY, GREEDY, PENALIZED, GREEDY, GREEDY, GREEDY]
    requests = [GenerationRequest(p, s, 10) for p, s in zip(prompts, params)]
    generator = BatchGenerator(model, None, max_batch=8, prefill_step=256)
    out, _ = run(generator, {0: requests[:4], 4: requests[4:]})
    assert calls == [4, 2]  # four at once, then two more while those decode (41 + 41 > the shared chunk)
    for uid, request in enumerate(requests):
        assert out[uid] == alone(model, request.prompt, request.params, request.max_tokens), f"row {uid}"


def test_a_long_prompt_is_not_starved_by_short_ones_joining(model):
    """Short prompts arriving at every step form groups behind a long prompt being fed chunk
    by chunk: a group only forms when its leader is first in line, so the long prompt keeps
    its turns and finishes."""
    generator = BatchGenerator(model, None, max_batch=64, prefill_step=32)
    long_uid = generator.insert(GenerationRequest(token_ids("llama", 300), GREEDY, 2))
    finished, step = {}, 0
    while long_uid not in finished and step < 200:
        for n in (5, 7):
            generator.insert(GenerationRequest(token_ids("gemma2", n), GREEDY, 1))
        for event in generator.step():
            if event.finish_reason:
                finished[event.uid] = step
        step += 1
    assert long_uid in finished and finished[long_uid] < 100


def test_unbatched_models_interleave_with_the_same_tokens(model, monkeypatch):
    """A model that does not declare `batchable` runs one forward per row, on its own caches."""
    monkeypatch.setattr(type(model), "batchable", False)
    prompts = [token_ids("llama", n) for n in (6, 20)]
    generator = BatchGenerator(model, None, max_batch=4)
    assert not generator.batched
    out, _ = run(generator, {0: [GenerationRequest(p, GREEDY, 8) for p in prompts]})
    monkeypatch.undo()
    assert [out[0], out[1]] == [alone(model, p, n=8) for p in prompts]


def test_a_short_request_is_not_held_up_by_a_long_prompt(model):
    """Prefill goes one chunk per step, round robin: a 2-token request sent after a long
    prompt has started finishes within a few steps, long before that prompt is in."""
    generator = BatchGenerator(model, None, max_batch=4, prefill_step=32)
    long_prompt = token_ids("llama", 400)
    short = GenerationRequest(token_ids("gemma2", 6), GREEDY, 2)
    finished_at: dict[int, int] = {}
    step = 0
    long_uid = generator.insert(GenerationRequest(long_prompt, GREEDY, 2))
    while generator.busy:
        if step == 1:
            short_uid = generator.insert(short)
        for event in generator.step():
            if event.finish_reason:
                finished_at[event.uid] = step
        step += 1
    assert finished_at[short_uid] <= 3
    assert finished_at[long_uid] >= 400 // 128  # its chunks shrink while the other waits


def test_cancelled_rows_leave_and_the_rest_go_on(model):
    generator = BatchGenerator(model, None, max_batch=4)
    ids = [token_ids("llama", 9), token_ids("gemma2", 13)]
    keep, drop = (generator.insert(GenerationRequest(p, GREEDY, 10)) for p in ids)
    tokens = {keep: [], drop: []}
    for step in range(30):
        if step == 3:
            generator.cancel(drop)
        for event in generator.step():
            tokens[event.uid].append(event.token)
        if not generator.busy:
            break
    assert tokens[keep] == alone(model, ids[0], n=10)
    assert 0 < len(tokens[drop]) < 10 and not generator.rows


def test_sliding_layers_hold_only_their_window(monkeypatch):
    """Gemma 2's 16-token sliding layers, storage growing 16 slots at a time: after 200
    generated tokens they hold at most window - 1 + 16 + 1 slots while the full layers
    hold everything, and the tokens equal llama.cpp's greedy continuation on the file."""
    monkeypatch.setattr(BatchKVCache, "step", 16)
    path = FIXTURES / "gemma2.f32.gguf"
    model = load_model(str(path))[0]
    ids = token_ids("gemma2")
    generator = BatchGenerator(model, None, max_batch=2)
    generator.insert(GenerationRequest(ids, GREEDY, 200))
    sizes, tokens = [], []
    while generator.busy:
        tokens += [e.token for e in generator.step()]
        if generator._caches is not None:
            sizes.append([c.keys[0].shape[2] for c in generator._caches])
    windows = generator.windows
    sliding = [max(s[i] for s in sizes) for i, w in enumerate(windows) if w]
    full = [max(s[i] for s in sizes) for i, w in enumerate(windows) if not w]
    assert sliding and full
    assert max(sliding) <= 16 - 1 + 16 + 1 < min(full)
    assert tokens == llama_cpp_greedy(llama_cpp(path), ids, 200)


def test_prefix_cache_reuse_equals_a_fresh_run(model):
    """A finished row's cache serves the next prompt that extends it (a chat's next
    turn), on full and sliding layers; the tokens equal a fresh run's."""
    generator = BatchGenerator(model, None, max_batch=2, prefix_cache_bytes=64 << 20)
    first = token_ids("llama", 40)
    out, _ = run(generator, {0: [GenerationRequest(first, GREEDY, 6)]})
    follow = first + out[0] + token_ids("gemma2", 7)
    uid = generator.insert(GenerationRequest(follow, GREEDY, 6))
    tokens, reused = [], None
    while generator.busy:
        for event in generator.step():
            tokens.append(event.token)
            if event.stats is not None:
                reused = event.stats.cached_tokens
    assert reused == len(first) + len(out[0]) - 1 and uid == 1
    assert tokens == alone(model, follow, n=6)


def test_next_turns_with_stored_prefixes_prefill_together(model, monkeypatch):
    """Next turns arriving at once, each starting past its stored prefix with the same count
    of tokens left to feed: one forward pass from their stored caches (their rows at their
    own positions), and each row's tokens equal a fresh run's."""
    generator = BatchGenerator(model, None, max_batch=4, prefix_cache_bytes=64 << 20)
    firsts = [token_ids("llama", n) for n in (12, 30, 21)]
    out, _ = run(generator, {0: [GenerationRequest(p, GREEDY, 5) for p in firsts]})
    follows = [p + out[uid] + token_ids("gemma2", 6) for uid, p in enumerate(firsts)]
    calls = []
    together = BatchGenerator._prefill_together
    monkeypatch.setattr(BatchGenerator, "_prefill_together", lambda self, rows, events: (
        calls.append(len(rows)), together(self, rows, events)))
    again, _ = run(generator, {0: [GenerationRequest(f, GREEDY, 6) for f in follows]})
    assert calls == [3]
    for uid, follow in zip(sorted(again), follows):
        assert again[uid] == alone(model, follow, n=6)


class FailingGrammar:
    """A constraint whose mask fails: the row it belongs to ends in an error event."""

    complete = False

    def mask(self, vocab_size):
        raise RuntimeError("grammar engine failed")

    def advance(self, token):
        pass


def test_errors_are_events_not_exceptions(model):
    generator = BatchGenerator(model, None)
    with pytest.raises(ValueError, match="empty"):
        generator.insert(GenerationRequest([], GREEDY, 4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generator.insert(GenerationRequest([1, 2, model.args.vocab_size], GREEDY, 4))
    ok = generator.insert(GenerationRequest(token_ids("llama", 5), GREEDY, 4))
    bad = generator.insert(GenerationRequest(token_ids("llama", 7), GREEDY, 4, constraint=FailingGrammar()))
    events = []
    while generator.busy:
        events += generator.step()
    failed = [e for e in events if e.uid == bad]
    assert len(failed) == 1 and failed[0].finish_reason == "error" and "grammar engine failed" in failed[0].error
    assert [e.token for e in events if e.uid == ok] == alone(model, token_ids("llama", 5), n=4)
    assert all(e.error is None for e in events if e.uid == ok)


@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "penalized"])
def test_prompt_lookup_speculation_gives_the_plain_output(model, params):
    """Drafts from the prompt's own n-grams, verified in one forward pass: the output is
    plain greedy decoding's, and a repetitive prompt has drafts accepted."""
    ids = token_ids("llama", 12) * 4
    plain = alone(model, ids, params, n=40)
    generator = BatchGenerator(model, None, max_batch=1, prompt_lookup=True)
    out, steps = run(generator, {0: [GenerationRequest(ids, params, 40)]})
    assert out[0] == plain
    spec = generator.speculation
    # measured on these random-weight fixtures: 2-19 of 7-19 drafts accepted, 20-37 steps
    # for 40 tokens (plain decoding: 40)
    assert spec.accepted >= 2 and steps <= 40 - spec.accepted + 1


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_draft_model_speculation_gives_the_plain_output(name):
    """The Q8_0 file drafting for its F32 original: same greedy tokens, most drafts accepted."""
    model = load_model(str(FIXTURES / f"{name}.f32.gguf"))[0]
    draft = load_model(str(FIXTURES / f"{name}.q8_0.gguf"))[0]
    ids = token_ids(name, 20)
    generator = BatchGenerator(model, None, max_batch=1, draft_model=draft, draft_tokens=3)
    out, _ = run(generator, {0: [GenerationRequest(ids, GREEDY, 30)]})
    assert out[0] == alone(model, ids, n=30)
    assert generator.speculation.acceptance > 0.5


def test_speculation_needs_droppable_caches(model):
    with pytest.raises(ValueError, match="not both"):
        BatchGenerator(model, None, draft_model=model, prompt_lookup=True)
    with pytest.raises(ValueError, match="at least 1"):
        BatchGenerator(model, None, prompt_lookup=True, draft_tokens=0)


def test_lookup_draft_takes_the_latest_longest_match():
    from mlxllm.generate import lookup_draft

    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]  # the latest 3-gram match
    assert lookup_draft([5, 1, 2, 6, 4, 1, 2], 3) == [6, 4, 1]  # 2-gram when no 3-gram repeats
    assert lookup_draft([1, 2, 3, 4], 3) == []


@pytest.fixture(scope="module")
def smollm():
    from mlxllm import load

    return load("smollm2:135m")  # head_dim 64: its keys and values quantize


@pytest.mark.parametrize("bits,ratio,agreement", [(16, 2.0, 0.99), (8, 4 / 1.25, 0.95)])
def test_quantized_kv_cache_bytes_and_fidelity(smollm, bits, ratio, agreement):
    """kv_bits 8: 1.25 bytes per cached element instead of 4 (measured per token), and the
    teacher-forced argmax of SmolLM2 over 512 positions agrees with the float cache at >= 95%
    (measured 98.5% over 1024 positions; 4 bits: 81.5%, 5.3x less memory). kv_bits 16
    (float16): 2 bytes, and >= 99%."""
    import mlx.core as mx

    model, tokenizer = smollm
    ids = tokenizer.encode(open(__file__).read()[:4000], add_special=True)[:512]

    def run(bits):
        caches = [BatchKVCache(None, bits) for _ in model.make_cache()]
        logits = np.concatenate([np.array(model(mx.array([ids[s:s + 128]]), cache=caches)[0])
                                 for s in range(0, len(ids), 128)])
        return logits, sum(c.nbytes for c in caches) / caches[0].keys[0].shape[2]

    (ref, float_bytes), (ours, narrow_bytes) = run(None), run(bits)
    assert float_bytes / narrow_bytes == pytest.approx(ratio)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= agreement


@pytest.mark.parametrize("bits", [16, 8])
def test_quantized_kv_cache_in_a_batch_with_the_prefix_cache(smollm, bits):
    """Rows of different lengths with a narrowed cache (float16, 8 bits) give what each
    gives alone with it, and a follow-up prompt reuses a finished row's narrowed cache."""
    model, tokenizer = smollm
    prompts = [tokenizer.encode(t, add_special=True) for t in ("The capital of France is", "1, 2, 3, 4, 5,")]

    def lone(ids):
        generator = BatchGenerator(model, None, max_batch=1, kv_bits=bits)
        return run(generator, {0: [GenerationRequest(ids, GREEDY, 10)]})[0][0]

    generator = BatchGenerator(model, None, max_batch=4, kv_bits=bits, prefix_cache_bytes=16 << 20)
    out, _ = run(generator, {0: [GenerationRequest(prompts[0], GREEDY, 10)], 2: [GenerationRequest(prompts[1], GREEDY, 10)]})
    assert [out[0], out[1]] == [lone(p) for p in prompts]
    follow = prompts[0] + out[0] + tokenizer.encode(" And", add_special=False)
    generator.insert(GenerationRequest(follow, GREEDY, 6))
    events = []
    while generator.busy:
        events += generator.step()
    assert events[-1].stats.cached_tokens == len(prompts[0]) + len(out[0]) - 1
    assert [e.token for e in events] == lone(follow)[:6]
