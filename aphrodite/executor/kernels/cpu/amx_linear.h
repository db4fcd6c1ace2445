// Float32 products of many tokens (prefill chunks) with int4 weights, on Intel AMX's
// bfloat16 tiles, as accurate as a float32 GEMM.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
// A bfloat16 tile product multiplies pairs exactly and accumulates in float32, so what it
// loses is only in rounding its inputs. Neither side is rounded here:
// - an int4 weight is d * q + m with d and m float16 (11 significant bits) and q 0..15, so
//   d * q has at most 15 significant bits and is exactly the sum of two bfloat16 values,
//   and m of two;
// - an activation (24 bits) is exactly the sum of three.
// Of the six products of the parts, the five that matter are taken (the sixth is below
// 2^-27 of the term, under float32's own rounding of the sums; AMX also reads bfloat16
// subnormals as zero, parts of activations below about 2^-110). Nothing is rescaled per
// block: the scales are inside the weights' parts, and the mins' term, sum_b m_b * (sum of x
// over block b), is a product of its own, the blocks' sums of x (float32, summed as the
// decode kernel sums them) times the mins, appended to K as extra steps. So each output is
// one tile accumulation over all steps, stored once: the dequantised matrix's product with
// float32 rounding in another order, as MKL's or the decode kernel's is.
//
// The default model's four matrices at 2,048 tokens, 2 threads, a Sapphire Rapids class VM
// (2 vCPUs): 25.5-27.7 ms against MKL's 38.5 on the float32 copy (524-568 against 376
// GFLOP/s). Operands take 4 bytes a weight, as that copy does, which they replace. At decode
// sizes the tiles are streamed from memory each call and lose to quantized_linear.h below 64
// tokens; calls go here above AMX_ABOVE_TOKENS (layers/linear.py).

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "quantized_linear.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#define APHRODITE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace amx {

using quantized::half_to_float;

constexpr int64_t kStep = 32;                 // K per tile product: one GGUF block
constexpr int64_t kTile = 16;                 // tokens (rows) and outputs (columns) of a tile
constexpr int64_t kTileElements = 512;        // bfloat16s in an operand tile (1 KB)
constexpr int64_t kWeightParts = 2, kActivationParts = 3;

// K steps of a matrix with `cols` inputs: its blocks, then the mins' steps (one min a block).
inline int64_t steps(int64_t cols) {
    const int64_t blocks = cols / kStep;
    return blocks + (blocks + kStep - 1) / kStep;
}

// bfloat16s of a packed [rows, cols] matrix: per tile of 16 outputs, per step, two parts.
inline int64_t packed_size(int64_t rows, int64_t cols) {
    return rows / kTile * steps(cols) * kWeightParts * kTileElements;
}

// Round to nearest even (finite inputs): the bfloat16 above this float32's top 8 bits.
inline uint16_t to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    bits += 0x7FFF + ((bits >> 16) & 1);
    return static_cast<uint16_t>(bits >> 16);
}

inline float from_bf16(uint16_t half) {
    const uint32_t bits = static_cast<uint32_t>(half) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
}

// Q4_1 blocks (quantized_linear.h's layout: fp16 d, fp16 m, 16 bytes of nibbles) of a
// [rows, cols] matrix, rows % 32 == 0 -> packed operand tiles: for tile nt of 16 outputs and
// step s, part p at ((nt * steps + s) * 2 + p) * 512, laid out as AMX's B operand wants
// it, [16 pairs of k][16 outputs][2].
inline void pack(const uint8_t* weight, int64_t rows, int64_t cols, uint16_t* out) {
    const int64_t blocks = cols / kStep, total = steps(cols), row_bytes = blocks * 20;
#pragma omp parallel for schedule(static)
    for (int64_t nt = 0; nt < rows / kTile; ++nt)
        for (int64_t s = 0; s < total; ++s) {
            uint16_t* hi = out + (nt * total + s) * kWeightParts * kTileElements;
            uint16_t* lo = hi + kTileElements;
            for (int64_t n = 0; n < kTile; ++n) {
                const uint8_t* row = weight + (nt * kTile + n) * row_bytes;
                for (int64_t k = 0; k < kStep; ++k) {
                    float value = 0.f;
                    if (s < blocks) {
                        const uint8_t* block = row + s * 20;
                        const int q = k < 16 ? block[4 + k] & 0x0F : block[4 + k - 16] >> 4;
                        value = half_to_float(block) * static_cast<float>(q);
                    } else if (const int64_t b = (s - blocks) * kStep + k; b < blocks) {
                        value = half_to_float(row + b * 20 + 2);
                    }
                    const uint16_t h = to_bf16(value);
                    const int64_t at = (k / 2) * 2 * kTile + n * 2 + k % 2;
                    hi[at] = h;
                    lo[at] = to_bf16(value - from_bf16(h));
                }
            }
        }
}

#ifdef APHRODITE_AMX

// Linux hands out AMX's tile state only on request, once per process.
inline bool enable() {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
}

struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

// Eight tiles of 16 rows x 64 bytes: accumulators 0-3 (two token tiles x two output tiles),
// activations 4-5, weights 6-7.
inline void configure_tiles() {
    TileConfig config{};
    config.palette = 1;
    for (int i = 0; i < 8; ++i) {
        config.bytes_per_row[i] = 64;
        config.rows[i] = kTile;
    }
    _tile_loadconfig(&config);
}

// Sixteen floats -> their three bfloat16 parts, as to_bf16 rounds.
inline void split3(__m512 x, uint16_t* p0, uint16_t* p1, uint16_t* p2) {
    uint16_t* parts[3] = {p0, p1, p2};
    for (int i = 0; i < 3; ++i) {
        const __m512i bits = _mm512_castps_si512(x);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_srli_epi32(
            _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts[i]), _mm512_cvtepi32_epi16(rounded));
        x = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16)));
    }
}

// The activations' operand tiles, built per call: for token tile tt and step s, part p at
// ((tt * steps + s) * 3 + p) * 512, [16 tokens][32 k]. Rows past `tokens` are zeros.
inline void prepare(const float* x, int64_t tokens, int64_t padded, int64_t cols,
                    uint16_t* tiles, float* sums) {
    const int64_t blocks = cols / kStep, total = steps(cols);
    const int64_t part_stride = kTileElements;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < padded; ++t) {
        const int64_t tt = t / kTile, r = t % kTile;
        float* row_sums = sums + t * blocks;
        for (int64_t b = 0; b < blocks; ++b) {
            uint16_t* at = tiles + ((tt * total + b) * kActivationParts) * kTileElements + r * kStep;
            __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
            float sum = 0.f;
            if (t < tokens) {
                const float* src = x + t * cols + b * kStep;
                lo = _mm512_loadu_ps(src);
                hi = _mm512_loadu_ps(src + 16);
                for (int64_t k = 0; k < kStep; ++k) sum += src[k];
            }
            row_sums[b] = sum;
            split3(lo, at, at + part_stride, at + 2 * part_stride);
            split3(hi, at + 16, at + part_stride + 16, at + 2 * part_stride + 16);
        }
        for (int64_t s = blocks; s < total; ++s) {
            uint16_t* at = tiles + ((tt * total + s) * kActivationParts) * kTileElements + r * kStep;
            alignas(64) float chunk[kStep] = {};
            for (int64_t k = 0; k < kStep && (s - blocks) * kStep + k < blocks; ++k)
                chunk[k] = row_sums[(s - blocks) * kStep + k];
            split3(_mm512_load_ps(chunk), at, at + part_stride, at + 2 * part_stride);
            split3(_mm512_load_ps(chunk + 16), at + 16, at + part_stride + 16,
                   at + 2 * part_stride + 16);
        }
    }
}

// out[32 tokens from t0][32 outputs from n0] of the packed product, rows `rows` floats apart.
inline void product(const uint16_t* a_tiles, const uint16_t* b_tiles, int64_t total,
                    int64_t tp, int64_t np, float* out, int64_t rows) {
    const int64_t a_step = kActivationParts * kTileElements, b_step = kWeightParts * kTileElements;
    const uint16_t* a0 = a_tiles + (2 * tp) * total * a_step;
    const uint16_t* a1 = a0 + total * a_step;
    const uint16_t* b0 = b_tiles + (2 * np) * total * b_step;
    const uint16_t* b1 = b0 + total * b_step;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < total; ++s) {
        const uint16_t *x0 = a0 + s * a_step, *x1 = a1 + s * a_step;
        const uint16_t *w0 = b0 + s * b_step, *w1 = b1 + s * b_step;
        // Parts in the order (x1, w1) (x1, w2) (x2, w2) (x2, w1) (x3, w1), so that each
        // product after the first reloads only one operand pair.
        _tile_loadd(4, x0, 64);
        _tile_loadd(5, x1, 64);
        _tile_loadd(6, w0, 64);
        _tile_loadd(7, w1, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(6, w0 + kTileElements, 64);
        _tile_loadd(7, w1 + kTileElements, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(4, x0 + kTileElements, 64);
        _tile_loadd(5, x1 + kTileElements, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(6, w0, 64);
        _tile_loadd(7, w1, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(4, x0 + 2 * kTileElements, 64);
        _tile_loadd(5, x1 + 2 * kTileElements, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    float* o = out + 2 * tp * kTile * rows + 2 * np * kTile;
    const int64_t stride = rows * static_cast<int64_t>(sizeof(float));
    _tile_stored(0, o, stride);
    _tile_stored(1, o + kTile, stride);
    _tile_stored(2, o + kTile * rows, stride);
    _tile_stored(3, o + kTile * rows + kTile, stride);
}

// The per-call activation tiles and block sums, kept between calls and grown as needed.
inline uint16_t* activation_buffer(int64_t n) {
    static std::vector<uint16_t> buffer;
    if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    return buffer.data();
}

inline float* sums_buffer(int64_t n) {
    static std::vector<float> buffer;
    if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    return buffer.data();
}

// x [tokens, cols] float32 times the packed [rows, cols] matrix -> out [padded, rows], padded
// = tokens rounded up to 32 (the extra rows' values are not meaningful). rows % 32 == 0,
// cols % 32 == 0.
inline void matmul(const float* x, int64_t tokens, int64_t cols, const uint16_t* packed,
                   int64_t rows, float* out) {
    const int64_t padded = (tokens + 2 * kTile - 1) / (2 * kTile) * (2 * kTile);
    const int64_t total = steps(cols), blocks = cols / kStep;
    uint16_t* a_tiles = activation_buffer(padded / kTile * total * kActivationParts * kTileElements);
    float* sums = sums_buffer(padded * blocks);
    const int64_t token_pairs = padded / (2 * kTile), output_pairs = rows / (2 * kTile);
    // Token pairs a thread takes against one output pair while that pair's weights stay in
    // L2: as many as keep their activation tiles within about 1 MB.
    const int64_t pair_bytes = 2 * total * kActivationParts * kTileElements * 2;
    const int64_t group = std::max<int64_t>(1, std::min<int64_t>(8, (1 << 20) / pair_bytes));
#pragma omp parallel
    {
        prepare(x, tokens, padded, cols, a_tiles, sums);   // ends in the loop's barrier
        configure_tiles();
        for (int64_t first = 0; first < token_pairs; first += group) {
            const int64_t last = std::min(token_pairs, first + group);
            // Both loops are split, so that more threads than output pairs (18 for a 576-row
            // matrix) all get work; a thread's share is contiguous, each pair's weights
            // reused across its token pairs.
#pragma omp for collapse(2) schedule(static) nowait
            for (int64_t np = 0; np < output_pairs; ++np)
                for (int64_t tp = first; tp < last; ++tp)
                    product(a_tiles, packed, total, tp, np, out, rows);
        }
        _tile_release();
    }
}

#else

inline bool enable() { return false; }

inline void matmul(const float*, int64_t, int64_t, const uint16_t*, int64_t, float*) {}

#endif

}  // namespace amx
