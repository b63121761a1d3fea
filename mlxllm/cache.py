"""Key/value caches for autoregressive decoding: full history and a rotating window for one
sequence (the kinds a model declares in `make_cache()`), their batched form for many
sequences of different lengths (`BatchKVCache`, what the generation loop runs), and the
prefix cache that reuses finished sequences' caches.

Every cache has `offset` (positions seen so far, the RoPE offset of the next token),
`update_and_fetch(keys, values) -> (keys, values)` for the attention to use, `state`, and
`make_mask(L)`: the attention mask for the next `update_and_fetch` of L positions, to be
called before it (a model builds one mask per kind of layer, not one per layer).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


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


# ---------------------------------------------------------------------------- batched rows

class BatchKVCache:
    """Keys and values of B sequences, (B, n_kv_heads, S, head_dim), each left-padded to
    the longest: row b holds its newest positions at slots pad[b]..size-1, in order.

    `offset` is each row's RoPE position (an int while all rows have seen the same
    number), `make_mask(L)` hides the padding and, with `window`, the keys a sliding
    window no longer sees. With a window, keys no future query can see (more than
    window - 1 positions back) are dropped whenever the storage grows, so memory stays at
    the window plus one growth step, in a batch too. Slot distances are position
    distances within a row, which is all causal, windowed and ALiBi masks need.

    bits (8 or 4): keys and values are stored in MLX's affine layout, groups of 32 along
    the head dimension with float32 scales and biases (1.25 / 0.75 bytes per element
    instead of 4), and dequantized for each attention call. Head dimensions that are not
    a multiple of 32 are stored as floats. bits 16: stored as float16 (llama.cpp's default
    F16 cache), each entry rounded once as it is stored and widened exactly as it is read:
    half the memory, and half the bytes a long context's decode step reads.

    One row without a window or bits grows, stores and returns exactly what `KVCache`
    does, so a lone request computes what it would alone.
    """

    step = 256

    def __init__(self, window: int | None = None, bits: int | None = None) -> None:
        if bits not in (None, 4, 8, 16):
            raise ValueError(f"KV cache bits must be 16, 8 or 4, not {bits}")
        self.window, self.bits = window, bits
        # Storage: keys and values as lists of arrays that share axes 0-2 (B, H, S): the
        # floats alone, or the codes, scales and biases of the quantized layout.
        self.keys: list[mx.array] | None = None
        self.values: list[mx.array] | None = None
        self.pad: list[int] = []
        self.lengths: list[int] = []  # positions each row has seen
        self.size = 0  # filled slots, the same for every row

    @property
    def offset(self) -> int | mx.array:
        if not self.lengths:
            return 0
        if len(set(self.lengths)) == 1:
            return self.lengths[0]
        return mx.array(self.lengths)  # (B,): mx.fast.rope takes one per row

    def _dropped(self, L: int) -> int:
        """Slots the next update of L positions drops: growing copies the storage anyway,
        so with a window the slots no upcoming query can see go then."""
        grows = self.keys is None or self.size + L > self.keys[0].shape[2]
        return max(0, self.size - (self.window - 1)) if grows and self.window is not None else 0

    def make_mask(self, L: int) -> mx.array | str | None:
        drop = self._dropped(L)
        size, pad = self.size - drop, [max(0, p - drop) for p in self.pad]
        T = size + L
        windowed = self.window is not None and T > self.window
        if not any(pad) and not windowed:
            return "causal" if L > 1 else None
        q = mx.arange(size, T)[:, None]  # (L, 1) query slots
        k = mx.arange(T)[None]  # (1, T) key slots
        mask = k <= q
        if windowed:
            mask = mask & (q - k < self.window)
        if any(pad):
            real = k[None] >= mx.array(pad)[:, None, None]  # (B, 1, T)
            mask = (mask[None] & real)[:, None]  # (B, 1, L, T), broadcast over heads
        return mask

    # -- storage layout

    def _quantized(self, x: mx.array) -> bool:
        return self.bits in (4, 8) and x.shape[-1] > 0 and x.shape[-1] % 32 == 0

    @property
    def _float_storage(self) -> mx.Dtype:
        return mx.float16 if self.bits == 16 else mx.float32

    def _pack(self, x: mx.array) -> list[mx.array]:
        if self.bits == 16:
            return [x.astype(mx.float16)]
        if not self._quantized(x):
            return [x]
        codes, scales, biases = mx.quantize(x.astype(mx.float32), group_size=32, bits=self.bits)
        return [codes, scales, biases]

    def _unpack(self, parts: list[mx.array], end: int, dtype: mx.Dtype) -> mx.array:
        """Slots [0, end) as floats (B, H, end, D)."""
        if len(parts) == 1:
            return parts[0][..., :end, :].astype(dtype)
        from . import kernels  # the multi-threaded dequantize on the CPU; MLX's elsewhere

        codes, scales, biases = (p[..., :end, :] for p in parts)
        B, H, T, W = codes.shape
        kernel = kernels.cpu.active()
        if kernel is not None:
            flat = kernel.affine_dequantize(codes.reshape(-1, W), scales.reshape(-1, scales.shape[-1]),
                                            biases.reshape(-1, biases.shape[-1]), self.bits)
            return flat.reshape(B, H, T, -1).astype(dtype)
        return mx.dequantize(codes, scales, biases, group_size=32, bits=self.bits).astype(dtype)

    @staticmethod
    def _each(parts: list[mx.array] | None, fn) -> list[mx.array] | None:
        return None if parts is None else [fn(p) for p in parts]

    def _room(self, held: int) -> int:
        """Free slots to add when the storage grows: as many as it holds, 32 to `step` (16
        rows growing by 256 slots at once spent 0.4 s on fresh memory they might not use)."""
        return min(self.step, max(32, held))

    def start_padded(self, pads: list[int]) -> None:
        """Before the first update: prompts of different lengths fed as one batch, each
        left-padded to the longest. Row b's first pads[b] slots are padding: masked, stored
        as zeros (as `extend` pads), and its positions count from the slot after them (the
        padding's own are negative: what it computes from them is never kept or seen)."""
        if self.keys is not None:
            raise ValueError("start_padded is for an empty cache")
        self.pad, self.lengths = list(pads), [-p for p in pads]

    # -- updates

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, _ = keys.shape
        if self.size == 0 and any(self.pad):  # a padded first update: whatever the padding computed is not kept
            real = (mx.arange(L)[None, :] >= mx.array(self.pad)[:, None])[:, None, :, None]  # (B, 1, L, 1)
            keys, values = mx.where(real, keys, 0).astype(keys.dtype), mx.where(real, values, 0).astype(values.dtype)
        new_keys, new_values = self._pack(keys), self._pack(values)
        prev = self._make_room(B, H, L, [(n.shape[-1], n.dtype) for n in new_keys],
                               [(n.shape[-1], n.dtype) for n in new_values])
        for store, new in zip(self.keys + self.values, new_keys + new_values):
            store[..., prev:self.size, :] = new
        return self._unpack(self.keys, self.size, keys.dtype), self._unpack(self.values, self.size, values.dtype)

    def _make_room(self, B: int, H: int, L: int, key_parts: list[tuple[int, mx.Dtype]],
                   value_parts: list[tuple[int, mx.Dtype]]) -> int:
        """Count L more positions, growing the storage where it is full (and dropping, with a
        window, what no query can see any more); returns the first slot they take. key_parts /
        value_parts: each stored array's last axis and dtype."""
        if not self.lengths:
            self.pad, self.lengths = [0] * B, [0] * B
        drop = self._dropped(L)
        prev = self.size
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            if self.window is not None:  # it drops what its window has passed only when it grows
                grow = (L + self.step - 1) // self.step * self.step
            else:
                grow = L + self._room(prev - drop)

            def grown(old: list[mx.array] | None, parts: list[tuple[int, mx.Dtype]]) -> list[mx.array]:
                zeros = [mx.zeros((B, H, grow, dim), dtype) for dim, dtype in parts]
                if old is None:
                    return zeros
                return [mx.concatenate([o[..., drop:prev, :], z], axis=2) for o, z in zip(old, zeros)]

            self.keys, self.values = grown(self.keys, key_parts), grown(self.values, value_parts)
            self.pad = [max(0, p - drop) for p in self.pad]
            prev -= drop
        self.size = prev + L
        self.lengths = [n + L for n in self.lengths]
        return prev

    def writes_in_place(self) -> bool:
        """Whether `update_in_place` can take the next update: float32 or float16 storage (or
        none yet), not the padded first update of a batch of prompts."""
        return self.bits in (None, 16) and (self.keys is None or self.keys[0].dtype == self._float_storage) and \
            not (self.size == 0 and any(self.pad))

    def update_in_place(self, B: int, H: int, L: int, key_dim: int, value_dim: int, write):
        """A fused kernel's update (kernels.cached_attention): room made for L positions as
        `update_and_fetch` makes it, then write(keys, values, slot) -> (result, keys', values')
        stores them at slots [slot, slot + L) of the float storage, whose outputs replace
        it (then nothing else holds the old storage and the kernel writes it in place).
        Returns result. Only where `writes_in_place()`."""
        slot = self._make_room(B, H, L, [(key_dim, self._float_storage)], [(value_dim, self._float_storage)])
        result, self.keys[0], self.values[0] = write(self.keys[0], self.values[0], slot)
        return result

    @property
    def state(self) -> list[mx.array] | None:
        """The stored arrays (to evaluate them), filled slots only."""
        if self.keys is None:
            return None
        return [p[..., :self.size, :] for p in self.keys + self.values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(p.nbytes for p in self.keys + self.values)

    def trim(self, n: int) -> None:
        """Forget every row's last n positions (draft tokens the model did not accept)."""
        if n:
            self.size -= n
            self.lengths = [length - n for length in self.lengths]

    def row_state(self, b: int, length: int) -> tuple[list[mx.array], list[mx.array], int]:
        """Row b's stored positions among its first `length`, copied out of the batch:
        (keys' arrays (1, H, n, ...), values' arrays, the first position held)."""
        first = self.lengths[b] - (self.size - self.pad[b])
        end = self.pad[b] + length - first

        def take(parts: list[mx.array]) -> list[mx.array]:
            return [mx.contiguous(p[b:b + 1, :, self.pad[b]:end, :]) for p in parts]

        return take(self.keys), take(self.values), first

    @classmethod
    def from_state(cls, state: tuple, n: int, window: int | None, bits: int | None = None) -> BatchKVCache | None:
        """One row at position n from a stored `row_state`, or None when the state lacks
        positions that queries from n on can see, or is stored in another layout."""
        keys, values, first = state
        need = 0 if window is None else max(0, n - (window - 1))
        if first > need or n > first + keys[0].shape[2]:
            return None
        cache = cls(window, bits)
        head_dim = keys[1].shape[-1] * 32 if len(keys) == 3 else keys[0].shape[-1]
        if (len(keys) == 3) != cache._quantized(mx.zeros((head_dim,))) or \
                len(keys) == 1 and keys[0].dtype != cache._float_storage:
            return None
        cache.keys = [p[..., need - first:n - first, :] for p in keys]
        cache.values = [p[..., need - first:n - first, :] for p in values]
        cache.pad, cache.lengths, cache.size = [0], [n], n - need
        return cache

    def extend(self, *others: BatchKVCache) -> None:
        """Append the others' rows, all in one join however many there are; shorter caches
        are padded on the left."""
        parts = [c for c in (self, *others) if c.keys is not None]
        if not parts:
            return
        n = max(c.size for c in parts)
        # the copy makes room for the coming tokens too, so the next update need not copy again
        room = 0 if self.window is not None else self._room(n)

        def left_pad(x: mx.array, size: int) -> mx.array:
            x = x[..., :size, :]
            return mx.pad(x, ((0, 0), (0, 0), (n - size, room), (0, 0))) if n > size or room else x

        def joined(arrays: list[list[mx.array]]) -> list[mx.array]:  # arrays[cache][part]
            if len(arrays) == 1:  # nothing to join: the storage as it is
                return list(arrays[0])
            return [mx.concatenate([left_pad(a, c.size) for a, c in zip(same, parts)]) for same in zip(*arrays)]

        self.keys, self.values = joined([c.keys for c in parts]), joined([c.values for c in parts])
        self.pad = [p + n - c.size for c in parts for p in c.pad]
        self.lengths = [length for c in parts for length in c.lengths]
        self.size = n

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not listed, then the padding all remaining rows share."""
        if not rows:
            self.keys = self.values = None
            self.pad, self.lengths, self.size = [], [], 0
            return
        index = mx.array(rows)
        self.keys, self.values = self._each(self.keys, lambda p: p[index]), self._each(self.values, lambda p: p[index])
        self.pad = [self.pad[i] for i in rows]
        self.lengths = [self.lengths[i] for i in rows]
        trim = min(self.pad)
        if trim:  # the free slots past size stay
            self.keys = self._each(self.keys, lambda p: p[..., trim:, :])
            self.values = self._each(self.values, lambda p: p[..., trim:, :])
            self.pad = [p - trim for p in self.pad]
            self.size -= trim


RECURRENT = "recurrent"  # batch_window's answer for a RecurrentCache: BatchRecurrentCache
KV_RECURRENT = "kv+recurrent"  # ... and for a KVRecurrentCache: BatchKVRecurrentCache


def is_recurrent(window: int | None | bool | str) -> bool:
    """Whether a batched form holds a recurrent state: one that cannot drop positions, and
    serves a stored prefix only at exactly its own length."""
    return window in (RECURRENT, KV_RECURRENT)


def batch_window(kind) -> int | None | bool | str:
    """The batched form of a cache kind a model declares in `make_cache()`: its sliding
    window (None: full history), RECURRENT or KV_RECURRENT for a recurrent state (without
    or with keys and values), or False for a kind the batch has no form of."""
    if type(kind) is KVCache:
        return None
    if type(kind) is RotatingKVCache:
        return kind.max_size
    if type(kind) is RecurrentCache:
        return RECURRENT
    if type(kind) is KVRecurrentCache:
        return KV_RECURRENT
    return False


def batch_cache(window: int | None | str, bits: int | None = None) -> BatchKVCache | BatchRecurrentCache:
    """An empty batched cache of the form `batch_window` gave."""
    if window == RECURRENT:
        return BatchRecurrentCache()
    if window == KV_RECURRENT:
        return BatchKVRecurrentCache(None, bits)
    return BatchKVCache(window, bits)


def batch_cache_from_state(state: tuple, n: int, window: int | None | str, bits: int | None = None
                           ) -> BatchKVCache | BatchRecurrentCache | None:
    """One row at position n from a stored `row_state` of that form, or None."""
    if window == RECURRENT:
        return BatchRecurrentCache.from_state(state, n)
    if window == KV_RECURRENT:
        return BatchKVRecurrentCache.from_state(state, n, None, bits)
    return BatchKVCache.from_state(state, n, window, bits)


def _arrays(state) -> list[mx.array]:
    """Every array in a (nested) row state."""
    if isinstance(state, mx.array):
        return [state]
    if isinstance(state, (list, tuple)):
        return [a for part in state for a in _arrays(part)]
    return []


class PrefixCache:
    """The caches of finished sequences, reused by any new prompt that starts with the
    same tokens (a chat's next turn, a shared system prompt). Least recently used entries
    go first once the stored bytes pass the budget.

    Sliding-window layers keep only their window (plus up to one growth step), so an entry
    serves a new prompt only where it diverges within that margin of the entry's end: a
    chat's next turn does; an early fork of a long conversation starts fresh."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: list[tuple[np.ndarray, list, int]] = []  # (ids, per-layer row_state, bytes), LRU order

    @staticmethod
    def _shared(a: np.ndarray, b: np.ndarray) -> int:
        n = min(a.size, b.size)
        differ = np.flatnonzero(a[:n] != b[:n])
        return int(differ[0]) if differ.size else n

    def lookup(self, ids: list[int], limit: int) -> tuple[int, list | None]:
        """(n, per-layer states): the longest stored prefix of ids, at most limit tokens."""
        want = np.asarray(ids)
        best, best_n = -1, 0
        for i, (key, _, _) in enumerate(self._entries):
            n = self._shared(key, want)
            if n > best_n:
                best, best_n = i, n
        n = min(best_n, limit)
        if n <= 0:
            return 0, None
        entry = self._entries.pop(best)
        self._entries.append(entry)
        return n, entry[1]

    def store(self, ids: list[int], states: list) -> None:
        key = np.asarray(ids)
        for i, (other, _, _) in enumerate(self._entries):
            if other.size >= key.size and self._shared(other, key) == key.size:
                self._entries.append(self._entries.pop(i))  # already covered by a longer one
                return
        # Entries this one extends are redundant: every prefix of theirs is one of its.
        self._entries = [e for e in self._entries if not (e[0].size <= key.size and self._shared(e[0], key) == e[0].size)]
        arrays = _arrays(states)
        mx.eval(arrays)
        nbytes = sum(a.nbytes for a in arrays)
        self._entries.append((key, states, nbytes))
        while len(self._entries) > 1 and sum(e[2] for e in self._entries) > self.budget:
            self._entries.pop(0)
        if self._entries and self._entries[-1][2] > self.budget:
            self._entries.pop()

    @property
    def nbytes(self) -> int:
        return sum(e[2] for e in self._entries)


# ---------------------------------------------------------------------------- recurrent state

class _ConvScanState:
    """`state` and `nbytes` of a cache holding a convolution state `conv` and a scan state
    `ssm`, either possibly None (one row or a batch of rows alike)."""

    conv: mx.array | None
    ssm: mx.array | None

    @property
    def state(self) -> tuple[mx.array, ...] | None:
        arrays = tuple(a for a in (self.conv, self.ssm) if a is not None)
        return arrays or None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state or ())


class RecurrentCache(_ConvScanState):
    """What a recurrent layer (Mamba, Mamba-2, LFM2's short convolution) carries from one
    forward pass to the next, in place of keys and values: the last kernel - 1 inputs of its
    causal convolution, `conv` (B, kernel - 1, channels), and the scan's state, `ssm`
    (B, heads, head_dim, d_state), which short-convolution layers have not. Its size does
    not grow with the sequence; `offset` counts the positions seen.

    The state of a position cannot be taken back (no `trim`). Its batched form, for the
    generation loop, is `BatchRecurrentCache`."""

    def __init__(self) -> None:
        self.conv: mx.array | None = None
        self.ssm: mx.array | None = None
        self.offset = 0

    def advance(self, n: int) -> None:
        """n more positions went through the layer (its mixer calls this)."""
        self.offset += n



class KVRecurrentCache(KVCache):
    """A layer that runs attention and a recurrent mixer side by side (Falcon-H1): keys and
    values as `KVCache` keeps them, plus `RecurrentCache`'s conv and ssm state. `offset` is
    the KV cache's, which the attention advances; the mixer's `advance` leaves it. Its
    batched form is `BatchKVRecurrentCache`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv: mx.array | None = None
        self.ssm: mx.array | None = None

    def advance(self, n: int) -> None:
        pass

    @property
    def state(self) -> tuple[mx.array, ...] | None:
        arrays = (*(super().state or ()), *(a for a in (self.conv, self.ssm) if a is not None))
        return arrays or None


class BatchRecurrentCache(_ConvScanState):
    """`RecurrentCache` for B rows: conv (B, kernel - 1, channels) and ssm (B, ...) hold
    each row's own state, so rows of different lengths need no padding: a row joins
    (`extend`) with the state its prompt left and leaves (`keep_rows`) with its own.

    A state is that of every position a row has seen: it cannot drop positions (no `trim`:
    no speculative decoding), and a stored `row_state` serves a new prompt only at exactly
    its own length (the prefix cache's exact case: a chat's next turn after the whole
    previous exchange)."""

    def __init__(self) -> None:
        self.conv: mx.array | None = None
        self.ssm: mx.array | None = None
        self.lengths: list[int] = []  # positions each row has seen

    @property
    def offset(self) -> int | mx.array:
        if not self.lengths:
            return 0
        if len(set(self.lengths)) == 1:
            return self.lengths[0]
        return mx.array(self.lengths)

    def advance(self, n: int) -> None:
        if not self.lengths:  # a fresh cache: one row per row of the state just written
            rows = next((a.shape[0] for a in (self.conv, self.ssm) if a is not None), 1)
            self.lengths = [0] * rows
        self.lengths = [m + n for m in self.lengths]


    def trim(self, n: int) -> None:
        if n:
            raise ValueError("a recurrent state cannot drop positions")

    def row_state(self, b: int, length: int) -> tuple[list[mx.array], list[mx.array], int]:
        """Row b's state copied out of the batch: ([conv], [ssm], the positions it holds),
        or a length of -1 when it does not hold exactly `length`."""
        def row(a: mx.array | None) -> list[mx.array]:
            return [] if a is None else [mx.contiguous(a[b:b + 1])]
        return row(self.conv), row(self.ssm), self.lengths[b] if self.lengths[b] == length else -1

    @classmethod
    def from_state(cls, state: tuple, n: int) -> BatchRecurrentCache | None:
        conv, ssm, held = state
        if held != n:
            return None
        cache = cls()
        cache.conv, cache.ssm = (conv[0] if conv else None), (ssm[0] if ssm else None)
        cache.lengths = [n]
        return cache

    def extend(self, other: BatchRecurrentCache) -> None:
        """Append other's rows."""
        if not self.lengths:
            self.conv, self.ssm, self.lengths = other.conv, other.ssm, list(other.lengths)
            return
        self.conv = None if self.conv is None else mx.concatenate([self.conv, other.conv])
        self.ssm = None if self.ssm is None else mx.concatenate([self.ssm, other.ssm])
        self.lengths = self.lengths + other.lengths

    def keep_rows(self, rows: list[int]) -> None:
        if not rows:
            self.conv = self.ssm = None
            self.lengths = []
            return
        index = mx.array(rows)
        self.conv = None if self.conv is None else self.conv[index]
        self.ssm = None if self.ssm is None else self.ssm[index]
        self.lengths = [self.lengths[i] for i in rows]


class BatchKVRecurrentCache(BatchKVCache):
    """`KVRecurrentCache` for B rows (Falcon-H1: attention and a Mamba-2 mixer in every
    layer): BatchKVCache's keys and values, whose offsets the attention advances, and a
    BatchRecurrentCache's per-row conv and ssm state, which the mixer reads, writes and
    advances. Rows join and leave both together; like any recurrent state it cannot drop
    positions."""

    def __init__(self, window: None = None, bits: int | None = None) -> None:
        super().__init__(window, bits)
        self.recurrent = BatchRecurrentCache()

    conv = property(lambda self: self.recurrent.conv, lambda self, a: setattr(self.recurrent, "conv", a))
    ssm = property(lambda self: self.recurrent.ssm, lambda self, a: setattr(self.recurrent, "ssm", a))

    def advance(self, n: int) -> None:
        self.recurrent.advance(n)

    @property
    def state(self) -> list[mx.array] | None:
        arrays = [*(super().state or ()), *(self.recurrent.state or ())]
        return arrays or None

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.recurrent.nbytes

    def trim(self, n: int) -> None:
        self.recurrent.trim(n)

    def row_state(self, b: int, length: int) -> tuple:
        return super().row_state(b, length), self.recurrent.row_state(b, length)

    @classmethod
    def from_state(cls, state: tuple, n: int, window: None = None, bits: int | None = None
                   ) -> BatchKVRecurrentCache | None:
        cache = super().from_state(state[0], n, window, bits)
        recurrent = BatchRecurrentCache.from_state(state[1], n)
        if cache is None or recurrent is None:
            return None
        cache.recurrent = recurrent
        return cache

    def extend(self, other: BatchKVRecurrentCache) -> None:
        super().extend(other)
        self.recurrent.extend(other.recurrent)

    def keep_rows(self, rows: list[int]) -> None:
        super().keep_rows(rows)
        self.recurrent.keep_rows(rows)
