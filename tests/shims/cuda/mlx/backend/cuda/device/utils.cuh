// Stand-in for MLX's CUDA device header, so nvcc compiles our kernels wrapped the way
// mx.fast.cuda_kernel wraps them: the fixed-width integers, CUDA's half and bfloat16, and
// the Shape / Strides parameter types of mlx::core::cu.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>

namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}  // namespace mlx::core::cu
