"""Chunked attention (Llama 4's local layers; llama.cpp LLAMA_SWA_TYPE_CHUNKED): positions
are split into fixed chunks of `chunk` tokens, and a query at position p sees only the keys
of its own chunk up to itself, [p - p % chunk, p]. Unlike a sliding window, the first query
of a chunk sees nothing before it.

`ChunkedKVCache` holds the keys and values of the current chunk only, so memory stays at
one chunk however long the context.
"""

from __future__ import annotations

import mlx.core as mx


def chunk_mask(q_start: int, L: int, k_start: int, T: int, chunk: int) -> mx.array:
    """(L, T) bool: the query at q_start + i sees the key at k_start + j iff the key is not
    in the future and lies in the query's chunk (llama.cpp is_masked_swa, CHUNKED)."""
    q = mx.arange(q_start, q_start + L)[:, None]
    k = mx.arange(k_start, k_start + T)[None, :]
    return (k <= q) & (k >= q - q % chunk)


class ChunkedKVCache:
    """Keys and values from the start of the current chunk on, (B, n_kv_heads, T, head_dim).

    `offset` counts every position seen (the RoPE offset of the next token); `start` is the
    position of the first key held, the start of the next query's chunk. An update attends
    with what is held plus its own keys (a prompt crossing a boundary needs both), then
    keeps only the keys from the chunk of the next query on."""

    def __init__(self, chunk: int) -> None:
        if chunk <= 0:
            raise ValueError(f"attention chunk {chunk} must be positive")
        self.chunk = chunk
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.start = 0

    def _first_kept(self) -> int:
        """The first position the next update's queries can see."""
        return self.offset - self.offset % self.chunk

    def make_mask(self, L: int) -> mx.array | str | None:
        first = self._first_kept()
        if self.offset + L <= first + self.chunk:  # every query in the chunk of the held keys
            return "causal" if L > 1 else None
        return chunk_mask(self.offset, L, first, self.offset + L - first, self.chunk)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            all_keys, all_values = keys, values
        else:  # what is held starts at the chunk of this update's first query
            all_keys = mx.concatenate([self.keys, keys], axis=2)
            all_values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        keep = self._first_kept()  # the next query's chunk: nothing before it is seen again
        if keep == self.offset:
            self.keys = self.values = None
        else:
            self.keys, self.values = all_keys[..., keep - self.start:, :], all_values[..., keep - self.start:, :]
        self.start = keep
        return all_keys, all_values

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        if self.keys is None:
            return None
        return self.keys, self.values
