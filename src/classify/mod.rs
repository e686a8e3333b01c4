//! Query routing: the per-query-head classifier MLP (Saap's asymmetric partition of queries), the
//! nearest-centroid baseline, and top-ℓ selection of partitions.

use crate::error::{Result, SaapError};
use candle_core::{DType, Tensor, D};

mod cpu;

/// Classifier weights of one layer: for each query head an MLP `D → hidden → C` with GELU.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// `[Hq, D, hidden]`.
    pub w1: Tensor,
    /// `[Hq, 1, hidden]`.
    pub b1: Tensor,
    /// `[Hq, hidden, C]`.
    pub w2: Tensor,
    /// `[Hq, 1, C]`.
    pub b2: Tensor,
}

/// The MLP on a batch of queries per head: `x` is `[Hq, N, D]`, the result `[Hq, N, C]`.
/// Training and decoding share this function so they cannot drift apart.
///
/// # Errors
/// [`SaapError::Candle`] when the shapes do not chain (`x` `[H, N, D]`, `w1` `[H, D, h]`, `b1`
/// `[H, 1, h]`, `w2` `[H, h, C]`, `b2` `[H, 1, C]`).
pub fn mlp_forward(
    x: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> Result<Tensor> {
    let hidden = x.matmul(w1)?.broadcast_add(b1)?.gelu_erf()?;
    Ok(hidden.matmul(w2)?.broadcast_add(b2)?)
}

impl Classifier {
    /// Checks the weights' shapes against a layout and hidden width.
    ///
    /// # Errors
    /// [`SaapError::Shape`] naming the first weight whose shape differs.
    pub fn check(
        &self,
        n_q_heads: usize,
        head_dim: usize,
        hidden: usize,
        n_partitions: usize,
    ) -> Result<()> {
        let expect = [
            ("classifier w1", &self.w1, [n_q_heads, head_dim, hidden]),
            ("classifier b1", &self.b1, [n_q_heads, 1, hidden]),
            ("classifier w2", &self.w2, [n_q_heads, hidden, n_partitions]),
            ("classifier b2", &self.b2, [n_q_heads, 1, n_partitions]),
        ];
        for (name, tensor, dims) in expect {
            if tensor.dims() != dims {
                return Err(SaapError::Shape {
                    name,
                    expected: format!("{dims:?}"),
                    got: tensor.dims().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Partition scores for queries `q` (`[B, Hq, D]`, pre-RoPE): `[B, Hq, C]` f32.
    ///
    /// # Errors
    /// [`SaapError::Candle`] when `q` does not fit the weights.
    pub fn scores(&self, q: &Tensor) -> Result<Tensor> {
        let x = q.to_dtype(self.w1.dtype())?.transpose(0, 1)?.contiguous()?;
        let logits = mlp_forward(&x, &self.w1, &self.b1, &self.w2, &self.b2)?;
        Ok(logits.transpose(0, 1)?.to_dtype(DType::F32)?)
    }

    /// The weights as a decode op of `dtype` keeps them on `device`: f32 for f32 ops; rounded to
    /// bf16 for bf16/f16 ops (held as bf16 on CUDA, where [`Classifier::probes`] widens them in
    /// its kernel, and as f32 with the same values elsewhere). They are read on every decode step
    /// (Hq · (D·h + h·C) values), so bf16 halves those bytes; the arithmetic stays f32. The
    /// weights of a [`crate::SaapIndex`] are already of bf16 precision, so for them the rounding
    /// changes nothing and ops of every dtype route with the same weights.
    ///
    /// # Errors
    /// [`SaapError::Candle`] when the weights cannot be converted or moved to `device`.
    pub fn prepared(&self, dtype: DType, device: &candle_core::Device) -> Result<Self> {
        let weights = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?;
            if dtype == DType::F32 {
                return Ok(t.to_device(device)?);
            }
            let rounded = t.to_dtype(DType::BF16)?;
            Ok(if device.is_cuda() {
                rounded.to_device(device)?
            } else {
                rounded.to_dtype(DType::F32)?.to_device(device)?
            })
        };
        Ok(Self {
            w1: weights(&self.w1)?,
            b1: weights(&self.b1)?,
            w2: weights(&self.w2)?,
            b2: weights(&self.b2)?,
        })
    }

    /// The `n_probe` best partitions of each query head: `q` `[B, Hq, D]` pre-RoPE
    /// → u32 `[B, Hq, ℓ]`. On CUDA two kernels (MLP with f32 accumulation, top-ℓ); elsewhere, or for
    /// shapes they do not cover, candle ops on f32 weights. Same values either way up to the order of
    /// f32 summation.
    ///
    /// # Errors
    /// [`SaapError::Config`] unless `1 <= n_probe <= C`; [`SaapError::Candle`] when `q` does not
    /// fit the weights.
    pub fn probes(&self, q: &Tensor, n_probe: usize) -> Result<Tensor> {
        Ok(self.route(q, n_probe)?.0)
    }

    /// [`Classifier::probes`], with the scores `[B, Hq, C]` f32 when they were computed apart
    /// (not inside the fused CUDA kernel), so that the caller can check them.
    pub(crate) fn route(&self, q: &Tensor, n_probe: usize) -> Result<(Tensor, Option<Tensor>)> {
        let classifier = self;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda()
            && (1..=classifier.w2.dim(2)?).contains(&n_probe)
            && crate::cuda::route::supported(classifier, q, n_probe)
        {
            let op = crate::cuda::route::RouteOp {
                classifier,
                n_probe,
            };
            return Ok((q.contiguous()?.apply_op1_no_bwd(&op)?, None));
        }
        if (1..=classifier.w2.dim(2)?).contains(&n_probe) {
            if let Some((probes, scores)) = cpu::probes(classifier, q, n_probe)? {
                return Ok((probes, Some(scores)));
            }
        }
        let scores = if classifier.w1.dtype() == DType::F32 {
            classifier.scores(q)?
        } else {
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            Classifier {
                w1: f32(&classifier.w1)?,
                b1: f32(&classifier.b1)?,
                w2: f32(&classifier.w2)?,
                b2: f32(&classifier.b2)?,
            }
            .scores(q)?
        };
        Ok((top_probes(&scores, n_probe)?, Some(scores)))
    }

    /// Bytes of weights one decode step reads (every query head's MLP).
    pub fn weight_bytes(&self) -> usize {
        [&self.w1, &self.b1, &self.w2, &self.b2]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Nearest-centroid routing scores (the symmetric baseline): for query head `h` of KV group
/// `h / G`, `-||q - c||²/2` up to a constant, i.e. `q·c - ||c||²/2`. `q`: `[B, Hq, D]`,
/// `centroids`: `[Hkv, C, D]` f32. Returns `[B, Hq, C]`.
///
/// # Errors
/// [`SaapError::Candle`] when `q` is not `[B, Hq, D]` for centroids `[Hkv, C, D]` with `Hkv`
/// dividing `Hq`.
pub fn centroid_scores(q: &Tensor, centroids: &Tensor) -> Result<Tensor> {
    let (b, hq, dim) = q.dims3()?;
    let (hkv, _c, _) = centroids.dims3()?;
    let g = hq / hkv;
    let q = q
        .to_dtype(DType::F32)?
        .reshape((b, hkv, g, dim))?
        .transpose(0, 1)?
        .reshape((hkv, b * g, dim))?;
    let half_norms = (centroids.sqr()?.sum_keepdim(D::Minus1)? * 0.5)?.transpose(1, 2)?;
    let scores = q
        .matmul(&centroids.transpose(1, 2)?)?
        .broadcast_sub(&half_norms)?;
    let c = scores.dim(2)?;
    Ok(scores
        .reshape((hkv, b, g, c))?
        .transpose(0, 1)?
        .reshape((b, hq, c))?)
}

/// The `n_probe` best partitions of each query head: `[B, Hq, C]` scores → u32 `[B, Hq, ℓ]`.
///
/// The order is total, so any scores give one answer: higher scores first (on the CPU, ties to
/// the lower partition), and NaN ranks as −∞, last. A NaN must not reach the sort itself: it
/// breaks the comparison's total order, and Rust's sort panics on that once C > 20.
///
/// # Errors
/// [`SaapError::Config`] unless `1 <= n_probe <= C`.
pub fn top_probes(scores: &Tensor, n_probe: usize) -> Result<Tensor> {
    let n_partitions = scores.dim(D::Minus1)?;
    if n_probe == 0 || n_probe > n_partitions {
        return Err(SaapError::Config(format!(
            "n_probe (ℓ = {n_probe}) must be in 1..={n_partitions} (C)"
        )));
    }
    let scores = scores.to_dtype(DType::F32)?;
    // x != x exactly for NaN.
    let nan = scores.ne(&scores)?;
    let lowest = Tensor::full(f32::NEG_INFINITY, scores.shape(), scores.device())?;
    let scores = nan.where_cond(&lowest, &scores)?;
    let order = scores.contiguous()?.arg_sort_last_dim(false)?;
    Ok(order.narrow(D::Minus1, 0, n_probe)?.contiguous()?)
}

/// Top-p probes: each head's `n_probe` best partitions (`[B, Hq, ℓ]`), those after the first whose
/// predicted masses before them (softmax of `scores`, in probe order) already reach `mass`
/// replaced by C, which the decode kernels skip.
pub(crate) fn probes_to_mass(scores: &Tensor, n_probe: usize, mass: f64) -> Result<Tensor> {
    let c = scores.dim(D::Minus1)?;
    let probes = top_probes(scores, n_probe)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?.gather(&probes, 2)?;
    // Mass of the partitions probed before each one (exclusive prefix sum along ℓ).
    let before = (probs.cumsum(2)? - &probs)?;
    let keep = before.lt(mass)?;
    let skipped = Tensor::full(c as u32, probes.shape(), probes.device())?;
    Ok(keep.where_cond(&probes, &skipped)?)
}
