// Online softmax of the forward kernels, shared by the mma.sync (fwd.cu) and wgmma (fwd_sm90.cu) paths.
//
// Both keep scores in the m16n8 accumulator layout: per warp 16*MT rows; s[t][j][e] holds row
// t*16 + lane/4 (+8 for e >= 2) and key j*8 + 2*(lane%4) + (e&1). acc_o has the same layout over head-dim
// columns. wgmma's m64nN accumulator is that layout per warp of the warpgroup, so one implementation serves both.
#pragma once
#include "common.cuh"

namespace ak {

template <int MT, int NTILE, int DTILE>
struct OnlineSoftmax {
    // Online-softmax update for a tile where every key is visible and the score is plain q.k * scale: the row
    // max is taken on the raw dot products and the scale folded into one FMA before ex2.
    static __device__ __forceinline__ void plain(float (&s)[MT][NTILE][4], float (&acc_o)[MT][DTILE][4],
                                                         float (&row_max)[MT][2], float (&row_sum)[MT][2],
                                                         float scale_log2) {
#pragma unroll
        for (int t = 0; t < MT; ++t) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float mx = s[t][0][2 * hh];
#pragma unroll
                for (int j = 0; j < NTILE; ++j) mx = fmaxf(mx, fmaxf(s[t][j][2 * hh], s[t][j][2 * hh + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_max[t][hh], mx * scale_log2);
                const float alpha = fast_exp2(row_max[t][hh] - m_new);  // ex2(-inf) = 0 on the first tile
                row_max[t][hh] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < NTILE; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = fast_exp2(fmaf(s[t][j][2 * hh + e], scale_log2, -m_new));
                        s[t][j][2 * hh + e] = p;
                        sum += p;
                    }
                row_sum[t][hh] = row_sum[t][hh] * alpha + sum;
#pragma unroll
                for (int j = 0; j < DTILE; ++j) {
                    acc_o[t][j][2 * hh] *= alpha;
                    acc_o[t][j][2 * hh + 1] *= alpha;
                }
            }
        }
    }

    // Online-softmax update with per-element visibility where `need_mask` (always for FULL = false) and, for
    // FULL, the full score transform (softcap, ALiBi; otherwise the plain scale). `row0` is the sequence position
    // of this warp's first row.
    template <bool FULL>
    static __device__ __forceinline__ void generic(float (&s)[MT][NTILE][4], float (&acc_o)[MT][DTILE][4],
                                                        float (&row_max)[MT][2], float (&row_sum)[MT][2], int n0,
                                                        int row0, int lane, bool need_mask, int shift,
                                                        const SeqInfo& si, const ScoreParams& sp) {
#pragma unroll
        for (int t = 0; t < MT; ++t) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int row = row0 + t * 16 + (lane >> 2) + hh * 8;
                float mx = -AK_INF;
#pragma unroll
                for (int j = 0; j < NTILE; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = n0 + j * 8 + 2 * (lane & 3) + e;
                        float x;
                        if (FULL) {
                            float th;
                            x = transform_score(s[t][j][2 * hh + e], row, col, shift, sp, th);
                        } else {
                            x = s[t][j][2 * hh + e] * sp.scale_log2;
                        }
                        if ((!FULL || need_mask) &&
                            !visible(row, col, shift, si.sq, si.sk, sp.window_left, sp.window_right))
                            x = -AK_INF;
                        s[t][j][2 * hh + e] = x;
                        mx = fmaxf(mx, x);
                    }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_max[t][hh], mx);
                // A row with nothing visible so far keeps max -inf; subtracting 0 instead avoids inf-inf.
                const float m_use = m_new == -AK_INF ? 0.f : m_new;
                const float alpha = fast_exp2(row_max[t][hh] - m_use);
                row_max[t][hh] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < NTILE; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = fast_exp2(s[t][j][2 * hh + e] - m_use);
                        s[t][j][2 * hh + e] = p;
                        sum += p;
                    }
                row_sum[t][hh] = row_sum[t][hh] * alpha + sum;
#pragma unroll
                for (int j = 0; j < DTILE; ++j) {
                    acc_o[t][j][2 * hh] *= alpha;
                    acc_o[t][j][2 * hh + 1] *= alpha;
                }
            }
        }
    }
};

}  // namespace ak
