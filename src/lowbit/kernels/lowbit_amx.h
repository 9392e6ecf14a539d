// lowbit_amx.h — the many-row int8 panel kernels on AMX tiles (Intel Sapphire Rapids and later).
//
// AMX-INT8 multiplies a 16 x 64 tile of signed bytes by a 64 x 16 one (stored as 16 rows of 16 columns x 4
// consecutive k) into 16 x 16 int32 sums in one instruction (tdpbssd: 16 Ki products, exact). The int8 panels of
// lb_w8a8_panel (panel p, k-quad q: byte p*16*Kp + 64q + 4j + t = w[16p + j][4q + t]) are that B layout as they
// stand: 16 consecutive k-quads of a panel are one 1 KiB tile with a 64-byte row stride. The activations are the
// int8 codes themselves (signed x signed: no +128 offset, no column-sum correction, -128 included), copied into
// rows padded with zeros to whole 16-row tiles and 64-byte tile rows.
//
// A block is 2 x 2 tiles: 32 rows x 32 columns (two panels) in the four int32 accumulator tiles 0..3; tiles 4, 5
// hold the rows, 6, 7 the panels. Every sum is the exact int32 sum of the VNNI and AVX2 tiles, and the caller's
// epilogue applies the same float expression to it, so the outputs are the same bits (tested).
//
// AMX-BF16 (tdpbf16ps, LB_AMX_BF16) runs the same blocks on bf16 data: a 64-byte tile row holds 32 k of a row, or 2
// consecutive k of 16 columns of a panel, and the sums are fp32 (fp8_amx: FP8 layers with FP8 activations).
//
// Linux hands out the tile registers only on request (arch_prctl ARCH_REQ_XCOMP_PERM, once per process); where
// that fails (an older kernel, a signal stack too small for the tile state) the VNNI kernels serve. LOWBIT_AMX=0
// in the environment, or lb_amx(0), turns the AMX kernels off (for comparisons and tests).
#pragma once

#if defined(LB_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define LB_AMX 1
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define LB_AMX_BF16 1  // FP8 layers with FP8 activations: their codes as bf16 (exact) on tdpbf16ps
#endif
#include <strings.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>

// Asks Linux for the tile state (ARCH_REQ_XCOMP_PERM = 0x1023 for XFEATURE_XTILEDATA = 18), once per process in
// effect: true when the process may use the tiles. From then on the kernel refuses a new signal stack (sigaltstack)
// too small for the tile state; one installed before (Python's faulthandler) keeps working.
static bool amx_request() { return syscall(SYS_arch_prctl, (unsigned long)0x1023, (unsigned long)18) == 0; }

// -1: not asked yet; 0: unavailable or off; 1: on.
static std::atomic<int> amx_state{-1};

static bool amx_on() {
    int s = amx_state.load(std::memory_order_relaxed);
    if (s < 0) {
        const char* env = getenv("LOWBIT_AMX");
        const bool off = env && (!strcmp(env, "0") || !strcasecmp(env, "off") || !strcasecmp(env, "false") ||
                                 !strcasecmp(env, "no"));
        s = !off && amx_request() ? 1 : 0;
        amx_state.store(s, std::memory_order_relaxed);
    }
    return s == 1;
}

// GCC's tile loads (and ldtilecfg, past its first 8 bytes) are asm statements that do not tell the compiler they
// read memory: without this barrier it may drop or sink the stores that fill a buffer just before its tile load.
static inline void amx_fence() { __asm__ volatile("" ::: "memory"); }

// The tile shapes: 0..3 int32 16 x 16 (64-byte rows), 4, 5 int8 16 x 64, 6, 7 int8 16 x (16 x 4).
struct alignas(64) AmxConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
    AmxConfig() {
        for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
    }
};

// Rows of M int8 codes (K each) padded with zero rows and columns to Mt x Kq (Mt: whole 16-row tiles, Kq: whole
// 64-byte tile rows), for the A tiles. NULL when out of memory.
static int8_t* amx_rows(const int8_t* xq, i64 M, i64 K, i64 Mt, i64 Kq) {
    int8_t* a = (int8_t*)scratch_uninit(Mt * Kq);
    if (!a) return nullptr;
    for (i64 m = 0; m < Mt; ++m) {
        int8_t* dst = a + m * Kq;
        if (m < M) {
            memcpy(dst, xq + m * K, K);
            memset(dst + K, 0, Kq - K);
        } else {
            memset(dst, 0, Kq);
        }
    }
    return a;
}

// The tile product C += A . B (tile numbers: the intrinsics paste them into the instruction): tdpbssd (int8 x int8
// into int32) or, where BF, tdpbf16ps (pairs of bf16 into fp32).
#ifdef LB_AMX_BF16
#define LB_AMX_DOT(C, A, B)                                 \
    do {                                                    \
        if constexpr (BF) _tile_dpbf16ps(C, A, B);          \
        else _tile_dpbssd(C, A, B);                         \
    } while (0)
#else
#define LB_AMX_DOT(C, A, B) _tile_dpbssd(C, A, B)
#endif

// One block: MT (1, 2) tiles of 16 rows from a (row stride Kq) times NP (1, 2) panels from wp (panel stride
// 16 * Kp), int32 sums over k in [k0, k1) into c (MT*16 rows of NP*16 columns, row stride 32 ints). The panels hold
// Kp (a multiple of 32) k: a last half step of 32 k reads its 8 k-quads per panel from a zero-padded copy, so no
// tile load runs past a panel's end (the rows past K are zero anyway).
// BF: the same in bytes for bf16 rows and panels (Kq, Kp, k0, k1 count bytes: 2 per k; a panel's tile row holds
// 16 columns x 2 consecutive k), fp32 sums into c (then a float array).
template <int MT, int NP, bool BF = false>
static inline void amx_block(const int8_t* a, i64 Kq, const int8_t* wp, i64 Kp, i64 k0, i64 k1, void* c) {
    _tile_zero(0);
    if constexpr (NP == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NP == 2) _tile_zero(3);
    auto step = [&](i64 k, const int8_t* b0, const int8_t* b1) __attribute__((always_inline)) {
        _tile_loadd(4, a + k, Kq);
        _tile_loadd(6, b0, 64);
        LB_AMX_DOT(0, 4, 6);
        if constexpr (NP == 2) {
            _tile_loadd(7, b1, 64);
            LB_AMX_DOT(1, 4, 7);
        }
        if constexpr (MT == 2) {
            _tile_loadd(5, a + 16 * Kq + k, Kq);
            LB_AMX_DOT(2, 5, 6);
            if constexpr (NP == 2) LB_AMX_DOT(3, 5, 7);
        }
    };
    const i64 ps = 16 * Kp, full = std::min(k1, Kp / 64 * 64);
    i64 k = k0;
    for (; k < full; k += 64) step(k, wp + 16 * k, wp + ps + 16 * k);
    if (k < k1) {  // the last 32 k of the panels
        alignas(64) int8_t tail[2][1024];
        for (int j = 0; j < NP; ++j) {
            memcpy(tail[j], wp + j * ps + 16 * k, 512);
            memset(tail[j] + 512, 0, 512);
        }
        amx_fence();
        step(k, tail[0], tail[1]);
        amx_fence();  // (the stack slot of tail may be reused for c)
    }
    int32_t* d = (int32_t*)c;  // (fp32 sums: the same 4-byte cells)
    _tile_stored(0, d, 128);
    if constexpr (NP == 2) _tile_stored(1, d + 16, 128);
    if constexpr (MT == 2) _tile_stored(2, d + 16 * 32, 128);
    if constexpr (MT == 2 && NP == 2) _tile_stored(3, d + 16 * 32 + 16, 128);
    amx_fence();  // (not every compiler's tilestored declares that it writes memory)
}

// The AMX form of a many-row panel kernel on rows already in tile form (a: M rows of Kq bytes, readable up to a
// multiple of 32 rows; the rows past M are read, not stored: zeros, or a convolution's next image):
// tile(IC<MT>, IC<NP>, a_m, Kq, m, mr, p) computes rows m .. m+mr-1 (mr <= 16 MT, their codes at a_m)
// against panels p .. p+NP-1 (amx_block and an epilogue). Row blocks of 32 are split between threads when there are
// enough, else the panel pairs, in chunks that stay in L2 while its row blocks pass over them (walk_blocks).
// on_chunk(p0, p1): called by a thread before its first tile of each chunk of panels [p0, p1) (weights decoded per
// chunk into the thread's buffer, amx_chunk_panels, instead of the whole layer per call).
struct NoChunkHook {
    void operator()(i64, i64) const {}
};
template <class F, class C = NoChunkHook>
static void amx_run(const int8_t* a, i64 Kq, i64 M, i64 N, i64 Kp, int threads, F tile, C on_chunk = {}) {
    const i64 P = (N + 15) / 16, pairs = (P + 1) / 2, blocks = (M + 31) / 32;
    const i64 chunk = std::max<i64>(1, (512 * 1024) / (32 * Kp));
    lb_parallel(nthreads(threads), threads != 1 && M * N * Kp >= (1 << 18), [&] {
        const AmxConfig cfg;
        amx_fence();
        _tile_loadconfig(&cfg);
        i64 seen = -1;
        walk_blocks(blocks, pairs, chunk, [&](i64 b, i64 c0, i64 c1) {
            if (c0 != seen) on_chunk(2 * c0, std::min(P, 2 * c1)), seen = c0;
            const i64 m = 32 * b, mr = std::min<i64>(32, M - m);
            const int8_t* am = a + m * Kq;
            for (i64 q = c0; q < c1; ++q) {
                const i64 p = 2 * q;
                const bool two = p + 1 < P;
                if (mr > 16) {
                    if (two) tile(IC<2>(), IC<2>(), am, Kq, m, mr, p);
                    else tile(IC<2>(), IC<1>(), am, Kq, m, mr, p);
                } else {
                    if (two) tile(IC<1>(), IC<2>(), am, Kq, m, mr, p);
                    else tile(IC<1>(), IC<1>(), am, Kq, m, mr, p);
                }
            }
        }, !std::is_same<C, NoChunkHook>::value);
        _tile_release();
    });
}

// amx_run on int8 rows xq (M x K): copied into tile form first. False (nothing done) when the tiles are off or
// unavailable, Kp is not a multiple of 32, or out of memory.
template <class F>
static bool amx_panels(const int8_t* xq, i64 M, i64 K, i64 N, i64 Kp, int threads, F tile) {
    if (Kp % 32 || !amx_on()) return false;
    const i64 Kq = (Kp + 63) / 64 * 64, Mt = (M + 31) / 32 * 32;
    int8_t* a = amx_rows(xq, M, K, Mt, Kq);
    if (!a) return false;
    amx_run(a, Kq, M, N, Kp, threads, tile);
    free(a);
    return true;
}

// Sign bits (pack_signs layout: bit i of uint64 word j = sign of k = 64j + i, W words a row) as tile rows of +1 / -1
// codes (k < K; 0 past K and in the padding rows), Mt x Kq. NULL when out of memory.
static int8_t* amx_sign_rows(const uint64_t* xb, i64 W, i64 M, i64 K, i64 Mt, i64 Kq) {
    int8_t* a = (int8_t*)scratch(Mt * Kq);
    if (!a) return nullptr;
    const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
    for (i64 m = 0; m < M; ++m) {
        int8_t* dst = a + m * Kq;
        for (i64 j = 0; 64 * j < K; ++j) {
            const i64 n = std::min<i64>(64, K - 64 * j);
            const __mmask64 live = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
            const __m512i v = _mm512_mask_blend_epi8((__mmask64)xb[m * W + j], minus, plus);
            _mm512_mask_storeu_epi8(dst + 64 * j, live, v);
        }
    }
    return a;
}

static int amx_switch(int on) {
    if (on >= 0) {
        if (!on) amx_state.store(0, std::memory_order_relaxed);
        else if (amx_state.load(std::memory_order_relaxed) != 1)
            amx_state.store(amx_request() ? 1 : 0, std::memory_order_relaxed);
    }
    return amx_on() ? 1 : 0;
}
#else
static int amx_switch(int) { return 0; }
#endif
