// Split-KV decode attention over id lists (sparse: sinks ∪ probed partitions ∪ window; dense:
// every position), one semantics with `DecodeOp` in src/attend/decode.rs.
//
// Grid: (splits, rows) with row = item * Hkv + kv_head. Each block rebuilds its row's key list
// from the probes and the directory (a bitmap of the G query heads' union, its members ranked by
// popcounts, a scan of their list sizes), takes one contiguous slice of that list, and serves all
// G query heads of the group from one read of each K and V row. Inside a block, groups of LPK
// lanes each own one key at a time (16-byte loads, LPK * 16 bytes = one row) and keep their own
// online softmax; the groups are merged at the end (shuffles within a warp, then shared memory)
// and the block writes one partial (max, sum, out[G][D]). `saap_decode_combine_*` merges the
// splits by log-sum-exp; in the `fused` variants the last block of a row to finish does (a per-row
// counter, reset by that block): one launch, but more registers, and slower on whole steps.
// With partition means (kmean/vmean non-null, sparse only) the list ends with one pseudo-key per
// partition the union leaves unread and that holds keys: its mean key and value, the logit
// raised by log2(n_c) (id cap + c in the key list).
// Partitions are a directory's (offsets, perm) or, in the `pages` kernels, pages of `page`
// consecutive positions from `sinks` to the item's indexed end (Quest's pages; no directory).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"
#include "top.cuh"

#define THREADS 256
// Ids materialized in shared memory per pass over a block's slice.
#define IDS_CAP 2048
#define NO_KEY 0xffffffffu

template <typename T> struct Elem;

template <> struct Elem<float> {
    static constexpr int VEC = 4;
    __device__ static void widen(const uint4& r, float* f) {
        f[0] = __uint_as_float(r.x);
        f[1] = __uint_as_float(r.y);
        f[2] = __uint_as_float(r.z);
        f[3] = __uint_as_float(r.w);
    }
    __device__ static float narrow(float x) { return x; }
};

template <> struct Elem<__nv_bfloat16> {
    static constexpr int VEC = 8;
    // bf16 is the high half of an f32: widening is a shift, exact.
    __device__ static void widen(const uint4& r, float* f) {
        const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
    __device__ static __nv_bfloat16 narrow(float x) { return __float2bfloat16(x); }
};

template <> struct Elem<__half> {
    static constexpr int VEC = 8;
    __device__ static void widen(const uint4& r, float* f) {
        const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            __half2 h;
            memcpy(&h, &w[i], sizeof(h));
            const float2 x = __half22float2(h);
            f[2 * i] = x.x;
            f[2 * i + 1] = x.y;
        }
    }
    __device__ static __half narrow(float x) { return __float2half(x); }
};

// Log-sum-exp merge of one row's splits by the block that finished last: G * D outputs, the
// splits' (max, sum) pairs staged in shared memory `ml` (2 * G * n_splits floats) first so the
// loop over splits issues independent loads. Partials are read through L2 (__ldcg): other blocks
// wrote them during this launch.
template <typename T, int D>
__device__ __forceinline__ void merge_splits(const float* __restrict__ part_o,
                                             const float* __restrict__ part_ml, T* __restrict__ out,
                                             float* ml, uint32_t hq, uint32_t hkv) {
    // Recomputed here rather than kept live through the attention loop (registers).
    const uint32_t n_splits = gridDim.x, row = blockIdx.y, G = hq / hkv;
    const uint32_t item = row / hkv, head = row % hkv;
    const uint32_t tid = threadIdx.x, n = G * n_splits;
    const size_t base = (size_t)row * n_splits * G;  // partial index of (split 0, head 0)
    for (uint32_t i = tid; i < n; i += blockDim.x) {
        ml[i] = __ldcg(part_ml + (base + i) * 2);
        ml[n + i] = __ldcg(part_ml + (base + i) * 2 + 1);
    }
    __syncthreads();
    for (uint32_t x = tid; x < G * D; x += blockDim.x) {
        const uint32_t g = x / D, d = x % D;
        float M = -INFINITY;
        for (uint32_t s = 0; s < n_splits; ++s) M = fmaxf(M, ml[s * G + g]);
        float L = 0.f, o = 0.f;
        if (M != -INFINITY) {
            // Empty splits have max -inf (weight 0) and a zero output.
#pragma unroll 8
            for (uint32_t s = 0; s < n_splits; ++s) {
                const float w = exp2f(ml[s * G + g] - M);
                L = fmaf(w, ml[n + s * G + g], L);
                o = fmaf(w, __ldcg(part_o + (base + (size_t)s * G + g) * D + d), o);
            }
        }
        out[((size_t)item * hq + head * G + g) * D + d] = Elem<T>::narrow(L > 0.f ? o / L : 0.f);
    }
}

// Online softmax of the GB query heads `qf` (pre-scaled to log2 units) over the block's ids
// t_begin..t_end of this pass: ids[t] (sparse) or p0 + t (dense; ids null), rows of `krow`, `vrow`
// (this lane's VEC elements). MEANS: the ids are cap + c, rows of partition c's means, each logit
// raised by log2(n_c) (n_c from the directory's offsets). Each group of LPK lanes takes KB rows at
// a time; the trip count is uniform over the block, so every lane reaches the shuffles.
template <typename T, int D, int GB, int KB, bool MEANS>
__device__ __forceinline__ void attend_rows(const uint32_t* ids, uint32_t p0, uint32_t t_begin,
                                            uint32_t t_end, const T* krow, const T* vrow,
                                            const uint32_t* offsets, uint32_t cap,
                                            const float (&qf)[GB][Elem<T>::VEC], float (&m)[GB],
                                            float (&l)[GB], float (&acc)[GB][Elem<T>::VEC]) {
    using E = Elem<T>;
    constexpr int VEC = E::VEC;
    constexpr int LPK = D / VEC;
    constexpr int NG = THREADS / LPK;
    const uint32_t grp = threadIdx.x / LPK;
    for (uint32_t t0 = t_begin; t0 < t_end; t0 += NG * KB) {
        bool ok[KB];
        float raise[KB];
        uint4 kr[KB], vr[KB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
            const uint32_t t = t0 + kk * NG + grp;
            uint32_t id = NO_KEY;
            if (t < t_end) id = ids ? ids[t] : p0 + t;
            ok[kk] = id != NO_KEY;
            raise[kk] = 0.f;
            if (ok[kk]) {
                if constexpr (MEANS) {
                    const uint32_t c = id - cap;
                    raise[kk] = log2f((float)(min(offsets[c + 1], cap) - min(offsets[c], cap)));
                    id = c;
                }
                kr[kk] = __ldg(reinterpret_cast<const uint4*>(krow + (size_t)id * D));
                vr[kk] = __ldg(reinterpret_cast<const uint4*>(vrow + (size_t)id * D));
            } else {
                kr[kk] = make_uint4(0, 0, 0, 0);
                vr[kk] = make_uint4(0, 0, 0, 0);
            }
        }
        float s[KB][GB];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) {
            float kf[VEC];
            E::widen(kr[kk], kf);
#pragma unroll
            for (int g = 0; g < GB; ++g) {
                float x = 0.f;
#pragma unroll
                for (int e = 0; e < VEC; ++e) x = fmaf(qf[g][e], kf[e], x);
                s[kk][g] = x;
            }
        }
#pragma unroll
        for (int o = LPK / 2; o >= 1; o >>= 1) {
#pragma unroll
            for (int kk = 0; kk < KB; ++kk)
#pragma unroll
                for (int g = 0; g < GB; ++g)
                    s[kk][g] += __shfl_xor_sync(0xffffffffu, s[kk][g], o);
        }
        if constexpr (MEANS) {
#pragma unroll
            for (int kk = 0; kk < KB; ++kk)
#pragma unroll
                for (int g = 0; g < GB; ++g) s[kk][g] += raise[kk];
        }
        float vf[KB][VEC];
#pragma unroll
        for (int kk = 0; kk < KB; ++kk) E::widen(vr[kk], vf[kk]);
#pragma unroll
        for (int g = 0; g < GB; ++g) {
            float mx = m[g];
#pragma unroll
            for (int kk = 0; kk < KB; ++kk)
                if (ok[kk]) mx = fmaxf(mx, s[kk][g]);
            if (mx == -INFINITY) continue;
            const float corr = exp2f(m[g] - mx);
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[g][e] *= corr;
#pragma unroll
            for (int kk = 0; kk < KB; ++kk) {
                const float p = ok[kk] ? exp2f(s[kk][g] - mx) : 0.f;
                l[g] += p;
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(p, vf[kk][e], acc[g][e]);
            }
            m[g] = mx;
        }
    }
}

// Exclusive prefix sums of the set bits of words[0..n) into base[0..n), by one warp (all 32
// lanes call it); returns the total to every lane.
__device__ inline uint32_t warp_popc_scan(const uint32_t* words, uint32_t* base, uint32_t n) {
    const uint32_t lane = threadIdx.x % 32;
    uint32_t carry = 0;
    for (uint32_t w0 = 0; w0 < n; w0 += 32) {
        const uint32_t w = w0 + lane;
        const uint32_t own = w < n ? __popc(words[w]) : 0;
        uint32_t incl = own;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= (uint32_t)o) incl += y;
        }
        if (w < n) base[w] = carry + incl - own;
        carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    return carry;
}

// The partition of the k-th set bit (in index order) of words[0..n), given their prefix counts.
__device__ inline uint32_t nth_unread(const uint32_t* words, const uint32_t* base, uint32_t n,
                                      uint32_t k) {
    const uint32_t w = upper_bound(base, n, k) - 1;
    uint32_t bits = words[w];
    for (uint32_t i = base[w]; i < k; ++i) bits &= bits - 1;
    return w * 32 + __ffs(bits) - 1;
}

// Page c's positions [a, b): from sinks + c * page, up to the next page or the indexed end.
__device__ __forceinline__ void page_extent(uint32_t c, uint32_t page, uint32_t sinks,
                                            uint32_t iend, uint32_t& a, uint32_t& b) {
    a = (uint32_t)min((uint64_t)sinks + (uint64_t)page * c, (uint64_t)iend);
    b = (uint32_t)min((uint64_t)a + page, (uint64_t)iend);
}

// Quest's pages as `quest::route` lists them (one list per group, ascending, unused slots
// last) are their own union in index order: only an item's last page can be short and no page
// before it is, so member r starts at sinks' + r * page. The block checks the order and sums the
// pages' sizes, then writes the segments the union path of `decode_impl` would have built (src,
// pos, n_union, total; no bitmap, no ranking, no scan). Returns false, writing nothing, for any
// other list.
__device__ __forceinline__ bool list_pages(const uint32_t* pr, uint32_t n_probe, uint32_t C,
                                           uint32_t page, uint32_t sinks, uint32_t len,
                                           uint32_t iend, uint32_t* src, uint32_t* pos,
                                           uint32_t* n_union, uint32_t* total) {
    __shared__ uint32_t warp_sums[2][THREADS / 32];
    const uint32_t tid = threadIdx.x;
    uint32_t keys = 0, members = 0;
    bool disorder = false;
    for (uint32_t i = tid; i < n_probe; i += THREADS) {
        const uint32_t c = pr[i];
        if (c < C) {
            disorder |= i > 0 && pr[i - 1] >= c;
            uint32_t a, b;
            page_extent(c, page, sinks, iend, a, b);
            keys += b - a;
            ++members;
        }
    }
    keys = __reduce_add_sync(0xffffffffu, keys);
    members = __reduce_add_sync(0xffffffffu, members);
    if (tid % 32 == 0) {
        warp_sums[0][tid / 32] = keys;
        warp_sums[1][tid / 32] = members;
    }
    if (__syncthreads_or(disorder)) return false;
    keys = members = 0;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) {
        keys += warp_sums[0][w];
        members += warp_sums[1][w];
    }
    const uint32_t first = min(sinks, len), window = first + keys;
    for (uint32_t r = tid; r < members; r += THREADS) {
        uint32_t end;
        page_extent(pr[r], page, sinks, iend, src[r], end);
        pos[1 + r] = (uint32_t)min((uint64_t)first + (uint64_t)page * r, (uint64_t)window);
    }
    if (tid == 0) {
        *n_union = members;
        pos[0] = 0;
        pos[members + 1] = window;
        pos[members + 2] = window + (len - iend);
    }
    __syncthreads();
    *total = window + (len - iend);
    return true;
}

// q: [items, Hq, D]; k, v: [items, Hkv, cap, D]; dir: [items, Hkv, C + 1 + cap], or null for
// pages (PAGES) and when dense; probes: [items, Hkv, lists, n_probe] or null (dense): one list
// per query head (lists = G) or one shared by the group (lists = 1: Quest's pages); kmean,
// vmean: [items, Hkv, C, D] or null (no estimate of the unread partitions); part_o: [rows,
// splits, G, D]; part_ml: [rows, splits, G, 2] (max in log2 units, sum). seqs.a = len, seqs.b =
// indexed_end.
// out: [items, Hq, D]; counters: [rows], zero on entry, left zero on exit.
// GB >= G query heads are computed (the extra ones repeat the last head and are not written);
// KB keys per group are loaded at once to keep several 16-byte loads in flight per thread.
template <typename T, int D, int GB, int KB, bool FUSED, bool EST, bool PAGES>
__device__ __forceinline__ void decode_impl(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const uint32_t* __restrict__ dir, const uint32_t* __restrict__ probes,
    const T* __restrict__ kmean, const T* __restrict__ vmean, float* __restrict__ part_o, float* __restrict__ part_ml, T* __restrict__ out,
    uint32_t* __restrict__ counters, const ItemTable& seqs, const uint32_t* __restrict__ advance,
    uint32_t hq, uint32_t hkv, uint32_t cap, uint32_t n_partitions, uint32_t n_probe,
    uint32_t lists, uint32_t page, uint32_t sinks, float scale_log2) {
    using E = Elem<T>;
    constexpr int VEC = E::VEC;
    constexpr int LPK = D / VEC;          // lanes per key row
    static_assert(LPK <= 32 && 32 % LPK == 0, "a key row must fit a warp evenly");
    const uint32_t n_splits = gridDim.x, split = blockIdx.x, row = blockIdx.y;
    const uint32_t item = row / hkv, head = row % hkv, G = hq / hkv;
    // Never past the cache, even if a replay outran the rows planned for it.
    const uint32_t len = min(seqs.a[item] + replayed_steps(advance, item), cap);
    const uint32_t iend = min(seqs.b[item], len);
    const uint32_t tid = threadIdx.x, gl = tid % LPK;
    const uint32_t C = n_partitions;
    const bool sparse = probes != nullptr;
    // Compiled out of the kernels without means (EST false): the means' code cost the keys' loop
    // registers (bf16, D 128, G 4: 128 → 184, one block per SM instead of two).
    const bool estimate = EST && sparse && kmean != nullptr;
    // The block's key list in segments: sinks, the probed partitions in index order, the window,
    // [the unread partitions' means,] then the end. Only the group's union (at most lists·ℓ
    // partitions) gets a segment: the list used to have one per partition (C + 3 entries zeroed,
    // filled and scanned by every block, a quarter of the kernel's warp time at C = 1024).
    const uint32_t n_words = (C + 31) / 32;
    const uint32_t max_union = min(C, lists * n_probe);
    extern __shared__ __align__(16) uint32_t smem[];
    uint32_t* probed = smem;                   // n_words: bit c = partition c is in the union
    uint32_t* probed_base = probed + n_words;  // n_words: union members in the words before
    uint32_t* unread = probed_base + n_words;  // (EST) n_words: unread partitions holding keys
    uint32_t* unread_base = unread + (EST ? n_words : 0);  // (EST) n_words
    uint32_t* src = unread_base + (EST ? n_words : 0);     // max_union: perm start per member
    uint32_t* pos = src + max_union;      // max_union + 4 segment starts
    uint32_t* ids = pos + max_union + 4;  // IDS_CAP key ids of the current pass
    __shared__ uint32_t n_union, n_means;

    const uint32_t* offsets = sparse && !PAGES ? dir + (size_t)row * (C + 1 + cap) : nullptr;
    const uint32_t* perm = sparse && !PAGES ? offsets + C + 1 : nullptr;
    // Partition c's keys: perm[a..b) (pages: positions a..b), clamped to the cache.
    const auto extent = [&](uint32_t c, uint32_t& a, uint32_t& b) {
        if constexpr (PAGES) {
            page_extent(c, page, sinks, iend, a, b);
        } else {
            a = min(offsets[c], cap);
            b = min(offsets[c + 1], cap);
        }
    };
    const uint32_t* pr = sparse ? probes + (size_t)row * lists * n_probe : nullptr;
    uint32_t total = len;
    // Quest's pages as `quest::route` lists them (see `list_pages`) skip the union.
    bool listed = false;
    if constexpr (PAGES)
        listed = sparse && lists == 1 &&
                 list_pages(pr, n_probe, C, page, sinks, len, iend, src, pos, &n_union, &total);
    if (sparse && !listed) {
        for (uint32_t w = tid; w < n_words; w += THREADS) probed[w] = 0;
        __syncthreads();
        for (uint32_t i = tid; i < lists * n_probe; i += THREADS) {
            const uint32_t c = pr[i];
            if (c < C) atomicOr(&probed[c / 32], 1u << (c % 32));
        }
        __syncthreads();
        if (estimate) {
            // A warp's 32 lanes cover one word of partitions: a ballot of those holding keys.
            for (uint32_t c0 = tid - tid % 32; c0 < n_words * 32; c0 += THREADS) {
                const uint32_t c = c0 + tid % 32;
                uint32_t a = 0, b = 0;
                if (c < C) extent(c, a, b);
                const bool keys = b > a;
                const uint32_t word = __ballot_sync(0xffffffffu, keys);
                if (tid % 32 == 0) unread[c0 / 32] = word & ~probed[c0 / 32];
            }
            __syncthreads();
        }
        if (tid < 32) {
            n_union = warp_popc_scan(probed, probed_base, n_words);
            if (estimate) n_means = warp_popc_scan(unread, unread_base, n_words);
        }
        __syncthreads();
        // Each thread ranks the union members of its words: their sizes and perm starts.
        for (uint32_t w = tid; w < n_words; w += THREADS) {
            uint32_t bits = probed[w], r = probed_base[w];
            for (; bits; bits &= bits - 1, ++r) {
                const uint32_t c = w * 32 + __ffs(bits) - 1;
                uint32_t a, b;
                extent(c, a, b);
                src[r] = a;
                pos[1 + r] = b > a ? b - a : 0;
            }
        }
        const uint32_t nu = n_union;
        if (tid == 0) {
            pos[0] = min(sinks, len);
            pos[nu + 1] = len > iend ? len - iend : 0;
            if (estimate) pos[nu + 2] = n_means;
            pos[nu + (estimate ? 3 : 2)] = 0;  // the end
        }
        __syncthreads();
        block_exclusive_scan(pos, nu + (estimate ? 4 : 3));
        total = pos[nu + (estimate ? 3 : 2)];
    }
    const uint32_t chunk = (total + n_splits - 1) / n_splits;
    const uint32_t j0 = min(split * chunk, total), j1 = min(j0 + chunk, total);

    float qf[GB][VEC];
#pragma unroll
    for (int g = 0; g < GB; ++g) {
        const uint32_t h = head * G + min((uint32_t)g, G - 1);
        const uint4 r = *reinterpret_cast<const uint4*>(q + ((size_t)item * hq + h) * D + gl * VEC);
        E::widen(r, qf[g]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) qf[g][e] *= scale_log2;
    }
    float m[GB], l[GB], acc[GB][VEC];
#pragma unroll
    for (int g = 0; g < GB; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][e] = 0.f;
    }
    const T* krow = k + (size_t)row * cap * D + gl * VEC;
    const T* vrow = v + (size_t)row * cap * D + gl * VEC;
    const T* kmrow = estimate ? kmean + (size_t)row * C * D + gl * VEC : nullptr;
    const T* vmrow = estimate ? vmean + (size_t)row * C * D + gl * VEC : nullptr;

    for (uint32_t p0 = j0; p0 < j1; p0 += IDS_CAP) {
        const uint32_t n = min((uint32_t)IDS_CAP, j1 - p0);
        if (sparse) {
            for (uint32_t t = tid; t < n; t += THREADS) {
                const uint32_t j = p0 + t;
                const uint32_t nu = n_union;
                const uint32_t s = upper_bound(pos, nu + (estimate ? 3 : 2), j) - 1;
                uint32_t id;
                if (s == 0) id = j;
                else if (s <= nu) {
                    const uint32_t at = src[s - 1] + (j - pos[s]);
                    id = PAGES ? at : perm[at];
                }
                else if (s == nu + 1) id = iend + (j - pos[nu + 1]);
                else if constexpr (EST) id = cap + nth_unread(unread, unread_base, n_words, j - pos[nu + 2]);
                else id = NO_KEY;
                // A corrupt directory must not send loads outside the cache.
                ids[t] = id < cap || s > nu + 1 ? id : NO_KEY;
            }
            __syncthreads();
        }
        // Keys first, then (estimating) the partitions' means, which end the list: the keys' loop
        // does none of the means' extra work (their counts, the raised logits).
        const uint32_t means_at = estimate ? pos[n_union + 2] : 0;
        const uint32_t n_keys = estimate ? min(n, means_at > p0 ? means_at - p0 : 0u) : n;
        attend_rows<T, D, GB, KB, false>(sparse ? ids : nullptr, p0, 0, n_keys, krow, vrow,
                                         nullptr, cap, qf, m, l, acc);
        if constexpr (EST) {
            if (estimate)
                attend_rows<T, D, GB, KB, true>(ids, p0, n_keys, n, kmrow, vmrow, offsets, cap, qf,
                                               m, l, acc);
        }
        if (sparse) __syncthreads();  // ids[] is rewritten by the next pass
    }

    // Merge the NG groups. Inside a warp its 32 / LPK groups by shuffles (log-sum-exp of pairs),
    // then across the warps through shared memory, each thread producing whole outputs of the
    // block's partial: every thread used to recompute the NG-way maxima and sums of every head
    // and the accumulators went through a tree of NG / 2 rounds with two barriers each (a fifth
    // of the kernel's warp time at 171k, batch 1, ncu).
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < GB; ++g) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float mx = fmaxf(m[g], mo);
            const float a = m[g] == -INFINITY ? 0.f : exp2f(m[g] - mx);
            const float b = mo == -INFINITY ? 0.f : exp2f(mo - mx);
            l[g] = l[g] * a + lo * b;
#pragma unroll
            for (int e = 0; e < VEC; ++e)
                acc[g][e] = acc[g][e] * a + __shfl_xor_sync(0xffffffffu, acc[g][e], o) * b;
            m[g] = mx;
        }
    }
    constexpr int WARPS = THREADS / 32;
    __syncthreads();  // ids[] and segment starts are no longer read
    float* red = reinterpret_cast<float*>(smem);  // WARPS * GB * D accumulators
    float* mls = red + WARPS * GB * D;             // WARPS * GB * (max, sum)
    const uint32_t warp = tid / 32;
    if (tid % 32 < (uint32_t)LPK) {
#pragma unroll
        for (int g = 0; g < GB; ++g) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) red[(warp * GB + g) * D + gl * VEC + e] = acc[g][e];
            if (gl == 0) {
                mls[(warp * GB + g) * 2] = m[g];
                mls[(warp * GB + g) * 2 + 1] = l[g];
            }
        }
    }
    __syncthreads();
    for (uint32_t x = tid; x < G * D; x += THREADS) {
        const uint32_t g = x / D, d = x % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) M = fmaxf(M, mls[(w * GB + g) * 2]);
        float L = 0.f, o = 0.f;
        if (M != -INFINITY) {
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const float mw = mls[(w * GB + g) * 2];
                const float f = mw == -INFINITY ? 0.f : exp2f(mw - M);
                L = fmaf(mls[(w * GB + g) * 2 + 1], f, L);
                o = fmaf(red[(w * GB + g) * D + d], f, o);
            }
        }
        const size_t p = ((size_t)row * n_splits + split) * G + g;
        part_o[p * D + d] = o;
        if (d == 0) {
            part_ml[p * 2] = M;
            part_ml[p * 2 + 1] = L;
        }
    }
    if constexpr (!FUSED) return;  // saap_decode_combine_* merges the splits
    // Publish the partial, then count this block in; the last block of the row merges.
    __shared__ uint32_t is_last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const uint32_t done = atomicAdd(&counters[row], 1u);
        is_last = done == n_splits - 1;
        if (is_last) counters[row] = 0;  // ready for the next launch (stream order)
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    merge_splits<T, D>(part_o, part_ml, out, reinterpret_cast<float*>(smem), hq, hkv);
}

#define SAAP_DECODE(NAME, T, D, GB, KB, FUSED, EST, PAGES)                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                 \
        const T* q, const T* k, const T* v, const uint32_t* dir, const uint32_t* probes,        \
        const T* kmean, const T* vmean, float* part_o, float* part_ml, T* out,                  \
        uint32_t* counters, ItemTable seqs,                                                     \
        const uint32_t* advance, uint32_t hq, uint32_t hkv, uint32_t cap, uint32_t n_partitions, \
        uint32_t n_probe, uint32_t lists, uint32_t page, uint32_t sinks, float scale_log2) {    \
        decode_impl<T, D, GB, KB, FUSED, EST, PAGES>(q, k, v, dir, probes, kmean, vmean, part_o,\
                                              part_ml, out, counters, seqs, advance, hq, hkv,   \
                                              cap, n_partitions, n_probe, lists, page, sinks,   \
                                              scale_log2);                                      \
    }

// Four variants: partials merged by `saap_decode_combine_*` (a second launch), or by the last
// block of each row (`fused`: one launch, but more registers in the kernel); `est`, the first
// with the unread partitions estimated from their means (kmean, vmean); and `pages`, the first
// over pages of positions (no directory), in their own kernels so that the others keep their
// registers and schedule (one kernel for both cost the directory's steps 2–5%, H200).
#define SAAP_DECODE_GROUPS(TN, T, D)                                                \
    SAAP_DECODE(saap_decode_##TN##_d##D##_g1, T, D, 1, 4, false, false, false)       \
    SAAP_DECODE(saap_decode_##TN##_d##D##_g2, T, D, 2, 4, false, false, false)       \
    SAAP_DECODE(saap_decode_##TN##_d##D##_g4, T, D, 4, 4, false, false, false)       \
    SAAP_DECODE(saap_decode_##TN##_d##D##_g8, T, D, 8, 2, false, false, false)       \
    SAAP_DECODE(saap_decode_fused_##TN##_d##D##_g1, T, D, 1, 4, true, false, false)  \
    SAAP_DECODE(saap_decode_fused_##TN##_d##D##_g2, T, D, 2, 4, true, false, false)  \
    SAAP_DECODE(saap_decode_fused_##TN##_d##D##_g4, T, D, 4, 4, true, false, false)  \
    SAAP_DECODE(saap_decode_fused_##TN##_d##D##_g8, T, D, 8, 2, true, false, false)  \
    SAAP_DECODE(saap_decode_est_##TN##_d##D##_g1, T, D, 1, 4, false, true, false)    \
    SAAP_DECODE(saap_decode_est_##TN##_d##D##_g2, T, D, 2, 4, false, true, false)    \
    SAAP_DECODE(saap_decode_est_##TN##_d##D##_g4, T, D, 4, 4, false, true, false)    \
    SAAP_DECODE(saap_decode_est_##TN##_d##D##_g8, T, D, 8, 2, false, true, false)    \
    SAAP_DECODE(saap_decode_pages_##TN##_d##D##_g1, T, D, 1, 4, false, false, true)  \
    SAAP_DECODE(saap_decode_pages_##TN##_d##D##_g2, T, D, 2, 4, false, false, true)  \
    SAAP_DECODE(saap_decode_pages_##TN##_d##D##_g4, T, D, 4, 4, false, false, true)  \
    SAAP_DECODE(saap_decode_pages_##TN##_d##D##_g8, T, D, 8, 2, false, false, true)

SAAP_DECODE_GROUPS(f32, float, 64)
SAAP_DECODE_GROUPS(f32, float, 128)
SAAP_DECODE_GROUPS(bf16, __nv_bfloat16, 64)
SAAP_DECODE_GROUPS(bf16, __nv_bfloat16, 128)
SAAP_DECODE_GROUPS(f16, __half, 64)
SAAP_DECODE_GROUPS(f16, __half, 128)

// Log-sum-exp merge of the splits. Grid: items * Hq blocks of COMBINE_THREADS threads; out:
// [items, Hq, D], D a multiple of 4 dividing 4 * COMBINE_THREADS. Dynamic shared memory:
// 2 * n_splits + (4 * COMBINE_THREADS / D) * (D + 1) floats. Two rounds of loads, each issued at
// once: the splits' (max, sum) pairs, one split per thread; then their outputs, 4 * THREADS / D
// splits side by side with one 16-byte load per thread and split. The previous version (4 lanes
// per dimension, a serial max over the splits) took 8–10 µs per layer at batch 1 (ncu, H200,
// Qwen2.5-0.5B at 120k: 14 heads, 57–128 splits), a tenth of a dense layer's attention.
#define COMBINE_THREADS 256
template <typename T>
__device__ __forceinline__ void combine_impl(const float* __restrict__ part_o,
                                             const float* __restrict__ part_ml, T* __restrict__ out,
                                             uint32_t hq, uint32_t hkv, uint32_t n_splits,
                                             uint32_t D) {
    extern __shared__ float sm[];
    __shared__ float warp_max[COMBINE_THREADS / 32];
    const uint32_t quads = D / 4, side_by_side = COMBINE_THREADS / quads;
    float* weight = sm;                   // [n_splits]: 2^(max_s - M), 0 for an empty split
    float* sum = weight + n_splits;       // [n_splits]
    float* lanes = sum + n_splits;        // [side_by_side][D + 1]: outputs, then the sum
    const uint32_t tid = threadIdx.x;
    const uint32_t item = blockIdx.x / hq, h = blockIdx.x % hq, G = hq / hkv;
    const uint32_t row = item * hkv + h / G, g = h % G;
    const size_t p0 = (size_t)row * n_splits * G + g;
    float mx = -INFINITY;
    for (uint32_t s = tid; s < n_splits; s += COMBINE_THREADS) {
        const float2 p = *reinterpret_cast<const float2*>(part_ml + (p0 + (size_t)s * G) * 2);
        weight[s] = p.x;
        sum[s] = p.y;
        mx = fmaxf(mx, p.x);
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (tid % 32 == 0) warp_max[tid / 32] = mx;
    __syncthreads();
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < COMBINE_THREADS / 32; ++w) M = fmaxf(M, warp_max[w]);
    // Empty splits have max -inf (weight 0) and a zero output; all empty leaves zeros.
    for (uint32_t s = tid; s < n_splits; s += COMBINE_THREADS)
        weight[s] = weight[s] == -INFINITY ? 0.f : exp2f(weight[s] - M);
    __syncthreads();
    const uint32_t side = tid / quads, quad = tid % quads;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    float L = 0.f;
    if (side < side_by_side) {
#pragma unroll 8
        for (uint32_t s = side; s < n_splits; s += side_by_side) {
            const float w = weight[s];
            const float4 x = reinterpret_cast<const float4*>(part_o + (p0 + (size_t)s * G) * D)[quad];
            o.x = fmaf(w, x.x, o.x);
            o.y = fmaf(w, x.y, o.y);
            o.z = fmaf(w, x.z, o.z);
            o.w = fmaf(w, x.w, o.w);
            L = fmaf(w, sum[s], L);
        }
        float* mine = lanes + side * (D + 1);
        mine[4 * quad] = o.x;
        mine[4 * quad + 1] = o.y;
        mine[4 * quad + 2] = o.z;
        mine[4 * quad + 3] = o.w;
        if (quad == 0) mine[D] = L;
    }
    __syncthreads();
    for (uint32_t d = tid; d < D; d += COMBINE_THREADS) {
        float y = 0.f, total = 0.f;
        for (uint32_t j = 0; j < side_by_side; ++j) {
            y += lanes[j * (D + 1) + d];
            total += lanes[j * (D + 1) + D];
        }
        out[(size_t)blockIdx.x * D + d] = Elem<T>::narrow(total > 0.f ? y / total : 0.f);
    }
}

#define SAAP_COMBINE(NAME, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) NAME(                           \
        const float* part_o, const float* part_ml, T* out, uint32_t hq, uint32_t hkv,             \
        uint32_t n_splits, uint32_t d) {                                                          \
        combine_impl<T>(part_o, part_ml, out, hq, hkv, n_splits, d);                              \
    }

SAAP_COMBINE(saap_decode_combine_f32, float)
SAAP_COMBINE(saap_decode_combine_bf16, __nv_bfloat16)
SAAP_COMBINE(saap_decode_combine_f16, __half)

// ---------------------------------------------------------------------------------------------
// Routing of a decode step: the per-query-head classifier MLP (D → H → C, GELU) with weights of
// type W (f32, or bf16 for bf16/f16 ops) widened to f32 and f32 accumulation, then top-ℓ.
// Same arithmetic as `mlp_forward` on f32 weights holding the same values; partitions ordered by
// (score descending, index ascending), the order of the CPU's stable arg_sort.

#define ROUTE_THREADS 256
// Output columns (partitions) per block. Batch items per block (IB) is a template parameter:
// 4 for batches, 1 at batch 1, where 4 wasted three quarters of the multiply-adds of a
// latency-bound kernel (18 us for Llama-3.1-8B's 32 heads, ncu, H200).
#define ROUTE_COLS 128
// Output-layer weight vectors per thread loaded up front (all of them for H = 256, bf16).
#define ROUTE_PREFETCH 16

// The classifier MLP in two kernels: the hidden layer once per (head, IB items), then the
// output layer by blocks of ROUTE_COLS partitions. (One kernel computed the hidden layer in each
// of a head's C / ROUTE_COLS blocks: 15 us for Llama-3.1-8B at batch 1, latency-bound.) Where the
// hidden layer is small (H <= 64, Qwen2.5's indexes), one fused kernel computes it again in every
// output block instead: D * H multiply-adds per block cost less than a second launch in series.
// The three paths compute the same sums in the same order, so their scores are equal.

// The hidden units of a head's IB items (GELU applied) into store(b, h, x), for the b < nb valid
// items. q: [B, Hq, D]; w1: [Hq, D, H]; b1: [Hq, H]. Shared memory: xs, IB * D floats (the
// queries), and red, (ROUTE_THREADS / 32) * IB * 32 * VEC floats (partial sums). Ends after a
// barrier. H * sizeof(W) must be a multiple of 16 (checked by the host).
template <typename W, typename Q, int IB, typename Store>
__device__ __forceinline__ void route_hidden_units(const Q* __restrict__ q,
                                                   const W* __restrict__ w1,
                                                   const W* __restrict__ b1, uint32_t hq,
                                                   uint32_t D, uint32_t H, uint32_t head,
                                                   uint32_t i0, uint32_t nb, float* xs,
                                                   float* red, Store store) {
    using E = Elem<W>;
    constexpr int VEC = E::VEC;
    constexpr int WARPS = ROUTE_THREADS / 32;
    const uint32_t tid = threadIdx.x;
    for (uint32_t i = tid; i < IB * D; i += ROUTE_THREADS) {
        const uint32_t b = i / D;
        xs[i] = b < nb ? to_f32(q[((size_t)(i0 + b) * hq + head) * D + i % D]) : 0.f;
    }
    __syncthreads();
    // Lanes take VEC units each (16-byte loads of a w1 row), the 8 warps split the D rows, so
    // every thread has D / 8 loads in flight; warps' sums meet in shared memory.
    const W* w1h = w1 + (size_t)head * D * H;
    constexpr int HCH = 32 * VEC;  // hidden units per pass
    for (uint32_t hc = 0; hc < H; hc += HCH) {
        const uint32_t u = hc + (tid % 32) * VEC, dg = tid / 32;
        float a[IB][VEC];
#pragma unroll
        for (int b = 0; b < IB; ++b)
#pragma unroll
            for (int e = 0; e < VEC; ++e) a[b][e] = 0.f;
        if (u < H) {
#pragma unroll 8
            for (uint32_t d = dg; d < D; d += WARPS) {
                const uint4 r = __ldg(reinterpret_cast<const uint4*>(w1h + (size_t)d * H + u));
                float w[VEC];
                E::widen(r, w);
#pragma unroll
                for (int b = 0; b < IB; ++b) {
                    const float x = xs[b * D + d];
#pragma unroll
                    for (int e = 0; e < VEC; ++e) a[b][e] = fmaf(x, w[e], a[b][e]);
                }
            }
        }
#pragma unroll
        for (int b = 0; b < IB; ++b)
#pragma unroll
            for (int e = 0; e < VEC; ++e) red[(dg * IB + b) * HCH + (tid % 32) * VEC + e] = a[b][e];
        __syncthreads();
        for (uint32_t i = tid; i < IB * HCH; i += ROUTE_THREADS) {
            const uint32_t b = i / HCH, h = hc + i % HCH;
            if (h >= H) continue;
            float x = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) x += red[(w * IB + b) * HCH + i % HCH];
            x += to_f32(b1[(size_t)head * H + h]);
            if (b < nb) store(b, h, 0.5f * x * (1.f + erff(x * 0.70710678118654752f)));
        }
        __syncthreads();
    }
}

// Hidden layer: hidden: [B, Hq, H] f32. Grid: (Hq, ceil(B / IB)). Dynamic shared memory: IB * D
// + (ROUTE_THREADS / 32) * IB * 32 * VEC floats.
template <typename W, typename Q, int IB>
__device__ __forceinline__ void route_hidden_impl(const Q* __restrict__ q,
                                                  const W* __restrict__ w1,
                                                  const W* __restrict__ b1,
                                                  float* __restrict__ hidden, uint32_t B,
                                                  uint32_t hq, uint32_t D, uint32_t H) {
    extern __shared__ __align__(16) float rs[];
    const uint32_t head = blockIdx.x, i0 = blockIdx.y * IB;
    const uint32_t nb = min((uint32_t)IB, B - i0);
    route_hidden_units<W, Q, IB>(q, w1, b1, hq, D, H, head, i0, nb, rs, rs + IB * D,
                                 [&](uint32_t b, uint32_t h, float x) {
                                     hidden[((size_t)(i0 + b) * hq + head) * H + h] = x;
                                 });
}

// A thread's place in an output-layer block: VEC columns (16-byte loads of w2 rows) of one row
// group; the first ROUTE_PREFETCH of its w2 vectors are loaded on construction, to be in flight
// while the block gathers its hidden units.
template <typename W>
struct RouteOutLane {
    using E = Elem<W>;
    static constexpr int VEC = E::VEC;
    static constexpr int CT = ROUTE_COLS / VEC;  // lanes across the block's columns
    static constexpr int RGW = 32 / CT;          // row groups per warp
    static constexpr int WARPS = ROUTE_THREADS / 32;
    static constexpr int RG = RGW * WARPS;
    uint32_t warp, lane, ct, rg, col;
    const W* w2h;
    uint4 pre[ROUTE_PREFETCH];

    __device__ __forceinline__ RouteOutLane(const W* __restrict__ w2, uint32_t head, uint32_t H,
                                            uint32_t C) {
        const uint32_t tid = threadIdx.x;
        warp = tid / 32;
        lane = tid % 32;
        ct = lane % CT;
        rg = warp * RGW + lane / CT;
        col = blockIdx.x * ROUTE_COLS + ct * VEC;
        w2h = w2 + (size_t)head * H * C + col;
#pragma unroll
        for (int i = 0; i < ROUTE_PREFETCH; ++i) {
            const uint32_t h = rg + i * RG;
            pre[i] = col < C && h < H ? __ldg(reinterpret_cast<const uint4*>(w2h + (size_t)h * C))
                                      : make_uint4(0, 0, 0, 0);
        }
    }

    // Scores of the block's columns for the nb valid of IB items from the hidden units hs
    // ([IB, H] in shared memory, after a barrier); red: WARPS * IB * ROUTE_COLS floats.
    template <int IB>
    __device__ __forceinline__ void finish(const float* hs, float* red, const W* __restrict__ b2,
                                           float* __restrict__ scores, uint32_t hq, uint32_t head,
                                           uint32_t i0, uint32_t nb, uint32_t H, uint32_t C) {
        // Rows in increasing order as before the prefetch, so the sums are the same.
        float acc[IB][VEC];
#pragma unroll
        for (int b = 0; b < IB; ++b)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[b][e] = 0.f;
        const auto accumulate = [&](const uint4& r, uint32_t h) {
            float w[VEC];
            E::widen(r, w);
#pragma unroll
            for (int b = 0; b < IB; ++b) {
                const float x = hs[b * H + h];
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[b][e] = fmaf(x, w[e], acc[b][e]);
            }
        };
        if (col < C) {
#pragma unroll
            for (int i = 0; i < ROUTE_PREFETCH; ++i)
                if (rg + i * RG < H) accumulate(pre[i], rg + i * RG);
#pragma unroll 8
            for (uint32_t h = rg + ROUTE_PREFETCH * RG; h < H; h += RG)
                accumulate(__ldg(reinterpret_cast<const uint4*>(w2h + (size_t)h * C)), h);
        }
#pragma unroll
        for (int o = CT; o < 32; o <<= 1)
#pragma unroll
            for (int b = 0; b < IB; ++b)
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[b][e] += __shfl_xor_sync(0xffffffffu, acc[b][e], o);
        if (lane < (uint32_t)CT) {
#pragma unroll
            for (int b = 0; b < IB; ++b)
#pragma unroll
                for (int e = 0; e < VEC; ++e)
                    red[(warp * IB + b) * ROUTE_COLS + ct * VEC + e] = acc[b][e];
        }
        __syncthreads();
        const uint32_t c0 = blockIdx.x * ROUTE_COLS;
        for (uint32_t i = threadIdx.x; i < IB * ROUTE_COLS; i += ROUTE_THREADS) {
            const uint32_t b = i / ROUTE_COLS, c = c0 + i % ROUTE_COLS;
            if (b >= nb || c >= C) continue;
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) s += red[(w * IB + b) * ROUTE_COLS + i % ROUTE_COLS];
            scores[((size_t)(i0 + b) * hq + head) * C + c] = s + to_f32(b2[(size_t)head * C + c]);
        }
    }
};

// Output layer: hidden: [B, Hq, H] f32; w2: [Hq, H, C]; b2: [Hq, C]; scores: [B, Hq, C].
// Grid: (ceil(C / ROUTE_COLS), Hq, ceil(B / IB)). Dynamic shared memory:
// IB * H + (ROUTE_THREADS / 32) * IB * ROUTE_COLS floats. C * sizeof(W) must be a multiple of 16.
template <typename W, int IB>
__device__ __forceinline__ void route_out_impl(const float* __restrict__ hidden,
                                               const W* __restrict__ w2, const W* __restrict__ b2,
                                               float* __restrict__ scores, uint32_t B,
                                               uint32_t hq, uint32_t H, uint32_t C) {
    extern __shared__ __align__(16) float rs[];
    float* hs = rs;  // IB * H hidden activations
    const uint32_t head = blockIdx.y, i0 = blockIdx.z * IB;
    const uint32_t nb = min((uint32_t)IB, B - i0);
    RouteOutLane<W> out(w2, head, H, C);
    for (uint32_t i = threadIdx.x; i < IB * H; i += ROUTE_THREADS) {
        const uint32_t b = i / H;
        hs[i] = b < nb ? hidden[((size_t)(i0 + b) * hq + head) * H + i % H] : 0.f;
    }
    __syncthreads();
    out.template finish<IB>(hs, hs + IB * H, b2, scores, hq, head, i0, nb, H, C);
}

// Both layers in one kernel (H <= 64): the output layer's grid, each block computing its head's
// hidden units into shared memory first. Dynamic shared memory: IB * H floats, then the larger of
// the hidden layer's (IB * D + (ROUTE_THREADS / 32) * IB * 32 * VEC) and the output layer's
// ((ROUTE_THREADS / 32) * IB * ROUTE_COLS) floats.
template <typename W, typename Q, int IB>
__device__ __forceinline__ void route_fused_impl(const Q* __restrict__ q,
                                                 const W* __restrict__ w1,
                                                 const W* __restrict__ b1,
                                                 const W* __restrict__ w2,
                                                 const W* __restrict__ b2,
                                                 float* __restrict__ scores, uint32_t B,
                                                 uint32_t hq, uint32_t D, uint32_t H, uint32_t C) {
    extern __shared__ __align__(16) float rs[];
    float* hs = rs;
    float* work = rs + IB * H;
    const uint32_t head = blockIdx.y, i0 = blockIdx.z * IB;
    const uint32_t nb = min((uint32_t)IB, B - i0);
    RouteOutLane<W> out(w2, head, H, C);
    // Units of items past the batch stay zero, as the output kernel reads them.
    for (uint32_t i = threadIdx.x; i < IB * H; i += ROUTE_THREADS) hs[i] = 0.f;
    route_hidden_units<W, Q, IB>(q, w1, b1, hq, D, H, head, i0, nb, work, work + IB * D,
                                 [&](uint32_t b, uint32_t h, float x) { hs[b * H + h] = x; });
    out.template finish<IB>(hs, work, b2, scores, hq, head, i0, nb, H, C);
}

// The hidden layer and the fused kernel read the query (one kernel per weight and query type),
// the output layer only the f32 hidden units (one per weight type).
#define SAAP_ROUTE_HIDDEN_IB(NAME, W, Q, IB)                                                    \
    extern "C" __global__ void __launch_bounds__(ROUTE_THREADS)                                 \
        NAME(const Q* q, const W* w1, const W* b1, float* hidden, uint32_t B, uint32_t hq,      \
             uint32_t D, uint32_t H) {                                                          \
        route_hidden_impl<W, Q, IB>(q, w1, b1, hidden, B, hq, D, H);                            \
    }
#define SAAP_ROUTE_OUT_IB(NAME, W, IB)                                                          \
    extern "C" __global__ void __launch_bounds__(ROUTE_THREADS)                                 \
        NAME(const float* hidden, const W* w2, const W* b2, float* scores, uint32_t B,          \
             uint32_t hq, uint32_t H, uint32_t C) {                                             \
        route_out_impl<W, IB>(hidden, w2, b2, scores, B, hq, H, C);                             \
    }
#define SAAP_ROUTE_FUSED_IB(NAME, W, Q, IB)                                                     \
    extern "C" __global__ void __launch_bounds__(ROUTE_THREADS)                                 \
        NAME(const Q* q, const W* w1, const W* b1, const W* w2, const W* b2, float* scores,     \
             uint32_t B, uint32_t hq, uint32_t D, uint32_t H, uint32_t C) {                     \
        route_fused_impl<W, Q, IB>(q, w1, b1, w2, b2, scores, B, hq, D, H, C);                  \
    }
#define SAAP_ROUTE_HIDDEN(NAME, W, Q)          \
    SAAP_ROUTE_HIDDEN_IB(NAME##_i1, W, Q, 1) \
    SAAP_ROUTE_HIDDEN_IB(NAME##_i4, W, Q, 4)
#define SAAP_ROUTE_OUT(NAME, W)          \
    SAAP_ROUTE_OUT_IB(NAME##_i1, W, 1) \
    SAAP_ROUTE_OUT_IB(NAME##_i4, W, 4)
#define SAAP_ROUTE_FUSED(NAME, W, Q)          \
    SAAP_ROUTE_FUSED_IB(NAME##_i1, W, Q, 1) \
    SAAP_ROUTE_FUSED_IB(NAME##_i4, W, Q, 4)

// Every (weight, query) type pair of the kernels that read the query: NAME_w<W>_<Q>.
#define SAAP_ROUTE_EACH_WQ(KERNELS, NAME)                      \
    KERNELS(NAME##_wf32_f32, float, float)                     \
    KERNELS(NAME##_wf32_bf16, float, __nv_bfloat16)            \
    KERNELS(NAME##_wf32_f16, float, __half)                    \
    KERNELS(NAME##_wbf16_f32, __nv_bfloat16, float)            \
    KERNELS(NAME##_wbf16_bf16, __nv_bfloat16, __nv_bfloat16)   \
    KERNELS(NAME##_wbf16_f16, __nv_bfloat16, __half)

SAAP_ROUTE_EACH_WQ(SAAP_ROUTE_HIDDEN, saap_route_hidden)
SAAP_ROUTE_OUT(saap_route_out_wf32, float)
SAAP_ROUTE_OUT(saap_route_out_wbf16, __nv_bfloat16)
SAAP_ROUTE_EACH_WQ(SAAP_ROUTE_FUSED, saap_route_fused)

// The n_probe best partitions of each row of scores [rows, C] → probes [rows, n_probe], in the
// CPU's order (score descending, index ascending; see top.cuh). One block per row (a multiple of
// 32 threads). Dynamic shared memory: sel_cap u64 + C u32 + 256 u32.
extern "C" __global__ void saap_route_top(const float* __restrict__ scores,
                                          uint32_t* __restrict__ probes, uint32_t C,
                                          uint32_t sel_cap, uint32_t n_probe) {
    extern __shared__ unsigned long long sel[];  // [sel_cap], then bits [C], then hist [256]
    uint32_t* bits = reinterpret_cast<uint32_t*>(sel + sel_cap);
    const uint32_t row = blockIdx.x, tid = threadIdx.x;
    for (uint32_t i = tid; i < C; i += blockDim.x) bits[i] = score_bits(scores[(size_t)row * C + i]);
    __syncthreads();
    const TopCut cut = top_cut(bits, C, n_probe, bits + C);
    const uint32_t workers = top_sorted(bits, C, cut, sel, sel_cap, n_probe);
    if (tid >= workers) return;
    for (uint32_t i = tid; i < n_probe; i += workers)
        probes[(size_t)row * n_probe + i] = top_index(sel[i]);
}
