// The attention-score soft cap of Gemma 2: s -> cap * tanh(s / cap), applied to the scaled
// scores before the mask and the softmax (torch_paged.py's reference does the same).
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.

#pragma once

#include <cmath>
#include <cstdint>

#include "vec8.h"

namespace attention {

using namespace vec8;

// tanh(x) a vector at a time, Cephes' tanhf: an odd polynomial below |x| = 0.625, where
// 1 - 2 / (e^2|x| + 1) would lose the small values' digits to cancellation, that formula
// above (expn clamps its input, so no infinity or NaN comes out for large |x|, only +-1).
// Within a few ulp of std::tanh.
inline vn tanh_lanes(vn x) {
    const vn zero = splatn(0.f);
    const vn a = x < zero ? -x : x;
    const vn z = a * a;
    vn p = z * -5.70498872745e-3f + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    p = p * z * a + a;
    const vn big = 1.f - 2.f / (expn(a + a) + 1.f);
    const vn t = a < splatn(0.625f) ? p : big;
    return x < zero ? -t : t;
}

// n scores in place: cap * tanh(s / cap); n need not be a multiple of kLanes.
inline void soft_cap(float* scores, int64_t n, float cap) {
    const float inverse = 1.f / cap;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        storen(scores + i, tanh_lanes(loadn(scores + i) * inverse) * cap);
    for (; i < n; ++i) scores[i] = std::tanh(scores[i] * inverse) * cap;
}

}  // namespace attention
