// Shared building blocks of the attnkit CuPy kernels: PTX wrappers for the Ampere tensor-core path
// (cp.async, ldmatrix, mma.sync m16n8k16) and the score transform shared by forward and backward.
//
// The file includes no CUDA header on purpose: NVRTC then needs no include path, and the same text compiles
// under nvcc (CI) and NVRTC (run time) with identical meaning. Half values travel as raw 16-bit patterns.
#pragma once

namespace ak {

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

// Element type of the dynamic shared-memory array: its alignment makes every 16-byte cp.async target legal.
struct alignas(16) uint4_aligned {
    u32 x, y, z, w;
};

// Two floats stored as one 8-byte access.
struct alignas(8) float2_aligned {
    float x, y;
};

#define AK_INF __int_as_float(0x7f800000)
#define AK_LOG2E 1.4426950408889634f
#define AK_LN2 0.6931471805599453f

__device__ __forceinline__ u32 smem_u32(const void* ptr) {
    u32 addr;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }\n" : "=r"(addr) : "l"(ptr));
    return addr;
}

// 16-byte global->shared copy that bypasses L1; a false predicate zero-fills the destination, which is how
// rows past the sequence end and columns past the real head dim become harmless zeros.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool pred) {
    int bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool pred) {
    int bytes = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// D += A * B for one 16x8x16 tile, fp32 accumulation.
template <bool BF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// dst[0] += a, dst[1] += b in global memory (8-byte aligned). Hopper has a paired float reduction, which halves
// the atomic traffic of the dQ accumulation.
__device__ __forceinline__ void red_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
#endif
}

// Two floats -> one register of two 16-bit values; `lo` lands in the low half (the lower column index).
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// Four floats -> one register of four float8_e4m3fn values (round to nearest even, saturating at +-448); x0 lands
// in the lowest byte. cvt ... e4m3x2 puts its first source in the upper byte of the pair.
__device__ __forceinline__ u32 pack4_e4m3(float x0, float x1, float x2, float x3) {
    u32 r;
    asm("{\n.reg .b16 lo, hi;\n"
        "cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n"
        "cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n"
        "mov.b32 %0, {lo, hi};\n}\n"
        : "=r"(r)
        : "f"(x0), "f"(x1), "f"(x2), "f"(x3));
    return r;
}

template <bool BF16>
__device__ __forceinline__ float to_f32(u16 h) {
    if (BF16) return __uint_as_float(((u32)h) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// 2^x without the MUFU unit (float and integer pipes only), for x <= 127; the MUFU's ex2 is the softmax's
// narrowest pipe, so a kernel may move part of its exponentials here. x is rounded to an integer j by the float
// adder (adding 1.5 * 2^23 leaves round(x) in the low mantissa bits, so those bits shifted into the exponent field
// are 2^j's), and 2^(x - j) comes from a degree-3 polynomial on [-0.5, 0.5] (relative error <= 7.5e-5). max.NaN
// clamps below at -126 (2^-126: a probability that small is 0 to every use) and keeps a NaN a NaN. 9 operations.
__device__ __forceinline__ float poly_exp2(float x) {
    asm("max.NaN.f32 %0, %0, 0fC2FC0000;\n" : "+f"(x));  // -126
    const float shifter = 12582912.f;                    // 1.5 * 2^23
    const float t = x + shifter;
    const float f = x - (t - shifter);
    const float p = fmaf(fmaf(fmaf(0.05517132f, f, 0.24261054f), f, 0.69326099f), f, 0.99992811f);
    return p * __int_as_float((int)((u32)__float_as_int(t) << 23) + 0x3F800000);
}

// Per-call constants of the score transform; every score lives in the log2 domain (log2(e) folded in),
// so softmax needs a single ex2 per element.
struct ScoreParams {
    float scale_log2;    // softmax_scale * log2(e), used without softcap
    float cap_pre;       // softmax_scale / softcap
    float cap_post;      // softcap * log2(e)
    float slope_log2;    // ALiBi slope * log2(e) of this (batch, head); 0 without ALiBi
    int use_softcap;
    int use_alibi;
    int window_left;     // -1: unbounded
    int window_right;    // -1: unbounded
};

// Kernel entry points receive these as separate scalars (NVRTC launch arguments); one place packs them.
__device__ __forceinline__ ScoreParams make_score_params(float scale_log2, float cap_pre, float cap_post,
                                                         int use_softcap, int use_alibi, int window_left,
                                                         int window_right) {
    ScoreParams sp;
    sp.scale_log2 = scale_log2;
    sp.cap_pre = cap_pre;
    sp.cap_post = cap_post;
    sp.slope_log2 = 0.f;  // set per (batch, head) inside the kernels
    sp.use_softcap = use_softcap;
    sp.use_alibi = use_alibi;
    sp.window_left = window_left;
    sp.window_right = window_right;
    return sp;
}

// Key `col` is visible from query `row` (both relative to their sequence start); shift = Sk - Sq aligns the
// diagonal bottom-right as in flash-attn 2.x.
__device__ __forceinline__ bool visible(int row, int col, int shift, int sq, int sk, int wl, int wr) {
    int d = row + shift - col;
    return row < sq && col < sk && (wl < 0 || d <= wl) && (wr < 0 || d >= -wr);
}

// Keys [lo, hi) that query rows [m0, m0 + rows) can see through the window (-1: unbounded side); causal is
// window_right = 0. Ranges may be empty (hi <= lo).
__device__ __forceinline__ void keys_in_view(int m0, int rows, int sk, int shift, int wl, int wr, int& lo, int& hi) {
    lo = 0;
    hi = sk;
    if (wr >= 0) hi = min(sk, m0 + rows - 1 + shift + wr + 1);
    if (wl >= 0) lo = max(0, m0 + shift - wl);
}

// Raw q.k -> log2-domain score. `th` returns tanh(.) for the softcap chain rule in the backward pass.
__device__ __forceinline__ float transform_score(float acc, int row, int col, int shift, const ScoreParams& sp,
                                                 float& th) {
    float x;
    if (sp.use_softcap) {
        th = tanhf(acc * sp.cap_pre);
        x = th * sp.cap_post;
    } else {
        th = 0.f;
        x = acc * sp.scale_log2;
    }
    if (sp.use_alibi) {
        int d = row + shift - col;
        x -= sp.slope_log2 * (float)(d < 0 ? -d : d);
    }
    return x;
}

// Sequence bounds of batch entry b: dense tensors use batch strides, varlen ones cu_seqlens offsets.
struct SeqInfo {
    int q_start, k_start, sq, sk;
};

__device__ __forceinline__ SeqInfo seq_info(int b, const int* cu_q, const int* cu_k, int seqlen_q, int seqlen_k) {
    SeqInfo s;
    if (cu_q != nullptr) {
        s.q_start = cu_q[b];
        s.sq = cu_q[b + 1] - s.q_start;
        s.k_start = cu_k[b];
        s.sk = cu_k[b + 1] - s.k_start;
    } else {
        s.q_start = 0;
        s.k_start = 0;
        s.sq = seqlen_q;
        s.sk = seqlen_k;
    }
    return s;
}

// Asynchronously copy a ROWS x D tile (row stride `row_stride` elements in global memory) into shared memory
// with a padded row pitch LD, so ldmatrix rows fall into distinct banks. Rows >= rows_valid and 16-byte chunks
// >= d_chunks are zero-filled. Each thread keeps one 16-byte column and walks down the rows with a running
// pointer, so no per-chunk 64-bit offsets stay live in registers across the caller's loop.
template <int ROWS, int D, int LD, int NT>
__device__ __forceinline__ void load_tile(u32 smem, const u16* g, i64 row_stride, int rows_valid, int d_chunks,
                                          int tid) {
    constexpr int CPR = D / 8;
    if constexpr (NT % CPR == 0) {
        constexpr int RS = NT / CPR;  // rows advanced per step
        const int c = tid % CPR;
        int r = tid / CPR;
        const bool col_ok = c < d_chunks;
        const u16* src = g + (i64)r * row_stride + c * 8;
        const i64 step = (i64)RS * row_stride;
        u32 dst = smem + (u32)((r * LD + c * 8) * 2);
#pragma unroll
        for (int i = 0; i < (ROWS + RS - 1) / RS; ++i) {
            if ((ROWS % RS == 0) || r < ROWS) {
                const bool pred = col_ok && r < rows_valid;
                cp_async16(dst, pred ? src : g, pred);
            }
            src += step;
            r += RS;
            dst += (u32)(RS * LD * 2);
        }
    } else {
#pragma unroll
        for (int idx = tid; idx < ROWS * CPR; idx += NT) {
            int r = idx / CPR;
            int c = idx % CPR;
            bool pred = r < rows_valid && c < d_chunks;
            const u16* src = pred ? g + (i64)r * row_stride + c * 8 : g;
            cp_async16(smem + (u32)((r * LD + c * 8) * 2), src, pred);
        }
    }
}

}  // namespace ak
