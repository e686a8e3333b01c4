//! Batched decode throughput, dense vs Saap, in one process: for each batch size, ragged prompts
//! of held-out text (Shakespeare; item i starts elsewhere in the text and is a little shorter
//! than item i − 1) are prefilled as one batch with the index attached; then the same caches are
//! decoded greedily twice — dense (the index dropped: the op's dense kernel over all keys, no
//! index upkeep), then with Saap's routing — and the tool prints time to first token, tokens/s of both, keys read (window
//! and sinks included) and how far the greedy continuations agree.
//!
//! `cargo run --release --features cuda --example throughput -- --qwen --cuda --index I
//!  --context 32000 --batch 1,8`. `--all-sparse` routes every layer through the classifier
//! (ignoring the index's dense layers).

mod common;

use candle_core::{Tensor, D};
use clap::Parser;
use common::{exit_code, ModelArgs, Res};
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
        path: _,
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
    println!("batch | prefill = time to first token (s) | dense tok/s | Saap tok/s | speedup | keys read | greedy agreement");
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
        let first = prefill_batch(&mut model, &prompts, chunk)?;
        device.synchronize()?;
        let prefill_s = start.elapsed().as_secs_f64();
        let snapshot = model.snapshot_attention()?;

        // Dense: the same caches without the index (no per-step assignment or merges).
        for layer in 0..model.n_layers() {
            model.attention_mut(layer)?.drop_index();
        }
        let (dense_tokens, dense_s) = decode(&mut model, &first, args.tokens)?;
        model.restore_attention(&snapshot)?;
        let (saap_tokens, saap_s) = decode(&mut model, &first, args.tokens)?;
        // Keys read: a few tracked steps on the same caches (tracking syncs, so not timed).
        model.restore_attention(&snapshot)?;
        let reads = keys_read(&mut model, &first, 8)?;

        let steps = (batch * args.tokens) as f64;
        let agree: Vec<usize> = dense_tokens
            .iter()
            .zip(&saap_tokens)
            .map(|(d, s)| d.iter().zip(s).take_while(|(a, b)| a == b).count())
            .collect();
        let identical = agree.iter().filter(|&&n| n == args.tokens).count();
        let mean_agree = agree.iter().sum::<usize>() as f64 / batch as f64;
        println!(
            "{batch} | {prefill_s:.2} | {:.1} | {:.1} | {:.2}× | {:.1}% | {identical}/{batch} identical, {mean_agree:.1} of {} tokens before the first divergence",
            steps / dense_s,
            steps / saap_s,
            dense_s / saap_s,
            100.0 * reads.selectivity(),
            args.tokens
        );
        println!(
            "JSON {{\"kind\":\"throughput\",\"model\":\"{name}\",\"context\":{},\"batch\":{batch},\"all_sparse\":{},\"prefill_s\":{prefill_s:.3},\"dense_tok_s\":{:.2},\"saap_tok_s\":{:.2},\"keys_read\":{:.4},\"mean_agree\":{mean_agree:.2},\"tokens\":{}}}",
            args.context,
            args.all_sparse,
            steps / dense_s,
            steps / saap_s,
            reads.selectivity(),
            args.tokens
        );
    }
    Ok(())
}

/// Prefills ragged prompts as one batch, chunk by chunk (items that have run out of tokens take
/// part with length 0). Returns each item's next token (greedy).
fn prefill_batch(model: &mut Llama, prompts: &[&[u32]], chunk: usize) -> Res<Vec<u32>> {
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut next = vec![0u32; prompts.len()];
    for at in (0..longest).step_by(chunk) {
        let width = chunk.min(longest - at);
        let lens: Vec<usize> = prompts
            .iter()
            .map(|p| p.len().saturating_sub(at).min(width))
            .collect();
        let mut ids = vec![0u32; prompts.len() * width];
        for (i, (p, &len)) in prompts.iter().zip(&lens).enumerate() {
            if len > 0 {
                ids[i * width..i * width + len].copy_from_slice(&p[at..at + len]);
            }
        }
        let tokens = Tensor::from_vec(ids, (prompts.len(), width), model.device())?;
        let logits = model.forward_last(&tokens, &lens)?;
        let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (i, &len) in lens.iter().enumerate() {
            if len > 0 {
                next[i] = argmax[i];
            }
        }
    }
    Ok(next)
}

/// Greedy decode of `steps` tokens per item from `first`, read statistics and finite checks off
/// (each would sync the host every layer); returns the tokens and the seconds.
fn decode(model: &mut Llama, first: &[u32], steps: usize) -> Res<(Vec<Vec<u32>>, f64)> {
    for layer in 0..model.n_layers() {
        let op = model.attention_mut(layer)?;
        op.set_track_reads(false);
        op.set_check_finite(false);
    }
    let device = model.device().clone();
    let batch = first.len();
    let mut next = Tensor::from_vec(first.to_vec(), (batch, 1), &device)?;
    let mut produced = Vec::with_capacity(steps);
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        next = model.forward(&next, &vec![1; batch])?.argmax(D::Minus1)?;
        produced.push(next.clone());
    }
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    Ok((Tensor::cat(&produced, 1)?.to_vec2::<u32>()?, seconds))
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
