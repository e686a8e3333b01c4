// Quest routing of a decode step (src/cuda/quest.rs), one semantics with `quest::route` on the
// CPU: two launches replace its candle ops (relu, sub, two batched matmuls, add, max over the
// group, masking, arg_sort over P pages, gather, where, broadcast).
//
// 1. saap_quest_scores: per (item, KV head, page) the group score, the max over the group's G
//    query heads of Σ_d max(q_d·min_d, q_d·max_d) (f32, as the CPU's relu split: q_d·max_d where
//    q_d > 0, else q_d·min_d). A NaN of any head makes the group score NaN, so the caller's finite
//    check sees it. Each block also counts its pages into a histogram of the row's ranking bits
//    (their top QUEST_BIN_BITS), so that the selection needs no radix pass over every page: with
//    one block per row it was one SM's work at batch 1 (24 us at 7.5k pages, NOTES §41).
// 2. saap_quest_top: per (item, KV head) the k best pages (top.cuh; pages without keys of the
//    item rank as -inf, with NaN), listed in page order for each of the group's G query heads, a
//    page without keys written as P.
#include "common.cuh"
#include "top.cuh"

#define QUEST_THREADS 256
// Lanes per page: each loads 16 bytes of a bound row at a time, 8 lanes one 128-byte segment.
#define QUEST_LPP 8
#define QUEST_SLOTS (QUEST_THREADS / QUEST_LPP)
#define QUEST_TOP_THREADS 1024
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

// scores: [rows, P] (rows = B * Hkv); filled: [rows, P] u8 (nonzero: the page holds keys of its
// item); hist: [rows, QUEST_BINS] from saap_quest_scores; probes: [rows * G, k] = [B, Hq, k], each
// group's k best pages listed in page order (which pages, not their rank, is Quest's answer: the
// decode kernel reads their union), a page without keys of the item written as P. One block of
// QUEST_TOP_THREADS per row. The histogram gives the bin holding the k-th best page: the pages of
// higher bins are taken, the `need` best of that bin's (a fraction of P: ~1k of 7.5k at 120k) by a
// radix select over them alone, gathered in page order so that ties still go to the lower page.
// Dynamic shared memory: 3 P + ceil(P / 32) + 256 + 32 u32 (bits, the bin's pages and their
// bits, chosen, radix histogram, warp counts).
extern "C" __global__ void __launch_bounds__(QUEST_TOP_THREADS)
    saap_quest_top(const float* __restrict__ scores, const uint8_t* __restrict__ filled,
                   const uint32_t* __restrict__ hist, uint32_t* __restrict__ probes, uint32_t P,
                   uint32_t k, uint32_t G) {
    constexpr uint32_t PER_THREAD = QUEST_BINS / QUEST_TOP_THREADS;
    constexpr uint32_t WARPS = QUEST_TOP_THREADS / 32;
    extern __shared__ uint32_t bits[];  // [P]
    uint32_t* tied = bits + P;          // [P]: pages of the cut's bin, in page order
    uint32_t* tied_bits = tied + P;     // [P]: their bits
    uint32_t* chosen = tied_bits + P;   // [ceil(P / 32)]: the bin's pages taken
    uint32_t* radix = chosen + (P + 31) / 32;  // [256]
    uint32_t* warp_sums = radix + 256;         // [WARPS]
    __shared__ uint32_t cut_bin, need;
    const uint32_t row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
    const float* s = scores + (size_t)row * P;
    const uint8_t* f = filled + (size_t)row * P;
#pragma unroll 4
    for (uint32_t i = tid; i < P; i += QUEST_TOP_THREADS)
        bits[i] = score_bits(f[i] ? s[i] : -INFINITY);
    for (uint32_t w = tid; w < (P + 31) / 32; w += QUEST_TOP_THREADS) chosen[w] = 0;
    // The cut's bin: thread t holds bins QUEST_BINS - 1 - (PER_THREAD t + j), highest first; a
    // block-wide scan of their counts finds the bin where the count from the top reaches k.
    const uint32_t* h = hist + (size_t)row * QUEST_BINS;
    uint32_t count[PER_THREAD], sum = 0;
#pragma unroll
    for (uint32_t j = 0; j < PER_THREAD; ++j) {
        count[j] = h[QUEST_BINS - 1 - (PER_THREAD * tid + j)];
        sum += count[j];
    }
    const uint32_t incl = warp_inclusive_sum(sum);
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    uint32_t above = incl - sum;
    for (uint32_t w = 0; w < warp; ++w) above += warp_sums[w];
    if (above < k && k <= above + sum) {
        for (uint32_t j = 0; j < PER_THREAD; ++j) {
            if (above + count[j] >= k) {
                cut_bin = QUEST_BINS - 1 - (PER_THREAD * tid + j);
                need = k - above;
                break;
            }
            above += count[j];
        }
    }
    __syncthreads();
    const uint32_t bin = cut_bin;
    auto bin_of = [&](uint32_t i) { return bits[i] >> (32 - QUEST_BIN_BITS); };
    // The bin's pages in page order, then the `need` best of them (keys rank ties by position,
    // which is page order).
    const uint32_t n_tied = emit_in_index_order(
        P, [&](uint32_t i) { return bin_of(i) == bin; }, warp_sums,
        [&](uint32_t r, uint32_t i) {
            tied[r] = i;
            tied_bits[r] = bits[i];
        });
    __syncthreads();
    const TopCut cut = top_cut(tied_bits, n_tied, need, radix);
    for (uint32_t r = tid; r < n_tied; r += QUEST_TOP_THREADS)
        if (top_taken(tied_bits, r, cut)) atomicOr(&chosen[tied[r] / 32], 1u << (tied[r] % 32));
    __syncthreads();
    // The chosen pages in page order (into `tied`, read for the last time above), then written
    // once per query head of the group with coalesced stores.
    uint32_t* list = tied;
    emit_in_index_order(
        P,
        [&](uint32_t i) { return bin_of(i) > bin || ((chosen[i / 32] >> (i % 32)) & 1u); },
        warp_sums, [&](uint32_t r, uint32_t i) { list[r] = f[i] ? i : P; });
    __syncthreads();
    uint32_t* out = probes + (size_t)row * G * k;
    for (uint32_t g = 0; g < G; ++g)
        for (uint32_t r = tid; r < k; r += QUEST_TOP_THREADS) out[g * k + r] = list[r];
}
