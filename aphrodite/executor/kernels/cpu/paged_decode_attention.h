// Decode attention straight over the paged KV cache on CPU: one new token per sequence.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
// Keys and values are read where they are, block by block, never gathered into a padded copy.
// A sequence's query heads all use one token's row of keys (every kv head, contiguous) while
// it is in cache. Scores are kept for the whole context: one pass for the scores, a softmax,
// one pass for the weighted sum of values, so K and V are each read once.
//
// A sliding window (window > 0: the new token at position p sees positions > p - window)
// starts the context at the window's first block: blocks wholly before it are never read, so
// the cost is bounded by the window, not the context. That block's tokens before the window
// get no weight. A soft cap (softcap > 0) turns the scaled scores s into
// softcap * tanh(s / softcap) before the softmax (attention_softcap.h). Without either, the
// loops are those of plain attention: both are applied outside them, once per item and head.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "attention_softcap.h"
#include "paged_decode_blocks.h"
#include "vec8.h"

namespace attention {

using namespace vec8;

// head_dim must be a multiple of 8 (ops.supports checks). window, softcap: 0 for none.
template <typename T>
void decode(const float* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
            int64_t max_blocks, const int64_t* seq_lens, int64_t batch, int64_t heads,
            int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, float* out,
            int64_t window = 0, float softcap = 0.f) {
    const int64_t group = heads / kv_heads, chunks = head_dim / 8;
#if defined(__AVX512F__) && defined(__F16C__)
    // head_dim 64 with up to four query heads per kv head, or 128 with up to two.
    const bool wide_form = (chunks == 8 && group <= 4) || (chunks == 16 && group <= 2);
#endif
    const int64_t row_size = kv_heads * head_dim;      // one token: every kv head's vector
    const int64_t block_elems = block_size * row_size;
    const int64_t block_bytes = block_elems * static_cast<int64_t>(sizeof(T));
    // The first position a sequence of `full` tokens attends to, and the start of its block:
    // what the kernel reads begins there.
    const auto visible_from = [&](int64_t full) {
        return window > 0 ? std::max<int64_t>(0, full - window) : int64_t{0};
    };
    const auto read_from = [&](int64_t full) {
        return visible_from(full) / block_size * block_size;
    };
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
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return seq_lens[a] - read_from(seq_lens[a]) > seq_lens[b] - read_from(seq_lens[b]);
    });
    std::atomic<int64_t> next{0};
#pragma omp parallel
    {
        std::vector<float> scores, total(heads), tops(heads), acc(heads * head_dim);
        std::vector<float> buffer(block_size * row_size);
        for (int64_t item = next++; item < batch * parts * splits; item = next++) {
            const int64_t seq = order[item / (parts * splits)], part = item / splits % parts;
            const int64_t kv_first = part * kv_per_part, kv_last = kv_first + kv_per_part;
            const int64_t full = seq_lens[seq], base = read_from(full), span = full - base;
            const int64_t run = (span + block_size * splits - 1) / (block_size * splits) * block_size;
            const int64_t first = base + std::min(span, item % splits * run);
            const int64_t len = std::min(full, first + run) - first;   // this item's tokens
            // Its leading tokens before the window (only the first run of a sequence has any,
            // and fewer than a block, so it keeps some visible ones).
            const int64_t hidden = std::max<int64_t>(0, visible_from(full) - first);
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
                if (softcap > 0.f) soft_cap(row, len, softcap);
                std::fill(row, row + hidden, -std::numeric_limits<float>::infinity());
                vn tops_n = splatn(row[hidden]);
                int64_t t = 0;
                for (; t + kLanes <= len; t += kLanes) {
                    const vn x = loadn(row + t);
                    tops_n = x > tops_n ? x : tops_n;
                }
                float top = row[hidden];
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
                // expn's clamped input leaves e^-87.3 for the hidden tokens, well below the
                // sum's last bit (the top's own term is 1): their weights are set to 0.
                std::fill(row, row + hidden, 0.f);
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
