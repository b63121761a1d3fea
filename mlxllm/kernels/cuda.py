"""The packed-type kernels on NVIDIA GPUs, through mx.fast.cuda_kernel (see gpu.py).
MLX's kernel header already brings the CUDA half type and the fixed-width integers."""

from __future__ import annotations

import mlx.core as mx

from .gpu import Backend

PRELUDE = """
#define QDEV
#define QTHR
#define QFN __device__ __forceinline__
QFN float qhalf(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
QFN float qwarp_sum(float s) {
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
    return s;
}
"""

CUDA = Backend(
    name="cuda",
    prelude=PRELUDE,
    index_x="(blockIdx.x * blockDim.x + threadIdx.x)",
    index_y="(blockIdx.y * blockDim.y + threadIdx.y)",
    index_z="(blockIdx.z * blockDim.z + threadIdx.z)",
    lane="threadIdx.x",
    simd_sum="qwarp_sum({})",
    nan="__int_as_float(0x7fc00000)",
    make_kernel=mx.fast.cuda_kernel,
)
