//! Launches of the model glue's kernels (`cuda/glue.cu`): the RMS normalization, optionally fused
//! with the residual add before it (see `crate::models::norm`), and SwiGLU (see
//! `crate::models::swiglu`).

use super::{load, to_u32, view, Module, NULL_PTR};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

const GLUE: Module = Module {
    name: "saap_glue",
    fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/glue.fatbin")),
};

/// Threads per row (`NORM_THREADS` in `cuda/glue.cu`).
const THREADS: u32 = 256;

/// Threads per block of SwiGLU (`SWIGLU_THREADS`).
const SWIGLU_THREADS: u32 = 256;

/// `x` (`[.., cols]`, contiguous) normalized with `weight` (`[cols]`); with `delta` (shaped as
/// `x`), `[2, ..]`: the sum `x + delta`, then its normalization.
pub(crate) fn rms_norm(
    x: (&CudaStorage, &Layout),
    delta: Option<(&CudaStorage, &Layout)>,
    weight: (&CudaStorage, &Layout),
    eps: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dims = x.1.shape().dims();
    let cols = dims.last().copied().unwrap_or(0);
    if cols == 0 || weight.1.shape().dims() != [cols] {
        candle_core::bail!(
            "saap rms norm: weight {:?} for input {dims:?}",
            weight.1.shape()
        )
    }
    if let Some((d, l)) = delta {
        if l.shape() != x.1.shape() || d.dtype() != x.0.dtype() {
            candle_core::bail!("saap rms norm: residual {:?} for input {dims:?}", l.shape())
        }
    }
    let rows = x.1.shape().elem_count() / cols;
    let out_shape: Shape = match delta {
        Some(_) => [&[2], dims].concat().into(),
        None => dims.into(),
    };
    let out = match x.0.dtype() {
        DType::F32 => typed::<f32>(x, delta, weight, rows, cols, eps, "f32")?,
        DType::BF16 => typed::<bf16>(x, delta, weight, rows, cols, eps, "bf16")?,
        DType::F16 => typed::<f16>(x, delta, weight, rows, cols, eps, "f16")?,
        other => candle_core::bail!("saap rms norm: dtype {other:?}"),
    };
    Ok((out, out_shape))
}

fn typed<T: CudaDType + DeviceRepr>(
    (x, x_l): (&CudaStorage, &Layout),
    delta: Option<(&CudaStorage, &Layout)>,
    (w, w_l): (&CudaStorage, &Layout),
    rows: usize,
    cols: usize,
    eps: f32,
    tname: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = x.device().clone();
    let func = load(&dev, &GLUE, &format!("saap_rms_norm_{tname}"))?;
    let xs = view::<T>(x, x_l)?;
    let ws = view::<T>(w, w_l)?;
    let deltas = delta.map(|(d, l)| view::<T>(d, l)).transpose()?;
    let outputs = if delta.is_some() { 2 } else { 1 };
    // SAFETY: the kernel writes every element (each row's sum and normalization).
    let mut out = unsafe { dev.alloc::<T>(outputs * rows * cols)? };
    let (rows32, cols32) = (to_u32(rows)?, to_u32(cols)?);
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&mut out).arg(&xs);
    match &deltas {
        Some(d) => launch.arg(d),
        None => launch.arg(&NULL_PTR),
    };
    launch.arg(&ws).arg(&rows32).arg(&cols32).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match `saap_rms_norm_*`; the views hold rows × cols
    // elements (cols for the weight), the output outputs × rows × cols.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `silu(gate) * up` of `gate_up` (`[.., 2 * width]`, contiguous: gate then up): `[.., width]`.
pub(crate) fn silu_mul(
    gate_up: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dims = gate_up.1.shape().dims();
    let cols = dims.last().copied().unwrap_or(0);
    if cols == 0 || cols % 2 != 0 {
        candle_core::bail!("saap swiglu: gate and up of equal widths, got {dims:?}")
    }
    let width = cols / 2;
    let rows = gate_up.1.shape().elem_count() / cols;
    let out_shape: Shape = [&dims[..dims.len() - 1], &[width]].concat().into();
    let out = match gate_up.0.dtype() {
        DType::F32 => silu_mul_typed::<f32>(gate_up, rows, width, "f32")?,
        DType::BF16 => silu_mul_typed::<bf16>(gate_up, rows, width, "bf16")?,
        DType::F16 => silu_mul_typed::<f16>(gate_up, rows, width, "f16")?,
        other => candle_core::bail!("saap swiglu: dtype {other:?}"),
    };
    Ok((out, out_shape))
}

fn silu_mul_typed<T: CudaDType + DeviceRepr>(
    (x, x_l): (&CudaStorage, &Layout),
    rows: usize,
    width: usize,
    tname: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = x.device().clone();
    let func = load(&dev, &GLUE, &format!("saap_silu_mul_{tname}"))?;
    let xs = view::<T>(x, x_l)?;
    let n = rows * width;
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    let (rows32, width32) = (to_u32(rows)?, to_u32(width)?);
    let blocks = to_u32(n.div_ceil(SWIGLU_THREADS as usize))?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&mut out).arg(&xs).arg(&rows32).arg(&width32);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (SWIGLU_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match `saap_silu_mul_*`; the view holds rows × 2·width
    // elements, the output rows × width.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
