//! Launches of the decode-step routing (`cuda/decode.cu`): the classifier MLP of every query head
//! (weights widened to f32, f32 accumulation; its hidden layer, then its output layer, or both in
//! one kernel where the hidden layer is small) into scores, then top-ℓ into probes. Two or three
//! launches replace the dozen candle ops (casts, transposes, batched matmuls, GELU, arg_sort,
//! narrow) of [`crate::classify::Classifier::scores`] + [`crate::classify::top_probes`].

use super::{dtype_name, load, to_u32, view, with_cuda, DECODE, SMEM_LIMIT};
use crate::classify::Classifier;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};
use std::sync::Arc;

/// Dynamic shared memory of a top-n kernel over C scores (`top_cut` + `top_sorted` in
/// `cuda/top.cuh`): the selection padded to a power of two (u64 keys), C score bits, a 256-bin
/// histogram.
fn top_smem_bytes(c: usize, n: usize) -> usize {
    n.next_power_of_two().max(2) * 8 + (c + 256) * 4
}

/// Threads and output columns per MLP block (`ROUTE_*` in `cuda/decode.cu`).
const THREADS: u32 = 256;
const COLS: usize = 128;
/// Batch items per MLP block: the kernels come in 1 (batch 1) and 4 (`_i1`, `_i4`).
const ITEMS: usize = 4;
/// Most threads of a top-ℓ block.
const TOP_THREADS: usize = 512;
/// Widest hidden layer the fused MLP kernel takes (`saap_route_fused_*`): each of a head's
/// output blocks computes the D · H hidden multiply-adds again, which at Qwen2.5's H = 64 costs
/// less than the hidden layer's own launch in series; at Llama-3.1-8B's H = 256 the separate
/// hidden layer was faster (`bench/NOTES.md` §29).
const FUSED_MAX_HIDDEN: usize = 64;

/// Batch items per MLP block for a batch of `b`.
fn items_per_block(b: usize) -> usize {
    if b == 1 {
        1
    } else {
        ITEMS
    }
}

/// Routing of pre-RoPE queries `[B, Hq, D]` to their `n_probe` best partitions `[B, Hq, ℓ]` u32.
pub(crate) struct RouteOp<'a> {
    pub classifier: &'a Classifier,
    pub n_probe: usize,
}

/// Whether [`RouteOp`] handles these shapes, dtypes and ℓ; otherwise the caller uses candle ops.
pub(crate) fn supported(classifier: &Classifier, q: &Tensor, n_probe: usize) -> bool {
    let (Ok((hq, d, h)), Ok((_, _, c))) = (classifier.w1.dims3(), classifier.w2.dims3()) else {
        return false;
    };
    let w = classifier.w1.dtype();
    let same = [&classifier.b1, &classifier.w2, &classifier.b2]
        .iter()
        .all(|t| t.dtype() == w && t.is_contiguous());
    let smem = smem_bytes(d, h, w, ITEMS);
    matches!(w, DType::F32 | DType::BF16)
        && same
        && classifier.w1.is_contiguous()
        && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && q.dims() == [q.dims().first().copied().unwrap_or(0), hq, d]
        && (c * w.size_in_bytes()) % 16 == 0
        && (h * w.size_in_bytes()) % 16 == 0
        && smem.hidden.max(smem.out).max(smem.fused) <= SMEM_LIMIT
        && top_smem_bytes(c, n_probe) <= SMEM_LIMIT
}

/// Dynamic shared memory of the MLP's kernels for `items` per block, in bytes.
struct MlpSmem {
    /// The hidden layer's: queries, warps' partial sums over 32 lanes × one 16-byte vector of
    /// hidden units.
    hidden: usize,
    /// The output layer's: hidden units, warps' partial sums over `COLS` outputs.
    out: usize,
    /// The fused kernel's: hidden units, then the larger of the other two's working areas.
    fused: usize,
}

fn smem_bytes(d: usize, h: usize, w: DType, items: usize) -> MlpSmem {
    let warps = THREADS as usize / 32;
    let hidden_work = items * d + warps * items * 32 * 16 / w.size_in_bytes();
    let out_work = warps * items * COLS;
    MlpSmem {
        hidden: hidden_work * 4,
        out: (items * h + out_work) * 4,
        fused: (items * h + hidden_work.max(out_work)) * 4,
    }
}

impl CustomOp1 for RouteOp<'_> {
    fn name(&self) -> &'static str {
        "saap-route"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("saap route: the CUDA kernel has no CPU twin; use Classifier::scores")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let cl = self.classifier;
        let (b, hq, d) = q_l.shape().dims3()?;
        let (_, _, h) = cl.w1.dims3()?;
        let (_, _, c) = cl.w2.dims3()?;
        let dev = q.device().clone();
        let qname = dtype_name(q.dtype(), "route query")?;
        let wname = match cl.w1.dtype() {
            DType::F32 => "wf32",
            DType::BF16 => "wbf16",
            other => candle_core::bail!("saap route: weight dtype {other:?}"),
        };
        let items = items_per_block(b);
        let stream = dev.cuda_stream();
        // SAFETY: every score is written by the output-layer (or fused) kernel, whose grid
        // covers B × Hq × C.
        let scores = unsafe { dev.alloc::<f32>(b * hq * c) }?;
        let (b32, hq32, d32, h32, c32) =
            (to_u32(b)?, to_u32(hq)?, to_u32(d)?, to_u32(h)?, to_u32(c)?);
        let smem = smem_bytes(d, h, cl.w1.dtype(), items);
        let groups = to_u32(b.div_ceil(items))?;
        let out_grid = (to_u32(c.div_ceil(COLS))?, hq32, groups);
        let config = |grid_dim, bytes| -> candle_core::Result<LaunchConfig> {
            Ok(LaunchConfig {
                grid_dim,
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: to_u32(bytes)?,
            })
        };
        let mlp = if h <= FUSED_MAX_HIDDEN {
            let name = format!("saap_route_fused_{wname}_{qname}_i{items}");
            Mlp::Fused(load(&dev, &DECODE, &name)?, config(out_grid, smem.fused)?)
        } else {
            let name = format!("saap_route_hidden_{wname}_{qname}_i{items}");
            Mlp::Split {
                hidden_fn: load(&dev, &DECODE, &name)?,
                out_fn: load(&dev, &DECODE, &format!("saap_route_out_{wname}_i{items}"))?,
                // SAFETY: every hidden unit is written by the hidden-layer kernel (grid covers
                // B × Hq, each block all H units of its items).
                hidden: unsafe { dev.alloc::<f32>(b * hq * h) }?,
                cfg_hidden: config((hq32, groups, 1), smem.hidden)?,
                cfg_out: config(out_grid, smem.out)?,
            }
        };
        let top = load(&dev, &DECODE, "saap_route_top")?;
        for (name, w) in [("w1", &cl.w1), ("w2", &cl.w2)] {
            if (w.layout().start_offset() * w.dtype().size_in_bytes()) % 16 != 0 {
                candle_core::bail!("saap route: {name} does not start on a 16-byte boundary");
            }
        }
        let dims = [b32, hq32, d32, h32, c32];
        match (cl.w1.dtype(), q.dtype()) {
            (DType::F32, DType::F32) => {
                mlp.launch::<f32, f32>((q, q_l), cl, &stream, &scores, dims)
            }
            (DType::F32, DType::BF16) => {
                mlp.launch::<f32, bf16>((q, q_l), cl, &stream, &scores, dims)
            }
            (DType::F32, DType::F16) => {
                mlp.launch::<f32, f16>((q, q_l), cl, &stream, &scores, dims)
            }
            (DType::BF16, DType::F32) => {
                mlp.launch::<bf16, f32>((q, q_l), cl, &stream, &scores, dims)
            }
            (DType::BF16, DType::BF16) => {
                mlp.launch::<bf16, bf16>((q, q_l), cl, &stream, &scores, dims)
            }
            (DType::BF16, DType::F16) => {
                mlp.launch::<bf16, f16>((q, q_l), cl, &stream, &scores, dims)
            }
            (w, q) => candle_core::bail!("saap route: weights {w:?}, queries {q:?}"),
        }?;
        let rows = b * hq;
        if self.n_probe == 0 || self.n_probe > c {
            candle_core::bail!("saap route: ℓ = {} outside 1..={c}", self.n_probe);
        }
        let sel_cap = self.n_probe.next_power_of_two().max(2);
        // SAFETY: every probe is written by the top-ℓ kernel (one block per row).
        let probes = unsafe { dev.alloc::<u32>(rows * self.n_probe) }?;
        let (sel_cap32, n_probe32) = (to_u32(sel_cap)?, to_u32(self.n_probe)?);
        let cfg = LaunchConfig {
            grid_dim: (to_u32(rows)?, 1, 1),
            // About two scores per thread.
            block_dim: (
                to_u32(c.next_power_of_two().div_ceil(2).clamp(32, TOP_THREADS))?,
                1,
                1,
            ),
            shared_mem_bytes: to_u32(top_smem_bytes(c, self.n_probe))?,
        };
        let mut builder = stream.launch_builder(&top);
        builder
            .arg(&scores)
            .arg(&probes)
            .arg(&c32)
            .arg(&sel_cap32)
            .arg(&n_probe32);
        // SAFETY: argument types and order match `saap_route_top`; its shared memory as sized by
        // `top_smem_bytes`.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(probes, dev),
            Shape::from((b, hq, self.n_probe)),
        ))
    }
}

/// The classifier MLP's launches for one step: both layers in one kernel, or the hidden layer
/// into `hidden` and then the output layer.
enum Mlp {
    Fused(CudaFunction, LaunchConfig),
    Split {
        hidden_fn: CudaFunction,
        out_fn: CudaFunction,
        hidden: CudaSlice<f32>,
        cfg_hidden: LaunchConfig,
        cfg_out: LaunchConfig,
    },
}

impl Mlp {
    /// Launches the MLP on `stream`: queries `q` (type `Q`), weights of type `W`, `[b, hq, d, h,
    /// c]`, into `scores` `[b, hq, c]`.
    fn launch<W: CudaDType, Q: CudaDType>(
        &self,
        (q, q_l): (&CudaStorage, &Layout),
        cl: &Classifier,
        stream: &Arc<CudaStream>,
        scores: &CudaSlice<f32>,
        [b, hq, d, h, c]: [u32; 5],
    ) -> candle_core::Result<()> {
        let qv = view::<Q>(q, q_l)?;
        with_cuda(&cl.w1, "w1", |w1, w1_l| {
            with_cuda(&cl.b1, "b1", |b1, b1_l| {
                with_cuda(&cl.w2, "w2", |w2, w2_l| {
                    with_cuda(&cl.b2, "b2", |b2, b2_l| {
                        let (w1, b1) = (view::<W>(w1, w1_l)?, view::<W>(b1, b1_l)?);
                        let (w2, b2) = (view::<W>(w2, w2_l)?, view::<W>(b2, b2_l)?);
                        match self {
                            Mlp::Fused(func, cfg) => {
                                let mut builder = stream.launch_builder(func);
                                builder.arg(&qv).arg(&w1).arg(&b1).arg(&w2).arg(&b2);
                                builder.arg(scores).arg(&b).arg(&hq).arg(&d).arg(&h).arg(&c);
                                // SAFETY: argument types and order match `route_fused_impl`;
                                // the grid covers exactly the scores; w1 and w2 rows are
                                // 16-byte aligned (checked by `supported` and the caller).
                                unsafe { builder.launch(*cfg) }.w()?;
                            }
                            Mlp::Split {
                                hidden_fn,
                                out_fn,
                                hidden,
                                cfg_hidden,
                                cfg_out,
                            } => {
                                let mut builder = stream.launch_builder(hidden_fn);
                                builder.arg(&qv).arg(&w1).arg(&b1).arg(hidden);
                                builder.arg(&b).arg(&hq).arg(&d).arg(&h);
                                // SAFETY: argument types and order match `route_hidden_impl`;
                                // the grid covers exactly the hidden units; w1 rows aligned.
                                unsafe { builder.launch(*cfg_hidden) }.w()?;
                                let mut builder = stream.launch_builder(out_fn);
                                builder.arg(hidden).arg(&w2).arg(&b2).arg(scores);
                                builder.arg(&b).arg(&hq).arg(&h).arg(&c);
                                // SAFETY: argument types and order match `route_out_impl`; the
                                // grid covers exactly the scores; w2 rows aligned.
                                unsafe { builder.launch(*cfg_out) }.w()?;
                            }
                        }
                        Ok(())
                    })
                })
            })
        })
    }
}
