// Top-n selection over one row of scores by one block, shared by the classifier's routing
// (`saap_route_top`, decode.cu) and Quest's (`saap_quest_select`, quest.cu, over the pages of
// one histogram bin). The order is the CPU's (`top_probes`): score descending, index ascending,
// NaN as -inf, -0 equal to +0.
//
// Each score becomes an order-preserving u32 (`score_bits`) in shared memory; entry i's unique
// u64 key is those bits high and the inverted index low. A radix select over 8-bit digits from
// the top finds the n-th largest key (`top_cut`; usually 4 passes: the index digits only break
// score ties); the keys at or above it are gathered and sorted by a bitonic network of `sel_cap`
// (the power of two >= n) — inside one warp when it is at most 64 (`top_sorted`). A bitonic sort
// of all C keys took 55 block-wide stages (12.5 us at C = 1024).
#pragma once
#include <stdint.h>
#include "common.cuh"

// Order-preserving bits of a score, as the CPU ranks it: NaN as -inf, -0 as +0.
__device__ __forceinline__ uint32_t score_bits(float s) {
    if (s != s) s = -INFINITY;
    if (s == 0.f) s = 0.f;
    const uint32_t u = __float_as_uint(s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The unique key of entry i: ties go to the lower index.
__device__ __forceinline__ unsigned long long top_key(const uint32_t* bits, uint32_t i) {
    return ((unsigned long long)bits[i] << 32) | (0xffffffffu - i);
}

// The entry a key stands for.
__device__ __forceinline__ uint32_t top_index(unsigned long long key) {
    return 0xffffffffu - (uint32_t)(key & 0xffffffffu);
}

// The cut of the n best of bits[0..C): the keys k with (k & mask) >= prefix are exactly those.
struct TopCut {
    unsigned long long prefix, mask;
};

// Radix select over 8-bit digits from the top (bits written and synced by the caller; hist: 256
// counters of shared memory). blockDim.x must be a multiple of 32. Ends synced.
__device__ inline TopCut top_cut(const uint32_t* bits, uint32_t C, uint32_t n, uint32_t* hist) {
    __shared__ unsigned long long prefix, mask;
    __shared__ uint32_t want;
    __shared__ bool done;
    const uint32_t tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
    if (tid == 0) {
        prefix = 0;
        mask = 0;
        want = n;
        done = false;
    }
    __syncthreads();
    // Invariant: `want` of the keys matching `prefix` on `mask` (the digits fixed so far) belong
    // to the top n, and so do all keys above that prefix.
    for (int shift = 56; shift >= 0 && !done; shift -= 8) {
        for (uint32_t i = tid; i < 256; i += nt) hist[i] = 0;
        __syncthreads();
        // Uniform trip count: every lane reaches the warp match.
        for (uint32_t base = 0; base < C; base += nt) {
            const uint32_t i = base + tid;
            uint32_t digit = 256;  // no bin
            if (i < C) {
                const unsigned long long k = top_key(bits, i);
                if ((k & mask) == prefix) digit = (uint32_t)(k >> shift) & 255;
            }
            // One atomic per distinct digit of the warp: scores of one row mostly share their
            // leading digits (sign and exponent), and same-address shared atomics serialize.
            const uint32_t peers = __match_any_sync(0xffffffffu, digit);
            if (digit < 256 && lane == (uint32_t)__ffs(peers) - 1)
                atomicAdd(&hist[digit], (uint32_t)__popc(peers));
        }
        __syncthreads();
        if (tid < 32) {
            // Lane L holds bins 255 - 8L - j (j = 0..7), so lanes run from the highest digit down.
            uint32_t count[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                count[j] = hist[255 - 8 * tid - j];
                sum += count[j];
            }
            const uint32_t incl = warp_inclusive_sum(sum);
            const uint32_t w = want;
            // Every lane has read `want` before the one lane that finds the digit rewrites it.
            __syncwarp();
            uint32_t above = incl - sum;
            if (above < w && w <= incl) {
                for (int j = 0; j < 8; ++j) {
                    if (above + count[j] >= w) {
                        const unsigned long long digit = 255 - 8 * tid - j;
                        prefix |= digit << shift;
                        mask |= 255ull << shift;
                        want = w - above;
                        // The whole bin is taken: the keys >= prefix are exactly the top n.
                        done = count[j] == w - above;
                        break;
                    }
                    above += count[j];
                }
            }
        }
        __syncthreads();
    }
    return TopCut{prefix, mask};
}

// Whether entry i is among the n best of `cut`.
__device__ __forceinline__ bool top_taken(const uint32_t* bits, uint32_t i, TopCut cut) {
    return (top_key(bits, i) & cut.mask) >= cut.prefix;
}

// Leaves the keys of the n best of `cut` in sel[0..n), best first (sel holds sel_cap, a power of
// two >= max(n, 2), in shared memory). Returns how many threads see the result: those with
// threadIdx.x below it read sel[0..n) (32 when the sort ran inside the first warp; the other
// threads may exit).
__device__ inline uint32_t top_sorted(const uint32_t* bits, uint32_t C, TopCut cut,
                                      unsigned long long* sel, uint32_t sel_cap, uint32_t n) {
    __shared__ uint32_t n_sel;
    const uint32_t tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
    if (tid == 0) n_sel = 0;
    __syncthreads();
    for (uint32_t base = 0; base < C; base += nt) {
        const uint32_t i = base + tid;
        const bool take = i < C && top_taken(bits, i, cut);
        // One atomic per warp for its slots in sel.
        const uint32_t ballot = __ballot_sync(0xffffffffu, take);
        uint32_t first = 0;
        if (lane == 0 && ballot) first = atomicAdd(&n_sel, (uint32_t)__popc(ballot));
        first = __shfl_sync(0xffffffffu, first, 0);
        if (take) sel[first + __popc(ballot & ((1u << lane) - 1))] = top_key(bits, i);
    }
    for (uint32_t i = n + tid; i < sel_cap; i += nt) sel[i] = 0;  // padding sorts last
    __syncthreads();
    const bool in_warp = sel_cap <= 64;
    if (in_warp && tid >= 32) return 32;
    const uint32_t workers = in_warp ? 32 : nt;
    for (uint32_t k = 2; k <= sel_cap; k <<= 1) {
        for (uint32_t j = k >> 1; j > 0; j >>= 1) {
            for (uint32_t t = tid; t < sel_cap / 2; t += workers) {
                const uint32_t i = 2 * t - (t & (j - 1)), o = i + j;
                const bool desc = (i & k) == 0;
                const unsigned long long a = sel[i], b = sel[o];
                if (desc ? a < b : a > b) {
                    sel[i] = b;
                    sel[o] = a;
                }
            }
            if (in_warp) {
                __syncwarp();
            } else {
                __syncthreads();
            }
        }
    }
    return workers;
}
