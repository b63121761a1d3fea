"""CPU generation and prompt speed of SmolLM2 re-quantized into each type (the files
scripts/quant_matrix.py writes), against the same model in Q4_0 measured in the same run,
with the weights in their quantized layouts (packed types as their exact widened image) and
as float32 (the CPU default).

    python scripts/bench_quant_files.py [--dir /tmp/mlxllm-quant-matrix] [--types Q6_K,IQ4_NL]

Each file runs `mlxllm bench` in its own process (pp64 / tg32, 3 repetitions).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def bench(path: Path, layout: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "mlxllm", "bench", str(path), "-p", "64", "-n", "32", "-r", "3",
                          "--layout", layout, "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/mlxllm-quant-matrix")
    parser.add_argument("--types", default="Q2_K,Q6_K,IQ4_NL,IQ4_XS,IQ3_XXS,IQ3_M,TQ1_0,TQ2_0")
    args = parser.parse_args()
    from mlxllm.gguf import GGUFFile
    from mlxllm.quant import layout_of

    files = {name: Path(args.dir) / f"smollm2-135m-{name.lower()}.gguf" for name in ["Q4_0", *args.types.split(",")]}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        sys.exit(f"missing {missing}: write them with scripts/quant_matrix.py --types ...")
    print(f"{'file':<8}{'layout':<10}{'tg tok/s':>9}{'vs Q4_0':>8}{'pp tok/s':>9}{'vs Q4_0':>8}{'weights MB':>11}  packed types")
    for layout in ("quantized", "dense"):
        base = None
        for name, path in files.items():
            r = bench(path, layout)
            tg, pp = r["tokens_per_s"]["tg32"]["mean"], r["tokens_per_s"]["pp64"]["mean"]
            base = base or (tg, pp)
            with GGUFFile(str(path)) as gf:
                packed = sorted({t.qtype.name for t in gf.tensors.values() if layout_of(t.qtype).kind == "packed"})
            print(f"{name:<8}{layout:<10}{tg:>9.2f}{tg / base[0]:>7.2f}x{pp:>9.1f}{pp / base[1]:>7.2f}x"
                  f"{r['weights_mb']:>11.0f}  {', '.join(packed) or '-'}", flush=True)


if __name__ == "__main__":
    main()
