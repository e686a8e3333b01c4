//! Quest (Tang et al. 2024), a training-free selector run through the same decode op and kernels
//! as Saap ([`crate::Routing::Quest`]).
//!
//! The indexed positions `sinks..indexed_end` of each sequence are cut into pages of
//! [`QUEST_PAGE`] tokens, page `p` holding positions `sinks + 16p ..` up to the next page or the
//! item's `indexed_end`. Per (batch item, KV head, page) the op keeps the elementwise min and max
//! of the page's post-RoPE keys ([`PageScore::Bound`]) or their mean ([`PageScore::Mean`], kept
//! as min = max), recomputed only for the pages a window merge touches. The decode
//! op reads the chosen pages as [`Partitions::Pages`](crate::attend::Partitions::Pages): sinks ∪
//! chosen pages ∪ window, as it reads Saap's partitions, with no directory to keep.
//!
//! With [`PageLayout::Partitions`] the pages are instead each partition's list of the index cut
//! into pages of 16 (partition by partition, each list in position order), kept as a page
//! directory over the index's perm that the decode op reads as it reads Saap's partitions
//! ([`Partitions::Directory`](crate::attend::Partitions::Directory)); every merge recomputes
//! them, since a partition that gains a page shifts the numbers of the pages after it.

use crate::attend::SeqExtent;
use crate::classify::top_probes;
use crate::config::{PageScore, MAX_CANDLE_SORT, MAX_QUEST_PAGES, QUEST_PAGE};
use crate::error::{Result, SaapError};
use candle_core::{DType, Device, Tensor};

/// Pages whose bounds are computed in one pass: bounds the temporaries of a long prompt to
/// 8192 rows of f32 keys per KV head.
const PAGES_PER_PASS: usize = 512;

/// Pages over an item's indexed region (the last one may be partial).
pub(crate) fn pages_of(seq: &SeqExtent, sinks: usize) -> usize {
    seq.indexed_end.saturating_sub(sinks).div_ceil(QUEST_PAGE)
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
    let (b, hq, d) = q.dims3()?;
    let (mb, hkv, p, md) = min.dims4()?;
    if mb != b || md != d || hkv == 0 || hq % hkv != 0 || max.dims() != min.dims() {
        return Err(SaapError::Shape {
            name: "page bounds",
            expected: format!("min and max [{b}, Hkv dividing {hq}, P, {d}]"),
            got: min.dims().to_vec(),
        });
    }
    let q = q.to_dtype(DType::F32)?.reshape((b, hkv, hq / hkv, d))?;
    // max(q·lo, q·hi) per dimension is q·hi where q > 0 and q·lo elsewhere: two GEMMs.
    let positive = q.relu()?;
    let negative = (&q - &positive)?;
    let scores =
        (positive.matmul(&max.transpose(2, 3)?)? + negative.matmul(&min.transpose(2, 3)?)?)?;
    Ok(scores.reshape((b, hq, p))?)
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
}

/// Where [`QuestPages::refresh`] cuts its pages.
#[derive(Clone, Copy)]
pub(crate) enum PageCut<'a> {
    /// Consecutive indexed positions (Quest's).
    Consecutive,
    /// Each partition's list of the index directory `[B, Hkv, C + 1 + cap]` (offsets then perm)
    /// of C partitions.
    Partitions {
        dir: &'a Tensor,
        n_partitions: usize,
    },
}

impl QuestPages {
    /// Pages of `seqs` over the post-RoPE key cache `k` (`[B, Hkv, cap, D]`), cut as `cut` says,
    /// keeping what `score` needs. Consecutive pages before page `first` are taken from `old`
    /// (unchanged keys, kept for the same `score`), the others computed; without `old`, all.
    /// Partition pages are all computed.
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
        let mut page_keys = vec![QUEST_PAGE as f64; b];
        let (rows, n_pages, kept) = match cut {
            PageCut::Consecutive => {
                let n_pages = seqs.iter().map(|s| pages_of(s, sinks)).max().unwrap_or(0);
                let kept = old.map_or(0, |old| first.min(old.n_pages()).min(n_pages));
                (PageRows::Consecutive { seqs, sinks }, n_pages, kept)
            }
            PageCut::Partitions { dir, n_partitions } => {
                let layout = PartitionPages::of(dir, n_partitions)?;
                page_keys = layout.page_keys;
                let perm = dir.narrow(2, n_partitions + 1, k.dim(2)?)?.contiguous()?;
                let rows = PageRows::Partitions {
                    offsets: layout.offsets,
                    filled: layout.filled,
                    perm,
                };
                (rows, layout.n_pages, 0)
            }
        };
        let (mut lows, mut highs) = (Vec::new(), Vec::new());
        if let (Some(old), true) = (old, kept > 0) {
            lows.push(old.min.narrow(2, 0, kept)?);
            if let Some(max) = &old.max {
                highs.push(max.narrow(2, 0, kept)?);
            }
        }
        for from in (kept..n_pages).step_by(PAGES_PER_PASS) {
            let n = PAGES_PER_PASS.min(n_pages - from);
            let (keys, valid) = rows.get(k, from, n)?;
            match score {
                PageScore::Bound => {
                    let (lo, hi) = bounds(&keys, &valid, n)?;
                    lows.push(lo);
                    highs.push(hi);
                }
                PageScore::Mean => lows.push(means(&keys, &valid, n)?),
            }
        }
        let join = |parts: Vec<Tensor>| -> Result<Tensor> {
            Ok(match parts.len() {
                0 => Tensor::zeros((b, hkv, 0, d), DType::F32, dev)?,
                _ => Tensor::cat(&parts, 2)?,
            })
        };
        let (filled, dir) = match rows {
            PageRows::Consecutive { .. } => (page_mask(seqs, sinks, 0, n_pages, hkv, dev)?, None),
            PageRows::Partitions {
                offsets,
                filled,
                perm,
            } => (filled, Some(Tensor::cat(&[&offsets, &perm], 2)?)),
        };
        Ok(Self {
            min: join(lows)?,
            max: match score {
                PageScore::Bound => Some(join(highs)?),
                PageScore::Mean => None,
            },
            filled,
            dir,
            page_keys,
        })
    }

    /// The keys of batch item `b`'s average non-empty page (16 when it has none).
    pub(crate) fn page_keys(&self, b: usize) -> f64 {
        self.page_keys.get(b).copied().unwrap_or(QUEST_PAGE as f64)
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
        })
    }

    /// The pages of batch items `rows` (`[n]` u32), in that order (P stays: a page past a kept
    /// item's indexed end is marked empty, as in any ragged batch).
    pub(crate) fn select(&self, rows: &Tensor) -> Result<Self> {
        let select = |t: &Tensor| t.index_select(rows, 0);
        let page_keys = rows
            .to_vec1::<u32>()?
            .iter()
            .map(|&b| self.page_keys(b as usize))
            .collect();
        Ok(Self {
            page_keys,
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
        route(q, &self.min, self.max(), &self.filled, n_pages)
    }
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
/// group's first head); candle ops elsewhere. Device work only: nothing is read back, so the
/// step can be recorded for replay.
///
/// # Errors
/// [`SaapError::Shape`] unless the bounds fit `q` (see [`page_scores`]); [`SaapError::Config`]
/// when `n_pages` or P is 0, or on a CUDA device whose kernels cannot take this shape with more
/// than [`MAX_CANDLE_SORT`] pages; [`SaapError::Candle`] when `filled` does not fit or a tensor
/// operation fails.
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
    if q.device().is_cuda() && p > MAX_CANDLE_SORT {
        return Err(SaapError::Config(format!(
            "Quest over {p} pages: this GPU cannot run Quest's kernels for this shape, and \
             candle's CUDA sort ranks at most {MAX_CANDLE_SORT}"
        )));
    }
    let scores = page_scores(q, min, max)?;
    let g = hq / hkv;
    let dev = q.device();
    let scores = scores.reshape((b, hkv, g, p))?.max(2)?;
    let unread = Tensor::full(f32::NEG_INFINITY, (b, hkv, p), dev)?;
    let ranked = filled.where_cond(&scores, &unread)?;
    let (top, _) = top_probes(&ranked, k)?.sort_last_dim(true)?;
    let empty = Tensor::full(p as u32, top.shape(), dev)?;
    let probes = filled.gather(&top, 2)?.where_cond(&top, &empty)?;
    Ok((probes, scores))
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

/// `[B, Hkv, n, D]` f32 min and max of `n` pages of 16 rows each of `keys` (`[B, Hkv, 16n, D]`
/// f32), over the rows `valid` marks (`[B, 1 or Hkv, 16n, 1]` u8); a page with no valid row
/// holds zeros.
fn bounds(keys: &Tensor, valid: &Tensor, n: usize) -> Result<(Tensor, Tensor)> {
    let (b, hkv, _, d) = keys.dims4()?;
    let dev = keys.device();
    let shape = keys.shape().clone();
    let rows = valid.broadcast_as(&shape)?;
    let fill = |x: f32| Tensor::full(x, (), dev)?.broadcast_as(&shape);
    let paged = (b, hkv, n, QUEST_PAGE, d);
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
        .reshape((b, heads, n, QUEST_PAGE))?
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
fn means(keys: &Tensor, valid: &Tensor, n: usize) -> Result<Tensor> {
    let (b, hkv, _, d) = keys.dims4()?;
    let heads = valid.dim(1)?;
    let valid = valid.to_dtype(DType::F32)?;
    let sums = keys
        .broadcast_mul(&valid)?
        .reshape((b, hkv, n, QUEST_PAGE, d))?
        .sum(3)?;
    // Keys per page, at least one so that an empty page divides its zeros by 1.
    let counts = valid
        .reshape((b, heads, n, QUEST_PAGE))?
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
    /// Page offsets `[B, Hkv, P + 1]` u32 into the perm `[B, Hkv, cap]` u32, and which pages
    /// hold keys (`[B, Hkv, P]` u8).
    Partitions {
        offsets: Tensor,
        filled: Tensor,
        perm: Tensor,
    },
}

impl PageRows<'_> {
    /// The keys of pages `first..first + n` of every item of `k` (`[B, Hkv, cap, D]`), 16 rows
    /// per page, as f32 `[B, Hkv, 16n, D]`, and whether each row is one of the page's keys:
    /// `[B, 1, 16n, 1]` u8 for consecutive pages (alike in every head), `[B, Hkv, 16n, 1]` for
    /// partition pages.
    fn get(&self, k: &Tensor, first: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let (b, hkv, cap, d) = k.dims4()?;
        let span = QUEST_PAGE * n;
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
            PageRows::Partitions { offsets, perm, .. } => {
                let starts = offsets.narrow(2, first, n)?.unsqueeze(3)?;
                let ends = offsets.narrow(2, first + 1, n)?.unsqueeze(3)?;
                let slot = Tensor::arange(0u32, QUEST_PAGE as u32, k.device())?
                    .reshape((1, 1, 1, QUEST_PAGE))?;
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

/// Partition pages of an index directory: each partition's list cut into pages of
/// [`QUEST_PAGE`] from its start (its last page may be short), partition by partition.
struct PartitionPages {
    /// `[B, Hkv, P + 1]` u32: the pages' offsets into the perm (a head with fewer pages repeats
    /// its end: empty pages).
    offsets: Tensor,
    /// `[B, Hkv, P]` u8: whether the page holds keys. Built on the host with the offsets: with
    /// P = 0 a device comparison would launch a kernel over no element, which CUDA refuses.
    filled: Tensor,
    /// P, the most pages of any head.
    n_pages: usize,
    /// Per batch item, the keys of its average non-empty page.
    page_keys: Vec<f64>,
}

impl PartitionPages {
    /// The pages of `dir` (`[B, Hkv, C + 1 + cap]`, C = `n_partitions`), from one small
    /// read-back (the offsets).
    ///
    /// # Errors
    /// [`SaapError::Config`] for more than [`MAX_QUEST_PAGES`] pages in a head;
    /// [`SaapError::Candle`] when the offsets cannot be read or the tensors made.
    fn of(dir: &Tensor, n_partitions: usize) -> Result<Self> {
        let (b, hkv, _) = dir.dims3()?;
        let offsets = dir
            .narrow(2, 0, n_partitions + 1)?
            .contiguous()?
            .to_vec3::<u32>()?;
        let heads: Vec<Vec<u32>> = offsets
            .iter()
            .flatten()
            .map(|off| {
                let mut starts: Vec<u32> = off
                    .windows(2)
                    .flat_map(|w| (w[0]..w[1]).step_by(QUEST_PAGE))
                    .collect();
                starts.push(off[n_partitions]);
                starts
            })
            .collect();
        let n_pages = heads.iter().map(|s| s.len() - 1).max().unwrap_or(0);
        if n_pages > MAX_QUEST_PAGES {
            return Err(SaapError::Config(format!(
                "Quest routing over {n_pages} partition pages; at most {MAX_QUEST_PAGES} are \
                 supported"
            )));
        }
        let page_keys = heads
            .chunks(hkv.max(1))
            .zip(&offsets)
            .map(|(item, off)| {
                let pages: usize = item.iter().map(|s| s.len() - 1).sum();
                let keys: u32 = off.iter().map(|o| o[n_partitions]).sum();
                match pages {
                    0 => QUEST_PAGE as f64,
                    _ => f64::from(keys) / pages as f64,
                }
            })
            .collect();
        let filled: Vec<u8> = heads
            .iter()
            .flat_map(|starts| (0..n_pages).map(move |p| u8::from(p + 1 < starts.len())))
            .collect();
        let flat: Vec<u32> = heads
            .into_iter()
            .flat_map(|mut starts| {
                let end = *starts.last().expect("the end is pushed");
                starts.resize(n_pages + 1, end);
                starts
            })
            .collect();
        let dev = dir.device();
        Ok(Self {
            offsets: Tensor::from_vec(flat, (b, hkv, n_pages + 1), dev)?,
            filled: Tensor::from_vec(filled, (b, hkv, n_pages), dev)?,
            n_pages,
            page_keys,
        })
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
            let pages = pages_of(s, sinks);
            (0..heads).flat_map(move |_| (first..first + n).map(move |p| u8::from(p < pages)))
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seqs.len(), heads, n), dev)?)
}
