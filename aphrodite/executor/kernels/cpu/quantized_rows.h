// GGUF blocks row by row (their formats: gguf_blocks.h): products of a few tokens, split
// over output rows, and dequantisation. Templates over the block format F.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "gguf_blocks.h"
#include "vec8.h"

namespace quantized {

constexpr int64_t kTokenTile = 4;
// Decode streams each thread's rows from memory once, and the hardware prefetcher alone
// leaves a core on a 2-vCPU Xeon VM (Sapphire Rapids class) at about 3 GB/s: one int4 matrix
// product, 150 MB of blocks, takes 7.8 cycles a block with this software prefetch 2 KB ahead
// and 18.5 without (nearer is slower, further gains nothing). Past the end of the rows it is
// a harmless hint. On a 2-vCPU AMD EPYC (Zen 4) VM, 1, 3 and 4 KB ahead time within the
// noise of 2 KB (quantized_linear of 1 and 4 tokens, in process). Blocks of 256 values get
// one prefetch per group of 32, so every cache line of theirs gets one too.
constexpr int64_t kPrefetchAhead = 2048;

#ifdef APHRODITE_AVX512

// One output row for kTokens tokens (a compile-time count, so the accumulators stay in
// registers), sixteen values a vector: a group's codes widen from bytes into two __m512.
// Without half scales and with one token, each group adds D * (x * q) to an accumulator
// (a multiply and two multiply-adds); otherwise the codes are scaled once and every token
// adds x * (D * q) (two multiply-adds a token). With offsets, M * sum(x) goes to a scalar
// sum, sum(x) per group computed once per call (x_sums). With one token, even and odd groups
// (blocks, for formats of one group a block) go to separate accumulators, so that no chain
// of dependent additions holds the product back; several tokens make enough chains.
template <class F, int kTokens>
void row_tile(const uint8_t* row, int64_t blocks, const float* x, int64_t cols,
              const float* x_sums, float* out, int64_t rows) {
    constexpr int kGroups = Scales<F>::kGroups;
    constexpr bool kPrescale = F::kHalfScales || kTokens > 1;
    constexpr int kSets = kTokens == 1 ? 2 : 1;   // several tokens: chains enough already
    const int64_t groups = blocks * kGroups;
    __m512 acc[kSets][2][kTokens];
    float offset[kSets][kTokens];
    for (int p = 0; p < kSets; ++p)
        for (int t = 0; t < kTokens; ++t) {
            acc[p][0][t] = acc[p][1][t] = _mm512_setzero_ps();
            offset[p][t] = 0.0f;
        }
    const auto group = [&](const uint8_t* block, const Scales<F>& s, int g, int64_t at,
                           int set) {
        const int p = set % kSets;
        __builtin_prefetch(block + kPrefetchAhead + g * (F::kBytes / kGroups));
        __m256i half[2];
        F::code_bytes(block, g, half[0], half[1]);
        __m512 w[2];
        for (int h = 0; h < 2; ++h) {
            const __m128i bytes = _mm256_castsi256_si128(half[h]);
            w[h] = _mm512_cvtepi32_ps(F::kSigned ? _mm512_cvtepi8_epi32(bytes)
                                                 : _mm512_cvtepu8_epi32(bytes));
            if (kPrescale)
                w[h] = _mm512_mul_ps(w[h], _mm512_set1_ps(s.d[F::kHalfScales ? 2 * g + h : g]));
        }
        for (int t = 0; t < kTokens; ++t) {
            const float* xg = x + t * cols + at * kBlock;
            const __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
            if (kPrescale) {
                acc[p][0][t] = _mm512_fmadd_ps(w[0], x0, acc[p][0][t]);
                acc[p][1][t] = _mm512_fmadd_ps(w[1], x1, acc[p][1][t]);
            } else {
                acc[p][0][t] = _mm512_fmadd_ps(
                    _mm512_fmadd_ps(w[0], x0, _mm512_mul_ps(w[1], x1)),
                    _mm512_set1_ps(s.d[g]), acc[p][0][t]);
            }
            if (F::kOffset) offset[p][t] += s.m[g] * x_sums[t * groups + at];
        }
    };
    if constexpr (kGroups == 1) {
        Scales<F> s0, s1;
        int64_t i = 0;
        for (; i + 1 < blocks; i += 2) {
            const uint8_t* block = row + i * F::kBytes;
            F::scales(block, s0.d, s0.m);
            F::scales(block + F::kBytes, s1.d, s1.m);
            group(block, s0, 0, i, 0);
            group(block + F::kBytes, s1, 0, i + 1, 1);
        }
        if (i < blocks) {
            F::scales(row + i * F::kBytes, s0.d, s0.m);
            group(row + i * F::kBytes, s0, 0, i, 0);
        }
    } else {
        static_assert(kGroups % 2 == 0, "groups alternate between two accumulators");
        for (int64_t i = 0; i < blocks; ++i) {
            const uint8_t* block = row + i * F::kBytes;
            Scales<F> s;
            F::scales(block, s.d, s.m);
            for (int g = 0; g < kGroups; g += 2) {
                group(block, s, g, i * kGroups + g, 0);
                group(block, s, g + 1, i * kGroups + g + 1, 1);
            }
        }
    }
    for (int t = 0; t < kTokens; ++t) {
        __m512 sum = _mm512_add_ps(acc[0][0][t], acc[0][1][t]);
        float offsets = offset[0][t];
        if (kSets == 2) {
            sum = _mm512_add_ps(sum, _mm512_add_ps(acc[kSets - 1][0][t], acc[kSets - 1][1][t]));
            offsets += offset[kSets - 1][t];
        }
        out[t * rows] = _mm512_reduce_add_ps(sum) + offsets;
    }
}

#elif defined(APHRODITE_AVX2)

inline float sum8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// One output row for kTokens tokens (a compile-time count, so the accumulators stay in
// registers). Each group adds D * sum(x * q) to a vector accumulator and, with offsets,
// M * sum(x) to a scalar one, sum(x) per group computed once per call (x_sums).
template <class F, int kTokens>
void row_tile(const uint8_t* row, int64_t blocks, const float* x, int64_t cols,
              const float* x_sums, float* out, int64_t rows) {
    constexpr int kGroups = Scales<F>::kGroups;
    const int64_t groups = blocks * kGroups;
    __m256 acc[kTokens];
    float offset[kTokens];
    for (int t = 0; t < kTokens; ++t) {
        acc[t] = _mm256_setzero_ps();
        offset[t] = 0.0f;
    }
    for (int64_t i = 0; i < blocks; ++i) {
        const uint8_t* block = row + i * F::kBytes;
        Scales<F> s;
        F::scales(block, s.d, s.m);
        for (int g = 0; g < kGroups; ++g) {
            __builtin_prefetch(block + kPrefetchAhead + g * (F::kBytes / kGroups));
            const Block b = widen<F>(block, g);
            const int64_t at = i * kGroups + g;
            for (int t = 0; t < kTokens; ++t) {
                const float* xg = x + t * cols + at * kBlock;
                const __m256 low = _mm256_fmadd_ps(
                    b.w[0], _mm256_loadu_ps(xg), _mm256_mul_ps(b.w[1], _mm256_loadu_ps(xg + 8)));
                const __m256 high = _mm256_fmadd_ps(
                    b.w[2], _mm256_loadu_ps(xg + 16),
                    _mm256_mul_ps(b.w[3], _mm256_loadu_ps(xg + 24)));
                if (F::kHalfScales) {
                    acc[t] = _mm256_fmadd_ps(low, _mm256_set1_ps(s.d[2 * g]), acc[t]);
                    acc[t] = _mm256_fmadd_ps(high, _mm256_set1_ps(s.d[2 * g + 1]), acc[t]);
                } else {
                    acc[t] = _mm256_fmadd_ps(_mm256_add_ps(low, high), _mm256_set1_ps(s.d[g]),
                                             acc[t]);
                }
                if (F::kOffset) offset[t] += s.m[g] * x_sums[t * groups + at];
            }
        }
    }
    for (int t = 0; t < kTokens; ++t) out[t * rows] = sum8(acc[t]) + offset[t];
}

#else   // portable fallback: the same arithmetic, one weight at a time

template <class F, int kTokens>
void row_tile(const uint8_t* row, int64_t blocks, const float* x, int64_t cols,
              const float* x_sums, float* out, int64_t rows) {
    constexpr int kGroups = Scales<F>::kGroups;
    const int64_t groups = blocks * kGroups;
    for (int t = 0; t < kTokens; ++t) {
        float total = 0.0f;
        for (int64_t i = 0; i < blocks; ++i) {
            const uint8_t* block = row + i * F::kBytes;
            Scales<F> s;
            F::scales(block, s.d, s.m);
            for (int g = 0; g < kGroups; ++g) {
                const int64_t at = i * kGroups + g;
                const float* xg = x + t * cols + at * kBlock;
                float half[2] = {0.0f, 0.0f};
                for (int j = 0; j < kBlock; ++j)
                    half[j / 16] += static_cast<float>(F::code(block, g * kBlock + j)) * xg[j];
                if (F::kHalfScales) total += half[0] * s.d[2 * g] + half[1] * s.d[2 * g + 1];
                else total += (half[0] + half[1]) * s.d[g];
                if (F::kOffset) total += s.m[g] * x_sums[t * groups + at];
            }
        }
        out[t * rows] = total;
    }
}

#endif

template <class F>
void run(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight, int64_t rows,
         int64_t out_stride, float* out) {
    const int64_t blocks = cols / F::kValues;
    const int64_t row_bytes = blocks * F::kBytes;
    const int64_t groups = cols / kBlock;
    std::vector<float> x_sums(F::kOffset ? tokens * groups : 0);
    for (int64_t i = 0; F::kOffset && i < tokens * groups; ++i) {
        float s = 0.0f;
        for (int64_t j = 0; j < kBlock; ++j) s += x[i * kBlock + j];
        x_sums[i] = s;
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t t0 = 0; t0 < tokens; t0 += kTokenTile) {
            const uint8_t* row = weight + r * row_bytes;
            const float* xt = x + t0 * cols;
            const float* xs = F::kOffset ? x_sums.data() + t0 * groups : nullptr;
            float* o = out + t0 * out_stride + r;
            switch (tokens - t0 < kTokenTile ? tokens - t0 : kTokenTile) {
                case 1: row_tile<F, 1>(row, blocks, xt, cols, xs, o, out_stride); break;
                case 2: row_tile<F, 2>(row, blocks, xt, cols, xs, o, out_stride); break;
                case 3: row_tile<F, 3>(row, blocks, xt, cols, xs, o, out_stride); break;
                default: row_tile<F, 4>(row, blocks, xt, cols, xs, o, out_stride);
            }
        }
    }
}

// One float32 row of the matrix, w = D * q + M rounded twice (product, then sum) like gguf's
// and numpy's dequantisation, so dense paths see the same numbers either way; contraction to
// one fused multiply-add is turned off for this function only, and the products and sums are
// written here, not in helpers inlined from elsewhere.
template <class F>
__attribute__((optimize("fp-contract=off")))
void dequantize_row(const uint8_t* row, int64_t cols, float* out) {
    constexpr int kGroups = Scales<F>::kGroups;
    for (int64_t i = 0; i < cols / F::kValues; ++i) {
        const uint8_t* block = row + i * F::kBytes;
        Scales<F> s;
        F::scales(block, s.d, s.m);
        for (int g = 0; g < kGroups; ++g) {
            __builtin_prefetch(block + kPrefetchAhead + g * (F::kBytes / kGroups));
            float* o = out + (i * kGroups + g) * kBlock;
            const float m = F::kOffset ? s.m[g] : 0.0f;
#ifdef APHRODITE_AVX512
            // Sixteen at a time: half the instructions of the eight-wide form below, in which
            // dequantisation takes about a sixth of a 32-token product's time.
            __m256i half[2];
            F::code_bytes(block, g, half[0], half[1]);
            for (int h = 0; h < 2; ++h) {
                const __m128i bytes = _mm256_castsi256_si128(half[h]);
                const __m512i q = F::kSigned ? _mm512_cvtepi8_epi32(bytes)
                                             : _mm512_cvtepu8_epi32(bytes);
                const __m512 scaled = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(q), _mm512_set1_ps(s.d[F::kHalfScales ? 2 * g + h : g]));
                _mm512_storeu_ps(o + 16 * h,
                                 F::kOffset ? _mm512_add_ps(scaled, _mm512_set1_ps(m)) : scaled);
            }
#elif defined(APHRODITE_AVX2)
            const Block b = widen<F>(block, g);
            for (int k = 0; k < 4; ++k) {
                const __m256 scaled = _mm256_mul_ps(
                    b.w[k], _mm256_set1_ps(s.d[F::kHalfScales ? 2 * g + k / 2 : g]));
                _mm256_storeu_ps(o + 8 * k,
                                 F::kOffset ? _mm256_add_ps(scaled, _mm256_set1_ps(m)) : scaled);
            }
#else
            for (int j = 0; j < kBlock; ++j) {
                const float scaled = static_cast<float>(F::code(block, g * kBlock + j)) *
                                     s.d[F::kHalfScales ? 2 * g + j / 16 : g];
                o[j] = F::kOffset ? scaled + m : scaled;
            }
#endif
        }
    }
}

template <class F>
void dequantize_matrix(const uint8_t* weight, int64_t rows, int64_t cols, float* out) {
    const int64_t row_bytes = cols / F::kValues * F::kBytes;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        dequantize_row<F>(weight + r * row_bytes, cols, out + r * cols);
}

}  // namespace quantized
