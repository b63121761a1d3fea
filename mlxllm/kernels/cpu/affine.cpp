// MLX's affine quantized layout on the CPU: w = scale * q + bias per group of 32
// weights along a row, q packed LSB-first at `bits` bits each (1-6 or 8, as MLX allows),
// scales and biases float32. This is what mlxllm's loader makes of Q4_0/Q4_1/Q4_K/Q5_*/Q8_0
// and of every widened packed type; MLX's own CPU quantized_matmul reads it at
// ~1 Gweight/s, compute bound, and its dequantize at 0.1-0.75 Gweight/s.
//
// matvec: y = x @ W.T for a few rows of x (decode). x is rearranged once per call so that
// the codes of 8 lanes of packed data line up with 8 contiguous x values:
//  - bits 1, 2, 4, 8: lane l is 32-bit word l of an 8-word "superblock", code n of the
//    lane is (word >> bits*n) & mask: one shift for all lanes, no shuffles.
//  - bits 3, 5, 6: lane l is the l-th run of 8 codes (bits bytes); its codes 0-3 come
//    from the 32-bit word at that byte, codes 4-7 from the word half a run later.
// Partial dot products are scaled once per superblock; the bias term is
// sum_g bias[g] * (sum of x over group g), from per-group sums of x.
#include <algorithm>
#include <limits>
#include <stdexcept>
#include <vector>

#include "ops.h"
#include "pool.h"
#include "simd.h"

namespace mlxllm_cpu {
namespace {

constexpr int GROUP = 32;

template <int BITS>
struct Packing {
  static constexpr bool kWordLanes = (BITS & (BITS - 1)) == 0; // 1, 2, 4, 8
  static constexpr int kCodesPerLane = kWordLanes ? 32 / BITS : 8;
  static constexpr int kCodes = 8 * kCodesPerLane; // codes per superblock
  static constexpr int kBytes = kCodes * BITS / 8; // bytes per superblock
  static constexpr uint32_t kMask = (1u << BITS) - 1;
};

// The 8 lanes of code n of a superblock, as floats.
template <int BITS>
struct Lanes {
  u32x8 lo, hi;

  explicit Lanes(const uint8_t* p) {
    if constexpr (Packing<BITS>::kWordLanes) {
      lo = load<u32x8>(p);
    } else {
      for (int l = 0; l < 8; ++l) {
        lo[l] = load<uint32_t>(p + l * BITS);
        hi[l] = load<uint32_t>(p + l * BITS + (4 * BITS) / 8);
      }
      hi >>= (4 * BITS) % 8;
    }
  }

  template <int N>
  f32x8 code() const {
    constexpr uint32_t mask = Packing<BITS>::kMask;
    if constexpr (Packing<BITS>::kWordLanes || N < 4) {
      return __builtin_convertvector((i32x8)((lo >> (BITS * N)) & mask), f32x8);
    } else {
      return __builtin_convertvector((i32x8)((hi >> (BITS * (N - 4))) & mask), f32x8);
    }
  }
};

// acc_lane += s_lane * sum_n code_n * x_n, for NB rows of x.
template <int BITS, int NB, int N = 0>
inline void dot_codes(const Lanes<BITS>& v, const float* xk, long xstride, f32x8 (&t)[NB][2]) {
  if constexpr (N < Packing<BITS>::kCodesPerLane) {
    const f32x8 q = v.template code<N>();
    for (int b = 0; b < NB; ++b) {
      t[b][N & 1] += q * load<f32x8>(xk + b * xstride + N * 8);
    }
    dot_codes<BITS, NB, N + 1>(v, xk, xstride, t);
  }
}

struct MatvecArgs {
  const float* xp; // (B, Ip): x rearranged into superblock lane order, zero padded
  const float* xs; // (B, G): per-group sums of x
  const uint8_t* w;
  const float* scales;
  const float* biases;
  float* y; // (B, O)
  int I, Ip, O, G;
  long row_bytes;
};

template <int BITS, int NB>
void matvec_rows(const MatvecArgs& a, int b0, int r0, int r1) {
  using P = Packing<BITS>;
  const int full = a.I / P::kCodes; // whole superblocks per row
  const bool partial = a.I % P::kCodes != 0;
  // Bits 3/5/6 read 32-bit words up to 2 bytes past a superblock: a row's last one
  // goes through a padded copy so the final row never reads past the buffer.
  const int direct = (P::kWordLanes || partial) ? full : full - 1;
  const float* xp = a.xp + static_cast<long>(b0) * a.Ip;
  const float* xs = a.xs + static_cast<long>(b0) * a.G;
  for (int o = r0; o < r1; ++o) {
    const uint8_t* row = a.w + o * a.row_bytes;
    const float* sr = a.scales + static_cast<long>(o) * a.G;
    const float* br = a.biases + static_cast<long>(o) * a.G;
    f32x8 acc[NB][2] = {};
    auto superblock = [&](const uint8_t* codes, int k) {
      f32x8 s;
      for (int l = 0; l < 8; ++l) {
        const int g = (k * P::kCodes + l * P::kCodesPerLane) / GROUP;
        s[l] = g < a.G ? sr[g] : 0.f;
      }
      f32x8 t[NB][2] = {};
      dot_codes<BITS, NB>(Lanes<BITS>(codes), xp + k * P::kCodes, a.Ip, t);
      for (int b = 0; b < NB; ++b) {
        acc[b][0] += s * t[b][0];
        acc[b][1] += s * t[b][1];
      }
    };
    for (int k = 0; k < direct; ++k) {
      prefetch_ahead(row + k * P::kBytes, P::kBytes);
      superblock(row + k * P::kBytes, k);
    }
    for (int k = direct; k * P::kCodes < a.I; ++k) {
      alignas(32) uint8_t buf[P::kBytes + 8] = {};
      const long at = static_cast<long>(k) * P::kBytes;
      std::memcpy(buf, row + at, std::min<long>(P::kBytes, a.row_bytes - at));
      superblock(buf, k);
    }
    for (int b = 0; b < NB; ++b) {
      f32x8 bias = {};
      int g = 0;
      for (; g + 8 <= a.G; g += 8) {
        bias += load<f32x8>(br + g) * load<f32x8>(xs + b * a.G + g);
      }
      float r = hsum(acc[b][0] + acc[b][1] + bias);
      for (; g < a.G; ++g) {
        r += br[g] * xs[b * a.G + g];
      }
      a.y[static_cast<long>(b0 + b) * a.O + o] = r;
    }
  }
}

using RowsFn = void (*)(const MatvecArgs&, int, int, int);

template <int BITS>
RowsFn rows_fn(int nb) {
  switch (nb) {
    case 1: return matvec_rows<BITS, 1>;
    case 2: return matvec_rows<BITS, 2>;
    case 3: return matvec_rows<BITS, 3>;
    default: return matvec_rows<BITS, 4>;
  }
}

RowsFn rows_fn(int bits, int nb) {
  switch (bits) {
    case 1: return rows_fn<1>(nb);
    case 2: return rows_fn<2>(nb);
    case 3: return rows_fn<3>(nb);
    case 4: return rows_fn<4>(nb);
    case 5: return rows_fn<5>(nb);
    case 6: return rows_fn<6>(nb);
    default: return rows_fn<8>(nb);
  }
}

int codes_per_lane(int bits) {
  return (bits & (bits - 1)) == 0 ? 32 / bits : 8;
}

// Rows of x per pass over a weight row: 4 accumulate in registers; more rows take more
// passes over rows that are then in cache.
constexpr int MAX_ROWS_PER_PASS = 4;

// x rearranged for the superblock lanes (xp, B x Ip, zero padded) and its per-group sums
// (xs, B x G): computed once per call, read for every weight row.
struct PreparedX {
  std::vector<float> xp, xs;
  int Ip, G;

  PreparedX(const float* x, int B, int I, int bits) {
    const int N = codes_per_lane(bits), SB = 8 * N;
    G = I / GROUP;
    Ip = (I + SB - 1) / SB * SB;
    xp.assign(static_cast<size_t>(B) * Ip, 0.f);
    xs.resize(static_cast<size_t>(B) * G);
    for (int b = 0; b < B; ++b) {
      const float* xb = x + static_cast<long>(b) * I;
      float* pb = xp.data() + static_cast<long>(b) * Ip;
      for (int i = 0; i < I; ++i) { // code i sits in lane (i % SB) / N as its code (i % N)
        const int k = i / SB, l = (i % SB) / N, n = i % N;
        pb[k * SB + n * 8 + l] = xb[i];
      }
      for (int g = 0; g < G; ++g) {
        float s = 0.f;
        for (int j = 0; j < GROUP; ++j) {
          s += xb[g * GROUP + j];
        }
        xs[static_cast<long>(b) * G + g] = s;
      }
    }
  }
};

void matvec(const float* x, const uint8_t* w, const float* scales, const float* biases, float* y,
            int B, int I, int O, int bits) {
  const PreparedX px(x, B, I, bits);
  const MatvecArgs a{px.xp.data(), px.xs.data(), w, scales, biases, y, I, px.Ip, O, px.G,
                     static_cast<long>(I) * bits / 8};
  parallel_ranges(O, a.row_bytes * B, [&](long r0, long r1) {
    for (int b0 = 0; b0 < B; b0 += MAX_ROWS_PER_PASS) {
      const int nb = std::min(MAX_ROWS_PER_PASS, B - b0);
      rows_fn(bits, nb)(a, b0, static_cast<int>(r0), static_cast<int>(r1));
    }
  });
}

// y[n, j] = x[n] @ W[e].T for e = indices[n, j]: experts read where they lie in the stacked
// weight (E, O, in), only the chosen ones. The output rows of all (n, j) form one range that
// the threads split, so a decode step's k experts keep every thread busy.
void gather_matvec(const float* x, const uint8_t* w, const float* scales, const float* biases,
                   const uint32_t* indices, float* y, int N, int k, int I, int O, int E, int bits) {
  const PreparedX px(x, N, I, bits);
  const long row_bytes = static_cast<long>(I) * bits / 8;
  const RowsFn rows = rows_fn(bits, 1);
  parallel_ranges(static_cast<long>(N) * k * O, row_bytes, [&](long r0, long r1) {
    for (long u = r0; u < r1;) {
      const long slot = u / O; // (n, j) = (slot / k, slot % k)
      const int o0 = static_cast<int>(u % O);
      const int o1 = static_cast<int>(std::min<long>(O, o0 + (r1 - u)));
      const long n = slot / k;
      const uint32_t e = indices[slot];
      float* out = y + slot * O;
      if (e >= static_cast<uint32_t>(E)) { // no such expert: a visible NaN, never a stray read
        std::fill(out + o0, out + o1, std::numeric_limits<float>::quiet_NaN());
      } else {
        const long at = static_cast<long>(e) * O;
        const MatvecArgs a{px.xp.data() + n * px.Ip, px.xs.data() + n * px.G, w + at * row_bytes,
                           scales + at * px.G, biases + at * px.G, out, I, px.Ip, O, px.G, row_bytes};
        rows(a, 0, o0, o1);
      }
      u += o1 - o0;
    }
  });
}

// dequantize (prefill, next to a GEMM that costs ~10x more): 8 consecutive codes at a
// time, as lanes of one vector shifted by per-lane amounts (codes 0-3 from the 32-bit word
// at their first byte, 4-7 from the word half a run later, as in Lanes). Each group's
// 4*bits bytes are copied out first, so no read leaves the buffer.
// scale * q + bias is rounded twice, never fused, exactly as mx.dequantize and gguf-py's
// dequantizers compute it: the widened GGUF types are bit-exact only that way.
#if defined(__clang__)
#define MLXLLM_NO_FP_CONTRACT _Pragma("clang fp contract(off)")
#else
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#define MLXLLM_NO_FP_CONTRACT
#endif
template <int BITS>
void dequantize_rows(const uint8_t* w, const float* scales, const float* biases, float* out,
                     int I, int r0, int r1) {
  MLXLLM_NO_FP_CONTRACT
  constexpr uint32_t B = BITS;
  constexpr u32x8 shifts = {0, B, 2 * B, 3 * B, 0, B, 2 * B, 3 * B};
  const int G = I / GROUP;
  const long row_bytes = static_cast<long>(I) * BITS / 8;
  for (int o = r0; o < r1; ++o) {
    for (int g = 0; g < G; ++g) {
      uint8_t buf[4 * BITS + 8] = {};
      std::memcpy(buf, w + o * row_bytes + g * 4 * BITS, 4 * BITS);
      const f32x8 s = splat(scales[static_cast<long>(o) * G + g]);
      const f32x8 bias = splat(biases[static_cast<long>(o) * G + g]);
      float* dst = out + static_cast<long>(o) * I + g * GROUP;
      for (int j = 0; j < 4; ++j) { // codes 8j..8j+7 start at byte j * BITS
        const uint8_t* p = buf + j * BITS;
        const uint32_t lo = load<uint32_t>(p);
        const uint32_t hi = load<uint32_t>(p + (4 * BITS) / 8) >> ((4 * BITS) % 8);
        const u32x8 v = u32x8{lo, lo, lo, lo, hi, hi, hi, hi} >> shifts;
        const f32x8 q = __builtin_convertvector((i32x8)(v & Packing<BITS>::kMask), f32x8);
        const f32x8 scaled = s * q;
        store(dst + 8 * j, scaled + bias);
      }
    }
  }
}
#if !defined(__clang__)
#pragma GCC pop_options
#endif

void dequantize(const uint8_t* w, const float* scales, const float* biases, float* out, int I, int O, int bits) {
  using Fn = void (*)(const uint8_t*, const float*, const float*, float*, int, int, int);
  static constexpr Fn fns[] = {nullptr, dequantize_rows<1>, dequantize_rows<2>, dequantize_rows<3>,
                               dequantize_rows<4>, dequantize_rows<5>, dequantize_rows<6>,
                               nullptr, dequantize_rows<8>};
  parallel_ranges(O, static_cast<long>(I) * 4, [&](long r0, long r1) {
    fns[bits](w, scales, biases, out, I, static_cast<int>(r0), static_cast<int>(r1));
  });
}

// W's layout checked: `ndim` 2 (out, ...) or 3 (experts, out, ...), scales and biases
// float32 with W's leading dimensions and one entry per 32-weight group.
void check_layout(const mx::array& w, const mx::array& scales, const mx::array& biases, int bits, const char* op,
                  int ndim = 2) {
  const std::string where = std::string("[") + op + "] ";
  if (bits < 1 || bits > 8 || bits == 7) {
    throw std::invalid_argument(where + "bits must be 1-6 or 8, as in MLX");
  }
  if (w.ndim() != ndim || w.dtype() != mx::uint32) {
    throw std::invalid_argument(where + "w must be a " + std::to_string(ndim) + "-D uint32 array");
  }
  // 64-bit: a row of 2^31 / 32 words already overflows an int once counted in bits
  const int64_t in_bits = static_cast<int64_t>(w.shape(-1)) * 32;
  if (in_bits == 0 || in_bits % bits || (in_bits / bits) % GROUP || in_bits / bits > std::numeric_limits<int>::max()) {
    throw std::invalid_argument(where + "rows must hold a whole, nonzero number of 32-weight groups");
  }
  const int I = static_cast<int>(in_bits / bits);
  for (const auto* a : {&scales, &biases}) {
    bool ok = a->dtype() == mx::float32 && a->ndim() == ndim && a->shape(-1) == I / GROUP;
    for (int d = 0; ok && d < ndim - 1; ++d) {
      ok = a->shape(d) == w.shape(d);
    }
    if (!ok) {
      throw std::invalid_argument(where + "scales and biases must be float32 (..., rows, in/32) beside w");
    }
  }
}

} // namespace

mx::array affine_matvec(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                        int bits, mx::StreamOrDevice s) {
  check_layout(w, scales, biases, bits, "affine_matvec");
  const int I = w.shape(1) * 32 / bits;
  if (x.ndim() < 1 || x.shape(-1) != I) {
    throw std::invalid_argument("[affine_matvec] x's last dimension must be " + std::to_string(I));
  }
  auto stream = cpu_stream(s, "affine_matvec");
  auto shape = x.shape();
  shape.back() = w.shape(0);
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream), mx::astype(w, mx::uint32, stream),
                                   mx::astype(scales, mx::float32, stream), mx::astype(biases, mx::float32, stream)};
  return mx::array(std::move(shape), mx::float32, std::make_shared<AffineMatvec>(stream, bits), std::move(inputs));
}

void AffineMatvec::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto e = begin_eval(stream(), inputs, out);
  const auto &x = e.inputs[0], &w = e.inputs[1], &sc = e.inputs[2], &bi = e.inputs[3];
  const int I = x.shape(-1), O = w.shape(0);
  const int B = static_cast<int>(x.size() / I);
  e.encoder.dispatch([xp = x.data<float>(), wp = reinterpret_cast<const uint8_t*>(w.data<uint32_t>()),
                sp = sc.data<float>(), bp = bi.data<float>(), yp = out.data<float>(), B, I, O, bits = bits_]() {
    matvec(xp, wp, sp, bp, yp, B, I, O, bits);
  });
}

std::vector<mx::Shape> AffineMatvec::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

mx::array affine_gather_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                               const mx::array& biases, const mx::array& indices, int bits, mx::StreamOrDevice s) {
  const char* op = "affine_gather_matvec";
  check_layout(w, scales, biases, bits, op, 3);
  const int O = w.shape(1);
  const int I = w.shape(2) * 32 / bits;
  if (x.ndim() != 2 || x.shape(1) != I) {
    throw std::invalid_argument("[affine_gather_matvec] x must be (rows, " + std::to_string(I) + ")");
  }
  if (indices.ndim() != 2 || indices.shape(0) != x.shape(0) || !mx::issubdtype(indices.dtype(), mx::integer)) {
    throw std::invalid_argument("[affine_gather_matvec] indices must be integers (rows, k)");
  }
  auto stream = cpu_stream(s, op);
  mx::Shape shape = {x.shape(0), indices.shape(1), O};
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream), w, scales, biases,
                                   mx::astype(indices, mx::uint32, stream)};
  return mx::array(std::move(shape), mx::float32, std::make_shared<AffineGatherMatvec>(stream, bits),
                   std::move(inputs));
}

void AffineGatherMatvec::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto e = begin_eval(stream(), inputs, out);
  const auto &x = e.inputs[0], &w = e.inputs[1], &sc = e.inputs[2], &bi = e.inputs[3], &idx = e.inputs[4];
  e.encoder.dispatch([xp = x.data<float>(), wp = reinterpret_cast<const uint8_t*>(w.data<uint32_t>()),
                      sp = sc.data<float>(), bp = bi.data<float>(), ip = idx.data<uint32_t>(), yp = out.data<float>(),
                      N = x.shape(0), k = idx.shape(1), I = x.shape(1), O = w.shape(1), E = w.shape(0),
                      bits = bits_]() { gather_matvec(xp, wp, sp, bp, ip, yp, N, k, I, O, E, bits); });
}

std::vector<mx::Shape> AffineGatherMatvec::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[4].shape(1), inputs[1].shape(1)}};
}

mx::array affine_dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases, int bits,
                            mx::StreamOrDevice s) {
  check_layout(w, scales, biases, bits, "affine_dequantize");
  auto stream = cpu_stream(s, "affine_dequantize");
  mx::Shape shape = {w.shape(0), w.shape(1) * 32 / bits};
  std::vector<mx::array> inputs = {mx::astype(w, mx::uint32, stream), mx::astype(scales, mx::float32, stream),
                                   mx::astype(biases, mx::float32, stream)};
  return mx::array(std::move(shape), mx::float32, std::make_shared<AffineDequantize>(stream, bits), std::move(inputs));
}

void AffineDequantize::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto e = begin_eval(stream(), inputs, out);
  const auto &w = e.inputs[0], &sc = e.inputs[1], &bi = e.inputs[2];
  e.encoder.dispatch([wp = reinterpret_cast<const uint8_t*>(w.data<uint32_t>()), sp = sc.data<float>(),
                bp = bi.data<float>(), op = out.data<float>(), I = out.shape(1), O = out.shape(0), bits = bits_]() {
    dequantize(wp, sp, bp, op, I, O, bits);
  });
}

std::vector<mx::Shape> AffineDequantize::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[0].shape(1) * 32 / bits_}};
}

} // namespace mlxllm_cpu
