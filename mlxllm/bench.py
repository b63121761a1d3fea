"""llama-bench style speed measurement: pp (one prompt of random tokens through a fresh
cache) and tg (single-token steps from a one-token context), in tokens per second."""

from __future__ import annotations

import random
import statistics
import time

import mlx.core as mx

from .generate import generate_step, prefill
from .sample import SamplingParams


def bench(model, tokenizer, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3) -> dict[str, dict]:
    """{"pp512": {"mean", "stdev", "runs"}, "tg128": {...}} after one warm-up of each."""
    rng = random.Random(0)

    def pp() -> float:
        tokens = mx.array([rng.randrange(tokenizer.vocab_size) for _ in range(n_prompt)], mx.int32)
        start = time.perf_counter()
        mx.eval(prefill(model, tokens, model.make_cache()))
        return n_prompt / (time.perf_counter() - start)

    def tg() -> float:
        steps = generate_step(model, [tokenizer.bos_id or 0], SamplingParams(temperature=0), max_tokens=n_gen + 1)
        next(steps)  # the first token comes from the one-token prefill
        start = time.perf_counter()
        for _ in steps:
            pass
        return n_gen / (time.perf_counter() - start)

    pp(), tg()  # warm-up: first calls pay for allocations
    results = {}
    for name, fn in ((f"pp{n_prompt}", pp), (f"tg{n_gen}", tg)):
        runs = [fn() for _ in range(repetitions)]
        results[name] = {"mean": statistics.mean(runs), "stdev": statistics.stdev(runs) if len(runs) > 1 else 0.0,
                         "runs": runs}
    return results
