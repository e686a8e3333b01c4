//! Launches of split-KV decode attention (`cuda/decode.cu`): one kernel computes a partial
//! (max, sum, out) per (row, split); a second merges the splits by log-sum-exp, or, with
//! `SAAP_CUDA_MERGE=fused`, the last block of each row to finish does (a per-row counter kept on
//! the device between calls; one launch, but the kernel needs more registers). Sparse and dense are the
//! same kernel; sparse builds its key list on the device from probes and directory (pages: their
//! own kernels, no directory), so a step needs no host round trip. Host work per launch: a few driver queries (compute capability, SM
//! count, occupancy) and the kernel parameters; no copies, no synchronization.

use super::{
    advance_chunk, load, push_advance, sm_count, to_u32, use_smem, view, with_advance, with_cuda,
    ItemTable, ZeroedBuffers, DECODE, MAX_BATCH,
};
use crate::attend::{DecodeOp, Partitions};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

/// Threads per block (`THREADS` in `cuda/decode.cu`).
const THREADS: u32 = 256;
/// Key ids a block holds in shared memory per pass (`IDS_CAP` in `cuda/decode.cu`).
const IDS_CAP: usize = 2048;
/// Threads per block of the combine kernel (`COMBINE_THREADS` in `cuda/decode.cu`).
const COMBINE_THREADS: u32 = 256;
/// Upper bound on splits per row: the merge reads every split's partial.
const MAX_SPLITS: usize = 128;
/// Fewer keys than this per split cost more in fixed work than they save in parallelism.
/// `SAAP_CUDA_KEYS_PER_SPLIT` overrides it (tuning experiments).
const MIN_KEYS_PER_SPLIT: usize = 128;

/// Whether the last block of a row merges its splits (`SAAP_CUDA_MERGE=fused`).
fn fused_merge() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("SAAP_CUDA_MERGE").is_ok_and(|v| v == "fused"))
}

fn min_keys_per_split() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("SAAP_CUDA_KEYS_PER_SPLIT")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&x: &usize| x > 0)
            .unwrap_or(MIN_KEYS_PER_SPLIT)
    })
}

/// Per-row split counters, zero between launches: the merging block resets its row's.
static COUNTERS: ZeroedBuffers<u32> = ZeroedBuffers::new();

/// `(b, hq, hkv, cap, d)`.
type Dims = (usize, usize, usize, usize, usize);

/// `DecodeOp` on CUDA for rotated queries `q` (`[B, Hq, D]`, contiguous). Same keys and exact
/// softmax as the CPU op; accumulation in f32, output in the query's dtype.
pub(crate) fn decode(
    op: &DecodeOp,
    q: &CudaStorage,
    q_l: &Layout,
    dims: Dims,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (b, hq, hkv, _, d) = dims;
    if d != 64 && d != 128 {
        candle_core::bail!("saap cuda decode: head dim {d} is not supported (64 or 128)");
    }
    if !(1..=8).contains(&(hq / hkv)) {
        candle_core::bail!(
            "saap cuda decode: {hq} query heads over {hkv} KV heads; G must be 1..=8"
        );
    }
    if b == 0 {
        candle_core::bail!("saap cuda decode: empty batch");
    }
    let out = match q.dtype() {
        DType::F32 => typed::<f32>(op, q, q_l, dims, "f32")?,
        DType::BF16 => typed::<bf16>(op, q, q_l, dims, "bf16")?,
        DType::F16 => typed::<f16>(op, q, q_l, dims, "f16")?,
        other => candle_core::bail!("saap cuda decode: dtype {other:?} (f32, bf16 or f16)"),
    };
    Ok((out, q_l.shape().clone()))
}

/// A sparse call's probes and what they name.
struct Sparse<'a> {
    /// The directory's view, or `None` for pages.
    dir: Option<CudaView<'a, u32>>,
    /// Positions per page (0: a directory's partitions).
    page: usize,
    probes: CudaView<'a, u32>,
    /// ℓ, the length of each probe list.
    n_probe: usize,
    /// Probe lists per KV group: G, or 1 where the group shares one.
    lists: usize,
}

fn typed<T: CudaDType + DeviceRepr>(
    op: &DecodeOp,
    q: &CudaStorage,
    q_l: &Layout,
    dims: Dims,
    tname: &str,
) -> candle_core::Result<CudaStorage> {
    let (b, hq, hkv, cap, _) = dims;
    let dev = q.device().clone();
    let elem = std::mem::size_of::<T>();
    let q = view::<T>(q, q_l)?;
    aligned(q_l, elem, "query")?;
    let out = with_cuda(&op.k_cache, "k cache", |k_st, k_l| {
        with_cuda(&op.v_cache, "v cache", |v_st, v_l| {
            aligned(k_l, elem, "k cache")?;
            aligned(v_l, elem, "v cache")?;
            let (k, v) = (view::<T>(k_st, k_l)?, view::<T>(v_st, v_l)?);
            let io = Io {
                q: &q,
                k: &k,
                v: &v,
            };
            // Sparse exactly when both are present, as on the CPU.
            let (Some(partitions), Some(probes)) = (&op.partitions, &op.probes) else {
                return launch(op, &dev, tname, &io, None, None, dims);
            };
            with_means(op.means.as_ref(), |means| {
                with_cuda(probes, "probes", |pr_st, pr_l| {
                    let (n_probe, lists) = match pr_l.dims() {
                        &[pb, ph, n] if pb == b && (ph == hq || ph == hkv) => (n, ph / hkv),
                        other => candle_core::bail!(
                            "saap cuda decode: probes {other:?}, expected [{b}, {hq} or {hkv}, ℓ]"
                        ),
                    };
                    let probes = view(pr_st, pr_l)?;
                    let dir = match partitions {
                        Partitions::Pages(size) => {
                            let sparse = Sparse {
                                dir: None,
                                page: *size,
                                probes,
                                n_probe,
                                lists,
                            };
                            return launch(op, &dev, tname, &io, Some(sparse), means, dims);
                        }
                        Partitions::Directory(dir) => dir,
                    };
                    with_cuda(dir, "directory", |dir_st, dir_l| {
                        let row = op.n_partitions + 1 + cap;
                        if dir_l.dims() != [b, hkv, row] {
                            candle_core::bail!(
                                "saap cuda decode: directory {:?}, expected [{b}, {hkv}, {row}]",
                                dir_l.dims()
                            );
                        }
                        let sparse = Sparse {
                            dir: Some(view(dir_st, dir_l)?),
                            page: 0,
                            probes,
                            n_probe,
                            lists,
                        };
                        launch(op, &dev, tname, &io, Some(sparse), means, dims)
                    })
                })
            })
        })
    })?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Runs `f` with a view of the partition means (`[2, B, Hkv, C, D]`), or with `None`.
fn with_means<T: CudaDType, R>(
    means: Option<&candle_core::Tensor>,
    f: impl FnOnce(Option<&CudaView<'_, T>>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match means {
        None => f(None),
        Some(m) => with_cuda(m, "partition means", |st, l| {
            aligned(l, std::mem::size_of::<T>(), "partition means")?;
            f(Some(&view::<T>(st, l)?))
        }),
    }
}

/// The kernels read 16 bytes at a time: rows must start on 16-byte boundaries.
fn aligned(layout: &Layout, elem: usize, what: &str) -> candle_core::Result<()> {
    if (layout.start_offset() * elem) % 16 != 0 {
        candle_core::bail!("saap cuda decode: {what} does not start on a 16-byte boundary");
    }
    Ok(())
}

/// Query and cache views.
struct Io<'a, 'b, T> {
    q: &'a CudaView<'b, T>,
    k: &'a CudaView<'b, T>,
    v: &'a CudaView<'b, T>,
}

fn launch<T: DeviceRepr>(
    op: &DecodeOp,
    dev: &CudaDevice,
    tname: &str,
    io: &Io<'_, '_, T>,
    sparse: Option<Sparse<'_>>,
    means: Option<&CudaView<'_, T>>,
    (b, hq, hkv, cap, d): Dims,
) -> candle_core::Result<CudaSlice<T>> {
    let g = hq / hkv;
    // Kernels exist for 1, 2, 4 and 8 heads per group; a smaller group runs in the next size up.
    let gb = g.next_power_of_two();
    // Means only matter to a sparse step (as on the CPU).
    let means = means.filter(|_| sparse.is_some());
    // Pages have kernels of their own (no means: `DecodeOp` refuses them); those and the kernels
    // that read means merge their splits in a second launch.
    let pages = sparse.as_ref().is_some_and(|s| s.page > 0);
    let fused = fused_merge() && means.is_none() && !pages;
    let variant = match (pages, means.is_some(), fused) {
        (true, _, _) => "pages_",
        (false, true, _) => "est_",
        (false, false, true) => "fused_",
        (false, false, false) => "",
    };
    let func = load(
        dev,
        &DECODE,
        &format!("saap_decode_{variant}{tname}_d{d}_g{gb}"),
    )?;
    let combine = load(dev, &DECODE, &format!("saap_decode_combine_{tname}"))?;
    let c = op.n_partitions;
    // The block's merge: every warp's accumulators and (max, sum) for each of the gb heads.
    let warps = THREADS as usize / 32;
    // The key list (`decode_impl`): bitmaps of the union [and of the unread partitions] with their
    // prefix counts, each union member's perm start, the segment starts, the ids of a pass.
    let smem_keys = match &sparse {
        Some(Sparse { n_probe, lists, .. }) => {
            let words = c.div_ceil(32) * if means.is_some() { 4 } else { 2 };
            let union = c.min(lists * n_probe);
            (words + 2 * union + 4 + IDS_CAP) * 4
        }
        None => 0,
    };
    let smem_merge = 2 * g * MAX_SPLITS * 4;
    let smem = smem_keys.max(warps * gb * (d + 2) * 4).max(smem_merge);
    use_smem(dev, &func, smem, "decode")?;
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)
        .w()?
        .max(1) as usize;
    let slots = sm_count(dev)? * per_sm;
    // SAFETY: every element is written by the combine kernel or the merging block of its row.
    let mut out = unsafe { dev.alloc::<T>(b * hq * d) }?;
    let stream = dev.cuda_stream();
    let null = 0u64;
    let (hq32, hkv32, cap32) = (to_u32(hq)?, to_u32(hkv)?, to_u32(cap)?);
    let (c32, sinks32) = (to_u32(c)?, to_u32(op.sinks)?);
    let n_probe32 = to_u32(sparse.as_ref().map_or(0, |s| s.n_probe))?;
    let lists32 = to_u32(sparse.as_ref().map_or(0, |s| s.lists))?;
    let page32 = to_u32(sparse.as_ref().map_or(0, |s| s.page))?;
    let d32 = to_u32(d)?;
    let scale_log2 = op.scale * std::f32::consts::LOG2_E;
    let row = c + 1 + cap;
    with_advance(op.advance.as_ref(), |advance| {
        for i0 in (0..b).step_by(MAX_BATCH) {
            let items = (b - i0).min(MAX_BATCH);
            let seqs = &op.seqs[i0..i0 + items];
            let rows = items * hkv;
            // Fill every SM slot at batch 1; never split a row into pieces of a few keys. Sparse
            // rows are sized by an upper estimate of their selection (sinks + window + the share
            // lists·ℓ/C of the indexed keys), not by their length.
            let longest = seqs
                .iter()
                .map(|s| match &sparse {
                    None => s.len,
                    Some(Sparse { n_probe, lists, .. }) => {
                        let fixed = op.sinks.min(s.len) + s.len.saturating_sub(s.indexed_end);
                        let indexed = s.len - fixed.min(s.len);
                        let unread = if means.is_some() { c } else { 0 };
                        fixed + (indexed * (lists * n_probe).min(c)).div_ceil(c.max(1)) + unread
                    }
                })
                .max()
                .unwrap_or(0);
            // Whole waves: rows · splits at most one block per SM slot (rounding up left a second,
            // mostly idle wave at batch 8: 64 rows × 5 splits = 320 blocks on 264 slots).
            let splits = (slots / rows)
                .min(longest.div_ceil(min_keys_per_split()))
                .clamp(1, MAX_SPLITS);
            // SAFETY: every block writes its whole partial, empty splits included.
            let part_o = unsafe { dev.alloc::<f32>(rows * splits * g * d) }?;
            let part_ml = unsafe { dev.alloc::<f32>(rows * splits * g * 2) }?;
            let table = ItemTable::new(seqs.iter().map(|s| (s.len, s.indexed_end)))?;
            let advance = advance_chunk(advance, i0, items);
            let qc = io.q.slice(i0 * hq * d..(i0 + items) * hq * d);
            let kv_range = i0 * hkv * cap * d..(i0 + items) * hkv * cap * d;
            let (kc, vc) = (io.k.slice(kv_range.clone()), io.v.slice(kv_range));
            let index = sparse.as_ref().map(|s| {
                let per_item = hkv * s.lists * s.n_probe;
                (
                    s.dir
                        .as_ref()
                        .map(|dir| dir.slice(i0 * hkv * row..(i0 + items) * hkv * row)),
                    s.probes.slice(i0 * per_item..(i0 + items) * per_item),
                )
            });
            // Keys' means of these items, and their values' means one half further.
            let half = b * hkv * c * d;
            let means_range = i0 * hkv * c * d..(i0 + items) * hkv * c * d;
            let chunk_means = means.map(|m| {
                (
                    m.slice(means_range.clone()),
                    m.slice(half + means_range.start..half + means_range.end),
                )
            });
            let mut oc = out.slice_mut(i0 * hq * d..(i0 + items) * hq * d);
            let (splits32, rows32) = (to_u32(splits)?, to_u32(rows)?);
            COUNTERS.with(dev, rows, |counters| {
                let mut attend = stream.launch_builder(&func);
                attend.arg(&qc).arg(&kc).arg(&vc);
                match &index {
                    Some((Some(dir), probes)) => attend.arg(dir).arg(probes),
                    Some((None, probes)) => attend.arg(&null).arg(probes),
                    None => attend.arg(&null).arg(&null),
                };
                match &chunk_means {
                    Some((kmean, vmean)) => attend.arg(kmean).arg(vmean),
                    None => attend.arg(&null).arg(&null),
                };
                attend
                    .arg(&part_o)
                    .arg(&part_ml)
                    .arg(&mut oc)
                    .arg(&*counters)
                    .arg(&table);
                push_advance(&mut attend, &advance);
                attend
                    .arg(&hq32)
                    .arg(&hkv32)
                    .arg(&cap32)
                    .arg(&c32)
                    .arg(&n_probe32)
                    .arg(&lists32)
                    .arg(&page32)
                    .arg(&sinks32)
                    .arg(&scale_log2);
                let cfg = LaunchConfig {
                    grid_dim: (splits32, rows32, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                // SAFETY: argument types and order match `decode_impl`; reads stay inside the views
                // (ids are checked against cap on the device), writes inside the partials, the output
                // chunk and the first `rows` counters.
                unsafe { attend.launch(cfg) }.w()?;
                Ok(())
            })?;
            if fused {
                continue;
            }
            let mut merge = stream.launch_builder(&combine);
            merge
                .arg(&part_o)
                .arg(&part_ml)
                .arg(&mut oc)
                .arg(&hq32)
                .arg(&hkv32)
                .arg(&splits32)
                .arg(&d32);
            // Each thread reads 4 floats of a split's output: 4 · threads / D splits side by side.
            let side_by_side = 4 * COMBINE_THREADS as usize / d;
            let cfg = LaunchConfig {
                grid_dim: (to_u32(items * hq)?, 1, 1),
                block_dim: (COMBINE_THREADS, 1, 1),
                shared_mem_bytes: to_u32((2 * splits + side_by_side * (d + 1)) * 4)?,
            };
            // SAFETY: argument types and order match `combine_impl`; one block per output row of D.
            unsafe { merge.launch(cfg) }.w()?;
        }
        Ok(())
    })?;
    Ok(out)
}
