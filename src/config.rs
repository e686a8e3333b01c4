//! Configuration: head layout, RoPE, and the Saap budget (partitions, probes, window, sinks).

use crate::error::{Result, SaapError};
use serde::{Deserialize, Serialize};

/// Most query heads (and so KV heads) a layer may have; models have at most a few hundred.
pub const MAX_HEADS: usize = 1024;
/// Largest head dimension; models use 64 to 256.
pub const MAX_HEAD_DIM: usize = 1024;
/// Most key partitions C; the paper uses 1024.
pub const MAX_PARTITIONS: usize = 1 << 16;
/// Widest classifier hidden layer.
pub const MAX_HIDDEN: usize = 1 << 16;
/// Largest window, number of sinks and merge interval, in tokens (16 Mi). Together they stay far
/// below the longest context, so position arithmetic on them cannot overflow.
pub const MAX_SPAN: usize = 1 << 24;
/// Longest context a sequence may hold: the index stores positions as u32.
pub const MAX_CONTEXT: usize = u32::MAX as usize;
/// Consecutive indexed tokens per page of [`Routing::Quest`] (the Quest paper's page size).
pub const QUEST_PAGE: usize = 16;
/// Most pages [`Routing::Quest`] ranks in one step, i.e. at most 262,144 indexed tokens
/// (sinks and window come on top). Both backends refuse more, so that they agree; the limit is
/// the CUDA side's shared memory: Quest's top-k block holds 3 words per page (194 KiB at 16,384
/// pages) and the decode kernel 2 words per page it reads (140 KiB when it reads them all),
/// within the 227 KiB a block of an H100 or H200 may opt in to. On a GPU with less, the top-k
/// falls back to candle ops, whose CUDA `arg_sort` ranks at most [`MAX_CANDLE_SORT`] pages.
pub const MAX_QUEST_PAGES: usize = 16384;
/// Most columns candle's CUDA `arg_sort` sorts (a row padded to a power of two in shared
/// memory): Quest's candle-ops routing on a CUDA device refuses more pages with a typed error.
pub const MAX_CANDLE_SORT: usize = 8192;
/// Pages a KV group reads per [`Routing::Quest`] step without a keys budget: 64 pages, 1024
/// indexed tokens, a token budget of the size the Quest paper evaluates.
pub const DEFAULT_QUEST_PAGES: usize = 64;

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
        if self.n_q_heads > MAX_HEADS || self.head_dim > MAX_HEAD_DIM {
            return Err(SaapError::Config(format!(
                "head layout {self:?} beyond {MAX_HEADS} heads or head_dim {MAX_HEAD_DIM}"
            )));
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
        let bad = |why: &str| {
            SaapError::Config(format!(
                "RoPE scaling {:?}: {why} (all values finite)",
                self.scaling
            ))
        };
        let factor = match self.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                // A non-positive or infinite factor makes wavelength thresholds of 0 or ±inf.
                if !(low_freq_factor.is_finite()
                    && high_freq_factor.is_finite()
                    && 0.0 < low_freq_factor
                    && low_freq_factor < high_freq_factor)
                    || original_max_positions == 0
                {
                    return Err(bad(
                        "Llama-3 scaling needs 0 < low_freq_factor < high_freq_factor and a training length",
                    ));
                }
                factor
            }
            RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
            } => {
                // beta_slow <= 0 puts the log of a non-positive number into the ramp: NaN
                // frequencies, so NaN keys.
                if !(beta_fast.is_finite() && 0.0 < beta_slow && beta_slow < beta_fast)
                    || original_max_positions == 0
                {
                    return Err(bad(
                        "YaRN needs 0 < beta_slow < beta_fast and a training length",
                    ));
                }
                factor
            }
        };
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(bad("the factor must be >= 1"));
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
    /// Default budget of keys read per decode step, a share of the context in (0, 1] with
    /// window and sinks included: an op built from this config picks ℓ (or Quest's pages) at
    /// every step to fit it (see `SaapAttention::set_keys_budget`, which overrides it). `None`:
    /// ℓ stays `n_probe`. Saved with an index; absent from older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_budget: Option<f64>,
}

impl SaapConfig {
    /// A configuration with the paper's defaults scaled to `n_partitions`: ℓ = C/32, window 2048,
    /// 16 sinks, merges every 256 tokens, classifier hidden width 256.
    ///
    /// # Errors
    /// [`SaapError::Config`] when the result fails [`SaapConfig::validate`].
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
            keys_budget: None,
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
    ///
    /// # Errors
    /// [`SaapError::Config`] when the result fails [`SaapConfig::validate`] (an invalid layout
    /// or RoPE).
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
    ///
    /// Limits: heads `1..=`[`MAX_HEADS`], with `n_kv_heads` dividing `n_q_heads`; an even
    /// `head_dim` in `2..=`[`MAX_HEAD_DIM`]; C in `1..=`[`MAX_PARTITIONS`]; ℓ in `1..=C`; hidden
    /// width in `1..=`[`MAX_HIDDEN`]; `window` and `sinks` in `0..=`[`MAX_SPAN`] and `merge_every`
    /// in `1..=`[`MAX_SPAN`]; RoPE theta finite and > 1, scaling factors finite and ordered; a keys
    /// budget finite in (0, 1].
    ///
    /// # Errors
    /// [`SaapError::Config`] naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        self.layout.validate()?;
        self.rope.validate()?;
        let range = |name: &str, value: usize, min: usize, max: usize| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(SaapError::Config(format!(
                    "{name} = {value} is outside {min}..={max}"
                )))
            }
        };
        range("n_partitions (C)", self.n_partitions, 1, MAX_PARTITIONS)?;
        range("n_probe (ℓ)", self.n_probe, 1, self.n_partitions)?;
        range("classifier hidden width", self.hidden, 1, MAX_HIDDEN)?;
        range("window", self.window, 0, MAX_SPAN)?;
        range("sinks", self.sinks, 0, MAX_SPAN)?;
        range("merge_every", self.merge_every, 1, MAX_SPAN)?;
        check_share(
            "keys_budget (share of the context's keys)",
            self.keys_budget,
        )
    }

    /// The same configuration with another ℓ, validated.
    ///
    /// # Errors
    /// [`SaapError::Config`] unless `1 <= n_probe <= C`.
    pub fn with_n_probe(&self, n_probe: usize) -> Result<Self> {
        let config = Self {
            n_probe,
            ..self.clone()
        };
        config.validate()?;
        Ok(config)
    }
}

/// [`SaapError::Config`] naming `what` unless `share` is absent or finite and in (0, 1] (a keys
/// budget, a probe mass).
pub(crate) fn check_share(what: &str, share: Option<f64>) -> Result<()> {
    match share {
        Some(x) if !(x.is_finite() && x > 0.0 && x <= 1.0) => Err(SaapError::Config(format!(
            "{what} must be in (0, 1], got {x}"
        ))),
        _ => Ok(()),
    }
}

/// What a page of [`Routing::Quest`] keeps of its post-RoPE keys, and so how a query scores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageScore {
    /// Quest's: the elementwise min and max, scored by the upper bound
    /// `Σ_d max(q_d·min_d, q_d·max_d)` of the page's `q·k`.
    #[default]
    Bound,
    /// The mean key k̄, scored by `q·k̄`: a bound's looseness grows with the page's spread, so
    /// pages of spread-out keys outrank the rest whatever the query, where a mean ranks them by
    /// what they hold. Kept as min = max = k̄, so the same scores and kernels apply, over one
    /// tensor. Measured (bench/NOTES.md §52–53, Qwen2.5): more indexed mass at equal keys at
    /// 120k (0.501 vs 0.408) and lower perplexity with Quest in every layer, but higher in the
    /// calibrated hybrid, whose Quest layers were chosen with the bound.
    Mean,
    /// The mean key k̄ too, but a KV group ranks pages by its heads' *summed* estimated shares
    /// of their mass per key, `Σ_h exp(s·q_h·k̄_p − LSE_h)` with
    /// `LSE_h = log Σ_p′ n_p′·exp(s·q_h·k̄_p′)` over the item's pages (n the page's keys,
    /// s = 1/√D), where `Mean` takes the best head's `q·k̄`: a page the whole group wants then
    /// outranks one a single head rates highly. Scored with candle ops (about twenty launches a
    /// layer), the best pages then picked by Quest's selection kernels on a CUDA device.
    /// Measured offline (bench/NOTES.md §63, §67, at Saap's keys over partition pages of 16 / 4
    /// keys): Qwen2.5 32k (G = 7) 0.432 / 0.532 of the indexed mass against the mean's 0.373 /
    /// 0.444, at 120k 0.541 / 0.658 against 0.467 / 0.547 with a lower output error; SmolLM2 8k
    /// (G = 3) 0.534 / 0.621 against 0.515 / 0.585. End to end it is **not** the better choice
    /// (§66, H200, Qwen2.5, batch 8): at 32k a little lower perplexity than `Mean` (×1.0111
    /// against ×1.0124 over pages of 4 at 10%) but decoding slower than dense (0.68–0.98×, the
    /// mean 1.33–1.61×); at 120k higher perplexity (×1.0237 against ×1.0070 at 4%, cause not
    /// found).
    Shares,
}

/// How [`Routing::Quest`] cuts the indexed keys into pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageLayout {
    /// Quest's: [`QUEST_PAGE`] consecutive positions, page `p` holding `sinks + 16p ..` (no
    /// index needed).
    #[default]
    Consecutive,
    /// Each partition's list of the index (its keys in position order) cut into pages of `page`
    /// keys (1 ..= [`QUEST_PAGE`]; each list's last page may be shorter): a two-level route,
    /// pages of keys the k-means grouped together ranked by the Quest route. Needs an index. A
    /// partition's list only grows at its tail, so its pages keep their keys as tokens merge
    /// (only their numbers shift): a merge computes only the pages it grows or adds. Best with
    /// [`PageScore::Mean`]: a page spans the whole context, and the bound of so spread-out keys
    /// ranks badly (bench/NOTES.md §52: at equal keys, 0.52 of the indexed mass by mean against
    /// 0.10–0.20 by bound, SmolLM2 8k). Smaller pages hold more of the mass at equal keys (§60:
    /// 0.515 at 16 keys, 0.585 at 4, SmolLM2 8k) but a step scores every page: N/`page` means
    /// per KV head.
    Partitions {
        /// Keys per page.
        page: usize,
    },
}

impl PageLayout {
    /// Partition pages of [`QUEST_PAGE`] keys, Quest's page size.
    pub const PARTITIONS: Self = Self::Partitions { page: QUEST_PAGE };

    /// Whether the pages are cut over the index's partitions.
    pub fn over_partitions(self) -> bool {
        matches!(self, Self::Partitions { .. })
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
    /// Quest (Tang et al. 2024), training-free, needing no index: the indexed keys are cut into
    /// pages of [`QUEST_PAGE`] consecutive tokens, each with the elementwise min and max of its
    /// post-RoPE keys; a page's score for a post-RoPE query q is `Σ_d max(q_d·min_d, q_d·max_d)`,
    /// an upper bound of `q·k` over its keys ([`crate::quest::page_scores`]). A KV group reads
    /// the pages with the highest score of any of its G query heads (the bound of the group's
    /// best `q·k`), as many as [`crate::SaapAttention::set_quest_pages`] or the keys budget
    /// says, besides sinks and window: with one selection per group the keys read follow the
    /// budget (per-head top pages would read between one and G times as many).
    Quest,
}
