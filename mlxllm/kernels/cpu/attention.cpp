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
#include <array>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

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

// Query i of L (the last L of the T keys) over one row of scores: the keep row where a mask
// is given, else the causal prefix or every key.
inline void softmax_row(const float* s, float* out, int T, const bool* keep_row, bool causal, int L, int i,
                        float scale) {
  if (keep_row) {
    softmax_masked(s, keep_row, out, T, scale);
  } else {
    softmax_prefix(s, out, T, causal ? T - L + i + 1 : T, scale);
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
            const bool* keep_row = keep ? keep + ((r / rows_per_mask) * L + i) * T : nullptr;
            softmax_row(sp + r * T, op + r * T, T, keep_row, causal, L, i, scale);
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

constexpr int kKeyBlock = 64;     // keys per unit of the score product when groups are few
constexpr int kValueColumns = 64; // value columns per unit of the value product

// Whether the kernel reads x in place: its last axis contiguous, rows a sane distance apart
// (a KV cache's slice); anything else is gathered first.
bool rows_in_place(const mx::array& x) {
  const long ld = x.shape(2) > 1 ? x.strides()[2] : x.shape(3);
  return (x.shape(3) <= 1 || x.strides()[3] == 1) && ld >= x.shape(3) && ld <= (1L << 30);
}

// Whether a keep-mask fits L queries over T keys: (L, T) for every sequence, or (B, L, T).
bool keep_mask_fits(const mx::array& mask, int B, int L, int T) {
  return (mask.ndim() == 2 || (mask.ndim() == 3 && mask.shape(0) == B)) && mask.shape(-2) == L &&
         mask.shape(-1) == T;
}

// attend's operands (elements, not bytes): q (B, H, L, D) at strides qs, its last axis
// contiguous; k (B, Hk, T, D) and v (B, Hk, T, Dv) at strides ks / vs over (B, Hk), their
// rows ldk / ldv apart; keep (L, T) or, keep_per_row, (B, L, T); out (B, L, H, Dv). Keys and
// values are float32, or float16 bits (TK = uint16_t: a cache stored as halves).
template <class TK>
struct Attend {
  const float* q;
  const TK *k, *v;
  std::array<int64_t, 3> qs;
  std::array<int64_t, 2> ks, vs;
  int64_t ldk, ldv;
  int B, H, L, D, Hk, T, Dv;
  const bool* keep;
  bool keep_per_row;
  float scale;
  bool causal;
  float* out;
};

// softmax(scale * q @ k.T, masked) @ v for few queries per kv head: attention's math, run on
// the pool from the stream's thread.
template <class TK>
void attend(const Attend<TK>& a);

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
  if (Hk < 1 || H < Hk || H % Hk || T < 1 || L < 1 || static_cast<long>(H / Hk) * L > kFewRows) {
    throw std::invalid_argument("[attention] needs H a multiple of H_kv >= 1, at least one query and one key, and at most " +
                                std::to_string(kFewRows) + " queries per kv head (H / H_kv * L)");
  }
  if (causal && (L > T || mask)) {
    throw std::invalid_argument("[attention] a causal mask needs at least as many keys as queries, and no mask");
  }
  std::vector<mx::array> inputs = {mx::astype(q, mx::float32, stream), mx::astype(k, mx::float32, stream),
                                   mx::astype(v, mx::float32, stream)};
  if (mask) {
    if (!keep_mask_fits(*mask, B, L, T)) {
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
    const bool in_place = a.size() == 0 || (i < 3 ? rows_in_place(a) : a.flags().row_contiguous);
    in.push_back(in_place ? a : gathered(enc, a));
  }
  enc.set_output_array(out);
  enc.dispatch([in = std::move(in), out, scale = scale_, causal = causal_]() mutable {
    const auto &q = in[0], &k = in[1], &v = in[2];
    const int T = k.shape(2);
    const auto &qs = q.strides(), &ks = k.strides(), &vs = v.strides();
    attend<float>({q.data<float>(), k.data<float>(), v.data<float>(), {qs[0], qs[1], qs[2]}, {ks[0], ks[1]},
                   {vs[0], vs[1]}, T > 1 ? ks[2] : k.shape(3), T > 1 ? vs[2] : v.shape(3), q.shape(0), q.shape(1),
                   q.shape(2), q.shape(3), k.shape(1), T, v.shape(3), in.size() > 3 ? in[3].data<bool>() : nullptr,
                   in.size() > 3 && in[3].ndim() == 3, scale, causal, out.data<float>()});
  });
}

namespace {

template <class TK>
void attend(const Attend<TK>& a) {
  const int B = a.B, H = a.H, L = a.L, D = a.D, Hk = a.Hk, T = a.T, Dv = a.Dv, rep = H / Hk;
  const int64_t ldk = a.ldk, ldv = a.ldv;
  const bool* keep = a.keep;
  // Group gi = (sequence b, kv head g): its M = rep * L queries stacked as rows, row m
  // being head g * rep + m / L's query m % L, as the score product would take them.
  const int M = rep * L;
  const long groups = static_cast<long>(B) * Hk;
  const TK *kp = a.k, *vp = a.v;
  float* op = a.out;
  // Scratch kept by this (MLX's stream) thread: a step's layers reuse it instead of
  // fresh pages for every call.
  static thread_local std::vector<float> query_scratch, score_scratch;
  query_scratch.resize(static_cast<size_t>(groups) * M * D);
  score_scratch.resize(static_cast<size_t>(groups) * M * T);
  // Pointers, not the vectors, in the lambdas below: the pool's threads would see their own
  // (empty) thread_local vectors by name.
  float *queries = query_scratch.data(), *p = score_scratch.data();
  for (long gi = 0; gi < groups; ++gi) {
    for (int m = 0; m < M; ++m) {
      const float* src = a.q + gi / Hk * a.qs[0] + (gi % Hk * rep + m / L) * a.qs[1] + m % L * a.qs[2];
      std::copy(src, src + D, queries + (gi * M + m) * D);
    }
  }
  auto scores = [&](long gi, int k0, int n) { // keys [k0, k0 + n) of group gi
    gemm_few_rows(true, M, n, D, queries + gi * M * D, D, kp + gi / Hk * a.ks[0] + gi % Hk * a.ks[1] + k0 * ldk,
                  static_cast<int>(ldk), p + gi * M * T + k0, T);
  };
  auto softmax = [&](long gi, int m) { // in place: each entry is read before it is written
    float* row = p + (gi * M + m) * T;
    const int l = m % L;
    const bool* keep_row = keep ? keep + ((a.keep_per_row ? gi / Hk * L : 0) + l) * T : nullptr;
    softmax_row(row, row, T, keep_row, a.causal, L, l, a.scale);
  };
  auto values = [&](long gi, int c0, int n) { // output columns [c0, c0 + n) of group gi
    float rows[kFewRows * kValueColumns];
    gemm_few_rows(false, M, n, T, p + gi * M * T, T, vp + gi / Hk * a.vs[0] + gi % Hk * a.vs[1] + c0,
                  static_cast<int>(ldv), rows, n);
    for (int m = 0; m < M; ++m) { // to (B, L, H, Dv)
      const long at = ((gi / Hk * L + m % L) * H + gi % Hk * rep + m / L) * Dv + c0;
      std::copy(rows + m * n, rows + (m + 1) * n, op + at);
    }
  };
  const long cost = 4L * M * T * (D + Dv);
  if (groups >= 2L * num_threads()) { // a batch: whole groups, each reading its keys and values once
    parallel_ranges(groups, cost, [&](long g0, long g1) {
      for (long gi = g0; gi < g1; ++gi) {
        scores(gi, 0, T);
        for (int m = 0; m < M; ++m) {
          softmax(gi, m);
        }
        for (int c0 = 0; c0 < Dv; c0 += kValueColumns) {
          values(gi, c0, std::min(kValueColumns, Dv - c0));
        }
      }
    });
    return;
  }
  // Fewer groups than the threads could share (one sequence's decode): each step split
  // finer, still one read of the keys and values: scores by key blocks, softmax by rows,
  // values by column blocks and blocks of kSumTerms keys, whose partial sums are then
  // added in order, as gemm_few_rows adds them for the whole (so the same sums as a batch's).
  const long key_blocks = (T + kKeyBlock - 1) / kKeyBlock, column_blocks = (Dv + kValueColumns - 1) / kValueColumns;
  parallel_ranges(groups * key_blocks, cost / key_blocks / 2, [&](long u0, long u1) {
    for (long u = u0; u < u1; ++u) {
      const int k0 = static_cast<int>(u % key_blocks) * kKeyBlock;
      scores(u / key_blocks, k0, std::min(kKeyBlock, T - k0));
    }
  });
  parallel_ranges(groups * M, 16L * T, [&](long u0, long u1) {
    for (long u = u0; u < u1; ++u) {
      softmax(u / M, static_cast<int>(u % M));
    }
  });
  const int sum_blocks = (T + kSumTerms - 1) / kSumTerms;
  if (sum_blocks == 1) {
    parallel_ranges(groups * column_blocks, cost / column_blocks / 2, [&](long u0, long u1) {
      for (long u = u0; u < u1; ++u) {
        const int c0 = static_cast<int>(u % column_blocks) * kValueColumns;
        values(u / column_blocks, c0, std::min(kValueColumns, Dv - c0));
      }
    });
    return;
  }
  // partials[((gi * sum_blocks + s) * M + m) * Dv + c]: group gi's row m, column c, keys of block s
  static thread_local std::vector<float> partial_scratch;
  partial_scratch.resize(static_cast<size_t>(groups) * sum_blocks * M * Dv);
  float* partials = partial_scratch.data();
  const long units = groups * sum_blocks * column_blocks;
  parallel_ranges(units, cost / (sum_blocks * column_blocks) / 2, [&](long u0, long u1) {
    for (long u = u0; u < u1; ++u) {
      const int c0 = static_cast<int>(u % column_blocks) * kValueColumns, n = std::min(kValueColumns, Dv - c0);
      const long gs = u / column_blocks; // gi * sum_blocks + s
      const long gi = gs / sum_blocks;
      const int k0 = static_cast<int>(gs % sum_blocks) * kSumTerms;
      gemm_few_rows(false, M, n, std::min(kSumTerms, T - k0), p + gi * M * T + k0, T,
                    vp + gi / Hk * a.vs[0] + gi % Hk * a.vs[1] + k0 * ldv + c0, static_cast<int>(ldv),
                    partials + gs * M * Dv + c0, Dv);
    }
  });
  for (long gi = 0; gi < groups; ++gi) { // the partial sums added in order, to (B, L, H, Dv)
    for (int m = 0; m < M; ++m) {
      float* dst = op + ((gi / Hk * L + m % L) * H + gi % Hk * rep + m / L) * Dv;
      const float* first = partials + (gi * sum_blocks * M + m) * Dv;
      std::copy(first, first + Dv, dst);
      for (int s = 1; s < sum_blocks; ++s) {
        const float* part = partials + ((gi * sum_blocks + s) * M + m) * Dv;
        for (int c = 0; c < Dv; ++c) {
          dst[c] += part[c];
        }
      }
    }
  }
}

} // namespace

namespace {

// What a new position's head goes through before it is stored or attends: an RMS norm
// (where norm is set) and a rotation (where cos is: the position's rows of the tables), into dst.
struct HeadPrep {
  const float *norm, *cos, *sin;
  float eps;
  int half;             // rotated pairs (table columns)
  bool per_row;         // tables hold a row per (sequence, position), else per position
  bool traditional;
  int L;

  void operator()(const float* src, float* dst, int D, int b, int l) const {
    if (norm) {
      rms_norm_row(src, norm, dst, D, eps);
      src = dst;
    }
    if (cos) {
      const long row = per_row ? static_cast<long>(b) * L + l : l;
      rotate(src, cos + row * half, sin + row * half, dst, D, 2 * half, traditional);
    } else if (src != dst) {
      std::copy(src, src + D, dst);
    }
  }
};

// The rotation's tables from in[next] (cos) and in[next + 1] (sin) where rotary, no norm.
HeadPrep rotation(const std::vector<mx::array>& in, size_t next, bool rotary, bool traditional, float eps, int L) {
  HeadPrep prep{nullptr, nullptr, nullptr, eps, 0, false, traditional, L};
  if (rotary) {
    prep.cos = in[next].data<float>(), prep.sin = in[next + 1].data<float>();
    prep.half = in[next].shape(1), prep.per_row = in[next].shape(0) != L;
  }
  return prep;
}

// Whether rows of x (B, L, n) are read in place: their entries contiguous.
bool heads_in_place(const mx::array& x) {
  return x.shape(2) <= 1 || x.strides()[2] == 1;
}

// Where storage (B, H, S, D) holds (b, h, slot): its strides, any view whose last axis is contiguous.
inline int64_t slot_at(const mx::array& storage, int b, int h, int slot) {
  const auto& st = storage.strides();
  return b * st[0] + h * st[1] + slot * st[2];
}

bool storage_in_place(const mx::array& x) {
  return x.shape(3) <= 1 || x.strides()[3] == 1;
}

// The heads of q, k or v in a projection's rows: position (b, l)'s first head at
// data + b * sb + l * sl, heads D apart.
struct Heads {
  const float* data;
  int64_t sb, sl;
};

// Stores the H heads (D each) of each new position, prepared, at slots slot.. of storage
// (float32, or float16 with each entry rounded as astype(float16) rounds it).
void write_heads(const Heads& x, int B, int L, int H, int D, mx::array& storage, int slot, const HeadPrep& prep) {
  const bool halves = storage.dtype() == mx::float16;
  std::vector<float> head(halves ? D : 0);
  for (int b = 0; b < B; ++b) {
    for (int l = 0; l < L; ++l) {
      const float* row = x.data + b * x.sb + l * x.sl;
      for (int h = 0; h < H; ++h) {
        const int64_t at = slot_at(storage, b, h, slot + l);
        if (!halves) {
          prep(row + h * D, storage.data<float>() + at, D, b, l);
          continue;
        }
        prep(row + h * D, head.data(), D, b, l);
        uint16_t* dst = storage.data<uint16_t>() + at;
        for (int i = 0; i < D; ++i) {
          dst[i] = float_to_half(head[i]);
        }
      }
    }
  }
}

class AttentionStep : public mx::Primitive {
 public:
  AttentionStep(mx::Stream s, int projections, int n_heads, int slot, float scale, bool causal, bool masked,
                bool rotary, bool traditional, bool normed, float eps)
      : mx::Primitive(s), projections_(projections), n_heads_(n_heads), slot_(slot), scale_(scale), causal_(causal),
        masked_(masked), rotary_(rotary), traditional_(traditional), normed_(normed), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[AttentionStep] has no GPU implementation");
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto &q = inputs[0], &keys = inputs[projections_], &values = inputs[projections_ + 1];
    return {{q.shape(0), q.shape(1), n_heads_ * values.shape(3)}, keys.shape(), values.shape()};
  }
  const char* name() const override { return "AttentionStep"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AttentionStep&>(other);
    return projections_ == o.projections_ && n_heads_ == o.n_heads_ && slot_ == o.slot_ && scale_ == o.scale_ &&
           causal_ == o.causal_ && masked_ == o.masked_ && rotary_ == o.rotary_ && traditional_ == o.traditional_ &&
           normed_ == o.normed_ && eps_ == o.eps_;
  }

 private:
  int projections_, n_heads_, slot_;
  float scale_;
  bool causal_, masked_, rotary_, traditional_, normed_;
  float eps_;
};

} // namespace

std::vector<mx::array> attention_step(const std::vector<mx::array>& projections, int n_heads, const mx::array& keys,
                                      const mx::array& values, int slot, float scale, bool causal,
                                      const std::optional<mx::array>& mask, const std::optional<mx::array>& cos,
                                      const std::optional<mx::array>& sin, bool traditional,
                                      const std::optional<mx::array>& q_norm, const std::optional<mx::array>& k_norm,
                                      float eps, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "attention_step");
  if ((projections.size() != 1 && projections.size() != 3) || keys.ndim() != 4 || values.ndim() != 4) {
    throw std::invalid_argument("[attention_step] takes one projection [q | k | v] or three (q, k, v), each "
                                "(B, L, n), and storage keys (B, H_kv, S, D), values (B, H_kv, S, Dv)");
  }
  if ((keys.dtype() != mx::float32 && keys.dtype() != mx::float16) || values.dtype() != keys.dtype()) {
    throw std::invalid_argument("[attention_step] keys and values must both be float32 or both float16");
  }
  const auto& q = projections[0];
  const int B = keys.shape(0), Hk = keys.shape(1), S = keys.shape(2), D = keys.shape(3), Dv = values.shape(3);
  const int L = q.ndim() == 3 ? q.shape(1) : 0, H = n_heads;
  const int64_t widths[3] = {static_cast<int64_t>(H) * D, static_cast<int64_t>(Hk) * D, static_cast<int64_t>(Hk) * Dv};
  bool shapes_ok = H > 0 && Hk > 0 && D > 0 && Dv > 0 && L > 0 && values.shape(0) == B && values.shape(1) == Hk &&
                   values.shape(2) == S;
  for (size_t i = 0; i < projections.size() && shapes_ok; ++i) {
    const auto& p = projections[i];
    const int64_t width = projections.size() == 1 ? widths[0] + widths[1] + widths[2] : widths[i];
    shapes_ok = p.ndim() == 3 && p.shape(0) == B && p.shape(1) == L && p.shape(2) == width;
  }
  if (!shapes_ok) {
    throw std::invalid_argument("[attention_step] the projections must be (B, L, n_heads * D), (B, L, H_kv * D), "
                                "(B, L, H_kv * Dv), or those side by side, for keys (B, H_kv, S, D) and values "
                                "(B, H_kv, S, Dv)");
  }
  if (H % Hk || static_cast<long>(H / Hk) * L > kFewRows) {
    throw std::invalid_argument("[attention_step] needs n_heads a multiple of H_kv and at most " +
                                std::to_string(kFewRows) + " queries per kv head (n_heads / H_kv * L)");
  }
  if (slot < 0 || static_cast<long>(slot) + L > S) {
    throw std::invalid_argument("[attention_step] slots [slot, slot + L) must lie in the storage's S");
  }
  if (q_norm.has_value() != k_norm.has_value()) {
    throw std::invalid_argument("[attention_step] q_norm and k_norm come together");
  }
  std::vector<mx::array> inputs;
  for (const auto& p : projections) {
    inputs.push_back(mx::astype(p, mx::float32, stream));
  }
  inputs.push_back(keys);
  inputs.push_back(values);
  if (mask) {
    if (causal || !keep_mask_fits(*mask, B, L, slot + L)) {
      throw std::invalid_argument("[attention_step] mask must be (L, slot + L) or (B, L, slot + L), and not causal");
    }
    inputs.push_back(mx::astype(*mask, mx::bool_, stream));
  }
  if (cos.has_value() != sin.has_value()) {
    throw std::invalid_argument("[attention_step] cos and sin come together");
  }
  if (cos) {
    if (cos->ndim() != 2 || cos->shape() != sin->shape() ||
        (cos->shape(0) != L && static_cast<int64_t>(cos->shape(0)) != static_cast<int64_t>(B) * L) ||
        2 * static_cast<int64_t>(cos->shape(1)) > D) {
      throw std::invalid_argument("[attention_step] cos/sin must be (L or B * L, dims / 2) with dims <= D");
    }
    inputs.push_back(mx::astype(*cos, mx::float32, stream));
    inputs.push_back(mx::astype(*sin, mx::float32, stream));
  }
  for (const auto* norm : {&q_norm, &k_norm}) {
    if (*norm) {
      if ((*norm)->ndim() != 1 || (*norm)->shape(0) != D) {
        throw std::invalid_argument("[attention_step] the norms' weights must be (D,)");
      }
      inputs.push_back(mx::astype(**norm, mx::float32, stream));
    }
  }
  return mx::array::make_arrays({{B, L, H * Dv}, keys.shape(), values.shape()}, {mx::float32, keys.dtype(), values.dtype()},
                                std::make_shared<AttentionStep>(stream, static_cast<int>(projections.size()), H, slot,
                                                                scale, causal, mask.has_value(), cos.has_value(),
                                                                traditional, q_norm.has_value(), eps),
                                inputs);
}

void AttentionStep::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  const int P = projections_;
  // MLX gives each output of a primitive its own copy of the inputs, so the storage would
  // look held three times and never be written in place: the other outputs' copies go now
  // (MLX drops every output's inputs once this returns; `inputs` is the one evaluated).
  for (auto& o : outputs) {
    if (&o.inputs() != &inputs) {
      o.inputs().clear();
    }
  }
  // The storage's buffers become the outputs' when nothing else holds them (the cache
  // replaced them by these outputs): the new slots are written in place, as MLX's
  // slice_update does. Otherwise the outputs are copies. (Checked before any reference to
  // them is taken here.)
  for (int i = 0; i < 2; ++i) {
    const auto& old = inputs[P + i];
    auto& stored = outputs[1 + i];
    enc.set_input_array(old);
    if (old.is_donatable() && storage_in_place(old)) {
      stored.copy_shared_buffer(old);
    } else {
      stored.set_data(mx::allocator::malloc(stored.nbytes()));
      dispatch_gather(enc, old, stored);
    }
  }
  outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
  std::vector<mx::array> in;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (i == static_cast<size_t>(P) || i == static_cast<size_t>(P) + 1) {
      in.push_back(outputs[i - P + 1]); // the storage is written and read through the outputs
      continue;
    }
    const auto& a = inputs[i];
    enc.set_input_array(a);
    const bool in_place = i < static_cast<size_t>(P) ? heads_in_place(a) : a.flags().row_contiguous;
    in.push_back(in_place ? a : gathered(enc, a));
  }
  for (auto& o : outputs) {
    enc.set_output_array(o);
  }
  enc.dispatch([in = std::move(in), out = outputs[0], P, H = n_heads_, slot = slot_, scale = scale_, causal = causal_,
                masked = masked_, rotary = rotary_, traditional = traditional_, normed = normed_,
                eps = eps_]() mutable {
    auto &keys = in[P], &values = in[P + 1];
    const int B = keys.shape(0), Hk = keys.shape(1), D = keys.shape(3), Dv = values.shape(3);
    const int L = in[0].shape(1), T = slot + L;
    // q, k and v: the columns [q | k | v] of one projection, or three
    auto heads = [&](int which) {
      const auto& p = in[P == 1 ? 0 : which];
      const int64_t column = P == 1 ? (which == 0 ? 0 : which == 1 ? H * D : (H + Hk) * D) : 0;
      return Heads{p.data<float>() + column, p.strides()[0], p.strides()[1]};
    };
    size_t next = P + 2;
    const bool* keep = masked ? in[next].data<bool>() : nullptr;
    const bool keep_per_row = masked && in[next].ndim() == 3;
    next += masked;
    HeadPrep q_prep = rotation(in, next, rotary, traditional, eps, L), k_prep = q_prep;
    const HeadPrep plain{nullptr, nullptr, nullptr, eps, 0, false, traditional, L};
    if (normed) {
      q_prep.norm = in[next + 2 * rotary].data<float>();
      k_prep.norm = in[next + 2 * rotary + 1].data<float>();
    }
    write_heads(heads(1), B, L, Hk, D, keys, slot, k_prep);
    write_heads(heads(2), B, L, Hk, Dv, values, slot, plain);
    // The queries normalized and rotated, as (B, H, L, D).
    static thread_local std::vector<float> query_scratch;
    query_scratch.resize(static_cast<size_t>(B) * H * L * D);
    float* queries = query_scratch.data();
    const Heads q = heads(0);
    for (int b = 0; b < B; ++b) {
      for (int l = 0; l < L; ++l) {
        const float* row = q.data + b * q.sb + l * q.sl;
        for (int h = 0; h < H; ++h) {
          q_prep(row + h * D, queries + ((static_cast<long>(b) * H + h) * L + l) * D, D, b, l);
        }
      }
    }
    const auto &ks = keys.strides(), &vs = values.strides();
    const std::array<int64_t, 3> qs = {static_cast<int64_t>(H) * L * D, static_cast<int64_t>(L) * D, D};
    const int64_t ldk = keys.shape(2) > 1 ? ks[2] : D, ldv = values.shape(2) > 1 ? vs[2] : Dv;
    if (keys.dtype() == mx::float16) {
      attend<uint16_t>({queries, keys.data<uint16_t>(), values.data<uint16_t>(), qs, {ks[0], ks[1]}, {vs[0], vs[1]},
                        ldk, ldv, B, H, L, D, Hk, T, Dv, keep, keep_per_row, scale, causal, out.data<float>()});
    } else {
      attend<float>({queries, keys.data<float>(), values.data<float>(), qs, {ks[0], ks[1]}, {vs[0], vs[1]}, ldk, ldv,
                     B, H, L, D, Hk, T, Dv, keep, keep_per_row, scale, causal, out.data<float>()});
    }
  });
}

} // namespace mlxllm_cpu
