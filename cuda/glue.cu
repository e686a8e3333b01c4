// Kernels of the model glue: the RMS norm and the SwiGLU product of a decoder layer.
//
// RMS normalization (`src/models/norm.rs`), optionally fused with the residual
// add before it: x = round(x + delta), y = round(w * x * rsqrt(mean(x²) + eps)), in f32 as
// candle's `rms_norm`. candle's kernel gives a row shorter than 1024 columns a single warp whose
// loop of dependent loads took ~14 µs per row on an H200: two rows per layer and decode step were
// a third of SmolLM2's step. Here a block of NORM_THREADS threads reads the row at once.
#include "common.cuh"

#define NORM_THREADS 256

// x, w: [rows, cols], [cols]; delta: [rows, cols] or null; out: [rows, cols] (y) without delta,
// [2, rows, cols] (the sum x, then y) with it. Grid: rows; block: NORM_THREADS.
template <typename T>
__device__ __forceinline__ void rms_norm_impl(T* __restrict__ out, const T* __restrict__ x,
                                              const T* __restrict__ delta,
                                              const T* __restrict__ w, uint32_t rows,
                                              uint32_t cols, float eps) {
    __shared__ float warp_sums[NORM_THREADS / 32];
    __shared__ float scale;
    const size_t row = blockIdx.x;
    const uint32_t tid = threadIdx.x;
    const T* xr = x + row * cols;
    T* sum_row = delta ? out + row * cols : nullptr;
    T* yr = out + ((delta ? (size_t)rows : 0) + row) * cols;
    float squares = 0.f;
    for (uint32_t i = tid; i < cols; i += NORM_THREADS) {
        float v = to_f32(xr[i]);
        if (delta) {
            // Rounded to T first: the residual stream is the sum a model would store.
            const T s = from_f32<T>(v + to_f32(delta[row * cols + i]));
            sum_row[i] = s;
            v = to_f32(s);
        }
        squares += v * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
    if (tid % 32 == 0) warp_sums[tid / 32] = squares;
    __syncthreads();
    if (tid < 32) {
        float total = tid < NORM_THREADS / 32 ? warp_sums[tid] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
        if (tid == 0) scale = rsqrtf(total / (float)cols + eps);
    }
    __syncthreads();
    const T* src = delta ? sum_row : xr;
    for (uint32_t i = tid; i < cols; i += NORM_THREADS)
        yr[i] = from_f32<T>(scale * to_f32(src[i]) * to_f32(w[i]));
}

#define SAAP_RMS_NORM(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                   \
        NAME(T* out, const T* x, const T* delta, const T* w, uint32_t rows, uint32_t cols,       \
             float eps) {                                                                        \
        rms_norm_impl<T>(out, x, delta, w, rows, cols, eps);                                     \
    }

SAAP_RMS_NORM(saap_rms_norm_f32, float)
SAAP_RMS_NORM(saap_rms_norm_bf16, __nv_bfloat16)
SAAP_RMS_NORM(saap_rms_norm_f16, __half)

// SwiGLU (`src/models/swiglu.rs`): out = round(round(silu(gate)) * up), as candle's `silu` then
// `mul` (two launches, and a copy of each half, before). gate_up: [rows, 2 * width], the gate
// then the up projection of each row (one matmul over concatenated weights); out: [rows, width].
#define SWIGLU_THREADS 256

template <typename T>
__device__ __forceinline__ void silu_mul_impl(T* __restrict__ out, const T* __restrict__ gate_up,
                                              uint32_t rows, uint32_t width) {
    const size_t i = (size_t)blockIdx.x * SWIGLU_THREADS + threadIdx.x;
    if (i >= (size_t)rows * width) return;
    const size_t row = i / width, col = i % width;
    const float g = to_f32(gate_up[row * 2 * width + col]);
    const float silu = to_f32(from_f32<T>(g / (1.0f + expf(-g))));
    out[i] = from_f32<T>(silu * to_f32(gate_up[row * 2 * width + width + col]));
}

#define SAAP_SILU_MUL(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)                                 \
        NAME(T* out, const T* gate_up, uint32_t rows, uint32_t width) {                          \
        silu_mul_impl<T>(out, gate_up, rows, width);                                             \
    }

SAAP_SILU_MUL(saap_silu_mul_f32, float)
SAAP_SILU_MUL(saap_silu_mul_bf16, __nv_bfloat16)
SAAP_SILU_MUL(saap_silu_mul_f16, __half)
