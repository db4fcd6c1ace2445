// Weight-only quantised matrix products on CPU: out = x @ W^T for a few tokens (decode) or
// many, with W kept in GGUF blocks as the file stores them (a row is its blocks in order):
// Q4_1 (Q4_0 arrives rewritten as Q4_1), Q5_0, Q8_0, Q4_K, Q5_K and Q6_K, whose layouts
// gguf_blocks.h describes.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
// Decode reads every weight once per token, so bytes are time: GGUF's blocks are the smallest
// form (0.5625 to 1.0625 bytes a weight), and a row is one sequential stream.
//
// Activations stay float32: each group of 32 weights, w = D * q + M, adds D * sum(x * q) and
// M * sum(x), with sum(x) computed once per call. That is the dequantised matrix's product with
// the float32 rounding order changed, nothing rounded coarser, so greedy output follows the
// dequantised model's. (torch's int4 kernels vectorise only bfloat16 activations, and the
// bfloat16 rounding of x alone flips greedy tokens on this model.)
//
// Up to 7 tokens, work is split over output rows; a row's blocks are widened to float once per
// tile of up to four tokens (quantized_rows.h). From 8 tokens, panels of rows are widened into
// a float32 buffer and multiplied in register tiles (quantized_panels.h).

#pragma once

#include <cstdint>

#include "gguf_blocks.h"
#include "quantized_panels.h"
#include "quantized_rows.h"

namespace quantized {

template <class F>
bool matmul_as(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight,
               int64_t rows, int64_t out_stride, float* out) {
    if (cols % F::kValues != 0) return false;
    if (tokens >= kPanelFromTokens) run_panels<F>(x, tokens, cols, weight, rows, out_stride, out);
    else run<F>(x, tokens, cols, weight, rows, out_stride, out);
    return true;
}

template <class F>
bool dequantize_as(const uint8_t* weight, int64_t rows, int64_t cols, float* out) {
    if (cols % F::kValues != 0) return false;
    dequantize_matrix<F>(weight, rows, cols, out);
    return true;
}

// x [tokens, cols] float32; weight [rows, cols / values per block] of ggml_type; out
// [tokens, rows], row t at out + t * out_stride. False for a type these kernels do not know,
// or cols not a whole number of its blocks.
inline bool matmul(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight,
                   int ggml_type, int64_t rows, int64_t out_stride, float* out) {
    switch (ggml_type) {
        case Q4_1::kType: return matmul_as<Q4_1>(x, tokens, cols, weight, rows, out_stride, out);
        case Q5_0::kType: return matmul_as<Q5_0>(x, tokens, cols, weight, rows, out_stride, out);
        case Q8_0::kType: return matmul_as<Q8_0>(x, tokens, cols, weight, rows, out_stride, out);
        case Q4_K::kType: return matmul_as<Q4_K>(x, tokens, cols, weight, rows, out_stride, out);
        case Q5_K::kType: return matmul_as<Q5_K>(x, tokens, cols, weight, rows, out_stride, out);
        case Q6_K::kType: return matmul_as<Q6_K>(x, tokens, cols, weight, rows, out_stride, out);
        default: return false;
    }
}

// weight as above -> out [rows, cols] float32, bit for bit gguf's dequantisation. False as
// for matmul.
inline bool dequantize(const uint8_t* weight, int ggml_type, int64_t rows, int64_t cols,
                       float* out) {
    switch (ggml_type) {
        case Q4_1::kType: return dequantize_as<Q4_1>(weight, rows, cols, out);
        case Q5_0::kType: return dequantize_as<Q5_0>(weight, rows, cols, out);
        case Q8_0::kType: return dequantize_as<Q8_0>(weight, rows, cols, out);
        case Q4_K::kType: return dequantize_as<Q4_K>(weight, rows, cols, out);
        case Q5_K::kType: return dequantize_as<Q5_K>(weight, rows, cols, out);
        case Q6_K::kType: return dequantize_as<Q6_K>(weight, rows, cols, out);
        default: return false;
    }
}

}  // namespace quantized
