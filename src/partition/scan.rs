//! Partition-scan: histogram → exclusive scan → stable scatter of token ids, and the batched merge
//! of tokens leaving the recent window into an existing index (the same three steps, with the old
//! lists shifted to make room).

use crate::error::{Result, SaapError};
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

/// Length of a directory row for `n_partitions` partitions and `capacity` tokens.
pub fn dir_len(n_partitions: usize, capacity: usize) -> usize {
    n_partitions + 1 + capacity
}

/// Merges the tokens `start..end` (their partitions in `labels[start..end]`) into one directory
/// row `dir = [offsets; C + 1] ++ perm`. The old lists keep their order and the new ids follow them
/// in increasing order, so every list stays sorted by position: the result equals a stable sort by
/// partition of all indexed ids. Merging into an empty row is the plain partition-scan.
pub fn merge_row(dir: &mut [u32], labels: &[u32], start: usize, end: usize, n_partitions: usize) {
    let (offsets, perm) = dir.split_at_mut(n_partitions + 1);
    // Histogram of the new tokens.
    let mut counts = vec![0u32; n_partitions];
    for &label in &labels[start..end] {
        counts[label as usize] += 1;
    }
    // Exclusive scan: partition c moves right by the number of new tokens in partitions < c.
    let mut new_offsets = vec![0u32; n_partitions + 1];
    let mut shift = 0u32;
    for c in 0..n_partitions {
        new_offsets[c] = offsets[c] + shift;
        shift += counts[c];
    }
    new_offsets[n_partitions] = offsets[n_partitions] + shift;
    // Move old lists right, last first, so that no list overwrites one not yet moved.
    for c in (0..n_partitions).rev() {
        let (from, to) = (offsets[c] as usize, offsets[c + 1] as usize);
        if from != new_offsets[c] as usize && to > from {
            perm.copy_within(from..to, new_offsets[c] as usize);
        }
    }
    // Stable scatter of the new ids after each old list.
    let mut cursor: Vec<u32> = (0..n_partitions)
        .map(|c| new_offsets[c] + (offsets[c + 1] - offsets[c]))
        .collect();
    for (id, &label) in (start..end).zip(&labels[start..end]) {
        let slot = &mut cursor[label as usize];
        perm[*slot as usize] = id as u32;
        *slot += 1;
    }
    offsets.copy_from_slice(&new_offsets);
}

/// In-place merge over a whole state: `dir` is `[B, H, C + 1 + cap]`, `labels` is `[B, H, cap]`;
/// batch item `b` merges tokens `ranges[b].0..ranges[b].1` of every KV head.
#[derive(Debug, Clone)]
pub struct MergeOp {
    /// Per batch item, the token range to merge (empty ranges are skipped).
    pub ranges: Vec<(usize, usize)>,
    /// Number of partitions C.
    pub n_partitions: usize,
    /// KV heads per batch item.
    pub n_kv_heads: usize,
}

impl MergeOp {
    fn check(&self, dir_l: &Layout, labels_l: &Layout) -> candle_core::Result<(usize, usize)> {
        let (b, h, row) = dir_l.shape().dims3()?;
        let (lb, lh, cap) = labels_l.shape().dims3()?;
        if b != self.ranges.len()
            || lb != b
            || lh != h
            || h != self.n_kv_heads
            || row != dir_len(self.n_partitions, cap)
        {
            candle_core::bail!(
                "merge: directory {:?} and labels {:?} do not match {} items, {} heads, C = {}",
                dir_l.shape(),
                labels_l.shape(),
                self.ranges.len(),
                self.n_kv_heads,
                self.n_partitions
            );
        }
        if self.ranges.iter().any(|&(s, e)| s > e || e > cap) {
            candle_core::bail!("merge: ranges {:?} exceed capacity {cap}", self.ranges);
        }
        Ok((row, cap))
    }
}

impl InplaceOp2 for MergeOp {
    fn name(&self) -> &'static str {
        "saap-merge"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (row, cap) = self.check(dst_l, src_l)?;
        let (CpuStorage::U32(dir), CpuStorage::U32(labels)) = (dst, src) else {
            candle_core::bail!("merge: directory and labels must be u32");
        };
        let (Some((d0, d1)), Some((l0, l1))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("merge: tensors must be contiguous");
        };
        let heads = self.n_kv_heads;
        dir[d0..d1]
            .par_chunks_mut(row)
            .zip(labels[l0..l1].par_chunks(cap))
            .enumerate()
            .for_each(|(i, (dir_row, label_row))| {
                let (start, end) = self.ranges[i / heads];
                if end > start {
                    merge_row(dir_row, label_row, start, end, self.n_partitions);
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (row, cap) = self.check(dst_l, src_l)?;
        crate::cuda::merge(self, dst, dst_l, src, src_l, row, cap)
    }
}

/// Merges `ranges[b]` of every KV head into the directory `dir` (in place).
///
/// # Errors
/// [`SaapError::DType`] unless both tensors are u32; [`SaapError::Candle`] when the shapes do
/// not match `op` or a range exceeds the capacity.
pub fn merge(dir: &Tensor, labels: &Tensor, op: &MergeOp) -> Result<()> {
    if dir.dtype() != candle_core::DType::U32 || labels.dtype() != candle_core::DType::U32 {
        return Err(SaapError::DType {
            name: "directory",
            expected: candle_core::DType::U32,
            got: dir.dtype(),
        });
    }
    dir.inplace_op2(labels, op)?;
    Ok(())
}

/// Reference partition-scan: ids `start..end` stably sorted by label, with per-partition offsets.
/// Used by tests to check the scan and the merges against the plain definition.
pub fn naive_partition(
    labels: &[u32],
    start: usize,
    end: usize,
    n_partitions: usize,
) -> (Vec<u32>, Vec<u32>) {
    let mut ids: Vec<u32> = (start as u32..end as u32).collect();
    ids.sort_by_key(|&id| labels[id as usize]); // sort_by_key is stable
    let mut offsets = vec![0u32; n_partitions + 1];
    for &id in &ids {
        offsets[labels[id as usize] as usize + 1] += 1;
    }
    for c in 0..n_partitions {
        offsets[c + 1] += offsets[c];
    }
    (ids, offsets)
}
