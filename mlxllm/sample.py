"""Samplers and logits processors, in llama.cpp's chain order:
penalties -> top_k -> top_p -> min_p -> temperature -> draw (llama-sampling.cpp,
common/sampling.cpp defaults).

A sampler maps logits (B, V) to tokens (B,); a logits processor maps
(tokens so far, logits) to logits. Both are plain callables, built once per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class SamplingParams:
    """What a user sets, with llama.cpp's / Ollama's defaults."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None or negative (llama.cpp's and Ollama's -1): a random seed

    @classmethod
    def openai(cls, **values) -> SamplingParams:
        """OpenAI's defaults: temperature 1, no top-k, top-p 1, no repetition penalty."""
        return cls(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
                      **values})

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.top_p <= 1, "top_p must be in [0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (-1 <= self.repeat_last_n < 2 ** 31, "repeat_last_n must be >= -1 and below 2**31"),
            (self.top_k < 2 ** 31, "top_k must be below 2**31"),
            (self.seed is None or self.seed < 2 ** 64, "seed must be below 2**64 (negative: random)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _mask_below(logits: mx.array, keep: mx.array) -> mx.array:
    return mx.where(keep, logits, mx.array(-mx.inf, logits.dtype))


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.sort(mx.topk(logits, k, axis=-1), axis=-1)[..., :1]  # (B, 1): the k-th largest
    return _mask_below(logits, logits >= kth)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each
    keep_sorted = before < p  # the token that crosses p is kept, the first always is
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return _mask_below(logits, keep)


def min_p_filter(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    top = mx.max(logits, axis=-1, keepdims=True)
    return _mask_below(logits, logits >= top + mx.log(mx.array(min_p, logits.dtype)))


def make_sampler(params: SamplingParams) -> Sampler:
    """temperature 0 is greedy; otherwise filter, scale and draw with a seeded key."""
    if params.temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    seeded = params.seed is not None and params.seed >= 0
    key = [mx.random.key(params.seed) if seeded else None]

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        logits = top_k_filter(logits, params.top_k)
        logits = top_p_filter(logits, params.top_p)
        logits = min_p_filter(logits, params.min_p)
        if key[0] is None:
            return mx.random.categorical(logits / params.temperature, axis=-1)
        key[0], sub = mx.random.split(key[0])  # same seed, same sequence of draws
        return mx.random.categorical(logits / params.temperature, axis=-1, key=sub)

    return sample


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """llama.cpp's penalties over the last `repeat_last_n` tokens (-1: all, 0: none):
    repeat (divide positive logits, multiply negative ones), frequency (minus count times
    the penalty) and presence (minus the penalty once)."""
    if params.repeat_last_n == 0 or (params.repeat_penalty == 1.0 and params.presence_penalty == 0.0
                                      and params.frequency_penalty == 0.0):
        return []

    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens if params.repeat_last_n < 0 else tokens[-params.repeat_last_n:]
        if recent.size == 0:
            return logits
        counts = mx.zeros(logits.shape[-1:], mx.float32).at[recent].add(1.0)  # (V,)
        seen = counts > 0
        penalized = mx.where(logits > 0, logits / params.repeat_penalty, logits * params.repeat_penalty)
        logits = mx.where(seen, penalized, logits)
        return logits - counts * params.frequency_penalty - seen * params.presence_penalty

    return [penalize]
