"""Load time and peak resident memory of loading a GGUF model into MLX.

    python scripts/measure_load.py smollm2:135m gemma3:270m

Prints one JSON line per model. `peak_delta` is the process's peak RSS (VmHWM) minus its
RSS just before loading (after imports), so the interpreter and MLX runtime are not
counted; `ratio` is peak_delta over the file size; `widening` is the loaded weights' bytes
over the file size (above 1 where the CPU holds packed types in their wider exact image) and
`peak_over_weights` is peak_delta over those bytes. Each model loads in a fresh process so
one's peak does not hide the next.
"""

from __future__ import annotations

import json
import subprocess
import sys


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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
    else:
        for name in sys.argv[1:] or ["smollm2:135m", "gemma3:270m"]:
            subprocess.run([sys.executable, __file__, "--one", name], check=True)
