// Rotary position embedding from precomputed cos/sin tables.
//
// MLX's CPU rope evaluates cos and sin for every element of every head (~3.5 ms for one
// Gemma layer's 512-token queries); the angles depend only on position and pair, so the
// tables are made once per forward pass (kernels/__init__.py) and every layer and head
// applies them with multiplies and adds.
#include <cstdint>
#include <stdexcept>

#include "ops.h"
#include "pool.h"

namespace mlxllm_cpu {

void rotate(const float* x, const float* c, const float* s, float* out, int D, int dims, bool traditional) {
  const int half = dims / 2;
  if (traditional) {
    for (int i = 0; i < half; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      out[2 * i] = a * c[i] - b * s[i];
      out[2 * i + 1] = a * s[i] + b * c[i];
    }
  } else {
    for (int i = 0; i < half; ++i) { // vectorized by the compiler: contiguous halves
      const float a = x[i], b = x[i + half];
      out[i] = a * c[i] - b * s[i];
      out[i + half] = a * s[i] + b * c[i];
    }
  }
  for (int i = dims; i < D; ++i) {
    out[i] = x[i];
  }
}

mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, bool traditional,
               mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "rope");
  // 64-bit: 2 * (dims / 2) wraps around in an int for a table of 2^30 pairs
  // cos/sin: (L, dims / 2), every sequence at the same positions, or (B * L, dims / 2), each its own
  if (x.ndim() != 4 || cos.ndim() != 2 || cos.shape() != sin.shape() ||
      (cos.shape(0) != x.shape(1) && static_cast<int64_t>(cos.shape(0)) != static_cast<int64_t>(x.shape(0)) * x.shape(1)) ||
      2 * static_cast<int64_t>(cos.shape(1)) > x.shape(3)) {
    throw std::invalid_argument("[rope] x must be (B, L, H, D) and cos/sin (L or B * L, dims / 2) with dims <= D");
  }
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream), mx::astype(cos, mx::float32, stream),
                                   mx::astype(sin, mx::float32, stream)};
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(stream, traditional), std::move(inputs));
}

void Rope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto e = begin_eval(stream(), inputs, out);
  const auto &x = e.inputs[0], &c = e.inputs[1], &s = e.inputs[2];
  e.encoder.dispatch([xp = x.data<float>(), cp = c.data<float>(), sp = s.data<float>(), op = out.data<float>(),
                rows = static_cast<long>(x.shape(0)) * x.shape(1), L = x.shape(1), H = x.shape(2), D = x.shape(3),
                half = c.shape(1), per_row = c.shape(0) != x.shape(1), traditional = traditional_]() {
    parallel_ranges(rows, static_cast<long>(H) * D * 4, [&](long begin, long end) {
      for (long r = begin; r < end; ++r) {
        const long l = per_row ? r : r % L; // the position's row of the tables
        for (int h = 0; h < H; ++h) {
          const long at = (r * H + h) * D;
          rotate(xp + at, cp + l * half, sp + l * half, op + at, D, 2 * half, traditional);
        }
      }
    });
  });
}

} // namespace mlxllm_cpu
