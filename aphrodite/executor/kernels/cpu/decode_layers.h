// Decode steps of a Llama-family model with quantised weights, every layer in one call.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by cpu_kernels.py.
//
// At one token a step, the eager torch forward issues about 25 operators a layer (norms,
// rotary, cache writes, residual adds, the gated activation), each of which costs more in
// dispatch than in arithmetic at 576 wide: about 9 ms of a 23 ms step on the default model.
// Here a layer is the steps of the float32 path (models/llama.py) in one call: layer_ops.h's
// elementwise steps around the two kernels that do real work (quantized::matmul,
// attention::decode).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "layer_ops.h"
#include "paged_decode_attention.h"
#include "quantized_linear.h"

namespace fused {

// One quantised matrix: GGUF blocks [rows, cols / 32] (see quantized_linear.h), optional bias.
struct Matrix {
    const uint8_t* blocks;
    const float* bias;   // [rows] or null
    int64_t rows, cols;
    int64_t is_int4;
};

struct LayerWeights {
    const float* input_norm;   // [hidden]
    const float* post_norm;    // [hidden]
    Matrix qkv, o, gate_up, down;
    void* kv_cache;            // [2, blocks, block_size, kv_heads, head_dim], float32 or f16
};

// What a step shares across layers. One new token per sequence: token t is sequence t.
struct Step {
    float* hidden;               // [tokens, hidden_size], the residual stream, updated in place
    const float* cos;            // [tokens, head_dim]: the rotary tables' rows, sin's sign
    const float* sin;            //   folded in (see models/rotary.py)
    const int64_t* slots;        // [tokens] cache slot of each new token, -1: not written
    const int64_t* block_tables; // [tokens, max_blocks]
    const int64_t* seq_lens;     // [tokens], this step's token included
    int64_t tokens, hidden_size, heads, kv_heads, head_dim, block_size, max_blocks;
    int64_t cache_half;          // elements in one of a cache's key and value halves
    int64_t kv_f16;              // the caches hold float16 (vec8.h's f16), not float32
    float eps, scale;
};

inline void matmul(const Matrix& m, const float* x, int64_t tokens, float* out) {
    quantized::matmul(x, tokens, m.cols, m.blocks, m.is_int4 != 0, m.rows, out);
    if (m.bias)
        for (int64_t t = 0; t < tokens; ++t)
            for (int64_t r = 0; r < m.rows; ++r) out[t * m.rows + r] += m.bias[r];
}

template <typename Cache>
inline void layer_on(const LayerWeights& w, const Step& s) {
    const int64_t T = s.tokens, H = s.hidden_size, D = s.head_dim;
    const int64_t q_size = s.heads * D, qkv_size = w.qkv.rows;
    const int64_t inter = w.down.cols;
    std::vector<float> normed(T * H), qkv(T * qkv_size), q(T * q_size), attn(T * q_size);
    std::vector<float> delta(T * H), gate_up(T * 2 * inter), act(T * inter);
    Cache* k_cache = static_cast<Cache*>(w.kv_cache);
    Cache* v_cache = k_cache + s.cache_half;

    layer_ops::add_rms_norm(s.hidden, nullptr, w.input_norm, T, H, s.eps, normed.data());
    matmul(w.qkv, normed.data(), T, qkv.data());
    layer_ops::rotate_and_cache(qkv.data(), s.cos, s.sin, s.slots, T, s.heads, s.kv_heads, D,
                                k_cache, v_cache);
    for (int64_t t = 0; t < T; ++t)    // the kernel takes contiguous queries
        std::memcpy(q.data() + t * q_size, qkv.data() + t * qkv_size, q_size * sizeof(float));
    attention::decode(q.data(), k_cache, v_cache, s.block_tables, s.max_blocks, s.seq_lens, T,
                      s.heads, s.kv_heads, D, s.block_size, s.scale, attn.data());
    matmul(w.o, attn.data(), T, delta.data());

    layer_ops::add_rms_norm(s.hidden, delta.data(), w.post_norm, T, H, s.eps, normed.data());
    matmul(w.gate_up, normed.data(), T, gate_up.data());
    layer_ops::silu_and_mul(gate_up.data(), T, inter, act.data());
    matmul(w.down, act.data(), T, delta.data());
    for (int64_t i = 0; i < T * H; ++i) s.hidden[i] += delta[i];
}

inline void layer(const LayerWeights& w, const Step& s) {
#if defined(__F16C__)
    if (s.kv_f16) return layer_on<vec8::f16>(w, s);
#endif
    layer_on<float>(w, s);
}

}  // namespace fused
