//! Launches of the partition-scan merge (`cuda/merge.cu`): one block per directory row, its new
//! ids scattered by as many warps as shared memory holds cursors for; and of the per-partition
//! summaries kept beside the directory (sums of the merged rows, then means).

use super::{dtype_name, load, to_u32, view, ItemTable, MAX_BATCH, MERGE, SMEM_LIMIT};
use crate::partition::scan::MergeOp;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout};

/// Threads per block: the move step streams the old lists through this many lanes.
const THREADS: u32 = 512;

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

/// `(rows = B·Hkv, C, cap, D)` of the summaries (`crate::partition::summary`).
type SummaryDims = (usize, usize, usize, usize);

/// `SumOp` on CUDA (`saap_summary_sums_*`): adds each partition's new ids (at or after
/// `starts[item]`) to the f32 sums, one launch per 64 batch items with something merged.
pub(crate) fn summary_sums(
    starts: &[Option<usize>],
    (sums, sums_l): (&mut CudaStorage, &Layout),
    (kv, kv_l): (&CudaStorage, &Layout),
    (dir, dir_l): (&CudaStorage, &Layout),
    (rows, c, cap, d): SummaryDims,
) -> candle_core::Result<()> {
    let dev = sums.device().clone();
    let func = load(
        &dev,
        &MERGE,
        &format!("saap_summary_sums_{}", dtype_name(kv.dtype(), "summaries")?),
    )?;
    let heads = rows / starts.len().max(1);
    let (s0, s1) = sums_l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous {
            op: "saap summaries",
        })?;
    let mut sums = sums.as_cuda_slice_mut::<f32>()?.slice_mut(s0..s1);
    let dir = view::<u32>(dir, dir_l)?;
    let (c32, cap32, d32, heads32) = (to_u32(c)?, to_u32(cap)?, to_u32(d)?, to_u32(heads)?);
    let (sums_half, kv_half) = (rows * c * d, rows * cap * d);
    let stream = dev.cuda_stream();
    fn launch<T: CudaDType + DeviceRepr>(
        func: &CudaFunction,
        stream: &CudaStream,
        (sums, kv, dir): (
            &mut CudaViewMut<'_, f32>,
            &CudaView<'_, T>,
            &CudaView<'_, u32>,
        ),
        table: &ItemTable,
        args: [u32; 4],
        halves: [usize; 2],
        cfg: LaunchConfig,
    ) -> candle_core::Result<()> {
        let mut launch = stream.launch_builder(func);
        launch.arg(sums).arg(kv).arg(dir).arg(table);
        for x in &args {
            launch.arg(x);
        }
        launch.arg(&halves[0]).arg(&halves[1]);
        // SAFETY: argument types and order match `summary_sums_impl`; reads and writes stay in
        // the views (ids checked against cap, offsets clamped to it on the device).
        unsafe { launch.launch(cfg) }.w()?;
        Ok(())
    }
    for i0 in (0..starts.len()).step_by(MAX_BATCH) {
        let chunk = &starts[i0..(i0 + MAX_BATCH).min(starts.len())];
        if chunk.iter().all(Option::is_none) {
            continue;
        }
        // An item with nothing merged gets an empty range, which the kernel skips.
        let table = ItemTable::new(chunk.iter().map(|s| s.map_or((0, 0), |s| (s, s + 1))))?;
        let first = i0 * heads;
        let chunk_rows = chunk.len() * heads;
        // The view starts at this chunk's first row of the keys' half; the values' half is
        // `sums_half` further on.
        let mut sums_chunk = sums.slice_mut(first * c * d..);
        let dir_chunk = dir.slice(first * (c + 1 + cap)..);
        let cfg = LaunchConfig {
            grid_dim: (c32, to_u32(chunk_rows)?, 2),
            block_dim: (d32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [heads32, c32, cap32, d32];
        macro_rules! typed {
            ($t:ty) => {{
                let kv = view::<$t>(kv, kv_l)?;
                let kv_chunk = kv.slice(first * cap * d..);
                let io = (&mut sums_chunk, &kv_chunk, &dir_chunk);
                launch(&func, &stream, io, &table, args, [sums_half, kv_half], cfg)
            }};
        }
        match kv.dtype() {
            DType::F32 => typed!(f32),
            DType::BF16 => typed!(half::bf16),
            _ => typed!(half::f16),
        }?;
    }
    Ok(())
}

/// `MeanOp` on CUDA (`saap_summary_means_*`): every partition's means from its sums and count.
pub(crate) fn summary_means(
    (means, means_l): (&mut CudaStorage, &Layout),
    (sums, sums_l): (&CudaStorage, &Layout),
    (dir, dir_l): (&CudaStorage, &Layout),
    (rows, c, cap, d): SummaryDims,
) -> candle_core::Result<()> {
    let dev = means.device().clone();
    let func = load(
        &dev,
        &MERGE,
        &format!(
            "saap_summary_means_{}",
            dtype_name(means.dtype(), "summaries")?
        ),
    )?;
    let sums = view::<f32>(sums, sums_l)?;
    let dir = view::<u32>(dir, dir_l)?;
    let (m0, m1) = means_l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous {
            op: "saap summaries",
        })?;
    let (c32, cap32, d32, rows32) = (to_u32(c)?, to_u32(cap)?, to_u32(d)?, to_u32(rows)?);
    let cfg = LaunchConfig {
        grid_dim: (c32, rows32, 2),
        block_dim: (d32, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    macro_rules! typed {
        ($t:ty) => {{
            let mut means = means.as_cuda_slice_mut::<$t>()?.slice_mut(m0..m1);
            let mut launch = stream.launch_builder(&func);
            launch
                .arg(&mut means)
                .arg(&sums)
                .arg(&dir)
                .arg(&c32)
                .arg(&cap32)
                .arg(&d32)
                .arg(&rows32);
            // SAFETY: argument types and order match `summary_means_impl`; the grid covers the
            // [2, rows, C, D] views exactly.
            unsafe { launch.launch(cfg) }.w()?;
        }};
    }
    match means.dtype() {
        DType::F32 => typed!(f32),
        DType::BF16 => typed!(half::bf16),
        _ => typed!(half::f16),
    }
    Ok(())
}
