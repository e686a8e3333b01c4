// Helpers shared by the saap kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Scalar conversions of the element types (f32, bf16, f16), rounding to nearest even.
template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32(float x) { return x; }
template <> __device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32(float x) { return __float2half(x); }

// Batch items one launch covers; their per-item scalars travel as a by-value kernel parameter
// (no host-to-device copy, capturable in a CUDA graph). Larger batches use several launches.
#define SAAP_MAX_BATCH 64

// Per batch item: tokens in the cache and end of the indexed region (decode), or the token range
// to merge (merge). Must match `ItemTable` in src/cuda/mod.rs.
struct ItemTable {
    uint32_t a[SAAP_MAX_BATCH];
    uint32_t b[SAAP_MAX_BATCH];
};

// Decode steps replayed from a CUDA graph since it was captured, per batch item (`advance`, null
// outside replay): a captured launch keeps the ItemTable it was recorded with, so the decode
// kernels add this device count to the positions the table gives.
__device__ __forceinline__ uint32_t replayed_steps(const uint32_t* advance, uint32_t item) {
    return advance ? advance[item] : 0u;
}

// Inclusive prefix sum of v over the lanes of a warp (all 32 lanes take part).
__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t v) {
    const uint32_t lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= (uint32_t)o) v += y;
    }
    return v;
}

// Exclusive prefix sum of one value per thread across the block (blockDim.x a multiple of 32),
// in thread order; *total receives the block's sum. Starts and ends with __syncthreads(), so
// consecutive calls may share warp_totals.
__device__ inline uint32_t block_exclusive_sum(uint32_t v, uint32_t* total) {
    __shared__ uint32_t warp_totals[33];
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const uint32_t incl = warp_inclusive_sum(v);
    __syncthreads();
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const uint32_t t = lane < n_warps ? warp_totals[lane] : 0;
        const uint32_t scanned = warp_inclusive_sum(t);
        warp_totals[lane] = scanned - t;
        if (lane == 31) warp_totals[32] = scanned;
    }
    __syncthreads();
    const uint32_t excl = warp_totals[warp] + incl - v;
    *total = warp_totals[32];
    __syncthreads();
    return excl;
}

// In-place exclusive prefix sum of a[0..n) by the whole block (blockDim.x a multiple of 32).
// Each thread scans a contiguous run, after the runs' totals are scanned across the block.
// Ends with __syncthreads(), so a[] is visible to every thread afterwards.
__device__ inline void block_exclusive_scan(uint32_t* a, uint32_t n) {
    const uint32_t per = (n + blockDim.x - 1) / blockDim.x;
    const uint32_t lo = min(threadIdx.x * per, n), hi = min(lo + per, n);
    uint32_t own = 0;
    for (uint32_t i = lo; i < hi; ++i) own += a[i];
    uint32_t total;
    uint32_t run = block_exclusive_sum(own, &total);
    for (uint32_t i = lo; i < hi; ++i) {
        const uint32_t x = a[i];
        a[i] = run;
        run += x;
    }
    __syncthreads();
}

// First index i in a[0..n) with a[i] > x (a non-decreasing).
__device__ inline uint32_t upper_bound(const uint32_t* a, uint32_t n, uint32_t x) {
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        const uint32_t mid = (lo + hi) >> 1;
        if (a[mid] <= x) lo = mid + 1; else hi = mid;
    }
    return lo;
}
