//! Calibration data: per-layer sequences of pre-RoPE queries and keys, and the true attention of
//! sampled queries, from which bucket-mass targets and evaluations are computed.

use crate::attention::Recorded;
use crate::config::SaapConfig;
use crate::error::{Result, SaapError};
use crate::partition::assign::assign;
use crate::rope::Rope;
use candle_core::{DType, Device, Tensor, D};

/// Pre-RoPE queries and keys, and values, of one calibration sequence at one layer (f32, CPU).
#[derive(Debug, Clone)]
pub struct Sequence {
    /// `[Hq, n, D]`.
    pub q: Tensor,
    /// `[Hkv, n, D]`.
    pub k: Tensor,
    /// `[Hkv, n, D]`; only the evaluation's output error reads it.
    pub v: Tensor,
}

impl Sequence {
    /// Tokens in the sequence.
    pub fn len(&self) -> usize {
        self.k.dim(1).unwrap_or(0)
    }

    /// Whether the sequence has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reassembles whole sequences from a layer's recorded prefill calls: a batch item whose call
/// starts at position 0 begins a new sequence, later chunks extend it.
///
/// # Errors
/// [`SaapError::Candle`] when the chunks of one sequence do not concatenate (shapes differ).
pub fn sequences_from_records(records: &[Recorded]) -> Result<Vec<Sequence>> {
    /// Chunks of one sequence, concatenated once at the end (not per chunk, which would copy
    /// the growing sequence again for every chunk).
    #[derive(Default)]
    struct Parts {
        len: usize,
        q: Vec<Tensor>,
        k: Vec<Tensor>,
        v: Vec<Tensor>,
    }
    fn close(parts: Parts) -> Result<Sequence> {
        Ok(Sequence {
            q: Tensor::cat(&parts.q, 1)?,
            k: Tensor::cat(&parts.k, 1)?,
            v: Tensor::cat(&parts.v, 1)?,
        })
    }
    let mut done = Vec::new();
    let mut open: Vec<Option<Parts>> = Vec::new();
    for record in records {
        if open.len() < record.lens.len() {
            open.resize_with(record.lens.len(), || None);
        }
        for (b, (&len, &start)) in record.lens.iter().zip(&record.starts).enumerate() {
            if len == 0 {
                continue;
            }
            let slot = &mut open[b];
            let continues = slot.as_ref().is_some_and(|p| p.len == start);
            if !continues {
                if start != 0 {
                    return Err(SaapError::Training(format!(
                        "recorded chunk of item {b} starts at {start}, not where its sequence ends"
                    )));
                }
                if let Some(previous) = slot.take() {
                    done.push(close(previous)?);
                }
            }
            let parts = slot.get_or_insert_with(Parts::default);
            parts.q.push(record.q.get(b)?.narrow(1, 0, len)?);
            parts.k.push(record.k.get(b)?.narrow(1, 0, len)?);
            parts.v.push(record.v.get(b)?.narrow(1, 0, len)?);
            parts.len += len;
        }
    }
    for parts in open.into_iter().flatten() {
        done.push(close(parts)?);
    }
    Ok(done)
}

/// First query position with at least `min_indexed` keys outside sinks and window.
pub fn first_query_position(config: &SaapConfig, min_indexed: usize) -> usize {
    config.sinks + config.window + min_indexed
}

/// `count` query positions spread evenly over `first..n` (empty if the sequence is too short).
pub fn query_positions(n: usize, first: usize, count: usize) -> Vec<usize> {
    if n <= first || count == 0 {
        return Vec::new();
    }
    let span = n - first;
    let count = count.min(span);
    (0..count).map(|i| first + i * span / count).collect()
}

/// True attention of sampled queries of one sequence.
#[derive(Debug, Clone)]
pub struct QueryAttention {
    /// Query positions.
    pub positions: Vec<usize>,
    /// Pre-RoPE queries `[Hq, P, D]`.
    pub q: Tensor,
    /// Softmax weights `[Hq, P, n]` (zero past each query's position), on the work device.
    pub probs: Tensor,
    /// Partition of every key `[Hkv, n]` u32 (on the work device, like `probs`).
    pub labels: Tensor,
    /// Post-RoPE queries `[Hq, P, D]` f32 and keys `[Hkv, n, D]` f32 (work device): what a
    /// training-free selector such as Quest scores.
    pub q_rot: Tensor,
    /// See `q_rot`.
    pub k_rot: Tensor,
}

/// Computes the attention of the queries at `positions` over their causal context, with the
/// rotation and `1/sqrt(D)` scale decode uses, and the keys' partitions under `centroids`.
/// The work runs on `device` (a GPU makes long calibration contexts cheap); `q` stays on the CPU.
///
/// # Errors
/// [`SaapError::Candle`] when a position is outside the sequence or the shapes do not fit
/// `config`.
pub fn query_attention(
    seq: &Sequence,
    config: &SaapConfig,
    positions: &[usize],
    centroids: &Tensor,
    device: &Device,
) -> Result<QueryAttention> {
    let layout = config.layout;
    let (hkv, g, d) = (layout.n_kv_heads, layout.group_size(), layout.head_dim);
    let n = seq.len();
    let p = positions.len();
    let rope = Rope::new(&config.rope, d);
    let dev = device;
    let keys = seq.k.to_device(dev)?;
    let key_pos: Vec<usize> = (0..n).collect();
    let (kc, ks) = rope.tables_at(&key_pos, (1, n), DType::F32, dev)?;
    let k_rot = rope.apply(&keys.unsqueeze(0)?, &kc, &ks)?.squeeze(0)?;
    let idx = Tensor::from_vec(
        positions.iter().map(|&t| t as u32).collect(),
        p,
        &Device::Cpu,
    )?;
    let q = seq.q.index_select(&idx, 1)?;
    let (qc, qs) = rope.tables_at(positions, (1, p), DType::F32, dev)?;
    let q_rot = rope
        .apply(&q.to_device(dev)?.unsqueeze(0)?, &qc, &qs)?
        .squeeze(0)?;
    let mask: Vec<f32> = positions
        .iter()
        .flat_map(|&t| (0..n).map(move |j| if j <= t { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, p, n), dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q_rot.reshape((hkv, g * p, d))?.matmul(&k_rot.t()?)? * scale)?
        .reshape((hkv, g, p, n))?
        .broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((hkv * g, p, n))?;
    Ok(QueryAttention {
        positions: positions.to_vec(),
        q,
        probs,
        labels: assign(&keys, &centroids.to_device(dev)?)?,
        q_rot,
        k_rot,
    })
}

impl QueryAttention {
    /// Attention mass per partition over the keys decode would find through the index
    /// (`sinks..=t - window` for the query at `t`): `[Hq, P, C]`, not normalized.
    ///
    /// # Errors
    /// [`SaapError::Candle`] when the stored attention does not fit `config`.
    pub fn bucket_mass(&self, config: &SaapConfig) -> Result<Tensor> {
        let (hq, p, n) = self.probs.dims3()?;
        let hkv = config.layout.n_kv_heads;
        let c = config.n_partitions;
        let indexed: Vec<f32> = self
            .positions
            .iter()
            .flat_map(|&t| {
                let end = (t + 1).saturating_sub(config.window);
                (0..n).map(move |j| {
                    if j >= config.sinks && j < end {
                        1.0
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let indexed = Tensor::from_vec(indexed, (1, p, n), self.probs.device())?;
        let masked = self.probs.broadcast_mul(&indexed)?;
        let one_hot = one_hot(&self.labels, c)?; // [Hkv, n, C]
        let g = hq / hkv;
        Ok(masked
            .reshape((hkv, g * p, n))?
            .matmul(&one_hot)?
            .reshape((hq, p, c))?)
    }
}

/// `[H, n]` u32 labels → `[H, n, C]` f32 one-hot.
fn one_hot(labels: &Tensor, n_partitions: usize) -> Result<Tensor> {
    let classes = Tensor::arange(0u32, n_partitions as u32, labels.device())?;
    Ok(labels
        .unsqueeze(D::Minus1)?
        .broadcast_eq(&classes.reshape((1, 1, n_partitions))?)?
        .to_dtype(DType::F32)?)
}
