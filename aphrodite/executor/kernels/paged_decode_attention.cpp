// Decode attention straight over the paged KV cache on CPU: one new token per sequence.
//
// Built at run time by cpu_kernels.py (g++ -O3 -march=native -fopenmp). The OpenMP runtime it
// links is the libgomp.so.1 torch has already loaded, so it shares torch's thread pool and
// thread count: no second pool spins against torch's threads on the same cores.
//
// Keys and values are read where they are, block by block, never gathered into a padded copy.
// A sequence's query heads all use one token's row of keys (every kv head, contiguous) while
// it is in cache. Scores are kept for the whole context: one pass for the scores, a softmax,
// one pass for the weighted sum of values, so K and V are each read once.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

namespace {

// One token's keys (or values) for every kv head, n = kv_heads * head_dim floats: float32
// caches are read in place, bfloat16 ones (the high half of a float32) widened into buffer.
inline const float* token_row(const float* cache, int64_t offset, float*, int64_t) {
    return cache + offset;
}
inline const float* token_row(const uint16_t* cache, int64_t offset, float* buffer, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits = static_cast<uint32_t>(cache[offset + i]) << 16;
        std::memcpy(buffer + i, &bits, sizeof(float));
    }
    return buffer;
}

// Dot products and axpys over head_dim, written so that g++ vectorises them.
inline float dot(const float* a, const float* b, int64_t n) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
void decode(const float* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
            int64_t max_blocks, const int64_t* seq_lens, int64_t batch, int64_t heads,
            int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, float* out) {
    const int64_t group = heads / kv_heads;
    const int64_t row_size = kv_heads * head_dim;      // one token's keys, every kv head
    // A work item is a sequence, or with fewer sequences than threads can share evenly, one
    // kv head of a sequence (each item then reads a third, say, of every token's row).
    const int64_t parts = batch < 2 * omp_get_max_threads() ? kv_heads : 1;
    const int64_t heads_per_part = heads / parts;
    // Items are handed out one at a time: lengths differ, so static shares would leave
    // threads idle. (A plain parallel region and an atomic counter need nothing newer from
    // libgomp than torch's bundled copy provides.)
    std::atomic<int64_t> next{0};
#pragma omp parallel
    {
        std::vector<float> scores, total(heads), acc(heads * head_dim), buffer(row_size);
        for (int64_t item = next++; item < batch * parts; item = next++) {
            const int64_t seq = item / parts;
            const int64_t first = item % parts * heads_per_part, last = first + heads_per_part;
            const int64_t len = seq_lens[seq];
            const int64_t* table = block_tables + seq * max_blocks;
            const float* q_seq = q + seq * heads * head_dim;
            scores.resize(heads * len);

            for (int64_t t = 0; t < len; ++t) {
                const int64_t offset = (table[t / block_size] * block_size + t % block_size)
                                       * row_size;
                const float* keys = token_row(k_cache, offset, buffer.data(), row_size);
                for (int64_t h = first; h < last; ++h)
                    scores[h * len + t] = dot(q_seq + h * head_dim, keys + (h / group) * head_dim,
                                              head_dim) * scale;
            }
            for (int64_t h = first; h < last; ++h) {
                float* row = scores.data() + h * len;
                float top = row[0];
                for (int64_t t = 1; t < len; ++t) top = std::max(top, row[t]);
                float sum = 0.f;
                for (int64_t t = 0; t < len; ++t) {
                    row[t] = std::exp(row[t] - top);
                    sum += row[t];
                }
                total[h] = sum;
            }

            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t t = 0; t < len; ++t) {
                const int64_t offset = (table[t / block_size] * block_size + t % block_size)
                                       * row_size;
                const float* values = token_row(v_cache, offset, buffer.data(), row_size);
                for (int64_t h = first; h < last; ++h)
                    axpy(scores[h * len + t], values + (h / group) * head_dim,
                         acc.data() + h * head_dim, head_dim);
            }
            float* o = out + seq * heads * head_dim;
            for (int64_t h = first; h < last; ++h)
                for (int64_t d = 0; d < head_dim; ++d)
                    o[h * head_dim + d] = acc[h * head_dim + d] / total[h];
        }
    }
}

}  // namespace

extern "C" {

// q, out: [batch, heads, head_dim] float32; k_cache, v_cache: [blocks, block_size, kv_heads,
// head_dim]; block_tables: [batch, max_blocks] int64; seq_lens: [batch] int64, each >= 1.
void paged_decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                                const int64_t* block_tables, int64_t max_blocks,
                                const int64_t* seq_lens, int64_t batch, int64_t heads,
                                int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                float scale, float* out) {
    decode(q, k_cache, v_cache, block_tables, max_blocks, seq_lens, batch, heads, kv_heads,
           head_dim, block_size, scale, out);
}

void paged_decode_attention_bf16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                 const int64_t* block_tables, int64_t max_blocks,
                                 const int64_t* seq_lens, int64_t batch, int64_t heads,
                                 int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                 float scale, float* out) {
    decode(q, k_cache, v_cache, block_tables, max_blocks, seq_lens, batch, heads, kv_heads,
           head_dim, block_size, scale, out);
}

}
