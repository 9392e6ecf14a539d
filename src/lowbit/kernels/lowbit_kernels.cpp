// lowbit_kernels.cpp — CPU GEMM/GEMV kernels for low-bit quantized linear layers.
//
// Every kernel computes y (M, N) fp32 = x (M, K) · W(N, K)^T for one weight format, without bias.
// The weight buffers are produced by native.py (prepare_*), whose docstrings describe each layout
// byte by byte; the short version is repeated above each kernel below.
//
// Threading: OpenMP, output-stationary. Each thread owns a contiguous range of output rows n (weight
// rows), so every weight byte is streamed from memory exactly once per M-block; the activations of an
// M-block (at most MB rows) stay in L1/L2. Inside a thread the loop is
//     for each M-block of MB activation rows:  for each weight row n:  for each tile of <=4 rows m
// and a "tile" function computes MT (1..4) outputs y[m..m+MT-1][n] while unpacking the weight row once.
//
// ISA: the AVX2 path (#ifdef __AVX2__, needs AVX2+FMA) and a portable scalar path that works on the
// same layouts (ARM, old x86). Integer kernels are exact (int32 sums); see each kernel for the final
// float expression so a caller can reproduce results bit for bit.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <algorithm>
#include <type_traits>

#include "lowbit_exp.h"  // vf / vi: the build's float / int32 vectors
#include "lowbit_omp.h"  // lb_parallel, lb_team_size / lb_team_rank
#ifdef __AVX2__
#include <immintrin.h>
#endif

// AVX-512 with VNNI (Ice Lake, Sapphire Rapids, Zen 4 on): the many-row int8 kernels use vpdpbusd (u8 x s8, four
// products summed straight into int32: exact, no int16 step). Built with -march=native where the CPU has it; every
// AVX2 path stays compiled and serves the rest (LOWBIT_KERNELS=avx2 builds without AVX-512).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LB_VNNI 1
#endif

#define LB_API extern "C" __attribute__((visibility("default")))
typedef int64_t i64;
template <int V> using IC = std::integral_constant<int, V>;

static const i64 MB = 64;  // activation rows per M-block (64 x 4096 fp32 = 1 MiB worst case, usually far less)

// ------------------------------------------------------------------------------------------------
// Common helpers
// ------------------------------------------------------------------------------------------------

// 64-byte aligned scratch, rounded up to a whole number of cache lines (at least one), not initialised.
static void* scratch_uninit(size_t bytes) {
    size_t b = (bytes + 63) & ~size_t(63);
    return aligned_alloc(64, b ? b : 64);
}
// The same, zero-filled.
static void* scratch(size_t bytes) {
    void* p = scratch_uninit(bytes);
    if (p) memset(p, 0, (bytes + 63) & ~size_t(63));
    return p;
}

// Contiguous share of [0, n) for the calling OpenMP thread, in whole units of `align` rows.
static inline void my_rows(i64 n, i64 align, i64* lo, i64* hi) {
    const i64 nth = lb_team_size(), tid = lb_team_rank();
    const i64 units = (n + align - 1) / align, per = units / nth, rem = units % nth;
    const i64 u0 = tid * per + std::min(tid, rem), u1 = u0 + per + (tid < rem ? 1 : 0);
    *lo = std::min(n, u0 * align);
    *hi = std::min(n, u1 * align);
}

static inline int nthreads(int t) { return t > 0 ? t : omp_get_max_threads(); }

// Software prefetch of the weight stream, PF_BYTES ahead of the line being read. The AVX2 tiles issue it inside
// their k loops, one prefetch per 64 bytes of weights as they consume them (LB_PF); a burst of a whole row's
// prefetches at the row start (prefetch_rows, kept for the scalar path) was slower, presumably because it
// overflows the core's miss buffers.
// Measured on a Zen 1 core, M=1 4096x4096 W8A8 streamed from memory: 2.6 ms with the burst, 1.4 ms in the loop
// (~11 GB/s; the hardware prefetcher alone: ~7 GB/s). On AMD Zen the hint is non-temporal (locality 0): weights
// are read once per forward, and a chain benchmark of the W8A8 and W1A1 kernels ran a few percent faster with it
// than with locality 3, more at 2 threads. Elsewhere it is prefetcht0 (locality 3): on session 21's Intel Xeon the
// non-temporal hint left the row kernels at 5-7 GB/s of weights where fp32 streamed 16 (1 thread, chains of 256 MiB
// of 4096 x 4096 layers at one row, throw-away script): W4A8 g128 1.430 -> 0.689 ms a layer with locality 3 (0.685
// with 2), W2A8 g64 0.803 -> 0.479, W4A32 1.771 -> 1.260, ternary 0.488 -> 0.388, W1A1 0.336 -> 0.189.
#ifndef LB_PF_LOCALITY
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || defined(__znver4__) || defined(__znver5__)
#define LB_PF_LOCALITY 0
#else
#define LB_PF_LOCALITY 3
#endif
#endif
#ifndef LB_PF_BYTES
#define LB_PF_BYTES 4096
#endif
static const i64 PF_BYTES = LB_PF_BYTES;
#define LB_PF(ptr) __builtin_prefetch((const char*)(ptr) + PF_BYTES, 0, LB_PF_LOCALITY)
static inline void prefetch_rows(const void* base, i64 rb, i64 n, i64 r) {
#if defined(__GNUC__)
    const char* p = (const char*)base + n * rb + PF_BYTES;
    for (i64 o = 0; o < r * rb; o += 64) __builtin_prefetch(p + o, 0, LB_PF_LOCALITY);
#endif
}

// Generic driver: tile(IC<MT>, m, n) computes y[m .. m+MT-1][n]; weight row n starts at wbase + n*rb.
template <class F>
static void run_rows(i64 M, i64 N, int threads, const void* wbase, i64 rb, F tile) {
    lb_parallel(nthreads(threads), true, [&] {
        i64 n0, n1;
        my_rows(N, 1, &n0, &n1);
        for (i64 mb = 0; mb < M; mb += MB) {
            const i64 me = std::min(M, mb + MB);
            for (i64 n = n0; n < n1; ++n) {
#ifndef __AVX2__
                prefetch_rows(wbase, rb, n, 1);
#endif
                i64 m = mb;
                for (; m + 4 <= me; m += 4) tile(IC<4>(), m, n);
                switch (me - m) {
                    case 3: tile(IC<3>(), m, n); break;
                    case 2: tile(IC<2>(), m, n); break;
                    case 1: tile(IC<1>(), m, n); break;
                    default: break;
                }
            }
        }
    });
}

// Copy rows of length K into rows of length Kp (zero tail). Returns src itself when K == Kp.
template <class T>
static const T* pad_rows(const T* src, i64 M, i64 K, i64 Kp, T** owned) {
    *owned = nullptr;
    if (K == Kp) return src;
    T* d = (T*)scratch(sizeof(T) * M * Kp);
    for (i64 m = 0; m < M; ++m) memcpy(d + m * Kp, src + m * K, sizeof(T) * K);
    *owned = d;
    return d;
}

#ifdef __AVX512F__
// A 16-bit write mask read straight from memory (kmovw k, m16: a load, no ALU port; GCC otherwise loads a GPR and
// moves it, a port-5 uop per mask, which held the masked-add kernels to half their speed).
static inline __mmask16 mask_at(const void* p) {
    __mmask16 k;
    __asm__("kmovw %1, %0" : "=k"(k) : "m"(*(const uint16_t*)p));
    return k;
}
#endif

#ifdef __AVX2__
static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
// y[m * N] = sx[m] * (sum of acc[m]'s lanes) for the MT rows of a tile; four rows share one hadd tree.
template <int MT>
static inline void store_sums(const __m256* acc, const float* sx, float* y, i64 N) {
    if (MT == 4) {
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        const __m128 r = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_loadu_ps(sx));
        alignas(16) float t[4];
        _mm_store_ps(t, r);
        for (int m = 0; m < 4; ++m) y[m * N] = t[m];
    } else {
        for (int m = 0; m < MT; ++m) y[m * N] = sx[m] * hsum_ps(acc[m]);
    }
}
// Lane j of the result = sum of the 8 lanes of v[j] (8 horizontal sums at once).
static inline __m256 reduce8_ps(const __m256* v) {
    __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
    __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}
// Group sums for a block of 8 groups. p[j] holds int16 pair sums of group j (GU maddubs results added,
// every lane <= GU * 2*15*128 = GU * 3840). Returns lane j = sum of group j (int32). The first levels of
// the reduction stay in int16 (vphaddw, no saturation; bounds in comments) so only 0..4 vpmaddwd are
// needed per block instead of 8 — vector integer multiplies are the scarce resource on Zen 1.
template <int GU>
static inline __m256i reduce8_groups(const __m256i* p) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i q0 = _mm256_hadd_epi16(p[0], p[1]), q1 = _mm256_hadd_epi16(p[2], p[3]);
    const __m256i q2 = _mm256_hadd_epi16(p[4], p[5]), q3 = _mm256_hadd_epi16(p[6], p[7]);  // <= 2*GU*3840
    if (GU == 4) {  // q: per 128-bit half [4 x g_a, 4 x g_b]; widen, then two int32 levels
        const __m256i b0 = _mm256_hadd_epi32(_mm256_madd_epi16(q0, ones), _mm256_madd_epi16(q1, ones));
        const __m256i b1 = _mm256_hadd_epi32(_mm256_madd_epi16(q2, ones), _mm256_madd_epi16(q3, ones));
        return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
    }
    const __m256i r0 = _mm256_hadd_epi16(q0, q1), r1 = _mm256_hadd_epi16(q2, q3);  // <= 4*GU*3840
    if (GU == 2) {  // r0: per half [g0,g0,g1,g1,g2,g2,g3,g3] -> madd -> [g0..g3]
        const __m256i m0 = _mm256_madd_epi16(r0, ones), m1 = _mm256_madd_epi16(r1, ones);
        return _mm256_add_epi32(_mm256_permute2x128_si256(m0, m1, 0x20), _mm256_permute2x128_si256(m0, m1, 0x31));
    }
    const __m256i t = _mm256_hadd_epi16(r0, r1);  // GU == 1: <= 8*3840 = 30720; per half [g0..g7]
    return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(t)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(t, 1)));
}
// 8 signed bytes -> 8 floats.
static inline __m256 i8x8_ps(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline __m256i ld(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
// An accumulator pinned to a register at this point of the program: without it GCC reassociates a chain
// acc += maddubs(...) into "compute every product, spill it, add them up later" (one stack store and load
// per vpmaddubsw: half the speed of the kernel).
static inline __m256i keep(__m256i v) {
    __asm__("" : "+x"(v));
    return v;
}
static inline __m256 keep(__m256 v) {
    __asm__("" : "+x"(v));
    return v;
}
#ifdef __AVX512F__
static inline __m512 keep(__m512 v) {
    __asm__("" : "+v"(v));
    return v;
}
#endif
// int32 sums of four int8 products x * w (madd of the int16 pairs with ones) by the sign trick: maddubs(|w| as u8,
// sign(x, w)), given |w| = wa. Exact for x in [-127, 127] (|pair| <= 2*127*128 < 2^15). An activation code of -128
// (static zero-point activations: codes q - 128) breaks it where w < 0 (sign(-128, w) wraps to -128), so X128
// forms take x clamped to -127 and subtract the weights at those codes, each pair widened before the subtraction:
// madd(maddubs(|w|, sign(max(x, -127), w))) - madd(maddubs([x == -128], w)), exact for every int8 x and w.
template <bool X128>
static inline __m256i sdot_quads(__m256i wa, __m256i w, __m256i x, __m256i ones16) {
    if constexpr (!X128) {
        return _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w)), ones16);
    } else {
        const __m256i at = _mm256_and_si256(_mm256_cmpeq_epi8(x, _mm256_set1_epi8(-128)), _mm256_set1_epi8(1));
        const __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(_mm256_max_epi8(x, _mm256_set1_epi8(-127)), w));
        return _mm256_sub_epi32(_mm256_madd_epi16(p, ones16), _mm256_madd_epi16(_mm256_maddubs_epi16(at, w), ones16));
    }
}
// Whether rows [0, rows) of x (row stride ld, K codes each) hold the code -128 (which only static zero-point
// activations produce): then the sign-trick kernels take their X128 form.
static inline bool rows_min_code(const int8_t* x, i64 rows, i64 K, i64 stride) {
    const __m256i lo = _mm256_set1_epi8(-128);
    __m256i any = _mm256_setzero_si256();
    for (i64 m = 0; m < rows; ++m) {
        const int8_t* r = x + m * stride;
        i64 k = 0;
        for (; k + 32 <= K; k += 32) any = _mm256_or_si256(any, _mm256_cmpeq_epi8(ld(r + k), lo));
        for (; k < K; ++k)
            if (r[k] == -128) return true;
    }
    return _mm256_movemask_epi8(any) != 0;
}
#endif

LB_API int lb_isa(void) {
#if defined(LB_VNNI)
    return 3;
#elif defined(__AVX2__)
    return 2;
#else
    return 0;
#endif
}
LB_API int lb_abi_version(void) { return 9; }

// Whether the many-row int8 panel kernels run on AMX tiles (built with AMX, allowed by the OS, not turned off);
// on >= 0 turns them on (1) or off (0) first. Always 0 in a build without AMX.
static int amx_switch(int on);
LB_API int lb_amx(int on) { return amx_switch(on); }

// ================================================================================================
// W8A32 — int8 per-channel weights, fp32 activations.
//   Layout: w int8 (N, Kp), Kp = K rounded up to 32, zero padded; s fp32 (N,).
//   y[m,n] = s[n] * sum_k x[m,k] * w[n,k]   (fp32 FMA accumulation, order unspecified)
// ================================================================================================
template <int MT>
static inline void w8a32_tile(const float* x, i64 Kp, const int8_t* w, float s, float* y, i64 N) {
#ifdef __AVX2__
    constexpr int A = MT <= 2 ? 4 : 2;  // independent accumulators per row (hide FMA latency)
    __m256 acc[MT][A];
    for (int m = 0; m < MT; ++m)
        for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    for (i64 k = 0; k < Kp; k += 32) {
        if ((k & 63) == 0) LB_PF(w + k);
        const __m256 w0 = i8x8_ps(w + k), w1 = i8x8_ps(w + k + 8), w2 = i8x8_ps(w + k + 16), w3 = i8x8_ps(w + k + 24);
        for (int m = 0; m < MT; ++m) {
            const float* xm = x + m * Kp + k;
            acc[m][0 % A] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0 % A]);
            acc[m][1 % A] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1 % A]);
            acc[m][2 % A] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), acc[m][2 % A]);
            acc[m][3 % A] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), acc[m][3 % A]);
        }
    }
    for (int m = 0; m < MT; ++m) {
        __m256 t = acc[m][0];
        for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][a]);
        y[m * N] = s * hsum_ps(t);
    }
#else
    for (int m = 0; m < MT; ++m) {
        float t = 0.f;
        for (i64 k = 0; k < Kp; ++k) t += x[m * Kp + k] * (float)w[k];
        y[m * N] = s * t;
    }
#endif
}

LB_API void lb_w8a32(const float* x, i64 M, i64 K, const int8_t* w, const float* s, i64 N, i64 Kp, float* y,
                     int threads) {
    float* own;
    const float* xp = pad_rows(x, M, K, Kp, &own);
    run_rows(M, N, threads, w, Kp, [=](auto mt, i64 m, i64 n) {
        w8a32_tile<decltype(mt)::value>(xp + m * Kp, Kp, w + n * Kp, s[n], y + m * N + n, N);
    });
    free(own);
}

// ================================================================================================
// W8A8 — int8 per-channel weights, int8 per-row activations (xq in [-127, 127]; static zero-point ones also -128).
//   Layout: as W8A32.  acc = sum_k xq[m,k]*w[n,k]  (exact int32)
//   y[m,n] = (sx[m] * s[n]) * (float)acc
//   AVX2: maddubs(|w| as u8, sign(xq, w)) then madd with ones (|pair| <= 2*128*127 = 32512, no saturation); calls
//   whose codes hold -128 take sdot_quads' X128 form.
// ================================================================================================
template <int MT, bool X128 = false>
static inline void w8a8_tile(const int8_t* x, i64 Kp, const int8_t* w, const float* sx, float s, float* y, i64 N) {
    int32_t acc[MT];
#ifdef __AVX2__
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[MT];
    for (int m = 0; m < MT; ++m) a[m] = _mm256_setzero_si256();
    for (i64 k = 0; k < Kp; k += 32) {
        if ((k & 63) == 0) LB_PF(w + k);
        const __m256i wv = ld(w + k), wa = _mm256_abs_epi8(wv);
        for (int m = 0; m < MT; ++m)
            a[m] = _mm256_add_epi32(a[m], sdot_quads<X128>(wa, wv, ld(x + m * Kp + k), ones));
    }
    for (int m = 0; m < MT; ++m) acc[m] = hsum_epi32(a[m]);
#else
    for (int m = 0; m < MT; ++m) {
        int32_t t = 0;
        for (i64 k = 0; k < Kp; ++k) t += (int32_t)x[m * Kp + k] * (int32_t)w[k];
        acc[m] = t;
    }
#endif
    for (int m = 0; m < MT; ++m) y[m * N] = (sx[m] * s) * (float)acc[m];
}

#ifdef __AVX2__
// One activation row against 8 weight rows, for short rows: the 8 horizontal sums share one reduction tree and the
// 8 outputs are one vector store (with K <= 96 the per-output horizontal sum of w8a8_tile costs more than the
// products). Same int32 sums and the same final expression as w8a8_tile, so the same bits.
template <bool X128>
static inline void w8a8_row8(const int8_t* x, i64 Kp, const int8_t* w, float sx, const float* s, float* y) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_si256();
    for (i64 k = 0; k < Kp; k += 32) {
        const __m256i xv = ld(x + k);
        for (int j = 0; j < 8; ++j) {
            const __m256i wv = ld(w + j * Kp + k);
            a[j] = _mm256_add_epi32(a[j], sdot_quads<X128>(_mm256_abs_epi8(wv), wv, xv, ones));
        }
    }
    const __m256i b0 = _mm256_hadd_epi32(a[0], a[1]), b1 = _mm256_hadd_epi32(a[2], a[3]);
    const __m256i b2 = _mm256_hadd_epi32(a[4], a[5]), b3 = _mm256_hadd_epi32(a[6], a[7]);
    const __m256i c0 = _mm256_hadd_epi32(b0, b1), c1 = _mm256_hadd_epi32(b2, b3);
    const __m256i r = _mm256_add_epi32(_mm256_permute2x128_si256(c0, c1, 0x20), _mm256_permute2x128_si256(c0, c1, 0x31));
    const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(sx), _mm256_loadu_ps(s));
    _mm256_storeu_ps(y, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(r)));
}
#endif

LB_API void lb_w8a8(const int8_t* xq, const float* sx, i64 M, i64 K, const int8_t* w, const float* s, i64 N, i64 Kp,
                    float* y, int threads) {
    int8_t* own;
    const int8_t* xp = pad_rows(xq, M, K, Kp, &own);
#ifdef __AVX2__
    const bool x128 = rows_min_code(xq, M, K, K);
    if (Kp <= 96 && N >= 8) {  // short rows: 8 weight rows per activation row (w8a8_row8), the rest one by one
        lb_parallel(nthreads(threads), true, [&] {
            i64 n0, n1;
            my_rows(N, 8, &n0, &n1);
            for (i64 m = 0; m < M; ++m) {
                i64 n = n0;
                const int8_t* xm = xp + m * Kp;
                for (; n + 8 <= n1; n += 8)
                    if (x128) w8a8_row8<true>(xm, Kp, w + n * Kp, sx[m], s + n, y + m * N + n);
                    else w8a8_row8<false>(xm, Kp, w + n * Kp, sx[m], s + n, y + m * N + n);
                for (; n < n1; ++n)
                    if (x128) w8a8_tile<1, true>(xm, Kp, w + n * Kp, sx + m, s[n], y + m * N + n, N);
                    else w8a8_tile<1>(xm, Kp, w + n * Kp, sx + m, s[n], y + m * N + n, N);
            }
        });
        free(own);
        return;
    }
    if (x128) {
        run_rows(M, N, threads, w, Kp, [=](auto mt, i64 m, i64 n) {
            w8a8_tile<decltype(mt)::value, true>(xp + m * Kp, Kp, w + n * Kp, sx + m, s[n], y + m * N + n, N);
        });
        free(own);
        return;
    }
#endif
    run_rows(M, N, threads, w, Kp, [=](auto mt, i64 m, i64 n) {
        w8a8_tile<decltype(mt)::value>(xp + m * Kp, Kp, w + n * Kp, sx + m, s[n], y + m * N + n, N);
    });
    free(own);
}

// ================================================================================================
// W8A8 on many rows: the same int8 weights in panels of 16 output columns, 4 consecutive k per column:
//   panel p (columns 16p .. 16p+15, zero past N), k-quad q: byte p*16*Kp + 64q + 4j + t = w[16p + j][4q + t]
//   sp: the scales padded to whole panels (zero past N).
// A tile is 4 rows x 16 columns: one broadcast of x[m][4q .. 4q+3] meets 8 columns per vector and each column's
// int32 sum stays in its lane (no horizontal sums, weights read once per 4 rows). A row block whose codes are all
// >= 0 (inputs after a ReLU) skips the sign trick: maddubs(x as u8 <= 127, w) pairs are <= 2*127*127 < 2^15.
// The int32 sums and the final expression (sx[m] * s[n]) * (float)acc are w8a8_tile's, so the outputs are the
// same bits. Used from PANEL_ROWS rows on: below that the weights are streamed once per call anyway and the
// row layout's tiles (prefetch tuned for memory-bound calls) serve.
// ================================================================================================
// Ternary layers keep their 2-bit kernel (a quarter of the bytes, int16 sums) below TERNARY_PANEL_ROWS rows. With
// VNNI (one vpdpbusd per 64 products) the panels lead from 16 rows on, at any K (benchmarks/panels.py).
// W8A8 with VNNI: panels at every row count (ahead of the row kernel from 1 row on in benchmarks/panels.py), so
// such layers keep no row layout (L->w is NULL). Binary weights keep their 1-bit kernel below 4 rows (an eighth
// of the bytes to stream).
#ifdef LB_VNNI
static constexpr i64 PANEL_ROWS = 1, TERNARY_PANEL_ROWS = 16;
#else
static constexpr i64 PANEL_ROWS = 4, TERNARY_PANEL_ROWS = 32;
#endif
static constexpr i64 BIN_PANEL_ROWS = 4;

#ifdef __AVX2__
// Output y[m * ldm + n * ldn]: row-major (ldm = N, ldn = 1) or, for a convolution's map, transposed (ldm = 1).
// FORM: 0 signed codes, 1 codes >= 0 (no sign trick), 2 signed codes holding -128 (sdot_quads' X128 form).
template <int MR, int FORM>
static inline void w8a8_panel_tile(const int8_t* x, i64 Kp, const int8_t* wp, const float* sx, const float* sp,
                                   float* y, i64 ldm, i64 ldn, i64 ncols) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (i64 k = 0; k < Kp; k += 4) {
        const __m256i w0 = ld(wp + 16 * k), w1 = ld(wp + 16 * k + 32);
        if (FORM == 1) {
            for (int m = 0; m < MR; ++m) {
                int32_t xv;
                memcpy(&xv, x + m * Kp + k, 4);
                const __m256i xb = _mm256_set1_epi32(xv);
                acc[m][0] = keep(_mm256_add_epi32(acc[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones)));
                acc[m][1] = keep(_mm256_add_epi32(acc[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones)));
            }
        } else {
            const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
            for (int m = 0; m < MR; ++m) {
                int32_t xv;
                memcpy(&xv, x + m * Kp + k, 4);
                const __m256i xb = _mm256_set1_epi32(xv);
                acc[m][0] = keep(_mm256_add_epi32(acc[m][0], sdot_quads<FORM == 2>(a0, w0, xb, ones)));
                acc[m][1] = keep(_mm256_add_epi32(acc[m][1], sdot_quads<FORM == 2>(a1, w1, xb, ones)));
            }
        }
    }
    const __m256 s0 = _mm256_loadu_ps(sp), s1 = _mm256_loadu_ps(sp + 8);
    alignas(32) float t[MR][16];
    for (int m = 0; m < MR; ++m) {
        const __m256 r = _mm256_set1_ps(sx[m]);
        const __m256 y0 = _mm256_mul_ps(_mm256_mul_ps(r, s0), _mm256_cvtepi32_ps(acc[m][0]));
        const __m256 y1 = _mm256_mul_ps(_mm256_mul_ps(r, s1), _mm256_cvtepi32_ps(acc[m][1]));
        if (ldn == 1 && ncols == 16) {
            _mm256_storeu_ps(y + m * ldm, y0);
            _mm256_storeu_ps(y + m * ldm + 8, y1);
        } else {
            _mm256_store_ps(t[m], y0);
            _mm256_store_ps(t[m] + 8, y1);
        }
    }
    if (ldn == 1) {
        if (ncols != 16)
            for (int m = 0; m < MR; ++m) memcpy(y + m * ldm, t[m], sizeof(float) * ncols);
    } else if (MR == 4 && ldm == 1) {  // 4 rows x 4 columns at a time: one 4-float store per column
        for (int h = 0; 4 * h < ncols; ++h) {
            __m128 c[4];
            for (int m = 0; m < 4; ++m) c[m] = _mm_load_ps(t[m % MR] + 4 * h);
            _MM_TRANSPOSE4_PS(c[0], c[1], c[2], c[3]);
            for (int j = 0; j < 4 && 4 * h + j < ncols; ++j) _mm_storeu_ps(y + (4 * h + j) * ldn, c[j]);
        }
    } else {
        for (int m = 0; m < MR; ++m)
            for (i64 j = 0; j < ncols; ++j) y[m * ldm + j * ldn] = t[m][j];
    }
}

// Whether rows [0, rows) of x (row stride Kp) hold no negative code.
static inline bool rows_nonneg(const int8_t* x, i64 rows, i64 Kp) {
    __m256i any = _mm256_setzero_si256();
    for (i64 m = 0; m < rows; ++m)
        for (i64 k = 0; k < Kp; k += 32) any = _mm256_or_si256(any, ld(x + m * Kp + k));
    return _mm256_movemask_epi8(any) == 0;
}
#endif

// f(IC<r>()) for the run-time row count r in 1 .. BM.
template <int BM, class F>
static inline void with_rows(i64 r, F&& f) {
    if constexpr (BM > 1) {
        if (r >= BM) return f(IC<BM>());
        return with_rows<BM - 1>(r, f);
    } else {
        f(IC<1>());
    }
}

// The shared loop of the many-row kernels: row blocks of BM (split between threads when there are enough, else the
// panels), panels in chunks that stay in L2 while every row block of the thread passes over them;
// tile(IC<MR>, m, p, form) computes rows m .. m+MR-1 against panel p (form 1: those rows hold no negative code, 2:
// they hold the code -128, else 0; checked only when NONNEG_CHECK: the AVX2 tiles use it, the VNNI tiles do not).
// The calling thread's share of a many-row kernel inside its parallel region: row blocks [0, blocks) split between
// the threads when there are at least two per thread, else the column units [0, units) (panels, or AMX's panel
// pairs); the units in chunks of `chunk` that stay in L2 while every row block of the thread passes over them:
// body(b, c0, c1) per row block b and chunk [c0, c1).
// by_units: split the units whenever there are as many as threads and fewer than 8 row blocks a thread (each thread
// then decodes only its own units' weights, amx_run's on_chunk; 197 x 384 x 1536 on 2 threads 15-20 % faster).
template <class F>
static inline void walk_blocks(i64 blocks, i64 units, i64 chunk, F&& body, bool by_units = false) {
    const i64 nth = lb_team_size();
    i64 b0 = 0, b1 = blocks, q0 = 0, q1 = units;
    if (blocks >= 2 * nth && !(by_units && units >= nth && blocks < 8 * nth)) my_rows(blocks, 1, &b0, &b1);
    else my_rows(units, 1, &q0, &q1);
    for (i64 c0 = q0; c0 < q1; c0 += chunk) {
        const i64 c1 = std::min(q1, c0 + chunk);
        for (i64 b = b0; b < b1; ++b) body(b, c0, c1);
    }
}

template <int BM, bool NONNEG_CHECK, class X, class F>
static void panel_blocks(const X* xp, i64 M, i64 N, i64 Kp, int threads, F tile) {
    const i64 P = (N + 15) / 16, blocks = (M + BM - 1) / BM;
    const i64 chunk = std::max<i64>(1, (192 * 1024) / (16 * Kp));
    lb_parallel(nthreads(threads), threads != 1 && M * N * Kp >= (1 << 18), [&] {
        walk_blocks(blocks, P, chunk, [&](i64 b, i64 c0, i64 c1) {
            const i64 m = BM * b, mr = std::min<i64>(BM, M - m);
            int form = 0;
#ifdef __AVX2__
            if constexpr (NONNEG_CHECK) {
                const int8_t* xm = (const int8_t*)xp + m * Kp;
                form = rows_nonneg(xm, mr, Kp) ? 1 : rows_min_code(xm, mr, Kp, Kp) ? 2 : 0;
            }
#endif
            with_rows<BM>(mr, [&](auto mt) {
                for (i64 p = c0; p < c1; ++p) tile(mt, m, p, form);
            });
        });
    });
}

#ifdef LB_VNNI
// Rows of int8 codes as unsigned bytes x + 128 (x ^ 0x80), K padded to Kp with code 0 (byte 128): vpdpbusd's
// unsigned operand. sum_k (x + 128) w = sum_k x w + 128 sum_k w, and the last term is subtracted per column (ws).
static uint8_t* offset_rows(const int8_t* xq, i64 M, i64 K, i64 Kp) {
    uint8_t* d = (uint8_t*)scratch_uninit(M * Kp);
    if (!d) return nullptr;
    for (i64 m = 0; m < M; ++m) {
        const uint8_t* src = (const uint8_t*)xq + m * K;
        uint8_t* dst = d + m * Kp;
        for (i64 k = 0; k < K; ++k) dst[k] = src[k] ^ 0x80;
        memset(dst + K, 0x80, Kp - K);
    }
    return d;
}

// Rows of VNNI tiles: 8 rows x 16 columns in eight zmm accumulators (one 64-byte panel step feeds all eight).
static constexpr int VNNI_ROWS = 8;
// The offset form needs sum (x + 128) w < 2^31: 255 * 127 * Kp, so Kp up to 2^16 (longer rows take the AVX2 tiles).
static constexpr i64 VNNI_MAX_K = 1 << 16;

// The VNNI form of a many-row kernel: the rows as x + 128, then tile(IC<MR>, xu, m, p) per 8-row block and panel.
// False (nothing done) where it does not apply: no column sums, rows past VNNI_MAX_K, or no memory for the copy.
template <class F>
static bool vnni_panels(const int8_t* xq, const int32_t* ws, i64 M, i64 K, i64 N, i64 Kp, int threads, F tile) {
    if (!ws || Kp > VNNI_MAX_K) return false;
    uint8_t* xu = offset_rows(xq, M, K, Kp);
    if (!xu) return false;
    panel_blocks<VNNI_ROWS, false>(xu, M, N, Kp, threads, [=](auto mt, i64 m, i64 p, int) { tile(mt, xu, m, p); });
    free(xu);
    return true;
}

// y[m * ldm + n * ldn] for rows m < MR, columns n < ncols of one panel: (sx[m] * sp[n]) * (float)(acc - 128 ws[n]),
// the expression of the AVX2 tiles and row kernels (same bits).
template <int MR>
static inline void w8a8_vnni_tile(const uint8_t* xu, i64 Kp, const int8_t* wp, const int32_t* ws, const float* sx,
                                  const float* sp, float* y, i64 ldm, i64 ldn, i64 ncols) {
    __m512i acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_si512();
    for (i64 k = 0; k < Kp; k += 4) {
        // The panel 4 KiB ahead, into L1 and L2: for streamed layers at a few rows, whose first row block reads the
        // weights from memory (benchmarks/kernels.py, 16 x 4096 x 4096).
        _mm_prefetch((const char*)(wp + 16 * k) + 4096, _MM_HINT_T0);
        const __m512i w = _mm512_loadu_si512(wp + 16 * k);
        for (int m = 0; m < MR; ++m) {
            int32_t xv;
            memcpy(&xv, xu + m * Kp + k, 4);
            acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(xv), w);
        }
    }
    const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(ws), 7);
    const __m512 s = _mm512_loadu_ps(sp);
    const __mmask16 cols = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
    alignas(64) float t[MR][16];
    for (int m = 0; m < MR; ++m) {
        const __m512 r = _mm512_set1_ps(sx[m]);
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(r, s), _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], corr)));
        if (ldn == 1) _mm512_mask_storeu_ps(y + m * ldm, cols, v);
        else _mm512_store_ps(t[m], v);
    }
    if (ldn == 1) return;
    if (ldm == 1 && MR % 4 == 0) {  // a convolution's map: 4 rows x 4 columns at a time, one 4-float store per column
        for (int r0 = 0; r0 < MR; r0 += 4)
            for (int h = 0; 4 * h < ncols; ++h) {
                __m128 c[4];
                for (int m = 0; m < 4; ++m) c[m] = _mm_load_ps(t[r0 + m] + 4 * h);
                _MM_TRANSPOSE4_PS(c[0], c[1], c[2], c[3]);
                for (int j = 0; j < 4 && 4 * h + j < ncols; ++j) _mm_storeu_ps(y + r0 + (4 * h + j) * ldn, c[j]);
            }
    } else {
        for (int m = 0; m < MR; ++m)
            for (i64 j = 0; j < ncols; ++j) y[m * ldm + j * ldn] = t[m][j];
    }
}
#endif

#include "lowbit_amx.h"  // amx_panels, amx_block: the panels on AMX tiles (LB_AMX)

// Whether this build has the AMX-BF16 kernel (FP8 layers with low-bit float activations on many rows).
LB_API int lb_amx_bf16(void) {
#ifdef LB_AMX_BF16
    return 1;
#else
    return 0;
#endif
}

#ifdef LB_AMX
// From this many rows on the panel kernels run on AMX tiles where the CPU and the OS allow them.
static constexpr i64 AMX_ROWS = 16;
// W1A1 layers from this many rows on (their XNOR-popcount kernel leads below: 16 x 384 x 1536 in 0.047 ms against
// 0.055 on the tiles, 45 rows 0.098 against 0.072; session 21, throw-away script, 1 thread).
static constexpr i64 AMX_SIGN_ROWS = 32;

// A product rounded where it stands: no multiply-add contracted with the bias added after it (the separate roundings
// of the kernels that add the bias in a later pass).
static inline __m512 rounded(__m512 v) {
    __asm__("" : "+v"(v));
    return v;
}

// 16 sums of a block as floats: exact int32 sums converted, fp32 ones (AMX-BF16) as they are; at p, or gathered
// with 4-byte offsets idx from p.
static inline __m512 amx_sums(const int32_t* p) { return _mm512_cvtepi32_ps(_mm512_load_si512(p)); }
static inline __m512 amx_sums(const float* p) { return _mm512_load_ps(p); }
static inline __m512 amx_sums(const int32_t* p, __m512i idx) {
    return _mm512_cvtepi32_ps(_mm512_i32gather_epi32(idx, p, 4));
}
static inline __m512 amx_sums(const float* p, __m512i idx) { return _mm512_i32gather_ps(idx, p, 4); }

// y[m * ldm + n * ldn] = (sx[m] * sp[n]) * (float)c[m][n] (+ bias[n], a second rounding, where bias is not NULL) for
// rows m < mr and columns n < ncols of an AMX block's sums (row stride 32): the expression of the VNNI and AVX2 tiles
// followed by lb_linear's bias pass, so the same bits, without a second pass over the output.
template <class T>
static inline void amx_store(const T* c, i64 mr, i64 ncols, const float* sx, const float* sp, float* y, i64 ldm,
                             i64 ldn, const float* bias) {
    if (ldn == 1) {
        for (i64 h = 0; 16 * h < ncols; ++h) {
            const i64 nc = std::min<i64>(16, ncols - 16 * h);
            const __mmask16 cols = nc >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nc) - 1);
            const __m512 s = _mm512_loadu_ps(sp + 16 * h);
            const __m512 b = bias ? _mm512_maskz_loadu_ps(cols, bias + 16 * h) : _mm512_setzero_ps();
            for (i64 m = 0; m < mr; ++m) {
                __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(sx[m]), s), amx_sums(c + 32 * m + 16 * h));
                if (bias) v = _mm512_add_ps(rounded(v), b);
                _mm512_mask_storeu_ps(y + m * ldm + 16 * h, cols, v);
            }
        }
        return;
    }
    if (ldm != 1) {  // (no caller: any other layout, element by element)
        for (i64 m = 0; m < mr; ++m)
            for (i64 n = 0; n < ncols; ++n) {
                volatile float v = (sx[m] * sp[n]) * (float)c[32 * m + n];
                y[m * ldm + n * ldn] = bias ? v + bias[n] : v;
            }
        return;
    }
    // a transposed output (a convolution's map, ldm == 1): column n is mr consecutive floats
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(32));
    for (i64 h = 0; 16 * h < mr; ++h) {
        const i64 nr = std::min<i64>(16, mr - 16 * h);
        const __mmask16 live = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
        const __m512 r = _mm512_maskz_loadu_ps(live, sx + 16 * h);
        for (i64 n = 0; n < ncols; ++n) {
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(r, _mm512_set1_ps(sp[n])), amx_sums(c + 16 * h * 32 + n, rows));
            if (bias) v = _mm512_add_ps(rounded(v), _mm512_set1_ps(bias[n]));
            _mm512_mask_storeu_ps(y + 16 * h * ldm + n * ldn, live, v);
        }
    }
}

// The tile function of amx_run for per-column scales: the block's exact sums, then amx_store (bias: NULL or N).
static inline auto amx_w8_tile(const int8_t* wp, const float* sp, const float* sx, i64 N, i64 Kp, float* y, i64 ldm,
                               i64 ldn, const float* bias) {
    return [=](auto mt, auto np, const int8_t* am, i64 Kq, i64 m, i64 mr, i64 p) {
        constexpr int MT = decltype(mt)::value, NP = decltype(np)::value;
        alignas(64) int32_t c[32 * 32];
        amx_block<MT, NP>(am, Kq, wp + p * 16 * Kp, Kp, 0, Kp, c);
        amx_store(c, mr, std::min<i64>(16 * NP, N - 16 * p), sx + m, sp + 16 * p, y + m * ldm + 16 * p * ldn, ldm,
                  ldn, bias ? bias + 16 * p : nullptr);
    };
}
#endif

// y[m * N + n] += bias[n]: lb_linear's bias pass (threads split the rows).
static void add_bias(float* y, const float* bias, i64 M, i64 N, int threads) {
    lb_parallel(nthreads(threads), M * N >= 262144, [&] {
        i64 lo_, hi_;
        my_rows(M, 1, &lo_, &hi_);
        for (i64 m = lo_; m < hi_; ++m)
            for (i64 n = 0; n < N; ++n) y[m * N + n] += bias[n];
    });
}

static void w8a8_panel_tiles(const int8_t* xq, const float* sx, i64 M, i64 K, const int8_t* wp, const float* sp,
                             const int32_t* ws, i64 N, i64 Kp, float* y, i64 ldm, i64 ldn, int threads);

// The panel kernel with output y[m * ldm + n * ldn] (lb_w8a8_panel: row-major; lb_conv: the (O, OH*OW) map), then
// + bias[n] where bias is not NULL (row-major only): on the AMX tiles in their store, else in a pass after.
// ws: the panels' column sums (padded to 16 columns; `panel_sums`), used by the VNNI tiles.
static void w8a8_panel_run(const int8_t* xq, const float* sx, i64 M, i64 K, const int8_t* wp, const float* sp,
                           const int32_t* ws, i64 N, i64 Kp, float* y, i64 ldm, i64 ldn, int threads,
                           const float* bias = nullptr) {
#ifdef LB_AMX
    if (M >= AMX_ROWS && amx_panels(xq, M, K, N, Kp, threads, amx_w8_tile(wp, sp, sx, N, Kp, y, ldm, ldn, bias)))
        return;
#endif
    w8a8_panel_tiles(xq, sx, M, K, wp, sp, ws, N, Kp, y, ldm, ldn, threads);
    if (bias) add_bias(y, bias, M, N, threads);
}

// The VNNI or AVX2 (or scalar) tiles of w8a8_panel_run.
static void w8a8_panel_tiles(const int8_t* xq, const float* sx, i64 M, i64 K, const int8_t* wp, const float* sp,
                             const int32_t* ws, i64 N, i64 Kp, float* y, i64 ldm, i64 ldn, int threads) {
#ifdef LB_VNNI
    const bool done = vnni_panels(xq, ws, M, K, N, Kp, threads, [=](auto mt, const uint8_t* xu, i64 m, i64 p) {
        const i64 nc = std::min<i64>(16, N - 16 * p);
        w8a8_vnni_tile<decltype(mt)::value>(xu + m * Kp, Kp, wp + p * 16 * Kp, ws + 16 * p, sx + m, sp + 16 * p,
                                            y + m * ldm + 16 * p * ldn, ldm, ldn, nc);
    });
    if (done) return;
#endif
    int8_t* own;
    const int8_t* xp = pad_rows(xq, M, K, Kp, &own);
#ifdef __AVX2__
    panel_blocks<4, true>(xp, M, N, Kp, threads, [=](auto mt, i64 m, i64 p, int form) {
        constexpr int MR = decltype(mt)::value;
        const i64 nc = std::min<i64>(16, N - 16 * p);
        const int8_t *xm = xp + m * Kp, *wq = wp + p * 16 * Kp;
        float* yp = y + m * ldm + 16 * p * ldn;
        if (form == 1) w8a8_panel_tile<MR, 1>(xm, Kp, wq, sx + m, sp + 16 * p, yp, ldm, ldn, nc);
        else if (form == 2) w8a8_panel_tile<MR, 2>(xm, Kp, wq, sx + m, sp + 16 * p, yp, ldm, ldn, nc);
        else w8a8_panel_tile<MR, 0>(xm, Kp, wq, sx + m, sp + 16 * p, yp, ldm, ldn, nc);
    });
#else
    for (i64 m = 0; m < M; ++m)
        for (i64 n = 0; n < N; ++n) {
            const int8_t* wc = wp + (n / 16) * 16 * Kp + 4 * (n % 16);
            int32_t t = 0;
            for (i64 k = 0; k < Kp; ++k) t += (int32_t)xp[m * Kp + k] * (int32_t)wc[16 * (k & ~3) + (k & 3)];
            y[m * ldm + n * ldn] = (sx[m] * sp[n]) * (float)t;
        }
#endif
    free(own);
}

LB_API void lb_w8a8_panel(const int8_t* xq, const float* sx, i64 M, i64 K, const int8_t* wp, const float* sp,
                          const int32_t* ws, i64 N, i64 Kp, float* y, int threads) {
    w8a8_panel_run(xq, sx, M, K, wp, sp, ws, N, Kp, y, N, 1, threads);
}

// ================================================================================================
// Group-wise asymmetric int2 / int3 / int4 (WNA8 and WNA32).
//   g = group size (32, 64 or 128), GU = g/32 "units" of 32 codes per group, G = K/g groups per row.
//   Codes are packed in chunks of 128 consecutive k (4 units of 32):
//     bits 4: 64 bytes = 2 halves of 32 bytes; half h byte i = q[64h+i] | q[64h+32+i] << 4
//     bits 2: 32 bytes; byte i = q[i] | q[32+i] << 2 | q[64+i] << 4 | q[96+i] << 6
//     bits 3: 48 bytes = bits-2 encoding of (q & 3), then 4 x uint32 (one per unit u), bit i = q[32u+i] >> 2
//   so one 256-bit load yields 2 (int4) or 4 (int2) ready vectors of 32 u8 codes with 1-2 ALU ops each.
//   Each weight row is one stream of "blocks" of up to 8 groups:
//     [codes: ceil(nb*GU/4) chunks][scales: 8 x fp32][zero points: 8 x u8]   (groups >= nb padded with 0)
//   rows start every row_bytes (a multiple of 64).
//   WNA8 : d_g = sum_{k in g} xq_k q_k - z_g * sum_{k in g} xq_k  (exact int32)
//          y = sx[m] * sum_g s_g * (float)d_g       (fp32, group order unspecified -> not bit-exact)
//   WNA32: y = sum_g s_g * (sum_{k in g} x_k q_k - z_g * sum_{k in g} x_k)   (fp32)
// ================================================================================================
// BITS = E2M1 (-4): 4-bit FP4 E2M1 codes in the int4 layout, read through a table as their values times 2 (the
// integers 0, 1, 2, 3, 4, 6, 8, 12 and their negatives; group scales halved, zero points 0). fp32 activations only.
static constexpr int E2M1 = -4;
// BITS = W2P (-2): int2 codes as bit planes, for fp32 activations (`group_layout.prepare_wn(..., planes=True)`,
// AVX-512 builds): unit u of a block (32 codes) is the 8 bytes at 8u, bit i of the uint32 there bit 0 of code
// 32u + i and bit i of the next uint32 its bit 1; the same bytes per block as int2's chunks, scales and zero points
// as they are. The fp32 kernel adds x where a bit is set: the bytes of each plane are the write masks of masked
// adds.
static constexpr int W2P = -2;
template <int BITS>
static inline i64 wn_code_bytes(i64 units) { return (units + 3) / 4 * 16 * (BITS < 0 ? -BITS : BITS); }

#ifdef __AVX2__
// Unit u (32 consecutive codes) of a block as 32 unsigned bytes.
template <int BITS>
static inline __m256i wn_unit(const uint8_t* codes, int u) {
    const int c = u >> 2, r = u & 3;
    if (BITS == 4 || BITS == E2M1) {
        __m256i v = ld(codes + c * 64 + (r >> 1) * 32);
        if (r & 1) v = _mm256_srli_epi16(v, 4);
        v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
        if (BITS == E2M1) {  // signed bytes: 2 x the E2M1 value of each code
            const __m256i x2 = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12, 0, 1, 2, 3, 4, 6,
                                                8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
            v = _mm256_shuffle_epi8(x2, v);
        }
        return v;
    } else if (BITS == 2) {
        __m256i v = _mm256_srli_epi16(ld(codes + c * 32), 2 * r);
        return _mm256_and_si256(v, _mm256_set1_epi8(3));
    } else if (BITS == W2P) {
        uint32_t p0, p1;
        memcpy(&p0, codes + 8 * u, 4);
        memcpy(&p1, codes + 8 * u + 4, 4);
        auto spread = [](uint32_t b) {  // bit i of b to byte i (0 / 1), as the 3-bit decode below
            const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                                 3, 3, 3, 3, 3, 3, 3, 3);
            const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
            const __m256i h = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)b), rep), bit);
            return _mm256_and_si256(_mm256_cmpeq_epi8(h, bit), _mm256_set1_epi8(1));
        };
        const __m256i lo = spread(p0), hi = spread(p1);
        return _mm256_or_si256(lo, _mm256_add_epi8(hi, hi));
    } else {
        const uint8_t* ch = codes + c * 48;
        __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ld(ch), 2 * r), _mm256_set1_epi8(3));
        uint32_t hb;
        memcpy(&hb, ch + 32 + 4 * r, 4);
        // spread bit i of hb to byte i: replicate source byte i/8 into 8 lanes, test bit i%8
        const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                             3, 3, 3, 3, 3, 3);
        const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
        __m256i h = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)hb), rep), bit);
        h = _mm256_and_si256(_mm256_cmpeq_epi8(h, bit), _mm256_set1_epi8(4));
        return _mm256_or_si256(lo, h);
    }
}
#else
// Code number `idx` (0-based k offset inside the block).
template <int BITS>
static inline int wn_code(const uint8_t* codes, i64 idx) {
    const i64 c = idx >> 7, r = (idx >> 5) & 3, i = idx & 31;
    if (BITS == 4 || BITS == E2M1) {
        static const int8_t x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
        const uint8_t b = codes[c * 64 + (r >> 1) * 32 + i];
        const int q = (r & 1 ? b >> 4 : b) & 15;
        return BITS == E2M1 ? x2[q] : q;
    } else if (BITS == 2) {
        return (codes[c * 32 + i] >> (2 * r)) & 3;
    } else if (BITS == W2P) {
        const i64 u = idx >> 5;
        return ((codes[8 * u + i / 8] >> (i % 8)) & 1) | (((codes[8 * u + 4 + i / 8] >> (i % 8)) & 1) << 1);
    } else {
        const uint8_t* ch = codes + c * 48;
        return ((ch[i] >> (2 * r)) & 3) | (((ch[32 + 4 * r + (i >> 3)] >> (i & 7)) & 1) << 2);
    }
}
#endif

// One weight row against MT activation rows. x: int8 rows (stride Kp, zero padded), sxg: int32 group
// sums (stride ldg = 8*NB, zero padded).
template <int BITS, int GU, int MT>
static inline void wna8_tile(const uint8_t* row, i64 G, const int8_t* x, i64 Kp, const int32_t* sxg, i64 ldg,
                             const float* sx, float* y, i64 N) {
    const i64 NB = (G + 7) / 8;
    const uint8_t* p = row;
#ifdef __AVX2__
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    // one block of nb groups (nb == 8 is inlined with a constant so the loops fully unroll)
    auto block = [&](i64 b, const int nb) __attribute__((always_inline)) {
        const uint8_t* codes = p;
        p += wn_code_bytes<BITS>(nb * GU);
        const __m256 sc = _mm256_loadu_ps((const float*)p);
        const __m256i zi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 32)));
        p += 40;
        const i64 k0 = b * 8 * GU * 32;
        __m256i d[MT][8];  // int16 pair sums per group (<= GU * 3840, see reduce8_groups)
        for (int j = 0; j < 8; ++j)
            for (int m = 0; m < MT; ++m) d[m][j] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int j = 0; j < nb; ++j) {
            for (int t = 0; t < GU; ++t) {
                const int u = j * GU + t;
                if ((u & 3) == 0) LB_PF(codes + wn_code_bytes<BITS>(u));  // 4 units = 16*BITS bytes of codes
                const __m256i w = wn_unit<BITS>(codes, u);
                for (int m = 0; m < MT; ++m)
                    d[m][j] = keep(_mm256_add_epi16(d[m][j], _mm256_maddubs_epi16(w, ld(x + m * Kp + k0 + 32 * u))));
            }
        }
        for (int m = 0; m < MT; ++m) {
            __m256i r = reduce8_groups<GU>(d[m]);
            r = _mm256_sub_epi32(r, _mm256_mullo_epi32(zi, ld(sxg + m * ldg + 8 * b)));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), sc, acc[m]);
        }
    };
    // A last block of fewer than 8 groups (K = 384 with groups of 128, ...): group by group, so no accumulator
    // array is indexed at run time (that spilled d[][] to the stack and made such rows ~2x slower). The zero-point
    // term sum_j s_j z_j sum(x in group j) is one vector expression per row (missing groups have s = z = 0).
    auto partial = [&](i64 b, const int nb) __attribute__((always_inline)) {
        const uint8_t* codes = p;
        p += wn_code_bytes<BITS>(nb * GU);
        const float* scp = (const float*)p;
        const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(scp), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                                    _mm_loadl_epi64((const __m128i*)(p + 32)))));
        p += 40;
        const i64 k0 = b * 8 * GU * 32;
        const __m256i ones = _mm256_set1_epi16(1);
        for (int m = 0; m < MT; ++m)
            acc[m] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ld(sxg + m * ldg + 8 * b)), sz, acc[m]);
        // int16 pair sums of group j (GU units) into d[]
        auto group = [&](int j, __m256i* d) __attribute__((always_inline)) {
            for (int m = 0; m < MT; ++m) d[m] = _mm256_setzero_si256();
            for (int t = 0; t < GU; ++t) {
                const int u = j * GU + t;
                const __m256i w = wn_unit<BITS>(codes, u);
                for (int m = 0; m < MT; ++m)
                    d[m] = keep(_mm256_add_epi16(d[m], _mm256_maddubs_epi16(w, ld(x + m * Kp + k0 + 32 * u))));
            }
        };
        int j = 0;
        // Two groups at a time: vphaddw folds them into one vector (per 128-bit half: 4 sums of group j, 4 of
        // j + 1; each <= 2 * GU * 3810 < 2^15), so one vpmaddwd / convert / FMA serves both, with the scales
        // laid out [s_j, s_j, s_j+1, s_j+1] per half.
        for (; j + 2 <= nb; j += 2) {
            __m256i da[MT], db[MT];
            group(j, da);
            group(j + 1, db);
            const __m128 s2 = _mm_castpd_ps(_mm_load_sd((const double*)(scp + j)));
            const __m128 s4 = _mm_unpacklo_ps(s2, s2);
            const __m256 sp = _mm256_insertf128_ps(_mm256_castps128_ps256(s4), s4, 1);
            for (int m = 0; m < MT; ++m) {
                const __m256i h = _mm256_madd_epi16(_mm256_hadd_epi16(da[m], db[m]), ones);
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), sp, acc[m]);
            }
        }
        if (j < nb) {
            __m256i dj[MT];
            group(j, dj);
            const __m256 sj = _mm256_set1_ps(scp[j]);
            for (int m = 0; m < MT; ++m)
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(dj[m], ones)), sj, acc[m]);
        }
    };
    for (i64 b = 0; b < NB; ++b) {
        const i64 nb = std::min<i64>(8, G - 8 * b);
        if (nb == 8) block(b, 8);
        else partial(b, (int)nb);
    }
    store_sums<MT>(acc, sx, y, N);
#else
    float acc[MT] = {0};
    for (i64 b = 0; b < NB; ++b) {
        const int nb = (int)std::min<i64>(8, G - 8 * b);
        const uint8_t* codes = p;
        p += wn_code_bytes<BITS>(nb * GU);
        const float* sc = (const float*)p;  // row_bytes and block sizes keep this 4-byte aligned
        const uint8_t* zp = p + 32;
        p += 40;
        for (int j = 0; j < nb; ++j) {
            const i64 kb = b * 8 * GU * 32 + j * GU * 32;
            for (int m = 0; m < MT; ++m) {
                int32_t dot = 0;
                for (int i = 0; i < GU * 32; ++i) dot += (int32_t)x[m * Kp + kb + i] * wn_code<BITS>(codes, j * GU * 32 + i);
                const int32_t d = dot - (int32_t)zp[j] * sxg[m * ldg + 8 * b + j];
                acc[m] += sc[j] * (float)d;
            }
        }
    }
    for (int m = 0; m < MT; ++m) y[m * N] = sx[m] * acc[m];
#endif
}

// Same with fp32 activations (x stride Kp, zero padded) and fp32 group sums sxg.
template <int BITS, int GU, int MT>
static inline void wna32_tile(const uint8_t* row, i64 G, const float* x, i64 Kp, const float* sxg, i64 ldg, float* y,
                              i64 N) {
    const i64 NB = (G + 7) / 8;
    const uint8_t* p = row;
#ifdef __AVX2__
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
#ifdef __AVX512F__
    // AVX-512: each group's 16-lane sums times its scale go into two 16-lane sums per row, and the zero-point terms
    // s_g z_g sum_g x into acc; one reduction per row at the end (a transposing reduction of the 8 groups' sums per
    // block took a third of a one-row call and held the masked-add planes to the speed of the decode they replace)
    __m512 sa[MT], sb[MT];
    for (int m = 0; m < MT; ++m) sa[m] = sb[m] = _mm512_setzero_ps();
#endif
    auto block = [&](i64 b, const int nb) __attribute__((always_inline)) {
        const uint8_t* codes = p;
        p += wn_code_bytes<BITS>(nb * GU);
        const float* scp = (const float*)p;
        const __m256 sc = _mm256_loadu_ps(scp);
        const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 32))));
        p += 40;
        const i64 k0 = b * 8 * GU * 32;
        // unit(j, u, w) for every unit u (32 codes w) of the block's groups j in order, prefetching the codes ahead
        auto units = [&](auto&& unit) __attribute__((always_inline)) {
#pragma GCC unroll 8
            for (int j = 0; j < nb; ++j) {
                for (int t = 0; t < GU; ++t) {
                    const int u = j * GU + t;
                    if ((u & 3) == 0) LB_PF(codes + wn_code_bytes<BITS>(u));  // 4 units = 16*BITS bytes of codes
                    unit(j, u, wn_unit<BITS>(codes, u));
                }
            }
        };
#ifdef __AVX512F__
        // 16 codes per vector: two widenings and two products per unit of 32 instead of four (the widening shuffles
        // share one port on Intel cores, where the 8-wide form held this kernel at ~13 G weights/s; session 21)
        __m512 d[MT][8];
        for (int j = 0; j < 8; ++j)
            for (int m = 0; m < MT; ++m) d[m][j] = _mm512_setzero_ps();
        if constexpr (BITS == W2P) {
            // Bit planes: d += x where bit 0 is set, and x again (one row: into e, doubled at the end) where bit 1
            // is: four masked adds per 32 codes and row, the masks loaded straight from the codes.
            __m512 e[8];
            for (int j = 0; j < 8; ++j) e[j] = _mm512_setzero_ps();
#pragma GCC unroll 8
            for (int j = 0; j < nb; ++j) {
                for (int t = 0; t < GU; ++t) {
                    const int u = j * GU + t;
                    if ((u & 3) == 0) LB_PF(codes + 8 * u);
                    const uint8_t* mk = codes + 8 * u;
                    const __mmask16 a0 = mask_at(mk), a1 = mask_at(mk + 2), b0 = mask_at(mk + 4), b1 = mask_at(mk + 6);
                    for (int m = 0; m < MT; ++m) {
                        const float* xm = x + m * Kp + k0 + 32 * u;
                        const __m512 x0 = _mm512_loadu_ps(xm), x1 = _mm512_loadu_ps(xm + 16);
                        __m512 dj = _mm512_mask_add_ps(d[m][j], a0, d[m][j], x0);
                        dj = _mm512_mask_add_ps(dj, a1, dj, x1);
                        if constexpr (MT == 1) {
                            e[j] = _mm512_mask_add_ps(e[j], b0, e[j], x0);
                            e[j] = _mm512_mask_add_ps(e[j], b1, e[j], x1);
                        } else {
                            dj = _mm512_mask_add_ps(dj, b0, dj, _mm512_add_ps(x0, x0));
                            dj = _mm512_mask_add_ps(dj, b1, dj, _mm512_add_ps(x1, x1));
                        }
                        d[m][j] = dj;
                    }
                }
            }
            if constexpr (MT == 1)
                for (int j = 0; j < 8; ++j) d[0][j] = _mm512_fmadd_ps(e[j], _mm512_set1_ps(2.0f), d[0][j]);
        } else
        units([&](int j, int u, __m256i w) __attribute__((always_inline)) {
            auto widen = [](__m128i c) {  // 16 codes (E2M1: signed values) as fp32
                return _mm512_cvtepi32_ps(BITS == E2M1 ? _mm512_cvtepi8_epi32(c) : _mm512_cvtepu8_epi32(c));
            };
            const __m512 w0 = widen(_mm256_castsi256_si128(w)), w1 = widen(_mm256_extracti128_si256(w, 1));
            for (int m = 0; m < MT; ++m) {
                const float* xm = x + m * Kp + k0 + 32 * u;
                const __m512 e = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xm)));
                d[m][j] = keep(_mm512_add_ps(d[m][j], e));
            }
        });
        for (int m = 0; m < MT; ++m) {
            __m512 ta = sa[m], tb = sb[m];
            for (int j = 0; j < 8; j += 2) {  // (past the block's nb groups: sums 0, scales 0)
                ta = _mm512_fmadd_ps(_mm512_set1_ps(scp[j]), d[m][j], ta);
                tb = _mm512_fmadd_ps(_mm512_set1_ps(scp[j + 1]), d[m][j + 1], tb);
            }
            sa[m] = ta, sb[m] = tb;
            if (BITS != E2M1)  // (E2M1: zero points 0, and no 0 * inf = NaN from an infinite input)
                acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(zf, sc), _mm256_loadu_ps(sxg + m * ldg + 8 * b), acc[m]);
        }
#else
        __m256 h[MT][8];  // per row: the partial sums of group j in 8 lanes
        for (int j = 0; j < 8; ++j)
            for (int m = 0; m < MT; ++m) h[m][j] = _mm256_setzero_ps();
        units([&](int j, int u, __m256i w) __attribute__((always_inline)) {
            const __m128i wl = _mm256_castsi256_si128(w), wh = _mm256_extracti128_si256(w, 1);
            auto widen = [](__m128i c) {  // 8 codes (E2M1: signed values) as fp32
                return _mm256_cvtepi32_ps(BITS == E2M1 ? _mm256_cvtepi8_epi32(c) : _mm256_cvtepu8_epi32(c));
            };
            const __m256 w0 = widen(wl), w1 = widen(_mm_unpackhi_epi64(wl, wl));
            const __m256 w2 = widen(wh), w3 = widen(_mm_unpackhi_epi64(wh, wh));
            for (int m = 0; m < MT; ++m) {
                const float* xm = x + m * Kp + k0 + 32 * u;
                __m256 e = _mm256_mul_ps(w0, _mm256_loadu_ps(xm));
                __m256 f = _mm256_mul_ps(w2, _mm256_loadu_ps(xm + 16));
                e = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), e);
                f = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), f);
                h[m][j] = keep(_mm256_add_ps(h[m][j], _mm256_add_ps(e, f)));
            }
        });
        for (int m = 0; m < MT; ++m) {
            __m256 r = reduce8_ps(h[m]);
            if (BITS != E2M1)  // (E2M1: zero points 0, and no 0 * inf = NaN from an infinite input)
                r = _mm256_fnmadd_ps(zf, _mm256_loadu_ps(sxg + m * ldg + 8 * b), r);  // sum x q - z * sum x
            acc[m] = _mm256_fmadd_ps(r, sc, acc[m]);
        }
#endif
    };
    for (i64 b = 0; b < NB; ++b) {
        const i64 nb = std::min<i64>(8, G - 8 * b);
        if (nb == 8) block(b, 8);
        else block(b, (int)nb);
    }
#ifdef __AVX512F__
    for (int m = 0; m < MT; ++m) y[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(sa[m], sb[m])) - hsum_ps(acc[m]);
#else
    for (int m = 0; m < MT; ++m) y[m * N] = hsum_ps(acc[m]);
#endif
#else
    float acc[MT] = {0};
    for (i64 b = 0; b < NB; ++b) {
        const int nb = (int)std::min<i64>(8, G - 8 * b);
        const uint8_t* codes = p;
        p += wn_code_bytes<BITS>(nb * GU);
        const float* sc = (const float*)p;
        const uint8_t* zp = p + 32;
        p += 40;
        for (int j = 0; j < nb; ++j) {
            const i64 kb = b * 8 * GU * 32 + j * GU * 32;
            for (int m = 0; m < MT; ++m) {
                float dot = 0.f;
                for (int i = 0; i < GU * 32; ++i) dot += x[m * Kp + kb + i] * (float)wn_code<BITS>(codes, j * GU * 32 + i);
                acc[m] += sc[j] * (BITS == E2M1 ? dot : dot - (float)zp[j] * sxg[m * ldg + 8 * b + j]);
            }
        }
    }
    for (int m = 0; m < MT; ++m) y[m * N] = acc[m];
#endif
}

// Dispatch (BITS, GU) to a template instantiation; F is called as f(IC<BITS>, IC<GU>).
template <class F>
static bool wn_dispatch(int bits, int gu, F f) {
#define LB_WN_CASE(B, U) \
    if (bits == B && gu == U) { f(IC<B>(), IC<U>()); return true; }
    LB_WN_CASE(4, 1) LB_WN_CASE(4, 2) LB_WN_CASE(4, 4)
    LB_WN_CASE(3, 1) LB_WN_CASE(3, 2) LB_WN_CASE(3, 4)
    LB_WN_CASE(2, 1) LB_WN_CASE(2, 2) LB_WN_CASE(2, 4)
    LB_WN_CASE(E2M1, 1) LB_WN_CASE(E2M1, 2) LB_WN_CASE(E2M1, 4)
    LB_WN_CASE(W2P, 1) LB_WN_CASE(W2P, 2) LB_WN_CASE(W2P, 4)
#undef LB_WN_CASE
    return false;
}

// Returns 0 on success, -1 for an unsupported (bits, group).
LB_API int lb_wna8(const int8_t* xq, const float* sx, i64 M, i64 K, const uint8_t* blob, i64 row_bytes, i64 N, int bits,
                   int group, float* y, int threads) {
    const int gu = group / 32;
    const i64 G = K / group, NB = (G + 7) / 8, ldg = 8 * NB, Kp = (K + 127) / 128 * 128;
    int8_t* xp = (int8_t*)scratch(M * Kp);
    int32_t* sxg = (int32_t*)scratch(sizeof(int32_t) * M * ldg);
    for (i64 m = 0; m < M; ++m) {
        memcpy(xp + m * Kp, xq + m * K, K);
        for (i64 g = 0; g < G; ++g) {
            int32_t t = 0;
            for (i64 i = 0; i < group; ++i) t += xq[m * K + g * group + i];
            sxg[m * ldg + g] = t;
        }
    }
    const bool ok = bits > 0 && wn_dispatch(bits, gu, [=](auto B, auto U) {
        if constexpr (decltype(B)::value > 0)  // (E2M1 codes and W2P planes: fp32 activations only)
            run_rows(M, N, threads, blob, row_bytes, [=](auto mt, i64 m, i64 n) {
                wna8_tile<decltype(B)::value, decltype(U)::value, decltype(mt)::value>(
                    blob + n * row_bytes, G, xp + m * Kp, Kp, sxg + m * ldg, ldg, sx + m, y + m * N + n, N);
            });
    });
    free(xp);
    free(sxg);
    return ok ? 0 : -1;
}

LB_API int lb_wna32(const float* x, i64 M, i64 K, const uint8_t* blob, i64 row_bytes, i64 N, int bits, int group,
                    float* y, int threads) {
    const int gu = group / 32;
    const i64 G = K / group, NB = (G + 7) / 8, ldg = 8 * NB, Kp = (K + 127) / 128 * 128;
    float* own;
    const float* xp = pad_rows(x, M, K, Kp, &own);
    float* sxg = (float*)scratch(sizeof(float) * M * ldg);
    for (i64 m = 0; bits != E2M1 && m < M; ++m)  // group sums for the zero points (E2M1 has none)
        for (i64 g = 0; g < G; ++g) {
            float t = 0.f;
            for (i64 i = 0; i < group; ++i) t += x[m * K + g * group + i];
            sxg[m * ldg + g] = t;
        }
    const bool ok = wn_dispatch(bits, gu, [=](auto B, auto U) {
        run_rows(M, N, threads, blob, row_bytes, [=](auto mt, i64 m, i64 n) {
            wna32_tile<decltype(B)::value, decltype(U)::value, decltype(mt)::value>(
                blob + n * row_bytes, G, xp + m * Kp, Kp, sxg + m * ldg, ldg, y + m * N + n, N);
        });
    });
    free(own);
    free(sxg);
    return ok ? 0 : -1;
}

// ================================================================================================
// WNA8 on many rows: group-wise int2 / int3 / int4 weights as int8 panels of (q - z) (exact: |q - z| <= 15), the
// layout of lb_w8a8_panel, with per-panel group scales spg[p][g][16] (zero past N). Per group the tile's int32 sums
// d_g = sum_k xq (q - z) are the row kernel's; y = sx[m] * sum_g s_g * (float)d_g, summed in group order (fp32,
// like lb_wna8's, not bit-identical to it). Real-valued zero points: panels of q, and the s*z correction after.
// ================================================================================================
static constexpr i64 WN_PANEL_ROWS = 16;

// The row counts from which lb_linear runs a layer kind's panels (LB_W8, LB_WN, LB_TERNARY, LB_BIN_INTER), for
// the Python side that decides when to build them (`kernels.routes`); 0 for kinds without panels.
LB_API int lb_panel_rows(int wkind) {
    if (wkind == 1) return (int)PANEL_ROWS;
    if (wkind == 5) return (int)BIN_PANEL_ROWS;  // binary codes as +-1 int8
#ifdef LB_AMX
    if (wkind == 4) return amx_on() ? (int)AMX_SIGN_ROWS : 0;  // W1A1: +-1 panels for the AMX tiles (w1a1_amx)
#endif
    return wkind == 2 ? (int)WN_PANEL_ROWS : wkind == 3 ? (int)TERNARY_PANEL_ROWS : 0;
}

#ifdef __AVX2__
template <int MR, int FORM>  // FORM as w8a8_panel_tile's
static inline void wn_panel_tile(const int8_t* x, i64 Kp, const int8_t* wp, const float* sx, const float* spg,
                                 i64 group, float* y, i64 ldm, i64 ncols) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f[MR][2];
    for (int m = 0; m < MR; ++m) f[m][0] = f[m][1] = _mm256_setzero_ps();
    for (i64 k0 = 0, g = 0; k0 < Kp; k0 += group, ++g) {
        __m256i acc[MR][2];
        for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
        for (i64 k = k0; k < k0 + group; k += 4) {
            const __m256i w0 = ld(wp + 16 * k), w1 = ld(wp + 16 * k + 32);
            constexpr bool NONNEG = FORM == 1;
            const __m256i a0 = NONNEG ? w0 : _mm256_abs_epi8(w0), a1 = NONNEG ? w1 : _mm256_abs_epi8(w1);
            for (int m = 0; m < MR; ++m) {
                int32_t xv;
                memcpy(&xv, x + m * Kp + k, 4);
                const __m256i xb = _mm256_set1_epi32(xv);
                const __m256i p0 = NONNEG ? _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones)
                                          : sdot_quads<FORM == 2>(a0, w0, xb, ones);
                const __m256i p1 = NONNEG ? _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones)
                                          : sdot_quads<FORM == 2>(a1, w1, xb, ones);
                acc[m][0] = keep(_mm256_add_epi32(acc[m][0], p0));
                acc[m][1] = keep(_mm256_add_epi32(acc[m][1], p1));
            }
        }
        const __m256 s0 = _mm256_loadu_ps(spg + 16 * g), s1 = _mm256_loadu_ps(spg + 16 * g + 8);
        for (int m = 0; m < MR; ++m) {
            f[m][0] = keep(_mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][0]), s0, f[m][0]));
            f[m][1] = keep(_mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][1]), s1, f[m][1]));
        }
    }
    for (int m = 0; m < MR; ++m) {
        const __m256 r = _mm256_set1_ps(sx[m]);
        alignas(32) float t[16];
        _mm256_store_ps(t, _mm256_mul_ps(r, f[m][0]));
        _mm256_store_ps(t + 8, _mm256_mul_ps(r, f[m][1]));
        memcpy(y + m * ldm, t, sizeof(float) * ncols);
    }
}
#endif

#ifdef LB_VNNI
// The VNNI form of wn_panel_tile: per group, d_g = sum (x + 128)(q - z) - 128 wsg[g] (exact), then the same fp32
// steps (f += s_g * (float)d_g in group order, y = sx * f): the same bits as the AVX2 tile.
template <int MR>
static inline void wn_vnni_tile(const uint8_t* xu, i64 Kp, const int8_t* wp, const int32_t* wsg, const float* sx,
                                const float* spg, i64 group, float* y, i64 ldm, i64 ncols) {
    __m512 f[MR];
    for (int m = 0; m < MR; ++m) f[m] = _mm512_setzero_ps();
    for (i64 k0 = 0, g = 0; k0 < Kp; k0 += group, ++g) {
        __m512i acc[MR];
        for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_si512();
        for (i64 k = k0; k < k0 + group; k += 4) {
            _mm_prefetch((const char*)(wp + 16 * k) + 4096, _MM_HINT_T0);  // as w8a8_vnni_tile
            const __m512i w = _mm512_loadu_si512(wp + 16 * k);
            for (int m = 0; m < MR; ++m) {
                int32_t xv;
                memcpy(&xv, xu + m * Kp + k, 4);
                acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(xv), w);
            }
        }
        const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(wsg + 16 * g), 7);
        const __m512 s = _mm512_loadu_ps(spg + 16 * g);
        for (int m = 0; m < MR; ++m)
            f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], corr)), s, f[m]);
    }
    const __mmask16 cols = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * ldm, cols, _mm512_mul_ps(_mm512_set1_ps(sx[m]), f[m]));
}
#endif

#ifdef LB_AMX
// y rows m < mr (stride ldm), columns < ncols = rs[m] * f (a block's 32 x 32 fp32 sums, row stride 32).
static inline void store_scaled_rows(float* y, i64 ldm, const float* f, const float* rs, i64 mr, i64 ncols) {
    for (int h = 0; 16 * h < ncols; ++h) {
        const i64 nc = std::min<i64>(16, ncols - 16 * h);
        const __mmask16 cols = nc >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nc) - 1);
        for (i64 m = 0; m < mr; ++m)
            _mm512_mask_storeu_ps(y + m * ldm + 16 * h, cols,
                                  _mm512_mul_ps(_mm512_set1_ps(rs[m]), _mm512_load_ps(f + 32 * m + 16 * h)));
    }
}

// The AMX form of wn_panel_tile for rows m < mr of a block against panels p, p+1 (ncols columns): per group (a
// multiple of 64 k) the exact d_g as int32 tiles, then f += s_g * (float)d_g in group order and y = sx * f, the
// steps of the VNNI and AVX2 tiles: the same bits. spg: panel p's group scales (G, 16), panel p+1's G*16 further.
template <int MT, int NP>
static inline void amx_group_block(const int8_t* am, i64 Kq, const int8_t* wp, i64 Kp, i64 group, const float* spg,
                                   i64 G, const float* sx, i64 mr, i64 ncols, float* y, i64 ldm) {
    alignas(64) int32_t c[32 * 32];
    alignas(64) float f[32 * 32];
    for (i64 m = 0; m < mr; ++m)
        for (int h = 0; h < NP; ++h) _mm512_store_ps(f + 32 * m + 16 * h, _mm512_setzero_ps());
    for (i64 k0 = 0, g = 0; k0 < Kp; k0 += group, ++g) {
        amx_block<MT, NP>(am, Kq, wp, Kp, k0, k0 + group, c);
        for (int h = 0; h < NP; ++h) {
            const __m512 s = _mm512_loadu_ps(spg + h * G * 16 + 16 * g);
            for (i64 m = 0; m < mr; ++m) {
                float* fm = f + 32 * m + 16 * h;
                const __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512(c + 32 * m + 16 * h));
                _mm512_store_ps(fm, _mm512_fmadd_ps(d, s, _mm512_load_ps(fm)));
            }
        }
    }
    store_scaled_rows(y, ldm, f, sx, mr, ncols);
}
#endif

// wsg: the panels' column sums per group (P, G, 16) (`panel_sums`), used by the VNNI tiles.
LB_API void lb_wn_panel(const int8_t* xq, const float* sx, i64 M, i64 K, const int8_t* wp, const float* spg,
                        const int32_t* wsg, i64 N, i64 Kp, i64 group, float* y, int threads) {
    const i64 G = Kp / group;
#ifdef LB_AMX
    if (M >= AMX_ROWS && group % 64 == 0) {  // (groups of 32 k: half a tile step, the VNNI tiles)
        const bool done = amx_panels(xq, M, K, N, Kp, threads,
                                     [=](auto mt, auto np, const int8_t* am, i64 Kq, i64 m, i64 mr, i64 p) {
                                         constexpr int MT = decltype(mt)::value, NP = decltype(np)::value;
                                         amx_group_block<MT, NP>(am, Kq, wp + p * 16 * Kp, Kp, group,
                                                                 spg + p * G * 16, G, sx + m, mr,
                                                                 std::min<i64>(16 * NP, N - 16 * p),
                                                                 y + m * N + 16 * p, N);
                                     });
        if (done) return;
    }
#endif
#ifdef LB_VNNI
    const bool done = vnni_panels(xq, wsg, M, K, N, Kp, threads, [=](auto mt, const uint8_t* xu, i64 m, i64 p) {
        const i64 nc = std::min<i64>(16, N - 16 * p);
        wn_vnni_tile<decltype(mt)::value>(xu + m * Kp, Kp, wp + p * 16 * Kp, wsg + p * G * 16, sx + m,
                                          spg + p * G * 16, group, y + m * N + 16 * p, N, nc);
    });
    if (done) return;
#endif
    int8_t* own;
    const int8_t* xp = pad_rows(xq, M, K, Kp, &own);
#ifdef __AVX2__
    panel_blocks<4, true>(xp, M, N, Kp, threads, [=](auto mt, i64 m, i64 p, int form) {
        constexpr int MR = decltype(mt)::value;
        const i64 nc = std::min<i64>(16, N - 16 * p);
        const int8_t *xm = xp + m * Kp, *wq = wp + p * 16 * Kp;
        const float* sg = spg + p * G * 16;
        float* ym = y + m * N + 16 * p;
        if (form == 1) wn_panel_tile<MR, 1>(xm, Kp, wq, sx + m, sg, group, ym, N, nc);
        else if (form == 2) wn_panel_tile<MR, 2>(xm, Kp, wq, sx + m, sg, group, ym, N, nc);
        else wn_panel_tile<MR, 0>(xm, Kp, wq, sx + m, sg, group, ym, N, nc);
    });
#else
    for (i64 m = 0; m < M; ++m)
        for (i64 n = 0; n < N; ++n) {
            const int8_t* wc = wp + (n / 16) * 16 * Kp + 4 * (n % 16);
            float t = 0.f;
            for (i64 g = 0; g < G; ++g) {
                int32_t d = 0;
                for (i64 k = g * group; k < (g + 1) * group; ++k)
                    d += (int32_t)xp[m * Kp + k] * (int32_t)wc[16 * (k & ~3) + (k & 3)];
                t += spg[((n / 16) * G + g) * 16 + n % 16] * (float)d;
            }
            y[m * N + n] = sx[m] * t;
        }
#endif
    free(own);
}

// ================================================================================================
// fp32 activations on many rows: the int8 panels of any format, dequantized a panel pair at a time, times x.
//   Weight-only layers (fp32 inputs) stream their codes once per row in the row kernels, which suits a few rows;
//   with many rows the work is compute-bound and the row kernels lose to a dense fp32 GEMM. Here the int8 panels
//   (`kernels.panels`: W8, q - z of int2-4 groups, ternary as 2-bit groups, binary as +-1) of 32 output columns
//   are turned into fp32 weights code * scale (B, K x 32 floats, L2-resident) once per block of rows, and an
//   FMA register tile of F32_MR rows x 32 columns runs over B: y[m, n] = sum_k x[m, k] * (code[n, k] * s[n, g(k)]).
//   The fp32 sum order differs from the dense path's, so outputs agree within float rounding, not bit for bit.
//   GCC vector types of the build's width (vf: VL = 16 floats with AVX-512, 8 with AVX2, 4 else; lowbit_exp.h) make
//   the same source AVX-512, AVX2 or plain code. (16 floats everywhere, as before session 17, ran 30x slower than
//   fp32 on AVX2 builds: GCC lowers the 64-byte vectors such a build lacks through the stack.)
// ================================================================================================
typedef uint32_t vu __attribute__((vector_size(VL * 4), aligned(4)));
#if defined(__AVX512F__)
static constexpr int F32_MR = 8;  // 8 rows x 2 vectors: 16 zmm accumulators of 32
#elif defined(__AVX2__)
static constexpr int F32_MR = 3;  // 3 rows x 4 ymm: 12 of 16 registers
#else
static constexpr int F32_MR = 1;  // 1 row x 8 xmm (SSE / NEON): 8 of 16 registers
#endif
// From this many rows lb_linear runs fp32-activation layers on their panels (the row kernels below it).
static constexpr i64 F32_PANEL_ROWS = 8;
LB_API int lb_f32_panel_rows(void) { return (int)F32_PANEL_ROWS; }

// B (Kp x 16 x NP floats, row k: the NP panels' 16 columns side by side) = codes * scales of panels p .. p+NP-1.
// FPE 0: the panels hold int8 codes; 4 / 5: FP8 bytes (sign | FPE exponent bits | 7 - FPE mantissa bits, bias
// 2^(FPE-1) - 1: E4M3 / E5M2) of per-column scaled weights, decoded exactly: a normal value's fp32 bits are the sign,
// the exponent rebiased to 127 and the mantissa shifted to the top; a subnormal one (exponent 0) is mantissa *
// 2^(1 - bias - M). Every pattern lowfloat.encode gives, as lowfloat.decode_table. VL columns at a time. (Written
// inline: a function taking or returning a 64-byte vector changes its ABI between builds, which GCC warns of.)
template <int NP, int FPE = 0>
static inline void f32_dequant(const int8_t* wp, const float* sp, i64 Kp, i64 group, i64 p, float* B) {
    const i64 G = group ? Kp / group : 1;
    for (int h = 0; h < NP; ++h) {
        const int8_t* w = wp + (p + h) * 16 * Kp;
        for (i64 q = 0; q < Kp / 4; ++q) {
            const i64 k = 4 * q;
            const float* sc = group ? sp + ((p + h) * G + k / group) * 16 : sp + (p + h) * 16;
            for (int c = 0; c < 16; c += VL) {
                vf s;
                memcpy(&s, sc + c, sizeof s);
                vi raw;  // VL columns x 4 k: byte j of lane l is code[c + l, k + j]
                memcpy(&raw, w + 64 * q + 4 * c, sizeof raw);
                for (int j = 0; j < 4; ++j) {
                    vf f;
                    if constexpr (FPE == 0) {
                        const vi b = (raw << (24 - 8 * j)) >> 24;  // sign-extended byte j
                        f = __builtin_convertvector(b, vf) * s;
                    } else {
                        constexpr int M = 7 - FPE, bias = (1 << (FPE - 1)) - 1;
                        const vu u = ((vu)raw >> (8 * j)) & 0xffu;
                        const vu e = (u >> M) & ((1u << FPE) - 1), m = u & ((1u << M) - 1);
                        const vu normal = ((e + (127 - bias)) << 23) | (m << (23 - M));
                        const vf sub = __builtin_convertvector(m, vf) * (1.0f / (float)(1 << (bias - 1 + M)));
                        vu bits = e != 0 ? normal : (vu)sub;  // lane-wise select
                        bits |= (u & 0x80u) << 24;
                        f = (vf)bits * s;
                    }
                    memcpy(B + (k + j) * 16 * NP + 16 * h + c, &f, sizeof f);
                }
            }
        }
    }
}

// y rows m .. m+MR-1, the NP*16 columns of B (ncols valid) = x rows . B over k < K.
template <int MR, int NP>
static inline void f32_tile(const float* x, i64 K, const float* B, float* y, i64 N, i64 ncols) {
    constexpr int NV = 16 * NP / VL;
    vf acc[MR][NV] = {};
    for (i64 k = 0; k < K; ++k) {
        const vf* b = (const vf*)(B + k * 16 * NP);
        for (int m = 0; m < MR; ++m) {
            const float xv = x[m * K + k];
            for (int h = 0; h < NV; ++h) acc[m][h] += xv * b[h];
        }
    }
    // Stores through vector pointers (vf is 4-byte aligned): taking the accumulators' address (memcpy) made GCC
    // keep a copy of them on the stack, stored at every k.
    for (int m = 0; m < MR; ++m)
        for (int h = 0; h < NV; ++h) {
            if (ncols >= VL * (h + 1)) {
                *(vf*)(y + m * N + VL * h) = acc[m][h];
            } else {
                for (i64 j = VL * h; j < ncols; ++j) y[m * N + j] = acc[m][h][j - VL * h];
            }
        }
}

// y (M, N) = x (M, K) fp32 . dequant(panels)^T; sp: per-column scales (group 0) or per panel and group (P, G, 16).
// Each thread owns a contiguous range of panel pairs (output-stationary); rows go in blocks whose x stays in L2.
// Returns 0, or -2 when scratch memory could not be allocated.
// fpe: 0 for int8 codes, 4 / 5 for FP8 bytes (E4M3 / E5M2, per-column scales, group 0).
template <int FPE>
static int f32_panel_run(const float* x, i64 M, i64 K, const int8_t* wp, const float* sp, i64 N, i64 Kp, i64 group,
                         float* y, int threads) {
    const i64 P = (N + 15) / 16, pairs = (P + 1) / 2;
    const i64 rows_l2 = std::max<i64>(F32_MR, (384 * 1024 / (4 * std::max<i64>(K, 1))) / F32_MR * F32_MR);
    const i64 BM = std::min<i64>(M, rows_l2);
    int failed = 0;
    lb_parallel(nthreads(threads), threads != 1 && M * N * K >= (1 << 20), [&] {
        i64 q0, q1;
        my_rows(pairs, 1, &q0, &q1);
        float* B = q1 > q0 ? (float*)scratch_uninit(sizeof(float) * Kp * 32) : nullptr;
        if (q1 > q0 && !B) {
#pragma omp atomic write
            failed = 1;
        }
        for (i64 m0 = 0; B && m0 < M; m0 += BM) {
            const i64 mb = std::min(BM, M - m0);
            for (i64 q = q0; q < q1; ++q) {
                const i64 p = 2 * q, two = p + 1 < P;
                const i64 n0 = 16 * p, nc = std::min<i64>(two ? 32 : 16, N - n0);
                if (two) f32_dequant<2, FPE>(wp, sp, Kp, group, p, B);
                else f32_dequant<1, FPE>(wp, sp, Kp, group, p, B);
                for (i64 m = m0; m < m0 + mb; m += F32_MR) {
                    const i64 mr = std::min<i64>(F32_MR, m0 + mb - m);
                    with_rows<F32_MR>(mr, [&](auto mt) {
                        constexpr int R = decltype(mt)::value;
                        if (two) f32_tile<R, 2>(x + m * K, K, B, y + m * N + n0, N, nc);
                        else f32_tile<R, 1>(x + m * K, K, B, y + m * N + n0, N, nc);
                    });  // a tile of exactly mr rows
                }
            }
        }
        free(B);
    });
    return failed ? -2 : 0;
}

#if defined(__AVX2__) && defined(__F16C__)
#ifdef LB_VNNI
// The largest |x| of a row of K floats as a bit pattern: non-negative floats order as their bits read as unsigned
// integers, and NaN patterns lie above +inf's (0x7f800000), so one integer max a vector and no float dependency
// chain (the tail as masked loads: zero lanes leave the maximum as it is).
static inline uint32_t row_abs_bits(const float* xr, i64 K) {
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
    i64 k = 0;
    for (; k + 32 <= K; k += 32) {
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(xr + k), absmask));
        m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(xr + k + 16), absmask));
    }
    for (; k < K; k += 16) {
        const __mmask16 live = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_maskz_loadu_epi32(live, xr + k), absmask));
    }
    return _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
}
#endif

// FP8 panels on a few rows, decoded in registers (no B buffer). An FP8 byte in the high byte of a 16-bit lane is a
// half-precision pattern (E5M2 as is; E4M3 after an arithmetic shift right by one and clearing the copied sign bit:
// its value over 2^8), which vcvtph2ps widens exactly, subnormals included (it ignores MXCSR.DAZ). 16 bytes of a
// panel (4 columns x 4 k) give two vectors without a shuffle: the odd bytes masked in place, the even ones shifted
// up; lane i holds column i / 2 at k + 2 (i % 2) (+1 for the odd bytes). They multiply [x0 x2 x0 x2 ..] and
// [x1 x3 x1 x3 ..], after a multiplication by their column's scale (times 2^8 for E4M3: the block path's decoded
// weight, bit for bit), into one accumulator per 4 columns, whose lane pairs are summed at the end: the block path's
// terms summed in another order, equal within fp32 rounding. (The scale applied after the sum would save a
// multiplication but let sums near fp32's range overflow, or tiny ones lose bits, where the block path's do not.)
template <int FPE>
static inline void fp8_widen(const int8_t* w, __m256& even, __m256& odd) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)w);
    __m128i e = _mm_slli_epi16(raw, 8), o = _mm_and_si128(raw, _mm_set1_epi16((short)0xff00));
    if constexpr (FPE == 4) {
        const __m128i keep = _mm_set1_epi16((short)0xbfff);
        e = _mm_and_si128(_mm_srai_epi16(e, 1), keep);
        o = _mm_and_si128(_mm_srai_epi16(o, 1), keep);
    }
    even = _mm256_cvtph_ps(e);
    odd = _mm256_cvtph_ps(o);
}

// The k-quads of rows x (K each, row stride K) through quad(xp, ldx, wk) against panel w (64 bytes a quad): the whole
// quads in place, a last partial one from a zero-padded copy of MR rows (as the panels are: their padding decodes
// to +0).
template <int MR, class Q>
static inline void fp8_quads(const float* x, i64 K, const int8_t* w, Q&& quad) {
    const i64 K4 = K / 4 * 4;
    for (i64 k = 0; k < K4; k += 4) {
        LB_PF(w + 16 * k);  // one 64-byte line per quad of k
        quad(x + k, K, w + 16 * k);
    }
    if (K4 < K) {
        float t[MR][4] = {};
        for (int m = 0; m < MR; ++m)
            for (i64 i = K4; i < K; ++i) t[m][i - K4] = x[m * K + i];
        quad(&t[0][0], 4, w + 16 * K4);
    }
}

// y rows 0 .. MR-1 (stride N), the first ncols columns of panel w (16 columns x Kp bytes, 4 k per column) = x .
// decoded weights; s256: the panel's 16 column scales, times 2^8 for E4M3 (each decoded value times its scale is
// then the block path's product, bit for bit).
template <int MR, int FPE>
static inline void fp8_rows_tile(const float* x, i64 K, const int8_t* w, const float* s256, float* y, i64 N,
                                 i64 ncols) {
    constexpr int AS = MR == 1 ? 2 : 1;  // one row: the even and odd products in two chains (FMA latency)
    __m256 acc[MR][4][AS], sl[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {  // lane i of accumulator q: column 4 q + i / 2
        const __m128 s4 = _mm_loadu_ps(s256 + 4 * q);
        sl[q] = _mm256_set_m128(_mm_unpackhi_ps(s4, s4), _mm_unpacklo_ps(s4, s4));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q)
#pragma GCC unroll 2
            for (int a = 0; a < AS; ++a) acc[m][q][a] = _mm256_setzero_ps();
    // One quad of k: rows xp (stride ldx) at xp[m * ldx .. + 3], the panel's bytes from wk.
    auto quad = [&](const float* xp, i64 ldx, const int8_t* wk) __attribute__((always_inline)) {
        __m256 xe[MR], xo[MR];
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            const __m256 xv = _mm256_broadcast_ps((const __m128*)(xp + m * ldx));
            xe[m] = _mm256_permute_ps(xv, 0x88);  // x0 x2 x0 x2
            xo[m] = _mm256_permute_ps(xv, 0xdd);  // x1 x3 x1 x3
        }
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
            __m256 fe, fo;
            fp8_widen<FPE>(wk + 16 * q, fe, fo);
            fe = _mm256_mul_ps(fe, sl[q]);
            fo = _mm256_mul_ps(fo, sl[q]);
#pragma GCC unroll 8
            for (int m = 0; m < MR; ++m) {
                acc[m][q][0] = _mm256_fmadd_ps(fe, xe[m], acc[m][q][0]);
                acc[m][q][AS - 1] = _mm256_fmadd_ps(fo, xo[m], acc[m][q][AS - 1]);
            }
        }
    };
    fp8_quads<MR>(x, K, w, quad);
    if constexpr (AS == 2)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) acc[0][q][0] = _mm256_add_ps(acc[0][q][0], acc[0][q][1]);
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
#pragma GCC unroll 2
    for (int q = 0; q < 4; q += 2) {  // 8 columns: hadd of two accumulators gives (c0 c1 c4 c5 | c2 c3 c6 c7)
        const i64 c = 4 * q, nc = std::min<i64>(8, ncols - c);
        if (nc <= 0) break;
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            const __m256 r = _mm256_permutevar8x32_ps(_mm256_hadd_ps(acc[m][q][0], acc[m][q + 1][0]), order);
            if (nc == 8) {
                _mm256_storeu_ps(y + m * N + c, r);
            } else {
                float t[8];
                _mm256_storeu_ps(t, r);
                for (i64 j = 0; j < nc; ++j) y[m * N + c + j] = t[j];
            }
        }
    }
}

#ifdef LB_VNNI
// The same on AVX-512 (BW), decoded by shifts: a byte s|exponent|mantissa in a 16-bit lane's high byte, shifted
// right arithmetically (4 for E4M3, 3 for E5M2), masked to sign, exponent and mantissa bits and given exponent 128,
// is the bf16 pattern of the code's value times 2^8 (E4M3) / 2^16 (E5M2) for every normal code, and a bf16 is the
// high half of the fp32 of the same value. Codes with exponent 0 (+-0 and subnormals, which that pattern reads as
// normal) are replaced from a table of their values, only in the lines that hold one (a byte test per line). Every
// decoded value is 0 or a normal number in [2^-1, 2^32): no product of a decoded value with an input or an input's
// bf16 part falls below fp32's normal range before the true code value's would (a factor below 1 had cost E5M2
// terms 16 binades of range on the AMX tiles, which flush subnormal results).

// bf16 bits of m * 2^p (1 <= m < 256, m * 2^p a normal bf16)
static constexpr uint16_t bf16_bits(int m, int p) {
    int e = 0;
    while (m >> (e + 1)) ++e;
    return (uint16_t)(((e + p + 127) << 7) | ((m - (1 << e)) << (7 - e)));
}

template <int FPE>
struct Fp8Shift {
    static constexpr int SHIFT = FPE == 4 ? 4 : 3;                           // the byte's exponent onto bf16's
    static constexpr short KEEP = FPE == 4 ? (short)0x87f0 : (short)0x8fe0;  // sign, exponent, mantissa after it
    static constexpr short BIAS = 0x4000;                                   // exponent + 128
    static constexpr short EXP = FPE == 4 ? 0x0780 : 0x0f80;                // the code's exponent bits after it
    static constexpr char RAW_EXP = FPE == 4 ? 0x78 : 0x7c;                 // and in the byte
    static constexpr int MSHIFT = FPE == 4 ? 4 : 5;                         // mantissa to bit 0: the table index
    static constexpr float UNSCALE = FPE == 4 ? 0x1p-8f : 0x1p-16f;         // decoded value * UNSCALE = code value
    static constexpr int P = FPE == 4 ? -1 : 0;                             // subnormal mantissa m decodes to m * 2^P
    // bf16 of each subnormal mantissa's decoded value (index 0: +0; a compile-time table: a function-local static
    // would put its guard check in the kernel's loop, and GCC then spills every accumulator around it)
    alignas(64) static constexpr uint16_t SUB[32] = {
        0, bf16_bits(1, P), bf16_bits(2, P), bf16_bits(3, P), FPE == 4 ? bf16_bits(4, P) : 0,
        FPE == 4 ? bf16_bits(5, P) : 0, FPE == 4 ? bf16_bits(6, P) : 0, FPE == 4 ? bf16_bits(7, P) : 0};
};

// lo and hi: FP8 bytes in the high bytes of 16-bit lanes (anything in the low bytes), decoded in place into bf16 (the
// shift decode above); raw: the 64 bytes they came from, tested for exponent-0 codes.
template <int FPE>
__attribute__((always_inline)) static inline void fp8_bf16_lanes(__m512i raw, __m512i& lo, __m512i& hi) {
    using D = Fp8Shift<FPE>;
    const __m512i keep = _mm512_set1_epi16(D::KEEP), bias = _mm512_set1_epi16(D::BIAS);  // (A & B) | C: 0xea
    lo = _mm512_ternarylogic_epi32(_mm512_srai_epi16(lo, D::SHIFT), keep, bias, 0xea);
    hi = _mm512_ternarylogic_epi32(_mm512_srai_epi16(hi, D::SHIFT), keep, bias, 0xea);
    if (__builtin_expect(_mm512_testn_epi8_mask(raw, _mm512_set1_epi8(D::RAW_EXP)) != 0, 0)) {
        const __m512i sub = _mm512_load_si512(D::SUB), exp = _mm512_set1_epi16(D::EXP);
        const __m512i sign = _mm512_set1_epi16((short)0x8000);
        auto fix = [&](__m512i v) __attribute__((always_inline)) {  // exponent-0 lanes from the table, sign kept: t | (v & sign) is 0xf8
            const __m512i t = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, D::MSHIFT), sub);
            return _mm512_mask_mov_epi16(v, _mm512_testn_epi16_mask(v, exp), _mm512_ternarylogic_epi32(t, v, sign, 0xf8));
        };
        lo = fix(lo), hi = fix(hi);
    }
}

// A panel line (16 columns x 4 k, 4 bytes a column) as bf16: lo holds each column's k (low half of its 32-bit lane)
// and k + 2 (high half), hi its k + 1 and k + 3.
template <int FPE>
__attribute__((always_inline)) static inline void fp8_line_bf16(__m512i raw, __m512i& lo, __m512i& hi) {
    lo = _mm512_slli_epi16(raw, 8), hi = raw;
    fp8_bf16_lanes<FPE>(raw, lo, hi);
}

// Each panel line gives its 16 columns at k .. k + 3 as four fp32 vectors, one FMA each per row, into AC
// accumulators a row (enough chains to cover the FMA latency); the columns come out in order. AFTER: the column
// scales multiply the sums, not each decoded weight (one multiplication a column instead of one a weight; the
// caller makes sure no sum of x times an unscaled value can overflow or lose its bits to underflow). Otherwise each
// decoded value is taken back to its code's value (exact) and times its column's scale: the block path's decoded
// weight, bit for bit.
template <int MR, int FPE, bool AFTER = false>
static inline void fp8_rows_tile16(const float* x, i64 K, const int8_t* w, const float* s256, float* y, i64 N,
                                   i64 ncols) {
    constexpr int AC = MR == 1 ? 4 : MR < 8 ? 2 : 1;
    const __mmask16 cols = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
    using D = Fp8Shift<FPE>;
    // s256 * 2^-8 (E4M3) is the column's scale, exactly; u: decoded value -> code value
    const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(cols, s256), _mm512_set1_ps(FPE == 4 ? 0x1p-8f : 1.0f));
    const __m512 u = _mm512_set1_ps(D::UNSCALE), us = _mm512_mul_ps(u, s);
    const __m512i high = _mm512_set1_epi32((int)0xffff0000);
    __m512 acc[MR][AC];
    for (int m = 0; m < MR; ++m)
        for (int a = 0; a < AC; ++a) acc[m][a] = _mm512_setzero_ps();
    auto quad = [&](const float* xp, i64 ldx, const int8_t* wk) __attribute__((always_inline)) {
        __m512i lo, hi;
        fp8_line_bf16<FPE>(_mm512_loadu_si512(wk), lo, hi);
        __m512 f[4] = {_mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)),
                       _mm512_castsi512_ps(_mm512_and_si512(lo, high)), _mm512_castsi512_ps(_mm512_and_si512(hi, high))};
        if constexpr (!AFTER)
            for (int j = 0; j < 4; ++j) f[j] = _mm512_mul_ps(_mm512_mul_ps(f[j], u), s);
        for (int m = 0; m < MR; ++m)
            for (int j = 0; j < 4; ++j)
                acc[m][j % AC] = _mm512_fmadd_ps(f[j], _mm512_set1_ps(xp[m * ldx + j]), acc[m][j % AC]);
    };
    fp8_quads<MR>(x, K, w, quad);
    for (int m = 0; m < MR; ++m) {
        __m512 r = acc[m][0];
        for (int a = 1; a < AC; ++a) r = _mm512_add_ps(r, acc[m][a]);
        _mm512_mask_storeu_ps(y + m * N, cols, AFTER ? _mm512_mul_ps(r, us) : r);
    }
}
#endif

// Below this many rows FP8 panels are decoded in registers (fp8_rows_run), from it on into a block (f32_panel_run);
// with the AMX tiles on, from F32_AMX_ROWS (fp32 inputs) / FP8_AMX_ROWS (FP8 activations) rows on the tiles take
// them. Median us, one thread:
// Zen 4, the 8-lane register tile vs block: 1024 x 1024 at 1 row 91-115 vs 223-236, 4 rows 138 vs 275, 8 rows 268
// vs 335, 10 rows 374 vs 419, 11 rows 387 vs 409; 128 x 1024 at 4 rows 21 vs 37, 11 rows 60 vs 53. Xeon (AMX
// off), the 16-lane shift-decode tile vs block, FP8 weights with FP8 activations: 4096 x 4096 at 16 rows 4411 vs
// 8447, 64 rows 16896 vs 27693, 128 rows 33720 vs 56980; 384 x 1536 at 64 rows 542 vs 610, 128 rows 1145 vs 1084;
// 128 x 1024 at 128 rows 274 vs 283.
#ifdef LB_VNNI
static constexpr i64 FP8_REGISTER_ROWS = 128;
static constexpr int FP8_MR = 8;  // rows sharing a decode (fp8_rows_tile16: 8 accumulators, 4 decoded vectors)
#else
static constexpr i64 FP8_REGISTER_ROWS = 12;
static constexpr int FP8_MR = 2;  // 8 accumulators and 4 x vectors of 16
#endif
// y (M, N) = x (M, K) . decoded FP8 panels, for few rows: each thread owns a contiguous range of panels; one row
// reads a whole panel line (16 columns) per quad of k, FP8_MR rows share its decode. Returns 1 (nothing computed)
// when a scale is not below 2^100 (its E4M3 factor 2^8 could overflow): the block path takes those.
template <int FPE>
static int fp8_rows_run(const float* x, i64 M, i64 K, const int8_t* wp, const float* sp, i64 N, float* y,
                        i64 Kp, int threads) {
    float smax = 0.0f, smin = INFINITY;
    for (i64 n = 0; n < N; ++n) {
        if (!(fabsf(sp[n]) < 0x1p100f)) return 1;
        smax = std::max(smax, fabsf(sp[n])), smin = std::min(smin, fabsf(sp[n]));
    }
#ifdef LB_VNNI
    // Scales after the sums where that cannot change a result beyond fp32 rounding: every row's largest |x| within
    // [2^-40, 2^40] (or the row all zeros), the scales within [2^-40, 2^40], and so every unscaled product (a decoded
    // value lies in [2^-1, 2^32) or is 0) and sum (K < 2^24 terms) well inside fp32's normal range.
    bool after = smin >= 0x1p-40f && smax <= 0x1p40f && K < (1 << 24);
    for (i64 m = 0; after && m < M; ++m) {  // (NaN / inf: above 2^40's pattern)
        const uint32_t bits = row_abs_bits(x + m * K, K);
        after = bits == 0 || (bits >= 0x2b800000u && bits <= 0x53800000u);  // 2^-40 .. 2^40
    }
#endif
    const i64 P = (N + 15) / 16;
    lb_parallel(nthreads(threads), threads != 1 && M * N * K >= (1 << 20), [&] {
        i64 p0, p1;
        my_rows(P, 1, &p0, &p1);
        for (i64 p = p0; p < p1; ++p) {
            const int8_t* w = wp + p * 16 * Kp;
            const i64 n0 = 16 * p, nc = std::min<i64>(16, N - n0);
            float s256[16] = {};
            for (i64 j = 0; j < nc; ++j) s256[j] = FPE == 4 ? sp[n0 + j] * 256.0f : sp[n0 + j];
            i64 m = 0;
#ifdef LB_VNNI
            for (; m < M; m += FP8_MR)
                with_rows<FP8_MR>(std::min<i64>(FP8_MR, M - m), [&](auto mt) {
                    constexpr int R = decltype(mt)::value;
                    if (after) fp8_rows_tile16<R, FPE, true>(x + m * K, K, w, s256, y + m * N + n0, N, nc);
                    else fp8_rows_tile16<R, FPE>(x + m * K, K, w, s256, y + m * N + n0, N, nc);
                });
#else
            for (; m + FP8_MR <= M; m += FP8_MR) fp8_rows_tile<FP8_MR, FPE>(x + m * K, K, w, s256, y + m * N + n0, N, nc);
            if (m < M)
                with_rows<FP8_MR>(M - m, [&](auto mt) {
                    fp8_rows_tile<decltype(mt)::value, FPE>(x + m * K, K, w, s256, y + m * N + n0, N, nc);
                });
#endif
        }
    });
    return 0;
}
#endif

#ifdef LB_AMX_BF16
// From this many rows fp32-input panels run on AMX-BF16 tiles (f32_amx) where the CPU, compiler and Linux allow.
static constexpr i64 F32_AMX_ROWS = 16;
static int f32_amx(const float* x, i64 M, i64 K, const int8_t* wp, const float* sp, i64 N, i64 Kp, i64 group,
                   float* y, int threads, int fpe);
#endif

LB_API int lb_f32_panel(const float* x, i64 M, i64 K, const int8_t* wp, const float* sp, i64 N, i64 Kp, i64 group,
                        float* y, int threads, int fpe) {
#ifdef LB_AMX_BF16
    if (M >= F32_AMX_ROWS && !f32_amx(x, M, K, wp, sp, N, Kp, group, y, threads, fpe)) return 0;
#endif
    if (fpe == 0) return f32_panel_run<0>(x, M, K, wp, sp, N, Kp, group, y, threads);
    if (group) return -1;
#if defined(__AVX2__) && defined(__F16C__)
    if (M < FP8_REGISTER_ROWS && fpe == 4 && !fp8_rows_run<4>(x, M, K, wp, sp, N, y, Kp, threads)) return 0;
    if (M < FP8_REGISTER_ROWS && fpe == 5 && !fp8_rows_run<5>(x, M, K, wp, sp, N, y, Kp, threads)) return 0;
#endif
    if (fpe == 4) return f32_panel_run<4>(x, M, K, wp, sp, N, Kp, 0, y, threads);
    if (fpe == 5) return f32_panel_run<5>(x, M, K, wp, sp, N, Kp, 0, y, threads);
    return -1;
}

// ================================================================================================
// Ternary W1.58A8 (BitNet b1.58).
//   Layout: c = t + 1 in {0,1,2}, packed 2 bits/weight exactly like the int2 chunks above (128 k per
//   32 bytes), K padded to 128 with c = 0; rows of Kp/4 bytes. sw fp32 per row (N,).
//   dot = sum_k xq*c - sum_k xq = sum_k xq*t  (exact int32);  y = (sx[m] * sw[n]) * (float)dot
// ================================================================================================
template <int MT>
static inline void ternary_tile(const uint8_t* w, i64 Kp, const int8_t* x, const int32_t* sxr, const float* sx,
                                float sw, float* y, i64 N) {
    int32_t dot[MT];
#ifdef __AVX2__
    const __m256i ones = _mm256_set1_epi16(1), m3 = _mm256_set1_epi8(3);
    __m256i a[MT];
    for (int m = 0; m < MT; ++m) a[m] = _mm256_setzero_si256();
    // int16 partial sums per lane: each 128-k chunk adds <= 4 * 2*2*128 = 2048, so flush to int32 every
    // 8 chunks (16384 < 2^15): one vpmaddwd per 32 vpmaddubsw.
    for (i64 k0 = 0; k0 < Kp; k0 += 128 * 8) {
        const i64 k1 = std::min(Kp, k0 + 128 * 8);
        __m256i s[MT];
        for (int m = 0; m < MT; ++m) s[m] = _mm256_setzero_si256();
        for (i64 k = k0; k < k1; k += 128) {
            if ((k & 255) == 0) LB_PF(w + k / 4);
            const __m256i v = ld(w + k / 4);
            const __m256i c0 = _mm256_and_si256(v, m3), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3);
            const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3), c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3);
            for (int m = 0; m < MT; ++m) {
                const int8_t* xm = x + m * Kp + k;
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(c0, ld(xm)), _mm256_maddubs_epi16(c1, ld(xm + 32)));
                const __m256i q = _mm256_add_epi16(_mm256_maddubs_epi16(c2, ld(xm + 64)), _mm256_maddubs_epi16(c3, ld(xm + 96)));
                s[m] = _mm256_add_epi16(s[m], _mm256_add_epi16(p, q));
            }
        }
        for (int m = 0; m < MT; ++m) a[m] = _mm256_add_epi32(a[m], _mm256_madd_epi16(s[m], ones));
    }
    for (int m = 0; m < MT; ++m) dot[m] = hsum_epi32(a[m]) - sxr[m];
#else
    for (int m = 0; m < MT; ++m) {
        int32_t t = 0;
        for (i64 k = 0; k < Kp; ++k) t += (int32_t)x[m * Kp + k] * (((w[(k >> 7) * 32 + (k & 31)] >> (2 * ((k >> 5) & 3))) & 3) - 1);
        dot[m] = t;
    }
#endif
    for (int m = 0; m < MT; ++m) y[m * N] = (sx[m] * sw) * (float)dot[m];
}

LB_API void lb_ternary(const int8_t* xq, const float* sx, i64 M, i64 K, const uint8_t* w, const float* sw, i64 N,
                       float* y, int threads) {
    const i64 Kp = (K + 127) / 128 * 128;
    int8_t* own;
    const int8_t* xp = pad_rows(xq, M, K, Kp, &own);
    int32_t* sxr = (int32_t*)scratch(sizeof(int32_t) * M);
    for (i64 m = 0; m < M; ++m) {
        int32_t t = 0;
        for (i64 k = 0; k < K; ++k) t += xq[m * K + k];
        sxr[m] = t;
    }
    run_rows(M, N, threads, w, Kp / 4, [=](auto mt, i64 m, i64 n) {
        ternary_tile<decltype(mt)::value>(w + n * (Kp / 4), Kp, xp + m * Kp, sxr + m, sx + m, sw[n], y + m * N + n, N);
    });
    free(own);
    free(sxr);
}

// ================================================================================================
// Binary weights. Two layouts (both K padded to a multiple of 256 with 0 bits):
//   blocked    : rows in blocks of 64 (N padded with zero rows); block b = Kp/8 steps of 64 bytes, byte r of
//                step p = byte p of row 64b + r (bit i = sign of k = 8p + i)                  -> W1A1
//                (activations stay in the pack_signs layout: bit i of uint64 word j = sign of k = 64j + i,
//                 i.e. the same bytes little-endian)
//   interleaved: per 256-k block, 8 uint32 lanes; lane i bit j = sign of k = base + 8j + i   -> W1A8, W1A32
//     (fp32: shifting the block left by 31-j puts the bits of the 8 contiguous k = base+8j..+7 in the
//      sign bits of 8 lanes -> one blendv per 8 weights. int8: byte P of the block, bit s, holds
//      k = base + 64*(P%4) + 8s + P/4; the kernel permutes xq once per call to match, then
//      (v >> s) & 1 gives 32 ready 0/1 bytes for one vpmaddubsw with 32 activations.)
// ================================================================================================

// --- W1A1 (XNOR-popcount): pop = popcount(bw XOR bx); y = (bx_s[m] * a[n]) * (float)(K - 2*pop) (+ bias[n])
// Nibble lookup (T-MAC style) instead of XOR + popcount: for activation row m and weight byte p, the counts
// popcount(x_nibble XOR i) for all 16 values i form a 16-byte table, and one vpshufb looks up 32 weight rows' nibbles
// in it at once. The XOR disappears and the nibble extraction of a weight vector is shared by the MT activation rows
// of a tile, so a 256-bit step (32 rows x 8 bits) costs 2 lookups + 2 byte adds per activation row. Measured on a
// Zen 1 core (throw-away C harness, 1 thread): M = 1576, K = 384, N = 1536 in 8.6 ms where the XOR + scalar popcnt
// tile took 13.2 ms; M = 1, K = N = 4096 streamed 0.18 ms where the vpshufb XOR-popcount GEMV took 0.21 ms.
static const i64 W1A1_FLUSH = 31;  // steps before the byte counters (<= 8 per step) are widened: 31 * 8 <= 255

// Tables for one activation row: per byte p of its sign bits, 16 bytes popcount(lo(x_p) ^ i) then 16 bytes
// popcount(hi(x_p) ^ i).
static inline void w1a1_tables(const uint8_t* xbytes, i64 steps, uint8_t* lut) {
    i64 p = 0;
#ifdef __AVX2__
    const __m128i iota = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m128i pc = _mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    for (; p < steps; ++p) {
        const __m128i lo = _mm_xor_si128(_mm_set1_epi8((char)(xbytes[p] & 15)), iota);
        const __m128i hi = _mm_xor_si128(_mm_set1_epi8((char)(xbytes[p] >> 4)), iota);
        _mm_storeu_si128((__m128i*)(lut + 32 * p), _mm_shuffle_epi8(pc, lo));
        _mm_storeu_si128((__m128i*)(lut + 32 * p + 16), _mm_shuffle_epi8(pc, hi));
    }
#endif
    static const uint8_t pc4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};
    for (; p < steps; ++p) {
        const int lo = xbytes[p] & 15, hi = xbytes[p] >> 4;
        for (int i = 0; i < 16; ++i) {
            lut[32 * p + i] = pc4[lo ^ i];
            lut[32 * p + 16 + i] = pc4[hi ^ i];
        }
    }
}

// Popcounts of XOR for MT activation rows (tables at lut + m * lutld) against one 64-row weight block:
// cnt[m][r] for r = 0..63.
template <int MT>
static inline void w1a1_block(const uint8_t* blk, const uint8_t* lut, i64 lutld, i64 steps, int32_t (*cnt)[64]) {
    for (int m = 0; m < MT; ++m)
        for (int r = 0; r < 64; ++r) cnt[m][r] = 0;
#ifdef __AVX2__
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    for (i64 p0 = 0; p0 < steps; p0 += W1A1_FLUSH) {
        const i64 p1 = std::min(steps, p0 + W1A1_FLUSH);
        __m256i acc[MT][2];
        for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = zero;
        for (i64 p = p0; p < p1; ++p) {
            LB_PF(blk + 64 * p);
            const __m256i w0 = ld(blk + 64 * p), w1 = ld(blk + 64 * p + 32);
            const __m256i lo0 = _mm256_and_si256(w0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), low);
            const __m256i lo1 = _mm256_and_si256(w1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), low);
            for (int m = 0; m < MT; ++m) {
                const uint8_t* t = lut + m * lutld + 32 * p;
                const __m256i L = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)t));
                const __m256i H = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(t + 16)));
                acc[m][0] = _mm256_add_epi8(acc[m][0], _mm256_add_epi8(_mm256_shuffle_epi8(L, lo0), _mm256_shuffle_epi8(H, hi0)));
                acc[m][1] = _mm256_add_epi8(acc[m][1], _mm256_add_epi8(_mm256_shuffle_epi8(L, lo1), _mm256_shuffle_epi8(H, hi1)));
            }
        }
        for (int m = 0; m < MT; ++m)
            for (int v = 0; v < 2; ++v) {
                alignas(32) uint8_t b[32];
                _mm256_store_si256((__m256i*)b, acc[m][v]);
                for (int c = 0; c < 4; ++c) {
                    __m256i* d = (__m256i*)(cnt[m] + 32 * v + 8 * c);
                    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(b + 8 * c)));
                    _mm256_storeu_si256(d, _mm256_add_epi32(_mm256_loadu_si256(d), w));
                }
            }
    }
#else
    for (i64 p = 0; p < steps; ++p)
        for (int m = 0; m < MT; ++m) {
            const uint8_t* t = lut + m * lutld + 32 * p;
            for (int r = 0; r < 64; ++r) cnt[m][r] += t[blk[64 * p + r] & 15] + t[16 + (blk[64 * p + r] >> 4)];
        }
#endif
}

// y[n0 .. n0+nn) of one activation row from its counts.
static inline void w1a1_store(const int32_t* cnt, i64 K, float bs, const float* a, const float* bias, i64 nn,
                              float* y) {
    i64 n = 0;
#ifdef __AVX2__
    const __m256i k = _mm256_set1_epi32((int)K);
    const __m256 b = _mm256_set1_ps(bs);
    alignas(32) float av[8], bv[8], out[8];
    for (; n < nn; n += 8) {
        const bool full = n + 8 <= nn;
        if (!full)
            for (int i = 0; i < 8; ++i) av[i] = n + i < nn ? a[n + i] : 0.f, bv[i] = bias && n + i < nn ? bias[n + i] : 0.f;
        const __m256i c = _mm256_loadu_si256((const __m256i*)(cnt + n));
        const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(k, _mm256_slli_epi32(c, 1)));
        __m256 r = _mm256_mul_ps(_mm256_mul_ps(b, full ? _mm256_loadu_ps(a + n) : _mm256_load_ps(av)), v);
        __asm__("" : "+x"(r));  // rounded here (no multiply-add with the bias): the AMX tiles' store rounds so too
        if (bias) r = _mm256_add_ps(r, full ? _mm256_loadu_ps(bias + n) : _mm256_load_ps(bv));
        if (full) {
            _mm256_storeu_ps(y + n, r);
        } else {
            _mm256_store_ps(out, r);
            for (int i = 0; n + i < nn; ++i) y[n + i] = out[i];
        }
    }
#else
    for (; n < nn; ++n) {
        volatile float r = (bs * a[n]) * (float)(K - 2 * (i64)cnt[n]);  // (rounded: no multiply-add with the bias)
        y[n] = r;
    }
    if (bias)
        for (n = 0; n < nn; ++n) y[n] += bias[n];
#endif
}

// W1A1 GEMM/GEMV. xb: (M, W) uint64 sign bits (pack_signs layout), wb: blocked layout (see the layout comment).
// Threads split the 64-row weight blocks. Each thread builds the tables of an M-block's rows itself (cheap: two
// 16-byte shuffles per row and byte) instead of sharing them: no barrier, which on a VM with slow-waking vCPUs costs
// more than the work at M = 1. Returns 0, or -2 when the tables could not be allocated.
LB_API int lb_w1a1(const uint64_t* xb, const float* bxs, i64 M, i64 K, const uint8_t* wb, const float* a, i64 N,
                   float* y, int threads, const float* bias) {
    const i64 W = (K + 255) / 256 * 4, steps = (K + 7) / 8, NB = (N + 63) / 64, block = W * 8 * 64;
    // Tables of at most ~256 KiB per M-block (they stream from L2), in pairs of rows (the tile height).
    const i64 mbl = std::min(M, std::max<i64>(2, std::min<i64>(1024, 262144 / (32 * steps)) / 2 * 2));
    // One allocation by the calling thread (64-byte multiples per thread): an allocation inside the parallel region
    // comes from a worker thread's own malloc arena, whose trimming and regrowth on every call cost more than the
    // GEMV itself.
    const int nt = nthreads(threads);
    const i64 lut_bytes = (mbl * steps * 32 + 63) / 64 * 64;
    uint8_t* luts = (uint8_t*)scratch_uninit(lut_bytes * nt);  // every table is written before it is read
    if (!luts) return -2;
    lb_parallel(nt, true, [&] {
        i64 b0, b1;
        my_rows(NB, 1, &b0, &b1);
        uint8_t* lut = luts + lb_team_rank() * lut_bytes;
        for (i64 mb = 0; b0 < b1 && mb < M; mb += mbl) {
            const i64 me = std::min(M, mb + mbl);
            for (i64 m = mb; m < me; ++m) w1a1_tables((const uint8_t*)(xb + m * W), steps, lut + (m - mb) * steps * 32);
            for (i64 b = b0; b < b1; ++b) {
                const i64 n0 = b * 64, nn = std::min<i64>(64, N - n0);
                auto rows = [&](auto mt, i64 m) {
                    constexpr int MT = decltype(mt)::value;
                    int32_t cnt[MT][64];
                    w1a1_block<MT>(wb + b * block, lut + (m - mb) * steps * 32, steps * 32, steps, cnt);
                    for (int r = 0; r < MT; ++r)
                        w1a1_store(cnt[r], K, bxs[m + r], a + n0, bias ? bias + n0 : nullptr, nn, y + (m + r) * N + n0);
                };
                i64 m = mb;
                for (; m + 2 <= me; m += 2) rows(IC<2>(), m);
                if (m < me) rows(IC<1>(), m);
            }
        }
    });
    free(luts);
    return 0;
}

// --- Convolution patches (im2col): out (N*OH*OW, C*KH*KW) fp32, row (n, oh, ow), column (c, i, j) -- the order of
// torch's F.unfold and of a conv weight flattened to (O, C*KH*KW). x is read through element strides (sn, sc, sh,
// sw), so any memory format works; taps outside the input (the padding) are 0. PT / PL: top / left padding (the
// bottom / right padding follows from OH / OW). KWC > 0: the kernel width as a compile-time constant (the copy of
// a patch row then unrolls), 0: any width.
template <int KWC>
static void im2col_rows(const float* x, i64 C, i64 H, i64 W, i64 sn, i64 sc, i64 sh, i64 sw, i64 KH, i64 KW_,
                        i64 SH, i64 SW, i64 PT, i64 PL, i64 DH, i64 DW, i64 OH, i64 OW, float* out, i64 base, i64 r0,
                        i64 r1) {
    const i64 KW = KWC > 0 ? KWC : KW_, K = C * KH * KW, step = DW * sw;
    for (i64 r = r0; r < r1; ++r) {
        const i64 n = r / (OH * OW), o = r % (OH * OW), h0 = (o / OW) * SH - PT, w0 = (o % OW) * SW - PL;
        i64 jlo = 0, jhi = KW;  // taps j in [jlo, jhi) fall inside the row, the others on the padding
        while (jlo < KW && w0 + jlo * DW < 0) ++jlo;
        while (jhi > jlo && w0 + (jhi - 1) * DW >= W) --jhi;
        const bool inside = jlo == 0 && jhi == KW;
        float* dst = out + (r - base) * K;
        const float* xn = x + n * sn + w0 * sw;
        if (inside && step == 1 && h0 >= 0 && h0 + (KH - 1) * DH < H) {
            // The whole patch inside the input, taps contiguous: KW floats per (c, i), no padding or bounds tests.
            for (i64 c = 0; c < C; ++c) {
                const float* xc = xn + c * sc + h0 * sh;
                for (i64 i = 0; i < KH; ++i, dst += KW) memcpy(dst, xc + i * DH * sh, sizeof(float) * KW);
            }
            continue;
        }
        for (i64 c = 0; c < C; ++c) {
            const float* xc = xn + c * sc;
            for (i64 i = 0; i < KH; ++i, dst += KW) {
                const i64 h = h0 + i * DH;
                if (h < 0 || h >= H) {
                    for (i64 j = 0; j < KW; ++j) dst[j] = 0.f;
                } else if (inside) {
                    const float* xh = xc + h * sh;
                    for (i64 j = 0; j < KW; ++j) dst[j] = xh[j * step];
                } else {
                    const float* xh = xc + h * sh;
                    for (i64 j = 0; j < KW; ++j) dst[j] = (j >= jlo && j < jhi) ? xh[j * step] : 0.f;
                }
            }
        }
    }
}

// Rows [r0, r1) of the patches of geometry g into out (row r0 first). g: the geometry as 18 integers {N, C, H, W,
// sn, sc, sh, sw, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW} (one argument: converting 18 separate arguments costs
// the caller several microseconds per call).
static void im2col_range(const float* x, const i64* g, float* out, i64 r0, i64 r1, int threads) {
    const i64 C = g[1], H = g[2], W = g[3], sn = g[4], sc = g[5], sh = g[6], sw = g[7], KH = g[8], KW = g[9];
    const i64 SH = g[10], SW = g[11], PT = g[12], PL = g[13], DH = g[14], DW = g[15], OH = g[16], OW = g[17];
    auto run = [&](i64 a, i64 b) {
        switch (KW) {
            case 1: im2col_rows<1>(x, C, H, W, sn, sc, sh, sw, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, out, r0, a, b); break;
            case 2: im2col_rows<2>(x, C, H, W, sn, sc, sh, sw, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, out, r0, a, b); break;
            case 3: im2col_rows<3>(x, C, H, W, sn, sc, sh, sw, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, out, r0, a, b); break;
            default: im2col_rows<0>(x, C, H, W, sn, sc, sh, sw, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, out, r0, a, b);
        }
    };
    const i64 rows = r1 - r0;
    lb_parallel(nthreads(threads), threads != 1 && rows * C * KH * KW >= (1 << 16), [&] {
        i64 lo, hi;
        my_rows(rows, 1, &lo, &hi);
        run(r0 + lo, r0 + hi);
    });
}

LB_API void lb_im2col(const float* x, const i64* g, float* out, int threads) {
    im2col_range(x, g, out, 0, g[0] * g[16] * g[17], threads);
}

// Pack bool rows (bytes 0/1, shape (R, K)) into plain-layout uint64 words (R, W), W = ceil(K/256)*4.
LB_API void lb_pack_signs(const uint8_t* b, i64 R, i64 K, uint64_t* out) {
    const i64 W = (K + 255) / 256 * 4;
    for (i64 r = 0; r < R; ++r) {
        const uint8_t* src = b + r * K;
        uint32_t* dst = (uint32_t*)(out + r * W);
        memset(dst, 0, W * 8);
        i64 k = 0;
#ifdef __AVX2__
        for (; k + 32 <= K; k += 32)
            dst[k / 32] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(ld(src + k), 7));
#endif
        for (; k < K; ++k) dst[k / 32] |= (uint32_t)(src[k] != 0) << (k & 31);
    }
}

// --- Activation quantization, bit-identical to lowbit's torch path for symmetric per-token int8
// (integer.fit + scales.runtime_scale + integer.encode): s = max|x| / qmax in fp32; NaN -> min_scale,
// +inf -> max_scale, then s = max(s, min_scale); q = clamp(rint(x / s), -qmax - 1, qmax) (rint: ties to even,
// as torch.round). A row containing NaN gets s = min_scale and its NaN entries code 0.
#ifdef __AVX2__
// Lanes [0, n) of a vector (n <= 8): the mask of a short row's tail, for masked loads (the other lanes read as 0).
static inline __m256i first_lanes(i64 n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

static inline float row_scale_i8(const float* xr, i64 K, float qmax, float min_scale, float max_scale,
                                 bool* has_nan = nullptr) {
    float amax = 0.0f;
    bool nan = false;
    i64 k = 0;
    // Vectors: the largest |x| bit pattern as an unsigned integer (row_abs_bits; the AVX2 loop below the same): a
    // pattern above +inf says the row holds a NaN (its scale is then min_scale, whatever the maximum), else it is
    // the scalar loop's max.
#if defined(LB_VNNI)
    {
        const uint32_t bits = row_abs_bits(xr, K);
        nan = bits > 0x7f800000u;
        if (!nan) memcpy(&amax, &bits, 4);
        k = K;
    }
#elif defined(__AVX2__)
    {
        const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
        __m256i m0 = _mm256_setzero_si256();
        for (; k < K; k += 8) {  // the tail as a masked load: zero lanes leave the maximum as it is
            const __m256i v = k + 8 <= K ? _mm256_loadu_si256((const __m256i*)(xr + k))
                                         : _mm256_maskload_epi32((const int*)(xr + k), first_lanes(K - k));
            m0 = _mm256_max_epu32(m0, _mm256_and_si256(v, absmask));
        }
        __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(m0), _mm256_extracti128_si256(m0, 1));
        m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4e));
        m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xb1));
        const uint32_t bits = (uint32_t)_mm_cvtsi128_si32(m4);
        nan = bits > 0x7f800000u;
        if (!nan) memcpy(&amax, &bits, 4);
        k = K;
    }
#endif
    for (; k < K; ++k) {
        const float a = fabsf(xr[k]);
        nan |= a != a;
        amax = a > amax ? a : amax;
    }
    if (has_nan) *has_nan = nan;
    float s = amax / qmax;
    if (nan) s = min_scale;
    else if (s == INFINITY) s = max_scale;
    return s < min_scale ? min_scale : s;
}

#ifdef LB_VNNI
// x / s for 16 lanes, the IEEE quotient bit for bit, without a division where s lies in [2^-60, 2^60]: q0 = x * r
// (r = 1 / s rounded) is within an ulp of x / s, the remainder x - q0 * s is exact (one fused multiply-add), and
// q0 + remainder * r rounded once is the correctly rounded quotient (Markstein's theorem; checked against the
// division on every significand of x for 24 scales and 4e8 random pairs, session 22). Lanes whose q0 is not finite
// keep it: x = +-inf or NaN, and a finite x whose quotient overflows (+-inf, as the division gives; the remainder
// would be -+inf and the correction NaN). Quotients of |x| < 2^-100 may differ from the division's in
// their last bit; they round to code 0 either way. A division costs p0 8 cycles a vector on Sapphire Rapids: the
// int8 row quantizer ran 1.3x faster without it.
struct Quot16 {
    __m512 vs, vr;
    bool recip;
    explicit Quot16(float s)
        : vs(_mm512_set1_ps(s)), vr(_mm512_set1_ps(1.0f / s)), recip(s >= 0x1p-60f && s <= 0x1p60f) {}
    __attribute__((always_inline)) inline __m512 operator()(__m512 x) const {
        if (!recip) return _mm512_div_ps(x, vs);
        const __m512 q0 = _mm512_mul_ps(x, vr);
        const __m512 e = _mm512_fnmadd_ps(q0, vs, x);  // x - q0 * s, exact
        const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(q0), _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
        return _mm512_mask3_fmadd_ps(e, vr, q0, finite);
    }
};
#endif

static inline float code_i8(float x, float s, float qmax) {
    const float v = rintf(x / s);
    return v < -qmax - 1.0f ? -qmax - 1.0f : v > qmax ? qmax : v;  // NaN stays NaN
}
#ifdef __AVX2__
// The same for 8 lanes: IEEE division and round-half-even are what the scalar code does, so the bits agree.
static inline __m256 code_i8x8(__m256 x, __m256 s, __m256 lo, __m256 hi) {
    const __m256 v = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(hi, _mm256_max_ps(lo, v));  // max/min return their 2nd operand on NaN: NaN stays
}
#endif

// nan_rows (optional): 1 for each row holding a NaN (its codes are 0 there), else 0.
static void quantize_rows_i8(const float* x, i64 M, i64 K, float qmax, float min_scale, float max_scale, int8_t* xq,
                             float* sx, uint8_t* nan_rows) {
    for (i64 m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        bool nan = false;
        const float s = sx[m] = row_scale_i8(xr, K, qmax, min_scale, max_scale, &nan);
        if (nan_rows) nan_rows[m] = nan;
        int8_t* q = xq + m * K;
        i64 k = 0;
#ifdef LB_VNNI
        {  // 16 lanes: the same division, rounding and clamp; NaN lanes -> code 0
            const Quot16 quot(s);
            const __m512 lo = _mm512_set1_ps(-qmax - 1.0f), hi = _mm512_set1_ps(qmax);
            for (; k < K; k += 16) {
                const __mmask16 live = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
                const __m512 x16 = _mm512_maskz_loadu_ps(live, xr + k);
                const __m512 r = _mm512_roundscale_ps(quot(x16), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, r));  // NaN stays (2nd operand)
                const __m512i i = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);
                _mm_mask_storeu_epi8(q + k, live, _mm512_cvtsepi32_epi8(i));
            }
        }
#endif
#ifdef __AVX2__
        const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-qmax - 1.0f), hi = _mm256_set1_ps(qmax);
        for (; k < K; k += 8) {
            const bool full = k + 8 <= K;  // else the tail: a masked load, and only its codes stored
            __m256 v = code_i8x8(full ? _mm256_loadu_ps(xr + k) : _mm256_maskload_ps(xr + k, first_lanes(K - k)), vs,
                                 lo, hi);
            v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> code 0
            const __m256i i = _mm256_cvtps_epi32(v);                 // exact: v is an integer in [-128, 127]
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
            const __m128i b = _mm_packs_epi16(w, w);
            if (full) {
                _mm_storel_epi64((__m128i*)(q + k), b);
            } else {
                int8_t t[16];
                _mm_storeu_si128((__m128i*)t, b);
                memcpy(q + k, t, K - k);
            }
        }
#endif
        for (; k < K; ++k) {
            const float v = code_i8(xr[k], s, qmax);
            q[k] = v == v ? (int8_t)v : 0;
        }
    }
}

LB_API void lb_quantize_rows_i8(const float* x, i64 M, i64 K, float qmax, float min_scale, float max_scale,
                                int8_t* xq, float* sx) {
    quantize_rows_i8(x, M, K, qmax, min_scale, max_scale, xq, sx, nullptr);
}

// The same quantizer, dequantized in place of the codes (out = code * s in fp32, NaN kept): what the simulated
// activation quantizer returns, in one pass (the dense fallback of a packed layer with int8 activations).
LB_API void lb_fake_quant_rows_i8(const float* x, i64 M, i64 K, float qmax, float min_scale, float max_scale,
                                  float* out) {
    for (i64 m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        const float s = row_scale_i8(xr, K, qmax, min_scale, max_scale);
        float* o = out + m * K;
        i64 k = 0;
#ifdef __AVX2__
        const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-qmax - 1.0f), hi = _mm256_set1_ps(qmax);
        for (; k < K; k += 8) {
            if (k + 8 <= K) {
                _mm256_storeu_ps(o + k, _mm256_mul_ps(code_i8x8(_mm256_loadu_ps(xr + k), vs, lo, hi), vs));
            } else {  // the tail: masked load and store
                const __m256i tail = first_lanes(K - k);
                const __m256 v = code_i8x8(_mm256_maskload_ps(xr + k, tail), vs, lo, hi);
                _mm256_maskstore_ps(o + k, tail, _mm256_mul_ps(v, vs));
            }
        }
#endif
        for (; k < K; ++k) o[k] = code_i8(xr[k], s, qmax) * s;
    }
}

// Static per-tensor int8 activations with a zero point (the simulated ActQuantizer's encode: rint(x / s + z)
// clamped to [qmin, qmax], in IEEE division and round-half-even, so the same codes), stored as the signed code
// q - (qmin + 128) with row scale s; NaN: code 0 and a NaN row, as quantize_rows_i8.
static void quantize_rows_static(const float* x, i64 M, i64 K, float s, float z, float qmin, float qmax, int8_t* xq,
                                 float* sx, uint8_t* nan_rows) {
    const float off = qmin + 128.0f;
    for (i64 m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        int8_t* q = xq + m * K;
        sx[m] = s;
        bool nan = false;
        i64 k = 0;
#ifdef __AVX2__
        const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vo = _mm256_set1_ps(off);
        const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
        __m256 bad = _mm256_setzero_ps();
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), vs), vz);
            v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));  // NaN stays NaN (2nd operand)
            const __m256 ok = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
            bad = _mm256_or_ps(bad, _mm256_xor_ps(ok, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
            v = _mm256_and_ps(_mm256_sub_ps(v, vo), ok);  // NaN -> code 0
            const __m256i i = _mm256_cvtps_epi32(v);      // exact: an integer in [-128, 127]
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
            _mm_storel_epi64((__m128i*)(q + k), _mm_packs_epi16(w, w));
        }
        nan = _mm256_movemask_ps(bad) != 0;
#endif
        for (; k < K; ++k) {
            float v = rintf(xr[k] / s + z);
            v = v < qmin ? qmin : v > qmax ? qmax : v;  // NaN stays NaN
            if (v != v) nan = true;
            q[k] = v == v ? (int8_t)(v - off) : 0;
        }
        if (nan_rows) nan_rows[m] = nan;
    }
}

// --- Low-bit float (ExMy: FP8 E4M3 / E5M2, FP6, FP4) per-row fake quantization, bit-identical to lowbit's torch
// path (lowfloat.fit with runtime scales, lowfloat.encode / decode): s = row_scale_i8(x, max_value) (amax / max,
// the same guards); v = x / s; mag = min(|v|, max); e = clamp(floor(log2(max(mag, 2^emin))), emin, emax) (read
// from the exponent bits: exact where torch's log2 rounds up to the next power of two, the rounding below then
// lands on that same power of two); step = 2^(e - man); r = min(rint(mag / step) * step, max); out = ±r * s.
// A zero result is +0 and a NaN input gives +max * s, as the torch path's code lookup does.
static inline float fp_code_value(float v, int man, int emin, int emax, float maxv) {
    if (v != v) return maxv;
    float mag = fabsf(v);
    mag = mag > maxv ? maxv : mag;
    const float t = mag < ldexpf(1.0f, emin) ? ldexpf(1.0f, emin) : mag;
    int e;
    frexpf(t, &e);  // t = f * 2^e, f in [0.5, 1): floor(log2 t) = e - 1
    e = std::min(emax, std::max(emin, e - 1));
    const float step = ldexpf(1.0f, e - man);
    float r = rintf(mag / step) * step;
    r = r > maxv ? maxv : r;
    return (v < 0.0f && r != 0.0f) ? -r : r;
}

// The vector forms below round v = x / s with one addition: clamped to [-max, max] (NaN -> +max), v + c - c with c =
// sign(v) * 2^(e + 23 - man), e = max(floor(log2 |v|), emin): c's ulp is v's grid step, so the sum rounds v to the
// grid (half to even, as rint(|v| / step) * step), the difference is exact, and a zero result is +0 (x - x in
// round-to-nearest). The same values as fp_code_value, lane by lane.
#ifdef __AVX2__
// 8 values of a row with scale s rounded to the low-bit float grid: the codes' values v = x / s on the grid,
// unscaled (times s: the fake-quantized values).
struct FpGrid8 {
    __m256 vs, vmax, vmin, absmask, signmask;
    __m256i lo, shift;
    FpGrid8(float s, int man, int emin, int, float maxv)
        : vs(_mm256_set1_ps(s)), vmax(_mm256_set1_ps(maxv)), vmin(_mm256_set1_ps(-maxv)),
          absmask(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))),
          signmask(_mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u))), lo(_mm256_set1_epi32(emin + 127)),
          shift(_mm256_set1_epi32(23 - man)) {}
    __attribute__((always_inline)) inline __m256 operator()(__m256 xv) const {
        const __m256 v = _mm256_max_ps(_mm256_min_ps(_mm256_div_ps(xv, vs), vmax), vmin);  // NaN -> max (2nd operand)
        const __m256i eb = _mm256_max_epi32(_mm256_srli_epi32(_mm256_castps_si256(_mm256_and_ps(v, absmask)), 23), lo);
        const __m256 c = _mm256_or_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(eb, shift), 23)),
                                      _mm256_and_ps(v, signmask));
        return _mm256_sub_ps(_mm256_add_ps(v, c), c);
    }
};
#endif

#ifdef LB_VNNI
// The same grid for 16 values (AVX-512).
struct FpGrid16 {
    Quot16 quot;
    __m512 vs, vmax, vmin;
    __m512i lo, shift, absmask, signmask;
    FpGrid16(float s, int man, int emin, int, float maxv)
        : quot(s), vs(_mm512_set1_ps(s)), vmax(_mm512_set1_ps(maxv)), vmin(_mm512_set1_ps(-maxv)),
          lo(_mm512_set1_epi32(emin + 127)), shift(_mm512_set1_epi32(23 - man)), absmask(_mm512_set1_epi32(0x7fffffff)),
          signmask(_mm512_set1_epi32((int)0x80000000u)) {}
    __attribute__((always_inline)) inline __m512 operator()(__m512 xv) const {
        const __m512 v = _mm512_max_ps(_mm512_min_ps(quot(xv), vmax), vmin);  // NaN -> max (2nd operand)
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i eb = _mm512_max_epi32(_mm512_srli_epi32(_mm512_and_si512(bits, absmask), 23), lo);
        const __m512i cb = _mm512_slli_epi32(_mm512_add_epi32(eb, shift), 23);
        // c = cb | (bits & sign)
        const __m512 c = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(cb, bits, signmask, 0xF8));
        return _mm512_sub_ps(_mm512_add_ps(v, c), c);
    }
};
#endif

LB_API void lb_fake_quant_rows_fp(const float* x, i64 M, i64 K, int man, int emin, int emax, float maxv,
                                  float min_scale, float max_scale, float* out) {
    for (i64 m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        const float s = row_scale_i8(xr, K, maxv, min_scale, max_scale);
        float* o = out + m * K;
        i64 k = 0;
#ifdef __AVX2__
#ifdef LB_VNNI
        const FpGrid16 grid16(s, man, emin, emax, maxv);
        for (; k + 16 <= K; k += 16)
            _mm512_storeu_ps(o + k, _mm512_mul_ps(grid16(_mm512_loadu_ps(xr + k)), grid16.vs));
#endif
        const FpGrid8 grid(s, man, emin, emax, maxv);
        for (; k + 8 <= K; k += 8) _mm256_storeu_ps(o + k, _mm256_mul_ps(grid(_mm256_loadu_ps(xr + k)), grid.vs));
        if (k < K) {  // the tail as a masked load and store (its zero lanes are not stored)
            const __m256i lanes = first_lanes(K - k);
            _mm256_maskstore_ps(o + k, lanes, _mm256_mul_ps(grid(_mm256_maskload_ps(xr + k, lanes)), grid.vs));
            k = K;
        }
#endif
        for (; k < K; ++k) o[k] = fp_code_value(xr[k] / s, man, emin, emax, maxv) * s;
    }
}

#ifdef LB_AMX_BF16
// The same rows as their codes' values in bf16 (exact: a low-bit float has at most 4 significant bits, and its
// exponent range lies inside bf16's normal range), unscaled, row stride ld (k in [K, ld) left as they are), and
// the rows' scales in sx: lb_fake_quant_rows_fp's output is code * s.
static void fp_code_rows_bf16(const float* x, i64 M, i64 K, int man, int emin, int emax, float maxv,
                              float min_scale, float max_scale, uint16_t* out, i64 ld, float* sx) {
    for (i64 m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        const float s = row_scale_i8(xr, K, maxv, min_scale, max_scale);
        sx[m] = s;
        uint16_t* o = out + m * ld;
        const FpGrid16 grid(s, man, emin, emax, maxv);
        i64 k = 0;
        for (; k + 16 <= K; k += 16)
            _mm256_storeu_si256((__m256i*)(o + k), (__m256i)_mm512_cvtneps_pbh(grid(_mm512_loadu_ps(xr + k))));
        if (k < K) {  // the tail as a masked load and store
            const __mmask16 live = (__mmask16)((1u << (K - k)) - 1);
            const __m256i c = (__m256i)_mm512_cvtneps_pbh(grid(_mm512_maskz_loadu_ps(live, xr + k)));
            _mm256_mask_storeu_epi16(o + k, live, c);
            k = K;
        }
        for (; k < K; ++k) {
            const float r = fp_code_value(xr[k] / s, man, emin, emax, maxv);
            uint32_t bits;
            memcpy(&bits, &r, 4);
            o[k] = (uint16_t)(bits >> 16);
        }
    }
}
#endif

// --- Signs of activation rows in the pack_signs layout (x >= 0 -> bit 1; NaN -> 0), straight from fp32, and,
// when scale != NULL, the rows' mean |x| guarded as lowbit's runtime scales (NaN -> min_scale, +inf -> max_scale,
// then >= min_scale). The mean is accumulated in double, so it can differ from torch's fp32 mean in the last bit.
LB_API void lb_sign_rows(const float* x, i64 R, i64 K, uint64_t* out, float* scale, float min_scale,
                         float max_scale) {
    const i64 W = (K + 255) / 256 * 4;
    for (i64 r = 0; r < R; ++r) {
        const float* src = x + r * K;
        uint32_t* dst = (uint32_t*)(out + r * W);
        memset(dst, 0, W * 8);
        i64 k = 0;
        double acc = 0.0;
#ifdef __AVX2__
        const __m256 zero = _mm256_setzero_ps();
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
        for (; k + 32 <= K; k += 32) {
            uint32_t bits = 0;
            for (int j = 0; j < 4; ++j) {
                const __m256 v = _mm256_loadu_ps(src + k + 8 * j);
                bits |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ)) << (8 * j);
                const __m256 av = _mm256_and_ps(v, absmask);
                a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(av)));
                a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(av, 1)));
            }
            dst[k / 32] = bits;
        }
        double t[4];
        _mm256_storeu_pd(t, _mm256_add_pd(a0, a1));
        acc = (t[0] + t[1]) + (t[2] + t[3]);
#endif
        for (; k < K; ++k) {
            dst[k / 32] |= (uint32_t)(src[k] >= 0.0f) << (k & 31);
            acc += fabs((double)src[k]);
        }
        if (scale) {
            float s = (float)(acc / (double)K);
            if (s != s) s = min_scale;
            else if (s == INFINITY) s = max_scale;
            scale[r] = s < min_scale ? min_scale : s;
        }
    }
}

// --- W1A8 (sign-select): s1 = sum_{bit=1} xq; y = (sx[m] * a[n]) * (float)(2*s1 - sum_k xq)
template <int MT>
static inline void w1a8_tile(const uint8_t* w, i64 Kp, const int8_t* x, const int32_t* sxr, const float* sx, float a,
                             float* y, i64 N) {
    int32_t s1[MT];
#ifdef __AVX2__
    // x holds the permuted activations (see lb_w1a8): for block b and shift s, x[256b + 32s .. +31].
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
    __m256i a32[MT];
    for (int m = 0; m < MT; ++m) a32[m] = zero;
    for (i64 k0 = 0; k0 < Kp; k0 += 256 * 8) {  // flush int16 sums every 8 blocks: 64 * 256 < 2^15
        const i64 k1 = std::min(Kp, k0 + 256 * 8);
        __m256i a16[MT];
        for (int m = 0; m < MT; ++m) a16[m] = zero;
        for (i64 k = k0; k < k1; k += 256) {
            if ((k & 511) == 0) LB_PF(w + k / 8);
            const __m256i v = ld(w + k / 8);
#pragma GCC unroll 8
            for (int s = 0; s < 8; ++s) {
                const __m256i b = _mm256_and_si256(_mm256_srli_epi16(v, s), ones8);  // bit s of each byte as 0/1
                for (int m = 0; m < MT; ++m)
                    a16[m] = keep(_mm256_add_epi16(a16[m], _mm256_maddubs_epi16(b, ld(x + m * Kp + k + 32 * s))));
            }
        }
        for (int m = 0; m < MT; ++m) a32[m] = _mm256_add_epi32(a32[m], _mm256_madd_epi16(a16[m], ones16));
    }
    for (int m = 0; m < MT; ++m) s1[m] = hsum_epi32(a32[m]);
#else
    const uint32_t* w32 = (const uint32_t*)w;
    for (int m = 0; m < MT; ++m) {
        int32_t t = 0;
        for (i64 k = 0; k < Kp; ++k) {
            const i64 blk = k >> 8, r = k & 255;
            if ((w32[blk * 8 + (r & 7)] >> (r >> 3)) & 1) t += x[m * Kp + k];
        }
        s1[m] = t;
    }
#endif
    for (int m = 0; m < MT; ++m) y[m * N] = (sx[m] * a) * (float)(2 * s1[m] - sxr[m]);
}

LB_API void lb_w1a8(const int8_t* xq, const float* sx, i64 M, i64 K, const uint8_t* w, const float* a, i64 N, float* y,
                    int threads) {
    const i64 Kp = (K + 255) / 256 * 256;
    int8_t* xp = (int8_t*)scratch(M * Kp);
    int32_t* sxr = (int32_t*)scratch(sizeof(int32_t) * M);
    for (i64 m = 0; m < M; ++m) {
        const int8_t* src = xq + m * K;
        int8_t* dst = xp + m * Kp;
        int32_t t = 0;
        for (i64 k = 0; k < K; ++k) t += src[k];
        sxr[m] = t;
#ifdef __AVX2__
        // permuted copy: dst[base + 32s + P] = src[base + 64(P%4) + 8s + P/4]
        for (i64 base = 0; base < Kp; base += 256)
            for (int s = 0; s < 8; ++s)
                for (int P = 0; P < 32; ++P) {
                    const i64 k = base + 64 * (P & 3) + 8 * s + (P >> 2);
                    dst[base + 32 * s + P] = k < K ? src[k] : 0;
                }
#else
        memcpy(dst, src, K);
#endif
    }
    run_rows(M, N, threads, w, Kp / 8, [=](auto mt, i64 m, i64 n) {
        w1a8_tile<decltype(mt)::value>(w + n * (Kp / 8), Kp, xp + m * Kp, sxr + m, sx + m, a[n], y + m * N + n, N);
    });
    free(xp);
    free(sxr);
}

// --- W1A32 (sign-select, fp32): s1 = sum_{bit=1} x; y = a[n] * (2*s1 - sum_k x)
template <int MT>
static inline void w1a32_tile(const uint8_t* w, i64 Kp, const float* x, const float* sxr, float a, float* y, i64 N) {
    float s1[MT];
#ifdef __AVX2__
    const __m256 zero = _mm256_setzero_ps();
    constexpr int A = MT == 1 ? 4 : 2;
    __m256 acc[MT][A];
    for (int m = 0; m < MT; ++m)
        for (int i = 0; i < A; ++i) acc[m][i] = zero;
    for (i64 k = 0; k < Kp; k += 256) {
        if ((k & 511) == 0) LB_PF(w + k / 8);
        __m256i v = ld(w + k / 8);
        for (int j = 31; j >= 0; --j) {  // bit j of every lane is now the sign bit
            const __m256 msk = _mm256_castsi256_ps(v);
            for (int m = 0; m < MT; ++m)
                acc[m][j % A] = _mm256_add_ps(acc[m][j % A], _mm256_blendv_ps(zero, _mm256_loadu_ps(x + m * Kp + k + 8 * j), msk));
            v = _mm256_add_epi32(v, v);
        }
    }
    for (int m = 0; m < MT; ++m) {
        __m256 t = acc[m][0];
        for (int i = 1; i < A; ++i) t = _mm256_add_ps(t, acc[m][i]);
        s1[m] = hsum_ps(t);
    }
#else
    const uint32_t* w32 = (const uint32_t*)w;
    for (int m = 0; m < MT; ++m) {
        float t = 0.f;
        for (i64 k = 0; k < Kp; ++k) {
            const i64 blk = k >> 8, r = k & 255;
            if ((w32[blk * 8 + (r & 7)] >> (r >> 3)) & 1) t += x[m * Kp + k];
        }
        s1[m] = t;
    }
#endif
    for (int m = 0; m < MT; ++m) y[m * N] = a * (2.f * s1[m] - sxr[m]);
}

#ifdef __AVX512F__
// The same sums on AVX-512 with the code bits as write masks: bits 0-15 and 16-31 of word l of a 256-code block
// (codes k0 + 8j + l, j = 0..31) are the masks of 16 lanes each, added into 16-lane sums of x from xt, the rows
// with each block transposed (xt[k0 + 32l + j] = x[k0 + 8j + l]) so that a mask's lanes are 16 consecutive
// values. One masked add per 16 codes, the masks loaded straight from the weights: no widening or blend (the
// 8-lane blend loop ran ~5 codes a cycle, holding a one-row 4096 x 4096 layer to ~2x fp32).
template <int MT>
static inline void w1a32_tile16(const uint8_t* w, i64 Kp, const float* xt, const float* sxr, float a, float* y,
                                i64 N) {
    __m512 acc[MT][8];
    for (int m = 0; m < MT; ++m)
        for (int l = 0; l < 8; ++l) acc[m][l] = _mm512_setzero_ps();
    for (i64 k = 0; k < Kp; k += 256) {
        if ((k & 511) == 0) LB_PF(w + k / 8);
        const uint8_t* wm = w + k / 8;
#pragma GCC unroll 8
        for (int l = 0; l < 8; ++l) {
            const __mmask16 lo = mask_at(wm + 4 * l), hi = mask_at(wm + 4 * l + 2);
            for (int m = 0; m < MT; ++m) {
                const float* xm = xt + m * Kp + k + 32 * l;
                acc[m][l] = _mm512_mask_add_ps(acc[m][l], lo, acc[m][l], _mm512_loadu_ps(xm));
                acc[m][l] = _mm512_mask_add_ps(acc[m][l], hi, acc[m][l], _mm512_loadu_ps(xm + 16));
            }
        }
    }
    for (int m = 0; m < MT; ++m) {
        __m512 t = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
        t = _mm512_add_ps(t, _mm512_add_ps(_mm512_add_ps(acc[m][4], acc[m][5]), _mm512_add_ps(acc[m][6], acc[m][7])));
        y[m * N] = a * (2.f * _mm512_reduce_add_ps(t) - sxr[m]);
    }
}
#endif

LB_API void lb_w1a32(const float* x, i64 M, i64 K, const uint8_t* w, const float* a, i64 N, float* y, int threads) {
    const i64 Kp = (K + 255) / 256 * 256;
    float* sxr = (float*)scratch(sizeof(float) * M);
    for (i64 m = 0; m < M; ++m) {
        float t = 0.f;
        for (i64 k = 0; k < K; ++k) t += x[m * K + k];
        sxr[m] = t;
    }
#ifdef __AVX512F__
    float* xt = (float*)scratch(sizeof(float) * M * Kp);  // zero past K, as the padded codes read it
    for (i64 m = 0; m < M; ++m)
        for (i64 k = 0; k < K; ++k) xt[m * Kp + (k & ~(i64)255) + 32 * (k & 7) + ((k & 255) >> 3)] = x[m * K + k];
    run_rows(M, N, threads, w, Kp / 8, [=](auto mt, i64 m, i64 n) {
        w1a32_tile16<decltype(mt)::value>(w + n * (Kp / 8), Kp, xt + m * Kp, sxr + m, a[n], y + m * N + n, N);
    });
    free(xt);
#else
    float* own;
    const float* xp = pad_rows(x, M, K, Kp, &own);
    run_rows(M, N, threads, w, Kp / 8, [=](auto mt, i64 m, i64 n) {
        w1a32_tile<decltype(mt)::value>(w + n * (Kp / 8), Kp, xp + m * Kp, sxr + m, a[n], y + m * N + n, N);
    });
    free(own);
#endif
    free(sxr);
}

// ================================================================================================
// One call per layer forward: lb_linear(L, x, M, y, threads, bias) = act_quant(x) · W^T (+ bias), fp32 in / out.
//   The activation quantization of the layer (int8 per row, or signs + mean |x| per row) happens here, in the
//   same expressions as lb_quantize_rows_i8 / lb_sign_rows, then the weight kernel runs; so a Python caller
//   pays one foreign call per layer instead of three to five tensor operations.
//   Real-valued (non-integer) zero points of group-wise weights: the blob holds zero points 0 and `sz` the
//   (G, N) fp32 products s_g * z_g; the kernel result is corrected by y[m,n] -= sum_g sz[g,n] * X[m,g], with
//   X[m,g] the group sum of the activations the kernel saw (sx[m] * sum xq for int8, sum x for fp32).
// ================================================================================================
enum { LB_W8 = 1, LB_WN = 2, LB_TERNARY = 3, LB_BIN_BLOCKED = 4, LB_BIN_INTER = 5, LB_FP8 = 6 };
enum { LB_ACT_F32 = 0, LB_ACT_I8 = 1, LB_ACT_SIGN = 2, LB_ACT_FP = 3, LB_ACT_I8S = 4 };

struct lb_layer {
    int32_t wkind, akind;     // LB_W8 ... / LB_ACT_...
    i64 N, K, ld;             // ld: Kp (W8) or row_bytes (WN); unused otherwise
    const void* w;            // weight layout of native.py's prepare_*
    const float* s;           // per-row scales (W8, TERNARY, BIN_*)
    const float* sz;          // WN with real zero points: (G, N) s*z (transposed), else NULL
    int32_t bits, group;      // WN
    float qmax, min_scale, max_scale;  // activation quantizer (I8: qmax; SIGN: min_scale > 0 -> mean |x| scale)
    int32_t sign_scale;       // SIGN: 1 -> per-row mean |x| scale, 0 -> scale 1
    const int8_t* wp;         // I8 activations on W8 / TERNARY / WN: the int8 codes (WN: q - z) as 16-column
    const float* sp;          //   panels, or NULL (from PANEL_ROWS / TERNARY_PANEL_ROWS / WN_PANEL_ROWS rows on);
    i64 pld;                  //   their scales padded to 16 columns (WN: per panel and group); the panels' K
    const int32_t* ws;        //   and their column sums (W8 / TERNARY: per column; WN: per panel, group, column)
    int32_t fp_man, fp_emin, fp_emax;  // FP activations (ExMy per row, max value in qmax): mantissa bits, exponents
    const float* xs;          // per-input-channel scale (K,) applied before activation quantization (AWQ / SmoothQuant
                              // where nothing absorbs it), or NULL
    // I8S (static per-tensor int8, zero point or none): q = clamp(rint(x / *sa + *za), qmin, qmax) and the kernels
    // see the signed code q - (qmin + 128) with row scale *sa (asymmetric codes 0..255 -> -128..127; symmetric ones
    // as they are); the constant *sa * (qmin + 128 - *za) * wsum[n] per output (wsum[n] = sum_k W[n,k]) is added
    // before the bias. sa / za point at the quantizer's calibrated values (read per call; za NULL: zero 0).
    const float* sa;
    const float* za;
    float qmin;
    const float* wsum;
};

LB_API int lb_layer_size(void) { return (int)sizeof(lb_layer); }

static void sz_correct(const lb_layer* L, const float* x, const int8_t* xq, const float* sx, i64 M, float* y,
                       int threads) {
    const i64 K = L->K, N = L->N, g = L->group, G = K / g;
    float* X = (float*)scratch(sizeof(float) * M * G);
    for (i64 m = 0; m < M; ++m)
        for (i64 j = 0; j < G; ++j) {
            if (xq) {
                int32_t t = 0;
                for (i64 i = 0; i < g; ++i) t += xq[m * K + j * g + i];
                X[m * G + j] = sx[m] * (float)t;
            } else {
                float t = 0.f;
                for (i64 i = 0; i < g; ++i) t += x[m * K + j * g + i];
                X[m * G + j] = t;
            }
        }
    // sz is (G, N): 64 outputs at a time, each sum over the groups in order (vectorised across outputs).
    lb_parallel(nthreads(threads), M * N * G > 65536, [&] {
        i64 lo_, hi_;
        my_rows((N + 63) / 64, 1, &lo_, &hi_);
        for (i64 n0 = 64 * lo_; n0 < std::min(N, 64 * hi_); n0 += 64) {
            const i64 nn = std::min<i64>(64, N - n0);
            for (i64 m = 0; m < M; ++m) {
                float t[64] = {};
                for (i64 j = 0; j < G; ++j) {
                    const float xv = X[m * G + j], *szj = L->sz + j * N + n0;
                    for (i64 n = 0; n < nn; ++n) t[n] += szj[n] * xv;
                }
                for (i64 n = 0; n < nn; ++n) y[m * N + n0 + n] -= t[n];
            }
        }
    });
    free(X);
}

// W1A1 on many rows on AMX tiles: the signs as +1 / -1 int8 rows against panels of the weights' +1 / -1 codes (built
// from lb_panel_rows(LB_BIN_BLOCKED) rows on where the tiles are on). The int32 sums are lb_w1a1's K - 2 popcount(x
// XOR w), and amx_store's (bs[m] * a[n]) * (float)sum its expression (the bias then added alone, as it adds it): the
// same bits. False where it does not apply (no panels, too few rows, tiles off, out of memory): lb_w1a1 runs.
static bool w1a1_amx(const lb_layer* L, const uint64_t* xb, const float* sx, i64 M, float* y, int threads,
                     const float* bias) {
#ifdef LB_AMX
    if (!L->wp || M < AMX_SIGN_ROWS || L->pld % 32 || !amx_on()) return false;
    const i64 K = L->K, N = L->N, Kp = L->pld, Kq = (Kp + 63) / 64 * 64, Mt = (M + 31) / 32 * 32;
    int8_t* a = amx_sign_rows(xb, (K + 255) / 256 * 4, M, K, Mt, Kq);
    if (!a) return false;
    amx_run(a, Kq, M, N, Kp, threads, amx_w8_tile(L->wp, L->sp, sx, N, Kp, y, N, 1, bias));
    free(a);
    return true;
#else
    (void)L, (void)xb, (void)sx, (void)M, (void)y, (void)threads, (void)bias;
    return false;
#endif
}

#ifdef LB_AMX_BF16
// --- FP8 weights with FP8 (low-bit float) activations on many rows: AMX-BF16 tiles. Both sides' codes are exact in
// bf16 (an FP8 value has at most 4 significant bits; E4M3 and E5M2 exponents, subnormals included, lie inside
// bf16's normal range) and so is each product in fp32 (8 significant bits): tdpbf16ps sums them in fp32, and
// y = (sx[m] * sp[n]) * sum (+ bias) is the simulated layer's product up to fp32 summation order, as the fp32
// panel kernel's. The FP8 panels are decoded per call into bf16 panels (exact; 2 bytes a weight), a chunk of panels
// at a time per thread (fp8_amx_run).

// From this many rows FP8 layers with low-bit float activations run on the tiles (when the CPU, compiler and Linux
// allow them). One thread, us, tiles vs the register path (fp8_rows_run), FP8 weights and activations: 384 x 1536 at
// 4 rows 65 vs 50, 8 rows 66 vs 77, 12 rows 67 vs 114; 4096 x 4096 at 8 rows 2489 vs 2211, 12 rows 2474 vs 3455;
// 1024 x 128 at 8 rows 18 vs 19, 12 rows 20 vs 29.
static constexpr i64 FP8_AMX_ROWS = 10;

static bool fp8_amx_rows(const lb_layer* L, i64 M) {
    return L->wkind == LB_FP8 && L->akind == LB_ACT_FP && L->fp_man <= 3 && L->wp && M >= FP8_AMX_ROWS &&
           L->pld % 32 == 0 && amx_on();
}

// Panels [p0, p1) of FP8 bytes wp (panel row q: 16 columns x 4 k) as bf16 panels for tdpbf16ps from out on (panel
// p0 first): rows 2q (k = 4q, 4q + 1 of each column) and 2q + 1 (4q + 2, 4q + 3), 16 * Kp values a panel: one byte shuffle puts each pair's
// bytes in the high bytes of a column's 32-bit lane, then the shift decode (fp8_bf16_lanes, exact). The values are
// the codes' times 2^8 (E4M3) / 2^16 (E5M2): fp8_bf16_scale gives the factor the sums take back.
template <int FPE>
static void fp8_bf16_panels(const int8_t* wp, i64 p0, i64 p1, i64 Kp, uint16_t* out) {
    const __m512i k01 = _mm512_broadcast_i32x4(_mm_setr_epi8(-1, 0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13));
    const __m512i k23 = _mm512_broadcast_i32x4(_mm_setr_epi8(-1, 2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15));
    for (i64 p = p0; p < p1; ++p) {
        const int8_t* w = wp + p * 16 * Kp;
        uint16_t* o = out + (p - p0) * 16 * Kp;
        for (i64 q = 0; q < Kp / 4; ++q) {
            const __m512i v = _mm512_loadu_si512(w + 64 * q);
            __m512i r0 = _mm512_shuffle_epi8(v, k01), r1 = _mm512_shuffle_epi8(v, k23);
            fp8_bf16_lanes<FPE>(v, r0, r1);
            _mm512_storeu_si512(o + 64 * q, r0);
            _mm512_storeu_si512(o + 64 * q + 32, r1);
        }
    }
}

// The factor that takes sums over fp8_bf16_panels' values back to the codes' (2^-8 for E4M3, 2^-16 for E5M2; exact
// unless the result is itself below fp32's normal range).
static inline float fp8_bf16_scale(int fpe) { return fpe == 4 ? 0x1p-8f : fpe == 5 ? 0x1p-16f : 1.0f; }

// FP8 layer L's panels decoded into bf16 panels for the tiles (scratch: free() it), NULL when out of memory.
static uint16_t* fp8_bf16_weights(const lb_layer* L, int threads) {
    const i64 Kp = L->pld, P = (L->N + 15) / 16;
    uint16_t* wb = (uint16_t*)scratch_uninit(sizeof(uint16_t) * P * 16 * Kp);
    if (!wb) return nullptr;
    lb_parallel(nthreads(threads), threads != 1 && P * 16 * Kp >= (1 << 16), [&] {
        i64 lo, hi;
        my_rows(P, 1, &lo, &hi);
        if (L->bits == 4) fp8_bf16_panels<4>(L->wp, lo, hi, Kp, wb + lo * 16 * Kp);
        else fp8_bf16_panels<5>(L->wp, lo, hi, Kp, wb + lo * 16 * Kp);
    });
    return wb;
}

// A thread's buffer for one chunk of panels decoded to bf16 (amx_run's on_chunk), kept for the thread's life and
// grown as needed: a fresh scratch for the whole layer per call (2 bytes a weight) cost its page faults every call
// (4096 x 4096 at 16 rows: 3.1-13.9 ms a call, against ~2.5 ms with one chunk at a time).
struct PanelChunk {
    uint16_t* buf = nullptr;
    i64 cap = 0, p0 = 0;
    ~PanelChunk() { free(buf); }
    void release() {
        free(buf);
        buf = nullptr, cap = 0;
    }
    bool reserve(i64 n) {
        if (n <= cap) return true;
        free(buf);
        buf = (uint16_t*)scratch_uninit(sizeof(uint16_t) * n);
        cap = buf ? n : 0;
        return buf != nullptr;
    }
};
static thread_local PanelChunk panel_chunk;
static thread_local PanelChunk parts_chunk;  // f32_amx's rows as three bf16 parts (the calling thread's)

static void int8_bf16_panels(const int8_t* wp, i64 p0, i64 p1, i64 Kp, uint16_t* out);

// Panels [p0, p1) of wp (fpe: 4 / 5 FP8 bytes, 0 int8 codes) as bf16 panels into the calling thread's panel_chunk
// (amx_run's on_chunk); false when out of memory.
static bool decode_panel_chunk(const int8_t* wp, int fpe, i64 p0, i64 p1, i64 Kp) {
    PanelChunk& pc = panel_chunk;
    if (!pc.reserve((p1 - p0) * 16 * Kp)) return false;
    pc.p0 = p0;
    if (fpe == 4) fp8_bf16_panels<4>(wp, p0, p1, Kp, pc.buf);
    else if (fpe == 5) fp8_bf16_panels<5>(wp, p0, p1, Kp, pc.buf);
    else int8_bf16_panels(wp, p0, p1, Kp, pc.buf);
    amx_fence();  // (the tile loads read the buffer: see amx_fence)
    return true;
}
static constexpr i64 PARTS_KEEP = 4 << 20;   // values kept past a call (8 MiB: 512 rows x K = 2730 as three parts)

// y[m * ldm + n * ldn] (+ bias[n]) of FP8 layer L on M rows of bf16 codes xc (tile form: row stride L->pld, zero past
// K, readable up to a multiple of 32 rows) with scales sx: row-major (ldn 1) or a convolution's map (ldm 1). wb: the
// layer's panels already decoded (fp8_bf16_weights), or NULL: each thread decodes its chunks of panels as it reaches
// them. 0, or -2 when out of memory.
static int fp8_amx_run(const lb_layer* L, const uint16_t* wb, const uint16_t* xc, const float* sx, i64 M, float* y,
                       i64 ldm, i64 ldn, int threads, const float* bias) {
    const i64 N = L->N, Kp = L->pld, Kb = 2 * Kp;
    const float* sp = L->sp;
    const float back = fp8_bf16_scale(L->bits);
    std::atomic<int> failed{0};
    auto decode = [&](i64 p0, i64 p1) {
        if (!wb && !decode_panel_chunk(L->wp, L->bits, p0, p1, Kp)) failed.store(1, std::memory_order_relaxed);
    };
    amx_run(
        (const int8_t*)xc, Kb, M, N, Kb, threads,
        [=](auto mt, auto np, const int8_t* am, i64 Kq, i64 m, i64 mr, i64 p) {
            constexpr int MT = decltype(mt)::value, NP = decltype(np)::value;
            const PanelChunk& pc = panel_chunk;
            const uint16_t* w = wb ? wb + p * 16 * Kp : pc.buf ? pc.buf + (p - pc.p0) * 16 * Kp : nullptr;
            if (!w) return;
            alignas(64) float c[32 * 32];
            amx_block<MT, NP, true>(am, Kq, (const int8_t*)w, Kb, 0, Kb, c);
            for (i64 r = 0; r < mr; ++r)  // the sums back to the codes' scale (exact)
                for (int h = 0; h < NP; ++h)
                    _mm512_store_ps(c + 32 * r + 16 * h,
                                    _mm512_mul_ps(_mm512_load_ps(c + 32 * r + 16 * h), _mm512_set1_ps(back)));
            amx_store(c, mr, std::min<i64>(16 * NP, N - 16 * p), sx + m, sp + 16 * p, y + m * ldm + 16 * p * ldn, ldm,
                      ldn, bias ? bias + 16 * p : nullptr);
        },
        decode);
    return failed.load() ? -2 : 0;
}

// y (M, N) (+ bias) of FP8 layer L from the rows' bf16 codes xc and scales sx. 0, or -2 when out of memory.
static int fp8_amx(const lb_layer* L, const uint16_t* xc, const float* sx, i64 M, float* y, int threads,
                   const float* bias) {
    return fp8_amx_run(L, nullptr, xc, sx, M, y, L->N, 1, threads, bias);
}

// --- fp32 inputs on int8 or FP8 panels on AMX-BF16 tiles (weight-only layers on many rows: W8, W4/W3/W2 groups,
// binary, ternary without activation quantization, FP4, FP8). Each row is scaled by a power of two 2^-e (e: the
// exponent of its largest |x|: exact) into [-2, 2), where a value is the exact sum of three bf16 parts (hi =
// bf16(v), mid = bf16(v - hi), lo = v - hi - mid: 8 + 8 + 8 significant bits) down to 2^-100 or so of the row's
// largest; the panels' codes are exact in bf16 (int8 codes, q - z, FP4's doubled values, FP8 bytes times 2^8 /
// 2^16: fp8_bf16_panels), so the tiles' three products a k-step are exact and summed in fp32 (no overflow: |v| < 2,
// codes < 2^32), and y = 2^e * (scale * sum), the scale per column or group applied once after the sums (the fp32
// kernel rounds each code * scale first: the two agree to fp32 rounding, this one a little closer to the exact
// product). Values below 2^-100 or so of their row's largest (bf16 and the tiles flush subnormal parts) count as
// zero: an error below 2^-100 of the row's largest output term. A call holding a non-finite input takes the fp32
// kernel (its NaN / inf results), as do groups that are not a multiple of 32 k. The weights are decoded to bf16 a
// chunk of panels at a time by each thread (amx_run's on_chunk), the rows' parts go to the calling thread's buffer.

// Panels [p0, p1) of int8 codes wp as bf16 panels for tdpbf16ps from out on (the layout of fp8_bf16_panels), exact.
static void int8_bf16_panels(const int8_t* wp, i64 p0, i64 p1, i64 Kp, uint16_t* out) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (i64 p = p0; p < p1; ++p) {
        const int8_t* w = wp + p * 16 * Kp;
        uint16_t* o = out + (p - p0) * 16 * Kp;
        for (i64 q = 0; q < Kp / 4; ++q) {
            __m512 f[4];  // 16 bytes each: 4 columns x 4 k, as floats in order
            for (int i = 0; i < 4; ++i)
                f[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 64 * q + 16 * i))));
            // words 4c + j: columns 0..7, then 8..15 (cvtne2ps: its second operand in the low half)
            const __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]), hi = (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]);
            _mm512_storeu_si512(o + 64 * q, _mm512_permutex2var_epi32(lo, even, hi));
            _mm512_storeu_si512(o + 64 * q + 32, _mm512_permutex2var_epi32(lo, odd, hi));
        }
    }
}

// One block of fp32 sums: MT (1, 2) tiles of 16 rows from the three bf16 parts (a, a + ps, a + 2 ps; row stride
// Kq bytes) times NP (1, 2) bf16 panels from wp (panel stride 16 * Kb bytes), over k bytes [k0, k1), into c.
template <int MT, int NP>
static inline void amx_block3(const int8_t* a, i64 Kq, i64 ps, const int8_t* wp, i64 Kb, i64 k0, i64 k1, float* c) {
    _tile_zero(0);
    if constexpr (NP == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NP == 2) _tile_zero(3);
    for (i64 k = k0; k < k1; k += 64) {
        _tile_loadd(6, wp + 16 * k, 64);
        if constexpr (NP == 2) _tile_loadd(7, wp + 16 * Kb + 16 * k, 64);
        for (int part = 0; part < 3; ++part) {
            const int8_t* ap = a + part * ps + k;
            _tile_loadd(4, ap, Kq);
            _tile_dpbf16ps(0, 4, 6);
            if constexpr (NP == 2) _tile_dpbf16ps(1, 4, 7);
            if constexpr (MT == 2) {
                _tile_loadd(5, ap + 16 * Kq, Kq);
                _tile_dpbf16ps(2, 5, 6);
                if constexpr (NP == 2) _tile_dpbf16ps(3, 5, 7);
            }
        }
    }
    _tile_stored(0, c, 128);
    if constexpr (NP == 2) _tile_stored(1, c + 16, 128);
    if constexpr (MT == 2) _tile_stored(2, c + 16 * 32, 128);
    if constexpr (MT == 2 && NP == 2) _tile_stored(3, c + 16 * 32 + 16, 128);
    amx_fence();
}

// Rows of x (M x K, every value finite) times 2^-e[m] as three bf16 parts in tile form (part stride Mt * Kp values,
// row stride Kp; zero past K as the caller allocated them).
static void bf16_parts(const float* x, i64 M, i64 K, i64 Kp, i64 Mt, const int* e, uint16_t* a) {
    const i64 ps = Mt * Kp;
    for (i64 m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        const __m512 shift = _mm512_set1_ps((float)-e[m]);
        for (i64 k = 0; k < K; k += 16) {
            const __mmask16 live = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = _mm512_scalef_ps(_mm512_maskz_loadu_ps(live, xr + k), shift);  // exact: a power of two
            const __m256bh h = _mm512_cvtneps_pbh(v);
            const __m512 r1 = _mm512_sub_ps(v, _mm512_cvtpbh_ps(h));
            const __m256bh md = _mm512_cvtneps_pbh(r1);
            const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(r1, _mm512_cvtpbh_ps(md)));
            uint16_t* d = a + m * Kp + k;
            _mm256_mask_storeu_epi16(d, live, (__m256i)h);
            _mm256_mask_storeu_epi16(d + ps, live, (__m256i)md);
            _mm256_mask_storeu_epi16(d + 2 * ps, live, (__m256i)lo);
        }
    }
}

// Rows per pass of f32_amx: their three parts take 6 bytes a value (12 MiB at K = 4096), besides the layer's
// weights decoded as bf16 (2 bytes a weight) for the call.
static constexpr i64 F32_AMX_CHUNK = 512;

// y (M, N) = x . the panels (codes times per-column or per-group scales sp; fpe: 0 int8 codes, 4 / 5 FP8 bytes) on
// the tiles, rows in chunks of F32_AMX_CHUNK. 0, or 1 where it does not apply -- tiles off, groups not a multiple
// of 32 k, a non-finite input (checked before anything is written), out of memory (then rows may be written: the
// caller's other path writes them all).
static int f32_amx(const float* x, i64 M, i64 K, const int8_t* wp, const float* sp, i64 N, i64 Kp, i64 group,
                   float* y, int threads, int fpe) {
    if (Kp % 32 || (group && group % 32) || (fpe && group) || !amx_on()) return 1;
    const i64 CH = std::min<i64>(M, F32_AMX_CHUNK), Mt = (CH + 31) / 32 * 32, P = (N + 15) / 16, Kb = 2 * Kp;
    const i64 G = group ? Kp / group : 1;
    int* e = (int*)malloc(sizeof(int) * M + 64);  // each row's exponent, and its factor 2^e
    float* rs = (float*)malloc(sizeof(float) * M + 64);
    if (!e || !rs) {
        free(e);
        free(rs);
        return 1;
    }
    const int nth = nthreads(threads);
    int finite = 1;
    lb_parallel(nth, nth > 1 && M >= 2 * nth && M * K >= (1 << 16), [&] {  // the threads take disjoint rows
        i64 lo, hi;
        my_rows(M, 1, &lo, &hi);
        for (i64 m = lo; m < hi; ++m) {
            const uint32_t bits = row_abs_bits(x + m * K, K);
            if (bits >= 0x7f800000u) {
#pragma omp atomic write
                finite = 0;
            }
            float amax;
            memcpy(&amax, &bits, 4);
            e[m] = bits && bits < 0x7f800000u ? ilogbf(amax) : 0;  // |x| * 2^-e < 2 (subnormal maxima too)
            rs[m] = ldexpf(1.0f, e[m]);
        }
    });
    // The rows' three parts (the calling thread's buffer, kept: a fresh one per call cost its page faults), their
    // padding zero: k in [K, Kp) of every row, and the rows from CH to Mt (a last, shorter chunk leaves the rows
    // past it as the chunk before wrote them: finite).
    PanelChunk& parts = parts_chunk;
    uint16_t* a = finite && parts.reserve(3 * Mt * Kp + 32) ? parts.buf : nullptr;
    if (!a) {
        free(e);
        free(rs);
        return 1;
    }
    for (i64 r = 0; r < 3 * Mt; ++r) {
        if (r % Mt < CH) memset(a + r * Kp + K, 0, sizeof(uint16_t) * (Kp - K));
        else memset(a + r * Kp, 0, sizeof(uint16_t) * Kp);
    }
    // The weights as bf16 panels, a chunk at a time per thread (amx_run's on_chunk; fp8_amx_run's buffer).
    std::atomic<int> failed{0};
    auto decode = [&](i64 p0, i64 p1) {
        if (!decode_panel_chunk(wp, fpe, p0, p1, Kp)) failed.store(1, std::memory_order_relaxed);
    };
    const i64 ps = 2 * Mt * Kp;  // part stride in bytes
    i64 m0 = 0;                  // the current chunk's first row
    // rows m .. m+mr-1 of the chunk against panels p .. p+NP-1: y = 2^e * (s * sums), s per column, or per group
    // f += s_g * sums in group order, then y = 2^e * f
    auto tile = [&](auto mt, auto np, const int8_t* am, i64 Kq, i64 m, i64 mr, i64 p) {
        constexpr int MT = decltype(mt)::value, NP = decltype(np)::value;
        const PanelChunk& pc = panel_chunk;
        if (!pc.buf) return;  // (out of memory: f32_amx returns 1 and nothing it wrote counts)
        const int8_t* wq = (const int8_t*)(pc.buf + (p - pc.p0) * 16 * Kp);
        const i64 ncols = std::min<i64>(16 * NP, N - 16 * p);
        float* ym = y + (m0 + m) * N + 16 * p;
        const float* rm = rs + m0 + m;
        alignas(64) float c[32 * 32], f[32 * 32];
        if (!group) {
            amx_block3<MT, NP>(am, Kq, ps, wq, Kb, 0, Kb, c);
            const __m512 back = _mm512_set1_ps(fp8_bf16_scale(fpe));  // (FP8 panels hold the codes' values * 2^8 / 2^16)
            for (int h = 0; h < NP; ++h) {
                const __m512 sc = _mm512_loadu_ps(sp + 16 * (p + h));
                for (i64 r = 0; r < mr; ++r)
                    _mm512_store_ps(f + 32 * r + 16 * h,
                                    _mm512_mul_ps(sc, _mm512_mul_ps(back, _mm512_load_ps(c + 32 * r + 16 * h))));
            }
        } else {
            for (i64 r = 0; r < mr; ++r)
                for (int h = 0; h < NP; ++h) _mm512_store_ps(f + 32 * r + 16 * h, _mm512_setzero_ps());
            for (i64 g = 0; g < G; ++g) {
                amx_block3<MT, NP>(am, Kq, ps, wq, Kb, 2 * g * group, 2 * (g + 1) * group, c);
                for (int h = 0; h < NP; ++h) {
                    const __m512 sg = _mm512_loadu_ps(sp + ((p + h) * G + g) * 16);
                    for (i64 r = 0; r < mr; ++r) {
                        float* fr = f + 32 * r + 16 * h;
                        _mm512_store_ps(fr, _mm512_fmadd_ps(_mm512_load_ps(c + 32 * r + 16 * h), sg, _mm512_load_ps(fr)));
                    }
                }
            }
        }
        store_scaled_rows(ym, N, f, rm, mr, ncols);
    };
    for (m0 = 0; m0 < M; m0 += CH) {
        // (a last, shorter chunk leaves the rows past it as they were: finite, read by the tiles, never stored)
        const i64 rows = std::min(CH, M - m0);
        lb_parallel(nth, nth > 1 && rows >= 2 * nth && rows * K >= (1 << 16), [&] {  // disjoint rows
            i64 lo, hi;
            my_rows(rows, 1, &lo, &hi);
            if (lo < hi) bf16_parts(x + (m0 + lo) * K, hi - lo, K, Kp, Mt, e + m0 + lo, a + lo * Kp);
        });
        amx_run((const int8_t*)a, Kb, rows, N, Kb, threads, tile, decode);
    }
    if (parts.cap > PARTS_KEEP) parts.release();  // (a huge layer's rows are not kept for the thread's life)
    free(e);
    free(rs);
    return failed.load() ? 1 : 0;
}
#endif

// Returns 0, or -1 for a layer description no kernel handles, -2 when scratch memory could not be allocated.
// A layer's quantized activations: int8 codes + row scales (+ the rows that held a NaN), or packed signs + scales.
struct ActRows {
    int8_t* xq = nullptr;
    float* sx = nullptr;
    uint64_t* xb = nullptr;
    // int8 activations: rows holding a NaN give NaN outputs, as the simulated layer's (whose fake-quantized input
    // keeps the NaN; its code here is 0). Sign activations need nothing: the simulated sign reads NaN as -1 and
    // its run-time scale guard turns a NaN mean into the smallest scale, as lb_sign_rows does.
    uint8_t* nan_rows = nullptr;
    // Low-bit float activations (LB_ACT_FP): the fake-quantized fp32 rows (a NaN input becomes +max * s, as the
    // simulated quantizer's code lookup gives), which the fp32 kernels then read.
    float* xf = nullptr;
    // FP8 layers with low-bit float activations on the AMX-BF16 tiles (fp8_amx): the rows' codes in bf16, unscaled,
    // in tile form (row stride L->pld, zero rows up to a multiple of 32 and 32 more), and their scales in sx.
    uint16_t* xc = nullptr;
    i64 xld = 0;
    ~ActRows() {
        free(xc);
        free(xf);
        free(xq);
        free(sx);
        free(xb);
        free(nan_rows);
    }
    // Buffers for M rows of K values in L's activation mode; false when out of memory.
    bool alloc(const lb_layer* L, i64 M, i64 K) {
#ifdef LB_AMX_BF16
        if (fp8_amx_rows(L, M)) {
            xld = L->pld;
            // (32 rows past the last whole tile: a convolution's image starts anywhere and reads whole tiles)
            xc = (uint16_t*)calloc(((M + 31) / 32 * 32 + 32) * xld, sizeof(uint16_t));
            sx = (float*)malloc(sizeof(float) * M + 64);
            return xc && sx;
        }
#endif
        if (L->akind == LB_ACT_FP || (L->akind == LB_ACT_F32 && L->xs)) {
            xf = (float*)malloc(sizeof(float) * M * K + 64);
            if (!xf) return false;
        }
        if (L->akind == LB_ACT_I8 || L->akind == LB_ACT_I8S) {
            xq = (int8_t*)malloc(M * K + 64);
            sx = (float*)malloc(sizeof(float) * M + 64);
            nan_rows = (uint8_t*)malloc(M + 64);
            return xq && sx && nan_rows;
        }
        if (L->akind == LB_ACT_SIGN) {
            xb = (uint64_t*)malloc(sizeof(uint64_t) * M * ((K + 255) / 256 * 4) + 64);
            sx = (float*)malloc(sizeof(float) * M + 64);
            return xb && sx;
        }
        return true;
    }
    // Quantize rows [0, M) of x into rows [r, r + M) of the buffers (after the layer's input scale, if any: a
    // block of rows at a time through a small buffer, the products x * xs of the simulated layer). False when out
    // of memory.
    bool fill(const lb_layer* L, const float* x, i64 M, i64 K, i64 r) {
        if (!L->xs) {
            quantize(L, x, M, K, r);
            return true;
        }
        if (L->akind == LB_ACT_F32) {  // the scaled rows are the kernel's input
            for (i64 m = 0; m < M; ++m)
                for (i64 k = 0; k < K; ++k) xf[(r + m) * K + k] = x[m * K + k] * L->xs[k];
            return true;
        }
        const i64 B = std::max<i64>(1, std::min<i64>(M, 4096 / std::max<i64>(K, 1)));
        float* buf = (float*)malloc(sizeof(float) * B * K + 64);
        if (!buf) return false;
        for (i64 m0 = 0; m0 < M; m0 += B) {
            const i64 b = std::min(B, M - m0);
            for (i64 m = 0; m < b; ++m)
                for (i64 k = 0; k < K; ++k) buf[m * K + k] = x[(m0 + m) * K + k] * L->xs[k];
            quantize(L, buf, b, K, r + m0);
        }
        free(buf);
        return true;
    }

  private:
    void quantize(const lb_layer* L, const float* x, i64 M, i64 K, i64 r) {
        if (L->akind == LB_ACT_I8) {
            quantize_rows_i8(x, M, K, L->qmax, L->min_scale, L->max_scale, xq + r * K, sx + r, nan_rows + r);
        } else if (L->akind == LB_ACT_I8S) {
            quantize_rows_static(x, M, K, *L->sa, L->za ? *L->za : 0.0f, L->qmin, L->qmax, xq + r * K, sx + r,
                                 nan_rows + r);
        } else if (L->akind == LB_ACT_SIGN) {
            lb_sign_rows(x, M, K, xb + r * ((K + 255) / 256 * 4), L->sign_scale ? sx + r : nullptr, L->min_scale,
                         L->max_scale);
            if (!L->sign_scale)
                for (i64 m = 0; m < M; ++m) sx[r + m] = 1.0f;
        } else if (L->akind == LB_ACT_FP && xc) {
#ifdef LB_AMX_BF16
            fp_code_rows_bf16(x, M, K, L->fp_man, L->fp_emin, L->fp_emax, L->qmax, L->min_scale, L->max_scale,
                              xc + r * xld, xld, sx + r);
#endif
        } else if (L->akind == LB_ACT_FP) {
            lb_fake_quant_rows_fp(x, M, K, L->fp_man, L->fp_emin, L->fp_emax, L->qmax, L->min_scale, L->max_scale,
                                  xf + r * K);
        }
    }
};

// Static activations (I8S): the factor c of the constant term c * wsum[n] the code shift and the zero point leave
// per output, c = sa * (qmin + 128 - za); 0 otherwise.
static inline float zero_term(const lb_layer* L) {
    return L->akind == LB_ACT_I8S ? *L->sa * (L->qmin + 128.0f - (L->za ? *L->za : 0.0f)) : 0.0f;
}

// The kernel of layer L on M rows: fp32 x for float activations, the quantized rows in a otherwise (x may then be
// null); then the bias, and NaN rows.
static int linear_core(const lb_layer* L, const float* x, const ActRows& a, i64 M, float* y, int threads,
                       const float* bias) {
    const i64 K = L->K, N = L->N;
    const int8_t* xq = a.xq;
    const float* sx = a.sx;
    const uint64_t* xb = a.xb;
    const uint8_t* nan_rows = a.nan_rows;
    int rc = (L->akind == LB_ACT_I8 || L->akind == LB_ACT_I8S || L->akind == LB_ACT_SIGN || L->akind == LB_ACT_F32 ||
              L->akind == LB_ACT_FP) ? 0 : -1;
    if (a.xf) x = a.xf;  // fake-quantized (FP) or scaled (F32 with xs) rows: from here on the fp32 input
    if (rc == 0) {
        const bool i8 = L->akind == LB_ACT_I8 || L->akind == LB_ACT_I8S;
        const bool f32 = L->akind == LB_ACT_F32 || L->akind == LB_ACT_FP;
        // fp32 inputs on a weight-only layer's panels, whatever its format (W8 and binary: per-column scales; WN:
        // per group, then the s*z correction below; FP8: bytes decoded in the kernel): from F32_PANEL_ROWS rows on,
        // or always when the layer holds no row layout (FP8). Otherwise each format's own kernel.
        const bool f32_panels = f32 && L->wp && (M >= F32_PANEL_ROWS || !L->w);
        const i64 panel_group = L->wkind == LB_WN ? L->group : 0;
        const int fpe = L->wkind == LB_FP8 ? L->bits : 0;
        // The bias for a kernel that adds it itself (the panel kernels: in the AMX tiles' store), then none here;
        // static activations keep it for after their zero-point term.
        auto take_bias = [&]() {
            const float* b = L->akind == LB_ACT_I8S ? nullptr : bias;
            if (b) bias = nullptr;
            return b;
        };
        if (a.xc) {
#ifdef LB_AMX_BF16
            rc = fp8_amx(L, a.xc, sx, M, y, threads, bias);
            bias = nullptr;
#endif
        } else if (f32_panels) rc = lb_f32_panel(x, M, K, L->wp, L->sp, N, L->pld, panel_group, y, threads, fpe);
        else switch (L->wkind) {
            case LB_W8:
                if (i8 && L->wp && (M >= PANEL_ROWS || !L->w))
                    w8a8_panel_run(xq, sx, M, K, L->wp, L->sp, L->ws, N, L->pld, y, N, 1, threads, take_bias());
                else if (i8) lb_w8a8(xq, sx, M, K, (const int8_t*)L->w, L->s, N, L->ld, y, threads);
                else if (f32) lb_w8a32(x, M, K, (const int8_t*)L->w, L->s, N, L->ld, y, threads);
                else rc = -1;
                break;
            case LB_WN:
                if (i8 && L->wp && (M >= WN_PANEL_ROWS || !L->w))
                    lb_wn_panel(xq, sx, M, K, L->wp, L->sp, L->ws, N, L->pld, L->group, y, threads);
                else if (i8) rc = lb_wna8(xq, sx, M, K, (const uint8_t*)L->w, L->ld, N, L->bits, L->group, y, threads);
                else if (f32 && L->w) rc = lb_wna32(x, M, K, (const uint8_t*)L->w, L->ld, N, L->bits, L->group, y, threads);
                else rc = -1;
                break;
            case LB_TERNARY:
                if (i8 && L->wp && M >= TERNARY_PANEL_ROWS)
                    w8a8_panel_run(xq, sx, M, K, L->wp, L->sp, L->ws, N, L->pld, y, N, 1, threads, take_bias());
                else if (i8) lb_ternary(xq, sx, M, K, (const uint8_t*)L->w, L->s, N, y, threads);
                else rc = -1;
                break;
            case LB_BIN_BLOCKED:
                if (L->akind != LB_ACT_SIGN) {
                    rc = -1;
                } else if (!w1a1_amx(L, xb, sx, M, y, threads, bias)) {
                    rc = lb_w1a1(xb, sx, M, K, (const uint8_t*)L->w, L->s, N, y, threads, bias);
                }
                bias = nullptr;  // added by the kernel
                break;
            case LB_BIN_INTER:  // panels of the +-1 codes: the same int32 (2 sum_{bit=1} xq - sum xq) and bits
                if (i8 && L->wp && M >= BIN_PANEL_ROWS)
                    w8a8_panel_run(xq, sx, M, K, L->wp, L->sp, L->ws, N, L->pld, y, N, 1, threads, take_bias());
                else if (i8) lb_w1a8(xq, sx, M, K, (const uint8_t*)L->w, L->s, N, y, threads);
                else if (f32) lb_w1a32(x, M, K, (const uint8_t*)L->w, L->s, N, y, threads);
                else rc = -1;
                break;
            default:
                rc = -1;
        }
        if (rc == 0 && L->wkind == LB_WN && L->sz) sz_correct(L, x, xq, sx, M, y, threads);  // real zero points
    }
    const float c = zero_term(L);
    if (rc == 0 && c != 0.0f)  // the static zero point's constant term (then the bias), one rounding as lb_conv's
        for (i64 m = 0; m < M; ++m)
            for (i64 n = 0; n < N; ++n) y[m * N + n] = fmaf(c, L->wsum[n], y[m * N + n]);
    if (rc == 0 && bias) add_bias(y, bias, M, N, threads);
    if (rc == 0 && nan_rows)
        for (i64 m = 0; m < M; ++m)
            if (nan_rows[m])
                for (i64 n = 0; n < N; ++n) y[m * N + n] = NAN;
    return rc;
}

LB_API int lb_linear(const lb_layer* L, const float* x, i64 M, float* y, int threads, const float* bias) {
    ActRows a;
    const i64 K = L->K;
    if (!a.alloc(L, M, K)) return -2;
    // Many rows: the threads quantize disjoint row ranges (each row's codes as one thread would make them). On many
    // rows the tiles leave this pass a large share of a call: one thread held 2-thread W8A8 on 197 x 384 x 1536 to
    // 1.36x its 1-thread speed (session 21).
    const int nth = nthreads(threads);
    int failed = 0;
    lb_parallel(nth, nth > 1 && M >= 2 * nth && M * K >= (1 << 16), [&] {
        i64 lo, hi;
        my_rows(M, 1, &lo, &hi);
        if (lo < hi && !a.fill(L, x + lo * K, hi - lo, K, lo)) {
#pragma omp atomic write
            failed = 1;
        }
    });
    if (failed) return -2;
    return linear_core(L, x, a, M, y, threads, bias);
}

// A convolution whose activations are quantized per patch (int8 or signs) or with a static per-tensor int8 range
// (the same codes per patch as per map), or a weight-only one (fp32 patches: a chunk of images' patches is cut
// whole, then the fp32-input kernel), as one call: patches (geometry g) are cut
// a few at a time into a small buffer and quantized at once, so only their codes are stored, not fp32 patches (4x /
// 32x less memory traffic) -- the codes and scales lb_linear computes from the fp32 patches; then the kernel and the
// (N, O, OH, OW) map y. Layers with int8 panels (conv_panels) write the map straight from the panel kernel, image by
// image; the others run linear_core into (N, OH*OW, O) rows, moved into the map after. L->K must equal C*KH*KW.
// Whole images are processed in chunks of about CONV_CHUNK_BYTES of patches, so the scratch memory stays bounded
// however large the batch (one image at least). Returns linear_core's code (-1: float activations or a shape
// mismatch; -2: out of memory).
static const i64 CONV_CHUNK_BYTES = 8 << 20;

// Whether lb_conv runs the panel kernel on images of P patches (the rule linear_core applies to rows).
static inline bool conv_panels(const lb_layer* L, i64 P) {
#ifdef LB_AMX_BF16
    if (L->wkind == LB_FP8) return fp8_amx_rows(L, P);  // (its rows' codes are then bf16: ActRows::xc)
#endif
    if ((L->akind != LB_ACT_I8 && L->akind != LB_ACT_I8S) || !L->wp) return false;
    if (L->wkind == LB_W8) return P >= PANEL_ROWS || !L->w;
    if (L->wkind == LB_BIN_INTER) return P >= BIN_PANEL_ROWS;
    return L->wkind == LB_TERNARY && P >= TERNARY_PANEL_ROWS;
}

// Images [0, nb) of a chunk on the panels: y holds whole (O, P) maps; then the bias and NaN rows, as linear_core.
static int conv_panel_maps(const lb_layer* L, const ActRows& a, i64 nb, i64 P, float* y, int threads,
                           const float* bias) {
    const i64 K = L->K, O = L->N;
#ifdef LB_AMX_BF16
    if (L->wkind == LB_FP8) {  // FP8: the bf16 panels decoded once, then image by image on the tiles
        uint16_t* wb = fp8_bf16_weights(L, threads);
        if (!wb) return -2;
        const int nth = nthreads(threads);
        const bool split = nth > 1 && nb >= nth;
        lb_parallel(nth, split, [&] {
            i64 lo = 0, hi = nb;
            if (split) my_rows(nb, 1, &lo, &hi);
            for (i64 n = lo; n < hi; ++n)
                fp8_amx_run(L, wb, a.xc + n * P * a.xld, a.sx + n * P, P, y + n * O * P, 1, P, split ? 1 : threads,
                            bias);
        });
        free(wb);
        return 0;
    }
#endif
    auto image = [&](i64 n, int inner) {
        float* yn = y + n * O * P;
        w8a8_panel_run(a.xq + n * P * K, a.sx + n * P, P, K, L->wp, L->sp, L->ws, O, L->pld, yn, 1, P, inner);
        const float c = zero_term(L);
        if (c != 0.0f)
            for (i64 o = 0; o < O; ++o)
                for (i64 l = 0; l < P; ++l) yn[o * P + l] = fmaf(c, L->wsum[o], yn[o * P + l]);
        if (bias)
            for (i64 o = 0; o < O; ++o)
                for (i64 l = 0; l < P; ++l) yn[o * P + l] += bias[o];
        for (i64 l = 0; l < P; ++l)
            if (a.nan_rows[n * P + l])
                for (i64 o = 0; o < O; ++o) yn[o * P + l] = NAN;
    };
    const int nth = nthreads(threads);
    if (nth > 1 && nb >= nth) {  // whole images per thread
        lb_parallel(nth, true, [&] {
            i64 lo, hi;
            my_rows(nb, 1, &lo, &hi);
            for (i64 n = lo; n < hi; ++n) image(n, 1);
        });
    } else {
        for (i64 n = 0; n < nb; ++n) image(n, threads);
    }
    return 0;
}

// --- Convolutions with tiny patches (C*KH*KW <= SMALL_CONV_K: a network's first conv on one or three channels) and
// unit horizontal stride, on int8 weights (W8, ternary or binary codes as int8 panels or W8 rows) with per-patch or
// static int8 activations. Cutting 9-value patches, quantizing them one short row at a time and running the panel
// kernel on a 9-deep product costs tens of ns per patch, several times the products themselves; here 8 neighbouring
// output positions of one output row share a vector lane each: a tap of all 8 patches is one load from a
// zero-padded copy of the image, the patch maxima are lane-wise, and the integer products (exact in fp32: |acc| <=
// 32 * 128 * 128 < 2^24) go straight into the (O, OH, OW) map. The codes, scales and epilogue -- (sx * sp) * acc,
// then the static zero term, the bias, NaN patches -- are those of the patch path, so the output is bit for bit
// the same (tested). FP8 weights with per-patch low-bit float activations take the same loop: the patches' codes on
// the format's grid (FpGrid8 with a scale per lane; a NaN input is the largest code, as on the patch path) times the
// weights' FP8 values (each product exact in fp32), summed in fp32: the patch path's result up to summation order.
// Weight-only layers (fp32 inputs; int8 or FP8 weights) take it too, their patches' values as they are (scale 1).
static const i64 SMALL_CONV_K = 32;

// Weight (o, k) of an int8 layer as float, from its panels or (W8) its rows; of an FP8 layer, its byte's value
// (unscaled: sign, exponent rebiased, mantissa; exponent 0: subnormal), as f32_dequant decodes it.
static inline float int8_weight(const lb_layer* L, i64 o, i64 k) {
    if (L->wp && L->wkind == LB_FP8) {
        const int u = (uint8_t)L->wp[(o / 16) * 16 * L->pld + 16 * (k & ~(i64)3) + 4 * (o % 16) + (k & 3)];
        const int M = 7 - L->bits, bias = (1 << (L->bits - 1)) - 1, e = (u & 0x7f) >> M, m = u & ((1 << M) - 1);
        const uint32_t bits = ((uint32_t)(e + 127 - bias) << 23) | ((uint32_t)m << (23 - M));
        float v;
        memcpy(&v, &bits, 4);
        if (!e) v = (float)m / (float)(1 << (bias - 1 + M));  // subnormal: m * 2^(1 - bias - M)
        return u & 0x80 ? -v : v;
    }
    if (L->wp) return (float)L->wp[(o / 16) * 16 * L->pld + 16 * (k & ~(i64)3) + 4 * (o % 16) + (k & 3)];
    return (float)((const int8_t*)L->w)[o * L->ld + k];
}

static bool small_conv_fits(const lb_layer* L, const i64* g) {
#ifdef __AVX2__
    const bool act = L->akind == LB_ACT_I8 || L->akind == LB_ACT_I8S;
    const bool weights = L->wp ? (L->wkind == LB_W8 || L->wkind == LB_TERNARY || L->wkind == LB_BIN_INTER)
                               : (L->wkind == LB_W8 && L->w);
    const bool fp8 = L->wkind == LB_FP8 && L->wp;
    const bool f32 = L->akind == LB_ACT_F32 && !L->xs;  // weight-only: the patches as they are
    const bool fits = (act && weights) || (fp8 && L->akind == LB_ACT_FP) || (f32 && (weights || fp8));
    return fits && L->K <= SMALL_CONV_K && g[11] == 1 && g[16] > 0 && g[17] > 0;
#else
    (void)L, (void)g;
    return false;
#endif
}

#ifdef __AVX2__
// The O dot products of 8 patches' codes q[0..K) with the weights wf (small_conv's layout), each handed to store(o,
// sums). KC > 0: K as a compile-time constant.
template <int KC, class Store>
static inline void small_conv_dots(const float* wf, const __m256* q, i64 K_, i64 O, Store&& store) {
    const i64 K = KC > 0 ? KC : K_;
    i64 o = 0;
    for (; o + 4 <= O; o += 4) {  // four outputs at a time: four independent sums per tap
        const float* w4 = wf + o * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (i64 k = 0; k < K; ++k) {
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(w4[4 * k]), q[k], a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(w4[4 * k + 1]), q[k], a1);
            a2 = _mm256_fmadd_ps(_mm256_set1_ps(w4[4 * k + 2]), q[k], a2);
            a3 = _mm256_fmadd_ps(_mm256_set1_ps(w4[4 * k + 3]), q[k], a3);
        }
        store(o, a0), store(o + 1, a1), store(o + 2, a2), store(o + 3, a3);
    }
    for (; o < O; ++o) {
        const float* w1 = wf + o * K;
        __m256 acc = _mm256_setzero_ps();
        for (i64 k = 0; k < K; ++k) acc = _mm256_fmadd_ps(_mm256_set1_ps(w1[k]), q[k], acc);
        store(o, acc);
    }
}

static int small_conv(const lb_layer* L, const float* x, const i64* g, float* y, int threads, const float* bias) {
    const i64 N = g[0], C = g[1], H = g[2], W = g[3], sn = g[4], sc = g[5], sh = g[6], sw = g[7], KH = g[8], KW = g[9];
    const i64 SH = g[10], PT = g[12], PL = g[13], DH = g[14], DW = g[15], OH = g[16], OW = g[17];
    const i64 K = L->K, O = L->N;
    // the padded image: rows [0, HP) = input rows [-PT, HP - PT), columns [0, WP) = input columns [-PL, WP - PL)
    const i64 HP = (OH - 1) * SH + (KH - 1) * DH + 1, WP = (OW + 7) / 8 * 8 + (KW - 1) * DW;
    // the weights as floats: outputs in blocks of 4 interleaved per tap (block b: wf[b*4*K + 4*k + o%4]), the last
    // O%4 outputs one after another (wf[o*K + k]); taps in (c, i, j) order. ws: the per-output weight scales.
    float* wf = (float*)malloc(sizeof(float) * (O * K + 2 * O) + 64);
    if (!wf) return -2;
    float *ws = wf + O * K, *wsum = ws + O;
    const i64 O4 = O / 4 * 4;
    for (i64 o = 0; o < O; ++o) {
        for (i64 k = 0; k < K; ++k) wf[o < O4 ? (o / 4) * 4 * K + 4 * k + o % 4 : o * K + k] = int8_weight(L, o, k);
        ws[o] = L->wp ? L->sp[o] : L->s[o];
        wsum[o] = L->wsum ? L->wsum[o] : 0.0f;
    }
    const bool stat = L->akind == LB_ACT_I8S, fp = L->akind == LB_ACT_FP, f32 = L->akind == LB_ACT_F32;
    const float c0 = zero_term(L), sa = stat ? *L->sa : 0.0f, za = stat && L->za ? *L->za : 0.0f;
    const bool has_c = c0 != 0.0f;
    const i64 P = OH * OW;
    int failed = 0;
    const int nth = nthreads(threads);
    lb_parallel(nth, N * P * O * K >= (1 << 18), [&] {
        i64 lo, hi;
        my_rows(N, 1, &lo, &hi);
        float* img = lo < hi ? (float*)malloc(sizeof(float) * C * HP * WP + 64) : nullptr;
        if (lo < hi && !img) {
#pragma omp atomic write
            failed = 1;
        }
        // (one image per thread at a time; a batch of one splits nothing -- its work is a few microseconds)
        for (i64 n = lo; img && n < hi; ++n) {
            for (i64 c = 0; c < C; ++c)
                for (i64 r = 0; r < HP; ++r) {
                    float* dst = img + (c * HP + r) * WP;
                    const i64 h = r - PT;
                    for (i64 col = 0; col < WP; ++col) {
                        const i64 w = col - PL;
                        dst[col] = (h >= 0 && h < H && w >= 0 && w < W) ? x[n * sn + c * sc + h * sh + w * sw] : 0.0f;
                    }
                }
            float* yn = y + n * O * P;
            const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            const __m256 qlo = _mm256_set1_ps(stat ? L->qmin : -L->qmax - 1.0f), qhi = _mm256_set1_ps(L->qmax);
            const __m256 off = _mm256_set1_ps(L->qmin + 128.0f);
            __m256 q[SMALL_CONV_K];
            for (i64 oh = 0; oh < OH; ++oh)
                for (i64 ow = 0; ow < OW; ow += 8) {
                    const i64 lanes = std::min<i64>(8, OW - ow);
                    const float* base = img + oh * SH * WP + ow;
                    i64 k = 0;
                    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
                    for (i64 c = 0; c < C; ++c)
                        for (i64 i = 0; i < KH; ++i)
                            for (i64 j = 0; j < KW; ++j, ++k) {
                                q[k] = _mm256_loadu_ps(base + (c * HP + i * DH) * WP + j * DW);
                                const __m256 a = _mm256_and_ps(q[k], absmask);
                                bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
                                amax = _mm256_max_ps(a, amax);  // as row_scale_i8: a NaN lane keeps amax
                            }
                    __m256 s;
                    if (f32) {  // weight-only: the values as they are (a NaN or inf lane propagates as in F.conv2d)
                        s = _mm256_set1_ps(1.0f);
                        bad = _mm256_setzero_ps();
                    } else if (stat) {
                        s = _mm256_set1_ps(sa);
                        const __m256 vz = _mm256_set1_ps(za);
                        bad = _mm256_setzero_ps();
                        for (k = 0; k < K; ++k) {  // quantize_rows_static's codes
                            __m256 v = _mm256_round_ps(_mm256_add_ps(_mm256_div_ps(q[k], s), vz),
                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                            v = _mm256_min_ps(qhi, _mm256_max_ps(qlo, v));
                            const __m256 ok = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
                            bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                            q[k] = _mm256_and_ps(_mm256_sub_ps(v, off), ok);
                        }
                    } else {  // row_scale_i8's scale per lane, then code_i8x8 (NaN -> code 0)
                        s = _mm256_div_ps(amax, _mm256_set1_ps(L->qmax));
                        s = _mm256_blendv_ps(s, _mm256_set1_ps(L->max_scale),
                                             _mm256_cmp_ps(s, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
                        s = _mm256_blendv_ps(s, _mm256_set1_ps(L->min_scale), bad);
                        const __m256 smin = _mm256_set1_ps(L->min_scale);
                        s = _mm256_blendv_ps(s, smin, _mm256_cmp_ps(s, smin, _CMP_LT_OQ));
                        if (fp) {  // the patches' codes on the low-bit float grid (NaN -> +max: finite outputs)
                            FpGrid8 grid(1.0f, L->fp_man, L->fp_emin, L->fp_emax, L->qmax);
                            grid.vs = s;
                            for (k = 0; k < K; ++k) q[k] = grid(q[k]);
                            bad = _mm256_setzero_ps();
                        } else {
                            for (k = 0; k < K; ++k) {
                                const __m256 v = code_i8x8(q[k], s, qlo, qhi);
                                q[k] = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
                            }
                        }
                    }
                    const __m256 nanv = _mm256_set1_ps(NAN);
                    auto store = [&](i64 o, __m256 acc) {  // the patch path's epilogue, then the map's row
                        __m256 v = _mm256_mul_ps(_mm256_mul_ps(s, _mm256_set1_ps(ws[o])), acc);
                        __asm__("" : "+x"(v));  // rounded here: no multiply-add contracted with the bias below
                        if (has_c) v = _mm256_fmadd_ps(_mm256_set1_ps(c0), _mm256_set1_ps(wsum[o]), v);
                        if (bias) v = _mm256_add_ps(v, _mm256_set1_ps(bias[o]));
                        v = _mm256_blendv_ps(v, nanv, bad);
                        float* dst = yn + o * P + oh * OW + ow;
                        if (lanes == 8) {
                            _mm256_storeu_ps(dst, v);
                        } else {  // (a masked store is slow on some CPUs)
                            alignas(32) float t[8];
                            _mm256_store_ps(t, v);
                            memcpy(dst, t, sizeof(float) * lanes);
                        }
                    };
                    switch (K) {  // (a constant patch size unrolls the taps: the codes stay in registers)
                        case 9: small_conv_dots<9>(wf, q, K, O, store); break;
                        case 27: small_conv_dots<27>(wf, q, K, O, store); break;
                        default: small_conv_dots<0>(wf, q, K, O, store);
                    }
                }
        }
        free(img);
    });
    free(wf);
    return failed ? -2 : 0;
}
#endif

LB_API int lb_conv(const lb_layer* L, const float* x, const i64* g, float* y, int threads, const float* bias) {
    const i64 N = g[0], L_ = g[16] * g[17], K = L->K, O = L->N;
    // (a conv's input scale is per channel: applied before its patches are cut, never here)
    if (g[1] * g[8] * g[9] != K || L->xs) return -1;
#ifdef __AVX2__
    if (small_conv_fits(L, g)) return small_conv(L, x, g, y, threads, bias);
#endif
    const bool maps = conv_panels(L, L_);
    const i64 per_image = L_ * std::max(K, O) * (i64)sizeof(float);
    const i64 images = std::max<i64>(1, std::min<i64>(N, CONV_CHUNK_BYTES / std::max<i64>(per_image, 1)));
    float* rowmajor = maps ? nullptr : (float*)malloc(sizeof(float) * images * L_ * O + 64);
    const i64 B = std::max<i64>(1, std::min<i64>(64, 4096 / K));  // patches cut per step: <= 16 KiB, in L1
    // Weight-only layers (fp32 inputs) read the fp32 patches themselves: a chunk's patches are cut whole.
    const bool f32 = L->akind == LB_ACT_F32;
    float* patches = f32 ? (float*)malloc(sizeof(float) * images * L_ * K + 64) : nullptr;
    ActRows a;
    int rc = ((maps || rowmajor) && (!f32 || patches) && a.alloc(L, images * L_, K)) ? 0 : -2;
    for (i64 n0 = 0; rc == 0 && n0 < N; n0 += images) {
        const i64 nb = std::min(images, N - n0), r0 = n0 * L_, rows = nb * L_;
        int failed = 0;
        lb_parallel(nthreads(threads), threads != 1 && rows * K >= (1 << 16), [&] {
            if (f32) {
                i64 lo, hi;
                my_rows(rows, 1, &lo, &hi);
                if (lo < hi) im2col_range(x, g, patches + lo * K, r0 + lo, r0 + hi, 1);
                return;
            }
            float* buf = (float*)malloc(sizeof(float) * B * K + 64);
            if (!buf) {
#pragma omp atomic write
                failed = 1;
            }
            i64 lo, hi;
            my_rows(rows, 1, &lo, &hi);
            for (i64 r = lo; buf && r < hi; r += B) {
                const i64 e = std::min(hi, r + B);
                im2col_range(x, g, buf, r0 + r, r0 + e, 1);
                a.fill(L, buf, e - r, K, r);
            }
            free(buf);
        });
        if (failed) {
            rc = -2;
            break;
        }
        if (maps) {
            rc = conv_panel_maps(L, a, nb, L_, y + n0 * O * L_, threads, bias);
            continue;
        }
        rc = linear_core(L, patches, a, rows, rowmajor, threads, bias);
        if (rc) break;
        // (n, l, o) -> (n, o, l), in 8 x 8 blocks so both sides are read / written a cache line at a time
        lb_parallel(nthreads(threads), threads != 1 && nb * L_ * O >= (1 << 16), [&] {
            i64 lo_, hi_;
            my_rows(nb, 1, &lo_, &hi_);
            for (i64 n = lo_; n < hi_; ++n) {
                const float* src = rowmajor + n * L_ * O;
                float* dst = y + (n0 + n) * O * L_;
                for (i64 l0 = 0; l0 < L_; l0 += 8)
                    for (i64 o0 = 0; o0 < O; o0 += 8) {
                        const i64 l1 = std::min(L_, l0 + 8), o1 = std::min(O, o0 + 8);
                        for (i64 o = o0; o < o1; ++o)
                            for (i64 l = l0; l < l1; ++l) dst[o * L_ + l] = src[l * O + o];
                    }
            }
        });
    }
    free(rowmajor);
    free(patches);
    return rc;
}
