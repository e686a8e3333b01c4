//! A Llama-family decoder (GGUF `llama` and `qwen2`, Hugging Face Llama/Qwen2 safetensors) whose
//! every layer attends through [`SaapAttention`].
//!
//! The decoder computes the q/k/v projections and hands **pre-RoPE** queries and keys to the op,
//! which applies RoPE itself at the positions its cache holds. So the model never builds a
//! position table and has no position limit of its own (candle's `quantized_llama` stops at
//! 4096); the RoPE frequencies, scaling included, live in [`LlamaConfig::rope`].
//!
//! GGUF `llama` checkpoints store q/k rows permuted for interleaved RoPE; Hugging Face ones are not
//! permuted and use NEOX RoPE. Both give the same logits, but their pre-RoPE q/k vectors differ by
//! that permutation inside each head, so an index trained on one layout does not fit the other
//! ([`Llama::saap_config`] records the RoPE kind, which an index checks).

use super::norm::RmsNorm;
use super::swiglu;
use super::{io_err, Error, Result};
use crate::budget::ProbeCurve;
use crate::config::{
    HeadLayout, PageLayout, PageScore, RopeConfig, RopeKind, RopeScaling, Routing, SaapConfig,
};
use crate::graph::GraphDecoder;
use crate::{ReadStats, SaapAttention, SaapIndex};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which flavour of the Llama block a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama: no attention biases.
    Llama,
    /// Qwen2: biases on the q, k and v projections.
    Qwen2,
}

/// Shape and hyper-parameters of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Block flavour.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Attention head layout of every layer.
    pub layout: HeadLayout,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Rotary embedding, applied by the attention op.
    pub rope: RopeConfig,
    /// Context the model was trained for (informational: nothing here stops at it).
    pub context_length: usize,
}

/// A projection: quantized (GGUF, `QMatMul`) or plain.
#[derive(Debug)]
enum Linear {
    Quantized(QMatMul, Option<Tensor>),
    Plain(candle_nn::Linear),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Quantized(w, None) => w.forward(x)?,
            Linear::Quantized(w, Some(b)) => w.forward(x)?.broadcast_add(b)?,
            Linear::Plain(l) => l.forward(x)?,
        })
    }
}

/// Projections of one input: a single matmul over the concatenated weights when all are plain
/// with the same kind of bias (a decode step at batch 1 is a chain of small launches, so one
/// matmul instead of three counts), else one per weight. Outputs come back in order.
#[derive(Debug)]
enum Projections {
    /// The fused projection and each part's output width.
    Fused(candle_nn::Linear, Vec<usize>),
    Separate(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let plain: Vec<&candle_nn::Linear> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Plain(l) => Some(l),
                Linear::Quantized(..) => None,
            })
            .collect();
        let uniform = plain.len() == parts.len()
            && plain.windows(2).all(|w| {
                w[0].weight().dtype() == w[1].weight().dtype()
                    && w[0].bias().is_some() == w[1].bias().is_some()
            });
        if !uniform {
            return Ok(Self::Separate(parts));
        }
        let widths = plain
            .iter()
            .map(|l| l.weight().dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = plain.iter().map(|l| l.weight()).collect();
        let biases: Option<Vec<&Tensor>> = plain.iter().map(|l| l.bias()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Self::Fused(
            candle_nn::Linear::new(Tensor::cat(&weights, 0)?, bias),
            widths,
        ))
    }

    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Fused(linear, widths) => {
                let y = linear.forward(x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&w| {
                        at += w;
                        Ok(y.narrow(D::Minus1, at - w, w)?)
                    })
                    .collect()
            }
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
        }
    }

    /// `silu(gate) * up` of a gate/up pair: fused, the product reads the one matmul's output
    /// (one launch on CUDA).
    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Fused(linear, widths) if widths.len() == 2 && widths[0] == widths[1] => {
                swiglu::silu_mul_halves(&linear.forward(x)?)?
            }
            _ => match &self.forward(x)?[..] {
                [gate, up] => swiglu::silu_mul(gate, up)?,
                other => {
                    return Err(Error::Model(format!(
                        "swiglu of {} projections, not a gate/up pair",
                        other.len()
                    )))
                }
            },
        })
    }
}

#[derive(Debug)]
struct Layer {
    attn_norm: RmsNorm,
    /// Queries, keys, values.
    qkv: Projections,
    o: Linear,
    ffn_norm: RmsNorm,
    /// Gate, up.
    gate_up: Projections,
    down: Linear,
}

impl Layer {
    /// A layer from its weights, fusing the projections that share an input.
    fn new(
        attn_norm: RmsNorm,
        [q, k, v]: [Linear; 3],
        o: Linear,
        ffn_norm: RmsNorm,
        [gate, up]: [Linear; 2],
        down: Linear,
    ) -> Result<Self> {
        Ok(Self {
            attn_norm,
            qkv: Projections::new(vec![q, k, v])?,
            o,
            ffn_norm,
            gate_up: Projections::new(vec![gate, up])?,
            down,
        })
    }
}

/// A Llama-family decoder with one [`SaapAttention`] (and its KV cache) per layer.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    attn: Vec<SaapAttention>,
    /// The attached index's probe curves (empty without an index).
    probe_curves: Vec<Option<ProbeCurve>>,
    /// The attached index's Quest curves (likewise).
    quest_curves: Vec<Option<ProbeCurve>>,
    /// Whether layers routed by Quest take part in the plan (where they have curves).
    plan_quest: bool,
    /// The attached index's routing per layer when served sparse (empty: no index).
    sparse_routing: Vec<Routing>,
    /// Whether a keys budget is spent layer by layer from those curves.
    budget_by_layer: bool,
    /// The least share of the uniform ℓ a layer keeps in such a plan.
    plan_floor: f64,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Loads a GGUF checkpoint (`llama` or `qwen2` architecture) with quantized projections.
    /// Activations are f32.
    pub fn from_gguf(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_gguf(path.as_ref(), device, None)
    }

    /// Loads a GGUF checkpoint the fastest way for `device`: dequantized to f32 on the CPU (candle's
    /// CPU Q4 dot products are not vectorized: a 512-token SmolLM2 prefill takes 28 s quantized
    /// against 2.1 s in f32, and decode 46 against 37 ms/token, measured on our 2-core machine),
    /// dequantized to bf16 on a GPU (cuBLAS GEMMs; the KV cache and Saap's kernels run in bf16).
    pub fn from_gguf_auto(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        Self::from_gguf_dequantized(path, device, dtype)
    }

    /// Loads a GGUF checkpoint with every weight dequantized to `dtype` (plain matmuls, free of
    /// the activation quantization of quantized matmuls).
    pub fn from_gguf_dequantized(
        path: impl AsRef<Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_gguf(path.as_ref(), device, Some(dtype))
    }

    fn load_gguf(path: &Path, device: &Device, dequantize: Option<DType>) -> Result<Self> {
        let (mut file, content) = super::read_gguf(path)?;
        let config = gguf_config(&content, &mut file, device)?;
        let mut src = GgufSource {
            content,
            file,
            device: device.clone(),
            dequantize,
        };
        let dtype = dequantize.unwrap_or(DType::F32);
        let embd = Arc::new(src.qtensor("token_embd.weight")?);
        let embed = embd.dequantize(device)?.to_dtype(dtype)?;
        let lm_head = if src.has("output.weight") {
            src.linear("output.weight", None)?
        } else {
            // No output.weight (SmolLM2): the LM head is tied to the embedding.
            match dequantize {
                Some(_) => Linear::Plain(candle_nn::Linear::new(embed.clone(), None)),
                None => Linear::Quantized(QMatMul::from_arc(embd)?, None),
            }
        };
        let bias = config.architecture == Architecture::Qwen2;
        let layers = (0..config.n_layers)
            .map(|i| {
                let p = format!("blk.{i}");
                let b = |s: &str| bias.then(|| format!("{p}.{s}.bias"));
                Layer::new(
                    src.norm(&format!("{p}.attn_norm.weight"), config.rms_eps)?,
                    [
                        src.linear(&format!("{p}.attn_q.weight"), b("attn_q").as_deref())?,
                        src.linear(&format!("{p}.attn_k.weight"), b("attn_k").as_deref())?,
                        src.linear(&format!("{p}.attn_v.weight"), b("attn_v").as_deref())?,
                    ],
                    src.linear(&format!("{p}.attn_output.weight"), None)?,
                    src.norm(&format!("{p}.ffn_norm.weight"), config.rms_eps)?,
                    [
                        src.linear(&format!("{p}.ffn_gate.weight"), None)?,
                        src.linear(&format!("{p}.ffn_up.weight"), None)?,
                    ],
                    src.linear(&format!("{p}.ffn_down.weight"), None)?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = src.norm("output_norm.weight", config.rms_eps)?;
        Self::assemble(config, embed, layers, norm, lm_head, device, dtype)
    }

    /// Loads a Hugging Face checkpoint folder: `config.json` plus `model.safetensors` or the
    /// shards listed in `model.safetensors.index.json`. Weights are converted to `dtype`.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
        let json: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| Error::Model(format!("{}: {e}", config_path.display())))?;
        let (config, tied, bias) = hf_config(&json)?;
        let mut weights = HashMap::new();
        for shard in hf_shards(dir)? {
            let tensors = candle_core::safetensors::load(&shard, device)
                .map_err(|e| Error::Model(format!("{}: {e}", shard.display())))?;
            weights.extend(tensors);
        }
        let mut take = |name: &str| -> Result<Tensor> {
            let t = weights
                .remove(name)
                .ok_or_else(|| Error::Model(format!("checkpoint has no tensor `{name}`")))?;
            Ok(t.to_dtype(dtype)?)
        };
        let embed = take("model.embed_tokens.weight")?;
        let lm_head = if tied {
            embed.clone()
        } else {
            take("lm_head.weight")?
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, with_bias: bool| -> Result<Linear> {
                let w = take(&format!("{p}.{name}.weight"))?;
                let b = if with_bias {
                    Some(take(&format!("{p}.{name}.bias"))?)
                } else {
                    None
                };
                Ok(Linear::Plain(candle_nn::Linear::new(w, b)))
            };
            let (q, k, v) = (
                linear("self_attn.q_proj", bias)?,
                linear("self_attn.k_proj", bias)?,
                linear("self_attn.v_proj", bias)?,
            );
            let (o, gate, up, down) = (
                linear("self_attn.o_proj", false)?,
                linear("mlp.gate_proj", false)?,
                linear("mlp.up_proj", false)?,
                linear("mlp.down_proj", false)?,
            );
            layers.push(Layer::new(
                RmsNorm::new(
                    take(&format!("{p}.input_layernorm.weight"))?,
                    config.rms_eps,
                ),
                [q, k, v],
                o,
                RmsNorm::new(
                    take(&format!("{p}.post_attention_layernorm.weight"))?,
                    config.rms_eps,
                ),
                [gate, up],
                down,
            )?);
        }
        let norm = RmsNorm::new(take("model.norm.weight")?, config.rms_eps);
        let lm_head = Linear::Plain(candle_nn::Linear::new(lm_head, None));
        Self::assemble(config, embed, layers, norm, lm_head, device, dtype)
    }

    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: RmsNorm,
        lm_head: Linear,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if embed.dims() != [config.vocab_size, config.hidden_size] {
            return Err(Error::Model(format!(
                "embedding is {:?}, config says [{}, {}]",
                embed.dims(),
                config.vocab_size,
                config.hidden_size
            )));
        }
        let mut model = Self {
            config,
            embed,
            layers,
            attn: Vec::new(),
            probe_curves: Vec::new(),
            quest_curves: Vec::new(),
            plan_quest: true,
            sparse_routing: Vec::new(),
            budget_by_layer: true,
            plan_floor: crate::budget::DEFAULT_FLOOR,
            norm,
            lm_head,
            device: device.clone(),
            dtype,
        };
        model.attach_dense()?;
        Ok(model)
    }

    /// Every layer gets exact attention with a fresh cache.
    fn attach_dense(&mut self) -> Result<()> {
        let config = self.saap_config(1)?;
        self.attn = (0..self.config.n_layers)
            .map(|_| SaapAttention::dense(&config, &self.device, self.dtype))
            .collect::<crate::Result<_>>()?;
        self.probe_curves = Vec::new();
        self.quest_curves = Vec::new();
        self.sparse_routing = Vec::new();
        Ok(())
    }

    /// The model's shape and hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Device of weights and caches.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A Saap configuration for this model's head layout and RoPE with `n_partitions` key
    /// partitions per KV head (other fields at [`SaapConfig::new`]'s defaults).
    pub fn saap_config(&self, n_partitions: usize) -> Result<SaapConfig> {
        Ok(SaapConfig::new(
            self.config.layout,
            self.config.rope,
            n_partitions,
        )?)
    }

    /// Replaces the RoPE scaling (e.g. YaRN ×4 to run Qwen2.5 at 128k). Every layer goes back
    /// to dense attention with an empty cache, since cached keys were rotated the old way.
    pub fn set_rope_scaling(&mut self, scaling: RopeScaling) -> Result<()> {
        let old = self.config.rope;
        self.config.rope.scaling = scaling;
        if let Err(e) = self.attach_dense() {
            self.config.rope = old;
            return Err(e);
        }
        Ok(())
    }

    /// YaRN by `factor` over the checkpoint's own context length (Qwen2.5's recipe for 128k:
    /// factor 4 over 32,768 positions, β 32 / 1), through [`Self::set_rope_scaling`].
    pub fn set_yarn(&mut self, factor: f64) -> Result<()> {
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(Error::Model(format!("YaRN factor {factor} must be >= 1")));
        }
        self.set_rope_scaling(RopeScaling::Yarn {
            factor,
            original_max_positions: self.config.context_length,
            beta_fast: 32.0,
            beta_slow: 1.0,
        })
    }

    /// Gives every layer the op of `index` (with the index's per-layer routing and a fresh
    /// cache), or, with `None`, dense attention. The index must have been trained for this
    /// model: same head layout, RoPE (kind, θ, scaling) and number of layers.
    pub fn attach_index(&mut self, index: Option<&SaapIndex>) -> Result<()> {
        let Some(index) = index else {
            return self.attach_dense();
        };
        let config = SaapConfig {
            layout: self.config.layout,
            rope: self.config.rope,
            ..index.config().clone()
        };
        index.check_model(&config, self.config.n_layers)?;
        self.attn = (0..self.config.n_layers)
            .map(|layer| SaapAttention::from_index(index, layer, &self.device, self.dtype))
            .collect::<crate::Result<_>>()?;
        self.probe_curves = index.probe_curves().to_vec();
        self.quest_curves = index.quest_curves().to_vec();
        self.sparse_routing = index.sparse_routing().to_vec();
        self.plan_probes()
    }

    /// Whether a keys budget ([`Llama::set_keys_budget`]) is spent layer by layer (on by
    /// default): where the attached index holds curves (from calibration), the layers routed
    /// by the classifier (probe curves) and by Quest (Quest curves) trade keys so that, for the
    /// ℓ the budget gives, they read about as many keys between them as all at that ℓ, and more
    /// where the curves found more of the attention per key read
    /// ([`crate::budget::plan_probes`]). Off, or without curves, every classifier layer probes
    /// the same ℓ and every Quest layer reads the budget's pages.
    ///
    /// # Errors
    /// [`Error::Saap`] for curves that do not fit the index (not for a loaded index, which
    /// checked them).
    pub fn set_budget_by_layer(&mut self, on: bool) -> Result<()> {
        self.budget_by_layer = on;
        self.plan_probes()
    }

    /// Whether the layers routed by Quest take part in the per-layer plan (on by default, where
    /// the index holds Quest curves). Off, each reads the budget's pages while the classifier
    /// layers trade among themselves, as with an index calibrated before Quest curves: for
    /// comparing the two.
    ///
    /// # Errors
    /// As [`Llama::set_budget_by_layer`].
    pub fn set_plan_quest(&mut self, on: bool) -> Result<()> {
        self.plan_quest = on;
        self.plan_probes()
    }

    /// The least share of the budget's whole ℓ every layer keeps when a budget is spent layer by
    /// layer (default [`crate::budget::DEFAULT_FLOOR`]; 0 lets a layer go down to one partition,
    /// 1 keeps at least that ℓ): see [`crate::budget::plan_probes`].
    ///
    /// # Errors
    /// [`Error::Saap`] for a floor outside [0, 1] (NaN included); the plan in force stays.
    pub fn set_plan_floor(&mut self, floor: f64) -> Result<()> {
        crate::budget::check_floor(floor)?;
        self.plan_floor = floor;
        self.plan_probes()
    }

    /// Gives each layer routed by the classifier or by Quest its plan from its routing's curve
    /// (or none).
    fn plan_probes(&mut self) -> Result<()> {
        let curve = |layer: usize, routing: Routing| {
            let curves = match routing {
                Routing::Classifier => &self.probe_curves,
                Routing::Quest if self.plan_quest => &self.quest_curves,
                _ => return None,
            };
            curves.get(layer)?.as_ref()
        };
        let curves: Vec<Option<&ProbeCurve>> = self
            .attn
            .iter()
            .enumerate()
            .map(|(layer, op)| curve(layer, op.routing()).filter(|_| self.budget_by_layer))
            .collect();
        let Some(c) = self.attn.first().map(|op| op.config().n_partitions) else {
            return Ok(());
        };
        let plans = crate::budget::plan_probes(&curves, c, self.plan_floor)?;
        for ((op, plan), curve) in self.attn.iter_mut().zip(plans).zip(&curves) {
            let plan = curve.map(|_| plan);
            // Setting a plan ends the op's replay: only where it changes.
            if op.probe_plan() != plan.as_deref() {
                op.set_probe_plan(plan)?;
            }
        }
        Ok(())
    }

    /// The attention op of layer `layer`, e.g. to set its ℓ, its routing or a calibration
    /// recorder.
    pub fn attention_mut(&mut self, layer: usize) -> Result<&mut SaapAttention> {
        let n = self.attn.len();
        self.attn
            .get_mut(layer)
            .ok_or_else(|| Error::Model(format!("layer {layer} out of range (model has {n})")))
    }

    /// Deep copies of every layer's op and sequences (see [`SaapAttention::snapshot`]), to decode
    /// several ways after one shared prefill.
    pub fn snapshot_attention(&self) -> Result<Vec<SaapAttention>> {
        Ok(self
            .attn
            .iter()
            .map(SaapAttention::snapshot)
            .collect::<crate::Result<_>>()?)
    }

    /// Puts back a deep copy of ops taken with [`Llama::snapshot_attention`] (one per layer),
    /// so the same snapshot can be restored again later.
    pub fn restore_attention(&mut self, snapshot: &[SaapAttention]) -> Result<()> {
        if snapshot.len() != self.attn.len() {
            return Err(Error::Model(format!(
                "{} attention ops for {} layers",
                snapshot.len(),
                self.attn.len()
            )));
        }
        self.attn = snapshot
            .iter()
            .map(SaapAttention::snapshot)
            .collect::<crate::Result<_>>()?;
        // The restored routings, planned under the policy in force now.
        self.plan_probes()
    }

    /// Prefill chunk that suits the device: 512 tokens on the CPU (bounded activations), 8192 on
    /// CUDA, where the prefill kernel needs a few thousand queries per chunk to fill the GPU
    /// (at 512, a 2-KV-head model runs ~60 blocks on 132 SMs).
    pub fn default_prefill_chunk(&self) -> usize {
        if self.device.is_cuda() {
            8192
        } else {
            512
        }
    }

    /// Puts `ops` (one per layer, e.g. from [`Llama::snapshot_attention`]) in place of the
    /// current ones without copying them, and returns the ops it replaced.
    pub fn replace_attention(&mut self, ops: Vec<SaapAttention>) -> Result<Vec<SaapAttention>> {
        if ops.len() != self.attn.len() {
            return Err(Error::Model(format!(
                "{} attention ops for {} layers",
                ops.len(),
                self.attn.len()
            )));
        }
        Ok(std::mem::replace(&mut self.attn, ops))
    }

    /// Runs `tokens` (one sequence) through the model in prefill chunks of `chunk` tokens,
    /// appending to the caches; returns the logits of the last token, `[vocab]` (f32).
    ///
    /// # Errors
    /// [`Error::Model`] for no tokens or a token outside the vocabulary; errors of the ops.
    pub fn prefill_chunked(&mut self, tokens: &[u32], chunk: usize) -> Result<Tensor> {
        Ok(self.prefill_batch(&[tokens], chunk)?.squeeze(0)?)
    }

    /// Prefills a batch of prompts of different lengths (one sequence each, right padded) in
    /// chunks of `chunk` tokens: an item whose prompt has run out takes part in later chunks
    /// with length 0. Returns the logits of each item's last prompt token, `[B, vocab]` (f32).
    ///
    /// # Errors
    /// [`Error::Model`] for an empty batch or an empty prompt, or a token outside the
    /// vocabulary; errors of the ops.
    pub fn prefill_batch(&mut self, prompts: &[&[u32]], chunk: usize) -> Result<Tensor> {
        self.prefill_batch_with_progress(prompts, chunk, &mut |_| {})
    }

    /// [`Llama::prefill_batch`], calling `progress` after each chunk with the prompt tokens
    /// prefilled so far (over all items).
    ///
    /// # Errors
    /// As [`Llama::prefill_batch`].
    pub fn prefill_batch_with_progress(
        &mut self,
        prompts: &[&[u32]],
        chunk: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::Model("prefill of no tokens".into()));
        }
        let chunk = chunk.max(1);
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut last: Vec<Option<Tensor>> = vec![None; prompts.len()];
        let mut done = 0;
        for at in (0..longest).step_by(chunk) {
            let width = chunk.min(longest - at);
            let lens: Vec<usize> = prompts
                .iter()
                .map(|p| p.len().saturating_sub(at).min(width))
                .collect();
            let mut ids = vec![0u32; prompts.len() * width];
            for (i, (p, &len)) in prompts
                .iter()
                .zip(&lens)
                .enumerate()
                .filter(|(_, (_, &l))| l > 0)
            {
                ids[i * width..i * width + len].copy_from_slice(&p[at..at + len]);
            }
            let tokens = Tensor::from_vec(ids, (prompts.len(), width), &self.device)?;
            let logits = self.forward_last(&tokens, &lens)?;
            for (i, &len) in lens.iter().enumerate() {
                if len > 0 {
                    last[i] = Some(logits.get(i)?);
                }
            }
            done += lens.iter().sum::<usize>();
            progress(done);
        }
        let last: Vec<Tensor> = last.into_iter().flatten().collect();
        Ok(Tensor::stack(&last, 0)?)
    }

    /// Applies `set` to every layer's op, stopping at the first refusal.
    fn each_op(
        &mut self,
        mut set: impl FnMut(&mut SaapAttention) -> crate::Result<()>,
    ) -> Result<()> {
        for op in &mut self.attn {
            set(op)?;
        }
        Ok(())
    }

    /// Sets every layer's budget of keys read per decode step (a share of the context, window and
    /// sinks included; see [`SaapAttention::set_keys_budget`]), or `None` for fixed ℓ.
    ///
    /// # Errors
    /// [`Error::Saap`] unless the budget is finite and in (0, 1].
    pub fn set_keys_budget(&mut self, budget: Option<f64>) -> Result<()> {
        self.each_op(|op| op.set_keys_budget(budget))
    }

    /// Sets every layer's recent window (see [`SaapAttention::set_window`]): smaller at any
    /// time (the tokens leaving it are indexed at once), larger only before the first prefill.
    ///
    /// # Errors
    /// [`Error::Saap`] as [`SaapAttention::set_window`]; every layer holds the same tokens, so a
    /// refusal comes from the first layer with nothing changed.
    pub fn set_window(&mut self, window: usize) -> Result<()> {
        self.each_op(|op| op.set_window(window))
    }

    /// Sets every layer's adaptive probing (top-p; see [`SaapAttention::set_probe_mass`]), or
    /// `None` for ℓ partitions per head.
    ///
    /// # Errors
    /// [`Error::Saap`] unless the mass is finite and in (0, 1].
    pub fn set_probe_mass(&mut self, mass: Option<f64>) -> Result<()> {
        self.each_op(|op| op.set_probe_mass(mass))
    }

    /// Sets whether every layer's routed decode steps estimate the partitions they do not read
    /// from their means (see [`SaapAttention::set_estimate_unread`]).
    pub fn set_estimate_unread(&mut self, on: bool) {
        for op in &mut self.attn {
            op.set_estimate_unread(on);
        }
    }

    /// Sets what every layer's Quest pages keep (see [`SaapAttention::set_page_score`]).
    ///
    /// # Errors
    /// [`Error::Saap`] as [`SaapAttention::set_page_score`].
    pub fn set_page_score(&mut self, score: PageScore) -> Result<()> {
        self.each_op(|op| op.set_page_score(score))
    }

    /// Sets how every layer's Quest pages cut the indexed keys (see
    /// [`SaapAttention::set_page_layout`]).
    ///
    /// # Errors
    /// [`Error::Saap`] as [`SaapAttention::set_page_layout`] (a model run without an index has
    /// no partitions to cut).
    pub fn set_page_layout(&mut self, layout: PageLayout) -> Result<()> {
        self.each_op(|op| op.set_page_layout(layout))
    }

    /// How layer `layer` chooses the keys it reads at decode. The layers' probe plans follow
    /// (see [`Llama::set_budget_by_layer`]); changing a routing through [`Llama::attention_mut`]
    /// instead leaves the other layers' plans as they were.
    ///
    /// # Errors
    /// [`Error::Saap`] for a layer the model does not have, or a routing the op refuses.
    pub fn set_routing(&mut self, layer: usize, routing: Routing) -> Result<()> {
        self.attention_mut(layer)?.set_routing(routing)?;
        self.plan_probes()
    }

    /// Serves every layer sparse, the layers the index serves dense included: each by the
    /// classifier, or with `hybrid` by the routing the attached index recorded for it
    /// ([`SaapIndex::sparse_routing`]: Quest in the layers where calibration found Quest's pages
    /// holding more of the held-out attention than the classifier's partitions at equal keys).
    /// Quest layers read pages to fit the keys budget ([`Llama::set_keys_budget`]) and without
    /// one [`crate::config::DEFAULT_QUEST_PAGES`]; the budget's per-layer plan covers the
    /// classifier layers, and the Quest layers too where the index holds Quest curves. The
    /// hybrid is for long contexts: on Qwen2.5-Coder-0.5B it kept perplexity within 1% of dense
    /// at 120k with 5.7% of the keys, but at 32k did worse than the classifier alone
    /// (bench/results/2026-11-27-h200-hybrid32).
    ///
    /// # Errors
    /// [`Error::Model`] with no index attached; [`Error::Saap`] for a routing an op refuses, with
    /// every layer left as it was (all or nothing).
    pub fn serve_all_sparse(&mut self, hybrid: bool) -> Result<()> {
        if self.sparse_routing.len() != self.attn.len() {
            return Err(Error::Model(
                "serving every layer sparse needs an attached index".into(),
            ));
        }
        let targets = match hybrid {
            true => self.sparse_routing.clone(),
            false => vec![Routing::Classifier; self.attn.len()],
        };
        let before = self.routings();
        if let Err(refused) = self.switch_routings(&targets) {
            // The layers switched before the one that refused go back.
            if let Err(restore) = self.switch_routings(&before) {
                return Err(Error::Model(format!(
                    "{refused}; restoring the previous routings failed too: {restore}"
                )));
            }
            return Err(refused);
        }
        Ok(())
    }

    /// Sets each layer's routing to `routings` where it differs (a switch ends the op's replay and
    /// may merge its window), then re-plans the probes.
    fn switch_routings(&mut self, routings: &[Routing]) -> Result<()> {
        for (op, &routing) in self.attn.iter_mut().zip(routings) {
            if op.routing() != routing {
                op.set_routing(routing)?;
            }
        }
        self.plan_probes()
    }

    /// Number of decoder layers.
    pub fn n_layers(&self) -> usize {
        self.config.n_layers
    }

    /// Keeps the batch items whose `keep` flag is set in every layer and drops the others (e.g.
    /// sequences that reached their end of text; see [`SaapAttention::retain`]): later calls
    /// carry one row per kept item, in order, and decode them as if the dropped ones had never
    /// been in the batch. Keeping none forgets every sequence, as [`Llama::reset`] does. Decoding
    /// through a [`crate::graph::DecodeGraph`], retain through
    /// [`crate::graph::DecodeGraph::retain`] instead.
    ///
    /// # Errors
    /// [`Error::Saap`] as [`SaapAttention::retain`]: while replaying, before any prefill, or
    /// unless `keep` has one flag per item. Every layer holds the same batch, so these come from
    /// the first layer with nothing changed.
    pub fn retain(&mut self, keep: &[bool]) -> Result<()> {
        self.each_op(|op| op.retain(keep))
    }

    /// Forgets the sequence(s) in every layer.
    pub fn reset(&mut self) {
        self.attn.iter_mut().for_each(SaapAttention::reset);
    }

    /// Tokens cached per batch item (empty before the first forward).
    pub fn seq_lens(&self) -> &[usize] {
        self.attn.first().map_or(&[], |a| a.seq_lens())
    }

    /// How each layer chooses the keys it reads now.
    pub fn routings(&self) -> Vec<Routing> {
        self.attn.iter().map(SaapAttention::routing).collect()
    }

    /// Keys read by each layer in the last decode step (`None` before any decode).
    pub fn read_stats(&self) -> Vec<Option<ReadStats>> {
        self.attn.iter().map(SaapAttention::last_read).collect()
    }

    /// Runs `tokens` (`[B, T]`, u32; item `b` valid for its first `lens[b]` tokens, right
    /// padded) through the model, appending to the caches: a prefill chunk when `T > 1` (or some
    /// item has no token), a decode step when `T == 1`. Returns logits `[B, T, vocab]` (f32);
    /// rows past `lens[b]` are meaningless.
    pub fn forward(&mut self, tokens: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let h = self.hidden(tokens, lens)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// Like [`Llama::forward`], but returns only the logits of each item's last valid token,
    /// `[B, vocab]` (f32), which skips the LM head on every other position. An item with
    /// `lens[b] == 0` gets the logits of its first (padding) position.
    pub fn forward_last(&mut self, tokens: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let h = self.hidden(tokens, lens)?;
        let rows = h
            .chunk(h.dim(0)?, 0)?
            .iter()
            .zip(lens)
            .map(|(hb, &n)| hb.narrow(1, n.saturating_sub(1), 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let h = Tensor::cat(&rows, 0)?.squeeze(1)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// Final-normed hidden states `[B, T, hidden]`.
    fn hidden(&mut self, tokens: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (b, t) = tokens
            .dims2()
            .map_err(|_| Error::Model(format!("tokens must be [B, T], got {:?}", tokens.dims())))?;
        if b == 0 || t == 0 || lens.len() != b || lens.iter().any(|&n| n > t) {
            return Err(Error::Model(format!(
                "tokens {:?} need one length <= T per batch item, got lens {lens:?}",
                tokens.dims()
            )));
        }
        let tokens = tokens.to_dtype(DType::U32)?;
        let max = tokens.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            return Err(Error::Model(format!(
                "token id {max} out of the vocabulary ({})",
                self.config.vocab_size
            )));
        }
        self.layers_forward(&tokens, lens)
    }

    /// [`Llama::hidden`] after its checks: no host synchronization for a decode step (a
    /// [`crate::graph::DecodeGraph`] records it).
    fn layers_forward(&mut self, tokens: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let decode = t == 1 && lens.iter().all(|&n| n == 1);
        let l = self.config.layout;
        let (nq, nkv, d) = (l.n_q_heads, l.n_kv_heads, l.head_dim);
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?;
        let Some(first) = self.layers.first() else {
            return Ok(self.norm.forward(&x)?);
        };
        // Each residual add is fused with the norm that reads its sum: the next layer's
        // attention norm, or the final norm after the last layer.
        let mut h = first.attn_norm.forward(&x)?;
        for (i, (layer, attn)) in self.layers.iter().zip(self.attn.iter_mut()).enumerate() {
            let heads = |y: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
            };
            let qkv = layer.qkv.forward(&h)?;
            let (q, k, v) = (
                heads(&qkv[0], nq)?,
                heads(&qkv[1], nkv)?,
                heads(&qkv[2], nkv)?,
            );
            let o = if decode {
                attn.decode(&q, &k, &v)?
            } else {
                attn.prefill(&q, &k, &v, lens)?
            };
            let o = o.transpose(1, 2)?.reshape((b, t, nq * d))?;
            (x, h) = layer.ffn_norm.add_forward(&x, &layer.o.forward(&o)?)?;
            let mlp = layer.down.forward(&layer.gate_up.swiglu(&h)?)?;
            let next_norm = match self.layers.get(i + 1) {
                Some(next) => &next.attn_norm,
                None => &self.norm,
            };
            (x, h) = next_norm.add_forward(&x, &mlp)?;
        }
        Ok(h)
    }
}

/// Log-softmax cross-entropy of next-token predictions: mean over positions `0..T-1` of
/// `-log p(tokens[t + 1])` from `logits[t]`. `logits: [T, vocab]`, `tokens: [T]`.
pub fn mean_nll(logits: &Tensor, tokens: &[u32]) -> Result<f64> {
    let (t, _) = logits.dims2()?;
    if t != tokens.len() || t < 2 {
        return Err(Error::Model(format!(
            "need >= 2 positions and one token per logit row, got {t} rows and {} tokens",
            tokens.len()
        )));
    }
    let logp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, t - 1)?, D::Minus1)?;
    let targets = Tensor::new(&tokens[1..], logits.device())?.unsqueeze(1)?;
    let picked = logp.gather(&targets, 1)?.to_dtype(DType::F64)?;
    Ok(-picked.mean_all()?.to_scalar::<f64>()?)
}

struct GgufSource {
    content: gguf_file::Content,
    file: std::fs::File,
    device: Device,
    dequantize: Option<DType>,
}

impl GgufSource {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has(name) {
            return Err(Error::Model(format!("GGUF has no tensor `{name}`")));
        }
        Ok(self.content.tensor(&mut self.file, name, &self.device)?)
    }

    fn linear(&mut self, name: &str, bias: Option<&str>) -> Result<Linear> {
        let w = self.qtensor(name)?;
        let dtype = self.dequantize.unwrap_or(DType::F32);
        let b = match bias {
            Some(b) => Some(self.qtensor(b)?.dequantize(&self.device)?.to_dtype(dtype)?),
            None => None,
        };
        Ok(match self.dequantize {
            Some(dtype) => Linear::Plain(candle_nn::Linear::new(
                w.dequantize(&self.device)?.to_dtype(dtype)?,
                b,
            )),
            None => Linear::Quantized(QMatMul::from_qtensor(w)?, b),
        })
    }

    fn norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm> {
        let dtype = self.dequantize.unwrap_or(DType::F32);
        let w = self
            .qtensor(name)?
            .dequantize(&self.device)?
            .to_dtype(dtype)?;
        Ok(RmsNorm::new(w, eps))
    }
}

fn gguf_config(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
    device: &Device,
) -> Result<LlamaConfig> {
    let md = &content.metadata;
    let get = |key: &str| {
        md.get(key)
            .ok_or_else(|| Error::Model(format!("GGUF metadata has no `{key}`")))
    };
    let arch = get("general.architecture")?.to_string()?.clone();
    let architecture = match arch.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(Error::Model(format!(
                "GGUF architecture `{other}` is not supported (llama, qwen2)"
            )))
        }
    };
    let int =
        |key: &str| -> Result<usize> { Ok(get(&format!("{arch}.{key}"))?.to_u32()? as usize) };
    let hidden_size = int("embedding_length")?;
    let n_q_heads = int("attention.head_count")?;
    let n_kv_heads = int("attention.head_count_kv")?;
    let head_dim = match md.get(&format!("{arch}.attention.key_length")) {
        Some(v) => v.to_u32()? as usize,
        None => hidden_size / n_q_heads.max(1),
    };
    if let Some(rot) = md.get(&format!("{arch}.rope.dimension_count")) {
        if rot.to_u32()? as usize != head_dim {
            return Err(Error::Model(format!(
                "partial rotary embedding ({} of {head_dim} dims) is not supported",
                rot.to_u32()?
            )));
        }
    }
    let theta = match md.get(&format!("{arch}.rope.freq_base")) {
        Some(v) => v.to_f32()? as f64,
        None => 10_000.0,
    };
    let context_length = int("context_length")?;
    let scaling = match md.get(&format!("{arch}.rope.scaling.type")) {
        None => RopeScaling::None,
        Some(v) => match v.to_string()?.as_str() {
            "none" => RopeScaling::None,
            "yarn" => RopeScaling::Yarn {
                factor: get(&format!("{arch}.rope.scaling.factor"))?.to_f32()? as f64,
                original_max_positions: int("rope.scaling.original_context_length")?,
                beta_fast: 32.0,
                beta_slow: 1.0,
            },
            other => {
                return Err(Error::Model(format!(
                    "RoPE scaling `{other}` is not supported (yarn, Llama-3 via rope_freqs)"
                )))
            }
        },
    };
    let kind = match architecture {
        Architecture::Llama => RopeKind::Interleaved,
        Architecture::Qwen2 => RopeKind::Neox,
    };
    let mut rope = RopeConfig {
        kind,
        theta,
        scaling,
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        let factors = content
            .tensor(file, "rope_freqs.weight", device)?
            .dequantize(&Device::Cpu)?
            .to_vec1::<f32>()?;
        rope.scaling = llama3_from_factors(theta, head_dim, &factors)?;
    }
    let vocab_size = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::Model("GGUF has no `token_embd.weight`".into()))?
        .shape
        .dims()[0];
    let layout = HeadLayout {
        n_q_heads,
        n_kv_heads,
        head_dim,
    };
    Ok(LlamaConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: int("feed_forward_length")?,
        n_layers: int("block_count")?,
        layout,
        rms_eps: get(&format!("{arch}.attention.layer_norm_rms_epsilon"))?.to_f32()? as f64,
        rope,
        context_length,
    })
}

/// llama.cpp stores Llama-3 RoPE scaling as per-frequency divisors (`rope_freqs.weight`), not
/// as parameters. Recognise the published Llama 3.1 / 3.2 settings by reproducing the divisors.
fn llama3_from_factors(theta: f64, head_dim: usize, factors: &[f32]) -> Result<RopeScaling> {
    let candidates = [8.0, 32.0].map(|factor| RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_positions: 8192,
    });
    let base = RopeConfig {
        kind: RopeKind::Neox,
        theta,
        scaling: RopeScaling::None,
    };
    // The core's RoPE tables at position 1 hold (cos, sin) of each frequency itself.
    let freqs = |rope: RopeConfig| -> Result<Vec<f64>> {
        let (cos, sin) =
            crate::rope::Rope::new(&rope, head_dim).tables(&[1], 1, DType::F32, &Device::Cpu)?;
        let (cos, sin) = (
            cos.flatten_all()?.to_vec1::<f32>()?,
            sin.flatten_all()?.to_vec1::<f32>()?,
        );
        Ok(cos
            .iter()
            .zip(&sin)
            .map(|(&c, &s)| (s as f64).atan2(c as f64))
            .collect())
    };
    let plain = freqs(base)?;
    for scaling in candidates {
        let scaled = freqs(RopeConfig { scaling, ..base })?;
        let matches = factors.len() == plain.len()
            && plain
                .iter()
                .zip(&scaled)
                .zip(factors)
                .all(|((&p, &s), &f)| {
                    let ratio = p / s;
                    (ratio - f as f64).abs() <= 1e-3 * ratio
                });
        if matches {
            return Ok(scaling);
        }
    }
    Err(Error::Model(
        "rope_freqs.weight does not match Llama 3.1/3.2 scaling; set it with Llama::set_rope_scaling"
            .into(),
    ))
}

/// `(config, tied embeddings, q/k/v biases)` of a Hugging Face `config.json`.
fn hf_config(json: &serde_json::Value) -> Result<(LlamaConfig, bool, bool)> {
    let num = |key: &str| -> Result<f64> {
        json.get(key)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| Error::Model(format!("config.json has no number `{key}`")))
    };
    let int = |key: &str| -> Result<usize> { Ok(num(key)? as usize) };
    let model_type = json
        .get("model_type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("llama");
    let architecture = match model_type {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(Error::Model(format!(
                "model_type `{other}` is not supported (llama, qwen2)"
            )))
        }
    };
    let flag = |key: &str| json.get(key).and_then(serde_json::Value::as_bool);
    let bias = architecture == Architecture::Qwen2 || flag("attention_bias").unwrap_or(false);
    if flag("mlp_bias").unwrap_or(false) {
        return Err(Error::Model("mlp_bias is not supported".into()));
    }
    let hidden_size = int("hidden_size")?;
    let n_q_heads = int("num_attention_heads")?;
    let head_dim = match json.get("head_dim").and_then(serde_json::Value::as_u64) {
        Some(d) => d as usize,
        None => hidden_size / n_q_heads.max(1),
    };
    let scaling = match json.get("rope_scaling").filter(|v| !v.is_null()) {
        None => RopeScaling::None,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("default");
            let f = |key: &str, default: Option<f64>| -> Result<f64> {
                s.get(key)
                    .and_then(serde_json::Value::as_f64)
                    .or(default)
                    .ok_or_else(|| Error::Model(format!("rope_scaling has no `{key}`")))
            };
            match kind {
                "default" => RopeScaling::None,
                "llama3" => RopeScaling::Llama3 {
                    factor: f("factor", None)?,
                    low_freq_factor: f("low_freq_factor", None)?,
                    high_freq_factor: f("high_freq_factor", None)?,
                    original_max_positions: f("original_max_position_embeddings", None)? as usize,
                },
                "yarn" => RopeScaling::Yarn {
                    factor: f("factor", None)?,
                    original_max_positions: f("original_max_position_embeddings", None)? as usize,
                    beta_fast: f("beta_fast", Some(32.0))?,
                    beta_slow: f("beta_slow", Some(1.0))?,
                },
                other => {
                    return Err(Error::Model(format!(
                        "rope_scaling `{other}` is not supported (llama3, yarn)"
                    )))
                }
            }
        }
    };
    let config = LlamaConfig {
        architecture,
        vocab_size: int("vocab_size")?,
        hidden_size,
        intermediate_size: int("intermediate_size")?,
        n_layers: int("num_hidden_layers")?,
        layout: HeadLayout {
            n_q_heads,
            n_kv_heads: json
                .get("num_key_value_heads")
                .and_then(serde_json::Value::as_u64)
                .map_or(n_q_heads, |n| n as usize),
            head_dim,
        },
        rms_eps: num("rms_norm_eps")?,
        rope: RopeConfig {
            kind: RopeKind::Neox,
            theta: json
                .get("rope_theta")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(10_000.0),
            scaling,
        },
        context_length: int("max_position_embeddings")?,
    };
    Ok((config, flag("tie_word_embeddings").unwrap_or(false), bias))
}

/// Safetensors files of a checkpoint folder: the shards of the index, or the single file.
fn hf_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| Error::Model(format!("{} has no weight_map", index.display())))?;
        let mut files: Vec<&str> = map.values().filter_map(serde_json::Value::as_str).collect();
        files.sort_unstable();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(Error::Model(format!(
            "{} holds neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )))
    }
}

impl GraphDecoder for Llama {
    type Error = Error;

    fn attention_ops(&mut self) -> &mut [SaapAttention] {
        &mut self.attn
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn decode_logits(&mut self, tokens: &Tensor) -> Result<Tensor> {
        let batch = tokens.dim(0)?;
        let h = self.layers_forward(tokens, &vec![1; batch])?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?.squeeze(1)?)
    }
}
