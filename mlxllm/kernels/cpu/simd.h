// 8-lane float helpers on GCC/Clang vector extensions.
//
// The lanes are spelled out as vector types because GCC does not SLP-vectorize the
// equivalent float[8] loops (it emitted one scalar int->float conversion per code); the
// extensions lower to whatever the target offers (one ymm register with AVX2, two xmm
// with SSE2, NEON pairs on arm64).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace mlxllm_cpu {

// How far ahead of a weight stream the kernels ask for memory. The hardware prefetcher
// alone fell far behind them on a 2-core Sapphire Rapids VM: a Q4_1 matrix-vector product
// streamed its weights from L3 at 2.9 GB/s on one core, 9.2 GB/s with 4096 bytes of
// software prefetch (1024: 7.1, 8192: 8.8), and SmolLM2's decode went from 55 to 101 tok/s.
constexpr long kPrefetchAhead = 4096;

// Asks for the cache lines of [p, p + bytes) moved kPrefetchAhead bytes on: a block's, when
// called as each block is read (a hint: never faults).
inline void prefetch_ahead(const void* p, long bytes = 1) {
  const char* at = static_cast<const char*>(p) + kPrefetchAhead;
  for (long i = 0; i < bytes; i += 64) {
    __builtin_prefetch(at + i, 0, 3);
  }
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// IEEE half precision (GGUF's F16, a KV cache stored as float16) to float: exact,
// subnormals included.
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h); // one instruction; the scalar path below costs a branchy dozen
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else { // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400) == 0);
    bits = sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Float to half, rounded to nearest even as MLX's astype(float16) rounds; overflow to
// infinity, NaN stays NaN.
inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  if (((x >> 23) & 0xFF) == 0xFF) {
    return static_cast<uint16_t>(sign | 0x7C00 | ((x & 0x7FFFFF) ? 0x200 : 0));
  }
  const int exp = static_cast<int>((x >> 23) & 0xFF) - 127 + 15;
  uint32_t man = x & 0x7FFFFF;
  if (exp >= 31) {
    return static_cast<uint16_t>(sign | 0x7C00);
  }
  if (exp <= 0) { // subnormal half or zero
    if (exp < -10) {
      return static_cast<uint16_t>(sign);
    }
    man |= 0x800000;
    const int shift = 14 - exp;
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) {
      ++h;
    }
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (man >> 13);
  const uint32_t rem = man & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) {
    ++h; // a carry into the exponent is the right rounding too
  }
  return static_cast<uint16_t>(sign | h);
#endif
}

// Kernels that read float32 or float16 rows (a KV cache's storage) read them through these.
inline float to_float(float x) {
  return x;
}
inline float to_float(uint16_t h) {
  return half_to_float(h);
}

// 8 floats, or 8 halves widened exactly.
inline f32x8 load8(const float* p) {
  return load<f32x8>(p);
}
inline f32x8 load8(const uint16_t* p) {
  f32x8 v;
#if defined(__F16C__)
  const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &wide, sizeof(v));
#else
  for (int j = 0; j < 8; ++j) {
    v[j] = half_to_float(p[j]);
  }
#endif
  return v;
}

// Not `f32x8{} + x`: 0 + -0 is +0, and dequantizing must keep the sign of a zero bias.
inline f32x8 splat(float x) {
  return f32x8{x, x, x, x, x, x, x, x};
}

inline float hsum(f32x8 v) {
  float r = 0.f;
  for (int j = 0; j < 8; ++j) {
    r += v[j];
  }
  return r;
}

inline float hmax(f32x8 v) {
  float r = v[0];
  for (int j = 1; j < 8; ++j) {
    r = v[j] > r ? v[j] : r;
  }
  return r;
}

inline f32x8 vmax(f32x8 a, f32x8 b) {
  return a > b ? a : b;
}

inline f32x8 vmin(f32x8 a, f32x8 b) {
  return a < b ? a : b;
}

// e^x, within 2 ulp of expf over the float range (Cephes' range reduction to
// [-ln2/2, ln2/2] and degree-6 polynomial; 2^n built in the exponent bits). Inputs below
// -87.3 give ~1e-38 instead of a denormal or zero: irrelevant to the softmax and gates
// this serves, whose masked entries never reach it.
inline f32x8 vexp(f32x8 x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.37f));
  const f32x8 fx = x * 1.44269504088896341f + 0.5f;
  i32x8 n = __builtin_convertvector(fx, i32x8); // truncates toward zero
  n += (__builtin_convertvector(n, f32x8) > fx); // -1 where that rounded up: floor
  const f32x8 nf = __builtin_convertvector(n, f32x8);
  f32x8 r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  f32x8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const i32x8 pow2n = (n + 127) << 23;
  f32x8 scale;
  std::memcpy(&scale, &pow2n, sizeof(scale));
  return p * scale;
}

} // namespace mlxllm_cpu
