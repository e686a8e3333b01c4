//! Quest (Tang et al. 2024), a training-free selector run through the same decode op and kernels
//! as Saap ([`crate::Routing::Quest`]).
//!
//! The indexed positions `sinks..indexed_end` of each sequence are cut into pages of
//! [`QUEST_PAGE`] tokens, page `p` holding positions `sinks + 16p ..` up to the next page or the
//! item's `indexed_end`. Per (batch item, KV head, page) the op keeps the elementwise min and max
//! of the page's post-RoPE keys ([`PageScore::Bound`]) or their mean ([`PageScore::Mean`], kept
//! as min = max; with [`PageScore::Shares`] also each page's count of keys, ranked by
//! [`route_by_shares`]), recomputed only for the pages a window merge touches. The decode
//! op reads the chosen pages as [`Partitions::Pages`](crate::attend::Partitions::Pages): sinks ∪
//! chosen pages ∪ window, as it reads Saap's partitions, with no directory to keep.
//!
//! With [`PageLayout::Partitions`](crate::PageLayout::Partitions) the pages are instead each
//! partition's list of the index cut into pages of the layout's size (partition by partition,
//! each list in position order), kept as a page directory over the index's perm that the decode
//! op reads as it reads Saap's partitions
//! ([`Partitions::Directory`](crate::attend::Partitions::Directory)).
//! A merge computes the pages whose keys it changed (each grown partition's last page and its new
//! ones) and moves the others to their new numbers: a partition that gains a page shifts those
//! of the pages after it.

use crate::attend::SeqExtent;
use crate::classify::top_probes;
use crate::config::{PageScore, MAX_CANDLE_SORT, MAX_QUEST_PAGES, QUEST_PAGE};
use crate::error::{Result, SaapError};
use candle_core::{DType, Device, Tensor};

/// Pages whose bounds are computed in one pass: bounds the temporaries of a long prompt to
/// 8192 rows of f32 keys per KV head.
const PAGES_PER_PASS: usize = 512;

/// Pages of `page` keys over an item's indexed region (the last one may be partial).
pub(crate) fn pages_of(seq: &SeqExtent, sinks: usize, page: usize) -> usize {
    seq.indexed_end.saturating_sub(sinks).div_ceil(page)
}

/// Quest page scores of post-RoPE queries: for query head `h` (of KV group `h / G`) and page
/// `p`, `Σ_d max(q_d·min_d, q_d·max_d)`, which is at least `q·k` for every key `k` of the page
/// since `min_d <= k_d <= max_d`.
///
/// `q`: `[B, Hq, D]`; `min`, `max`: `[B, Hkv, P, D]` f32 (see
/// [`crate::SaapAttention::page_bounds`]). Returns `[B, Hq, P]` f32.
///
/// # Errors
/// [`SaapError::Shape`] unless the shapes fit (`Hkv` dividing `Hq`, same `B` and `D`);
/// [`SaapError::Candle`] when a tensor operation fails.
pub fn page_scores(q: &Tensor, min: &Tensor, max: &Tensor) -> Result<Tensor> {
    let (q, [b, hkv, g, p]) = grouped(q, min, max.dims(), "page bounds")?;
    // max(q·lo, q·hi) per dimension is q·hi where q > 0 and q·lo elsewhere: two GEMMs.
    let positive = q.relu()?;
    let negative = (&q - &positive)?;
    let scores =
        (positive.matmul(&max.transpose(2, 3)?)? + negative.matmul(&min.transpose(2, 3)?)?)?;
    Ok(scores.reshape((b, hkv * g, p))?)
}

/// Queries `q` (`[B, Hq, D]`) as f32 `[B, Hkv, G, D]`, each KV group's G heads together, for
/// pages `pages` (`[B, Hkv, P, D]`, every page tensor of the route of dims `all`), with
/// `[B, Hkv, G, P]`.
///
/// # Errors
/// [`SaapError::Shape`] named `name` unless the pages share `B` and `D` with `q`, `Hkv` divides
/// `Hq` and every page tensor has the dims of `pages`; [`SaapError::Candle`] when `q` is not 3-D,
/// `pages` not 4-D or a tensor operation fails.
fn grouped(
    q: &Tensor,
    pages: &Tensor,
    all: &[usize],
    name: &'static str,
) -> Result<(Tensor, [usize; 4])> {
    let (b, hq, d) = q.dims3()?;
    let (pb, hkv, p, pd) = pages.dims4()?;
    if pb != b || pd != d || hkv == 0 || hq % hkv != 0 || all != pages.dims() {
        return Err(SaapError::Shape {
            name,
            expected: format!("[{b}, Hkv dividing {hq}, P, {d}], alike"),
            got: pages.dims().to_vec(),
        });
    }
    let g = hq / hkv;
    Ok((
        q.to_dtype(DType::F32)?.reshape((b, hkv, g, d))?,
        [b, hkv, g, p],
    ))
}

/// The page state of one op: what each page keeps of its keys and which pages hold keys.
#[derive(Debug)]
pub(crate) struct QuestPages {
    /// `[B, Hkv, P, D]` f32: elementwise min of each page's post-RoPE keys, or their mean with
    /// [`PageScore::Mean`]; P pages cover the longest indexed region of the batch, and a page
    /// past an item's indexed end holds zeros.
    pub(crate) min: Tensor,
    /// `[B, Hkv, P, D]` f32: elementwise max, likewise; `None` with [`PageScore::Mean`], where
    /// the max is the mean too (one tensor, not two copies).
    max: Option<Tensor>,
    /// `[B, Hkv, P]` u8: whether the page holds keys of its item (ragged batches).
    filled: Tensor,
    /// With [`PageLayout::Partitions`](crate::PageLayout::Partitions), `[B, Hkv, P + 1 + cap]`
    /// u32: the pages' offsets into the index's perm, then that perm; page `p` holds
    /// `perm[offsets[p]..offsets[p + 1]]` (pages past a head's own are empty).
    pub(crate) dir: Option<Tensor>,
    /// Per batch item, the keys of its average non-empty page: 16 for consecutive pages (their
    /// budget counts whole pages), less for partition pages, each partition's last being short.
    page_keys: Vec<f64>,
    /// For partition pages, the index's partition offsets they were cut from (C + 1 per
    /// (batch item, KV head), `b·Hkv + h`), kept on the host so that the next merge recomputes
    /// only the pages it changes.
    partition_offsets: Option<Vec<Vec<u32>>>,
    /// Keys per page (the last of a partition's may hold fewer).
    page: usize,
    /// With [`PageScore::Shares`], `[B, Hkv, P]` f32: the keys each page holds (0 for a page
    /// holding none), which weigh its mean in a head's estimated shares.
    sizes: Option<Tensor>,
}

/// Where [`QuestPages::refresh`] cuts its pages.
#[derive(Clone, Copy)]
pub(crate) enum PageCut<'a> {
    /// Consecutive indexed positions (Quest's).
    Consecutive,
    /// Each partition's list of the index directory `[B, Hkv, C + 1 + cap]` (offsets then perm)
    /// of C partitions, in pages of `page` keys.
    Partitions {
        dir: &'a Tensor,
        n_partitions: usize,
        page: usize,
    },
}

impl QuestPages {
    /// Pages of `seqs` over the post-RoPE key cache `k` (`[B, Hkv, cap, D]`), cut as `cut` says,
    /// keeping what `score` needs. Consecutive pages before page `first` are taken from `old`
    /// (unchanged keys, kept for the same `score`), the others computed; without `old`, all.
    /// Partition pages that hold the same keys as one of `old`'s (kept for the same score and
    /// page size) are taken from it, the others computed (`first` does not apply: a partition
    /// that gains a page shifts the numbers of the pages after it).
    ///
    /// # Errors
    /// [`SaapError::Config`] for partition pages more than [`MAX_QUEST_PAGES`] per KV head;
    /// [`SaapError::Candle`] when a tensor operation fails.
    pub(crate) fn refresh(
        old: Option<&Self>,
        first: usize,
        k: &Tensor,
        seqs: &[SeqExtent],
        sinks: usize,
        score: PageScore,
        cut: PageCut<'_>,
    ) -> Result<Self> {
        let (b, hkv, _, d) = k.dims4()?;
        let dev = k.device();
        let page = match cut {
            PageCut::Consecutive => QUEST_PAGE,
            PageCut::Partitions { page, .. } => page,
        };
        let old =
            old.filter(|old| old.max.is_some() == (score == PageScore::Bound) && old.page == page);
        let PageCut::Partitions {
            dir, n_partitions, ..
        } = cut
        else {
            let n_pages = seqs
                .iter()
                .map(|s| pages_of(s, sinks, page))
                .max()
                .unwrap_or(0);
            let kept = old.map_or(0, |old| first.min(old.n_pages()).min(n_pages));
            let (mut lows, mut highs) = (Vec::new(), Vec::new());
            if let (Some(old), true) = (old, kept > 0) {
                lows.push(old.min.narrow(2, 0, kept)?);
                if let Some(max) = &old.max {
                    highs.push(max.narrow(2, 0, kept)?);
                }
            }
            let rows = PageRows::Consecutive { seqs, sinks };
            summarize(&rows, k, kept..n_pages, score, &mut lows, &mut highs)?;
            let (min, max) = (
                join(lows, (b, hkv, d), dev)?,
                join(highs, (b, hkv, d), dev)?,
            );
            let sizes = || {
                seqs.iter()
                    .flat_map(|s| {
                        let indexed = s.indexed_end.saturating_sub(sinks);
                        let item: Vec<f32> = (0..n_pages)
                            .map(|p| indexed.saturating_sub(p * page).min(page) as f32)
                            .collect();
                        std::iter::repeat_n(item, hkv).flatten()
                    })
                    .collect()
            };
            return Ok(Self {
                min,
                max: (score == PageScore::Bound).then_some(max),
                filled: page_mask(seqs, sinks, 0, n_pages, hkv, dev)?,
                dir: None,
                page_keys: vec![QUEST_PAGE as f64; b],
                partition_offsets: None,
                page,
                sizes: page_sizes(score, sizes, (b, hkv, n_pages), dev)?,
            });
        };
        let offsets = dir
            .narrow(2, 0, n_partitions + 1)?
            .contiguous()?
            .to_vec3::<u32>()?
            .into_iter()
            .flatten()
            .collect();
        let reuse = old.and_then(|old| Some((old.partition_offsets.as_deref()?, old.n_pages())));
        let plan = PagePlan::new(offsets, n_partitions, hkv, reuse, page)?;
        let n_pages = plan.n_pages;
        let upload = |v: Vec<u32>, n: usize| Tensor::from_vec(v, (b, hkv, n), dev);
        let sizes = || {
            plan.page_offsets
                .chunks(n_pages + 1)
                .flat_map(|head| head.windows(2).map(|w| (w[1] - w[0]) as f32))
                .collect()
        };
        let sizes = page_sizes(score, sizes, (b, hkv, n_pages), dev)?;
        let perm = dir.narrow(2, n_partitions + 1, k.dim(2)?)?.contiguous()?;
        let page_offsets = upload(plan.page_offsets, n_pages + 1)?;
        let filled = Tensor::from_vec(plan.filled, (b, hkv, n_pages), dev)?;
        let dir = Some(Tensor::cat(&[&page_offsets, &perm], 2)?);
        let (min, max) = if n_pages == 0 {
            // No kernel over no element (CUDA refuses one).
            let empty = Tensor::zeros((b, hkv, 0, d), DType::F32, dev)?;
            (empty.clone(), empty)
        } else {
            let r = plan.n_computed;
            let rows = PageRows::Partitions {
                starts: upload(plan.computed_starts, r)?,
                ends: upload(plan.computed_ends, r)?,
                perm,
                page,
            };
            let (mut lows, mut highs) = (Vec::new(), Vec::new());
            summarize(&rows, k, 0..r, score, &mut lows, &mut highs)?;
            // Page p of a head is row `source[p]` of the old pages followed by the computed ones.
            let source = upload(plan.source, n_pages)?
                .unsqueeze(3)?
                .broadcast_as((b, hkv, n_pages, d))?
                .contiguous()?;
            let reused = reuse.filter(|&(_, p)| p > 0);
            let place = |old: Option<&Tensor>, computed: Vec<Tensor>| -> Result<Tensor> {
                let mut parts: Vec<Tensor> = old
                    .filter(|_| reused.is_some())
                    .cloned()
                    .into_iter()
                    .collect();
                parts.extend(computed);
                Ok(Tensor::cat(&parts, 2)?.gather(&source, 2)?)
            };
            let min = place(old.map(|old| &old.min), lows)?;
            let max = match score {
                PageScore::Bound => place(old.and_then(|old| old.max.as_ref()), highs)?,
                PageScore::Mean | PageScore::Shares => min.clone(),
            };
            (min, max)
        };
        Ok(Self {
            min,
            max: (score == PageScore::Bound).then_some(max),
            filled,
            dir,
            page_keys: plan.page_keys,
            partition_offsets: Some(plan.partition_offsets),
            page,
            sizes,
        })
    }

    /// The keys of batch item `b`'s average non-empty page (a whole page when it has none).
    pub(crate) fn page_keys(&self, b: usize) -> f64 {
        self.page_keys.get(b).copied().unwrap_or(self.page as f64)
    }

    /// These pages over a cache grown to `dir`, the index directory `[B, Hkv, C + 1 + cap]` of C
    /// partitions at the new capacity: the capacity changes no page, only the perm that
    /// partition pages' directory holds.
    pub(crate) fn regrown(self, dir: Option<&Tensor>, n_partitions: usize) -> Result<Self> {
        let (Some(pages), Some(index)) = (&self.dir, dir) else {
            return Ok(self);
        };
        let cap = index.dim(2)? - n_partitions - 1;
        let offsets = pages.narrow(2, 0, self.n_pages() + 1)?;
        let perm = index.narrow(2, n_partitions + 1, cap)?;
        let dir = Tensor::cat(&[&offsets, &perm], 2)?;
        Ok(Self {
            dir: Some(dir),
            ..self
        })
    }

    /// A deep copy.
    pub(crate) fn copy(&self) -> Result<Self> {
        Ok(Self {
            min: self.min.copy()?,
            max: self.max.as_ref().map(Tensor::copy).transpose()?,
            filled: self.filled.copy()?,
            dir: self.dir.as_ref().map(Tensor::copy).transpose()?,
            page_keys: self.page_keys.clone(),
            partition_offsets: self.partition_offsets.clone(),
            page: self.page,
            sizes: self.sizes.as_ref().map(Tensor::copy).transpose()?,
        })
    }

    /// The pages of batch items `rows` (`[n]` u32), in that order (P stays: a page past a kept
    /// item's indexed end is marked empty, as in any ragged batch).
    pub(crate) fn select(&self, rows: &Tensor) -> Result<Self> {
        let select = |t: &Tensor| t.index_select(rows, 0);
        let items = rows.to_vec1::<u32>()?;
        let page_keys = items.iter().map(|&b| self.page_keys(b as usize)).collect();
        let hkv = self.min.dim(1)?;
        let partition_offsets = self.partition_offsets.as_ref().map(|heads| {
            items
                .iter()
                .flat_map(|&b| heads[b as usize * hkv..(b as usize + 1) * hkv].to_vec())
                .collect()
        });
        Ok(Self {
            page_keys,
            partition_offsets,
            page: self.page,
            sizes: self.sizes.as_ref().map(select).transpose()?,
            min: select(&self.min)?,
            max: self.max.as_ref().map(select).transpose()?,
            filled: select(&self.filled)?,
            dir: self.dir.as_ref().map(select).transpose()?,
        })
    }

    /// The elementwise max of the pages (the mean with [`PageScore::Mean`]).
    pub(crate) fn max(&self) -> &Tensor {
        self.max.as_ref().unwrap_or(&self.min)
    }

    /// P, the pages of the longest indexed region.
    pub(crate) fn n_pages(&self) -> usize {
        self.min.dims()[2]
    }

    /// [`route`] over these pages: `[B, Hkv, min(n_pages, P)]` u32 probes and `[B, Hkv, P]` f32
    /// group scores.
    pub(crate) fn route(&self, q: &Tensor, n_pages: usize) -> Result<(Tensor, Tensor)> {
        match &self.sizes {
            Some(sizes) => route_by_shares(q, &self.min, sizes, &self.filled, n_pages),
            None => route(q, &self.min, self.max(), &self.filled, n_pages),
        }
    }
}

/// The pages' `sizes` (`[B, Hkv, P]`, row-major), computed and uploaded when `score` ranks by
/// shares.
fn page_sizes(
    score: PageScore,
    sizes: impl FnOnce() -> Vec<f32>,
    shape: (usize, usize, usize),
    dev: &Device,
) -> Result<Option<Tensor>> {
    Ok(match score {
        PageScore::Shares => Some(Tensor::from_vec(sizes(), shape, dev)?),
        PageScore::Bound | PageScore::Mean => None,
    })
}

/// Quest's routing by the group's estimated shares ([`PageScore::Shares`]): for rotated
/// queries `q` (`[B, Hq, D]`) and the pages' mean keys `means` (`[B, Hkv, P, D]` f32) of `sizes`
/// keys (`[B, Hkv, P]` f32), a page's group score is `Σ_h exp(s·q_h·k̄_p − LSE_h)` over the KV
/// group's query heads, `LSE_h = log Σ_p′ sizes_p′·exp(s·q_h·k̄_p′)` and s = 1/√D — each head's
/// share of its mass per key were every key at its page's mean logit. The `n_pages` best pages
/// are listed as [`route`] lists them (page order, a slot whose page is not filled holds P),
/// with the group scores `[B, Hkv, P]` f32 (0 for pages not filled) for a finite check. Candle
/// ops score the pages; on a CUDA device Quest's selection kernels (those of [`route`]) pick the
/// best where they take the shape, candle's sort elsewhere.
///
/// # Errors
/// [`SaapError::Shape`] unless the means fit `q` (`[B, Hkv dividing Hq, P, D]`, see
/// [`page_scores`]);
/// [`SaapError::Config`] when `n_pages` or P is 0, or on a CUDA device whose selection kernels
/// cannot take this shape, with more than [`MAX_CANDLE_SORT`] pages;
/// [`SaapError::Candle`] when `sizes` or `filled` does not fit or a tensor operation fails.
pub fn route_by_shares(
    q: &Tensor,
    means: &Tensor,
    sizes: &Tensor,
    filled: &Tensor,
    n_pages: usize,
) -> Result<(Tensor, Tensor)> {
    let (q, [_, _, _, p]) = grouped(q, means, means.dims(), "page means")?;
    if n_pages == 0 || p == 0 {
        return Err(SaapError::Config(format!(
            "Quest by shares: {n_pages} of {p} pages per step (both must be at least 1)"
        )));
    }
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    // Each head's q·k̄ of every page: one GEMM (the bound's two halves coincide for a mean).
    let logits = (q.matmul(&means.transpose(2, 3)?)? * scale)?;
    // ln 0 = −inf: a page without keys takes no share.
    let weighed = logits.broadcast_add(&sizes.log()?.unsqueeze(2)?)?;
    let lse = weighed.log_sum_exp(3)?.unsqueeze(3)?;
    let shares = logits.broadcast_sub(&lse)?.exp()?.sum(2)?;
    // An item without pages has LSE −inf and NaN shares: its pages are not filled, and score 0.
    let scores = filled.where_cond(&shares, &shares.zeros_like()?)?;
    Ok((top_filled(&scores, filled, n_pages.min(p))?, scores))
}

/// Quest's routing of rotated queries `q` (`[B, Hq, D]`): the `n_pages` best pages of each KV
/// group listed in page order, one list the group's query heads share (the decode step reads a
/// group's union once), `[B, Hkv, min(n_pages, P)]` u32. A page's group score is the max of its
/// [`page_scores`] over the group's query heads; pages rank by (score descending, index ascending), pages whose `filled` is
/// 0 (no key of their item) and NaN scores as −∞, and a slot whose page is not filled holds P
/// (the kernels skip it). The list is in page order, not rank order: which pages, not their rank,
/// is Quest's answer (the decode step reads their union), and so the CUDA top-k needs no sort.
/// Also returns the group scores `[B, Hkv, P]` f32 before masking, for a finite check.
///
/// `min`, `max`: `[B, Hkv, P, D]` f32 page bounds; `filled`: `[B, Hkv, P]` u8. Two CUDA kernels
/// where [`route_on_kernels`] says so, with the same pages up to the order of f32 summation (a
/// NaN score of any query head makes its group's score NaN there; with candle ops, that of the
/// group's first head); candle ops elsewhere (on a CUDA device with the selection kernels where
/// they take the shape). Device work only: nothing is read back, so the step can be recorded for
/// replay.
///
/// # Errors
/// [`SaapError::Shape`] unless the bounds fit `q` (see [`page_scores`]); [`SaapError::Config`]
/// when `n_pages` or P is 0, or on a CUDA device whose selection kernels cannot take this shape,
/// with more than [`MAX_CANDLE_SORT`] pages; [`SaapError::Candle`] when `filled` does not fit or
/// a tensor operation fails.
pub fn route(
    q: &Tensor,
    min: &Tensor,
    max: &Tensor,
    filled: &Tensor,
    n_pages: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, hq, _) = q.dims3()?;
    let (_, hkv, p, _) = min.dims4()?;
    let k = n_pages.min(p);
    #[cfg(feature = "cuda")]
    if route_on_kernels(q, min, max, filled, k) {
        return Ok(crate::cuda::quest::route(q, min, max, filled, k)?);
    }
    let scores = page_scores(q, min, max)?;
    let g = hq / hkv;
    let scores = scores.reshape((b, hkv, g, p))?.max(2)?;
    Ok((top_filled(&scores, filled, k)?, scores))
}

/// The `k` best of the group scores `scores` (`[B, Hkv, P]`) among the pages `filled` marks,
/// in page order, a slot without a filled page holding P: `[B, Hkv, k]` u32. On a CUDA device,
/// Quest's selection kernels where they take the shape; otherwise candle ops.
///
/// # Errors
/// [`SaapError::Config`] on a CUDA device whose selection kernels cannot take this shape, with
/// more than [`MAX_CANDLE_SORT`] pages.
fn top_filled(scores: &Tensor, filled: &Tensor, k: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::quest::top_supported(scores, filled, k) {
        return Ok(crate::cuda::quest::top(scores, filled, k)?);
    }
    let p = scores.dim(2)?;
    if scores.device().is_cuda() && p > MAX_CANDLE_SORT {
        return Err(SaapError::Config(format!(
            "Quest over {p} pages: this GPU cannot run Quest's selection kernels for this \
             shape, and candle's CUDA sort ranks at most {MAX_CANDLE_SORT}"
        )));
    }
    let unread = Tensor::full(f32::NEG_INFINITY, scores.shape(), scores.device())?;
    let ranked = filled.where_cond(scores, &unread)?;
    let (top, _) = top_probes(&ranked, k)?.sort_last_dim(true)?;
    let empty = Tensor::full(p as u32, top.shape(), scores.device())?;
    Ok(filled.gather(&top, 2)?.where_cond(&top, &empty)?)
}

/// Whether [`route`] runs its CUDA kernels for these inputs rather than candle ops: built with
/// the `cuda` feature, tensors on a CUDA device, and shapes the kernels cover (f32, bf16 or f16
/// queries, head dim 64 or 128, G up to 8, contiguous f32 bounds and u8 `filled`, the top-k's
/// shared memory within the device's limit).
pub fn route_on_kernels(
    q: &Tensor,
    min: &Tensor,
    max: &Tensor,
    filled: &Tensor,
    n_pages: usize,
) -> bool {
    #[cfg(feature = "cuda")]
    {
        let p = min.dims().get(2).copied().unwrap_or(0);
        crate::cuda::quest::supported(q, min, max, filled, n_pages.min(p))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, min, max, filled, n_pages);
        false
    }
}

/// Appends what `score` keeps of pages `range` of `rows` to `lows` (mins, or means) and `highs`
/// (maxes), [`PAGES_PER_PASS`] pages at a time.
fn summarize(
    rows: &PageRows<'_>,
    k: &Tensor,
    range: std::ops::Range<usize>,
    score: PageScore,
    lows: &mut Vec<Tensor>,
    highs: &mut Vec<Tensor>,
) -> Result<()> {
    for from in range.clone().step_by(PAGES_PER_PASS) {
        let n = PAGES_PER_PASS.min(range.end - from);
        let (keys, valid) = rows.get(k, from, n)?;
        let page = rows.page();
        match score {
            PageScore::Bound => {
                let (lo, hi) = bounds(&keys, &valid, n, page)?;
                lows.push(lo);
                highs.push(hi);
            }
            PageScore::Mean | PageScore::Shares => lows.push(means(&keys, &valid, n, page)?),
        }
    }
    Ok(())
}

/// `parts` joined along the pages, or no page of `[B, Hkv, 0, D]`.
fn join(parts: Vec<Tensor>, (b, hkv, d): (usize, usize, usize), dev: &Device) -> Result<Tensor> {
    Ok(match parts.len() {
        0 => Tensor::zeros((b, hkv, 0, d), DType::F32, dev)?,
        _ => Tensor::cat(&parts, 2)?,
    })
}

/// `[B, Hkv, n, D]` f32 min and max of `n` pages of `page` rows each of `keys`
/// (`[B, Hkv, n·page, D]` f32), over the rows `valid` marks (`[B, 1 or Hkv, n·page, 1]` u8); a
/// page with no valid row holds zeros.
fn bounds(keys: &Tensor, valid: &Tensor, n: usize, page: usize) -> Result<(Tensor, Tensor)> {
    let (b, hkv, _, d) = keys.dims4()?;
    let dev = keys.device();
    let shape = keys.shape().clone();
    let rows = valid.broadcast_as(&shape)?;
    let fill = |x: f32| Tensor::full(x, (), dev)?.broadcast_as(&shape);
    let paged = (b, hkv, n, page, d);
    let lo = rows
        .where_cond(keys, &fill(f32::INFINITY)?)?
        .reshape(paged)?
        .min(3)?;
    let hi = rows
        .where_cond(keys, &fill(f32::NEG_INFINITY)?)?
        .reshape(paged)?
        .max(3)?;
    // An empty page would keep ±inf, and 0·inf is NaN in a score: zeros (its score is masked).
    let heads = valid.dim(1)?;
    let filled = valid
        .reshape((b, heads, n, page))?
        .max_keepdim(3)?
        .broadcast_as(lo.shape())?;
    let zeros = lo.zeros_like()?;
    Ok((
        filled.where_cond(&lo, &zeros)?,
        filled.where_cond(&hi, &zeros)?,
    ))
}

/// `[B, Hkv, n, D]` f32 mean of each of `n` pages over the rows of [`bounds`]; a page with no
/// valid row holds zeros.
fn means(keys: &Tensor, valid: &Tensor, n: usize, page: usize) -> Result<Tensor> {
    let (b, hkv, _, d) = keys.dims4()?;
    let heads = valid.dim(1)?;
    let valid = valid.to_dtype(DType::F32)?;
    let sums = keys
        .broadcast_mul(&valid)?
        .reshape((b, hkv, n, page, d))?
        .sum(3)?;
    // Keys per page, at least one so that an empty page divides its zeros by 1.
    let counts = valid
        .reshape((b, heads, n, page))?
        .sum_keepdim(3)?
        .maximum(1f32)?;
    Ok(sums.broadcast_div(&counts)?)
}

/// The rows of a [`PageCut`] that [`bounds`] and [`means`] read.
enum PageRows<'a> {
    Consecutive {
        seqs: &'a [SeqExtent],
        sinks: usize,
    },
    /// Pages `perm[starts[i]..ends[i]]` (`[B, Hkv, R]` u32 each, at most `page` apart) of the
    /// perm `[B, Hkv, cap]` u32.
    Partitions {
        starts: Tensor,
        ends: Tensor,
        perm: Tensor,
        page: usize,
    },
}

impl PageRows<'_> {
    /// Rows per page.
    fn page(&self) -> usize {
        match self {
            PageRows::Consecutive { .. } => QUEST_PAGE,
            PageRows::Partitions { page, .. } => *page,
        }
    }

    /// The keys of pages `first..first + n` of every item of `k` (`[B, Hkv, cap, D]`), 16 rows
    /// per page, as f32 `[B, Hkv, 16n, D]`, and whether each row is one of the page's keys:
    /// `[B, 1, 16n, 1]` u8 for consecutive pages (alike in every head), `[B, Hkv, 16n, 1]` for
    /// partition pages.
    fn get(&self, k: &Tensor, first: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let (b, hkv, cap, d) = k.dims4()?;
        let span = self.page() * n;
        match self {
            PageRows::Consecutive { seqs, sinks } => {
                let start = sinks + QUEST_PAGE * first;
                // The last page may run past the cache: its missing rows are padding, masked
                // by `valid`.
                let rows = cap.saturating_sub(start).min(span);
                let mut keys = k.narrow(2, start, rows)?.to_dtype(DType::F32)?;
                if rows < span {
                    keys = keys.pad_with_zeros(2, 0, span - rows)?;
                }
                let valid: Vec<u8> = seqs
                    .iter()
                    .flat_map(|s| {
                        (start..start + span).map(move |pos| u8::from(pos < s.indexed_end))
                    })
                    .collect();
                let valid = Tensor::from_vec(valid, (b, 1, span, 1), k.device())?;
                Ok((keys, valid))
            }
            PageRows::Partitions {
                starts,
                ends,
                perm,
                page,
            } => {
                let starts = starts.narrow(2, first, n)?.unsqueeze(3)?;
                let ends = ends.narrow(2, first, n)?.unsqueeze(3)?;
                let slot =
                    Tensor::arange(0u32, *page as u32, k.device())?.reshape((1, 1, 1, *page))?;
                let at = starts.broadcast_add(&slot)?;
                let valid = at.broadcast_lt(&ends)?;
                // A slot past its page's end reads perm row 0 (masked out): always in range.
                let at = valid
                    .where_cond(&at, &at.zeros_like()?)?
                    .reshape((b, hkv, span))?;
                let positions = perm.gather(&at, 2)?;
                let index = positions
                    .unsqueeze(3)?
                    .broadcast_as((b, hkv, span, d))?
                    .contiguous()?;
                let keys = k.contiguous()?.gather(&index, 2)?.to_dtype(DType::F32)?;
                Ok((keys, valid.reshape((b, hkv, span, 1))?))
            }
        }
    }
}

/// Partition pages of an index directory, planned on the host: each partition's list cut into
/// pages of a given size from its start (its last page may be short), partition by partition,
/// and which of them must be computed. Per-head vectors are flattened `b·Hkv + h`.
struct PagePlan {
    /// The partition offsets the pages were cut from (C + 1 per head).
    partition_offsets: Vec<Vec<u32>>,
    /// P, the most pages of any head.
    n_pages: usize,
    /// `[B, Hkv, P + 1]`: the pages' offsets into the perm (a head with fewer pages repeats its
    /// end: empty pages).
    page_offsets: Vec<u32>,
    /// `[B, Hkv, P]`: whether the page holds keys.
    filled: Vec<u8>,
    /// R, the pages computed per head, the last always an empty one (for the padding).
    n_computed: usize,
    /// `[B, Hkv, R]`: the perm ranges of the pages to compute.
    computed_starts: Vec<u32>,
    computed_ends: Vec<u32>,
    /// `[B, Hkv, P]`: page p's row among the old pages (`< P_old`) or `P_old + i`, the `i`-th
    /// computed one.
    source: Vec<u32>,
    /// Per batch item, the keys of its average non-empty page.
    page_keys: Vec<f64>,
}

impl PagePlan {
    /// The pages of `page` keys of partition `offsets` (per head, C + 1 each, C =
    /// `n_partitions`). With `old` (the partition offsets the old pages were cut from, and their
    /// P), a page whose keys an old page held already is taken from it: a partition's list only
    /// grows at its tail, so its old whole pages keep their keys, and all its old pages when it
    /// did not grow.
    ///
    /// # Errors
    /// [`SaapError::Config`] for more than [`MAX_QUEST_PAGES`] pages in a head.
    fn new(
        offsets: Vec<Vec<u32>>,
        n_partitions: usize,
        hkv: usize,
        old: Option<(&[Vec<u32>], usize)>,
        page: usize,
    ) -> Result<Self> {
        let (page_keys, page) = (page as f64, page as u32);
        // Reuse only offsets of this shape (the same index and batch).
        let old = old.filter(|(old_offsets, _)| {
            old_offsets.len() == offsets.len()
                && old_offsets.iter().all(|o| o.len() == n_partitions + 1)
        });
        let old_pages = old.map_or(0, |(_, p)| p) as u32;
        let mut starts = Vec::with_capacity(offsets.len());
        let mut sources = Vec::with_capacity(offsets.len());
        let mut computed = Vec::with_capacity(offsets.len());
        for (head, off) in offsets.iter().enumerate() {
            let (mut head_starts, mut head_source, mut head_computed) = (vec![], vec![], vec![]);
            let mut old_base = 0u32;
            for c in 0..n_partitions {
                let (start, end) = (off[c], off[c + 1]);
                let old_len = old.map_or(0, |(old_offsets, _)| {
                    let o = &old_offsets[head];
                    o[c + 1] - o[c]
                });
                let kept = match old_len {
                    n if old.is_none() || n > end - start => 0,
                    n if n == end - start => n.div_ceil(page),
                    n => n / page,
                };
                for (j, from) in (start..end).step_by(page as usize).enumerate() {
                    head_starts.push(from);
                    let j = j as u32;
                    if j < kept {
                        head_source.push(old_base + j);
                    } else {
                        head_source.push(old_pages + head_computed.len() as u32);
                        head_computed.push((from, (from + page).min(end)));
                    }
                }
                old_base += old_len.div_ceil(page);
            }
            head_starts.push(off[n_partitions]);
            starts.push(head_starts);
            sources.push(head_source);
            computed.push(head_computed);
        }
        let n_pages = starts.iter().map(|s| s.len() - 1).max().unwrap_or(0);
        if n_pages > MAX_QUEST_PAGES {
            return Err(SaapError::Config(format!(
                "Quest routing over {n_pages} partition pages; at most {MAX_QUEST_PAGES} are \
                 supported"
            )));
        }
        let n_computed = computed.iter().map(Vec::len).max().unwrap_or(0) + 1;
        let empty = old_pages + n_computed as u32 - 1;
        let mut plan = Self {
            partition_offsets: Vec::new(),
            n_pages,
            page_offsets: Vec::new(),
            filled: Vec::new(),
            n_computed,
            computed_starts: Vec::new(),
            computed_ends: Vec::new(),
            source: Vec::new(),
            page_keys: Vec::new(),
        };
        for ((head_starts, mut head_source), mut head_computed) in
            starts.iter().zip(sources).zip(computed)
        {
            let own = head_starts.len() - 1;
            let end = head_starts[own];
            plan.page_offsets.extend(head_starts);
            plan.page_offsets
                .extend(std::iter::repeat_n(end, n_pages - own));
            plan.filled.extend((0..n_pages).map(|p| u8::from(p < own)));
            head_source.resize(n_pages, empty);
            plan.source.extend(head_source);
            head_computed.resize(n_computed, (0, 0));
            plan.computed_starts
                .extend(head_computed.iter().map(|r| r.0));
            plan.computed_ends.extend(head_computed.iter().map(|r| r.1));
        }
        plan.page_keys = starts
            .chunks(hkv.max(1))
            .zip(offsets.chunks(hkv.max(1)))
            .map(|(item, off)| {
                let pages: usize = item.iter().map(|s| s.len() - 1).sum();
                let keys: u32 = off.iter().map(|o| o[n_partitions]).sum();
                match pages {
                    0 => page_keys,
                    _ => f64::from(keys) / pages as f64,
                }
            })
            .collect();
        plan.partition_offsets = offsets;
        Ok(plan)
    }
}

/// `[B, heads, n]` u8: whether page `first + i` holds keys of item `b`.
fn page_mask(
    seqs: &[SeqExtent],
    sinks: usize,
    first: usize,
    n: usize,
    heads: usize,
    dev: &Device,
) -> Result<Tensor> {
    let mask: Vec<u8> = seqs
        .iter()
        .flat_map(|s| {
            let pages = pages_of(s, sinks, QUEST_PAGE);
            (0..heads).flat_map(move |_| (first..first + n).map(move |p| u8::from(p < pages)))
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seqs.len(), heads, n), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merge that grows one partition past a page boundary: the old whole page and the
    /// untouched partition's page are taken from the old pages, the grown partial page and the
    /// new one computed; a head with fewer pages is padded with the empty computed page.
    #[test]
    fn a_merge_recomputes_only_the_pages_it_changes() {
        let old = PagePlan::new(vec![vec![0, 20, 25], vec![0, 0, 3]], 2, 2, None, 16).unwrap();
        assert_eq!(old.n_pages, 3);
        // Rows among each head's own computed pages; R = 4, the last one empty for the padding.
        assert_eq!(old.source, [0, 1, 2, 0, 3, 3], "every page computed");
        let new = vec![vec![0, 40, 45], vec![0, 0, 3]];
        let plan =
            PagePlan::new(new, 2, 2, Some((&old.partition_offsets, old.n_pages)), 16).unwrap();
        assert_eq!(plan.n_pages, 4);
        assert_eq!(plan.page_offsets, [0, 16, 32, 40, 45, 0, 3, 3, 3, 3]);
        assert_eq!(plan.filled, [1, 1, 1, 1, 1, 0, 0, 0]);
        // Rows of the old pages (P_old = 3), then of the computed ones (3 + i); R = 3.
        assert_eq!(plan.source, [0, 3, 4, 2, 0, 5, 5, 5]);
        assert_eq!(plan.n_computed, 3);
        assert_eq!(plan.computed_starts, [16, 32, 0, 0, 0, 0]);
        assert_eq!(plan.computed_ends, [32, 40, 0, 0, 0, 0]);
        assert_eq!(plan.page_keys, [48.0 / 5.0]);
        // Lists of another shape (another index) are not reused.
        let other = PagePlan::new(vec![vec![0, 40, 45, 45], vec![0, 0, 3, 3]], 3, 2, None, 16);
        let plan = PagePlan::new(
            vec![vec![0, 40, 45], vec![0, 0, 3]],
            2,
            2,
            Some((&other.unwrap().partition_offsets, 4)),
            16,
        )
        .unwrap();
        assert_eq!(plan.source, [0, 1, 2, 3, 0, 4, 4, 4]);
        // Pages of 4: 10 keys make pages of 4, 4 and 2, 3 keys one page of 3.
        let fine = PagePlan::new(vec![vec![0, 10, 13]], 2, 1, None, 4).unwrap();
        assert_eq!(fine.page_offsets, [0, 4, 8, 10, 13]);
        assert_eq!(fine.page_keys, [13.0 / 4.0]);
    }
}
