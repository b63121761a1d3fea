// K-quants, ternary, IQ4 and NVFP4 block decoding (see common.h for the contract).
// ---------------------------------------------------------------------------- k-quants

// Q2_K: scales[16] (low nibble: 4-bit scale, high nibble: 4-bit min, one pair per 16),
// qs[64] 2-bit codes, d fp16, dmin fp16. Element e: half h = e/128, quarter q = (e%128)/32,
// i = e%32; code (qs[32h + i] >> 2q) & 3. Value (d * sc) * code - dmin * m, in gguf-py's
// order: the products are exact, the subtraction is the one rounding.
#define QK_Q2_K QK_K
#define BYTES_Q2_K 84
QFN void dq8_q2_k(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    (void)table;
    const int e = 8 * j;
    const int sc = b[e >> 4];
    const float dl = qhalf_at(b + 80) * (float)(sc & 15);
    const float ml = qhalf_at(b + 82) * (float)(sc >> 4);
    QDEV const uint8_t* qs = b + 16 + 32 * (e >> 7) + (e & 31);
    const int shift = 2 * ((e & 127) >> 5);
    for (int k = 0; k < 8; ++k) {
        v[k] = dl * (float)((qs[k] >> shift) & 3) - ml;
    }
}

// Q3_K: hmask[32], qs[64] low 2 bits, scales[12] (16 6-bit scales), d fp16.
// Element e: low 2 bits as in Q2_K ((qs[32h + i] >> 2q) & 3 with h = e/128,
// q = (e%128)/32, i = e%32); the hmask bit e/32 of hmask[e%32] being 0 subtracts 4.
// Scale s = e/16: low nibble of scales[s%8] (high nibble for s >= 8), top 2 bits from
// scales[8 + s%4] >> 2(s/4); value d * (scale - 32) * code.
#define QK_Q3_K QK_K
#define BYTES_Q3_K 110
QFN void dq8_q3_k(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    (void)table;
    const int e = 8 * j;
    const int s = e >> 4;
    const int lo = (b[96 + (s & 7)] >> (4 * (s >> 3))) & 15;
    const int hi = (b[104 + (s & 3)] >> (2 * (s >> 2))) & 3;
    const float dl = qhalf_at(b + 108) * (float)((lo | (hi << 4)) - 32);
    QDEV const uint8_t* hmask = b + (e & 31);
    QDEV const uint8_t* qs = b + 32 + 32 * (e >> 7) + (e & 31);
    const int shift = 2 * ((e & 127) >> 5);
    const int bit = e >> 5;
    for (int k = 0; k < 8; ++k) {
        const int low = (qs[k] >> shift) & 3;
        const int minus4 = (((hmask[k] >> bit) & 1) ^ 1) << 2;
        v[k] = dl * (float)(low - minus4);
    }
}

// Q6_K: ql[128] low nibbles, qh[64] high 2 bits, scales[16] int8 (one per 16), d fp16.
// Element e of the 256: half h = e/128, within it l = e%128; quarter q = l/32, i = l%32;
// low nibble from ql[64h + 32(q&1) + i] (high nibble for q >= 2), high bits from
// qh[32h + i] >> 2q.
#define QK_Q6_K QK_K
#define BYTES_Q6_K 210
QFN void dq8_q6_k(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    (void)table;
    const int e = 8 * j;
    const int h = e >> 7, l = e & 127, q = l >> 5, i0 = l & 31;
    QDEV const uint8_t* ql = b + 64 * h + 32 * (q & 1);
    QDEV const uint8_t* qh = b + 128 + 32 * h;
    const float dl = qhalf_at(b + 208) * (float)(int8_t)b[192 + (e >> 4)];
    for (int k = 0; k < 8; ++k) {
        const int lo = (ql[i0 + k] >> (4 * (q >> 1))) & 15;
        const int hi = (qh[i0 + k] >> (2 * q)) & 3;
        v[k] = dl * (float)((lo | (hi << 4)) - 32);
    }
}

// ---------------------------------------------------------------------------- ternary

// TQ1_0: qs[48], qh[4], d fp16. Each byte holds 5 (qh: 4) base-3 digits as a fixed-point
// fraction of 243: digit n of byte x is (uint8_t(x * 3^n) * 3) >> 8 (the uint8 product
// wraps mod 256 on purpose), 0/1/2 meaning -1/0/+1. Element e < 160: digit e/32 of
// qs[e%32]; 160 <= e < 240: digit (e-160)/16 of qs[32 + (e-160)%16]; e >= 240: digit
// (e-240)/4 of qh[(e-240)%4]. Only the last two chunks (qh) change digit within a chunk.
#define QK_TQ1_0 QK_K
#define BYTES_TQ1_0 54
QFN void dq8_tq1_0(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    (void)table;
    const int e = 8 * j;
    // region: first element, first byte, log2 of its bytes per digit
    const int start = e < 160 ? 0 : (e < 240 ? 160 : 240);
    const int first = e < 160 ? 0 : (e < 240 ? 32 : 48);
    const int wbits = e < 160 ? 5 : (e < 240 ? 4 : 2);
    const float d = qhalf_at(b + 52);
    for (int k = 0; k < 8; ++k) {
        const int r = e + k - start;
        const int n = r >> wbits;
        int pow3 = 1;
        for (int t = 0; t < n; ++t) pow3 *= 3;
        const uint8_t x = (uint8_t)(b[first + (r & ((1 << wbits) - 1))] * pow3);
        v[k] = d * (float)(((x * 3) >> 8) - 1);
    }
}

// TQ2_0: qs[64] 2-bit codes, d fp16. Element e: half h = e/128, quarter q = (e%128)/32,
// i = e%32; code (qs[32h + i] >> 2q) & 3, 0/1/2 meaning -1/0/+1.
#define QK_TQ2_0 QK_K
#define BYTES_TQ2_0 66
QFN void dq8_tq2_0(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    (void)table;
    const int e = 8 * j;
    QDEV const uint8_t* qs = b + 32 * (e >> 7) + (e & 31);
    const int shift = 2 * ((e & 127) >> 5);
    const float d = qhalf_at(b + 64);
    for (int k = 0; k < 8; ++k) {
        v[k] = d * (float)(((qs[k] >> shift) & 3) - 1);
    }
}

// ---------------------------------------------------------------------------- non-linear 4-bit

// IQ4_NL: d fp16, qs[16]: element i < 16 is the low nibble of qs[i], i >= 16 the high
// nibble of qs[i-16]; the nibble indexes the 16 signed kvalues (table bytes 0..15).
#define QK_IQ4_NL 32
#define BYTES_IQ4_NL 18
QFN void dq8_iq4_nl(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    const float d = qhalf_at(b);
    const int shift = 4 * (j >> 1);
    QDEV const uint8_t* qs = b + 2 + 8 * (j & 1);
    for (int k = 0; k < 8; ++k) {
        v[k] = d * (float)(int8_t)table[(qs[k] >> shift) & 15];
    }
}

// IQ4_XS: d fp16, scales_h (uint16 LE, 2 bits per 32), scales_l[4] (4 bits per 32),
// qs[128]. Sub-block s = e/32 has scale (lo | hi << 4) - 32 with lo the low nibble of
// scales_l[s/2] (high nibble for odd s) and hi = (scales_h >> 2s) & 3. Within it, l = e%32
// indexes the kvalues (table bytes 0..15) with the low nibble of qs[16s + l] for l < 16,
// the high nibble of qs[16s + l - 16] otherwise.
#define QK_IQ4_XS QK_K
#define BYTES_IQ4_XS 136
QFN void dq8_iq4_xs(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    const int s = j >> 2, l0 = 8 * (j & 3);
    const int scales_h = b[2] | (b[3] << 8);
    const int lo = (b[4 + (s >> 1)] >> (4 * (s & 1))) & 15;
    const int hi = (scales_h >> (2 * s)) & 3;
    const float dl = qhalf_at(b) * (float)((lo | (hi << 4)) - 32);
    QDEV const uint8_t* qs = b + 8 + 16 * s + (l0 & 15);
    const int shift = 4 * (l0 >> 4);
    for (int k = 0; k < 8; ++k) {
        v[k] = dl * (float)(int8_t)table[(qs[k] >> shift) & 15];
    }
}

// ---------------------------------------------------------------------------- fp4

// NVFP4's UE4M3 sub-block scale, halved (the kvalues are doubled E2M1 values), as gguf-py's
// NVFP4.ue4m3_to_fp32: bit 7 ignored, 0x00 and 0x7F decode to 0, exponent 0 is subnormal
// (man * 2^-9). 2^(exp-7) for exp 1..15 is an exact integer power of two times 2^-7, so
// every step is exact and no pow() is needed.
QFN float nvfp4_ue4m3(int x) {
    const int ex = (x >> 3) & 15;
    const float man = (float)(x & 7);
    if (x == 0 || x == 0x7F) return 0.0f;
    const float raw = ex == 0 ? man * 0.001953125f
                               : (1.0f + man / 8.0f) * ((float)(1 << ex) * 0.0078125f);
    return raw * 0.5f;
}

// NVFP4: d[4] UE4M3 scales (one per 16), qs[32]. Element e: sub-block s = e/16, l = e%16;
// kvalue (table bytes 0..15) index is the low nibble of qs[8s + l] for l < 8, the high
// nibble of qs[8s + l - 8] otherwise.
#define QK_NVFP4 64
#define BYTES_NVFP4 36
QFN void dq8_nvfp4(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    const int s = j >> 1;
    const float d = nvfp4_ue4m3(b[s]);
    QDEV const uint8_t* qs = b + 4 + 8 * s;
    const int shift = 4 * (j & 1);
    for (int k = 0; k < 8; ++k) {
        v[k] = d * (float)(int8_t)table[(qs[k] >> shift) & 15];
    }
}
