//! The main job's command line (`llama_decode`) answers bad invocations with one readable line on
//! stderr and a failure exit code, without network: a file that is not a model, a truncated
//! model, a missing `--index` or `--text`, a context beyond the model's, `--calib-context 0`, and
//! no `apt-get` for the default text. A tiny GGUF checkpoint (one layer, byte-level vocabulary)
//! is written here, so no model is fetched.
//!
//! The example binary is the one `cargo test` builds next to this test's (it builds every
//! example); `cargo test --test cli` alone does not build it: run `cargo build --examples` first.
#![cfg(feature = "models")]

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use saap::classify::Classifier;
use saap::{
    HeadLayout, LayerIndex, RopeConfig, RopeKind, RopeScaling, Routing, SaapConfig, SaapIndex,
};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

/// `target/<profile>/examples/llama_decode`, next to `target/<profile>/deps/cli-…`.
fn llama_decode() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir
        .join("examples")
        .join(format!("llama_decode{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test` builds the examples; with `--test cli` alone, run \
         `cargo build --examples` first",
        bin.display()
    );
    bin
}

/// Runs `llama_decode args` with an empty cache and `PATH` as given; returns stderr, after
/// checking that the run failed.
fn fails(args: &[&str], cache: &Path, path_env: Option<&Path>) -> String {
    let mut cmd = Command::new(llama_decode());
    cmd.args(args).env("SAAP_CACHE", cache);
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{args:?} succeeded; stderr:\n{stderr}"
    );
    stderr
}

/// The one line of an error report: it starts with `error:`, holds every `needles`, and nothing
/// else was printed.
fn one_line_error(stderr: &str, needles: &[&str]) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "`{needle}` missing:\n{stderr}");
    }
}

/// GPT-2's byte-level alphabet: the character that stands for each byte.
fn byte_chars() -> Vec<char> {
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            if printable {
                char::from_u32(b).unwrap()
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap()
            }
        })
        .collect()
}

/// A one-layer llama checkpoint (hidden 16, 2 query heads and 1 KV head of 8 dims) with a
/// 256-token byte-level vocabulary, end-of-text token `eos` and a 64-token context, in f32.
fn tiny_gguf(path: &Path, eos: u32) {
    let dev = Device::Cpu;
    let (vocab, hidden, ffn) = (256, 16, 32);
    let w = |shape: &[usize], seed: f64| -> QTensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as f64 * 0.37 + seed).sin() * 0.1) as f32)
            .collect();
        let t = Tensor::from_vec(values, shape, &dev).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    };
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let tensors = vec![
        ("token_embd.weight", w(&[vocab, hidden], 1.0)),
        ("blk.0.attn_norm.weight", ones(hidden)),
        ("blk.0.attn_q.weight", w(&[hidden, hidden], 2.0)),
        ("blk.0.attn_k.weight", w(&[8, hidden], 3.0)),
        ("blk.0.attn_v.weight", w(&[8, hidden], 4.0)),
        ("blk.0.attn_output.weight", w(&[hidden, hidden], 5.0)),
        ("blk.0.ffn_norm.weight", ones(hidden)),
        ("blk.0.ffn_gate.weight", w(&[ffn, hidden], 6.0)),
        ("blk.0.ffn_up.weight", w(&[ffn, hidden], 7.0)),
        ("blk.0.ffn_down.weight", w(&[hidden, ffn], 8.0)),
        ("output_norm.weight", ones(hidden)),
    ];
    use gguf_file::Value;
    let tokens = Value::Array(
        byte_chars()
            .into_iter()
            .map(|c| Value::String(c.to_string()))
            .collect(),
    );
    let metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.merges", Value::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id", Value::U32(eos)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

#[test]
fn bad_invocations_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gguf(&model, 0);
    let model_arg = model.to_str().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "It is a truth universally acknowledged. ".repeat(20)).unwrap();
    let text_arg = text.to_str().unwrap();

    // The tiny model is a valid checkpoint: a dense run on a short context works end to end.
    let ok = Command::new(llama_decode())
        .args(["--model", model_arg, "--text", text_arg, "--context", "16"])
        .args(["--tokens", "3", "--dense", "--raw", "--prompt", "Hi"])
        .env("SAAP_CACHE", &cache)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("tokens generated"));

    // A file that is not a checkpoint.
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, "this is not a model").unwrap();
    let err = fails(&["--model", garbage.to_str().unwrap()], &cache, None);
    one_line_error(&err, &["garbage.gguf", "not a GGUF file"]);

    // A checkpoint cut short.
    let bytes = std::fs::read(&model).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(
        &["--model", truncated.to_str().unwrap(), "--dense"],
        &cache,
        None,
    );
    one_line_error(&err, &["truncated.gguf", "truncated"]);

    // A missing --index or --text: named, before the model is loaded.
    let missing = dir.path().join("no-such-index.safetensors");
    let err = fails(
        &["--model", model_arg, "--index", missing.to_str().unwrap()],
        &cache,
        None,
    );
    one_line_error(
        &err,
        &["--index", "no-such-index.safetensors", "no such file"],
    );
    let err = fails(
        &["--model", model_arg, "--text", "no-such-text.txt"],
        &cache,
        None,
    );
    one_line_error(&err, &["--text", "no-such-text.txt", "no such file"]);

    // A context beyond the 64 tokens the model was trained for.
    let err = fails(
        &[
            "--model",
            model_arg,
            "--text",
            text_arg,
            "--context",
            "100",
            "--dense",
        ],
        &cache,
        None,
    );
    one_line_error(
        &err,
        &["exceed the 64 tokens", "--context", "--beyond-context"],
    );

    // A batch of no prompts.
    let err = fails(&["--model", model_arg, "--batch", "0"], &cache, None);
    one_line_error(&err, &["--batch 0", "at least one prompt"]);

    // No calibration on sequences too short to hold sinks, window and C keys.
    let err = fails(
        &["--model", model_arg, "--calib-context", "0"],
        &cache,
        None,
    );
    one_line_error(&err, &["--calib-context 0", "at least 1024 tokens"]);

    // No apt-get (an empty PATH) for the default text: the way out is --text FILE.
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let err = fails(&["--model", model_arg, "--dense"], &cache, Some(&empty));
    one_line_error(&err, &["apt-get", "--text FILE"]);
}

/// An index for the tiny model's shape (2 query heads, 1 KV head of 8 dims, interleaved RoPE
/// θ = 10⁴, one layer; C = 8, window 4, 1 sink), recording `model_sha256`. Seeded: an
/// unseeded classifier made some runs' Saap continuation end at its first token, before any
/// step was timed.
fn tiny_index(path: &Path, model_sha256: &str) {
    let layout = HeadLayout {
        n_q_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
    };
    let rope = RopeConfig {
        kind: RopeKind::Interleaved,
        theta: 10_000.0,
        scaling: RopeScaling::None,
    };
    let mut config = SaapConfig::new(layout, rope, 8).unwrap();
    (
        config.hidden,
        config.window,
        config.sinks,
        config.merge_every,
    ) = (4, 4, 1, 2);
    let mut rng = common::rng(0x7e57);
    let mut r = |shape: &[usize]| common::randn(&mut rng, shape, 1.0);
    let layer = LayerIndex {
        centroids: r(&[1, 8, 8]),
        classifier: Classifier {
            w1: r(&[2, 8, 4]),
            b1: r(&[2, 1, 4]),
            w2: r(&[2, 4, 8]),
            b2: r(&[2, 1, 8]),
        },
        routing: Routing::Classifier,
    };
    SaapIndex::new(config, "tiny", vec![layer])
        .unwrap()
        .with_model_sha256(model_sha256)
        .unwrap()
        .save(path)
        .unwrap();
}

#[test]
fn an_index_of_another_model_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gguf(&model, 0);
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "It is a truth universally acknowledged. ".repeat(20)).unwrap();
    let index = dir.path().join("index.safetensors");
    let args = |index: &Path| -> Vec<String> {
        [
            "--model",
            model.to_str().unwrap(),
            "--index",
            index.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--context",
            "24",
            "--tokens",
            "4",
            "--raw",
            "--prompt",
            "Hi",
        ]
        .map(String::from)
        .to_vec()
    };

    // Same head layout, RoPE and depth, but calibrated on another file: refused, both named.
    let other = "ab".repeat(32);
    tiny_index(&index, &other);
    let args_other = args(&index);
    let args_other: Vec<&str> = args_other.iter().map(String::as_str).collect();
    let err = fails(&args_other, &cache, None);
    one_line_error(
        &err,
        &["--index", "index.safetensors", &other, "calibrated on"],
    );

    // The same index recorded for this model file: Saap and dense run side by side.
    let own = saap::models::fetch::sha256_file(&model).unwrap();
    tiny_index(&index, &own);
    let out = Command::new(llama_decode())
        .args(args(&index))
        .env("SAAP_CACHE", &cache)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Saap decodes") && stdout.contains("keys read"),
        "{stdout}"
    );
}

/// `--batch 2`: two prompts (the text cut at 24 and 12 tokens) decoded together with Saap and
/// dense; each prints its answer, one leaves the batch at its end of text while the other goes
/// on, and each answer is the one its prompt gets alone.
#[test]
fn a_batch_of_two_prompts_answers_each_as_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let model = dir.path().join("tiny.gguf");
    // The byte `4` ends the text: the dense run of the shorter prompt writes it as its fifth
    // token, so that sequence leaves the batch while the other one goes on.
    tiny_gguf(&model, u32::from(b'4'));
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "It is a truth universally acknowledged. ".repeat(20)).unwrap();
    let index = dir.path().join("index.safetensors");
    tiny_index(&index, &saap::models::fetch::sha256_file(&model).unwrap());
    let run = |extra: &[&str]| -> String {
        let out = Command::new(llama_decode())
            .args(["--model", model.to_str().unwrap()])
            .args(["--index", index.to_str().unwrap()])
            .args(["--text", text.to_str().unwrap()])
            .args(["--tokens", "6", "--raw", "--prompt", "Hi"])
            .args(extra)
            .env("SAAP_CACHE", &cache)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let batch = run(&["--context", "24", "--batch", "2"]);
    for needle in [
        "prompts: 28, 16 tokens (the first 24, 12 tokens of",
        "batch of 2 prompts",
        "Saap decodes",
        "[2] 4 tokens, stopped at end of text",
        "[1] 6 tokens, stopped at --tokens",
    ] {
        assert!(batch.contains(needle), "`{needle}` missing:\n{batch}");
    }
    for (item, context) in [(1, "24"), (2, "12")] {
        let alone = run(&["--context", context]);
        for label in ["Saap", "dense"] {
            let (in_batch, by_itself) = (
                answer(&batch, label, Some(item)),
                answer(&alone, label, None),
            );
            // Streaming stops before a character cut short; the batch prints the whole answer.
            assert!(
                !in_batch.is_empty() && in_batch.starts_with(&by_itself),
                "{label} [{item}]: `{in_batch}` in the batch, `{by_itself}` alone"
            );
        }
        let agreement = |stdout: &str, prefix: &str| {
            let line = stdout.lines().find(|l| l.starts_with(prefix)).unwrap();
            line[prefix.len()..].to_string()
        };
        assert_eq!(
            agreement(&batch, &format!("greedy continuations of [{item}]: ")),
            agreement(&alone, "greedy continuations: ")
        );
    }
}

/// The `label` run's answer in `llama_decode`'s output: item `item` (1-based) of a batch, or
/// the text a single prompt streamed (its first line, trimmed).
fn answer(stdout: &str, label: &str, item: Option<usize>) -> String {
    let section = stdout.split(&format!("── {label} ──\n")).nth(1).unwrap();
    let line = match item {
        Some(i) => {
            let tag = format!("[{i}] ");
            let line = section.lines().find(|l| l.starts_with(&tag)).unwrap();
            line.split_once(": ").unwrap().1
        }
        None => section.lines().next().unwrap(),
    };
    line.trim().to_string()
}
