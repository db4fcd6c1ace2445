// Weight-only quantised matrix products on CPU: out = x @ W^T for a few tokens (decode), with W
// kept in blocks of 32 weights laid out as GGUF stores them (a row is its blocks in order).
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
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
// Up to 7 tokens, work is split over output rows; a row's blocks are widened to float once per
// tile of up to four tokens. From 8 tokens, panels of rows are widened into a float32 buffer
// and multiplied in register tiles (run_panels below).

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
void dequantize(const uint8_t* weight, int64_t rows, int64_t cols, float* out) {
    const int64_t row_bytes = cols / kBlock * block_bytes<kInt4>();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        dequantize_row<kInt4>(weight + r * row_bytes, cols, out + r * cols);
}

// Panels, for batches of kPanelFromTokens tokens and more: each thread widens kPanelRows rows
// into float32 at a time (exactly as dequantize does) and multiplies them with every token.
// The tokens are transposed once per call, each tile of 16 (or a last 8) on its own as
// [cols][16], so a tile's tokens are one sequential stream (64-token products: 144-161
// GFLOP/s, against 111-147 laid out [cols][whole batch]). A tile is kRows rows x 16
// tokens of independent sums, a weight broadcast against two vectors of tokens: no
// horizontal sums. Each output is one sequential sum over k of the dense matrix's
// products. Memory traffic is the quantised blocks', not the float32 copy's.
//
// Tiles store their sums row by row into the panel's [rows][padded tokens] buffer, whole
// vectors at a time, and the panel's rows are transposed into out as soon as its tiles are
// done, while the buffer is in L1 (the default model's linears, 30 layers, 2 threads, 16
// tokens: 18.6 ms, against 20.6 with one pass over all rows at the end of the call, behind a
// barrier). Stored straight into out ([tokens][rows]), a tile's 32 tokens of one row would
// be 32 stores rows * 4 bytes apart, with 3072 rows (12 KB, a multiple of 4 KB) all in one L1
// set: 115 GFLOP/s a core in the AVX-512 tile loop instead of 163.
constexpr int64_t kPanelFromTokens = 8;
constexpr int64_t kTileRows = 6;
constexpr int64_t kPanelRows = 4 * kTileRows;

// xt: this tile's tokens, [cols][8 * kVectors]. res: the tile's first row's sums for these
// tokens; a row's are `stride` floats after the previous one's.
template <int kVectors, int kRows>
inline void broadcast_tile(const float* xt, const float* w, int64_t cols, float* res,
                           int64_t stride) {
    using vec8::v8;
    v8 acc[kRows][kVectors] = {};
    for (int64_t k = 0; k < cols; ++k) {
        v8 xk[kVectors];
        for (int v = 0; v < kVectors; ++v) xk[v] = vec8::load8(xt + (k * kVectors + v) * 8);
        for (int r = 0; r < kRows; ++r) {
            const v8 wk = vec8::splat8(w[r * cols + k]);
            for (int v = 0; v < kVectors; ++v) acc[r][v] += wk * xk[v];
        }
    }
    for (int r = 0; r < kRows; ++r)
        for (int v = 0; v < kVectors; ++v) vec8::store8(res + r * stride + 8 * v, acc[r][v]);
}

template <int kVectors>
inline void broadcast_tiles(const float* xt, const float* panel, int64_t count,
                            int64_t cols, float* res, int64_t stride) {
    int64_t r = 0;
    for (; r + kTileRows <= count; r += kTileRows)
        broadcast_tile<kVectors, kTileRows>(xt, panel + r * cols, cols, res + r * stride,
                                            stride);
    const float* w = panel + r * cols;
    float* o = res + r * stride;
    switch (count - r) {   // a panel's last rows
        case 5: broadcast_tile<kVectors, 5>(xt, w, cols, o, stride); break;
        case 4: broadcast_tile<kVectors, 4>(xt, w, cols, o, stride); break;
        case 3: broadcast_tile<kVectors, 3>(xt, w, cols, o, stride); break;
        case 2: broadcast_tile<kVectors, 2>(xt, w, cols, o, stride); break;
        case 1: broadcast_tile<kVectors, 1>(xt, w, cols, o, stride); break;
    }
}

#if defined(__AVX512F__)
// With AVX-512 a tile of 16 tokens is one register, and 32 of them hold kWideRows rows x 32
// tokens of sums: twice the arithmetic per instruction of the eight-wide tiles above, which
// run at AVX2's peak. Each output is still one sequential sum over k, so the results are
// bit-identical. xt: tiles of 16 tokens, [cols][16] each, kVectors of them back to back.
typedef float v16 __attribute__((vector_size(64)));
constexpr int64_t kWideRows = 12;

template <int kVectors, int kRows>
inline void wide_tile(const float* xt, const float* w, int64_t cols, float* res,
                      int64_t stride) {
    v16 acc[kRows][kVectors] = {};
    for (int64_t k = 0; k < cols; ++k) {
        v16 xk[kVectors];
        for (int v = 0; v < kVectors; ++v) std::memcpy(&xk[v], xt + v * 16 * cols + k * 16, 64);
        for (int r = 0; r < kRows; ++r) {
            const float wk = w[r * cols + k];
            for (int v = 0; v < kVectors; ++v) acc[r][v] += wk * xk[v];
        }
    }
    for (int r = 0; r < kRows; ++r)
        for (int v = 0; v < kVectors; ++v)
            std::memcpy(res + r * stride + 16 * v, &acc[r][v], 64);
}

template <int kVectors>
inline void wide_tiles(const float* xt, const float* panel, int64_t count, int64_t cols,
                       float* res, int64_t stride) {
    int64_t r = 0;
    for (; r + kWideRows <= count; r += kWideRows)
        wide_tile<kVectors, kWideRows>(xt, panel + r * cols, cols, res + r * stride, stride);
    for (; r + 4 <= count; r += 4)
        wide_tile<kVectors, 4>(xt, panel + r * cols, cols, res + r * stride, stride);
    for (; r < count; ++r)
        wide_tile<kVectors, 1>(xt, panel + r * cols, cols, res + r * stride, stride);
}
#endif

// dst[j * dst_stride + i] = src[i * src_stride + j] for an 8 x 8 block: the panels' token
// transpositions, which one element at a time cost a tenth of a 64-token product.
inline void transpose8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
#ifdef APHRODITE_AVX2
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * dst_stride,
                         _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
#else
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
#endif
}

// Tokens are computed in tiles of 8, or with AVX-512 of 16 and 32, zeros filling a last tile.
// A 32-token tile costs about what 16 + 8 tokens do in narrower ones (all linears of the
// default model, 2 threads: 32 tokens 30 ms, 24 tokens 33 ms), so with AVX-512 more than 16
// left over are padded to 32.
inline int64_t padded_tokens(int64_t tokens) {
#if defined(__AVX512F__)
    const int64_t rest = tokens % 32;
    if (tokens > 8 && rest != 0) return tokens - rest + (rest > 16 ? 32 : 16);
#endif
    return (tokens + 7) / 8 * 8;
}

// The panels' buffers, kept per thread between calls and grown as needed. Allocated afresh
// for each call they would be mapped and faulted in page by page each time (glibc maps blocks
// above 128 KB): a 64-token product of the 960 x 576 matrix takes 266 us with them kept, 365
// with fresh ones.
inline float* scratch(int slot, int64_t n) {
    static thread_local std::vector<float> buffers[3];
    if (static_cast<int64_t>(buffers[slot].size()) < n) buffers[slot].resize(n);
    return buffers[slot].data();
}

// out[t * rows + first + r] = sums[r * padded + t] for a panel's count rows and every token:
// eight rows by eight tokens at a time, a last group's missing tokens not stored.
inline void store_panel(const float* sums, int64_t padded, int64_t tokens, int64_t count,
                        float* out, int64_t rows) {
    float block[64];
    const int64_t whole = count / 8 * 8;
    for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
        const int64_t n = std::min<int64_t>(8, tokens - t0);
        for (int64_t r = 0; r < whole; r += 8) {
            if (n == 8) {
                transpose8(sums + r * padded + t0, padded, out + t0 * rows + r, rows);
                continue;
            }
            transpose8(sums + r * padded + t0, padded, block, 8);
            for (int64_t t = 0; t < n; ++t)
                std::memcpy(out + (t0 + t) * rows + r, block + t * 8, 8 * sizeof(float));
        }
        for (int64_t r = whole; r < count; ++r)       // rows past the last whole group
            for (int64_t t = t0; t < t0 + n; ++t) out[t * rows + r] = sums[r * padded + t];
    }
}

template <bool kInt4>
void run_panels(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight,
                int64_t rows, float* out) {
    const int64_t row_bytes = cols / kBlock * block_bytes<kInt4>();
    const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
    const int64_t padded = padded_tokens(tokens), groups = padded / 8;
    // Tile by tile, tokens t.. at xt + t * cols. Not zeroed, since every element is written
    // before it is read.
    float* xt = scratch(0, cols * padded);
#pragma omp parallel
    {
        // Eight tokens by eight columns at a time; a last group's missing tokens are zeros.
        float block[64];
#pragma omp for schedule(static)
        for (int64_t item = 0; item < groups * (cols / 8); ++item) {
            const int64_t t0 = item % groups * 8, k = item / groups * 8;
            const int64_t tile = t0 / 16 * 16, width = std::min<int64_t>(16, padded - tile);
            const float* src = x + t0 * cols + k;
            int64_t src_stride = cols;
            if (t0 + 8 > tokens) {
                std::fill(block, block + 64, 0.f);
                for (int64_t t = t0; t < tokens; ++t)
                    std::memcpy(block + (t - t0) * 8, x + t * cols + k, 8 * sizeof(float));
                src = block;
                src_stride = 8;
            }
            transpose8(src, src_stride, xt + tile * cols + k * width + t0 - tile, width);
        }
        float* panel = scratch(2, kPanelRows * cols);
        float* res = scratch(1, kPanelRows * padded);      // this thread's panel's sums
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t first = p * kPanelRows, count = std::min(kPanelRows, rows - first);
            for (int64_t r = 0; r < count; ++r)
                dequantize_row<kInt4>(weight + (first + r) * row_bytes, cols,
                                      panel + r * cols);
            int64_t t = 0;
#if defined(__AVX512F__)
            for (; t + 32 <= padded; t += 32)
                wide_tiles<2>(xt + t * cols, panel, count, cols, res + t, padded);
            for (; t + 16 <= padded; t += 16)
                wide_tiles<1>(xt + t * cols, panel, count, cols, res + t, padded);
#endif
            for (; t < padded; t += 16) {
                if (padded - t >= 16)
                    broadcast_tiles<2>(xt + t * cols, panel, count, cols,
                                       res + t, padded);
                else
                    broadcast_tiles<1>(xt + t * cols, panel, count, cols,
                                       res + t, padded);
            }
            store_panel(res, padded, tokens, count, out + first, rows);
        }
    }
}

// x [tokens, cols] float32; weight [rows, cols / 32 blocks] as above; out [tokens, rows].
// cols % 32 == 0.
inline void matmul(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight,
                   bool is_int4, int64_t rows, float* out) {
    if (tokens >= kPanelFromTokens) {
        if (is_int4) run_panels<true>(x, tokens, cols, weight, rows, out);
        else run_panels<false>(x, tokens, cols, weight, rows, out);
    } else if (is_int4) {
        run<true>(x, tokens, cols, weight, rows, out);
    } else {
        run<false>(x, tokens, cols, weight, rows, out);
    }
}

}  // namespace quantized
