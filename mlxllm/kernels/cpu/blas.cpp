// Float32 GEMM for the CPU kernels, independent of the BLAS MLX itself links.
//
// The mlx-cpu wheel links netlib's reference BLAS, and which `cblas_sgemm` MLX's matmul
// calls is fixed by the dynamic linker when mlx.core loads: a program that imports
// mlx.core before anything can preload an optimized BLAS runs every matmul ~40x slower.
// Our products (prefill's weight GEMMs, attention's score and value products) therefore
// call a BLAS this module binds itself, at run time, with dlopen(RTLD_LOCAL): by default
// the OpenBLAS that the scipy-openblas32 wheel ships (symbols prefixed `scipy_`), else a
// system OpenBLAS/MKL. Its symbols never enter the global namespace, so MLX keeps its own.
// Without any, a threaded blocked kernel of ours runs (several times slower than OpenBLAS,
// still far faster than the reference BLAS); Python says so once.
#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "ops.h"
#include "pool.h"
#include "simd.h"

namespace mlxllm_cpu {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                         int);
using SetThreadsFn = void (*)(int);

SgemmFn g_sgemm = nullptr;
SetThreadsFn g_set_threads = nullptr;
std::string g_library;

// C (M, N) = A (M, K) @ B.T for B (N, K), rows of A, B, C `lda`, `ldb`, `ldc` apart: our
// own kernel where no BLAS is bound, on the calling thread. 4 rows of A against 2 rows of
// B per step, 8 lanes of K at a time.
void fallback_gemm_nt(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  {
    for (long mb = 0; mb < M; mb += 4) {
      const int rows = static_cast<int>(std::min<long>(4, M - mb));
      for (int n = 0; n < N; n += 2) {
        const int cols = std::min(2, N - n);
        f32x8 acc[4][2] = {};
        int k = 0;
        for (; k + 8 <= K; k += 8) {
          f32x8 b[2];
          for (int c = 0; c < 2; ++c) {
            b[c] = load<f32x8>(B + static_cast<long>(n + (c < cols ? c : 0)) * ldb + k);
          }
          for (int r = 0; r < 4; ++r) {
            const f32x8 a = load<f32x8>(A + (mb + (r < rows ? r : 0)) * lda + k);
            acc[r][0] += a * b[0];
            acc[r][1] += a * b[1];
          }
        }
        for (int r = 0; r < rows; ++r) {
          for (int c = 0; c < cols; ++c) {
            float s = hsum(acc[r][c]);
            for (int kk = k; kk < K; ++kk) {
              s += A[(mb + r) * lda + kk] * B[static_cast<long>(n + c) * ldb + kk];
            }
            C[(mb + r) * ldc + n + c] = s;
          }
        }
      }
    }
  }
}

} // namespace

bool bind_blas(const std::string& path, const std::string& prefix) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    return false;
  }
  auto sgemm = reinterpret_cast<SgemmFn>(dlsym(lib, (prefix + "cblas_sgemm").c_str()));
  if (sgemm == nullptr) {
    dlclose(lib);
    return false;
  }
  // One BLAS thread: our pool splits every product (see gemm), so a core that another
  // process takes costs its share of chunks, never a stall of BLAS's fixed partition.
  g_set_threads = reinterpret_cast<SetThreadsFn>(dlsym(lib, (prefix + "openblas_set_num_threads").c_str()));
  if (g_set_threads != nullptr) {
    g_set_threads(1);
  }
  g_sgemm = sgemm;
  g_library = path;
  return true;
}

std::string blas_library() {
  return g_library;
}

void set_blas_threads(int n) {
  if (g_set_threads != nullptr) {
    g_set_threads(n);
  }
}

namespace {

constexpr int kFewRowsSide = 256; // products of at most kFewRows rows with a side this short (a head's dimension) skip BLAS

// C[m][0:8V] = sum_k A[m][k] * B[k][0:8V] for M rows, V vectors of columns at once: each of
// B's rows read once for all of them (a whole cache line of a float16 cache's values, where
// 8 columns at a time had read it in pieces, once per piece), each A[m][k] broadcast once
// for its V vectors. Summed kSumTerms terms at a time, the partial sums then added in order.
// Not Full: one vector of only the first w < 8 columns.
template <int M, int V, bool Full, class TB>
inline void rows_times_columns(int K, const float* A, int lda, const TB* B, int ldb, float* C, int ldc, int w = 8 * V) {
  f32x8 acc[M][V];
  for (int k0 = 0; k0 < K; k0 += kSumTerms) {
    f32x8 part[M][V];
    for (auto& row : part) {
      for (auto& x : row) {
        x = splat(0.f);
      }
    }
    for (int k = k0; k < std::min(K, k0 + kSumTerms); ++k) {
      const TB* row = B + static_cast<long>(k) * ldb;
      prefetch_ahead(row, 8L * V * sizeof(TB)); // attention's values: a cache's rows, streamed
      f32x8 b[V];
      for (int v = 0; v < V; ++v) {
        if constexpr (Full) {
          b[v] = load8(row + 8 * v);
        } else {
          b[v] = splat(0.f);
          for (int j = 0; j < w; ++j) {
            b[v][j] = to_float(row[j]);
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        const float a = A[static_cast<long>(m) * lda + k];
        for (int v = 0; v < V; ++v) {
          part[m][v] += a * b[v];
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int v = 0; v < V; ++v) {
        acc[m][v] = k0 == 0 ? part[m][v] : acc[m][v] + part[m][v];
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    std::memcpy(C + static_cast<long>(m) * ldc, acc[m], sizeof(float) * w);
  }
}

// C (M, N) = A (M, K) @ B (K, N) (gemm_few_rows): as many columns at once as M's sums leave
// registers for, then 8, then the last w < 8 columns alone. Every column is summed in the
// same order whichever way (kSumTerms terms at a time, then the partial sums in order).
template <int M, class TB>
void rows_times(int N, int K, const float* A, int lda, const TB* B, int ldb, float* C, int ldc) {
  constexpr int V = M <= 3 ? 4 : (M <= 6 ? 2 : 1); // M * V accumulators: at most 12 of AVX2's 16 registers
  int n0 = 0;
  for (; n0 + 8 * V <= N; n0 += 8 * V) {
    rows_times_columns<M, V, true>(K, A, lda, B + n0, ldb, C + n0, ldc);
  }
  for (; n0 + 8 <= N; n0 += 8) {
    rows_times_columns<M, 1, true>(K, A, lda, B + n0, ldb, C + n0, ldc);
  }
  if (n0 < N) {
    rows_times_columns<M, 1, false>(K, A, lda, B + n0, ldb, C + n0, ldc, N - n0);
  }
}

// Lane j of the result: the sum of v[j]'s 8 lanes, added pairwise,
// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): AVX's hadd pattern, and the same
// sums in the same order without it.
inline f32x8 sum_lanes_each(const f32x8 (&v)[8]) {
#if defined(__AVX__)
  __m256 w[8];
  std::memcpy(w, v, sizeof(w));
  const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(w[0], w[1]), _mm256_hadd_ps(w[2], w[3]));
  const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(w[4], w[5]), _mm256_hadd_ps(w[6], w[7]));
  // lo: v0..v3's low-half sums, then their high-half sums; hi the same for v4..v7
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
  f32x8 out;
  std::memcpy(&out, &sums, sizeof(out));
  return out;
#else
  f32x8 out;
  for (int j = 0; j < 8; ++j) {
    out[j] = ((v[j][0] + v[j][1]) + (v[j][2] + v[j][3])) + ((v[j][4] + v[j][5]) + (v[j][6] + v[j][7]));
  }
  return out;
#endif
}

// C[m][n0:n0+w] = A[m] . B[n] for w <= 8 rows of B: 8 partial sums per output over K's
// multiple of 8, added by sum_lanes_each, then the tail in order. The same sums in the
// same order for a full group and for the last, shorter one.
template <bool Full, class TB>
inline void dots_of_8(int w, int K, const float* a, const TB* B, int ldb, float* c) {
  const int K8 = K / 8 * 8;
  f32x8 acc[8];
  for (auto& x : acc) {
    x = splat(0.f);
  }
  for (int k = 0; k < K8; k += 8) {
    const f32x8 av = load<f32x8>(a + k);
    for (int j = 0; j < (Full ? 8 : w); ++j) {
      acc[j] += av * load8(B + static_cast<long>(j) * ldb + k);
    }
  }
  f32x8 sums = sum_lanes_each(acc);
  for (int j = 0; j < w; ++j) {
    const TB* b = B + static_cast<long>(j) * ldb;
    for (int k = K8; k < K; ++k) {
      sums[j] += a[k] * to_float(b[k]);
    }
  }
  std::memcpy(c, &sums, sizeof(float) * w);
}

// C = A @ B.T (transpose_b) or A @ B for M <= kFewRows rows: a decode step's attention (a
// head group's queries against its keys, then its values), where BLAS's packing of the
// operands costs more than the product. Each output is summed in one order that depends on
// neither N nor the other rows, so a sequence's attention is the same alone or in a batch.
template <class TB>
void few_rows(bool transpose_b, int M, int N, int K, const float* A, int lda, const TB* B, int ldb, float* C, int ldc) {
  if (transpose_b) { // C[m][n] = A[m] . B[n], 8 rows of B at a time (in L1 for every row of A)
    for (int n0 = 0; n0 < N; n0 += 8) {
      const int w = std::min(8, N - n0);
      const TB* b = B + static_cast<long>(n0) * ldb;
      prefetch_ahead(b, static_cast<long>(w) * ldb * sizeof(TB)); // attention's keys: a cache's rows
      for (int m = 0; m < M; ++m) {
        const float* a = A + static_cast<long>(m) * lda;
        float* c = C + static_cast<long>(m) * ldc + n0;
        if (w == 8) {
          dots_of_8<true, TB>(8, K, a, b, ldb, c);
        } else {
          dots_of_8<false, TB>(w, K, a, b, ldb, c);
        }
      }
    }
    return;
  }
  switch (M) { // the row count a constant: the sums stay in registers
    case 1: return rows_times<1, TB>(N, K, A, lda, B, ldb, C, ldc);
    case 2: return rows_times<2, TB>(N, K, A, lda, B, ldb, C, ldc);
    case 3: return rows_times<3, TB>(N, K, A, lda, B, ldb, C, ldc);
    case 4: return rows_times<4, TB>(N, K, A, lda, B, ldb, C, ldc);
    case 5: return rows_times<5, TB>(N, K, A, lda, B, ldb, C, ldc);
    case 6: return rows_times<6, TB>(N, K, A, lda, B, ldb, C, ldc);
    case 7: return rows_times<7, TB>(N, K, A, lda, B, ldb, C, ldc);
    default: return rows_times<8, TB>(N, K, A, lda, B, ldb, C, ldc);
  }
}

} // namespace

void gemm_few_rows(bool transpose_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
                   int ldc) {
  few_rows(transpose_b, M, N, K, A, lda, B, ldb, C, ldc);
}

void gemm_few_rows(bool transpose_b, int M, int N, int K, const float* A, int lda, const uint16_t* B, int ldb,
                   float* C, int ldc) {
  few_rows(transpose_b, M, N, K, A, lda, B, ldb, C, ldc);
}

void gemm_serial(bool transpose_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
                 int ldc) {
  if (M == 0 || N == 0) {
    return;
  }
  if (K == 0) {
    for (int m = 0; m < M; ++m) {
      std::fill(C + static_cast<long>(m) * ldc, C + static_cast<long>(m) * ldc + N, 0.f);
    }
    return;
  }
  if (g_sgemm != nullptr) {
    g_sgemm(kRowMajor, kNoTrans, transpose_b ? kTrans : kNoTrans, M, N, K, 1.f, A, lda, B, ldb, 0.f, C, ldc);
    return;
  }
  if (transpose_b) {
    fallback_gemm_nt(M, N, K, A, lda, B, ldb, C, ldc);
    return;
  }
  std::vector<float> bt(static_cast<size_t>(N) * K); // B (K, N) -> (N, K)
  for (int k = 0; k < K; ++k) {
    for (int n = 0; n < N; ++n) {
      bt[static_cast<size_t>(n) * K + k] = B[static_cast<long>(k) * ldb + n];
    }
  }
  fallback_gemm_nt(M, N, K, A, lda, bt.data(), K, C, ldc);
}

// Prefill's weight products. OpenBLAS packed both operands for every tile of weight rows
// (19% of a MoE prompt's time) and reached 33-46 GMAC/s a core at 16-32 rows, an expert's
// share of a 512-token prompt. Here the activations are packed once per product and every
// weight entry is broadcast from the dequantized tile as it lies: per k, R weight rows x 2
// vectors of activation rows, 2R FMAs on accumulators that stay in registers. One core of
// Sapphire Rapids (scripts/bench_weight_gemm.py, a Q8_0 weight's dequantization included):
// 61 GMAC/s with AVX-512 at 32 rows, 86 at 512, 42 and 53 with AVX2; OpenBLAS on the
// dequantized float32 weight alone: 40 and 72.
//
// Each output is one multiply-add chain over k in order, whatever the row count, the rows'
// panel, the weight tile or the vector width: a row's product is the same alone or in a
// batch, and the same on AVX2, AVX-512 and NEON (each fuses its multiply-adds; a portable
// x86 build without FMA rounds its products apart).
namespace {

template <int W>
struct VectorOf {
  typedef float type __attribute__((vector_size(4 * W))); // an alias template would drop the attribute
};

// A vector ISA the GEMM is compiled for. The build's own (kNative) always runs; AVX-512 is
// compiled beside it with a target attribute and used where cpuid says the CPU has it,
// whatever the build targets (x86-64-v3).
struct Isa {
  const char* name;
  int lanes;       // floats per vector
  int weight_rows; // weight rows per pass: 2 x weight_rows accumulators fit in the registers
};

#if defined(__x86_64__)
constexpr Isa kAvx512{"avx512", 16, 12}; // 32 zmm: 24 accumulators, 2 activation vectors, a broadcast
#endif
#if defined(__AVX__)
constexpr Isa kNative{"avx2", 8, 6}; // 16 ymm
#elif defined(__aarch64__)
constexpr Isa kNative{"neon", 4, 12}; // 32 q registers
#else
constexpr Isa kNative{"portable", 4, 6};
#endif

std::vector<Isa> runnable_isas() {
  std::vector<Isa> isas;
#if defined(__x86_64__)
  __builtin_cpu_init(); // may run before libgcc's own constructor (g_isa's initializer)
  if (__builtin_cpu_supports("avx512f")) {
    isas.push_back(kAvx512);
  }
#endif
  isas.push_back(kNative);
  return isas;
}

Isa g_isa = runnable_isas().front();

// out[(r V + v) W + i] = sum over k, in order, of panel[k * stride + v W + i] * w[r * K + k].
template <int W, int V, int R>
inline __attribute__((always_inline)) void panel_pass(int K, const float* panel, int stride, const float* w,
                                                      float* out) {
  using Vec = typename VectorOf<W>::type;
  Vec acc[R][V];
  for (auto& row : acc) {
    for (auto& a : row) {
      a = Vec{};
    }
  }
  for (int k = 0; k < K; ++k) {
    Vec a[V];
    for (int v = 0; v < V; ++v) {
      std::memcpy(&a[v], panel + static_cast<long>(k) * stride + v * W, sizeof(Vec));
    }
    for (int r = 0; r < R; ++r) {
      const float b = w[static_cast<long>(r) * K + k];
      for (int v = 0; v < V; ++v) {
        acc[r][v] += a[v] * b;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      std::memcpy(out + (r * V + v) * W, &acc[r][v], sizeof(Vec));
    }
  }
}

template <int W, int V, int RMax>
inline __attribute__((always_inline)) void panel_pass(int R, int K, const float* panel, int stride, const float* w,
                                                      float* out) {
  if constexpr (RMax > 0) {
    if (R == RMax) {
      return panel_pass<W, V, RMax>(K, panel, stride, w, out);
    }
    return panel_pass<W, V, RMax - 1>(R, K, panel, stride, w, out);
  }
}

// C (M, n) = A @ w.T for n weight rows (K floats each, contiguous), A packed by PackedRows
// with W-lane vectors; C's rows ldc apart.
template <int W, int RMax>
inline __attribute__((always_inline)) void tile_product(const PackedRows& a, const float* w, int n, float* c,
                                                        int ldc) {
  const int K = a.K(), P = a.panel_rows();
  float out[RMax * 2 * W];
  for (int p = 0; p < a.panels(); ++p) {
    const int rows = std::min(P, a.M() - p * P);
    const int width = rows <= W ? W : 2 * W; // a last panel of one vector's rows: one vector
    const float* panel = a.panel(p);
    for (int n0 = 0; n0 < n; n0 += RMax) {
      const int R = std::min(RMax, n - n0);
      if (width == W) {
        panel_pass<W, 1, RMax>(R, K, panel, P, w + static_cast<long>(n0) * K, out);
      } else {
        panel_pass<W, 2, RMax>(R, K, panel, P, w + static_cast<long>(n0) * K, out);
      }
      for (int r = 0; r < R; ++r) {
        for (int i = 0; i < rows; ++i) {
          c[static_cast<long>(p * P + i) * ldc + n0 + r] = out[r * width + i];
        }
      }
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f,fma"))) void tile_product_avx512(const PackedRows& a, const float* w, int n,
                                                                 float* c, int ldc) {
  tile_product<kAvx512.lanes, kAvx512.weight_rows>(a, w, n, c, ldc);
}
#endif

void tile_product_native(const PackedRows& a, const float* w, int n, float* c, int ldc) {
  tile_product<kNative.lanes, kNative.weight_rows>(a, w, n, c, ldc);
}

} // namespace

PackedRows::PackedRows(int M, int K) : M_(M), K_(K), lanes_(g_isa.lanes) {
  data_.assign(static_cast<size_t>(panels()) * K * panel_rows(), 0.f);
}

void PackedRows::pack(const float* const* rows, int p0, int p1) {
  constexpr int kStep = 64; // k at a time: the panel's slice written stays in L1
  const int P = panel_rows();
  for (int p = p0; p < p1; ++p) {
    float* dst = data_.data() + static_cast<size_t>(p) * K_ * P;
    const int n = std::min(P, M_ - p * P);
    for (int k0 = 0; k0 < K_; k0 += kStep) {
      const int k1 = std::min(K_, k0 + kStep);
      for (int i = 0; i < n; ++i) {
        const float* src = rows[p * P + i];
        for (int k = k0; k < k1; ++k) {
          dst[static_cast<long>(k) * P + i] = src[k];
        }
      }
    }
  }
}

void weight_tile_product(const PackedRows& a, const float* w, int n, float* c, int ldc) {
  if (a.M() == 0 || n == 0) {
    return;
  }
#if defined(__x86_64__)
  if (a.lanes() == kAvx512.lanes) {
    return tile_product_avx512(a, w, n, c, ldc);
  }
#endif
  tile_product_native(a, w, n, c, ldc);
}

std::vector<std::string> gemm_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : runnable_isas()) {
    names.emplace_back(isa.name);
  }
  return names;
}

std::string gemm_isa() {
  return g_isa.name;
}

void set_gemm_isa(const std::string& name) {
  for (const Isa& isa : runnable_isas()) {
    if (name == isa.name) {
      g_isa = isa;
      return;
    }
  }
  throw std::invalid_argument("[set_gemm_isa] this CPU does not run '" + name + "'");
}

// Column blocks of C claimed by the pool's threads, each a single-threaded product.
constexpr int kGemmColumns = 64;

namespace {

// A matrix operand as stored: the last axis contiguous, rows `ld` apart, batch entries at
// `offsets` (elements from data()), for any strides MLX views have (slices of a KV cache).
struct MatrixView {
  const float* data;
  int ld;
  std::vector<long> offsets;
};

bool matrix_view(const mx::array& a, MatrixView& v) {
  const int nd = a.ndim();
  const int rows = a.shape(nd - 2), cols = a.shape(nd - 1);
  const long s1 = a.strides()[nd - 1], s2 = a.strides()[nd - 2];
  if (cols > 1 && s1 != 1) {
    return false;
  }
  const long ld = rows > 1 ? s2 : cols;
  if (ld < cols || ld > (1L << 30)) {
    return false;
  }
  v.data = a.data<float>();
  v.ld = static_cast<int>(std::max<long>(ld, 1));
  long batch = 1;
  for (int d = 0; d < nd - 2; ++d) {
    batch *= a.shape(d);
  }
  v.offsets.assign(batch, 0);
  std::vector<int> index(std::max(nd - 2, 0), 0);
  long at = 0;
  for (long b = 0; b < batch; ++b) {
    v.offsets[b] = at;
    for (int d = nd - 3; d >= 0; --d) {
      at += a.strides()[d];
      if (++index[d] < a.shape(d)) {
        break;
      }
      at -= a.strides()[d] * a.shape(d);
      index[d] = 0;
    }
  }
  return true;
}

class Matmul : public CpuPrimitive {
 public:
  Matmul(mx::Stream s, bool transpose_b) : CpuPrimitive(s), transpose_b_(transpose_b) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(transpose_b_ ? -2 : -1);
    return {shape};
  }
  const char* name() const override { return "Matmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return transpose_b_ == static_cast<const Matmul&>(other).transpose_b_;
  }

 private:
  bool transpose_b_;
};

void Matmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> operands;
  for (const auto& a : inputs) {
    enc.set_input_array(a);
    MatrixView probe;
    operands.push_back(a.size() == 0 || matrix_view(a, probe) ? a : gathered(enc, a)); // any other view: gathered first
  }
  enc.set_output_array(out);
  enc.dispatch([a = operands[0], b = operands[1], out, tb = transpose_b_]() mutable {
    if (out.size() == 0) {
      return;
    }
    MatrixView va, vb;
    matrix_view(a, va);
    matrix_view(b, vb);
    const int M = a.shape(-2), K = a.shape(-1), N = out.shape(-1);
    float* c = out.data<float>();
    // (batch entry, column block) pairs in one hand-off: attention's products are many small
    // ones (16 sequences x 3 heads per layer in a decode batch), one dispatch each was a cost
    const long blocks = (N + kGemmColumns - 1) / kGemmColumns;
    const bool few = M <= kFewRows && std::min(N, K) <= kFewRowsSide; // the whole product's sides decide
    parallel_ranges(static_cast<long>(va.offsets.size()) * blocks, 4L * M * K, [&](long u0, long u1) {
      for (long u = u0; u < u1; ++u) {
        const long i = u / blocks;
        const int n0 = static_cast<int>(u % blocks) * kGemmColumns, n = std::min(kGemmColumns, N - n0);
        const float* bp = vb.data + vb.offsets[i] + (tb ? static_cast<long>(n0) * vb.ld : n0);
        if (few) {
          gemm_few_rows(tb, M, n, K, va.data + va.offsets[i], va.ld, bp, vb.ld, c + i * M * N + n0, N);
        } else {
          gemm_serial(tb, M, n, K, va.data + va.offsets[i], va.ld, bp, vb.ld, c + i * M * N + n0, N);
        }
      }
    });
  });
}

} // namespace

mx::array matmul(const mx::array& a, const mx::array& b, bool transpose_b, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "matmul");
  if (a.ndim() < 2 || b.ndim() != a.ndim()) {
    throw std::invalid_argument("[matmul] a and b must have the same number (>= 2) of dimensions");
  }
  for (int d = 0; d < a.ndim() - 2; ++d) {
    if (a.shape(d) != b.shape(d)) {
      throw std::invalid_argument("[matmul] a and b must have the same batch dimensions");
    }
  }
  const int K = a.shape(-1);
  if (b.shape(transpose_b ? -1 : -2) != K) {
    throw std::invalid_argument("[matmul] a's columns must match b's " + std::string(transpose_b ? "columns" : "rows"));
  }
  auto shape = a.shape();
  shape.back() = b.shape(transpose_b ? -2 : -1);
  std::vector<mx::array> inputs = {mx::astype(a, mx::float32, stream), mx::astype(b, mx::float32, stream)};
  return mx::array(std::move(shape), mx::float32, std::make_shared<Matmul>(stream, transpose_b), std::move(inputs));
}

} // namespace mlxllm_cpu
