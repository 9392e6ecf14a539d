// exp for non-positive arguments, shared by the fp32 kernels (lowbit_attention.cpp's softmax, lowbit_elementwise.cpp's
// tanh GELU): a Cody-Waite reduction and a degree-6 polynomial, relative error ~2e-7, branch-free; as a scalar
// function and on the build's float vectors (vf). Included by the .cpp files next to it (native.py hashes it with them).
#pragma once

#include <stdint.h>
#include <string.h>

// VL floats as one value (GCC vector extension) of the build's register width: 16 (one zmm) with AVX-512, 8 (one ymm)
// with AVX2, 4 (one xmm: SSE2, NEON) otherwise. Not 16 everywhere: GCC lowers a vector mode the target lacks (64 bytes
// on an AVX2 build) through the stack, and loops of scalar calls with selects did not vectorise there either -- the
// attention kernel ran 0.08-0.52x PyTorch's SDPA and GELU 7x slower than PyTorch's on AVX2 builds (session 17).
// `aligned(4)`: loads and stores at any float address.
#if defined(__AVX512F__)
static constexpr int VL = 16;
#elif defined(__AVX2__)
static constexpr int VL = 8;
#else
static constexpr int VL = 4;
#endif
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4), aligned(4)));

// 2^n for whole-number n (the exponent field written directly): a float, or each lane of a vector.
static inline float pow2_of(float n) {
    const int32_t bits = (int32_t(n) + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return two_n;
}
static inline vf pow2_of(vf n) { return (vf)((__builtin_convertvector(n, vi) + 127) << 23); }

// exp(x) for x <= 0 after the max subtraction (also fine up to ~88); 0 below -87.3 (masked keys give exactly 0). F: a
// float or the build's vector vf (lane-wise, selects instead of branches: the same steps, so the same polynomial).
template <class F>
static inline F exp_neg_t(F x) {
    const auto under = x < -87.3f;
    F xc = under ? -87.3f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    const F t = xc * 1.44269504088896341f;
    const F n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (no -ffast-math, so kept as written)
    F r = xc - n * 0.693359375f;                  // Cody-Waite: ln 2 split in two parts
    r = r - n * -2.12194440e-4f;
    F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const F e = p * pow2_of(n);
    return under ? 0.0f : e;
}
