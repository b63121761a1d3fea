"""A slice of scripts/quant_matrix.py in CI: SmolLM2 re-quantized by llama.cpp into types
the two real models do not hold, each run end to end against llama.cpp on the same file.

The measurement is the fidelity test's: llama.cpp's greedy continuation of the fixture
prompts (one past 1500 tokens), then our argmax at every position against llama.cpp's.
Two oracles per file:
- llama.cpp on the file itself, as users run it (our default, 16-bit activation blocks):
  agreement at least 95%;
- llama.cpp on a float32 copy of the file (its own dequantization) with a float32 KV cache,
  against our float activations (MLXLLM_CPU_ACTIVATIONS=float): float32 on both sides, so
  agreement almost everywhere and logits within a few thousandths. This checks our
  dequantization and compute apart from either side's activation rounding (the 16-bit
  blocks move single logits by up to ~0.13 on SmolLM2, scripts/quant_matrix.py's table).
"""

import importlib.util
from pathlib import Path

import pytest

from mlxllm.loader import load_model
from mlxllm.models import resolve

SCRIPT = Path(__file__).parent.parent / "scripts" / "quant_matrix.py"
spec = importlib.util.spec_from_file_location("quant_matrix", SCRIPT)
quant_matrix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quant_matrix)

# Three file types whose main types the real models leave out (about a minute and a half
# each): Q2_K (with Q3_K; 2- and 3-bit blocks), IQ3_S (a sign-and-grid i-quant)
# and IQ4_XS (a non-linear codebook). The script runs every type.
TYPES = ["Q2_K", "IQ3_S", "IQ4_XS"]


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quant-matrix") / "smollm2-135m-f32.gguf"
    quant_matrix.write_f32(resolve("smollm2:135m"), path)
    return path


@pytest.mark.parametrize("name", TYPES)
def test_agrees_with_llama_cpp(name, f32_model, fidelity_report, monkeypatch):
    dst = f32_model.with_name(f"smollm2-135m-{name.lower()}.gguf")
    assert quant_matrix.quantize(f32_model, dst, quant_matrix.FTYPES[name]) is None
    copy = dst.with_name(f"{dst.stem}-as-f32.gguf")
    assert quant_matrix.quantize(dst, copy, 0) is None
    model, *_ = load_model(str(dst))
    monkeypatch.setenv("MLXLLM_CPU_ACTIVATIONS", "float")
    float_model, *_ = load_model(str(dst))

    exact, worst = quant_matrix.compare(float_model, *quant_matrix.llamacpp_greedy(copy, **quant_matrix.KV32))
    assert exact >= 0.99 and worst < 0.01, f"{name}: {exact:.2%}, logits within {worst:.4f} of llama.cpp in float32"

    sequences, logits = quant_matrix.llamacpp_greedy(dst)
    ours, _ = quant_matrix.compare(model, sequences, logits)
    fidelity_report.append((f"smollm2/{name}", sum(map(len, sequences)), f"{ours:.2%}",
                            f"(float32 copy: {exact:.2%}, {worst:.4f} max)"))
    assert ours >= 0.95, f"{name}: argmax agrees with llama.cpp at {ours:.2%} of positions"
