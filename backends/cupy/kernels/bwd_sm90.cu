// Hopper (sm_90a) backward pass on warpgroup MMA; same arguments, algorithm and outputs as attnkit_bwd in
// bwd.cu (whose attnkit_bwd_pre still computes delta = rowsum(dO * O) first).
//
// A CTA is one warpgroup owning BN = 64 keys of one (batch, kv head); it walks every query head of its GQA group
// and every query block (BM = 64 rows) that can see its keys, with dK and dV in registers. Per query block:
//   S^T = K Q^T and dP^T = V dO^T     wgmma, both operands in shared memory (K-major)
//   P^T, dS^T                          registers (accumulator layout: row = key, column = query)
//   dV += P^T dO, dK += dS^T Q         wgmma, A from registers, B = dO / Q read N-major (transposed)
//   dQ += dS K                         dS^T goes to shared memory and is read M-major (transposed) as A, K N-major
//                                      as B; 64 columns at a time, added to a float32 buffer with red.global.add
// Several CTAs share an SM, so one CTA's loads, softmax and atomics overlap the others' tensor-core work (the
// same reason the one-warpgroup forward tile wins for d = 64; benchmarks/NOTES-cupy.md).
//
// Shared-memory tiles use the 128-byte swizzle of the wgmma descriptors (see fwd_sm90.cu): 64-column slabs of
// 128-byte rows. The next query block's Q, dO, lse and delta load by cp.async while the current one computes.
//
// Macros: ATTNKIT_HEAD_DIM (64 or 128), ATTNKIT_BF16.
#include "common.cuh"
#include "softmax.cuh"
#include "sw128.cuh"
#include "wgmma.cuh"

#ifndef ATTNKIT_HEAD_DIM
#define ATTNKIT_HEAD_DIM 128
#endif
#ifndef ATTNKIT_BF16
#define ATTNKIT_BF16 1
#endif

namespace ak {

template <int D, bool BF16>
struct BwdSm90Kernel {
    static constexpr int NT = 128;
    static constexpr int BN = 64;  // keys per CTA
    static constexpr int BM = 64;  // queries per step
    static constexpr int DTILE = D / 8;
    static constexpr int MTILE = BM / 8;
    static constexpr u32 SLAB = SW128_ROW_BYTES;
    static constexpr u32 KV_BYTES = BN * D * 2;
    static constexpr u32 QO_BYTES = BM * D * 2;
    static constexpr u32 DS_BYTES = BN * BM * 2;
    static_assert(D == 64 || D == 128, "wgmma backward is built for head dims 64 and 128");
    using MmaS = Wgmma<BM, BF16>;  // S^T, dP^T: 64 keys x BM queries
    using MmaKV = Wgmma<D, BF16>;  // dK, dV: 64 keys x D
    using MmaQ = Wgmma<64, BF16>;  // dQ: BM queries x 64 columns per pass

    static __device__ __forceinline__ void run(const u16* __restrict__ q, const u16* __restrict__ k,
                                               const u16* __restrict__ v, const u16* __restrict__ dout,
                                               const float* __restrict__ lse, const float* __restrict__ delta,
                                               float* __restrict__ dq_acc, u16* __restrict__ dk,
                                               u16* __restrict__ dv, const int* __restrict__ cu_q,
                                               const int* __restrict__ cu_k, const float* __restrict__ alibi,
                                               const i64 (&st)[20], int seqlen_q, int seqlen_k, int group, int d,
                                               int alibi_sb, float scale, ScoreParams sp) {
        extern __shared__ uint4_aligned smem_raw[];
        // Layout (1024-byte aligned): K, V, Q[2], dO[2], dS^T, lse[2], delta[2].
        const u32 sKa = (smem_u32(smem_raw) + 1023u) & ~1023u;
        const u32 sVa = sKa + KV_BYTES;
        const u32 sQa = sVa + KV_BYTES;
        const u32 sdOa = sQa + 2 * QO_BYTES;
        const u32 sdSa = sdOa + 2 * QO_BYTES;
        const u32 sLa = sdSa + DS_BYTES;
        const u32 sDa = sLa + 2 * BM * 4;
        // Generic pointers to the lse/delta buffers for plain loads (same bytes as sLa/sDa).
        const float* sL = reinterpret_cast<const float*>(reinterpret_cast<const char*>(smem_raw) +
                                                         (sLa - smem_u32(smem_raw)));
        const float* sDl = sL + 2 * BM;

        const int tid = threadIdx.x;
        const int lane = tid & 31;
        const int warp = tid >> 5;
        const int hk = blockIdx.y;
        const int b = blockIdx.z;
        const SeqInfo si = seq_info(b, cu_q, cu_k, seqlen_q, seqlen_k);
        const int n0 = blockIdx.x * BN;
        if (n0 >= si.sk) return;
        const int shift = si.sk - si.sq;
        const int wl = sp.window_left, wr = sp.window_right;
        const int d_chunks = d / 8;

        const u16* kg = k + (i64)b * st[3] + (i64)(si.k_start + n0) * st[4] + (i64)hk * st[5];
        const u16* vg = v + (i64)b * st[6] + (i64)(si.k_start + n0) * st[7] + (i64)hk * st[8];
        const int rows_k = min(BN, si.sk - n0);

        int i_lo = 0, i_hi = si.sq;
        if (wr >= 0) i_lo = max(0, n0 - shift - wr);
        if (wl >= 0) i_hi = min(si.sq, n0 + BN - 1 - shift + wl + 1);
        const int mb_lo = i_lo / BM;
        const int nmb = i_hi > i_lo ? (i_hi + BM - 1) / BM - mb_lo : 0;
        const int total = nmb * group;

        float acc_dk[DTILE][4], acc_dv[DTILE][4];
#pragma unroll
        for (int j = 0; j < DTILE; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc_dk[j][e] = 0.f;
                acc_dv[j][e] = 0.f;
            }
        const int key_row = warp * 16 + (lane >> 2);  // this thread's first key row inside the block (+8 for e >= 2)

        if (total > 0) {
            load_sw128<BN, D, NT>(sKa, kg, st[4], rows_k, d_chunks, tid);
            load_sw128<BN, D, NT>(sVa, vg, st[7], rows_k, d_chunks, tid);
            // Iteration `it` handles query head hk*group + it / nmb and query block mb_lo + it % nmb.
            auto issue = [&](int it, int buf) {
                const int h = hk * group + it / nmb;
                const int m0 = (mb_lo + it % nmb) * BM;
                const i64 qrow = si.q_start + m0;
                const int rows = min(BM, si.sq - m0);
                load_sw128<BM, D, NT>(sQa + buf * QO_BYTES, q + (i64)b * st[0] + qrow * st[1] + (i64)h * st[2], st[1],
                               rows, d_chunks, tid);
                load_sw128<BM, D, NT>(sdOa + buf * QO_BYTES, dout + (i64)b * st[9] + qrow * st[10] + (i64)h * st[11],
                               st[10], rows, d_chunks, tid);
                const i64 loff = (i64)b * st[12] + (i64)h * st[13] + qrow;
                for (int i = tid; i < BM; i += NT) {
                    const bool ok = i < rows;
                    cp_async4(sLa + (u32)(buf * BM + i) * 4, ok ? lse + loff + i : lse, ok);
                    cp_async4(sDa + (u32)(buf * BM + i) * 4, ok ? delta + loff + i : delta, ok);
                }
            };
            issue(0, 0);
            cp_async_commit();

            for (int it = 0; it < total; ++it) {
                const int buf = it & 1;
                cp_async_wait<0>();
                fence_proxy_async();
                __syncthreads();  // Q/dO/lse/delta of `it` visible; sdS and buffer buf^1 are free again
                if (it + 1 < total) issue(it + 1, buf ^ 1);
                cp_async_commit();

                const int h = hk * group + it / nmb;
                const int m0 = (mb_lo + it % nmb) * BM;
                if (sp.use_alibi) sp.slope_log2 = alibi[(i64)b * alibi_sb + h] * AK_LOG2E;
                const u32 bQ = sQa + buf * QO_BYTES, bdO = sdOa + buf * QO_BYTES;
                const float* bL = sL + buf * BM;
                const float* bD = sDl + buf * BM;

                float sst[MTILE][4], dpt[MTILE][4];
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const u32 off = (u32)(kk >> 2) * (BN * SLAB) + (u32)(kk & 3) * 32;  // K/V: BN rows per slab
                    const u32 offq = (u32)(kk >> 2) * (BM * SLAB) + (u32)(kk & 3) * 32;
                    MmaS::template ss<0, 0>(sst, sw128_desc(sKa + off, 16, 1024), sw128_desc(bQ + offq, 16, 1024),
                                            kk > 0);
                    MmaS::template ss<0, 0>(dpt, sw128_desc(sVa + off, 16, 1024), sw128_desc(bdO + offq, 16, 1024),
                                            kk > 0);
                }
                wgmma_commit();
                wgmma_wait<0>();

                // P^T (in sst) and dS^T (in dpt).
                const bool need_mask = (n0 + BN > si.sk) || (m0 + BM > si.sq) ||
                                       (wr >= 0 && n0 + BN - 1 > m0 + shift + wr) ||
                                       (wl >= 0 && n0 < m0 + BM - 1 + shift - wl);
                backward_scores(sst, dpt, bL, bD, m0, n0 + key_row, lane, need_mask, scale, shift, si, sp);

                // Pack P^T and dS^T as A fragments; dS^T also goes to shared memory (swizzled) for dQ.
                u32 ap[BM / 16][4], as[BM / 16][4];
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) {
                    ap[kk][0] = pack2<BF16>(sst[2 * kk][0], sst[2 * kk][1]);
                    ap[kk][1] = pack2<BF16>(sst[2 * kk][2], sst[2 * kk][3]);
                    ap[kk][2] = pack2<BF16>(sst[2 * kk + 1][0], sst[2 * kk + 1][1]);
                    ap[kk][3] = pack2<BF16>(sst[2 * kk + 1][2], sst[2 * kk + 1][3]);
                    as[kk][0] = pack2<BF16>(dpt[2 * kk][0], dpt[2 * kk][1]);
                    as[kk][1] = pack2<BF16>(dpt[2 * kk][2], dpt[2 * kk][3]);
                    as[kk][2] = pack2<BF16>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
                    as[kk][3] = pack2<BF16>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
                }
                store_frags_sw128<BM / 16>(as, sdSa, key_row, lane);  // dS^T (key, query) for the dQ product

                // dV += P^T dO, dK += dS^T Q: 16 queries per k-step = two 8-row groups of the dO/Q tiles.
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) {
                    MmaKV::template rs<1>(acc_dv, ap[kk], sw128_desc(bdO + (u32)kk * (16 * SLAB), BM * SLAB, 1024), 1);
                    MmaKV::template rs<1>(acc_dk, as[kk], sw128_desc(bQ + (u32)kk * (16 * SLAB), BM * SLAB, 1024), 1);
                }
                wgmma_commit();
                wgmma_wait<0>();
                fence_proxy_async();  // dS^T stores -> visible to wgmma's async proxy
                __syncthreads();      // every warp's dS^T rows written

                // dQ[BM x D] += dS K, 64 columns per pass: A = dS^T read M-major (queries contiguous), B = K read
                // N-major; a k-step covers 16 keys.
                float* dqg = dq_acc + (i64)b * st[14] + (i64)(si.q_start + m0) * st[15] + (i64)h * st[16];
                const int rows_q = si.sq - m0;
#pragma unroll
                for (int cp = 0; cp < D / 64; ++cp) {
                    float acc[8][4];
                    wgmma_fence();
#pragma unroll
                    for (int kk = 0; kk < BN / 16; ++kk) {
                        const u64 da = sw128_desc(sdSa + (u32)kk * (16 * SLAB), BN * SLAB, 1024);
                        const u64 db = sw128_desc(sKa + (u32)cp * (BN * SLAB) + (u32)kk * (16 * SLAB), BN * SLAB,
                                                  1024);
                        MmaQ::template ss<1, 1>(acc, da, db, kk > 0);
                    }
                    wgmma_commit();
                    wgmma_wait<0>();
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int r = key_row + hh * 8;  // here: query row inside the block
                        if (r < rows_q) {
                            float* dst = dqg + (i64)r * st[15];
#pragma unroll
                            for (int j = 0; j < 8; ++j) {
                                const int c = cp * 64 + j * 8 + 2 * (lane & 3);
                                if (c < d) red_add2(dst + c, acc[j][2 * hh], acc[j][2 * hh + 1]);
                            }
                        }
                    }
                }
            }
            cp_async_wait<0>();
        }

        // dK and dV rows of this CTA; keys that no query sees get zeros.
        u16* dkg = dk + (i64)b * st[17] + (i64)(si.k_start + n0) * st[18] + (i64)hk * st[19];
        u16* dvg = dv + (i64)b * st[17] + (i64)(si.k_start + n0) * st[18] + (i64)hk * st[19];
        store_dk_dv<BF16>(acc_dk, acc_dv, dkg, dvg, st[18], warp * 16, 0, rows_k, d, lane);
    }
};

}  // namespace ak

// Same arguments as attnkit_bwd in bwd.cu.
extern "C" __global__ void __launch_bounds__(128)
    attnkit_bwd_sm90(const ak::u16* q, const ak::u16* k, const ak::u16* v, const ak::u16* dout, const float* lse,
                     const float* delta, float* dq_acc, ak::u16* dk, ak::u16* dv, const int* cu_q, const int* cu_k,
                     const float* alibi, ak::i64 s0, ak::i64 s1, ak::i64 s2, ak::i64 s3, ak::i64 s4, ak::i64 s5,
                     ak::i64 s6, ak::i64 s7, ak::i64 s8, ak::i64 s9, ak::i64 s10, ak::i64 s11, ak::i64 s12,
                     ak::i64 s13, ak::i64 s14, ak::i64 s15, ak::i64 s16, ak::i64 s17, ak::i64 s18, ak::i64 s19,
                     int seqlen_q, int seqlen_k, int group, int d, int alibi_sb, float scale, float scale_log2,
                     float cap_pre, float cap_post, int use_softcap, int use_alibi, int window_left,
                     int window_right) {
    const ak::i64 strides[20] = {s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18, s19};
    const ak::ScoreParams sp =
        ak::make_score_params(scale_log2, cap_pre, cap_post, use_softcap, use_alibi, window_left, window_right);
    ak::BwdSm90Kernel<ATTNKIT_HEAD_DIM, ATTNKIT_BF16 != 0>::run(q, k, v, dout, lse, delta, dq_acc, dk, dv, cu_q, cu_k,
                                                                alibi, strides, seqlen_q, seqlen_k, group, d,
                                                                alibi_sb, scale, sp);
}
