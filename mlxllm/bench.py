"""llama-bench style speed measurement: pp (one prompt of random tokens through a fresh
cache) and tg (single-token steps from a one-token context), in tokens per second."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import mlx.core as mx

from .generate import BatchGenerator, GenerationRequest, generate_step, prefill
from .sample import SamplingParams

# A prompt whose answer repeats what it says, where drafting pays (prompt lookup, a draft model).
SPECULATION_PROMPT = ("Repeat the following list exactly, then repeat it once more:\n"
                      + "\n".join(f"{i}. item number {i} of the list" for i in range(1, 21)) + "\n")


def summary(runs: list[float]) -> dict:
    """Mean and spread of a measurement; a spread only where there are 2+ runs to have one."""
    return {"mean": statistics.mean(runs), "stdev": statistics.stdev(runs) if len(runs) > 1 else None, "runs": runs}


def _no_progress(label: str) -> None:
    pass


def bench(model, tokenizer, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3,
          kv_bits: int | None = None, progress: Callable[[str], None] = _no_progress,
          depth: int = 0) -> dict[str, dict]:
    """{"pp512": {"mean", "stdev", "runs"}, "tg128": {...}} after one warm-up of each;
    kv_bits: tg with a quantized KV cache; depth: both measured after a context of that many
    tokens already in the cache (llama-bench's -d; keys "pp512@d4096", ...), whose prefill is
    not timed. pp and tg runs alternate (a machine that slows down slows both alike);
    progress(label) is called as each of the 2 * (repetitions + 1) runs starts."""
    rng = random.Random(0)

    def random_tokens(n: int) -> list[int]:
        return [rng.randrange(tokenizer.vocab_size) for _ in range(n)]

    def context() -> list[int]:  # BOS and `depth` random tokens, as llama-bench's
        return [tokenizer.bos_id or 0] + random_tokens(depth)

    def pp() -> float:
        cache = model.make_cache()
        if depth:
            mx.eval(prefill(model, mx.array(context(), mx.int32), cache))
        tokens = mx.array(random_tokens(n_prompt), mx.int32)
        start = time.perf_counter()
        mx.eval(prefill(model, tokens, cache))
        return n_prompt / (time.perf_counter() - start)

    def tg() -> float:
        # the argmax alone, no repetition penalty: llama-bench's tg times decoding, no sampler
        steps = generate_step(model, context(), SamplingParams(temperature=0, repeat_penalty=1.0),
                              max_tokens=n_gen + 1, kv_bits=kv_bits)
        next(steps)  # the first token comes from the context's prefill
        start = time.perf_counter()
        for _ in steps:
            pass
        return n_gen / (time.perf_counter() - start)

    at = f"@d{depth}" if depth else ""
    tests = ((f"pp{n_prompt}{at}", pp), (f"tg{n_gen}{at}", tg))
    for name, fn in tests:  # warm-up: first calls pay for allocations
        progress(f"{name} warm-up")
        fn()
    runs: dict[str, list[float]] = {name: [] for name, _ in tests}
    for i in range(repetitions):
        for name, fn in tests:
            progress(f"{name} {i + 1}/{repetitions}")
            runs[name].append(fn())
    return {name: summary(values) for name, values in runs.items()}


def bench_speculation(model, tokenizer, n_gen: int, repetitions: int, progress: Callable[[str], None] = _no_progress,
                      **speculation) -> dict[str, dict]:
    """Greedy generation of n_gen tokens from one prompt, plain and speculative, in tokens/s
    (prefill excluded): {"tg-plain": ..., "tg-spec": {..., "note": speed-up and acceptance}}.
    progress(label) is called as each of the 2 * (repetitions + 1) runs starts."""
    from .generate import encode_prompt

    ids = encode_prompt(tokenizer, tokenizer.apply_chat_template(
        [{"role": "user", "content": SPECULATION_PROMPT}], add_generation_prompt=True))
    params = SamplingParams(temperature=0, repeat_penalty=1.0)

    def tg(**kw) -> tuple[float, list[int], BatchGenerator]:
        generator = BatchGenerator(model, None, max_batch=1, **kw)
        generator.insert(GenerationRequest(ids, params, n_gen))
        tokens, start = [], None
        while generator.busy:
            for event in generator.step():
                tokens.append(event.token)
                if start is None:
                    start = time.perf_counter()  # the first token ends the prefill
        return (len(tokens) - 1) / (time.perf_counter() - start), tokens, generator

    progress("tg-plain warm-up")
    tg()
    progress("tg-spec warm-up")
    tg(**speculation)
    plain, spec = [], []
    for i in range(repetitions):  # interleaved: a busy machine slows both alike
        progress(f"tg-plain {i + 1}/{repetitions}")
        plain.append(tg())
        progress(f"tg-spec {i + 1}/{repetitions}")
        spec.append(tg(**speculation))
    if any(s[1] != plain[0][1] for s in spec):
        raise RuntimeError("speculative decoding changed the greedy output")
    speedup = statistics.mean(s[0] for s in spec) / statistics.mean(p[0] for p in plain)
    acceptance = spec[-1][2].speculation.acceptance

    return {"tg-plain": summary([r[0] for r in plain]),
            "tg-spec": {**summary([r[0] for r in spec]),
                        "note": f"{speedup:.2f}x plain, {acceptance:.0%} of drafts accepted"}}
