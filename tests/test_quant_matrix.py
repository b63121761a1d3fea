"""A slice of scripts/quant_matrix.py in CI: SmolLM2 re-quantized by llama.cpp into types
the two real models do not hold, each run end to end against llama.cpp on the same file.

Two oracles per file. Against llama.cpp running a float32 copy of the file (its own
dequantization, no activation rounding on either side) our argmax must agree almost
everywhere: that checks our dequantization and compute. Against llama.cpp on the quantized
file itself, agreement is bounded by llama.cpp's 8-bit activation rounding, so ours must be
within two points of llama.cpp's agreement with itself under a float32 KV cache (the script's
docstring says why).
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

# Three file types whose main types the real models leave out (about a minute each): Q2_K
# (with Q3_K; widened into 6-bit + 1-bit parts), IQ3_S (a sign-and-grid i-quant) and IQ4_XS
# (a non-linear codebook). The script runs every type.
TYPES = ["Q2_K", "IQ3_S", "IQ4_XS"]


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quant-matrix") / "smollm2-135m-f32.gguf"
    quant_matrix.write_f32(resolve("smollm2:135m"), path)
    return path


@pytest.mark.parametrize("name", TYPES)
def test_agrees_with_llama_cpp(name, f32_model, fidelity_report):
    dst = f32_model.with_name(f"smollm2-135m-{name.lower()}.gguf")
    assert quant_matrix.quantize(f32_model, dst, quant_matrix.FTYPES[name]) is None
    copy = dst.with_name(f"{dst.stem}-as-f32.gguf")
    assert quant_matrix.quantize(dst, copy, 0) is None

    model, *_ = load_model(str(dst))
    sequences, argmax = quant_matrix.llamacpp_greedy(copy)
    exact = quant_matrix.share(quant_matrix.mlxllm_teacher_forced(model, sequences), argmax)
    assert exact >= 0.99, f"{name}: {exact:.2%} against llama.cpp on the float32 copy"

    sequences, argmax = quant_matrix.llamacpp_greedy(dst)
    ours = quant_matrix.share(quant_matrix.mlxllm_teacher_forced(model, sequences), argmax)
    itself = quant_matrix.share(quant_matrix.llamacpp_teacher_forced(
        dst, sequences, type_k=quant_matrix.F32, type_v=quant_matrix.F32), argmax)
    fidelity_report.append((f"smollm2/{name}", sum(map(len, argmax)), f"{ours:.2%}",
                            f"(llama.cpp vs itself {itself:.2%}; vs its float32 copy {exact:.2%})"))
    assert ours >= itself - 0.02, f"{name}: {ours:.2%} against llama.cpp, which agrees with itself at {itself:.2%}"
