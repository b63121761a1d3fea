"""The kernels' shared block-decoding source compiled for this CPU with g++, so the very text
the Metal and CUDA kernels include is run and checked against gguf-py here, where no GPU is.

`HostKernels.dequantize` runs dq8_<type> over every chunk (what the dequantize kernels do per
thread); `HostKernels.matvec` runs rowdot_<type> per simulated SIMD lane and sums the lanes
(what the fused matrix-vector kernels do per row); `HostKernels.gather_matvec` does the same
per (row of x, chosen expert) slot with gpu.py's expert indexing (the gather kernel).
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np

from mlxllm.kernels.source import KERNEL_NAMES, block_shape, block_source, kernel_types, table

LANES = 32  # the SIMD width the GPU kernels split a row over

HOST_PRELUDE = """
#include <cstdint>
#include <cstring>
#define QDEV
#define QTHR
#define QFN static inline
static inline float qhalf(uint16_t bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
"""

HOST_ENTRY = """
extern "C" void dequant_{name}(const uint8_t* w, const uint8_t* table, long n_blocks, float* out) {{
    for (long b = 0; b < n_blocks; ++b)
        for (int j = 0; j < QK_{NAME} / 8; ++j)
            dq8_{name}(w + b * BYTES_{NAME}, j, table, out + b * QK_{NAME} + 8 * j);
}}
extern "C" void matvec_{name}(const uint8_t* w, const float* x, int out_features, int in_features,
                             int batch, int lanes, const uint8_t* table, float* out) {{
    const long row_bytes = (long)in_features / QK_{NAME} * BYTES_{NAME};
    for (int o = 0; o < out_features; ++o) {{
        float total[QMAX_BATCH] = {{0}};
        for (int lane = 0; lane < lanes; ++lane) {{
            float acc[QMAX_BATCH] = {{0}};
            rowdot_{name}(w + o * row_bytes, x, in_features, batch, lane, lanes, table, acc);
            for (int r = 0; r < batch; ++r) total[r] += acc[r];
        }}
        for (int r = 0; r < batch; ++r) out[r * out_features + o] = total[r];
    }}
}}
extern "C" void gather_{name}(const uint8_t* w, const float* x, const uint32_t* indices, int experts,
                             int out_features, int in_features, int rows, int k, int lanes,
                             const uint8_t* table, float* out) {{
    const long row_bytes = (long)in_features / QK_{NAME} * BYTES_{NAME};
    for (int slot = 0; slot < rows * k; ++slot) {{
        const uint32_t expert = indices[slot];
        for (int o = 0; o < out_features; ++o) {{
            if (expert >= (uint32_t)experts) {{ out[(long)slot * out_features + o] = __builtin_nanf(""); continue; }}
            float total = 0;
            for (int lane = 0; lane < lanes; ++lane) {{
                float acc[QMAX_BATCH] = {{0}};
                rowdot_{name}(w + ((long)expert * out_features + o) * row_bytes, x + (long)(slot / k) * in_features,
                              in_features, 1, lane, lanes, table, acc);
                total += acc[0];
            }}
            out[(long)slot * out_features + o] = total;
        }}
    }}
}}
"""


def host_source() -> str:
    names = [KERNEL_NAMES[t] for t in kernel_types()]
    entries = "".join(HOST_ENTRY.format(name=n, NAME=n.upper()) for n in names)
    return HOST_PRELUDE + block_source() + entries


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


class HostKernels:
    def __init__(self, build_dir: Path) -> None:
        source = build_dir / "blocks_host.cpp"
        library = build_dir / "blocks_host.so"
        source.write_text(host_source())
        # -ffp-contract=off: plain multiply-then-add, as the oracle rounds (FMA would also
        # agree for the decoders; see common.h), and -O1 keeps compile time small.
        subprocess.run([shutil.which("g++") or "g++", "-std=c++17", "-O1", "-ffp-contract=off", "-shared",
                        "-fPIC", "-Wall", "-Werror", "-Wno-unused-function", str(source), "-o", str(library)],
                       check=True, capture_output=True, text=True)
        self._lib = ctypes.CDLL(str(library))

    def dequantize(self, qtype, raw: np.ndarray) -> np.ndarray:
        elements, nbytes = block_shape(qtype)
        raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)
        out = np.empty(raw.shape[0] * elements, np.float32)
        codebook = table(qtype)
        getattr(self._lib, f"dequant_{KERNEL_NAMES[qtype]}")(
            _ptr(raw), _ptr(codebook), ctypes.c_long(raw.shape[0]), _ptr(out))
        return out

    def matvec(self, qtype, raw: np.ndarray, x: np.ndarray, out_features: int) -> np.ndarray:
        """x (batch, in) @ W.T for the packed W (out_features, in) -> (batch, out_features)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        batch, in_features = x.shape
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty((batch, out_features), np.float32)
        codebook = table(qtype)
        getattr(self._lib, f"matvec_{KERNEL_NAMES[qtype]}")(
            _ptr(raw), _ptr(x), out_features, in_features, batch, LANES, _ptr(codebook), _ptr(out))
        return out

    def gather_matvec(self, qtype, raw: np.ndarray, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """x (N, in) @ W[e].T for each expert e of indices (N, k), packed W (E, out, bytes)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        indices = np.ascontiguousarray(indices, dtype=np.uint32)
        (rows, in_features), (experts, out_features, _), k = x.shape, raw.shape, indices.shape[1]
        out = np.empty((rows, k, out_features), np.float32)
        getattr(self._lib, f"gather_{KERNEL_NAMES[qtype]}")(
            _ptr(raw), _ptr(x), _ptr(indices), experts, out_features, in_features, rows, k, LANES,
            _ptr(table(qtype)), _ptr(out))
        return out


@functools.cache
def host_kernels(build_dir: str) -> HostKernels:
    return HostKernels(Path(build_dir))
