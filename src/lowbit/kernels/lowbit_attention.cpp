// Scaled dot-product attention in fp32 for short and medium sequences, one (batch, head) pair per work item.
//
// out[b, i, h, :] (or any strided layout) = softmax(scale * q_i . K^T + mask_i) V for every query row i, with the
// optional mask additive (float) or boolean (a nonzero byte: the key takes part), broadcast through zero strides,
// and an optional causal limit (key j <= query i, the top-left alignment of F.scaled_dot_product_attention).
// Grouped-query attention: head h reads key / value head h / (H / HKV).
//
// Per work item K is copied once into a (D, S) transposed scratch (S padded to 16 with zeros). Scores: 8 query rows
// x one vector of keys (16 with AVX-512, 8 with AVX2) accumulate in registers over D (one key vector, eight
// broadcasts, eight FMAs per step); softmax per row
// with a Cody-Waite reduction and a degree-6 polynomial for exp (relative error ~2e-7, branch-free, vectorised);
// then the weighted sum of the value rows, again a register block (up to 8 rows x D). Written with GCC vector
// extensions (vf below, of the build's register width), so the same source is AVX-512, AVX2 or plain code. The next work
// item's rows are prefetched a share per row block. A row whose every key is masked out gives zeros (SDPA: NaN).
//
// Built into the same library as lowbit_kernels.cpp (see native.py).

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>

#include "lowbit_exp.h"
#include "lowbit_omp.h"

#define LB_API extern "C" __attribute__((visibility("default")))
typedef int64_t i64;
// vf: VL floats, the build's vector register (lowbit_exp.h).

static const int QR = 8;   // query rows per score block: QR x VL scores in QR vector registers
static const int KC = 16;  // kt (the keys) is padded to a multiple of KC keys, with zeros
// The weighted sum's register block: PR rows x CV output vectors (of the DD / VL of a row) at a time, PR dividing QR
// (weighted_values reads PR score rows). AVX-512: whole rows, at most 16 of its 32 zmm; otherwise 8 of 16 registers
// (AVX2: 4 rows x 2 ymm for DD = 16, else 2 x 4; SSE / NEON: 2 rows x 4 xmm).
static constexpr int sum_vectors(int dd) { return VL == 16 ? dd / VL : (dd / VL < 4 ? dd / VL : 4); }
static constexpr int rows_per_sum(int dd) { return VL == 16 ? (dd > 32 ? 4 : QR) : VL == 8 && dd <= 16 ? 4 : 2; }
static_assert(QR % rows_per_sum(16) == 0 && QR % rows_per_sum(32) == 0 && QR % rows_per_sum(64) == 0, "PR | QR");

// Max of p[0 .. n), n a multiple of 16, lane-wise in one vector then across it (written with vectors: a loop over 16
// scalar partials did not vectorise on AVX2 builds).
static inline float row_max(const float* p, i64 n) {
    vf m = *(const vf*)p;
    for (i64 j = VL; j < n; j += VL) {
        const vf x = *(const vf*)(p + j);
        m = m > x ? m : x;
    }
    float r = m[0];
    for (int l = 1; l < VL; ++l) r = std::max(r, m[l]);
    return r;
}

// p[j] = exp(p[j] - mx) for j < n (n a multiple of 16; -inf gives 0); returns their sum.
static inline float exp_sum(float* p, i64 n, float mx) {
    vf part = {};
    for (i64 j = 0; j < n; j += VL) {
        const vf e = exp_neg_t(*(const vf*)(p + j) - mx);
        *(vf*)(p + j) = e;
        part += e;
    }
    float sum = 0.0f;
    for (int l = 0; l < VL; ++l) sum += part[l];
    return sum;
}

// o_r[0 .. D) = inv[r] * sum_{j < n} p_r[j] v_j for the rows p_r = p + r * pstride, r < rows <= PR. DD > 0: D as a
// compile-time multiple of 16, the PR x DD/16 vector accumulators in registers; DD = 0: any D, row by row.
template <int DD, int PR>
static inline void weighted_values(const float* p, i64 pstride, i64 rows, i64 n, const float* v, i64 vstride, i64 D,
                                   const float* inv, float* o, i64 ostride, float* scratch) {
    if constexpr (DD > 0) {
        constexpr int NV = DD / VL, CV = sum_vectors(DD);  // CV of the NV output vectors at a time
        for (int c0 = 0; c0 < NV; c0 += CV) {
            vf acc[PR][CV] = {};
            for (i64 j = 0; j < n; ++j) {
                const vf* vj = (const vf*)(v + j * vstride) + c0;
                vf vv[CV];
#pragma GCC unroll 8
                for (int c = 0; c < CV; ++c) vv[c] = vj[c];
#pragma GCC unroll 16
                for (int r = 0; r < PR; ++r) {
                    const float pj = p[r * pstride + j];
#pragma GCC unroll 8
                    for (int c = 0; c < CV; ++c) acc[r][c] += pj * vv[c];
                }
            }
            for (int r = 0; r < PR; ++r)
                if (r < rows)
                    for (int c = 0; c < CV; ++c) ((vf*)(o + r * ostride))[c0 + c] = acc[r][c] * inv[r];
        }
    } else {
        for (i64 r = 0; r < rows; ++r) {
            for (i64 d = 0; d < D; ++d) scratch[d] = 0.0f;
            for (i64 j = 0; j < n; ++j) {
                const float pj = p[r * pstride + j];
                const float* vj = v + j * vstride;
                for (i64 d = 0; d < D; ++d) scratch[d] += pj * vj[d];
            }
            for (i64 d = 0; d < D; ++d) o[r * ostride + d] = scratch[d] * inv[r];
        }
    }
}

// n floats of 64-byte aligned scratch (rounded up to whole cache lines), or null.
static inline float* alloc_floats(i64 n) {
    return (float*)aligned_alloc(64, std::max<size_t>(64, ((size_t)n * 4 + 63) / 64 * 64));
}


// One (batch, head): scores of QR query rows at a time against the transposed keys, then per row mask, softmax
// and the weighted sum of the value rows.
template <int DD>
static void attend_head(const float* qb, i64 qrow, const float* kb, i64 krow, const float* vb, i64 vrow, float* ob,
                        i64 orow, const void* mrow0, int mask_kind, i64 mrow_stride, i64 L, i64 S, i64 Sp, i64 D,
                        float scale, int causal, float* kt, float* sc, float* scratch, const float* const* next,
                        const i64* next_rows) {
    for (i64 j = 0; j < S; ++j)
        for (i64 d = 0; d < D; ++d) kt[d * Sp + j] = kb[j * krow + d];
    for (i64 d = 0; d < D; ++d)
        for (i64 j = S; j < Sp; ++j) kt[d * Sp + j] = 0.0f;
    const i64 blocks = (L + QR - 1) / QR;
    for (i64 i0 = 0; i0 < L; i0 += QR) {
        if (next) {  // the next item's q, k, v rows, a share per row block, fetched while this block computes
            const i64 bi = i0 / QR;
            for (int t = 0; t < 3; ++t) {
                const i64 n = t ? S : L, lo = n * bi / blocks, hi = n * (bi + 1) / blocks;
                for (i64 j = lo; j < hi; ++j)
                    for (i64 d = 0; d < D; d += 16) __builtin_prefetch(next[t] + j * next_rows[t] + d);
            }
        }
        const float* qr[QR];
        for (int r = 0; r < QR; ++r) qr[r] = qb + std::min(i0 + r, L - 1) * qrow;  // short block: repeat the last row
        for (i64 j0 = 0; j0 < Sp; j0 += VL) {  // one vector of keys
            vf acc[QR] = {};
            for (i64 d = 0; d < D; ++d) {
                const vf kd = *(const vf*)(kt + d * Sp + j0);
#pragma GCC unroll 16
                for (int r = 0; r < QR; ++r) acc[r] += qr[r][d] * kd;
            }
#pragma GCC unroll 16
            for (int r = 0; r < QR; ++r) *(vf*)(sc + r * Sp + j0) = acc[r] * scale;
        }
        const i64 rows = std::min<i64>(QR, L - i0);
        float inv[QR] = {0};
        i64 vis_max = 0;
        for (int r = 0; r < QR; ++r) {
            const i64 i = std::min(i0 + r, L - 1);
            float* p = sc + r * Sp;
            if (mask_kind == 1) {
                const float* mf = (const float*)mrow0 + i * mrow_stride;
                for (i64 j = 0; j < S; ++j) p[j] += mf[j];
            } else if (mask_kind == 2) {
                const uint8_t* mb = (const uint8_t*)mrow0 + i * mrow_stride;
                for (i64 j = 0; j < S; ++j) p[j] = mb[j] ? p[j] : -INFINITY;
            }
            const i64 visible = causal ? std::min(S, i + 1) : S;
            for (i64 j = visible; j < Sp; ++j) p[j] = -INFINITY;  // padding and causally hidden keys: weight 0
            const float mx = row_max(p, Sp);
            if (mx == -INFINITY) {  // nothing to attend to: zero weights, zero output
                for (i64 j = 0; j < Sp; ++j) p[j] = 0.0f;
                continue;
            }
            inv[r] = 1.0f / exp_sum(p, Sp, mx);
            vis_max = std::max(vis_max, visible);
        }
        constexpr int PR = rows_per_sum(DD);  // rows per weighted sum: PR x DD / 16 vector accumulators
        for (int r0 = 0; r0 < rows; r0 += PR)
            weighted_values<DD, PR>(sc + r0 * Sp, Sp, std::min<i64>(PR, rows - r0), vis_max, vb, vrow, D, inv + r0,
                                    ob + (i0 + r0) * orow, orow, scratch);
    }
}

// st: 20 strides in elements, (batch, head, row, column) for q, k, v, out and mask in that order (a column stride
// must be 1; the mask's are ignored without a mask).
// mask_kind: 0 none, 1 float added to the scaled scores, 2 uint8 (0: the key is masked out). Returns 0, or 1 when
// a scratch allocation fails.
// Whether a mask changes nothing: a boolean mask all true, a float mask all +0 / -0 (x + 0 = x). Read through its
// strides, a broadcast dimension (stride 0) once: a padding mask of a batch without padding costs B * S reads.
static bool mask_neutral(const void* mask, int kind, i64 B, i64 H, i64 L, i64 S, const i64* ms) {
    const i64 nb = ms[0] ? B : 1, nh = ms[1] ? H : 1, nl = ms[2] ? L : 1, ns = ms[3] ? S : 1;
    for (i64 b = 0; b < nb; ++b)
        for (i64 h = 0; h < nh; ++h)
            for (i64 l = 0; l < nl; ++l)
                for (i64 s = 0; s < ns; ++s) {
                    const i64 off = b * ms[0] + h * ms[1] + l * ms[2] + s * ms[3];
                    if (kind == 2 ? !((const unsigned char*)mask)[off] : ((const float*)mask)[off] != 0.0f) return false;
                }
    return true;
}

LB_API int lb_attention(const float* q, const float* k, const float* v, float* out, i64 B, i64 H, i64 HKV, i64 L,
                        i64 S, i64 D, const i64* st, const void* mask, int mask_kind, float scale, int causal,
                        int threads) {
    const i64 *qs = st, *ks = st + 4, *vs = st + 8, *os = st + 12, *ms = st + 16;
    if (mask_kind && mask_neutral(mask, mask_kind, B, H, L, S, ms)) mask_kind = 0;  // the unmasked loop: faster
    const i64 items = B * H, group = H / HKV, Sp = (S + KC - 1) / KC * KC;
    const i64 work = items * L * S * D;
    const int nt = threads > 0 ? threads : omp_get_max_threads();
    const size_t esize = mask_kind == 2 ? 1 : 4;
    int failed = 0;
    lb_parallel(nt, items > 1 && work >= (1 << 16), [&] {
        float* kt = alloc_floats(D * Sp);
        float* sc = alloc_floats(QR * Sp);
        float* scratch = alloc_floats(D);
        const bool ready = kt && sc && scratch;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        int64_t lo, hi;  // this thread's heads (a thread without its buffers skips them: the call then fails)
        lb_my_range(items, &lo, &hi);
        for (i64 item = lo; item < hi; ++item) {
            if (ready) {
                const i64 b = item / H, h = item % H, hk = h / group;
                const float* qb = q + b * qs[0] + h * qs[1];
                const float* kb = k + b * ks[0] + hk * ks[1];
                const float* vb = v + b * vs[0] + hk * vs[1];
                float* ob = out + b * os[0] + h * os[1];
                const void* m0 = mask_kind ? (const char*)mask + (b * ms[0] + h * ms[1]) * esize : nullptr;
                const i64 mrow = mask_kind ? ms[2] : 0;
                const float* next[3] = {nullptr, nullptr, nullptr};
                const i64 next_rows[3] = {qs[2], ks[2], vs[2]};
                if (item + 1 < items) {
                    const i64 nb = (item + 1) / H, nh = (item + 1) % H, nhk = nh / group;
                    next[0] = q + nb * qs[0] + nh * qs[1];
                    next[1] = k + nb * ks[0] + nhk * ks[1];
                    next[2] = v + nb * vs[0] + nhk * vs[1];
                }
#define LB_ATTEND(DD)                                                                                            \
    attend_head<DD>(qb, qs[2], kb, ks[2], vb, vs[2], ob, os[2], m0, mask_kind, mrow, L, S, Sp, D, scale, causal, \
                    kt, sc, scratch, item + 1 < items ? next : nullptr, next_rows)
                switch (D) {
                    case 16: LB_ATTEND(16); break;
                    case 32: LB_ATTEND(32); break;
                    case 64: LB_ATTEND(64); break;
                    default: LB_ATTEND(0);
                }
#undef LB_ATTEND
            }
        }
        free(kt);
        free(sc);
        free(scratch);
    });
    return failed;
}
