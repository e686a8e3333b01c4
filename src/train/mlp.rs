//! Training the per-query-head classifier: soft cross-entropy (KL up to a constant) between the
//! MLP's partition distribution and the normalized bucket mass, AdamW, mini-batches. All query
//! heads of a layer train together as one batched model.

use crate::classify::{mlp_forward, Classifier};
use crate::error::{Result, SaapError};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// Optimization settings of the classifier.
#[derive(Debug, Clone, Copy)]
pub struct MlpParams {
    /// Hidden width.
    pub hidden: usize,
    /// Passes over the training queries.
    pub epochs: usize,
    /// Queries per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of the initialization and shuffling.
    pub seed: u64,
}

impl MlpParams {
    /// Defaults that trained well on our synthetic and real calibration sets.
    pub fn new(hidden: usize) -> Self {
        Self {
            hidden,
            epochs: 30,
            batch_size: 256,
            lr: 2e-3,
            weight_decay: 1e-4,
            seed: 0,
        }
    }
}

fn init(
    shape: (usize, usize, usize),
    fan_in: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Var> {
    let std = (2.0 / fan_in as f64).sqrt() as f32;
    let normal = Normal::new(0.0f32, std).map_err(|e| SaapError::Training(e.to_string()))?;
    let data: Vec<f32> = (0..shape.0 * shape.1 * shape.2)
        .map(|_| normal.sample(rng))
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?)
}

/// Trains one layer's classifier. `queries`: `[Hq, N, D]` pre-RoPE, `targets`: `[Hq, N, C]`
/// rows summing to 1. Inputs are standardized per head and dimension during training and the
/// standardization is folded into the first layer, so inference sees raw queries. Trains on the
/// device of `queries` (where `targets` must be too); the weights stay there.
///
/// # Errors
/// [`SaapError::Training`] when queries and targets do not pair up or are empty;
/// [`SaapError::Candle`] when training fails on the device.
pub fn train_classifier(
    queries: &Tensor,
    targets: &Tensor,
    params: &MlpParams,
    progress: Option<&ProgressBar>,
) -> Result<Classifier> {
    let (hq, n, d) = queries.dims3()?;
    let c = targets.dim(2)?;
    if targets.dims3()? != (hq, n, c) || n == 0 {
        return Err(SaapError::Training(format!(
            "queries {:?} and targets {:?} do not pair up (or are empty)",
            queries.dims(),
            targets.dims()
        )));
    }
    let device = queries.device();
    let queries = queries.to_dtype(DType::F32)?;
    let mean = queries.mean_keepdim(1)?;
    let std = (queries.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)? + 1e-6)?.sqrt()?;
    let x_all = queries.broadcast_sub(&mean)?.broadcast_div(&std)?;
    let h = params.hidden;
    let mut rng = StdRng::seed_from_u64(params.seed);
    let w1 = init((hq, d, h), d, &mut rng, device)?;
    let b1 = Var::zeros((hq, 1, h), DType::F32, device)?;
    let w2 = init((hq, h, c), h, &mut rng, device)?;
    let b2 = Var::zeros((hq, 1, c), DType::F32, device)?;
    let mut opt = AdamW::new(
        vec![w1.clone(), b1.clone(), w2.clone(), b2.clone()],
        ParamsAdamW {
            lr: params.lr,
            weight_decay: params.weight_decay,
            ..Default::default()
        },
    )?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let steps_per_epoch = n.div_ceil(params.batch_size.max(1));
    if let Some(bar) = progress {
        bar.set_length((params.epochs * steps_per_epoch) as u64);
    }
    for _ in 0..params.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(params.batch_size.max(1)) {
            let idx = Tensor::from_slice(batch, batch.len(), device)?;
            let x = x_all.index_select(&idx, 1)?;
            let t = targets.index_select(&idx, 1)?;
            let logits = mlp_forward(&x, &w1, &b1, &w2, &b2)?;
            let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let loss = (t * log_p)?.sum(D::Minus1)?.mean_all()?.neg()?;
            opt.backward_step(&loss)?;
            if let Some(bar) = progress {
                bar.inc(1);
            }
        }
    }
    // Fold the standardization: W1' = W1 / σ (per input row), b1' = b1 - (μ/σ)·W1.
    let inv_std = std.recip()?; // [Hq, 1, D]
    let w1_folded = w1.as_tensor().broadcast_mul(&inv_std.transpose(1, 2)?)?;
    let b1_folded = (b1.as_tensor() - mean.matmul(&w1_folded)?)?;
    Ok(Classifier {
        w1: w1_folded,
        b1: b1_folded,
        w2: w2.as_tensor().clone(),
        b2: b2.as_tensor().clone(),
    })
}
