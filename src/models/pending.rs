//! TEMPORARY stand-in for `saap::SaapAttention` until the core op lands on `main`: the same
//! signatures, exact (dense) attention only. Delete this file when the real op exists.

use crate::config::{Routing, SaapConfig};
use crate::error::{Result, SaapError};
use crate::rope::Rope;
use candle_core::{DType, Device, Tensor};

/// Keys read by the last decode step of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStats {
    /// Key rows read (summed over batch items and KV heads).
    pub keys_read: usize,
    /// Key rows a dense step would read (same sum).
    pub keys_in_context: usize,
}

/// Dense attention of one layer with its KV cache (stand-in, see the module doc).
#[derive(Debug)]
pub struct SaapAttention {
    config: SaapConfig,
    rope: Rope,
    device: Device,
    dtype: DType,
    /// Post-RoPE keys and values per batch item, `[1, n_kv_heads, L, D]`.
    cache: Vec<Option<(Tensor, Tensor)>>,
    lens: Vec<usize>,
    last_read: Option<ReadStats>,
}

impl SaapAttention {
    /// Exact attention, no index.
    pub fn dense(config: &SaapConfig, device: &Device, dtype: DType) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config: config.clone(),
            rope: Rope::new(&config.rope, config.layout.head_dim),
            device: device.clone(),
            dtype,
            cache: Vec::new(),
            lens: Vec::new(),
            last_read: None,
        })
    }

    /// Causal attention of new pre-RoPE queries over the cache plus the new keys, which are
    /// appended. `q: [B, Hq, T, D]`, `k, v: [B, Hkv, T, D]`, `lens[b] <= T` valid tokens.
    pub fn prefill(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let l = self.config.layout;
        let (b, hq, t, d) = q.dims4()?;
        if hq != l.n_q_heads || d != l.head_dim {
            return Err(shape_err("q", q));
        }
        if k.dims4()? != (b, l.n_kv_heads, t, d) {
            return Err(shape_err("k", k));
        }
        if v.dims4()? != (b, l.n_kv_heads, t, d) {
            return Err(shape_err("v", v));
        }
        if lens.len() != b || lens.iter().any(|&n| n > t) {
            return Err(SaapError::Config(format!(
                "lens {lens:?} must give one length <= {t} per batch item ({b})"
            )));
        }
        if self.lens.is_empty() {
            self.lens = vec![0; b];
            self.cache = vec![None; b];
        } else if self.lens.len() != b {
            return Err(SaapError::Config(format!(
                "batch of {b} items, but the cache holds {}",
                self.lens.len()
            )));
        }
        let group = l.group_size();
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(b);
        for (i, &n) in lens.iter().enumerate() {
            if n == 0 {
                outs.push(Tensor::zeros((1, hq, t, d), self.dtype, &self.device)?);
                continue;
            }
            let start = self.lens[i];
            let (cos, sin) = self.rope.tables(&[start], n, self.dtype, &self.device)?;
            let qi = self.rope.apply(&q.narrow(0, i, 1)?.narrow(2, 0, n)?, &cos, &sin)?;
            let ki = self.rope.apply(&k.narrow(0, i, 1)?.narrow(2, 0, n)?, &cos, &sin)?;
            let vi = v.narrow(0, i, 1)?.narrow(2, 0, n)?.contiguous()?;
            let (kc, vc) = match self.cache[i].take() {
                Some((kc, vc)) => (Tensor::cat(&[&kc, &ki], 2)?, Tensor::cat(&[&vc, &vi], 2)?),
                None => (ki, vi),
            };
            let total = start + n;
            // [1, Hkv, group * n, D]: the queries of a GQA group share their KV head.
            let qg = qi.reshape((1, l.n_kv_heads, group * n, d))?;
            let scores = (qg.to_dtype(DType::F32)?
                .matmul(&kc.to_dtype(DType::F32)?.t()?)?
                * scale)?;
            // Query t (position start + t) sees keys 0..=start + t.
            let mask: Vec<f32> = (0..group * n)
                .flat_map(|row| {
                    let pos = start + row % n;
                    (0..total).map(move |j| if j <= pos { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (group * n, total), &self.device)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
            let out = probs
                .matmul(&vc.to_dtype(DType::F32)?)?
                .reshape((1, hq, n, d))?
                .to_dtype(self.dtype)?;
            let out = if n < t {
                let pad = Tensor::zeros((1, hq, t - n, d), self.dtype, &self.device)?;
                Tensor::cat(&[&out, &pad], 2)?
            } else {
                out
            };
            outs.push(out);
            self.cache[i] = Some((kc, vc));
            self.lens[i] = total;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// One new token per batch item: `prefill` with `T == 1`, recording the keys read.
    pub fn decode(&mut self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let b = q.dim(0)?;
        if q.dim(2)? != 1 {
            return Err(shape_err("q", q));
        }
        if let Some(i) = self.lens.iter().position(|&n| n == 0) {
            return Err(SaapError::EmptyContext(i));
        }
        let out = self.prefill(q, k, v, &vec![1; b])?;
        let keys: usize = self.lens.iter().sum::<usize>() * self.config.layout.n_kv_heads;
        self.last_read = Some(ReadStats {
            keys_read: keys,
            keys_in_context: keys,
        });
        Ok(out)
    }

    /// Only [`Routing::Dense`] exists without an index.
    pub fn set_routing(&mut self, routing: Routing) -> Result<()> {
        match routing {
            Routing::Dense => Ok(()),
            other => Err(SaapError::IndexMismatch(format!(
                "{other:?} routing needs an index; this layer has none"
            ))),
        }
    }

    /// Forgets the sequences.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.lens.clear();
        self.last_read = None;
    }

    /// Tokens cached per batch item.
    pub fn seq_lens(&self) -> &[usize] {
        &self.lens
    }

    /// Keys read by the last decode step.
    pub fn last_read(&self) -> Option<ReadStats> {
        self.last_read
    }
}

fn shape_err(name: &'static str, t: &Tensor) -> SaapError {
    SaapError::Shape {
        name,
        expected: "q [B, Hq, T, D], k and v [B, Hkv, T, D] of the configured layout".into(),
        got: t.dims().to_vec(),
    }
}
