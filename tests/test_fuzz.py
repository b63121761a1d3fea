"""Hostile model files: the mutation fuzzer (scripts/fuzz_gguf.py) in CI, its recorded
crashes as regression cases, the findings of issue 19 by name, and the CPU kernels
refusing sizes they cannot serve.

Every case runs in a child forked from a process that has imported mlxllm but evaluated
nothing (so the forking cases come before the kernel tests, which evaluate), under a memory
limit and a timeout; only two outcomes pass: the path `mlxllm run`
takes succeeded, or it ended in a one-line user error (GGUFError, LoadError, ...)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlxllm.kernels import cpu

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
REGRESSIONS = FIXTURES / "fuzz" / "regressions.jsonl"
LLAMA = "tests/fixtures/archs/llama.q8_0.gguf"

_spec = importlib.util.spec_from_file_location("fuzz_gguf", ROOT / "scripts" / "fuzz_gguf.py")
fuzz_gguf = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_gguf"] = fuzz_gguf
_spec.loader.exec_module(fuzz_gguf)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fuzzer forks a child per case")


def _seed_available(seed: str) -> bool:
    try:
        return fuzz_gguf.seed_path(seed).exists()
    except Exception:  # noqa: BLE001 (a model that is not installed)
        return False


def _regressions() -> list[dict]:
    return [json.loads(line) for line in REGRESSIONS.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("recipe", _regressions(), ids=lambda r: f"{Path(r['seed']).name}:{json.dumps(r['ops'])[:60]}")
def test_recorded_crash_is_now_a_clean_outcome(recipe):
    """Each crash the fuzzer found (a traceback, a hang, a signal), replayed from its
    committed seed: now a success or a one-line error."""
    if not _seed_available(recipe["seed"]):
        pytest.skip(f"seed {recipe['seed']} is not installed")
    result = fuzz_gguf.replay(recipe, timeout=60)
    assert result["outcome"] in ("ok", "error"), (recipe, result)
    if result["outcome"] == "error":
        assert "\n" not in result["message"] and len(result["message"]) <= fuzz_gguf.MAX_ERROR_CHARS


def _one(ops: list, seed: str = LLAMA) -> dict:
    return fuzz_gguf.replay({"seed": seed, "ops": ops}, timeout=60)


@pytest.mark.parametrize(("ops", "names"), [
    ([["set", "kv:llama.block_count", 49152]], "block_count = 49152"),
    ([["set", "kv:llama.rope.dimension_count", 2**31]], "rope.dimension_count = 2147483648"),
    ([["set", "kv:llama.rope.dimension_count", 2**30]], "rope.dimension_count"),
    ([["set", "kv:llama.embedding_length", 1]], ""),
    ([["set", "kv:llama.embedding_length", 0]], "embedding_length"),
    ([["set", "kv:llama.attention.head_count", 0]], "head_count"),
    ([["set", "kv:llama.attention.head_count_kv", 3]], "head_count_kv"),
    ([["set", "kv:llama.context_length", 0]], "context_length"),
    ([["set", "kv:llama.context_length", 2**31 - 1]], "context_length"),
    ([["set", "kv:llama.feed_forward_length", 2**31]], "feed_forward_length"),
])
def test_absurd_hyperparameter_is_a_one_line_error_naming_the_key(ops, names):
    """Issue 19's cases (found on SmolLM2) on the small Llama fixture: refused before a
    layer is built (block_count 49152 took 35 s and 4.3 GB; rope dims 2^31 was a SIGSEGV)."""
    result = _one(ops)
    assert result["outcome"] == "error", result
    assert result["stage"] == "load" and result["type"] == "LoadError", result
    assert names in result["message"]


def test_a_moe_file_may_declare_a_dense_width_no_tensor_has():
    """Qwen3-30B-A3B's files say feed_forward_length = 6144 (its dense sibling's) beside
    experts of 768 and no dense FFN: llama.cpp loads them, and so must we."""
    result = _one([["set", "kv:qwen3moe.feed_forward_length", 6144]], seed="tests/fixtures/archs/qwen3moe.f32.gguf")
    assert result["outcome"] == "ok", result


def test_corrupt_string_length_does_not_fill_the_error_message():
    """A key length pointing megabytes ahead used to quote every byte in the error."""
    buf = (ROOT / LLAMA).read_bytes()
    layout = fuzz_gguf.parse_layout(buf)
    first_tensor = next(n for n in layout.fields if n.startswith("t:") and n.endswith(".namelen"))
    result = _one([["set", first_tensor, len(buf) // 2]])
    assert result["outcome"] == "error", result
    assert "(" in result["message"] and "characters)" in result["message"], result  # quoted cut short


def test_spliced_edits_are_bytearray_slice_edits():
    """The fuzzer's mutated file (seed runs as views plus replaced runs) holds exactly the
    bytes bytearray's slice edits give, offsets past the end included, so a recorded recipe
    replays the same file."""
    import random

    rng = random.Random(7)
    for _ in range(300):
        seed = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        ours, ref = fuzz_gguf.Spliced(seed), bytearray(seed)
        for _ in range(rng.randrange(1, 8)):
            start = rng.randrange(len(ref) + 8)
            end = max(0, start + rng.randrange(-3, 8))  # also before the start (offsets are never negative)
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 6)))
            ours.splice(start, end, data)
            ref[start:end] = data
            assert bytes(ours) == bytes(ref) and len(ours) == len(ref)
            a, b = rng.randrange(len(ref) + 4), rng.randrange(len(ref) + 4)
            assert b"".join(ours.view(a, b)) == bytes(ref[a:b])


def test_a_short_fuzz_run_finds_nothing():
    """A few thousand mutated files over every architecture fixture (byte flips,
    truncation, extreme header fields and metadata values, vocabulary entries and chat
    templates replaced) in under two minutes: no traceback, hang or signal."""
    found: list[str] = []
    counts = fuzz_gguf.fuzz(fuzz_gguf.default_seeds(small=True), 3000, workers=2, seed=19, timeout=30,
                            seconds=80, report_every=1e9, log=found.append)
    assert set(counts) <= {"ok", "error"}, [f for f in found if f.startswith("FINDING")][:5]
    assert sum(counts.values()) >= 500, counts  # the run did real work
    assert counts["ok"] > 0 and counts["error"] > 0, counts


def _pool_outcome(monkeypatch, tmp_path, case_body, timeout: float, wall_factor: int = 10) -> dict:
    """One case through the fuzzer's pool, its body replaced (the forked child runs it)."""
    monkeypatch.setattr(fuzz_gguf, "_run_case", case_body)
    monkeypatch.setattr(fuzz_gguf, "WALL_FACTOR", wall_factor)
    pool = fuzz_gguf.Pool(1, timeout, fuzz_gguf.MEMORY_LIMIT, str(tmp_path))
    pool.submit({"id": 0}, b"")
    return pool.wait_one()[1]


def _spin(path):
    while True:
        pass


def _block(path):
    time.sleep(60)


def _slow_on_the_clock(path):
    time.sleep(2.5)  # past the CPU timeout on the clock, but computing nothing
    return {"outcome": "ok"}


def test_a_hang_is_cpu_time_or_a_child_blocked_far_past_the_timeout(monkeypatch, tmp_path):
    """A loop is a hang once it has used the timeout in CPU seconds; a child that blocks is one
    after WALL_FACTOR times it on the clock; a case only slow on the clock (the machine busy
    with other work, as when a benchmark runs beside a long fuzz run) is judged by its result."""
    spin = _pool_outcome(monkeypatch, tmp_path, _spin, timeout=1)
    assert spin["outcome"] == "hang" and spin["cpu_seconds"] >= 1, spin
    blocked = _pool_outcome(monkeypatch, tmp_path, _block, timeout=1, wall_factor=2)
    assert blocked["outcome"] == "hang" and blocked["seconds"] >= 2, blocked
    assert _pool_outcome(monkeypatch, tmp_path, _slow_on_the_clock, timeout=1)["outcome"] == "ok"


def test_a_window_longer_than_the_context_within_twice_it_loads():
    """Real files state windows past their context (Phi-3.5: 262,144 for 131,072): up to
    twice the context loads and runs; past it, the cache it would hold is refused."""
    seed = "tests/fixtures/archs/gpt-oss.q8_0.gguf"
    buf = (ROOT / seed).read_bytes()
    field = fuzz_gguf.parse_layout(buf).fields["kv:gpt-oss.context_length"]
    ctx = int.from_bytes(buf[field.offset:field.offset + field.size], "little")
    assert _one([["set", "kv:gpt-oss.attention.sliding_window", 2 * ctx]], seed)["outcome"] == "ok"
    result = _one([["set", "kv:gpt-oss.attention.sliding_window", 2 * ctx + 1]], seed)
    assert result["outcome"] == "error" and "sliding_window" in result["message"], result


# --- the CPU kernels: sizes they cannot serve are exceptions, never out-of-bounds access ----

K = cpu.KERNELS
needs_kernels = pytest.mark.skipif(K is None, reason=f"CPU kernels unavailable: {cpu.UNAVAILABLE}")


@needs_kernels
def test_kernel_rope_refuses_a_table_wider_than_the_head_even_past_int32():
    """2 * (2^30 pairs) wrapped to a negative int and passed the bounds check (the SIGSEGV
    of rope.dimension_count = 2^31). The tables are lazy: nothing is allocated."""
    x = mx.zeros((1, 2, 2, 64))
    for pairs in (33, 2**30, 2**31 - 1):
        table = mx.zeros((2, pairs))
        with pytest.raises(ValueError, match="rope"):
            K.rope(x, table, table, True)


@needs_kernels
def test_kernel_affine_refuses_rows_past_int32_and_empty_rows():
    """2^28 words of 4-bit codes are 2^31 weights a row: past an int, as the row length was
    computed (lazy arrays: nothing is allocated)."""
    for w, s in ((mx.zeros((2, 2**28), mx.uint32), mx.zeros((2, 2**26))), (mx.zeros((2, 0), mx.uint32), mx.zeros((2, 0)))):
        with pytest.raises(ValueError, match="groups"):
            K.affine_dequantize(w, s, s, 4)
        with pytest.raises(ValueError, match="groups"):
            K.affine_matvec(mx.zeros((1, 8)), w, s, s, 4)


@needs_kernels
def test_kernel_affine_gather_marks_an_expert_index_out_of_range_instead_of_reading_it():
    w, scales, biases = mx.quantize(mx.ones((2 * 8, 64)), group_size=32, bits=4)
    w, scales, biases = (a.reshape(2, 8, -1) for a in (w, scales, biases))
    y = K.affine_gather_matvec(mx.ones((1, 64)), w, scales, biases, mx.array([[1, 7]], mx.uint32), 4)
    assert mx.all(mx.isnan(y[0, 1])).item() and not mx.any(mx.isnan(y[0, 0])).item()


@needs_kernels
def test_kernel_zero_width_rows_are_refused():
    with pytest.raises(ValueError, match="rms_norm"):
        K.rms_norm(mx.zeros((3, 0)), mx.zeros((0,)), 1e-5)
    with pytest.raises(ValueError, match="masked_softmax"):
        K.masked_softmax(mx.zeros((2, 0)), 1.0, 1, False)


@needs_kernels
def test_kernel_thread_count_is_bounded():
    before = K.num_threads()
    for n in (0, -1, 10**6):
        with pytest.raises(ValueError, match="set_num_threads"):
            K.set_num_threads(n)
    assert K.num_threads() == before
