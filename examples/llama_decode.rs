//! Prompt → chunked prefill → Saap decode with a real model; prints the text, tokens/s and the
//! keys read per step against dense attention.
//!
//! ```text
//! cargo run --release --example llama_decode -- [options]
//!   --model PATH        GGUF checkpoint (llama or qwen2); default SmolLM2-135M, fetched on demand
//!   --qwen              use Qwen2.5-Coder-0.5B-Instruct (fetched on demand, 491 MB)
//!   --index PATH        a trained SaapIndex for this model; without it, the index cached for the
//!                       model (calibrated on first use, a few minutes on CPU) is used
//!   --dense             read every key (no index)
//!   --calib-context N   context the default index is calibrated for (default 4096)
//!   --probe L           partitions read per query head (ℓ), overriding the index's
//!   --context N         put the first N tokens of Pride and Prejudice before the prompt
//!                       (default 3000: long enough that Saap reads a fraction of the keys)
//!   --prompt TEXT       the user message (ChatML template applied unless --raw)
//!   --raw               feed the prompt as is
//!   --tokens N          tokens to generate (default 64)
//!   --chunk N           prefill chunk (default 512)
//!   --cuda              run on GPU 0 (build with --features cuda)
//!   --yarn F            YaRN RoPE scaling by F over the model's context (e.g. 4: Qwen2.5 at
//!                       128k); the index must have been calibrated with the same --yarn
//!   --fast              no read statistics and no finite checks (each costs a device-to-host
//!                       copy per layer and step): for timing tokens/s; keys read not reported
//! ```

use candle_core::{Device, Tensor, D};
use saap::models::calibrate;
use saap::models::fetch::{self, Text};
use saap::models::{GgufTokenizer, Llama};
use saap::{ReadStats, SaapIndex};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    model: Option<PathBuf>,
    qwen: bool,
    index: Option<PathBuf>,
    dense: bool,
    calib_context: usize,
    probe: Option<usize>,
    context: usize,
    prompt: Option<String>,
    raw: bool,
    tokens: usize,
    chunk: usize,
    cuda: bool,
    fast: bool,
    yarn: Option<f64>,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        model: None,
        qwen: false,
        index: None,
        dense: false,
        calib_context: 4096,
        probe: None,
        context: 3000,
        prompt: None,
        raw: false,
        tokens: 64,
        chunk: 512,
        cuda: false,
        fast: false,
        yarn: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(value()?.into()),
            "--qwen" => a.qwen = true,
            "--index" => a.index = Some(value()?.into()),
            "--dense" => a.dense = true,
            "--calib-context" => a.calib_context = value()?.parse()?,
            "--probe" => a.probe = Some(value()?.parse()?),
            "--context" => a.context = value()?.parse()?,
            "--prompt" => a.prompt = Some(value()?),
            "--raw" => a.raw = true,
            "--tokens" => a.tokens = value()?.parse()?,
            "--chunk" => a.chunk = value()?.parse::<usize>()?.max(1),
            "--cuda" => a.cuda = true,
            "--fast" => a.fast = true,
            "--yarn" => a.yarn = Some(value()?.parse()?),
            "-h" | "--help" => {
                println!("see the header of examples/llama_decode.rs for the options");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other} (try --help)").into()),
        }
    }
    Ok(a)
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let device = if args.cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let path = fetch::model_or_default(args.model.as_deref(), args.qwen)?;
    let tok = GgufTokenizer::from_gguf(&path)?;
    let mut model = Llama::from_gguf_auto(&path, &device)?;
    if let Some(factor) = args.yarn {
        model.set_yarn(factor)?;
    }
    let index = match (&args.index, args.dense) {
        (_, true) => None,
        (Some(index_path), false) => {
            Some((SaapIndex::load(index_path, &device)?, index_path.clone()))
        }
        (None, false) => {
            let name = path
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned());
            Some(calibrate::cached_or_trained_index(
                &mut model,
                &tok,
                &name,
                args.calib_context,
            )?)
        }
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
    println!("model {} — {mode}", path.display());
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
    for chunk in prompt_ids.chunks(args.chunk) {
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
