"""Teacher-forced agreement with llama.cpp on the real models.

The fixtures (scripts/make_reference_fixtures.py) hold llama.cpp's tokens for each prompt
plus its greedy continuation, and its argmax and top-8 logits at every position. Feeding
the same tokens to mlxllm, our argmax must equal llama.cpp's at >= 98% of positions.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxllm.loader import load_model
from mlxllm.models import resolve

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
MODELS = ["smollm2:135m", "gemma3:270m"]


CHUNK = 256  # positions per forward: bounds the (CHUNK, vocab) logits held at once


def argmax_and_gather(model, tokens: list[int], top_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our argmax at every position and our logits at llama.cpp's top ids, running the
    sequence through the KV cache in chunks as generation does."""
    cache = model.make_cache()
    argmax, gathered = [], []
    for start in range(0, len(tokens), CHUNK):
        logits = model(mx.array([tokens[start:start + CHUNK]]), cache=cache)[0]  # (L, vocab)
        ids = mx.array(top_ids[start:start + CHUNK])
        argmax.append(np.array(mx.argmax(logits, axis=-1)))
        gathered.append(np.array(mx.take_along_axis(logits, ids, axis=-1)))
    return np.concatenate(argmax), np.concatenate(gathered)


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_agreement_with_llama_cpp(name, fidelity_report):
    path = FIXTURES / f"{name.replace(':', '-')}.json"
    if not path.exists():
        pytest.fail(f"missing fixture {path}: run scripts/make_reference_fixtures.py {name}")
    doc = json.loads(path.read_text())
    model, *_ = load_model(resolve(name))
    agree = total = 0
    worst_diff = 0.0
    assert len(doc["cases"]) >= 8 and max(len(c["tokens"]) for c in doc["cases"]) > 1500
    for case in doc["cases"]:
        ours, gathered = argmax_and_gather(model, case["tokens"], np.array(case["top_ids"]))
        theirs = np.array(case["argmax"])
        same = int((ours == theirs).sum())
        agree, total = agree + same, total + len(theirs)
        diff = np.abs(gathered - np.array(case["top_logits"])).max()
        worst_diff = max(worst_diff, float(diff))
        fidelity_report.append((name, len(case["tokens"]), f"{same / len(theirs):.2%}", f"{diff:.3f}"))
    assert agree / total >= 0.98, f"{name}: argmax agrees at {agree}/{total} positions"
    fidelity_report.append((name, total, f"{agree / total:.2%} overall", f"{worst_diff:.3f} max"))


@pytest.mark.parametrize("name", MODELS)
def test_quantized_layouts_agree_with_float32(name):
    # The same weights two ways on this CPU: widened to float32, and in their quantized
    # layouts: with the CPU kernels the GGUF blocks as stored (Gemma's Q6_K included), else
    # MLX's native layouts and the widened exact image (kernels/widen.py). Prefill rows
    # (dequantize + GEMM) differ only in summation order; decode rows (one token at a time)
    # go through llama.cpp's 8-bit activations with the kernels. The argmax must agree
    # nearly everywhere.
    doc = json.loads((FIXTURES / f"{name.replace(':', '-')}.json").read_text())
    cases = [c["tokens"] for c in doc["cases"] if len(c["tokens"]) < 100]
    dense, *_ = load_model(resolve(name), dense=True)
    quantized, *_ = load_model(resolve(name), dense=False)
    kinds = {type(m).__name__ for _, m in quantized.named_modules()}
    assert "QuantizedLinear" in kinds and "QuantizedLinear" not in {type(m).__name__ for _, m in dense.named_modules()}
    if name == "gemma3:270m":
        assert any(getattr(m, "mode", None) in ("widened", "packed") for _, m in quantized.named_modules())
    agree = total = 0
    for tokens in cases:
        a = np.array(mx.argmax(dense(mx.array([tokens]))[0], axis=-1))
        b = np.array(mx.argmax(quantized(mx.array([tokens]))[0], axis=-1))
        agree, total = agree + int((a == b).sum()), total + len(tokens)
    steps = []
    cache = quantized.make_cache()
    decoded = cases[0][:24]  # Gemma's 262k-row output through quantized_matmul is slow on CPU
    for token in decoded:
        steps.append(int(mx.argmax(quantized(mx.array([[token]]), cache=cache)[0, -1])))
    a = np.array(mx.argmax(dense(mx.array([decoded]))[0], axis=-1))
    agree, total = agree + int((a == np.array(steps)).sum()), total + len(steps)
    assert agree / total >= 0.99, f"{name}: quantized layouts agree with float32 at {agree}/{total}"
