"""Load time and peak resident memory of loading a GGUF model into MLX.

    python scripts/measure_load.py smollm2:135m gemma3:270m
    python scripts/measure_load.py --types Q4_0,Q6_K,IQ4_XS   # SmolLM2 re-quantized by llama.cpp

--types writes SmolLM2-135M in each llama.cpp file type (as scripts/quant_matrix.py does,
into --out, kept for the next run) and measures those files.

Prints one JSON line per model. `peak_delta` is the process's peak RSS (VmHWM) minus its
RSS just before loading (after imports), so the interpreter and MLX runtime are not
counted; `ratio` is peak_delta over the file size; `widening` is the loaded weights' bytes
over the file size (above 1 where the CPU holds packed types in their wider exact image) and
`peak_over_weights` is peak_delta over those bytes. Each model loads in a fresh process so
one's peak does not hide the next.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(name: str) -> dict:
    import time

    import mlx.core as mx

    from mlxllm.gguf import GGUFFile
    from mlxllm.loader import load_model, load_tensors
    from mlxllm.models import resolve
    from mlxllm.registry import ArchError, get_arch

    path = resolve(name)
    with GGUFFile(path) as gf:  # warm the page cache: measure loading, not the disk
        size = gf.file_size
        arch = gf.architecture
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    try:
        get_arch(arch)
        model, gf, _, stats = load_model(path, dense=False)  # the quantized layouts as stored
        what = "model"
    except ArchError:
        gf = GGUFFile(path)
        weights = load_tensors(gf)
        what = "tensors"
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    result = {"model": name, "loaded": what, "file_size": size, "load_s": round(seconds, 3),
              "rss_before": before, "peak_rss": peak, "peak_delta": peak - before,
              "ratio": round((peak - before) / size, 3), "mlx_peak": mx.get_peak_memory()}
    if what == "model":
        # The weights' own size in MLX over the file's: above 1 where the CPU holds a packed
        # type as its wider exact image (kernels/widen.py). Peak over that is the overhead.
        result["widening"] = round(stats.nbytes / size, 3)
        result["peak_over_weights"] = round((peak - before) / stats.nbytes, 3)
    return result


def quantized_files(types: list[str], out: Path) -> list[str]:
    """SmolLM2-135M in each llama.cpp file type (quant_matrix.py's recipes), written once."""
    spec = importlib.util.spec_from_file_location("quant_matrix", Path(__file__).with_name("quant_matrix.py"))
    qm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qm)
    from mlxllm.models import resolve

    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "smollm2-135m-f32.gguf"
    if not f32.exists():
        qm.write_f32(resolve("smollm2:135m"), f32)
    paths = []
    for name in types:
        dst = out / f"smollm2-135m-{name.lower()}.gguf"
        if not dst.exists():
            error = (qm.quantize_with_imatrix(f32, dst, name, out) if name in qm.NEEDS_IMATRIX
                     else qm.quantize(f32, dst, qm.FTYPES[name]))
            if error:
                raise SystemExit(f"{name}: {error}")
        paths.append(str(dst))
    return paths


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("models", nargs="*")
        ap.add_argument("--types", help="comma-separated llama.cpp file types of SmolLM2 to measure")
        ap.add_argument("--out", default="/tmp/mlxllm-load-types", help="where --types writes its files")
        args = ap.parse_args()
        names = args.models + (quantized_files(args.types.split(","), Path(args.out)) if args.types else [])
        for name in names or ["smollm2:135m", "gemma3:270m"]:
            subprocess.run([sys.executable, __file__, "--one", name], check=True)
