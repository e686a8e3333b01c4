//! The main job: a long prompt, one chunked prefill, then greedy decoding twice from the same
//! cache — with Saap and with dense attention — and the two side by side: tokens/s, keys read per
//! step (window and sinks included) and where the continuations first differ.
//!
//! `cargo run --release --example llama_decode -- --help` lists the options. With none it runs
//! SmolLM2-135M (fetched on demand) on 7000 tokens of *Pride and Prejudice*, with the index
//! cached for the model, else the one shipped in `indexes/` (pre-calibrated for this model file),
//! else calibrated on first use (about 4 minutes on our 2-core VM; `--recalibrate` forces it).
//! `--batch N` decodes N prompts together: the text cut at N lengths, each with the question.

use candle_core::{Tensor, D};
use clap::builder::RangedU64ValueParser;
use clap::Parser;
use common::{exit_code, Loaded, ModelArgs, Progress, Res};
use saap::models::calibrate;
use saap::models::fetch::{self, Text};
use saap::models::{GgufTokenizer, Llama};
use saap::{PageLayout, PageScore, ReadStats, Routing, SaapIndex};
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
    /// [default: the index's budget, if it was calibrated with one]
    #[arg(long)]
    keys_budget: Option<f64>,
    /// Serve every layer sparse, also those the index serves dense (routed by the classifier)
    #[arg(long, conflicts_with = "dense")]
    all_sparse: bool,
    /// With --all-sparse: route by Quest the layers where calibration found Quest's pages holding
    /// more of the attention than the classifier at equal keys (recorded in the index); needs a
    /// keys budget. For long contexts: measured better than the classifier alone at 120k, worse
    /// at 32k
    #[arg(long, requires = "all_sparse", conflicts_with = "quest_layers")]
    hybrid: bool,
    /// With --all-sparse: route these layers by Quest (comma-separated, e.g. 0,1,2; `all` for
    /// every layer), the others by the classifier; needs a keys budget
    #[arg(long, requires = "all_sparse", value_delimiter = ',', value_parser = parse_layer)]
    quest_layers: Vec<Layer>,
    /// What Quest's pages keep and rank by: `bound` (Quest's min/max), `mean` (their mean key) or
    /// `shares` (their mean key, ranked by the group's summed estimated shares)
    #[arg(long, value_parser = common::parse_page_score, default_value = "bound")]
    page_score: PageScore,
    /// How Quest's pages cut the indexed keys: `consecutive` (Quest's), `partitions` (pages of 16
    /// within each partition of the index) or `partitions:N` (pages of N keys, 1..=16). On
    /// SmolLM2 at 8k, Quest over partition pages by mean in every layer was measured closer to
    /// dense at fewer keys than the classifier (bench/NOTES.md §57)
    #[arg(long, value_parser = common::parse_page_layout, default_value = "consecutive")]
    page_layout: PageLayout,
    /// Spend the keys budget as one ℓ in every layer (by default layer by layer, from the
    /// index's probe curves where it has them)
    #[arg(long, conflicts_with = "probe")]
    uniform_budget: bool,
    /// The least share of the uniform ℓ a layer keeps when the budget is spent layer by layer
    #[arg(long, default_value_t = saap::budget::DEFAULT_FLOOR, conflicts_with = "uniform_budget")]
    plan_floor: f64,
    /// Estimate the partitions a step does not read from their mean key and value (one row
    /// each, beside the keys read)
    #[arg(long, conflicts_with = "dense")]
    estimate_unread: bool,
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
    /// Tokens to generate (per sequence)
    #[arg(long, default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    tokens: usize,
    /// Decode N prompts together, ragged: the first --context tokens of the text, then the first
    /// (N−1)/N of them, …, 1/N, each followed by the question. Each sequence stops at its end of
    /// text or after --tokens and leaves the batch; tokens/s counts every sequence's tokens
    #[arg(long, default_value_t = 1)]
    batch: usize,
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

/// A layer given to `--quest-layers`.
#[derive(Clone, Copy)]
enum Layer {
    One(usize),
    All,
}

fn parse_layer(value: &str) -> Result<Layer, String> {
    match value {
        "all" => Ok(Layer::All),
        _ => value
            .parse()
            .map(Layer::One)
            .map_err(|_| format!("{value:?} is not a layer number or `all`")),
    }
}

/// One prompt of the batch.
struct Prompt {
    ids: Vec<u32>,
    /// Tokens of the context text it holds.
    context: usize,
}

/// The greedy continuations of the batch and what they cost.
struct Run {
    label: &'static str,
    /// Per prompt, the tokens generated.
    tokens: Vec<Vec<u32>>,
    /// Per prompt, whether it stopped at an end-of-text token (else at --tokens).
    ended: Vec<bool>,
    /// Seconds of the decode steps after the first (the first one also copies the restored
    /// caches), their number, and the tokens they decoded (one per sequence still running).
    steady_s: f64,
    steady_steps: usize,
    steady_tokens: usize,
    reads: ReadStats,
}

impl Run {
    fn tokens_per_s(&self) -> f64 {
        self.steady_tokens as f64 / self.steady_s.max(1e-9)
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
    if args.batch == 0 {
        return Err("--batch 0: decode at least one prompt (the default is --batch 1)".into());
    }
    if let Some(context) = args.calib_context {
        if context < 1024 {
            return Err(format!(
                "--calib-context {context}: calibration needs sequences of at least 1024 tokens \
                 (sinks + window + C keys before its first query)"
            )
            .into());
        }
    }
    saap::budget::check_floor(args.plan_floor)?;
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
    let (prompts, described) = prompts(&args, &tok)?;
    // The first prompt holds the most context.
    let longest = prompts[0].ids.len();
    let needed = longest + args.tokens;
    if needed > trained_for && !args.beyond_context {
        return Err(format!(
            "{longest} prompt tokens + {} to generate = {needed} exceed the {trained_for} tokens \
             {name} was trained for; pass a smaller --context (at most about {}) or --beyond-context",
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
            // --probe fixes ℓ; otherwise a budget given here, else the index's own, if any.
            let budget = match args.probe {
                Some(_) => None,
                None => args.keys_budget.or(c.keys_budget),
            };
            let quest_layers: Vec<usize> =
                match args.quest_layers.iter().any(|l| matches!(l, Layer::All)) {
                    true => (0..model.n_layers()).collect(),
                    false => args
                        .quest_layers
                        .iter()
                        .filter_map(|l| match l {
                            Layer::One(i) => Some(*i),
                            Layer::All => None,
                        })
                        .collect(),
                };
            common::check_layers("--quest-layers", &quest_layers, model.n_layers())?;
            if (args.hybrid || !quest_layers.is_empty()) && budget.is_none() {
                return Err(
                    "--hybrid and --quest-layers need a keys budget (--keys-budget): Quest reads \
                     pages to fit it"
                        .into(),
                );
            }
            if args.all_sparse {
                model.serve_all_sparse(args.hybrid)?;
            }
            model.set_page_score(args.page_score)?;
            model.set_page_layout(args.page_layout)?;
            for &layer in &quest_layers {
                model.set_routing(layer, Routing::Quest)?;
            }
            model.set_keys_budget(budget)?;
            model.set_budget_by_layer(!args.uniform_budget)?;
            model.set_plan_floor(args.plan_floor)?;
            model.set_estimate_unread(args.estimate_unread);
            let count =
                |routing: Routing| model.routings().iter().filter(|&&r| r == routing).count();
            let (dense_layers, quest) = (count(Routing::Dense), count(Routing::Quest));
            println!(
                "model {name} on the {device_name}; Saap index {}\n  C = {} partitions per KV head, \
                 ℓ = {probe} probed per query head, window {}, sinks {}, {dense_layers} of {} layers dense",
                index_path.display(),
                c.n_partitions,
                c.window,
                c.sinks,
                index.n_layers()
            );
            if let Some(budget) = budget {
                let curves = index.probe_curves().iter().any(Option::is_some);
                let how = match (curves, args.uniform_budget) {
                    (true, false) => format!(
                        "ℓ chosen at every step to fit it, layer by layer from the index's \
                         probe curves (each layer at least {} of that ℓ)",
                        args.plan_floor
                    ),
                    _ => "ℓ chosen at every step to fit it, the same in every layer".into(),
                };
                println!("  keys budget {budget}: {how}");
            }
            if quest > 0 {
                println!(
                    "  {quest} layers routed by Quest: {}",
                    common::describe_pages(args.page_layout, args.page_score)
                );
            }
            if args.estimate_unread {
                println!("  unread partitions estimated from their mean key and value");
            }
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
    let lens: Vec<String> = prompts.iter().map(|p| p.ids.len().to_string()).collect();
    match lens.as_slice() {
        [one] => println!("prompt: {one} tokens ({described})"),
        _ => println!("prompts: {} tokens ({described})", lens.join(", ")),
    }

    // One prefill of the batch (dense attention; with an index it also builds the partition
    // lists).
    let start = Instant::now();
    let total: usize = prompts.iter().map(|p| p.ids.len()).sum();
    let mut progress = Progress::new("prefill (tokens)", total);
    let chunk = args.chunk.unwrap_or(model.default_prefill_chunk());
    let prompt_ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let logits =
        model.prefill_batch_with_progress(&prompt_ids, chunk, &mut |done| progress.set(done))?;
    // CUDA queues work: sync so the prefill's tail is not billed to the decode.
    device.synchronize()?;
    let prefill_s = start.elapsed().as_secs_f64();
    println!(
        "prefill: {total} tokens in {prefill_s:.1} s ({:.0} tokens/s)",
        total as f64 / prefill_s
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
    summary(&runs, &prompts, &args);
    Ok(())
}

/// The batch's prompts, the first holding the most context, and a description of them.
fn prompts(args: &Args, tok: &GgufTokenizer) -> Res<(Vec<Prompt>, String)> {
    let bos: Vec<u32> = if tok.add_bos() {
        tok.bos().into_iter().collect()
    } else {
        Vec::new()
    };
    let (text_ids, source) = if args.context > 0 {
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
        (text_ids, source)
    } else {
        (Vec::new(), String::new())
    };
    let question = args.prompt.clone().unwrap_or_else(|| {
        if args.context > 0 {
            "Who are the characters of this story so far? Answer briefly.".into()
        } else {
            "Explain in three sentences why sparse attention speeds up long-context decoding."
                .into()
        }
    });
    let n = args.batch;
    // Prompt i holds (n - i)/n of the context: the story cut at n points.
    let contexts: Vec<usize> = (0..n).map(|i| args.context * (n - i) / n).collect();
    let prompts = contexts
        .iter()
        .map(|&context| {
            let context_text = if context > 0 {
                tok.decode(&text_ids[..context])? + "\n\n"
            } else {
                String::new()
            };
            let user = format!("{context_text}{question}");
            let text = if args.raw {
                user
            } else {
                format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
            };
            let mut ids = bos.clone();
            ids.extend(tok.encode(&text)?);
            Ok(Prompt { ids, context })
        })
        .collect::<Res<Vec<_>>>()?;
    let described = match (args.context, n) {
        (0, 1) => "a question".to_string(),
        (0, _) => format!("the same question {n} times"),
        (_, 1) => format!(
            "the first {} tokens of {source}, then a question",
            args.context
        ),
        _ => {
            let cuts: Vec<String> = contexts.iter().map(usize::to_string).collect();
            format!(
                "the first {} tokens of {source}, each then the question",
                cuts.join(", ")
            )
        }
    };
    Ok((prompts, described))
}

/// Greedy decoding of the batch from the model's current cache, the first tokens taken from
/// `logits` (`[B, vocab]`). A sequence stops at a token of `stops` or after `--tokens`, and
/// leaves the batch (`Llama::retain`). One sequence's text is printed as it comes, a batch's
/// answers at the end.
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
    let batch = logits.dim(0)?;
    let mut logits = logits.clone();
    let mut run = Run {
        label,
        tokens: vec![Vec::new(); batch],
        ended: vec![false; batch],
        steady_s: 0.0,
        steady_steps: 0,
        steady_tokens: 0,
        reads: ReadStats::default(),
    };
    // The prompt each row of the batch decodes; rows leave as their sequences finish.
    let mut rows: Vec<usize> = (0..batch).collect();
    let mut printed = 0;
    let mut steps = 0usize;
    loop {
        let mut next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let mut keep = vec![true; rows.len()];
        for ((&item, &id), keep) in rows.iter().zip(&next).zip(&mut keep) {
            if stops.contains(&id) {
                run.ended[item] = true;
                *keep = false;
                continue;
            }
            run.tokens[item].push(id);
            // At the limit: its logits would not be used.
            *keep = run.tokens[item].len() < args.tokens;
        }
        if batch == 1 && !run.tokens[0].is_empty() {
            let text = tok.decode(&run.tokens[0])?;
            // Print whole characters only: a token may end inside a multi-byte one.
            if !text.ends_with('\u{fffd}') {
                print!("{}", &text[printed..]);
                std::io::stdout().flush()?;
                printed = text.len();
            }
        }
        if !keep.contains(&true) {
            break;
        }
        let start = Instant::now();
        if keep.contains(&false) {
            model.retain(&keep)?;
        }
        (rows, next) = (kept(&rows, &keep), kept(&next, &keep));
        let t = Tensor::new(next.as_slice(), &device)?.unsqueeze(1)?;
        logits = model.forward(&t, &vec![1; rows.len()])?.squeeze(1)?;
        device.synchronize()?;
        if steps > 0 {
            run.steady_s += start.elapsed().as_secs_f64();
            run.steady_tokens += rows.len();
        }
        steps += 1;
        model
            .read_stats()
            .iter()
            .flatten()
            .for_each(|s| run.reads.add(s));
    }
    run.steady_steps = steps.saturating_sub(1);
    if batch == 1 {
        println!();
    } else {
        for (i, (tokens, &ended)) in run.tokens.iter().zip(&run.ended).enumerate() {
            let stop = if ended { "end of text" } else { "--tokens" };
            println!(
                "[{}] {} tokens, stopped at {stop}: {}",
                i + 1,
                tokens.len(),
                tok.decode(tokens)?.trim()
            );
        }
    }
    Ok(run)
}

/// The entries of `xs` whose `keep` flag is set.
fn kept<T: Copy>(xs: &[T], keep: &[bool]) -> Vec<T> {
    xs.iter()
        .zip(keep)
        .filter(|(_, &k)| k)
        .map(|(&x, _)| x)
        .collect()
}

/// How far two greedy continuations agree.
fn agreement(a: &[u32], b: &[u32]) -> String {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    if common == a.len() && common == b.len() {
        format!("identical ({common} tokens)")
    } else {
        format!(
            "identical for the first {common} tokens; first divergent token: #{} (1-based)",
            common + 1
        )
    }
}

/// The table at the end: tokens/s, keys read, agreement.
fn summary(runs: &[Run], prompts: &[Prompt], args: &Args) {
    println!();
    if prompts.len() > 1 {
        let contexts: Vec<String> = prompts.iter().map(|p| p.context.to_string()).collect();
        println!(
            "batch of {} prompts ([1]..[{}] hold {} tokens of context); tokens/s counts every \
             sequence's tokens, and a sequence leaves the batch when it stops",
            prompts.len(),
            prompts.len(),
            contexts.join(", ")
        );
    }
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
        if args.estimate_unread {
            println!(
                "{:<34}{}",
                "  + partition means read",
                col(&|r| format!(
                    "{:.1}%",
                    100.0 * r.reads.partitions_estimated as f64
                        / r.reads.keys_in_context.max(1) as f64
                ))
            );
        }
    }
    println!(
        "{:<34}{}",
        "tokens generated",
        col(&|r| r.tokens.iter().map(Vec::len).sum::<usize>().to_string())
    );
    if let [saap, dense] = runs {
        if saap.steady_steps > 0 && dense.steady_steps > 0 {
            println!(
                "Saap decodes {:.2}× as fast as dense ({} timed steps each, the first step left out)",
                saap.tokens_per_s() / dense.tokens_per_s(),
                saap.steady_steps.min(dense.steady_steps)
            );
        }
        match (saap.tokens.as_slice(), dense.tokens.as_slice()) {
            ([s], [d]) => println!("greedy continuations: {}", agreement(s, d)),
            _ => {
                for (i, (s, d)) in saap.tokens.iter().zip(&dense.tokens).enumerate() {
                    println!("greedy continuations of [{}]: {}", i + 1, agreement(s, d));
                }
            }
        }
    }
    if args.fast {
        println!("keys read: not tracked (--fast)");
    }
}
