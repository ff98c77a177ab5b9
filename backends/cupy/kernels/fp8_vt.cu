// V^T for the fp8 warp-specialised forward (fwd_sm90_ws.cu with ATTNKIT_FP8): 8-bit wgmma reads its B operand
// K-major only, so the P V product needs V with the keys contiguous. One pass over V's bytes:
//
//   vt[b][h][c][32 * blk + slot] = v[b][32 * blk + key_of_slot(slot)][h][c]
//
// with the keys permuted inside every block of 32. The permutation is the order in which a thread's S accumulators
// (keys 8g + 2*(lane%4) + {0, 1} of group g) land in the e4m3 A fragment (bytes 4*(lane%4) + 0..3 of 16), so the
// forward packs P into A registers in place. Keys from seqlen_k up to the padded length are written as zeros (a
// masked probability of 0 times garbage would be NaN); vt must hold ceil(seqlen_k / 32) * 32 keys per row.
//
// A CTA of 256 threads moves 64 keys x every channel (head dim <= 128, a multiple of 16) of one (batch, head): it
// reads 16-byte chunks of key rows into shared memory and writes 16 permuted keys of one channel per store.
#include "common.cuh"

namespace ak {

constexpr int VT_KEYS = 64;
constexpr int VT_PITCH = 144;  // bytes per staged key row: 128 channels + 16 (keeps the 16-byte stores aligned)

// Key (0..31, within its block of 32) that A-fragment position `slot` holds.
__device__ __forceinline__ int key_of_slot(int slot) {
    const int j = slot & 3, t = (slot >> 2) & 3;
    return (slot & 16) + 2 * t + (j & 1) + 8 * (j >> 1);
}

}  // namespace ak

// v: (batch, seqlen_k, heads_k, head_dim) bytes with element strides v_sb, v_ss, v_sh (channels contiguous);
// vt: contiguous (batch, heads_k, head_dim, keys_padded). Grid: (ceil(keys_padded / 64), heads_k, batch).
extern "C" __global__ void __launch_bounds__(256)
    attnkit_fp8_vt(const unsigned char* __restrict__ v, unsigned char* __restrict__ vt, ak::i64 v_sb, ak::i64 v_ss,
                   ak::i64 v_sh, int seqlen_k, int keys_padded, int head_dim) {
    __shared__ __align__(16) unsigned char tile[ak::VT_KEYS * ak::VT_PITCH];
    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * ak::VT_KEYS;
    const int h = blockIdx.y, b = blockIdx.z;
    const int chunks = head_dim / 16;
    const unsigned char* src = v + (ak::i64)b * v_sb + (ak::i64)h * v_sh;
#pragma unroll
    for (int rep = 0; rep < 2; ++rep) {
        const int idx = tid + rep * 256;
        const int key = idx >> 3, chunk = idx & 7;
        ak::uint4_aligned x = {0u, 0u, 0u, 0u};
        if (n0 + key < seqlen_k && chunk < chunks)
            x = *reinterpret_cast<const ak::uint4_aligned*>(src + (ak::i64)(n0 + key) * v_ss + chunk * 16);
        *reinterpret_cast<ak::uint4_aligned*>(tile + key * ak::VT_PITCH + chunk * 16) = x;
    }
    __syncthreads();
    const int nh = gridDim.y;
    unsigned char* dst = vt + ((ak::i64)b * nh + h) * head_dim * (ak::i64)keys_padded;
#pragma unroll
    for (int rep = 0; rep < 2; ++rep) {
        const int idx = tid + rep * 256;
        const int c = idx >> 2, quarter = idx & 3;  // channel, and which 16 of the CTA's 64 key slots
        const int slot0 = quarter * 16;
        if (c >= head_dim || n0 + slot0 >= keys_padded) continue;
        const int blk = slot0 & ~31;
        ak::u32 w[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            ak::u32 word = 0;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = blk + ak::key_of_slot((slot0 & 31) + 4 * r + e);
                word |= (ak::u32)tile[key * ak::VT_PITCH + c] << (8 * e);
            }
            w[r] = word;
        }
        *reinterpret_cast<ak::uint4_aligned*>(dst + (ak::i64)c * keys_padded + n0 + slot0) =
            ak::uint4_aligned{w[0], w[1], w[2], w[3]};
    }
}
