// Products of many tokens with GGUF blocks (quantized_linear.h picks them from
// kPanelFromTokens tokens): panels of rows widened to float32 (quantized_rows.h's
// dequantize_row for the block format F), times the tokens in register tiles.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "quantized_rows.h"
#include "vec8.h"

namespace quantized {

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

// out[t * stride + first + r] = sums[r * padded + t] for a panel's count rows and every token:
// eight rows by eight tokens at a time, a last group's missing tokens not stored.
inline void store_panel(const float* sums, int64_t padded, int64_t tokens, int64_t count,
                        float* out, int64_t stride) {
    float block[64];
    const int64_t whole = count / 8 * 8;
    for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
        const int64_t n = std::min<int64_t>(8, tokens - t0);
        for (int64_t r = 0; r < whole; r += 8) {
            if (n == 8) {
                transpose8(sums + r * padded + t0, padded, out + t0 * stride + r, stride);
                continue;
            }
            transpose8(sums + r * padded + t0, padded, block, 8);
            for (int64_t t = 0; t < n; ++t)
                std::memcpy(out + (t0 + t) * stride + r, block + t * 8, 8 * sizeof(float));
        }
        for (int64_t r = whole; r < count; ++r)       // rows past the last whole group
            for (int64_t t = t0; t < t0 + n; ++t) out[t * stride + r] = sums[r * padded + t];
    }
}

template <class F>
void run_panels(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight,
                int64_t rows, int64_t out_stride, float* out) {
    const int64_t row_bytes = cols / F::kValues * F::kBytes;
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
                dequantize_row<F>(weight + (first + r) * row_bytes, cols,
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
            store_panel(res, padded, tokens, count, out + first, out_stride);
        }
    }
}

}  // namespace quantized
