//! Calibration data from a real model: token windows of a text, run dense through the model with
//! a [`Recorder`] on every layer, regrouped per layer for [`crate::train`].

use super::fetch::{self, Text};
use super::llama::Llama;
use super::{Error, GgufTokenizer, Result};
use crate::attention::Recorder;
use crate::config::SaapConfig;
use crate::error::SaapError;
use crate::index::SaapIndex;
use crate::train::data::{sequences_from_records, Sequence};
use crate::train::{calibrate_index, LayerReport, TrainParams};
use indicatif::{ProgressBar, ProgressStyle};

/// `count` windows of `len` tokens spread evenly over `tokens` (fewer if the text is short).
pub fn windows(tokens: &[u32], len: usize, count: usize) -> Vec<Vec<u32>> {
    if tokens.len() < len || count == 0 {
        return Vec::new();
    }
    let room = tokens.len() - len;
    let count = count.min(room / len.max(1) + 1);
    (0..count)
        .map(|i| {
            let start = if count > 1 { i * room / (count - 1) } else { 0 };
            tokens[start..start + len].to_vec()
        })
        .collect()
}

/// Runs each token sequence through `model` (dense prefill in `chunk`-token pieces) and returns,
/// per layer, the recorded pre-RoPE queries, keys and values of every sequence.
pub fn record(
    model: &mut Llama,
    sequences: &[Vec<u32>],
    chunk: usize,
    progress: Option<&ProgressBar>,
) -> Result<Vec<Vec<Sequence>>> {
    model.attach_index(None)?;
    let recorders: Vec<Recorder> = (0..model.n_layers()).map(|_| Recorder::new()).collect();
    for (layer, recorder) in recorders.iter().enumerate() {
        model
            .attention_mut(layer)?
            .set_recorder(Some(recorder.clone()));
    }
    let mut per_layer: Vec<Vec<Sequence>> = vec![Vec::new(); model.n_layers()];
    if let Some(bar) = progress {
        bar.set_length(sequences.iter().map(|s| s.len() as u64).sum());
    }
    for tokens in sequences {
        model.reset();
        model.prefill_chunked(tokens, chunk)?;
        if let Some(bar) = progress {
            bar.inc(tokens.len() as u64);
        }
        for (layer, recorder) in recorders.iter().enumerate() {
            per_layer[layer].extend(sequences_from_records(&recorder.take())?);
        }
    }
    model.attach_index(None)?;
    model.reset();
    Ok(per_layer)
}

/// Where calibration reads its text and how much of it.
#[derive(Debug, Clone)]
pub struct CalibrationPlan {
    /// Tokens per calibration sequence (the context the index is sized for).
    pub context: usize,
    /// Texts the classifiers and centroids are trained on.
    pub train_texts: Vec<Text>,
    /// Other texts, on which each layer's recall is measured to decide which layers stay dense.
    pub held_out_texts: Vec<Text>,
    /// Training sequences per text.
    pub train_seqs: usize,
    /// Held-out sequences per text.
    pub held_out_seqs: usize,
    /// Prefill chunk while recording.
    pub chunk: usize,
    /// Layers whose held-out recall (all attention mass, window and sinks included) stays below
    /// this are served dense.
    pub min_recall: f64,
}

impl CalibrationPlan {
    /// Austen's novels for training, the Jargon File for the dense-layer decision; evaluation is
    /// left to yet other texts (Shakespeare, the Rust Book).
    pub fn new(context: usize) -> Self {
        Self {
            context,
            train_texts: vec![Text::Emma, Text::Persuasion, Text::SenseAndSensibility],
            held_out_texts: vec![Text::JargonFile],
            train_seqs: 2,
            held_out_seqs: 2,
            chunk: 512,
            min_recall: 0.9,
        }
    }
}

fn token_windows(
    tok: &GgufTokenizer,
    texts: &[Text],
    len: usize,
    per_text: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for &text in texts {
        let ids = tok.encode(&fetch::read_text(text)?)?;
        out.extend(windows(&ids, len, per_text));
    }
    Ok(out)
}

/// Trains an index for `model` following `plan`: records dense runs over the training and
/// held-out windows, then [`calibrate_index`] layer by layer. Progress bars go to stderr.
pub fn calibrate_model(
    model: &mut Llama,
    tok: &GgufTokenizer,
    config: &SaapConfig,
    params: &TrainParams,
    plan: &CalibrationPlan,
    name: &str,
) -> Result<(SaapIndex, Vec<LayerReport>)> {
    let style = ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} ({eta})")
        .map_err(|e| Error::Model(e.to_string()))?;
    let bar = |msg: &str| {
        let bar = ProgressBar::new(0).with_style(style.clone());
        bar.set_message(msg.to_string());
        bar
    };
    let train_tokens = token_windows(tok, &plan.train_texts, plan.context, plan.train_seqs)?;
    let held_tokens = token_windows(tok, &plan.held_out_texts, plan.context, plan.held_out_seqs)?;
    if train_tokens.is_empty() || held_tokens.is_empty() {
        return Err(Error::Model(format!(
            "calibration texts are shorter than the {}-token context",
            plan.context
        )));
    }
    let recording = bar("recording (tokens)");
    let train = record(model, &train_tokens, plan.chunk, Some(&recording))?;
    let held_out = record(model, &held_tokens, plan.chunk, Some(&recording))?;
    recording.finish();
    let training = bar("training");
    let result = calibrate_index(
        &train,
        &held_out,
        config,
        params,
        plan.min_recall,
        name,
        Some(&training),
        |r| {
            let line = format!(
                "layer {:>2}: recall {:.3} (nearest centroid {:.3}, oracle {:.3}) reading {:.1}% of indexed keys → {:?}",
                r.layer,
                r.classifier.recall,
                r.nearest_centroid.recall,
                r.classifier.oracle_recall,
                100.0 * r.classifier.indexed_selectivity,
                r.routing
            );
            // A hidden bar (stderr not a terminal) drops println: print the line anyway.
            if training.is_hidden() {
                eprintln!("{line}");
            } else {
                training.println(line);
            }
        },
    )?;
    training.finish();
    Ok(result)
}

/// The index `llama_decode` uses when given none: loaded from
/// `<cache>/indexes/<name>-ctx<context>.safetensors`, or calibrated with the default plan and
/// config ([`SaapConfig::for_context`]) and saved there first (also when the cached file is
/// rejected: another format version, or damaged).
pub fn cached_or_trained_index(
    model: &mut Llama,
    tok: &GgufTokenizer,
    name: &str,
    context: usize,
) -> Result<(SaapIndex, std::path::PathBuf)> {
    let dir = fetch::cache_dir()?.join("indexes");
    let path = dir.join(format!("{name}-ctx{context}.safetensors"));
    if path.exists() {
        match SaapIndex::load(&path, model.device()) {
            Ok(index) => return Ok((index, path)),
            // A cached index of an older format version, or damaged: replace it.
            Err(SaapError::IndexFormat(why)) => eprintln!("{why}: calibrating it again"),
            Err(e) => return Err(e.into()),
        }
    }
    let layout = model.config().layout;
    let config = SaapConfig::for_context(layout, model.config().rope, context)?;
    let mut params = TrainParams::new(&config);
    params.device = model.device().clone();
    eprintln!(
        "no index for {name} at {} yet: calibrating one (C = {}, ℓ = {}, window {}, sinks {})",
        path.display(),
        config.n_partitions,
        config.n_probe,
        config.window,
        config.sinks
    );
    let (index, _) = calibrate_model(
        model,
        tok,
        &config,
        &params,
        &CalibrationPlan::new(context),
        name,
    )?;
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    index.save(&path)?;
    Ok((index, path))
}
