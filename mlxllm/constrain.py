"""JSON-constrained decoding: a request's `format` (Ollama) or `response_format` (OpenAI)
becomes a grammar, and every step masks the tokens that would leave it, so the output always
parses and validates against the schema.

The grammar engine is llguidance (Microsoft's Rust library behind the `guidance` package,
also a structured-output backend of llama.cpp, vLLM and SGLang). Why it and not the others:
- it needs nothing but the vocabulary as bytes, which `Tokenizer.token_to_bytes` gives for
  every GGUF tokenizer (SPM, BPE, WPM); outlines-core wants a Hugging Face-style vocabulary
  and xgrammar depends on torch, transformers and triton;
- one abi3 wheel per platform with no Python dependencies;
- masks are computed lazily per step (~0.3 ms for SmolLM2's 49k tokens), with no index to
  precompute per schema, so a new schema costs milliseconds, not seconds;
- it compiles most of JSON Schema and rejects what it cannot enforce, so a schema it accepts
  is a promise the output will validate.
"""

from __future__ import annotations

import threading
from typing import Any

import llguidance as llg
import mlx.core as mx
import numpy as np

# Special tokens are marked with a leading 0xFF byte (not valid UTF-8), llguidance's
# convention, so grammar text can never be spelled with them.
_SPECIAL_MARK = b"\xff"

# Compact separators and no free whitespace: small models otherwise tend to emit newlines
# and spaces until max_tokens runs out, which leaves the JSON unfinished.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # Ollama's "json", OpenAI's json_object
# Nesting of objects and arrays in a schema: real ones stay under ten; past this a schema is
# refused before anything recursive (json.dumps, the engine's parser) walks it.
MAX_SCHEMA_DEPTH = 64


class GrammarError(ValueError):
    """A schema the grammar engine cannot enforce; the message says why."""


def check_depth(value: Any, limit: int = MAX_SCHEMA_DEPTH, what: str = "JSON schema") -> None:
    """GrammarError if objects and arrays nest deeper than `limit` in value (walked
    without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise GrammarError(f"the {what} nests deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children)


class _Vocab:
    """What llguidance's `TokenizerWrapper` reads from a tokenizer."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = min(tokenizer.eos_ids) if tokenizer.eos_ids else 0
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [(_SPECIAL_MARK if tokenizer.is_special(i) else b"") + tokenizer.token_to_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special=False)


class Vocabulary:
    """A model's vocabulary as llguidance sees it; built once per loaded model (about half
    a second for 49k tokens) and shared by all its requests."""

    def __init__(self, tokenizer) -> None:
        eos = sorted(tokenizer.eos_ids) or None
        self._lltok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer)), eos_token=eos)

    def json_grammar(self, schema: dict[str, Any]) -> str:
        """The grammar for values of `schema`; raises GrammarError if it cannot be enforced."""
        check_depth(schema)
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        error = llg.LLMatcher.validate_grammar(grammar, self._lltok)
        if error:
            raise GrammarError(f"unsupported JSON schema: {error}")
        return grammar

    def lark_grammar(self, grammar: str) -> str:
        """A Lark grammar (llguidance's dialect) checked against this vocabulary."""
        error = llg.LLMatcher.validate_grammar(grammar, self._lltok)
        if error:
            raise GrammarError(f"unsupported grammar: {error}")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(llg.LLMatcher(self._lltok, grammar, log_level=0))


class Constraint:
    """One request's position in its grammar: `mask()` before sampling, `advance(token)`
    after. Used from the engine thread only."""

    def __init__(self, matcher: llg.LLMatcher) -> None:
        self._matcher = matcher
        if matcher.is_error():
            raise GrammarError(matcher.get_error())

    def mask(self, vocab_size: int) -> mx.array:
        """(vocab_size,) bool: the tokens the grammar allows next (only EOS once complete)."""
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(words, bitorder="little").astype(bool)  # bit i = token i
        if allowed.size < vocab_size:  # logits wider than the tokenizer: padding rows
            allowed = np.concatenate([allowed, np.zeros(vocab_size - allowed.size, bool)])
        return mx.array(allowed[:vocab_size])

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"token {token} violates the grammar: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The value is finished: nothing but EOS can follow."""
        return self._matcher.is_stopped()


_VOCAB_LOCK = threading.Lock()


def vocabulary_for(holder: Any, tokenizer) -> Vocabulary:
    """The Vocabulary cached on `holder` (a loaded model), built on first use."""
    with _VOCAB_LOCK:
        vocab = getattr(holder, "vocabulary", None)
        if vocab is None:
            vocab = holder.vocabulary = Vocabulary(tokenizer)
        return vocab


def special_token_id(tokenizer, text: str) -> int | None:
    """The id of the special (control) token spelled `text`, or None when the vocabulary
    has no such token; tool grammars write markers as the token where it exists."""
    ids = tokenizer.encode(text, add_special=False, parse_special=True)
    return ids[0] if len(ids) == 1 and tokenizer.is_special(ids[0]) else None
