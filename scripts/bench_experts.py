"""Expert matrix-vector speed at decode: `kernels.gather_matmul` (what MoE layers run)
against MLX's own gather_qmm on the same experts, in one run. Effective bandwidth = bytes
of the chosen experts' 4-bit weights / time per product.

    python scripts/bench_experts.py [--experts 128] [--used 8] [--shape 768x2048] [--rows 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlxllm  # noqa: F401  (optimized BLAS before MLX, where the machine has one)
import mlx.core as mx

from mlxllm import kernels
from mlxllm.quant import QuantizedTensor
from gguf import GGMLQuantizationType


def seconds_per_call(fn, iters: int) -> float:
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--used", type=int, default=8)
    ap.add_argument("--shape", default="768x2048", help="one expert's out x in")
    ap.add_argument("--rows", type=int, default=1, help="tokens per product (1: decode)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    out, inn = map(int, args.shape.split("x"))
    E, k = args.experts, args.used
    weight, scales, biases = mx.quantize(mx.random.normal((E * out, inn)), group_size=32, bits=4)
    weight, scales, biases = (a.reshape(E, out, -1) for a in (weight, scales.astype(mx.float32),
                                                              biases.astype(mx.float32)))
    w = QuantizedTensor(GGMLQuantizationType.Q4_1, (E, out, inn), weight, scales, biases)  # affine 4-bit g32
    x = mx.random.normal((args.rows, inn))
    indices = mx.random.randint(0, E, (args.rows, k))
    mx.eval(weight, scales, biases, x, indices)
    paths = {
        "mlxllm": lambda: kernels.gather_matmul(x, w, indices),
        "mlx gather_qmm": lambda: mx.gather_qmm(x[:, None, None, :], weight, scales, biases, rhs_indices=indices,
                                                transpose=True, group_size=32, bits=4),
    }
    chosen_bytes = args.rows * k * out * (inn // 2 + inn // 32 * 8)
    results = {name: seconds_per_call(fn, args.iters) for name, fn in paths.items()}
    base = results["mlx gather_qmm"]
    print(f"{E} experts, {k} used, {out}x{inn} 4-bit, {args.rows} row(s)")
    for name, seconds in results.items():
        print(f"  {name:<16}{seconds * 1e3:8.2f} ms  {chosen_bytes / seconds / 1e9:6.2f} GB/s  {base / seconds:5.2f}x")


if __name__ == "__main__":
    main()
