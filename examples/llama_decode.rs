//! Prompt → chunked prefill → Saap decode with a real model; prints the text, tokens/s and the
//! keys read per step against dense attention.
//!
//! `cargo run --release --example llama_decode -- --help` lists the options; with none it runs
//! SmolLM2-135M (fetched on demand) with its cached index (calibrated on first use).

use candle_core::{Tensor, D};
use clap::builder::RangedU64ValueParser;
use clap::Parser;
use common::{Loaded, ModelArgs};
use saap::models::calibrate;
use saap::models::fetch::{self, Text};
use saap::{ReadStats, SaapIndex};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

mod common;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(about = "Prompt → chunked prefill → Saap decode with a real model")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained SaapIndex for this model; without it the index cached for the model is used
    /// (calibrated on first use, a few minutes on CPU)
    #[arg(long)]
    index: Option<PathBuf>,
    /// Read every key (no index)
    #[arg(long)]
    dense: bool,
    /// Context the default index is calibrated for
    #[arg(long, default_value_t = 4096)]
    calib_context: usize,
    /// Partitions read per query head (ℓ), overriding the index's
    #[arg(long)]
    probe: Option<usize>,
    /// Put the first N tokens of Pride and Prejudice before the prompt (long enough that Saap
    /// reads a fraction of the keys)
    #[arg(long, default_value_t = 3000)]
    context: usize,
    /// The user message (ChatML template applied unless --raw)
    #[arg(long)]
    prompt: Option<String>,
    /// Feed the prompt as is
    #[arg(long)]
    raw: bool,
    /// Tokens to generate
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Prefill chunk in tokens [default: 512 on the CPU, 8192 on CUDA, where the prefill kernel
    /// needs a few thousand queries per chunk to fill the GPU]
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    chunk: Option<usize>,
    /// No read statistics and no finite checks (each costs a device-to-host copy per layer and
    /// step): for timing tokens/s; keys read not reported
    #[arg(long)]
    fast: bool,
}

fn main() -> Res<()> {
    let args = Args::parse();
    let Loaded {
        device,
        name,
        tok,
        mut model,
    } = args.model.load()?;
    let index = match (&args.index, args.dense) {
        (_, true) => None,
        (Some(index_path), false) => {
            Some((SaapIndex::load(index_path, &device)?, index_path.clone()))
        }
        (None, false) => Some(calibrate::cached_or_trained_index(
            &mut model,
            &tok,
            &name,
            args.calib_context,
        )?),
    };
    let mode = match &index {
        Some((index, index_path)) => {
            model.attach_index(Some(index))?;
            let c = index.config();
            let probe = args.probe.unwrap_or(c.n_probe);
            for layer in 0..model.n_layers() {
                model.attention_mut(layer)?.set_n_probe(probe)?;
            }
            let dense_layers = (0..index.n_layers())
                .filter(|&l| {
                    index
                        .layer(l)
                        .is_ok_and(|x| x.routing == saap::Routing::Dense)
                })
                .count();
            format!(
                "Saap: index {} (C = {}, ℓ = {probe}, window {}, sinks {}, {dense_layers} of {} layers dense)",
                index_path.display(),
                c.n_partitions,
                c.window,
                c.sinks,
                index.n_layers()
            )
        }
        None => "DENSE (--dense: every key is read)".into(),
    };
    println!("model {name} — {mode}");
    if args.fast {
        for layer in 0..model.n_layers() {
            let attention = model.attention_mut(layer)?;
            attention.set_track_reads(false);
            attention.set_check_finite(false);
        }
    }

    let mut prompt_ids = Vec::new();
    if tok.add_bos() {
        prompt_ids.extend(tok.bos());
    }
    let context = if args.context > 0 {
        let text = fetch::read_text(Text::PrideAndPrejudice)?;
        let ids = tok.encode(&text)?;
        let n = args.context.min(ids.len());
        tok.decode(&ids[..n])? + "\n\n"
    } else {
        String::new()
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
    prompt_ids.extend(tok.encode(&text)?);
    let stops: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tok.token_id(t))
        .chain(tok.eos())
        .collect();

    let start = Instant::now();
    let mut logits = None;
    let chunk = args.chunk.unwrap_or(model.default_prefill_chunk());
    for chunk in prompt_ids.chunks(chunk) {
        let t = Tensor::new(chunk, &device)?.unsqueeze(0)?;
        logits = Some(model.forward_last(&t, &[chunk.len()])?);
    }
    let mut logits = logits.ok_or("empty prompt")?;
    // CUDA queues work: sync so the prefill's tail is not billed to the decode.
    device.synchronize()?;
    let prefill_s = start.elapsed().as_secs_f64();
    println!(
        "prefill: {} tokens in {prefill_s:.2} s ({:.0} tokens/s)\n",
        prompt_ids.len(),
        prompt_ids.len() as f64 / prefill_s
    );

    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut reads = ReadStats::default();
    let mut steps = 0;
    let start = Instant::now();
    for _ in 0..args.tokens {
        let next = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
        if stops.contains(&next) {
            break;
        }
        generated.push(next);
        let text = tok.decode(&generated)?;
        // Print whole characters only: a token may end inside a multi-byte one.
        if !text.ends_with('\u{fffd}') {
            print!("{}", &text[printed..]);
            std::io::stdout().flush()?;
            printed = text.len();
        }
        let t = Tensor::new(&[[next]], &device)?;
        logits = model.forward(&t, &[1])?.squeeze(1)?;
        steps += 1;
        model
            .read_stats()
            .iter()
            .flatten()
            .for_each(|s| reads.add(s));
    }
    let decode_s = start.elapsed().as_secs_f64();
    println!("\n");
    if steps == 0 {
        println!("no token decoded (the model stopped at once)");
        return Ok(());
    }
    println!(
        "decode: {steps} tokens in {decode_s:.2} s ({:.1} tokens/s)",
        steps as f64 / decode_s
    );
    if args.fast {
        println!("keys read per step: not tracked (--fast)");
        return Ok(());
    }
    let per_step = |n: usize| n as f64 / steps as f64;
    println!(
        "keys read per step, all layers and KV heads: {:.0} of {:.0} dense ({:.1}%; window + sinks {:.0}, \
         indexed keys {:.1}% read)",
        per_step(reads.keys_read),
        per_step(reads.keys_in_context),
        100.0 * reads.selectivity(),
        per_step(reads.window_and_sinks),
        100.0 * reads.indexed_selectivity()
    );
    Ok(())
}
