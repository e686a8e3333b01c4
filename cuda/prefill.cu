// Causal prefill attention on tensor cores, one semantics with the CPU path of
// `crate::attend::prefill` (src/attend/prefill.rs): for batch item b, query t of the chunk (at
// position start_b + t) attends to cache rows 0..=start_b + t with an exact softmax.
//
// FlashAttention-2's algorithm (Dao, 2023), our tiles: a block owns BR = 16·WARPS query rows of
// one (batch item, KV head) and streams that head's cache in tiles of BC keys through shared
// memory; each warp keeps 16 rows' running max, sum and output in registers (online softmax) and
// computes S = Q·Kᵀ and O += P·V with `mma.sync.m16n8k16` (bf16/f16 in, f32 accumulate). P is
// rounded to the input type before P·V, as FlashAttention does.
//
// GQA: the G query heads of a group share the block: row r of the (batch item, KV head) is query
// t = r / G of head h·G + r % G, so each K/V tile loaded serves all G heads. Tiles above the
// diagonal are never loaded; only tiles crossing it are masked. Blocks are issued heaviest
// (latest queries) first, so the causal tail does not leave SMs idle at the end.
#include "mma.cuh"

// q: [B, Hq, T_len, D] rotated queries; k, v: [B, Hkv, cap, D] caches; out: [B, Hq, T_len, D],
// written for t < len only (the caller zeroes the rest). table.a[b] = start (cached tokens before
// the chunk), table.b[b] = len (valid queries of the chunk). Grid: (row tiles, Hkv, B).
template <typename T, int D, int WARPS>
__device__ __forceinline__ void prefill_impl(T* __restrict__ out, const T* __restrict__ q,
                                             const T* __restrict__ k, const T* __restrict__ v,
                                             const ItemTable& table, uint32_t Hq, uint32_t Hkv,
                                             uint32_t T_len, uint32_t cap, float scale_log2) {
    constexpr int THREADS = 32 * WARPS, BR = 16 * WARPS, STRIDE = D + 8;
    constexpr int NT = MMA_TILE / 8;  // n-tiles of S per warp
    constexpr int KD = D / 16;          // k-steps of Q·Kᵀ
    constexpr int ND = D / 8;           // n-tiles of O
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* k_tile = reinterpret_cast<T*>(smem_raw);
    T* v_tile = k_tile + MMA_TILE * STRIDE;

    const uint32_t b = blockIdx.z, h = blockIdx.y;
    const uint32_t start = table.a[b], len = table.b[b];
    const uint32_t G = Hq / Hkv;
    const uint32_t rows = len * G;
    const uint32_t tile_row = gridDim.x - 1 - blockIdx.x;  // heaviest first
    const uint32_t row0 = tile_row * BR;
    if (row0 >= rows) return;
    const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint32_t gid = lane >> 2, tig = lane & 3;

    // The two rows this thread holds (gid and gid + 8 of the warp's 16); rows past the chunk
    // compute a copy of its last query and are not stored.
    uint32_t t_of[2], head_of[2];
    bool store[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint32_t r = row0 + warp * 16 + gid + 8 * i;
        store[i] = r < rows;
        const uint32_t rc = store[i] ? r : rows - 1;
        t_of[i] = rc / G;
        head_of[i] = h * G + rc % G;
    }
    uint32_t qa[KD][4];
    load_a_fragments<T, D>(qa, q + (((size_t)b * Hq + head_of[0]) * T_len + t_of[0]) * D,
                           q + (((size_t)b * Hq + head_of[1]) * T_len + t_of[1]) * D);

    const uint32_t t_first = row0 / G;
    const uint32_t t_last = min((row0 + BR - 1) / G, len - 1);
    const uint32_t n_keys = start + t_last + 1;  // keys the block's last query sees
    const uint32_t n_tiles = (n_keys + MMA_TILE - 1) / MMA_TILE;
    const T* k_head = k + ((size_t)b * Hkv + h) * cap * D;
    const T* v_head = v + ((size_t)b * Hkv + h) * cap * D;

    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const uint32_t pos[2] = {start + t_of[0], start + t_of[1]};

    load_tile<T, D, THREADS>(k_tile, k_head, 0, n_keys);
    cp_async_commit();
    for (uint32_t j = 0; j < n_tiles; ++j) {
        const uint32_t key0 = j * MMA_TILE;
        load_tile<T, D, THREADS>(v_tile, v_head, key0, n_keys);
        cp_async_commit();
        cp_async_wait<1>();  // K tile j
        __syncthreads();

        float s[NT][4];
        tile_scores<T, D>(s, qa, k_tile);
        __syncthreads();  // every warp is done with the K tile
        if (j + 1 < n_tiles) load_tile<T, D, THREADS>(k_tile, k_head, key0 + MMA_TILE, n_keys);
        cp_async_commit();

        // Online softmax in base 2; mask only the tiles that cross the diagonal.
        const bool diagonal = key0 + MMA_TILE - 1 > start + t_first;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float tile_max = -INFINITY;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x = s[n][2 * i + e] * scale_log2;
                    if (diagonal && key0 + n * 8 + tig * 2 + e > pos[i]) x = -INFINITY;
                    s[n][2 * i + e] = x;
                    tile_max = fmaxf(tile_max, x);
                }
            }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float m_new = fmaxf(m[i], tile_max);
            // A row has seen key 0 after the first tile, so m_new is finite from then on; the
            // guard keeps -inf - -inf out of exp2 before that.
            const float base = m_new == -INFINITY ? 0.f : m_new;
            const float correction = exp2f(m[i] - base);
            m[i] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2f(s[n][2 * i + e] - base);
                    s[n][2 * i + e] = p;
                    sum += p;
                }
            }
            l[i] = l[i] * correction + sum;
#pragma unroll
            for (int n = 0; n < ND; ++n) {
                o[n][2 * i] *= correction;
                o[n][2 * i + 1] *= correction;
            }
        }

        cp_async_wait<1>();  // V tile j
        __syncthreads();
#pragma unroll
        for (int kc = 0; kc < MMA_TILE / 16; ++kc) {
            const uint32_t pa[4] = {Mma<T>::pack(s[2 * kc][0], s[2 * kc][1]),
                                    Mma<T>::pack(s[2 * kc][2], s[2 * kc][3]),
                                    Mma<T>::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                    Mma<T>::pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
            for (int n = 0; n < ND; n += 2) {
                // Matrices: (keys kc·16.., d n·8), (keys +8), (d (n + 1)·8), (keys +8, d (n + 1)·8).
                const uint32_t mat = lane >> 3, r = lane & 7;
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, v_tile + (kc * 16 + (mat & 1) * 8 + r) * STRIDE + (n + (mat >> 1)) * 8);
                Mma<T>::run(o[n], pa, vb[0], vb[1]);
                Mma<T>::run(o[n + 1], pa, vb[2], vb[3]);
            }
        }
        __syncthreads();  // every warp is done with the V tile
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float sum = l[i];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (!store[i]) continue;
        const float inv = 1.f / sum;
        T* orow = out + (((size_t)b * Hq + head_of[i]) * T_len + t_of[i]) * D;
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            *reinterpret_cast<uint32_t*>(orow + n * 8 + tig * 2) =
                Mma<T>::pack(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
        }
    }
}

#define SAAP_PREFILL(NAME, T, D, WARPS)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                     \
        NAME(T* out, const T* q, const T* k, const T* v, ItemTable table, uint32_t Hq,            \
             uint32_t Hkv, uint32_t T_len, uint32_t cap, float scale_log2) {                      \
        prefill_impl<T, D, WARPS>(out, q, k, v, table, Hq, Hkv, T_len, cap, scale_log2);          \
    }

SAAP_PREFILL(saap_prefill_bf16_d64_w4, __nv_bfloat16, 64, 4)
SAAP_PREFILL(saap_prefill_bf16_d128_w4, __nv_bfloat16, 128, 4)
SAAP_PREFILL(saap_prefill_f16_d64_w4, __half, 64, 4)
SAAP_PREFILL(saap_prefill_f16_d128_w4, __half, 128, 4)
SAAP_PREFILL(saap_prefill_bf16_d64_w8, __nv_bfloat16, 64, 8)
SAAP_PREFILL(saap_prefill_bf16_d128_w8, __nv_bfloat16, 128, 8)
SAAP_PREFILL(saap_prefill_f16_d64_w8, __half, 64, 8)
SAAP_PREFILL(saap_prefill_f16_d128_w8, __half, 128, 8)
