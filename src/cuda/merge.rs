//! Launch of the partition-scan merge (`cuda/merge.cu`): one block per directory row, its new
//! ids scattered by as many warps as shared memory holds cursors for.

use super::{load, to_u32, view, ItemTable, MAX_BATCH, MERGE};
use crate::partition::scan::MergeOp;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout};

/// Threads per block: the move step streams the old lists through this many lanes.
const THREADS: u32 = 512;

/// Shared memory a block may use without opting in.
const SMEM_LIMIT: usize = 48 * 1024;

/// `MergeOp` on CUDA: `dst` is the directory `[B, Hkv, row]`, `src` the labels `[B, Hkv, cap]`.
/// Same result as [`crate::partition::scan::merge_row`] on every row; shapes are checked by the
/// caller. Launches one kernel per 64 batch items, none for items with nothing to merge.
pub(crate) fn merge(
    op: &MergeOp,
    dst: &mut CudaStorage,
    dst_l: &Layout,
    src: &CudaStorage,
    src_l: &Layout,
    row: usize,
    cap: usize,
) -> candle_core::Result<()> {
    let dev = dst.device().clone();
    let c = op.n_partitions;
    let word = std::mem::size_of::<u32>();
    let base_smem = 2 * (c + 1) * word;
    if base_smem > SMEM_LIMIT {
        candle_core::bail!("saap cuda merge: C = {c} partitions exceed the shared-memory budget");
    }
    // As many scatter warps as their cursors (C each) fit beside the offsets.
    let scatter_warps =
        ((SMEM_LIMIT - base_smem) / (c.max(1) * word)).clamp(1, THREADS as usize / 32);
    let smem = base_smem
        + if scatter_warps > 1 {
            scatter_warps * c * word
        } else {
            0
        };
    let func = load(&dev, &MERGE, "saap_merge")?;
    let stream = dev.cuda_stream();
    let labels = view::<u32>(src, src_l)?;
    let (d0, d1) = dst_l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "saap merge" })?;
    let mut dir = dst.as_cuda_slice_mut::<u32>()?.slice_mut(d0..d1);
    let heads = op.n_kv_heads;
    let (heads32, c32, cap32) = (to_u32(heads)?, to_u32(c)?, to_u32(cap)?);
    let scatter_warps32 = to_u32(scatter_warps)?;
    for i0 in (0..op.ranges.len()).step_by(MAX_BATCH) {
        let ranges = &op.ranges[i0..(i0 + MAX_BATCH).min(op.ranges.len())];
        if ranges.iter().all(|&(s, e)| e <= s) {
            continue;
        }
        let table = ItemTable::new(ranges.iter().copied())?;
        let rows = ranges.len() * heads;
        let mut dir_chunk = dir.slice_mut(i0 * heads * row..(i0 * heads + rows) * row);
        let labels_chunk = labels.slice(i0 * heads * cap..(i0 * heads + rows) * cap);
        let cfg = LaunchConfig {
            grid_dim: (to_u32(rows)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&mut dir_chunk)
            .arg(&labels_chunk)
            .arg(&table)
            .arg(&heads32)
            .arg(&c32)
            .arg(&cap32)
            .arg(&scatter_warps32);
        // SAFETY: argument types and order match `saap_merge`; every access is inside the row
        // and label views given (rows * row and rows * cap elements).
        unsafe { launch.launch(cfg) }.w()?;
    }
    Ok(())
}
