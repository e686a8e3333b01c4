//! Rotary position embedding, applied by the op to pre-RoPE queries and keys.
//!
//! The model hands Saap pre-RoPE vectors (they are what the index clusters and the classifier
//! reads); the op rotates them itself, so it never has to un-rotate a cached key.

use crate::config::{RopeConfig, RopeKind, RopeScaling};
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

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

    /// cos and sin tables, each `[B, T, D/2]`, for the positions `starts[b] + t`, `t < len`.
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
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match self.kind {
            RopeKind::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeKind::Neox => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        })
    }
}
