"""mlxllm's CPU kernels: a compiled MLX extension (the C++ beside this file) for what MLX's
CPU backend does slowly — matrix-vector products over the affine quantized layout (decode),
dequantizing it for a BLAS GEMM (prefill), softmax and the feed-forward gates (its exp
runs at ~12 ns per element on one thread).

`KERNELS` is the module, or None where it cannot run: not built (the build is optional,
see setup.py), built against another MLX (the ABI is MLX's C++ one), or a CPU without
the instructions it was compiled for. `UNAVAILABLE` then says why, for `mlxllm bench` and
`--verbose`. Set MLXLLM_CPU_KERNELS=0 to run without them.
"""

from __future__ import annotations

import os
import platform
from types import ModuleType

import mlx.core as mx

# The instructions the x86-64 build is compiled for (-march=x86-64-v3).
X86_64_V3_FLAGS = ("avx2", "fma", "f16c", "bmi2")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _load() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("MLXLLM_CPU_KERNELS", "1") == "0":
        return None, "turned off by MLXLLM_CPU_KERNELS=0"
    if platform.machine() in ("x86_64", "AMD64"):
        missing = [f for f in X86_64_V3_FLAGS if f not in _cpu_flags()]
        if missing:
            return None, f"this CPU lacks {', '.join(missing)}"
    try:
        from . import _cpu
    except ImportError as e:
        return None, f"not built ({e}); reinstall mlxllm with a C++20 compiler present"
    if _cpu.mlx_version != mx.__version__:
        return None, f"built for MLX {_cpu.mlx_version}, running MLX {mx.__version__}; reinstall mlxllm"
    return _cpu, None


KERNELS, UNAVAILABLE = _load()


def active() -> ModuleType | None:
    """The kernels when MLX computes on the CPU and they can run, else None."""
    return KERNELS if KERNELS is not None and mx.default_device() == mx.cpu else None
