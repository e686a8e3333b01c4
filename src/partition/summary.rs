//! Per-partition summaries of the indexed keys and values, for estimating the partitions a decode
//! step does not read (see [`crate::SaapAttention::set_estimate_unread`]).
//!
//! Per (batch item, KV head, partition) the op keeps the f32 sums of the partition's post-RoPE
//! keys and of its values, and their means in the cache's type. An unread partition `p` with
//! `n_p` keys then enters a query's softmax as one pseudo-key: logit `scale·q·k̄_p + ln n_p`, value
//! `v̄_p`. Since the mean of the keys' logits is the logit of their mean key,
//! `n_p·exp(scale·q·k̄_p)` is `n_p` times the geometric mean of the partition's weights: never above
//! its true mass (Jensen), exact when the keys agree. Offline it cut Saap's output error by 43–55%
//! on SmolLM2 (`bench/NOTES.md` §21).
//!
//! The sums follow the directory: at each merge the ids new to a partition's list (the tail at or
//! after the merged range's start, lists being sorted by position) are added in position order,
//! so the CPU and CUDA sums agree to the bit; the means are then recomputed from the sums and the
//! directory's counts.

use crate::elem::{contiguous_slice, contiguous_slice_mut, Elem};
use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;

/// The summaries of one op's sequences.
#[derive(Debug)]
pub(crate) struct Summaries {
    /// `[2, B, Hkv, C, D]` f32: sums of each partition's post-RoPE keys, then of its values.
    sums: Tensor,
    /// `[2, B, Hkv, C, D]` in the cache's type: `sums / n_p` (zeros for an empty partition), what
    /// the decode kernels read.
    pub(crate) means: Tensor,
}

impl Summaries {
    /// Zero summaries (no key indexed yet).
    pub(crate) fn new(
        shape: (usize, usize, usize, usize),
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (b, hkv, c, d) = shape;
        Ok(Self {
            sums: Tensor::zeros((2, b, hkv, c, d), DType::F32, device)?,
            means: Tensor::zeros((2, b, hkv, c, d), dtype, device)?,
        })
    }

    /// Adds the ids just merged into `dir` (`[B, Hkv, C + 1 + cap]`: item `b` merged
    /// `ranges[b]`) from the joint cache `kv` (`[2, B, Hkv, cap, D]`), then recomputes the means.
    pub(crate) fn add(
        &self,
        kv: &Tensor,
        dir: &Tensor,
        ranges: &[(usize, usize)],
    ) -> candle_core::Result<()> {
        let starts: Vec<Option<usize>> =
            ranges.iter().map(|&(s, e)| (e > s).then_some(s)).collect();
        self.sums.inplace_op3(kv, dir, &SumOp { starts })?;
        self.means.inplace_op3(&self.sums, dir, &MeanOp)
    }

    pub(crate) fn copy(&self) -> candle_core::Result<Self> {
        Ok(Self {
            sums: self.sums.copy()?,
            means: self.means.copy()?,
        })
    }

    /// The summaries of batch items `rows` (u32 indices), in that order.
    pub(crate) fn select(&self, rows: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            sums: self.sums.index_select(rows, 1)?,
            means: self.means.index_select(rows, 1)?,
        })
    }
}

/// Dimensions shared by both ops: `(rows = B·Hkv, C, cap, D)`, checked against the directory.
fn dims(summary: &Layout, dir: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let dims = summary.shape().dims();
    let (b, hkv, row) = dir.shape().dims3()?;
    let &[2, sb, sh, c, d] = dims else {
        candle_core::bail!("summaries: shape {dims:?} is not [2, B, Hkv, C, D]");
    };
    if (sb, sh) != (b, hkv) || row <= c {
        candle_core::bail!(
            "summaries {dims:?} do not match the directory {:?}",
            dir.shape()
        );
    }
    Ok((b * hkv, c, row - c - 1, d))
}

/// The ids of partition `c`'s list in a directory row (clamped to the capacity, as the decode
/// kernels clamp them).
fn list(dir_row: &[u32], c: usize, n_partitions: usize, cap: usize) -> &[u32] {
    let (offsets, perm) = dir_row.split_at(n_partitions + 1);
    let a = (offsets[c] as usize).min(cap);
    let b = (offsets[c + 1] as usize).min(cap);
    &perm[a..b.max(a)]
}

/// `sums += rows new to each list` (ids at or after `starts[item]`; `None`: nothing merged).
#[derive(Debug)]
pub(crate) struct SumOp {
    pub(crate) starts: Vec<Option<usize>>,
}

impl SumOp {
    /// `(rows, C, cap, D)` after checking the sums and the cache against the directory.
    fn check(
        &self,
        sums: &Layout,
        kv: &Layout,
        dir: &Layout,
    ) -> candle_core::Result<(usize, usize, usize, usize)> {
        let shape = dims(sums, dir)?;
        check_cache(kv, shape, self.starts.len())?;
        Ok(shape)
    }

    fn cpu<T: Elem>(
        &self,
        sums: &mut [f32],
        kv: &[T],
        dir: &[u32],
        (rows, c, cap, d): (usize, usize, usize, usize),
    ) {
        let heads = rows / self.starts.len().max(1);
        let row_len = c + 1 + cap;
        sums.par_chunks_mut(c * d)
            .enumerate()
            .for_each(|(i, sums)| {
                let (half, row) = (i / rows, i % rows);
                let Some(start) = self.starts[row / heads] else {
                    return;
                };
                let dir_row = &dir[row * row_len..(row + 1) * row_len];
                let cache = &kv[(half * rows + row) * cap * d..(half * rows + row + 1) * cap * d];
                for (p, sum) in sums.chunks_mut(d).enumerate() {
                    let ids = list(dir_row, p, c, cap);
                    let new = ids.partition_point(|&id| (id as usize) < start);
                    for &id in &ids[new..] {
                        let Some(x) = cache.get(id as usize * d..(id as usize + 1) * d) else {
                            continue;
                        };
                        sum.iter_mut().zip(x).for_each(|(s, x)| *s += x.to_f32());
                    }
                }
            });
    }
}

impl InplaceOp3 for SumOp {
    fn name(&self) -> &'static str {
        "saap-summary-sum"
    }

    fn cpu_fwd(
        &self,
        sums: &mut CpuStorage,
        sums_l: &Layout,
        kv: &CpuStorage,
        kv_l: &Layout,
        dir: &CpuStorage,
        dir_l: &Layout,
    ) -> candle_core::Result<()> {
        let shape = self.check(sums_l, kv_l, dir_l)?;
        let (CpuStorage::F32(sums), CpuStorage::U32(dir)) = (sums, dir) else {
            candle_core::bail!("summaries: sums must be f32 and the directory u32");
        };
        let sums = contiguous_slice_mut(sums, sums_l)?;
        let dir = contiguous_slice(dir, dir_l)?;
        match kv {
            CpuStorage::F32(kv) => self.cpu(sums, contiguous_slice(kv, kv_l)?, dir, shape),
            CpuStorage::BF16(kv) => self.cpu(sums, contiguous_slice(kv, kv_l)?, dir, shape),
            CpuStorage::F16(kv) => self.cpu(sums, contiguous_slice(kv, kv_l)?, dir, shape),
            _ => candle_core::bail!("summaries: the cache must be f32, bf16 or f16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sums: &mut candle_core::CudaStorage,
        sums_l: &Layout,
        kv: &candle_core::CudaStorage,
        kv_l: &Layout,
        dir: &candle_core::CudaStorage,
        dir_l: &Layout,
    ) -> candle_core::Result<()> {
        let shape = self.check(sums_l, kv_l, dir_l)?;
        crate::cuda::summary_sums(
            &self.starts,
            (sums, sums_l),
            (kv, kv_l),
            (dir, dir_l),
            shape,
        )
    }
}

/// The joint cache must be `[2, B, Hkv, cap, D]` for the summaries' shape.
fn check_cache(
    kv: &Layout,
    (rows, _, cap, d): (usize, usize, usize, usize),
    items: usize,
) -> candle_core::Result<()> {
    match kv.shape().dims() {
        &[2, b, h, kc, kd] if b == items && b * h == rows && kc == cap && kd == d => Ok(()),
        other => candle_core::bail!(
            "summaries: cache {other:?} does not match {items} items, capacity {cap}, D = {d}"
        ),
    }
}

/// `means = sums / n_p` per partition, `n_p` from the directory's offsets (0 for an empty one).
#[derive(Debug)]
pub(crate) struct MeanOp;

impl MeanOp {
    /// `(rows, C, cap, D)` after checking the means and sums against the directory.
    fn check(
        means: &Layout,
        sums: &Layout,
        dir: &Layout,
    ) -> candle_core::Result<(usize, usize, usize, usize)> {
        if sums.shape() != means.shape() {
            candle_core::bail!("summaries: sums {:?} and means differ", sums.shape());
        }
        dims(means, dir)
    }

    fn cpu<T: Elem>(
        means: &mut [T],
        sums: &[f32],
        dir: &[u32],
        (rows, c, cap, d): (usize, usize, usize, usize),
    ) {
        let row_len = c + 1 + cap;
        means
            .par_chunks_mut(c * d)
            .zip(sums.par_chunks(c * d))
            .enumerate()
            .for_each(|(i, (means, sums))| {
                let row = i % rows;
                let dir_row = &dir[row * row_len..(row + 1) * row_len];
                for (p, (mean, sum)) in means.chunks_mut(d).zip(sums.chunks(d)).enumerate() {
                    let n = list(dir_row, p, c, cap).len();
                    for (m, &s) in mean.iter_mut().zip(sum) {
                        *m = T::from_f32(if n > 0 { s / n as f32 } else { 0.0 });
                    }
                }
            });
    }
}

impl InplaceOp3 for MeanOp {
    fn name(&self) -> &'static str {
        "saap-summary-mean"
    }

    fn cpu_fwd(
        &self,
        means: &mut CpuStorage,
        means_l: &Layout,
        sums: &CpuStorage,
        sums_l: &Layout,
        dir: &CpuStorage,
        dir_l: &Layout,
    ) -> candle_core::Result<()> {
        let shape = Self::check(means_l, sums_l, dir_l)?;
        let (CpuStorage::F32(sums), CpuStorage::U32(dir)) = (sums, dir) else {
            candle_core::bail!("summaries: sums must be f32 and the directory u32");
        };
        let (sums, dir) = (
            contiguous_slice(sums, sums_l)?,
            contiguous_slice(dir, dir_l)?,
        );
        match means {
            CpuStorage::F32(m) => Self::cpu(contiguous_slice_mut(m, means_l)?, sums, dir, shape),
            CpuStorage::BF16(m) => Self::cpu(contiguous_slice_mut(m, means_l)?, sums, dir, shape),
            CpuStorage::F16(m) => Self::cpu(contiguous_slice_mut(m, means_l)?, sums, dir, shape),
            _ => candle_core::bail!("summaries: means must be f32, bf16 or f16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        means: &mut candle_core::CudaStorage,
        means_l: &Layout,
        sums: &candle_core::CudaStorage,
        sums_l: &Layout,
        dir: &candle_core::CudaStorage,
        dir_l: &Layout,
    ) -> candle_core::Result<()> {
        let shape = Self::check(means_l, sums_l, dir_l)?;
        crate::cuda::summary_means((means, means_l), (sums, sums_l), (dir, dir_l), shape)
    }
}
