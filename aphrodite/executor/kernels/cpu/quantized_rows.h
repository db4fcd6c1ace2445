// GGUF blocks row by row (their layout: quantized_linear.h): products of a few tokens,
// split over output rows, and dequantisation.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "vec8.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define APHRODITE_AVX2 1
#include <immintrin.h>
#endif

namespace quantized {

constexpr int64_t kBlock = 32;
constexpr int64_t kTokenTile = 4;
// Decode streams each thread's rows from memory once, and the hardware prefetcher alone
// leaves a core on a 2-vCPU Xeon VM (Sapphire Rapids class) at about 3 GB/s: one int4 matrix
// product, 150 MB of blocks, takes 7.8 cycles a block with this software prefetch 2 KB ahead
// and 18.5 without (nearer is slower, further gains nothing). Past the end of the rows it is
// a harmless hint.
constexpr int64_t kPrefetchAhead = 2048;

template <bool kInt4>
constexpr int64_t block_bytes() { return kInt4 ? 4 + kBlock / 2 : 2 + kBlock; }

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

#ifdef APHRODITE_AVX2

struct Block {
    __m256 w[4];   // weights 0-7, 8-15, 16-23, 24-31 as float
};

// The 16 bytes go to both halves of a register and an in-lane byte shuffle spreads them into
// dwords: zero-extending loads (vpmovzxbd) cross lanes and run on one port of Intel cores,
// which made them the bottleneck of the one-token loop there.
inline Block widen_int4(const uint8_t* p) {
    const __m256i raw = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i low = _mm256_and_si256(raw, mask);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    // Bytes 0-7 (then 8-15) to the low byte of each dword; -1 zeroes the other three.
    const __m256i first = _mm256_setr_epi8(
        0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
        4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i second = _mm256_add_epi32(first, _mm256_set1_epi32(8));
    return {{_mm256_cvtepi32_ps(_mm256_shuffle_epi8(low, first)),
             _mm256_cvtepi32_ps(_mm256_shuffle_epi8(low, second)),
             _mm256_cvtepi32_ps(_mm256_shuffle_epi8(high, first)),
             _mm256_cvtepi32_ps(_mm256_shuffle_epi8(high, second))}};
}

// The same in-lane spreading, each byte to the top of its dword, then an arithmetic shift
// extends its sign.
inline Block widen_int8(const uint8_t* p) {
    const __m256i top = _mm256_setr_epi8(
        -1, -1, -1, 0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3,
        -1, -1, -1, 4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7);
    const __m256i top_second = _mm256_add_epi32(top, _mm256_set1_epi32(8 << 24));
    Block b;
    for (int half = 0; half < 2; ++half) {
        const __m256i raw = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * half)));
        b.w[2 * half] = _mm256_cvtepi32_ps(
            _mm256_srai_epi32(_mm256_shuffle_epi8(raw, top), 24));
        b.w[2 * half + 1] = _mm256_cvtepi32_ps(
            _mm256_srai_epi32(_mm256_shuffle_epi8(raw, top_second), 24));
    }
    return b;
}

inline float sum8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// One output row for kTokens tokens (a compile-time count, so the accumulators stay in
// registers).
template <bool kInt4, int kTokens>
void row_tile(const uint8_t* row, int64_t blocks, const float* x, int64_t cols,
              const float* x_sums, float* out, int64_t rows) {
    __m256 acc[kTokens];
    float offset[kTokens];
    for (int t = 0; t < kTokens; ++t) {
        acc[t] = _mm256_setzero_ps();
        offset[t] = 0.0f;
    }
    for (int64_t g = 0; g < blocks; ++g) {
        const uint8_t* block = row + g * block_bytes<kInt4>();
        __builtin_prefetch(block + kPrefetchAhead);
        const Block b = kInt4 ? widen_int4(block + 4) : widen_int8(block + 2);
        const __m256 d = _mm256_set1_ps(half_to_float(block));
        const float m = kInt4 ? half_to_float(block + 2) : 0.0f;
        for (int t = 0; t < kTokens; ++t) {
            const float* xg = x + t * cols + g * kBlock;
            const __m256 s = _mm256_add_ps(
                _mm256_fmadd_ps(b.w[0], _mm256_loadu_ps(xg),
                                _mm256_mul_ps(b.w[1], _mm256_loadu_ps(xg + 8))),
                _mm256_fmadd_ps(b.w[2], _mm256_loadu_ps(xg + 16),
                                _mm256_mul_ps(b.w[3], _mm256_loadu_ps(xg + 24))));
            acc[t] = _mm256_fmadd_ps(s, d, acc[t]);
            if (kInt4) offset[t] += m * x_sums[t * blocks + g];
        }
    }
    for (int t = 0; t < kTokens; ++t) out[t * rows] = sum8(acc[t]) + offset[t];
}

#else   // portable fallback: the same arithmetic, one weight at a time

template <bool kInt4, int kTokens>
void row_tile(const uint8_t* row, int64_t blocks, const float* x, int64_t cols,
              const float* x_sums, float* out, int64_t rows) {
    for (int t = 0; t < kTokens; ++t) {
        float total = 0.0f;
        for (int64_t g = 0; g < blocks; ++g) {
            const uint8_t* block = row + g * block_bytes<kInt4>();
            const uint8_t* p = block + (kInt4 ? 4 : 2);
            const float* xg = x + t * cols + g * kBlock;
            float s = 0.0f;
            for (int64_t j = 0; j < kBlock; ++j) {
                float q;
                if (kInt4) {
                    q = static_cast<float>(j < 16 ? p[j] & 0x0F : p[j - 16] >> 4);
                } else {
                    q = static_cast<float>(static_cast<int8_t>(p[j]));
                }
                s += q * xg[j];
            }
            total += s * half_to_float(block);
            if (kInt4) total += half_to_float(block + 2) * x_sums[t * blocks + g];
        }
        out[t * rows] = total;
    }
}

#endif

template <bool kInt4>
void run(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight, int64_t rows,
         int64_t out_stride, float* out) {
    const int64_t blocks = cols / kBlock;
    const int64_t row_bytes = blocks * block_bytes<kInt4>();
    std::vector<float> x_sums(kInt4 ? tokens * blocks : 0);
    for (int64_t i = 0; kInt4 && i < tokens * blocks; ++i) {
        float s = 0.0f;
        for (int64_t j = 0; j < kBlock; ++j) s += x[i * kBlock + j];
        x_sums[i] = s;
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t t0 = 0; t0 < tokens; t0 += kTokenTile) {
            const uint8_t* row = weight + r * row_bytes;
            const float* xt = x + t0 * cols;
            const float* xs = kInt4 ? x_sums.data() + t0 * blocks : nullptr;
            float* o = out + t0 * out_stride + r;
            switch (tokens - t0 < kTokenTile ? tokens - t0 : kTokenTile) {
                case 1: row_tile<kInt4, 1>(row, blocks, xt, cols, xs, o, out_stride); break;
                case 2: row_tile<kInt4, 2>(row, blocks, xt, cols, xs, o, out_stride); break;
                case 3: row_tile<kInt4, 3>(row, blocks, xt, cols, xs, o, out_stride); break;
                default: row_tile<kInt4, 4>(row, blocks, xt, cols, xs, o, out_stride);
            }
        }
    }
}

// One float32 row of the matrix, w = d * q + m rounded twice (product, then sum) like gguf's
// and numpy's dequantisation, so dense paths see the same numbers either way; contraction to
// one fused multiply-add is turned off for this function only.
template <bool kInt4>
__attribute__((optimize("fp-contract=off")))
void dequantize_row(const uint8_t* row, int64_t cols, float* out) {
    for (int64_t g = 0; g < cols / kBlock; ++g) {
        const uint8_t* block = row + g * block_bytes<kInt4>();
        __builtin_prefetch(block + kPrefetchAhead);
        const uint8_t* p = block + (kInt4 ? 4 : 2);
        const float d = half_to_float(block), m = kInt4 ? half_to_float(block + 2) : 0.f;
        float* o = out + g * kBlock;
#if defined(__AVX512F__) && defined(APHRODITE_AVX2)
        // Sixteen at a time: half the instructions of the eight-wide form below, in which
        // dequantisation takes about a sixth of a 32-token product's time.
        __m512i q0, q1;
        if (kInt4) {
            const __m512i bytes = _mm512_cvtepu8_epi32(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
            q0 = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
            q1 = _mm512_srli_epi32(bytes, 4);
        } else {
            q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
            q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        }
        const __m512 d16 = _mm512_set1_ps(d), m16 = _mm512_set1_ps(m);
        const __m512 s0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d16);
        const __m512 s1 = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d16);
        _mm512_storeu_ps(o, kInt4 ? _mm512_add_ps(s0, m16) : s0);
        _mm512_storeu_ps(o + 16, kInt4 ? _mm512_add_ps(s1, m16) : s1);
#elif defined(APHRODITE_AVX2)
        const Block b = kInt4 ? widen_int4(p) : widen_int8(p);
        const __m256 d8 = _mm256_set1_ps(d), m8 = _mm256_set1_ps(m);
        for (int k = 0; k < 4; ++k) {
            const __m256 scaled = _mm256_mul_ps(b.w[k], d8);
            _mm256_storeu_ps(o + 8 * k, kInt4 ? _mm256_add_ps(scaled, m8) : scaled);
        }
#else
        if (kInt4) {
            for (int64_t j = 0; j < kBlock / 2; ++j) {
                o[j] = static_cast<float>(p[j] & 0x0F) * d + m;
                o[j + kBlock / 2] = static_cast<float>(p[j] >> 4) * d + m;
            }
        } else {
            for (int64_t j = 0; j < kBlock; ++j)
                o[j] = static_cast<float>(static_cast<int8_t>(p[j])) * d;
        }
#endif
    }
}

template <bool kInt4>
void dequantize_matrix(const uint8_t* weight, int64_t rows, int64_t cols, float* out) {
    const int64_t row_bytes = cols / kBlock * block_bytes<kInt4>();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        dequantize_row<kInt4>(weight + r * row_bytes, cols, out + r * cols);
}

}  // namespace quantized
