//! Launch of the tensor-core causal prefill (`cuda/prefill.cu`) for [`PrefillOp`]: one kernel per
//! 64 batch items, reading queries and the op's caches in place. Host work: the kernel parameters.

use super::{load, to_u32, view, with_cuda, ItemTable, MAX_BATCH, PREFILL};
use crate::attend::prefill::PrefillDims;
use crate::attend::PrefillOp;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

/// Keys per shared-memory tile (`PREFILL_BC` in `cuda/prefill.cu`).
const KEY_TILE: usize = 64;

/// Warps per block, 16 query rows each: 8 at d 128, 4 at d 64 (H200, `bench/NOTES.md` §14:
/// 208 vs 193 TFLOP/s at d 128, 209 vs 178 at d 64). `SAAP_PREFILL_WARPS=4|8` overrides (tuning).
fn warps(d: usize) -> usize {
    static V: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *V.get_or_init(|| match std::env::var("SAAP_PREFILL_WARPS").as_deref() {
        Ok("4") => Some(4),
        Ok("8") => Some(8),
        _ => None,
    });
    forced.unwrap_or(if d == 128 { 8 } else { 4 })
}

/// [`PrefillOp`] on CUDA for bf16/f16 rotated queries `q` (`[B, Hq, T, D]`, contiguous).
pub(crate) fn prefill(
    op: &PrefillOp,
    q: &CudaStorage,
    q_l: &Layout,
    dims: PrefillDims,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let d = dims.5;
    if d != 64 && d != 128 {
        candle_core::bail!("saap cuda prefill: head dim {d} is not supported (64 or 128)");
    }
    let out = match q.dtype() {
        DType::BF16 => typed::<bf16>(op, q, q_l, dims, "bf16")?,
        DType::F16 => typed::<f16>(op, q, q_l, dims, "f16")?,
        other => candle_core::bail!("saap cuda prefill: dtype {other:?} (bf16 or f16)"),
    };
    Ok((out, q_l.shape().clone()))
}

fn typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    op: &PrefillOp,
    q: &CudaStorage,
    q_l: &Layout,
    (b, hq, hkv, t, cap, d): PrefillDims,
    tname: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = q.device().clone();
    let elem = std::mem::size_of::<T>();
    let q = view::<T>(q, q_l)?;
    let warps = warps(d);
    let func = load(
        &dev,
        &PREFILL,
        &format!("saap_prefill_{tname}_d{d}_w{warps}"),
    )?;
    // Rows past each item's length are never written by the kernel: zero them here.
    let mut out = dev.alloc_zeros::<T>(b * hq * t * d)?;
    let g = hq / hkv;
    let rows_per_block = 16 * warps;
    let smem = 2 * KEY_TILE * (d + 8) * elem;
    let (hq32, hkv32, t32, cap32) = (to_u32(hq)?, to_u32(hkv)?, to_u32(t)?, to_u32(cap)?);
    let scale_log2 = op.scale * std::f32::consts::LOG2_E;
    let stream = dev.cuda_stream();
    with_cuda(&op.k_cache, "k cache", |k_st, k_l| {
        with_cuda(&op.v_cache, "v cache", |v_st, v_l| {
            for (what, layout) in [("query", q_l), ("k cache", k_l), ("v cache", v_l)] {
                if (layout.start_offset() * elem) % 16 != 0 {
                    candle_core::bail!("saap cuda prefill: {what} is not 16-byte aligned");
                }
            }
            let (k, v) = (view::<T>(k_st, k_l)?, view::<T>(v_st, v_l)?);
            for i0 in (0..b).step_by(MAX_BATCH) {
                let items = (b - i0).min(MAX_BATCH);
                let longest = op.lens[i0..i0 + items].iter().max().copied().unwrap_or(0);
                if longest == 0 {
                    continue;
                }
                let pairs = (i0..i0 + items).map(|i| (op.starts[i], op.lens[i]));
                let table = ItemTable::new(pairs)?;
                let (qs, os) = (i0 * hq * t * d, (i0 + items) * hq * t * d);
                let kv = i0 * hkv * cap * d..(i0 + items) * hkv * cap * d;
                let (qc, kc, vc) = (q.slice(qs..os), k.slice(kv.clone()), v.slice(kv));
                let mut oc = out.slice_mut(qs..os);
                let cfg = LaunchConfig {
                    grid_dim: (
                        to_u32((longest * g).div_ceil(rows_per_block))?,
                        hkv32,
                        to_u32(items)?,
                    ),
                    block_dim: (to_u32(32 * warps)?, 1, 1),
                    shared_mem_bytes: to_u32(smem)?,
                };
                let mut launch = stream.launch_builder(&func);
                launch
                    .arg(&mut oc)
                    .arg(&qc)
                    .arg(&kc)
                    .arg(&vc)
                    .arg(&table)
                    .arg(&hq32)
                    .arg(&hkv32)
                    .arg(&t32)
                    .arg(&cap32)
                    .arg(&scale_log2);
                // SAFETY: argument types and order match `prefill_impl`; `PrefillOp::dims`
                // checked that start + len <= cap and len <= T for every item, so the kernel reads
                // cache rows below cap and query/output rows below T of this chunk.
                unsafe { launch.launch(cfg) }.w()?;
            }
            Ok(())
        })
    })?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
