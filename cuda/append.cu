// Cache append, one semantics with the CPU path of `SaapAttention::append` (src/attention.rs):
// RoPE of new queries and keys with the rows written where they belong (`saap_rope_write_*`), and
// the nearest centroid of each new pre-RoPE key (`saap_assign_*`). They replace a dozen candle
// launches and two host-to-device table copies per decode step, and the host's f64 RoPE tables
// that dominated a long `extend`.
#include "mma.cuh"

// RoPE inverse frequencies, f64 as the host computes them, passed by value: head dim <= 256.
#define ROPE_MAX_HALF 128
struct RopeFreqs {
    double f[ROPE_MAX_HALF];
};

// Rotation of a row: none (a plain copy, for values), interleaved pairs (2i, 2i + 1), or NEOX
// halves (i, i + D/2).
#define ROTATE_NONE 0
#define ROTATE_INTERLEAVED 1
#define ROTATE_NEOX 2

// src: [items, H, T, D]; dst: [items, H, dst_rows, D]. Grid: (T, H, items), or (T, 2H, items)
// with `src_v`: blocks y >= H copy the values src_v (unrotated) into dst + v_offset, the V cache
// beside the K cache (one launch appends both). Block: D/2 threads, one rotation pair each. Item b writes its rows t < table.b[b] at dst row table.a[b] + t
// (`at_position`, a cache) or t (a fresh tensor), rotated to position table.a[b] + t.
// cos and sin: the f64 angle's cosine and sine times `mscale`, rounded to f32 then to T (the
// host's tables); every product and sum rounded to T, as candle's CPU rope computes in T.
template <typename T>
__device__ __forceinline__ void rope_write_impl(T* __restrict__ dst, const T* __restrict__ src,
                                                const T* __restrict__ src_v, size_t v_offset,
                                                const RopeFreqs& freqs, const ItemTable& table,
                                                const uint32_t* __restrict__ advance,
                                                uint32_t H, uint32_t T_len, uint32_t D,
                                                uint32_t dst_rows, uint32_t rotation,
                                                uint32_t at_position, double mscale) {
    const uint32_t t = blockIdx.x, b = blockIdx.z, i = threadIdx.x;
    uint32_t h = blockIdx.y;
    if (h >= H) {
        h -= H;
        src = src_v;
        dst += v_offset;
        rotation = ROTATE_NONE;
    }
    const uint32_t half = D / 2;
    if (t >= table.b[b] || i >= half) return;
    const uint32_t pos = table.a[b] + replayed_steps(advance, b) + t;
    // A replayed step past the rows reserved for it writes nothing (the host plans within them).
    if (at_position && pos >= dst_rows) return;
    const T* x = src + (((size_t)b * H + h) * T_len + t) * D;
    T* y = dst + (((size_t)b * H + h) * dst_rows + (at_position ? pos : t)) * D;
    const uint32_t i1 = rotation == ROTATE_INTERLEAVED ? 2 * i : i;
    const uint32_t i2 = rotation == ROTATE_INTERLEAVED ? 2 * i + 1 : i + half;
    if (rotation == ROTATE_NONE) {
        y[i1] = x[i1];
        y[i2] = x[i2];
        return;
    }
    double s, c;
    sincos((double)pos * freqs.f[i], &s, &c);
    const float cf = to_f32(from_f32<T>((float)(c * mscale)));
    const float sf = to_f32(from_f32<T>((float)(s * mscale)));
    const float x1 = to_f32(x[i1]), x2 = to_f32(x[i2]);
    // Explicit _rn operations: no FMA contraction, each result rounded to T like the CPU's.
    const auto r = [](float v) { return to_f32(from_f32<T>(v)); };
    y[i1] = from_f32<T>(__fsub_rn(r(__fmul_rn(x1, cf)), r(__fmul_rn(x2, sf))));
    y[i2] = from_f32<T>(__fadd_rn(r(__fmul_rn(x1, sf)), r(__fmul_rn(x2, cf))));
}

#define SAAP_ROPE_WRITE(NAME, T)                                                                  \
    extern "C" __global__ void NAME(T* dst, const T* src, const T* src_v, size_t v_offset,      \
                                    RopeFreqs freqs, ItemTable table, const uint32_t* advance,    \
                                    uint32_t H, uint32_t T_len, uint32_t D, uint32_t dst_rows,    \
                                    uint32_t rotation, uint32_t at_position, double mscale) {     \
        rope_write_impl<T>(dst, src, src_v, v_offset, freqs, table, advance, H, T_len, D,         \
                           dst_rows, rotation, at_position, mscale);                              \
    }

SAAP_ROPE_WRITE(saap_rope_write_f32, float)
SAAP_ROPE_WRITE(saap_rope_write_bf16, __nv_bfloat16)
SAAP_ROPE_WRITE(saap_rope_write_f16, __half)

// One decode step replayed: every item's count of replayed steps moves on by one (the step's last
// launch, after every kernel that read the count).
extern "C" __global__ void saap_advance(uint32_t* advance, uint32_t items) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < items) advance[i] += 1;
}

// ---------------------------------------------------------------------------------------------
// Nearest centroid: label = argmax_c (k·c - |c|²/2), ties to the lower index, f32 arithmetic.
//
// A block scores ASSIGN_KEYS keys against `slices_per_block` consecutive slices of ASSIGN_SLICE
// centroids. A long `extend` has tiles enough to fill the GPU, so one block takes every slice
// (keys loaded once, one atomic per key); a decode token's single tile is spread over blocks of
// one slice each, so that its 4 MB of centroids are read by many SMs. Each block folds its best
// (score, centroid) per key into a u64 by atomicMax (order-preserving score bits high, inverted
// index low: higher score, then lower index, wins); the tile's last block (a per-tile counter)
// turns the u64s into labels and zeroes both, so the scratch and the counters stay zero between
// launches.
#define ASSIGN_THREADS 256
#define ASSIGN_KEYS 16
#define ASSIGN_SLICE 64
// Threads per centroid: each sums one quarter of the dimensions.
#define ASSIGN_PARTS (ASSIGN_THREADS / ASSIGN_SLICE)

__device__ __forceinline__ unsigned long long pack_score(float s, uint32_t c) {
    const uint32_t u = __float_as_uint(s);
    const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)ordered << 32) | (0xffffffffu - c);
}

// keys: [items, H, T, D] pre-RoPE; centroids_t: [H, D, C] f32; half_norms: [H, C] f32;
// labels: [items, H, cap]; scratch: items * H * T u64 (zero); counters: items * H * tiles u32
// (zero). Grid: (tiles = ceil(T / ASSIGN_KEYS), ceil(C / (ASSIGN_SLICE * slices_per_block)),
// items * H). Dynamic shared memory: ASSIGN_KEYS * D floats (keys) + ASSIGN_PARTS * ASSIGN_KEYS *
// ASSIGN_SLICE floats (partial dots). Item b labels its keys t < table.b[b] at
// labels[b, h, table.a[b] + t].
template <typename T>
__device__ __forceinline__ void assign_impl(uint32_t* __restrict__ labels, const T* __restrict__ keys,
                                            const float* __restrict__ centroids_t,
                                            const float* __restrict__ half_norms,
                                            unsigned long long* scratch, uint32_t* counters,
                                            const ItemTable& table,
                                            const uint32_t* __restrict__ advance, uint32_t H,
                                            uint32_t T_len, uint32_t D, uint32_t C, uint32_t cap,
                                            uint32_t slices_per_block) {
    extern __shared__ __align__(16) float smem[];
    // Keys dimension-major, [D][ASSIGN_KEYS]: the 16 keys' values of one dimension are four
    // 16-byte broadcast loads (one load per FMA made the kernel shared-memory bound).
    float* xs = smem;
    float* partial = smem + ASSIGN_KEYS * D;   // [ASSIGN_PARTS][ASSIGN_KEYS][ASSIGN_SLICE]
    __shared__ bool last;
    const uint32_t tile = blockIdx.x, row = blockIdx.z, b = row / H, h = row % H;
    const uint32_t tid = threadIdx.x, len = table.b[b], t0 = tile * ASSIGN_KEYS;
    if (t0 >= len) return;  // the whole tile: every slice of it returns here
    const uint32_t n = min((uint32_t)ASSIGN_KEYS, len - t0);
    for (uint32_t j = tid; j < ASSIGN_KEYS * D; j += blockDim.x) {
        const uint32_t k = j / D, d = j % D;
        xs[d * ASSIGN_KEYS + k] = k < n ? to_f32(keys[(((size_t)b * H + h) * T_len + t0 + k) * D + d]) : 0.f;
    }
    __syncthreads();
    // Partial dots: thread (part, c_local) sums dimensions [part * D/4, (part + 1) * D/4) of
    // centroid c0 + c_local for every key; a warp reads 32 consecutive centroids per dimension.
    // Scoring: thread (key, lane16) keeps its best over centroids lane16 + 16 j of every slice.
    const uint32_t c_local = tid % ASSIGN_SLICE, part = tid / ASSIGN_SLICE, quarter = D / ASSIGN_PARTS;
    const uint32_t k = tid / 16, lane16 = tid % 16;
    float best = -INFINITY;
    uint32_t best_c = 0xffffffffu;
    const uint32_t first = blockIdx.y * slices_per_block * ASSIGN_SLICE;
    const uint32_t end = min(C, first + slices_per_block * ASSIGN_SLICE);
    for (uint32_t c0 = first; c0 < end; c0 += ASSIGN_SLICE) {
        const uint32_t c = c0 + c_local;
        float acc[ASSIGN_KEYS];
#pragma unroll
        for (int i = 0; i < ASSIGN_KEYS; ++i) acc[i] = 0.f;
        if (c < C) {
            const float* w = centroids_t + ((size_t)h * D + part * quarter) * C + c;
            // All of a quarter's loads in flight at once: a decode token's few blocks are
            // latency-bound on them.
#pragma unroll 32
            for (uint32_t d = 0; d < quarter; ++d) {
                const float wd = __ldg(w + (size_t)d * C);
                const float4* x = reinterpret_cast<const float4*>(xs + (part * quarter + d) * ASSIGN_KEYS);
#pragma unroll
                for (int k4 = 0; k4 < ASSIGN_KEYS / 4; ++k4) {
                    const float4 v = x[k4];
                    acc[4 * k4] = fmaf(v.x, wd, acc[4 * k4]);
                    acc[4 * k4 + 1] = fmaf(v.y, wd, acc[4 * k4 + 1]);
                    acc[4 * k4 + 2] = fmaf(v.z, wd, acc[4 * k4 + 2]);
                    acc[4 * k4 + 3] = fmaf(v.w, wd, acc[4 * k4 + 3]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < ASSIGN_KEYS; ++i)
            partial[(part * ASSIGN_KEYS + i) * ASSIGN_SLICE + c_local] = acc[i];
        __syncthreads();
        for (uint32_t j = lane16; j < ASSIGN_SLICE && c0 + j < C; j += 16) {
            float dot = 0.f;
#pragma unroll
            for (int p = 0; p < ASSIGN_PARTS; ++p)
                dot += partial[(p * ASSIGN_KEYS + k) * ASSIGN_SLICE + j];
            const float score = dot - half_norms[(size_t)h * C + c0 + j];
            // Centroids arrive in increasing order: strict > keeps the lower index on ties.
            if (score > best || best_c == 0xffffffffu) {
                best = score;
                best_c = c0 + j;
            }
        }
        __syncthreads();  // partial is rewritten by the next slice
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, best, o, 16);
        const uint32_t other_c = __shfl_xor_sync(0xffffffffu, best_c, o, 16);
        if (other_c != 0xffffffffu &&
            (best_c == 0xffffffffu || other > best || (other == best && other_c < best_c))) {
            best = other;
            best_c = other_c;
        }
    }
    const size_t key0 = ((size_t)b * H + h) * T_len + t0;
    if (lane16 == 0 && k < n && best_c != 0xffffffffu)
        atomicMax(scratch + key0 + k, pack_score(best, best_c));
    __threadfence();
    __syncthreads();
    uint32_t* counter = counters + (size_t)row * gridDim.x + tile;
    if (tid == 0) last = atomicAdd(counter, 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (tid < n) {
        const unsigned long long packed = atomicExch(scratch + key0 + tid, 0ull);
        const uint32_t at = table.a[b] + replayed_steps(advance, b) + t0 + tid;
        if (at < cap) labels[((size_t)b * H + h) * cap + at] = 0xffffffffu - (uint32_t)(packed & 0xffffffffu);
    }
    if (tid == 0) *counter = 0;
}

#define SAAP_ASSIGN(NAME, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(ASSIGN_THREADS)                                   \
        NAME(uint32_t* labels, const T* keys, const float* centroids_t, const float* half_norms,  \
             unsigned long long* scratch, uint32_t* counters, ItemTable table,                    \
             const uint32_t* advance, uint32_t H, uint32_t T_len, uint32_t D, uint32_t C,          \
             uint32_t cap, uint32_t slices_per_block) {                                            \
        assign_impl<T>(labels, keys, centroids_t, half_norms, scratch, counters, table, advance,  \
                       H, T_len, D, C, cap, slices_per_block);                                     \
    }

SAAP_ASSIGN(saap_assign_f32, float)
SAAP_ASSIGN(saap_assign_bf16, __nv_bfloat16)
SAAP_ASSIGN(saap_assign_f16, __half)

// ---------------------------------------------------------------------------------------------
// Nearest centroid of a prompt's keys on tensor cores (`saap_assign_mma_*`): the same rule,
// label = argmax_c (k·c - |c|²/2), ties to the lower index, but k·c is an mma of the bf16/f16 key
// with the centroid rounded to the key's type (f32 accumulation); the half norms stay those of the
// f32 centroids. Near-ties may therefore pick another centroid than the f32 kernel above: the
// parity test compares the inertia Σ|k - c|², not the labels bit for bit.
//
// A block labels 16·WARPS keys of one (item, head), held as A fragments, and streams the
// centroids ([H, C, D] in T) through two shared-memory tiles of MMA_TILE rows (the next tile
// loads while this one is scored). Grid: (ceil(T / (16·WARPS)), 1, items · H).
#define ASSIGN_MMA_WARPS 4
template <typename T, int D>
__device__ __forceinline__ void assign_mma_impl(uint32_t* __restrict__ labels, const T* __restrict__ keys,
                                                const T* __restrict__ centroids,
                                                const float* __restrict__ half_norms,
                                                const ItemTable& table, uint32_t H, uint32_t T_len,
                                                uint32_t C, uint32_t cap) {
    constexpr int THREADS = 32 * ASSIGN_MMA_WARPS, STRIDE = D + 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* tiles = reinterpret_cast<T*>(smem_raw);  // two tiles of MMA_TILE rows
    const uint32_t row = blockIdx.z, b = row / H, h = row % H, len = table.b[b];
    const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const uint32_t t0 = blockIdx.x * 16 * ASSIGN_MMA_WARPS + warp * 16;
    if (blockIdx.x * 16 * ASSIGN_MMA_WARPS >= len) return;
    // Rows past the item's keys score a copy of its last key and are not stored.
    const uint32_t t_of[2] = {min(t0 + gid, len - 1), min(t0 + gid + 8, len - 1)};
    const T* key_rows = keys + ((size_t)b * H + h) * T_len * D;
    uint32_t a[D / 16][4];
    load_a_fragments<T, D>(a, key_rows + (size_t)t_of[0] * D, key_rows + (size_t)t_of[1] * D);
    const T* head_centroids = centroids + (size_t)h * C * D;
    const float* norms = half_norms + (size_t)h * C;
    float best[2] = {-INFINITY, -INFINITY};
    uint32_t best_c[2] = {0xffffffffu, 0xffffffffu};
    const uint32_t n_tiles = (C + MMA_TILE - 1) / MMA_TILE;
    load_tile<T, D, THREADS>(tiles, head_centroids, 0, C);
    cp_async_commit();
    for (uint32_t j = 0; j < n_tiles; ++j) {
        if (j + 1 < n_tiles) load_tile<T, D, THREADS>(tiles + ((j + 1) & 1) * MMA_TILE * STRIDE, head_centroids,
                                      (j + 1) * MMA_TILE, C);
        cp_async_commit();
        cp_async_wait<1>();  // tile j
        __syncthreads();
        float s[MMA_TILE / 8][4];
        tile_scores<T, D>(s, a, tiles + (j & 1) * MMA_TILE * STRIDE);
#pragma unroll
        for (int n = 0; n < MMA_TILE / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t c = j * MMA_TILE + n * 8 + tig * 2 + (e & 1);
                if (c >= C) continue;
                const float score = s[n][e] - __ldg(norms + c);
                // Each thread meets its centroids in increasing order: strict > keeps the lower.
                if (score > best[e >> 1] || best_c[e >> 1] == 0xffffffffu) {
                    best[e >> 1] = score;
                    best_c[e >> 1] = c;
                }
            }
        }
        __syncthreads();  // tile j is overwritten by the load of tile j + 2
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            const float other = __shfl_xor_sync(0xffffffffu, best[i], o);
            const uint32_t other_c = __shfl_xor_sync(0xffffffffu, best_c[i], o);
            if (other > best[i] || (other == best[i] && other_c < best_c[i])) {
                best[i] = other;
                best_c[i] = other_c;
            }
        }
        const uint32_t t = t0 + gid + 8 * i;
        if (tig == 0 && t < len) labels[((size_t)b * H + h) * cap + table.a[b] + t] = best_c[i];
    }
}

#define SAAP_ASSIGN_MMA(NAME, T, D)                                                                \
    extern "C" __global__ void __launch_bounds__(32 * ASSIGN_MMA_WARPS)                            \
        NAME(uint32_t* labels, const T* keys, const T* centroids, const float* half_norms,        \
             ItemTable table, uint32_t H, uint32_t T_len, uint32_t C, uint32_t cap) {             \
        assign_mma_impl<T, D>(labels, keys, centroids, half_norms, table, H, T_len, C, cap);      \
    }

SAAP_ASSIGN_MMA(saap_assign_mma_bf16_d64, __nv_bfloat16, 64)
SAAP_ASSIGN_MMA(saap_assign_mma_bf16_d128, __nv_bfloat16, 128)
SAAP_ASSIGN_MMA(saap_assign_mma_f16_d64, __half, 64)
SAAP_ASSIGN_MMA(saap_assign_mma_f16_d128, __half, 128)
