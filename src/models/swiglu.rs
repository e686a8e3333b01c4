//! SwiGLU of a decoder layer's feed-forward block: `silu(gate) * up`. On CUDA one kernel
//! (`cuda/glue.cu`) reads the gate and up halves of the fused gate/up projection, where candle
//! took two launches (`silu`, `mul`) per layer and decode step; elsewhere candle's ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};

/// `silu(gate) * up` of `gate_up` (`[.., 2 * width]`: the gate, then the up projection).
///
/// # Errors
/// A candle error when the last dimension is odd.
pub(crate) fn silu_mul_halves(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let cols = gate_up.dim(D::Minus1)?;
    if cols % 2 != 0 {
        candle_core::bail!("swiglu: gate and up of equal widths, got {cols} columns")
    }
    if cfg!(feature = "cuda") && gate_up.device().is_cuda() && gate_up.is_contiguous() {
        return gate_up.apply_op1_no_bwd(&SiluMul);
    }
    let width = cols / 2;
    silu_mul(
        &gate_up.narrow(D::Minus1, 0, width)?,
        &gate_up.narrow(D::Minus1, width, width)?,
    )
}

/// `silu(gate) * up` of two tensors (candle's ops).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

/// The CUDA kernel as a candle op over the fused gate/up rows.
struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "saap-silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("saap swiglu: the fused kernel is CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate_up: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::glue::silu_mul((gate_up, layout))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::silu_mul_halves;
    use crate::models::max_rel_diff;
    use candle_core::{DType, Device, Tensor, D};

    /// The CUDA kernel against candle's ops on the CPU in f32 with the kernel's two roundings to
    /// the element type (silu, then the product), f32 and bf16, widths below and above a block;
    /// an odd width is refused. (candle's CPU bf16 silu rounds every step of its formula: two
    /// bf16 steps apart from the kernel and from candle's CUDA kernel.)
    #[test]
    fn fused_swiglu_matches_candle_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else { return };
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-2)] {
            for width in [20, 300, 4864] {
                let x = Tensor::randn(0f32, 2.0, (3, 2 * width), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let half = |at: usize| {
                    x.narrow(D::Minus1, at, width)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                };
                let silu = candle_nn::ops::silu(&half(0))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let want = (silu * half(width)).unwrap().to_dtype(dtype).unwrap();
                let got = silu_mul_halves(&x.to_device(&gpu).unwrap()).unwrap();
                assert_eq!(got.dims(), [3, width]);
                let err = max_rel_diff(&got, &want);
                assert!(err <= tol, "{dtype:?} width {width}: differs by {err}");
            }
        }
        let odd = Tensor::zeros((2, 7), DType::F32, &gpu).unwrap();
        assert!(silu_mul_halves(&odd).is_err());
    }
}
