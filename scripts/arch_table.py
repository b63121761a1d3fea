"""The README's architecture tables: every fixture in tests/fixtures/archs run by llama.cpp
(F32 KV cache) and mlxllm on the same file and token ids (tests/arch_reference.py): logits
for generative models, per-token hidden states (llama.cpp with pooling none) for encoders.

    python scripts/arch_table.py            # markdown rows on stdout
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mlxllm  # noqa: E402,F401  (first: an optimized BLAS under mlx.core)
import numpy as np  # noqa: E402
from arch_reference import FIXTURES, MANIFEST, llama_cpp, llama_cpp_logits, mlxllm_logits, token_ids  # noqa: E402

from mlxllm.loader import load_model  # noqa: E402


def compare(name: str, kind: str) -> tuple[float, float]:
    """(max |Δlogit| / std, argmax agreement) on the fixture's ids."""
    path = FIXTURES / f"{name}.{kind}.gguf"
    ids = token_ids(name)
    ref = llama_cpp_logits(llama_cpp(path), ids)
    ours = mlxllm_logits(load_model(str(path))[0], ids)
    return float(np.abs(ours - ref).max() / ref.std()), float((ours.argmax(-1) == ref.argmax(-1)).mean())


def compare_hidden(name: str, kind: str) -> tuple[float, float]:
    """Encoders: (max, mean) |Δ| / std of the hidden states on the fixture's ids."""
    import mlx.core as mx
    from test_encoders import llama_hidden

    ids = MANIFEST[name]["eval_ids"]
    path = FIXTURES / f"{name}.{kind}.gguf"
    ref = llama_hidden(path, ids)
    ours = np.array(load_model(str(path))[0](mx.array([ids]))[0])
    return float(np.abs(ours - ref).max() / ref.std()), float(np.abs(ours - ref).mean() / ref.std())


def main() -> None:
    encoders = sorted(n for n in MANIFEST if MANIFEST[n].get("kind") == "encoder")
    print("| fixture | GGUF arch | made from | F32 max \\|Δ\\|/std | F32 argmax | Q8_0 max \\|Δ\\|/std | Q8_0 argmax |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(set(MANIFEST) - set(encoders)):
        entry = MANIFEST[name]
        kept = entry.get("files_kept", ("f32", "q8_0"))  # a fixture may commit only some of its files
        cells = []
        for kind in ("f32", "q8_0"):
            if kind in kept:
                diff, agree = compare(name, kind)
                cells += [f"{diff:.1e}" if kind == "f32" else f"{diff:.2f}", f"{agree:.0%}"]
            else:
                cells += ["—", "—"]
        extra = "".join(f" ({q}: {compare(name, q)[1]:.0%} argmax)" for q in entry.get("extra_quants", ())
                        if q in kept or "files_kept" not in entry)
        print(f"| {name}{extra} | `{entry['gguf_arch']}` | {entry['hf_class']} | " + " | ".join(cells) + " |",
              flush=True)
    print()
    print("| encoder fixture | GGUF arch | made from | F32 max \\|Δ\\|/std | Q8_0 max \\|Δ\\|/std | Q8_0 mean \\|Δ\\|/std |")
    print("|---|---|---|---|---|---|")
    for name in encoders:
        entry = MANIFEST[name]
        f32, q8 = compare_hidden(name, "f32"), compare_hidden(name, "q8_0")
        print(f"| {name} | `{entry['gguf_arch']}` | {entry['hf_class']} | {f32[0]:.1e} | {q8[0]:.3f} | {q8[1]:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
