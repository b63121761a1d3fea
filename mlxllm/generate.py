"""The one generation loop, for the CLI, Python and the server alike.

`BatchGenerator` decodes many sequences together: requests join and leave between steps;
prompts are prefilled one chunk per step, round robin, so a long prompt delays the others
by at most a chunk; every row has its own sampler, penalties, grammar, stop strings and
limits; and the next step's forward pass is queued (`mx.async_eval`) before the tokens of
the current one are read, so the model computes while Python detokenizes. One place
chooses a token (`_Row.choose`), one place turns tokens into text and cuts it at stop
strings (`TextStream`).

`stream_generate` / `generate` run it with one request; the server feeds it requests
from many clients (`mlxllm.server`).
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import BatchKVCache, PrefixCache, batch_cache, batch_cache_from_state, batch_window, is_recurrent
from .sample import SamplingParams, make_logits_processors, make_sampler

PREFILL_STEP = 512  # prompt tokens per forward pass while filling the cache
# ... while other requests wait on it: their next token is late by one such chunk's time
# (~0.4 s for SmolLM2-135M on 2 cores), the prompt's own prefill ~10% slower than in
# 512-token chunks.
SHARED_PREFILL_STEP = 128


def prefill(model: nn.Module, tokens: mx.array, cache: list, step: int = PREFILL_STEP) -> mx.array:
    """Run a prompt through the model in chunks; return the last position's logits (1, V)."""
    n = tokens.shape[0]
    for start in range(0, n - 1, step):
        end = min(start + step, n - 1)
        model(tokens[None, start:end], cache=cache)
        mx.eval([c.state for c in cache if c is not None and c.state is not None])
    return model(tokens[None, n - 1:], cache=cache)[:, -1, :]


class PromptTooLong(ValueError):
    """A prompt text that cannot fit the context, found before tokenizing all of it."""


_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> bytes


def _longest_token_bytes(tokenizer) -> int:
    if tokenizer not in _LONGEST_TOKEN:
        _LONGEST_TOKEN[tokenizer] = max((len(tokenizer.token_to_bytes(i)) for i in range(tokenizer.vocab_size)),
                                        default=1) or 1
    return _LONGEST_TOKEN[tokenizer]


def encode_prompt(tokenizer, text: str, limit: int | None = None) -> list[int]:
    """Prompt text -> ids with the special tokens it spells parsed. BOS is added per the
    file's metadata, except when the text already starts with it, as chat templates that
    write `{{ bos_token }}` (Gemma's) do: one BOS, not two.

    limit: a context size. A text with more bytes than `limit` tokens of the vocabulary's
    longest can hold is refused (PromptTooLong) before it is tokenized, which for a
    megabyte takes seconds."""
    if limit is not None and len(text) > limit:  # chars <= bytes: the byte count only past this
        n_bytes = len(text.encode("utf-8", "replace"))
        if n_bytes > limit * _longest_token_bytes(tokenizer):
            raise PromptTooLong(f"the prompt is {n_bytes} bytes, more than {limit} tokens can spell")
    ids = tokenizer.encode(text, add_special=True, parse_special=True)
    if len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_id:
        del ids[0]
    return ids


# ---------------------------------------------------------------------------- text

def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string: those wait."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


class TextStream:
    """Token ids -> text pieces with stop strings removed: text that could still grow into
    a stop string is held back until it cannot, so a stop string is never emitted, even
    when it arrives split across tokens."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self._detok = tokenizer.detokenizer()
        self._stop = [s for s in stop if s]
        self._pending = ""

    def add(self, token: int) -> tuple[str, bool]:
        """(text ready to send, whether a stop string ended the output)."""
        self._pending += self._detok.add(token)
        cut = _find_stop(self._pending, self._stop)
        if cut >= 0:
            return self._pending[:cut], True
        ready = len(self._pending) - _held_back(self._pending, self._stop)
        text, self._pending = self._pending[:ready], self._pending[ready:]
        return text, False

    def flush(self) -> tuple[str, bool]:
        """The rest, once nothing more will arrive."""
        self._pending += self._detok.flush()
        cut = _find_stop(self._pending, self._stop)
        text = self._pending[:cut] if cut >= 0 else self._pending
        self._pending = ""
        return text, cut >= 0


# ---------------------------------------------------------------------------- requests and events

@dataclass
class GenerationRequest:
    """What to generate. constraint: a grammar (`mlxllm.constrain.Constraint`: `mask(V)`,
    `advance(token)`, `complete`) every token must keep to. logprobs: None (not wanted),
    or how many top alternatives each event carries (0: the chosen token's alone).
    reasoning_budget: (tokens, close ids): once a reply has reasoned that many tokens
    without writing the close ids, they are written for it (`mlxllm.reasoning`)."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: Sequence[str] = ()
    constraint: Any = None
    logprobs: int | None = None
    reasoning_budget: tuple[int, list[int]] | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose cache came from the prefix cache
    generation_tokens: int
    prompt_ns: int  # from the first prefill chunk to the first token
    eval_ns: int  # from the first token to the last
    context: list[int]  # prompt + generated ids, the final EOS left out (Ollama's `context`)


@dataclass
class Event:
    """What one step did for one request: new text (possibly empty), the token it came
    from, and on the last event the finish reason ("stop", "length" or "error", with the
    message in `error`) and the statistics. With `logprobs` requested: the token's log
    probability and the top alternatives [(token, logprob)], from the distribution the
    token was drawn from: log-softmax of the logits after penalties and the grammar's
    mask, before temperature and truncation (top-k/top-p/min-p)."""

    uid: int
    text: str
    token: int | None
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    error: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


Picked = tuple[mx.array, mx.array | None]  # the token (1,), and its logprobs (1, 1 + 2k) or None


class _Row:
    """One request inside the generator: its sampler, penalties, grammar, text and counts."""

    def __init__(self, uid: int, request: GenerationRequest, tokenizer) -> None:
        self.uid, self.request = uid, request
        params = request.params
        self.sampler = make_sampler(params)
        self.processors = make_logits_processors(params)
        self.greedy = params.temperature == 0 and not self.processors and request.constraint is None \
            and request.logprobs is None and request.reasoning_budget is None
        # Its next token depends on reading this one (a grammar masks by it, a budget may force
        # it): no step is queued ahead of it. (A pipeline's follower learns it from rank 0.)
        self.paced = request.constraint is not None or request.reasoning_budget is not None
        self.forced: list[int] = []  # tokens written for the model (a reasoning budget's close)
        self.reasoned = 0  # tokens inside the reasoning block, while the budget watches it
        if request.reasoning_budget is not None and request.reasoning_budget[0] <= 0:
            self.forced = list(request.reasoning_budget[1])  # no reasoning at all: close at once
        # What the penalties see: the prompt and every fed token, appended lazily at launch.
        self.recent = mx.array(request.prompt, mx.int32) if self.processors else None
        self.text = TextStream(tokenizer, request.stop) if tokenizer is not None else None
        self.eos = tokenizer.eos_ids if tokenizer is not None else frozenset()
        self.history = list(request.prompt)  # prompt + accepted tokens
        self.generated = 0
        self.cached = 0
        self.position = 0  # prompt tokens in the cache so far
        self.caches: list | None = None  # its own caches while prefilling, or when not batched
        self.started = 0.0
        self.decode_start = 0.0
        self.prompt_ns = 0
        self.finish: str | None = None
        self.cancelled = False
        self.draft_caches: list | None = None  # the draft model's caches (speculative decoding)
        self.draft_length = 0  # positions of the history in them

    @property
    def last(self) -> int:
        return self.history[-1]

    @property
    def fed(self) -> list[int]:
        """The tokens in the cache once the last sampled one is fed: all but it."""
        return self.history[:-1]

    def feed(self, token: mx.array) -> None:
        """Token (1,) goes into the model: the penalties see it from the next choice on."""
        if self.processors:
            n = self.request.params.repeat_last_n
            self.recent = mx.concatenate([self.recent, token.astype(mx.int32)])
            if n > 0:
                self.recent = self.recent[-n:]

    def choose(self, logits: mx.array) -> Picked:
        """The next token (1,) from last-position logits (1, V), and when the request wants
        them its logprobs (1, 1 + 2k): the token's, then k alternatives' ids and values."""
        for process in self.processors:
            logits = process(self.recent, logits[0])[None]
        constraint = self.request.constraint
        if constraint is not None:
            allowed = constraint.mask(logits.shape[-1])
            logits = mx.where(allowed, logits, mx.array(-mx.inf, logits.dtype))
        if self.forced:
            token = mx.array([self.forced[0]], mx.int32)
        else:
            token = self.sampler(logits)
        k = self.request.logprobs
        if k is None:
            return token, None
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, token.reshape(1, 1).astype(mx.int32), axis=-1)
        if k == 0:
            return token, chosen
        top = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
        return token, mx.concatenate([chosen, top.astype(mx.float32),
                                      mx.take_along_axis(logprobs, top, axis=-1)], axis=-1)

    def accept(self, token: int, logprobs: list[float] | None = None) -> Event:
        request = self.request
        if self.generated == 0:
            self.prompt_ns = int((time.perf_counter() - self.started) * 1e9)
            self.decode_start = time.perf_counter()
        self.generated += 1
        self.history.append(token)
        if self.forced and self.forced[0] == token:
            self.forced.pop(0)
        if token in self.eos:
            return self._with_logprobs(self._end(token, "", "stop"), logprobs)
        if request.constraint is not None:
            request.constraint.advance(token)
        text, stopped = self.text.add(token) if self.text is not None else ("", False)
        if request.reasoning_budget is not None:
            self._watch_reasoning(token)
        if stopped:
            return self._with_logprobs(self._end(token, text, "stop", flush=False), logprobs)
        if request.constraint is not None and request.constraint.complete:
            return self._with_logprobs(self._end(token, text, "stop"), logprobs)
        if self.generated >= request.max_tokens:
            return self._with_logprobs(self._end(token, text, "length"), logprobs)
        return self._with_logprobs(Event(self.uid, text, token), logprobs)

    def _watch_reasoning(self, token: int) -> None:
        """A reasoning budget: count the reasoning's tokens until its close ids appear;
        at the budget, write them next."""
        budget, close = self.request.reasoning_budget
        if self.reasoned < 0:  # closed already
            return
        if self.history[-len(close):] == close:  # the tokenizer's spelling of the close marker
            self.reasoned = -1
            return
        self.reasoned += 1
        if self.reasoned >= budget and not self.forced:
            self.forced = list(close)

    def _with_logprobs(self, event: Event, values: list[float] | None) -> Event:
        k = self.request.logprobs
        if values is not None and k is not None:
            event.logprob = values[0]
            pairs = [(int(values[1 + i]), values[1 + k + i]) for i in range(k)]
            event.top_logprobs = sorted(pairs, key=lambda p: -p[1])
        return event

    def _end(self, token: int | None, text: str, reason: str, flush: bool = True) -> Event:
        if flush and self.text is not None:
            rest, stopped = self.text.flush()
            text += rest
            reason = "stop" if stopped else reason
        self.finish = reason
        context = self.history[:-1] if self.history[-1] in self.eos else list(self.history)
        stats = GenerationStats(len(self.request.prompt), self.cached, self.generated, self.prompt_ns,
                                int((time.perf_counter() - self.decode_start) * 1e9), context)
        return Event(self.uid, text, token, reason, stats)

    def fail(self, message: str) -> Event:
        self.finish = "error"
        return Event(self.uid, "", None, "error", None, message)

    def follow(self, token: int | None, finish: str | None) -> Event:
        """A pipeline follower's `accept`: rank 0 accepted `token` (None: none, the row
        failed) and decided `finish`; the row's history and state become what they are there."""
        if token is not None:
            self.generated += 1
            self.history.append(token)
        self.finish = finish
        return Event(self.uid, "", token, finish)


DRAFT_TOKENS = 4  # tokens drafted per speculative step


def batch_forms(model: nn.Module, windows: list | None = None) -> bool:
    """Whether a model's rows can share a forward pass on batched caches: it builds masks
    with `cache.make_mask` (`batchable`) and every cache kind it declares has a batched form
    (`windows`: `batch_window` of each, when the caller has them)."""
    if windows is None:
        windows = [batch_window(kind) for kind in model.make_cache()]
    return getattr(model, "batchable", False) and all(w is not False for w in windows)


@dataclass
class Speculation:
    """Speculative decoding's settings and counts: a draft model, or prompt lookup when
    `model` is None; `accepted / drafted` is the acceptance rate."""

    model: nn.Module | None
    windows: list | None
    tokens: int
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def lookup_draft(history: list[int], k: int, longest: int = 3, shortest: int = 2) -> list[int]:
    """Prompt lookup: the up to k tokens that followed the latest earlier occurrence of the
    history's last n tokens, for the longest n (`longest` down to `shortest`) that occurs."""
    ids = np.asarray(history)
    for n in range(longest, shortest - 1, -1):
        if ids.size <= n:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every earlier n-gram
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in ids[start:start + k]]
    return []


@dataclass
class _Launch:
    """A decode step in flight: the rows it ran, in batch order, their sampled tokens and
    the logprobs of rows that want them."""

    rows: list[_Row]
    tokens: mx.array  # (B,), not yet read
    logprobs: list[mx.array | None] | None = None


# ---------------------------------------------------------------------------- the loop

class BatchGenerator:
    """Decodes up to `max_batch` requests together; `step()` advances every one of them.
    Without a tokenizer, events carry tokens only (no text, no EOS: only max_tokens ends).

    Each step prefills one chunk of one admitted prompt, round robin (`prefill_step`
    tokens, or `SHARED_PREFILL_STEP` while other requests wait on it), and then decodes
    one token for every row in the batch. A model's rows share one
    forward pass when it is `batchable` (it builds attention masks with `cache.make_mask`)
    and declares cache kinds that have a batched form (`mlxllm.cache.batch_window`);
    otherwise each row runs its own forward on the model's own caches, interleaved. With
    `prefix_cache_bytes`, finished rows' caches serve later prompts that share a prefix.
    kv_bits (16, 8 or 4) stores keys and values as float16 or quantized (see `BatchKVCache`). A draft model
    or prompt lookup speculates one greedy row's decoding (`_speculate`).

    lockstep: the same loop run by every rank of a pipeline (`mlxllm.distributed.Lockstep`):
    rank 0 (the leader) samples and accepts tokens and tells the other ranks, at the start
    of each step, which requests joined and left, and after each read of tokens, what each
    row got and whether it finished; the followers run the same steps with those decisions,
    so that their caches take the same rows in the same order for their stage's layers.
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 16, prefill_step: int = PREFILL_STEP,
                 prefix_cache_bytes: int = 0, draft_model: nn.Module | None = None, prompt_lookup: bool = False,
                 draft_tokens: int = DRAFT_TOKENS, kv_bits: int | None = None, lockstep: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.lockstep = lockstep
        self.max_batch, self.prefill_step = max_batch, prefill_step
        # The embedding table's rows: an id past them would read outside it.
        self.vocab_size = getattr(getattr(model, "args", None), "vocab_size", None) or \
            getattr(tokenizer, "vocab_size", None)
        windows = [batch_window(kind) for kind in model.make_cache()]
        self.batched = batch_forms(model, windows)
        self.windows = windows if self.batched else None
        if kv_bits is not None and not self.batched:
            raise ValueError("a quantized KV cache needs a model whose caches have a batched form")
        self.kv_bits = kv_bits
        self.prefixes = PrefixCache(prefix_cache_bytes) if self.batched and prefix_cache_bytes > 0 else None
        self.waiting: deque[_Row] = deque()  # not yet admitted: the batch is full
        self.prefilling: deque[_Row] = deque()  # admitted, prompt partly in the cache
        self.rows: list[_Row] = []  # decoding, in the batch caches' row order
        self._caches: list[BatchKVCache] | None = None
        self._launched: _Launch | None = None
        self._next_uid = 0
        self.speculation = self._speculation(draft_model, prompt_lookup, draft_tokens)
        if lockstep is not None and (self.speculation is not None or self.prefixes is not None):
            # the followers cannot see drafts, and each rank's prefix cache would count its own
            # layers' bytes against the budget and so evict other entries than rank 0's
            raise ValueError("across pipeline ranks there is no speculative decoding or prefix cache")

    def _speculation(self, draft_model, prompt_lookup: bool, draft_tokens: int) -> Speculation | None:
        if draft_model is None and not prompt_lookup:
            return None
        if draft_model is not None and prompt_lookup:
            raise ValueError("choose a draft model or prompt lookup, not both")
        if draft_tokens < 1:
            raise ValueError("draft_tokens must be at least 1")
        if not self.batched or any(map(is_recurrent, self.windows)):
            raise ValueError("speculative decoding needs a model whose caches can drop positions "
                             "(attention caches; not recurrent state)")
        windows = None
        if draft_model is not None:
            windows = [batch_window(kind) for kind in draft_model.make_cache()]
            if not getattr(draft_model, "batchable", False) or any(w is False or is_recurrent(w) for w in windows):
                raise ValueError("the draft model's caches cannot drop positions")
            draft_vocab = getattr(getattr(draft_model, "args", None), "vocab_size", None)
            if draft_vocab is not None and self.vocab_size is not None and draft_vocab > self.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft_vocab}) is not the model's ({self.vocab_size})")
        return Speculation(draft_model, windows, draft_tokens)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.prefilling or self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.prefilling)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def insert(self, request: GenerationRequest) -> int:
        """Queue a request; its events carry the returned uid."""
        if not request.prompt:
            raise ValueError("the prompt is empty: at least one token (e.g. BOS) is needed")
        if self.vocab_size and not all(0 <= t < self.vocab_size for t in request.prompt):
            raise ValueError(f"the prompt holds a token id outside the vocabulary (0-{self.vocab_size - 1})")
        row = _Row(self._next_uid, request, self.tokenizer)
        self._next_uid += 1  # spent only by a row that was made: a pipeline's ranks count alike
        self.waiting.append(row)
        if self.lockstep is not None:
            self.lockstep.inserted(row)
        return row.uid

    def cancel(self, uid: int) -> None:
        """Stop a request; its row is freed at the next step, no event follows."""
        for row in itertools.chain(self.waiting, self.prefilling, self.rows):
            if row.uid == uid:
                row.cancelled = True
        if self.lockstep is not None:
            self.lockstep.cancelled(uid)

    def step(self) -> list[Event]:
        """One prefill chunk and one token for every decoding row; the events they made."""
        events: list[Event] = []
        if self.lockstep is not None:  # the leader sends what joined and left, a follower applies it
            self.lockstep.begin(self)
        self._reap()
        while self.waiting and self.active < self.max_batch:
            self.prefilling.append(self.waiting.popleft())
        if self.prefilling:
            together = self._joinable()
            if len(together) > 1:
                self._prefill_together(together, events)
            else:
                self._prefill_chunk(self.prefilling[0], events)
        if self.rows:
            self._decode(events)
        return events

    def fail_all(self, message: str) -> list[Event]:
        """End every request with an error (the model is going away, or a step failed)."""
        events = [row.fail(message) for row in itertools.chain(self.waiting, self.prefilling, self.rows)
                  if row.finish is None]
        self.waiting.clear()
        self.prefilling.clear()
        self.rows, self._caches, self._launched = [], None, None
        return events

    # -- prefill

    def _start_caches(self, row: _Row) -> list:
        """Fresh caches for a prompt, primed with the longest stored prefix of it (all but
        the last token at most: its logits are needed)."""
        prompt = row.request.prompt
        if self.prefixes is not None:
            n, states = self.prefixes.lookup(prompt, limit=len(prompt) - 1)
            if n:
                caches = [batch_cache_from_state(s, n, w, self.kv_bits) for s, w in zip(states, self.windows)]
                if all(c is not None for c in caches):
                    row.cached = row.position = n
                    return caches
        if self.batched:
            return [batch_cache(w, self.kv_bits) for w in self.windows]
        return self.model.make_cache()

    def _chunk_size(self) -> int:
        """Prompt tokens this step prefills: a full chunk while nothing else runs, a shared
        one while rows decode or other prompts wait."""
        alone = not self.rows and len(self.prefilling) == 1
        return self.prefill_step if alone else min(self.prefill_step, SHARED_PREFILL_STEP)

    def _stored_prefix(self, row: _Row) -> int:
        prompt = row.request.prompt
        return self.prefixes.lookup(prompt, limit=len(prompt) - 1)[0] if self.prefixes is not None else 0

    def _joinable(self) -> list[_Row]:
        """Prompts that can prefill together in one forward pass (requests arriving at once)
        and then decode together from the next step: fresh prompts, left-padded to the
        longest of them, or prompts whose stored prefixes leave the same number of tokens
        to feed. Only on attention caches (padding would enter a recurrent state), outside
        a pipeline, within this step's chunk of tokens."""
        if not self.batched or self.lockstep is not None or any(map(is_recurrent, self.windows)):
            return []
        budget = self.prefill_step if not self.rows else min(self.prefill_step, SHARED_PREFILL_STEP)
        group: list[_Row] = []
        left = None  # tokens each member feeds (None: fresh prompts, padded)
        width = 0
        for row in self.prefilling:  # led by the first in line, so none waits behind groups
            if row.caches is not None:  # a prompt part-way in continues chunk by chunk
                if not group:
                    return []
                continue
            prompt = row.request.prompt
            stored = self._stored_prefix(row)
            to_feed = len(prompt) - stored if stored else None
            if group and to_feed != left:
                continue
            wider = max(width, len(prompt) if to_feed is None else to_feed)
            if wider * (len(group) + 1) > budget:
                if not group:
                    return []
                continue
            group.append(row)
            left, width = to_feed, wider
        return group

    def _prefill_together(self, rows: list[_Row], events: list[Event]) -> None:
        """The group `_joinable` chose, in one forward pass; each row then chooses its first token."""
        for row in rows:
            row.started = time.perf_counter()
        stored = self._stored_prefix(rows[0])
        if stored:  # each row from its stored prefix, the same count of tokens left
            left = len(rows[0].request.prompt) - stored
            feeds, owns = [], []
            for row in list(rows):
                own = self._start_caches(row)
                if len(row.request.prompt) - row.position != left:
                    row.caches = own  # its stored state did not serve after all: it goes on alone
                    rows.remove(row)
                    continue
                feeds.append(row.request.prompt[row.position:])
                owns.append(own)
            caches = owns[0] if owns else None
            for layer, first in enumerate(caches or ()):
                first.extend(*(own[layer] for own in owns[1:]))
        else:  # fresh prompts, left-padded; the padding repeats each prompt's first token (a real id)
            prompts = [row.request.prompt for row in rows]
            longest = max(map(len, prompts))
            pads = [longest - len(p) for p in prompts]
            caches = [batch_cache(w, self.kv_bits) for w in self.windows]
            for c in caches:
                c.start_padded(pads)
            feeds = [[p[0]] * pad + p for p, pad in zip(prompts, pads)]
        if not rows:
            return
        for row in rows:
            self.prefilling.remove(row)
        tokens = mx.array(feeds, mx.int32)
        try:
            logits = self.model(tokens, cache=caches)[:, -1, :]
            mx.eval(logits)
        except Exception as e:  # noqa: BLE001  (the server goes on with the other requests)
            events.extend(row.fail(f"generation failed: {type(e).__name__}: {e}") for row in rows)
            return
        chosen, picked = [], []
        for i, row in enumerate(rows):
            row.position = len(row.request.prompt)
            try:  # one row's sampler or grammar failing ends that row alone
                token, logprobs = row.choose(logits[i:i + 1])
                mx.eval(token, logprobs)
            except Exception as e:  # noqa: BLE001
                events.append(row.fail(f"generation failed: {type(e).__name__}: {e}"))
                continue
            chosen.append(i)
            picked.append((int(token.item()), logprobs))
        events.extend(self._accept([rows[i] for i in chosen], [t for t, _ in picked], [lp for _, lp in picked]))
        for i in chosen:
            if rows[i].finish:
                self._store(rows[i], caches, i)
        going = [i for i in chosen if not rows[i].finish]
        if not going:
            return
        if len(going) < len(rows):
            for c in caches:
                c.keep_rows(going)
        if self._caches is None:
            self._caches = caches
        else:
            for mine, theirs in zip(self._caches, caches):
                mine.extend(theirs)
        self.rows.extend(rows[i] for i in going)

    def _prefill_chunk(self, row: _Row, events: list[Event]) -> None:
        if row.caches is None:
            row.started = time.perf_counter()
            row.caches = self._start_caches(row)
        prompt = row.request.prompt
        size = self._chunk_size()
        chunk = mx.array(prompt[row.position:row.position + size], mx.int32)
        row.position += chunk.size
        try:
            logits = self.model(chunk[None], cache=row.caches)[:, -1, :]
            if row.position < len(prompt):  # more to come: the next prompt takes a turn first
                mx.eval([c.state for c in row.caches if c.state is not None])
                self.prefilling.rotate(-1)
                return
            token, logprobs = row.choose(logits)
            mx.eval(token, logprobs)
            event = self._accept([row], [int(token.item())], [logprobs])[0]
        except Exception as e:  # noqa: BLE001  (a bad prompt must not take the others down)
            self.prefilling.popleft()
            events.append(row.fail(f"generation failed: {type(e).__name__}: {e}"))
            if self.lockstep is not None:  # the followers learn that it failed where they wait for its token
                self.lockstep.accepted([row], failure=f"{type(e).__name__}: {e}")
            return
        self.prefilling.popleft()
        events.append(event)
        if row.finish:
            self._store(row, row.caches, 0)
            return
        if self.batched:
            if self._caches is None:
                self._caches = row.caches
            else:
                for mine, theirs in zip(self._caches, row.caches):
                    mine.extend(theirs)
            row.caches = None
        self.rows.append(row)

    # -- decode

    def _speculates(self) -> bool:
        """Whether this step drafts and verifies: one row, greedy, without a grammar."""
        if self.speculation is None or len(self.rows) != 1:
            return False
        row = self.rows[0]
        return row.request.params.temperature == 0 and row.request.constraint is None \
            and row.request.logprobs is None and row.request.reasoning_budget is None

    def _pipelined(self) -> bool:
        """Whether the next step may be queued before this one's tokens are read: not when
        a grammar needs this token to mask the next, or a reasoning budget may force it,
        nor when the next step speculates."""
        return not any(r.paced for r in self.rows) and not self._speculates()

    def _decode(self, events: list[Event]) -> None:
        if self._launched is None and self._speculates() and self._speculate(self.rows[0], events):
            return
        current = self._launched or self._launch(mx.array([r.last for r in self.rows], mx.int32))
        self._launched = None
        if self._pipelined():
            self._launched = self._launch(self._feed(current))
        tokens = current.tokens.tolist()
        logprobs = current.logprobs or [None] * len(tokens)
        live = [i for i, row in enumerate(current.rows) if row.finish is None and not row.cancelled]
        events.extend(self._accept([current.rows[i] for i in live], [tokens[i] for i in live],
                                   [logprobs[i] for i in live]))
        done = [i for i, r in enumerate(self.rows) if r.finish]
        if done:
            self._remove(done, store=True)

    def _accept(self, rows: list[_Row], tokens: list[int], logprobs: list) -> list[Event]:
        """Each row takes its token: its text, stop strings and limits decide its event. In
        a pipeline the leader's decisions are the followers': they take the leader's tokens
        and finishes (theirs, sampled from no logits, mean nothing)."""
        if self.lockstep is not None and not self.lockstep.leader:
            return self.lockstep.follow(rows)
        events = [row.accept(token, None if values is None else values[0].tolist())
                  for row, token, values in zip(rows, tokens, logprobs)]
        if self.lockstep is not None:
            self.lockstep.accepted(rows)
        return events

    def _feed(self, current: _Launch) -> mx.array:
        """The tokens (B,) the rows feed next: the launched step's, still unread, and for
        rows that joined since, their first token."""
        index = {id(r): i for i, r in enumerate(current.rows)}
        at = [index.get(id(r)) for r in self.rows]
        if at == list(range(len(current.rows))):
            return current.tokens
        return mx.concatenate([current.tokens[i:i + 1] if i is not None else mx.array([r.last], mx.int32)
                               for i, r in zip(at, self.rows)])

    def _launch(self, tokens: mx.array) -> _Launch:
        """One forward pass over every row's next token, and the tokens they choose."""
        rows = list(self.rows)
        tokens = tokens.astype(mx.int32)
        if self.batched:
            logits = self.model(tokens[:, None], cache=self._caches)[:, -1, :]  # (B, V)
        else:
            logits = mx.concatenate([self.model(tokens[i:i + 1, None], cache=r.caches)[:, -1, :]
                                     for i, r in enumerate(rows)])
        for i, row in enumerate(rows):
            row.feed(tokens[i:i + 1])
        if all(r.greedy for r in rows):
            picks, logprobs = mx.argmax(logits, axis=-1), None
        else:
            chosen = [r.choose(logits[i:i + 1]) for i, r in enumerate(rows)]
            picks = mx.concatenate([token for token, _ in chosen])
            logprobs = [values for _, values in chosen]
            if all(v is None for v in logprobs):
                logprobs = None
        mx.async_eval(picks, *(v for v in logprobs or () if v is not None))
        return _Launch(rows, picks, logprobs)

    # -- speculative decoding

    def _speculate(self, row: _Row, events: list[Event]) -> bool:
        """Draft up to k tokens, verify them in one forward pass of the model and keep the
        longest prefix it agrees with, plus its own next token: the greedy output is the
        one plain decoding gives. False when there was nothing to draft."""
        spec = self.speculation
        k = min(spec.tokens, row.request.max_tokens - row.generated - 1)
        if k < 1:
            return False
        drafts = self._draft_with_model(row, k) if spec.model is not None else lookup_draft(row.history, k)
        if not drafts:
            return False
        fed = mx.array([row.last, *drafts], mx.int32)
        logits = self.model(fed[None], cache=self._caches)[0]  # (n + 1, V): position i follows fed[:i + 1]
        picks = []
        for i in range(len(fed)):
            recent = None if row.recent is None else mx.concatenate([row.recent, fed[:i + 1]])
            scores = logits[i]
            for process in row.processors:
                scores = process(recent, scores)
            picks.append(mx.argmax(scores))
        targets = mx.stack(picks).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
            accepted += 1
        for c in self._caches:  # the rejected drafts leave the cache
            c.trim(len(drafts) - accepted)
        for token in fed[:accepted + 1]:
            row.feed(token[None])
        if spec.model is not None:
            self._trim_draft(row, len(drafts), accepted)
        spec.drafted += len(drafts)
        spec.accepted += accepted
        for token in [*drafts[:accepted], targets[accepted]]:
            events.append(row.accept(token))
            if row.finish:
                self._remove([0], store=True)
                break
        return True

    def _draft_with_model(self, row: _Row, k: int) -> list[int]:
        """k greedy tokens from the draft model, which first catches up on the history."""
        spec = self.speculation
        if row.draft_caches is None:
            row.draft_caches, row.draft_length = [BatchKVCache(w) for w in spec.windows], 0
        behind = row.history[row.draft_length:-1]
        for start in range(0, len(behind), self.prefill_step):
            spec.model(mx.array([behind[start:start + self.prefill_step]], mx.int32), cache=row.draft_caches)
            mx.eval([c.state for c in row.draft_caches])
        token, drafts = row.last, []
        for _ in range(k):
            logits = spec.model(mx.array([[token]], mx.int32), cache=row.draft_caches)[0, -1]
            token = int(mx.argmax(logits).item())
            drafts.append(token)
        row.draft_length = len(row.history) + k - 1  # it fed the history and all drafts but the last
        return drafts

    def _trim_draft(self, row: _Row, drafted: int, accepted: int) -> None:
        """The draft caches keep what the model accepted: drafts past it leave."""
        keep = min(accepted, drafted - 1)
        for c in row.draft_caches:
            c.trim(drafted - 1 - keep)
        row.draft_length -= drafted - 1 - keep

    # -- rows leaving

    def _reap(self) -> None:
        """Forget cancelled requests; their slots are free for the next."""
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        self.prefilling = deque(r for r in self.prefilling if not r.cancelled)
        gone = [i for i, r in enumerate(self.rows) if r.cancelled]
        if gone:
            self._remove(gone, store=False)

    def _store(self, row: _Row, caches: list, b: int) -> None:
        if self.prefixes is None or row.finish == "error":
            return
        n = len(row.fed)
        if any(map(is_recurrent, self.windows)):  # a state is that of every position it has seen: the
            n = min(c.lengths[b] for c in caches)  # last token too where a step launched ahead fed it
        self.prefixes.store(row.history[:n], [c.row_state(b, n) for c in caches])

    def _remove(self, indices: list[int], store: bool) -> None:
        for i in indices if store else ():
            row = self.rows[i]
            self._store(row, self._caches if self.batched else row.caches, i if self.batched else 0)
        drop = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        if self.batched:
            for c in self._caches:
                c.keep_rows(keep)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._caches, self._launched = None, None


# ---------------------------------------------------------------------------- one sequence

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
    finish_reason: str | None = None  # "stop" (EOS, stop string, grammar complete) | "length" | None
    draft_acceptance: float | None = None  # speculative decoding: drafted tokens the model accepted


def stream_generate(model: nn.Module, tokenizer, prompt: str | Sequence[int],
                    params: SamplingParams | None = None, max_tokens: int = 256,
                    stop: Sequence[str] = (), constraint: Any = None, draft_model: nn.Module | None = None,
                    prompt_lookup: bool = False, draft_tokens: int = DRAFT_TOKENS,
                    kv_bits: int | None = None) -> Iterator[Response]:
    """Generate from a prompt (text, encoded with the tokenizer's BOS rules and special
    tokens parsed, or token ids) and yield text pieces as they complete, ending with a
    piece that carries finish_reason: the generation loop with one request. A draft model
    (same vocabulary) or prompt lookup speculates greedy decoding: same output, fewer
    forward passes of the model when drafts are accepted. kv_bits (16, 8 or 4) narrows the
    KV cache."""
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    generator = BatchGenerator(model, tokenizer, max_batch=1, draft_model=draft_model, prompt_lookup=prompt_lookup,
                               draft_tokens=draft_tokens, kv_bits=kv_bits)
    generator.insert(GenerationRequest(ids, params or SamplingParams(), max_tokens, stop, constraint))
    mx.reset_peak_memory()
    start = time.perf_counter()
    prompt_tps = gen_start = 0.0
    n_generated = 0
    for event in _lone_events(generator):
        if event.token is not None:
            if n_generated == 0:
                gen_start = time.perf_counter()
                prompt_tps = len(ids) / (gen_start - start)
            n_generated += 1
        if not event.text and event.finish_reason is None:
            continue
        elapsed = time.perf_counter() - gen_start if gen_start else 0.0
        tps = (n_generated - 1) / elapsed if n_generated > 1 and elapsed > 0 else 0.0
        spec = generator.speculation
        yield Response(event.text, event.token, len(ids), prompt_tps, n_generated, tps,
                       mx.get_peak_memory() / 1e9, event.finish_reason,
                       spec.acceptance if spec is not None else None)


def _lone_events(generator: BatchGenerator) -> Iterator[Event]:
    """The events of a generator's lone request until it ends; its error raises."""
    try:
        while generator.busy:
            for event in generator.step():
                if event.error is not None:
                    raise RuntimeError(event.error)
                yield event
    finally:
        # A caller that stops early leaves one step in flight; let it finish, or an
        # interpreter exiting right after aborts on MLX's still-running stream thread.
        mx.synchronize()


def generate_step(model: nn.Module, prompt: Sequence[int], params: SamplingParams | None = None,
                  max_tokens: int = 256, kv_bits: int | None = None) -> Iterator[int]:
    """The generated token ids alone, until max_tokens (EOS is not special here: the
    caller stops where it wants by closing the generator)."""
    generator = BatchGenerator(model, None, max_batch=1, kv_bits=kv_bits)
    generator.insert(GenerationRequest(list(prompt), params or SamplingParams(), max_tokens))
    for event in _lone_events(generator):
        if event.token is not None:
            yield event.token


def generate(model: nn.Module, tokenizer, prompt: str | Sequence[int], max_tokens: int = 256,
             stop: Sequence[str] = (), **sampling) -> str:
    """The whole completion as one string. Sampling options are `SamplingParams` fields."""
    params = SamplingParams(**sampling)
    params.validate()
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, params, max_tokens, stop))
