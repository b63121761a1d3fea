// Softmax over attention scores, gated activations and RMSNorm, vectorized and threaded.
//
// MLX's CPU backend computes exp at ~12 ns per element on one thread: for a 512-token
// prompt the softmax inside scaled_dot_product_attention and the feed-forward gates cost
// more than every matmul of the model together. These do the same math with vexp; RMSNorm
// is here because MLX runs it on one thread (0.44 ms for 511 x 640, ~7% of a Gemma prefill).
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "ops.h"
#include "pool.h"
#include "simd.h"

namespace mlxllm_cpu {
namespace {

// softmax(scale * s) over the allowed prefix [0, n) of a row; zeros after it.
void softmax_prefix(const float* s, float* out, int T, int n, float scale) {
  if (n <= 0) {
    std::fill(out, out + T, 0.f);
    return;
  }
  int j = 0;
  f32x8 m8 = splat(-std::numeric_limits<float>::infinity());
  for (; j + 8 <= n; j += 8) {
    m8 = vmax(m8, load<f32x8>(s + j));
  }
  float m = hmax(m8);
  for (; j < n; ++j) {
    m = std::max(m, s[j]);
  }
  m *= scale;
  f32x8 sum8 = {};
  for (j = 0; j + 8 <= n; j += 8) {
    const f32x8 e = vexp(load<f32x8>(s + j) * scale - m);
    store(out + j, e);
    sum8 += e;
  }
  float sum = hsum(sum8);
  if (j < n) { // the tail through a zero-padded vector, masked lanes ignored
    f32x8 t = splat(-INFINITY), e;
    std::memcpy(&t, s + j, sizeof(float) * (n - j));
    e = vexp(t * scale - m);
    for (int i = 0; i < n - j; ++i) {
      out[j + i] = e[i];
      sum += e[i];
    }
  }
  const float inv = 1.f / sum;
  for (j = 0; j + 8 <= n; j += 8) {
    store(out + j, load<f32x8>(out + j) * inv);
  }
  for (; j < n; ++j) {
    out[j] *= inv;
  }
  std::fill(out + n, out + T, 0.f);
}

// The same with an explicit keep-mask: masked entries are exactly zero.
void softmax_masked(const float* s, const bool* keep, float* out, int T, float scale) {
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < T; ++j) {
    if (keep[j]) {
      m = std::max(m, s[j]);
    }
  }
  if (m == -std::numeric_limits<float>::infinity()) {
    std::fill(out, out + T, 0.f);
    return;
  }
  m *= scale;
  float sum = 0.f;
  int j = 0;
  for (; j + 8 <= T; j += 8) {
    f32x8 e = vexp(load<f32x8>(s + j) * scale - m);
    for (int i = 0; i < 8; ++i) {
      e[i] = keep[j + i] ? e[i] : 0.f;
    }
    store(out + j, e);
    sum += hsum(e);
  }
  for (; j < T; ++j) {
    out[j] = keep[j] ? std::exp(s[j] * scale - m) : 0.f;
    sum += out[j];
  }
  const float inv = 1.f / sum;
  for (j = 0; j < T; ++j) {
    out[j] *= inv;
  }
}

template <typename F>
void gate_rows(const float* g, const float* u, float* out, long n, F act) {
  long i = 0;
  for (; i + 8 <= n; i += 8) {
    store(out + i, act(load<f32x8>(g + i)) * load<f32x8>(u + i));
  }
  if (i < n) {
    f32x8 gv = {}, uv = {};
    std::memcpy(&gv, g + i, sizeof(float) * (n - i));
    std::memcpy(&uv, u + i, sizeof(float) * (n - i));
    const f32x8 r = act(gv) * uv;
    std::memcpy(out + i, &r, sizeof(float) * (n - i));
  }
}

// x * sigmoid(x): llama.cpp's ggml_silu.
inline f32x8 silu(f32x8 x) {
  return x / (1.f + vexp(-x));
}

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as x * sigmoid(2u): ggml_gelu
// (the tanh approximation, as Gemma uses).
inline f32x8 gelu_tanh(f32x8 x) {
  const f32x8 u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.f + vexp(-2.f * u));
}

} // namespace

mx::array masked_softmax(const mx::array& scores, float scale, int queries, bool causal,
                         const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "masked_softmax");
  if (scores.ndim() < 2 || queries < 1 || scores.shape(-2) % queries) {
    throw std::invalid_argument("[masked_softmax] scores must be (..., rows, keys) with rows a multiple of queries");
  }
  const int T = scores.shape(-1);
  if (T < 1) {
    throw std::invalid_argument("[masked_softmax] scores need at least one key");
  }
  if (causal && queries > T) {
    throw std::invalid_argument("[masked_softmax] a causal mask needs at least as many keys as queries");
  }
  std::vector<mx::array> inputs = {mx::astype(scores, mx::float32, stream)};
  if (mask) {
    // (queries, keys) for every row, or (batch, queries, keys): one per index of scores' axis 0
    const bool shared = mask->ndim() == 2;
    const bool batched = mask->ndim() == 3 && scores.ndim() >= 3 && mask->shape(0) == scores.shape(0);
    if (causal || !(shared || batched) || mask->shape(-2) != queries || mask->shape(-1) != T) {
      throw std::invalid_argument(
          "[masked_softmax] mask must be (queries, keys) or (batch, queries, keys) and excludes causal");
    }
    inputs.push_back(mx::astype(*mask, mx::bool_, stream));
  }
  return mx::array(scores.shape(), mx::float32, std::make_shared<MaskedSoftmax>(stream, scale, queries, causal),
                   std::move(inputs));
}

void MaskedSoftmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto e = begin_eval(stream(), inputs, out);
  const auto& scores = e.inputs[0];
  const int T = scores.shape(-1);
  const long rows = static_cast<long>(scores.size() / T);
  const bool* keep = e.inputs.size() > 1 ? e.inputs[1].data<bool>() : nullptr;
  // Rows per mask: all of them for a (queries, keys) mask, one batch entry's for (batch, ...).
  const long rows_per_mask = keep && e.inputs[1].ndim() == 3 ? rows / e.inputs[1].shape(0) : rows;
  e.encoder.dispatch(
      [sp = scores.data<float>(), op = out.data<float>(), keep, T, rows, rows_per_mask, scale = scale_,
       L = queries_, causal = causal_]() {
        parallel_ranges(rows, static_cast<long>(T) * 4, [&](long begin, long end) {
          for (long r = begin; r < end; ++r) {
            const int i = static_cast<int>(r % L); // the query this row belongs to
            if (keep) {
              const long mask_row = (r / rows_per_mask) * L + i;
              softmax_masked(sp + r * T, keep + mask_row * T, op + r * T, T, scale);
            } else {
              // Causal: the L queries are the last L positions of the T keys.
              softmax_prefix(sp + r * T, op + r * T, T, causal ? T - L + i + 1 : T, scale);
            }
          }
        });
      });
}

mx::array gated_activation(const mx::array& gate, const mx::array& up, const std::string& kind,
                           mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "gated_activation");
  if (gate.shape() != up.shape()) {
    throw std::invalid_argument("[gated_activation] gate and up must have one shape");
  }
  int which;
  if (kind == "silu") {
    which = GatedActivation::SILU;
  } else if (kind == "gelu_tanh") {
    which = GatedActivation::GELU_TANH;
  } else {
    throw std::invalid_argument("[gated_activation] kind must be 'silu' or 'gelu_tanh'");
  }
  std::vector<mx::array> inputs = {mx::astype(gate, mx::float32, stream), mx::astype(up, mx::float32, stream)};
  return mx::array(gate.shape(), mx::float32, std::make_shared<GatedActivation>(stream, which), std::move(inputs));
}

void GatedActivation::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto e = begin_eval(stream(), inputs, out);
  e.encoder.dispatch(
      [gp = e.inputs[0].data<float>(), up = e.inputs[1].data<float>(), op = out.data<float>(),
       n = static_cast<long>(out.size()), kind = kind_]() {
        constexpr long kBlock = 4096; // elements per unit of work
        parallel_ranges((n + kBlock - 1) / kBlock, kBlock * 12, [&](long begin, long end) {
          const long start = begin * kBlock, count = std::min(n, end * kBlock) - start;
          if (kind == SILU) {
            gate_rows(gp + start, up + start, op + start, count, silu);
          } else {
            gate_rows(gp + start, up + start, op + start, count, gelu_tanh);
          }
        });
      });
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "rms_norm");
  if (x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1) || x.shape(-1) < 1) {
    throw std::invalid_argument("[rms_norm] weight must be (D,) for x (..., D), D >= 1");
  }
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream), mx::astype(weight, mx::float32, stream)};
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(stream, eps), std::move(inputs));
}

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const int D = inputs[0].shape(-1);
  auto e = begin_eval(stream(), inputs, out);
  e.encoder.dispatch(
      [xp = e.inputs[0].data<float>(), wp = e.inputs[1].data<float>(), op = out.data<float>(), D,
       rows = static_cast<long>(out.size() / D), eps = eps_]() {
        parallel_ranges(rows, static_cast<long>(D) * 8, [&](long begin, long end) {
          for (long r = begin; r < end; ++r) {
            const float* x = xp + r * D;
            float* y = op + r * D;
            int j = 0;
            f32x8 ss8 = {};
            for (; j + 8 <= D; j += 8) {
              const f32x8 v = load<f32x8>(x + j);
              ss8 += v * v;
            }
            float ss = hsum(ss8);
            for (; j < D; ++j) {
              ss += x[j] * x[j];
            }
            const float inv = 1.f / std::sqrt(ss / D + eps);
            for (j = 0; j + 8 <= D; j += 8) {
              store(y + j, load<f32x8>(wp + j) * (load<f32x8>(x + j) * inv));
            }
            for (; j < D; ++j) {
              y[j] = wp[j] * (x[j] * inv);
            }
          }
        });
      });
}

} // namespace mlxllm_cpu
