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
    attention_in_chunks(q, k, v, start, scale, SCORE_BUDGET)
}

fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f64,
    score_budget: usize,
) -> Result<Tensor> {
    let (hq, t_len, dim) = q.dims3()?;
    let (hkv, n, _) = k.dims3()?;
    let g = hq / hkv;
    let k = k.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    let q = q.to_dtype(DType::F32)?.reshape((hkv, g, t_len, dim))?;
    let chunk = (score_budget / (hq * n).max(1)).clamp(1, t_len.max(1));
    let mut outs = Vec::with_capacity(t_len.div_ceil(chunk));
    for t0 in (0..t_len).step_by(chunk) {
        let tc = chunk.min(t_len - t0);
        let n_end = start + t0 + tc;
        // Every query of the chunk sees the first `n_end - tc` keys; only the last `tc` columns
        // are causal. Building just that triangle on the host keeps the upload at `tc²` floats
        // instead of `tc · n_end` (at 128k the full mask made prefill upload-bound).
        let triangle: Vec<f32> = (0..tc)
            .flat_map(|t| (0..tc).map(move |j| if j <= t { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let triangle = Tensor::from_vec(triangle, (tc, tc), q.device())?;
        let visible = Tensor::zeros((tc, n_end - tc), DType::F32, q.device())?;
        let mask = Tensor::cat(&[&visible, &triangle], 1)?.reshape((1, 1, tc, n_end))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Query chunking (and so the causal mask's split into a visible block and a triangle)
    /// must not change the result: one query per chunk, a few per chunk, all at once.
    #[test]
    fn chunking_leaves_the_output_unchanged() {
        let dev = Device::Cpu;
        let (hq, hkv, t, start, dim) = (4, 2, 9, 5, 8);
        let q = Tensor::randn(0f32, 1.0, (hq, t, dim), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (hkv, start + t, dim), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (hkv, start + t, dim), &dev).unwrap();
        let n = start + t;
        let whole = attention_in_chunks(&q, &k, &v, start, 0.3, usize::MAX).unwrap();
        for per_chunk in [1, 2, 4] {
            let chunked = attention_in_chunks(&q, &k, &v, start, 0.3, per_chunk * hq * n).unwrap();
            let diff = (&whole - &chunked)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{per_chunk} queries per chunk: {diff}");
        }
        // The last query sees every key, the first only `0..=start`: changing the key after
        // `start` must move the latter's output not at all.
        let mut k2 = k.to_vec3::<f32>().unwrap();
        k2[0][start + 1][0] += 5.0;
        let k2 = Tensor::new(k2, &dev).unwrap();
        let moved = attention_in_chunks(&q, &k2, &v, start, 0.3, 2 * hq * n).unwrap();
        let row = |x: &Tensor, i: usize| {
            x.narrow(1, i, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(row(&whole, 0), row(&moved, 0));
        assert_ne!(row(&whole, t - 1), row(&moved, t - 1));
    }
}
