"""The one generation loop: `generate_step` yields tokens, `stream_generate` turns them
into text pieces and stats; the CLI, the server and `generate()` all consume it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .sample import SamplingParams, make_logits_processors, make_sampler

PREFILL_STEP = 512  # prompt tokens per forward pass while filling the cache


def prefill(model: nn.Module, tokens: mx.array, cache: list, step: int = PREFILL_STEP) -> mx.array:
    """Run the prompt through the model in chunks; return the last position's logits (1, V)."""
    n = tokens.shape[0]
    for start in range(0, n - 1, step):
        end = min(start + step, n - 1)
        model(tokens[None, start:end], cache=cache)
        mx.eval([c.state for c in cache if c is not None and c.state is not None])
    return model(tokens[None, n - 1:], cache=cache)[:, -1, :]


def generate_step(model: nn.Module, prompt: Sequence[int], params: SamplingParams | None = None,
                  max_tokens: int = 256, cache: list | None = None) -> Iterator[int]:
    """Yield generated token ids, one at a time, until max_tokens (the caller stops earlier
    on EOS or a stop string simply by closing the generator)."""
    params = params or SamplingParams()
    sampler = make_sampler(params)
    cache = cache if cache is not None else model.make_cache()
    history = mx.array(list(prompt), mx.int32)
    if history.size == 0:
        raise ValueError("the prompt is empty: at least one token (e.g. BOS) is needed")
    logits = prefill(model, history, cache)
    processors = make_logits_processors(params, logits.shape[-1])

    def next_token(logits: mx.array, history: mx.array) -> mx.array:
        for process in processors:
            logits = process(history, logits[0])[None]
        return sampler(logits)

    token = next_token(logits, history)
    mx.async_eval(token)
    try:
        for n in range(max_tokens):
            # Build step n+1's graph before waiting on token n: the CPU/GPU computes while
            # Python yields and detokenizes.
            if n + 1 < max_tokens:
                if processors:
                    history = mx.concatenate([history, token])
                next_logits = model(token[None], cache=cache)[:, -1, :]
                upcoming = next_token(next_logits, history)
                mx.async_eval(upcoming)
            yield int(token.item())
            if n + 1 < max_tokens:
                token = upcoming
    finally:
        # A caller that stops early leaves one step in flight; let it finish, or an
        # interpreter exiting right after aborts on MLX's still-running stream thread.
        mx.synchronize()


@dataclass
class Response:
    """One streamed piece: new text (possibly empty) and the running stats."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | None


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string: those wait."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt text -> ids with the special tokens it spells parsed. BOS is added per the
    file's metadata, except when the text already starts with it, as chat templates that
    write `{{ bos_token }}` (Gemma's) do: one BOS, not two."""
    ids = tokenizer.encode(text, add_special=True, parse_special=True)
    if len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_id:
        del ids[0]
    return ids


def stream_generate(model: nn.Module, tokenizer, prompt: str | Sequence[int],
                    params: SamplingParams | None = None, max_tokens: int = 256,
                    stop: Sequence[str] = (), cache: list | None = None) -> Iterator[Response]:
    """Generate from a prompt (text, encoded with the tokenizer's BOS rules and special
    tokens parsed, or token ids) and yield text pieces as they complete, ending with a
    piece that carries finish_reason. Stop strings are never emitted, even when they
    arrive split across tokens."""
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    stop = [s for s in stop if s]
    detok = tokenizer.detokenizer()
    mx.reset_peak_memory()
    start = time.perf_counter()
    prompt_tps = gen_start = 0.0
    pending = ""  # decoded text not yet emitted: it may be the start of a stop string
    n_generated = 0
    last_token = None
    finish = "length"

    def response(text: str, reason: str | None) -> Response:
        elapsed = time.perf_counter() - gen_start if gen_start else 0.0
        tps = (n_generated - 1) / elapsed if n_generated > 1 and elapsed > 0 else 0.0
        return Response(text, last_token, len(ids), prompt_tps, n_generated, tps,
                        mx.get_peak_memory() / 1e9, reason)

    for token in generate_step(model, ids, params, max_tokens, cache):
        if n_generated == 0:
            gen_start = time.perf_counter()
            prompt_tps = len(ids) / (gen_start - start)
        n_generated += 1
        last_token = token
        if token in tokenizer.eos_ids:
            finish = "stop"
            break
        pending += detok.add(token)
        cut = _find_stop(pending, stop)
        if cut >= 0:
            yield response(pending[:cut], "stop")
            return
        ready = len(pending) - _held_back(pending, stop)
        if ready:
            yield response(pending[:ready], None)
            pending = pending[ready:]
    # Nothing more will arrive: held-back text and the detokenizer's rest are output.
    pending += detok.flush()
    cut = _find_stop(pending, stop)
    if cut >= 0:
        pending, finish = pending[:cut], "stop"
    yield response(pending, finish)


def generate(model: nn.Module, tokenizer, prompt: str | Sequence[int], max_tokens: int = 256,
             stop: Sequence[str] = (), **sampling) -> str:
    """The whole completion as one string. Sampling options are `SamplingParams` fields."""
    params = SamplingParams(**sampling)
    params.validate()
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, params, max_tokens, stop))
