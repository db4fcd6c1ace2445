// Prefill attention straight over the paged KV cache on CPU: each sequence's chunk of new
// tokens attends causally to its whole context (cached prefix and the chunk itself, both
// already in the cache).
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
// torch's flash kernel is one call per sequence, with its keys gathered out of the blocks
// first when a prefix is cached. Here one call covers every sequence of a step
// (benchmarks/engine_replay.py --workload mixed --concurrency 64 reports prefill
// attention's time: 1.74-1.75 s with AVX-512). Register tiles of four keys (or four
// dimensions) x 24 rows (vectors of sixteen rows with AVX-512) load each vector of queries
// or probabilities once: 8 prompts of 512 tokens take 19.7-21.2 ms, against 26.6-26.8
// loading them per key. Keys and values are broadcast from memory (vec8.h's splatn).
//
// A work item is a tile of up to kTileRows query rows: a run of tokens times the query heads
// that share one kv head, so each key and value vector loaded serves all of them. Keys are
// taken a cache block at a time with an online softmax (running maximum and sum per row), so
// no score matrix larger than a block is ever held. Queries, scores and the weighted values
// are all kept with rows innermost ([dim][row], [key][row]), so the products and the softmax
// are vector operations across rows, and the cache's keys and values are read as they lie.
//
// A sliding window (window > 0: a token at position p sees positions > p - window) starts a
// tile at the block of the first key its first token sees, so blocks wholly before every
// row's window are never read; keys before a row's window are masked like those after it. A
// soft cap (softcap > 0) turns a block's scaled scores s into softcap * tanh(s / softcap)
// before the mask (attention_softcap.h). Without either, a tile runs the plain loops.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "attention_softcap.h"
#include "vec8.h"

namespace attention {

using namespace vec8;

constexpr int64_t kTileRows = 48;               // query rows per work item: 6 vectors of 8
constexpr int64_t kTileVecs = kTileRows / kLanes;  // (or 3 of 16 with AVX-512)

// One prefill sequence: its row in the block tables, its new tokens' place in the flat batch,
// and its context length after this step (new tokens included).
struct PrefillSeq {
    int64_t row, token_start, new_tokens, seq_len;
};

struct Tile {
    int64_t seq, kv, first, count;   // chunk tokens first .. first + count - 1, one kv head
    int64_t keys;                    // keys its last token reads (within a window): its cost
};

// Per-thread scratch for one tile.
struct TileBuffers {
    std::vector<float> qt, scores, acc, top, total, limit, floor, corr, widened;
    TileBuffers(int64_t head_dim, int64_t block_size)
        : qt(head_dim * kTileRows), scores(block_size * kTileRows), acc(head_dim * kTileRows),
          top(kTileRows), total(kTileRows), limit(kTileRows), floor(kTileRows),
          corr(kTileRows), widened(block_size * head_dim) {}
};

// n tokens' vectors of one kv head in a cache block, stride elements apart, as floats: a
// float32 cache's in place, a float16 one's widened into buffer (head_dim floats a token).
// The tiles reuse each vector for up to kTileRows rows, so widening once costs little.
struct HeadRows {
    const float* data;
    int64_t stride;
};

inline HeadRows head_rows(const float* rows, int64_t stride, int64_t, int64_t, float*) {
    return {rows, stride};
}

#if defined(__F16C__)
inline HeadRows head_rows(const f16* rows, int64_t stride, int64_t n, int64_t head_dim,
                          float* buffer) {
    for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < head_dim; d += 8)
            store8(buffer + j * head_dim + d, load8(rows + j * stride + d));
    return {buffer, head_dim};
}
#endif

// A value the compiler must hold in a register: otherwise it folds the load into each
// multiply-add that uses it, and a tile loop does twice the loads it needs. Without AVX a vn
// spans two SSE registers, which no asm operand can name: there the hint is left out.
#if defined(__AVX512F__)
inline void in_register(vn& x) { __asm__("" : "+v"(x)); }
#elif defined(__AVX__)
inline void in_register(vn& x) { __asm__("" : "+x"(x)); }
#else
inline void in_register(vn&) {}
#endif

// The rows a register tile holds: half of them with eight lanes (four keys x 3 vectors), all
// of them with sixteen (four keys x 3): 12 accumulators either way.
constexpr int64_t kPartVecs = kLanes == 16 ? kTileVecs : kTileVecs / 2;

// scores[j][m] = sum_d key_j[d] * qt[d][m]: four keys x kPartVecs vectors of rows at a
// time, 12 accumulators, each vector of queries loaded once for the four keys. Not inlined,
// here and below: inlined into the tile loop, its accumulators spilled to the stack (2x
// slower).
[[gnu::noinline]] inline void tile_scores(const float* keys, int64_t key_stride, int64_t n,
                                          const float* qt, int64_t head_dim, float* scores) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int64_t h = 0; h < kTileVecs; h += kPartVecs) {
            const float* k0 = keys + j * key_stride;
            vn a[4][kPartVecs] = {};
            for (int64_t d = 0; d < head_dim; ++d) {
                vn qc[kPartVecs];
                for (int64_t c = 0; c < kPartVecs; ++c) {
                    qc[c] = loadn(qt + d * kTileRows + kLanes * (h + c));
                    in_register(qc[c]);
                }
                for (int i = 0; i < 4; ++i) {
                    const vn x = splatn(k0[i * key_stride + d]);
                    for (int64_t c = 0; c < kPartVecs; ++c) a[i][c] += x * qc[c];
                }
            }
            for (int i = 0; i < 4; ++i)
                for (int64_t c = 0; c < kPartVecs; ++c)
                    storen(scores + (j + i) * kTileRows + kLanes * (h + c), a[i][c]);
        }
    for (; j < n; ++j) {   // a block's last few keys
        const float* k0 = keys + j * key_stride;
        vn a[kTileVecs] = {};
        for (int64_t d = 0; d < head_dim; ++d) {
            const vn x0 = splatn(k0[d]);
            for (int64_t c = 0; c < kTileVecs; ++c)
                a[c] += x0 * loadn(qt + d * kTileRows + kLanes * c);
        }
        for (int64_t c = 0; c < kTileVecs; ++c)
            storen(scores + j * kTileRows + kLanes * c, a[c]);
    }
}

// acc[d][m] = acc[d][m] * corr[m] + sum_j value_j[d] * p[j][m]: the weighted values, kept
// transposed like the queries so that this too runs across rows, four dimensions x a part of
// the rows at a time.
[[gnu::noinline]] inline void tile_values(const float* values, int64_t value_stride, int64_t n,
                                          const float* probs, const float* corr,
                                          int64_t head_dim, float* acc) {
    for (int64_t d = 0; d < head_dim; d += 4)
        for (int64_t h = 0; h < kTileVecs; h += kPartVecs) {
            vn x[4][kPartVecs];
            for (int i = 0; i < 4; ++i)
                for (int64_t c = 0; c < kPartVecs; ++c)
                    x[i][c] = loadn(acc + (d + i) * kTileRows + kLanes * (h + c))
                              * loadn(corr + kLanes * (h + c));
            for (int64_t j = 0; j < n; ++j) {
                const float* value = values + j * value_stride + d;
                vn p[kPartVecs];
                for (int64_t c = 0; c < kPartVecs; ++c) {
                    p[c] = loadn(probs + j * kTileRows + kLanes * (h + c));
                    in_register(p[c]);
                }
                for (int i = 0; i < 4; ++i) {
                    const vn v = splatn(value[i]);
                    for (int64_t c = 0; c < kPartVecs; ++c) x[i][c] += v * p[c];
                }
            }
            for (int i = 0; i < 4; ++i)
                for (int64_t c = 0; c < kPartVecs; ++c)
                    storen(acc + (d + i) * kTileRows + kLanes * (h + c), x[i][c]);
        }
}

template <typename T>
inline void prefill_tile(const Tile& tile, const PrefillSeq& seq, const float* q,
                         int64_t q_stride, const T* k_cache, const T* v_cache,
                         const int64_t* table, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, int64_t block_size, float scale, int64_t window,
                         float softcap, float* out, TileBuffers& buf) {
    const int64_t group = heads / kv_heads, rows = tile.count * group;
    const int64_t row_size = kv_heads * head_dim, prefix = seq.seq_len - seq.new_tokens;
    const float lowest = -std::numeric_limits<float>::infinity();

    // Rows m = token * group + head: row m sees keys at positions floor[m] < j <= limit[m].
    // Padding rows (m >= rows) have zero queries and see every key: finite scores whose
    // results are dropped.
    std::fill(buf.qt.begin(), buf.qt.end(), 0.f);
    for (int64_t m = 0; m < kTileRows; ++m) {
        const int64_t token = m / group;
        buf.limit[m] = m < rows ? static_cast<float>(prefix + tile.first + token) : 1e30f;
        buf.floor[m] = m < rows && window > 0 ? buf.limit[m] - static_cast<float>(window)
                                              : -1e30f;
        if (m >= rows) continue;
        const float* src = q + (seq.token_start + tile.first + token) * q_stride
                           + (tile.kv * group + m % group) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) buf.qt[d * kTileRows + m] = src[d] * scale;
    }
    std::fill(buf.top.begin(), buf.top.end(), lowest);
    std::fill(buf.total.begin(), buf.total.end(), 0.f);
    std::fill(buf.acc.begin(), buf.acc.end(), 0.f);

    const int64_t end = prefix + tile.first + tile.count;     // keys the last token sees
    const int64_t first_limit = prefix + tile.first;          // the most any row sees in full
    // The first key the first token sees, and with it the first block read.
    const int64_t from = window > 0 ? std::max<int64_t>(0, first_limit - window + 1) : 0;
    for (int64_t start = from / block_size * block_size; start < end; start += block_size) {
        const int64_t n = std::min(block_size, end - start);
        const int64_t base = table[start / block_size] * block_size * row_size + tile.kv * head_dim;
        const HeadRows keys = head_rows(k_cache + base, row_size, n, head_dim, buf.widened.data());
        tile_scores(keys.data, keys.stride, n, buf.qt.data(), head_dim, buf.scores.data());
        if (softcap > 0.f) soft_cap(buf.scores.data(), n * kTileRows, softcap);
        // Some rows must not see some keys: those after them, or (windowed) those before the
        // last token's window.
        const bool windowed = window > 0 && start <= end - 1 - window;
        const bool diagonal = start + n - 1 > first_limit || windowed;
        for (int64_t c = 0; c < kTileVecs; ++c) {
            const vn limit = loadn(buf.limit.data() + kLanes * c);
            const vn floors = loadn(buf.floor.data() + kLanes * c);
            const vn old_top = loadn(buf.top.data() + kLanes * c);
            vn top = old_top;
            for (int64_t j = 0; j < n; ++j) {
                float* s = buf.scores.data() + j * kTileRows + kLanes * c;
                vn x = loadn(s);
                if (diagonal) {
                    const vn position = splatn(static_cast<float>(start + j));
                    x = position > limit ? splatn(lowest) : x;
                    if (windowed) x = position <= floors ? splatn(lowest) : x;
                    storen(s, x);
                }
                top = x > top ? x : top;
            }
            // Without a window every row sees key 0, so top is finite from the first block
            // on. With one, a row may see none of a tile's first blocks: while its top is
            // -inf, its (zero) sums are kept as they are, not scaled by e^(-inf - -inf).
            // (Rows see a contiguous run of keys: one that has seen none yet after a block
            // that masks none before a window has seen some of it.)
            const vn corr = windowed
                                ? (top == splatn(lowest) ? splatn(1.f) : expn(old_top - top))
                                : expn(old_top - top);
            vn total = loadn(buf.total.data() + kLanes * c) * corr;
            for (int64_t j = 0; j < n; ++j) {
                float* s = buf.scores.data() + j * kTileRows + kLanes * c;
                const vn x = loadn(s);
                const vn p = x == splatn(lowest) ? vn{} : expn(x - top);
                total += p;
                storen(s, p);
            }
            storen(buf.top.data() + kLanes * c, top);
            storen(buf.total.data() + kLanes * c, total);
            storen(buf.corr.data() + kLanes * c, corr);
        }
        const HeadRows values = head_rows(v_cache + base, row_size, n, head_dim,
                                          buf.widened.data());
        tile_values(values.data, values.stride, n, buf.scores.data(), buf.corr.data(), head_dim,
                    buf.acc.data());
    }
    for (int64_t m = 0; m < rows; ++m) {
        const float inv = 1.f / buf.total[m];
        float* dst = out + (seq.token_start + tile.first + m / group) * heads * head_dim
                     + (tile.kv * group + m % group) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = buf.acc[d * kTileRows + m] * inv;
    }
}

// q: [tokens, heads, head_dim] with q_stride floats between tokens (a view into the fused
// projection's output); out: [tokens, heads, head_dim] contiguous, only the prefill
// sequences' rows written. heads / kv_heads <= kTileRows, head_dim a multiple of 8. The
// cache's elements T: float, or f16 (vec8.h). window, softcap: 0 for none.
template <typename T>
void prefill(const float* q, int64_t q_stride, const T* k_cache, const T* v_cache,
             const int64_t* block_tables, int64_t max_blocks, const PrefillSeq* seqs,
             int64_t num_seqs, int64_t heads, int64_t kv_heads, int64_t head_dim,
             int64_t block_size, float scale, float* out, int64_t window = 0,
             float softcap = 0.f) {
    const int64_t group = heads / kv_heads, tokens_per_tile = kTileRows / group;
    std::vector<Tile> tiles;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t prefix = seqs[s].seq_len - seqs[s].new_tokens;
        for (int64_t first = 0; first < seqs[s].new_tokens; first += tokens_per_tile) {
            const int64_t count = std::min(tokens_per_tile, seqs[s].new_tokens - first);
            const int64_t keys = prefix + first + count;
            const int64_t cost = window > 0 ? std::min(keys, window + count) : keys;
            for (int64_t kv = 0; kv < kv_heads; ++kv)
                tiles.push_back({s, kv, first, count, cost});
        }
    }
    // The longest tiles first, then the rest one at a time: no thread is left with a long
    // tile at the end while the others wait.
    std::stable_sort(tiles.begin(), tiles.end(),
                     [](const Tile& a, const Tile& b) { return a.keys > b.keys; });
    std::atomic<int64_t> next{0};
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
#pragma omp parallel if (num_tiles > 1)
    {
        TileBuffers buf(head_dim, block_size);
        for (int64_t i = next++; i < num_tiles; i = next++) {
            const Tile& tile = tiles[i];
            const PrefillSeq& seq = seqs[tile.seq];
            prefill_tile(tile, seq, q, q_stride, k_cache, v_cache,
                         block_tables + seq.row * max_blocks, heads, kv_heads, head_dim,
                         block_size, scale, window, softcap, out, buf);
        }
    }
}

}  // namespace attention
