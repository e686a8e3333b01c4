//! The classifier MLP and top-ℓ of one decode step on the CPU, straight over the weights' f32
//! storage: a step scores a handful of queries, where a dozen candle ops (each allocating) cost
//! more than the arithmetic.

use super::Classifier;
use crate::elem::contiguous_slice;
use crate::error::Result;
use candle_core::cpu::erf::erf_f32;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

/// Runs `f` on the contiguous f32 data of a CPU tensor; `None` for any other tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => contiguous_slice(data, layout).ok().map(f),
        _ => None,
    }
}

/// `n_probe` best partitions per query head for queries `q` (`[B, Hq, D]`), best first, as u32
/// `[B, Hq, ℓ]`, with the scores `[B, Hq, C]` (for the caller's finite check); `None` when the
/// weights are not contiguous f32 on the CPU (the caller then takes the candle path, which gives
/// the same partitions up to float rounding). Order as [`super::top_probes`]: score descending,
/// ties to the lower index, NaN ranked as −∞.
pub(super) fn probes(
    c: &Classifier,
    q: &Tensor,
    n_probe: usize,
) -> Result<Option<(Tensor, Tensor)>> {
    if !q.device().is_cpu() || c.w1.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, hq, d) = q.dims3()?;
    let (_, _, hidden) = c.w1.dims3()?;
    let n_c = c.w2.dim(2)?;
    let x = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let out = with_f32(&c.w1, |w1| {
        with_f32(&c.b1, |b1| {
            with_f32(&c.w2, |w2| {
                with_f32(&c.b2, |b2| {
                    let mut out = Vec::with_capacity(b * hq * n_probe);
                    let mut all_scores = Vec::with_capacity(b * hq * n_c);
                    let mut h = vec![0f32; hidden];
                    let mut scores = vec![0f32; n_c];
                    let mut order: Vec<u32> = Vec::with_capacity(n_c);
                    for bi in 0..b {
                        for head in 0..hq {
                            let xq = &x[(bi * hq + head) * d..(bi * hq + head + 1) * d];
                            h.copy_from_slice(&b1[head * hidden..(head + 1) * hidden]);
                            let w1h = &w1[head * d * hidden..(head + 1) * d * hidden];
                            for (i, &xi) in xq.iter().enumerate() {
                                for (a, &w) in h.iter_mut().zip(&w1h[i * hidden..(i + 1) * hidden])
                                {
                                    *a += xi * w;
                                }
                            }
                            for a in h.iter_mut() {
                                *a = (erf_f32(*a * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
                                    * 0.5
                                    * *a;
                            }
                            scores.copy_from_slice(&b2[head * n_c..(head + 1) * n_c]);
                            let w2h = &w2[head * hidden * n_c..(head + 1) * hidden * n_c];
                            for (j, &hj) in h.iter().enumerate() {
                                for (s, &w) in scores.iter_mut().zip(&w2h[j * n_c..(j + 1) * n_c]) {
                                    *s += hj * w;
                                }
                            }
                            order.clear();
                            order.extend(0..n_c as u32);
                            let key = |i: u32| {
                                let s = scores[i as usize];
                                if s.is_nan() {
                                    f32::NEG_INFINITY
                                } else {
                                    s
                                }
                            };
                            let by_score =
                                |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
                            if n_probe < n_c {
                                order.select_nth_unstable_by(n_probe, by_score);
                            }
                            order.truncate(n_probe);
                            order.sort_unstable_by(by_score);
                            out.extend_from_slice(&order);
                            all_scores.extend_from_slice(&scores);
                        }
                    }
                    (out, all_scores)
                })
            })
        })
    })
    .flatten()
    .flatten()
    .flatten();
    Ok(match out {
        Some((out, scores)) => Some((
            Tensor::from_vec(out, (b, hq, n_probe), &Device::Cpu)?,
            Tensor::from_vec(scores, (b, hq, n_c), &Device::Cpu)?,
        )),
        None => None,
    })
}
