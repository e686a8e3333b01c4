// Tensor-core building blocks shared by the prefill attention (`prefill.cu`) and the prompt's
// nearest-centroid assignment (`append.cu`): both compute a 16-row × 64-column tile of dot
// products per warp, rows held as mma A fragments, columns streamed through shared memory.
#pragma once
#include "common.cuh"

// Rows of a shared-memory tile (keys or centroids); a tile row is padded to D + 8 elements so that
// ldmatrix and 32-bit loads hit distinct banks.
#define MMA_TILE 64

// One m16n8k16 MMA, D += A·B, with f32 accumulators.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8×8 b16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// 16 bytes global → shared without registers; `valid == false` writes zeros (rows past the
// sequence: never read garbage, whatever the cache holds there).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Rows `key0..key0 + BC` of one head's cache ([cap, D]) into `tile` ([BC][D + 8]); rows at or past
// `n_valid` are zero.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void load_tile(T* tile, const T* head, uint32_t key0, uint32_t n_valid) {
    constexpr int CHUNKS = D * sizeof(T) / 16;  // 16-byte pieces per row
    constexpr int STRIDE = D + 8;
#pragma unroll
    for (int i = threadIdx.x; i < MMA_TILE * CHUNKS; i += THREADS) {
        const int row = i / CHUNKS, chunk = i % CHUNKS;
        const uint32_t key = key0 + row;
        const bool valid = key < n_valid;
        const T* src = head + (size_t)(valid ? key : 0) * D + chunk * (16 / sizeof(T));
        cp_async_16(tile + row * STRIDE + chunk * (16 / sizeof(T)), src, valid);
    }
}

// A fragments of one warp's 16 rows: `row_lo` and `row_hi` are this thread's rows (lane / 4 and
// lane / 4 + 8 of the warp's), KD = D / 16 k-steps of 4 registers each.
template <typename T, int D>
__device__ __forceinline__ void load_a_fragments(uint32_t (*a)[4], const T* row_lo, const T* row_hi) {
    const uint32_t tig = threadIdx.x & 3;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        a[kk][0] = *reinterpret_cast<const uint32_t*>(row_lo + kk * 16 + tig * 2);
        a[kk][1] = *reinterpret_cast<const uint32_t*>(row_hi + kk * 16 + tig * 2);
        a[kk][2] = *reinterpret_cast<const uint32_t*>(row_lo + kk * 16 + 8 + tig * 2);
        a[kk][3] = *reinterpret_cast<const uint32_t*>(row_hi + kk * 16 + 8 + tig * 2);
    }
}

// s = A·tileᵀ for the warp's 16 rows and the tile's 64 rows: s[n][0..1] are row lane / 4, columns
// n·8 + 2·(lane % 4) + {0, 1}; s[n][2..3] the same columns of row lane / 4 + 8.
template <typename T, int D>
__device__ __forceinline__ void tile_scores(float (*s)[4], const uint32_t (*a)[4], const T* tile) {
    constexpr int STRIDE = D + 8;
    const uint32_t lane = threadIdx.x & 31, mat = lane >> 3, r = lane & 7;
#pragma unroll
    for (int n = 0; n < MMA_TILE / 8; ++n) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
            // Matrices: (rows n·8.., cols kk·16), (+8 cols), (kk + 1), (kk + 1, +8 cols).
            uint32_t b[4];
            ldmatrix_x4(b, tile + (n * 8 + r) * STRIDE + (kk + (mat >> 1)) * 16 + (mat & 1) * 8);
            Mma<T>::run(s[n], a[kk], b[0], b[1]);
            Mma<T>::run(s[n], a[kk + 1], b[2], b[3]);
        }
    }
}
