//! Offline training of a [`crate::SaapIndex`]: k-means of pre-RoPE keys per (layer, KV head),
//! bucket-mass targets from the true attention of calibration queries, the per-head classifier,
//! and held-out evaluation that decides which layers stay dense.
//!
//! Data comes from a model run in dense mode with a [`crate::Recorder`] on each layer's
//! [`crate::SaapAttention`]; [`data::sequences_from_records`] turns the records into sequences.

pub mod data;
pub mod eval;
pub mod key_dims;
pub mod mlp;

use crate::budget::ProbeCurve;
use crate::config::{Routing, SaapConfig};
use crate::error::{Result, SaapError};
use crate::index::{LayerIndex, SaapIndex};
use crate::partition::kmeans::{kmeans_weighted, KMeansInit, KMeansParams};
use candle_core::{DType, Device, Tensor, D};
use data::{first_query_position, query_attention, query_positions, Sequence};
pub use eval::{evaluate_routing, probe_curve, RoutingEval};
use indicatif::ProgressBar;
use key_dims::Basis;
pub use key_dims::KeyDims;
pub use mlp::{train_classifier, MlpParams};

/// Settings of one layer's training.
#[derive(Debug, Clone)]
pub struct TrainParams {
    /// Lloyd iterations.
    pub kmeans_iters: usize,
    /// k-means subsamples to this many keys per centroid.
    pub max_points_per_centroid: usize,
    /// k-means initialization.
    pub kmeans_init: KMeansInit,
    /// Dimensions of the pre-RoPE keys k-means clusters on (the centroids are zero elsewhere).
    pub key_dims: KeyDims,
    /// When set to p, k-means weighs each key by `(m / mean m + 0.001)^p`, m the attention mass
    /// it receives (while indexed) from the training queries of its KV group: centroids gather
    /// where attention goes. Finite and > 0.
    pub attention_weight: Option<f64>,
    /// Classifier optimization.
    pub mlp: MlpParams,
    /// Training queries taken per sequence.
    pub queries_per_seq: usize,
    /// Held-out queries per sequence when calibration measures each layer.
    pub eval_queries_per_seq: usize,
    /// A query is used only once at least this many keys lie outside sinks and window.
    pub min_indexed: usize,
    /// Seed of k-means.
    pub seed: u64,
    /// Where k-means assignments, the true attention of calibration queries and the classifier's
    /// training are computed (the trained index is kept on the CPU).
    pub device: Device,
}

impl TrainParams {
    /// Defaults for `config`: 25 Lloyd iterations, 256 keys per centroid, random init, every
    /// key dimension.
    pub fn new(config: &SaapConfig) -> Self {
        Self {
            kmeans_iters: 25,
            max_points_per_centroid: 256,
            kmeans_init: KMeansInit::Random,
            key_dims: KeyDims::All,
            attention_weight: None,
            mlp: MlpParams::new(config.hidden),
            queries_per_seq: 1024,
            eval_queries_per_seq: 128,
            min_indexed: config.n_partitions,
            seed: 0,
            device: Device::Cpu,
        }
    }
}

/// k-means centroids `[Hkv, C, D]` of the keys of `sequences` (sinks left out: they are never
/// indexed), clustered on the dimensions `params.key_dims` keeps; the centroids are zero in the
/// others, so that assignment (nearest centroid) follows the kept dimensions only.
///
/// # Errors
/// As [`crate::partition::kmeans::kmeans`]: too few keys outside the sinks, or non-finite keys;
/// [`SaapError::Config`] for invalid `params.key_dims` ([`KeyDims::kept`]);
/// [`SaapError::Training`] when [`KeyDims::Queries`] finds no query.
pub fn train_centroids(
    sequences: &[Sequence],
    config: &SaapConfig,
    params: &TrainParams,
) -> Result<Tensor> {
    let layout = config.layout;
    let d = layout.head_dim;
    params.key_dims.validate()?;
    let weights = match params.attention_weight {
        None => None,
        Some(p) if p.is_finite() && p > 0.0 => {
            Some(attention_weights(sequences, config, params, p)?)
        }
        Some(p) => {
            return Err(SaapError::Config(format!(
                "attention weight exponent must be finite and > 0, got {p}"
            )))
        }
    };
    let mut per_head = Vec::with_capacity(layout.n_kv_heads);
    for h in 0..layout.n_kv_heads {
        let basis = params.key_dims.basis(config, sequences, h)?;
        let rank = match &basis {
            Basis::Axes(kept) => kept.len(),
            Basis::Directions { rank, .. } => *rank,
        };
        let mut points = Vec::new();
        for seq in sequences {
            let n = seq.len();
            if n > config.sinks {
                let keys = seq.k.get(h)?.narrow(0, config.sinks, n - config.sinks)?;
                let keys = keys.flatten_all()?.to_vec1::<f32>()?;
                match &basis {
                    Basis::Axes(kept) if kept.len() == d => points.extend(keys),
                    Basis::Axes(kept) => {
                        for row in keys.chunks_exact(d) {
                            points.extend(kept.iter().map(|&i| row[i]));
                        }
                    }
                    Basis::Directions { u, rank } => {
                        for row in keys.chunks_exact(d) {
                            points.extend((0..*rank).map(|j| {
                                row.iter()
                                    .enumerate()
                                    .map(|(i, &x)| x as f64 * u[i * rank + j])
                                    .sum::<f64>() as f32
                            }));
                        }
                    }
                }
            }
        }
        let km = kmeans_weighted(
            &points,
            weights.as_ref().map(|w| &w[h][..]),
            rank,
            &KMeansParams {
                k: config.n_partitions,
                iters: params.kmeans_iters,
                max_points_per_centroid: params.max_points_per_centroid,
                init: params.kmeans_init,
                seed: params.seed + h as u64,
            },
            &params.device,
        )?;
        let centroids = match &basis {
            Basis::Axes(kept) if kept.len() == d => km.centroids,
            Basis::Axes(kept) => {
                let mut full = vec![0f32; config.n_partitions * d];
                for (row, c) in full
                    .chunks_exact_mut(d)
                    .zip(km.centroids.chunks_exact(rank))
                {
                    for (&i, &x) in kept.iter().zip(c) {
                        row[i] = x;
                    }
                }
                full
            }
            Basis::Directions { u, rank } => km
                .centroids
                .chunks_exact(*rank)
                .flat_map(|c| {
                    (0..d).map(move |i| {
                        c.iter()
                            .enumerate()
                            .map(|(j, &x)| x as f64 * u[i * rank + j])
                            .sum::<f64>() as f32
                    })
                })
                .collect(),
        };
        per_head.push(Tensor::from_vec(
            centroids,
            (config.n_partitions, d),
            &Device::Cpu,
        )?);
    }
    Ok(Tensor::stack(&per_head, 0)?)
}

/// Per KV head, one weight per indexed key of `sequences` (sinks left out, in order):
/// `(m / mean m + 0.001)^power`, m the attention mass the key receives from the training
/// queries of the head's group while it is indexed (outside sinks and window).
fn attention_weights(
    sequences: &[Sequence],
    config: &SaapConfig,
    params: &TrainParams,
    power: f64,
) -> Result<Vec<Vec<f32>>> {
    let layout = config.layout;
    let (hkv, g) = (layout.n_kv_heads, layout.group_size());
    let first = first_query_position(config, params.min_indexed);
    let none = Tensor::zeros((hkv, 1, layout.head_dim), DType::F32, &Device::Cpu)?;
    let mut mass: Vec<Vec<f64>> = vec![Vec::new(); hkv];
    for seq in sequences {
        let n = seq.len();
        if n <= config.sinks {
            continue;
        }
        let mut seq_mass = vec![vec![0f64; n]; hkv];
        let positions = query_positions(n, first, params.queries_per_seq);
        if !positions.is_empty() {
            let qa = query_attention(seq, config, &positions, &none, &params.device)?;
            let probs = qa.probs.to_vec3::<f32>()?;
            for (hq, per_query) in probs.iter().enumerate() {
                let m = &mut seq_mass[hq / g];
                for (&t, w) in positions.iter().zip(per_query) {
                    let end = (t + 1).saturating_sub(config.window);
                    for j in config.sinks..end.max(config.sinks) {
                        m[j] += w[j] as f64;
                    }
                }
            }
        }
        for (all, m) in mass.iter_mut().zip(seq_mass) {
            all.extend_from_slice(&m[config.sinks..]);
        }
    }
    Ok(mass
        .into_iter()
        .map(|m| {
            let mean = m.iter().sum::<f64>() / m.len().max(1) as f64;
            let mean = if mean > 0.0 { mean } else { 1.0 };
            m.iter()
                .map(|&x| (x / mean + 1e-3).powf(power) as f32)
                .collect()
        })
        .collect())
}

/// Training queries `[Hq, N, D]` (on the CPU) and their normalized bucket-mass targets
/// `[Hq, N, C]` (on `params.device`, where they are computed and the classifier trains).
///
/// # Errors
/// [`SaapError::Training`] when no sequence is long enough to place a query;
/// [`SaapError::Candle`] when the data do not fit `config`.
pub fn bucket_targets(
    sequences: &[Sequence],
    config: &SaapConfig,
    centroids: &Tensor,
    params: &TrainParams,
) -> Result<(Tensor, Tensor)> {
    let first = first_query_position(config, params.min_indexed);
    let mut queries = Vec::new();
    let mut targets = Vec::new();
    for seq in sequences {
        let positions = query_positions(seq.len(), first, params.queries_per_seq);
        if positions.is_empty() {
            continue;
        }
        let qa = query_attention(seq, config, &positions, centroids, &params.device)?;
        let mass = qa.bucket_mass(config)?;
        // A tiny uniform floor keeps rows with no indexed mass well defined (≈ uniform targets).
        let eps = 1e-9;
        let c = config.n_partitions as f64;
        let total = (mass.sum_keepdim(D::Minus1)? + eps)?;
        targets.push(((mass + eps / c)?.broadcast_div(&total))?);
        queries.push(qa.q);
    }
    if queries.is_empty() {
        return Err(SaapError::Training(format!(
            "no calibration sequence is longer than {first} tokens (sinks + window + {} keys)",
            params.min_indexed
        )));
    }
    Ok((Tensor::cat(&queries, 1)?, Tensor::cat(&targets, 1)?))
}

/// Trains one layer: centroids, then the classifier on bucket-mass targets.
///
/// # Errors
/// [`SaapError::Config`] for an invalid `config`, and the errors of [`train_centroids`],
/// [`bucket_targets`] and [`train_classifier`].
pub fn train_layer(
    sequences: &[Sequence],
    config: &SaapConfig,
    params: &TrainParams,
    progress: Option<&ProgressBar>,
) -> Result<LayerIndex> {
    config.validate()?;
    let centroids = train_centroids(sequences, config, params)?;
    let (queries, targets) = bucket_targets(sequences, config, &centroids, params)?;
    // A GPU trains the classifier in seconds where the CPU took most of a calibration's time.
    let queries = queries.to_device(&params.device)?;
    let classifier = train_classifier(&queries, &targets, &params.mlp, progress)?
        .prepared(DType::F32, &Device::Cpu)?;
    Ok(LayerIndex {
        centroids,
        classifier,
        routing: Routing::Classifier,
    })
}

/// The per-layer policy: a layer whose held-out total recall at the configured ℓ is below
/// `min_recall` is served dense (and counts fully in the keys read).
pub fn choose_routing(eval: &RoutingEval, min_recall: f64) -> Routing {
    if eval.recall >= min_recall {
        Routing::Classifier
    } else {
        Routing::Dense
    }
}

/// How a layer reads keys when it is served sparse: Quest where, on held-out queries, its pages
/// held more of the indexed attention than the classifier's partitions, reading no more keys
/// (`quest_indexed_recall`, measured at the classifier's reads), else the classifier. At long
/// context many layers attend by position, which pages follow and pre-RoPE partitions do not
/// (bench/NOTES.md §37).
pub fn choose_sparse_routing(eval: &RoutingEval) -> Routing {
    if eval.quest_indexed_recall > eval.indexed_recall {
        Routing::Quest
    } else {
        Routing::Classifier
    }
}

/// What calibration measured for one layer on held-out sequences.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    /// Layer number.
    pub layer: usize,
    /// The trained classifier at the configured ℓ.
    pub classifier: RoutingEval,
    /// Nearest-centroid routing at the same ℓ (the paper's symmetric ablation).
    pub nearest_centroid: RoutingEval,
    /// The routing chosen for the layer.
    pub routing: Routing,
    /// Its routing when served sparse ([`choose_sparse_routing`]).
    pub sparse_routing: Routing,
    /// What each ℓ reads and finds with the classifier (saved in the index).
    pub probe_curve: ProbeCurve,
    /// What Quest reads and finds at the budgets of each uniform ℓ (saved in the index; see
    /// [`crate::budget`]).
    pub quest_curve: ProbeCurve,
}

/// Trains every layer on `train[layer]`, evaluates on `held_out[layer]` (other text), serves
/// dense the layers whose classifier recall stays below `min_recall`, and records each layer's
/// routing when served sparse ([`choose_sparse_routing`]). Each layer's
/// [`ProbeCurve`]s, the classifier's and Quest's, are measured on the same held-out queries and
/// saved in the index. `progress`
/// shows each layer's classifier training; `on_layer` sees each layer's report as soon as it is
/// measured.
///
/// # Errors
/// [`SaapError::Training`] when the training and held-out layers differ in number or held-out
/// sequences are too short; the errors of [`train_layer`], [`evaluate_routing`] and
/// [`SaapIndex::new`].
#[allow(clippy::too_many_arguments)]
pub fn calibrate_index(
    train: &[Vec<Sequence>],
    held_out: &[Vec<Sequence>],
    config: &SaapConfig,
    params: &TrainParams,
    min_recall: f64,
    model: &str,
    progress: Option<&ProgressBar>,
    mut on_layer: impl FnMut(&LayerReport),
) -> Result<(SaapIndex, Vec<LayerReport>)> {
    if train.len() != held_out.len() || train.is_empty() {
        return Err(SaapError::Training(format!(
            "{} training and {} held-out layers",
            train.len(),
            held_out.len()
        )));
    }
    let first = first_query_position(config, params.min_indexed);
    let mut layers = Vec::with_capacity(train.len());
    let mut reports = Vec::with_capacity(train.len());
    for (i, (train_seqs, eval_seqs)) in train.iter().zip(held_out).enumerate() {
        if let Some(bar) = progress {
            bar.reset();
            bar.set_message(format!("layer {i}/{}", train.len()));
        }
        let mut layer = train_layer(train_seqs, config, params, progress)?;
        // Each held-out sequence's attention computed once for the four measurements.
        let eval::CalibrationEval {
            classifier,
            nearest: nearest_centroid,
            probe_curve,
            quest_curve,
        } = eval::evaluate_for_calibration(
            eval_seqs,
            &layer,
            config,
            first,
            params.eval_queries_per_seq,
            &params.device,
        )?;
        let (Some(probe_curve), Some(quest_curve)) = (probe_curve, quest_curve) else {
            return Err(SaapError::Training(format!(
                "held-out sequences of layer {i} are shorter than {first} tokens"
            )));
        };
        layer.routing = choose_routing(&classifier, min_recall);
        let report = LayerReport {
            layer: i,
            classifier,
            nearest_centroid,
            routing: layer.routing,
            sparse_routing: choose_sparse_routing(&classifier),
            probe_curve,
            quest_curve,
        };
        on_layer(&report);
        reports.push(report);
        layers.push(layer);
    }
    let curves = reports
        .iter()
        .map(|r| Some(r.probe_curve.clone()))
        .collect();
    let quest_curves = reports
        .iter()
        .map(|r| Some(r.quest_curve.clone()))
        .collect();
    let sparse = reports.iter().map(|r| r.sparse_routing).collect();
    let index = SaapIndex::new(config.clone(), model, layers)?
        .with_probe_curves(curves)?
        .with_quest_curves(quest_curves)?
        .with_sparse_routing(sparse)?;
    Ok((index, reports))
}
