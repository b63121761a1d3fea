"""Prefill's weight GEMM on one core: mlxllm's packed-activation kernel on each vector ISA
this CPU runs, against OpenBLAS on the same product, in GMAC/s (multiply-adds per second).

Ours is `gguf_matmul` on a Q8_0 weight, so its figure includes dequantizing each 64-row
tile (Q8_0's is the cheapest); OpenBLAS multiplies the already-dequantized float32 weight
(`kernels.cpu.matmul`, the bound BLAS on one thread). Rows are activation rows: 24-48 is a
MoE expert's share of a 512-token prompt, 512 a dense layer's.

    python scripts/bench_weight_gemm.py                 # rows 24 32 48 512, out 768, in 2048
    python scripts/bench_weight_gemm.py --rows 32 --in 768 --out 2048
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from mlxllm.kernels import source
from mlxllm.kernels.cpu import _cpu as K


def rate(fn, macs: int, seconds: float = 1.0) -> float:
    mx.eval(fn())  # warm: buffers, the BLAS's first call
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mx.eval(fn())
        runs += 1
    return macs * runs / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[24, 32, 48, 512])
    ap.add_argument("--in", dest="cols", type=int, default=2048)
    ap.add_argument("--out", type=int, default=768)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.out, args.cols)).astype(np.float32)
    raw = quants.quantize(w, Q.Q8_0)
    w_float = mx.array(quants.dequantize(raw, Q.Q8_0).astype(np.float32))
    raw, table = mx.array(raw), mx.array(source.table(Q.Q8_0))
    K.set_num_threads(1)
    default = K.gemm_isa()
    print(f"one core, weight ({args.out}, {args.cols}); BLAS: {K.blas_library() or 'none bound'}")
    print("rows  " + "  ".join(f"{isa:>8}" for isa in K.gemm_isas()) + "  OpenBLAS  (GMAC/s)")
    for rows in args.rows:
        x = mx.array(rng.standard_normal((rows, args.cols)).astype(np.float32))
        macs = rows * args.cols * args.out
        ours = []
        for isa in K.gemm_isas():
            K.set_gemm_isa(isa)
            ours.append(rate(lambda: K.gguf_matmul(x, raw, int(Q.Q8_0), table, "float"), macs))
        K.set_gemm_isa(default)
        blas = rate(lambda: K.matmul(x, w_float, transpose_b=True), macs)
        print(f"{rows:4d}  " + "  ".join(f"{r:8.1f}" for r in ours) + f"  {blas:8.1f}")


if __name__ == "__main__":
    main()
