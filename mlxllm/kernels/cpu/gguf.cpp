// GGUF blocks as stored, on the CPU: a weight (out, in) is uint8 (out, bytes per row), the
// file's bytes unchanged, so the memory a model takes is the file's.
//
// Decode (a few activation rows) reads each weight row's blocks in place; the threads split
// output rows. Three arithmetics (the `activations` argument):
// - int16 (mlxllm's default): each activation row is rounded once per call, per block of 32,
//   to 16-bit integers with a float scale (amax / 32767). Every type the AVX2 kernels unpack
//   has integer codes of at most 8 bits with an exact scale (and offset) per 16 or 32, so the
//   unpacking hands those codes to a sink (Q16Sink) instead of converting them to floats:
//   two 16-bit madds per 32 weights and each activation row, one float multiply-add per 16
//   or 32. 1.4-1.8x the float kernels' speed on one core, and an element moves by at most
//   amax / 65534, 258x less than in 8-bit blocks: agreement with llama.cpp's F32 logits is
//   the float path's. Each output is summed in one order whatever the batch.
// - Float activations: codes unpacked with AVX2 into the dequantized values, exactly
//   gguf-py's, multiplied into up to 6 activation rows as they unpack (4 weight rows at a
//   time at one activation row), or for more rows decoded 4 weight rows at a time into L1
//   and multiplied in register tiles. Each output is summed in one order on every path, so a
//   row's product is the same alone or in a batch, and it is the dequantized weight's
//   product to float rounding, as prefill's GEMM gives it: logits do not depend on how a
//   prompt was chunked and agree with llama.cpp's F32 run as the dense path does.
// - int8: llama.cpp's CPU arithmetic. Each activation row is quantized once per
//   call to 8 bits per block (blocks of 32 with one scale for the 32-block types, as q8_0;
//   blocks of 256 with sums per 16 for the K types, as q8_K); each weight block's codes then
//   meet those bytes in integer dot products (AVX2's u8 x s8 multiply-add where the build
//   targets it, a portable loop elsewhere, which compilers vectorize for NEON), scaled once
//   per block in float. The rounding moves logits as far as llama.cpp's own quantized run
//   is from its F32 run (scripts/quant_matrix.py explains why it cannot bring us nearer
//   llama.cpp's own quantized logits).
// IQ4_NL/IQ4_XS codes become their signed values through one byte shuffle; MXFP4 is IQ4_NL
// with E2M1's (doubled) values and a power-of-two scale (E8M0). Q2_K, Q3_K, the IQ1/IQ2/IQ3
// codebook types, TQ1_0, TQ2_0 and NVFP4 have no int8 dots (in int8 mode their activations
// stay float; int16 mode takes them); the codebook types' grid entries are loaded into one register per
// 32 weights and signed there. F16 and BF16 matrices are read the same way, in blocks of 32
// halves widened exactly (F16C's conversion; BF16 is float32's top half), so an F16 file
// needs no float32 copy either. On a build without AVX2, float mode decodes each block to
// floats with the shared decoders of ../blocks/*.h (F16 / BF16: dq8_f16 / dq8_bf16 below).
//
// Prefill (more rows): the activations are packed once, then a tile of weight rows is
// dequantized (bit-exact to gguf-py) and multiplied by weight_tile_product (blas.cpp),
// tile after tile, so no float copy of the weight exists.
// In int16 and int8 mode the activations are first rounded to decode's blocks (as llama.cpp's
// prefill rounds them too), so each product is the one decode computes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "ops.h"
#include "pool.h"
#include "simd.h"

namespace mlxllm_cpu {

namespace {

// ------------------------------------------------------------------ the shared decoders

#define QDEV
#define QTHR
#define QFN static inline
inline float qhalf(uint16_t bits) {
  return half_to_float(bits);
}
#include "../blocks/common.h"
#include "../blocks/iquants.h"
#include "../blocks/kquants.h"
#undef QDEV
#undef QTHR
#undef QFN

inline float f16_at(const uint8_t* p) {
  return half_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}

enum Type {
  F16 = 1, BF16 = 30,
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
  IQ1_M = 29, TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39, NVFP4 = 40,
};

// MXFP4's scale: 2^(e - 127) halved (the values are doubled), as ggml_e8m0_to_fp32_half and
// gguf-py build it from the bits: e < 2 gives the subnormals 2^-128 and 2^-127.
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// A 32-weight block of IQ4_NL (fp16 scale, then 16 bytes of nibbles) or of MXFP4 (E8M0
// scale byte, then the same nibbles): its size, its scale and where its nibbles start.
inline int nl_bytes(int t) { return t == MXFP4 ? 17 : 18; }
inline float nl_scale(int t, const uint8_t* b) { return t == MXFP4 ? e8m0_half(b[0]) : f16_at(b); }
inline const uint8_t* nl_codes(int t, const uint8_t* b) { return b + (t == MXFP4 ? 1 : 2); }

// The types whose nibbles index a 16-value codebook (`table`).
inline bool is_iq4(int t) { return t == IQ4_NL || t == IQ4_XS || t == MXFP4; }

// IQ4_XS: sub-block sb's scale, 6 bits (low 4 in scales_l, high 2 in scales_h) minus 32.
inline int iq4xs_scale(const uint8_t* b, int sb) {
  const int scales_h = b[2] | (b[3] << 8);
  return (((b[4 + sb / 2] >> (4 * (sb & 1))) & 15) | (((scales_h >> (2 * sb)) & 3) << 4)) - 32;
}

// F16 and BF16 weights as blocks of 32 halves (GGUF stores them element by element; the
// loader keeps only matrices whose rows hold whole blocks): half the float32 image's bytes,
// widened exactly as read.
constexpr int QK_HALF = 32, BYTES_HALF = 64;

void dq8_f16(const uint8_t* b, int j, const uint8_t*, float* v) {
  for (int k = 0; k < 8; ++k) {
    v[k] = f16_at(b + 16 * j + 2 * k);
  }
}

void dq8_bf16(const uint8_t* b, int j, const uint8_t*, float* v) { // bfloat16: float32's top half
  for (int k = 0; k < 8; ++k) {
    const uint32_t bits = static_cast<uint32_t>(b[16 * j + 2 * k] | (b[16 * j + 2 * k + 1] << 8)) << 16;
    std::memcpy(v + k, &bits, 4);
  }
}

// How a type's matvec runs: integer dots against q8 blocks of 32 or of 256, or floats.
enum class Path { Q8_32, Q8_256, FLOAT };

// The activations products multiply: float (exact), llama.cpp's 8-bit blocks, or 16-bit blocks.
enum class Activations { FLOAT, INT8, INT16 };

using Dq8 = void (*)(const uint8_t*, int, const uint8_t*, float*);

struct TypeInfo {
  int qk, bytes;
  Path path;
  Dq8 dq8; // the shared decoder, for the FLOAT path's types
};

bool type_info(int t, TypeInfo& info) {
  switch (t) {
    case F16: info = {QK_HALF, BYTES_HALF, Path::FLOAT, dq8_f16}; return true;
    case BF16: info = {QK_HALF, BYTES_HALF, Path::FLOAT, dq8_bf16}; return true;
    case Q4_0: info = {32, 18, Path::Q8_32, nullptr}; return true;
    case Q4_1: info = {32, 20, Path::Q8_32, nullptr}; return true;
    case Q5_0: info = {32, 22, Path::Q8_32, nullptr}; return true;
    case Q5_1: info = {32, 24, Path::Q8_32, nullptr}; return true;
    case Q8_0: info = {32, 34, Path::Q8_32, nullptr}; return true;
    case Q4_K: info = {256, 144, Path::Q8_256, nullptr}; return true;
    case Q5_K: info = {256, 176, Path::Q8_256, nullptr}; return true;
    case Q6_K: info = {QK_Q6_K, BYTES_Q6_K, Path::Q8_256, dq8_q6_k}; return true;
    case Q2_K: info = {QK_Q2_K, BYTES_Q2_K, Path::FLOAT, dq8_q2_k}; return true;
    case Q3_K: info = {QK_Q3_K, BYTES_Q3_K, Path::FLOAT, dq8_q3_k}; return true;
    case TQ1_0: info = {QK_TQ1_0, BYTES_TQ1_0, Path::FLOAT, dq8_tq1_0}; return true;
    case TQ2_0: info = {QK_TQ2_0, BYTES_TQ2_0, Path::FLOAT, dq8_tq2_0}; return true;
    case IQ4_NL: info = {QK_IQ4_NL, BYTES_IQ4_NL, Path::Q8_32, dq8_iq4_nl}; return true;
    case MXFP4: info = {32, 17, Path::Q8_32, nullptr}; return true;
    case IQ4_XS: info = {QK_IQ4_XS, BYTES_IQ4_XS, Path::Q8_256, dq8_iq4_xs}; return true;
    case NVFP4: info = {QK_NVFP4, BYTES_NVFP4, Path::FLOAT, dq8_nvfp4}; return true;
    case IQ1_S: info = {QK_IQ1_S, BYTES_IQ1_S, Path::FLOAT, dq8_iq1_s}; return true;
    case IQ1_M: info = {QK_IQ1_M, BYTES_IQ1_M, Path::FLOAT, dq8_iq1_m}; return true;
    case IQ2_XXS: info = {QK_IQ2_XXS, BYTES_IQ2_XXS, Path::FLOAT, dq8_iq2_xxs}; return true;
    case IQ2_XS: info = {QK_IQ2_XS, BYTES_IQ2_XS, Path::FLOAT, dq8_iq2_xs}; return true;
    case IQ2_S: info = {QK_IQ2_S, BYTES_IQ2_S, Path::FLOAT, dq8_iq2_s}; return true;
    case IQ3_XXS: info = {QK_IQ3_XXS, BYTES_IQ3_XXS, Path::FLOAT, dq8_iq3_xxs}; return true;
    case IQ3_S: info = {QK_IQ3_S, BYTES_IQ3_S, Path::FLOAT, dq8_iq3_s}; return true;
    default: return false;
  }
}

// ------------------------------------------------------------------ dequantizing (prefill)
// gguf-py's arithmetic: every product below is exact in float32 (an fp16 scale times small
// integers), so the one rounding is the final add / subtract, as there.

inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void dequantize_block(int t, const uint8_t* b, const uint8_t* table, float* v) {
  switch (t) {
    case Q4_0: {
      const float d = f16_at(b);
      for (int i = 0; i < 16; ++i) {
        v[i] = d * static_cast<float>((b[2 + i] & 15) - 8);
        v[i + 16] = d * static_cast<float>((b[2 + i] >> 4) - 8);
      }
      return;
    }
    case Q4_1: {
      const float d = f16_at(b), m = f16_at(b + 2);
      for (int i = 0; i < 16; ++i) {
        v[i] = d * static_cast<float>(b[4 + i] & 15) + m;
        v[i + 16] = d * static_cast<float>(b[4 + i] >> 4) + m;
      }
      return;
    }
    case Q5_0:
    case Q5_1: {
      const bool one = t == Q5_1;
      const float d = f16_at(b), m = one ? f16_at(b + 2) : 0.f;
      const uint8_t* qhp = b + (one ? 4 : 2);
      const uint32_t qh = qhp[0] | (qhp[1] << 8) | (qhp[2] << 16) | (static_cast<uint32_t>(qhp[3]) << 24);
      const uint8_t* qs = qhp + 4;
      for (int i = 0; i < 16; ++i) {
        const int lo = (qs[i] & 15) | (((qh >> i) & 1) << 4);
        const int hi = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
        if (one) {
          v[i] = d * static_cast<float>(lo) + m;
          v[i + 16] = d * static_cast<float>(hi) + m;
        } else {
          v[i] = d * static_cast<float>(lo - 16);
          v[i + 16] = d * static_cast<float>(hi - 16);
        }
      }
      return;
    }
    case Q8_0: {
      const float d = f16_at(b);
      for (int i = 0; i < 32; ++i) {
        v[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i]));
      }
      return;
    }
    case MXFP4: {
      const int8_t* kv = reinterpret_cast<const int8_t*>(table);
      const float d = e8m0_half(b[0]);
      for (int i = 0; i < 16; ++i) {
        v[i] = d * static_cast<float>(kv[b[1 + i] & 15]);
        v[i + 16] = d * static_cast<float>(kv[b[1 + i] >> 4]);
      }
      return;
    }
    case Q4_K:
    case Q5_K: {
      const bool five = t == Q5_K;
      const float d = f16_at(b), dmin = f16_at(b + 2);
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (five ? 48 : 16);
      for (int j = 0; j < 8; ++j) {
        int sc, m;
        k_scale_min(b + 4, j, sc, m);
        const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(m);
        const uint8_t* q = qs + 32 * (j / 2);
        const int shift = 4 * (j & 1);
        for (int i = 0; i < 32; ++i) {
          int code = (q[i] >> shift) & 15;
          if (five) {
            code |= ((qh[i] >> j) & 1) << 4;
          }
          v[32 * j + i] = dl * static_cast<float>(code) - ml;
        }
      }
      return;
    }
    default: {
      TypeInfo info;
      type_info(t, info);
      for (int j = 0; j < info.qk / 8; ++j) {
        info.dq8(b, j, table, v + 8 * j);
      }
    }
  }
}

// ------------------------------------------------------------------ activations to 8 bits

// d[i / qk] * q[i]: activations rounded to integer blocks, back as floats (Q8Rows, Q16Rows).
template <class Int>
std::vector<float> scaled_blocks(const std::vector<Int>& q, const std::vector<float>& d, int qk) {
  std::vector<float> x(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    x[i] = d[i / qk] * static_cast<float>(q[i]);
  }
  return x;
}

// One activation row quantized: q (I) int8, d one scale per block of `qk` (32 or 256), and
// s the sum of q over each 16, which the zero points and minimums need.
struct Q8Row {
  const int8_t* q;
  const float* d;
  const int32_t* s;
};

struct Q8Rows {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
  int I, qk;

  Q8Rows(const float* x, int B, int I_, int qk_) : I(I_), qk(qk_) {
    q.resize(static_cast<size_t>(B) * I);
    d.resize(static_cast<size_t>(B) * I / qk);
    s.resize(static_cast<size_t>(B) * I / 16);
    for (long blk = 0; blk < static_cast<long>(B) * I / qk; ++blk) {
      const float* xb = x + blk * qk;
      float amax = 0.f;
      for (int i = 0; i < qk; ++i) {
        amax = std::max(amax, std::fabs(xb[i]));
      }
      float scale = amax / 127.f;
      if (qk == 32) { // q8_0 keeps its scale as fp16: the same rounding
        scale = half_to_float(float_to_half(scale));
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      d[blk] = amax > 0.f ? scale : 0.f;
      int8_t* qb = q.data() + blk * qk;
      for (int i = 0; i < qk; ++i) {
        const float r = std::nearbyint(xb[i] * inv);
        qb[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, r)));
      }
      for (int g = 0; g < qk / 16; ++g) {
        int32_t sum = 0;
        for (int i = 0; i < 16; ++i) {
          sum += qb[16 * g + i];
        }
        s[blk * (qk / 16) + g] = sum;
      }
    }
  }

  // d * q: the rounded activations as floats. A float product of these with the dequantized
  // weight is the integer dot's value up to float rounding (d * q is exact for the fp16
  // scales of the 32-blocks, one rounding for the 256-blocks' float scales; then the order
  // of the sums), which lets prefill keep BLAS and still compute what decode computes.
  std::vector<float> dequantized() const { return scaled_blocks(q, d, qk); }

  Q8Row row(int b) const {
    return {q.data() + static_cast<long>(b) * I, d.data() + static_cast<long>(b) * I / qk,
            s.data() + static_cast<long>(b) * I / 16};
  }
};

// ------------------------------------------------------------------ activations to 16 bits

// int16 mode: each activation row rounded per block of 32 to 16-bit integers, scale
// amax / 32767 kept as a float, so an element moves by at most amax / 65534 (8-bit blocks:
// amax / 254, 258x as far). Every weight type's codes are integers of at most 8 bits with
// one exact scale (and offset) per 16 or 32 weights, so they meet these in 16-bit integer
// multiply-adds (AVX2's madd: 16 products per instruction) and one float multiply-add per
// 32 weights, where float activations take four, after converting each code to float.
constexpr int kQ16 = 32;

struct Q16Row {
  const int16_t* q;
  const float* d; // per block of 32
  const float* ds; // d * the sum of q, per 16: the offsets' (zero points', minimums') part
  const float* dsum; // per block of 32: d, then d * the sum of its q (and 2 floats of padding)
};

struct Q16Rows {
  std::vector<int16_t> q;
  std::vector<float> d, ds, dsum;
  int I;

  Q16Rows(const float* x, int B, int I_) : I(I_) {
    const long n = static_cast<long>(B) * I;
    q.resize(n);
    d.resize(n / kQ16);
    ds.resize(n / 16);
    dsum.resize(2 * (n / kQ16) + 2); // + 2: a block's pair is read as 4 floats
    for (long blk = 0; blk < n / kQ16; ++blk) {
      const float* xb = x + blk * kQ16;
      int16_t* qb = q.data() + blk * kQ16;
      int32_t sums[2];
#if defined(__AVX2__)
      __m256 v[4], amax8 = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(xb + 8 * k);
        amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[k]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
      for (int h = 0; h < 2; ++h) { // cvtps rounds to nearest even, as nearbyint; |x * inv| <= 32767
        const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * h], inv));
        const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * h + 1], inv));
        const __m256i q16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 16 * h), q16);
        const __m256i pairs = _mm256_madd_epi16(q16, _mm256_set1_epi16(1));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        sums[h] = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
      }
#else
      float amax = 0.f;
      for (int i = 0; i < kQ16; ++i) {
        amax = std::max(amax, std::fabs(xb[i]));
      }
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      for (int h = 0; h < 2; ++h) {
        sums[h] = 0;
        for (int i = 16 * h; i < 16 * h + 16; ++i) {
          qb[i] = static_cast<int16_t>(std::max(-32767.f, std::min(32767.f, std::nearbyint(xb[i] * inv))));
          sums[h] += qb[i];
        }
      }
#endif
      d[blk] = amax / 32767.f;
      ds[2 * blk] = d[blk] * static_cast<float>(sums[0]);
      ds[2 * blk + 1] = d[blk] * static_cast<float>(sums[1]);
      dsum[2 * blk] = d[blk];
      dsum[2 * blk + 1] = d[blk] * static_cast<float>(sums[0] + sums[1]);
    }
  }

  // d * q: the rounded activations as floats (prefill multiplies these, as decode does).
  std::vector<float> dequantized() const { return scaled_blocks(q, d, kQ16); }

  Q16Row row(int b) const {
    const long at = static_cast<long>(b) * I;
    return {q.data() + at, d.data() + at / kQ16, ds.data() + at / 16, dsum.data() + 2 * (at / kQ16)};
  }
};

// ------------------------------------------------------------------ integer dot products
// dot_T(row, x, nb): one weight row of nb blocks against one quantized activation row.

// Portable versions: the reference arithmetic, and the path on non-AVX2 builds.
// IQ4_NL / IQ4_XS / MXFP4: codes index the 16 signed values of `table`; sub-block scales (XS).
float dot_iq4_portable(int t, const uint8_t* row, const Q8Row& x, int nb, const uint8_t* table) {
  const int8_t* kv = reinterpret_cast<const int8_t*>(table);
  float total = 0.f;
  for (int blk = 0; blk < nb; ++blk) {
    if (t != IQ4_XS) {
      const uint8_t* b = row + nl_bytes(t) * blk;
      const uint8_t* qs = nl_codes(t, b);
      const int8_t* y = x.q + 32 * blk;
      int32_t dot = 0;
      for (int i = 0; i < 16; ++i) {
        dot += kv[qs[i] & 15] * y[i] + kv[qs[i] >> 4] * y[i + 16];
      }
      total += nl_scale(t, b) * x.d[blk] * static_cast<float>(dot);
    } else {
      const uint8_t* b = row + 136 * blk;
      const int8_t* y = x.q + 256 * blk;
      int32_t sumi = 0;
      for (int sb = 0; sb < 8; ++sb) {
        const int ls = iq4xs_scale(b, sb);
        const uint8_t* qs = b + 8 + 16 * sb;
        int32_t dot = 0;
        for (int i = 0; i < 16; ++i) {
          dot += kv[qs[i] & 15] * y[32 * sb + i] + kv[qs[i] >> 4] * y[32 * sb + i + 16];
        }
        sumi += ls * dot;
      }
      total += f16_at(b) * x.d[blk] * static_cast<float>(sumi);
    }
  }
  return total;
}

float dot_portable(int t, const uint8_t* row, const Q8Row& x, int nb) {
  float total = 0.f;
  if (t == Q4_K || t == Q5_K || t == Q6_K) {
    for (int blk = 0; blk < nb; ++blk) {
      const int8_t* y = x.q + 256 * blk;
      const int32_t* s = x.s + 16 * blk;
      if (t == Q6_K) {
        const uint8_t* b = row + 210 * blk;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
        int32_t sumi = 0;
        for (int e = 0; e < 256; ++e) {
          const int h = e >> 7, l = e & 127, q = l >> 5, i = l & 31;
          const int lo = (b[64 * h + 32 * (q & 1) + i] >> (4 * (q >> 1))) & 15;
          const int hi = (b[128 + 32 * h + i] >> (2 * q)) & 3;
          sumi += sc[e >> 4] * (lo | (hi << 4)) * y[e];
        }
        int32_t corr = 0;
        for (int g = 0; g < 16; ++g) {
          corr += sc[g] * s[g];
        }
        total += f16_at(b + 208) * x.d[blk] * static_cast<float>(sumi - 32 * corr);
      } else {
        const bool five = t == Q5_K;
        const uint8_t* b = row + (five ? 176 : 144) * blk;
        const uint8_t* qs = b + (five ? 48 : 16);
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 8; ++j) {
          int sc, m;
          k_scale_min(b + 4, j, sc, m);
          int32_t dot = 0;
          for (int i = 0; i < 32; ++i) {
            int code = (qs[32 * (j / 2) + i] >> (4 * (j & 1))) & 15;
            if (five) {
              code |= ((b[16 + i] >> j) & 1) << 4;
            }
            dot += code * y[32 * j + i];
          }
          sumi += sc * dot;
          summ += m * (s[2 * j] + s[2 * j + 1]);
        }
        total += x.d[blk] * (f16_at(b) * static_cast<float>(sumi) - f16_at(b + 2) * static_cast<float>(summ));
      }
    }
    return total;
  }
  TypeInfo info;
  type_info(t, info);
  for (int blk = 0; blk < nb; ++blk) {
    const uint8_t* b = row + info.bytes * blk;
    const int8_t* y = x.q + 32 * blk;
    const int32_t ysum = x.s[2 * blk] + x.s[2 * blk + 1];
    int32_t dot = 0;
    float d = f16_at(b), m = 0.f;
    int zero = 0;
    switch (t) {
      case Q4_0:
      case Q4_1:
        for (int i = 0; i < 16; ++i) {
          dot += (b[info.bytes - 16 + i] & 15) * y[i] + (b[info.bytes - 16 + i] >> 4) * y[i + 16];
        }
        zero = t == Q4_0 ? 8 : 0;
        m = t == Q4_1 ? f16_at(b + 2) : 0.f;
        break;
      case Q5_0:
      case Q5_1: {
        const uint8_t* qhp = b + (t == Q5_1 ? 4 : 2);
        const uint32_t qh = qhp[0] | (qhp[1] << 8) | (qhp[2] << 16) | (static_cast<uint32_t>(qhp[3]) << 24);
        for (int i = 0; i < 16; ++i) {
          dot += ((qhp[4 + i] & 15) | (((qh >> i) & 1) << 4)) * y[i] +
                 ((qhp[4 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) * y[i + 16];
        }
        zero = t == Q5_0 ? 16 : 0;
        m = t == Q5_1 ? f16_at(b + 2) : 0.f;
        break;
      }
      default: // Q8_0
        for (int i = 0; i < 32; ++i) {
          dot += static_cast<int8_t>(b[2 + i]) * y[i];
        }
    }
    total += x.d[blk] * (d * static_cast<float>(dot - zero * ysum) + m * static_cast<float>(ysum));
  }
  return total;
}

// Weight rows unpacked together at nr activation rows: enough independent accumulators to
// cover the multiply-add's latency (fewer as the activation rows give their own).
constexpr int fused_weight_rows(int nr) { return nr == 1 ? 4 : nr == 2 ? 2 : 1; }

#if defined(__AVX2__)
inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The codebook i-quants (IQ2_XXS/XS/S, IQ3_XXS/S): 32 weights are four chunks of 8 grid
// magnitudes, each signed by its 8 sign bits. mags holds the 32 magnitudes in order;
// signs[c] is chunk c's sign byte (bit t: weight t negative). The result: the signed codes.
inline __m256i signed_grid32(__m256i mags, uint32_t signs) {
  const __m256i byte_of_chunk = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(signs)), byte_of_chunk);
  const __m256i negative = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_sub_epi8(_mm256_xor_si256(mags, negative), negative);
}

inline uint64_t grid8(const uint8_t* table, int entry) { // an 8-wide entry (IQ2)
  uint64_t g;
  std::memcpy(&g, table + 8 * entry, 8);
  return g;
}

inline uint32_t grid4(const uint8_t* table, int entry) { // a 4-wide entry (IQ3)
  uint32_t g;
  std::memcpy(&g, table + 4 * entry, 4);
  return g;
}

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

inline __m256i grid8x4(const uint8_t* table, const int (&entries)[4]) {
  return _mm256_setr_epi64x(static_cast<long long>(grid8(table, entries[0])), static_cast<long long>(grid8(table, entries[1])),
                            static_cast<long long>(grid8(table, entries[2])), static_cast<long long>(grid8(table, entries[3])));
}

// 16 bytes of packed nibbles -> 32 codes: the low nibbles, then the high ones.
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// Byte i is 0xFF where bit i of x is set, else 0.
inline __m256i bits_as_bytes(uint32_t x) {
  const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3,
                                       3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), idx), bit);
  return _mm256_cmpeq_epi8(v, bit);
}

// Byte i is 0x10 where bit i of x is set.
inline __m256i bit4_of(uint32_t x) {
  return _mm256_and_si256(bits_as_bytes(x), _mm256_set1_epi8(0x10));
}

// Sums of 4 adjacent u8 x s8 products, as 8 int32 (u8 codes here stay below 64, so the
// 16-bit pair sums never saturate).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// Signed codes x signed activations, as sums of 4 products in 8 int32 (|w| <= 127 here).
// Q6_K: the 32 codes (0-63) of quarter q of a 128-element half, from its low-bit bytes
// (ql0, ql1: 64 bytes) and high-bit bytes (qh: 32 bytes).
inline __m256i q6k_codes(__m256i ql0, __m256i ql1, __m256i qh, int q) {
  const __m256i ql = q & 1 ? ql1 : ql0;
  const __m256i lo = _mm256_and_si256(q >> 1 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0F));
  const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * q), _mm256_set1_epi8(3)), 4);
  return _mm256_or_si256(lo, hi);
}

// Q4_K / Q5_K: the 32 codes of sub-block j = 2k + half, from the 32 nibble bytes of k and,
// for Q5_K (five), bit j of each high-bit byte in qh.
inline __m256i q45k_codes(__m256i bytes, __m256i qh, int half, int j, bool five) {
  __m256i code = _mm256_and_si256(half ? _mm256_srli_epi16(bytes, 4) : bytes, _mm256_set1_epi8(0x0F));
  if (five) {
    code = _mm256_or_si256(code, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), _mm256_set1_epi8(1)), 4));
  }
  return code;
}

// A Q4_K / Q5_K block's 8 sub-blocks of 32: visit(j, codes, d * scale_j, dmin * min_j), the
// walk the float kernels and the dequantizer share.
template <class Visit>
inline void q45k_subblocks(const uint8_t* b, bool five, Visit&& visit) {
  const uint8_t* qs = b + (five ? 48 : 16);
  const __m256i qh = five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
  const float d = f16_at(b), dmin = f16_at(b + 2);
  for (int k = 0; k < 4; ++k) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * k));
    for (int half = 0; half < 2; ++half) {
      const int j = 2 * k + half;
      int sc, m;
      k_scale_min(b + 4, j, sc, m);
      visit(j, q45k_codes(bytes, qh, half, j, five), d * static_cast<float>(sc), dmin * static_cast<float>(m));
    }
  }
}

inline __m256i dot_s8s8(__m256i w, __m256i y) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)),
                           _mm256_set1_epi16(1));
}

float dot_iq4_avx2(int t, const uint8_t* row, const Q8Row& x, int nb, const uint8_t* table) {
  const __m128i kv128 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
  const __m256i kv = _mm256_set_m128i(kv128, kv128);
  __m256 acc = _mm256_setzero_ps();
  const long block_bytes = t != IQ4_XS ? nl_bytes(t) : BYTES_IQ4_XS;
  for (int blk = 0; blk < nb; ++blk) {
    prefetch_ahead(row + block_bytes * blk, block_bytes);
    if (t != IQ4_XS) {
      const uint8_t* b = row + nl_bytes(t) * blk;
      const __m256i w = _mm256_shuffle_epi8(kv, nibbles32(nl_codes(t, b)));
      const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * blk));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(nl_scale(t, b) * x.d[blk]), _mm256_cvtepi32_ps(dot_s8s8(w, y)), acc);
    } else {
      const uint8_t* b = row + 136 * blk;
      const int8_t* y = x.q + 256 * blk;
      __m256i sumi = _mm256_setzero_si256();
      for (int sb = 0; sb < 8; ++sb) {
        const int ls = iq4xs_scale(b, sb);
        const __m256i w = _mm256_shuffle_epi8(kv, nibbles32(b + 8 + 16 * sb));
        const __m256i p = dot_s8s8(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + 32 * sb)));
        sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p, _mm256_set1_epi32(ls)));
      }
      acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b) * x.d[blk]), _mm256_cvtepi32_ps(sumi), acc);
    }
  }
  return hsum_ps(acc);
}

float dot_legacy_avx2(int t, const uint8_t* row, const Q8Row& x, int nb) {
  TypeInfo info;
  type_info(t, info);
  __m256 acc = _mm256_setzero_ps();
  float extra = 0.f; // zero points and minimums: per block, scalar
  for (int blk = 0; blk < nb; ++blk) {
    const uint8_t* b = row + info.bytes * blk;
    prefetch_ahead(b, info.bytes);
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * blk));
    const float dx = x.d[blk];
    const float ysum = static_cast<float>(x.s[2 * blk] + x.s[2 * blk + 1]);
    const float d = f16_at(b) * dx;
    __m256i p;
    switch (t) {
      case Q4_0:
        p = dot_u8s8(nibbles32(b + 2), y);
        extra -= 8.f * d * ysum;
        break;
      case Q4_1:
        p = dot_u8s8(nibbles32(b + 4), y);
        extra += f16_at(b + 2) * dx * ysum;
        break;
      case Q5_0: {
        uint32_t qh;
        std::memcpy(&qh, b + 2, 4);
        p = dot_u8s8(_mm256_or_si256(nibbles32(b + 6), bit4_of(qh)), y);
        extra -= 16.f * d * ysum;
        break;
      }
      case Q5_1: {
        uint32_t qh;
        std::memcpy(&qh, b + 4, 4);
        p = dot_u8s8(_mm256_or_si256(nibbles32(b + 8), bit4_of(qh)), y);
        extra += f16_at(b + 2) * dx * ysum;
        break;
      }
      default: { // Q8_0: signed x signed, through |w| and y with w's sign
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
        p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)),
                              _mm256_set1_epi16(1));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
  }
  return hsum_ps(acc) + extra;
}

float dot_k_avx2(int t, const uint8_t* row, const Q8Row& x, int nb) {
  __m256 acc = _mm256_setzero_ps();
  float extra = 0.f;
  const long block_bytes = t == Q6_K ? BYTES_Q6_K : t == Q5_K ? 176 : 144;
  for (int blk = 0; blk < nb; ++blk) {
    prefetch_ahead(row + block_bytes * blk, block_bytes);
    const int8_t* y = x.q + 256 * blk;
    const int32_t* s = x.s + 16 * blk;
    __m256i sumi = _mm256_setzero_si256();
    auto ld = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
    if (t == Q6_K) {
      const uint8_t* b = row + 210 * blk;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = ld(b + 64 * h), ql1 = ld(b + 64 * h + 32), qh = ld(b + 128 + 32 * h);
        for (int q = 0; q < 4; ++q) {
          const __m256i p16 = _mm256_maddubs_epi16(q6k_codes(ql0, ql1, qh, q), ld(y + 128 * h + 32 * q));
          const int g = 8 * h + 2 * q;
          const __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
          sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, scales));
        }
      }
      int32_t corr = 0;
      for (int g = 0; g < 16; ++g) {
        corr += sc[g] * s[g];
      }
      const float d = f16_at(b + 208) * x.d[blk];
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
      extra -= d * static_cast<float>(32 * corr);
    } else {
      const bool five = t == Q5_K;
      const uint8_t* b = row + (five ? 176 : 144) * blk;
      const uint8_t* qs = b + (five ? 48 : 16);
      const __m256i qh = five ? ld(b + 16) : _mm256_setzero_si256();
      int32_t summ = 0;
      for (int k = 0; k < 4; ++k) {
        const __m256i bytes = ld(qs + 32 * k);
        for (int half = 0; half < 2; ++half) {
          const int j = 2 * k + half;
          int sc, m;
          k_scale_min(b + 4, j, sc, m);
          const __m256i p16 = _mm256_maddubs_epi16(q45k_codes(bytes, qh, half, j, five), ld(y + 32 * j));
          sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, _mm256_set1_epi16(static_cast<int16_t>(sc))));
          summ += m * (s[2 * j] + s[2 * j + 1]);
        }
      }
      acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b) * x.d[blk]), _mm256_cvtepi32_ps(sumi), acc);
      extra -= f16_at(b + 2) * x.d[blk] * static_cast<float>(summ);
    }
  }
  return hsum_ps(acc) + extra;
}

// ------------------------------------------------------------------ float activations
// The same weight blocks against float activations (the default: no activation rounding).
// Each block is unpacked with AVX2 into its dequantized values, bit for bit gguf-py's, 8 at
// a time, and handed to a sink: prefill's tiles store them; decode multiplies them straight
// into one to kFusedRows activation rows, or, for more rows, stores a few weight rows and
// multiplies them in register tiles. Every path sums each output in one order (one 8-lane
// partial sum per output, 8 weights at a time from the left), so a row's product is bit for
// bit the same alone or in any batch: the dequantized weight's product, as the dense path
// computes it, to float rounding.

// 32 codes (u8, or s8 where `sign`) as four vectors of 8 floats, in order.
struct Codes32 {
  __m256 v[4];
  Codes32(__m256i codes, bool sign) {
    const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
    const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_cvtepi32_ps(sign ? _mm256_cvtepi8_epi32(part[k]) : _mm256_cvtepu8_epi32(part[k]));
    }
  }
};

// A sink that takes the integer codes themselves (int16 mode's dots) instead of their values.
template <class Sink>
concept CodeSink = requires(Sink& s, __m256i c) {
  s.codes(0, c, true, 0.f, 0.f, 0.f, 0.f);
  s.template codes1<true>(0, c, true, 0.f, 0.f);
};

// Elements at..at+31 = scale * codes (+ offset), codes 0-15 scaled by `scale`, 16-31 by
// `scale_hi`, to sink(i, 8 floats) in order: `dequantize_block`'s arithmetic on 32 unpacked
// codes. Every product is exact (an fp16 or power-of-two scale times a code of at most 8
// bits), so the one rounding is the add, fused or not: bit for bit gguf-py's values.
template <class Sink>
inline void scale32(Sink& sink, int at, __m256i codes, bool sign, float scale, float scale_hi) {
  if constexpr (CodeSink<Sink>) {
    return sink.codes(at, codes, sign, scale, scale_hi, 0.f, 0.f);
  }
  const Codes32 c(codes, sign);
  const __m256 d = _mm256_set1_ps(scale), dh = _mm256_set1_ps(scale_hi);
  for (int k = 0; k < 4; ++k) {
    sink(at + 8 * k, _mm256_mul_ps(k < 2 ? d : dh, c.v[k]));
  }
}

template <class Sink>
inline void scale32(Sink& sink, int at, __m256i codes, bool sign, float scale) {
  if constexpr (CodeSink<Sink>) {
    return sink.template codes1<false>(at, codes, sign, scale, 0.f);
  }
  scale32(sink, at, codes, sign, scale, scale);
}

template <class Sink>
inline void scale32_offset(Sink& sink, int at, __m256i codes, float scale, float offset, float scale_hi,
                           float offset_hi) {
  if constexpr (CodeSink<Sink>) {
    return sink.codes(at, codes, false, scale, scale_hi, offset, offset_hi);
  }
  const Codes32 c(codes, false);
  const __m256 d = _mm256_set1_ps(scale), m = _mm256_set1_ps(offset);
  const __m256 dh = _mm256_set1_ps(scale_hi), mh = _mm256_set1_ps(offset_hi);
  for (int k = 0; k < 4; ++k) {
    sink(at + 8 * k, _mm256_add_ps(_mm256_mul_ps(k < 2 ? d : dh, c.v[k]), k < 2 ? m : mh));
  }
}

template <class Sink>
inline void scale32_offset(Sink& sink, int at, __m256i codes, float scale, float offset) {
  if constexpr (CodeSink<Sink>) {
    return sink.template codes1<true>(at, codes, false, scale, offset);
  }
  scale32_offset(sink, at, codes, scale, offset, scale, offset);
}

// Q3_K's scale of sub-block s (of 16): 4 low bits from scales[s % 8] (high nibble for
// s >= 8), 2 high bits from scales[8 + s % 4] >> 2(s / 4), minus 32.
inline float q3k_scale(const uint8_t* scales, int s) {
  const int lo = (scales[s & 7] >> (4 * (s >> 3))) & 15, hi = (scales[8 + (s & 3)] >> (2 * (s >> 2))) & 3;
  return static_cast<float>((lo | (hi << 4)) - 32);
}

// IQ1: 32 grid values g (-1, 0, +1), each chunk of 8 shifted by its delta (+-1/8), as the
// integer codes 8g +- 1 (the value is then (scale / 8) * code: the same exact product as
// gguf-py's scale * (g + delta), signed zeros included, as code is never 0). negative[k]:
// whether chunk k's delta is -1/8.
inline __m256i iq1_codes(__m256i grid, const bool (&negative)[4]) {
  constexpr long long kPlus = 0x0101010101010101LL, kMinus = -1LL; // +1 or -1 in each byte
  const __m256i shift = _mm256_setr_epi64x(negative[0] ? kMinus : kPlus, negative[1] ? kMinus : kPlus,
                                           negative[2] ? kMinus : kPlus, negative[3] ? kMinus : kPlus);
  return _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), grid), shift);
}

// TQ1_0: digit n of byte x is (uint8(x * 3^n) * 3) >> 8, for 32 bytes and their own 3^n;
// the byte products wrap mod 256 on purpose (16-bit products, even and odd bytes apart).
inline __m256i tq1_digits(__m256i bytes, __m256i pow3) {
  const __m256i low = _mm256_set1_epi16(0xFF), three = _mm256_set1_epi16(3 << 8);
  const __m256i even = _mm256_and_si256(_mm256_mullo_epi16(bytes, pow3), low);
  const __m256i odd =
      _mm256_and_si256(_mm256_mullo_epi16(_mm256_srli_epi16(bytes, 8), _mm256_srli_epi16(pow3, 8)), low);
  return _mm256_or_si256(_mm256_mulhi_epu16(even, three), _mm256_slli_epi16(_mm256_mulhi_epu16(odd, three), 8));
}

// The types unpack_block_avx2 takes: those with float kernels on an AVX2 build.
constexpr bool unpacks_avx2(int t) {
  switch (t) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K:
    case IQ1_S: case IQ1_M: case IQ2_XXS: case IQ2_XS: case IQ2_S: case IQ3_XXS: case IQ3_S: case IQ4_NL: case IQ4_XS:
    case MXFP4: case NVFP4: case TQ1_0: case TQ2_0: case F16: case BF16:
      return true;
    default:
      return false;
  }
}

// One block of a type with float kernels, unpacked: sink(i, elements i..i+7), i rising.
template <class Sink>
inline __attribute__((always_inline)) void unpack_block_avx2(int t, const uint8_t* b, const uint8_t* table,
                                                             Sink&& sink) {
  auto ld = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  // IQ4's 16 signed values (table bytes 0..15; the other types have no table)
  auto kv = [table] { return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table))); };
  uint32_t qh;
  // int16 mode's sink takes Q4_K and Q6_K super-blocks whole (and never sees the 32-weight
  // types, which legacy_q16_rows reads itself)
  constexpr bool superblocks = requires { sink.q4k_superblock(b); };
  switch (t) {
    case Q4_0:
      return scale32(sink, 0, _mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8)), true, f16_at(b));
    case Q4_1:
      return scale32_offset(sink, 0, nibbles32(b + 4), f16_at(b), f16_at(b + 2));
    case Q5_0:
      std::memcpy(&qh, b + 2, 4);
      return scale32(sink, 0, _mm256_sub_epi8(_mm256_or_si256(nibbles32(b + 6), bit4_of(qh)), _mm256_set1_epi8(16)),
                     true, f16_at(b));
    case Q5_1:
      std::memcpy(&qh, b + 4, 4);
      return scale32_offset(sink, 0, _mm256_or_si256(nibbles32(b + 8), bit4_of(qh)), f16_at(b), f16_at(b + 2));
    case Q8_0:
      return scale32(sink, 0, ld(b + 2), true, f16_at(b));
    case F16:
      for (int k = 0; k < 4; ++k) {
        sink(8 * k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * k))));
      }
      return;
    case BF16:
      for (int k = 0; k < 4; ++k) {
        const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * k)));
        sink(8 * k, _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)));
      }
      return;
    case IQ4_NL:
    case MXFP4:
      return scale32(sink, 0, _mm256_shuffle_epi8(kv(), nibbles32(nl_codes(t, b))), true, nl_scale(t, b));
    case IQ4_XS: {
      const __m256i values = kv();
      for (int sb = 0; sb < 8; ++sb) {
        const int ls = iq4xs_scale(b, sb);
        scale32(sink, 32 * sb, _mm256_shuffle_epi8(values, nibbles32(b + 8 + 16 * sb)), true,
                f16_at(b) * static_cast<float>(ls));
      }
      return;
    }
    case Q6_K: {
      if constexpr (superblocks) {
        return sink.q6k_superblock(b);
      }
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16_at(b + 208);
      for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = ld(b + 64 * h), ql1 = ld(b + 64 * h + 32), qh6 = ld(b + 128 + 32 * h);
        for (int q = 0; q < 4; ++q) {
          // codes - 32, signed; each 16 has its own scale
          const __m256i codes = _mm256_sub_epi8(q6k_codes(ql0, ql1, qh6, q), _mm256_set1_epi8(32));
          const int g = 8 * h + 2 * q;
          scale32(sink, 128 * h + 32 * q, codes, true, d * static_cast<float>(sc[g]), d * static_cast<float>(sc[g + 1]));
        }
      }
      return;
    }
    case Q2_K: { // 2-bit codes, quarter q of each half at bits 2q; scale and min per 16
      const float d = f16_at(b + 80), dmin = f16_at(b + 82);
      for (int h = 0; h < 2; ++h) {
        const __m256i qs = ld(b + 16 + 32 * h);
        for (int q = 0; q < 4; ++q) {
          const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * q), _mm256_set1_epi8(3));
          const uint8_t* sc = b + 8 * h + 2 * q;
          scale32_offset(sink, 128 * h + 32 * q, codes, d * static_cast<float>(sc[0] & 15),
                         -(dmin * static_cast<float>(sc[0] >> 4)), d * static_cast<float>(sc[1] & 15),
                         -(dmin * static_cast<float>(sc[1] >> 4)));
        }
      }
      return;
    }
    case Q3_K: { // Q2_K's low bits, and 4 subtracted where the code's hmask bit is 0
      const float d = f16_at(b + 108);
      const __m256i hmask = ld(b);
      for (int h = 0; h < 2; ++h) {
        const __m256i qs = ld(b + 32 + 32 * h);
        for (int q = 0; q < 4; ++q) {
          const __m256i low = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * q), _mm256_set1_epi8(3));
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(hmask, 4 * h + q), _mm256_set1_epi8(1));
          const __m256i codes = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 2)), _mm256_set1_epi8(4));
          const int s = 8 * h + 2 * q;
          scale32(sink, 128 * h + 32 * q, codes, true, d * q3k_scale(b + 96, s), d * q3k_scale(b + 96, s + 1));
        }
      }
      return;
    }
    case IQ1_S: // per 32: one qh word (3 high index bits per chunk, the scale, the delta sign)
      for (int g = 0; g < 8; ++g) {
        const int h = b[34 + 2 * g] | (b[35 + 2 * g] << 8);
        const bool negative = h & 0x8000;
        const int entries[4] = {b[2 + 4 * g] | ((h & 7) << 8), b[3 + 4 * g] | (((h >> 3) & 7) << 8),
                                b[4 + 4 * g] | (((h >> 6) & 7) << 8), b[5 + 4 * g] | (((h >> 9) & 7) << 8)};
        scale32(sink, 32 * g, iq1_codes(grid8x4(table, entries), {negative, negative, negative, negative}), true,
                f16_at(b) * static_cast<float>(2 * ((h >> 12) & 7) + 1) * 0.125f);
      }
      return;
    case IQ1_M: { // per chunk of 8: a nibble (3 high index bits, the delta sign); a scale per 16
      const uint8_t* sc = b + 48;
      const float d = half_to_float(static_cast<uint16_t>((sc[1] >> 4) | (sc[3] & 0xF0) | ((sc[5] & 0xF0) << 4) |
                                                          ((sc[7] & 0xF0) << 8))) * 0.125f;
      for (int g = 0; g < 8; ++g) {
        const int nibbles = b[32 + 2 * g] | (b[33 + 2 * g] << 8); // chunk k's at bits 4k
        const int entries[4] = {b[4 * g] | ((nibbles & 7) << 8), b[4 * g + 1] | (((nibbles >> 4) & 7) << 8),
                                b[4 * g + 2] | (((nibbles >> 8) & 7) << 8),
                                b[4 * g + 3] | (((nibbles >> 12) & 7) << 8)};
        const bool negative[4] = {(nibbles & 0x8) != 0, (nibbles & 0x80) != 0, (nibbles & 0x800) != 0,
                                  (nibbles & 0x8000) != 0};
        const int word = sc[2 * (g >> 1)] | (sc[2 * (g >> 1) + 1] << 8), at = 6 * (g & 1); // scales 2g, 2g + 1
        scale32(sink, 32 * g, iq1_codes(grid8x4(table, entries), negative), true,
                d * static_cast<float>(2 * ((word >> at) & 7) + 1),
                d * static_cast<float>(2 * ((word >> (at + 3)) & 7) + 1));
      }
      return;
    }
    case TQ1_0: { // base-3 digits: 5 per byte of qs[0..31], then qs[32..47], 4 per byte of qh
      const float d = f16_at(b + 52);
      const __m256i first = ld(b);
      const __m128i second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32));
      auto pow3 = [](char lo, char hi) { return _mm256_set_m128i(_mm_set1_epi8(hi), _mm_set1_epi8(lo)); };
      const __m256i sources[8] = {first, first, first, first, first, _mm256_set_m128i(second, second),
                                  _mm256_set_m128i(second, second),
                                  _mm256_set_m128i(_mm_set1_epi32(static_cast<int>(u32_at(b + 48))), second)};
      const __m256i powers[8] = {pow3(1, 1),   pow3(3, 3), pow3(9, 9),  pow3(27, 27),
                                 pow3(81, 81), pow3(1, 3), pow3(9, 27),
                                 _mm256_set_m128i(_mm_setr_epi8(1, 1, 1, 1, 3, 3, 3, 3, 9, 9, 9, 9, 27, 27, 27, 27),
                                                  _mm_set1_epi8(81))};
      for (int c = 0; c < 8; ++c) {
        scale32(sink, 32 * c, _mm256_sub_epi8(tq1_digits(sources[c], powers[c]), _mm256_set1_epi8(1)), true, d);
      }
      return;
    }
    case TQ2_0: // Q2_K's 2-bit code layout, one scale, codes - 1
      for (int h = 0; h < 2; ++h) {
        const __m256i qs = ld(b + 32 * h);
        for (int q = 0; q < 4; ++q) {
          const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * q), _mm256_set1_epi8(3));
          scale32(sink, 128 * h + 32 * q, _mm256_sub_epi8(codes, _mm256_set1_epi8(1)), true, f16_at(b + 64));
        }
      }
      return;
    case NVFP4: // per 32: two sub-blocks of 16, each 8 bytes' low nibbles then their high ones
      for (int g = 0; g < 2; ++g) {
        const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4 + 16 * g));
        const __m128i lo = _mm_and_si128(t, _mm_set1_epi8(0x0F));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(t, 4), _mm_set1_epi8(0x0F));
        const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi64(lo, hi), _mm_unpacklo_epi64(lo, hi));
        scale32(sink, 32 * g, _mm256_shuffle_epi8(kv(), codes), true, nvfp4_ue4m3(b[2 * g]), nvfp4_ue4m3(b[2 * g + 1]));
      }
      return;
    case IQ2_XXS: // per 32: 4 grid indices, then 4 x 7 sign-index bits and the scale
      for (int g = 0; g < 8; ++g) {
        const uint8_t* q = b + 2 + 8 * g;
        const uint32_t aux = u32_at(q + 4);
        uint32_t signs = 0;
        for (int k = 0; k < 4; ++k) {
          signs |= static_cast<uint32_t>(table[IQ2_XXS_SIGNS + ((aux >> (7 * k)) & 127)]) << (8 * k);
        }
        const float db = f16_at(b) * (0.5f + static_cast<float>(aux >> 28)) * 0.25f;
        scale32(sink, 32 * g, signed_grid32(grid8x4(table, {q[0], q[1], q[2], q[3]}), signs), true, db);
      }
      return;
    case IQ2_XS:
    case IQ2_S:
      for (int g = 0; g < 8; ++g) {
        int entries[4];
        uint32_t signs = 0;
        for (int k = 0; k < 4; ++k) {
          const int j = 4 * g + k;
          if (t == IQ2_XS) { // 9 bits of grid index, 7 of sign index
            const int q = b[2 + 2 * j] | (b[3 + 2 * j] << 8);
            entries[k] = q & 511;
            signs |= static_cast<uint32_t>(table[IQ2_XS_SIGNS + (q >> 9)]) << (8 * k);
          } else { // 10 bits of grid index (2 from qh), explicit signs
            entries[k] = b[2 + j] | (((b[66 + g] >> (2 * k)) & 3) << 8);
            signs |= static_cast<uint32_t>(b[34 + j]) << (8 * k);
          }
        }
        const int scales = b[t == IQ2_XS ? 66 + g : 74 + g]; // one per 16
        const float d = f16_at(b);
        scale32(sink, 32 * g, signed_grid32(grid8x4(table, entries), signs), true,
                d * (0.5f + static_cast<float>(scales & 15)) * 0.25f, d * (0.5f + static_cast<float>(scales >> 4)) * 0.25f);
      }
      return;
    case IQ3_XXS:
    case IQ3_S:
      for (int g = 0; g < 8; ++g) {
        uint32_t entries[8], signs = 0;
        float db;
        if (t == IQ3_XXS) { // 8 one-byte grid indices per 32; the scale word as IQ2_XXS's
          const uint32_t aux = u32_at(b + 66 + 4 * g);
          for (int i = 0; i < 8; ++i) {
            entries[i] = grid4(table, b[2 + 8 * g + i]);
          }
          for (int k = 0; k < 4; ++k) {
            signs |= static_cast<uint32_t>(table[IQ3_XXS_SIGNS + ((aux >> (7 * k)) & 127)]) << (8 * k);
          }
          db = f16_at(b) * (0.5f + static_cast<float>(aux >> 28)) * 0.5f;
        } else { // 9-bit indices (the high bit in qh), explicit signs, a 4-bit scale per 32
          for (int i = 0; i < 8; ++i) {
            entries[i] = grid4(table, b[2 + 8 * g + i] | (((b[66 + g] >> i) & 1) << 8));
          }
          signs = u32_at(b + 74 + 4 * g);
          db = f16_at(b) * static_cast<float>(1 + 2 * ((b[106 + g / 2] >> (4 * (g & 1))) & 15));
        }
        const __m256i mags = _mm256_setr_epi32(static_cast<int>(entries[0]), static_cast<int>(entries[1]),
                                               static_cast<int>(entries[2]), static_cast<int>(entries[3]),
                                               static_cast<int>(entries[4]), static_cast<int>(entries[5]),
                                               static_cast<int>(entries[6]), static_cast<int>(entries[7]));
        scale32(sink, 32 * g, signed_grid32(mags, signs), true, db);
      }
      return;
    case Q4_K:
      if constexpr (superblocks) {
        return sink.q4k_superblock(b);
      }
      [[fallthrough]];
    case Q5_K:
      return q45k_subblocks(b, t == Q5_K, [&sink](int j, __m256i codes, float sc, float minimum) {
        scale32_offset(sink, 32 * j, codes, sc, -minimum);
      });
    default:
      throw std::logic_error("unpack_block_avx2: a type without a float kernel");
  }
}

// One block as floats, with the float kernels' unpacking (prefill's tiles, decode's batches).
inline __attribute__((always_inline)) void dequantize_block_avx2(int t, const uint8_t* b, const uint8_t* table,
                                                                 float* v) {
  unpack_block_avx2(t, b, table, [v](int i, __m256 x) { _mm256_storeu_ps(v + i, x); });
}

// Consecutive blocks of type T (rows laid end to end are consecutive blocks) as floats.
template <int T>
void dequantize_blocks_avx2(const uint8_t* b, const uint8_t* table, float* v, long blocks, const TypeInfo& info) {
  for (long blk = 0; blk < blocks; ++blk) {
    dequantize_block_avx2(T, b + blk * info.bytes, table, v + blk * info.qk);
  }
}

// out[m * NR + r] = row m . x[r] for MW consecutive weight rows (row_bytes apart) and NR
// activation rows: each 8 weights unpacked once and multiplied into every activation row, in
// the order the register tiles below use. Every output has its own accumulator, so several
// weight rows are several independent chains of multiply-adds where one row alone waits on
// each add to its one accumulator (4 rows at one activation row: ~10% faster, Q4_1 on one
// core). Each output's sum is the same whatever MW, bit for bit.
template <int T, int MW, int NR>
__attribute__((noinline)) void fused_dots_avx2(const uint8_t* row, long row_bytes, const float* const* x, int nb,
                                               const uint8_t* table, float* out) {
  TypeInfo info;
  type_info(T, info);
  __m256 acc[MW][NR];
  for (auto& per_row : acc) {
    for (auto& a : per_row) {
      a = _mm256_setzero_ps();
    }
  }
  for (int blk = 0; blk < nb; ++blk) {
    const long base = static_cast<long>(blk) * info.qk;
#pragma GCC unroll 8 // unrolled, the accumulators stay in registers (else GCC runs rows in the inner loop)
    for (int m = 0; m < MW; ++m) {
      prefetch_ahead(row + m * row_bytes + static_cast<long>(blk) * info.bytes, info.bytes);
      unpack_block_avx2(T, row + m * row_bytes + static_cast<long>(blk) * info.bytes, table, [&](int i, __m256 w) {
        for (int r = 0; r < NR; ++r) {
          acc[m][r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[r] + base + i), acc[m][r]);
        }
      });
    }
  }
  for (int m = 0; m < MW; ++m) {
    for (int r = 0; r < NR; ++r) {
      out[m * NR + r] = hsum_ps(acc[m][r]);
    }
  }
}

template <int T>
void fused_dots_t(const uint8_t* row, long row_bytes, int nw, const float* const* x, int nr, int nb,
                  const uint8_t* table, float* out) {
  if (nw == fused_weight_rows(nr) && nw > 1) {
    return nr == 1 ? fused_dots_avx2<T, fused_weight_rows(1), 1>(row, row_bytes, x, nb, table, out)
                   : fused_dots_avx2<T, fused_weight_rows(2), 2>(row, row_bytes, x, nb, table, out);
  }
  for (int m = 0; m < nw; ++m, row += row_bytes, out += nr) {
    switch (nr) {
      case 1: fused_dots_avx2<T, 1, 1>(row, row_bytes, x, nb, table, out); break;
      case 2: fused_dots_avx2<T, 1, 2>(row, row_bytes, x, nb, table, out); break;
      case 3: fused_dots_avx2<T, 1, 3>(row, row_bytes, x, nb, table, out); break;
      case 4: fused_dots_avx2<T, 1, 4>(row, row_bytes, x, nb, table, out); break;
      case 5: fused_dots_avx2<T, 1, 5>(row, row_bytes, x, nb, table, out); break;
      default: fused_dots_avx2<T, 1, 6>(row, row_bytes, x, nb, table, out); break;
    }
  }
}

// int16 mode: out[r] = row . x[r] for NR activation rows rounded to 16-bit blocks (Q16Rows).
// Each 32 codes are widened to 16 bits once and meet every row in two madds; the sums of
// each 16 or 32 are scaled once, in float. Each output is summed in one order, whatever NR.
template <int NR>
struct Q16Sink {
  const Q16Row* x;
  long base = 0; // the block's first element
  __m256 acc[NR];
  float extra[NR]; // the offsets' part: offset * the activations' sum, per 16 or 32

  // The 32 codes as 16-bit integers, c0 the first 16: their madds with each row's 32.
  __attribute__((always_inline)) void products(int at, __m256i c0, __m256i c1, __m256i (&p)[NR][2]) const {
    for (int r = 0; r < NR; ++r) {
      const int16_t* q = x[r].q + base + at;
      p[r][0] = _mm256_madd_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
      p[r][1] = _mm256_madd_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16)));
    }
  }
  __attribute__((always_inline)) void products(int at, __m256i codes, bool sign, __m256i (&p)[NR][2]) const {
    const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
    products(at, sign ? _mm256_cvtepi8_epi16(lo) : _mm256_cvtepu8_epi16(lo),
             sign ? _mm256_cvtepi8_epi16(hi) : _mm256_cvtepu8_epi16(hi), p);
  }
  // One scale (and, where kOffset, one offset) for the 32.
  template <bool kOffset>
  __attribute__((always_inline)) void codes1(int at, __m256i codes, bool sign, float scale, float offset) {
    __m256i p[NR][2];
    products(at, codes, sign, p);
    scaled<kOffset>(at, p, scale, offset);
  }
  // A Q4_K super-block whole: per sub-block and in scalars, unpacking each scale and minimum
  // and scaling them took most of the kernel's time. Here the 8 scales and 8 minimums (6 bits
  // each, packed in 12 bytes) are unpacked together, each row's 8 activation scales meet
  // d * scale in one multiply (the product the sub-block walk rounds, lane for lane), and the
  // minimums' part, -dmin * minimum times each sub-block's activation sum, is one
  // multiply-add into the accumulator per row.
  __attribute__((always_inline)) void q4k_superblock(const uint8_t* b) {
    uint32_t s[3];
    std::memcpy(s, b + 4, 12);
    // bytes 0-7: sub-blocks 0-7's scales; bytes 8-15: their minimums
    const __m128i six_bits = _mm_setr_epi32(
        static_cast<int>(s[0] & 0x3F3F3F3F), static_cast<int>((s[2] & 0x0F0F0F0F) | ((s[0] >> 6) & 0x03030303) << 4),
        static_cast<int>(s[1] & 0x3F3F3F3F), static_cast<int>(((s[2] >> 4) & 0x0F0F0F0F) | ((s[1] >> 6) & 0x03030303) << 4));
    const __m128 d_dmin = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(u32_at(b)))); // exact
    const __m256 scale = _mm256_mul_ps(_mm256_broadcastss_ps(d_dmin),
                                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(six_bits)));
    const __m256 minimum = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_sub_ss(_mm_setzero_ps(), _mm_movehdup_ps(d_dmin))),
                                         _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(six_bits, 8))));
    // hadd pairs the sums per 16 as sub-blocks 0 1 4 5 2 3 6 7: the minimums follow suit
    const __m256 minimum_hadd_order =
        _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(minimum), 0xD8));
    const long blk = base / kQ16;
    alignas(32) float scales[NR][8];
    for (int r = 0; r < NR; ++r) {
      _mm256_store_ps(scales[r], _mm256_mul_ps(scale, _mm256_loadu_ps(x[r].d + blk)));
      const __m256 sums = _mm256_hadd_ps(_mm256_loadu_ps(x[r].ds + 2 * blk), _mm256_loadu_ps(x[r].ds + 2 * blk + 8));
      acc[r] = _mm256_fmadd_ps(minimum_hadd_order, sums, acc[r]);
    }
    const __m256i mask = _mm256_set1_epi16(0x0F);
    for (int k = 0; k < 4; ++k) { // each 32 bytes: sub-block 2k's codes are their low nibbles, 2k + 1's the high
      const __m256i v0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 + 32 * k)));
      const __m256i v1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 + 32 * k)));
      for (int half = 0; half < 2; ++half) {
        __m256i p[NR][2];
        products(64 * k + 32 * half, half ? _mm256_srli_epi16(v0, 4) : _mm256_and_si256(v0, mask),
                 half ? _mm256_srli_epi16(v1, 4) : _mm256_and_si256(v1, mask), p);
        for (int r = 0; r < NR; ++r) {
          acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scales[r][2 * k + half]),
                                   _mm256_cvtepi32_ps(_mm256_add_epi32(p[r][0], p[r][1])), acc[r]);
        }
      }
    }
  }
  // A Q6_K super-block whole, likewise: its 16 scales (int8, one per 16) times d in two
  // vectors, each row's activation scales (one per 32, so each taken twice) multiplied in
  // with them, the sums then as the per-16 walk adds them, bit for bit.
  __attribute__((always_inline)) void q6k_superblock(const uint8_t* b) {
    const __m256 d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(b[208] | (b[209] << 8)))); // exact
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    const __m256 scale_lo = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
    const __m256 scale_hi = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
    const long blk = base / kQ16;
    alignas(32) float scales[NR][16];
    for (int r = 0; r < NR; ++r) {
      const __m256 xd = _mm256_loadu_ps(x[r].d + blk);
      _mm256_store_ps(scales[r], _mm256_mul_ps(scale_lo, _mm256_permutevar8x32_ps(xd, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3))));
      _mm256_store_ps(scales[r] + 8,
                      _mm256_mul_ps(scale_hi, _mm256_permutevar8x32_ps(xd, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7))));
    }
    for (int h = 0; h < 2; ++h) {
      auto ld = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
      const __m256i ql0 = ld(b + 64 * h), ql1 = ld(b + 64 * h + 32), qh = ld(b + 128 + 32 * h);
      for (int q = 0; q < 4; ++q) {
        const __m256i codes = _mm256_sub_epi8(q6k_codes(ql0, ql1, qh, q), _mm256_set1_epi8(32)); // signed
        __m256i p[NR][2];
        products(128 * h + 32 * q, codes, true, p);
        const int g = 8 * h + 2 * q;
        for (int r = 0; r < NR; ++r) {
          acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scales[r][g]), _mm256_cvtepi32_ps(p[r][0]), acc[r]);
          acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scales[r][g + 1]), _mm256_cvtepi32_ps(p[r][1]), acc[r]);
        }
      }
    }
  }
  template <bool kOffset>
  __attribute__((always_inline)) void scaled(int at, __m256i (&p)[NR][2], float scale, float offset) {
    const long blk = (base + at) / kQ16;
    for (int r = 0; r < NR; ++r) {
      const float d = x[r].d[blk];
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale * d), _mm256_cvtepi32_ps(_mm256_add_epi32(p[r][0], p[r][1])), acc[r]);
      if constexpr (kOffset) {
        extra[r] += offset * (x[r].ds[2 * blk] + x[r].ds[2 * blk + 1]);
      }
    }
  }
  // A scale and an offset for each 16 (offsets 0 where the type has none).
  __attribute__((always_inline)) void codes(int at, __m256i codes, bool sign, float scale, float scale_hi, float offset,
                                            float offset_hi) {
    __m256i p[NR][2];
    products(at, codes, sign, p);
    const long blk = (base + at) / kQ16;
    for (int r = 0; r < NR; ++r) {
      const float d = x[r].d[blk];
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale * d), _mm256_cvtepi32_ps(p[r][0]), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale_hi * d), _mm256_cvtepi32_ps(p[r][1]), acc[r]);
      if (offset != 0.f || offset_hi != 0.f) {
        extra[r] += offset * x[r].ds[2 * blk] + offset_hi * x[r].ds[2 * blk + 1];
      }
    }
  }
  // F16 / BF16 blocks hand over values, not codes; int16 mode never reads them (q16_kernel).
  void operator()(int, __m256) const { __builtin_unreachable(); }
};

// The 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) in int16 mode, a block per step: its codes meet
// each activation row in two madds, and its scale and offset, converted together, meet the
// row's (d, d * sum) pair in one multiply, so a block costs a dozen and a half instructions
// where the sink's scalar scale and offset arithmetic took thirty.
template <int T, int NR, int MW>
__attribute__((always_inline)) inline void legacy_q16_rows(const uint8_t* row, long row_bytes, const Q16Row* x,
                                                           int nb, float* y, long O) {
  constexpr int kBytes = T == Q8_0 ? 34 : T == Q5_1 ? 24 : T == Q5_0 ? 22 : T == Q4_1 ? 20 : 18;
  constexpr bool kOffset = T == Q4_1 || T == Q5_1;
  __m256 acc[MW][NR];
  __m128 offsets[MW][NR]; // lane 1: the offsets' part (Q4_1, Q5_1)
  for (int m = 0; m < MW; ++m) {
    for (int r = 0; r < NR; ++r) {
      acc[m][r] = _mm256_setzero_ps();
      offsets[m][r] = _mm_setzero_ps();
    }
  }
  for (int blk = 0; blk < nb; ++blk) {
#pragma GCC unroll 2
    for (int m = 0; m < MW; ++m) {
      const uint8_t* b = row + m * row_bytes + static_cast<long>(blk) * kBytes;
      prefetch_ahead(b, kBytes);
      __m256i c0, c1;
      if constexpr (T == Q8_0) {
        c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
        c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)));
      } else if constexpr (T == Q5_0 || T == Q5_1) { // the fifth bits from the 32 before the nibbles
        // Q5_0's codes are the 5 bits less 16: where the fifth bit is clear, 0xF0 | nibble is
        // nibble - 16 as a signed byte, and where it is set, the nibble (one instruction
        // fewer than adding the bit and subtracting 16)
        const __m256i fifth = bits_as_bytes(u32_at(b + kBytes - 20));
        const __m256i codes = _mm256_or_si256(
            nibbles32(b + kBytes - 16), T == Q5_0 ? _mm256_andnot_si256(fifth, _mm256_set1_epi8(static_cast<char>(0xF0)))
                                                  : _mm256_and_si256(fifth, _mm256_set1_epi8(0x10)));
        const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
        c0 = T == Q5_0 ? _mm256_cvtepi8_epi16(lo) : _mm256_cvtepu8_epi16(lo);
        c1 = T == Q5_0 ? _mm256_cvtepi8_epi16(hi) : _mm256_cvtepu8_epi16(hi);
      } else {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kBytes - 16)));
        c0 = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
        c1 = _mm256_srli_epi16(v, 4);
        if constexpr (T == Q4_0) {
          c0 = _mm256_sub_epi16(c0, _mm256_set1_epi16(8));
          c1 = _mm256_sub_epi16(c1, _mm256_set1_epi16(8));
        }
      }
      // (scale, offset) as floats (exact); lane 1 is read only where the type has an offset
      const __m128 scales = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(u32_at(b))));
      for (int r = 0; r < NR; ++r) {
        const int16_t* q = x[r].q + static_cast<long>(blk) * kQ16;
        const __m256i p = _mm256_add_epi32(
            _mm256_madd_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
            _mm256_madd_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16))));
        const __m128 f = _mm_mul_ps(scales, _mm_loadu_ps(x[r].dsum + 2 * blk)); // (d * xd, offset * xd * sum)
        acc[m][r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(f), _mm256_cvtepi32_ps(p), acc[m][r]);
        if constexpr (kOffset) {
          offsets[m][r] = _mm_add_ps(offsets[m][r], f);
        }
      }
    }
  }
  for (int m = 0; m < MW; ++m) {
    for (int r = 0; r < NR; ++r) {
      y[r * O + m] = hsum_ps(acc[m][r]) + (kOffset ? _mm_cvtss_f32(_mm_movehdup_ps(offsets[m][r])) : 0.f);
    }
  }
}

// y[r * O + o] = row o . x[r] for the weight rows o0..o1 (row_bytes apart) and NR activation rows.
// Two weight rows at a time at one activation row: two independent chains of multiply-adds
// (one row alone waits on each add to its accumulators; one core, weights from L3: Q4_K
// 12.9 -> 13.7 Gweights/s, Q6_K 8.6 -> 10.7, Q4_1 15.1 -> 16.1), but Q8_0's rows one at a
// time (17.4, 10.9-13.7 in pairs). Each output's sum is the same either way, bit for bit.
template <int T, int NR>
__attribute__((noinline)) void q16_rows_avx2(const uint8_t* w, long row_bytes, long o0, long o1, const Q16Row* x,
                                             int nb, const uint8_t* table, float* y, long O) {
  TypeInfo info;
  type_info(T, info);
  constexpr int MW = NR == 1 && T != Q8_0 ? 2 : 1;
  long o = o0;
  if constexpr (T == Q4_0 || T == Q4_1 || T == Q5_0 || T == Q5_1 || T == Q8_0) {
    for (; o + MW <= o1; o += MW) {
      legacy_q16_rows<T, NR, MW>(w + o * row_bytes, row_bytes, x, nb, y + o, O);
    }
    for (; o < o1; ++o) {
      legacy_q16_rows<T, NR, 1>(w + o * row_bytes, row_bytes, x, nb, y + o, O);
    }
    return;
  }
  auto rows = [&]<int M>() {
    Q16Sink<NR> sinks[M] = {};
    for (auto& sink : sinks) {
      sink.x = x;
    }
    const uint8_t* row = w + o * row_bytes;
    for (int blk = 0; blk < nb; ++blk) {
      const long at = static_cast<long>(blk) * info.bytes;
#pragma GCC unroll 2
      for (int m = 0; m < M; ++m) {
        sinks[m].base = static_cast<long>(blk) * info.qk;
        prefetch_ahead(row + m * row_bytes + at, info.bytes);
        unpack_block_avx2(T, row + m * row_bytes + at, table, sinks[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < NR; ++r) {
        y[r * O + o + m] = hsum_ps(sinks[m].acc[r]) + sinks[m].extra[r];
      }
    }
    o += M;
  };
  while (o + MW <= o1) {
    rows.template operator()<MW>();
  }
  while (o < o1) {
    rows.template operator()<1>();
  }
}

template <int T>
void q16_rows_t(const uint8_t* w, long row_bytes, long o0, long o1, const Q16Row* x, int nr, int nb,
                const uint8_t* table, float* y, long O) {
  switch (nr) {
    case 1: return q16_rows_avx2<T, 1>(w, row_bytes, o0, o1, x, nb, table, y, O);
    case 2: return q16_rows_avx2<T, 2>(w, row_bytes, o0, o1, x, nb, table, y, O);
    case 3: return q16_rows_avx2<T, 3>(w, row_bytes, o0, o1, x, nb, table, y, O);
    default: return q16_rows_avx2<T, 4>(w, row_bytes, o0, o1, x, nb, table, y, O);
  }
}
#endif

// Whether the AVX2 kernels run (they are compiled in on x86-64, whose build targets
// x86-64-v3); tests turn them off to check the portable path on the same machine.
bool g_use_simd = true;

float dot_q8(int t, const uint8_t* row, const Q8Row& x, int nb, const uint8_t* table) {
  const bool iq4 = is_iq4(t);
#if defined(__AVX2__)
  if (g_use_simd && iq4) {
    return dot_iq4_avx2(t, row, x, nb, table);
  }
  if (g_use_simd) {
    return (t == Q4_K || t == Q5_K || t == Q6_K) ? dot_k_avx2(t, row, x, nb) : dot_legacy_avx2(t, row, x, nb);
  }
#endif
  return iq4 ? dot_iq4_portable(t, row, x, nb, table) : dot_portable(t, row, x, nb);
}

// Whether float activations meet type t's blocks in a dedicated kernel here (else they go
// through the block decoders, the portable float path).
bool float_kernel(int t) {
#if defined(__AVX2__)
  return g_use_simd && unpacks_avx2(t);
#else
  return false;
#endif
}

constexpr int kFusedRows = 6; // up to this many activation rows multiply a row's blocks as they unpack
                              // (measured even with the register tiles at 7-8 rows)

// out[m * nr + r] = row m . x[r] for nw weight rows (row_bytes apart) and nr (1 to kFusedRows)
// activation rows, one unpacking of each weight row.
void fused_dots(int t, const uint8_t* row, long row_bytes, int nw, const float* const* x, int nr, int nb,
                const uint8_t* table, float* out) {
#if defined(__AVX2__)
  switch (t) {
    case Q4_0: return fused_dots_t<Q4_0>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q4_1: return fused_dots_t<Q4_1>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q5_0: return fused_dots_t<Q5_0>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q5_1: return fused_dots_t<Q5_1>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q8_0: return fused_dots_t<Q8_0>(row, row_bytes, nw, x, nr, nb, table, out);
    case F16: return fused_dots_t<F16>(row, row_bytes, nw, x, nr, nb, table, out);
    case BF16: return fused_dots_t<BF16>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q2_K: return fused_dots_t<Q2_K>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q3_K: return fused_dots_t<Q3_K>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ1_S: return fused_dots_t<IQ1_S>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ1_M: return fused_dots_t<IQ1_M>(row, row_bytes, nw, x, nr, nb, table, out);
    case TQ1_0: return fused_dots_t<TQ1_0>(row, row_bytes, nw, x, nr, nb, table, out);
    case TQ2_0: return fused_dots_t<TQ2_0>(row, row_bytes, nw, x, nr, nb, table, out);
    case NVFP4: return fused_dots_t<NVFP4>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ2_XXS: return fused_dots_t<IQ2_XXS>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ2_XS: return fused_dots_t<IQ2_XS>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ2_S: return fused_dots_t<IQ2_S>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ3_XXS: return fused_dots_t<IQ3_XXS>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ3_S: return fused_dots_t<IQ3_S>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q4_K: return fused_dots_t<Q4_K>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q5_K: return fused_dots_t<Q5_K>(row, row_bytes, nw, x, nr, nb, table, out);
    case Q6_K: return fused_dots_t<Q6_K>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ4_NL: return fused_dots_t<IQ4_NL>(row, row_bytes, nw, x, nr, nb, table, out);
    case IQ4_XS: return fused_dots_t<IQ4_XS>(row, row_bytes, nw, x, nr, nb, table, out);
    case MXFP4: return fused_dots_t<MXFP4>(row, row_bytes, nw, x, nr, nb, table, out);
    default: break;
  }
#endif
  throw std::logic_error("fused_dots without a float kernel");
}

// Whether int16 mode's dots take type t: every type the float kernels unpack into integer
// codes (all but the halves, whose values are not codes).
bool q16_kernel(int t) { return float_kernel(t) && t != F16 && t != BF16; }

constexpr int kQ16Rows = 4; // activation rows per pass over a weight row in int16 mode

// y[r * O + o] = row o . x[r] for the weight rows o0..o1 and nr (1 to kQ16Rows) activation
// rows in int16 mode: one dispatch per range, not per row.
void q16_rows(int t, const uint8_t* w, long row_bytes, long o0, long o1, const Q16Row* x, int nr, int nb,
              const uint8_t* table, float* y, long O) {
#if defined(__AVX2__)
  switch (t) {
    case Q4_0: return q16_rows_t<Q4_0>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q4_1: return q16_rows_t<Q4_1>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q5_0: return q16_rows_t<Q5_0>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q5_1: return q16_rows_t<Q5_1>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q8_0: return q16_rows_t<Q8_0>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q2_K: return q16_rows_t<Q2_K>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q3_K: return q16_rows_t<Q3_K>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ1_S: return q16_rows_t<IQ1_S>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ1_M: return q16_rows_t<IQ1_M>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case TQ1_0: return q16_rows_t<TQ1_0>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case TQ2_0: return q16_rows_t<TQ2_0>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case NVFP4: return q16_rows_t<NVFP4>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ2_XXS: return q16_rows_t<IQ2_XXS>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ2_XS: return q16_rows_t<IQ2_XS>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ2_S: return q16_rows_t<IQ2_S>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ3_XXS: return q16_rows_t<IQ3_XXS>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ3_S: return q16_rows_t<IQ3_S>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q4_K: return q16_rows_t<Q4_K>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q5_K: return q16_rows_t<Q5_K>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case Q6_K: return q16_rows_t<Q6_K>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ4_NL: return q16_rows_t<IQ4_NL>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case IQ4_XS: return q16_rows_t<IQ4_XS>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    case MXFP4: return q16_rows_t<MXFP4>(w, row_bytes, o0, o1, x, nr, nb, table, y, O);
    default: break;
  }
#endif
  throw std::logic_error("q16_rows without an int16 kernel");
}

// ------------------------------------------------------------------ the products

// A weight row decoded to floats (v, I of them): bit for bit gguf-py's values, with the
// float kernels' AVX2 unpacking where the type has it, else the shared block decoders.
void dequantize_rows(int t, const TypeInfo& info, const uint8_t* w, const uint8_t* table, float* out, int I, long r0,
                     long r1);

void decode_row(int t, const TypeInfo& info, const uint8_t* row, const uint8_t* table, float* v, int I) {
  dequantize_rows(t, info, row, table, v, I, 0, 1);
}

// out[m * NR + r] = v[m] . x[r] for MR decoded weight rows and NR activation rows: a
// register tile, so each load of v or x feeds several multiply-adds (one activation row
// per weight row would be bound by reloading x from L2). I is a multiple of 32 (every
// block holds a multiple of 32 weights).
#if defined(__AVX2__)
template <int MR, int NR>
__attribute__((noinline)) void tile_avx2(const float* const* v, const float* const* x, int I, float* out) {
  __m256 acc[MR][NR];
  for (auto& row : acc) {
    for (auto& a : row) {
      a = _mm256_setzero_ps();
    }
  }
  for (int i = 0; i < I; i += 8) {
    __m256 xs[NR];
    for (int r = 0; r < NR; ++r) {
      xs[r] = _mm256_loadu_ps(x[r] + i);
    }
    for (int m = 0; m < MR; ++m) {
      const __m256 w = _mm256_loadu_ps(v[m] + i);
      for (int r = 0; r < NR; ++r) {
        acc[m][r] = _mm256_fmadd_ps(w, xs[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < NR; ++r) {
      out[m * NR + r] = hsum_ps(acc[m][r]);
    }
  }
}

template <int MR>
void tile_rows_avx2(const float* const* v, const float* const* x, int nr, int I, float* out) {
  switch (nr) {
    case 1: return tile_avx2<MR, 1>(v, x, I, out);
    case 2: return tile_avx2<MR, 2>(v, x, I, out);
    default: return tile_avx2<MR, 3>(v, x, I, out);
  }
}
#endif

constexpr int kTileM = 4; // decoded weight rows per register tile
constexpr int kTileN = 3; // activation rows per register tile

// out[m * nr + r] = v[m] . x[r] for mr <= kTileM weight rows and nr <= kTileN activation rows.
void dots_decoded(const float* const* v, const float* const* x, int mr, int nr, int I, float* out) {
#if defined(__AVX2__)
  if (g_use_simd) {
    switch (mr) {
      case 1: return tile_rows_avx2<1>(v, x, nr, I, out);
      case 2: return tile_rows_avx2<2>(v, x, nr, I, out);
      case 3: return tile_rows_avx2<3>(v, x, nr, I, out);
      default: return tile_rows_avx2<4>(v, x, nr, I, out);
    }
  }
#endif
  for (int m = 0; m < mr; ++m) {
    for (int r = 0; r < nr; ++r) { // 8 partial sums: the compiler vectorizes them
      float acc[8] = {};
      for (int i = 0; i < I; i += 8) {
        for (int k = 0; k < 8; ++k) {
          acc[k] += v[m][i + k] * x[r][i + k];
        }
      }
      float sum = 0.f;
      for (float a : acc) {
        sum += a;
      }
      out[m * nr + r] = sum;
    }
  }
}

constexpr int kMatvecRows = 16; // up to this many activation rows the matvec runs

// A product's activation rows as decode's kernels read them: float rows, and in int16 mode
// (q16 set) their 16-bit blocks.
struct ActivationRows {
  const float* const* xs;
  const Q16Row* q16;
  int B;
};

// y[b * ldy + o] = W[o] . x[b] for n weight rows (row_bytes apart from w), in float or int16
// activations, on this thread: the work matvec's threads split, and an expert's in
// gather_matmul. Every output is summed the same whatever n and the rows' offsets.
void matvec_rows(int t, const TypeInfo& info, const ActivationRows& x, const uint8_t* w, const uint8_t* table,
                 float* y, long ldy, int I, long n) {
  const int nb = I / info.qk, B = x.B;
  const long row_bytes = static_cast<long>(nb) * info.bytes;
  if (x.q16 != nullptr) {
    for (int b0 = 0; b0 < B; b0 += kQ16Rows) {
      q16_rows(t, w, row_bytes, 0, n, x.q16 + b0, std::min(kQ16Rows, B - b0), nb, table, y + b0 * ldy, ldy);
    }
    return;
  }
  if (float_kernel(t) && B <= kFusedRows) { // each weight row's blocks meet every x as they unpack
    const int together = fused_weight_rows(B);
    float out[kFusedRows * fused_weight_rows(1)];
    for (long o = 0; o < n;) {
      const int nw = static_cast<int>(std::min<long>(together, n - o));
      fused_dots(t, w + o * row_bytes, row_bytes, nw, x.xs, B, nb, table, out);
      for (int m = 0; m < nw; ++m, ++o) {
        for (int b = 0; b < B; ++b) {
          y[b * ldy + o] = out[m * B + b];
        }
      }
    }
    return;
  }
  // More rows: kTileM weight rows decoded to floats (in L1), then register tiles over x.
  std::vector<float> v(static_cast<size_t>(kTileM) * I);
  const float* vs[kTileM];
  float out[kTileM * kTileN];
  for (long o0 = 0; o0 < n; o0 += kTileM) {
    const int mr = static_cast<int>(std::min<long>(kTileM, n - o0));
    for (int m = 0; m < mr; ++m) {
      vs[m] = v.data() + static_cast<long>(m) * I;
      decode_row(t, info, w + (o0 + m) * row_bytes, table, v.data() + static_cast<long>(m) * I, I);
    }
    for (int b0 = 0, nr; b0 < B; b0 += nr) {
      nr = B - b0 == 4 ? 2 : std::min(kTileN, B - b0); // 4 rows as 2 + 2, not 3 + a lone 1
      dots_decoded(vs, x.xs + b0, mr, nr, I, out);
      for (int m = 0; m < mr; ++m) {
        for (int r = 0; r < nr; ++r) {
          y[(b0 + r) * ldy + o0 + m] = out[m * nr + r];
        }
      }
    }
  }
}

void matvec(int t, const TypeInfo& info, const float* x, const uint8_t* w, const uint8_t* table, float* y, int B,
            int I, int O, Activations act) {
  const int nb = I / info.qk;
  const long row_bytes = static_cast<long>(nb) * info.bytes;
  if (B == 0) {
    return;
  }
  if (info.path == Path::FLOAT || act != Activations::INT8) {
    const bool int16 = act == Activations::INT16 && q16_kernel(t);
    const Q16Rows q16(x, int16 ? B : 0, I);
    std::vector<Q16Row> rows;
    std::vector<const float*> xs(B);
    for (int b = 0; b < B; ++b) {
      xs[b] = x + static_cast<long>(b) * I;
      if (int16) {
        rows.push_back(q16.row(b));
      }
    }
    const ActivationRows in{xs.data(), int16 ? rows.data() : nullptr, B};
    parallel_ranges(O, row_bytes * B, [&](long r0, long r1) {
      matvec_rows(t, info, in, w + r0 * row_bytes, table, y + r0, O, I, r1 - r0);
    });
    return;
  }
  const Q8Rows q8(x, B, I, info.path == Path::Q8_32 ? 32 : 256);
  std::vector<Q8Row> rows;
  for (int b = 0; b < B; ++b) {
    rows.push_back(q8.row(b));
  }
  parallel_ranges(O, row_bytes * B, [&](long r0, long r1) {
    for (long o = r0; o < r1; ++o) {
      const uint8_t* row = w + o * row_bytes;
      for (int b = 0; b < B; ++b) {
        y[static_cast<long>(b) * O + o] = dot_q8(t, row, rows[b], nb, table);
      }
    }
  });
}

// y[n, j] = x[n] @ W[e].T for e = indices[n, j], W's experts (E, O, bytes per row) read where
// they lie, only the chosen ones: a decode step's experts, in float activations. The output
// rows of all (n, j) form one range that the threads split, so k experts keep them all busy.
void gather_matvec(int t, const TypeInfo& info, const float* x, const uint8_t* w, const uint8_t* table,
                   const uint32_t* indices, float* y, int N, int k, int I, int O, int E, Activations act) {
  const int nb = I / info.qk;
  const long row_bytes = static_cast<long>(nb) * info.bytes;
  const bool dedicated = float_kernel(t);
  const bool int16 = act == Activations::INT16 && q16_kernel(t);
  const Q16Rows q16(x, int16 ? N : 0, I);
  parallel_ranges(static_cast<long>(N) * k * O, row_bytes, [&](long r0, long r1) {
    std::vector<float> v(dedicated ? 0 : I);
    for (long u = r0; u < r1; ++u) {
      const long slot = u / O, n = slot / k;
      const uint32_t e = indices[slot];
      if (e >= static_cast<uint32_t>(E)) { // no such expert: a visible NaN, never a stray read
        y[u] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const uint8_t* row = w + (static_cast<long>(e) * O + u % O) * row_bytes;
      const float* xr = x + n * I;
      if (int16) { // the rest of this slot's rows in the range, in one call
        const Q16Row xq = q16.row(static_cast<int>(n));
        const long o = u % O, end = std::min(r1, (slot + 1) * O);
        q16_rows(t, w + static_cast<long>(e) * O * row_bytes, row_bytes, o, o + (end - u), &xq, 1, nb, table,
                 y + slot * O, O);
        u = end - 1;
        continue;
      }
      if (dedicated) { // the expert's next rows together, as far as they stay in this range and slot
        const int nw = static_cast<int>(std::min({static_cast<long>(fused_weight_rows(1)), r1 - u, O - u % O}));
        fused_dots(t, row, row_bytes, nw, &xr, 1, nb, table, y + u);
        u += nw - 1;
        continue;
      }
      decode_row(t, info, row, table, v.data(), I);
      const float* vr = v.data();
      dots_decoded(&vr, &xr, 1, 1, I, y + u);
    }
  });
}

void dequantize_rows(int t, const TypeInfo& info, const uint8_t* w, const uint8_t* table, float* out, int I, long r0,
                     long r1) {
  const int nb = I / info.qk;
  const long row_bytes = static_cast<long>(nb) * info.bytes;
#if defined(__AVX2__)
  if (float_kernel(t)) {
    const long blocks = (r1 - r0) * nb;
    w += r0 * row_bytes;
    out += r0 * I;
    switch (t) { // the type a constant in each loop: the block's unpacking inlined, no call per block
      case Q4_0: return dequantize_blocks_avx2<Q4_0>(w, table, out, blocks, info);
      case Q4_1: return dequantize_blocks_avx2<Q4_1>(w, table, out, blocks, info);
      case Q5_0: return dequantize_blocks_avx2<Q5_0>(w, table, out, blocks, info);
      case Q5_1: return dequantize_blocks_avx2<Q5_1>(w, table, out, blocks, info);
      case Q8_0: return dequantize_blocks_avx2<Q8_0>(w, table, out, blocks, info);
      case F16: return dequantize_blocks_avx2<F16>(w, table, out, blocks, info);
      case BF16: return dequantize_blocks_avx2<BF16>(w, table, out, blocks, info);
      case Q2_K: return dequantize_blocks_avx2<Q2_K>(w, table, out, blocks, info);
      case Q3_K: return dequantize_blocks_avx2<Q3_K>(w, table, out, blocks, info);
      case IQ1_S: return dequantize_blocks_avx2<IQ1_S>(w, table, out, blocks, info);
      case IQ1_M: return dequantize_blocks_avx2<IQ1_M>(w, table, out, blocks, info);
      case TQ1_0: return dequantize_blocks_avx2<TQ1_0>(w, table, out, blocks, info);
      case TQ2_0: return dequantize_blocks_avx2<TQ2_0>(w, table, out, blocks, info);
      case NVFP4: return dequantize_blocks_avx2<NVFP4>(w, table, out, blocks, info);
      case IQ2_XXS: return dequantize_blocks_avx2<IQ2_XXS>(w, table, out, blocks, info);
      case IQ2_XS: return dequantize_blocks_avx2<IQ2_XS>(w, table, out, blocks, info);
      case IQ2_S: return dequantize_blocks_avx2<IQ2_S>(w, table, out, blocks, info);
      case IQ3_XXS: return dequantize_blocks_avx2<IQ3_XXS>(w, table, out, blocks, info);
      case IQ3_S: return dequantize_blocks_avx2<IQ3_S>(w, table, out, blocks, info);
      case Q4_K: return dequantize_blocks_avx2<Q4_K>(w, table, out, blocks, info);
      case Q5_K: return dequantize_blocks_avx2<Q5_K>(w, table, out, blocks, info);
      case Q6_K: return dequantize_blocks_avx2<Q6_K>(w, table, out, blocks, info);
      case IQ4_NL: return dequantize_blocks_avx2<IQ4_NL>(w, table, out, blocks, info);
      case IQ4_XS: return dequantize_blocks_avx2<IQ4_XS>(w, table, out, blocks, info);
      case MXFP4: return dequantize_blocks_avx2<MXFP4>(w, table, out, blocks, info);
      default: break;
    }
  }
#endif
  for (long o = r0; o < r1; ++o) {
    for (int blk = 0; blk < nb; ++blk) {
      dequantize_block(t, w + o * row_bytes + blk * info.bytes, table, out + o * I + static_cast<long>(blk) * info.qk);
    }
  }
}

void dequantize(int t, const TypeInfo& info, const uint8_t* w, const uint8_t* table, float* out, int I, int O) {
  parallel_ranges(O, static_cast<long>(I) * 4, [&](long r0, long r1) {
    dequantize_rows(t, info, w, table, out, I, r0, r1);
  });
}

// Prefill: y (B, O) = x (B, I) @ W.T. The threads pack the activations' panels, then claim
// tiles of weight rows; each dequantizes its tile (a few hundred KB, in cache) and
// multiplies it, so no float copy of the weight exists and no thread waits for another.
constexpr int kTileRows = 64;

void matmul_tiles(int t, const TypeInfo& info, const float* x, const uint8_t* w, const uint8_t* table, float* y, int B,
                  int I, int O, Activations act) {
  std::vector<float> rounded; // the activations decode's integer dots see, so prefill agrees with decode
  if (act == Activations::INT16 && q16_kernel(t)) {
    rounded = Q16Rows(x, B, I).dequantized();
    x = rounded.data();
  } else if (act == Activations::INT8 && info.path != Path::FLOAT) {
    rounded = Q8Rows(x, B, I, info.path == Path::Q8_32 ? 32 : 256).dequantized();
    x = rounded.data();
  }
  const long row_bytes = static_cast<long>(I / info.qk) * info.bytes;
  PackedRows a(B, I);
  std::vector<const float*> rows(B);
  for (int b = 0; b < B; ++b) {
    rows[b] = x + static_cast<long>(b) * I;
  }
  parallel_ranges(a.panels(), 4L * a.panel_rows() * I, [&](long p0, long p1) {
    a.pack(rows.data(), static_cast<int>(p0), static_cast<int>(p1));
  });
  const long tiles = (O + kTileRows - 1) / kTileRows;
  parallel_ranges(tiles, 4L * B * I, [&](long t0, long t1) {
    std::vector<float> buf(static_cast<size_t>(kTileRows) * I);
    for (long tile = t0; tile < t1; ++tile) {
      const long o0 = tile * kTileRows;
      const int n = static_cast<int>(std::min<long>(kTileRows, O - o0));
      dequantize_rows(t, info, w + o0 * row_bytes, table, buf.data(), I, 0, n);
      weight_tile_product(a, buf.data(), n, y + o0, O);
    }
  });
}

// Prefill's experts: y[slot] = x[slot / k] @ W[e].T, e = indices[slot], W (E, O, bytes per
// row), for more than kMatvecRows rows. Each chosen expert multiplies its rows together as
// gguf_matmul multiplies a block of rows (the matvec up to kMatvecRows rows, else
// dequantized tiles of kTileRows weight rows and one GEMM each, the activations rounded as
// decode rounds them): the products of gathering each expert's rows and multiplying them,
// bit for bit, without the gathers, joins and reading of the choices on the host that
// grouping rows in MLX ops took. The threads claim (expert, tile) units over all experts.
void gather_matmul(int t, const TypeInfo& info, const float* x, const uint8_t* w, const uint8_t* table,
                   const uint32_t* indices, float* y, int N, int k, int I, int O, int E, Activations act) {
  const long slots = static_cast<long>(N) * k, row_bytes = static_cast<long>(I / info.qk) * info.bytes;
  // The slots grouped by expert, in order within each (a counting sort): expert e's are
  // order[first[e]..first[e + 1]).
  std::vector<long> first(static_cast<size_t>(E) + 1, 0), order(slots);
  for (long s = 0; s < slots; ++s) {
    if (indices[s] < static_cast<uint32_t>(E)) {
      ++first[indices[s] + 1];
    } else { // no such expert: a visible NaN, never a stray read
      std::fill(y + s * O, y + (s + 1) * O, std::numeric_limits<float>::quiet_NaN());
    }
  }
  for (int e = 0; e < E; ++e) {
    first[e + 1] += first[e];
  }
  std::vector<long> next(first.begin(), first.end() - 1);
  for (long s = 0; s < slots; ++s) {
    if (indices[s] < static_cast<uint32_t>(E)) {
      order[next[indices[s]]++] = s;
    }
  }
  std::vector<int> chosen;
  for (int e = 0; e < E; ++e) {
    if (first[e + 1] > first[e]) {
      chosen.push_back(e);
    }
  }
  const bool int16 = act == Activations::INT16 && q16_kernel(t);
  const Q16Rows q16(x, int16 ? N : 0, I);
  const std::vector<float> rounded = int16 ? q16.dequantized() : std::vector<float>();
  const float* xs = int16 ? rounded.data() : x; // as matmul_tiles multiplies them
  const long tiles = (O + kTileRows - 1) / kTileRows;
  const long rows_per_expert = chosen.empty() ? 0 : slots / static_cast<long>(chosen.size());
  parallel_ranges(static_cast<long>(chosen.size()) * tiles, 4L * rows_per_expert * I + kTileRows * row_bytes,
                  [&](long u0, long u1) {
    std::vector<float> buf, out;
    std::optional<PackedRows> a;
    std::vector<const float*> row_ptrs;
    std::vector<Q16Row> q16_rows_of;
    int current = -1;
    for (long u = u0; u < u1; ++u) {
      const int e = chosen[u / tiles];
      const long* rows = order.data() + first[e];
      const int R = static_cast<int>(first[e + 1] - first[e]);
      if (e != current) { // this expert's rows, as its matvec or its GEMM reads them
        current = e;
        row_ptrs.clear();
        q16_rows_of.clear();
        for (int r = 0; r < R; ++r) {
          const long n = rows[r] / k;
          row_ptrs.push_back((R > kMatvecRows ? xs : x) + n * I);
          if (int16 && R <= kMatvecRows) {
            q16_rows_of.push_back(q16.row(static_cast<int>(n)));
          }
        }
        if (R > kMatvecRows) {
          a.emplace(R, I);
          a->pack(row_ptrs.data(), 0, a->panels());
        }
      }
      const long o0 = u % tiles * kTileRows;
      const int n = static_cast<int>(std::min<long>(kTileRows, O - o0));
      const uint8_t* tile = w + (static_cast<long>(e) * O + o0) * row_bytes;
      out.resize(static_cast<size_t>(R) * n);
      if (R <= kMatvecRows) {
        const ActivationRows in{row_ptrs.data(), int16 ? q16_rows_of.data() : nullptr, R};
        matvec_rows(t, info, in, tile, table, out.data(), n, I, n);
      } else {
        buf.resize(static_cast<size_t>(n) * I);
        dequantize_rows(t, info, tile, table, buf.data(), I, 0, n);
        weight_tile_product(*a, buf.data(), n, out.data(), n);
      }
      for (int r = 0; r < R; ++r) {
        std::copy(out.data() + static_cast<long>(r) * n, out.data() + static_cast<long>(r + 1) * n, y + rows[r] * O + o0);
      }
    }
  });
}

TypeInfo check_blocks(const mx::array& w, int qtype, int in_features, const char* op) {
  const std::string where = std::string("[") + op + "] ";
  TypeInfo info;
  if (!type_info(qtype, info)) {
    throw std::invalid_argument(where + "GGML type " + std::to_string(qtype) + " has no CPU kernel");
  }
  if (w.ndim() != 2 || w.dtype() != mx::uint8) {
    throw std::invalid_argument(where + "w must be uint8 (rows, bytes per row)");
  }
  if (in_features <= 0 || in_features % info.qk != 0 ||
      static_cast<long>(w.shape(1)) != static_cast<long>(in_features / info.qk) * info.bytes) {
    throw std::invalid_argument(where + "rows of " + std::to_string(w.shape(1)) + " bytes do not hold " +
                                std::to_string(in_features) + " weights of this type");
  }
  return info;
}

// The work of neighbouring ops that a product takes over while they are pending (gguf_matmul,
// residual_add): before it, the op that makes its activations; after it, an RMS norm of its
// rows and a residual added. Each is a graph node fewer in a decode step.
enum class Prologue {
  NONE,         // inputs: x
  RMS_NORM,     // x, weight: rms_norm's rows
  GATED,        // gate, up: gated_activation's rows
  GATED_HALVES, // [gate | up]
};

struct Fused {
  Prologue prologue = Prologue::NONE;
  float eps = 0.f; // the prologue's norm
  int kind = 0;    // the prologue's activation (GatedActivation::Kind)
  bool post_norm = false;
  float post_eps = 0.f;
  bool residual = false;
  bool operator==(const Fused&) const = default;
  int sources() const { return prologue == Prologue::RMS_NORM || prologue == Prologue::GATED ? 2 : 1; }
};

class GgufMatmul : public CpuPrimitive {
 public:
  GgufMatmul(mx::Stream s, int qtype, Activations act, Fused fused = {})
      : CpuPrimitive(s), qtype_(qtype), act_(act), fused_(fused) {}
  // inputs: the prologue's (one or two), w, table, then the post-norm's weight and the
  // residual where they are fused
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto e = begin_eval(stream(), inputs, out);
    const int sources = fused_.sources();
    const auto &x = e.inputs[0], &w = e.inputs[sources], &table = e.inputs[sources + 1];
    const int O = w.shape(0), I = fused_.prologue == Prologue::GATED_HALVES ? x.shape(-1) / 2 : x.shape(-1);
    const int B = static_cast<int>(x.size() / x.shape(-1));
    e.encoder.dispatch([x0 = x.data<float>(), x1 = sources > 1 ? e.inputs[1].data<float>() : nullptr,
                        wp = w.data<uint8_t>(), tp = table.data<uint8_t>(),
                        post = fused_.post_norm ? e.inputs[sources + 2].data<float>() : nullptr,
                        rp = fused_.residual ? e.inputs.back().data<float>() : nullptr, yp = out.data<float>(), B,
                        I, O, t = qtype_, act = act_, f = fused_]() {
      std::vector<float> prepared;
      const float* xp = x0;
      if (f.prologue != Prologue::NONE) {
        prepared.resize(static_cast<size_t>(B) * I);
        parallel_ranges(B, 8L * I, [&](long r0, long r1) {
          for (long r = r0; r < r1; ++r) {
            float* row = prepared.data() + r * I;
            if (f.prologue == Prologue::RMS_NORM) {
              rms_norm_row(x0 + r * I, x1, row, I, f.eps);
            } else if (f.prologue == Prologue::GATED) {
              gated_rows(f.kind, x0 + r * I, x1 + r * I, row, I);
            } else {
              gated_rows(f.kind, x0 + 2 * r * I, x0 + (2 * r + 1) * I, row, I);
            }
          }
        });
        xp = prepared.data();
      }
      TypeInfo info;
      type_info(t, info);
      if (B <= kMatvecRows) {
        matvec(t, info, xp, wp, tp, yp, B, I, O, act);
      } else {
        matmul_tiles(t, info, xp, wp, tp, yp, B, I, O, act);
      }
      if (post != nullptr || rp != nullptr) { // as the RmsNorm and the Add they replace compute them
        parallel_ranges(B, 8L * O, [&](long r0, long r1) {
          for (long r = r0; r < r1; ++r) {
            float* y = yp + r * O;
            if (post != nullptr) {
              rms_norm_row(y, post, y, O, f.post_eps); // in place: each entry read before it is written
            }
            if (rp != nullptr) {
              for (long i = 0; i < O; ++i) {
                y[i] += rp[r * O + i];
              }
            }
          }
        });
      }
    });
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[fused_.sources()].shape(0);
    return {shape};
  }
  const char* name() const override { return "GgufMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const GgufMatmul&>(other);
    return qtype_ == o.qtype_ && act_ == o.act_ && fused_ == o.fused_;
  }
  const Fused& fused() const { return fused_; }
  std::shared_ptr<GgufMatmul> with(mx::Stream s, const Fused& fused) const {
    return std::make_shared<GgufMatmul>(s, qtype_, act_, fused);
  }

 private:
  int qtype_;
  Activations act_;
  Fused fused_;
};

class GgufDequantize : public CpuPrimitive {
 public:
  GgufDequantize(mx::Stream s, int qtype, int in_features) : CpuPrimitive(s), qtype_(qtype), in_(in_features) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto e = begin_eval(stream(), inputs, out);
    const auto &w = e.inputs[0], &table = e.inputs[1];
    e.encoder.dispatch([wp = w.data<uint8_t>(), tp = table.data<uint8_t>(), op = out.data<float>(), I = in_,
                        O = w.shape(0), t = qtype_]() {
      TypeInfo info;
      type_info(t, info);
      dequantize(t, info, wp, tp, op, I, O);
    });
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), in_}};
  }
  const char* name() const override { return "GgufDequantize"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const GgufDequantize&>(other);
    return qtype_ == o.qtype_ && in_ == o.in_;
  }

 private:
  int qtype_, in_;
};

class GgufGatherMatmul : public CpuPrimitive {
 public:
  GgufGatherMatmul(mx::Stream s, int qtype, Activations act) : CpuPrimitive(s), qtype_(qtype), act_(act) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto e = begin_eval(stream(), inputs, out);
    const auto &x = e.inputs[0], &w = e.inputs[1], &table = e.inputs[2], &idx = e.inputs[3];
    e.encoder.dispatch([xp = x.data<float>(), wp = w.data<uint8_t>(), tp = table.data<uint8_t>(),
                        ip = idx.data<uint32_t>(), yp = out.data<float>(), N = x.shape(0), k = idx.shape(1),
                        I = x.shape(1), O = w.shape(1), E = w.shape(0), t = qtype_, act = act_]() {
      TypeInfo info;
      type_info(t, info);
      if (N <= kMatvecRows) {
        gather_matvec(t, info, xp, wp, tp, ip, yp, N, k, I, O, E, act);
      } else {
        gather_matmul(t, info, xp, wp, tp, ip, yp, N, k, I, O, E, act);
      }
    });
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[3].shape(1), inputs[1].shape(1)}};
  }
  const char* name() const override { return "GgufGatherMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const GgufGatherMatmul&>(other);
    return qtype_ == o.qtype_ && act_ == o.act_;
  }

 private:
  int qtype_;
  Activations act_;
};

Activations activations_of(const std::string& name, const char* op) {
  if (name == "float") {
    return Activations::FLOAT;
  }
  if (name == "int8") {
    return Activations::INT8;
  }
  if (name == "int16") {
    return Activations::INT16;
  }
  throw std::invalid_argument(std::string("[") + op + "] activations must be float, int8 or int16, not " + name);
}

// The codebook a type reads must hold what its decoder indexes (source.py's tables).
void check_table(const mx::array& table, int qtype, const char* op) {
  static const struct { int t; long bytes; } sizes[] = {
      {IQ2_XXS, 2048 + 128}, {IQ2_XS, 4096 + 128}, {IQ2_S, 8192}, {IQ3_XXS, 1024 + 128}, {IQ3_S, 2048},
      {IQ1_S, 16384}, {IQ1_M, 16384}, {IQ4_NL, 16}, {IQ4_XS, 16}, {MXFP4, 16}, {NVFP4, 16}};
  long need = 1;
  for (const auto& s : sizes) {
    need = s.t == qtype ? s.bytes : need;
  }
  if (table.dtype() != mx::uint8 || static_cast<long>(table.size()) < need) {
    throw std::invalid_argument(std::string("[") + op + "] this type's table must be uint8 of at least " +
                                std::to_string(need) + " bytes");
  }
}

} // namespace

// Whether `a` is still to be computed by an op of type P (nothing has scheduled it yet, so
// nothing but the graph holds its result): the op's inputs are then free to read instead.
template <class P>
const P* pending(const mx::array& a) {
  if (!a.has_primitive() || a.status() != mx::array::Status::unscheduled || !a.siblings().empty()) {
    return nullptr;
  }
  return dynamic_cast<const P*>(&a.primitive());
}

mx::array gguf_matmul(const mx::array& x, const mx::array& w, int qtype, const mx::array& table,
                      const std::string& activations, mx::StreamOrDevice s) {
  const char* op = "gguf_matmul";
  const Activations act = activations_of(activations, op);
  if (x.ndim() < 1) {
    throw std::invalid_argument("[gguf_matmul] x must have at least one dimension");
  }
  check_blocks(w, qtype, x.shape(-1), op);
  check_table(table, qtype, op);
  auto stream = cpu_stream(s, op);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream)};
  Fused fused;
  if (const auto* norm = pending<RmsNorm>(x)) {
    inputs = x.inputs();
    fused.prologue = Prologue::RMS_NORM;
    fused.eps = norm->eps();
  } else if (const auto* gated = pending<GatedActivation>(x)) {
    inputs = x.inputs();
    fused.prologue = inputs.size() == 1 ? Prologue::GATED_HALVES : Prologue::GATED;
    fused.kind = gated->kind();
  }
  inputs.push_back(w);
  inputs.push_back(mx::flatten(table, stream));
  return mx::array(std::move(shape), mx::float32, std::make_shared<GgufMatmul>(stream, qtype, act, fused),
                   std::move(inputs));
}

mx::array residual_add(const mx::array& x, const mx::array& y, mx::StreamOrDevice s) {
  if (x.dtype() == mx::float32 && x.shape() == y.shape()) {
    // y a pending product, or a pending RMS norm of one (a post-norm, as Gemma's)
    const auto* norm = pending<RmsNorm>(y);
    const mx::array& made = norm != nullptr ? y.inputs()[0] : y;
    const auto* product = pending<GgufMatmul>(made);
    if (product != nullptr && !product->fused().post_norm && !product->fused().residual) {
      Fused fused = product->fused();
      auto inputs = made.inputs();
      if (norm != nullptr) {
        fused.post_norm = true;
        fused.post_eps = norm->eps();
        inputs.push_back(y.inputs()[1]);
      }
      fused.residual = true;
      inputs.push_back(x);
      return mx::array(y.shape(), mx::float32, product->with(made.primitive().stream(), fused), std::move(inputs));
    }
  }
  return mx::add(x, y, s);
}

mx::array gguf_gather_matmul(const mx::array& x, const mx::array& w, int qtype, const mx::array& table,
                             const mx::array& indices, const std::string& activations, mx::StreamOrDevice s) {
  const char* op = "gguf_gather_matmul";
  const Activations act = activations_of(activations, op);
  if (x.ndim() != 2) {
    throw std::invalid_argument("[gguf_gather_matmul] x must be (rows, in_features)");
  }
  if (w.ndim() != 3 || w.dtype() != mx::uint8 || w.shape(2) == 0) {
    throw std::invalid_argument("[gguf_gather_matmul] w must be uint8 (experts, rows, bytes per row)");
  }
  check_blocks(mx::reshape(w, {-1, w.shape(2)}), qtype, x.shape(1), op);
  check_table(table, qtype, op);
  // 32-bit: the kernel reads uint32, and a wider index must not wrap onto a real expert
  if (indices.ndim() != 2 || indices.shape(0) != x.shape(0) || !mx::issubdtype(indices.dtype(), mx::integer) ||
      indices.itemsize() > 4) {
    throw std::invalid_argument("[gguf_gather_matmul] indices must be 32-bit integers (rows, k)");
  }
  auto stream = cpu_stream(s, op);
  mx::Shape shape = {x.shape(0), indices.shape(1), w.shape(1)};
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream), w, mx::flatten(table, stream),
                                   mx::astype(indices, mx::uint32, stream)};
  return mx::array(std::move(shape), mx::float32, std::make_shared<GgufGatherMatmul>(stream, qtype, act), std::move(inputs));
}

mx::array gguf_dequantize(const mx::array& w, int qtype, int in_features, const mx::array& table,
                          mx::StreamOrDevice s) {
  const char* op = "gguf_dequantize";
  check_blocks(w, qtype, in_features, op);
  check_table(table, qtype, op);
  auto stream = cpu_stream(s, op);
  return mx::array({w.shape(0), in_features}, mx::float32, std::make_shared<GgufDequantize>(stream, qtype, in_features),
                   {w, mx::flatten(table, stream)});
}

bool gguf_has_kernel(int qtype) {
  TypeInfo info;
  return type_info(qtype, info);
}

bool gguf_integer_dots(int qtype) {
  TypeInfo info;
  return type_info(qtype, info) && info.path != Path::FLOAT;
}

bool gguf_int16_dots(int qtype) {
  return q16_kernel(qtype);
}

bool gguf_float_kernel(int qtype) {
#if defined(__AVX2__)
  return unpacks_avx2(qtype);
#else
  (void)qtype;
  return false;
#endif
}

void gguf_use_simd(bool on) {
  g_use_simd = on;
}

} // namespace mlxllm_cpu
