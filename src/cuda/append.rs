//! Launches of the cache append (`cuda/append.cu`): RoPE + row writes ([`RopeWrite`]) and the
//! nearest-centroid labels of new keys ([`AssignOp`]). A decode step's append is three launches
//! (queries; keys and values; labels) with nothing copied from the host, all beside the routing.

use super::{
    advance_chunk, after_main_work, dtype_name, launch_stream, load, push_advance, sm_count,
    to_u32, view, with_advance, with_cuda, ItemTable, ZeroedBuffers, APPEND, MAX_BATCH, NULL_PTR,
    SMEM_LIMIT,
};
use crate::config::RopeKind;
use crate::partition::assign::AssignOp;
use crate::rope::RopeWrite;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape, WithDType};
use half::{bf16, f16};

/// `ROPE_MAX_HALF` in `cuda/append.cu`.
const ROPE_MAX_HALF: usize = 128;
/// `ASSIGN_*` in `cuda/append.cu`.
const ASSIGN_THREADS: u32 = 256;
const ASSIGN_KEYS: usize = 16;
const ASSIGN_SLICE: usize = 64;
const ASSIGN_PARTS: usize = ASSIGN_THREADS as usize / ASSIGN_SLICE;

/// `RopeFreqs` of `cuda/append.cu`, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeFreqs([f64; ROPE_MAX_HALF]);

// SAFETY: plain old data with the layout of the C struct.
unsafe impl DeviceRepr for RopeFreqs {}

/// Per-key scratch and per-tile counters of the assignment, zero between launches.
static SCRATCH: ZeroedBuffers<u64> = ZeroedBuffers::new();
static TILE_COUNTERS: ZeroedBuffers<u32> = ZeroedBuffers::new();

/// [`RopeWrite`] into a cache (`dst`, in place).
pub(crate) fn rope_write(
    op: &RopeWrite,
    dst: &mut CudaStorage,
    dst_l: &Layout,
    src: &CudaStorage,
    src_l: &Layout,
) -> candle_core::Result<()> {
    let (dims, rows) = op.check(src_l, op.at_position.then_some(dst_l))?;
    if dst.dtype() != src.dtype() {
        candle_core::bail!("rope write: {:?} into {:?}", src.dtype(), dst.dtype());
    }
    let (d0, d1) = dst_l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "rope write" })?;
    match dst.dtype() {
        DType::F32 => {
            let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
            launch_rope::<f32>(op, &mut out, (src, src_l), None, dims, rows)
        }
        DType::BF16 => {
            let mut out = dst.as_cuda_slice_mut::<bf16>()?.slice_mut(d0..d1);
            launch_rope::<bf16>(op, &mut out, (src, src_l), None, dims, rows)
        }
        DType::F16 => {
            let mut out = dst.as_cuda_slice_mut::<f16>()?.slice_mut(d0..d1);
            launch_rope::<f16>(op, &mut out, (src, src_l), None, dims, rows)
        }
        other => candle_core::bail!("rope write: dtype {other:?}"),
    }
}

/// [`RopeWrite`] into a new tensor shaped like `src`.
pub(crate) fn rope_new(
    op: &RopeWrite,
    src: &CudaStorage,
    src_l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (dims, _) = op.check(src_l, None)?;
    if op.lens.iter().any(|&l| l != dims.2) {
        candle_core::bail!("rope write: a new tensor needs every row written");
    }
    let n = src_l.shape().elem_count();
    fn fresh<T: CudaDType + DeviceRepr>(
        op: &RopeWrite,
        src: &CudaStorage,
        src_l: &Layout,
        dims: (usize, usize, usize, usize),
        n: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = src.device().clone();
        // SAFETY: every row is written (lens == T, checked above).
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        // Rotating a decode step's query on the side stream: the allocation is ordered first.
        after_main_work(&dev)?;
        launch_rope::<T>(op, &mut out.slice_mut(..), (src, src_l), None, dims, dims.2)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    let out = match src.dtype() {
        DType::F32 => fresh::<f32>(op, src, src_l, dims, n)?,
        DType::BF16 => fresh::<bf16>(op, src, src_l, dims, n)?,
        DType::F16 => fresh::<f16>(op, src, src_l, dims, n)?,
        other => candle_core::bail!("rope write: dtype {other:?}"),
    };
    Ok((out, src_l.shape().clone()))
}

/// [`RopeWrite`] of keys `k` and values `v` into a joint cache `[2, B, H, rows, D]` (`dst`, in
/// place): keys rotated into the first half, values copied into the second, in one launch.
pub(crate) fn kv_write(
    op: &RopeWrite,
    dst: &mut CudaStorage,
    dst_l: &Layout,
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<()> {
    let half_l = kv_half(dst_l)?;
    let (dims, rows) = op.check(k.1, Some(&half_l))?;
    if v.1.shape() != k.1.shape() || v.0.dtype() != k.0.dtype() || dst.dtype() != k.0.dtype() {
        candle_core::bail!(
            "kv write: values {:?} {:?} beside keys {:?} {:?} into {:?}",
            v.1.shape(),
            v.0.dtype(),
            k.1.shape(),
            k.0.dtype(),
            dst.dtype()
        );
    }
    let (d0, d1) = dst_l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "kv write" })?;
    match dst.dtype() {
        DType::F32 => {
            let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
            launch_rope::<f32>(op, &mut out, k, Some(v), dims, rows)
        }
        DType::BF16 => {
            let mut out = dst.as_cuda_slice_mut::<bf16>()?.slice_mut(d0..d1);
            launch_rope::<bf16>(op, &mut out, k, Some(v), dims, rows)
        }
        DType::F16 => {
            let mut out = dst.as_cuda_slice_mut::<f16>()?.slice_mut(d0..d1);
            launch_rope::<f16>(op, &mut out, k, Some(v), dims, rows)
        }
        other => candle_core::bail!("kv write: dtype {other:?}"),
    }
}

/// The layout of one half (`[B, H, rows, D]`, at offset 0) of a joint cache `[2, B, H, rows, D]`.
fn kv_half(dst_l: &Layout) -> candle_core::Result<Layout> {
    let dims = dst_l.shape().dims();
    let [2, b, h, rows, d] = dims else {
        candle_core::bail!("kv write: a joint cache [2, B, H, rows, D], got {dims:?}")
    };
    Ok(Layout::contiguous((*b, *h, *rows, *d)))
}

/// One launch of the RoPE write kernel: `src` into `dst`, and with `values` those (unrotated)
/// into the second half of a joint cache that `dst` begins.
fn launch_rope<T: CudaDType + DeviceRepr>(
    op: &RopeWrite,
    dst: &mut CudaViewMut<'_, T>,
    (src, src_l): (&CudaStorage, &Layout),
    values: Option<(&CudaStorage, &Layout)>,
    (b, h, t, d): (usize, usize, usize, usize),
    rows: usize,
) -> candle_core::Result<()> {
    let half = d / 2;
    if half > ROPE_MAX_HALF || half == 0 {
        candle_core::bail!(
            "saap cuda rope: head dim {d} (at most {})",
            2 * ROPE_MAX_HALF
        );
    }
    if t == 0 || op.lens.iter().all(|&l| l == 0) {
        return Ok(());
    }
    let dev = src.device().clone();
    let func = load(
        &dev,
        &APPEND,
        &format!("saap_rope_write_{}", dtype_name(src.dtype(), "rope")?),
    )?;
    let src = view::<T>(src, src_l)?;
    let values = values.map(|(v, v_l)| view::<T>(v, v_l)).transpose()?;
    // From a K row of the joint cache to the same row of V.
    let v_offset = b * h * rows * d;
    let mut freqs = RopeFreqs([0.0; ROPE_MAX_HALF]);
    freqs.0[..half].copy_from_slice(&op.inv_freq);
    let rotation: u32 = match op.kind {
        None => 0,
        Some(RopeKind::Interleaved) => 1,
        Some(RopeKind::Neox) => 2,
    };
    let (h32, t32, d32, rows32) = (to_u32(h)?, to_u32(t)?, to_u32(d)?, to_u32(rows)?);
    let at_position = u32::from(op.at_position);
    let stream = launch_stream(&dev)?;
    with_advance(op.advance.as_ref(), |advance| {
        for i0 in (0..b).step_by(MAX_BATCH) {
            let items = (b - i0).min(MAX_BATCH);
            let pairs = (i0..i0 + items).map(|i| (op.starts[i], op.lens[i]));
            let table = ItemTable::new(pairs)?;
            let advance = advance_chunk(advance, i0, items);
            let chunk = i0 * h * t * d..(i0 + items) * h * t * d;
            let src_chunk = src.slice(chunk.clone());
            let values_chunk = values.as_ref().map(|v| v.slice(chunk));
            // With values, the chunk runs on into the V half (read at `v_offset`).
            let dst_end = match values {
                Some(_) => dst.len(),
                None => (i0 + items) * h * rows * d,
            };
            let mut dst_chunk = dst.slice_mut(i0 * h * rows * d..dst_end);
            let heads = if values.is_some() { 2 * h32 } else { h32 };
            let cfg = LaunchConfig {
                grid_dim: (t32, heads, to_u32(items)?),
                block_dim: (to_u32(half.max(32))?, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&func);
            launch.arg(&mut dst_chunk).arg(&src_chunk);
            match &values_chunk {
                Some(v) => launch.arg(v),
                None => launch.arg(&NULL_PTR),
            };
            launch.arg(&v_offset).arg(&freqs).arg(&table);
            push_advance(&mut launch, &advance);
            launch
                .arg(&h32)
                .arg(&t32)
                .arg(&d32)
                .arg(&rows32)
                .arg(&rotation)
                .arg(&at_position)
                .arg(&op.mscale);
            // SAFETY: argument types and order match `rope_write_impl`; rows written are below
            // `rows` (checked by `RopeWrite::check`, and on the device for replayed steps), V
            // rows `v_offset` further inside the joint cache (`kv_half`), reads inside the
            // source chunks.
            unsafe { launch.launch(cfg) }.w()?;
        }
        Ok(())
    })
}

/// [`AssignOp`]: labels `[B, H, cap]` u32 (in place), keys `[B, H, T, D]`.
pub(crate) fn assign(
    op: &AssignOp,
    labels: &mut CudaStorage,
    labels_l: &Layout,
    keys: &CudaStorage,
    keys_l: &Layout,
) -> candle_core::Result<()> {
    let (b, h, t, d) = keys_l.shape().dims4()?;
    let (lb, lh, cap) = labels_l.shape().dims3()?;
    let (ch, cd, c) = op.centroids_t.dims3()?;
    let fits = op.starts.iter().zip(&op.lens).all(|(s, l)| s + l <= cap);
    if (lb, lh) != (b, h) || (ch, cd) != (h, d) || op.starts.len() != b || op.lens.len() != b {
        candle_core::bail!(
            "saap cuda assign: labels {:?}, keys {:?}, centroids^T {:?}, {} items",
            labels_l.dims(),
            keys_l.dims(),
            op.centroids_t.dims(),
            op.starts.len()
        );
    }
    if !fits || op.lens.iter().any(|&l| l > t) || d % ASSIGN_PARTS != 0 {
        candle_core::bail!(
            "saap cuda assign: lens {:?} at {:?} into {cap} rows of {t} keys, head dim {d}",
            op.lens,
            op.starts
        );
    }
    let smem = (ASSIGN_KEYS * d + ASSIGN_PARTS * ASSIGN_KEYS * ASSIGN_SLICE) * 4;
    if smem > SMEM_LIMIT {
        candle_core::bail!("saap cuda assign: head dim {d} exceeds the shared-memory budget");
    }
    if t == 0 || op.lens.iter().all(|&l| l == 0) {
        return Ok(());
    }
    let (l0, l1) = labels_l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "saap assign" })?;
    let mut labels = labels.as_cuda_slice_mut::<u32>()?.slice_mut(l0..l1);
    let dims = AssignDims {
        b,
        h,
        t,
        d,
        c,
        cap,
        smem,
    };
    let dev = keys.device().clone();
    if let Some(rounded) = &op.rounded {
        if op.advance.is_some() {
            candle_core::bail!("saap cuda assign: a replayed decode step labels on the f32 kernel");
        }
        return with_cuda(rounded, "rounded centroids", |rc, rc_l| {
            with_cuda(&op.half_norms, "half norms", |hn, hn_l| {
                let hn = view::<f32>(hn, hn_l)?;
                match keys.dtype() {
                    DType::BF16 => launch_assign_mma(
                        &dev,
                        op,
                        &mut labels,
                        &view::<bf16>(keys, keys_l)?,
                        (&view::<bf16>(rc, rc_l)?, &hn),
                        dims,
                    ),
                    DType::F16 => launch_assign_mma(
                        &dev,
                        op,
                        &mut labels,
                        &view::<f16>(keys, keys_l)?,
                        (&view::<f16>(rc, rc_l)?, &hn),
                        dims,
                    ),
                    other => candle_core::bail!(
                        "saap cuda assign: tensor cores need bf16/f16 keys, got {other:?}"
                    ),
                }
            })
        });
    }
    with_cuda(&op.centroids_t, "centroids", |ct, ct_l| {
        with_cuda(&op.half_norms, "half norms", |hn, hn_l| {
            let (ct, hn) = (view::<f32>(ct, ct_l)?, view::<f32>(hn, hn_l)?);
            let args = (&ct, &hn);
            match keys.dtype() {
                DType::F32 => launch_assign(
                    &dev,
                    op,
                    &mut labels,
                    &view::<f32>(keys, keys_l)?,
                    args,
                    dims,
                ),
                DType::BF16 => launch_assign(
                    &dev,
                    op,
                    &mut labels,
                    &view::<bf16>(keys, keys_l)?,
                    args,
                    dims,
                ),
                DType::F16 => launch_assign(
                    &dev,
                    op,
                    &mut labels,
                    &view::<f16>(keys, keys_l)?,
                    args,
                    dims,
                ),
                other => candle_core::bail!("saap cuda assign: dtype {other:?}"),
            }
        })
    })
}

/// Sizes of one assignment call.
#[derive(Clone, Copy)]
struct AssignDims {
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    c: usize,
    cap: usize,
    smem: usize,
}

fn launch_assign<T: DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &AssignOp,
    labels: &mut CudaViewMut<'_, u32>,
    keys: &CudaView<'_, T>,
    (centroids_t, half_norms): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    AssignDims {
        b,
        h,
        t,
        d,
        c,
        cap,
        smem,
    }: AssignDims,
) -> candle_core::Result<()> {
    let func = load(
        dev,
        &APPEND,
        &format!("saap_assign_{}", dtype_name(T::DTYPE, "assign")?),
    )?;
    let stream = launch_stream(dev)?;
    let tiles = t.div_ceil(ASSIGN_KEYS);
    let slices = c.div_ceil(ASSIGN_SLICE);
    let (h32, t32, d32, c32, cap32) =
        (to_u32(h)?, to_u32(t)?, to_u32(d)?, to_u32(c)?, to_u32(cap)?);
    let target_blocks = 4 * sm_count(dev)?;
    with_advance(op.advance.as_ref(), |advance| {
        for i0 in (0..b).step_by(MAX_BATCH) {
            let items = (b - i0).min(MAX_BATCH);
            // Split the centroids over blocks only as far as needed to fill the GPU: every extra
            // split reloads the keys and adds an atomic per key.
            let splits = target_blocks.div_ceil(tiles * items * h).clamp(1, slices);
            let per_block = slices.div_ceil(splits);
            let per_block32 = to_u32(per_block)?;
            let pairs = (i0..i0 + items).map(|i| (op.starts[i], op.lens[i]));
            let table = ItemTable::new(pairs)?;
            let advance = advance_chunk(advance, i0, items);
            let keys_chunk = keys.slice(i0 * h * t * d..(i0 + items) * h * t * d);
            let mut labels_chunk = labels.slice_mut(i0 * h * cap..(i0 + items) * h * cap);
            SCRATCH.with(dev, items * h * t, |scratch| {
                TILE_COUNTERS.with(dev, items * h * tiles, |counters| {
                    let cfg = LaunchConfig {
                        grid_dim: (
                            to_u32(tiles)?,
                            to_u32(slices.div_ceil(per_block))?,
                            to_u32(items * h)?,
                        ),
                        block_dim: (ASSIGN_THREADS, 1, 1),
                        shared_mem_bytes: to_u32(smem)?,
                    };
                    let mut launch = stream.launch_builder(&func);
                    launch
                        .arg(&mut labels_chunk)
                        .arg(&keys_chunk)
                        .arg(centroids_t)
                        .arg(half_norms)
                        .arg(scratch)
                        .arg(counters)
                        .arg(&table);
                    push_advance(&mut launch, &advance);
                    launch
                        .arg(&h32)
                        .arg(&t32)
                        .arg(&d32)
                        .arg(&c32)
                        .arg(&cap32)
                        .arg(&per_block32);
                    // SAFETY: argument types and order match `assign_impl`; labels written below
                    // `cap` (checked above, and on the device for replayed steps), scratch and
                    // counters sized for this chunk and left zero.
                    unsafe { launch.launch(cfg) }.w()?;
                    Ok(())
                })
            })?;
        }
        Ok(())
    })
}

/// Warps per block of the tensor-core assignment (`ASSIGN_MMA_WARPS` in `cuda/append.cu`).
const ASSIGN_MMA_WARPS: usize = 4;
/// Rows of a centroid tile (`MMA_TILE` in `cuda/mma.cuh`).
const MMA_TILE: usize = 64;

/// The tensor-core assignment of a prompt's keys (see [`crate::partition::assign::assign_into`]).
fn launch_assign_mma<T: DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &AssignOp,
    labels: &mut CudaViewMut<'_, u32>,
    keys: &CudaView<'_, T>,
    (centroids, half_norms): (&CudaView<'_, T>, &CudaView<'_, f32>),
    AssignDims {
        b, h, t, d, c, cap, ..
    }: AssignDims,
) -> candle_core::Result<()> {
    if d != 64 && d != 128 {
        candle_core::bail!("saap cuda assign: tensor cores need head dim 64 or 128, got {d}");
    }
    if centroids.len() != h * c * d {
        candle_core::bail!("saap cuda assign: rounded centroids do not hold [{h}, {c}, {d}]");
    }
    let tname = dtype_name(T::DTYPE, "assign")?;
    let func = load(dev, &APPEND, &format!("saap_assign_mma_{tname}_d{d}"))?;
    let stream = launch_stream(dev)?;
    let keys_per_block = 16 * ASSIGN_MMA_WARPS;
    let smem = 2 * MMA_TILE * (d + 8) * std::mem::size_of::<T>();
    let (h32, t32, c32, cap32) = (to_u32(h)?, to_u32(t)?, to_u32(c)?, to_u32(cap)?);
    for i0 in (0..b).step_by(MAX_BATCH) {
        let items = (b - i0).min(MAX_BATCH);
        let longest = op.lens[i0..i0 + items].iter().max().copied().unwrap_or(0);
        if longest == 0 {
            continue;
        }
        let table = ItemTable::new((i0..i0 + items).map(|i| (op.starts[i], op.lens[i])))?;
        let keys_chunk = keys.slice(i0 * h * t * d..(i0 + items) * h * t * d);
        let mut labels_chunk = labels.slice_mut(i0 * h * cap..(i0 + items) * h * cap);
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(longest.div_ceil(keys_per_block))?,
                1,
                to_u32(items * h)?,
            ),
            block_dim: (to_u32(32 * ASSIGN_MMA_WARPS)?, 1, 1),
            shared_mem_bytes: to_u32(smem)?,
        };
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&mut labels_chunk)
            .arg(&keys_chunk)
            .arg(centroids)
            .arg(half_norms)
            .arg(&table)
            .arg(&h32)
            .arg(&t32)
            .arg(&c32)
            .arg(&cap32);
        // SAFETY: argument types and order match `assign_mma_impl`; labels written below `cap`
        // and keys read below `lens[b] <= T` (checked by `assign`), centroids below H·C·D.
        unsafe { launch.launch(cfg) }.w()?;
    }
    Ok(())
}
