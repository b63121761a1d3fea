// Codebook i-quants block decoding (see common.h for the contract).
//
// Each 8 (IQ2, IQ1) or 4 (IQ3) consecutive weights are one codebook entry, picked by an
// index packed in the block, times a sub-block scale; IQ2/IQ3 entries are magnitudes with a
// sign per weight, IQ1 entries are -1/0/+1 shifted by +-delta. Codebooks sit in `table` as
// (entries x width) bytes; the XXS/XS types take their 8 sign bits from the 128-entry
// ksigns_iq2xs table (7 stored bits plus parity), appended to their grid at these offsets:
#define IQ2_XXS_SIGNS 2048  // after 256 x 8
#define IQ2_XS_SIGNS 4096   // after 512 x 8
#define IQ3_XXS_SIGNS 1024  // after 256 x 4

// IQ1's grid offset: +delta, or -delta where the sub-block's delta bit is set.
#define IQ1_DELTA 0.125f

// Little-endian uint32 from 4 bytes: the XXS types' "4 x 7 sign-index bits | 4-bit scale"
// word (IQ2_XXS; IQ3_XXS packs the same word).
QFN uint32_t iq2_xxs_aux32(QDEV const uint8_t* p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// ---------------------------------------------------------------------------- IQ1

// IQ1_S: d fp16, qs[32], qh[8] as 8 uint16 (one per 32 elements). Chunk j (elements
// 8j..8j+7) is one 8-wide grid entry qs[j] | ((qh[j/4] >> 3(j%4)) & 7) << 8; qh[j/4] also
// holds the 3-bit scale s (bits 12..14) and the delta sign (bit 15). Value
// (d * (2s + 1)) * (grid + delta): the sum first, as gguf-py does, so a zero d keeps the
// sign of grid + delta (distributing the product would turn -0 into +0 for grid 0).
#define QK_IQ1_S QK_K
#define BYTES_IQ1_S 50
QFN void dq8_iq1_s(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    QDEV const uint8_t* qh = b + 34 + 2 * (j >> 2);
    const int h = qh[0] | (qh[1] << 8);
    const float dl = qhalf_at(b) * (float)(2 * ((h >> 12) & 7) + 1);
    const float delta = (h & 0x8000) ? -IQ1_DELTA : IQ1_DELTA;
    QDEV const uint8_t* grid = table + 8 * (b[2 + j] | (((h >> (3 * (j & 3))) & 7) << 8));
    for (int k = 0; k < 8; ++k) {
        v[k] = dl * ((float)(int8_t)grid[k] + delta);
    }
}

// IQ1_M: qs[32], qh[16], scales[8] as 4 uint16; no d field: the fp16 d is the top nibbles
// of the 4 scale words (word 0 lowest). Chunk j is one grid entry qs[j] | (nibble & 7) << 8
// with nibble = qh[j/2] >> 4(j%2), whose bit 3 is the delta sign. Scale s = j/2 (one per
// 16) is the 3 bits at 3(s%4) of word s/4. Value (d * (2s + 1)) * (grid + delta), as IQ1_S.
#define QK_IQ1_M QK_K
#define BYTES_IQ1_M 56
QFN void dq8_iq1_m(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    QDEV const uint8_t* sc = b + 48;
    const int dbits = (sc[1] >> 4) | (sc[3] & 0xF0) | ((sc[5] & 0xF0) << 4) | ((sc[7] & 0xF0) << 8);
    const int s = j >> 1;
    const int word = sc[2 * (s >> 2)] | (sc[2 * (s >> 2) + 1] << 8);
    const float dl = qhalf((uint16_t)dbits) * (float)(2 * ((word >> (3 * (s & 3))) & 7) + 1);
    const int nibble = (b[32 + (j >> 1)] >> (4 * (j & 1))) & 15;
    const float delta = (nibble & 8) ? -IQ1_DELTA : IQ1_DELTA;
    QDEV const uint8_t* grid = table + 8 * (b[j] | ((nibble & 7) << 8));
    for (int k = 0; k < 8; ++k) {
        v[k] = dl * ((float)(int8_t)grid[k] + delta);
    }
}

// ---------------------------------------------------------------------------- IQ2

// IQ2_XXS: d fp16, then 8 pairs of uint32 (aux0, aux1), one pair per 32 elements. Chunk j
// (group g = j/4, k = j%4) is the 8-wide grid entry byte k of aux0, signed by
// ksigns[(aux1 >> 7k) & 127] (bit t for element t); the scale is aux1 >> 28. Value
// d * (0.5 + scale) * 0.25 * grid * sign, in gguf-py's order (all steps exact anyway).
#define QK_IQ2_XXS QK_K
#define BYTES_IQ2_XXS 66
QFN void dq8_iq2_xxs(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    QDEV const uint8_t* q = b + 2 + 8 * (j >> 2);
    const int k = j & 3;
    const uint32_t aux1 = iq2_xxs_aux32(q + 4);
    const float db = qhalf_at(b) * (0.5f + (float)(aux1 >> 28)) * 0.25f;
    const int signs = table[IQ2_XXS_SIGNS + ((aux1 >> (7 * k)) & 127)];
    QDEV const uint8_t* grid = table + 8 * q[k];
    for (int t = 0; t < 8; ++t) {
        v[t] = db * (float)grid[t] * (((signs >> t) & 1) ? -1.0f : 1.0f);
    }
}

// IQ2_XS: d fp16, qs[32] as uint16 (one per chunk), scales[8] (two 4-bit scales a byte,
// one per 16 elements). Chunk j: grid entry qs[j] & 511, signs ksigns[qs[j] >> 9], scale
// the low nibble of scales[j/4] for even j/2, the high nibble for odd. Value as IQ2_XXS.
#define QK_IQ2_XS QK_K
#define BYTES_IQ2_XS 74
QFN void dq8_iq2_xs(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    const int q = b[2 + 2 * j] | (b[3 + 2 * j] << 8);
    const int ls = (b[66 + (j >> 2)] >> (4 * ((j >> 1) & 1))) & 15;
    const float db = qhalf_at(b) * (0.5f + (float)ls) * 0.25f;
    const int signs = table[IQ2_XS_SIGNS + (q >> 9)];
    QDEV const uint8_t* grid = table + 8 * (q & 511);
    for (int t = 0; t < 8; ++t) {
        v[t] = db * (float)grid[t] * (((signs >> t) & 1) ? -1.0f : 1.0f);
    }
}

// IQ2_S: d fp16, qs[32], signs[32], qh[8], scales[8]. Chunk j: grid entry
// qs[j] | ((qh[j/4] >> 2(j%4)) & 3) << 8 of 1024, sign bit t of signs[j] for element t
// (explicit, no ksigns), scale as IQ2_XS. Value as IQ2_XXS.
#define QK_IQ2_S QK_K
#define BYTES_IQ2_S 82
QFN void dq8_iq2_s(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    const int ls = (b[74 + (j >> 2)] >> (4 * ((j >> 1) & 1))) & 15;
    const float db = qhalf_at(b) * (0.5f + (float)ls) * 0.25f;
    const int signs = b[34 + j];
    QDEV const uint8_t* grid = table + 8 * (b[2 + j] | (((b[66 + (j >> 2)] >> (2 * (j & 3))) & 3) << 8));
    for (int t = 0; t < 8; ++t) {
        v[t] = db * (float)grid[t] * (((signs >> t) & 1) ? -1.0f : 1.0f);
    }
}

// ---------------------------------------------------------------------------- IQ3

// IQ3_XXS: d fp16, qs[64] (one 4-wide grid entry each), then 8 uint32 words as IQ2_XXS's
// aux1, one per 32 elements. Chunk j (group g = j/4, k = j%4) is the entries qs[2j] and
// qs[2j + 1], signed by ksigns[(word[g] >> 7k) & 127]; scale word[g] >> 28. Value
// d * (0.5 + scale) * 0.5 * grid * sign.
#define QK_IQ3_XXS QK_K
#define BYTES_IQ3_XXS 98
QFN void dq8_iq3_xxs(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    const uint32_t aux = iq2_xxs_aux32(b + 66 + 4 * (j >> 2));
    const float db = qhalf_at(b) * (0.5f + (float)(aux >> 28)) * 0.5f;
    const int signs = table[IQ3_XXS_SIGNS + ((aux >> (7 * (j & 3))) & 127)];
    for (int t = 0; t < 8; ++t) {
        const int g = table[4 * b[2 + 2 * j + (t >> 2)] + (t & 3)];
        v[t] = db * (float)g * (((signs >> t) & 1) ? -1.0f : 1.0f);
    }
}

// IQ3_S: d fp16, qs[64], qh[8], signs[32], scales[4] (two 4-bit scales a byte, one per 32
// elements). Chunk j is the 4-wide entries i = 2j, 2j + 1, each qs[i] | ((qh[i/8] >> i%8)
// & 1) << 8 of 512; sign bit t of signs[j] for element t; scale s the low nibble of
// scales[j/8] for even j/4, the high nibble for odd. Value d * (1 + 2s) * grid * sign.
#define QK_IQ3_S QK_K
#define BYTES_IQ3_S 110
QFN void dq8_iq3_s(QDEV const uint8_t* b, int j, QDEV const uint8_t* table, QTHR float* v) {
    const int ls = (b[106 + (j >> 3)] >> (4 * ((j >> 2) & 1))) & 15;
    const float db = qhalf_at(b) * (float)(1 + 2 * ls);
    const int signs = b[74 + j];
    const int qh = b[66 + (j >> 2)] >> (2 * (j & 3));
    for (int t = 0; t < 8; ++t) {
        const int i = t >> 2;  // first or second entry of the chunk
        const int g = table[4 * (b[2 + 2 * j + i] | (((qh >> i) & 1) << 8)) + (t & 3)];
        v[t] = db * (float)g * (((signs >> t) & 1) ? -1.0f : 1.0f);
    }
}
