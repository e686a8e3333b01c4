//! RMS normalization of the decoders' hidden states, optionally fused with the residual add
//! before it. On CUDA one kernel (`cuda/glue.cu`) replaces candle's add and `rms_norm`, whose
//! one-warp rows made the two norms of a layer a third of a small model's decode step; elsewhere
//! the same arithmetic runs as candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

/// `y = w · x / sqrt(mean(x²) + eps)` over the last dimension, in f32, rounded to the input type.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused(x) {
            return x.apply_op2_no_bwd(
                &self.weight,
                &Fused {
                    eps: self.eps as f32,
                },
            );
        }
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }

    /// The residual stream `x + delta` and its normalization.
    pub(crate) fn add_forward(
        &self,
        x: &Tensor,
        delta: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if self.fused(x) && delta.is_contiguous() && delta.dims() == x.dims() {
            let both = x.apply_op3_no_bwd(
                delta,
                &self.weight,
                &Fused {
                    eps: self.eps as f32,
                },
            )?;
            return Ok((both.get(0)?, both.get(1)?));
        }
        let sum = (x + delta)?;
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }

    /// Whether the CUDA kernel takes this input.
    fn fused(&self, x: &Tensor) -> bool {
        cfg!(feature = "cuda")
            && x.device().is_cuda()
            && x.is_contiguous()
            && x.dtype() == self.weight.dtype()
            && self.weight.is_contiguous()
    }
}

/// The CUDA kernel as a candle op: `(x, weight)` or `(x, delta, weight)`.
struct Fused {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    eps: f32,
}

impl CustomOp2 for Fused {
    fn name(&self) -> &'static str {
        "saap-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("saap rms norm: the fused kernel is CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::glue::rms_norm((x, x_l), None, (w, w_l), self.eps)
    }
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "saap-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("saap rms norm: the fused kernel is CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        delta: &candle_core::CudaStorage,
        delta_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::glue::rms_norm((x, x_l), Some((delta, delta_l)), (w, w_l), self.eps)
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::RmsNorm;
    use crate::models::max_rel_diff;
    use candle_core::{DType, Device, Tensor};

    /// The CUDA kernel against candle's CPU add and `rms_norm`, in f32 and bf16, for rows shorter
    /// than a warp, of a ragged width, and longer than the block.
    #[test]
    fn fused_norm_matches_candle_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else { return };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            for cols in [20, 896, 3000] {
                let randn = |shape: &[usize]| {
                    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let (x, delta, w) = (randn(&[2, 3, cols]), randn(&[2, 3, cols]), randn(&[cols]));
                let cpu = RmsNorm::new(w.clone(), 1e-6);
                let cuda = RmsNorm::new(w.to_device(&gpu).unwrap(), 1e-6);
                let on = |t: &Tensor| t.to_device(&gpu).unwrap();
                assert!(cuda.fused(&on(&x)));
                let diff = max_rel_diff(&cpu.forward(&x).unwrap(), &cuda.forward(&on(&x)).unwrap());
                assert!(diff <= tol, "{dtype:?} cols {cols}: norm differs by {diff}");
                let (sum_c, norm_c) = cpu.add_forward(&x, &delta).unwrap();
                let (sum_g, norm_g) = cuda.add_forward(&on(&x), &on(&delta)).unwrap();
                assert_eq!(
                    max_rel_diff(&sum_c, &sum_g),
                    0.0,
                    "{dtype:?} cols {cols}: sums"
                );
                let diff = max_rel_diff(&norm_c, &norm_g);
                assert!(
                    diff <= tol,
                    "{dtype:?} cols {cols}: fused norm differs by {diff}"
                );
            }
        }
    }
}
