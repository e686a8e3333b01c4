//! Trains a Saap index for a model on calibration text (progress bars on stderr) and saves it as
//! safetensors. Training texts: three Austen novels; the per-layer dense decision is taken on the
//! Jargon File; evaluate on other text (`--example evaluate` uses Shakespeare).
//!
//! `cargo run --release --example calibrate -- --help` lists the options. C, ℓ and the window are
//! sized from `--context` by `SaapConfig::for_context` unless overridden.

use clap::Parser;
use common::{exit_code, Loaded, ModelArgs, Res};
use saap::models::calibrate::{calibrate_model, quick_params, CalibrationPlan};
use saap::models::fetch;
use saap::train::{KeyDims, TrainParams};
use saap::SaapConfig;
use std::path::PathBuf;

mod common;

#[derive(Parser)]
#[command(about = "Trains a Saap index for a model and saves it as safetensors")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens per calibration sequence; sizes C, ℓ and the window through SaapConfig::for_context.
    /// Train near the length you decode at: for Qwen2.5 at 120k (YaRN ×4), one 64k sequence per
    /// text beat two of 32k on the same tokens (bench/NOTES.md §33)
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Override C (partitions per KV head)
    #[arg(long)]
    partitions: Option<usize>,
    /// Override ℓ (partitions probed per query head)
    #[arg(long)]
    probe: Option<usize>,
    /// Override the recent window
    #[arg(long)]
    window: Option<usize>,
    /// Override the attention sinks
    #[arg(long)]
    sinks: Option<usize>,
    /// Override the classifier's hidden width
    #[arg(long)]
    hidden: Option<usize>,
    /// Default keys budget saved in the index (share of the context read per decode step,
    /// window and sinks included): ops built from it choose ℓ per step to fit it
    #[arg(long)]
    keys_budget: Option<f64>,
    /// Key dimensions k-means clusters on: `all`, `slowest:<share>` (the share of rotary pairs
    /// that rotate slowest) or `turns:<t>` (the pairs turning less than t times over --context
    /// tokens); centroids are zero in the other dimensions; or `queries:<share>` (that share of
    /// the head dimension as the top directions of the rotation-averaged query second moment)
    #[arg(long, default_value = "all")]
    key_dims: String,
    /// k-means weighs each key by (its attention mass from the training queries / the mean)^P:
    /// centroids gather where attention goes
    #[arg(long, value_name = "P")]
    attention_weight: Option<f64>,
    /// Training sequences per text
    #[arg(long, default_value_t = 2)]
    seqs: usize,
    /// Classifier epochs
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Training queries per sequence
    #[arg(long, default_value_t = 1024)]
    queries: usize,
    /// Layers below this held-out recall are served dense
    #[arg(long, default_value_t = 0.9)]
    min_recall: f64,
    /// Tokens per held-out sequence, where the dense layers are chosen and each layer's probe
    /// curve (what every ℓ reads and finds, used to spend keys budgets layer by layer) is
    /// measured: the length the index will decode at [default: --context]
    #[arg(long)]
    held_out_context: Option<usize>,
    /// The quick plan `llama_decode` uses on first run: one sequence of at most 2048 tokens per
    /// text, hidden width 64 unless --hidden, fewer queries, epochs and Lloyd iterations (minutes
    /// on a CPU for SmolLM2); --seqs, --epochs and --queries are then ignored
    #[arg(long)]
    quick: bool,
    /// Output path; default <cache>/indexes/<model>-ctx<N>[-quick].safetensors (where
    /// llama_decode looks for it)
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    common::fix_thread_count();
    exit_code(run())
}

fn run() -> Res<()> {
    let Args {
        model: model_args,
        context,
        partitions,
        probe,
        window,
        sinks,
        hidden,
        keys_budget,
        key_dims,
        attention_weight,
        seqs,
        epochs,
        queries,
        min_recall,
        held_out_context,
        quick,
        out,
    } = Args::parse();
    if context < 1024 {
        return Err(format!(
            "--context {context}: calibration needs sequences of at least 1024 tokens \
             (sinks + window + C keys before its first query)"
        )
        .into());
    }
    // Checked before the model loads.
    if let Some(len) = held_out_context.filter(|&len| len < context) {
        return Err(format!(
            "--held-out-context {len}: at least --context ({context}), where the queries sit"
        )
        .into());
    }
    let dims = KeyDims::parse(&key_dims, context)?;
    if let Some(p) = attention_weight.filter(|p| !(p.is_finite() && *p > 0.0)) {
        return Err(format!("--attention-weight {p}: must be finite and > 0").into());
    }
    // With --cuda, k-means, the attention targets and the classifier's training run on the GPU.
    let Loaded {
        device,
        name,
        path: model_path,
        tok,
        mut model,
    } = model_args.load()?;
    let mut config = SaapConfig::for_context(model.config().layout, model.config().rope, context)?;
    if let Some(c) = partitions {
        config.n_partitions = c;
        config.n_probe = config.n_probe.min(c);
    }
    config.n_probe = probe.unwrap_or(config.n_probe);
    config.window = window.unwrap_or(config.window);
    config.sinks = sinks.unwrap_or(config.sinks);
    config.hidden = hidden.unwrap_or(if quick { 64 } else { config.hidden });
    config.keys_budget = keys_budget;
    config.validate()?;
    let (mut plan, mut params) = if quick {
        (CalibrationPlan::quick(context), quick_params(&config))
    } else {
        let mut params = TrainParams::new(&config);
        params.mlp.epochs = epochs;
        params.queries_per_seq = queries;
        let mut plan = CalibrationPlan::new(context);
        plan.train_seqs = seqs;
        (plan, params)
    };
    params.device = device.clone();
    params.key_dims = dims;
    params.attention_weight = attention_weight;
    let kept = params.key_dims.rank(&config)?;
    plan.min_recall = min_recall;
    plan.held_out_context = held_out_context.unwrap_or(plan.held_out_context);
    println!(
        "calibrating {name}: C = {}, ℓ = {}, window {}, sinks {}, hidden {}, context {context}, \
         k-means on {} of {} key dimensions ({key_dims}), attention weight {attention_weight:?}",
        config.n_partitions,
        config.n_probe,
        config.window,
        config.sinks,
        config.hidden,
        kept,
        config.layout.head_dim
    );
    let (index, reports) = calibrate_model(&mut model, &tok, &config, &params, &plan, &name)?;
    // Recorded so that tools can refuse the index for another model of the same shape.
    let index = index.with_model_sha256(fetch::sha256_file(&model_path)?)?;
    let suffix = if quick { "-quick" } else { "" };
    let out = match out {
        Some(p) => p,
        None => fetch::cache_dir()?
            .join("indexes")
            .join(match model_args.yarn {
                Some(f) => format!("{name}-ctx{context}-yarn{f}{suffix}.safetensors"),
                None => format!("{name}-ctx{context}{suffix}.safetensors"),
            }),
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    index.save(&out)?;
    let dense = reports
        .iter()
        .filter(|r| r.routing == saap::Routing::Dense)
        .count();
    let quest = reports
        .iter()
        .filter(|r| r.sparse_routing == saap::Routing::Quest)
        .count();
    println!(
        "saved {} ({} layers, {dense} served dense; served sparse with --hybrid, {quest} routed by Quest)",
        out.display(),
        reports.len()
    );
    Ok(())
}
