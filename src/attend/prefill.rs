//! Causal attention of a prompt chunk over the cache, one semantics for both backends.
//!
//! For batch item `b` with `starts[b]` tokens cached before the chunk and `lens[b]` valid queries,
//! query `t < lens[b]` (position `starts[b] + t`) attends to cache rows `0..=starts[b] + t` with an
//! exact softmax; rows `t >= lens[b]` of the output are zero. GQA: query head `h` reads KV head
//! `h / G`. Keys and values are read straight from the op's cache (`[B, Hkv, cap, D]`, post-RoPE),
//! never copied.
//!
//! - CPU: FlashAttention's tiling — a task owns a tile of queries of one KV head (all G heads of
//!   the group) and streams the keys in tiles with an online softmax, so memory stays
//!   O(query tile × key tile) whatever the context length; f32 arithmetic.
//! - CUDA, bf16/f16: the tensor-core kernel of `cuda/prefill.cu` (same tiling, f32 accumulation,
//!   probabilities rounded to the input type before P·V as FlashAttention does).
//! - CUDA, f32 or another head dim than 64 and 128: candle GEMMs over query chunks (slower, but
//!   every shape the op accepts runs).

use crate::elem::{contiguous_slice, exp_shifted, tensor_core_shape, Elem};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

/// Queries per CPU task (times G rows).
const CPU_QUERY_TILE: usize = 32;
/// Keys per CPU tile: the scores of a tile row stay in a few vector registers.
const CPU_KEY_TILE: usize = 64;
/// Score elements (f32) one query chunk of the CUDA f32 path may hold.
const SCORE_BUDGET: usize = 64 << 20;

/// Causal prefill attention as a candle op on the rotated queries `[B, Hq, T, D]`.
/// Returns `[B, Hq, T, D]` in the queries' dtype.
#[derive(Debug, Clone)]
pub struct PrefillOp {
    /// `[B, Hkv, cap, D]`, post-RoPE keys; rows `0..starts[b] + lens[b]` hold item `b`'s tokens.
    pub k_cache: Tensor,
    /// `[B, Hkv, cap, D]`.
    pub v_cache: Tensor,
    /// Tokens cached before the chunk, per batch item.
    pub starts: Vec<usize>,
    /// Valid queries of the chunk, per batch item.
    pub lens: Vec<usize>,
    /// Softmax scale, usually `1/sqrt(D)`.
    pub scale: f32,
}

/// `(b, hq, hkv, t, cap, d)`.
pub(crate) type PrefillDims = (usize, usize, usize, usize, usize, usize);

impl PrefillOp {
    /// Checks the query layout against the cache and the extents.
    pub(crate) fn dims(&self, q: &Layout) -> candle_core::Result<PrefillDims> {
        let (b, hq, t, d) = q.shape().dims4()?;
        let (kb, hkv, cap, kd) = self.k_cache.dims4()?;
        if kb != b
            || kd != d
            || hkv == 0
            || hq % hkv != 0
            || self.v_cache.dims() != self.k_cache.dims()
        {
            candle_core::bail!(
                "prefill: q {:?} does not match cache {:?}",
                q.shape(),
                self.k_cache.shape()
            );
        }
        let fits = self
            .starts
            .iter()
            .zip(&self.lens)
            .all(|(&s, &l)| l <= t && s.checked_add(l).is_some_and(|n| n <= cap));
        if self.starts.len() != b || self.lens.len() != b || !fits {
            candle_core::bail!(
                "prefill: starts {:?} and lens {:?} do not fit {b} items of {t} queries in {cap} rows",
                self.starts,
                self.lens
            );
        }
        Ok((b, hq, hkv, t, cap, d))
    }

    fn cpu_typed<T: Elem>(&self, q: &[T], k: &[T], v: &[T], dims: PrefillDims) -> Vec<T> {
        let (b, hq, hkv, t_len, cap, d) = dims;
        let g = hq / hkv;
        let tiles = t_len.div_ceil(CPU_QUERY_TILE);
        // One task per (item, KV head, query tile): rows of the G heads, written back below.
        let results: Vec<Vec<f32>> = (0..b * hkv * tiles)
            .into_par_iter()
            .map(|task| {
                let (bi, h, tile) = (task / (hkv * tiles), task / tiles % hkv, task % tiles);
                let t0 = tile * CPU_QUERY_TILE;
                let t1 = (t0 + CPU_QUERY_TILE).min(self.lens[bi]);
                if t0 >= t1 {
                    return Vec::new();
                }
                let mut rows = Vec::with_capacity(g * (t1 - t0) * d);
                let mut positions = Vec::with_capacity(g * (t1 - t0));
                for head in h * g..(h + 1) * g {
                    for t in t0..t1 {
                        let at = ((bi * hq + head) * t_len + t) * d;
                        rows.extend(q[at..at + d].iter().map(|x| x.to_f32() * self.scale));
                        positions.push(self.starts[bi] + t);
                    }
                }
                let kv = (bi * hkv + h) * cap * d..(bi * hkv + h + 1) * cap * d;
                attend_tile(&rows, &positions, &k[kv.clone()], &v[kv], d)
            })
            .collect();
        let mut out = vec![T::from_f32(0.0); b * hq * t_len * d];
        for (task, rows) in results.iter().enumerate() {
            let (bi, h, tile) = (task / (hkv * tiles), task / tiles % hkv, task % tiles);
            let t0 = tile * CPU_QUERY_TILE;
            let n = rows.len() / (g * d).max(1);
            for (i, row) in rows.chunks_exact(d).enumerate() {
                let (head, t) = (h * g + i / n, t0 + i % n);
                let at = ((bi * hq + head) * t_len + t) * d;
                for (o, &x) in out[at..at + d].iter_mut().zip(row) {
                    *o = T::from_f32(x);
                }
            }
        }
        out
    }
}

/// Online-softmax attention of `rows` (`[R, D]` f32, pre-scaled) at `positions` over the first
/// `max(positions) + 1` rows of one head's `k`, `v` (`[cap, D]`). Returns `[R, D]`.
///
/// Compiled twice: for the baseline x86-64 (SSE2, 4 floats a vector) and with AVX2 (8 floats),
/// taken at run time where the CPU has it, since the crate is built without `-C target-cpu`
/// (`perf`: 79% of a 7k-token SmolLM2 prefill was this function). The two give the same bits:
/// the arithmetic is the same sequence of IEEE operations per element (Rust never fuses a
/// multiply and an add on its own), only more elements per instruction.
fn attend_tile<T: Elem>(rows: &[f32], positions: &[usize], k: &[T], v: &[T], d: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { attend_tile_avx2(rows, positions, k, v, d) };
    }
    attend_tile_body(rows, positions, k, v, d)
}

/// [`attend_tile_body`] compiled with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_tile_avx2<T: Elem>(
    rows: &[f32],
    positions: &[usize],
    k: &[T],
    v: &[T],
    d: usize,
) -> Vec<f32> {
    attend_tile_body(rows, positions, k, v, d)
}

/// The body of [`attend_tile`], inlined into each of its versions.
#[inline(always)]
fn attend_tile_body<T: Elem>(
    rows: &[f32],
    positions: &[usize],
    k: &[T],
    v: &[T],
    d: usize,
) -> Vec<f32> {
    let r = positions.len();
    let n_keys = positions.iter().max().map_or(0, |&p| p + 1);
    let min_pos = positions.iter().min().copied().unwrap_or(0);
    let mut max = vec![f32::NEG_INFINITY; r];
    let mut sum = vec![0f32; r];
    let mut acc = vec![0f32; r * d];
    // The key tile transposed (`[D][KT]`): a row's scores are then D axpys over the tile, which
    // vectorize, instead of KT horizontal dot products.
    let mut k_t = vec![0f32; d * CPU_KEY_TILE];
    let mut v_tile = vec![0f32; CPU_KEY_TILE * d];
    let mut widened = vec![0f32; d];
    let mut scores = [0f32; CPU_KEY_TILE];
    for key0 in (0..n_keys).step_by(CPU_KEY_TILE) {
        let kt = CPU_KEY_TILE.min(n_keys - key0);
        for j in 0..kt {
            T::widen(&k[(key0 + j) * d..(key0 + j + 1) * d], &mut widened);
            for (dd, &x) in widened.iter().enumerate() {
                k_t[dd * CPU_KEY_TILE + j] = x;
            }
            T::widen(
                &v[(key0 + j) * d..(key0 + j + 1) * d],
                &mut v_tile[j * d..(j + 1) * d],
            );
        }
        let crosses_diagonal = key0 + kt - 1 > min_pos;
        for (i, &pos) in positions.iter().enumerate() {
            if key0 > pos {
                continue;
            }
            scores.fill(0.0);
            for (dd, &qd) in rows[i * d..(i + 1) * d].iter().enumerate() {
                let column = &k_t[dd * CPU_KEY_TILE..(dd + 1) * CPU_KEY_TILE];
                for (s, &kx) in scores.iter_mut().zip(column) {
                    *s += qd * kx;
                }
            }
            let visible = if crosses_diagonal {
                (pos + 1 - key0).min(kt)
            } else {
                kt
            };
            let s = &mut scores[..visible];
            let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[i].max(tile_max);
            let correction = (max[i] - new_max).exp();
            let out = &mut acc[i * d..(i + 1) * d];
            if correction != 1.0 {
                sum[i] *= correction;
                out.iter_mut().for_each(|a| *a *= correction);
            }
            max[i] = new_max;
            exp_shifted(s, new_max);
            for (j, &p) in s.iter().enumerate() {
                sum[i] += p;
                for (a, &vx) in out.iter_mut().zip(&v_tile[j * d..(j + 1) * d]) {
                    *a += p * vx;
                }
            }
        }
    }
    for (i, out) in acc.chunks_exact_mut(d).enumerate() {
        let inv = if sum[i] > 0.0 { 1.0 / sum[i] } else { 0.0 };
        out.iter_mut().for_each(|a| *a *= inv);
    }
    acc
}

impl CustomOp1 for PrefillOp {
    fn name(&self) -> &'static str {
        "saap-prefill"
    }

    fn cpu_fwd(&self, q: &CpuStorage, q_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(q_l)?;
        let (k_st, k_l) = self.k_cache.storage_and_layout();
        let (v_st, v_l) = self.v_cache.storage_and_layout();
        let (Storage::Cpu(k_st), Storage::Cpu(v_st)) = (&*k_st, &*v_st) else {
            candle_core::bail!("prefill: cache is not on the CPU");
        };
        macro_rules! typed {
            ($variant:ident, $q:ident, $k:ident, $v:ident) => {
                CpuStorage::$variant(self.cpu_typed(
                    contiguous_slice($q, q_l)?,
                    contiguous_slice($k, k_l)?,
                    contiguous_slice($v, v_l)?,
                    dims,
                ))
            };
        }
        let out = match (q, k_st, v_st) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => typed!(F32, q, k, v),
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                typed!(BF16, q, k, v)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => typed!(F16, q, k, v),
            _ => candle_core::bail!("prefill: query and cache must share one of f32, bf16, f16"),
        };
        Ok((out, q_l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(q_l)?;
        crate::cuda::prefill(self, q, q_l, dims)
    }
}

/// Causal attention of the rotated queries `q` (`[B, Hq, T, D]`) over the caches (see the module
/// docs). Returns `[B, Hq, T, D]` in the queries' dtype, zero past each item's length.
///
/// # Errors
/// Shapes that do not match the cache or extents that do not fit it; backend failures.
pub fn prefill_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    starts: &[usize],
    lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let op = PrefillOp {
        k_cache: k_cache.clone(),
        v_cache: v_cache.clone(),
        starts: starts.to_vec(),
        lens: lens.to_vec(),
        scale,
    };
    let q = q.contiguous()?;
    if q.device().is_cuda() && !tensor_core_shape(q.dtype(), q.dim(D::Minus1)?) {
        return gemm_prefill(&op, &q);
    }
    Ok(q.apply_op1_no_bwd(&op)?)
}

/// The CUDA path for what the tensor-core kernel does not cover (f32, other head dims): per item, candle GEMMs over query chunks sized to [`SCORE_BUDGET`].
fn gemm_prefill(op: &PrefillOp, q: &Tensor) -> Result<Tensor> {
    let (b, hq, _, t_len, _, d) = op.dims(q.layout())?;
    let mut outs = Vec::with_capacity(b);
    for (bi, (&start, &len)) in op.starts.iter().zip(&op.lens).enumerate() {
        let mut out = Tensor::zeros((hq, t_len, d), q.dtype(), q.device())?;
        if len > 0 {
            // f32 arithmetic whatever the storage type, as on the CPU.
            let cached = |x: &Tensor| x.get(bi)?.narrow(1, 0, start + len)?.to_dtype(DType::F32);
            let attended = attention_in_chunks(
                &q.get(bi)?.narrow(1, 0, len)?.to_dtype(DType::F32)?,
                &cached(&op.k_cache)?,
                &cached(&op.v_cache)?,
                start,
                f64::from(op.scale),
                SCORE_BUDGET,
            )?
            .to_dtype(q.dtype())?;
            out = if len == t_len {
                attended
            } else {
                Tensor::cat(&[attended, out.narrow(1, len, t_len - len)?], 1)?
            };
        }
        outs.push(out);
    }
    Ok(Tensor::stack(&outs, 0)?)
}

/// One item of [`gemm_prefill`]: `q` `[Hq, T, D]` at positions `start..start + T`, `k`, `v`
/// `[Hkv, start + T, D]`, all f32. Returns `[Hq, T, D]` f32.
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
    let q = q.reshape((hkv, g, t_len, dim))?;
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

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Where the CPU has AVX2, its version of a tile gives the baseline version's bits (f32 and
    /// bf16 caches, a tile that crosses the diagonal and one that does not).
    #[test]
    fn avx2_tile_gives_the_baseline_bits() {
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        let d = 64;
        let cap = 300;
        let k = Tensor::randn(0f32, 1.0, (cap, d), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (cap, d), &Device::Cpu).unwrap();
        let rows: Vec<f32> = Tensor::randn(0f32, 0.3, (12 * d,), &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let kf = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vf = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kb: Vec<half::bf16> = kf.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let vb: Vec<half::bf16> = vf.iter().map(|&x| half::bf16::from_f32(x)).collect();
        for positions in [
            (200..212).collect::<Vec<_>>(),
            (0..12).map(|i| 280 + i).collect(),
        ] {
            let base = attend_tile_body(&rows, &positions, &kf, &vf, d);
            let dispatched = attend_tile(&rows, &positions, &kf, &vf, d);
            assert!(base
                .iter()
                .zip(&dispatched)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            let base = attend_tile_body(&rows, &positions, &kb, &vb, d);
            let dispatched = attend_tile(&rows, &positions, &kb, &vb, d);
            assert!(base
                .iter()
                .zip(&dispatched)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(base.iter().all(|x| x.is_finite()) && base.iter().any(|&x| x != 0.0));
        }
    }

    /// The tiled CPU op and the GEMM path (the CUDA f32 path, here run on the CPU) agree on a
    /// ragged batch with a cached prefix, for tiles that cross and do not cross the diagonal;
    /// rows past an item's length are zero.
    #[test]
    fn tiled_op_matches_the_gemm_path() {
        let dev = Device::Cpu;
        let (hq, hkv, t, d, cap) = (6, 2, 75, 16, 256);
        let starts = [0usize, 130];
        let lens = [75usize, 40];
        let q = Tensor::randn(0f32, 1.0, (2, hq, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, hkv, cap, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, hkv, cap, d), &dev).unwrap();
        let tiled = prefill_attention(&q, &k, &v, &starts, &lens, 0.3).unwrap();
        let op = PrefillOp {
            k_cache: k.clone(),
            v_cache: v.clone(),
            starts: starts.to_vec(),
            lens: lens.to_vec(),
            scale: 0.3,
        };
        for budget in [usize::MAX, 7 * hq * 256] {
            let mut outs = vec![];
            for bi in 0..2 {
                let cached = |x: &Tensor| x.get(bi).unwrap().narrow(1, 0, starts[bi] + lens[bi]);
                let a = attention_in_chunks(
                    &q.get(bi).unwrap().narrow(1, 0, lens[bi]).unwrap(),
                    &cached(&k).unwrap(),
                    &cached(&v).unwrap(),
                    starts[bi],
                    0.3,
                    budget,
                )
                .unwrap();
                let got = tiled.get(bi).unwrap().narrow(1, 0, lens[bi]).unwrap();
                assert!(max_abs_diff(&a, &got) < 1e-5, "item {bi}, budget {budget}");
                outs.push(a);
            }
            let whole = gemm_prefill(&op, &q).unwrap();
            for (bi, a) in outs.iter().enumerate() {
                let got = whole.get(bi).unwrap().narrow(1, 0, lens[bi]).unwrap();
                assert!(max_abs_diff(a, &got) < 1e-6);
            }
        }
        // bf16 storage: both paths compute in f32 from the same values and round once.
        let half = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let op16 = PrefillOp {
            k_cache: half(&k),
            v_cache: half(&v),
            ..op.clone()
        };
        let tiled16 =
            prefill_attention(&half(&q), &op16.k_cache, &op16.v_cache, &starts, &lens, 0.3)
                .unwrap();
        let gemm16 = gemm_prefill(&op16, &half(&q)).unwrap();
        assert_eq!(gemm16.dtype(), DType::BF16);
        let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&f32(&tiled16), &f32(&gemm16)) < 2e-2);
        let padding = tiled.get(1).unwrap().narrow(1, 40, t - 40).unwrap();
        assert_eq!(
            padding
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    /// Query `t` sees keys up to `start + t` and no further: moving the key just after the first
    /// query's position changes the last query's output and leaves the first's untouched.
    #[test]
    fn causal_boundary() {
        let dev = Device::Cpu;
        let (hq, hkv, t, d, cap, start) = (4, 2, 9, 8, 64, 5);
        let q = Tensor::randn(0f32, 1.0, (1, hq, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, hkv, cap, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, hkv, cap, d), &dev).unwrap();
        let run = |k: &Tensor| prefill_attention(&q, k, &v, &[start], &[t], 0.3).unwrap();
        let whole = run(&k);
        let mut flat = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        flat[(start + 1) * d] += 5.0; // item 0, KV head 0, row start + 1
        let moved = run(&Tensor::from_vec(flat, k.shape(), &dev).unwrap());
        let row = |x: &Tensor, i: usize| {
            x.get(0)
                .unwrap()
                .narrow(1, i, 1)
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
