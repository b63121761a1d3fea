"""Llama 4 past its first attention chunk, against llama.cpp on the same file.

llama.cpp fixes Llama 4's chunk (8192 positions) and the temperature floor (8192), so the
48-token comparison in test_archs.py never reaches either. Here the tiny llama4 fixture runs
8192 + 64 positions: from position 8192 on, the chunked layers see only the new chunk, and
from position 8191 on the NoPE layer's queries grow by 1 + 0.1 ln 2.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from arch_reference import FIXTURES, MANIFEST

from mlxllm.archs.llama4 import CHUNK
from mlxllm.cache import KVCache
from mlxllm.loader import load_model

NAME = "llama4"
N = CHUNK + 64
CHECKED = slice(CHUNK - 64, N)  # the positions either side of the chunk boundary
TOLERANCE = 5e-3  # max |Δlogit| / std, as in test_archs.py

pytestmark = pytest.mark.skipif(NAME not in MANIFEST, reason="no llama4 fixture")


@pytest.fixture(scope="module")
def long_run():
    import llama_cpp

    path = FIXTURES / f"{NAME}.f32.gguf"
    rng = np.random.default_rng(4)
    ids = [int(t) for t in rng.integers(4, MANIFEST[NAME]["config"]["vocab_size"], N)]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N + 64, n_batch=512, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, verbose=False)
    llm.eval(ids)
    ref = np.array(llm.scores[:N], dtype=np.float32)
    llm.close()
    return load_model(str(path))[0], ids, ref


def _prefill(model, ids: list[int], piece: int, cache: list | None = None) -> tuple[np.ndarray, list]:
    """Logits of every position, fed through the cache `piece` positions at a time."""
    cache = cache if cache is not None else model.make_cache()
    out = [np.array(model(mx.array([ids[s:s + piece]]), cache=cache)[0]) for s in range(0, len(ids), piece)]
    return np.concatenate(out), cache


def _diff(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours[CHECKED] - ref[CHECKED]).max() / ref[CHECKED].std())


def test_prefill_across_the_chunk_boundary_matches_llama_cpp(long_run):
    model, ids, ref = long_run
    ours, cache = _prefill(model, ids, 500)  # the piece [8000, 8500) spans the boundary
    assert _diff(ours, ref) <= TOLERANCE
    assert (ours[CHECKED].argmax(-1) == ref[CHECKED].argmax(-1)).all()
    held = {c.keys.shape[2] for c in cache if hasattr(c, "chunk")}
    assert held == {N - CHUNK}, "the chunked caches hold the current chunk only"


def test_decode_across_the_chunk_boundary_matches_llama_cpp(long_run):
    model, ids, ref = long_run
    start = CHUNK - 3
    _, cache = _prefill(model, ids[:start], 1024)
    steps = [np.array(model(mx.array([[t]]), cache=cache)[0, 0]) for t in ids[start:start + 8]]
    assert np.abs(np.stack(steps) - ref[start:start + 8]).max() / ref[CHECKED].std() <= TOLERANCE


def test_without_chunks_or_temperature_llama_cpp_differs(long_run):
    """The comparison above can fail: the same model with one chunk over everything, or
    without the temperature, is far from llama.cpp past the boundary."""
    model, ids, ref = long_run
    args = model.args
    try:
        for block in model.blk:
            block.sliding = False  # full attention everywhere (plain KV caches)
        unchunked = _diff(_prefill(model, ids, 1024, [KVCache() for _ in model.blk])[0], ref)
    finally:
        for block, chunked in zip(model.blk, args.sliding):
            block.sliding = chunked
    print(f"without chunks: {unchunked:.3g} x std")
    assert unchunked > 0.05
    layers = args.attn_temperature_layers
    try:
        args.attn_temperature_layers = (False,) * args.n_layers
        untempered = _diff(_prefill(model, ids, 1024)[0], ref)
    finally:
        args.attn_temperature_layers = layers
    print(f"without temperature: {untempered:.3g} x std")
    assert untempered > 0.01
