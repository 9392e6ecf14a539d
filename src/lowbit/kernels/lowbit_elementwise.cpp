// Element-wise and row-wise fp32 operations a transformer block runs between its linear layers, one pass each:
//
//   lb_gelu            x <- GELU(x) in place, exact (erf) or the tanh approximation;
//   lb_add_layer_norm  out = LayerNorm(a + b) * gamma + beta per row (the residual add and LayerNorm in one pass;
//                      the sum a + b can be kept too);
//   lb_embed_layer_norm  BERT's embeddings: LayerNorm(word[id] + type[type id] + position[position id]) per token.
//
// On a CPU these cost little arithmetic but, through PyTorch, several operator calls each (~3-15 us apiece at the
// sizes of an encoder at batch 1, as much as the arithmetic), and PyTorch's exact GELU evaluates erf at ~0.6 ns per
// element. erf here: a rational minimax fit on [-4, 4] (one division, no exp; erf(4) = 1 - 1.5e-8); the tanh form
// uses the exp polynomial of lowbit_exp.h (relative error ~2e-7). GELU and the LayerNorm rows run on GCC vector types
// of the build's width (vf), the scalar functions on the tails. LayerNorm: two passes over the row (mean, then the centred variance, as
// PyTorch), biased variance, eps inside the square root.
//
// Rows are split across `threads` OpenMP threads only when there is enough work (a parallel region costs
// microseconds). Built into the same library as lowbit_kernels.cpp (see native.py).

#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>

#include "lowbit_exp.h"
#include "lowbit_omp.h"

#define LB_API extern "C" __attribute__((visibility("default")))
typedef int64_t i64;

namespace {

// Below this many elements one thread does the whole call.
constexpr i64 PARALLEL_MIN = 1 << 16;

// 0.5 * x * (1 + erf(x / sqrt 2)), erf as the odd rational function z P(z^2) / Q(z^2) on z clamped to [-4, 4]
// (degrees 13 / 8; the minimax fit Eigen and XLA use for float erf): one division and 12 FMAs, no exp. F: a float
// (the tails) or the build's vector vf (lowbit_exp.h): a loop of scalar calls did not vectorise on AVX2 builds (its
// selects stayed branches), 7x slower than PyTorch's GELU there. Two plain selects for the clamp: a nested one is
// control flow.
template <class F>
inline F gelu_erf(F x) {
    F z = x * 0.70710678118654752f;
    z = z < -4.0f ? -4.0f : z;
    z = z > 4.0f ? 4.0f : z;
    const F z2 = z * z;
    F p = z2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = p * z2 - 2.10102402082508e-06f;
    p = p * z2 - 5.69250639462346e-05f;
    p = p * z2 - 7.34990630326855e-04f;
    p = p * z2 - 2.95459980854025e-03f;
    p = p * z2 - 1.60960333262415e-02f;
    F q = z2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
    q = q * z2 - 1.68282697438203e-03f;
    q = q * z2 - 7.37332916720468e-03f;
    q = q * z2 - 1.42647390514189e-02f;
    return 0.5f * x * (1.0f + z * p / q);
}

// 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))), tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|).
template <class F>
inline F gelu_tanh(F x) {
    const F u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    const auto neg = u < 0.0f;
    const F e = exp_neg_t<F>(-2.0f * (neg ? -u : u));
    const F th_abs = (1.0f - e) / (1.0f + e);
    return 0.5f * x * (1.0f + (neg ? -th_abs : th_abs));
}

template <bool TANH>
void gelu_range(float* x, i64 lo, i64 hi) {
    i64 i = lo;
    for (; i + VL <= hi; i += VL) *(vf*)(x + i) = TANH ? gelu_tanh(*(vf*)(x + i)) : gelu_erf(*(vf*)(x + i));
    for (; i < hi; ++i) x[i] = TANH ? gelu_tanh(x[i]) : gelu_erf(x[i]);
}

inline float lanes_sum(vf v) {
    float t = 0.0f;
    for (int l = 0; l < VL; ++l) t += v[l];
    return t;
}

// One row: s = a + b (kept in `keep` when given), out = (s - mean) / sqrt(var + eps) * gamma + beta.
void add_layer_norm_row(const float* a, const float* b, i64 D, const float* gamma, const float* beta, float eps,
                        float* out, float* keep) {
    float* s = keep ? keep : out;
    const i64 DV = D / VL * VL;
    vf acc = {};
    float sum = 0.0f;
    if (b) {
        for (i64 j = 0; j < DV; j += VL) {
            const vf v = *(const vf*)(a + j) + *(const vf*)(b + j);
            *(vf*)(s + j) = v;
            acc += v;
        }
        for (i64 j = DV; j < D; ++j) sum += (s[j] = a[j] + b[j]);
    } else {
        for (i64 j = 0; j < DV; j += VL) {
            const vf v = *(const vf*)(a + j);
            *(vf*)(s + j) = v;
            acc += v;
        }
        for (i64 j = DV; j < D; ++j) sum += (s[j] = a[j]);
    }
    const float mean = (sum + lanes_sum(acc)) / float(D);
    vf vacc = {};
    float var = 0.0f;
    for (i64 j = 0; j < DV; j += VL) {
        const vf c = *(const vf*)(s + j) - mean;
        vacc += c * c;
    }
    for (i64 j = DV; j < D; ++j) var += (s[j] - mean) * (s[j] - mean);
    const float rstd = 1.0f / std::sqrt((var + lanes_sum(vacc)) / float(D) + eps);
    if (gamma && beta) {
        for (i64 j = 0; j < DV; j += VL)
            *(vf*)(out + j) = (*(const vf*)(s + j) - mean) * rstd * *(const vf*)(gamma + j) + *(const vf*)(beta + j);
        for (i64 j = DV; j < D; ++j) out[j] = (s[j] - mean) * rstd * gamma[j] + beta[j];
    } else {
        for (i64 j = 0; j < D; ++j) {
            const float n = (s[j] - mean) * rstd;
            out[j] = (gamma ? n * gamma[j] : n) + (beta ? beta[j] : 0.0f);
        }
    }
}

}  // namespace

// x[0 .. n) <- GELU(x) in place; tanh_approx != 0: the tanh approximation (PyTorch's approximate="tanh").
LB_API void lb_gelu(float* x, i64 n, int tanh_approx, int threads) {
    const int T = n >= PARALLEL_MIN && threads > 1 ? threads : 1;
    if (T == 1) {
        if (tanh_approx) gelu_range<true>(x, 0, n);
        else gelu_range<false>(x, 0, n);
        return;
    }
    lb_parallel(T, true, [&] {  // (chunks from the team's real size: OMP_THREAD_LIMIT may give fewer than T)
        const i64 nth = lb_team_size(), chunk = ((n + nth - 1) / nth + 15) / 16 * 16;
        const i64 lo = std::min(n, chunk * lb_team_rank()), hi = std::min(n, lo + chunk);
        if (tanh_approx) gelu_range<true>(x, lo, hi);
        else gelu_range<false>(x, lo, hi);
    });
}

// out[r] = LayerNorm(a[r] + b[r]) * gamma + beta for rows r < M of D floats (rows contiguous); b, gamma, beta may be
// NULL (no residual, weight 1, bias 0); keep (may be NULL) receives a + b. out may alias a or b (not keep).
LB_API void lb_add_layer_norm(const float* a, const float* b, i64 M, i64 D, const float* gamma, const float* beta,
                              float eps, float* out, float* keep, int threads) {
    const int T = M * D >= PARALLEL_MIN && threads > 1 && M > 1 ? threads : 1;
    lb_parallel(T, true, [&] {
        int64_t lo, hi;
        lb_my_range(M, &lo, &hi);
        for (i64 r = lo; r < hi; ++r)
            add_layer_norm_row(a + r * D, b ? b + r * D : nullptr, D, gamma, beta, eps, out + r * D,
                               keep ? keep + r * D : nullptr);
    });
}

// BERT's embedding layer: out[t] = LayerNorm((word[ids[t]] + type[tids[t]]) + pos[pids[t % L]]) * gamma + beta for the
// T = B * L tokens, summed in that order (as transformers does). tids may be NULL (type row 0 for every token); type
// may be NULL (no type table). Returns 0, or -1 when an index is outside its table (nothing is written then).
LB_API int lb_embed_layer_norm(const float* word, i64 n_word, const i64* ids, const float* type, i64 n_type,
                               const i64* tids, const float* pos, i64 n_pos, const i64* pids, i64 B, i64 L, i64 D,
                               const float* gamma, const float* beta, float eps, float* out, int threads) {
    const i64 T = B * L;
    for (i64 t = 0; t < T; ++t) {
        if (ids[t] < 0 || ids[t] >= n_word) return -1;
        if (type && (tids ? (tids[t] < 0 || tids[t] >= n_type) : n_type < 1)) return -1;
    }
    for (i64 l = 0; l < L; ++l)
        if (pids[l] < 0 || pids[l] >= n_pos) return -1;
    const int Tn = T * D >= PARALLEL_MIN && threads > 1 && T > 1 ? threads : 1;
    lb_parallel(Tn, true, [&] {
        int64_t lo, hi;
        lb_my_range(T, &lo, &hi);
        for (i64 t = lo; t < hi; ++t) {
            float* o = out + t * D;
            const float* w = word + ids[t] * D;
            if (type) {
                const float* ty = type + (tids ? tids[t] : 0) * D;
                for (i64 j = 0; j < D; ++j) o[j] = w[j] + ty[j];
            } else {
                for (i64 j = 0; j < D; ++j) o[j] = w[j];
            }
            add_layer_norm_row(o, pos + pids[t % L] * D, D, gamma, beta, eps, o, nullptr);
        }
    });
    return 0;
}
