//! Batched decode throughput, dense vs Saap, in one process: for each batch size, ragged prompts
//! of held-out text (Shakespeare; item i starts elsewhere in the text and is a little shorter
//! than item i − 1) are prefilled as one batch with the index attached; then the same caches are
//! decoded greedily — dense (the index dropped: the op's dense kernel over all keys, no index
//! upkeep) and with Saap's routing, each step by step (eager) and as one CUDA graph per step
//! (`saap::graph::DecodeGraph`) — and the tool prints time to first token, tokens/s of each,
//! keys read (window and sinks included) and how far the greedy continuations agree.
//!
//! `cargo run --release --features cuda --example throughput -- --qwen --cuda --index I
//!  --context 32000 --batch 1,8`. `--all-sparse` routes every layer through the classifier
//! (ignoring the index's dense layers); `--graph on|off|both` picks the step modes.

mod common;

use candle_core::{Tensor, D};
use clap::Parser;
use common::{exit_code, ModelArgs, Res};
use saap::graph::DecodeGraph;
use saap::models::fetch::{self, Text};
use saap::models::Llama;
use saap::{ReadStats, Routing, SaapIndex};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Batched decode throughput: dense vs Saap on the same prefilled caches")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Saap index of this model (from `calibrate`)
    #[arg(long)]
    index: std::path::PathBuf,
    /// Prompt tokens of the longest item
    #[arg(long, default_value_t = 32000)]
    context: usize,
    /// Batch sizes to run, comma-separated
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Tokens decoded per item and mode
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Route every layer through the classifier, ignoring the index's dense layers
    #[arg(long)]
    all_sparse: bool,
    /// Prefill chunk [default: the model's, 8192 on CUDA]
    #[arg(long)]
    chunk: Option<usize>,
    /// Decode steps as CUDA graphs (on), step by step (off), or both, each timed
    #[arg(long, value_enum, default_value = "both")]
    graph: GraphMode,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GraphMode {
    On,
    Off,
    Both,
}

impl GraphMode {
    /// The modes to time: `false` step by step, `true` graphs.
    fn runs(self) -> Vec<bool> {
        match self {
            GraphMode::On => vec![true],
            GraphMode::Off => vec![false],
            GraphMode::Both => vec![false, true],
        }
    }
}

fn main() -> std::process::ExitCode {
    common::fix_thread_count();
    exit_code(run(Args::parse()))
}

fn run(args: Args) -> Res<()> {
    let common::Loaded {
        device,
        name,
        tok: tokenizer,
        mut model,
    } = args.model.load()?;
    let index = SaapIndex::load(&args.index, &device)?;
    model.attach_index(Some(&index))?;
    let text = tokenizer.encode(&fetch::read_text(Text::Shakespeare)?)?;
    let longest_batch = args.batch.iter().max().copied().unwrap_or(1);
    let stride = 4099;
    if args.context == 0 || text.len() < args.context + stride * longest_batch {
        return Err(format!(
            "--context {} with batch {longest_batch} needs {} tokens of text; Shakespeare has {}",
            args.context,
            args.context + stride * longest_batch,
            text.len()
        )
        .into());
    }
    let chunk = args.chunk.unwrap_or(model.default_prefill_chunk());
    println!(
        "# {name} on {:?}: context {} (ragged), {} tokens per item and mode, all sparse: {}",
        device.location(),
        args.context,
        args.tokens,
        args.all_sparse
    );
    println!("batch | graph | prefill = time to first token (s) | dense tok/s | Saap tok/s | speedup | keys read | greedy agreement");
    for &batch in &args.batch {
        // Item i: ~1.5% shorter than item i − 1, from its own place in the text.
        let prompts: Vec<&[u32]> = (0..batch)
            .map(|i| {
                let len = args.context - i * args.context / 64;
                &text[i * stride..i * stride + len]
            })
            .collect();
        model.attach_index(Some(&index))?;
        if args.all_sparse {
            (0..model.n_layers()).try_for_each(|l| model.set_routing(l, Routing::Classifier))?;
        }
        let start = Instant::now();
        let first = model
            .prefill_batch(&prompts, chunk)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?;
        device.synchronize()?;
        let prefill_s = start.elapsed().as_secs_f64();
        let snapshot = model.snapshot_attention()?;
        // Keys read: a few tracked steps (tracking syncs every layer, so they are not timed).
        let reads = keys_read(&mut model, &first, 8)?;
        for graph in args.graph.runs() {
            // Dense: the same caches without the index (no per-step assignment or merges).
            model.restore_attention(&snapshot)?;
            for layer in 0..model.n_layers() {
                model.attention_mut(layer)?.drop_index();
            }
            let dense = decode(&mut model, &first, args.tokens, graph)?;
            model.restore_attention(&snapshot)?;
            let saap = decode(&mut model, &first, args.tokens, graph)?;
            let steps = (batch * args.tokens) as f64;
            let agree: Vec<usize> = dense
                .tokens
                .iter()
                .zip(&saap.tokens)
                .map(|(d, s)| d.iter().zip(s).take_while(|(a, b)| a == b).count())
                .collect();
            let identical = agree.iter().filter(|&&n| n == args.tokens).count();
            let mean_agree = agree.iter().sum::<usize>() as f64 / batch as f64;
            let mode = if graph { "on" } else { "off" };
            println!(
                "{batch} | {mode} | {prefill_s:.2} | {:.1} | {:.1} | {:.2}× | {:.1}% | {identical}/{batch} identical, {mean_agree:.1} of {} tokens before the first divergence (launches: dense {}, Saap {})",
                steps / dense.seconds,
                steps / saap.seconds,
                dense.seconds / saap.seconds,
                100.0 * reads.selectivity(),
                args.tokens,
                dense.launches,
                saap.launches,
            );
            println!(
                "JSON {{\"kind\":\"throughput\",\"model\":\"{name}\",\"context\":{},\"batch\":{batch},\"graph\":{graph},\"all_sparse\":{},\"prefill_s\":{prefill_s:.3},\"dense_tok_s\":{:.2},\"saap_tok_s\":{:.2},\"keys_read\":{:.4},\"mean_agree\":{mean_agree:.2},\"tokens\":{}}}",
                args.context,
                args.all_sparse,
                steps / dense.seconds,
                steps / saap.seconds,
                reads.selectivity(),
                args.tokens
            );
        }
    }
    Ok(())
}

/// A timed greedy decode.
struct Decoded {
    /// Per item, the tokens produced.
    tokens: Vec<Vec<u32>>,
    seconds: f64,
    /// How the steps ran: eager steps, recordings, graph launches.
    launches: String,
}

/// Greedy decode of `steps` tokens per item from `first` through a [`DecodeGraph`] (graphs on
/// or off), read statistics and the ops' finite checks off (each would sync the host every
/// layer; the graph checks the logits of every step instead).
fn decode(model: &mut Llama, first: &[u32], steps: usize, graph: bool) -> Res<Decoded> {
    for layer in 0..model.n_layers() {
        let op = model.attention_mut(layer)?;
        op.set_track_reads(false);
        op.set_check_finite(false);
    }
    let device = model.device().clone();
    let mut stepper = DecodeGraph::new(&device, first.len(), 256)?;
    if !graph {
        stepper.disable();
    }
    let mut next = first.to_vec();
    let mut tokens = vec![Vec::with_capacity(steps); first.len()];
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        let logits = stepper.step(model, &next)?;
        next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (item, &token) in tokens.iter_mut().zip(&next) {
            item.push(token);
        }
    }
    device.synchronize()?;
    let stats = stepper.stats();
    Ok(Decoded {
        tokens,
        seconds: start.elapsed().as_secs_f64(),
        launches: format!(
            "{} eager, {} recorded, {} replayed",
            stats.eager, stats.recordings, stats.replays
        ),
    })
}

/// Keys read over `steps` greedy steps from `first`, window and sinks included.
fn keys_read(model: &mut Llama, first: &[u32], steps: usize) -> Res<ReadStats> {
    for layer in 0..model.n_layers() {
        model.attention_mut(layer)?.set_track_reads(true);
    }
    let device = model.device().clone();
    let batch = first.len();
    let mut next = Tensor::from_vec(first.to_vec(), (batch, 1), &device)?;
    let mut reads = ReadStats::default();
    for _ in 0..steps {
        next = model.forward(&next, &vec![1; batch])?.argmax(D::Minus1)?;
        model
            .read_stats()
            .iter()
            .flatten()
            .for_each(|s| reads.add(s));
    }
    Ok(reads)
}
