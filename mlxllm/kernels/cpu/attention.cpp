// Attention's softmax, and attention for a few queries as one op.
//
// MLX's CPU backend computes exp at ~12 ns per element on one thread: for a 512-token
// prompt the softmax inside scaled_dot_product_attention cost more than every matmul of the
// model together. masked_softmax does the same math with vexp, between two BLAS products
// (mlxllm.kernels.attention). A decode step's attention is tiny (a head group's few queries
// against its keys) and was mostly overhead as three ops: eight graph nodes per layer with
// the reshapes, three hand-offs to the threads, the scores stored and reloaded between
// them. `attention` does it in one op, one hand-off, with the same arithmetic.
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

// keep[0:8] as lanes: -1 where kept, 0 where masked.
inline i32x8 kept_lanes(const bool* keep) {
  typedef uint8_t u8x8 __attribute__((vector_size(8)));
  return __builtin_convertvector(load<u8x8>(keep), i32x8) != 0;
}

// The same with an explicit keep-mask: masked entries are exactly zero. A tail shorter
// than 8 goes through the same vector code, padded with masked lanes.
void softmax_masked(const float* s, const bool* keep, float* out, int T, float scale) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  const int T8 = T / 8 * 8, tail = T - T8;
  f32x8 tail_scores = splat(kNone);
  bool tail_keep[8] = {};
  std::memcpy(&tail_scores, s + T8, sizeof(float) * tail);
  std::memcpy(tail_keep, keep + T8, tail);
  auto scores = [&](int j) { return j < T8 ? load<f32x8>(s + j) : tail_scores; };
  auto kept = [&](int j) { return kept_lanes(j < T8 ? keep + j : tail_keep); };
  f32x8 m8 = splat(kNone);
  for (int j = 0; j < T; j += 8) {
    m8 = vmax(m8, kept(j) ? scores(j) : splat(kNone));
  }
  const float m = hmax(m8) * scale;
  if (m == kNone) {
    std::fill(out, out + T, 0.f);
    return;
  }
  f32x8 sum8 = {};
  for (int j = 0; j < T; j += 8) {
    const f32x8 e = kept(j) ? vexp(scores(j) * scale - m) : splat(0.f);
    std::memcpy(out + j, &e, sizeof(float) * std::min(8, T - j));
    sum8 += e;
  }
  const f32x8 inv = splat(1.f / hsum(sum8));
  for (int j = 0; j < T; j += 8) {
    f32x8 p = {};
    const int w = std::min(8, T - j);
    std::memcpy(&p, out + j, sizeof(float) * w);
    p *= inv;
    std::memcpy(out + j, &p, sizeof(float) * w);
  }
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

namespace {

class Attention : public CpuPrimitive {
 public:
  Attention(mx::Stream s, float scale, bool causal) : CpuPrimitive(s), scale_(scale), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0];
    return {{q.shape(0), q.shape(2), q.shape(1), inputs[2].shape(3)}};
  }
  const char* name() const override { return "Attention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  float scale_;
  bool causal_;
};

// Whether the kernel reads x in place: its last axis contiguous, any other strides.
bool rows_in_place(const mx::array& x) {
  return x.shape(-1) <= 1 || x.strides().back() == 1;
}

} // namespace

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "attention");
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) {
    throw std::invalid_argument("[attention] q, k and v must be 4-D: (B, H, L, D), (B, H_kv, T, D), (B, H_kv, T, Dv)");
  }
  const int B = q.shape(0), H = q.shape(1), L = q.shape(2), Hk = k.shape(1), T = k.shape(2);
  if (k.shape(0) != B || v.shape(0) != B || v.shape(1) != Hk || v.shape(2) != T || k.shape(3) != q.shape(3)) {
    throw std::invalid_argument("[attention] k must be (B, H_kv, T, D) and v (B, H_kv, T, Dv) for q (B, H, L, D)");
  }
  if (Hk < 1 || H % Hk || T < 1 || L < 1) {
    throw std::invalid_argument("[attention] needs H a multiple of H_kv >= 1, and at least one query and one key");
  }
  if (causal && (L > T || mask)) {
    throw std::invalid_argument("[attention] a causal mask needs at least as many keys as queries, and no mask");
  }
  std::vector<mx::array> inputs = {mx::astype(q, mx::float32, stream), mx::astype(k, mx::float32, stream),
                                   mx::astype(v, mx::float32, stream)};
  if (mask) {
    const bool shape_ok = (mask->ndim() == 2 || (mask->ndim() == 3 && mask->shape(0) == B)) &&
                          mask->shape(-2) == L && mask->shape(-1) == T;
    if (!shape_ok) {
      throw std::invalid_argument("[attention] mask must be (L, T) or (B, L, T)");
    }
    inputs.push_back(mx::astype(*mask, mx::bool_, stream));
  }
  return mx::array({B, L, H, v.shape(3)}, mx::float32, std::make_shared<Attention>(stream, scale, causal),
                   std::move(inputs));
}

void Attention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> in;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& a = inputs[i];
    enc.set_input_array(a);
    // q, k, v in place (a cache's slice, a transposed query); anything else, and the mask, gathered
    if (a.size() == 0 || (i < 3 ? rows_in_place(a) : a.flags().row_contiguous)) {
      in.push_back(a);
      continue;
    }
    mx::array copy(a.shape(), a.dtype(), nullptr, {});
    copy.set_data(mx::allocator::malloc(copy.nbytes()));
    enc.add_temporary(copy);
    if (a.itemsize() == 4) {
      enc.dispatch([a, dst = copy.data<uint32_t>()]() { gather_rows(a, dst); });
    } else {
      enc.dispatch([a, dst = copy.data<uint8_t>()]() { gather_rows(a, dst); });
    }
    in.push_back(std::move(copy));
  }
  enc.set_output_array(out);
  enc.dispatch([in = std::move(in), out, scale = scale_, causal = causal_]() mutable {
    const auto &q = in[0], &k = in[1], &v = in[2];
    const bool* keep = in.size() > 3 ? in[3].data<bool>() : nullptr;
    const bool keep_per_row = keep && in[3].ndim() == 3;
    const int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3);
    const int Hk = k.shape(1), T = k.shape(2), Dv = v.shape(3), rep = H / Hk;
    // A kv head's rep * L queries, row m being head m / L's query m % L, as matmul would
    // take them stacked; split into chunks of at most kFewRows rows (gemm_few_rows), and
    // finer while there are fewer chunks than threads to share them (one sequence's decode).
    const int M = rep * L;
    int rows = std::min(M, kFewRows);
    while (rows > 1 && static_cast<long>(B) * Hk * ((M + rows - 1) / rows) < 2L * num_threads()) {
      rows = (rows + 1) / 2;
    }
    const int chunks = (M + rows - 1) / rows;
    const auto &qs = q.strides(), &ks = k.strides(), &vs = v.strides();
    const long ldk = T > 1 ? ks[2] : D, ldv = T > 1 ? vs[2] : Dv;
    const float *qp = q.data<float>(), *kp = k.data<float>(), *vp = v.data<float>();
    float* op = out.data<float>();
    parallel_ranges(static_cast<long>(B) * Hk * chunks, 4L * rows * T * (D + Dv), [&](long u0, long u1) {
      std::vector<float> qbuf(static_cast<size_t>(rows) * D), p(static_cast<size_t>(rows) * T),
          obuf(static_cast<size_t>(rows) * Dv);
      for (long u = u0; u < u1; ++u) {
        const int b = static_cast<int>(u / (static_cast<long>(Hk) * chunks));
        const int g = static_cast<int>(u / chunks % Hk), m0 = static_cast<int>(u % chunks) * rows;
        const int n = std::min(rows, M - m0);
        for (int r = 0; r < n; ++r) { // the chunk's queries, contiguous
          const int h = g * rep + (m0 + r) / L, l = (m0 + r) % L;
          const float* src = qp + b * qs[0] + h * qs[1] + l * qs[2];
          std::copy(src, src + D, qbuf.data() + static_cast<size_t>(r) * D);
        }
        const float* keys = kp + b * ks[0] + g * ks[1];
        const float* values = vp + b * vs[0] + g * vs[1];
        gemm_few_rows(true, n, T, D, qbuf.data(), D, keys, static_cast<int>(ldk), p.data(), T);
        for (int r = 0; r < n; ++r) {
          const int l = (m0 + r) % L;
          float* row = p.data() + static_cast<size_t>(r) * T;
          if (keep) { // softmax in place: each entry is read before it is written
            softmax_masked(row, keep + ((keep_per_row ? static_cast<long>(b) * L : 0) + l) * T, row, T, scale);
          } else {
            softmax_prefix(row, row, T, causal ? T - L + l + 1 : T, scale);
          }
        }
        gemm_few_rows(false, n, Dv, T, p.data(), T, values, static_cast<int>(ldv), obuf.data(), Dv);
        for (int r = 0; r < n; ++r) { // to (B, L, H, Dv)
          const int h = g * rep + (m0 + r) / L, l = (m0 + r) % L;
          std::copy(obuf.data() + static_cast<size_t>(r) * Dv, obuf.data() + static_cast<size_t>(r + 1) * Dv,
                    op + ((static_cast<long>(b) * L + l) * H + h) * Dv);
        }
      }
    });
  });
}

} // namespace mlxllm_cpu
