//! Trains a Saap index for a model on calibration text (progress bars on stderr) and saves it as
//! safetensors. Training texts: three Austen novels; the per-layer dense decision is taken on the
//! Jargon File; evaluate on other text (`--example evaluate` uses Shakespeare).
//!
//! ```text
//! cargo run --release --example calibrate -- [options]
//!   --model PATH | --qwen   model (default SmolLM2-135M, fetched on demand)
//!   --context N             tokens per calibration sequence; sizes C, ℓ and the window through
//!                           SaapConfig::for_context (default 4096)
//!   --partitions C  --probe L  --window W  --sinks S  --hidden H   override the sized defaults
//!   --seqs K                training sequences per text (default 2)
//!   --epochs E              classifier epochs (default 30)
//!   --queries Q             training queries per sequence (default 1024)
//!   --min-recall R          layers below this held-out recall are served dense (default 0.9)
//!   --out PATH              default <cache>/indexes/<model>-ctx<N>.safetensors
//!   --yarn F                YaRN RoPE scaling by F over the model's context (the index records
//!                           it; decode with the same --yarn)
//!   --cuda                  record, run k-means, compute attention targets and train the
//!                           classifier on GPU 0
//! ```

use candle_core::Device;
use saap::models::calibrate::{calibrate_model, CalibrationPlan};
use saap::models::fetch;
use saap::models::{GgufTokenizer, Llama};
use saap::train::TrainParams;
use saap::SaapConfig;
use std::path::PathBuf;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let mut model_path: Option<PathBuf> = None;
    let (mut qwen, mut cuda) = (false, false);
    let mut context = 4096;
    let mut overrides: Vec<(String, usize)> = Vec::new();
    let (mut seqs, mut epochs, mut min_recall, mut queries) = (2, 30, 0.9, 1024);
    let mut out: Option<PathBuf> = None;
    let mut yarn = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model_path = Some(value()?.into()),
            "--qwen" => qwen = true,
            "--cuda" => cuda = true,
            "--yarn" => yarn = Some(value()?.parse::<f64>()?),
            "--context" => context = value()?.parse()?,
            "--partitions" | "--probe" | "--window" | "--sinks" | "--hidden" => {
                overrides.push((flag.clone(), value()?.parse()?))
            }
            "--seqs" => seqs = value()?.parse()?,
            "--epochs" => epochs = value()?.parse()?,
            "--queries" => queries = value()?.parse()?,
            "--min-recall" => min_recall = value()?.parse()?,
            "--out" => out = Some(value()?.into()),
            "-h" | "--help" => {
                println!("see the header of examples/calibrate.rs for the options");
                return Ok(());
            }
            other => return Err(format!("unknown option {other} (try --help)").into()),
        }
    }
    let device = if cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let path = fetch::model_or_default(model_path.as_deref(), qwen)?;
    let name = path
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let tok = GgufTokenizer::from_gguf(&path)?;
    let mut model = Llama::from_gguf_auto(&path, &device)?;
    if let Some(factor) = yarn {
        model.set_yarn(factor)?;
    }
    let mut config = SaapConfig::for_context(model.config().layout, model.config().rope, context)?;
    for (flag, v) in overrides {
        match flag.as_str() {
            "--partitions" => {
                config.n_partitions = v;
                config.n_probe = config.n_probe.min(v);
            }
            "--probe" => config.n_probe = v,
            "--window" => config.window = v,
            "--sinks" => config.sinks = v,
            _ => config.hidden = v,
        }
    }
    config.validate()?;
    let mut params = TrainParams::new(&config);
    params.mlp.epochs = epochs;
    params.queries_per_seq = queries;
    params.device = device.clone();
    let mut plan = CalibrationPlan::new(context);
    plan.train_seqs = seqs;
    plan.min_recall = min_recall;
    println!(
        "calibrating {name}: C = {}, ℓ = {}, window {}, sinks {}, hidden {}, context {context}",
        config.n_partitions, config.n_probe, config.window, config.sinks, config.hidden
    );
    let (index, reports) = calibrate_model(&mut model, &tok, &config, &params, &plan, &name)?;
    let out = match out {
        Some(p) => p,
        None => fetch::cache_dir()?.join("indexes").join(match yarn {
            Some(f) => format!("{name}-ctx{context}-yarn{f}.safetensors"),
            None => format!("{name}-ctx{context}.safetensors"),
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
    println!(
        "saved {} ({} layers, {dense} served dense)",
        out.display(),
        reports.len()
    );
    Ok(())
}
