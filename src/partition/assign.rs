//! Nearest-centroid assignment of pre-RoPE keys: one GEMM and an argmax, on either backend.

use crate::error::{Result, SaapError};
use candle_core::{DType, Tensor, D};

/// Rows of the score matrix computed at once, so that `[H, rows, C]` f32 stays near 128 MiB.
fn chunk_rows(heads: usize, n_partitions: usize) -> usize {
    ((32 << 20) / (heads * n_partitions).max(1)).max(1)
}

/// Nearest centroid (squared L2) of each key. `keys`: `[H, N, D]`, `centroids`: `[H, C, D]`
/// (f32). Returns the partition of every key, u32 `[H, N]`.
///
/// `argmin ||k - c||² = argmax (k·c - ||c||²/2)`: the key norm is the same for every centroid,
/// so the distance is a GEMM plus a per-centroid bias.
pub fn assign(keys: &Tensor, centroids: &Tensor) -> Result<Tensor> {
    let (heads, n, dim) = keys.dims3()?;
    let (c_heads, _, c_dim) = centroids.dims3()?;
    if c_heads != heads || c_dim != dim {
        return Err(SaapError::Shape {
            name: "centroids",
            expected: format!("[{heads}, C, {dim}]"),
            got: centroids.dims().to_vec(),
        });
    }
    if n == 0 {
        return Ok(Tensor::zeros((heads, 0), DType::U32, keys.device())?);
    }
    let (centroids_t, half_norms) = prepare_centroids(centroids)?;
    assign_prepared(keys, &centroids_t, &half_norms)
}

/// What [`assign`] derives from the centroids `[H, C, D]`: their transpose `[H, D, C]` f32
/// (contiguous) and half squared norms `[H, 1, C]` f32. Computed once per op, not per step.
pub fn prepare_centroids(centroids: &Tensor) -> Result<(Tensor, Tensor)> {
    let centroids = centroids.to_dtype(DType::F32)?;
    let half_norms = (centroids.sqr()?.sum_keepdim(D::Minus1)? * 0.5)?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((centroids.transpose(1, 2)?.contiguous()?, half_norms))
}

/// [`assign`] with centroids prepared by [`prepare_centroids`]; same result.
pub fn assign_prepared(keys: &Tensor, centroids_t: &Tensor, half_norms: &Tensor) -> Result<Tensor> {
    let (heads, n, _) = keys.dims3()?;
    let n_partitions = centroids_t.dim(2)?;
    if n == 0 {
        return Ok(Tensor::zeros((heads, 0), DType::U32, keys.device())?);
    }
    let step = chunk_rows(heads, n_partitions);
    let mut labels = Vec::with_capacity(n.div_ceil(step));
    for start in (0..n).step_by(step) {
        let rows = step.min(n - start);
        let chunk = keys.narrow(1, start, rows)?.to_dtype(DType::F32)?;
        let scores = chunk.matmul(centroids_t)?.broadcast_sub(half_norms)?;
        labels.push(scores.argmax(D::Minus1)?);
    }
    if labels.len() == 1 {
        return Ok(labels.pop().expect("one chunk"));
    }
    Ok(Tensor::cat(&labels, 1)?)
}
