//! The main job: a long prompt, one chunked prefill, then greedy decoding twice from the same
//! cache — with Saap and with dense attention — and the two side by side: tokens/s, keys read per
//! step (window and sinks included) and where the continuations first differ.
//!
//! `cargo run --release --example llama_decode -- --help` lists the options. With none it runs
//! SmolLM2-135M (fetched on demand) on 7000 tokens of *Pride and Prejudice*, with the index
//! cached for the model, else the one shipped in `indexes/` (pre-calibrated for this model file),
//! else calibrated on first use (about 4 minutes on our 2-core VM; `--recalibrate` forces it).

use candle_core::{Tensor, D};
use clap::builder::RangedU64ValueParser;
use clap::Parser;
use common::{exit_code, Loaded, ModelArgs, Progress, Res};
use saap::models::calibrate;
use saap::models::fetch::{self, Text};
use saap::models::{GgufTokenizer, Llama};
use saap::{ReadStats, Routing, SaapIndex};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

mod common;

#[derive(Parser)]
#[command(
    about = "Long prompt → one prefill → greedy decode with Saap and with dense attention, side by side"
)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained SaapIndex for this model; without it the index cached for the model is used,
    /// else the one shipped in the repository's indexes/ if it was calibrated on this model file,
    /// else one is calibrated (about 4 minutes for SmolLM2 on our 2-core VM)
    #[arg(long)]
    index: Option<PathBuf>,
    /// Calibrate the default index even if one is cached or shipped (replaces the cached one;
    /// progress on stderr)
    #[arg(long, conflicts_with_all = ["index", "dense"])]
    recalibrate: bool,
    /// Decode with dense attention only (every key is read; no index)
    #[arg(long, conflicts_with = "saap")]
    dense: bool,
    /// Decode with Saap only (no dense run to compare with)
    #[arg(long)]
    saap: bool,
    /// Context the default index is sized and calibrated for; default: the model's context
    /// (at most 32768)
    #[arg(long)]
    calib_context: Option<usize>,
    /// Calibrate the default index with the full plan (`--example calibrate`'s defaults: much
    /// longer) instead of the quick one
    #[arg(long)]
    full_calibration: bool,
    /// Partitions read per query head (ℓ), overriding the index's
    #[arg(long, conflicts_with = "keys_budget")]
    probe: Option<usize>,
    /// Keys read per step as a share of the context (window and sinks included), e.g. 0.1: ℓ is
    /// chosen at every step to fit it (layers the index serves dense still read everything)
    #[arg(long)]
    keys_budget: Option<f64>,
    /// Put the first N tokens of the context text before the question (long enough that Saap
    /// reads a small fraction of the keys); 0 for none
    #[arg(long, default_value_t = 7000)]
    context: usize,
    /// Context text (UTF-8 file) instead of Pride and Prejudice
    #[arg(long)]
    text: Option<PathBuf>,
    /// The user message (ChatML template applied unless --raw)
    #[arg(long)]
    prompt: Option<String>,
    /// Feed the prompt as is
    #[arg(long)]
    raw: bool,
    /// Tokens to generate
    #[arg(long, default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    tokens: usize,
    /// Prefill chunk in tokens [default: 512 on the CPU, 8192 on CUDA, where the prefill kernel
    /// needs a few thousand queries per chunk to fill the GPU]
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    chunk: Option<usize>,
    /// No read statistics and no finite checks (each costs a device-to-host copy per layer and
    /// step on a GPU): for timing tokens/s; keys read not reported
    #[arg(long)]
    fast: bool,
    /// Allow a prompt longer than the context the model was trained for
    #[arg(long)]
    beyond_context: bool,
}

/// One greedy continuation and what it cost.
struct Run {
    label: &'static str,
    tokens: Vec<u32>,
    /// Seconds of the decode steps after the first (the first one also copies the restored
    /// caches), and their number.
    steady_s: f64,
    steady_steps: usize,
    reads: ReadStats,
}

impl Run {
    fn tokens_per_s(&self) -> f64 {
        self.steady_steps as f64 / self.steady_s.max(1e-9)
    }
}

fn main() -> ExitCode {
    common::fix_thread_count();
    exit_code(run(Args::parse()))
}

/// Where the repository keeps pre-calibrated indexes.
fn shipped_indexes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("indexes")
}

/// Checks of the options that need no model, so that a mistake is reported in one line before
/// minutes of loading.
fn check_args(args: &Args) -> Res<()> {
    if let Some(context) = args.calib_context {
        if context < 1024 {
            return Err(format!(
                "--calib-context {context}: calibration needs sequences of at least 1024 tokens \
                 (sinks + window + C keys before its first query)"
            )
            .into());
        }
    }
    for (option, path) in [("--index", &args.index), ("--text", &args.text)] {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(format!("{option} {}: no such file", path.display()).into());
            }
        }
    }
    Ok(())
}

fn run(args: Args) -> Res<()> {
    check_args(&args)?;
    let Loaded {
        device,
        name,
        path: model_path,
        tok,
        mut model,
    } = args.model.load()?;
    let trained_for =
        model.config().context_length * args.model.yarn.map_or(1, |f| f.max(1.0).round() as usize);
    let (prompt_ids, described) = prompt(&args, &tok)?;
    let needed = prompt_ids.len() + args.tokens;
    if needed > trained_for && !args.beyond_context {
        return Err(format!(
            "{} prompt tokens + {} to generate = {needed} exceed the {trained_for} tokens {name} was \
             trained for; pass a smaller --context (at most about {}) or --beyond-context",
            prompt_ids.len(),
            args.tokens,
            args.context.saturating_sub(needed - trained_for)
        )
        .into());
    }

    let index = if args.dense {
        None
    } else if let Some(path) = &args.index {
        let index = SaapIndex::load(path, &device)
            .map_err(|e| format!("--index {}: {e}", path.display()))?;
        let sha = fetch::sha256_file(&model_path)?;
        index.check_model_sha256(&sha).map_err(|e| {
            format!(
                "--index {}: {e}; pass the model it was calibrated on (--model), or drop --index \
                 to use or calibrate one for this model",
                path.display()
            )
        })?;
        Some((index, path.clone()))
    } else {
        let context = args
            .calib_context
            .unwrap_or(model.config().context_length.min(32_768));
        let plan = if args.full_calibration {
            calibrate::Plan::Full
        } else {
            calibrate::Plan::Quick
        };
        let sources = calibrate::IndexSources {
            model_sha256: Some(fetch::sha256_file(&model_path)?),
            shipped: Some(shipped_indexes()),
            recalibrate: args.recalibrate,
        };
        Some(
            calibrate::cached_or_trained_index(&mut model, &tok, &name, context, plan, &sources)
                .map_err(|e| {
                    format!(
                        "{e} (calibrating an index reads three Austen novels and the Jargon File, \
                         Debian packages: fetch them once where apt-get exists with \
                         scripts/fetch.sh and copy $SAAP_CACHE here, or pass --index FILE)"
                    )
                })?,
        )
    };
    let device_name = if device.is_cpu() { "CPU" } else { "GPU" };
    match &index {
        Some((index, index_path)) => {
            model
                .attach_index(Some(index))
                .map_err(|e| format!("{}: {e}", index_path.display()))?;
            let c = index.config();
            let probe = args.probe.unwrap_or(c.n_probe);
            for layer in 0..model.n_layers() {
                model.attention_mut(layer)?.set_n_probe(probe)?;
            }
            model.set_keys_budget(args.keys_budget)?;
            let dense_layers = (0..index.n_layers())
                .filter(|&l| index.layer(l).is_ok_and(|x| x.routing == Routing::Dense))
                .count();
            println!(
                "model {name} on the {device_name}; Saap index {}\n  C = {} partitions per KV head, \
                 ℓ = {probe} probed per query head, window {}, sinks {}, {dense_layers} of {} layers dense",
                index_path.display(),
                c.n_partitions,
                c.window,
                c.sinks,
                index.n_layers()
            );
        }
        None => println!("model {name} on the {device_name}; dense attention only (--dense)"),
    }
    if args.fast {
        for layer in 0..model.n_layers() {
            let attention = model.attention_mut(layer)?;
            attention.set_track_reads(false);
            attention.set_check_finite(false);
        }
    }
    println!("prompt: {} tokens ({described})", prompt_ids.len());

    // One prefill (dense attention; with an index it also builds the partition lists).
    let start = Instant::now();
    let mut progress = Progress::new("prefill (tokens)", prompt_ids.len());
    let mut logits = None;
    let mut done = 0;
    let chunk = args.chunk.unwrap_or(model.default_prefill_chunk());
    for chunk in prompt_ids.chunks(chunk) {
        let t = Tensor::new(chunk, &device)?.unsqueeze(0)?;
        logits = Some(model.forward_last(&t, &[chunk.len()])?);
        done += chunk.len();
        progress.set(done);
    }
    let logits = logits.ok_or("empty prompt")?;
    // CUDA queues work: sync so the prefill's tail is not billed to the decode.
    device.synchronize()?;
    let prefill_s = start.elapsed().as_secs_f64();
    println!(
        "prefill: {} tokens in {prefill_s:.1} s ({:.0} tokens/s)",
        prompt_ids.len(),
        prompt_ids.len() as f64 / prefill_s
    );

    let stops: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tok.token_id(t))
        .chain(tok.eos())
        .collect();
    let compare = index.is_some() && !args.saap;
    let mut runs = Vec::new();
    if index.is_some() {
        // Decode from a copy so that the dense run starts from the same cache.
        let after_prefill = compare.then(|| model.snapshot_attention()).transpose()?;
        runs.push(decode(&mut model, &tok, &logits, &stops, &args, "Saap")?);
        if let Some(ops) = after_prefill {
            model.replace_attention(ops)?;
            for layer in 0..model.n_layers() {
                model.set_routing(layer, Routing::Dense)?;
            }
            runs.push(decode(&mut model, &tok, &logits, &stops, &args, "dense")?);
        }
    } else {
        runs.push(decode(&mut model, &tok, &logits, &stops, &args, "dense")?);
    }
    summary(&runs, &args);
    Ok(())
}

/// The prompt's token ids and a description of them.
fn prompt(args: &Args, tok: &GgufTokenizer) -> Res<(Vec<u32>, String)> {
    let mut ids = Vec::new();
    if tok.add_bos() {
        ids.extend(tok.bos());
    }
    let (context, described) = if args.context > 0 {
        let (text, source) = match &args.text {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--text {}: {e}", path.display()))?,
                path.display().to_string(),
            ),
            None => (
                fetch::read_text(Text::PrideAndPrejudice).map_err(|e| {
                    format!("{e} (the context text is Pride and Prejudice; pass --text FILE to use another)")
                })?,
                "Pride and Prejudice".to_string(),
            ),
        };
        // Tokenize a prefix (a token is rarely more than 8 bytes), not the whole book.
        let text_ids = match calibrate::prefix(&text, 8 * args.context) {
            Some(head) => match tok.encode(head)? {
                ids if ids.len() > args.context => ids,
                _ => tok.encode(&text)?,
            },
            None => tok.encode(&text)?,
        };
        if text_ids.len() < args.context {
            return Err(format!(
                "--context {}: {source} has only {} tokens; pass --context {} or less, or a longer --text",
                args.context,
                text_ids.len(),
                text_ids.len()
            )
            .into());
        }
        (
            tok.decode(&text_ids[..args.context])? + "\n\n",
            format!(
                "the first {} tokens of {source}, then a question",
                args.context
            ),
        )
    } else {
        (String::new(), "a question".to_string())
    };
    let question = args.prompt.clone().unwrap_or_else(|| {
        if args.context > 0 {
            "Who are the characters of this story so far? Answer briefly.".into()
        } else {
            "Explain in three sentences why sparse attention speeds up long-context decoding."
                .into()
        }
    });
    let user = format!("{context}{question}");
    let text = if args.raw {
        user
    } else {
        format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    };
    ids.extend(tok.encode(&text)?);
    Ok((ids, described))
}

/// Greedy decoding from the model's current cache, the first token taken from `logits`; prints
/// the text as it comes.
fn decode(
    model: &mut Llama,
    tok: &GgufTokenizer,
    logits: &Tensor,
    stops: &[u32],
    args: &Args,
    label: &'static str,
) -> Res<Run> {
    let device = model.device().clone();
    println!("\n── {label} ──");
    let mut logits = logits.clone();
    let mut tokens: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut reads = ReadStats::default();
    let (mut steps, mut steady_s) = (0usize, 0.0);
    for _ in 0..args.tokens {
        let next = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
        if stops.contains(&next) {
            break;
        }
        tokens.push(next);
        let text = tok.decode(&tokens)?;
        // Print whole characters only: a token may end inside a multi-byte one.
        if !text.ends_with('\u{fffd}') {
            print!("{}", &text[printed..]);
            std::io::stdout().flush()?;
            printed = text.len();
        }
        if tokens.len() == args.tokens {
            break; // its logits would not be used
        }
        let start = Instant::now();
        let t = Tensor::new(&[[next]], &device)?;
        logits = model.forward(&t, &[1])?.squeeze(1)?;
        device.synchronize()?;
        if steps > 0 {
            steady_s += start.elapsed().as_secs_f64();
        }
        steps += 1;
        model
            .read_stats()
            .iter()
            .flatten()
            .for_each(|s| reads.add(s));
    }
    println!();
    Ok(Run {
        label,
        tokens,
        steady_s,
        steady_steps: steps.saturating_sub(1),
        reads,
    })
}

/// The table at the end: tokens/s, keys read, agreement.
fn summary(runs: &[Run], args: &Args) {
    println!();
    let col = |f: &dyn Fn(&Run) -> String| -> String {
        runs.iter().map(|r| format!("{:>16}", f(r))).collect()
    };
    println!("{:<34}{}", "", col(&|r| r.label.to_string()));
    println!(
        "{:<34}{}",
        "decode tokens/s",
        col(&|r| if r.steady_steps == 0 {
            "-".into()
        } else {
            format!("{:.1}", r.tokens_per_s())
        })
    );
    if !args.fast {
        println!(
            "{:<34}{}",
            "keys read per step (all layers)",
            col(&|r| format!("{:.1}%", 100.0 * r.reads.selectivity()))
        );
        println!(
            "{:<34}{}",
            "  of which window + sinks",
            col(&|r| format!(
                "{:.1}%",
                100.0 * r.reads.window_and_sinks as f64 / r.reads.keys_in_context.max(1) as f64
            ))
        );
    }
    println!(
        "{:<34}{}",
        "tokens generated",
        col(&|r| r.tokens.len().to_string())
    );
    if let [saap, dense] = runs {
        if saap.steady_steps > 0 && dense.steady_steps > 0 {
            println!(
                "Saap decodes {:.2}× as fast as dense ({} timed steps each, the first step left out)",
                saap.tokens_per_s() / dense.tokens_per_s(),
                saap.steady_steps.min(dense.steady_steps)
            );
        }
        let common = saap
            .tokens
            .iter()
            .zip(&dense.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        if common == saap.tokens.len() && common == dense.tokens.len() {
            println!("greedy continuations: identical ({common} tokens)");
        } else {
            println!(
                "greedy continuations: identical for the first {common} tokens; first divergent \
                 token: #{} (1-based)",
                common + 1
            );
        }
    }
    if args.fast {
        println!("keys read: not tracked (--fast)");
    }
}
