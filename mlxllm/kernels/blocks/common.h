// GGUF block decoding for the quant types MLX cannot hold natively: the one copy of each
// type's bit-unpacking math, included by the Metal kernels (metal.py), the CUDA kernels
// (cuda.py) and, compiled for the host, by the tests that check it bit for bit against
// gguf-py (tests/test_kernels.py). It is the same math as the pure-MLX reference in
// reference.py, written per 8 elements instead of per tensor.
//
// The includer defines, before including this file:
//   QDEV   address space of weight and table pointers ("device" on Metal, empty elsewhere)
//   QTHR   address space of per-thread arrays ("thread" on Metal, empty elsewhere)
//   QFN    function qualifier ("inline" on Metal, "__device__ __forceinline__" on CUDA)
//   float qhalf(uint16_t bits)  exact IEEE half -> float
// and the fixed-width integer types (uint8_t, int8_t, uint16_t, uint32_t).
//
// blocks/*.h then give, for each packed type T,
//   QK_T, BYTES_T                       elements and bytes per block
//   QFN void dq8_T(QDEV const uint8_t* block, int j, QDEV const uint8_t* table, QTHR float* v)
// which writes elements 8j .. 8j+7 of the block to v[0..7]. `table` holds the type's
// codebook bytes (IQ grids, sign masks, non-linear values) as built by source.py from
// gguf-py's own tables; types without a codebook ignore it.
//
// Exactness: every product below has at most 24 significant bits (fp16 scale x small
// integers), so it is exact in float32, and types with a subtraction (Q2_K) round once
// from exact operands: any evaluation order, FMA included, gives gguf-py's bits.

#define QK_K 256

QFN float qhalf_at(QDEV const uint8_t* p) {
    return qhalf((uint16_t)(p[0] | (p[1] << 8)));
}

// The inner loop of the fused matrix-vector product, shared by every backend: the partial
// dot products of one packed weight row with `batch` float32 activation rows over the
// 8-element chunks first, first + stride, ... of the row. Backends split a row's chunks
// over the lanes of a SIMD group / warp and reduce acc across them.
#define QDEFINE_ROWDOT(NAME, name)                                                        \
    QFN void rowdot_##name(QDEV const uint8_t* row, QDEV const float* x, int in_features,  \
                           int batch, int first, int stride, QDEV const uint8_t* table,    \
                           QTHR float* acc) {                                              \
        float v[8];                                                                        \
        for (int c = first; c < in_features / 8; c += stride) {                            \
            dq8_##name(row + (c / (QK_##NAME / 8)) * BYTES_##NAME, c % (QK_##NAME / 8),    \
                       table, v);                                                          \
            for (int r = 0; r < batch; ++r) {                                              \
                QDEV const float* xr = x + r * in_features + 8 * c;                        \
                float s = 0.0f;                                                            \
                for (int k = 0; k < 8; ++k) s += v[k] * xr[k];                             \
                acc[r] += s;                                                               \
            }                                                                              \
        }                                                                                  \
    }

// Most activation rows one fused call takes (decode batches); more rows go to prefill.
#define QMAX_BATCH 8
