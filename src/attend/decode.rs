//! Decode attention over id lists, one semantics for both backends.
//!
//! For batch item `b` and KV head `h`, the keys read are, in this order:
//! 1. the sinks `0..min(sinks, len)`,
//! 2. the union of the group's probe lists (one per query head of the group, or one the group
//!    shares) of partitions, ascending by partition, each list `perm[offsets[c]..offsets[c+1]]`
//!    (positions `sinks..indexed_end`) of a directory, or each a page of consecutive positions
//!    ([`Partitions`]); extents are clamped to the cache and ids past it skipped,
//! 3. the window `indexed_end..len`.
//!
//! Every query head of the group attends over that whole union, so each K/V row is read once
//! per group. Without probes (dense) the list is `0..len`. Softmax is exact over the list.
//!
//! With partition means (`DecodeOp::means`, see [`crate::SaapAttention::set_estimate_unread`]) a
//! sparse step also attends, after the window, to one pseudo-key per partition the union leaves
//! unread and that holds keys: the partition's mean key and value, its logit raised by `ln n_p`
//! (`n_p` keys), in ascending partition order.

use crate::elem::{contiguous_slice, dot, Elem};
use candle_core::{CpuStorage, CustomOp1, InplaceOp1, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Extent of one sequence of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqExtent {
    /// Tokens in the cache.
    pub len: usize,
    /// End of the indexed positions; `min(sinks, len)..indexed_end` is indexed and
    /// `indexed_end..len` is the recent window.
    pub indexed_end: usize,
}

/// Decode attention of one new query per head over the cache, as a candle op on the rotated
/// queries `[B, Hq, D]`. Returns `[B, Hq, D]`.
#[derive(Debug, Clone)]
pub struct DecodeOp {
    /// `[B, Hkv, cap, D]`, post-RoPE keys.
    pub k_cache: Tensor,
    /// `[B, Hkv, cap, D]`.
    pub v_cache: Tensor,
    /// What the probes' numbers name; unused when `probes` is `None`.
    pub partitions: Option<Partitions>,
    /// Probed partitions u32 (C in an unused slot): `[B, Hq, ℓ]`, one list per query head, or
    /// `[B, Hkv, ℓ]`, one list a KV group's heads share (Quest's pages); `None` reads every
    /// position (dense).
    pub probes: Option<Tensor>,
    /// Per batch item.
    pub seqs: Vec<SeqExtent>,
    /// Attention sinks.
    pub sinks: usize,
    /// Number of partitions C.
    pub n_partitions: usize,
    /// Softmax scale, usually `1/sqrt(D)`.
    pub scale: f32,
    /// Decode steps replayed since the step was recorded (e.g. into a CUDA graph), per item
    /// (`[B]` u32), added to each `seqs[b].len` by the kernel. `None` outside replay.
    pub advance: Option<Tensor>,
    /// `[2, B, Hkv, C, D]` in the cache's type: each partition's mean post-RoPE key, then its mean
    /// value. When given, a sparse step estimates the unread partitions from them (see the module
    /// docs); ignored when dense.
    pub means: Option<Tensor>,
}

/// The keys of the partitions a [`DecodeOp`]'s probes name.
#[derive(Debug, Clone)]
pub enum Partitions {
    /// A directory `[B, Hkv, C + 1 + cap]` u32: offsets, then perm; partition `c` holds
    /// `perm[offsets[c]..offsets[c + 1]]` (Saap's k-means partitions).
    Directory(Tensor),
    /// Pages of this many consecutive positions over each item's indexed region: page `p` holds
    /// positions `sinks + size·p ..` up to the next page or the item's `indexed_end` (Quest's
    /// pages; C pages, the last one may be short). No partition means.
    Pages(usize),
}

/// Page starts of one item, `min(sinks + size·p, indexed_end)` for `p` in `0..=n_pages`: pages as
/// the offsets of a directory whose perm is the identity.
pub(crate) fn page_offsets(seq: SeqExtent, sinks: usize, size: usize, n_pages: usize) -> Vec<u32> {
    // Positions fit u32: the cache holds at most MAX_CONTEXT = u32::MAX rows.
    (0..=n_pages)
        .map(|p| {
            sinks
                .saturating_add(size.saturating_mul(p))
                .min(seq.indexed_end) as u32
        })
        .collect()
}

/// A group's partitions for the CPU: its offsets `[C + 1]` and its perm (`None`: the identity).
struct Extents<'a> {
    offsets: &'a [u32],
    perm: Option<&'a [u32]>,
}

/// Which partitions the union over a group's probes covers (C marks a slot adaptive probing
/// left empty; the CUDA kernel skips it too).
fn probed_set(probes: &[u32], n_partitions: usize) -> Vec<bool> {
    let mut probed = vec![false; n_partitions];
    for &c in probes.iter().filter(|&&c| (c as usize) < n_partitions) {
        probed[c as usize] = true;
    }
    probed
}

/// What one (batch item, KV head) reads: its key ids in kernel order and, where the step
/// estimates them, the partitions its union leaves unread.
struct GroupReads {
    ids: Vec<u32>,
    /// The unread partitions that hold keys, ascending, with `ln n_p`.
    unread: Option<(Vec<u32>, Vec<f32>)>,
}

/// The reads of one group: dense without `sparse` (its partitions and its probe lists), else
/// sinks, the probed partitions' keys and the window; with `estimate`, also the unread
/// partitions. Extents are clamped to the capacity `cap` and ids past it skipped, as the kernels
/// do, so a corrupt directory cannot send a read outside the cache.
fn group_reads(
    seq: SeqExtent,
    sinks: usize,
    sparse: Option<(Extents<'_>, &[u32])>,
    n_partitions: usize,
    cap: usize,
    estimate: bool,
) -> GroupReads {
    let Some((Extents { offsets, perm }, probes)) = sparse else {
        return GroupReads {
            ids: (0..seq.len as u32).collect(),
            unread: None,
        };
    };
    let extent = |c: usize| {
        let start = (offsets[c] as usize).min(cap);
        start..(offsets[c + 1] as usize).clamp(start, cap)
    };
    let sink_end = sinks.min(seq.len);
    let probed = probed_set(probes, n_partitions);
    let mut ids: Vec<u32> = (0..sink_end as u32).collect();
    for c in (0..n_partitions).filter(|&c| probed[c]) {
        let range = extent(c);
        match perm {
            Some(perm) => ids.extend(perm[range].iter().filter(|&&id| (id as usize) < cap)),
            None => ids.extend(range.start as u32..range.end as u32),
        }
    }
    ids.extend(seq.indexed_end as u32..seq.len as u32);
    let unread = estimate.then(|| {
        (0..n_partitions)
            .filter_map(|c| {
                let n = extent(c).len();
                (!probed[c] && n > 0).then(|| (c as u32, (n as f32).ln()))
            })
            .unzip()
    });
    GroupReads { ids, unread }
}

/// One CPU task of a step: a piece of a group's key list from this start, or the group's unread
/// partitions estimated from their means (`[2, B, Hkv, C, D]`, keys then values).
enum Task<'a, T> {
    Keys(usize),
    Means(&'a (Vec<u32>, Vec<f32>), &'a [T]),
}

/// Keys scored per block before the running max and sum are updated.
const BLOCK: usize = 32;

/// Keys one CPU task attends: a (batch item, KV head)'s list is split into pieces of this many
/// keys, attended in parallel and merged by log-sum-exp, so that a few KV heads still fill
/// every core (SmolLM2 has 3 KV heads; a 2-core machine left one core idle a third of the time).
const SPLIT: usize = 512;

/// Asks the CPU to start loading row `id` of `data` (`[rows, dim]`) into its caches, without
/// waiting for it (no effect on results; a no-op off x86-64 and for a row past the end).
///
/// Partition lists name rows scattered over the cache, which the hardware prefetcher cannot
/// guess: `perf` put about 40% of a SmolLM2 Saap decode's attention samples on the first load of
/// each gathered K or V row (against 5% for dense attention's streamed rows). Issuing the loads
/// of a block's rows one block ahead lets them overlap.
#[inline(always)]
fn prefetch_row<T>(data: &[T], id: usize, dim: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(row) = data.get(id * dim..(id + 1) * dim) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(row);
        let base = row.as_ptr().cast::<i8>();
        for offset in (0..bytes).step_by(64) {
            // SAFETY: `base + offset` lies inside `row` (offset < its size in bytes); a prefetch
            // only hints the cache, it never faults, reads into a register nor writes.
            unsafe { _mm_prefetch(base.add(offset), _MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, id, dim);
}

/// Unnormalized online-softmax state of the `G` queries of a group over part of its keys.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// Online-softmax attention of the `G` queries `q` (`[G, D]` f32) over rows `ids` of `k`, `v`
/// (`[rows, D]`), row `ids[j]`'s logit raised by `bias[j]` when given.
fn attend_part<T: Elem>(
    q: &[f32],
    (k, v): (&[T], &[T]),
    ids: &[u32],
    bias: Option<&[f32]>,
    dim: usize,
    scale: f32,
) -> Partial {
    let g = q.len() / dim;
    let mut max = vec![f32::NEG_INFINITY; g];
    let mut sum = vec![0f32; g];
    let mut acc = vec![0f32; g * dim];
    let mut row = vec![0f32; dim];
    let mut scores = vec![0f32; g * BLOCK];
    let prefetch = |block: &[u32]| {
        for &id in block {
            prefetch_row(k, id as usize, dim);
            prefetch_row(v, id as usize, dim);
        }
    };
    let mut blocks = ids.chunks(BLOCK).peekable();
    if let Some(first) = blocks.peek() {
        prefetch(first);
    }
    let mut bias_blocks = bias.map(|b| b.chunks(BLOCK));
    while let Some(block) = blocks.next() {
        let block_bias = bias_blocks.as_mut().and_then(Iterator::next);
        // The next block's rows arrive while this one is computed.
        if let Some(next) = blocks.peek() {
            prefetch(next);
        }
        for (j, &id) in block.iter().enumerate() {
            let id = id as usize;
            let src = &k[id * dim..(id + 1) * dim];
            // f32 caches are read in place; half types are widened into `row`.
            let key = match T::as_f32(src) {
                Some(key) => key,
                None => {
                    T::widen(src, &mut row);
                    &row
                }
            };
            let raise = block_bias.map_or(0.0, |b| b[j]);
            for h in 0..g {
                scores[h * BLOCK + j] = dot(&q[h * dim..(h + 1) * dim], key) * scale + raise;
            }
        }
        for h in 0..g {
            let s = &mut scores[h * BLOCK..h * BLOCK + block.len()];
            let block_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[h].max(block_max);
            let correction = (max[h] - new_max).exp();
            if correction != 1.0 {
                sum[h] *= correction;
                acc[h * dim..(h + 1) * dim]
                    .iter_mut()
                    .for_each(|a| *a *= correction);
            }
            for x in s.iter_mut() {
                *x = (*x - new_max).exp();
                sum[h] += *x;
            }
            max[h] = new_max;
        }
        for (j, &id) in block.iter().enumerate() {
            let id = id as usize;
            let src = &v[id * dim..(id + 1) * dim];
            let value = match T::as_f32(src) {
                Some(value) => value,
                None => {
                    T::widen(src, &mut row);
                    &row
                }
            };
            for h in 0..g {
                let p = scores[h * BLOCK + j];
                for (a, &x) in acc[h * dim..(h + 1) * dim].iter_mut().zip(value) {
                    *a += p * x;
                }
            }
        }
    }
    Partial { max, sum, acc }
}

/// Merges the partials of one group (log-sum-exp) and normalizes into `out` (`[G, D]`); no
/// partial (no key) gives zeros.
fn merge_parts(parts: &[Partial], dim: usize, out: &mut [f32]) {
    let g = out.len() / dim;
    for h in 0..g {
        let m = parts
            .iter()
            .map(|p| p.max[h])
            .fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * dim..(h + 1) * dim];
        o.iter_mut().for_each(|x| *x = 0.0);
        let mut sum = 0f32;
        for p in parts {
            if p.sum[h] == 0.0 {
                continue;
            }
            let w = (p.max[h] - m).exp();
            sum += p.sum[h] * w;
            for (x, &a) in o.iter_mut().zip(&p.acc[h * dim..(h + 1) * dim]) {
                *x += a * w;
            }
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

impl DecodeOp {
    fn dims(&self, q: &Layout) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
        let (b, hq, dim) = q.shape().dims3()?;
        let (kb, hkv, cap, kd) = self.k_cache.dims4()?;
        if kb != b || kd != dim || hq % hkv != 0 || self.v_cache.dims() != self.k_cache.dims() {
            candle_core::bail!(
                "decode: q {:?} does not match cache {:?}",
                q.shape(),
                self.k_cache.shape()
            );
        }
        if let Some(means) = &self.means {
            let expect = [2, b, hkv, self.n_partitions, dim];
            if means.dims() != expect || means.dtype() != self.k_cache.dtype() {
                candle_core::bail!(
                    "decode: partition means {:?} {:?}, expected {expect:?} {:?}",
                    means.dims(),
                    means.dtype(),
                    self.k_cache.dtype()
                );
            }
        }
        if self.seqs.len() != b
            || self
                .seqs
                .iter()
                .any(|s| s.len > cap || s.indexed_end > s.len)
        {
            candle_core::bail!(
                "decode: sequence extents {:?} exceed capacity {cap}",
                self.seqs
            );
        }
        if let (Some(partitions), Some(probes)) = (&self.partitions, &self.probes) {
            match partitions {
                Partitions::Directory(dir) => {
                    let row = self.n_partitions + 1 + cap;
                    if dir.dims() != [b, hkv, row] {
                        candle_core::bail!(
                            "decode: directory {:?}, expected [{b}, {hkv}, {row}]",
                            dir.dims()
                        );
                    }
                }
                Partitions::Pages(size) => {
                    if *size == 0 || *size > cap.max(1) {
                        candle_core::bail!("decode: pages of {size} positions (1..={cap})");
                    }
                    if self.means.is_some() {
                        candle_core::bail!("decode: partition means need a directory, not pages");
                    }
                }
            }
            match probes.dims() {
                &[pb, heads, _] if pb == b && (heads == hq || heads == hkv) => {}
                other => candle_core::bail!(
                    "decode: probes {other:?}, expected [{b}, {hq}, ℓ] (one list per query \
                     head) or [{b}, {hkv}, ℓ] (one per KV group)"
                ),
            }
        }
        Ok((b, hq, hkv, cap, dim))
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_typed<T: Elem>(
        &self,
        q: &[T],
        (k, v): (&[T], &[T]),
        dir: Option<&[u32]>,
        probes: Option<&[u32]>,
        means: Option<&[T]>,
        (b, hq, hkv, cap, dim): (usize, usize, usize, usize, usize),
    ) -> Vec<T> {
        let g = hq / hkv;
        let c = self.n_partitions;
        // A group's probes: G lists (one per query head) or one it shares (`dims` checked which).
        let per_group = probes.map_or(0, |p| p.len() / (b * hkv));
        let row = c + 1 + cap;
        let groups = b * hkv;
        let page = match &self.partitions {
            Some(Partitions::Pages(size)) => Some(*size),
            _ => None,
        };
        let estimate = means.is_some();
        let reads: Vec<GroupReads> = (0..groups)
            .into_par_iter()
            .map(|i| {
                let seq = self.seqs[i / hkv];
                let pages = page
                    .filter(|_| probes.is_some())
                    .map(|size| page_offsets(seq, self.sinks, size, c));
                let extents = match (&pages, dir) {
                    (Some(pages), _) => Some(Extents {
                        offsets: pages,
                        perm: None,
                    }),
                    (None, Some(dir)) => {
                        let (offsets, perm) = dir[i * row..(i + 1) * row].split_at(c + 1);
                        Some(Extents {
                            offsets,
                            perm: Some(perm),
                        })
                    }
                    (None, None) => None,
                };
                let group_probes = probes.map(|p| &p[i * per_group..(i + 1) * per_group]);
                group_reads(seq, self.sinks, extents.zip(group_probes), c, cap, estimate)
            })
            .collect();
        // Per group: its key list in pieces of SPLIT, then the unread partitions' means when
        // estimated (sparse steps only).
        let tasks: Vec<(usize, Task<T>)> = reads
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                let keys = (0..r.ids.len())
                    .step_by(SPLIT)
                    .map(move |s| (i, Task::Keys(s)));
                let means = r.unread.as_ref().zip(means);
                keys.chain(means.map(|(unread, means)| (i, Task::Means(unread, means))))
            })
            .collect();
        let parts: Vec<Partial> = tasks
            .par_iter()
            .map(|(i, task)| {
                let i = *i;
                let qg: Vec<f32> = q[i * g * dim..(i + 1) * g * dim]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                match task {
                    Task::Keys(s) => {
                        let kv = i * cap * dim..(i + 1) * cap * dim;
                        let ids = &reads[i].ids;
                        let rows = (&k[kv.clone()], &v[kv]);
                        let piece = &ids[*s..(s + SPLIT).min(ids.len())];
                        attend_part(&qg, rows, piece, None, dim, self.scale)
                    }
                    Task::Means((unread, ln_n), means) => {
                        let half = groups * c * dim;
                        let at = i * c * dim..(i + 1) * c * dim;
                        let rows = (&means[at.clone()], &means[half + at.start..half + at.end]);
                        attend_part(&qg, rows, unread, Some(ln_n), dim, self.scale)
                    }
                }
            })
            .collect();
        let mut out = vec![0f32; b * hq * dim];
        let mut first = 0;
        for (i, out_group) in out.chunks_mut(g * dim).enumerate() {
            let n = tasks[first..].iter().take_while(|t| t.0 == i).count();
            merge_parts(&parts[first..first + n], dim, out_group);
            first += n;
        }
        out.into_iter().map(T::from_f32).collect()
    }
}

/// Read-locks a held tensor's CPU storage and runs `f` on its contiguous u32 data.
fn with_u32<R>(
    tensor: Option<&Tensor>,
    f: impl FnOnce(Option<&[u32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let Some(tensor) = tensor else {
        return f(None);
    };
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::U32(data)) => f(Some(contiguous_slice(data, layout)?)),
        _ => candle_core::bail!("decode: index tensors must be u32 on the CPU"),
    }
}

impl CustomOp1 for DecodeOp {
    fn name(&self) -> &'static str {
        "saap-decode"
    }

    fn cpu_fwd(&self, q: &CpuStorage, q_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if self.advance.is_some() {
            // The extents the recorded step was given, moved on by the replayed steps.
            let steps = replayed_steps(self.advance.as_ref(), self.seqs.len())?;
            let mut op = self.clone();
            op.advance = None;
            for (seq, n) in op.seqs.iter_mut().zip(steps) {
                seq.len += n;
            }
            return op.cpu_fwd(q, q_l);
        }
        let dims = self.dims(q_l)?;
        let shape = q_l.shape().clone();
        let (k_st, k_l) = self.k_cache.storage_and_layout();
        let (v_st, v_l) = self.v_cache.storage_and_layout();
        let (Storage::Cpu(k_st), Storage::Cpu(v_st)) = (&*k_st, &*v_st) else {
            candle_core::bail!("decode: cache is not on the CPU");
        };
        let means = self.means.as_ref().map(Tensor::storage_and_layout);
        let dir = match &self.partitions {
            Some(Partitions::Directory(dir)) => Some(dir),
            _ => None,
        };
        with_u32(dir, |dir| {
            with_u32(self.probes.as_ref(), |probes| {
                macro_rules! typed {
                    ($variant:ident, $q:ident, $k:ident, $v:ident) => {{
                        let means = match &means {
                            None => None,
                            Some((st, l)) => match &**st {
                                Storage::Cpu(CpuStorage::$variant(m)) => {
                                    Some(contiguous_slice(m, l)?)
                                }
                                _ => candle_core::bail!(
                                    "decode: partition means must be on the CPU in the cache's type"
                                ),
                            },
                        };
                        CpuStorage::$variant(self.cpu_typed(
                            contiguous_slice($q, q_l)?,
                            (contiguous_slice($k, k_l)?, contiguous_slice($v, v_l)?),
                            dir,
                            probes,
                            means,
                            dims,
                        ))
                    }};
                }
                let out = match (q, k_st, v_st) {
                    (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                        typed!(F32, q, k, v)
                    }
                    (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                        typed!(BF16, q, k, v)
                    }
                    (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                        typed!(F16, q, k, v)
                    }
                    _ => candle_core::bail!(
                        "decode: query and cache must share one of f32, bf16, f16"
                    ),
                };
                Ok((out, shape.clone()))
            })
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(q_l)?;
        crate::cuda::decode(self, q, q_l, dims)
    }
}

/// Per item, the replayed steps of `advance` (`[B]` u32; zeros without), for the CPU kernels: they
/// read the count the CUDA kernels read on the device.
pub(crate) fn replayed_steps(
    advance: Option<&Tensor>,
    items: usize,
) -> candle_core::Result<Vec<usize>> {
    match advance {
        None => Ok(vec![0; items]),
        Some(counts) => {
            let counts = counts.to_vec1::<u32>()?;
            if counts.len() != items {
                candle_core::bail!("replayed steps: {} counts for {items} items", counts.len());
            }
            Ok(counts.into_iter().map(|c| c as usize).collect())
        }
    }
}

/// The last launch of a decode step recorded for replay: each batch item's count of replayed
/// steps (`[B]` u32, [`DecodeOp::advance`]) moves on by one, after every kernel that read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdvanceReplay;

impl InplaceOp1 for AdvanceReplay {
    fn name(&self) -> &'static str {
        "saap-advance-replay"
    }

    fn cpu_fwd(&self, counts: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::U32(counts), Some((start, end))) = (counts, layout.contiguous_offsets())
        else {
            candle_core::bail!("advance: counts must be contiguous u32");
        };
        counts[start..end].iter_mut().for_each(|c| *c += 1);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        counts: &mut candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::advance_replay(counts, layout)
    }
}
