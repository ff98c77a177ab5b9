// Online softmax of the forward kernels and the P / dS step of the backward kernels, shared by the mma.sync
// (fwd.cu, bwd.cu) and wgmma (fwd_sm90.cu, bwd_sm90.cu) paths.
//
// Both keep scores in the m16n8 accumulator layout: per warp 16*MT rows; s[t][j][e] holds row
// t*16 + lane/4 (+8 for e >= 2) and key j*8 + 2*(lane%4) + (e&1). acc_o has the same layout over head-dim
// columns. wgmma's m64nN accumulator is that layout per warp of the warpgroup, so one implementation serves both.
#pragma once
#include "common.cuh"

namespace ak {

// P_SHIFT: probabilities come out as exp2(score - row max + P_SHIFT) (the fp8 forward's 2^8, which keeps small
// probabilities out of e4m3's subnormals); the shift cancels in O = acc / row sum and is taken out of the LSE.
// POLY_QUARTERS (0-4): in tiles without masks, that many of every 4 column groups of 8 take their exponentials
// from poly_exp2 on the float pipes instead of the MUFU (masked tiles keep ex2, whose exp2(-inf) is 0).
template <int MT, int NTILE, int DTILE, int P_SHIFT = 0, int POLY_QUARTERS = 0>
struct OnlineSoftmax {
    static_assert(POLY_QUARTERS >= 0 && POLY_QUARTERS <= 4, "POLY_QUARTERS counts column groups out of 4");
    // The subtrahend of a probability's exponent for row max m (m itself without a shift).
    static __device__ __forceinline__ float exp_base(float m) { return P_SHIFT ? m - (float)P_SHIFT : m; }

    // acc_o *= alpha per row: the rescale that goes with a probability step (kept apart so a pipelined kernel can
    // run it after the P V product of the previous tile has retired).
    static __device__ __forceinline__ void rescale(float (&acc_o)[MT][DTILE][4], const float (&alpha)[MT][2]) {
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int j = 0; j < DTILE; ++j) {
                    acc_o[t][j][2 * hh] *= alpha[t][hh];
                    acc_o[t][j][2 * hh + 1] *= alpha[t][hh];
                }
    }

    // Scores of one tile in place, in the log2 domain, with softcap and ALiBi (transform_score); only for score
    // transforms other than the plain scale.
    static __device__ __forceinline__ void transform_scores(float (&s)[MT][NTILE][4], int n0, int row0, int lane,
                                                            int shift, const ScoreParams& sp) {
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int row = row0 + t * 16 + (lane >> 2) + hh * 8;
#pragma unroll
                for (int j = 0; j < NTILE; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float th;
                        const int col = n0 + j * 8 + 2 * (lane & 3) + e;
                        s[t][j][2 * hh + e] = transform_score(s[t][j][2 * hh + e], row, col, shift, sp, th);
                    }
            }
    }

    // Scores of keys a row cannot see become -inf, in place. Each row's visible keys are one range [lo, hi)
    // (visible() in common.cuh), so an element costs two compares against constants. Scores may still be raw
    // q.k here: the plain scale is positive, so -inf stays -inf through it.
    static __device__ __forceinline__ void mask_scores(float (&s)[MT][NTILE][4], int n0, int row0, int lane,
                                                       int shift, const SeqInfo& si, const ScoreParams& sp) {
        // Windows wider than the sequences are unbounded; clamping them keeps the bounds' arithmetic in range.
        const int wl = min(sp.window_left, si.sk), wr = min(sp.window_right, si.sq);
        const int c0 = n0 + 2 * (lane & 3);
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int row = row0 + t * 16 + (lane >> 2) + hh * 8;
                int lo = wl >= 0 ? row + shift - wl : 0;
                int hi = wr >= 0 ? min(si.sk, row + shift + wr + 1) : si.sk;
                if (row >= si.sq) hi = lo;
                lo -= c0;  // bounds relative to the thread's first key, so the keys below are constants
                hi -= c0;
#pragma unroll
                for (int j = 0; j < NTILE; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int k = j * 8 + e;
                        if (k < lo || k >= hi) s[t][j][2 * hh + e] = -AK_INF;
                    }
            }
    }

    // Row max, probabilities exp2(s * scale - max) and row sums of one tile; alpha returns the factor the output
    // accumulator must be scaled by. A row with nothing visible so far keeps max -inf and subtracts 0 instead
    // (no inf - inf). POLY: take POLY_QUARTERS of every 4 column groups' exponentials from poly_exp2, which is
    // exact only where no score is -inf.
    template <bool POLY>
    static __device__ __forceinline__ void exp_step(float (&s)[MT][NTILE][4], float (&row_max)[MT][2],
                                                    float (&row_sum)[MT][2], float (&alpha)[MT][2], float scale) {
#pragma unroll
        for (int t = 0; t < MT; ++t) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float mx = s[t][0][2 * hh];
#pragma unroll
                for (int j = 0; j < NTILE; ++j) mx = fmaxf(mx, fmaxf(s[t][j][2 * hh], s[t][j][2 * hh + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_max[t][hh], mx * scale);
                const float m_use = m_new == -AK_INF ? 0.f : m_new;
                alpha[t][hh] = fast_exp2(row_max[t][hh] - m_use);  // ex2(-inf) = 0 on the first tile
                row_max[t][hh] = m_new;
                const float m_base = exp_base(m_use);
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < NTILE; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float x = fmaf(s[t][j][2 * hh + e], scale, -m_base);
                        const float p = (POLY && j % 4 < POLY_QUARTERS) ? poly_exp2(x) : fast_exp2(x);
                        s[t][j][2 * hh + e] = p;
                        sum += p;
                    }
                row_sum[t][hh] = row_sum[t][hh] * alpha[t][hh] + sum;
            }
        }
    }

    // One tile's probability step: s holds raw q.k on entry and P on exit. `plain_scores` (no softcap/ALiBi,
    // positive scale) folds the scale into the exponent's FMA; other scores are transformed in place first.
    // `need_mask` applies the mask in place; it is uniform per tile, so only boundary tiles pay per element.
    // Every tile then runs one exponential path: the consumers of the three-warpgroup forward fit their 160
    // registers only with a single path (three separate ones spilled 508 bytes, nvcc 13.0).
    static __device__ __forceinline__ void probs(float (&s)[MT][NTILE][4], float (&row_max)[MT][2],
                                                 float (&row_sum)[MT][2], float (&alpha)[MT][2], int n0, int row0,
                                                 int lane, bool plain_scores, bool need_mask, int shift,
                                                 const SeqInfo& si, const ScoreParams& sp) {
        if (!plain_scores) transform_scores(s, n0, row0, lane, shift, sp);
        if (need_mask) mask_scores(s, n0, row0, lane, shift, si, sp);
        const float scale = plain_scores ? sp.scale_log2 : 1.f;
        if (POLY_QUARTERS > 0 && plain_scores && !need_mask)
            exp_step<true>(s, row_max, row_sum, alpha, scale);
        else
            exp_step<false>(s, row_max, row_sum, alpha, scale);
    }

    // Probability step and rescale in one (the unpipelined kernels).
    static __device__ __forceinline__ void update(float (&s)[MT][NTILE][4], float (&acc_o)[MT][DTILE][4],
                                                  float (&row_max)[MT][2], float (&row_sum)[MT][2], int n0,
                                                  int row0, int lane, bool plain_scores, bool need_mask, int shift,
                                                  const SeqInfo& si, const ScoreParams& sp) {
        float alpha[MT][2];
        probs(s, row_max, row_sum, alpha, n0, row0, lane, plain_scores, need_mask, shift, si, sp);
        rescale(acc_o, alpha);
    }

    // Epilogue: normalise, write this warp's rows of O (zeros for rows that saw no key) and the natural-log LSE.
    // row0: the warp's first row inside the query block; og/lg point at the block's first row. `out_scale`
    // multiplies O (the fp8 forward's v_descale). Out: u16 (BF16 picks bfloat16 or float16) or float.
    template <bool BF16, typename Out>
    static __device__ __forceinline__ void finish(const float (&acc_o)[MT][DTILE][4], const float (&row_max)[MT][2],
                                                  const float (&row_sum)[MT][2], Out* og, i64 o_row_stride,
                                                  float* lg, int row0, int rows_q, int d, int lane,
                                                  float out_scale = 1.f) {
#pragma unroll
        for (int t = 0; t < MT; ++t) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float l = row_sum[t][hh];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                const float inv = l > 0.f ? out_scale / l : 0.f;
                const int r = row0 + t * 16 + (lane >> 2) + hh * 8;
                if (r < rows_q) {
                    Out* orow = og + (i64)r * o_row_stride;
#pragma unroll
                    for (int j = 0; j < DTILE; ++j) {
                        const int c = j * 8 + 2 * (lane & 3);
                        if (c < d) store2<BF16>(orow + c, acc_o[t][j][2 * hh] * inv, acc_o[t][j][2 * hh + 1] * inv);
                    }
                    if ((lane & 3) == 0) lg[r] = l > 0.f ? exp_base(row_max[t][hh]) * AK_LN2 + logf(l) : -AK_INF;
                }
            }
        }
    }

    template <bool BF16>
    static __device__ __forceinline__ void store2(u16* at, float lo, float hi) {
        *reinterpret_cast<u32*>(at) = pack2<BF16>(lo, hi);
    }
    template <bool BF16>
    static __device__ __forceinline__ void store2(float* at, float lo, float hi) {
        *reinterpret_cast<float2_aligned*>(at) = float2_aligned{lo, hi};
    }
};

// Backward: P^T and dS^T of one warp's 16 keys x (8 * MTILE) queries in the m16n8 accumulator layout (row = key,
// column = query): sst holds raw q.k on entry and P^T on exit, dpt holds dP^T on entry and dS^T on exit, scaled
// by softmax_scale so that neither dK nor dQ needs a later scaling. bL/bD are this query block's lse and delta,
// key0 the sequence position of the thread's first key row (+8 for e >= 2), m0 the block's first query.
template <int MTILE>
__device__ __forceinline__ void backward_scores(float (&sst)[MTILE][4], float (&dpt)[MTILE][4], const float* bL,
                                                const float* bD, int m0, int key0, int lane, bool need_mask,
                                                float scale, int shift, const SeqInfo& si, const ScoreParams& sp) {
    if (!need_mask && !sp.use_softcap && !sp.use_alibi) {
        // Every key visible to every query of the tile: lse is finite, and the scale folds into one FMA before ex2.
#pragma unroll
        for (int j = 0; j < MTILE; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int cl = j * 8 + 2 * (lane & 3) + c;
                const float lv = bL[cl] * AK_LOG2E;
                const float dl = bD[cl];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int e = 2 * r + c;
                    const float p = fast_exp2(fmaf(sst[j][e], sp.scale_log2, -lv));
                    sst[j][e] = p;
                    dpt[j][e] = p * (dpt[j][e] - dl) * scale;
                }
            }
    } else {
#pragma unroll
        for (int j = 0; j < MTILE; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int cl = j * 8 + 2 * (lane & 3) + (e & 1);  // query inside the block
                const int key = key0 + (e >> 1) * 8;
                float lv = bL[cl];
                // A row that saw no key has lse = -inf; +inf makes all its probabilities 0.
                lv = lv == -AK_INF ? AK_INF : lv * AK_LOG2E;
                float th = 0.f;
                float x = transform_score(sst[j][e], m0 + cl, key, shift, sp, th);
                if (need_mask && !visible(m0 + cl, key, shift, si.sq, si.sk, sp.window_left, sp.window_right))
                    x = -AK_INF;
                const float p = fast_exp2(x - lv);
                sst[j][e] = p;
                float ds = p * (dpt[j][e] - bD[cl]) * scale;
                if (sp.use_softcap) ds *= 1.f - th * th;
                dpt[j][e] = ds;
            }
    }
}

// Backward epilogue: this warp's rows of dK and dV (same layout) as 16-bit values. Rows row0 + lane/4 (+8) of the
// CTA's key block, columns col0 + 8j + 2*(lane%4) (+1); rows >= rows_k and columns >= d are skipped.
template <bool BF16, int NJ>
__device__ __forceinline__ void store_dk_dv(const float (&acc_dk)[NJ][4], const float (&acc_dv)[NJ][4], u16* dkg,
                                            u16* dvg, i64 row_stride, int row0, int col0, int rows_k, int d,
                                            int lane) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = row0 + (lane >> 2) + hh * 8;
        if (r < rows_k) {
            u32* krow = reinterpret_cast<u32*>(dkg + (i64)r * row_stride);
            u32* vrow = reinterpret_cast<u32*>(dvg + (i64)r * row_stride);
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const int c = col0 + j * 8 + 2 * (lane & 3);
                if (c < d) {
                    krow[c / 2] = pack2<BF16>(acc_dk[j][2 * hh], acc_dk[j][2 * hh + 1]);
                    vrow[c / 2] = pack2<BF16>(acc_dv[j][2 * hh], acc_dv[j][2 * hh + 1]);
                }
            }
        }
    }
}

}  // namespace ak
