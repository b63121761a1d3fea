// Gated activations, RMSNorm, and the experts' routing and weighted sum.
//
// MLX's CPU backend computes exp at ~12 ns per element on one thread: for a 512-token
// prompt the feed-forward gates cost more than every matmul of the model together. These do
// the same math with vexp; RMSNorm is here because MLX runs it on one thread (0.44 ms for
// 511 x 640, ~7% of a Gemma prefill). Attention's softmax is in attention.cpp.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <stdexcept>

#include "ops.h"
#include "pool.h"
#include "simd.h"

namespace mlxllm_cpu {
namespace {

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

mx::array gated_activation(const mx::array& gate, const std::optional<mx::array>& up, const std::string& kind,
                           mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "gated_activation");
  if (up ? gate.shape() != up->shape() : gate.ndim() == 0 || gate.shape(-1) % 2) {
    throw std::invalid_argument("[gated_activation] gate and up must have one shape (without up, gate's last axis "
                                "must be [gate | up], of even size)");
  }
  int which;
  if (kind == "silu") {
    which = GatedActivation::SILU;
  } else if (kind == "gelu_tanh") {
    which = GatedActivation::GELU_TANH;
  } else {
    throw std::invalid_argument("[gated_activation] kind must be 'silu' or 'gelu_tanh'");
  }
  std::vector<mx::array> inputs = {mx::astype(gate, mx::float32, stream)};
  auto shape = gate.shape();
  if (up) {
    inputs.push_back(mx::astype(*up, mx::float32, stream));
  } else {
    shape.back() /= 2;
  }
  return mx::array(std::move(shape), mx::float32, std::make_shared<GatedActivation>(stream, which), std::move(inputs));
}

void gated_rows(int kind, const float* g, const float* u, float* out, long n) {
  if (kind == GatedActivation::SILU) {
    gate_rows(g, u, out, n, silu);
  } else {
    gate_rows(g, u, out, n, gelu_tanh);
  }
}

void GatedActivation::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto e = begin_eval(stream(), inputs, out);
  // Rows of n: gate and up from two arrays, or from the halves of one row of 2n (a stacked projection's)
  const bool halves = inputs.size() == 1;
  const long n = halves ? out.shape(-1) : static_cast<long>(out.size()), rows = halves ? out.size() / n : 1;
  e.encoder.dispatch([gp = e.inputs[0].data<float>(), up = halves ? nullptr : e.inputs[1].data<float>(),
                      op = out.data<float>(), n, rows, kind = kind_]() {
    constexpr long kBlock = 4096; // elements per unit of work
    const long blocks = (n + kBlock - 1) / kBlock;
    parallel_ranges(rows * blocks, kBlock * 12, [&](long begin, long end) {
      for (long unit = begin; unit < end; ++unit) {
        const long row = unit / blocks, start = unit % blocks * kBlock, count = std::min(n - start, kBlock);
        const float* g = gp + row * (up ? n : 2 * n) + start;
        const float* u = up ? up + start : g + n;
        gated_rows(kind, g, u, op + row * n + start, count);
      }
    });
  });
}

namespace {

// out[d] = ((y[0][d] * w[0] + y[1][d] * w[1]) + ...) for k rows of y (D apart), each
// product rounded before its add, as MLX's multiply then add ops round them: no fused
// multiply-add here, whatever the build's -ffp-contract.
__attribute__((optimize("fp-contract=off"))) void weighted_rows(const float* y, const float* w, int k, long D,
                                                                 float* out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  long d = 0;
  for (; d + 8 <= D; d += 8) {
    f32x8 acc = load<f32x8>(y + d) * w[0];
    for (int j = 1; j < k; ++j) {
      const f32x8 term = load<f32x8>(y + j * D + d) * w[j];
      acc = acc + term;
    }
    store(out + d, acc);
  }
  for (; d < D; ++d) {
    float acc = y[d] * w[0];
    for (int j = 1; j < k; ++j) {
      const float term = y[j * D + d] * w[j];
      acc = acc + term;
    }
    out[d] = acc;
  }
}

} // namespace

mx::array expert_sum(const mx::array& y, const mx::array& weights, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "expert_sum");
  if (y.ndim() != 3 || weights.ndim() != 2 || weights.shape(0) != y.shape(0) || weights.shape(1) != y.shape(1) ||
      y.shape(1) < 1) {
    throw std::invalid_argument("[expert_sum] y must be (N, k, D), k >= 1, and weights (N, k)");
  }
  std::vector<mx::array> inputs = {mx::astype(y, mx::float32, stream), mx::astype(weights, mx::float32, stream)};
  return mx::array({y.shape(0), y.shape(2)}, mx::float32, std::make_shared<ExpertSum>(stream), std::move(inputs));
}

void ExpertSum::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto e = begin_eval(stream(), inputs, out);
  const auto& y = e.inputs[0];
  e.encoder.dispatch([yp = y.data<float>(), wp = e.inputs[1].data<float>(), op = out.data<float>(),
                      N = y.shape(0), k = static_cast<int>(y.shape(1)), D = static_cast<long>(y.shape(2))]() {
    parallel_ranges(N, 4L * k * D, [&](long begin, long end) {
      for (long n = begin; n < end; ++n) {
        weighted_rows(yp + n * k * D, wp + n * k, k, D, op + n * D);
      }
    });
  });
}

namespace {

// llama.cpp clamps the chosen weights' normalizing sum to fp16's smallest normal number
constexpr float kNormMin = 6.103515625e-5f;

// One row's routing (E router logits): the k chosen experts by descending score (ties to
// the lower index; NaN never chosen first) and their weights.
void route_row(const float* logits, const float* bias, int E, int k, int gating, bool normalize, float scale,
               float* probs, int* order, uint32_t* chosen, float* weights) {
  if (gating == MoeRoute::SOFTMAX) { // max-subtracted, the sum in double as ggml_soft_max's
    float top = -std::numeric_limits<float>::infinity();
    for (int e = 0; e < E; ++e) {
      top = std::max(top, logits[e]);
    }
    double sum = 0.0;
    for (int e = 0; e < E; ++e) {
      probs[e] = std::exp(logits[e] - top);
      sum += probs[e];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int e = 0; e < E; ++e) {
      probs[e] *= inv;
    }
  } else if (gating == MoeRoute::SIGMOID) {
    for (int e = 0; e < E; ++e) {
      probs[e] = 1.f / (1.f + std::exp(-logits[e]));
    }
  } else { // SOFTMAX_WEIGHT: chosen on the logits, the softmax over the chosen below
    std::copy(logits, logits + E, probs);
  }
  auto score = [&](int e) {
    const float s = bias ? probs[e] + bias[e] : probs[e];
    return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
  };
  std::iota(order, order + E, 0);
  std::partial_sort(order, order + k, order + E, [&](int a, int b) {
    const float sa = score(a), sb = score(b);
    return sa > sb || (sa == sb && a < b);
  });
  for (int j = 0; j < k; ++j) {
    chosen[j] = static_cast<uint32_t>(order[j]);
    weights[j] = probs[order[j]];
  }
  if (gating == MoeRoute::SOFTMAX_WEIGHT) {
    const float top = *std::max_element(weights, weights + k);
    double total = 0.0;
    for (int j = 0; j < k; ++j) {
      weights[j] = std::exp(weights[j] - top);
      total += weights[j];
    }
    for (int j = 0; j < k; ++j) {
      weights[j] *= static_cast<float>(1.0 / total);
    }
  }
  if (normalize) {
    float sum = 0.f;
    for (int j = 0; j < k; ++j) {
      sum += weights[j];
    }
    for (int j = 0; j < k; ++j) {
      weights[j] /= std::max(sum, kNormMin);
    }
  }
  if (scale != 1.f) {
    for (int j = 0; j < k; ++j) {
      weights[j] *= scale;
    }
  }
}

} // namespace

std::vector<mx::array> moe_route(const mx::array& logits, int k, const std::string& gating, bool normalize,
                                 float scale, const std::optional<mx::array>& bias, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "moe_route");
  int which;
  if (gating == "softmax") {
    which = MoeRoute::SOFTMAX;
  } else if (gating == "sigmoid") {
    which = MoeRoute::SIGMOID;
  } else if (gating == "softmax_weight") {
    which = MoeRoute::SOFTMAX_WEIGHT;
  } else {
    throw std::invalid_argument("[moe_route] gating must be softmax, sigmoid or softmax_weight");
  }
  if (logits.ndim() != 2 || k < 1 || k > logits.shape(1)) {
    throw std::invalid_argument("[moe_route] logits must be (N, experts) and 1 <= k <= experts");
  }
  std::vector<mx::array> inputs = {mx::astype(logits, mx::float32, stream)};
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != logits.shape(1)) {
      throw std::invalid_argument("[moe_route] bias must be (experts,)");
    }
    inputs.push_back(mx::astype(*bias, mx::float32, stream));
  }
  const mx::Shape shape = {logits.shape(0), k};
  return mx::array::make_arrays({shape, shape}, {mx::uint32, mx::float32},
                                std::make_shared<MoeRoute>(stream, k, which, normalize, scale), inputs);
}

void MoeRoute::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> in;
  for (const auto& a : inputs) {
    enc.set_input_array(a);
    in.push_back(a.flags().row_contiguous ? a : gathered(enc, a));
  }
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    enc.set_output_array(o);
  }
  enc.dispatch([in = std::move(in), chosen = outputs[0], weights = outputs[1], k = k_, gating = gating_,
                normalize = normalize_, scale = scale_]() mutable {
    const auto& logits = in[0];
    const int N = logits.shape(0), E = logits.shape(1);
    const float* bias = in.size() > 1 ? in[1].data<float>() : nullptr;
    std::vector<float> probs(E);
    std::vector<int> order(E);
    for (int n = 0; n < N; ++n) {
      route_row(logits.data<float>() + static_cast<long>(n) * E, bias, E, k, gating, normalize, scale, probs.data(),
                order.data(), chosen.data<uint32_t>() + static_cast<long>(n) * k,
                weights.data<float>() + static_cast<long>(n) * k);
    }
  });
}

void rms_norm_row(const float* x, const float* w, float* y, int D, float eps) {
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
    store(y + j, load<f32x8>(w + j) * (load<f32x8>(x + j) * inv));
  }
  for (; j < D; ++j) {
    y[j] = w[j] * (x[j] * inv);
  }
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
            rms_norm_row(xp + r * D, wp, op + r * D, D, eps);
          }
        });
      });
}

} // namespace mlxllm_cpu
