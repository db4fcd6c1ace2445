// The elementwise steps between a decoder layer's matrix products, float32: residual add and
// RMS norm, rotary embedding and the KV-cache write (float32 or float16 caches), the
// SiLU- and tanh-GELU-gated products.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
// torch spends more on dispatch than on arithmetic for these at decode sizes, and runs the
// composite ones (rms_norm: pow, mean, add, rsqrt, two muls) as separate passes over memory
// at prefill sizes. Each step here is one pass; the arithmetic is the torch layers', only
// the rounding order differs (sums in a tree of 8 lanes, fused multiply-adds).
//
// Each step is split over torch's OpenMP threads by rows when it is large enough to pay for
// waking them (16K floats and up: at a few tokens a fork and join costs more than the work).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec8.h"

namespace layer_ops {

using namespace vec8;

constexpr int64_t kParallelFloats = 1 << 14;

// x += delta when delta is given (the residual stream, in place); out = x * rsqrt(mean(x^2)
// + eps) * weight. One row of size floats.
template <bool kAdd>
inline void add_rms_norm_row(float* x, const float* delta, const float* weight, int64_t size,
                             float eps, float* out) {
    v8 even = {}, odd = {};
    int64_t i = 0;
    for (; i + 16 <= size; i += 16) {
        v8 a = load8(x + i), b = load8(x + i + 8);
        if (kAdd) {
            a += load8(delta + i);
            b += load8(delta + i + 8);
            store8(x + i, a);
            store8(x + i + 8, b);
        }
        even += a * a;
        odd += b * b;
    }
    float squares = sum8(even + odd);
    for (; i < size; ++i) {
        if (kAdd) x[i] += delta[i];
        squares += x[i] * x[i];
    }
    const float inv = 1.f / std::sqrt(squares / size + eps);
    const v8 inv8 = splat8(inv);
    for (i = 0; i + 8 <= size; i += 8) store8(out + i, load8(x + i) * inv8 * load8(weight + i));
    for (; i < size; ++i) out[i] = x[i] * inv * weight[i];
}

inline void add_rms_norm(float* x, const float* delta, const float* weight, int64_t rows,
                         int64_t size, float eps, float* out) {
#pragma omp parallel for schedule(static) if (rows * size >= kParallelFloats)
    for (int64_t r = 0; r < rows; ++r) {
        if (delta)
            add_rms_norm_row<true>(x + r * size, delta + r * size, weight, size, eps, out + r * size);
        else
            add_rms_norm_row<false>(x + r * size, nullptr, weight, size, eps, out + r * size);
    }
}

// One head in place: x * cos + swap_halves(x) * sin, with rotate-half's sign folded into sin
// (see layers/rotary.py).
inline void rotate(float* x, const float* cos, const float* sin, int64_t dim) {
    const int64_t half = dim / 2;
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
        const v8 a = load8(x + i), b = load8(x + i + half);
        store8(x + i, a * load8(cos + i) + b * load8(sin + i));
        store8(x + i + half, b * load8(cos + i + half) + a * load8(sin + i + half));
    }
    for (; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// n floats into a cache row: float32 copied, float16 rounded to nearest even.
inline void store_row(float* dst, const float* src, int64_t n) {
    std::memcpy(dst, src, n * sizeof(float));
}

#if defined(__F16C__)
inline void store_row(f16* dst, const float* src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(dst + i, load8(src + i));
    for (; i < n; ++i) dst[i] = to_f16(src[i]);
}
#endif

// qkv [tokens, heads + 2 * kv_heads, head_dim]: the q and k heads are rotated in place by
// their token's cos/sin rows [tokens, head_dim]; then token t's k and v heads are stored in
// row slots[t] of k_cache / v_cache [slots, kv_heads, head_dim] (slots[t] < 0: not stored),
// whose elements T are float or f16 (vec8.h).
template <typename T>
void rotate_and_cache(float* qkv, const float* cos, const float* sin, const int64_t* slots,
                      int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim,
                      T* k_cache, T* v_cache) {
    const int64_t row_size = (heads + 2 * kv_heads) * head_dim, kv_size = kv_heads * head_dim;
#pragma omp parallel for schedule(static) if (tokens * row_size >= kParallelFloats)
    for (int64_t t = 0; t < tokens; ++t) {
        float* row = qkv + t * row_size;
        for (int64_t h = 0; h < heads + kv_heads; ++h)
            rotate(row + h * head_dim, cos + t * head_dim, sin + t * head_dim, head_dim);
        if (slots[t] < 0) continue;
        store_row(k_cache + slots[t] * kv_size, row + heads * head_dim, kv_size);
        store_row(v_cache + slots[t] * kv_size, row + heads * head_dim + kv_size, kv_size);
    }
}

// gate_up [rows, 2 * inter] (gate, then up) -> out [rows, inter]: silu(gate) * up, where
// silu(g) = g / (1 + e^-g).
inline void silu_and_mul(const float* gate_up, int64_t rows, int64_t inter, float* out) {
#pragma omp parallel for schedule(static) if (rows * inter >= kParallelFloats)
    for (int64_t r = 0; r < rows; ++r) {
        const float* gate = gate_up + r * 2 * inter;
        const float* up = gate + inter;
        float* o = out + r * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            const v8 g = load8(gate + i);
            store8(o + i, g / (1.f + exp8(-g)) * load8(up + i));
        }
        for (; i < inter; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
}

// gate_up [rows, 2 * inter] (gate, then up) -> out [rows, inter]: gelu(gate) * up with
// torch's tanh approximation, gelu(g) = g / 2 * (1 + tanh(u)), u = sqrt(2 / pi) * (g +
// 0.044715 g^3), computed as g / (1 + e^(-2u)) (the same function: 1 + tanh(u) =
// 2 / (1 + e^(-2u))).
inline void gelu_tanh_and_mul(const float* gate_up, int64_t rows, int64_t inter, float* out) {
    constexpr float kTwoC = 2.f * 0.7978845608028654f, kCube = 0.044715f;
#pragma omp parallel for schedule(static) if (rows * inter >= kParallelFloats)
    for (int64_t r = 0; r < rows; ++r) {
        const float* gate = gate_up + r * 2 * inter;
        const float* up = gate + inter;
        float* o = out + r * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            const v8 g = load8(gate + i);
            const v8 two_u = kTwoC * (g + kCube * g * g * g);
            store8(o + i, g / (1.f + exp8(-two_u)) * load8(up + i));
        }
        for (; i < inter; ++i) {
            const float g = gate[i], two_u = kTwoC * (g + kCube * g * g * g);
            o[i] = g / (1.f + std::exp(-two_u)) * up[i];
        }
    }
}

}  // namespace layer_ops
