// Merge of new token ids into the partition index (partition-scan), one block per directory row.
// Same result as `merge_row` in src/partition/scan.rs: per (batch item, KV head) the directory row
// is [offsets; C + 1] ++ perm, and after the merge perm is the stable sort by partition of the old
// indexed ids followed by the new ones.
#include "common.cuh"

// Old perm entries each thread holds per pass of the move step.
#define MOVE_ITEMS 8
// Labels each lane of a scatter warp loads ahead.
#define SCATTER_ITEMS 8
// Fewest new ids worth a scatter warp of their own.
#define SCATTER_MIN (32 * SCATTER_ITEMS)

// dir: [rows, C + 1 + cap], labels: [rows, cap]; row = item * n_heads + head.
// ranges.a[item]..ranges.b[item] are the tokens of that item to merge (empty: untouched).
// Up to `scatter_warps` warps scatter the new ids (segments of at least SCATTER_MIN ids each).
// Dynamic shared memory: 2 * (C + 1) u32, plus scatter_warps * C u32 when scatter_warps > 1.
extern "C" __global__ void saap_merge(uint32_t* __restrict__ dir, const uint32_t* __restrict__ labels,
                                      ItemTable ranges, uint32_t n_heads, uint32_t n_partitions,
                                      uint32_t cap, uint32_t scatter_warps) {
    const uint32_t row = blockIdx.x;
    const uint32_t item = row / n_heads;
    const uint32_t start = ranges.a[item], end = ranges.b[item];
    if (end <= start) return;
    const uint32_t C = n_partitions, tid = threadIdx.x;
    uint32_t* offsets = dir + (size_t)row * (C + 1 + cap);
    uint32_t* perm = offsets + C + 1;
    const uint32_t* lab = labels + (size_t)row * cap;

    extern __shared__ uint32_t smem[];
    uint32_t* old_off = smem;          // C + 1: offsets before the merge
    uint32_t* shift = smem + C + 1;    // C + 1: counts of new ids, then their exclusive scan
    __shared__ uint32_t move_from;

    for (uint32_t i = tid; i <= C; i += blockDim.x) {
        old_off[i] = offsets[i];
        shift[i] = 0;
    }
    __syncthreads();
    // Histogram. Labels >= C cannot come from assignment; they are skipped, not written anywhere.
    for (uint32_t i = start + tid; i < end; i += blockDim.x) {
        const uint32_t c = lab[i];
        if (c < C) atomicAdd(&shift[c], 1u);
    }
    __syncthreads();
    // shift[c] = new ids in partitions < c: how far list c moves right; shift[C] = all new ids.
    block_exclusive_scan(shift, C + 1);
    // A row that would overflow its capacity (the range was merged before) is left untouched
    // rather than spilling into the next row; the CPU reference rejects it by panicking.
    if (old_off[C] > cap || shift[C] > cap - old_off[C]) return;

    for (uint32_t i = tid; i <= C; i += blockDim.x) {
        offsets[i] = old_off[i] + shift[i];
        // Lists before the first one that moves stay in place: start moving there.
        if (i < C && shift[i + 1] > 0 && shift[i] == 0) move_from = old_off[i + 1];
    }
    if (tid == 0 && shift[C] == 0) move_from = old_off[C];
    __syncthreads();

    // Move old lists right. Every element moves right (shifts are >= 0) and destinations are
    // distinct, so passes from the right end, each reading its whole chunk before writing, never
    // overwrite an element that has not been read yet.
    const uint32_t lo = move_from, old_total = old_off[C];
    const uint32_t chunk = blockDim.x * MOVE_ITEMS;
    for (uint32_t hi = old_total; hi > lo;) {
        const uint32_t base = hi - lo > chunk ? hi - chunk : lo;
        uint32_t val[MOVE_ITEMS], dst[MOVE_ITEMS];
#pragma unroll
        for (int k = 0; k < MOVE_ITEMS; ++k) {
            const uint32_t p = base + k * blockDim.x + tid;
            dst[k] = p;
            if (p < hi) {
                val[k] = perm[p];
                const uint32_t c = upper_bound(old_off, C + 1, p) - 1;
                dst[k] = p + shift[c];
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < MOVE_ITEMS; ++k) {
            const uint32_t p = base + k * blockDim.x + tid;
            if (p < hi && dst[k] != p) perm[dst[k]] = val[k];
        }
        __syncthreads();
        hi = base;
    }

    // Cursor of partition c: end of its moved old list.
    for (uint32_t c = tid; c < C; c += blockDim.x) shift[c] += old_off[c + 1];
    __syncthreads();

    // Stable scatter: the new ids split into `warps` consecutive segments, one warp each (one
    // warp alone took 1.4 ms for a 171k-token prompt's 8 rows). Warp w's cursor of partition c
    // starts after the ids of c in segments < w, so slots still follow the ids' order.
    const uint32_t n_new = end - start;
    const uint32_t warps = max(1u, min(scatter_warps, (n_new + SCATTER_MIN - 1) / SCATTER_MIN));
    const uint32_t segment = (n_new + warps - 1) / warps;
    uint32_t* cursors = shift;  // one warp: the partitions' cursors themselves
    if (warps > 1) {
        cursors = shift + C + 1;  // [warps][C]
        for (uint32_t i = tid; i < warps * C; i += blockDim.x) cursors[i] = 0;
        __syncthreads();
        for (uint32_t i = start + tid; i < end; i += blockDim.x) {
            const uint32_t c = lab[i];
            if (c < C) atomicAdd(&cursors[(i - start) / segment * C + c], 1u);
        }
        __syncthreads();
        for (uint32_t c = tid; c < C; c += blockDim.x) {
            uint32_t run = shift[c];
            for (uint32_t w = 0; w < warps; ++w) {
                const uint32_t count = cursors[w * C + c];
                cursors[w * C + c] = run;
                run += count;
            }
        }
        __syncthreads();
    }
    const uint32_t warp = tid >> 5;
    if (warp >= warps) return;
    uint32_t* cursor = cursors + (warps > 1 ? warp * C : 0);
    const uint32_t seg_start = start + warp * segment;
    const uint32_t seg_end = min(end, seg_start + segment);
    // Within a segment, ids in increasing order; lanes with the same label take consecutive
    // slots in lane order, then the highest such lane advances the cursor.
    const uint32_t lane = tid & 31;
    const uint32_t lanes_below = (1u << lane) - 1;
    for (uint32_t base = seg_start; base < seg_end; base += 32 * SCATTER_ITEMS) {
        uint32_t c[SCATTER_ITEMS];
#pragma unroll
        for (int k = 0; k < SCATTER_ITEMS; ++k) {
            const uint32_t i = base + k * 32 + lane;
            c[k] = i < seg_end ? lab[i] : 0xffffffffu;
        }
#pragma unroll
        for (int k = 0; k < SCATTER_ITEMS; ++k) {
            const uint32_t i = base + k * 32 + lane;
            const bool ok = i < seg_end && c[k] < C;
            const uint32_t key = ok ? c[k] : 0xffffffffu;
            const uint32_t peers = __match_any_sync(0xffffffffu, key);
            uint32_t slot = 0;
            if (ok) {
                slot = cursor[key] + __popc(peers & lanes_below);
                perm[slot] = i;
            }
            __syncwarp();
            if (ok && (peers >> lane) == 1u) cursor[key] = slot + 1;
            __syncwarp();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-partition summaries (src/partition/summary.rs): f32 sums of each partition's post-RoPE keys
// and values, and their means in the cache's type, for estimating the partitions a decode step
// does not read. One thread per (partition, row, keys|values, dimension): grid (C, rows, 2),
// block D threads.

// sums += the rows new to partition c's list after a merge: the ids at or after the merged
// range's start (lists are sorted by position), added in position order so that the f32 sums are
// the CPU's to the bit. sums: [2, rows_all, C, D] (`sums_half` = rows_all * C * D), kv: [2,
// rows_all, cap, D] (`kv_half`); both offset to this launch's first row. ranges as in saap_merge.
template <typename T>
__device__ __forceinline__ void summary_sums_impl(float* __restrict__ sums, const T* __restrict__ kv,
                                                  const uint32_t* __restrict__ dir, ItemTable ranges,
                                                  uint32_t n_heads, uint32_t C, uint32_t cap,
                                                  uint32_t D, size_t sums_half, size_t kv_half) {
    const uint32_t c = blockIdx.x, row = blockIdx.y, half = blockIdx.z, d = threadIdx.x;
    const uint32_t item = row / n_heads, start = ranges.a[item];
    if (ranges.b[item] <= start || d >= D) return;
    const uint32_t* offsets = dir + (size_t)row * (C + 1 + cap);
    const uint32_t* perm = offsets + C + 1;
    const uint32_t a = min(offsets[c], cap), b = max(min(offsets[c + 1], cap), a);
    uint32_t lo = a, hi = b;  // first id >= start
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (perm[mid] < start) lo = mid + 1;
        else hi = mid;
    }
    float* s = sums + half * sums_half + ((size_t)row * C + c) * D + d;
    const T* x = kv + half * kv_half + (size_t)row * cap * D + d;
    float acc = *s;
    for (uint32_t i = lo; i < b; ++i) {
        const uint32_t id = perm[i];
        if (id < cap) acc += to_f32(x[(size_t)id * D]);
    }
    *s = acc;
}

// means = sums / n_c, n_c the length of partition c's list (0 for an empty one). means, sums:
// [2, rows, C, D].
template <typename T>
__device__ __forceinline__ void summary_means_impl(T* __restrict__ means, const float* __restrict__ sums,
                                                   const uint32_t* __restrict__ dir, uint32_t C,
                                                   uint32_t cap, uint32_t D, uint32_t rows) {
    const uint32_t c = blockIdx.x, row = blockIdx.y, half = blockIdx.z, d = threadIdx.x;
    if (d >= D) return;
    const uint32_t* offsets = dir + (size_t)row * (C + 1 + cap);
    const uint32_t a = min(offsets[c], cap), b = min(offsets[c + 1], cap);
    const uint32_t n = b > a ? b - a : 0;
    const size_t i = (((size_t)half * rows + row) * C + c) * D + d;
    means[i] = from_f32<T>(n > 0 ? sums[i] / (float)n : 0.f);
}

#define SAAP_SUMMARY(TN, T)                                                                          \
    extern "C" __global__ void saap_summary_sums_##TN(float* sums, const T* kv, const uint32_t* dir, \
                                                      ItemTable ranges, uint32_t n_heads,            \
                                                      uint32_t C, uint32_t cap, uint32_t D,          \
                                                      size_t sums_half, size_t kv_half) {            \
        summary_sums_impl<T>(sums, kv, dir, ranges, n_heads, C, cap, D, sums_half, kv_half);         \
    }                                                                                                \
    extern "C" __global__ void saap_summary_means_##TN(T* means, const float* sums,                 \
                                                       const uint32_t* dir, uint32_t C,              \
                                                       uint32_t cap, uint32_t D, uint32_t rows) {    \
        summary_means_impl<T>(means, sums, dir, C, cap, D, rows);                                    \
    }

SAAP_SUMMARY(f32, float)
SAAP_SUMMARY(bf16, __nv_bfloat16)
SAAP_SUMMARY(f16, __half)
