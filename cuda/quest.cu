// Quest routing of a decode step (src/cuda/quest.rs), one semantics with `quest::route` on the
// CPU: three launches replace its candle ops (relu, sub, two batched matmuls, add, max over the
// group, masking, arg_sort over P pages, gather, where, broadcast).
//
// 1. saap_quest_scores: per (item, KV head, page) the group score, the max over the group's G
//    query heads of Σ_d max(q_d·min_d, q_d·max_d) (f32, as the CPU's relu split: q_d·max_d where
//    q_d > 0, else q_d·min_d). A NaN of any head makes the group score NaN, so the caller's finite
//    check sees it. Each block also counts its pages into a histogram of the row's ranking bits
//    (their top QUEST_BIN_BITS), so that the selection needs no radix pass over every page.
//    saap_quest_hist counts that histogram for group scores computed elsewhere (by shares).
// 2. saap_quest_select + saap_quest_emit: per (item, KV head) the k best pages (pages without
//    keys of the item rank as -inf, with NaN), listed in page order once for the group's query
//    heads, a page without keys written as P; each row spread over blocks of QUEST_CHUNK pages
//    (below).
#include "common.cuh"
#include "top.cuh"

#define QUEST_THREADS 256
// Lanes per page: each loads 16 bytes of a bound row at a time, 8 lanes one 128-byte segment.
#define QUEST_LPP 8
#define QUEST_SLOTS (QUEST_THREADS / QUEST_LPP)
// Histogram bins of a row's ranking bits (score_bits >> (32 - QUEST_BIN_BITS)).
#define QUEST_BIN_BITS 12
#define QUEST_BINS (1u << QUEST_BIN_BITS)

// q: [B, Hq, D]; lo, hi: [B, Hkv, P, D] f32; filled: [B, Hkv, P] u8; scores: [B, Hkv, P]; hist:
// [B, Hkv, QUEST_BINS] u32, zero before the launch. Grid: (ceil(P / per_block), Hkv, B) with
// per_block a multiple of QUEST_SLOTS; G = Hq / Hkv <= GB. Dynamic shared memory: G * D floats
// (the group's queries).
template <typename Q, int D, int GB>
__device__ __forceinline__ void quest_scores_impl(const Q* __restrict__ q,
                                                  const float* __restrict__ lo,
                                                  const float* __restrict__ hi,
                                                  const uint8_t* __restrict__ filled,
                                                  float* __restrict__ scores,
                                                  uint32_t* __restrict__ hist, uint32_t hq,
                                                  uint32_t hkv, uint32_t P, uint32_t per_block) {
    constexpr int CH = D / 4 / QUEST_LPP;  // 16-byte chunks per lane and bound row
    static_assert(CH * 4 * QUEST_LPP == D, "D must be a multiple of 32");
    extern __shared__ __align__(16) float qs[];
    const uint32_t item = blockIdx.z, head = blockIdx.y, G = hq / hkv;
    const uint32_t row = item * hkv + head;
    const uint32_t tid = threadIdx.x, slot = tid / QUEST_LPP, lane = tid % QUEST_LPP;
    for (uint32_t i = tid; i < G * D; i += QUEST_THREADS)
        qs[i] = to_f32(q[((size_t)item * hq + (size_t)head * G) * D + i]);
    __syncthreads();
    const uint32_t p0 = blockIdx.x * per_block, p1 = min(p0 + per_block, P);
    const float4* lo4 = reinterpret_cast<const float4*>(lo + (size_t)row * P * D);
    const float4* hi4 = reinterpret_cast<const float4*>(hi + (size_t)row * P * D);
    // Uniform trip count: every lane reaches the shuffles.
    for (uint32_t base = p0; base < p1; base += QUEST_SLOTS) {
        const uint32_t p = base + slot;
        const bool ok = p < p1;
        float4 a[CH], b[CH];
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            const size_t at = (size_t)p * (D / 4) + lane + c * QUEST_LPP;
            a[c] = ok ? __ldg(lo4 + at) : make_float4(0.f, 0.f, 0.f, 0.f);
            b[c] = ok ? __ldg(hi4 + at) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        float acc[GB];
#pragma unroll
        for (int g = 0; g < GB; ++g) {
            acc[g] = 0.f;
            if ((uint32_t)g >= G) continue;
#pragma unroll
            for (int c = 0; c < CH; ++c) {
                const float4 x =
                    *reinterpret_cast<const float4*>(qs + g * D + 4 * (lane + c * QUEST_LPP));
                acc[g] = fmaf(x.x, x.x > 0.f ? b[c].x : a[c].x, acc[g]);
                acc[g] = fmaf(x.y, x.y > 0.f ? b[c].y : a[c].y, acc[g]);
                acc[g] = fmaf(x.z, x.z > 0.f ? b[c].z : a[c].z, acc[g]);
                acc[g] = fmaf(x.w, x.w > 0.f ? b[c].w : a[c].w, acc[g]);
            }
#pragma unroll
            for (int o = QUEST_LPP / 2; o >= 1; o >>= 1)
                acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], o);
        }
        uint32_t bin = QUEST_BINS;  // none
        if (ok && lane == 0) {
            float m = acc[0];
#pragma unroll
            for (int g = 1; g < GB; ++g)
                if ((uint32_t)g < G && (acc[g] > m || acc[g] != acc[g])) m = acc[g];
            scores[(size_t)row * P + p] = m;
            bin = score_bits(filled[(size_t)row * P + p] ? m : -INFINITY) >> (32 - QUEST_BIN_BITS);
        }
        // One atomic per distinct bin of the warp's pages: neighbouring pages often share one.
        const uint32_t peers = __match_any_sync(0xffffffffu, bin);
        if (bin < QUEST_BINS && (tid & 31) == (uint32_t)__ffs(peers) - 1)
            atomicAdd(&hist[(size_t)row * QUEST_BINS + bin], (uint32_t)__popc(peers));
    }
}

#define SAAP_QUEST_SCORES(NAME, Q, D, GB)                                                      \
    extern "C" __global__ void __launch_bounds__(QUEST_THREADS)                                \
        NAME(const Q* q, const float* lo, const float* hi, const uint8_t* filled, float* scores, \
             uint32_t* hist, uint32_t hq, uint32_t hkv, uint32_t P, uint32_t per_block) {        \
        quest_scores_impl<Q, D, GB>(q, lo, hi, filled, scores, hist, hq, hkv, P, per_block);    \
    }

#define SAAP_QUEST_SCORES_GROUPS(QN, Q, D)                          \
    SAAP_QUEST_SCORES(saap_quest_scores_##QN##_d##D##_g1, Q, D, 1) \
    SAAP_QUEST_SCORES(saap_quest_scores_##QN##_d##D##_g2, Q, D, 2) \
    SAAP_QUEST_SCORES(saap_quest_scores_##QN##_d##D##_g4, Q, D, 4) \
    SAAP_QUEST_SCORES(saap_quest_scores_##QN##_d##D##_g8, Q, D, 8)

SAAP_QUEST_SCORES_GROUPS(f32, float, 64)
SAAP_QUEST_SCORES_GROUPS(f32, float, 128)
SAAP_QUEST_SCORES_GROUPS(bf16, __nv_bfloat16, 64)
SAAP_QUEST_SCORES_GROUPS(bf16, __nv_bfloat16, 128)
SAAP_QUEST_SCORES_GROUPS(f16, __half, 64)
SAAP_QUEST_SCORES_GROUPS(f16, __half, 128)

// The histogram saap_quest_scores counts, of group scores computed elsewhere (Quest by shares:
// candle ops), so that the same selection ranks them. scores: [rows, P] f32; filled: [rows, P]
// u8; hist: [rows, QUEST_BINS] u32, zero before the launch. Grid: (ceil(P / QUEST_THREADS),
// rows), one page per thread.
extern "C" __global__ void __launch_bounds__(QUEST_THREADS)
    saap_quest_hist(const float* __restrict__ scores, const uint8_t* __restrict__ filled,
                    uint32_t* __restrict__ hist, uint32_t P) {
    const uint32_t row = blockIdx.y, p = blockIdx.x * QUEST_THREADS + threadIdx.x;
    uint32_t bin = QUEST_BINS;  // none
    if (p < P) {
        const size_t at = (size_t)row * P + p;
        bin = score_bits(filled[at] ? scores[at] : -INFINITY) >> (32 - QUEST_BIN_BITS);
    }
    // Every lane reaches the match; one atomic per distinct bin of the warp's pages.
    const uint32_t peers = __match_any_sync(0xffffffffu, bin);
    if (bin < QUEST_BINS && (threadIdx.x & 31) == (uint32_t)__ffs(peers) - 1)
        atomicAdd(&hist[(size_t)row * QUEST_BINS + bin], (uint32_t)__popc(peers));
}

// Quest's top-k, spread over the GPU: with one block per row it was one SM's instruction
// throughput at batch 1 (20.9 us at 7.5k pages, NOTES §41-43). Each row is cut into chunks of
// QUEST_CHUNK pages, QUEST_PPT consecutive pages per thread.
//
// saap_quest_select (grid: chunks, rows): every block reads the row's histogram, finds the bin
// holding the k-th best page (the cut's bin) and how many of its pages are still needed, counts
// its chunk's pages above that bin, stages its pages of that bin in page order and counts them
// into a second histogram of their next QUEST_BIN_BITS bits (a row's scores share their leading
// bits: the cut's bin alone held ~1k of 7.5k pages). The last block of the row to finish (a
// per-row counter, zero on entry) finds the cut in that second histogram, takes the staged pages
// above it, selects the rest among the few that share the cut's 24 bits (ties to the lower
// page), and writes where each chunk's chosen pages start in the list. saap_quest_emit (grid:
// chunks, rows) then lists each chunk's chosen pages at that offset, in page order.
#define QUEST_TOP_THREADS 256
#define QUEST_PPT 4
static_assert(32 % QUEST_PPT == 0, "a thread's pages share one word of the taken bitmap");
#define QUEST_CHUNK (QUEST_TOP_THREADS * QUEST_PPT)
// Chunks of a row the last block can account for: P <= QUEST_MAX_CHUNKS * QUEST_CHUNK.
#define QUEST_MAX_CHUNKS 64

// One row of the scratch saap_quest_select writes and saap_quest_emit reads, u32 each; a row
// takes 2 P + 3 chunks + 1 + ceil(P / 32) (`scratch_len` in src/cuda/quest.rs).
struct QuestScratch {
    uint32_t* pages;   // [P]: chunk c's pages of the cut's bin from c * QUEST_CHUNK, in page order
    uint32_t* bits;    // [P]: their ranking bits
    uint32_t* above;   // [chunks]: each chunk's pages in bins above the cut's
    uint32_t* tied;    // [chunks]: each chunk's pages in the cut's bin
    uint32_t* offset;  // [chunks]: where each chunk's chosen pages start in the list
    uint32_t* cut;     // [1]: the cut's bin
    uint32_t* taken;   // [ceil(P / 32)]: bitmap of the cut bin's pages taken
};

__device__ __forceinline__ QuestScratch quest_scratch(uint32_t* base, uint32_t row, uint32_t P,
                                                      uint32_t chunks) {
    const uint32_t tail = 2 * P + 3 * chunks;
    uint32_t* r = base + (size_t)row * (tail + 1 + (P + 31) / 32);
    return {r, r + P, r + 2 * P, r + 2 * P + chunks, r + 2 * P + 2 * chunks, r + tail,
            r + tail + 1};
}

// The ranking bits of a thread's pages first..first + QUEST_PPT (those < P), as the score kernel
// counted them: pages without keys of their item as -inf.
__device__ __forceinline__ void quest_page_bits(const float* s, const uint8_t* f, uint32_t first,
                                                uint32_t P, uint32_t (&bits)[QUEST_PPT]) {
    float score[QUEST_PPT];
    uint8_t keys[QUEST_PPT];
    // Both loads unconditional, so that neither waits on the other.
#pragma unroll
    for (int j = 0; j < QUEST_PPT; ++j) {
        const uint32_t p = min(first + j, P - 1);
        score[j] = s[p];
        keys[j] = f[p];
    }
#pragma unroll
    for (int j = 0; j < QUEST_PPT; ++j)
        bits[j] = first + j < P ? score_bits(keys[j] ? score[j] : -INFINITY) : 0u;
}

// The bin of a histogram h (QUEST_BINS counts, read past L1: other blocks may have just written
// them) where the count from the top reaches n (1 <= n <= the total), and how many of that bin's
// entries are needed, into *bin and *need (shared). Every thread of a QUEST_TOP_THREADS block
// takes part; ends synced.
__device__ inline void quest_cut(const uint32_t* h, uint32_t n, uint32_t* bin, uint32_t* need) {
    constexpr uint32_t PER_THREAD = QUEST_BINS / QUEST_TOP_THREADS;
    static_assert(PER_THREAD % 4 == 0, "a thread's bins are read 16 bytes at a time");
    // Thread t holds bins QUEST_BINS - 1 - (PER_THREAD t + j), highest first.
    const uint4* h4 =
        reinterpret_cast<const uint4*>(h + QUEST_BINS - PER_THREAD * (threadIdx.x + 1));
    uint32_t count[PER_THREAD], sum = 0;
#pragma unroll
    for (uint32_t v = 0; v < PER_THREAD / 4; ++v) {
        const uint4 w = __ldcg(h4 + v);  // ascending bins: the thread's last four first
        const uint32_t j = PER_THREAD - 1 - 4 * v;
        count[j] = w.x;
        count[j - 1] = w.y;
        count[j - 2] = w.z;
        count[j - 3] = w.w;
    }
#pragma unroll
    for (uint32_t j = 0; j < PER_THREAD; ++j) sum += count[j];
    uint32_t total;
    uint32_t above = block_exclusive_sum(sum, &total);
    if (above < n && n <= above + sum) {
        for (uint32_t j = 0; j < PER_THREAD; ++j) {
            if (above + count[j] >= n) {
                *bin = QUEST_BINS - 1 - (PER_THREAD * threadIdx.x + j);
                *need = n - above;
                break;
            }
            above += count[j];
        }
    }
    __syncthreads();
}

// Exclusive prefix sums of count(c) over the chunks c < n, in chunk order, by the first warp
// (all 32 lanes): store(c, sum of the chunks before c). Returns the total to every lane.
template <typename Count, typename Store>
__device__ inline uint32_t warp_chunk_scan(uint32_t n, Count count, Store store) {
    const uint32_t lane = threadIdx.x & 31;
    uint32_t carry = 0;
    for (uint32_t base = 0; base < n; base += 32) {
        const uint32_t c = base + lane;
        const uint32_t m = c < n ? count(c) : 0;
        const uint32_t incl = warp_inclusive_sum(m);
        if (c < n) store(c, carry + incl - m);
        carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    return carry;
}

// The second-level bin of ranking bits already in the cut's first-level bin.
__device__ __forceinline__ uint32_t quest_sub_bin(uint32_t bits) {
    return (bits >> (32 - 2 * QUEST_BIN_BITS)) & (QUEST_BINS - 1);
}

// scores, filled: [rows, P]; hist, hist2: [rows, QUEST_BINS] (hist from saap_quest_scores, hist2
// zero on entry); counters: [rows], zero on entry; scratch: rows x scratch_len. Dynamic shared
// memory: 2 P u32 (used by the last block of each row: the cut bin's pages and their bits).
extern "C" __global__ void __launch_bounds__(QUEST_TOP_THREADS)
    saap_quest_select(const float* __restrict__ scores, const uint8_t* __restrict__ filled,
                      const uint32_t* __restrict__ hist, uint32_t* __restrict__ hist2,
                      uint32_t* __restrict__ counters, uint32_t* __restrict__ scratch, uint32_t P,
                      uint32_t k) {
    extern __shared__ uint32_t tied_bits[];  // [P]: the cut bin's pages' bits, in page order
    uint32_t* tied_pages = tied_bits + P;    // [P]: those pages
    __shared__ uint32_t radix[256], cand_bits[32], cand_pages[32];
    __shared__ uint32_t chunk_start[QUEST_MAX_CHUNKS + 1], chunk_above[QUEST_MAX_CHUNKS];
    __shared__ uint32_t chunk_taken[QUEST_MAX_CHUNKS];
    __shared__ uint32_t cut_bin, need, cut_sub, need_sub;
    __shared__ bool last;
    const uint32_t chunk = blockIdx.x, chunks = gridDim.x, row = blockIdx.y;
    const uint32_t tid = threadIdx.x, lane = tid & 31;
    const QuestScratch sc = quest_scratch(scratch, row, P, chunks);
    uint32_t* h2 = hist2 + (size_t)row * QUEST_BINS;
    quest_cut(hist + (size_t)row * QUEST_BINS, k, &cut_bin, &need);
    const uint32_t bin = cut_bin;
    // This chunk's pages: counted above the cut's bin; staged and counted again in it.
    const float* s = scores + (size_t)row * P;
    const uint8_t* f = filled + (size_t)row * P;
    const uint32_t first = chunk * QUEST_CHUNK + tid * QUEST_PPT;
    uint32_t bits[QUEST_PPT], n_above = 0, n_tied = 0;
    quest_page_bits(s, f, first, P, bits);
#pragma unroll
    for (int j = 0; j < QUEST_PPT; ++j) {
        const uint32_t b = bits[j] >> (32 - QUEST_BIN_BITS);
        n_above += first + j < P && b > bin;
        n_tied += first + j < P && b == bin;
    }
    // Both counts in one scan (a chunk's counts fit 16 bits).
    uint32_t total;
    const uint32_t at = block_exclusive_sum(n_tied | n_above << 16, &total);
    uint32_t r = chunk * QUEST_CHUNK + (at & 0xffffu);
#pragma unroll
    for (int j = 0; j < QUEST_PPT; ++j) {
        if (first + j < P && bits[j] >> (32 - QUEST_BIN_BITS) == bin) {
            sc.pages[r] = first + j;
            sc.bits[r] = bits[j];
            ++r;
            atomicAdd(&h2[quest_sub_bin(bits[j])], 1u);
        }
    }
    if (tid == 0) {
        sc.above[chunk] = total >> 16;
        sc.tied[chunk] = total & 0xffffu;
    }
    // Every chunk's staging and counts visible before the counter says so.
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&counters[row], 1u) == chunks - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();

    // The last block; each global read below is one round trip on its critical path, so reads
    // are issued together. Where each chunk's staged pages start in the row's list of the cut
    // bin's pages (page order), and each chunk's pages above that bin, read past L1 (other
    // blocks wrote them).
    if (tid < 32) {
        const uint32_t n_tied = warp_chunk_scan(
            chunks, [&](uint32_t c) { return __ldcg(sc.tied + c); },
            [&](uint32_t c, uint32_t start) { chunk_start[c] = start; });
        if (lane == 0) chunk_start[chunks] = n_tied;
    }
    for (uint32_t c = tid; c < chunks; c += QUEST_TOP_THREADS) {
        chunk_above[c] = __ldcg(sc.above + c);
        chunk_taken[c] = 0;
    }
    for (uint32_t w = tid; w < (P + 31) / 32; w += QUEST_TOP_THREADS) sc.taken[w] = 0;
    __syncthreads();
    const uint32_t n = chunk_start[chunks];
    // The staged pages into shared memory, in page order: a thread's loads all issued before
    // its stores wait on them.
    constexpr uint32_t IN_FLIGHT = 8;
    for (uint32_t base = 0; base < n; base += IN_FLIGHT * QUEST_TOP_THREADS) {
        uint32_t b[IN_FLIGHT], pg[IN_FLIGHT];
#pragma unroll
        for (uint32_t r = 0; r < IN_FLIGHT; ++r) {
            const uint32_t i = base + r * QUEST_TOP_THREADS + tid;
            if (i < n) {
                const uint32_t c = upper_bound(chunk_start, chunks + 1, i) - 1;
                const uint32_t g = c * QUEST_CHUNK + i - chunk_start[c];
                b[r] = __ldcg(sc.bits + g);
                pg[r] = __ldcg(sc.pages + g);
            }
        }
#pragma unroll
        for (uint32_t r = 0; r < IN_FLIGHT; ++r) {
            const uint32_t i = base + r * QUEST_TOP_THREADS + tid;
            if (i < n) {
                tied_bits[i] = b[r];
                tied_pages[i] = pg[r];
            }
        }
    }
    quest_cut(h2, need, &cut_sub, &need_sub);
    const uint32_t sub = cut_sub;
    auto take = [&](uint32_t p) {
        atomicOr(&sc.taken[p / 32], 1u << (p % 32));
        atomicAdd(&chunk_taken[p / QUEST_CHUNK], 1u);
    };
    // Each thread walks one contiguous run of the list: pages above the cut's 24 bits are taken,
    // those on them are candidates.
    const uint32_t per = (n + QUEST_TOP_THREADS - 1) / QUEST_TOP_THREADS;
    const uint32_t lo = min(tid * per, n), hi = min(lo + per, n);
    uint32_t n_cand = 0;
    for (uint32_t i = lo; i < hi; ++i) n_cand += quest_sub_bin(tied_bits[i]) == sub;
    uint32_t n_cands;
    uint32_t slot = block_exclusive_sum(n_cand, &n_cands);
    if (n_cands <= 32) {
        // Usually a handful, gathered in page order and ranked by one warp (bits descending,
        // page order among equals).
        for (uint32_t i = lo; i < hi; ++i) {
            const uint32_t b = quest_sub_bin(tied_bits[i]);
            if (b > sub) take(tied_pages[i]);
            if (b == sub) {
                cand_bits[slot] = tied_bits[i];
                cand_pages[slot] = tied_pages[i];
                ++slot;
            }
        }
        __syncthreads();
        if (tid < n_cands) {
            const uint32_t b = cand_bits[tid];
            uint32_t rank = 0;
            for (uint32_t j = 0; j < n_cands; ++j)
                rank += cand_bits[j] > b || (cand_bits[j] == b && j < tid);
            if (rank < need_sub) take(cand_pages[tid]);
        }
    } else {
        // Many share the cut's 24 bits (exact ties, or empty pages at -inf): a radix select over
        // the whole bin, whose keys rank ties by position, which is page order.
        const TopCut cut = top_cut(tied_bits, n, need, radix);
        for (uint32_t i = tid; i < n; i += QUEST_TOP_THREADS)
            if (top_taken(tied_bits, i, cut)) take(tied_pages[i]);
    }
    __syncthreads();
    if (tid < 32) {
        warp_chunk_scan(
            chunks, [&](uint32_t c) { return chunk_above[c] + chunk_taken[c]; },
            [&](uint32_t c, uint32_t start) { sc.offset[c] = start; });
        if (lane == 0) *sc.cut = bin;
    }
}

// probes: [rows, k] = [B, Hkv, k]: each group's k best pages in page order, a page without keys
// of the item written as P; scratch as saap_quest_select left it (read only).
extern "C" __global__ void __launch_bounds__(QUEST_TOP_THREADS)
    saap_quest_emit(const float* __restrict__ scores, const uint8_t* __restrict__ filled,
                    uint32_t* __restrict__ scratch, uint32_t* __restrict__ probes, uint32_t P,
                    uint32_t k) {
    __shared__ uint32_t list[QUEST_CHUNK];
    const uint32_t chunk = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
    const QuestScratch sc = quest_scratch(scratch, row, P, gridDim.x);
    const float* s = scores + (size_t)row * P;
    const uint8_t* f = filled + (size_t)row * P;
    const uint32_t first = chunk * QUEST_CHUNK + tid * QUEST_PPT;
    // One word of the bitmap holds the thread's pages (QUEST_PPT divides 32); all reads at once.
    const uint32_t bin = *sc.cut, taken = sc.taken[min(first, P - 1) / 32];
    const uint32_t offset = sc.offset[chunk];
    uint32_t bits[QUEST_PPT], n_chosen = 0;
    bool chosen[QUEST_PPT];
    quest_page_bits(s, f, first, P, bits);
#pragma unroll
    for (int j = 0; j < QUEST_PPT; ++j) {
        const uint32_t p = first + j, b = bits[j] >> (32 - QUEST_BIN_BITS);
        chosen[j] = p < P && (b > bin || (b == bin && (taken >> (p % 32)) & 1u));
        n_chosen += chosen[j];
    }
    uint32_t total;
    uint32_t r = block_exclusive_sum(n_chosen, &total);
#pragma unroll
    for (int j = 0; j < QUEST_PPT; ++j)
        if (chosen[j]) list[r++] = f[first + j] ? first + j : P;
    __syncthreads();
    uint32_t* out = probes + (size_t)row * k + offset;
    for (uint32_t i = tid; i < total; i += QUEST_TOP_THREADS) out[i] = list[i];
}
