//! Query routing: the per-query-head classifier MLP (Saap's asymmetric partition of queries), the
//! nearest-centroid baseline, and top-ℓ selection of partitions.

use crate::error::{Result, SaapError};
use candle_core::{DType, Tensor, D};

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
    /// Checks the weights against a layout.
    pub fn check(&self, n_q_heads: usize, head_dim: usize, n_partitions: usize) -> Result<()> {
        let hidden = self.w1.dim(2)?;
        let expect = [
            ("classifier w1", &self.w1, vec![n_q_heads, head_dim, hidden]),
            ("classifier b1", &self.b1, vec![n_q_heads, 1, hidden]),
            (
                "classifier w2",
                &self.w2,
                vec![n_q_heads, hidden, n_partitions],
            ),
            ("classifier b2", &self.b2, vec![n_q_heads, 1, n_partitions]),
        ];
        for (name, tensor, dims) in expect {
            if tensor.dims() != dims.as_slice() {
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
    pub fn scores(&self, q: &Tensor) -> Result<Tensor> {
        let x = q.to_dtype(self.w1.dtype())?.transpose(0, 1)?.contiguous()?;
        let logits = mlp_forward(&x, &self.w1, &self.b1, &self.w2, &self.b2)?;
        Ok(logits.transpose(0, 1)?.to_dtype(DType::F32)?)
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
pub fn top_probes(scores: &Tensor, n_probe: usize) -> Result<Tensor> {
    let n_partitions = scores.dim(D::Minus1)?;
    if n_probe == 0 || n_probe > n_partitions {
        return Err(SaapError::Config(format!(
            "n_probe (ℓ = {n_probe}) must be in 1..={n_partitions} (C)"
        )));
    }
    let order = scores.contiguous()?.arg_sort_last_dim(false)?;
    Ok(order.narrow(D::Minus1, 0, n_probe)?.contiguous()?)
}
