// The GGUF block formats the quantised kernels read (ggml-common.h; gguf-py's quants.py is
// the reference for the bit layouts), each described once for the row-by-row products, the
// panels and dequantisation (quantized_rows.h, quantized_panels.h), which are templates over
// the format.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
// Every format is read 32 values (a group) at a time. A group's weights are w = D * q + M:
// q an integer code, D a float scale per group (Q6_K: one per 16 values, kHalfScales), M a
// float offset per group (kOffset; zero elsewhere). Each format gives:
//   kType, kValues, kBytes   the GGML type code, values and bytes of one block;
//   scales(block, d, m)      the block's D (per group, or per 16 values) and M (per group),
//                            computed as gguf's dequantisation computes them (one rounding
//                            each), so that float(q) * D + M is its weight bit for bit;
//   code(block, i)           value i's code q (portable branches);
//   code_bytes(block, g, a, b)  (AVX2) group g's codes as bytes, values 0-15 in a, 16-31 in b,
//                            each 16 bytes repeated in both 128-bit lanes (signed bytes where
//                            kSigned), which widen() spreads into floats with in-lane shuffles;
//                            the AVX-512 branches (APHRODITE_AVX512) widen each one's low lane
//                            into sixteen floats, one __m512.
//
//   Q4_1  fp16 d, fp16 m, 16 bytes: byte j holds value j (low nibble) and j + 16; w = d*q + m.
//   Q5_0  fp16 d, uint32 of fifth bits (bit j: value j), nibbles as Q4_1; w = d * (q - 16).
//   Q8_0  fp16 d, 32 int8; w = d * q.
//   Q4_K  256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins (one pair per
//         group), 128 bytes: group 2c is the low nibbles of bytes 32c..32c+31, group 2c+1
//         their high nibbles; w = (d * scale) * q - dmin * min.
//   Q5_K  Q4_K with 32 bytes of fifth bits after the scales: bit g of byte j, value j of
//         group g.
//   Q6_K  256 values: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, fp16 d;
//         w = (d * scale) * (q - 32), one scale per 16 values.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define APHRODITE_AVX2 1
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define APHRODITE_AVX512 1
#endif
#endif

namespace quantized {

constexpr int64_t kBlock = 32;   // values in a group

inline float half_to_float(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, sizeof(h));
#ifdef APHRODITE_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000 | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {   // subnormal: normalise
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            --exponent;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
#endif
}

inline int low_or_high_nibble(const uint8_t* bytes, int i) {   // Q4_1's order of 32 nibbles
    return i < 16 ? bytes[i] & 0x0F : bytes[i - 16] >> 4;
}

#ifdef APHRODITE_AVX2

inline __m256i both_lanes(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// (v >> shift) & mask in every byte.
inline __m256i bits_of(__m256i v, int shift, int mask) {
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)),
                            _mm256_set1_epi8(static_cast<char>(mask)));
}

// Bits 0-15 of `bits` as 16 bytes of 0x10 (set) or 0 in both lanes: byte j of a lane gets
// byte j / 8 of the bits, then a compare against its own bit.
inline __m256i fifth_bits(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                         0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    const __m256i each = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, each), each);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

#endif

struct Q4_1 {
    static constexpr int kType = 3;
    static constexpr int64_t kValues = 32, kBytes = 20;
    static constexpr bool kSigned = false, kOffset = true, kHalfScales = false;
    static void scales(const uint8_t* b, float* d, float* m) {
        d[0] = half_to_float(b);
        m[0] = half_to_float(b + 2);
    }
    static int code(const uint8_t* b, int i) { return low_or_high_nibble(b + 4, i); }
#ifdef APHRODITE_AVX2
    static void code_bytes(const uint8_t* b, int, __m256i& lo, __m256i& hi) {
        const __m256i raw = both_lanes(b + 4);
        lo = _mm256_and_si256(raw, _mm256_set1_epi8(0x0F));
        hi = bits_of(raw, 4, 0x0F);
    }
#endif
};

struct Q5_0 {
    static constexpr int kType = 6;
    static constexpr int64_t kValues = 32, kBytes = 22;
    static constexpr bool kSigned = true, kOffset = false, kHalfScales = false;
    static uint32_t high_bits(const uint8_t* b) {
        uint32_t bits;
        std::memcpy(&bits, b + 2, sizeof(bits));
        return bits;
    }
    static void scales(const uint8_t* b, float* d, float*) { d[0] = half_to_float(b); }
    static int code(const uint8_t* b, int i) {
        return (low_or_high_nibble(b + 6, i) | ((high_bits(b) >> i & 1) << 4)) - 16;
    }
#ifdef APHRODITE_AVX2
    static void code_bytes(const uint8_t* b, int, __m256i& lo, __m256i& hi) {
        const __m256i raw = both_lanes(b + 6), sixteen = _mm256_set1_epi8(16);
        const uint32_t bits = high_bits(b);
        lo = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(raw, _mm256_set1_epi8(0x0F)),
                                             fifth_bits(bits)), sixteen);
        hi = _mm256_sub_epi8(_mm256_or_si256(bits_of(raw, 4, 0x0F), fifth_bits(bits >> 16)),
                             sixteen);
    }
#endif
};

struct Q8_0 {
    static constexpr int kType = 8;
    static constexpr int64_t kValues = 32, kBytes = 34;
    static constexpr bool kSigned = true, kOffset = false, kHalfScales = false;
    static void scales(const uint8_t* b, float* d, float*) { d[0] = half_to_float(b); }
    static int code(const uint8_t* b, int i) { return static_cast<int8_t>(b[2 + i]); }
#ifdef APHRODITE_AVX2
    static void code_bytes(const uint8_t* b, int, __m256i& lo, __m256i& hi) {
        lo = both_lanes(b + 2);
        hi = both_lanes(b + 18);
    }
#endif
};

// Q4_K and Q5_K: eight 6-bit scales and mins packed in 12 bytes, unpacked into 8 bytes of
// scales and 8 of mins four at a time as ggml does (get_scale_min_k4's bits). D = d * scale
// and M = (-dmin) * min, each rounded once as gguf rounds d * scale and dmin * min, so
// w = D * q + M equals gguf's D * q - dmin * min bit for bit.
inline void k_scales(const uint8_t* b, float* d, float* m) {
    uint32_t packed[3], scale[2], min[2];
    std::memcpy(packed, b + 4, sizeof(packed));
    scale[0] = packed[0] & 0x3F3F3F3F;
    scale[1] = (packed[2] & 0x0F0F0F0F) | ((packed[0] >> 6 & 0x03030303) << 4);
    min[0] = packed[1] & 0x3F3F3F3F;
    min[1] = (packed[2] >> 4 & 0x0F0F0F0F) | ((packed[1] >> 6 & 0x03030303) << 4);
    const float dd = half_to_float(b), dmin = -half_to_float(b + 2);
#ifdef APHRODITE_AVX2
    int64_t scales, mins;
    std::memcpy(&scales, scale, sizeof(scales));
    std::memcpy(&mins, min, sizeof(mins));
    const auto widen8 = [](int64_t bytes) {
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)));
    };
    _mm256_storeu_ps(d, _mm256_mul_ps(widen8(scales), _mm256_set1_ps(dd)));
    _mm256_storeu_ps(m, _mm256_mul_ps(widen8(mins), _mm256_set1_ps(dmin)));
#else
    uint8_t scales[8], mins[8];
    std::memcpy(scales, scale, sizeof(scales));
    std::memcpy(mins, min, sizeof(mins));
    for (int j = 0; j < 8; ++j) {
        d[j] = dd * static_cast<float>(scales[j]);
        m[j] = dmin * static_cast<float>(mins[j]);
    }
#endif
}

struct Q4_K {
    static constexpr int kType = 12;
    static constexpr int64_t kValues = 256, kBytes = 144;
    static constexpr bool kSigned = false, kOffset = true, kHalfScales = false;
    static void scales(const uint8_t* b, float* d, float* m) { k_scales(b, d, m); }
    static int code(const uint8_t* b, int i) {
        const int g = i / 32;
        return b[16 + 32 * (g / 2) + i % 32] >> (4 * (g % 2)) & 0x0F;
    }
#ifdef APHRODITE_AVX2
    static void code_bytes(const uint8_t* b, int g, __m256i& lo, __m256i& hi) {
        const uint8_t* p = b + 16 + 32 * (g / 2);
        lo = bits_of(both_lanes(p), 4 * (g % 2), 0x0F);
        hi = bits_of(both_lanes(p + 16), 4 * (g % 2), 0x0F);
    }
#endif
};

struct Q5_K {
    static constexpr int kType = 13;
    static constexpr int64_t kValues = 256, kBytes = 176;
    static constexpr bool kSigned = false, kOffset = true, kHalfScales = false;
    static void scales(const uint8_t* b, float* d, float* m) { k_scales(b, d, m); }
    static int code(const uint8_t* b, int i) {
        const int g = i / 32, j = i % 32;
        return (b[48 + 32 * (g / 2) + j] >> (4 * (g % 2)) & 0x0F) | ((b[16 + j] >> g & 1) << 4);
    }
#ifdef APHRODITE_AVX2
    static void code_bytes(const uint8_t* b, int g, __m256i& lo, __m256i& hi) {
        const uint8_t* p = b + 48 + 32 * (g / 2);
        lo = _mm256_or_si256(bits_of(both_lanes(p), 4 * (g % 2), 0x0F),
                             _mm256_slli_epi16(bits_of(both_lanes(b + 16), g, 1), 4));
        hi = _mm256_or_si256(bits_of(both_lanes(p + 16), 4 * (g % 2), 0x0F),
                             _mm256_slli_epi16(bits_of(both_lanes(b + 32), g, 1), 4));
    }
#endif
};

// Q6_K: values 128h + r (h = 0, 1) take their low nibble from byte 64h + r % 64 (shifted by
// 4 * (r / 64)) and their top two bits from byte 128 + 32h + r % 32 (shifted by 2 * (r / 32)).
struct Q6_K {
    static constexpr int kType = 14;
    static constexpr int64_t kValues = 256, kBytes = 210;
    static constexpr bool kSigned = true, kOffset = false, kHalfScales = true;
    static void scales(const uint8_t* b, float* d, float*) {
        const float dd = half_to_float(b + 208);
#ifdef APHRODITE_AVX2
        for (int k = 0; k < 2; ++k) {
            const __m256i scales = _mm256_cvtepi8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 192 + 8 * k)));
            _mm256_storeu_ps(d + 8 * k,
                             _mm256_mul_ps(_mm256_cvtepi32_ps(scales), _mm256_set1_ps(dd)));
        }
#else
        for (int j = 0; j < 16; ++j)
            d[j] = dd * static_cast<float>(static_cast<int8_t>(b[192 + j]));
#endif
    }
    static int code(const uint8_t* b, int i) {
        const int h = i / 128, r = i % 128;
        const int low = b[64 * h + r % 64] >> (4 * (r / 64)) & 0x0F;
        const int high = b[128 + 32 * h + r % 32] >> (2 * (r / 32)) & 3;
        return (low | high << 4) - 32;
    }
#ifdef APHRODITE_AVX2
    static void code_bytes(const uint8_t* b, int g, __m256i& lo, __m256i& hi) {
        const int h = g / 4, r = 32 * (g % 4);
        const uint8_t* low = b + 64 * h + r % 64;
        const uint8_t* high = b + 128 + 32 * h;
        const __m256i top = _mm256_set1_epi8(32);
        lo = _mm256_sub_epi8(_mm256_or_si256(
            bits_of(both_lanes(low), 4 * (r / 64), 0x0F),
            _mm256_slli_epi16(bits_of(both_lanes(high), 2 * (r / 32), 3), 4)), top);
        hi = _mm256_sub_epi8(_mm256_or_si256(
            bits_of(both_lanes(low + 16), 4 * (r / 64), 0x0F),
            _mm256_slli_epi16(bits_of(both_lanes(high + 16), 2 * (r / 32), 3), 4)), top);
    }
#endif
};

// A block's scales and offsets (scales() fills them).
template <class F>
struct Scales {
    static constexpr int kGroups = F::kValues / kBlock;
    float d[F::kHalfScales ? 2 * kGroups : kGroups];
    float m[kGroups];
};

#ifdef APHRODITE_AVX2

struct Block {
    __m256 w[4];   // a group's codes 0-7, 8-15, 16-23, 24-31 as float
};

// Group g's codes as floats. Bytes reach the dwords through in-lane byte shuffles:
// zero-extending loads (vpmovzxbd) cross lanes and run on one port of Intel cores, which made
// them the bottleneck of the one-token loop there. Signed bytes go to the top of their dword
// and an arithmetic shift extends the sign.
template <class F>
inline Block widen(const uint8_t* block, int g) {
    __m256i half[2];
    F::code_bytes(block, g, half[0], half[1]);
    Block out;
    for (int k = 0; k < 2; ++k) {
        if (F::kSigned) {
            const __m256i top = _mm256_setr_epi8(
                -1, -1, -1, 0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3,
                -1, -1, -1, 4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7);
            const __m256i top_second = _mm256_add_epi32(top, _mm256_set1_epi32(8 << 24));
            out.w[2 * k] = _mm256_cvtepi32_ps(
                _mm256_srai_epi32(_mm256_shuffle_epi8(half[k], top), 24));
            out.w[2 * k + 1] = _mm256_cvtepi32_ps(
                _mm256_srai_epi32(_mm256_shuffle_epi8(half[k], top_second), 24));
        } else {
            // Bytes 0-7 (then 8-15) to the low byte of each dword; -1 zeroes the other three.
            const __m256i first = _mm256_setr_epi8(
                0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
            const __m256i second = _mm256_add_epi32(first, _mm256_set1_epi32(8));
            out.w[2 * k] = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(half[k], first));
            out.w[2 * k + 1] = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(half[k], second));
        }
    }
    return out;
}

#endif

}  // namespace quantized
