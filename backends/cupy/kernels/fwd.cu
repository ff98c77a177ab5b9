// FlashAttention-2 style forward pass: one CTA owns BM query rows of one (batch, head) and streams key/value
// tiles of BN rows through shared memory, keeping the running max, the running sum and the output in
// registers. Each warp owns 16*MT query rows. Tensor cores via mma.sync m16n8k16; K/V loads overlap compute:
// V_j is in flight during S = Q K_j^T, K_{j-1} during P V_j. (Double-buffering K and V with one barrier per
// tile was measured slower on an H200: ptxas then spills for D = 128; benchmarks/NOTES-cupy.md.)
// Tiles that need no mask (and calls without softcap/ALiBi) take a lean softmax: max on the raw scores, the
// scale folded into one FMA before ex2; boundary tiles take the generic per-element path.
//
// Configuration comes from macros so one source serves NVRTC (run time) and nvcc (CI) alike:
//   ATTNKIT_HEAD_DIM  padded head dim (multiple of 16; the real dim is a run-time argument, <= this)
//   ATTNKIT_BF16      1: bfloat16, 0: float16
//   ATTNKIT_FWD_MT    16-row m tiles per warp
//   ATTNKIT_FWD_WARPS warps per CTA
//   ATTNKIT_FWD_BN    keys per tile
#include "common.cuh"
#include "softmax.cuh"

#ifndef ATTNKIT_HEAD_DIM
#define ATTNKIT_HEAD_DIM 64
#endif
#ifndef ATTNKIT_BF16
#define ATTNKIT_BF16 0
#endif
#ifndef ATTNKIT_FWD_MT
#define ATTNKIT_FWD_MT 2
#endif
#ifndef ATTNKIT_FWD_WARPS
#define ATTNKIT_FWD_WARPS 4
#endif
#ifndef ATTNKIT_FWD_BN
#define ATTNKIT_FWD_BN 64
#endif

namespace ak {

template <int D, int MT, int NW, int BN, bool BF16>
struct FwdKernel {
    static constexpr int NT = NW * 32;
    static constexpr int BM = 16 * MT * NW;
    static constexpr int LD = D + 8;  // shared row pitch in elements (16 bytes of padding)
    static constexpr int NTILE = BN / 8;
    static constexpr int DTILE = D / 8;
    static_assert(D % 16 == 0 && BN % 16 == 0, "tile sizes must be multiples of 16");
    using Softmax = OnlineSoftmax<MT, NTILE, DTILE>;

    // S = Q K^T for this warp's 16*MT rows and the BN keys of the tile at bK (raw dot products).
    static __device__ __forceinline__ void gemm_qk(u32 sQa, u32 bK, int wrow, int lane, float (&s)[MT][NTILE][4]) {
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int j = 0; j < NTILE; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[t][j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 a[MT][4];
#pragma unroll
            for (int t = 0; t < MT; ++t)
                ldsm_x4(sQa + (u32)(((wrow + t * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8) * 2), a[t][0],
                        a[t][1], a[t][2], a[t][3]);
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 b0, b1, b2, b3;
                ldsm_x4(bK + (u32)(((np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8) *
                                   2),
                        b0, b1, b2, b3);
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    mma16816<BF16>(s[t][2 * np], a[t], b0, b1);
                    mma16816<BF16>(s[t][2 * np + 1], a[t], b2, b3);
                }
            }
        }
    }

    // O += P V with P (bf16/fp16) packed straight from the softmax registers.
    static __device__ __forceinline__ void gemm_pv(u32 bV, int lane, const float (&s)[MT][NTILE][4],
                                                   float (&acc_o)[MT][DTILE][4]) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 a[MT][4];
#pragma unroll
            for (int t = 0; t < MT; ++t) {
                a[t][0] = pack2<BF16>(s[t][2 * kk][0], s[t][2 * kk][1]);
                a[t][1] = pack2<BF16>(s[t][2 * kk][2], s[t][2 * kk][3]);
                a[t][2] = pack2<BF16>(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);
                a[t][3] = pack2<BF16>(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(bV + (u32)(((kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8) *
                                     2),
                          b0, b1, b2, b3);
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    mma16816<BF16>(acc_o[t][2 * dp], a[t], b0, b1);
                    mma16816<BF16>(acc_o[t][2 * dp + 1], a[t], b2, b3);
                }
            }
        }
    }

    static __device__ __forceinline__ void run(const u16* __restrict__ q, const u16* __restrict__ k,
                                               const u16* __restrict__ v, u16* __restrict__ o,
                                               float* __restrict__ lse, const int* __restrict__ cu_q,
                                               const int* __restrict__ cu_k, const float* __restrict__ alibi,
                                               const i64* __restrict__ st, int seqlen_q, int seqlen_k, int group,
                                               int d, int alibi_sb, ScoreParams sp) {
        extern __shared__ uint4_aligned smem_raw[];
        u16* sQ = reinterpret_cast<u16*>(smem_raw);
        u16* sK = sQ + BM * LD;  // then sV, BN * LD further

        const int tid = threadIdx.x;
        const int lane = tid & 31;
        const int warp = tid >> 5;
        // Heavy (late, causal) query blocks first so they do not trail at the end of the grid.
        const int mb = gridDim.x - 1 - blockIdx.x;
        const int h = blockIdx.y;
        const int b = blockIdx.z;
        const SeqInfo si = seq_info(b, cu_q, cu_k, seqlen_q, seqlen_k);
        const int m0 = mb * BM;
        if (m0 >= si.sq) return;
        const int hk = h / group;
        const int shift = si.sk - si.sq;
        const int wl = sp.window_left, wr = sp.window_right;
        if (sp.use_alibi) sp.slope_log2 = alibi[(i64)b * alibi_sb + h] * AK_LOG2E;

        // strides: q(b,s,h) k(b,s,h) v(b,s,h) o(b,s,h) lse(b,h)
        const u16* qg = q + (i64)b * st[0] + (i64)(si.q_start + m0) * st[1] + (i64)h * st[2];
        const u16* kg = k + (i64)b * st[3] + (i64)si.k_start * st[4] + (i64)hk * st[5];
        const u16* vg = v + (i64)b * st[6] + (i64)si.k_start * st[7] + (i64)hk * st[8];
        u16* og = o + (i64)b * st[9] + (i64)(si.q_start + m0) * st[10] + (i64)h * st[11];
        float* lg = lse + (i64)b * st[12] + (i64)h * st[13] + si.q_start + m0;
        const int rows_q = min(BM, si.sq - m0);

        int n_lo, n_hi;
        keys_in_view(m0, BM, si.sk, shift, wl, wr, n_lo, n_hi);
        const int d_chunks = d / 8;

        float acc_o[MT][DTILE][4];
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int j = 0; j < DTILE; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_o[t][j][e] = 0.f;
        float row_max[MT][2], row_sum[MT][2];
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                row_max[t][hh] = -AK_INF;
                row_sum[t][hh] = 0.f;
            }

        if (n_hi > n_lo) {
            const int nb_lo = n_lo / BN;
            const int nb_hi = (n_hi + BN - 1) / BN;
            const u32 sQa = smem_u32(sQ), sKa = smem_u32(sK);
            const u32 sVa = sKa + (u32)(BN * LD * 2);  // sV follows sK
            const int wrow = warp * 16 * MT;  // first row of this warp inside the block
            // The fast softmax folds the scale into one FMA per score, which needs max(s) * scale = max(s * scale).
            const bool plain = !sp.use_softcap && !sp.use_alibi && sp.scale_log2 > 0.f;
            load_tile<BM, D, LD, NT>(sQa, qg, st[1], rows_q, d_chunks, tid);
            {
                const int n0 = (nb_hi - 1) * BN;
                load_tile<BN, D, LD, NT>(sKa, kg + (i64)n0 * st[4], st[4], si.sk - n0, d_chunks, tid);
            }
            cp_async_commit();

            for (int nb = nb_hi - 1; nb >= nb_lo; --nb) {
                const int n0 = nb * BN;
                load_tile<BN, D, LD, NT>(sVa, vg + (i64)n0 * st[7], st[7], si.sk - n0, d_chunks, tid);
                cp_async_commit();
                cp_async_wait<1>();
                __syncthreads();

                float s[MT][NTILE][4];
                gemm_qk(sQa, sKa, wrow, lane, s);
                __syncthreads();  // every warp is done with sK
                if (nb > nb_lo) {
                    const int nn = n0 - BN;
                    load_tile<BN, D, LD, NT>(sKa, kg + (i64)nn * st[4], st[4], si.sk - nn, d_chunks, tid);
                }
                cp_async_commit();

                const bool need_mask = (n0 + BN > si.sk) || (wr >= 0 && n0 + BN - 1 > m0 + shift + wr) ||
                                       (wl >= 0 && n0 < m0 + BM - 1 + shift - wl);
                Softmax::update(s, acc_o, row_max, row_sum, n0, m0 + wrow, lane, plain, need_mask, shift, si, sp);

                cp_async_wait<1>();
                __syncthreads();  // V tile visible to every warp
                gemm_pv(sVa, lane, s, acc_o);
                __syncthreads();  // every warp is done with sV before the next tile lands there
            }
            cp_async_wait<0>();
        }

        Softmax::template finish<BF16>(acc_o, row_max, row_sum, og, st[10], lg, warp * 16 * MT, rows_q, d, lane);
    }
};

}  // namespace ak

// Strides are in elements and 64-bit, passed by value (no device-side argument buffer, so no host-to-device
// copy per call): q b/s/h, k b/s/h, v b/s/h, o b/s/h, lse b/h.
extern "C" __global__ void __launch_bounds__(ATTNKIT_FWD_WARPS * 32)
    attnkit_fwd(const ak::u16* q, const ak::u16* k, const ak::u16* v, ak::u16* o, float* lse, const int* cu_q,
                const int* cu_k, const float* alibi, ak::i64 s0, ak::i64 s1, ak::i64 s2, ak::i64 s3, ak::i64 s4,
                ak::i64 s5, ak::i64 s6, ak::i64 s7, ak::i64 s8, ak::i64 s9, ak::i64 s10, ak::i64 s11, ak::i64 s12,
                ak::i64 s13, int seqlen_q, int seqlen_k, int group, int d, int alibi_sb, float scale_log2,
                float cap_pre, float cap_post, int use_softcap, int use_alibi, int window_left, int window_right) {
    const ak::i64 strides[14] = {s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13};
    const ak::ScoreParams sp =
        ak::make_score_params(scale_log2, cap_pre, cap_post, use_softcap, use_alibi, window_left, window_right);
    ak::FwdKernel<ATTNKIT_HEAD_DIM, ATTNKIT_FWD_MT, ATTNKIT_FWD_WARPS, ATTNKIT_FWD_BN, ATTNKIT_BF16 != 0>::run(
        q, k, v, o, lse, cu_q, cu_k, alibi, strides, seqlen_q, seqlen_k, group, d, alibi_sb, sp);
}
