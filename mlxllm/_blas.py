"""Optimized BLAS on Linux: for mlxllm's CPU kernels, and under MLX's CPU backend.

mlxllm's CPU kernels run their float GEMMs (prefill, attention) on a BLAS they bind
privately (`kernel_blas_candidates`): the OpenBLAS of the scipy-openblas32 wheel, a
dependency, else a system one. That does not depend on the order of imports.

For MLX's own matmuls (what the kernels do not cover, or everything where they are not
built), `preload` below:

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


def kernel_blas_candidates() -> list[tuple[str, str]]:
    """(library path, symbol prefix) for the CPU kernels' private BLAS, best first:
    MLXLLM_BLAS, scipy-openblas32's OpenBLAS (`scipy_cblas_sgemm`), then system ones."""
    choice = os.environ.get("MLXLLM_BLAS", "")
    if choice.lower() == "none":
        return []
    found = [(choice, "")] if choice else []
    try:
        import scipy_openblas32
        lib = Path(scipy_openblas32.get_lib_dir())
        found += [(str(p), "scipy_") for p in sorted(lib.glob(f"lib{scipy_openblas32.get_library()}.*"))]
    except ImportError:
        pass
    return found + [(path, "") for path in _candidates()]
