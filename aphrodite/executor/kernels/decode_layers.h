// Decode steps of a Llama-family model with quantised weights, every layer in one call.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by cpu_kernels.py.
//
// At one token a step, the eager torch forward issues about 25 operators a layer (norms,
// rotary, cache writes, residual adds, the gated activation), each of which costs more in
// dispatch than in arithmetic at 576 wide: about 9 ms of a 23 ms step on the default model.
// Here a layer is the same arithmetic in plain loops around the two kernels that do real work
// (quantized::matmul, attention::decode), whose OpenMP regions are the only parallel parts.
// The arithmetic follows the torch path (models/llama.py) step by step, in float32; only the
// rounding order differs.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
    float* kv_cache;           // [2, blocks, block_size, kv_heads, head_dim] float32
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
    int64_t cache_half;          // floats in one of a cache's key and value halves
    float eps, scale;
};

inline void matmul(const Matrix& m, const float* x, int64_t tokens, float* out) {
    quantized::matmul(x, tokens, m.cols, m.blocks, m.is_int4 != 0, m.rows, out);
    if (m.bias)
        for (int64_t t = 0; t < tokens; ++t)
            for (int64_t r = 0; r < m.rows; ++r) out[t * m.rows + r] += m.bias[r];
}

// F.rms_norm: x * rsqrt(mean(x^2) + eps) * weight, per token.
inline void rms_norm(const float* x, const float* weight, int64_t tokens, int64_t size, float eps,
                     float* out) {
    for (int64_t t = 0; t < tokens; ++t) {
        const float* xt = x + t * size;
        float squares = 0.f;
        for (int64_t i = 0; i < size; ++i) squares += xt[i] * xt[i];
        const float inv = 1.f / std::sqrt(squares / size + eps);
        for (int64_t i = 0; i < size; ++i) out[t * size + i] = xt[i] * inv * weight[i];
    }
}

// RotaryEmbedding.apply on one head: x * cos + swap_halves(x) * sin.
inline void rotate(const float* x, const float* cos, const float* sin, int64_t dim, float* out) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        out[i] = x[i] * cos[i] + x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

inline void layer(const LayerWeights& w, const Step& s) {
    const int64_t T = s.tokens, H = s.hidden_size, D = s.head_dim;
    const int64_t q_size = s.heads * D, kv_size = s.kv_heads * D, qkv_size = w.qkv.rows;
    const int64_t inter = w.down.cols;
    std::vector<float> normed(T * H), qkv(T * qkv_size), q(T * q_size), attn(T * q_size);
    std::vector<float> delta(T * H), gate_up(T * 2 * inter), act(T * inter);
    float* k_cache = w.kv_cache;
    float* v_cache = w.kv_cache + s.cache_half;

    rms_norm(s.hidden, w.input_norm, T, H, s.eps, normed.data());
    matmul(w.qkv, normed.data(), T, qkv.data());
    for (int64_t t = 0; t < T; ++t) {
        const float* row = qkv.data() + t * qkv_size;
        const float* cos = s.cos + t * D;
        const float* sin = s.sin + t * D;
        for (int64_t h = 0; h < s.heads; ++h)
            rotate(row + h * D, cos, sin, D, q.data() + t * q_size + h * D);
        if (s.slots[t] < 0) continue;
        float* k_slot = k_cache + s.slots[t] * kv_size;
        for (int64_t h = 0; h < s.kv_heads; ++h)
            rotate(row + q_size + h * D, cos, sin, D, k_slot + h * D);
        std::memcpy(v_cache + s.slots[t] * kv_size, row + q_size + kv_size,
                    kv_size * sizeof(float));
    }
    attention::decode(q.data(), k_cache, v_cache, s.block_tables, s.max_blocks, s.seq_lens, T,
                      s.heads, s.kv_heads, D, s.block_size, s.scale, attn.data());
    matmul(w.o, attn.data(), T, delta.data());
    for (int64_t i = 0; i < T * H; ++i) s.hidden[i] += delta[i];

    rms_norm(s.hidden, w.post_norm, T, H, s.eps, normed.data());
    matmul(w.gate_up, normed.data(), T, gate_up.data());
    for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < inter; ++i) {
            const float g = gate_up[t * 2 * inter + i], u = gate_up[t * 2 * inter + inter + i];
            act[t * inter + i] = g / (1.f + std::exp(-g)) * u;   // F.silu(gate) * up
        }
    matmul(w.down, act.data(), T, delta.data());
    for (int64_t i = 0; i < T * H; ++i) s.hidden[i] += delta[i];
}

}  // namespace fused
