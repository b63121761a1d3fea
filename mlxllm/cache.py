"""Key/value caches for autoregressive decoding: full history, and a rotating window.

Every cache has `offset` (positions seen so far, the RoPE offset of the next token),
`update_and_fetch(keys, values) -> (keys, values)` for the attention to use, `state`, and
`make_mask(L)`: the attention mask for the next `update_and_fetch` of L positions, to be
called before it (a model builds one mask per kind of layer, not one per layer).
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of every position so far, (B, n_kv_heads, T, head_dim).

    Storage grows in steps of `step` positions and is written in place, so a decoded token
    costs one slice-update per tensor instead of a concatenation of the whole history.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def make_mask(self, L: int) -> str | None:
        # Keys are the whole history in order: MLX's "causal" aligns the L queries with the
        # last L keys, so it is right for a chunk after earlier ones too.
        return "causal" if L > 1 else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape
        prev = self.offset
        if self.keys is None or prev + L > self.keys.shape[2]:
            grow = (L + self.step - 1) // self.step * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset += L
        self.keys[..., prev:self.offset, :] = keys
        self.values[..., prev:self.offset, :] = values
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        if self.keys is None:
            return None
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]


def window_mask(q_start: int, L: int, k_start: int, T: int, window: int) -> mx.array:
    """(L, T) bool: query at q_start + i sees key at k_start + j iff it is not in the future
    and q - k < window (llama.cpp is_masked_swa, LLAMA_SWA_TYPE_STANDARD)."""
    q = mx.arange(q_start, q_start + L)[:, None]
    k = mx.arange(k_start, k_start + T)[None, :]
    return (k <= q) & (q - k < window)


class RotatingKVCache:
    """The last `max_size` positions only, for sliding-window attention with window
    `max_size`: memory stays at the window plus the chunk being prefilled.

    Position p is stored at slot p % max_size, so a decoded token overwrites the one that
    just left the window in place. The slots are then out of temporal order, which
    attention does not care about: every stored key is within the window of the new query,
    so decode needs no mask. A chunk of L > 1 positions is attended against the last
    max_size - 1 positions in temporal order followed by the chunk, with `window_mask`.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.keys: mx.array | None = None  # (B, H, max_size, D) once written
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def _filled(self) -> int:
        return min(self.offset, self.max_size)

    def _history(self) -> tuple[int, mx.array | None, mx.array | None]:
        """The last min(offset, max_size - 1) positions in temporal order: all an upcoming
        query at `offset` or later can see."""
        n = min(self.offset, self.max_size - 1)
        if n == 0:
            return 0, None, None
        slots = mx.arange(self.offset - n, self.offset) % self.max_size
        return n, self.keys[..., slots, :], self.values[..., slots, :]

    def make_mask(self, L: int) -> mx.array | str | None:
        if L == 1:
            return None  # every stored key is within the window of the one query
        n = min(self.offset, self.max_size - 1)
        if n + L <= self.max_size:
            return "causal"  # no query reaches past the window: a plain causal mask
        return window_mask(self.offset, L, self.offset - n, n + L, self.max_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape
        M = self.max_size
        if L == 1:
            if self.keys is None:
                self.keys = mx.zeros((B, H, M, D), keys.dtype)
                self.values = mx.zeros((B, H, M, values.shape[3]), values.dtype)
            slot = self.offset % M
            self.keys[..., slot:slot + 1, :] = keys
            self.values[..., slot:slot + 1, :] = values
            self.offset += 1
            n = self._filled
            return self.keys[..., :n, :], self.values[..., :n, :]

        n, hist_k, hist_v = self._history()
        if n:
            keys = mx.concatenate([hist_k, keys], axis=2)  # (B, H, n + L, D), temporal order
            values = mx.concatenate([hist_v, values], axis=2)
        self.offset += L
        # Keep the last M positions at slot p % M: a rotation of the tail when it fills
        # the buffer, else positions 0.. at slots 0.. followed by unused zeros.
        T = keys.shape[2]
        if self.offset >= M:
            tail_start = self.offset - M
            r = (-tail_start) % M
            tk, tv = keys[..., T - M:, :], values[..., T - M:, :]
            self.keys = mx.concatenate([tk[..., r:, :], tk[..., :r, :]], axis=2)
            self.values = mx.concatenate([tv[..., r:, :], tv[..., :r, :]], axis=2)
        else:  # nothing has left the window: the history was kept whole, from position 0
            pad = ((0, 0), (0, 0), (0, M - T), (0, 0))
            self.keys, self.values = mx.pad(keys, pad), mx.pad(values, pad)
        return keys, values

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        """The stored positions, position p at slot p % max_size (with `offset`, enough to
        restore the cache)."""
        if self.keys is None:
            return None
        n = self._filled
        return self.keys[..., :n, :], self.values[..., :n, :]
