//! Saap inside a decoder that is not this crate's: a small pre-norm transformer written here with
//! plain `candle_nn` layers (random weights), the way you would wire your own model.
//!
//! What the model must do:
//! 1. project q, k, v as usual, reshape to `[B, heads, T, D]`, and hand the **pre-RoPE** q and k
//!    to [`SaapAttention`] — the op applies RoPE itself (its `RopeConfig` must be the model's)
//!    and owns the KV cache, so the model keeps no cache and no position tables;
//! 2. call `prefill` for prompt chunks and `decode` for one new token per sequence;
//! 3. once per model: run it dense with a [`Recorder`] on each layer over calibration text,
//!    train each layer's index (`train_layer`), save the [`SaapIndex`]; at inference load it and
//!    build the ops with [`SaapAttention::from_index`].
//!
//! `cargo run --release --example own_model` prints, for one prompt, the largest logit difference
//! from dense decoding and the keys read: exact with ℓ = C, sparse with the trained ℓ.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};
use rand::{Rng, SeedableRng};
use saap::train::data::sequences_from_records;
use saap::train::{train_layer, TrainParams};
use saap::{
    HeadLayout, ReadStats, Recorder, RopeConfig, RopeKind, RopeScaling, SaapAttention, SaapConfig,
    SaapIndex,
};

const VOCAB: usize = 256;
const HIDDEN: usize = 128;
const LAYERS: usize = 2;
const HEADS: HeadLayout = HeadLayout {
    n_q_heads: 4,
    n_kv_heads: 2,
    head_dim: 32,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One pre-norm block: attention (through Saap) and a GELU MLP.
struct Block {
    norm1: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm2: RmsNorm,
    up: Linear,
    down: Linear,
}

/// The decoder: the model owns its weights; one `SaapAttention` per layer owns that layer's
/// cache (and index).
struct TinyLm {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
    attn: Vec<SaapAttention>,
}

impl TinyLm {
    fn new(vb: VarBuilder, config: &SaapConfig) -> Res<Self> {
        let (hq, hkv, d) = (HEADS.n_q_heads, HEADS.n_kv_heads, HEADS.head_dim);
        let blocks = (0..LAYERS)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(Block {
                    norm1: rms_norm(HIDDEN, 1e-5, vb.pp("norm1"))?,
                    q: linear_no_bias(HIDDEN, hq * d, vb.pp("q"))?,
                    k: linear_no_bias(HIDDEN, hkv * d, vb.pp("k"))?,
                    v: linear_no_bias(HIDDEN, hkv * d, vb.pp("v"))?,
                    o: linear_no_bias(hq * d, HIDDEN, vb.pp("o"))?,
                    norm2: rms_norm(HIDDEN, 1e-5, vb.pp("norm2"))?,
                    up: linear_no_bias(HIDDEN, 4 * HIDDEN, vb.pp("up"))?,
                    down: linear_no_bias(4 * HIDDEN, HIDDEN, vb.pp("down"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let device = vb.device().clone();
        Ok(Self {
            embed: embedding(VOCAB, HIDDEN, vb.pp("embed"))?,
            blocks,
            norm: rms_norm(HIDDEN, 1e-5, vb.pp("norm"))?,
            head: linear_no_bias(HIDDEN, VOCAB, vb.pp("head"))?,
            attn: (0..LAYERS)
                .map(|_| SaapAttention::dense(config, &device, DType::F32))
                .collect::<saap::Result<_>>()?,
        })
    }

    /// Logits `[T, VOCAB]` of a chunk of one sequence (`tokens`: `[T]`), appended to the caches:
    /// prefill when the chunk has several tokens or the cache is empty, else a decode step.
    fn forward(&mut self, tokens: &[u32]) -> Res<Tensor> {
        let (hq, hkv, d) = (HEADS.n_q_heads, HEADS.n_kv_heads, HEADS.head_dim);
        let t = tokens.len();
        let ids = Tensor::new(tokens, self.embed.embeddings().device())?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?; // [1, T, HIDDEN]
        for (block, attn) in self.blocks.iter().zip(self.attn.iter_mut()) {
            let h = block.norm1.forward(&x)?;
            // [1, T, heads·D] → [1, heads, T, D]; no RoPE here: the op rotates q and k itself.
            let heads =
                |y: Tensor, n: usize| y.reshape((1, t, n, d))?.transpose(1, 2)?.contiguous();
            let q = heads(block.q.forward(&h)?, hq)?;
            let k = heads(block.k.forward(&h)?, hkv)?;
            let v = heads(block.v.forward(&h)?, hkv)?;
            let o = if t == 1 && !attn.seq_lens().is_empty() {
                attn.decode(&q, &k, &v)?
            } else {
                attn.prefill(&q, &k, &v, &[t])?
            };
            let o = o.transpose(1, 2)?.reshape((1, t, hq * d))?;
            x = (x + block.o.forward(&o)?)?;
            let h = block.norm2.forward(&x)?;
            x = (&x + block.down.forward(&block.up.forward(&h)?.gelu_erf()?)?)?;
        }
        Ok(self.head.forward(&self.norm.forward(&x)?)?.squeeze(0)?)
    }

    fn reset(&mut self) {
        self.attn.iter_mut().for_each(SaapAttention::reset);
    }

    /// Keys read by the last decode step, summed over layers.
    fn reads(&self) -> ReadStats {
        let mut total = ReadStats::default();
        self.attn
            .iter()
            .filter_map(SaapAttention::last_read)
            .for_each(|r| total.add(&r));
        total
    }
}

/// Token ids with some structure (a repeated random motif in noise), so that attention is not
/// uniform.
fn text(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<u32> {
    let motif: Vec<u32> = (0..16).map(|_| rng.random_range(0..VOCAB as u32)).collect();
    (0..n)
        .map(|i| {
            if rng.random_bool(0.3) {
                motif[i % motif.len()]
            } else {
                rng.random_range(0..VOCAB as u32)
            }
        })
        .collect()
}

/// Prefills `prompt`, then decodes `steps` tokens teacher-forced from `follow`; returns the
/// logits of every decode step and the keys read, summed over steps.
fn decode_logits(
    model: &mut TinyLm,
    prompt: &[u32],
    follow: &[u32],
) -> Res<(Vec<Tensor>, ReadStats)> {
    model.reset();
    model.forward(prompt)?;
    let mut logits = Vec::new();
    let mut reads = ReadStats::default();
    for &token in follow {
        logits.push(model.forward(&[token])?);
        reads.add(&model.reads());
    }
    Ok((logits, reads))
}

fn max_abs_diff(a: &[Tensor], b: &[Tensor]) -> Res<f32> {
    let mut max = 0f32;
    for (x, y) in a.iter().zip(b) {
        max = max.max((x - y)?.abs()?.max(D::Minus1)?.max(0)?.to_scalar::<f32>()?);
    }
    Ok(max)
}

fn main() -> Res<()> {
    let device = Device::Cpu;
    // The model's RoPE, given to the op (GGUF llama checkpoints: Interleaved; HF: Neox).
    let rope = RopeConfig {
        kind: RopeKind::Neox,
        theta: 10_000.0,
        scaling: RopeScaling::None,
    };
    // C = 32 partitions per KV head, ℓ = 2 probed per query head, a 128-token window, 4 sinks.
    let mut config = SaapConfig::new(HEADS, rope, 32)?;
    config.n_probe = 2;
    config.window = 128;
    config.sinks = 4;
    config.merge_every = 16;
    config.hidden = 64;

    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut model = TinyLm::new(vb, &config)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    // 1. Calibration, once per model: dense runs with a recorder on every layer.
    let recorders: Vec<Recorder> = (0..LAYERS).map(|_| Recorder::new()).collect();
    for (attn, recorder) in model.attn.iter_mut().zip(&recorders) {
        attn.set_recorder(Some(recorder.clone()));
    }
    for _ in 0..3 {
        model.reset();
        for chunk in text(&mut rng, 1024).chunks(256) {
            model.forward(chunk)?; // chunked prefill: the recorder stitches the chunks together
        }
    }
    let mut params = TrainParams::new(&config);
    params.queries_per_seq = 256;
    params.mlp.epochs = 20;
    let layers = recorders
        .iter()
        .map(|r| train_layer(&sequences_from_records(&r.take())?, &config, &params, None))
        .collect::<saap::Result<Vec<_>>>()?;
    let index = SaapIndex::new(config.clone(), "tiny-lm", layers)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tiny-lm.saap.safetensors");
    index.save(&path)?;
    println!(
        "calibrated {LAYERS} layers and saved the index ({} bytes)",
        std::fs::metadata(&path)?.len()
    );

    // 2. Inference: load the index, one op per layer from it.
    let index = SaapIndex::load(&path, &device)?;
    let prompt = text(&mut rng, 1500);
    let follow = text(&mut rng, 16);
    for attn in model.attn.iter_mut() {
        attn.set_recorder(None);
    }
    let (dense, dense_reads) = decode_logits(&mut model, &prompt, &follow)?;
    model.attn = (0..LAYERS)
        .map(|layer| SaapAttention::from_index(&index, layer, &device, DType::F32))
        .collect::<saap::Result<_>>()?;
    let (sparse, reads) = decode_logits(&mut model, &prompt, &follow)?;
    for attn in model.attn.iter_mut() {
        attn.set_n_probe(config.n_partitions)?; // ℓ = C: every partition, exact attention
    }
    let (exact, exact_reads) = decode_logits(&mut model, &prompt, &follow)?;

    let pct = |r: &ReadStats| 100.0 * r.selectivity();
    println!(
        "{} decode steps after a {}-token prompt:",
        follow.len(),
        prompt.len()
    );
    println!("  dense:        keys read {:5.1}%", pct(&dense_reads));
    println!(
        "  Saap ℓ = C:   keys read {:5.1}%, max |logit − dense| {:.2e}",
        pct(&exact_reads),
        max_abs_diff(&exact, &dense)?
    );
    println!(
        "  Saap ℓ = {}:   keys read {:5.1}%, max |logit − dense| {:.2e}",
        config.n_probe,
        pct(&reads),
        max_abs_diff(&sparse, &dense)?
    );
    let exact_err = max_abs_diff(&exact, &dense)?;
    if exact_err > 1e-3 {
        return Err(format!("ℓ = C should equal dense attention, differs by {exact_err}").into());
    }
    Ok(())
}
