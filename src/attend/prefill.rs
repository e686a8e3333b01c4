//! Causal attention of a prompt chunk over the cache, chunked over queries so that the score
//! matrix stays near 256 MiB whatever the context length. Built from candle GEMMs, so it runs on
//! either backend.

use crate::error::Result;
use candle_core::{DType, Tensor};

/// Score elements (f32) one query chunk may hold.
const SCORE_BUDGET: usize = 64 << 20;

/// Causal attention for one batch item. `q`: `[Hq, T, D]` rotated queries at positions
/// `start..start + T`; `k`, `v`: `[Hkv, start + T, D]` (the cache up to the last query). Query `t`
/// sees keys `0..=start + t`. Returns `[Hq, T, D]` in f32.
pub fn prefill_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f64,
) -> Result<Tensor> {
    let (hq, t_len, dim) = q.dims3()?;
    let (hkv, n, _) = k.dims3()?;
    let g = hq / hkv;
    let k = k.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    let q = q.to_dtype(DType::F32)?.reshape((hkv, g, t_len, dim))?;
    let chunk = (SCORE_BUDGET / (hq * n).max(1)).clamp(1, t_len.max(1));
    let mut outs = Vec::with_capacity(t_len.div_ceil(chunk));
    for t0 in (0..t_len).step_by(chunk) {
        let tc = chunk.min(t_len - t0);
        let n_end = start + t0 + tc;
        let mask: Vec<f32> = (0..tc)
            .flat_map(|t| {
                let last = start + t0 + t;
                (0..n_end).map(move |j| if j <= last { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, tc, n_end), q.device())?;
        let qc = q.narrow(2, t0, tc)?.reshape((hkv, g * tc, dim))?;
        let kc = k.narrow(1, 0, n_end)?;
        let scores = (qc.matmul(&kc.t()?)? * scale)?
            .reshape((hkv, g, tc, n_end))?
            .broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((hkv, g * tc, n_end))?;
        let out = probs.matmul(&v.narrow(1, 0, n_end)?)?;
        outs.push(out.reshape((hkv, g, tc, dim))?);
    }
    Ok(Tensor::cat(&outs, 2)?.reshape((hq, t_len, dim))?)
}
