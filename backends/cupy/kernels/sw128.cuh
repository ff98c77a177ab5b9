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

}  // namespace ak
