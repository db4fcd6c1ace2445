// The CPU kernels' C entry points: the only translation unit of the library build.py builds
// at run time (g++ -O3 -march=native -fopenmp). Their prototypes, and the constants and
// structures shared with Python, come from kernel_abi.h, which build.py generates from
// kernel_abi.py: a definition here whose types differ from its prototype does not compile.
//
// The OpenMP runtime it links is the libgomp.so.1 torch has already loaded, so the kernels
// share torch's thread pool and thread count: no second pool spins against torch's threads
// on the same cores.

#include <cstdint>

#include "kernel_abi.h"

#include "amx_linear.h"
#include "decode_layers.h"
#include "layer_ops.h"
#include "paged_decode_attention.h"
#include "paged_prefill_attention.h"
#include "quantized_linear.h"

static_assert(attention::kTileRows == kPrefillTileRows,
              "kernel_abi.py's PREFILL_TILE_ROWS is the prefill tile's rows");
static_assert(sizeof(attention::PrefillSeq) == 4 * sizeof(int64_t),
              "paged_prefill_attention's seqs: four int64 a sequence");

// Whether this build reads and writes float16 caches (needs F16C: x86 since 2012).
extern "C" int kv_float16_supported() { return vec8::kHasF16 ? 1 : 0; }

// q, out: [batch, heads, head_dim] float32; k_cache, v_cache: [blocks, block_size, kv_heads,
// head_dim] of kv_dtype; block_tables: [batch, max_blocks] int64; seq_lens: [batch] int64,
// each >= 1. window: the sliding window (the new token at p sees positions > p - window),
// softcap: scores s become softcap * tanh(s / softcap); 0 for none.
extern "C" void paged_decode_attention(const float* q, const void* k_cache, const void* v_cache,
                                       int kv_dtype, const int64_t* block_tables,
                                       int64_t max_blocks, const int64_t* seq_lens,
                                       int64_t batch, int64_t heads, int64_t kv_heads,
                                       int64_t head_dim, int64_t block_size, float scale,
                                       int64_t window, float softcap, float* out) {
    switch (kv_dtype) {
        case kBfloat16:
            attention::decode(q, static_cast<const uint16_t*>(k_cache),
                              static_cast<const uint16_t*>(v_cache), block_tables, max_blocks,
                              seq_lens, batch, heads, kv_heads, head_dim, block_size, scale, out,
                              window, softcap);
            break;
#if defined(__F16C__)
        case kFloat16:
            attention::decode(q, static_cast<const vec8::f16*>(k_cache),
                              static_cast<const vec8::f16*>(v_cache), block_tables, max_blocks,
                              seq_lens, batch, heads, kv_heads, head_dim, block_size, scale, out,
                              window, softcap);
            break;
#endif
        default:
            attention::decode(q, static_cast<const float*>(k_cache),
                              static_cast<const float*>(v_cache), block_tables, max_blocks,
                              seq_lens, batch, heads, kv_heads, head_dim, block_size, scale, out,
                              window, softcap);
    }
}

// q [tokens, heads, head_dim] float32, q_stride floats from one token to the next; out
// [tokens, heads, head_dim], the prefill rows written; k_cache, v_cache [blocks, block_size,
// kv_heads, head_dim], float32 or (kv_f16) float16; seqs [num_seqs, 4] int64: block-table
// row, first token, new tokens, context length after the step. window, softcap: as for
// paged_decode_attention.
extern "C" void paged_prefill_attention(const float* q, int64_t q_stride, const void* k_cache,
                                        const void* v_cache, int kv_f16,
                                        const int64_t* block_tables, int64_t max_blocks,
                                        const int64_t* seqs, int64_t num_seqs, int64_t heads,
                                        int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                        float scale, int64_t window, float softcap, float* out) {
    const auto* prefill_seqs = reinterpret_cast<const attention::PrefillSeq*>(seqs);
#if defined(__F16C__)
    if (kv_f16) {
        attention::prefill(q, q_stride, static_cast<const vec8::f16*>(k_cache),
                           static_cast<const vec8::f16*>(v_cache), block_tables, max_blocks,
                           prefill_seqs, num_seqs, heads, kv_heads, head_dim, block_size, scale,
                           out, window, softcap);
        return;
    }
#endif
    attention::prefill(q, q_stride, static_cast<const float*>(k_cache),
                       static_cast<const float*>(v_cache), block_tables, max_blocks,
                       prefill_seqs, num_seqs, heads, kv_heads, head_dim, block_size, scale, out,
                       window, softcap);
}

// x [tokens, cols] float32; weight [rows, cols / block values] GGUF blocks of ggml_type (the
// GGML type code: quantized_linear.h lists those it knows); out [tokens, rows], row t at
// out + t * out_stride. Returns 0, or -1 for a type it does not know (nothing written).
extern "C" int quantized_linear(const float* x, int64_t tokens, int64_t cols,
                                const uint8_t* weight, int ggml_type, int64_t rows,
                                int64_t out_stride, float* out) {
    return quantized::matmul(x, tokens, cols, weight, ggml_type, rows, out_stride, out) ? 0 : -1;
}

// weight as above -> out [rows, cols] float32, bit for bit gguf's dequantisation. Returns 0,
// or -1 for a type it does not know.
extern "C" int dequantize_blocks(const uint8_t* weight, int ggml_type, int64_t rows,
                                 int64_t cols, float* out) {
    return quantized::dequantize(weight, ggml_type, rows, cols, out) ? 0 : -1;
}

// Whether this process may use AMX's tiles (Linux grants them on request, once); 0 on builds
// or CPUs without AMX, where amx_linear must not be called.
extern "C" int amx_enable() { return amx::enable() ? 1 : 0; }

// Q4_1 blocks of a [rows, cols] matrix (as quantized_linear's) -> amx_packed_size(rows, cols)
// bfloat16s of AMX operand tiles. rows % 32 == 0, cols % 32 == 0.
extern "C" int64_t amx_packed_size(int64_t rows, int64_t cols) {
    return amx::packed_size(rows, cols);
}

extern "C" void amx_pack(const uint8_t* weight, int64_t rows, int64_t cols, uint16_t* out) {
    amx::pack(weight, rows, cols, out);
}

// x [tokens, cols] float32 times a packed matrix -> out [tokens rounded up to 32, rows].
extern "C" void amx_linear(const float* x, int64_t tokens, int64_t cols, const uint16_t* packed,
                           int64_t rows, float* out) {
    amx::matmul(x, tokens, cols, packed, rows, out);
}

// Runs every layer of a decode step over step->hidden, in place (see decode_layers.h).
extern "C" void decode_layers(const DecodeLayerWeights* layers, int64_t num_layers,
                              const DecodeStep* step) {
    for (int64_t i = 0; i < num_layers; ++i) fused::layer(layers[i], *step);
}

// x, delta, out: [rows, size] float32, weight [size]. x += delta (delta may be null), then
// out = rms_norm(x) * weight.
extern "C" void add_rms_norm(float* x, const float* delta, const float* weight, int64_t rows,
                             int64_t size, float eps, float* out) {
    layer_ops::add_rms_norm(x, delta, weight, rows, size, eps, out);
}

// qkv [tokens, heads + 2 * kv_heads, head_dim] float32, rotated in place; cos, sin
// [tokens, head_dim]; slots [tokens] int64; k_cache, v_cache [slots, kv_heads, head_dim],
// float32 or (kv_f16) float16.
extern "C" void rotate_and_cache(float* qkv, const float* cos, const float* sin,
                                 const int64_t* slots, int64_t tokens, int64_t heads,
                                 int64_t kv_heads, int64_t head_dim, void* k_cache,
                                 void* v_cache, int kv_f16) {
#if defined(__F16C__)
    if (kv_f16) {
        layer_ops::rotate_and_cache(qkv, cos, sin, slots, tokens, heads, kv_heads, head_dim,
                                    static_cast<vec8::f16*>(k_cache),
                                    static_cast<vec8::f16*>(v_cache));
        return;
    }
#endif
    layer_ops::rotate_and_cache(qkv, cos, sin, slots, tokens, heads, kv_heads, head_dim,
                                static_cast<float*>(k_cache), static_cast<float*>(v_cache));
}

// gate_up [rows, 2 * inter] float32 -> out [rows, inter].
extern "C" void silu_and_mul(const float* gate_up, int64_t rows, int64_t inter, float* out) {
    layer_ops::silu_and_mul(gate_up, rows, inter, out);
}

// gate_up [rows, 2 * inter] float32 -> out [rows, inter]: tanh-GELU(gate) * up.
extern "C" void gelu_tanh_and_mul(const float* gate_up, int64_t rows, int64_t inter,
                                  float* out) {
    layer_ops::gelu_tanh_and_mul(gate_up, rows, inter, out);
}
