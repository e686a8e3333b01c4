//! Rotary position embedding, applied by the op to pre-RoPE queries and keys.
//!
//! The model hands Saap pre-RoPE vectors (they are what the index clusters and the classifier
//! reads); the op rotates them itself, so it never has to un-rotate a cached key.

use crate::config::{RopeConfig, RopeKind, RopeScaling};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, DType, Device, InplaceOp2, InplaceOp3, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Per-dimension inverse frequencies of a RoPE configuration, with its attention scaling.
#[derive(Debug, Clone)]
pub struct Rope {
    kind: RopeKind,
    inv_freq: Vec<f64>,
    /// YaRN's attention temperature, folded into cos and sin (1 otherwise).
    mscale: f64,
}

impl Rope {
    /// Frequencies for heads of dimension `head_dim`.
    pub fn new(config: &RopeConfig, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| config.theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let (inv_freq, mscale) = match config.scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let orig = original_max_positions as f64;
                let low_wavelen = orig / low_freq_factor;
                let high_wavelen = orig / high_freq_factor;
                let scaled = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (scaled, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
            } => {
                // NTK-by-parts: dimensions that rotate many times over the training context keep
                // their frequency, slow ones are interpolated, a linear ramp in between.
                let orig = original_max_positions as f64;
                let dim = head_dim as f64;
                let ln_theta = config.theta.ln();
                let correction = |rotations: f64| {
                    dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * ln_theta)
                };
                let low = correction(beta_fast).floor().max(0.0);
                let high = correction(beta_slow).ceil().min(dim - 1.0);
                let span = if high > low { high - low } else { 0.001 };
                let scaled = base
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                        let extrapolate = 1.0 - ramp;
                        f / factor * (1.0 - extrapolate) + f * extrapolate
                    })
                    .collect();
                (scaled, 0.1 * factor.ln() + 1.0)
            }
        };
        Self {
            kind: config.kind,
            inv_freq,
            mscale,
        }
    }

    /// Angular frequency (radians per position) of each rotary pair `i < D/2`, scaling applied.
    /// Pair `i` is dimensions `(2i, 2i+1)` for [`RopeKind::Interleaved`] and `(i, i + D/2)` for
    /// [`RopeKind::Neox`].
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// The op that rotates rows of `[B, H, T, D]` to positions `starts[b] + t` and writes the
    /// first `lens[b]` of each item (see [`RopeWrite`]); `rotate: false` copies them unrotated.
    pub fn writer(
        &self,
        starts: &[usize],
        lens: &[usize],
        rotate: bool,
        at_position: bool,
    ) -> RopeWrite {
        RopeWrite {
            inv_freq: self.inv_freq.clone(),
            mscale: self.mscale,
            kind: rotate.then_some(self.kind),
            starts: starts.to_vec(),
            lens: lens.to_vec(),
            at_position,
            advance: None,
        }
    }

    /// cos and sin tables, each `[B, T, D/2]`, for the positions `starts[b] + t`, `t < len`.
    ///
    /// # Errors
    /// [`SaapError::Candle`](crate::SaapError::Candle) when the tables cannot be built on `device`
    /// in `dtype`.
    pub fn tables(
        &self,
        starts: &[usize],
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let positions: Vec<usize> = starts.iter().flat_map(|&s| s..s + len).collect();
        self.tables_at(&positions, (starts.len(), len), dtype, device)
    }

    /// cos and sin tables, each `[B, T, D/2]` for `shape = (B, T)`, of `positions` listed in
    /// row-major order.
    ///
    /// # Errors
    /// [`SaapError::Candle`](crate::SaapError::Candle) when `positions` do not fill `shape` or the
    /// tables cannot be built on `device` in `dtype`.
    pub fn tables_at(
        &self,
        positions: &[usize],
        shape: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for &f in &self.inv_freq {
                let (s, c) = (pos as f64 * f).sin_cos();
                cos.push((c * self.mscale) as f32);
                sin.push((s * self.mscale) as f32);
            }
        }
        let shape = (shape.0, shape.1, half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates `x` of shape `[B, H, T, D]` with tables from [`Rope::tables`].
    ///
    /// # Errors
    /// [`SaapError::Candle`](crate::SaapError::Candle) when `x` and the tables do not fit
    /// (`[B, H, T, D]` and `[B, T, D/2]`).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match self.kind {
            RopeKind::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeKind::Neox => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        })
    }
}

/// Rotation and write of new rows, one kernel on both backends: the cache append of
/// [`crate::SaapAttention`] (keys rotated into the K cache, values copied into the V cache) and
/// the rotation of its queries.
///
/// Source `[B, H, T, D]`. Item `b` writes its rows `t < lens[b]`, rotated to position
/// `starts[b] + t`, at row `starts[b] + t` of a `[B, H, rows, D]` cache
/// ([`Tensor::inplace_op2`], `at_position`) or at row `t` of a new `[B, H, T, D]` tensor
/// ([`Tensor::apply_op1_no_bwd`]). cos and sin are the f64 angle's, times the attention scale,
/// rounded to f32 and then to the element type; products and sums are rounded to the element
/// type, so the result equals [`Rope::apply`] with [`Rope::tables`], bit for bit.
#[derive(Debug, Clone)]
pub struct RopeWrite {
    pub(crate) inv_freq: Vec<f64>,
    pub(crate) mscale: f64,
    /// `None`: copy without rotation.
    pub(crate) kind: Option<RopeKind>,
    pub(crate) starts: Vec<usize>,
    pub(crate) lens: Vec<usize>,
    pub(crate) at_position: bool,
    /// Replayed decode steps per item (`[B]` u32), added to `starts` by the kernel.
    pub(crate) advance: Option<Tensor>,
}

impl RopeWrite {
    /// Checks shapes; returns `(B, H, T, D)` of the source and the destination rows.
    pub(crate) fn check(
        &self,
        src: &Layout,
        dst: Option<&Layout>,
    ) -> candle_core::Result<((usize, usize, usize, usize), usize)> {
        let (b, h, t, d) = src.shape().dims4()?;
        if self.starts.len() != b || self.lens.len() != b || self.lens.iter().any(|&l| l > t) {
            candle_core::bail!(
                "rope write: {b} items of {t} rows, got starts {:?} and lens {:?}",
                self.starts,
                self.lens
            );
        }
        if d % 2 != 0 || d / 2 != self.inv_freq.len() {
            candle_core::bail!(
                "rope write: head dim {d} for {} frequencies",
                self.inv_freq.len()
            );
        }
        let rows = match dst {
            None => t,
            Some(dst) => {
                let (db, dh, rows, dd) = dst.shape().dims4()?;
                let end = self.starts.iter().zip(&self.lens).map(|(s, l)| s + l).max();
                if (db, dh, dd) != (b, h, d) || end.unwrap_or(0) > rows {
                    candle_core::bail!(
                        "rope write: destination {:?} cannot take rows up to {end:?} of {:?}",
                        dst.shape(),
                        src.shape()
                    );
                }
                rows
            }
        };
        Ok(((b, h, t, d), rows))
    }

    /// Per item, cos and sin of its positions `[lens[b], D/2]`, rounded as the GPU rounds them.
    fn tables<T: WithDType>(&self) -> Vec<(Vec<T>, Vec<T>)> {
        let half = self.inv_freq.len();
        self.starts
            .par_iter()
            .zip(&self.lens)
            .map(|(&start, &len)| {
                let mut cos = Vec::with_capacity(len * half);
                let mut sin = Vec::with_capacity(len * half);
                for pos in start..start + len {
                    for &f in &self.inv_freq {
                        let (s, c) = (pos as f64 * f).sin_cos();
                        cos.push(T::from_f64((c * self.mscale) as f32 as f64));
                        sin.push(T::from_f64((s * self.mscale) as f32 as f64));
                    }
                }
                (cos, sin)
            })
            .collect()
    }

    /// The CPU kernel: `dst` holds `rows` rows per (item, head).
    fn write<T: WithDType>(
        &self,
        dst: &mut [T],
        src: &[T],
        (_, h, t_len, d): (usize, usize, usize, usize),
        rows: usize,
    ) {
        let tables = self.kind.map(|_| self.tables::<T>());
        let half = d / 2;
        dst.par_chunks_mut(rows * d)
            .enumerate()
            .for_each(|(bh, dst)| {
                let b = bh / h;
                let src = &src[bh * t_len * d..(bh + 1) * t_len * d];
                for t in 0..self.lens[b] {
                    let row = if self.at_position {
                        self.starts[b] + t
                    } else {
                        t
                    };
                    let (x, y) = (&src[t * d..(t + 1) * d], &mut dst[row * d..(row + 1) * d]);
                    let (Some(kind), Some(tables)) = (self.kind, &tables) else {
                        y.copy_from_slice(x);
                        continue;
                    };
                    let (cos, sin) = &tables[b];
                    for i in 0..half {
                        let (c, s) = (cos[t * half + i], sin[t * half + i]);
                        let (i1, i2) = match kind {
                            RopeKind::Interleaved => (2 * i, 2 * i + 1),
                            RopeKind::Neox => (i, i + half),
                        };
                        y[i1] = x[i1] * c - x[i2] * s;
                        y[i2] = x[i1] * s + x[i2] * c;
                    }
                }
            });
    }
}

/// Runs [`RopeWrite::write`] on matching CPU storages.
fn write_cpu(
    op: &RopeWrite,
    dst: &mut CpuStorage,
    dst_l: &Layout,
    src: &CpuStorage,
    src_l: &Layout,
) -> candle_core::Result<()> {
    if op.advance.is_some() {
        // The positions the recorded step was given, moved on by the replayed steps.
        let steps = crate::attend::decode::replayed_steps(op.advance.as_ref(), op.starts.len())?;
        let mut op = op.clone();
        op.advance = None;
        for (start, n) in op.starts.iter_mut().zip(steps) {
            *start += n;
        }
        return write_cpu(&op, dst, dst_l, src, src_l);
    }
    let (dims, rows) = op.check(src_l, op.at_position.then_some(dst_l))?;
    fn run<T: WithDType>(
        op: &RopeWrite,
        dst: &mut [T],
        dst_l: &Layout,
        src: &[T],
        src_l: &Layout,
        dims: (usize, usize, usize, usize),
        rows: usize,
    ) -> candle_core::Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("rope write: tensors must be contiguous")
        };
        op.write(&mut dst[d0..d1], &src[s0..s1], dims, rows);
        Ok(())
    }
    match (dst, src) {
        (CpuStorage::F32(d), CpuStorage::F32(s)) => run(op, d, dst_l, s, src_l, dims, rows),
        (CpuStorage::BF16(d), CpuStorage::BF16(s)) => run(op, d, dst_l, s, src_l, dims, rows),
        (CpuStorage::F16(d), CpuStorage::F16(s)) => run(op, d, dst_l, s, src_l, dims, rows),
        (d, s) => candle_core::bail!("rope write: dtypes {:?} into {:?}", s.dtype(), d.dtype()),
    }
}

impl InplaceOp2 for RopeWrite {
    fn name(&self) -> &'static str {
        "saap-rope-write"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        write_cpu(self, dst, dst_l, src, src_l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::rope_write(self, dst, dst_l, src, src_l)
    }
}

/// [`RopeWrite`] of keys and values into a joint cache `[2, B, H, rows, D]`
/// ([`Tensor::inplace_op3`] with the keys, then the values): keys rotated into the first half
/// (the K cache), values copied into the second (the V cache), one launch on CUDA.
#[derive(Debug, Clone)]
pub(crate) struct KvWrite(pub(crate) RopeWrite);

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "saap-kv-write"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let dims = dst_l.shape().dims();
        let (Some((d0, _)), [2, b, h, rows, d]) = (dst_l.contiguous_offsets(), dims) else {
            candle_core::bail!(
                "kv write: a contiguous joint cache [2, B, H, rows, D], got {dims:?}"
            )
        };
        let half = Shape::from((*b, *h, *rows, *d));
        let n = half.elem_count();
        let values = RopeWrite {
            kind: None,
            ..self.0.clone()
        };
        write_cpu(
            &self.0,
            dst,
            &Layout::contiguous_with_offset(&half, d0),
            k,
            k_l,
        )?;
        write_cpu(
            &values,
            dst,
            &Layout::contiguous_with_offset(&half, d0 + n),
            v,
            v_l,
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::kv_write(&self.0, dst, dst_l, (k, k_l), (v, v_l))
    }
}

impl CustomOp1 for RopeWrite {
    fn name(&self) -> &'static str {
        "saap-rope"
    }

    fn cpu_fwd(
        &self,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = src_l.shape().clone();
        let mut dst = match src {
            CpuStorage::F32(_) => CpuStorage::F32(vec![0.0; shape.elem_count()]),
            CpuStorage::BF16(_) => CpuStorage::BF16(vec![half::bf16::ZERO; shape.elem_count()]),
            CpuStorage::F16(_) => CpuStorage::F16(vec![half::f16::ZERO; shape.elem_count()]),
            other => candle_core::bail!("rope write: dtype {:?}", other.dtype()),
        };
        write_cpu(self, &mut dst, &Layout::contiguous(&shape), src, src_l)?;
        Ok((dst, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rope_new(self, src, src_l)
    }
}
