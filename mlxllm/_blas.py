"""Put an optimized BLAS under MLX's CPU backend on Linux.

The mlx-cpu wheel links netlib's reference BLAS: a 64x1536 @ 1536x1536 float32 matmul
takes ~80 ms. MLX calls `cblas_sgemm` through the dynamic linker, so loading OpenBLAS or
MKL with RTLD_GLOBAL *before* `mlx.core` is imported makes that symbol resolve to it
(~2 ms, 40x). This must run before anything imports mlx.core; `mlxllm/__init__.py` calls
it first. MLXLLM_BLAS=/path/to/lib selects a library, MLXLLM_BLAS=none turns this off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

loaded: str | None = None  # the library in use, for `mlxllm bench` / `--verbose`


def _candidates() -> list[str]:
    found = []
    found += sorted(str(p) for p in (Path(sys.prefix) / "lib").glob("libmkl_rt.so.*"))  # `pip install mkl`
    for name in ("openblas", "mkl_rt", "blis"):  # Debian: apt-get install libopenblas0-pthread
        path = ctypes.util.find_library(name)
        if path:
            found.append(path)
    return found


def preload() -> str | None:
    global loaded
    choice = os.environ.get("MLXLLM_BLAS", "")
    if sys.platform != "linux" or choice.lower() == "none" or "mlx.core" in sys.modules:
        return None
    for path in [choice] if choice else _candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        break
    return loaded
