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

/// Where a progress bar is hidden (stderr is not a terminal: a log), prints its state as a plain
/// line instead, so that long calibrations show progress in logs too.
fn log_hidden(bar: &ProgressBar) {
    if bar.is_hidden() {
        eprintln!(
            "{}: {}/{} ({:.0} s)",
            bar.message(),
            bar.position(),
            bar.length().unwrap_or(0),
            bar.elapsed().as_secs_f64()
        );
    }
}

/// Runs each token sequence through `model` (dense prefill in `chunk`-token pieces) and returns,
/// per layer, the recorded pre-RoPE queries, keys and values of every sequence. `progress`
/// advances by each sequence's tokens (its length is the caller's to set).
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
    for tokens in sequences {
        model.reset();
        model.prefill_chunked(tokens, chunk)?;
        if let Some(bar) = progress {
            bar.inc(tokens.len() as u64);
            log_hidden(bar);
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
    /// Tokens per held-out sequence: the decode length the dense-layer decision and each
    /// layer's probe curve are measured at (default: `context`; longer where the model decodes
    /// further than it is calibrated, e.g. with YaRN).
    pub held_out_context: usize,
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
            held_out_context: context,
            chunk: 512,
            min_recall: 0.9,
        }
    }

    /// A plan that calibrates a small model in minutes on a CPU: one sequence of at most 2048
    /// tokens per training text (three Austen novels) and one held-out sequence (the Jargon
    /// File). The index is still sized for `context` by the caller's config.
    pub fn quick(context: usize) -> Self {
        Self {
            context: context.min(2048),
            held_out_context: context.min(2048),
            train_seqs: 1,
            held_out_seqs: 1,
            ..Self::new(context)
        }
    }
}

/// How [`cached_or_trained_index`] calibrates an index it does not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// [`CalibrationPlan::quick`] with [`quick_params`]: minutes on a CPU for SmolLM2-135M.
    Quick,
    /// [`CalibrationPlan::new`] with [`TrainParams::new`] (the `calibrate` example's defaults).
    Full,
}

/// Training settings of the quick plan: classifier hidden width 64 (its weights are read on
/// every decode step), 256 training queries per sequence, 32 held-out ones, 8 epochs, 8 Lloyd
/// iterations. `config.hidden` must already be the width wanted.
pub fn quick_params(config: &SaapConfig) -> TrainParams {
    let mut params = TrainParams::new(config);
    params.queries_per_seq = 256;
    params.eval_queries_per_seq = 32;
    params.mlp.epochs = 8;
    params.kmeans_iters = 8;
    params
}

/// The first `bytes` bytes of `text` (cut back to a character boundary), if it is longer.
pub fn prefix(text: &str, bytes: usize) -> Option<&str> {
    if text.len() <= bytes {
        return None;
    }
    let mut end = bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(&text[..end])
}

fn token_windows(
    tok: &GgufTokenizer,
    texts: &[Text],
    len: usize,
    per_text: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for &text in texts {
        let content = fetch::read_text(text)?;
        // One window starts at the text's beginning: tokenize a prefix (a token is rarely more
        // than 8 bytes) instead of a whole novel, unless the prefix turns out too short.
        let ids = match prefix(&content, len * 8) {
            Some(head) if per_text == 1 => {
                let ids = tok.encode(head)?;
                if ids.len() > len {
                    ids
                } else {
                    tok.encode(&content)?
                }
            }
            _ => tok.encode(&content)?,
        };
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
    let held_tokens = token_windows(
        tok,
        &plan.held_out_texts,
        plan.held_out_context,
        plan.held_out_seqs,
    )?;
    if train_tokens.is_empty() || held_tokens.is_empty() {
        return Err(Error::Model(format!(
            "calibration texts are shorter than the {}-token context (held out: {})",
            plan.context, plan.held_out_context
        )));
    }
    eprintln!(
        "calibration: recording {} training sequences of {} tokens and {} held-out ones of {} \
         (dense prefill), then training {} layers",
        train_tokens.len(),
        plan.context,
        held_tokens.len(),
        plan.held_out_context,
        model.n_layers()
    );
    let recording = bar("recording (tokens)");
    recording.set_length(
        train_tokens
            .iter()
            .chain(&held_tokens)
            .map(|s| s.len() as u64)
            .sum(),
    );
    let train = record(model, &train_tokens, plan.chunk, Some(&recording))?;
    let held_out = record(model, &held_tokens, plan.chunk, Some(&recording))?;
    recording.finish();
    let started = std::time::Instant::now();
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
                "layer {:>2}: recall {:.3} (nearest centroid {:.3}, oracle {:.3}) reading {:.1}% of indexed keys → {:?}; sparse: {:?} (indexed mass {:.3}, Quest's {:.3}) ({:.0} s)",
                r.layer,
                r.classifier.recall,
                r.nearest_centroid.recall,
                r.classifier.oracle_recall,
                100.0 * r.classifier.indexed_selectivity,
                r.routing,
                r.sparse_routing,
                r.classifier.indexed_recall,
                r.classifier.quest_indexed_recall,
                started.elapsed().as_secs_f64()
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

/// Where [`cached_or_trained_index`] may find an index before calibrating one, and what it
/// checks.
#[derive(Debug, Clone, Default)]
pub struct IndexSources {
    /// sha256 of the model file: recorded in a calibrated index, and required to match before a
    /// shipped or cached index that recorded one is used.
    pub model_sha256: Option<String>,
    /// A folder of pre-calibrated indexes (the repository's `indexes/`), looked up by the same
    /// file name as the cache. A shipped index is used only when it recorded a model sha256 equal
    /// to [`IndexSources::model_sha256`].
    pub shipped: Option<std::path::PathBuf>,
    /// Calibrate even when a cached or shipped index exists (the result replaces the cached one).
    pub recalibrate: bool,
}

/// Why an index loaded from `path` cannot serve `model`, if it cannot: another head layout,
/// RoPE or depth, or another model file (when both sha256 are known; `strict` also refuses an
/// index that recorded none).
fn unfit(index: &SaapIndex, model: &Llama, sha: Option<&str>, strict: bool) -> Option<String> {
    let config = SaapConfig {
        layout: model.config().layout,
        rope: model.config().rope,
        ..index.config().clone()
    };
    if let Err(e) = index.check_model(&config, model.n_layers()) {
        return Some(e.to_string());
    }
    match (sha, index.model_sha256()) {
        (Some(sha), Some(_)) => index.check_model_sha256(sha).err().map(|e| e.to_string()),
        (_, None) if strict => Some("it records no model sha256".into()),
        (None, Some(_)) if strict => Some("the model file's sha256 is unknown".into()),
        _ => None,
    }
}

/// The index `llama_decode` uses when given none, named
/// `<name>-ctx<context>[-quick].safetensors`: loaded from `<cache>/indexes/`, else from the
/// shipped folder (if it fits the model, see [`IndexSources`]), else calibrated with `plan` and
/// the config [`SaapConfig::for_context`] gives (classifier hidden width 64 for the quick plan)
/// and saved into the cache first. A cached file that is rejected (another format version,
/// damaged, or made for another model) is calibrated again and replaced.
///
/// # Errors
/// [`Error::Fetch`] or [`Error::Io`] when the cache folder or the calibration texts cannot be
/// had; [`Error::Model`] when the texts are too short; [`Error::Saap`] from calibration or
/// saving (a cached index that fails to load for another reason than its file, e.g. a device
/// error, too).
pub fn cached_or_trained_index(
    model: &mut Llama,
    tok: &GgufTokenizer,
    name: &str,
    context: usize,
    plan: Plan,
    sources: &IndexSources,
) -> Result<(SaapIndex, std::path::PathBuf)> {
    let dir = fetch::cache_dir()?.join("indexes");
    let suffix = match plan {
        Plan::Quick => "-quick",
        Plan::Full => "",
    };
    let file = format!("{name}-ctx{context}{suffix}.safetensors");
    let path = dir.join(&file);
    let sha = sources.model_sha256.as_deref();
    if !sources.recalibrate {
        if path.exists() {
            match SaapIndex::load(&path, model.device()) {
                Ok(index) => match unfit(&index, model, sha, false) {
                    None => return Ok((index, path)),
                    Some(why) => eprintln!(
                        "{}: {why}; not used (a calibration replaces it)",
                        path.display()
                    ),
                },
                // A cached index of an older format version, or damaged: a calibration
                // replaces it.
                Err(SaapError::IndexFormat(why)) => {
                    eprintln!("index file rejected: {why}; not used (a calibration replaces it)")
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(shipped) = sources.shipped.as_ref().map(|d| d.join(&file)) {
            if shipped.exists() {
                match SaapIndex::load(&shipped, model.device()) {
                    Ok(index) => match unfit(&index, model, sha, true) {
                        None => {
                            eprintln!(
                                "using the pre-calibrated index {} (--recalibrate to make your own)",
                                shipped.display()
                            );
                            return Ok((index, shipped));
                        }
                        Some(why) => eprintln!(
                            "{} does not fit this model ({why}): calibrating one",
                            shipped.display()
                        ),
                    },
                    Err(e) => eprintln!("{e}: calibrating one instead"),
                }
            }
        }
    }
    let layout = model.config().layout;
    let mut config = SaapConfig::for_context(layout, model.config().rope, context)?;
    let (calibration, mut params) = match plan {
        Plan::Quick => {
            config.hidden = 64;
            (CalibrationPlan::quick(context), quick_params(&config))
        }
        Plan::Full => (CalibrationPlan::new(context), TrainParams::new(&config)),
    };
    params.device = model.device().clone();
    eprintln!(
        "{} {name} into {}: {plan:?} plan; C = {}, ℓ = {}, window {}, sinks {}, classifier hidden \
         width {}",
        if sources.recalibrate {
            "calibrating an index for"
        } else {
            "no index yet: calibrating one for"
        },
        path.display(),
        config.n_partitions,
        config.n_probe,
        config.window,
        config.sinks,
        config.hidden
    );
    let (mut index, _) = calibrate_model(model, tok, &config, &params, &calibration, name)?;
    if let Some(sha) = sha {
        index = index.with_model_sha256(sha)?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    index.save(&path)?;
    eprintln!("saved {}", path.display());
    Ok((index, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_cuts_at_a_character_boundary() {
        assert_eq!(prefix("abc", 3), None);
        assert_eq!(prefix("abcdef", 4), Some("abcd"));
        // 'é' is two bytes: a cut inside it moves back before it.
        assert_eq!(prefix("aébc", 2), Some("a"));
        assert_eq!(prefix("aébc", 3), Some("aé"));
    }

    #[test]
    fn windows_spread_over_the_text_and_stop_at_its_length() {
        let tokens: Vec<u32> = (0..100).collect();
        let w = windows(&tokens, 30, 3);
        assert_eq!(w.len(), 3);
        assert_eq!((w[0][0], w[1][0], w[2][0]), (0, 35, 70));
        assert!(w.iter().all(|x| x.len() == 30));
        // Windows do not overlap: 40-token windows fit twice in 100 tokens.
        assert_eq!(windows(&tokens, 40, 3).len(), 2);
        assert!(windows(&tokens, 101, 1).is_empty());
        assert_eq!(windows(&tokens, 60, 5).len(), 1);
    }
}
