// Shared-memory tiles in the 128-byte-swizzle layout that the wgmma descriptors of the sm_90 kernels read
// (fwd_sm90.cu, bwd_sm90.cu): a ROWS x D tile is stored as D/64 slabs of ROWS rows x 64 elements (128 bytes per row),
// and inside each 1024-byte group of 8 rows the 16-byte chunk index is XORed with (row % 8), so the 8 rows a
// tensor-core read touches fall into different banks. Slabs must start 1024-byte aligned.
#pragma once
#include "common.cuh"

namespace ak {

constexpr u32 SW128_ROW_BYTES = 128;

// Asynchronously copy a ROWS x D tile (row stride `row_stride` elements in global memory) into that layout with NT
// threads; rows >= rows_valid and 16-byte chunks >= d_chunks are zero-filled. One thread per 16-byte column chunk;
// the rows a thread visits step by a multiple of 8, so its swizzled chunk offset is fixed and the destination
// just advances.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_sw128(u32 smem, const u16* g, i64 row_stride, int rows_valid, int d_chunks,
                                           int tid) {
    constexpr int CPR = D / 8;
    constexpr int RS = NT / CPR;
    static_assert(D % 64 == 0, "swizzled tiles are whole 64-column slabs");
    static_assert(NT % CPR == 0 && RS % 8 == 0, "row step must keep the swizzle phase");
    const int c = tid % CPR;
    int r = tid / CPR;
    const bool col_ok = c < d_chunks;
    const u16* src = g + (i64)r * row_stride + c * 8;
    const i64 step = (i64)RS * row_stride;
    u32 dst = smem + (u32)(c >> 3) * (ROWS * SW128_ROW_BYTES) + (u32)r * SW128_ROW_BYTES +
              (u32)(((c & 7) ^ (r & 7)) << 4);
#pragma unroll
    for (int i = 0; i < (ROWS + RS - 1) / RS; ++i) {
        if ((ROWS % RS == 0) || r < ROWS) {
            const bool pred = col_ok && r < rows_valid;
            cp_async16(dst, pred ? src : g, pred);
        }
        src += step;
        r += RS;
        dst += (u32)(RS * SW128_ROW_BYTES);
    }
}

// Stores a warp's 16-bit wgmma A fragments (rows row0 + lane/4 and row0 + lane/4 + 8, 16 columns per fragment, two
// values per register) into a tile of 64-column rows in this layout: element (r, c) at r*128 + ((c/8) ^ (r%8))*16 +
// (c%8)*2, the K-major operand of a later wgmma. Wider tiles (NK > 4) are 64-column slabs SLAB_BYTES apart.
template <int NK, u32 SLAB_BYTES = 0>
__device__ __forceinline__ void store_frags_sw128(const u32 (&frag)[NK][4], u32 tile, int row0, int lane) {
    static_assert(NK <= 4 || SLAB_BYTES > 0, "a tile wider than 64 columns needs its slab stride");
#pragma unroll
    for (int kk = 0; kk < NK; ++kk)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = row0 + hh * 8;
                const int c = kk * 16 + half * 8 + 2 * (lane & 3);
                const u32 addr = tile + (u32)(c >> 6) * SLAB_BYTES + (u32)r * SW128_ROW_BYTES +
                                 (u32)((((c >> 3) & 7) ^ (r & 7)) << 4) + (u32)(c & 7) * 2;
                asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(frag[kk][2 * half + hh]));
            }
}

// The same fragments stored transposed, with stmatrix .trans: element (r, c) of the fragments (r = row0 + lane/4
// (+ 8), a multiple-of-8 row0 below 64) lands at row c, column r of a tile of 64-column rows in this layout, so a
// 64 x (16 NK) register tile becomes the K-major (16 NK) x 64 operand of a later wgmma. Register q of fragment kk
// is the 8 x 8 quarter (rows (q & 1) * 8, columns kk * 16 + (q >> 1) * 8); lane 8q + i names row i of its
// transpose, which holds 8 consecutive elements of one tile row: one 16-byte chunk.
template <int NK>
__device__ __forceinline__ void store_frags_sw128_trans(const u32 (&frag)[NK][4], u32 tile, int row0, int lane) {
    const int q = lane >> 3;
    const int chunk = (row0 >> 3) + (q & 1);  // the tile column / 8 that the quarter's rows become
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
        const int r = kk * 16 + (q >> 1) * 8 + (lane & 7);  // tile row this lane addresses
        const u32 addr = tile + (u32)r * SW128_ROW_BYTES + (u32)((chunk ^ (r & 7)) << 4);
        asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                     "r"(frag[kk][0]), "r"(frag[kk][1]), "r"(frag[kk][2]), "r"(frag[kk][3])
                     : "memory");
    }
}

}  // namespace ak
