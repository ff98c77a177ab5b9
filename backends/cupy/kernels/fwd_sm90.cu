// Hopper (sm_90a) forward pass on warpgroup MMA. Same algorithm, arguments and outputs as fwd.cu; the
// difference is the tensor-core path: each warpgroup (128 threads) owns 64 query rows, S = Q K^T runs as
// wgmma with both operands in shared memory, O += P V as wgmma with P straight from registers and V read
// N-major (transposed) from shared memory. mma.sync peaks far below wgmma on Hopper (benchmarks/NOTES-cupy.md).
//
// Shared memory holds Q (BM x D) and two stages of K and V (BN x D each) in the layout the 128-byte-swizzle
// descriptors expect: 64-column slabs of 128-byte rows, the 16-byte chunk index XORed with (row % 8). Tile j+1
// loads by cp.async while tile j computes; one barrier per tile publishes the landed stage and frees the other.
//
// Configuration (macros, as fwd.cu):
//   ATTNKIT_HEAD_DIM  64 or 128 (the real dim is a run-time argument, <= this; extra columns are zero-filled)
//   ATTNKIT_BF16      1: bfloat16, 0: float16
//   ATTNKIT_FWD_WG    warpgroups per CTA (BM = 64 * warpgroups)
//   ATTNKIT_FWD_BN    keys per tile (64 or 128)
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
#ifndef ATTNKIT_FWD_WG
#define ATTNKIT_FWD_WG 2
#endif
#ifndef ATTNKIT_FWD_BN
#define ATTNKIT_FWD_BN 128
#endif

namespace ak {

template <int D, int NWG, int BN, bool BF16>
struct FwdSm90Kernel {
    static constexpr int NT = NWG * 128;
    static constexpr int BM = 64 * NWG;
    static constexpr int NTILE = BN / 8;
    static constexpr int DTILE = D / 8;
    static constexpr u32 SLAB = SW128_ROW_BYTES;
    static constexpr u32 Q_BYTES = BM * D * 2;
    static constexpr u32 KV_BYTES = BN * D * 2;
    static_assert(D == 64 || D == 128, "wgmma forward is built for head dims 64 and 128");
    static_assert(BN == 64 || BN == 128, "wgmma forward is built for 64 or 128 keys per tile");
    using Softmax = OnlineSoftmax<1, NTILE, DTILE>;
    using MmaS = Wgmma<BN, BF16>;
    using MmaO = Wgmma<D, BF16>;

    static __device__ __forceinline__ void run(const u16* __restrict__ q, const u16* __restrict__ k,
                                               const u16* __restrict__ v, u16* __restrict__ o,
                                               float* __restrict__ lse, const int* __restrict__ cu_q,
                                               const int* __restrict__ cu_k, const float* __restrict__ alibi,
                                               const i64* __restrict__ st, int seqlen_q, int seqlen_k, int group,
                                               int d, int alibi_sb, ScoreParams sp) {
        extern __shared__ uint4_aligned smem_raw[];
        // Swizzle groups must start on 1024-byte boundaries; the launch reserves 1 KB of slack for this.
        const u32 sQa = (smem_u32(smem_raw) + 1023u) & ~1023u;
        const u32 sKV = sQa + Q_BYTES;  // stage s: K at sKV + 2 s KV_BYTES, V right after it

        const int tid = threadIdx.x;
        const int lane = tid & 31;
        const int warp = tid >> 5;
        const int wg = warp >> 2;
        const int mb = gridDim.x - 1 - blockIdx.x;  // heavy (late, causal) query blocks first
        const int h = blockIdx.y;
        const int b = blockIdx.z;
        const SeqInfo si = seq_info(b, cu_q, cu_k, seqlen_q, seqlen_k);
        const int m0 = mb * BM;
        if (m0 >= si.sq) return;
        const int hk = h / group;
        const int shift = si.sk - si.sq;
        const int wl = sp.window_left, wr = sp.window_right;
        if (sp.use_alibi) sp.slope_log2 = alibi[(i64)b * alibi_sb + h] * AK_LOG2E;

        const u16* qg = q + (i64)b * st[0] + (i64)(si.q_start + m0) * st[1] + (i64)h * st[2];
        const u16* kg = k + (i64)b * st[3] + (i64)si.k_start * st[4] + (i64)hk * st[5];
        const u16* vg = v + (i64)b * st[6] + (i64)si.k_start * st[7] + (i64)hk * st[8];
        u16* og = o + (i64)b * st[9] + (i64)(si.q_start + m0) * st[10] + (i64)h * st[11];
        float* lg = lse + (i64)b * st[12] + (i64)h * st[13] + si.q_start + m0;
        const int rows_q = min(BM, si.sq - m0);

        int n_lo, n_hi;
        keys_in_view(m0, BM, si.sk, shift, wl, wr, n_lo, n_hi);
        const int d_chunks = d / 8;
        const int wrow = warp * 16;  // first row of this warp inside the block (warpgroup wg owns 64 wg .. +63)

        float acc_o[1][DTILE][4];
        float s[1][NTILE][4];
#pragma unroll
        for (int j = 0; j < DTILE; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[0][j][e] = 0.f;
#pragma unroll
        for (int j = 0; j < NTILE; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[0][j][e] = 0.f;
        float row_max[1][2] = {{-AK_INF, -AK_INF}};
        float row_sum[1][2] = {{0.f, 0.f}};

        if (n_hi > n_lo) {
            const int nb_lo = n_lo / BN;
            const int nb_hi = (n_hi + BN - 1) / BN;
            const bool plain = !sp.use_softcap && !sp.use_alibi && sp.scale_log2 > 0.f;
            // Descriptor of this warpgroup's 64 Q rows; a k-step of 16 columns moves 32 bytes inside a slab.
            const u32 q_wg = sQa + (u32)wg * (64 * SLAB);
            load_sw128<BM, D, NT>(sQa, qg, st[1], rows_q, d_chunks, tid);
            {
                const int n0 = (nb_hi - 1) * BN;
                load_sw128<BN, D, NT>(sKV, kg + (i64)n0 * st[4], st[4], si.sk - n0, d_chunks, tid);
                load_sw128<BN, D, NT>(sKV + KV_BYTES, vg + (i64)n0 * st[7], st[7], si.sk - n0, d_chunks, tid);
            }
            cp_async_commit();

            int stage = 0;
            for (int nb = nb_hi - 1; nb >= nb_lo; --nb, stage ^= 1) {
                const int n0 = nb * BN;
                const u32 sK = sKV + (u32)stage * (2 * KV_BYTES);
                const u32 sV = sK + KV_BYTES;
                cp_async_wait<0>();
                fence_proxy_async();
                __syncthreads();  // tile nb visible to wgmma; every warpgroup is done with the other stage
                if (nb > nb_lo) {
                    const int nn = n0 - BN;
                    const u32 sKn = sKV + (u32)(stage ^ 1) * (2 * KV_BYTES);
                    load_sw128<BN, D, NT>(sKn, kg + (i64)nn * st[4], st[4], si.sk - nn, d_chunks, tid);
                    load_sw128<BN, D, NT>(sKn + KV_BYTES, vg + (i64)nn * st[7], st[7], si.sk - nn, d_chunks, tid);
                }
                cp_async_commit();

                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const u32 slab_off = (u32)(kk >> 2);
                    const u64 da = sw128_desc(q_wg + slab_off * (BM * SLAB) + (u32)(kk & 3) * 32, 16, 1024);
                    const u64 db = sw128_desc(sK + slab_off * (BN * SLAB) + (u32)(kk & 3) * 32, 16, 1024);
                    MmaS::template ss<0, 0>(s[0], da, db, kk > 0);
                }
                wgmma_commit();
                wgmma_wait<0>();

                const bool need_mask = (n0 + BN > si.sk) || (wr >= 0 && n0 + BN - 1 > m0 + shift + wr) ||
                                       (wl >= 0 && n0 < m0 + BM - 1 + shift - wl);
                Softmax::update(s, acc_o, row_max, row_sum, n0, m0 + wrow, lane, plain, need_mask, shift, si, sp);

                u32 p[BN / 16][4];
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    p[kk][0] = pack2<BF16>(s[0][2 * kk][0], s[0][2 * kk][1]);
                    p[kk][1] = pack2<BF16>(s[0][2 * kk][2], s[0][2 * kk][3]);
                    p[kk][2] = pack2<BF16>(s[0][2 * kk + 1][0], s[0][2 * kk + 1][1]);
                    p[kk][3] = pack2<BF16>(s[0][2 * kk + 1][2], s[0][2 * kk + 1][3]);
                }
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    // V is N-major: 16 keys = two 8-row groups (SBO 1024 B); the next 64 columns sit one
                    // slab (BN rows) further (LBO).
                    const u64 db = sw128_desc(sV + (u32)kk * (16 * SLAB), BN * SLAB, 1024);
                    MmaO::template rs<1>(acc_o[0], p[kk], db, 1);
                }
                wgmma_commit();
                wgmma_wait<0>();
            }
            cp_async_wait<0>();
        }

        Softmax::template finish<BF16>(acc_o, row_max, row_sum, og, st[10], lg, wrow, rows_q, d, lane);
    }
};

}  // namespace ak

// Same arguments as attnkit_fwd in fwd.cu, so the host side builds one argument list for either kernel.
extern "C" __global__ void __launch_bounds__(ATTNKIT_FWD_WG * 128, 1)
    attnkit_fwd_sm90(const ak::u16* q, const ak::u16* k, const ak::u16* v, ak::u16* o, float* lse, const int* cu_q,
                     const int* cu_k, const float* alibi, ak::i64 s0, ak::i64 s1, ak::i64 s2, ak::i64 s3, ak::i64 s4,
                     ak::i64 s5, ak::i64 s6, ak::i64 s7, ak::i64 s8, ak::i64 s9, ak::i64 s10, ak::i64 s11,
                     ak::i64 s12, ak::i64 s13, int seqlen_q, int seqlen_k, int group, int d, int alibi_sb,
                     float scale_log2, float cap_pre, float cap_post, int use_softcap, int use_alibi,
                     int window_left, int window_right) {
    const ak::i64 strides[14] = {s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13};
    const ak::ScoreParams sp =
        ak::make_score_params(scale_log2, cap_pre, cap_post, use_softcap, use_alibi, window_left, window_right);
    ak::FwdSm90Kernel<ATTNKIT_HEAD_DIM, ATTNKIT_FWD_WG, ATTNKIT_FWD_BN, ATTNKIT_BF16 != 0>::run(
        q, k, v, o, lse, cu_q, cu_k, alibi, strides, seqlen_q, seqlen_k, group, d, alibi_sb, sp);
}
