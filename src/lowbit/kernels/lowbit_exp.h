// exp for non-positive arguments, shared by the fp32 kernels (lowbit_attention.cpp's softmax, lowbit_elementwise.cpp's
// tanh GELU): a Cody-Waite reduction and a degree-6 polynomial, relative error ~2e-7, branch-free so loops vectorise.
// Included by the .cpp files next to it (native.py hashes it with them).
#pragma once

#include <stdint.h>
#include <string.h>

// exp(x) for x <= 0 after the max subtraction (also fine up to ~88); 0 below -87.3 (masked keys give exactly 0).
static inline float exp_neg(float x) {
    const float lo = -87.3f;
    const bool under = x < lo;
    float xc = under ? lo : x;
    xc = xc > 88.0f ? 88.0f : xc;
    const float t = xc * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (no -ffast-math, so kept as written)
    float r = xc - n * 0.693359375f;                  // Cody-Waite: ln 2 split in two parts
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (int32_t(n) + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return under ? 0.0f : p * two_n;
}
