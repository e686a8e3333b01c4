//! Configuration: head layout, RoPE, and the Saap budget (partitions, probes, window, sinks).

use crate::error::{Result, SaapError};
use serde::{Deserialize, Serialize};

/// Attention head layout of one model layer (grouped-query attention when `n_q_heads > n_kv_heads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadLayout {
    /// Query heads.
    pub n_q_heads: usize,
    /// Key/value heads; must divide `n_q_heads`.
    pub n_kv_heads: usize,
    /// Dimension of one head (even, for RoPE).
    pub head_dim: usize,
}

impl HeadLayout {
    /// Query heads served by one KV head.
    pub fn group_size(&self) -> usize {
        self.n_q_heads / self.n_kv_heads
    }

    fn validate(&self) -> Result<()> {
        if self.n_q_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return Err(SaapError::Config(format!("empty head layout {self:?}")));
        }
        if self.n_q_heads % self.n_kv_heads != 0 {
            return Err(SaapError::Config(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.n_q_heads, self.n_kv_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(SaapError::Config(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim
            )));
        }
        Ok(())
    }
}

/// How the two halves of a rotary pair are laid out in a head vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeKind {
    /// Pairs are adjacent elements (2i, 2i+1): GGUF `llama` checkpoints.
    Interleaved,
    /// Pairs are (i, i + D/2): Hugging Face Llama, Qwen2 (NEOX style).
    Neox,
}

/// Frequency scaling for contexts beyond the model's training length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Context extension factor.
        factor: f64,
        /// Wavelengths above `original_max_positions / low_freq_factor` are fully interpolated.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_positions / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Training context of the base model.
        original_max_positions: usize,
    },
    /// YaRN (NTK-by-parts interpolation with attention temperature).
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Training context of the base model.
        original_max_positions: usize,
        /// Rotations per context above which a dimension is extrapolated (default 32).
        beta_fast: f64,
        /// Rotations per context below which a dimension is interpolated (default 1).
        beta_slow: f64,
    },
}

/// Rotary position embedding of a model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Pair layout.
    pub kind: RopeKind,
    /// Base frequency θ.
    pub theta: f64,
    /// Context scaling.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    fn validate(&self) -> Result<()> {
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(SaapError::Config(format!(
                "RoPE theta {} must be > 1",
                self.theta
            )));
        }
        let factor = match self.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                if high_freq_factor.partial_cmp(&low_freq_factor)
                    != Some(std::cmp::Ordering::Greater)
                    || original_max_positions == 0
                {
                    return Err(SaapError::Config(format!(
                        "Llama-3 RoPE scaling needs high_freq_factor > low_freq_factor and a training length: {:?}",
                        self.scaling
                    )));
                }
                factor
            }
            RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
            } => {
                if beta_fast.partial_cmp(&beta_slow) != Some(std::cmp::Ordering::Greater)
                    || original_max_positions == 0
                {
                    return Err(SaapError::Config(format!(
                        "YaRN needs beta_fast > beta_slow and a training length: {:?}",
                        self.scaling
                    )));
                }
                factor
            }
        };
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(SaapError::Config(format!(
                "RoPE scaling factor {factor} must be >= 1"
            )));
        }
        Ok(())
    }
}

/// Everything that defines how Saap indexes and reads one model's KV cache.
///
/// C (`n_partitions`) is the number of k-means partitions of each KV head's keys; ℓ (`n_probe`)
/// the number of partitions each query head reads at a decode step, on top of the `window` most
/// recent tokens and the first `sinks` tokens.
///
/// ```
/// use saap::{HeadLayout, RopeConfig, RopeKind, RopeScaling, SaapConfig};
///
/// // SmolLM2-135M: 9 query heads, 3 KV heads of 64 dimensions, interleaved RoPE, θ = 1e5.
/// let layout = HeadLayout { n_q_heads: 9, n_kv_heads: 3, head_dim: 64 };
/// let rope = RopeConfig { kind: RopeKind::Interleaved, theta: 1e5, scaling: RopeScaling::None };
/// let config = SaapConfig::for_context(layout, rope, 8192)?;
/// assert_eq!(config.n_partitions, 256); // C
/// assert_eq!(config.n_probe, 5); // ℓ
/// assert_eq!((config.window, config.sinks), (512, 4));
/// assert!(config.with_n_probe(257).is_err()); // ℓ > C is refused
/// # Ok::<(), saap::SaapError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaapConfig {
    /// Head layout of every layer.
    pub layout: HeadLayout,
    /// Rotary embedding the op applies to pre-RoPE queries and keys.
    pub rope: RopeConfig,
    /// Number of key partitions C (k-means centroids per KV head).
    pub n_partitions: usize,
    /// Partitions read per query head at decode (ℓ); `n_probe == n_partitions` is exact attention.
    pub n_probe: usize,
    /// Most recent tokens always attended (never looked up through the index).
    pub window: usize,
    /// First tokens always attended (attention sinks).
    pub sinks: usize,
    /// Tokens leaving the window are merged into the index once this many have accumulated.
    pub merge_every: usize,
    /// Hidden width of the per-query-head classifier MLP (D → hidden → C).
    pub hidden: usize,
}

impl SaapConfig {
    /// A configuration with the paper's defaults scaled to `n_partitions`: ℓ = C/32, window 2048,
    /// 16 sinks, merges every 256 tokens, classifier hidden width 256.
    pub fn new(layout: HeadLayout, rope: RopeConfig, n_partitions: usize) -> Result<Self> {
        let config = Self {
            layout,
            rope,
            n_partitions,
            n_probe: (n_partitions / 32).max(1),
            window: 2048,
            sinks: 16,
            merge_every: 256,
            hidden: 256,
        };
        config.validate()?;
        Ok(config)
    }

    /// Defaults sized to a model's context length `context`:
    /// - C = `context / 32` rounded to a power of two, in 16..=1024 (the paper's 1024 partitions
    ///   at 128k+ tokens; at shorter contexts about 32 keys per partition, so that ℓ = C/32
    ///   partitions are still a fine-grained 3% of the keys);
    /// - ℓ = C / (16·G) for G query heads per KV head, at least 1: a decode step reads the union
    ///   of the G heads' partitions, at most G·ℓ/C ≈ 6% of the indexed keys (overlapping heads
    ///   read less); C / 32 per head made Qwen2.5's 7-head groups read 13–22% at 32k;
    /// - window = `context / 16` in 64..=2048 and 4 sinks below 64k tokens, 16 above.
    pub fn for_context(layout: HeadLayout, rope: RopeConfig, context: usize) -> Result<Self> {
        let n_partitions = (context / 32).next_power_of_two().clamp(16, 1024);
        let mut config = Self::new(layout, rope, n_partitions)?;
        config.n_probe = (n_partitions / (16 * layout.group_size())).max(1);
        config.window = (context / 16).clamp(64, 2048);
        config.sinks = if context < 65_536 { 4 } else { 16 };
        config.merge_every = (config.window / 8).max(1);
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; called by every constructor that takes a config.
    pub fn validate(&self) -> Result<()> {
        self.layout.validate()?;
        self.rope.validate()?;
        if self.n_partitions == 0 || self.n_partitions > u32::MAX as usize / 2 {
            return Err(SaapError::Config(format!(
                "n_partitions {} out of range",
                self.n_partitions
            )));
        }
        if self.n_probe == 0 || self.n_probe > self.n_partitions {
            return Err(SaapError::Config(format!(
                "n_probe (ℓ = {}) must be in 1..={} (C)",
                self.n_probe, self.n_partitions
            )));
        }
        if self.merge_every == 0 {
            return Err(SaapError::Config("merge_every must be >= 1".into()));
        }
        if self.hidden == 0 {
            return Err(SaapError::Config(
                "classifier hidden width must be >= 1".into(),
            ));
        }
        Ok(())
    }

    /// The same configuration with another ℓ, validated.
    pub fn with_n_probe(&self, n_probe: usize) -> Result<Self> {
        let config = Self {
            n_probe,
            ..self.clone()
        };
        config.validate()?;
        Ok(config)
    }
}

/// How a layer chooses the keys it reads at decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Routing {
    /// Every key: exact attention (also used for layers no index can serve well).
    Dense,
    /// Saap: the trained classifier ranks partitions for each query head.
    Classifier,
    /// Ablation of the paper: a query goes to the partitions whose centroids are nearest to it.
    NearestCentroid,
}
