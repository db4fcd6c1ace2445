// Decode attention's work on one cache block (paged_decode_attention.h): prefetching the
// next block and loading this one, widening its elements, and the scores and weighted
// values of its tokens, eight lanes at a time or, with AVX-512, sixteen.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec8.h"

namespace attention {

// The hardware prefetcher follows a stream only within a 4 KB page, and only once its first
// lines there have missed: so the first four lines of each page of the next block are
// requested while this one is worked on. 64 sequences x 400 tokens, a layer, 30 layers'
// caches in turn (from memory), float32 blocks (12 KB) in random order: 2,420-2,520 us with
// this, 2,850 without.
inline void prefetch_block(const void* block, int64_t bytes) {
    const char* first = static_cast<const char*>(block);
    for (int64_t page = 0; page < bytes; page += 4096)
        for (int64_t line = page; line < std::min(bytes, page + 256); line += 64)
            __builtin_prefetch(first + line);
}

// Loads one byte of each of a block's lines before any arithmetic on it: all its misses are
// then in flight together, where the arithmetic's own loads, spread over the block's work,
// kept only a few outstanding. 64 sequences x 400 tokens, a layer, 30 layers' caches in turn
// (from memory), float32 blocks in random order: 2,010-2,120 us with this, 2,410 without.
inline void touch_block(const void* block, int64_t bytes) {
    const volatile char* first = static_cast<const volatile char*>(block);
    for (int64_t line = 0; line < bytes; line += 64) (void)first[line];
}

using namespace vec8;

// A block's keys (or values), n = tokens * kv_heads * head_dim elements: float32 and float16
// caches are read in place (float16 widened as it is loaded, one instruction for eight),
// bfloat16 ones (the high half of a float32) widened into buffer first. 64 sequences x 400
// tokens, a layer, 30 layers' caches in turn (from memory), median of 10: float32 2,480 us,
// bfloat16 2,234, float16 1,775.
inline const float* block_rows(const float* cache, int64_t offset, float*, int64_t) {
    return cache + offset;
}
#if defined(__F16C__)
inline const f16* block_rows(const f16* cache, int64_t offset, float*, int64_t) {
    return cache + offset;
}
#endif
inline const float* block_rows(const uint16_t* cache, int64_t offset, float* buffer, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits = static_cast<uint32_t>(cache[offset + i]) << 16;
        std::memcpy(buffer + i, &bits, sizeof(float));
    }
    return buffer;
}

// The scores of one key for the kG query heads of its kv head (heads kv * kG ...): the key's
// vectors are loaded once for all of them (64 sequences x 400 tokens, a layer, from cache:
// 1,909-2,066 us, against 2,066-2,572 loading them once per head). out[h * stride] for the
// group's head h.
template <int kG, typename K>
inline void group_scores(const float* q_seq, int64_t kv, const K* key, int64_t chunks,
                         float scale, float* out, int64_t stride) {
    const float* q = q_seq + kv * kG * chunks * 8;
    v8 acc[kG] = {};
    for (int64_t c = 0; c < chunks; ++c) {
        const v8 k = load8(key + 8 * c);
        for (int g = 0; g < kG; ++g) acc[g] += load8(q + (g * chunks + c) * 8) * k;
    }
    for (int g = 0; g < kG; ++g) out[g * stride] = sum8(acc[g]) * scale;
}

#if defined(__AVX512F__) && defined(__F16C__)
// With AVX-512, a block's scores and weighted values sixteen lanes at a time, head_dim =
// 16 * kChunks. A query head's sixteen token dot products are sixteen vectors of partial
// sums, added across lanes together in one tree (45 instructions for sixteen sums instead of
// sixteen horizontal sums); a weighted sum keeps its heads' accumulators in registers across
// a block's tokens. 64 sequences x 400 tokens, a layer, 30 layers' caches in turn (from
// memory), float32 cache: 2,850 us, against 3,120 with the eight-lane form below.
namespace wide {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const f16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lane t of the result: the sum of v[t]'s sixteen lanes.
inline __m512 sum_lanes16(__m512 v[16]) {
    __m512 s[8], u[4];
    for (int i = 0; i < 8; ++i)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)    // per 128-bit lane: tokens 4i..4i+3, that lane's part
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of `tokens` keys (rows row_size apart) for query heads first_head..last_head, whose
// kv head is h / group: out[h * stride + t].
template <int kChunks, typename K>
inline void block_scores(const float* q_seq, const K* keys, int64_t row_size, int64_t tokens,
                         int64_t first_head, int64_t last_head, int64_t group, float scale,
                         float* out, int64_t stride) {
    for (int64_t h = first_head; h < last_head; ++h) {
        __m512 q[kChunks];
        for (int c = 0; c < kChunks; ++c) q[c] = _mm512_loadu_ps(q_seq + (h * kChunks + c) * 16);
        const K* key = keys + h / group * kChunks * 16;
        for (int64_t t0 = 0; t0 < tokens; t0 += 16) {
            const int64_t n = std::min<int64_t>(16, tokens - t0);
            __m512 partial[16];
            for (int t = 0; t < 16; ++t) {
                partial[t] = _mm512_setzero_ps();
                if (t >= n) continue;
                const K* row = key + (t0 + t) * row_size;
                for (int c = 0; c < kChunks; ++c)
                    partial[t] = _mm512_fmadd_ps(load16(row + 16 * c), q[c], partial[t]);
            }
            const __m512 sums = _mm512_mul_ps(sum_lanes16(partial), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(out + h * stride + t0, static_cast<__mmask16>((1u << n) - 1),
                                  sums);
        }
    }
}

// acc[h] += sum over the block's tokens t of p[h * stride + t] * value t's vector, for the
// query heads of kv heads kv_first..kv_last (kG per kv head).
template <int kChunks, int kG, typename V>
inline void block_values(const float* p, int64_t stride, const V* values, int64_t row_size,
                         int64_t tokens, int64_t kv_first, int64_t kv_last, float* acc) {
    for (int64_t kv = kv_first; kv < kv_last; ++kv) {
        __m512 sum[kG][kChunks];
        float* a = acc + kv * kG * kChunks * 16;
        for (int g = 0; g < kG; ++g)
            for (int c = 0; c < kChunks; ++c)
                sum[g][c] = _mm512_loadu_ps(a + (g * kChunks + c) * 16);
        const V* v = values + kv * kChunks * 16;
        const float* pk = p + kv * kG * stride;
        for (int64_t t = 0; t < tokens; ++t) {
            __m512 row[kChunks];
            for (int c = 0; c < kChunks; ++c) row[c] = load16(v + t * row_size + 16 * c);
            for (int g = 0; g < kG; ++g) {
                const __m512 weight = _mm512_set1_ps(pk[g * stride + t]);
                for (int c = 0; c < kChunks; ++c)
                    sum[g][c] = _mm512_fmadd_ps(weight, row[c], sum[g][c]);
            }
        }
        for (int g = 0; g < kG; ++g)
            for (int c = 0; c < kChunks; ++c)
                _mm512_storeu_ps(a + (g * kChunks + c) * 16, sum[g][c]);
    }
}

template <int kValue>
using constant = std::integral_constant<int, kValue>;

// block_values with the head shape as template arguments: head_dim 64 (kG <= 4) or 128 (<= 2).
template <typename V>
inline void values_for(int64_t group, int64_t head_dim, const float* p, int64_t stride,
                       const V* values, int64_t row_size, int64_t tokens, int64_t kv_first,
                       int64_t kv_last, float* acc) {
    const auto run = [&](auto chunks, auto heads) {
        block_values<decltype(chunks)::value, decltype(heads)::value>(
            p, stride, values, row_size, tokens, kv_first, kv_last, acc);
    };
    if (head_dim == 128) return group == 1 ? run(constant<8>{}, constant<1>{})
                                           : run(constant<8>{}, constant<2>{});
    switch (group) {
        case 1: return run(constant<4>{}, constant<1>{});
        case 2: return run(constant<4>{}, constant<2>{});
        case 3: return run(constant<4>{}, constant<3>{});
        default: return run(constant<4>{}, constant<4>{});
    }
}

}  // namespace wide
#endif

}  // namespace attention
