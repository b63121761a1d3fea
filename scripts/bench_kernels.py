"""Decode matrix-vector speed per packed GGUF type, against MLX's native 4-bit on the same
shape and device (issue: kernels). Effective bandwidth = bytes of the weight as GGUF stores
it / time per product, so every path of one type is charged the same bytes.

    python scripts/bench_kernels.py [--shape 4096x14336] [--types Q6_K,IQ4_XS] [--iters 20]

Paths timed per type, where the device has them:
  kernel   the fused dequantize-and-multiply kernel (Metal / CUDA; what decode runs on a GPU)
  widened  MLX's quantized_matmul over the exact native image (kernels/widen.py)
  dense    float32 matmul of the dequantized weight (what the CPU runs when it fits in RAM)
  native4  MLX's own 4-bit quantized_matmul on the same shape (the yardstick)
Ratios are against native4's effective bandwidth, measured in the same run.

    python scripts/bench_kernels.py --experts 128 --used 8 [--shape 768x2048] [--batch 1]

Expert matrix-vector products (MoE decode) instead: `kernels.gather_matmul` over the chosen
experts of a stacked 4-bit weight, against MLX's own gather_qmm and, as the ceiling, our
matvec over one contiguous weight of the same bytes (k experts' rows). Bandwidth = bytes of
the chosen experts' weights (codes, scales, biases) / time per product.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlxllm  # noqa: F401  (optimized BLAS before MLX, where the machine has one)
import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mlxllm import kernels
from mlxllm.kernels.source import KERNEL_NAMES
from mlxllm.quant import QuantizedTensor


def random_weight(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Packed rows with random codes and modest fp16 scales (the tests' block generator)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from quant_blocks import random_blocks
    elements, nbytes = GGML_QUANT_SIZES[qtype]
    return random_blocks(qtype, rows * cols // elements, seed).reshape(rows, cols // elements * nbytes)


def seconds_per_call(fn, iters: int) -> float:
    mx.eval(fn())  # warm-up: compiles kernels, allocates
    runs = []
    for _ in range(iters):
        start = time.perf_counter()
        mx.eval(fn())
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bench_experts(args, out: int, inn: int) -> None:
    E, k, B = args.experts, args.used, args.batch
    weight, scales, biases = mx.quantize(mx.random.normal((E * out, inn)), group_size=32, bits=4)
    weight, scales, biases = (a.reshape(E, out, -1) for a in (weight, scales, biases))
    w = QuantizedTensor(GGMLQuantizationType.Q4_1, (E, out, inn), weight, scales, biases)  # affine 4-bit g32
    contiguous = QuantizedTensor(GGMLQuantizationType.Q4_1, (k * out, inn), *(a[:k].reshape(k * out, -1)
                                                                              for a in (weight, scales, biases)))
    x = mx.random.normal((B, inn))
    indices = mx.random.randint(0, E, (B, k))
    mx.eval(weight, scales, biases, x, indices)
    paths = {
        "mlxllm": lambda: kernels.gather_matmul(x, w, indices),
        "mlx gather_qmm": lambda: mx.gather_qmm(x[:, None, None, :], weight, scales, biases, rhs_indices=indices,
                                                transpose=True, group_size=32, bits=4),
        "contiguous": lambda: kernels.matmul(x, contiguous),  # k experts' bytes, one weight (per row: x B)
    }
    chosen_bytes = B * k * out * (inn // 2 + inn // 32 * 8)
    print(f"{E} experts, {k} used, {out}x{inn} 4-bit, {B} row(s), device {mx.default_device()}")
    results = {name: seconds_per_call(fn, args.iters) for name, fn in paths.items()}
    base = results["mlx gather_qmm"]
    for name, seconds in results.items():
        charged = chosen_bytes if name != "contiguous" else chosen_bytes // B
        print(f"  {name:<16}{seconds * 1e3:8.2f} ms  {charged / seconds / 1e9:6.2f} GB/s  {base / seconds:5.2f}x gather_qmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x14336", help="out x in of the weight")
    parser.add_argument("--types", default=",".join(t.name for t in KERNEL_NAMES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--experts", type=int, help="benchmark expert products over this many experts")
    parser.add_argument("--used", type=int, default=8, help="experts chosen per row (with --experts)")
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    if args.experts:
        return bench_experts(args, rows, cols)
    x = mx.random.normal((args.batch, cols)).astype(mx.float32)
    gpu = kernels.gpu_kernels() is not None
    print(f"device {mx.default_device()}  shape {rows}x{cols}  batch {args.batch}  kernels: "
          f"{'yes' if gpu else 'no (CPU: MLX runs no custom kernels)'}")

    dense_ref = mx.random.normal((rows, cols)) * 0.02
    w4, s4, b4 = mx.quantize(dense_ref, group_size=32, bits=4)
    native_bytes = rows * cols // 32 * 18  # the same weight as GGUF Q4_0 would store it
    native_s = seconds_per_call(lambda: mx.quantized_matmul(x, w4, s4, b4, transpose=True, group_size=32, bits=4),
                                args.iters)
    native_gbs = native_bytes / native_s / 1e9
    print(f"{'native4':8s} {native_s * 1e3:9.2f} ms  {native_gbs:7.2f} GB/s  1.00x")
    del dense_ref

    from mlxllm.kernels import widen as widening
    print(f"{'type':8s} {'path':8s} {'ms':>9s}  {'GB/s':>7s}  vs native4")
    for name in args.types.split(","):
        qtype = GGMLQuantizationType[name]
        raw = random_weight(qtype, rows, cols)
        packed = QuantizedTensor(qtype, (rows, cols), mx.array(raw))
        paths = {}
        if gpu:
            paths["kernel"] = lambda: kernels.matmul(x, packed)
        if qtype in widening.WIDEN:
            parts = widening.widen(qtype, raw, (rows, cols))
            paths["widened"] = lambda parts=parts: widening.matmul(x, parts)
        dense = kernels.dequantize(packed)
        mx.eval(dense)
        paths["dense"] = lambda dense=dense: x @ dense.T
        for path, fn in paths.items():
            t = seconds_per_call(fn, args.iters)
            gbs = raw.nbytes / t / 1e9
            print(f"{name:8s} {path:8s} {t * 1e3:9.2f}  {gbs:7.2f}  {gbs / native_gbs:6.2f}x")
        del dense, paths


if __name__ == "__main__":
    main()
