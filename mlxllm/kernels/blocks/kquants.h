// K-quants, ternary, IQ4 and NVFP4 block decoding (see common.h for the contract).
// ---------------------------------------------------------------------------- k-quants

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

