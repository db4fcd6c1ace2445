// Decode steps of a pre-norm decoder with quantised weights, every layer in one call:
// Llama's layer, and the optional pieces of Qwen3's and Gemma 2/3's.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
// At one token a step, the eager torch forward issues about 25 operators a layer (norms,
// rotary, cache writes, residual adds, the gated activation), each of which costs more in
// dispatch than in arithmetic at 576 wide: about 9 ms of a 23 ms step on the default model
// (benchmarks/step_profile.py --batch 1 splits a step's time). Here a layer is the steps of
// the float32 path (executor/layers/) in one call, as models/fused_decode.py wires it: layer_ops.h's elementwise steps around the
// two kernels that do real work (quantized::matmul, attention::decode).
//
// A layer: x += o(attention(rotary(qk_norm(qkv(input_norm(x)))))), the attention output
// normed by attn_out_norm first when there is one; then x += down(act(gate_up(post_norm(x)))),
// normed by mlp_out_norm first when there is one. QK-norm (Qwen3, Gemma 3) is an RMS norm of
// each q and k head; act is SiLU (Llama, Qwen3) or tanh-GELU (Gemma); each layer has its own
// sliding window and rotary tables (Gemma 3's local and global bases), the step a soft cap.
//
// The layers' weights (DecodeLayerWeights, QuantizedMatrix) and what a step shares across
// them (DecodeStep) are kernel_abi.py's structures, from the generated kernel_abi.h.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_abi.h"
#include "layer_ops.h"
#include "paged_decode_attention.h"
#include "quantized_linear.h"

namespace fused {

// out [tokens, m.rows] = x [tokens, m.cols] times the matrix's segments, each into its rows.
inline void matmul(const QuantizedMatrix& m, const float* x, int64_t tokens, float* out) {
    const MatrixSegment parts[3] = {m.part0, m.part1, m.part2};
    int64_t first = 0;
    for (const MatrixSegment& part : parts) {
        if (part.rows == 0) continue;
        quantized::matmul(x, tokens, m.cols, part.blocks, static_cast<int>(part.ggml_type),
                          part.rows, m.rows, out + first);
        first += part.rows;
    }
    if (m.bias)
        for (int64_t t = 0; t < tokens; ++t)
            for (int64_t r = 0; r < m.rows; ++r) out[t * m.rows + r] += m.bias[r];
}

// Heads [first, first + count) of each token's qkv row, RMS-normed in place by weight.
inline void norm_heads(float* qkv, int64_t tokens, int64_t row_size, int64_t first,
                       int64_t count, int64_t head_dim, const float* weight, float eps) {
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t h = first; h < first + count; ++h) {
            float* head = qkv + t * row_size + h * head_dim;
            layer_ops::add_rms_norm_row<false>(head, nullptr, weight, head_dim, eps, head);
        }
}

template <typename Cache>
inline void layer_on(const DecodeLayerWeights& w, const DecodeStep& s) {
    const int64_t T = s.tokens, H = s.hidden_size, D = s.head_dim;
    const int64_t q_size = s.heads * D, qkv_size = w.qkv.rows;
    const int64_t inter = w.down.cols;
    std::vector<float> normed(T * H), qkv(T * qkv_size), q(T * q_size), attn(T * q_size);
    std::vector<float> delta(T * H), gate_up(T * 2 * inter), act(T * inter);
    Cache* k_cache = static_cast<Cache*>(w.kv_cache);
    Cache* v_cache = k_cache + s.cache_half;
    const bool local = w.local_rope && s.local_cos;
    const float* cos = local ? s.local_cos : s.cos;
    const float* sin = local ? s.local_sin : s.sin;

    layer_ops::add_rms_norm(s.hidden, nullptr, w.input_norm, T, H, s.eps, normed.data());
    matmul(w.qkv, normed.data(), T, qkv.data());
    if (w.q_norm) norm_heads(qkv.data(), T, qkv_size, 0, s.heads, D, w.q_norm, s.eps);
    if (w.k_norm) norm_heads(qkv.data(), T, qkv_size, s.heads, s.kv_heads, D, w.k_norm, s.eps);
    layer_ops::rotate_and_cache(qkv.data(), cos, sin, s.slots, T, s.heads, s.kv_heads, D,
                                k_cache, v_cache);
    for (int64_t t = 0; t < T; ++t)    // the kernel takes contiguous queries
        std::memcpy(q.data() + t * q_size, qkv.data() + t * qkv_size, q_size * sizeof(float));
    attention::decode(q.data(), k_cache, v_cache, s.block_tables, s.max_blocks, s.seq_lens, T,
                      s.heads, s.kv_heads, D, s.block_size, s.scale, attn.data(), w.window,
                      s.softcap);
    matmul(w.o, attn.data(), T, delta.data());
    if (w.attn_out_norm)
        layer_ops::add_rms_norm(delta.data(), nullptr, w.attn_out_norm, T, H, s.eps,
                                delta.data());

    layer_ops::add_rms_norm(s.hidden, delta.data(), w.post_norm, T, H, s.eps, normed.data());
    matmul(w.gate_up, normed.data(), T, gate_up.data());
    if (s.gelu)
        layer_ops::gelu_tanh_and_mul(gate_up.data(), T, inter, act.data());
    else
        layer_ops::silu_and_mul(gate_up.data(), T, inter, act.data());
    matmul(w.down, act.data(), T, delta.data());
    if (w.mlp_out_norm)
        layer_ops::add_rms_norm(delta.data(), nullptr, w.mlp_out_norm, T, H, s.eps,
                                delta.data());
    for (int64_t i = 0; i < T * H; ++i) s.hidden[i] += delta[i];
}

inline void layer(const DecodeLayerWeights& w, const DecodeStep& s) {
#if defined(__F16C__)
    if (s.kv_f16) return layer_on<vec8::f16>(w, s);
#endif
    layer_on<float>(w, s);
}

}  // namespace fused
