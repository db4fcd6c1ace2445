// Weight-only quantised matrix products on CPU: out = x @ W^T for a few tokens (decode), with W
// kept in blocks of 32 weights laid out as GGUF stores them (a row is its blocks in order).
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.
//
//   int4 (Q4_1's block, Q4_0 converted to it): float16 d, float16 m, then 16 bytes; byte j holds
//         weight j in its low nibble and weight j + 16 in its high one; w = d * q + m, q 0..15.
//   int8 (Q8_0's block): float16 d, then 32 int8 q; w = d * q.
//
// Decode reads every weight once per token, so bytes are time: GGUF's blocks are the smallest
// form (0.625 and 1.0625 bytes a weight), and a row is one sequential stream.
//
// Activations stay float32: each block's dot product is sum(x * q), scaled by d, plus
// m * sum(x) with sum(x) computed once per call. That is the dequantised matrix's product with
// the float32 rounding order changed, nothing rounded coarser, so greedy output follows the
// dequantised model's. (torch's int4 kernels vectorise only bfloat16 activations, and the
// bfloat16 rounding of x alone flips greedy tokens on this model.)
//
// Up to 7 tokens, work is split over output rows; a row's blocks are widened to float once per
// tile of up to four tokens. From 8 tokens, panels of rows are widened into a float32 buffer
// and multiplied in register tiles (quantized_panels.h).

#pragma once

#include <cstdint>

#include "quantized_panels.h"
#include "quantized_rows.h"

namespace quantized {

// The GGML type codes of the blocks above.
constexpr int kQ4_1 = 3, kQ8_0 = 8;

// x [tokens, cols] float32; weight [rows, cols / 32 blocks] of ggml_type; out [tokens, rows],
// row t at out + t * out_stride. cols % 32 == 0. False for a type these kernels do not know.
inline bool matmul(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight,
                   int ggml_type, int64_t rows, int64_t out_stride, float* out) {
    const bool panels = tokens >= kPanelFromTokens;
    switch (ggml_type) {
        case kQ4_1:
            if (panels) run_panels<true>(x, tokens, cols, weight, rows, out_stride, out);
            else run<true>(x, tokens, cols, weight, rows, out_stride, out);
            return true;
        case kQ8_0:
            if (panels) run_panels<false>(x, tokens, cols, weight, rows, out_stride, out);
            else run<false>(x, tokens, cols, weight, rows, out_stride, out);
            return true;
        default:
            return false;
    }
}

// weight as above -> out [rows, cols] float32. False for a type these kernels do not know.
inline bool dequantize(const uint8_t* weight, int ggml_type, int64_t rows, int64_t cols,
                       float* out) {
    switch (ggml_type) {
        case kQ4_1: dequantize_matrix<true>(weight, rows, cols, out); return true;
        case kQ8_0: dequantize_matrix<false>(weight, rows, cols, out); return true;
        default: return false;
    }
}

}  // namespace quantized
