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

// x [tokens, cols] float32; weight [rows, cols / 32 blocks] as above; out [tokens, rows].
// cols % 32 == 0.
inline void matmul(const float* x, int64_t tokens, int64_t cols, const uint8_t* weight,
                   bool is_int4, int64_t rows, float* out) {
    if (tokens >= kPanelFromTokens) {
        if (is_int4) run_panels<true>(x, tokens, cols, weight, rows, out);
        else run_panels<false>(x, tokens, cols, weight, rows, out);
    } else if (is_int4) {
        run<true>(x, tokens, cols, weight, rows, out);
    } else {
        run<false>(x, tokens, cols, weight, rows, out);
    }
}

}  // namespace quantized
