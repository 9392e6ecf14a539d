// One transformer encoder block in one call: the sequence of kernels `lowbit.nn.fused_blocks` runs from Python,
// without a Python step between them (at batch 1 those steps cost as much as the attention):
//
//   post-norm (BERT):  h = LN1(x + O(attn(QKV(x))));        out = LN2(h + FC2(act(FC1(h))))
//   pre-norm  (ViT):   h = x + O(attn(QKV(LN1(x))));         out = h + FC2(act(FC1(LN2(h))))
//
// QKV, O, FC1 and FC2 are lb_linear layers (any format, their activation quantization included) with optional
// biases; QKV computes query, key and value side by side ((M, 3D) rows, heads inside each third), read by
// lb_attention through strides — or, where they are three layers, each its own (M, D) block. act: 1 exact GELU, 2 tanh GELU (lb_gelu), 3 ReLU. Built into the same library as
// lowbit_kernels.cpp (see native.py); each step is the function the Python path calls, so the results are the same.
// lb_encoder_stack runs a stack of such blocks (an encoder's layers) in one call, lb_bert_encoder a BERT-style model:
// its embedding layer, then the stack.

#include <stdint.h>
#include <stdlib.h>

#define LB_API extern "C" __attribute__((visibility("default")))
typedef int64_t i64;

struct lb_layer;
extern "C" {
int lb_linear(const lb_layer* L, const float* x, i64 M, float* y, int threads, const float* bias);
int lb_attention(const float* q, const float* k, const float* v, float* out, i64 B, i64 H, i64 HKV, i64 L, i64 S,
                 i64 D, const i64* st, const void* mask, int mask_kind, float scale, int causal, int threads);
void lb_gelu(float* x, i64 n, int tanh_approx, int threads);
void lb_add_layer_norm(const float* a, const float* b, i64 M, i64 D, const float* gamma, const float* beta, float eps,
                       float* out, float* keep, int threads);
int lb_embed_layer_norm(const float* word, i64 n_word, const i64* ids, const float* type, i64 n_type, const i64* tids,
                        const float* pos, i64 n_pos, const i64* pids, i64 B, i64 L, i64 D, const float* gamma,
                        const float* beta, float eps, float* out, int threads);
}

// The block's layers and norms; biases and norm parameters may be NULL.
struct lb_block {
    const lb_layer *qkv, *o, *fc1, *fc2;
    const float *qkv_b, *o_b, *fc1_b, *fc2_b;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float eps1, eps2;
    float scale;    // attention scale
    int32_t heads;  // head size = D / heads
    int32_t act;    // 1: GELU (erf), 2: GELU (tanh), 3: ReLU
    int32_t pre_norm;
    int32_t ffn;  // FC1's output width
    // qkv NULL: query, key and value as three layers (when they cannot be concatenated, e.g. of other formats)
    const lb_layer *q, *k, *v;
    const float *q_b, *k_b, *v_b;
};

LB_API int lb_block_size(void) { return (int)sizeof(lb_block); }

static inline void add_rows(float* y, const float* r, i64 n) {
    for (i64 i = 0; i < n; ++i) y[i] += r[i];
}

// Scratch for blocks of M rows, model width D and feed-forward width F.
struct scratch {
    float *qkv, *att, *h, *f, *t;
    bool alloc(i64 M, i64 D, i64 F) {
        qkv = (float*)malloc(sizeof(float) * M * 3 * D);
        att = (float*)malloc(sizeof(float) * M * D);
        h = (float*)malloc(sizeof(float) * M * D);
        f = (float*)malloc(sizeof(float) * M * (F > D ? F : D));
        t = (float*)malloc(sizeof(float) * M * D);
        return qkv && att && h && f && t;
    }
    void release() {
        free(qkv);
        free(att);
        free(h);
        free(f);
        free(t);
    }
};

// out = the block applied to x (out may not alias x); s: scratch for at least these sizes.
static int encoder_block(const lb_block* k, const float* x, i64 B, i64 L, i64 D, const void* mask, int mask_kind,
                         const i64* mst, float* out, int threads, const scratch& s) {
    const i64 M = B * L, H = k->heads, hd = D / H, F = k->ffn;
    float *qkv = s.qkv, *att = s.att, *h = s.h, *f = s.f, *t = s.t;
    int rc = 0;
    const float* in = x;  // the attention's input
    if (k->pre_norm) {
        lb_add_layer_norm(x, nullptr, M, D, k->ln1_w, k->ln1_b, k->eps1, t, nullptr, threads);
        in = t;
    }
    if (k->qkv) {
        rc = lb_linear(k->qkv, in, M, qkv, threads, k->qkv_b);
        if (!rc) {
            // q, k, v: thirds of the qkv rows; out: (B, L, H, hd) rows = (M, D)
            const i64 st[20] = {L * 3 * D, hd, 3 * D, 1, L * 3 * D, hd, 3 * D, 1, L * 3 * D, hd, 3 * D, 1,
                                L * D,     hd, D,     1, mst[0],    mst[1], mst[2], mst[3]};
            rc = lb_attention(qkv, qkv + D, qkv + 2 * D, att, B, H, H, L, L, hd, st, mask, mask_kind, k->scale, 0,
                              threads)
                     ? -2
                     : 0;
        }
    } else {  // three layers, each into its own (M, D) third of the buffer
        rc = lb_linear(k->q, in, M, qkv, threads, k->q_b);
        if (!rc) rc = lb_linear(k->k, in, M, qkv + M * D, threads, k->k_b);
        if (!rc) rc = lb_linear(k->v, in, M, qkv + 2 * M * D, threads, k->v_b);
        if (!rc) {
            const i64 st[20] = {L * D, hd, D, 1, L * D, hd, D, 1, L * D, hd, D, 1,
                                L * D, hd, D, 1, mst[0], mst[1], mst[2], mst[3]};
            rc = lb_attention(qkv, qkv + M * D, qkv + 2 * M * D, att, B, H, H, L, L, hd, st, mask, mask_kind,
                              k->scale, 0, threads)
                     ? -2
                     : 0;
        }
    }
    if (!rc) rc = lb_linear(k->o, att, M, h, threads, k->o_b);
    if (!rc) {
        if (k->pre_norm) {
            add_rows(h, x, M * D);  // h = x + O(...)
            lb_add_layer_norm(h, nullptr, M, D, k->ln2_w, k->ln2_b, k->eps2, t, nullptr, threads);
            rc = lb_linear(k->fc1, t, M, f, threads, k->fc1_b);
        } else {
            lb_add_layer_norm(h, x, M, D, k->ln1_w, k->ln1_b, k->eps1, h, nullptr, threads);  // h = LN1(x + O)
            rc = lb_linear(k->fc1, h, M, f, threads, k->fc1_b);
        }
    }
    if (!rc) {
        if (k->act == 3) {
            for (i64 i = 0; i < M * F; ++i) f[i] = f[i] < 0.0f ? 0.0f : f[i];  // ReLU (NaN stays NaN)
        } else {
            lb_gelu(f, M * F, k->act == 2, threads);
        }
        rc = lb_linear(k->fc2, f, M, t, threads, k->fc2_b);
    }
    if (!rc) {
        if (k->pre_norm) {
            for (i64 i = 0; i < M * D; ++i) out[i] = h[i] + t[i];
        } else {
            lb_add_layer_norm(t, h, M, D, k->ln2_w, k->ln2_b, k->eps2, out, nullptr, threads);
        }
    }
    return rc;
}

// out (B, L, D) = the block applied to x (B, L, D); mask: as lb_attention's (kind 0: none; mst: its four strides).
// Returns 0, -2 when out of memory, or the first failing kernel's code.
LB_API int lb_encoder_block(const lb_block* k, const float* x, i64 B, i64 L, i64 D, const void* mask,
                            int mask_kind, const i64* mst, float* out, int threads) {
    scratch s;
    int rc = s.alloc(B * L, D, k->ffn) ? encoder_block(k, x, B, L, D, mask, mask_kind, mst, out, threads, s) : -2;
    s.release();
    return rc;
}

// The stack on x, with blocks' outputs alternating between two buffers and scratch allocated once (see below).
static int run_stack(const lb_block* const* blocks, int n, const float* x, i64 B, i64 L, i64 D, const void* mask,
                     int mask_kind, const i64* mst, float* out, int threads) {
    const i64 M = B * L;
    i64 F = D;
    for (int i = 0; i < n; ++i) F = blocks[i]->ffn > F ? blocks[i]->ffn : F;
    scratch s;
    float* mid[2] = {(float*)malloc(sizeof(float) * M * D), n > 2 ? (float*)malloc(sizeof(float) * M * D) : nullptr};
    int rc = (s.alloc(M, D, F) && mid[0] && (n <= 2 || mid[1])) ? 0 : -2;
    const float* in = x;
    for (int i = 0; i < n && !rc; ++i) {
        float* dst = i == n - 1 ? out : mid[i % 2];
        rc = encoder_block(blocks[i], in, B, L, D, mask, mask_kind, mst, dst, threads, s);
        in = dst;
    }
    s.release();
    free(mid[0]);
    free(mid[1]);
    return rc;
}

// out = blocks[n-1](... blocks[0](x)): a stack of encoder blocks of width D sharing one mask, in one call.
// Returns as lb_encoder_block.
LB_API int lb_encoder_stack(const lb_block* const* blocks, int n, const float* x, i64 B, i64 L, i64 D,
                            const void* mask, int mask_kind, const i64* mst, float* out, int threads) {
    return run_stack(blocks, n, x, B, L, D, mask, mask_kind, mst, out, threads);
}

// A BERT-style model in one call: out (B, L, D) = the stack of blocks on lb_embed_layer_norm's output for token ids
// (B, L) (type ids, position ids, tables and LayerNorm as there), with attention_mask (B, L, may be NULL; 0 marks a
// padding token, as transformers' attention_mask) as the keys' padding mask. Returns 0, -1 for an index outside its
// table, or as lb_encoder_block.
LB_API int lb_bert_encoder(const float* word, i64 n_word, const i64* ids, const float* type, i64 n_type,
                           const i64* tids, const float* pos, i64 n_pos, const i64* pids, const float* gamma,
                           const float* beta, float eps, const i64* attention_mask, const lb_block* const* blocks,
                           int n, i64 B, i64 L, i64 D, float* out, int threads) {
    float* x = (float*)malloc(sizeof(float) * B * L * D);
    unsigned char* keep = attention_mask ? (unsigned char*)malloc(B * L) : nullptr;
    if (!x || (attention_mask && !keep)) {
        free(x);
        free(keep);
        return -2;
    }
    int rc = lb_embed_layer_norm(word, n_word, ids, type, n_type, tids, pos, n_pos, pids, B, L, D, gamma, beta, eps,
                                 x, threads);
    if (!rc) {
        for (i64 i = 0; keep && i < B * L; ++i) keep[i] = attention_mask[i] != 0;
        const i64 mst[4] = {L, 0, 0, 1};  // (B, 1, 1, L): one row of key flags per sequence
        rc = run_stack(blocks, n, x, B, L, D, keep, keep ? 2 : 0, mst, out, threads);
    }
    free(x);
    free(keep);
    return rc;
}
