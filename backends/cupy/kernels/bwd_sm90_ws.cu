// Hopper (sm_90a) warp-specialized backward: TMA loads, mbarrier pipeline, two consumer warpgroups, dQ by TMA
// reduce-add. Dense batches only (the backend keeps varlen and misaligned tensors on bwd_sm90.cu).
//
// A CTA owns BN = 128 keys of one (batch, kv head) and walks every query head of its GQA group and every query
// block (BM = 64 rows, 128 at head dim 64, or 80 at head dim 128) that can see those keys. Warpgroup 0 is the
// producer: after shrinking its register file (setmaxnreg 24) one thread of warp 0 issues the bulk copies (and,
// unless ATTNKIT_WS_BWD_DQ_WRITER is 0, warp 1 the dQ reductions). Warpgroups 1 and 2 are consumers (setmaxnreg
// 240), each owning 64 of the keys with their dK and dV in registers:
//   K, V          one TMA load each for the CTA's life (mbarrier kv_full)
//   Q, dO         TMA, two stages with full/empty mbarriers; lse and delta ride on the same full barrier as plain
//                 bulk copies (the backend pads their rows to a multiple of BM, so every copy is 16-byte aligned)
//   S^T = K Q^T, dP^T = V dO^T          wgmma, both operands in shared memory
//   dV += P^T dO, dK += dS^T Q          wgmma, A = P^T / dS^T from registers
//   dQ = dS K                           dS^T of both warpgroups goes to shared memory (two buffers); warpgroup w
//                                       computes a 64-row tile over all 128 keys: columns [w d/2, (w + 1) d/2) of
//                                       the block at BM = 64, rows [64 w, 64 w + 64) at BM = 128; at BM = 80
//                                       transposed, dQ^T = K^T dS^T, head-dim rows [64 w, 64 w + 64) (dS is then
//                                       stored query-major). The fp32 tile goes
//                                       to shared memory and is added to the global dQ accumulator by
//                                       cp.reduce.async.bulk.tensor (out-of-range rows and columns are dropped);
//                                       by default a warp of the producer warpgroup issues it
//                                       (FA3's dQ writer) and the consumers only store, fence and arrive.
// A step's products are issued in FA3's order (the default; macros below select the ablations): S^T, dP^T; P^T
// formed while dP^T runs; dV; dS^T formed and stored while dV runs; consumer barrier; dQ, then dK, so that the dQ
// tile is staged and reduced while dK runs.
// Tiles use the 128-byte swizzle (sw128.cuh) that TMA writes with CU_TENSOR_MAP_SWIZZLE_128B: 64-column slabs of
// 128-byte rows, 1024-byte aligned.
//
// Macros: ATTNKIT_HEAD_DIM (64 or 128), ATTNKIT_BF16, ATTNKIT_WS_BWD_BM (queries per step: 64, 128 at head dim
// 64 or 80 at head dim 128, FA3's tiles there) and the schedule switches below.
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
#ifndef ATTNKIT_WS_BWD_BM
#define ATTNKIT_WS_BWD_BM 64
#endif
// 1: each step's GEMMs overlap its own score math (P^T while dP^T runs; dQ issued while dV/dK run). 0: every
// product group is waited for at once (the first schedule, kept as the ablation baseline).
#ifndef ATTNKIT_WS_BWD_OVERLAP
#define ATTNKIT_WS_BWD_OVERLAP 1
#endif

// 1 (with ATTNKIT_WS_BWD_OVERLAP): FA3's order inside a step: dV += P^T dO is issued as soon as P^T is packed,
// so dS^T is computed and stored while dV runs, and dK follows; 0: dV and dK are issued together after dS^T.
#ifndef ATTNKIT_WS_BWD_EARLY_DV
#define ATTNKIT_WS_BWD_EARLY_DV 1
#endif
// 1 (with ATTNKIT_WS_BWD_EARLY_DV): dK is issued after dQ, past the consumer barrier, so the tensor cores run it
// while the dQ tile is waited for, staged and reduced; 0: dK is issued before the barrier.
#ifndef ATTNKIT_WS_BWD_LATE_DK
#define ATTNKIT_WS_BWD_LATE_DK 1
#endif
// 1 (with ATTNKIT_WS_BWD_EARLY_DV): the factor dS^T takes from P^T (P^T, or P^T (1 - tanh^2) under softcap) is
// kept as bf16/fp16 fragments instead of fp32 registers while dV runs: half the registers, which is what lets early
// dV fit beside the wider query steps (80 at d 128, 128 at d 64). It rounds that factor once more before dS^T is
// formed; dS^T itself is rounded to 16 bits for its products either way. 0: the fp32 factor.
#ifndef ATTNKIT_WS_BWD_DS_BF16
#define ATTNKIT_WS_BWD_DS_BF16 0
#endif
// 1: warp 1 of the producer warpgroup issues the dQ reductions; the consumers store their dQ tile and arrive on a
// named barrier without waiting. 0 (the ablation): each consumer warpgroup waits for its staging buffer, stores,
// synchronises its 128 threads and issues the reduction from one of them.
#ifndef ATTNKIT_WS_BWD_DQ_WRITER
#define ATTNKIT_WS_BWD_DQ_WRITER 1
#endif

namespace ak {

// Rows 2kk and 2kk+1 of a warp's 16 x (8 * MTILE) float tile as one wgmma A fragment (the mma.sync layout).
template <int MTILE, bool BF16>
__device__ __forceinline__ void pack_pair(const float (&x)[MTILE][4], u32 (&frag)[MTILE / 2][4], int kk) {
    frag[kk][0] = pack2<BF16>(x[2 * kk][0], x[2 * kk][1]);
    frag[kk][1] = pack2<BF16>(x[2 * kk][2], x[2 * kk][3]);
    frag[kk][2] = pack2<BF16>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    frag[kk][3] = pack2<BF16>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// P^T and dS^T of one warp's 16 keys x (8 * MTILE) queries on a tile with masks, softcap or ALiBi (the math of
// backward_scores in softmax.cuh; plain tiles take plain_probs / plain_dscores), packed into wgmma A fragments 16
// queries at a time, so each pair of accumulator columns dies as soon as it is packed: that keeps the masked path
// inside the consumers' 240 registers.
template <int MTILE, bool BF16>
__device__ __forceinline__ void scores_to_fragments(float (&sst)[MTILE][4], float (&dpt)[MTILE][4],
                                                    u32 (&ap)[MTILE / 2][4], u32 (&as)[MTILE / 2][4],
                                                    const float* bL, const float* bD, int m0, int key0, int lane,
                                                    bool need_mask, float scale, int shift, int sq, int sk,
                                                    const ScoreParams& sp) {
#pragma unroll
    for (int kk = 0; kk < MTILE / 2; ++kk) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
            const int j = 2 * kk + jj;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int cl = j * 8 + 2 * (lane & 3) + (e & 1);  // query inside the block
                const int key = key0 + (e >> 1) * 8;
                float lv = bL[cl];
                // A row that saw no key has lse = -inf; +inf makes all its probabilities 0.
                lv = lv == -AK_INF ? AK_INF : lv * AK_LOG2E;
                float th = 0.f;
                float x = transform_score(sst[j][e], m0 + cl, key, shift, sp, th);
                if (need_mask && !visible(m0 + cl, key, shift, sq, sk, sp.window_left, sp.window_right))
                    x = -AK_INF;
                const float p = fast_exp2(x - lv);
                float ds = p * (dpt[j][e] - bD[cl]) * scale;
                if (sp.use_softcap) ds *= 1.f - th * th;
                sst[j][e] = p;
                dpt[j][e] = ds;
            }
        }
        pack_pair<MTILE, BF16>(sst, ap, kk);
        pack_pair<MTILE, BF16>(dpt, as, kk);
    }
}

// Plain tiles (every key visible to every query, no softcap or ALiBi: lse is finite and the scale folds into one
// FMA before ex2), in two halves so that the overlapped schedule computes P^T while dP^T is still running.
template <int MTILE>
__device__ __forceinline__ void plain_probs(float (&sst)[MTILE][4], const float* bL, int lane, float scale_log2) {
#pragma unroll
    for (int j = 0; j < MTILE; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int cl = j * 8 + 2 * (lane & 3) + (e & 1);
            sst[j][e] = fast_exp2(fmaf(sst[j][e], scale_log2, -bL[cl] * AK_LOG2E));
        }
}

// The early-dV schedule's halves of scores_to_fragments. probs_to_fragments: P^T of a tile with masks, softcap or
// ALiBi packed into A fragments (ap) 16 queries at a time, and the factor dS^T needs from it, P^T (1 - tanh^2)
// under softcap and P^T otherwise: kept in sst (fp32), or with FACTOR16 packed into af in the same 16-bit fragment
// layout (separately from ap even where the values are equal, so that dS^T never reads the registers of the
// in-flight dV product). dscores_to_fragments / dscores_from_fragments16 (every tile): dS^T = that factor times
// (dP^T - delta).
template <int MTILE, bool BF16, bool FACTOR16>
__device__ __forceinline__ void probs_to_fragments(float (&sst)[MTILE][4], u32 (&ap)[MTILE / 2][4],
                                                   u32 (&af)[FACTOR16 ? MTILE / 2 : 1][4], const float* bL, int m0,
                                                   int key0, int lane, bool need_mask, int shift, int sq, int sk,
                                                   const ScoreParams& sp) {
#pragma unroll
    for (int kk = 0; kk < MTILE / 2; ++kk) {
        float p[2][4], f[2][4];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
            const int j = 2 * kk + jj;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int cl = j * 8 + 2 * (lane & 3) + (e & 1);
                const int key = key0 + (e >> 1) * 8;
                float lv = bL[cl];
                lv = lv == -AK_INF ? AK_INF : lv * AK_LOG2E;  // a row that saw no key: probabilities 0
                float th = 0.f;
                float x = transform_score(sst[j][e], m0 + cl, key, shift, sp, th);
                if (need_mask && !visible(m0 + cl, key, shift, sq, sk, sp.window_left, sp.window_right))
                    x = -AK_INF;
                p[jj][e] = fast_exp2(x - lv);
                f[jj][e] = sp.use_softcap ? p[jj][e] * (1.f - th * th) : p[jj][e];
                if constexpr (!FACTOR16) sst[j][e] = f[jj][e];
            }
        }
        ap[kk][0] = pack2<BF16>(p[0][0], p[0][1]);
        ap[kk][1] = pack2<BF16>(p[0][2], p[0][3]);
        ap[kk][2] = pack2<BF16>(p[1][0], p[1][1]);
        ap[kk][3] = pack2<BF16>(p[1][2], p[1][3]);
        if constexpr (FACTOR16) {
            af[kk][0] = pack2<BF16>(f[0][0], f[0][1]);
            af[kk][1] = pack2<BF16>(f[0][2], f[0][3]);
            af[kk][2] = pack2<BF16>(f[1][0], f[1][1]);
            af[kk][3] = pack2<BF16>(f[1][2], f[1][3]);
        }
    }
}

// dS^T = factor (16-bit fragments from probs_to_fragments, or P^T packed twice on plain tiles) times (dP^T -
// delta), packed as A fragments. Element (j, e) of the accumulator layout sits in register 2 (j % 2) + e / 2 of
// fragment j / 2, in its low half for even e.
template <int MTILE, bool BF16>
__device__ __forceinline__ void dscores_from_fragments16(const u32 (&af)[MTILE / 2][4], float (&dpt)[MTILE][4],
                                                         u32 (&as)[MTILE / 2][4], const float* bD, int lane,
                                                         float scale) {
#pragma unroll
    for (int kk = 0; kk < MTILE / 2; ++kk) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = 2 * kk + jj;
                const int cl = j * 8 + 2 * (lane & 3) + (e & 1);
                const u32 word = af[kk][2 * jj + (e >> 1)];
                const float f = to_f32<BF16>((u16)((e & 1) ? word >> 16 : word & 0xffffu));
                dpt[j][e] = f * (dpt[j][e] - bD[cl]) * scale;
            }
        pack_pair<MTILE, BF16>(dpt, as, kk);
    }
}

template <int MTILE, bool BF16>
__device__ __forceinline__ void dscores_to_fragments(const float (&sst)[MTILE][4], float (&dpt)[MTILE][4],
                                                     u32 (&as)[MTILE / 2][4], const float* bD, int lane, float scale) {
#pragma unroll
    for (int kk = 0; kk < MTILE / 2; ++kk) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = 2 * kk + jj;
                const int cl = j * 8 + 2 * (lane & 3) + (e & 1);
                dpt[j][e] = sst[j][e] * (dpt[j][e] - bD[cl]) * scale;
            }
        pack_pair<MTILE, BF16>(dpt, as, kk);
    }
}

// dS^T from P^T (in sst) and dP^T, then both packed as A fragments (the overlapped schedule's plain tiles). P^T
// stays float32 until then, so dS^T is formed exactly as scores_to_fragments forms it.
template <int MTILE, bool BF16>
__device__ __forceinline__ void plain_dscores(float (&sst)[MTILE][4], float (&dpt)[MTILE][4], u32 (&ap)[MTILE / 2][4],
                                              u32 (&as)[MTILE / 2][4], const float* bD, int lane, float scale) {
    dscores_to_fragments<MTILE, BF16>(sst, dpt, as, bD, lane, scale);
#pragma unroll
    for (int kk = 0; kk < MTILE / 2; ++kk) pack_pair<MTILE, BF16>(sst, ap, kk);
}

__device__ __forceinline__ u32 opaque(u32 x) {
    asm volatile("mov.b32 %0, %0;\n" : "+r"(x));
    return x;
}

// reg_fence on every register of an accumulator (float) or A-fragment (u32) array.
template <typename T, int N>
__device__ __forceinline__ void fence_all(T (&x)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) reg_fence(x[j][e]);
}

struct WsBwdArgs {
    const float* lse;    // [batch][heads_q][lse_len], natural log; rows past seqlen_q are don't-care
    const float* delta;  // same layout: rowsum(dO * O)
    u16* dk;
    u16* dv;
    const float* alibi;
    i64 lse_len;  // seqlen_q rounded up to BM
    i64 dkv_b, dkv_s, dkv_h;
    int seqlen_q, seqlen_k, heads_q, group, d, alibi_sb;
    float scale;
};

template <int D, int BM_, bool BF16, bool OVERLAP, bool EARLY_DV, bool LATE_DK, bool DQ_WRITER, bool DS_BF16>
struct BwdSm90WsKernel {
    static constexpr int NT = 384;
    static constexpr int BN = 128;  // keys per CTA
    static constexpr int WBN = 64;  // keys per consumer warpgroup
    static constexpr int BM = BM_;  // queries per step
    static constexpr int DTILE = D / 8;
    static constexpr int MTILE = BM / 8;
    static constexpr u32 SLAB = SW128_ROW_BYTES;
    static constexpr u32 KV_BYTES = BN * D * 2;
    static constexpr u32 QO_BYTES = BM * D * 2;
    static constexpr u32 DS_BYTES = BN * BM * 2;
    static_assert(D == 64 || D == 128, "the warp-specialized backward is built for head dims 64 and 128");
    // 128 queries per step keep S^T and dP^T in 128 registers a thread, which leaves room for dK and dV at d 64 only;
    // 80 (FA3's non-causal tile at d 128) keep them in 80.
    static_assert(BM == 64 || (BM == 128 && D == 64) || (BM == 80 && D == 128),
                  "queries per step: 64, 128 at head dim 64, 80 at head dim 128");
    // Each warpgroup computes a 64 x DQ_N tile of the step's dQ over all 128 keys, so each dQ element is reduced to
    // global memory once per CTA and step: at BM = 64 split by columns (warpgroup w: [w * DQ_N, (w + 1) * DQ_N)),
    // at BM = 128 by rows (warpgroup w: the block's rows [64 w, 64 w + 64), every column). At BM = 80 (not a
    // multiple of wgmma's 64 rows) the product is transposed, dQ^T = K^T dS^T: warpgroup w computes head-dim rows
    // [w * DQ_N, (w + 1) * DQ_N) x all 80 queries, and dS is stored query-major so that it is dQ^T's K-major B.
    static constexpr bool DQ_BY_ROWS = BM == 128;
    static constexpr bool DQ_TRANSPOSED = BM == 80;
    static constexpr int DQ_N = DQ_BY_ROWS ? D : D / 2;
    static constexpr int DQ_ROWS = DQ_TRANSPOSED ? BM : 64;    // query rows of a warpgroup's dQ tile
    static constexpr int DQ_ACC_N = DQ_TRANSPOSED ? BM : DQ_N;  // the dQ accumulator's wgmma width
    static constexpr u32 DQ_HALF = DQ_ROWS * 32 * 4;            // DQ_ROWS rows x 128 bytes: one 32-column box
    static constexpr u32 DQ_BYTES = 2 * DQ_HALF;  // one warpgroup's fp32 dQ staging: up to two 32-column halves
    static constexpr u32 LD_BYTES = BM * 4;         // one stage of lse (or delta)
    static constexpr u32 STAGE_TX = 2 * QO_BYTES + 2 * LD_BYTES;
    static __device__ __forceinline__ int dq_col0(int w) { return DQ_BY_ROWS ? 0 : w * DQ_N; }
    static __device__ __forceinline__ int dq_row0(int w) { return DQ_BY_ROWS ? 64 * w : 0; }
    using MmaS = Wgmma<BM, BF16>;
    using MmaKV = Wgmma<D, BF16>;
    using MmaQ = Wgmma<DQ_ACC_N, BF16>;

    // Barrier ids: 0 is __syncthreads; 1 spans both consumer warpgroups; 2 + w one warpgroup; 4 + w: warpgroup w's
    // dQ tile is staged (128 arrivals, the writer warp waits); 6 + w: its staging buffer has been read (the writer
    // arrives, the warpgroup waits).
    static constexpr int BAR_CONSUMERS = 1;
    static constexpr int BAR_DQ_FULL = 4;
    static constexpr int BAR_DQ_EMPTY = 6;
    static constexpr int DQ_BAR_THREADS = 128 + 32;  // a consumer warpgroup and the writer warp

    // Step `it` of a CTA walks query head h0 + it / nmb (h0: the kv head's first query head) and the query block
    // starting at row (mb_lo + it % nmb) * BM. The producer, the consumers and the dQ writer all walk the same.
    static __device__ __forceinline__ int step_head(int it, int nmb, int h0) { return h0 + it / nmb; }
    static __device__ __forceinline__ int step_row(int it, int nmb, int mb_lo) { return (mb_lo + it % nmb) * BM; }

    // acc = rows [0, 64) of the warpgroup's 64-key operand (K or V, BN rows per slab) times the step's BM-row
    // operand (Q or dO) transposed, both K-major in shared memory, 16 columns of the head dim per wgmma.
    static __device__ __forceinline__ void issue_scores(float (&acc)[MTILE][4], u32 keys, u32 rows) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const u32 off = (u32)(kk >> 2) * (BN * SLAB) + (u32)(kk & 3) * 32;
            const u32 offq = (u32)(kk >> 2) * (BM * SLAB) + (u32)(kk & 3) * 32;
            MmaS::template ss<0, 0>(acc, sw128_desc(keys + off, 16, 1024), sw128_desc(rows + offq, 16, 1024), kk > 0);
        }
    }

    // The warpgroup's fp32 dQ tile to its staging buffer, in the 128-byte swizzle of the dQ tensor map's
    // 32-column box (two halves when DQ_N is 64), then a proxy fence so that the bulk reduction sees the stores.
    static __device__ __forceinline__ void store_dq_tile(const float (&acc)[DQ_ACC_N / 8][4], u32 my_dq, int lane,
                                                         int key_row) {
        if constexpr (DQ_TRANSPOSED) {
            // acc holds dQ^T: element (head-dim column key_row + 8 (e / 2), query j * 8 + 2 (lane % 4) + e % 2),
            // stored one float at a time into the query-major tile (a warp's 32 stores of one e hit 8 distinct
            // 16-byte chunks of 4 rows: no bank conflict).
#pragma unroll
            for (int j = 0; j < DQ_ACC_N / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = key_row + (e >> 1) * 8;        // head-dim column inside the warpgroup's 64
                    const int r = j * 8 + 2 * (lane & 3) + (e & 1);  // query row inside the block
                    const u32 addr = my_dq + (u32)(c >> 5) * DQ_HALF + (u32)r * SLAB +
                                     (u32)((((c & 31) >> 2) ^ (r & 7)) << 4) + (u32)(c & 3) * 4;
                    asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(acc[j][e]));
                }
        } else {
#pragma unroll
            for (int j = 0; j < DQ_N / 8; ++j)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int r = key_row + hh * 8;  // query row inside the block
                    const int chunk = 2 * (j & 3) + ((lane & 3) >> 1);
                    const u32 addr = my_dq + (u32)(j >> 2) * DQ_HALF + (u32)r * SLAB +
                                     (u32)((chunk ^ (r & 7)) << 4) + (u32)(lane & 1) * 8;
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(acc[j][2 * hh]),
                                 "f"(acc[j][2 * hh + 1]));
                }
        }
        fence_proxy_async();
    }

    // Warpgroup w's bulk reductions of its staged dQ tile (query block m0 of head h) into the global accumulator,
    // one per 32-column half, as one bulk group of the calling thread.
    static __device__ __forceinline__ void issue_dq_reduce(const TmaMap* tdq, u32 my_dq, int w, int m0, int h,
                                                           int b) {
#pragma unroll
        for (int half = 0; half < DQ_N / 32; ++half)
            tma_reduce_add_4d(tdq, my_dq + (u32)half * DQ_HALF, dq_col0(w) + 32 * half, m0 + dq_row0(w), h, b);
        bulk_commit();
    }

    // The consumer's side of a step's dQ. With the writer warp: wait until the writer has seen the previous
    // reduction read this warpgroup's buffer (nothing to wait for at the first step), store, arrive. Without it:
    // the warpgroup waits for its own previous reduction, stores, synchronises and issues the next.
    static __device__ __forceinline__ void write_dq(const float (&acc)[DQ_ACC_N / 8][4], const TmaMap* tdq, u32 my_dq,
                                                    int w, int wtid, int lane, int key_row, int it, int m0, int h,
                                                    int b) {
        if (DQ_WRITER) {
            if (it > 0) named_sync(BAR_DQ_EMPTY + w, DQ_BAR_THREADS);
            store_dq_tile(acc, my_dq, lane, key_row);
            named_arrive(BAR_DQ_FULL + w, DQ_BAR_THREADS);
            return;
        }
        if (wtid == 0) bulk_wait_read<0>();  // the previous reduction has read the staging tile
        named_sync(2 + w, 128);
        store_dq_tile(acc, my_dq, lane, key_row);
        named_sync(2 + w, 128);
        if (wtid == 0) issue_dq_reduce(tdq, my_dq, w, m0, h, b);
    }

    // The dQ writer warp: per step, waits for each consumer warpgroup's staged tile and issues its reductions
    // (lane 0); before a next step, hands each staging buffer back as soon as its reduction has read it.
    static __device__ __forceinline__ void dq_writer(const TmaMap* tdq, u32 sdQa, int lane, int total, int nmb,
                                                     int mb_lo, int h0, int b) {
        for (int it = 0; it < total; ++it) {
            const int h = step_head(it, nmb, h0);
            const int m0 = step_row(it, nmb, mb_lo);
#pragma unroll
            for (int w = 0; w < 2; ++w) {
                named_sync(BAR_DQ_FULL + w, DQ_BAR_THREADS);
                if (lane == 0) issue_dq_reduce(tdq, sdQa + (u32)w * DQ_BYTES, w, m0, h, b);
            }
            if (it + 1 < total) {  // the consumers wait for their buffers only before a next step
                if (lane == 0) bulk_wait_read<1>();
                __syncwarp();
                named_arrive(BAR_DQ_EMPTY, DQ_BAR_THREADS);
                if (lane == 0) bulk_wait_read<0>();
                __syncwarp();
                named_arrive(BAR_DQ_EMPTY + 1, DQ_BAR_THREADS);
            }
        }
        if (lane == 0) bulk_wait0();
    }

    // This warp's dS^T fragments (its 16 keys x the step's BM queries) to the step's dS buffer: key-major (two
    // slabs of BM columns, the M-major A of dQ = dS K), or query-major at BM = 80 (two slabs of 64 keys, warpgroup
    // w's keys in slab w: the K-major B of dQ^T = K^T dS^T).
    static __device__ __forceinline__ void store_ds(const u32 (&as)[BM / 16][4], u32 bdS, int w, int wwarp,
                                                    int key_row, int lane) {
        if constexpr (DQ_TRANSPOSED)
            store_frags_sw128_trans<BM / 16>(as, bdS + (u32)w * (BM * SLAB), wwarp * 16, lane);
        else
            store_frags_sw128<BM / 16, BN * SLAB>(as, bdS, w * WBN + key_row, lane);
    }

    // Warpgroup w's dQ tile of the step, over all 128 keys (16 per k-step), as one commit group. dQ = dS K: A =
    // dS^T read M-major (its 64 queries: slab 0, or slab w at BM = 128), B = K's columns [c0, c0 + DQ_N) read
    // N-major (slab c0 / 64, from (c0 % 64) * 2 bytes into its 128-byte rows). dQ^T = K^T dS^T (BM = 80): A =
    // K's slab w read M-major (head-dim columns [64 w, 64 w + 64)), B = the query-major dS read K-major.
    static __device__ __forceinline__ void issue_dq(float (&acc)[DQ_ACC_N / 8][4], u32 sKa, u32 bdS, int w) {
        wgmma_fence();
        if constexpr (DQ_TRANSPOSED) {
            const u32 sKrows = sKa + (u32)w * (BN * SLAB);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                const u64 da = sw128_desc(sKrows + (u32)kk * (16 * SLAB), BN * SLAB, 1024);
                const u64 db = sw128_desc(bdS + (u32)(kk >> 2) * (BM * SLAB) + (u32)(kk & 3) * 32, 16, 1024);
                MmaQ::template ss<1, 0>(acc, da, db, kk > 0);
            }
        } else {
            const int c0 = dq_col0(w);
            const u32 sKcols = sKa + (u32)(c0 / 64) * (BN * SLAB) + (u32)(c0 % 64) * 2;
            const u32 sdSrows = bdS + (u32)(dq_row0(w) / 64) * (BN * SLAB);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                const u32 krow = (u32)kk * (16 * SLAB);
                const u64 da = sw128_desc(sdSrows + krow, BN * SLAB, 1024);
                const u64 db = sw128_desc(sKcols + krow, BN * SLAB, 1024);
                MmaQ::template ss<1, 1>(acc, da, db, kk > 0);
            }
        }
        wgmma_commit();
    }

    // dK += dS^T Q: A = dS^T from registers, B = the stage's Q read N-major; one commit group.
    static __device__ __forceinline__ void issue_dk(float (&acc_dk)[DTILE][4], const u32 (&as)[BM / 16][4], u32 bQ) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
            MmaKV::template rs<1>(acc_dk, as[kk], sw128_desc(bQ + (u32)kk * (16 * SLAB), BM * SLAB, 1024), 1);
        wgmma_commit();
    }

    static __device__ __forceinline__ void run(const TmaMap* tq, const TmaMap* tk, const TmaMap* tv,
                                               const TmaMap* tdo, const TmaMap* tdq, const WsBwdArgs& a,
                                               ScoreParams sp) {
        extern __shared__ uint4_aligned smem_raw[];
        // Layout (1024-byte aligned): K, V, Q[2], dO[2], dS^T[2], dQ staging[2 warpgroups], lse[2], delta[2],
        // mbarriers kv_full, full[2], empty[2].
        const u32 base = smem_u32(smem_raw);
        const u32 sKa = (base + 1023u) & ~1023u;
        const u32 sVa = sKa + KV_BYTES;
        const u32 sQa = sVa + KV_BYTES;
        const u32 sdOa = sQa + 2 * QO_BYTES;
        const u32 sdSa = sdOa + 2 * QO_BYTES;
        const u32 sdQa = sdSa + 2 * DS_BYTES;
        const u32 sLa = sdQa + 2 * DQ_BYTES;
        const u32 sDa = sLa + 2 * LD_BYTES;
        const u32 bar_kv = sDa + 2 * LD_BYTES;
        const u32 bar_full = bar_kv + 8;
        const u32 bar_empty = bar_full + 16;
        const float* sL = reinterpret_cast<const float*>(reinterpret_cast<const char*>(smem_raw) + (sLa - base));
        const float* sDl = sL + 2 * BM;

        const int tid = threadIdx.x;
        const int hk = blockIdx.y;
        const int b = blockIdx.z;
        const int n0 = blockIdx.x * BN;
        const int sq = a.seqlen_q, sk = a.seqlen_k;
        if (n0 >= sk) return;  // whole CTA, before any barrier
        const int shift = sk - sq;
        const int wl = sp.window_left, wr = sp.window_right;

        // Query rows that can see any of this CTA's keys.
        int i_lo = 0, i_hi = sq;
        if (wr >= 0) i_lo = max(0, n0 - shift - wr);
        if (wl >= 0) i_hi = min(sq, n0 + BN - 1 - shift + wl + 1);
        const int mb_lo = i_lo / BM;
        const int nmb = i_hi > i_lo ? (i_hi + BM - 1) / BM - mb_lo : 0;
        const int total = nmb * a.group;

        if (tid == 0) {
            mbar_init(bar_kv, 1);
            mbar_init(bar_full, 1);
            mbar_init(bar_full + 8, 1);
            mbar_init(bar_empty, 8);  // one arrival per consumer warp
            mbar_init(bar_empty + 8, 8);
            mbar_init_fence();
        }
        __syncthreads();

        if (tid < 128) {
            // ---- producer warpgroup ----
            setmaxnreg_dec<24>();
            if (tid == 0 && total > 0) {
                mbar_arrive_expect_tx(bar_kv, 2 * KV_BYTES);
#pragma unroll
                for (int s = 0; s < D / 64; ++s) {
                    tma_load_4d(sKa + (u32)s * (BN * SLAB), tk, bar_kv, s * 64, n0, hk, b);
                    tma_load_4d(sVa + (u32)s * (BN * SLAB), tv, bar_kv, s * 64, n0, hk, b);
                }
                for (int it = 0; it < total; ++it) {
                    const int buf = it & 1;
                    if (it >= 2) mbar_wait_spin(bar_empty + 8 * buf, ((it >> 1) & 1) ^ 1);
                    const int h = step_head(it, nmb, hk * a.group);
                    const int m0 = step_row(it, nmb, mb_lo);
                    const u32 full = bar_full + 8 * buf;
                    mbar_arrive_expect_tx(full, STAGE_TX);
#pragma unroll
                    for (int s = 0; s < D / 64; ++s) {
                        tma_load_4d(sQa + buf * QO_BYTES + (u32)s * (BM * SLAB), tq, full, s * 64, m0, h, b);
                        tma_load_4d(sdOa + buf * QO_BYTES + (u32)s * (BM * SLAB), tdo, full, s * 64, m0, h, b);
                    }
                    const i64 loff = ((i64)b * a.heads_q + h) * a.lse_len + m0;
                    bulk_load(sLa + buf * LD_BYTES, a.lse + loff, LD_BYTES, full);
                    bulk_load(sDa + buf * LD_BYTES, a.delta + loff, LD_BYTES, full);
                }
            } else if (DQ_WRITER && tid >= 32 && tid < 64 && total > 0) {
                dq_writer(tdq, sdQa, tid & 31, total, nmb, mb_lo, hk * a.group, b);
            }
            return;
        }

        // ---- consumer warpgroups ----
        setmaxnreg_inc<240>();
        const int ctid = tid - 128;
        const int w = ctid >> 7;  // consumer warpgroup 0 / 1
        const int wtid = ctid & 127;
        const int lane = wtid & 31;
        const int wwarp = wtid >> 5;  // warp inside the warpgroup
        const int key_row = wwarp * 16 + (lane >> 2);  // first key row of this thread inside the warpgroup's 64
        const int kw0 = n0 + w * WBN;                 // the warpgroup's first key
        const int rows_k = min(WBN, sk - kw0);         // may be <= 0: the warpgroup then only helps with dQ

        float acc_dk[DTILE][4], acc_dv[DTILE][4];
#pragma unroll
        for (int j = 0; j < DTILE; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc_dk[j][e] = 0.f;
                acc_dv[j][e] = 0.f;
            }

        if (total > 0) {
            mbar_wait_spin(bar_kv, 0);
            const u32 sKw = sKa + (u32)(w * WBN) * SLAB;
            const u32 sVw = sVa + (u32)(w * WBN) * SLAB;
            const u32 my_dq = sdQa + (u32)w * DQ_BYTES;
            for (int it = 0; it < total; ++it) {
                const int buf = it & 1;
                const int h = step_head(it, nmb, hk * a.group);
                const int m0 = step_row(it, nmb, mb_lo);
                if (sp.use_alibi) sp.slope_log2 = a.alibi[(i64)b * a.alibi_sb + h] * AK_LOG2E;
                const u32 bQ = sQa + buf * QO_BYTES, bdO = sdOa + buf * QO_BYTES;
                const u32 bdS = sdSa + buf * DS_BYTES;
                mbar_wait_spin(bar_full + 8 * buf, (it >> 1) & 1);

                float sst[MTILE][4], dpt[MTILE][4];
                // K/V descriptors rebuilt from opaque copies of the bases each step: hoisted out of the loop they
                // would hold 32 registers for the kernel's life.
                const u32 sKs = opaque(sKw), sVs = opaque(sVw);
                const bool need_mask = (kw0 + WBN > sk) || (m0 + BM > sq) ||
                                       (wr >= 0 && kw0 + WBN - 1 > m0 + shift + wr) ||
                                       (wl >= 0 && kw0 < m0 + BM - 1 + shift - wl);
                const bool plain = !need_mask && !sp.use_softcap && !sp.use_alibi;
                u32 ap[BM / 16][4], as[BM / 16][4];
                wgmma_fence();
                issue_scores(sst, sKs, bQ);
                // Overlapped: S^T is its own group, so P^T is computed while dP^T is still on the tensor cores.
                if (OVERLAP) wgmma_commit();
                issue_scores(dpt, sVs, bdO);
                wgmma_commit();
                if (EARLY_DV) {
                    wgmma_wait<1>();
                    fence_all(sst);
                    const float* bL = sL + buf * BM;
                    // DS_BF16: the factor of dS^T in 16-bit fragments (af); otherwise in sst, fp32.
                    u32 af[DS_BF16 ? BM / 16 : 1][4];
                    if (plain) {
                        plain_probs<MTILE>(sst, bL, lane, sp.scale_log2);
#pragma unroll
                        for (int kk = 0; kk < BM / 16; ++kk) {
                            pack_pair<MTILE, BF16>(sst, ap, kk);
                            if constexpr (DS_BF16) pack_pair<MTILE, BF16>(sst, af, kk);
                        }
                    } else {
                        probs_to_fragments<MTILE, BF16, DS_BF16>(sst, ap, af, bL, m0, kw0 + key_row, lane, need_mask,
                                                                 shift, sq, sk, sp);
                    }
                    wgmma_fence();
#pragma unroll
                    for (int kk = 0; kk < BM / 16; ++kk)
                        MmaKV::template rs<1>(acc_dv, ap[kk], sw128_desc(bdO + (u32)kk * (16 * SLAB), BM * SLAB, 1024),
                                              1);
                    wgmma_commit();
                    // dP^T has landed; dV may still run while dS^T is formed and stored.
                    wgmma_wait<1>();
                    fence_all(dpt);
                    if constexpr (DS_BF16)
                        dscores_from_fragments16<MTILE, BF16>(af, dpt, as, sDl + buf * BM, lane, a.scale);
                    else
                        dscores_to_fragments<MTILE, BF16>(sst, dpt, as, sDl + buf * BM, lane, a.scale);
                    // dS^T to this step's buffer, last read by the dQ of two steps before, which both warpgroups
                    // finished before the previous step's consumer barrier.
                    store_ds(as, bdS, w, wwarp, key_row, lane);
                    if (!LATE_DK) issue_dk(acc_dk, as, bQ);
                } else {
                    if (OVERLAP) {
                        wgmma_wait<1>();
                        fence_all(sst);
                    } else {
                        wgmma_wait<0>();
                    }
                    if (plain) plain_probs<MTILE>(sst, sL + buf * BM, lane, sp.scale_log2);
                    if (OVERLAP) {
                        wgmma_wait<0>();
                        fence_all(dpt);
                    }
                    if (plain)
                        plain_dscores<MTILE, BF16>(sst, dpt, ap, as, sDl + buf * BM, lane, a.scale);
                    else
                        scores_to_fragments<MTILE, BF16>(sst, dpt, ap, as, sL + buf * BM, sDl + buf * BM, m0,
                                                         kw0 + key_row, lane, need_mask, a.scale, shift, sq, sk, sp);
                    // dS^T to this step's buffer, last read by the dQ of two steps before, which both warpgroups
                    // finished before the previous step's consumer barrier.
                    store_ds(as, bdS, w, wwarp, key_row, lane);
                    wgmma_fence();
#pragma unroll
                    for (int kk = 0; kk < BM / 16; ++kk) {
                        MmaKV::template rs<1>(acc_dv, ap[kk], sw128_desc(bdO + (u32)kk * (16 * SLAB), BM * SLAB, 1024), 1);
                        MmaKV::template rs<1>(acc_dk, as[kk], sw128_desc(bQ + (u32)kk * (16 * SLAB), BM * SLAB, 1024), 1);
                    }
                    wgmma_commit();
                    if (!OVERLAP) {
                        wgmma_wait<0>();
                        // Q, dO, lse and delta of this stage are no longer read by this warp: hand the stage back.
                        __syncwarp();
                        if (lane == 0) mbar_arrive(bar_empty + 8 * buf);
                    }
                }

                fence_proxy_async();  // dS^T stores -> visible to wgmma's async proxy
                named_sync(BAR_CONSUMERS, 256);

                float acc[DQ_ACC_N / 8][4];
                issue_dq(acc, sKa, bdS, w);
                if (LATE_DK) {
                    issue_dk(acc_dk, as, bQ);
                    // dV and dQ have landed; dK runs while the dQ tile is staged and reduced.
                    wgmma_wait<1>();
                    fence_all(acc);
                    write_dq(acc, tdq, my_dq, w, wtid, lane, key_row, it, m0, h, b);
                    wgmma_wait<0>();
                    fence_all(ap);
                    fence_all(as);
                    __syncwarp();
                    if (lane == 0) mbar_arrive(bar_empty + 8 * buf);
                } else {
                    if (OVERLAP) {
                        // dV/dK (issued before the barrier) have landed while dQ may still run: the register A
                        // fragments may be reused and the Q/dO stage handed back.
                        wgmma_wait<1>();
                        fence_all(ap);
                        fence_all(as);
                        __syncwarp();
                        if (lane == 0) mbar_arrive(bar_empty + 8 * buf);
                    }
                    wgmma_wait<0>();
                    fence_all(acc);
                    write_dq(acc, tdq, my_dq, w, wtid, lane, key_row, it, m0, h, b);
                }
            }
            if (!DQ_WRITER && wtid == 0) bulk_wait0();
        }

        // dK and dV rows of this warpgroup; keys that no query sees get zeros.
        if (rows_k > 0) {
            u16* dkg = a.dk + (i64)b * a.dkv_b + (i64)kw0 * a.dkv_s + (i64)hk * a.dkv_h;
            u16* dvg = a.dv + (i64)b * a.dkv_b + (i64)kw0 * a.dkv_s + (i64)hk * a.dkv_h;
            store_dk_dv<BF16>(acc_dk, acc_dv, dkg, dvg, a.dkv_s, wwarp * 16, 0, rows_k, a.d, lane);
        }
    }
};

}  // namespace ak

// Tensor maps (built by backends/cupy/tma.py, innermost dim first): q, dout: bf16/fp16 (d, seqlen_q, heads_q,
// batch), box (64, BM); k, v: (d, seqlen_k, heads_k, batch), box (64, 128); dq_acc: fp32 (d, seqlen_q, heads_q,
// batch), box (32, 64); all with the 128-byte swizzle. lse and delta: fp32 [batch][heads_q][lse_len].
extern "C" __global__ void __launch_bounds__(384, 1)
    attnkit_bwd_sm90_ws(const __grid_constant__ ak::TmaMap tq, const __grid_constant__ ak::TmaMap tk,
                        const __grid_constant__ ak::TmaMap tv, const __grid_constant__ ak::TmaMap tdo,
                        const __grid_constant__ ak::TmaMap tdq, const float* lse, const float* delta, ak::u16* dk,
                        ak::u16* dv, const float* alibi, ak::i64 lse_len, ak::i64 dkv_b, ak::i64 dkv_s,
                        ak::i64 dkv_h, int seqlen_q, int seqlen_k, int heads_q, int group, int d, int alibi_sb,
                        float scale, float scale_log2, float cap_pre, float cap_post, int use_softcap, int use_alibi,
                        int window_left, int window_right) {
    const ak::WsBwdArgs a{lse,   delta, dk, dv,       alibi,    lse_len, dkv_b, dkv_s, dkv_h, seqlen_q,
                          seqlen_k, heads_q, group, d, alibi_sb, scale};
    const ak::ScoreParams sp =
        ak::make_score_params(scale_log2, cap_pre, cap_post, use_softcap, use_alibi, window_left, window_right);
    ak::BwdSm90WsKernel<ATTNKIT_HEAD_DIM, ATTNKIT_WS_BWD_BM, ATTNKIT_BF16 != 0, ATTNKIT_WS_BWD_OVERLAP != 0,
                        ATTNKIT_WS_BWD_OVERLAP != 0 && ATTNKIT_WS_BWD_EARLY_DV != 0,
                        ATTNKIT_WS_BWD_OVERLAP != 0 && ATTNKIT_WS_BWD_EARLY_DV != 0 && ATTNKIT_WS_BWD_LATE_DK != 0,
                        ATTNKIT_WS_BWD_DQ_WRITER != 0,
                        ATTNKIT_WS_BWD_OVERLAP != 0 && ATTNKIT_WS_BWD_EARLY_DV != 0 &&
                            ATTNKIT_WS_BWD_DS_BF16 != 0>::run(&tq, &tk, &tv, &tdo, &tdq, a, sp);
}
