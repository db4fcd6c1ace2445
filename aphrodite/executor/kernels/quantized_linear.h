// Weight-only quantised matrix products on CPU: out = x @ W^T for a few tokens (decode), with W
// kept in blocks of 32 weights laid out as GGUF stores them (a row is its blocks in order).
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by cpu_kernels.py.
//
//   int4 (Q4_1's block, Q4_0 converted to it): float16 d, float16 m, then 16 bytes; byte j holds
//         weight j in its low nibble and weight j + 16 in its high one; w = d * q + m, q 0..15.
//   int8 (Q8_0's block): float16 d, then 32 int8 q; w = d * q.
//
// Decode reads every weight once per token, so bytes are time: GGUF's blocks are the smallest
// form (0.625 and 1.0625 bytes a weight), and a row is one sequential stream.
//
// Activations stay float32: each block's dot product is sum(x * q), scaled by d, plus
// m * sum(x) with sum(x) computed once per call. That is the dequantised matrix's product with
// the float32 rounding order changed, nothing rounded coarser, so greedy output follows the
// dequantised model's. (torch's int4 kernels vectorise only bfloat16 activations, and the
// bfloat16 rounding of x alone flips greedy tokens on this model.)
//
// Work is split over output rows; a row's blocks are widened to float once per tile of up to
// four tokens, so small decode batches read and widen the weights once per four tokens.

#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define APHRODITE_AVX2 1
#include <immintrin.h>
#endif

namespace quantized {

constexpr int64_t kBlock = 32;
constexpr int64_t kTokenTile = 4;

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

inline Block widen_int4(const uint8_t* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(raw, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    return {{_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low)),
             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(low, low))),
             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high)),
             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(high, high)))}};
}

inline Block widen_int8(const uint8_t* p) {
    Block b;
    for (int k = 0; k < 4; ++k) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * k));
        b.w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
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
         float* out) {
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
            float* o = out + t0 * rows + r;
            switch (tokens - t0 < kTokenTile ? tokens - t0 : kTokenTile) {
                case 1: row_tile<kInt4, 1>(row, blocks, xt, cols, xs, o, rows); break;
                case 2: row_tile<kInt4, 2>(row, blocks, xt, cols, xs, o, rows); break;
                case 3: row_tile<kInt4, 3>(row, blocks, xt, cols, xs, o, rows); break;
                default: row_tile<kInt4, 4>(row, blocks, xt, cols, xs, o, rows);
            }
        }
    }
}

// Float32 rows of the matrix, w = d * q + m rounded twice (product, then sum) like gguf's and
// numpy's dequantisation, so dense paths see the same numbers either way; contraction to one
// fused multiply-add is turned off for this function only.
template <bool kInt4>
__attribute__((optimize("fp-contract=off")))
void dequantize(const uint8_t* weight, int64_t rows, int64_t cols, float* out) {
    const int64_t blocks = cols / kBlock;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < blocks; ++g) {
            const uint8_t* block = weight + (r * blocks + g) * block_bytes<kInt4>();
            const uint8_t* p = block + (kInt4 ? 4 : 2);
            const float d = half_to_float(block), m = kInt4 ? half_to_float(block + 2) : 0.f;
            float* o = out + r * cols + g * kBlock;
            if (kInt4) {
                for (int64_t j = 0; j < kBlock / 2; ++j) {
                    o[j] = static_cast<float>(p[j] & 0x0F) * d + m;
                    o[j + kBlock / 2] = static_cast<float>(p[j] >> 4) * d + m;
                }
            } else {
                for (int64_t j = 0; j < kBlock; ++j)
                    o[j] = static_cast<float>(static_cast<int8_t>(p[j])) * d;
            }
        }
    }
}

// x [tokens, cols] float32; weight [rows, cols / 32 blocks] as above; out [tokens, rows].
// cols % 32 == 0.
inline void matmul(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight,
                   bool is_int4, int64_t rows, float* out) {
    if (is_int4) {
        run<true>(x, tokens, cols, weight, rows, out);
    } else {
        run<false>(x, tokens, cols, weight, rows, out);
    }
}

}  // namespace quantized
