// Eight floats at a time, in GNU vector extensions: g++ lowers a v8 to one AVX register, or to
// two SSE ones on older CPUs, so the kernels need no intrinsics of one instruction set. The
// one exception is float16 conversion (F16C), which GNU vectors lower to one element at a time.
// vn (at the end) is the same for the build's widest vectors: sixteen floats with AVX-512.
//
// Part of cpu_kernels.cpp (one translation unit), built at run time by build.py.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace vec8 {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
    v8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// IEEE float16 cache elements (torch.float16's bits). Only with F16C, where a load or store
// of eight is one conversion instruction; elsewhere float16 caches take the torch paths.
struct f16 {
    uint16_t bits;
};

#if defined(__F16C__)
constexpr bool kHasF16 = true;

inline v8 load8(const f16* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return reinterpret_cast<v8>(_mm256_cvtph_ps(bits));
}

// Rounded to nearest, ties to even: what torch's .to(torch.float16) gives.
inline void store8(f16* p, v8 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
}

inline f16 to_f16(float x) { return f16{_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)}; }
#else
constexpr bool kHasF16 = false;
#endif

inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }

// e^x, eight at a time: the range reduction x = n ln2 + r, |r| <= ln2 / 2, and a degree-6
// polynomial for e^r (Cephes' expf coefficients), within 1 ulp of std::exp (checked at steps
// of 1e-4 over [-87, 0], the softmax range). The input is clamped to [-87.3, 88], so nothing
// below 2^-126 and no infinity comes out: 1 / (1 + e^88) is still a number.
template <typename V, typename VI>
inline V exp_lanes(V x) {
    const V lowest = V{} + -87.3f, highest = V{} + 88.f;
    x = x < lowest ? lowest : x;
    x = x > highest ? highest : x;
    const V big = V{} + 12582912.f;                  // 1.5 * 2^23: adding it rounds to an integer
    V n = (x * 1.44269504088896341f + big) - big;
    V r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V p = V{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

inline v8 exp8(v8 x) { return exp_lanes<v8, v8i>(x); }

inline float sum8(v8 v) {   // a tree, not a chain of 7 dependent adds
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// The widest vectors of floats the build has: sixteen lanes with AVX-512, else eight. For
// loops that only need "a vector of rows", so they run at the machine's width.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float vn __attribute__((vector_size(4 * kLanes)));
typedef int32_t vni __attribute__((vector_size(4 * kLanes)));

inline vn loadn(const float* p) {
    vn v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

inline void storen(float* p, vn v) { std::memcpy(p, &v, sizeof(v)); }
// Not vn{} + x: adding zero is no identity under IEEE (-0 + 0 = +0), so the compiler keeps
// the add and broadcasts from a register on the shuffle port, which with 512-bit vectors is
// also a multiply-add port. Written out, the broadcast comes from memory on a load port
// (prefill attention's score and value tiles: 1.67x fewer uops on the multiply-add ports).
inline vn splatn(float x) {
#if defined(__AVX512F__)
    return vn{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
    return vn{x, x, x, x, x, x, x, x};
#endif
}
inline vn expn(vn x) { return exp_lanes<vn, vni>(x); }

}  // namespace vec8
