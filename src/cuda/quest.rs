//! Launches of Quest's decode-step routing (`cuda/quest.cu`): the group score of every page,
//! counted into a histogram of their ranks, then each KV group's best pages selected and listed
//! once for its query heads in page order, each row spread over blocks of 1024 pages. A memset
//! and three launches replace the candle ops (relu, sub, two batched matmuls, add, max, masking,
//! arg_sort over P, gather, where) of [`crate::quest::route`], with the same result up to the
//! order of f32 summation.

use super::{dtype_name, load, sm_count, smem_optin, to_u32, use_smem, view, with_cuda, QUEST};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};

/// Threads per score block and pages a block's threads take at once (`QUEST_THREADS`,
/// `QUEST_SLOTS` in `cuda/quest.cu`).
const THREADS: u32 = 256;
const SLOTS: usize = 32;
/// Threads of a select or emit block (`QUEST_TOP_THREADS`).
const TOP_THREADS: u32 = 256;
/// Pages of a row one select or emit block takes (`QUEST_CHUNK`).
const CHUNK: usize = 1024;
/// Chunks of a row the select kernel accounts for (`QUEST_MAX_CHUNKS`).
const MAX_CHUNKS: usize = 64;
/// Bins of a row's histogram of ranking bits (`QUEST_BINS`).
const BINS: usize = 4096;
/// Left of the opt-in limit for the select kernel's static shared memory (2.2 KiB with sm_90's
/// ptxas).
const STATIC_SMEM: usize = 4096;

/// Dynamic shared memory of a select block over P pages (`saap_quest_select`): the cut bin's
/// pages and their bits, gathered by the last block of a row.
fn top_smem_bytes(p: usize) -> usize {
    2 * p * 4
}

/// u32 of the select kernel's scratch per row (`QuestScratch` in `cuda/quest.cu`).
fn scratch_len(p: usize) -> usize {
    2 * p + 3 * p.div_ceil(CHUNK) + 1 + p.div_ceil(32)
}

/// Whether [`route`] handles these tensors and `k`; otherwise the caller uses candle ops.
pub(crate) fn supported(q: &Tensor, min: &Tensor, max: &Tensor, filled: &Tensor, k: usize) -> bool {
    let Device::Cuda(dev) = q.device() else {
        return false;
    };
    let (Ok((b, hq, d)), Ok((_, hkv, p, _))) = (q.dims3(), min.dims4()) else {
        return false;
    };
    let bounds_ok = |t: &Tensor| {
        t.dtype() == DType::F32
            && t.is_contiguous()
            && t.dims() == [b, hkv, p, d]
            && t.device().same_device(q.device())
            // 16-byte loads of every row.
            && t.layout().start_offset() % 4 == 0
    };
    matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && matches!(d, 64 | 128)
        && b > 0
        && hkv > 0
        && hq % hkv == 0
        && (1..=8).contains(&(hq / hkv))
        && bounds_ok(min)
        && bounds_ok(max)
        && top_fits(dev, filled, (b, hkv, p), k)
}

/// Whether the selection kernels take `k` of P pages with `filled` `[B, Hkv, P]` on `dev`.
fn top_fits(
    dev: &CudaDevice,
    filled: &Tensor,
    (b, hkv, p): (usize, usize, usize),
    k: usize,
) -> bool {
    b > 0
        && hkv > 0
        && (1..=p).contains(&k)
        && filled.dtype() == DType::U8
        && filled.is_contiguous()
        && filled.dims() == [b, hkv, p]
        && matches!(filled.device(), Device::Cuda(f) if f.same_device(dev))
        && p <= MAX_CHUNKS * CHUNK
        && top_smem_bytes(p) + STATIC_SMEM <= smem_optin(dev)
}

/// Whether [`top`] ranks these group scores; otherwise the caller uses candle ops.
pub(crate) fn top_supported(scores: &Tensor, filled: &Tensor, k: usize) -> bool {
    let Device::Cuda(dev) = scores.device() else {
        return false;
    };
    let Ok(dims) = scores.dims3() else {
        return false;
    };
    scores.dtype() == DType::F32 && top_fits(dev, filled, dims, k)
}

/// Each KV group's `k` best of group scores `[B, Hkv, P]` f32 computed elsewhere (Quest by
/// shares), by the selection [`route`] runs: `[B, Hkv, k]` u32 in page order, P where the page
/// holds no key of its item. For shapes [`top_supported`] accepts.
pub(crate) fn top(scores: &Tensor, filled: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let scores = scores.contiguous()?;
    let hist = scores.apply_op1_no_bwd(&HistOp { filled })?;
    scores.apply_op1_no_bwd(&TopOp {
        filled,
        hist: &hist,
        k,
    })
}

/// Quest routing on CUDA for shapes [`supported`] accepts: probes `[B, Hkv, k]` u32 (P where the
/// page holds no key of its item) and group scores `[B, Hkv, P]` f32, as
/// [`crate::quest::route`] defines them. Device work only, fixed-size allocations.
pub(crate) fn route(
    q: &Tensor,
    min: &Tensor,
    max: &Tensor,
    filled: &Tensor,
    k: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let b = q.dim(0)?;
    let hkv = min.dim(1)?;
    // The rows' histograms counted into by the score kernel, then the second-level histograms the
    // selection counts the cut bin's pages into, then one counter per row for the selection's
    // last block: fresh and zero every step (a memset node when the step is recorded).
    let hist = Tensor::zeros(b * hkv * (2 * BINS + 1), DType::U32, q.device())?;
    let scores = q.contiguous()?.apply_op1_no_bwd(&ScoresOp {
        min,
        max,
        filled,
        hist: &hist,
    })?;
    let probes = scores.apply_op1_no_bwd(&TopOp {
        filled,
        hist: &hist,
        k,
    })?;
    Ok((probes, scores))
}

/// Group scores `[B, Hkv, P]` of rotated queries `[B, Hq, D]` over page bounds `[B, Hkv, P, D]`,
/// each page also counted into `hist` (`B · Hkv · BINS` u32 first, zero) by the top bits of its
/// rank.
struct ScoresOp<'a> {
    min: &'a Tensor,
    max: &'a Tensor,
    filled: &'a Tensor,
    hist: &'a Tensor,
}

impl CustomOp1 for ScoresOp<'_> {
    fn name(&self) -> &'static str {
        "saap-quest-scores"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("saap quest scores: the CUDA kernel has no CPU twin; use quest::route")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, hq, d) = q_l.shape().dims3()?;
        let (_, hkv, p, _) = self.min.dims4()?;
        let g = hq / hkv;
        let dev = q.device().clone();
        let qname = dtype_name(q.dtype(), "quest scores query")?;
        // Kernels exist for 1, 2, 4 and 8 heads per group; a smaller group runs in the next size up.
        let func = load(
            &dev,
            &QUEST,
            &format!("saap_quest_scores_{qname}_d{d}_g{}", g.next_power_of_two()),
        )?;
        // Enough blocks to fill the GPU a few times over, each at least one page per slot.
        let rows = b * hkv;
        let per_block = (p * rows)
            .div_ceil(4 * sm_count(&dev)?)
            .next_multiple_of(SLOTS)
            .clamp(SLOTS, 16 * SLOTS);
        let cfg = LaunchConfig {
            grid_dim: (to_u32(p.div_ceil(per_block))?, to_u32(hkv)?, to_u32(b)?),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: to_u32(g * d * 4)?,
        };
        // SAFETY: every score is written (the grid covers B × Hkv × P).
        let scores = unsafe { dev.alloc::<f32>(rows * p) }?;
        let dims = [to_u32(hq)?, to_u32(hkv)?, to_u32(p)?, to_u32(per_block)?];
        let args = (&func, &scores, dims, cfg);
        match q.dtype() {
            DType::F32 => self.launch::<f32>(q, q_l, &dev, args),
            DType::BF16 => self.launch::<bf16>(q, q_l, &dev, args),
            DType::F16 => self.launch::<f16>(q, q_l, &dev, args),
            other => candle_core::bail!("saap quest scores: query dtype {other:?}"),
        }?;
        Ok((
            CudaStorage::wrap_cuda_slice(scores, dev),
            Shape::from((b, hkv, p)),
        ))
    }
}

impl ScoresOp<'_> {
    fn launch<Q: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        dev: &CudaDevice,
        (func, scores, dims, cfg): (&CudaFunction, &CudaSlice<f32>, [u32; 4], LaunchConfig),
    ) -> candle_core::Result<()> {
        let q = view::<Q>(q, q_l)?;
        with_cuda(self.min, "page minima", |lo, lo_l| {
            with_cuda(self.max, "page maxima", |hi, hi_l| {
                with_cuda(self.filled, "filled pages", |f, f_l| {
                    with_cuda(self.hist, "page histogram", |h, h_l| {
                        let (lo, hi) = (view::<f32>(lo, lo_l)?, view::<f32>(hi, hi_l)?);
                        let (filled, hist) = (view::<u8>(f, f_l)?, view::<u32>(h, h_l)?);
                        let stream = dev.cuda_stream();
                        let mut builder = stream.launch_builder(func);
                        builder.arg(&q).arg(&lo).arg(&hi).arg(&filled).arg(scores);
                        builder.arg(&hist);
                        for x in &dims {
                            builder.arg(x);
                        }
                        // SAFETY: argument types and order match `quest_scores_impl`; bound rows
                        // are 16-byte aligned (D of 64 or 128, offsets checked by `supported`);
                        // `hist` is this step's own zeroed tensor, which only this kernel writes.
                        unsafe { builder.launch(cfg) }.w()?;
                        Ok(())
                    })
                })
            })
        })
    }
}

/// The `filled` mask `[B, Hkv, P]` u8 of the quest op `op`, checked against its scores' dims.
fn filled_view<'a>(
    f: &'a CudaStorage,
    f_l: &Layout,
    (b, hkv, p): (usize, usize, usize),
    op: &str,
) -> candle_core::Result<CudaView<'a, u8>> {
    if f_l.dims() != [b, hkv, p] {
        candle_core::bail!(
            "saap quest {op}: filled {:?}, expected [{b}, {hkv}, {p}]",
            f_l.dims()
        );
    }
    view::<u8>(f, f_l)
}

/// The histograms [`TopOp`] reads, `B · Hkv · (2 · BINS + 1)` u32, for group scores `[B, Hkv,
/// P]` f32 computed elsewhere: each row's pages counted by the top bits of their rank (as the
/// score kernel counts them), then zero second-level bins and counters.
struct HistOp<'a> {
    filled: &'a Tensor,
}

impl CustomOp1 for HistOp<'_> {
    fn name(&self) -> &'static str {
        "saap-quest-hist"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("saap quest hist: the CUDA kernel has no CPU twin; use quest::route")
    }

    fn cuda_fwd(&self, s: &CudaStorage, s_l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, hkv, p) = s_l.shape().dims3()?;
        let rows = b * hkv;
        let dev = s.device().clone();
        let func = load(&dev, &QUEST, "saap_quest_hist")?;
        let scores = view::<f32>(s, s_l)?;
        // Zero every step (a memset node when the step is recorded).
        let hist = dev.alloc_zeros::<u32>(rows * (2 * BINS + 1))?;
        let cfg = LaunchConfig {
            grid_dim: (to_u32(p.div_ceil(THREADS as usize))?, to_u32(rows)?, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let p32 = to_u32(p)?;
        with_cuda(self.filled, "filled pages", |f, f_l| {
            let filled = filled_view(f, f_l, (b, hkv, p), "hist")?;
            let first = hist.slice(..rows * BINS);
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            builder.arg(&scores).arg(&filled).arg(&first).arg(&p32);
            // SAFETY: argument types and order match `saap_quest_hist`; the grid covers B × Hkv
            // × P, every bin it counts into lies in this op's own zeroed allocation.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(hist, dev),
            Shape::from(rows * (2 * BINS + 1)),
        ))
    }
}

/// Each KV group's `k` best pages of group scores `[B, Hkv, P]`, in page order: `[B, Hkv, k]`
/// u32.
struct TopOp<'a> {
    filled: &'a Tensor,
    /// The score kernel's histograms of ranking bits (`B · Hkv · BINS`), then as many zero
    /// second-level bins and one zero counter per row.
    hist: &'a Tensor,
    k: usize,
}

impl CustomOp1 for TopOp<'_> {
    fn name(&self) -> &'static str {
        "saap-quest-top"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("saap quest top: the CUDA kernel has no CPU twin; use quest::route")
    }

    fn cuda_fwd(&self, s: &CudaStorage, s_l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, hkv, p) = s_l.shape().dims3()?;
        let k = self.k;
        if k == 0 || k > p {
            candle_core::bail!("saap quest top: k = {k} outside 1..={p}");
        }
        let rows = b * hkv;
        let dev = s.device().clone();
        let select = load(&dev, &QUEST, "saap_quest_select")?;
        let emit = load(&dev, &QUEST, "saap_quest_emit")?;
        let smem = top_smem_bytes(p);
        // `supported` checked the device's limit.
        use_smem(&dev, &select, smem, "quest select")?;
        let scores = view::<f32>(s, s_l)?;
        // SAFETY: the select kernel writes every entry the emit kernel reads (each chunk's
        // counts and staged pages, the last block the offsets, the cut and the bitmap).
        let scratch = unsafe { dev.alloc::<u32>(rows * scratch_len(p)) }?;
        // SAFETY: every probe is written (the chunks' chosen pages, k per row).
        let probes = unsafe { dev.alloc::<u32>(rows * k) }?;
        let grid = (to_u32(p.div_ceil(CHUNK))?, to_u32(rows)?, 1);
        let cfg = |shared_mem_bytes| LaunchConfig {
            grid_dim: grid,
            block_dim: (TOP_THREADS, 1, 1),
            shared_mem_bytes,
        };
        let (p32, k32) = (to_u32(p)?, to_u32(k)?);
        with_cuda(self.filled, "filled pages", |f, f_l| {
            let filled = filled_view(f, f_l, (b, hkv, p), "top")?;
            with_cuda(self.hist, "page histogram", |h, h_l| {
                let all = view::<u32>(h, h_l)?;
                if all.len() != rows * (2 * BINS + 1) {
                    candle_core::bail!("saap quest top: histograms of {} u32", all.len());
                }
                let hist = all.slice(..rows * BINS);
                let hist2 = all.slice(rows * BINS..2 * rows * BINS);
                let counters = all.slice(2 * rows * BINS..);
                let stream = dev.cuda_stream();
                let mut builder = stream.launch_builder(&select);
                builder.arg(&scores).arg(&filled).arg(&hist).arg(&hist2);
                builder.arg(&counters).arg(&scratch).arg(&p32).arg(&k32);
                // SAFETY: argument types and order match `saap_quest_select`; the second-level
                // bins and counters are this step's zeroed tensor; shared memory as sized by
                // `top_smem_bytes`, opted in above where it exceeds the default.
                unsafe { builder.launch(cfg(to_u32(smem)?)) }.w()?;
                let mut builder = stream.launch_builder(&emit);
                builder.arg(&scores).arg(&filled).arg(&scratch).arg(&probes);
                builder.arg(&p32).arg(&k32);
                // SAFETY: argument types and order match `saap_quest_emit`, over the grid the
                // select kernel filled the scratch for; static shared memory only.
                unsafe { builder.launch(cfg(0)) }.w()?;
                Ok(())
            })
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(probes, dev),
            Shape::from((b, hkv, k)),
        ))
    }
}
