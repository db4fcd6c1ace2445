// Decode attention straight over the paged KV cache on CPU: one new token per sequence.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
// Keys and values are read where they are, block by block, never gathered into a padded copy.
// A sequence's query heads all use one token's row of keys (every kv head, contiguous) while
// it is in cache. Scores are kept for the whole context: one pass for the scores, a softmax,
// one pass for the weighted sum of values, so K and V are each read once.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>

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

// head_dim must be a multiple of 8 (cpu_kernels.supports checks).
template <typename T>
void decode(const float* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
            int64_t max_blocks, const int64_t* seq_lens, int64_t batch, int64_t heads,
            int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, float* out) {
    const int64_t group = heads / kv_heads, chunks = head_dim / 8;
#if defined(__AVX512F__) && defined(__F16C__)
    // head_dim 64 with up to four query heads per kv head, or 128 with up to two.
    const bool wide_form = (chunks == 8 && group <= 4) || (chunks == 16 && group <= 2);
#endif
    const int64_t row_size = kv_heads * head_dim;      // one token: every kv head's vector
    const int64_t block_elems = block_size * row_size;
    const int64_t block_bytes = block_elems * static_cast<int64_t>(sizeof(T));
    // A work item is a sequence, or with fewer sequences than threads can share evenly, one
    // kv head of a sequence (each item then reads its part of every token's row), and when
    // even those are too few to share evenly, a run of whole blocks of that kv head's context
    // (batch 1 of a 3-kv-head model on 2 threads: 6 items instead of 3). The runs' partial
    // softmaxes are merged after the parallel region. Batch 1, default model, 2 threads, a
    // layer at 4,000 tokens of context: 251 us, against 339 with one item per kv head.
    const int64_t threads = omp_get_max_threads();
    const int64_t parts = batch < 2 * threads ? kv_heads : 1;
    const int64_t kv_per_part = kv_heads / parts;
    const int64_t splits = std::max<int64_t>(1, (2 * threads + batch * parts - 1) / (batch * parts));
    const int64_t part_heads = kv_per_part * group;
    // Per item, when split: its heads' unnormalised sums, then their maxima and totals.
    std::vector<float> partial(splits > 1 ? batch * parts * splits * part_heads * (head_dim + 2) : 0);
    // Items are handed out one at a time, longest sequences first: lengths differ, so static
    // shares would leave threads idle, and so would a long sequence taken last. (A plain
    // parallel region and an atomic counter need nothing newer from libgomp than torch's
    // bundled copy provides.)
    std::vector<int64_t> order(batch);
    for (int64_t i = 0; i < batch; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return seq_lens[a] > seq_lens[b]; });
    std::atomic<int64_t> next{0};
#pragma omp parallel
    {
        std::vector<float> scores, total(heads), tops(heads), acc(heads * head_dim);
        std::vector<float> buffer(block_size * row_size);
        for (int64_t item = next++; item < batch * parts * splits; item = next++) {
            const int64_t seq = order[item / (parts * splits)], part = item / splits % parts;
            const int64_t kv_first = part * kv_per_part, kv_last = kv_first + kv_per_part;
            const int64_t full = seq_lens[seq];
            const int64_t run = (full + block_size * splits - 1) / (block_size * splits) * block_size;
            const int64_t first = std::min(full, item % splits * run);
            const int64_t len = std::min(full, first + run) - first;   // this item's tokens
            const int64_t slot = (seq * parts + part) * splits + item % splits;
            float* mine = splits > 1 ? partial.data() + slot * part_heads * (head_dim + 2) : nullptr;
            if (len == 0) {                       // a run past a short context's end
                std::fill(mine + part_heads * head_dim, mine + part_heads * (head_dim + 2), 0.f);
                continue;
            }
            const int64_t* table = block_tables + (seq * max_blocks + first / block_size);
            const float* q_seq = q + seq * heads * head_dim;
            scores.resize(heads * len);

            // Scores: each key vector is loaded once for the query heads that share it.
            for (int64_t start = 0; start < len; start += block_size) {
                const int64_t tokens = std::min(block_size, len - start);
                const auto* keys = block_rows(k_cache, table[start / block_size] * block_size
                                              * row_size, buffer.data(), tokens * row_size);
                touch_block(keys, tokens * row_size * static_cast<int64_t>(sizeof(*keys)));
                if (start + block_size < len)   // after the last, the first block of values
                    prefetch_block(k_cache + table[start / block_size + 1] * block_elems,
                                   block_bytes);
                else
                    prefetch_block(v_cache + table[0] * block_elems, block_bytes);
#if defined(__AVX512F__) && defined(__F16C__)
                if (wide_form) {
                    if (chunks == 8)
                        wide::block_scores<4>(q_seq, keys, row_size, tokens, kv_first * group,
                                              kv_last * group, group, scale,
                                              scores.data() + start, len);
                    else
                        wide::block_scores<8>(q_seq, keys, row_size, tokens, kv_first * group,
                                              kv_last * group, group, scale,
                                              scores.data() + start, len);
                    continue;
                }
#endif
                for (int64_t t = 0; t < tokens; ++t)
                    for (int64_t kv = kv_first; kv < kv_last; ++kv) {
                        const auto* key = keys + t * row_size + kv * head_dim;
                        float* row = scores.data() + kv * group * len + start + t;
                        switch (group) {   // each key vector loaded once for the group
                            case 1: group_scores<1>(q_seq, kv, key, chunks, scale, row, len); break;
                            case 2: group_scores<2>(q_seq, kv, key, chunks, scale, row, len); break;
                            case 3: group_scores<3>(q_seq, kv, key, chunks, scale, row, len); break;
                            case 4: group_scores<4>(q_seq, kv, key, chunks, scale, row, len); break;
                            default:
                                for (int64_t h = 0; h < group; ++h)
                                    group_scores<1>(q_seq + h * head_dim, kv * group, key,
                                                    chunks, scale, row + h * len, len);
                        }
                    }
            }
            for (int64_t h = kv_first * group; h < kv_last * group; ++h) {
                float* row = scores.data() + h * len;   // the build's widest vectors
                vn tops_n = splatn(row[0]);
                int64_t t = 0;
                for (; t + kLanes <= len; t += kLanes) {
                    const vn x = loadn(row + t);
                    tops_n = x > tops_n ? x : tops_n;
                }
                float top = row[0];
                for (int64_t lane = 0; lane < kLanes; ++lane) top = std::max(top, tops_n[lane]);
                for (; t < len; ++t) top = std::max(top, row[t]);
                vn sums = {};
                for (t = 0; t + kLanes <= len; t += kLanes) {
                    const vn e = expn(loadn(row + t) - top);
                    storen(row + t, e);
                    sums += e;
                }
                float sum = 0.f;
                for (int64_t lane = 0; lane < kLanes; ++lane) sum += sums[lane];
                for (; t < len; ++t) {
                    row[t] = std::exp(row[t] - top);
                    sum += row[t];
                }
                total[h] = sum;
                tops[h] = top;
            }

            // Weighted values: a block's tokens accumulate into registers, one store per block.
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t start = 0; start < len; start += block_size) {
                const int64_t tokens = std::min(block_size, len - start);
                const auto* values = block_rows(v_cache, table[start / block_size] * block_size
                                                * row_size, buffer.data(), tokens * row_size);
                touch_block(values, tokens * row_size * static_cast<int64_t>(sizeof(*values)));
                if (start + block_size < len)
                    prefetch_block(v_cache + table[start / block_size + 1] * block_elems,
                                   block_bytes);
#if defined(__AVX512F__) && defined(__F16C__)
                if (wide_form) {
                    wide::values_for(group, head_dim, scores.data() + start, len, values,
                                     row_size, tokens, kv_first, kv_last, acc.data());
                    continue;
                }
#endif
                for (int64_t h = kv_first * group; h < kv_last * group; ++h) {
                    const float* p = scores.data() + h * len + start;
                    const auto* v = values + (h / group) * head_dim;
                    float* a = acc.data() + h * head_dim;
                    int64_t c = 0;
                    for (; c + 3 < chunks; c += 4) {     // four independent sums
                        v8 s0 = load8(a + 8 * c), s1 = load8(a + 8 * c + 8);
                        v8 s2 = load8(a + 8 * c + 16), s3 = load8(a + 8 * c + 24);
                        for (int64_t t = 0; t < tokens; ++t) {
                            const auto* vt = v + t * row_size + 8 * c;
                            s0 += p[t] * load8(vt);
                            s1 += p[t] * load8(vt + 8);
                            s2 += p[t] * load8(vt + 16);
                            s3 += p[t] * load8(vt + 24);
                        }
                        store8(a + 8 * c, s0);
                        store8(a + 8 * c + 8, s1);
                        store8(a + 8 * c + 16, s2);
                        store8(a + 8 * c + 24, s3);
                    }
                    for (; c < chunks; ++c) {
                        v8 sum = load8(a + 8 * c);
                        for (int64_t t = 0; t < tokens; ++t)
                            sum += p[t] * load8(v + t * row_size + 8 * c);
                        store8(a + 8 * c, sum);
                    }
                }
            }
            if (splits > 1) {                     // merged below
                for (int64_t i = 0; i < part_heads; ++i) {
                    const int64_t h = kv_first * group + i;
                    std::memcpy(mine + i * head_dim, acc.data() + h * head_dim,
                                head_dim * sizeof(float));
                    mine[part_heads * head_dim + i] = tops[h];
                    mine[part_heads * (head_dim + 1) + i] = total[h];
                }
                continue;
            }
            float* o = out + seq * heads * head_dim;
            for (int64_t h = kv_first * group; h < kv_last * group; ++h)
                for (int64_t d = 0; d < head_dim; ++d)
                    o[h * head_dim + d] = acc[h * head_dim + d] / total[h];
        }
    }
    if (splits == 1) return;
    // Each run's sums are relative to its own maximum: rescale to the largest and add up.
    for (int64_t seq = 0; seq < batch; ++seq)
        for (int64_t part = 0; part < parts; ++part)
            for (int64_t i = 0; i < part_heads; ++i) {
                const float* runs = partial.data() + (seq * parts + part) * splits * part_heads
                                    * (head_dim + 2);
                const int64_t stride = part_heads * (head_dim + 2);
                float top = -std::numeric_limits<float>::infinity(), sum = 0.f;
                for (int64_t r = 0; r < splits; ++r)
                    if (runs[r * stride + part_heads * (head_dim + 1) + i] > 0.f)
                        top = std::max(top, runs[r * stride + part_heads * head_dim + i]);
                float* o = out + (seq * heads + part * part_heads + i) * head_dim;
                std::fill(o, o + head_dim, 0.f);
                for (int64_t r = 0; r < splits; ++r) {
                    const float* mine = runs + r * stride;
                    const float run_total = mine[part_heads * (head_dim + 1) + i];
                    if (run_total <= 0.f) continue;
                    const float weight = std::exp(mine[part_heads * head_dim + i] - top);
                    sum += weight * run_total;
                    for (int64_t d = 0; d < head_dim; ++d) o[d] += weight * mine[i * head_dim + d];
                }
                for (int64_t d = 0; d < head_dim; ++d) o[d] /= sum;
            }
}

}  // namespace attention
