// FlashAttention-2 style backward pass.
//
// attnkit_bwd_pre: delta[b, h, i] = sum_c dO[i, c] * O[i, c], and the dQ accumulator's rows zeroed.
// attnkit_bwd: one CTA owns BN keys of one (batch, kv head). It keeps K and V tiles in shared memory and dK, dV
// in registers, walks every query head of its GQA group and every query block that can see its keys, and
// adds dQ into a float32 buffer with atomics. Warps are laid out WN along the keys (16 keys each) times WD
// along the head dim: each of the WD warps of one key slice recomputes S and dP for it (cheap for WD = 1,
// the common case) and accumulates its own D/WD columns of dK and dV, which bounds the registers for D = 256.
// The next Q/dO tile is in flight while the current one is processed. Tiles with every key visible to every
// query (and no softcap/ALiBi) take a lean P/dS step with the scale folded into the ex2 argument.
//
// Macros: ATTNKIT_HEAD_DIM, ATTNKIT_BF16 (see fwd.cu), ATTNKIT_BWD_WN, ATTNKIT_BWD_WD, ATTNKIT_BWD_BM.
#include "common.cuh"
#include "softmax.cuh"

#ifndef ATTNKIT_HEAD_DIM
#define ATTNKIT_HEAD_DIM 64
#endif
#ifndef ATTNKIT_BF16
#define ATTNKIT_BF16 0
#endif
#ifndef ATTNKIT_BWD_WN
#define ATTNKIT_BWD_WN 4
#endif
#ifndef ATTNKIT_BWD_WD
#define ATTNKIT_BWD_WD 1
#endif
#ifndef ATTNKIT_BWD_BM
#define ATTNKIT_BWD_BM 64
#endif

namespace ak {

template <int D, int WN, int WD, int BM, bool BF16>
struct BwdKernel {
    static constexpr int NW = WN * WD;
    static constexpr int NT = NW * 32;
    static constexpr int BN = 16 * WN;
    static constexpr int LD = D + 8;
    static constexpr int LDS = BM + 8;  // pitch of the dS^T tile
    static constexpr int DP = D / WD;   // dK/dV columns per warp
    static constexpr int MTILE = BM / 8;
    static constexpr int QM = BM / 16;       // 16-row slices of dQ
    static constexpr int QP = NW / QM;       // warps per dQ slice, splitting the head dim
    static constexpr int QD = D / QP;        // dQ columns per warp
    static constexpr int QC = QD % 64 == 0 ? 64 : (QD % 32 == 0 ? 32 : 16);  // dQ columns per register chunk
    static_assert(D % 16 == 0 && DP % 16 == 0 && BM % 16 == 0, "tile sizes must be multiples of 16");
    static_assert(NW % QM == 0 && QD % 16 == 0, "dQ work must split evenly over the warps");

    static __device__ __forceinline__ void load_q_block(u32 sQa, u32 sdOa, u32 sLa, u32 sDa, const u16* qg,
                                                        const u16* dog, const float* lg, const float* dg,
                                                        i64 q_ss, i64 do_ss, int rows, int d_chunks, int tid) {
        load_tile<BM, D, LD, NT>(sQa, qg, q_ss, rows, d_chunks, tid);
        load_tile<BM, D, LD, NT>(sdOa, dog, do_ss, rows, d_chunks, tid);
        for (int i = tid; i < BM; i += NT) {
            const bool ok = i < rows;
            cp_async4(sLa + 4 * i, ok ? lg + i : lg, ok);
            cp_async4(sDa + 4 * i, ok ? dg + i : dg, ok);
        }
    }

    static __device__ __forceinline__ void run(const u16* __restrict__ q, const u16* __restrict__ k,
                                               const u16* __restrict__ v, const u16* __restrict__ dout,
                                               const float* __restrict__ lse, const float* __restrict__ delta,
                                               float* __restrict__ dq_acc, u16* __restrict__ dk,
                                               u16* __restrict__ dv, const int* __restrict__ cu_q,
                                               const int* __restrict__ cu_k, const float* __restrict__ alibi,
                                               const i64 (&st)[20], int seqlen_q, int seqlen_k, int group, int d,
                                               int alibi_sb, float scale, ScoreParams sp) {
        extern __shared__ uint4_aligned smem_raw[];
        u16* sK = reinterpret_cast<u16*>(smem_raw);
        u16* sV = sK + BN * LD;
        u16* sQ = sV + BN * LD;       // 2 buffers
        u16* sdO = sQ + 2 * BM * LD;  // 2 buffers
        u16* sdS = sdO + 2 * BM * LD;
        float* sL = reinterpret_cast<float*>(sdS + BN * LDS);  // 2 buffers of lse
        float* sDl = sL + 2 * BM;                               // 2 buffers of delta

        const int tid = threadIdx.x;
        const int lane = tid & 31;
        const int warp = tid >> 5;
        const int wn = warp % WN;
        const int wd = warp / WN;
        const int hk = blockIdx.y;
        const int b = blockIdx.z;
        const SeqInfo si = seq_info(b, cu_q, cu_k, seqlen_q, seqlen_k);
        const int n0 = blockIdx.x * BN;
        if (n0 >= si.sk) return;
        const int shift = si.sk - si.sq;
        const int wl = sp.window_left, wr = sp.window_right;
        const int d_chunks = d / 8;

        // strides: q(b,s,h) k(b,s,h) v(b,s,h) dO(b,s,h) lse/delta(b,h) dq_acc(b,s,h) dk(b,s,h) dv(b,s,h)
        const u16* kg = k + (i64)b * st[3] + (i64)(si.k_start + n0) * st[4] + (i64)hk * st[5];
        const u16* vg = v + (i64)b * st[6] + (i64)(si.k_start + n0) * st[7] + (i64)hk * st[8];
        const int rows_k = min(BN, si.sk - n0);

        int i_lo = 0, i_hi = si.sq;
        if (wr >= 0) i_lo = max(0, n0 - shift - wr);
        if (wl >= 0) i_hi = min(si.sq, n0 + BN - 1 - shift + wl + 1);
        const int mb_lo = i_lo / BM;
        const int nmb = i_hi > i_lo ? (i_hi + BM - 1) / BM - mb_lo : 0;
        const int total = nmb * group;

        float acc_dk[DP / 8][4], acc_dv[DP / 8][4];
#pragma unroll
        for (int j = 0; j < DP / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc_dk[j][e] = 0.f;
                acc_dv[j][e] = 0.f;
            }

        const u32 sKa = smem_u32(sK), sVa = smem_u32(sV), sQa = smem_u32(sQ), sdOa = smem_u32(sdO);
        const u32 sdSa = smem_u32(sdS), sLa = smem_u32(sL), sDa = smem_u32(sDl);

        if (total > 0) {
            load_tile<BN, D, LD, NT>(sKa, kg, st[4], rows_k, d_chunks, tid);
            load_tile<BN, D, LD, NT>(sVa, vg, st[7], rows_k, d_chunks, tid);
            // Iteration `it` handles query head hk*group + it / nmb and query block mb_lo + it % nmb.
            auto issue = [&](int it, int buf) {
                const int h = hk * group + it / nmb;
                const int m0 = (mb_lo + it % nmb) * BM;
                const i64 qrow = si.q_start + m0;
                const u16* qg = q + (i64)b * st[0] + qrow * st[1] + (i64)h * st[2];
                const u16* dog = dout + (i64)b * st[9] + qrow * st[10] + (i64)h * st[11];
                const i64 loff = (i64)b * st[12] + (i64)h * st[13] + qrow;
                load_q_block(sQa + buf * BM * LD * 2, sdOa + buf * BM * LD * 2, sLa + buf * BM * 4,
                             sDa + buf * BM * 4, qg, dog, lse + loff, delta + loff, st[1], st[10],
                             min(BM, si.sq - m0), d_chunks, tid);
            };
            issue(0, 0);
            cp_async_commit();

            for (int it = 0; it < total; ++it) {
                const int buf = it & 1;
                if (it + 1 < total) issue(it + 1, buf ^ 1);
                cp_async_commit();
                cp_async_wait<1>();
                __syncthreads();

                const int h = hk * group + it / nmb;
                const int m0 = (mb_lo + it % nmb) * BM;
                if (sp.use_alibi) sp.slope_log2 = alibi[(i64)b * alibi_sb + h] * AK_LOG2E;
                const u32 bQ = sQa + buf * BM * LD * 2, bdO = sdOa + buf * BM * LD * 2;
                const float* bL = sL + buf * BM;
                const float* bD = sDl + buf * BM;

                // dP^T = V dO^T and S^T = K Q^T for this warp's 16 keys x BM queries.
                float dpt[MTILE][4], sst[MTILE][4];
#pragma unroll
                for (int j = 0; j < MTILE; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        dpt[j][e] = 0.f;
                        sst[j][e] = 0.f;
                    }
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const u32 aoff = (u32)(((wn * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8) * 2);
                    u32 av[4], ak_[4];
                    ldsm_x4(sVa + aoff, av[0], av[1], av[2], av[3]);
                    ldsm_x4(sKa + aoff, ak_[0], ak_[1], ak_[2], ak_[3]);
#pragma unroll
                    for (int mp = 0; mp < BM / 16; ++mp) {
                        const u32 boff =
                            (u32)(((mp * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8) * 2);
                        u32 b0, b1, b2, b3;
                        ldsm_x4(bdO + boff, b0, b1, b2, b3);
                        mma16816<BF16>(dpt[2 * mp], av, b0, b1);
                        mma16816<BF16>(dpt[2 * mp + 1], av, b2, b3);
                        ldsm_x4(bQ + boff, b0, b1, b2, b3);
                        mma16816<BF16>(sst[2 * mp], ak_, b0, b1);
                        mma16816<BF16>(sst[2 * mp + 1], ak_, b2, b3);
                    }
                }

                // P^T (in sst) and dS^T (in dpt).
                const bool need_mask = (n0 + BN > si.sk) || (m0 + BM > si.sq) ||
                                       (wr >= 0 && n0 + BN - 1 > m0 + shift + wr) ||
                                       (wl >= 0 && n0 < m0 + BM - 1 + shift - wl);
                const int key0 = n0 + wn * 16 + (lane >> 2);
                backward_scores(sst, dpt, bL, bD, m0, key0, lane, need_mask, scale, shift, si, sp);

                // dS^T to shared memory for dQ; one warp of each key slice writes it.
                if (wd == 0) {
#pragma unroll
                    for (int j = 0; j < MTILE; ++j)
#pragma unroll
                        for (int hh = 0; hh < 2; ++hh) {
                            const int r = wn * 16 + (lane >> 2) + hh * 8;
                            const int c = j * 8 + 2 * (lane & 3);
                            *reinterpret_cast<u32*>(sdS + r * LDS + c) =
                                pack2<BF16>(dpt[j][2 * hh], dpt[j][2 * hh + 1]);
                        }
                }

                // dV += P^T dO and dK += dS^T Q over this warp's DP columns.
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) {
                    u32 ap[4], as[4];
                    ap[0] = pack2<BF16>(sst[2 * kk][0], sst[2 * kk][1]);
                    ap[1] = pack2<BF16>(sst[2 * kk][2], sst[2 * kk][3]);
                    ap[2] = pack2<BF16>(sst[2 * kk + 1][0], sst[2 * kk + 1][1]);
                    ap[3] = pack2<BF16>(sst[2 * kk + 1][2], sst[2 * kk + 1][3]);
                    as[0] = pack2<BF16>(dpt[2 * kk][0], dpt[2 * kk][1]);
                    as[1] = pack2<BF16>(dpt[2 * kk][2], dpt[2 * kk][3]);
                    as[2] = pack2<BF16>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
                    as[3] = pack2<BF16>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
                    for (int dp = 0; dp < DP / 16; ++dp) {
                        const u32 boff = (u32)(((kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + wd * DP +
                                                dp * 16 + (lane >> 4) * 8) *
                                               2);
                        u32 b0, b1, b2, b3;
                        ldsm_x4_t(bdO + boff, b0, b1, b2, b3);
                        mma16816<BF16>(acc_dv[2 * dp], ap, b0, b1);
                        mma16816<BF16>(acc_dv[2 * dp + 1], ap, b2, b3);
                        ldsm_x4_t(bQ + boff, b0, b1, b2, b3);
                        mma16816<BF16>(acc_dk[2 * dp], as, b0, b1);
                        mma16816<BF16>(acc_dk[2 * dp + 1], as, b2, b3);
                    }
                }
                __syncthreads();  // dS^T complete

                // dQ[BM x D] += dS K: warp -> 16 query rows x QD columns, QC columns at a time.
                {
                    const int qm = warp % QM;
                    const int qp = warp / QM;
                    const int row_a = qm * 16 + (lane >> 2);
                    float* dqg = dq_acc + (i64)b * st[14] + (i64)(si.q_start + m0) * st[15] + (i64)h * st[16];
                    const int rows_q = si.sq - m0;
#pragma unroll
                    for (int cc = 0; cc < QD / QC; ++cc) {
                        const int cbase = qp * QD + cc * QC;
                        float acc[QC / 8][4];
#pragma unroll
                        for (int j = 0; j < QC / 8; ++j)
#pragma unroll
                            for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
                        for (int kk = 0; kk < BN / 16; ++kk) {
                            u32 a[4];
                            ldsm_x4_t(sdSa + (u32)(((kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + qm * 16 +
                                                    ((lane >> 3) & 1) * 8) *
                                                   2),
                                      a[0], a[1], a[2], a[3]);
#pragma unroll
                            for (int dp = 0; dp < QC / 16; ++dp) {
                                u32 b0, b1, b2, b3;
                                ldsm_x4_t(sKa + (u32)(((kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + cbase +
                                                       dp * 16 + (lane >> 4) * 8) *
                                                      2),
                                          b0, b1, b2, b3);
                                mma16816<BF16>(acc[2 * dp], a, b0, b1);
                                mma16816<BF16>(acc[2 * dp + 1], a, b2, b3);
                            }
                        }
#pragma unroll
                        for (int hh = 0; hh < 2; ++hh) {
                            const int r = row_a + hh * 8;
                            if (r < rows_q) {
                                float* dst = dqg + (i64)r * st[15];
#pragma unroll
                                for (int j = 0; j < QC / 8; ++j) {
                                    const int c = cbase + j * 8 + 2 * (lane & 3);
                                    if (c < d) red_add2(dst + c, acc[j][2 * hh], acc[j][2 * hh + 1]);
                                }
                            }
                        }
                    }
                }
                __syncthreads();  // buffers of this iteration are free for the prefetch of the next-but-one
            }
            cp_async_wait<0>();
        }

        // dK and dV rows of this CTA; keys that no query sees get zeros.
        u16* dkg = dk + (i64)b * st[17] + (i64)(si.k_start + n0) * st[18] + (i64)hk * st[19];
        u16* dvg = dv + (i64)b * st[17] + (i64)(si.k_start + n0) * st[18] + (i64)hk * st[19];
        store_dk_dv<BF16>(acc_dk, acc_dv, dkg, dvg, st[18], wn * 16, wd * DP, rows_k, d, lane);
    }
};

// delta = rowsum(dO * O) in float32, laid out like lse, and the float32 dQ accumulator of the same rows zeroed. Rows
// are (batch, position) pairs; varlen calls pass batch = 1 with every token as a position. Each row takes LANES lanes
// (a power of two, 16 bytes of O and dO per lane and step; the host picks the fewest that cover the head dim,
// config.pre_lanes_per_row) so that a warp moves up to 32 x 16 bytes per tensor at every head dim instead of leaving
// lanes idle on narrow rows; one pass instead of a separate memset for dQ.
template <bool BF16>
__device__ __forceinline__ void bwd_pre(const u16* __restrict__ o, const u16* __restrict__ dout,
                                        float* __restrict__ delta, float* __restrict__ dq_acc, i64 o_sb, i64 o_ss,
                                        i64 o_sh, i64 do_sb, i64 do_ss, i64 do_sh, i64 l_sb, i64 l_sh, i64 q_sb,
                                        i64 q_ss, i64 q_sh, int seqlen, int heads, int d, int lanes) {
    const int lane = threadIdx.x & 31;
    const int sub = lane & (lanes - 1);
    const i64 warp = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const i64 pair = warp * (32 / lanes) + lane / lanes;
    const int b = blockIdx.y;
    // No early return: every lane takes part in the shuffles below.
    const bool valid = pair < (i64)seqlen * heads;
    const int i = valid ? (int)(pair / heads) : 0;
    const int h = valid ? (int)(pair % heads) : 0;
    const u16* orow = o + (i64)b * o_sb + (i64)i * o_ss + (i64)h * o_sh;
    const u16* drow = dout + (i64)b * do_sb + (i64)i * do_ss + (i64)h * do_sh;
    float* qrow = dq_acc + (i64)b * q_sb + (i64)i * q_ss + (i64)h * q_sh;
    float sum = 0.f;
    for (int c = sub * 8; valid && c < d; c += lanes * 8) {
        const uint4_aligned ov = *reinterpret_cast<const uint4_aligned*>(orow + c);
        const uint4_aligned dv = *reinterpret_cast<const uint4_aligned*>(drow + c);
        const u32 ow[4] = {ov.x, ov.y, ov.z, ov.w};
        const u32 dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            sum += to_f32<BF16>((u16)(ow[w] & 0xffffu)) * to_f32<BF16>((u16)(dw[w] & 0xffffu));
            sum += to_f32<BF16>((u16)(ow[w] >> 16)) * to_f32<BF16>((u16)(dw[w] >> 16));
        }
        reinterpret_cast<float4*>(qrow + c)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        reinterpret_cast<float4*>(qrow + c)[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    // Lanes of one row are an aligned group of `lanes`: xor offsets below it stay inside the group.
    for (int off = lanes >> 1; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (valid && sub == 0) delta[(i64)b * l_sb + (i64)h * l_sh + i] = sum;
}

}  // namespace ak

extern "C" __global__ void __launch_bounds__(128)
    attnkit_bwd_pre(const ak::u16* o, const ak::u16* dout, float* delta, float* dq_acc, ak::i64 o_sb, ak::i64 o_ss,
                    ak::i64 o_sh, ak::i64 do_sb, ak::i64 do_ss, ak::i64 do_sh, ak::i64 l_sb, ak::i64 l_sh,
                    ak::i64 q_sb, ak::i64 q_ss, ak::i64 q_sh, int seqlen, int heads, int d, int lanes) {
    ak::bwd_pre<ATTNKIT_BF16 != 0>(o, dout, delta, dq_acc, o_sb, o_ss, o_sh, do_sb, do_ss, do_sh, l_sb, l_sh, q_sb,
                                   q_ss, q_sh, seqlen, heads, d, lanes);
}

// Strides in elements, by value: q b/s/h, k b/s/h, v b/s/h, dO b/s/h, lse+delta b/h, dq_acc b/s/h,
// dk+dv b/s/h (dk and dv share one layout).
extern "C" __global__ void __launch_bounds__(ATTNKIT_BWD_WN * ATTNKIT_BWD_WD * 32)
    attnkit_bwd(const ak::u16* q, const ak::u16* k, const ak::u16* v, const ak::u16* dout, const float* lse,
                const float* delta, float* dq_acc, ak::u16* dk, ak::u16* dv, const int* cu_q, const int* cu_k,
                const float* alibi, ak::i64 s0, ak::i64 s1, ak::i64 s2, ak::i64 s3, ak::i64 s4, ak::i64 s5,
                ak::i64 s6, ak::i64 s7, ak::i64 s8, ak::i64 s9, ak::i64 s10, ak::i64 s11, ak::i64 s12, ak::i64 s13,
                ak::i64 s14, ak::i64 s15, ak::i64 s16, ak::i64 s17, ak::i64 s18, ak::i64 s19, int seqlen_q,
                int seqlen_k, int group, int d, int alibi_sb, float scale, float scale_log2, float cap_pre,
                float cap_post, int use_softcap, int use_alibi, int window_left, int window_right) {
    const ak::i64 strides[20] = {s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18, s19};
    const ak::ScoreParams sp =
        ak::make_score_params(scale_log2, cap_pre, cap_post, use_softcap, use_alibi, window_left, window_right);
    ak::BwdKernel<ATTNKIT_HEAD_DIM, ATTNKIT_BWD_WN, ATTNKIT_BWD_WD, ATTNKIT_BWD_BM, ATTNKIT_BF16 != 0>::run(
        q, k, v, dout, lse, delta, dq_acc, dk, dv, cu_q, cu_k, alibi, strides, seqlen_q, seqlen_k, group, d, alibi_sb,
        scale, sp);
}
