// Hopper (sm_90a) warp-specialised forward pass, FlashAttention-3 style, for dense (batch, seqlen, heads, dim)
// tensors. Same outputs as fwd_sm90.cu (O in the input dtype, natural-log LSE in float32, zeros / -inf for rows
// that see no key) and the same score features (causal / sliding window, softcap, ALiBi, GQA).
//
// A CTA of 1 + C warpgroups (C = ATTNKIT_WS_CONSUMERS, 2 or 3) owns BM = 64 C query rows of one (batch, head):
// - warpgroup 0 is the producer: it gives registers back (setmaxnreg.dec) and one thread issues every copy through
//   the TMA unit: Q once, then K and V tiles of BN keys into a 2-stage ring. Each stage has a "full" barrier (the
//   copy's bytes landed) and an "empty" one (every consumer warpgroup is done reading it) for K and for V apart,
//   so S = Q K^T can start before V has landed.
// - warpgroups 1..C are consumers, 64 query rows each (setmaxnreg.inc): S = Q K^T as wgmma with both operands
//   in shared memory, online softmax in registers, O += P V as wgmma with P from registers.
// With ATTNKIT_WS_PIPE = 1 a consumer issues S of tile i+1 before it runs the softmax of tile i... in the order
// that keeps the tensor core busy: issue S_i, issue P_{i-1} V_{i-1}, wait for S_i only (wait_group 1), run the
// softmax of S_i while P V still runs, then wait for P V and rescale O. With ATTNKIT_WS_PINGPONG = 1 (the default) the
// consumers also take turns issuing their GEMMs, in a fixed round (named barriers), so one's softmax overlaps the
// others' GEMMs. Three consumers (FlashAttention-3's head-dim-64 tile, 192 rows) give each softmax two other
// warpgroups' GEMMs to hide behind, at 160 registers per consumer thread, which only head dim 64's accumulators fit.
//
// Tiles land in the 128-byte-swizzle layout the descriptors read (sw128.cuh): each TMA box is 128 bytes of columns
// x rows with SWIZZLE_128B, which is exactly one slab of that layout. Rows past the sequence end and columns past
// the tensor's head dim arrive as zeros.
//
// FP8 (ATTNKIT_FP8 = 1): q, k and v are float8_e4m3fn with per (batch, KV head) descales, both products run on
// e4m3 wgmma (K = 32). 8-bit wgmma reads B K-major only, so V arrives as V^T, (batch, KV head, dim, keys), whose
// keys are permuted within every 32 by the copy that made it (fp8_vt.cu): the key a thread's S accumulator holds
// at a position is the key the e4m3 A fragment expects there, so P goes from accumulators to A registers without
// a shuffle. P is exp2(s - max + 8) (FlashAttention-3's 2^8) rounded to e4m3; q_descale * k_descale joins the
// score scale, v_descale the output's normalisation. O is written as bfloat16 / float16 (ATTNKIT_BF16) or float32
// (ATTNKIT_OUT_F32).
//
// Configuration (macros):
//   ATTNKIT_HEAD_DIM       64 or 128 (the tensors' head dim is a run-time argument <= this)
//   ATTNKIT_BF16           1: bfloat16, 0: float16 (the inputs; with ATTNKIT_FP8 the output)
//   ATTNKIT_FP8            1: float8_e4m3fn inputs (needs ATTNKIT_HEAD_DIM 128 and ATTNKIT_WS_BN 128)
//   ATTNKIT_OUT_F32        1: float32 output (fp8 only)
//   ATTNKIT_WS_BN          keys per tile (64 or 128)
//   ATTNKIT_WS_CONSUMERS   consumer warpgroups (2, or 3 at head dim 64 with 16-bit inputs)
//   ATTNKIT_WS_PIPE        1: softmax of tile i overlaps the GEMMs of tiles i / i-1 inside a warpgroup
//   ATTNKIT_WS_PINGPONG    1: the consumer warpgroups take turns issuing their GEMMs, on named barriers
//   ATTNKIT_WS_POLY_EXP    0-4: of every 4 column groups of an unmasked tile, how many take their exponentials
//                          from a polynomial on the float pipes (poly_exp2) instead of the MUFU
//   ATTNKIT_WS_PRODUCER_REGS / ATTNKIT_WS_CONSUMER_REGS  register budgets handed out by setmaxnreg
#include "common.cuh"
#include "softmax.cuh"
#include "sw128.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#ifndef ATTNKIT_HEAD_DIM
#define ATTNKIT_HEAD_DIM 128
#endif
#ifndef ATTNKIT_BF16
#define ATTNKIT_BF16 1
#endif
#ifndef ATTNKIT_FP8
#define ATTNKIT_FP8 0
#endif
#ifndef ATTNKIT_OUT_F32
#define ATTNKIT_OUT_F32 0
#endif
#ifndef ATTNKIT_WS_BN
#define ATTNKIT_WS_BN 128
#endif
#ifndef ATTNKIT_WS_CONSUMERS
#define ATTNKIT_WS_CONSUMERS 2
#endif
#ifndef ATTNKIT_WS_PIPE
#define ATTNKIT_WS_PIPE 1
#endif
#ifndef ATTNKIT_WS_PINGPONG
#define ATTNKIT_WS_PINGPONG 1
#endif
#ifndef ATTNKIT_WS_POLY_EXP
#define ATTNKIT_WS_POLY_EXP 0
#endif
#ifndef ATTNKIT_WS_PRODUCER_REGS
#define ATTNKIT_WS_PRODUCER_REGS 24
#endif
#ifndef ATTNKIT_WS_CONSUMER_REGS
#define ATTNKIT_WS_CONSUMER_REGS 240
#endif

namespace ak {

// The warpgroup MMA of an N-wide product for the kernel's input type.
template <bool FP8, int N, bool BF16>
struct WsMma {
    using type = Wgmma<N, BF16>;
};
template <int N, bool BF16>
struct WsMma<true, N, BF16> {
    using type = WgmmaE4m3<N>;
};

template <int D, int BN, int CONSUMERS, bool BF16, bool PIPE, bool PINGPONG, bool FP8, typename Out>
struct FwdWsKernel {
    static constexpr int BM = 64 * CONSUMERS;
    static constexpr int NTILE = BN / 8;
    static constexpr int DTILE = D / 8;
    static constexpr int ELEM = FP8 ? 1 : 2;            // bytes per input element
    static constexpr int SLAB_COLS = SW128_ROW_BYTES / ELEM;  // columns of one 128-byte-swizzled slab
    static constexpr int SLABS = D / SLAB_COLS;
    static constexpr int K_STEP = 32 / ELEM;            // reduction depth of one wgmma: 32 bytes of each row
    static constexpr int P_REGS = BN / K_STEP;          // A fragments of P per tile (4 registers each)
    static constexpr u32 SLAB = SW128_ROW_BYTES;
    static constexpr u32 Q_BYTES = BM * D * ELEM;
    static constexpr u32 KV_BYTES = BN * D * ELEM;
    // Barrier words after the tiles: Q full, K full x2, V full x2, K empty x2, V empty x2.
    static constexpr int N_BARRIERS = 9;
    static constexpr u32 TILE_BYTES = Q_BYTES + 4 * KV_BYTES;
    // Arrivals that free a stage: lane 0 of each consumer warp, after its own warpgroup's wait.
    static constexpr u32 CONSUMER_ARRIVALS = 4 * CONSUMERS;
    static_assert(CONSUMERS == 2 || (CONSUMERS == 3 && D == 64 && !FP8),
                  "three consumer warpgroups (160 registers each) are built for 16-bit head dim 64 only");
    static_assert(D == 64 || D == 128, "the warp-specialised forward is built for head dims 64 and 128");
    static_assert(BN == 64 || BN == 128, "the warp-specialised forward is built for 64 or 128 keys per tile");
    // V^T tiles hold BN keys in one 128-byte row per channel.
    static_assert(!FP8 || (D == 128 && BN == 128), "the fp8 forward is built for head dim 128 and 128-key tiles");
    static constexpr int P_SHIFT = FP8 ? 8 : 0;
    using Softmax = OnlineSoftmax<1, NTILE, DTILE, P_SHIFT, ATTNKIT_WS_POLY_EXP>;
    using MmaS = typename WsMma<FP8, BN, BF16>::type;
    using MmaO = typename WsMma<FP8, D, BF16>::type;

    // Shared-memory addresses, computed from the aligned base (no arrays: a stage index chosen at run time would
    // put an array of addresses in local memory).
    struct Smem {
        u32 base;
        __device__ __forceinline__ u32 q() const { return base; }
        __device__ __forceinline__ u32 k(int st) const { return base + Q_BYTES + (u32)st * KV_BYTES; }
        __device__ __forceinline__ u32 v(int st) const { return base + Q_BYTES + (u32)(2 + st) * KV_BYTES; }
        __device__ __forceinline__ u32 q_full() const { return base + TILE_BYTES; }
        __device__ __forceinline__ u32 k_full(int st) const { return base + TILE_BYTES + 8u * (1 + st); }
        __device__ __forceinline__ u32 v_full(int st) const { return base + TILE_BYTES + 8u * (3 + st); }
        __device__ __forceinline__ u32 k_empty(int st) const { return base + TILE_BYTES + 8u * (5 + st); }
        __device__ __forceinline__ u32 v_empty(int st) const { return base + TILE_BYTES + 8u * (7 + st); }
    };

    static __device__ __forceinline__ Smem layout() {
        extern __shared__ uint4_aligned smem_raw[];
        // Swizzled tiles must start on 1024-byte boundaries; the launch reserves 1 KB of slack for this.
        return Smem{(smem_u32(smem_raw) + 1023u) & ~1023u};
    }

    // All slabs of one Q or K tile: box (SLAB_COLS columns, rows) at column SLAB_COLS * slab.
    static __device__ __forceinline__ void load_tile(u32 dst, u32 rows, const TmaMap* map, u32 bar, int row0, int head,
                                                     int batch) {
#pragma unroll
        for (int slab = 0; slab < SLABS; ++slab)
            tma_load_4d(dst + (u32)slab * rows * SLAB, map, bar, slab * SLAB_COLS, row0, head, batch);
    }

    // A V tile: as K (rows = keys) for 16-bit inputs; for fp8 one V^T box of BN keys x D channel rows.
    static __device__ __forceinline__ void load_v(u32 dst, const TmaMap* map, u32 bar, int n0, int head, int batch) {
        if constexpr (FP8)
            tma_load_4d(dst, map, bar, n0, 0, head, batch);
        else
            load_tile(dst, BN, map, bar, n0, head, batch);
    }

    static __device__ __forceinline__ void producer(const Smem& sm, const TmaMap* tq, const TmaMap* tk,
                                                    const TmaMap* tv, int m0, int h, int hk, int b, int nb_hi,
                                                    int n_tiles) {
        tma_prefetch_map(tq);
        tma_prefetch_map(tk);
        tma_prefetch_map(tv);
        mbar_arrive_expect_tx(sm.q_full(), Q_BYTES);
        load_tile(sm.q(), BM, tq, sm.q_full(), m0, h, b);
        for (int i = 0; i < n_tiles; ++i) {
            const int st = i & 1;
            const int n0 = (nb_hi - 1 - i) * BN;
            // Stage st last held tile i - 2: wait until every consumer released it (completion number i/2 - 1).
            if (i >= 2) mbar_wait(sm.k_empty(st), ((i >> 1) + 1) & 1);
            mbar_arrive_expect_tx(sm.k_full(st), KV_BYTES);
            load_tile(sm.k(st), BN, tk, sm.k_full(st), n0, hk, b);
            if (i >= 2) mbar_wait(sm.v_empty(st), ((i >> 1) + 1) & 1);
            mbar_arrive_expect_tx(sm.v_full(st), KV_BYTES);
            load_v(sm.v(st), tv, sm.v_full(st), n0, hk, b);
        }
    }

    template <int N>
    static __device__ __forceinline__ void fence_regs(float (&x)[N][4]) {
#pragma unroll
        for (int j = 0; j < N; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(x[j][e]);
    }

    static __device__ __forceinline__ void fence_p(u32 (&p)[P_REGS][4]) {
#pragma unroll
        for (int j = 0; j < P_REGS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(p[j][e]);
    }

    // The descriptors are rebuilt from an opaque copy of the base addresses at every call: otherwise the compiler
    // hoists the loop-invariant Q descriptors (16 registers) out of the key loop, and the consumers spill.
    static __device__ __forceinline__ u32 opaque(u32 x) {
        asm volatile("mov.b32 %0, %0;\n" : "+r"(x));
        return x;
    }

    static __device__ __forceinline__ void issue_s(float (&s)[NTILE][4], u32 q_wg, u32 sK) {
        q_wg = opaque(q_wg);
        sK = opaque(sK);
#pragma unroll
        for (int kk = 0; kk < D / K_STEP; ++kk) {
            const u32 slab_off = (u32)(kk >> 2);  // 4 steps of 32 bytes per 128-byte row
            const u64 da = sw128_desc(q_wg + slab_off * (BM * SLAB) + (u32)(kk & 3) * 32, 16, 1024);
            const u64 db = sw128_desc(sK + slab_off * (BN * SLAB) + (u32)(kk & 3) * 32, 16, 1024);
            MmaS::template ss<0, 0>(s, da, db, kk > 0);
        }
    }

    static __device__ __forceinline__ void issue_pv(float (&acc_o)[DTILE][4], const u32 (&p)[P_REGS][4], u32 sV) {
        sV = opaque(sV);
        if constexpr (FP8) {
            // V^T is K-major: D channel rows of 128 key bytes, 8-row groups 1024 B apart; a step is 32 keys.
#pragma unroll
            for (int kk = 0; kk < P_REGS; ++kk)
                MmaO::template rs<0>(acc_o, p[kk], sw128_desc(sV + (u32)kk * 32, 16, 1024), 1);
        } else {
#pragma unroll
            for (int kk = 0; kk < P_REGS; ++kk) {
                // V is N-major: 16 keys = two 8-row groups (SBO 1024 B); the next 64 columns sit one slab further
                // (LBO).
                const u64 db = sw128_desc(sV + (u32)kk * (16 * SLAB), BN * SLAB, 1024);
                MmaO::template rs<1>(acc_o, p[kk], db, 1);
            }
        }
    }

    static __device__ __forceinline__ void pack_p(u32 (&p)[P_REGS][4], const float (&s)[NTILE][4]) {
        if constexpr (FP8) {
            // Accumulator groups 4kk..4kk+3 hold keys 32kk + 8g + 2(lane%4) + {0,1}; register r of the A fragment
            // takes groups (2(r/2), 2(r/2)+1) of row half r%2, which is the key order of V^T's permuted rows.
#pragma unroll
            for (int kk = 0; kk < P_REGS; ++kk)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int g = 4 * kk + 2 * (r >> 1), e = 2 * (r & 1);
                    p[kk][r] = pack4_e4m3(s[g][e], s[g][e + 1], s[g + 1][e], s[g + 1][e + 1]);
                }
        } else {
#pragma unroll
            for (int kk = 0; kk < P_REGS; ++kk) {
                p[kk][0] = pack2<BF16>(s[2 * kk][0], s[2 * kk][1]);
                p[kk][1] = pack2<BF16>(s[2 * kk][2], s[2 * kk][3]);
                p[kk][2] = pack2<BF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                p[kk][3] = pack2<BF16>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            }
        }
    }

    // Ping-pong turn-taking: consumer c waits on barrier 1 + c before issuing its GEMMs and then lets consumer
    // c + 1 (mod CONSUMERS) go; each barrier joins the waiting warpgroup and the one handing over (256 threads).
    // The last consumer opens the first turn for consumer 0 and skips its final hand-over, so every barrier sees
    // exactly as many arrivals as waits.
    static __device__ __forceinline__ void turn_begin(int cwg) {
        if (PINGPONG) named_sync(1 + cwg, 256);
    }
    static __device__ __forceinline__ void turn_end(int cwg, bool last) {
        if (PINGPONG && !(last && cwg == CONSUMERS - 1)) named_arrive(1 + (cwg + 1) % CONSUMERS, 256);
    }

    static __device__ __forceinline__ void release(u32 bar, int lane) {
        if (lane == 0) mbar_arrive(bar);
    }

    static __device__ __forceinline__ void consumer(const Smem& sm, int cw, int lane, int m0, int nb_hi, int n_tiles,
                                                    Out* og, i64 o_row_stride, float* lg, int rows_q, int d,
                                                    const SeqInfo& si, const ScoreParams& sp, float out_scale) {
        const int cwg = cw >> 2;
        const int wrow = cw * 16;  // first row of this warp inside the block
        const int shift = si.sk - si.sq;
        const int wl = sp.window_left, wr = sp.window_right;
        const int mw = m0 + cwg * 64;  // first row of this warpgroup: masks are decided per warpgroup
        const bool plain = !sp.use_softcap && !sp.use_alibi && sp.scale_log2 > 0.f;

        // One m64 tile per warpgroup: the [1] dimension is the softmax helpers' row-tile count.
        float acc_o[1][DTILE][4];
        float s[1][NTILE][4];
        u32 p[P_REGS][4];
#pragma unroll
        for (int j = 0; j < DTILE; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[0][j][e] = 0.f;
        float row_max[1][2] = {{-AK_INF, -AK_INF}};
        float row_sum[1][2] = {{0.f, 0.f}};
        float alpha[1][2];

        if (PINGPONG && cwg == CONSUMERS - 1) named_arrive(1, 256);
        if (n_tiles > 0) {
            const u32 q_wg = sm.q() + (u32)cwg * (64 * SLAB);
            auto need_mask = [&](int n0) {
                return (n0 + BN > si.sk) || (wr >= 0 && n0 + BN - 1 > mw + shift + wr) ||
                       (wl >= 0 && n0 < mw + 63 + shift - wl);
            };

            mbar_wait(sm.q_full(), 0);
            // First tile: S alone.
            turn_begin(cwg);
            mbar_wait(sm.k_full(0), 0);
            fence_regs(s[0]);
            wgmma_fence();
            issue_s(s[0], q_wg, sm.k(0));
            wgmma_commit();
            turn_end(cwg, false);
            wgmma_wait<0>();
            fence_regs(s[0]);
            release(sm.k_empty(0), lane);
            {
                const int n0 = (nb_hi - 1) * BN;
                Softmax::probs(s, row_max, row_sum, alpha, n0, m0 + wrow, lane, plain, need_mask(n0), shift, si,
                               sp);
            }
            pack_p(p, s[0]);

            for (int i = 1; i < n_tiles; ++i) {
                const int st = i & 1, pst = st ^ 1;
                const int n0 = (nb_hi - 1 - i) * BN;
                const u32 par = (u32)(i >> 1) & 1u, ppar = (u32)((i - 1) >> 1) & 1u;
                if (PIPE) {
                    turn_begin(cwg);
                    mbar_wait(sm.k_full(st), par);
                    fence_regs(s[0]);
                    fence_regs(acc_o[0]);
                    fence_p(p);
                    wgmma_fence();
                    issue_s(s[0], q_wg, sm.k(st));
                    wgmma_commit();
                    mbar_wait(sm.v_full(pst), ppar);
                    wgmma_fence();  // the register operands of this second group (ptxas would insert it itself)
                    issue_pv(acc_o[0], p, sm.v(pst));
                    wgmma_commit();
                    turn_end(cwg, false);
                    wgmma_wait<1>();  // S of tile i has landed; P V of tile i-1 may still run
                    fence_regs(s[0]);
                    release(sm.k_empty(st), lane);
                    Softmax::probs(s, row_max, row_sum, alpha, n0, m0 + wrow, lane, plain, need_mask(n0), shift,
                                   si, sp);
                    wgmma_wait<0>();
                    fence_regs(acc_o[0]);
                    fence_p(p);
                    release(sm.v_empty(pst), lane);
                    Softmax::rescale(acc_o, alpha);
                    pack_p(p, s[0]);
                } else {
                    // Unpipelined reference schedule: P V of tile i-1, then S of tile i, each waited for at once.
                    turn_begin(cwg);
                    mbar_wait(sm.v_full(pst), ppar);
                    fence_regs(acc_o[0]);
                    fence_p(p);
                    wgmma_fence();
                    issue_pv(acc_o[0], p, sm.v(pst));
                    wgmma_commit();
                    mbar_wait(sm.k_full(st), par);
                    fence_regs(s[0]);
                    wgmma_fence();
                    issue_s(s[0], q_wg, sm.k(st));
                    wgmma_commit();
                    turn_end(cwg, false);
                    wgmma_wait<0>();
                    fence_regs(acc_o[0]);
                    fence_regs(s[0]);
                    fence_p(p);
                    release(sm.v_empty(pst), lane);
                    release(sm.k_empty(st), lane);
                    Softmax::probs(s, row_max, row_sum, alpha, n0, m0 + wrow, lane, plain, need_mask(n0), shift,
                                   si, sp);
                    Softmax::rescale(acc_o, alpha);
                    pack_p(p, s[0]);
                }
            }
            // Last tile's P V.
            {
                const int i = n_tiles - 1;
                turn_begin(cwg);
                mbar_wait(sm.v_full(i & 1), (u32)(i >> 1) & 1u);
                fence_regs(acc_o[0]);
                fence_p(p);
                wgmma_fence();
                issue_pv(acc_o[0], p, sm.v(i & 1));
                wgmma_commit();
                turn_end(cwg, true);
                wgmma_wait<0>();
                fence_regs(acc_o[0]);
                fence_p(p);
            }
        } else if (PINGPONG && cwg == 0) {
            named_sync(1, 256);  // consume the last consumer's opening arrival so no barrier is left half-arrived
        }
        Softmax::template finish<BF16>(acc_o, row_max, row_sum, og, o_row_stride, lg, wrow, rows_q, d, lane,
                                       out_scale);
    }

    static __device__ __forceinline__ void run(const TmaMap* tq, const TmaMap* tk, const TmaMap* tv, Out* o,
                                               float* lse, const float* alibi, const float* const* descales,
                                               const i64* st, int seqlen_q, int seqlen_k, int group, int d,
                                               int alibi_sb, ScoreParams sp) {
        const int tid = threadIdx.x;
        const int warp = tid >> 5;
        const int lane = tid & 31;
        const int mb = gridDim.x - 1 - blockIdx.x;  // heavy (late, causal) query blocks first
        const int h = blockIdx.y;
        const int b = blockIdx.z;
        const SeqInfo si = seq_info(b, nullptr, nullptr, seqlen_q, seqlen_k);
        const int m0 = mb * BM;
        if (m0 >= si.sq) return;
        const int hk = h / group;
        int n_lo, n_hi;
        keys_in_view(m0, BM, si.sk, si.sk - si.sq, sp.window_left, sp.window_right, n_lo, n_hi);
        const int nb_lo = n_lo / BN;
        const int nb_hi = (n_hi + BN - 1) / BN;
        const int n_tiles = n_hi > n_lo ? nb_hi - nb_lo : 0;

        const Smem sm = layout();
        if (tid == 0) {
            mbar_init(sm.q_full(), 1);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mbar_init(sm.k_full(i), 1);
                mbar_init(sm.v_full(i), 1);
                mbar_init(sm.k_empty(i), CONSUMER_ARRIVALS);
                mbar_init(sm.v_empty(i), CONSUMER_ARRIVALS);
            }
            mbar_init_fence();
            fence_proxy_async();  // the generic-proxy shared-memory writes so far, visible to the TMA unit
        }
        __syncthreads();

        if (warp < 4) {
            setmaxnreg_dec<ATTNKIT_WS_PRODUCER_REGS>();
            if (tid == 0 && n_tiles > 0) producer(sm, tq, tk, tv, m0, h, hk, b, nb_hi, n_tiles);
            return;
        }
        setmaxnreg_inc<ATTNKIT_WS_CONSUMER_REGS>();
        if (sp.use_alibi) sp.slope_log2 = alibi[(i64)b * alibi_sb + h] * AK_LOG2E;
        float out_scale = 1.f;
        if constexpr (FP8) {
            // Descales are contiguous (batch, KV heads): the real score is q.k * q_descale * k_descale.
            const i64 at = (i64)b * (gridDim.y / group) + hk;
            const float qk = descales[0][at] * descales[1][at];
            sp.scale_log2 *= qk;
            sp.cap_pre *= qk;
            out_scale = descales[2][at];
        }
        Out* og = o + (i64)b * st[0] + (i64)m0 * st[1] + (i64)h * st[2];
        float* lg = lse + (i64)b * st[3] + (i64)h * st[4] + m0;
        consumer(sm, warp - 4, lane, m0, nb_hi, n_tiles, og, st[1], lg, min(BM, si.sq - m0), d, si, sp, out_scale);
    }
};

}  // namespace ak

#if ATTNKIT_OUT_F32
typedef float AttnkitWsOut;
#else
typedef ak::u16 AttnkitWsOut;
#endif

// q, k, v arrive as tensor maps (dims innermost first: head dim, seqlen, heads, batch; box 128 bytes x BM or BN
// rows, 128-byte swizzle; fp8 v as V^T: keys, dim, heads, batch, box BN x 128); o and lse as pointers with element
// strides (o: batch, row, head; lse: batch, head). The descales (fp8 only; null otherwise) are float32 (batch, KV
// heads), contiguous.
extern "C" __global__ void __launch_bounds__(128 * (ATTNKIT_WS_CONSUMERS + 1), 1)
    attnkit_fwd_sm90_ws(const __grid_constant__ ak::TmaMap tq, const __grid_constant__ ak::TmaMap tk,
                        const __grid_constant__ ak::TmaMap tv, AttnkitWsOut* o, float* lse, const float* alibi,
                        const float* q_descale, const float* k_descale, const float* v_descale,
                        ak::i64 o_sb, ak::i64 o_ss, ak::i64 o_sh, ak::i64 lse_sb, ak::i64 lse_sh, int seqlen_q,
                        int seqlen_k, int group, int d, int alibi_sb, float scale_log2, float cap_pre,
                        float cap_post, int use_softcap, int use_alibi, int window_left, int window_right) {
    const ak::i64 strides[5] = {o_sb, o_ss, o_sh, lse_sb, lse_sh};
    const ak::ScoreParams sp =
        ak::make_score_params(scale_log2, cap_pre, cap_post, use_softcap, use_alibi, window_left, window_right);
    const float* const descales[3] = {q_descale, k_descale, v_descale};
    ak::FwdWsKernel<ATTNKIT_HEAD_DIM, ATTNKIT_WS_BN, ATTNKIT_WS_CONSUMERS, ATTNKIT_BF16 != 0, ATTNKIT_WS_PIPE != 0,
                    ATTNKIT_WS_PINGPONG != 0, ATTNKIT_FP8 != 0, AttnkitWsOut>::run(&tq, &tk, &tv, o, lse, alibi,
                                                                                   descales, strides, seqlen_q,
                                                                                   seqlen_k, group, d, alibi_sb, sp);
}
