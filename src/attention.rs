//! `SaapAttention`: the op a model calls in each layer. It owns the layer's per-sequence state —
//! the time-ordered K/V cache and the partition index — and runs prefill (dense, causal) and
//! decode (sparse through the index, or dense).

use crate::attend::decode::{page_offsets, AdvanceReplay};
use crate::attend::{prefill_attention, DecodeOp, Partitions, SeqExtent};
use crate::classify::{centroid_scores, probes_to_mass, top_probes, Classifier};
use crate::config::{
    check_share, PageLayout, PageScore, Routing, SaapConfig, DEFAULT_QUEST_PAGES, MAX_CONTEXT,
    MAX_QUEST_PAGES, QUEST_PAGE,
};
use crate::error::{ensure_finite, Result, SaapError};
use crate::index::SaapIndex;
use crate::partition::assign::{assign_rows, prepare_centroids};
use crate::partition::scan::{dir_len, merge, MergeOp};
use crate::partition::summary::Summaries;
use crate::quest::{pages_of, PageCut, QuestPages};
use crate::rope::{KvWrite, Rope};
use candle_core::{DType, Device, Tensor};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Keys read by one decode call, summed over batch items and KV heads. Each key read is one K row
/// and one V row of `head_dim` elements, shared by the G query heads of its group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Keys attended (sinks + probed partitions + window).
    pub keys_read: usize,
    /// Of those, keys in the sinks and the recent window.
    pub window_and_sinks: usize,
    /// Keys in the context (what dense attention reads).
    pub keys_in_context: usize,
    /// Partitions probed (union over a group's query heads, summed).
    pub partitions_probed: usize,
    /// Unread partitions estimated from their means (with
    /// [`SaapAttention::set_estimate_unread`]): one K and one V row each, read beside the keys.
    pub partitions_estimated: usize,
}

impl ReadStats {
    /// `keys_read / keys_in_context`.
    pub fn selectivity(&self) -> f64 {
        self.keys_read as f64 / self.keys_in_context.max(1) as f64
    }

    /// Selectivity among the indexed keys only (window and sinks left out of both counts).
    pub fn indexed_selectivity(&self) -> f64 {
        let indexed = self.keys_in_context - self.window_and_sinks;
        (self.keys_read - self.window_and_sinks) as f64 / indexed.max(1) as f64
    }

    /// Adds another call's counts (e.g. to total over layers).
    pub fn add(&mut self, other: &ReadStats) {
        self.keys_read += other.keys_read;
        self.window_and_sinks += other.window_and_sinks;
        self.keys_in_context += other.keys_in_context;
        self.partitions_probed += other.partitions_probed;
        self.partitions_estimated += other.partitions_estimated;
    }
}

/// One prefill call as seen by a [`Recorder`]: pre-RoPE queries and keys, and values, on the CPU
/// in f32.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `[B, Hq, T, D]`.
    pub q: Tensor,
    /// `[B, Hkv, T, D]`.
    pub k: Tensor,
    /// `[B, Hkv, T, D]`.
    pub v: Tensor,
    /// Valid tokens per batch item.
    pub lens: Vec<usize>,
    /// Position of the first token of each batch item.
    pub starts: Vec<usize>,
}

/// A hook that keeps what prefill calls see, for calibration ([`crate::train`]).
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Recorded>>>);

impl Recorder {
    /// A new empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes everything recorded so far.
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, record: Recorded) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }
}

/// Extents and lengths of the sequences before a call (`None`: no state yet).
type Undo = Option<(Vec<SeqExtent>, Vec<usize>)>;

/// One (batch item, KV head)'s index on the host: `(perm, offsets)`.
pub type IndexList = (Vec<u32>, Vec<u32>);

/// The trained routing state an op owns.
#[derive(Debug, Clone)]
struct Trained {
    /// `[Hkv, C, D]` f32, holding values rounded to the op's type for bf16/f16 ops.
    centroids: Tensor,
    /// `[Hkv, D, C]` f32 and `[Hkv, 1, C]` f32: what assignment derives from the centroids,
    /// computed once rather than on every step.
    centroids_t: Tensor,
    half_norms: Tensor,
    /// The centroids in the op's bf16/f16 type, on CUDA: prompts are assigned on tensor cores
    /// ([`assign_into`]).
    centroids_rounded: Option<Tensor>,
    /// Weights rounded to bf16 for bf16/f16 ops (held as bf16 on CUDA, as f32 holding the same
    /// values on the CPU), f32 for f32 ops; the arithmetic is f32 either way.
    classifier: Classifier,
}

/// Decode steps recorded once (into a CUDA graph) and replayed; see
/// [`SaapAttention::begin_replay`].
#[derive(Debug)]
struct Replay {
    /// Distinguishes this replay from every other one (of any op) in the process.
    id: u64,
    /// `[B]` u32 on the device: steps replayed so far, added to the positions the recorded
    /// kernels were given (the host's view of the sequences stays at the start of the replay).
    advance: Tensor,
    /// Whether this op advances `advance` after its step; not when the count is a
    /// [`ReplayClock`] shared by several ops, which its owner advances once per step.
    ticks: bool,
    /// Steps replayed so far (the host's count of `advance`).
    steps: usize,
    /// Steps the cache has rows for, with no window merge due.
    room: usize,
}

/// A device-side count of replayed decode steps shared by every op of a model (see
/// [`SaapAttention::begin_shared_replay`]): the model's step advances it once with
/// [`ReplayClock::tick`] instead of each layer's op launching its own advance.
#[derive(Debug, Clone)]
pub struct ReplayClock {
    /// `[B]` u32: steps replayed so far, per batch item.
    counts: Tensor,
    /// Whether a tick was ever enqueued: a replay must begin on a clock at 0.
    ticked: Arc<AtomicBool>,
}

impl ReplayClock {
    /// A clock at 0 for `batch` items on `device`.
    ///
    /// # Errors
    /// [`SaapError::Candle`] when the count cannot be allocated.
    pub fn new(batch: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            counts: Tensor::zeros(batch, DType::U32, device)?,
            ticked: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Enqueues one step's advance: the last launch of a recorded model step, after every op
    /// that read the count.
    ///
    /// # Errors
    /// [`SaapError::Candle`] when the launch fails.
    pub fn tick(&self) -> Result<()> {
        self.ticked.store(true, Ordering::Relaxed);
        Ok(self.counts.inplace_op1(&AdvanceReplay)?)
    }

    /// Batch items counted.
    pub fn batch(&self) -> usize {
        self.counts.elem_count()
    }
}

/// Source of [`Replay::id`].
static NEXT_REPLAY: AtomicU64 = AtomicU64::new(1);

/// Per-sequence state of one layer.
#[derive(Debug)]
struct State {
    /// `[2, B, Hkv, cap, D]`: the K cache, then the V cache, in one tensor so that one launch
    /// appends a step's keys and values.
    kv: Tensor,
    /// `[B, Hkv, cap, D]`, post-RoPE keys in time order: the first half of `kv`.
    k: Tensor,
    /// `[B, Hkv, cap, D]`: the second half of `kv`.
    v: Tensor,
    /// `[B, Hkv, cap]` u32: partition of every key (with an index).
    labels: Option<Tensor>,
    /// `[B, Hkv, C + 1 + cap]` u32: offsets then perm (with an index).
    dir: Option<Tensor>,
    /// Sums and means of every partition's indexed keys and values (with an index), kept at
    /// each merge so that the unread partitions can be estimated whenever asked.
    summaries: Option<Summaries>,
    /// Page bounds and directory, kept while the routing is [`Routing::Quest`].
    quest: Option<QuestPages>,
    seqs: Vec<SeqExtent>,
    lens: Vec<usize>,
    cap: usize,
}

/// Launches of a step that run beside its routing on CUDA (the append of keys and values, the
/// new key's assignment; see `crate::cuda::Side`), joined back before the attention reads the
/// cache. Elsewhere they run in order and there is nothing to join.
struct SideLaunches(#[cfg(feature = "cuda")] Option<crate::cuda::Side>);

impl SideLaunches {
    fn fork(device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        return Ok(Self(match device {
            Device::Cuda(dev) => Some(crate::cuda::Side::fork(dev)?),
            _ => None,
        }));
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self())
        }
    }

    /// Nothing left to join.
    fn joined() -> Self {
        Self(
            #[cfg(feature = "cuda")]
            None,
        )
    }

    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "cuda")]
        if let Some(side) = &self.0 {
            return side.run(f);
        }
        f()
    }

    fn join(self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(side) = self.0 {
            side.join()?;
        }
        Ok(())
    }
}

/// The K and V caches of a joint `[2, B, Hkv, cap, D]` cache (views of it) and the cache.
fn split_kv(kv: Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((kv.get(0)?, kv.get(1)?, kv))
}

/// Sparse attention of one layer (see the crate docs). Create one per layer with
/// [`SaapAttention::from_index`] (Saap) or [`SaapAttention::dense`] (exact attention, no index).
///
/// The model hands it **pre-RoPE** queries `[B, Hq, T, D]` and keys `[B, Hkv, T, D]` and values;
/// the op rotates q and k (with the config's [`crate::RopeConfig`]) and keeps the KV cache.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use saap::{HeadLayout, RopeConfig, RopeKind, RopeScaling, SaapAttention, SaapConfig};
///
/// let dev = Device::Cpu;
/// let layout = HeadLayout { n_q_heads: 4, n_kv_heads: 2, head_dim: 16 };
/// let rope = RopeConfig { kind: RopeKind::Neox, theta: 10_000.0, scaling: RopeScaling::None };
/// let config = SaapConfig::new(layout, rope, 16)?;
/// let mut attn = SaapAttention::dense(&config, &dev, DType::F32)?;
/// let qkv = |t: usize| -> candle_core::Result<[Tensor; 3]> {
///     Ok([
///         Tensor::randn(0f32, 1.0, (1, 4, t, 16), &dev)?,
///         Tensor::randn(0f32, 1.0, (1, 2, t, 16), &dev)?,
///         Tensor::randn(0f32, 1.0, (1, 2, t, 16), &dev)?,
///     ])
/// };
/// let [q, k, v] = qkv(10)?;
/// let out = attn.prefill(&q, &k, &v, &[10])?; // causal attention over the 10-token prompt
/// assert_eq!(out.dims(), &[1, 4, 10, 16]);
/// let [q, k, v] = qkv(1)?;
/// let next = attn.decode(&q, &k, &v)?; // one new token, appended to the cache
/// assert_eq!(next.dims(), &[1, 4, 1, 16]);
/// assert_eq!(attn.seq_lens(), &[11]);
/// // Without an index every key of both KV heads is read.
/// assert_eq!(attn.last_read().unwrap().keys_read, 2 * 11);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SaapAttention {
    config: SaapConfig,
    rope: Rope,
    device: Device,
    dtype: DType,
    index: Option<Trained>,
    routing: Routing,
    state: Option<State>,
    recorder: Option<Recorder>,
    track_reads: bool,
    check_finite: bool,
    last_read: Option<ReadStats>,
    replay: Option<Replay>,
    /// Share of the context's keys a decode step may read; ℓ follows it (`None`: ℓ fixed).
    keys_budget: Option<f64>,
    /// Classifier routing probes each head's partitions until their predicted mass reaches this
    /// (at most ℓ); `None`: always ℓ.
    probe_mass: Option<f64>,
    /// Pages a KV group reads per step with Quest routing (set by the keys budget, if any).
    quest_pages: usize,
    /// What Quest's pages keep of their keys, and so how a query ranks them.
    page_score: PageScore,
    /// How Quest's pages cut the indexed keys.
    page_layout: PageLayout,
    /// Whether partition-routed steps estimate the unread partitions from their means.
    estimate_unread: bool,
    /// Under a keys budget, this layer's ℓ (or Quest's point) for each column of budgets
    /// ([`crate::budget::plan_column`]); `None`: the budget alone.
    probe_plan: Option<Vec<usize>>,
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(SaapError::UnsupportedDType(other)),
    }
}

impl SaapAttention {
    /// Exact attention with no index (for models run without one, and for calibration).
    ///
    /// # Errors
    /// [`SaapError::Config`] for an invalid `config`; [`SaapError::UnsupportedDType`] unless `dtype`
    /// is f32, bf16 or f16.
    pub fn dense(config: &SaapConfig, device: &Device, dtype: DType) -> Result<Self> {
        config.validate()?;
        check_dtype(dtype)?;
        Ok(Self {
            config: config.clone(),
            rope: Rope::new(&config.rope, config.layout.head_dim),
            device: device.clone(),
            dtype,
            index: None,
            routing: Routing::Dense,
            state: None,
            recorder: None,
            track_reads: true,
            check_finite: true,
            last_read: None,
            replay: None,
            keys_budget: config.keys_budget,
            probe_mass: None,
            quest_pages: DEFAULT_QUEST_PAGES,
            page_score: PageScore::Bound,
            page_layout: PageLayout::Consecutive,
            estimate_unread: false,
            probe_plan: None,
        })
    }

    /// The op for layer `layer` of a trained index, with the layer's default routing.
    ///
    /// # Errors
    /// [`SaapError::IndexMismatch`] when the index has no layer `layer`; as
    /// [`SaapAttention::dense`] for the dtype; [`SaapError::Candle`] when the trained tensors cannot
    /// be moved to `device`.
    pub fn from_index(
        index: &SaapIndex,
        layer: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let entry = index.layer(layer)?;
        let mut op = Self::dense(index.config(), device, dtype)?;
        let c = &entry.classifier;
        let on_device =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(DType::F32)?) };
        // A bf16/f16 op assigns keys to its centroids rounded to that type, on both backends and
        // for prompts and decode tokens alike: the tensor-core assignment of prompts reads them
        // in that type, and the same values in f32 everywhere else keep one rule (dot products
        // then differ only in f32 summation order, as between the f32 kernels).
        let centroids = match dtype {
            DType::F32 => on_device(&entry.centroids)?,
            half => on_device(&entry.centroids.to_dtype(half)?)?,
        };
        let (centroids_t, half_norms) = prepare_centroids(&centroids)?;
        let centroids_rounded = (device.is_cuda() && dtype != DType::F32)
            .then(|| centroids.to_dtype(dtype))
            .transpose()?;
        op.index = Some(Trained {
            centroids,
            centroids_rounded,
            centroids_t,
            half_norms,
            classifier: c.prepared(dtype, device)?,
        });
        op.routing = entry.routing;
        Ok(op)
    }

    /// The configuration in force.
    pub fn config(&self) -> &SaapConfig {
        &self.config
    }

    /// How decode chooses keys now.
    pub fn routing(&self) -> Routing {
        self.routing
    }

    /// Switches routing; `Classifier` and `NearestCentroid` need an index, `Quest` does not.
    /// Switching to `Quest` computes the page bounds of the indexed keys. An op built dense
    /// indexes nothing until then: it first merges the tokens older than the window (as a decode
    /// step of an indexed op would), and from then on merges as an indexed op does, with
    /// whatever routing. Switching away from `Quest` drops the pages.
    ///
    /// # Errors
    /// [`SaapError::Config`] for `Classifier` or `NearestCentroid` routing on an op built dense,
    /// and for `Quest` on one with [`PageLayout::Partitions`] and no index;
    /// [`SaapError::Candle`] when the page bounds cannot be computed.
    pub fn set_routing(&mut self, routing: Routing) -> Result<()> {
        let partition_pages = routing == Routing::Quest && self.page_layout.over_partitions();
        let needs_index =
            matches!(routing, Routing::Classifier | Routing::NearestCentroid) || partition_pages;
        if needs_index && self.index.is_none() {
            return Err(SaapError::Config(format!(
                "{routing:?} routing{} needs an index; this op has none",
                if partition_pages {
                    " over partition pages"
                } else {
                    ""
                }
            )));
        }
        self.end_replay();
        self.routing = routing;
        self.merge_window(self.config.merge_every - 1)
    }

    /// Sets the pages a KV group reads per decode step with [`Routing::Quest`], `1..=`
    /// [`MAX_QUEST_PAGES`] (default [`DEFAULT_QUEST_PAGES`]); a step reads all P pages when
    /// there are fewer. A keys budget ([`SaapAttention::set_keys_budget`]) replaces it at every
    /// step. Other routings ignore it.
    ///
    /// # Errors
    /// [`SaapError::Config`] unless `1 <= n_pages <= MAX_QUEST_PAGES`.
    pub fn set_quest_pages(&mut self, n_pages: usize) -> Result<()> {
        if !(1..=MAX_QUEST_PAGES).contains(&n_pages) {
            return Err(SaapError::Config(format!(
                "Quest pages per step = {n_pages} is outside 1..={MAX_QUEST_PAGES}"
            )));
        }
        self.end_replay();
        self.quest_pages = n_pages;
        Ok(())
    }

    /// Pages a KV group reads per step with [`Routing::Quest`] (where the keys budget put it).
    pub fn quest_pages(&self) -> usize {
        self.quest_pages
    }

    /// Sets what [`Routing::Quest`]'s pages keep of their keys and so how a query ranks them
    /// (default [`PageScore::Bound`], Quest's own). Pages kept for another score are rebuilt
    /// from the cache at once; other routings ignore it.
    ///
    /// # Errors
    /// [`SaapError::Candle`] when the pages cannot be computed (the score is set, with no pages:
    /// the next Quest step then reads every key, exactly, and the merge after it builds them).
    pub fn set_page_score(&mut self, score: PageScore) -> Result<()> {
        if score == self.page_score {
            return Ok(());
        }
        self.page_score = score;
        self.rebuild_pages()
    }

    /// Drops Quest's pages and builds them again (for a new score or layout), as a merge would.
    fn rebuild_pages(&mut self) -> Result<()> {
        self.end_replay();
        if let Some(state) = &mut self.state {
            state.quest = None;
        }
        self.merge_window(self.config.merge_every - 1)
    }

    /// What Quest's pages keep ([`SaapAttention::set_page_score`]).
    pub fn page_score(&self) -> PageScore {
        self.page_score
    }

    /// Sets how [`Routing::Quest`] cuts the indexed keys into pages (default
    /// [`PageLayout::Consecutive`], Quest's own). Pages kept for the other layout are rebuilt
    /// from the cache at once; other routings ignore it.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use saap::classify::Classifier;
    /// use saap::{HeadLayout, LayerIndex, PageLayout, PageScore, RopeConfig, RopeKind};
    /// use saap::{RopeScaling, Routing, SaapAttention, SaapConfig, SaapIndex};
    ///
    /// let dev = Device::Cpu;
    /// let layout = HeadLayout { n_q_heads: 4, n_kv_heads: 2, head_dim: 16 };
    /// let rope = RopeConfig { kind: RopeKind::Neox, theta: 10_000.0, scaling: RopeScaling::None };
    /// let mut config = SaapConfig::new(layout, rope, 8)?;
    /// (config.window, config.sinks, config.hidden) = (64, 4, 16);
    /// // An index of random centroids and classifier (`calibrate` trains real ones).
    /// let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
    /// let layer = LayerIndex {
    ///     centroids: randn(&[2, 8, 16])?,
    ///     classifier: Classifier {
    ///         w1: randn(&[4, 16, 16])?,
    ///         b1: randn(&[4, 1, 16])?,
    ///         w2: randn(&[4, 16, 8])?,
    ///         b2: randn(&[4, 1, 8])?,
    ///     },
    ///     routing: Routing::Classifier,
    /// };
    /// let index = SaapIndex::new(config, "example", vec![layer])?;
    /// let mut attn = SaapAttention::from_index(&index, 0, &dev, DType::F32)?;
    /// let kv = randn(&[1, 2, 1000, 16])?;
    /// attn.extend(&kv, &kv, &[1000])?;
    /// // Quest's pages of 8 keys over the index's partitions, ranked by their mean key.
    /// attn.set_page_layout(PageLayout::Partitions { page: 8 })?;
    /// attn.set_page_score(PageScore::Mean)?;
    /// attn.set_routing(Routing::Quest)?;
    /// attn.set_keys_budget(Some(0.2))?;
    /// let (q, k) = (randn(&[1, 4, 1, 16])?, randn(&[1, 2, 1, 16])?);
    /// attn.decode(&q, &k, &k)?;
    /// let read = attn.last_read().expect("counted");
    /// assert!(read.partitions_probed > 0 && read.selectivity() < 0.3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`SaapError::Config`] for [`PageLayout::Partitions`] on an op with no index or with a
    /// page outside 1 ..= [`QUEST_PAGE`] keys (nothing is changed); [`SaapError::Candle`] when
    /// the pages cannot be computed (the layout is set, with no pages: the next Quest step then
    /// reads every key, exactly, and the merge after it builds them).
    pub fn set_page_layout(&mut self, layout: PageLayout) -> Result<()> {
        if layout == self.page_layout {
            return Ok(());
        }
        if let PageLayout::Partitions { page } = layout {
            if !(1..=QUEST_PAGE).contains(&page) {
                return Err(SaapError::Config(format!(
                    "partition pages of {page} keys: a page holds 1..={QUEST_PAGE} keys"
                )));
            }
            if self.index.is_none() {
                return Err(SaapError::Config(
                    "pages over partitions need an index; this op has none".into(),
                ));
            }
        }
        self.page_layout = layout;
        self.rebuild_pages()
    }

    /// How Quest's pages cut the indexed keys ([`SaapAttention::set_page_layout`]).
    pub fn page_layout(&self) -> PageLayout {
        self.page_layout
    }

    /// With [`Routing::Quest`], the pages `(min, max)`, each `[B, Hkv, P, D]` f32: the
    /// elementwise min and max of the post-RoPE keys of page `p`, positions
    /// `sinks + 16p .. min(sinks + 16(p + 1), indexed_end)` of each item (zeros for a page
    /// holding no key of its item), or with [`PageScore::Mean`] their mean as both; P pages
    /// cover the batch's longest indexed region. With [`PageLayout::Partitions`], page `p` of a
    /// KV head is instead its `p`-th page of the layout's `page` keys counting partition by
    /// partition, each partition's list (see [`SaapAttention::index_lists`]) cut from its start;
    /// P is the most pages of any head, and a head's pages past its own hold zeros.
    pub fn page_bounds(&self) -> Option<(&Tensor, &Tensor)> {
        let pages = self.state.as_ref()?.quest.as_ref()?;
        Some((&pages.min, pages.max()))
    }

    /// Sets the recent window: the last `window` tokens of each item, which every decode step
    /// reads whole (up to `merge_every` − 1 more between merges) while older ones are indexed.
    /// A window smaller than the one in force may be set at any time: the tokens that leave it
    /// are merged into the index (and Quest's pages) at once, so a budget then has more keys to
    /// spend on partitions or pages. A larger one only while the op holds no tokens, since
    /// indexed keys do not leave the index. The classifier was trained with the index's window;
    /// a smaller one asks it to rank partitions that now also hold recent keys.
    ///
    /// # Errors
    /// [`SaapError::Config`] when `window` exceeds the largest span
    /// ([`crate::config::MAX_SPAN`]), or is larger than the window in force while the op holds
    /// tokens; [`SaapError::Candle`] when the merge fails.
    pub fn set_window(&mut self, window: usize) -> Result<()> {
        let config = SaapConfig {
            window,
            ..self.config.clone()
        };
        config.validate()?;
        if window > self.config.window && self.state.is_some() {
            return Err(SaapError::Config(format!(
                "the window can grow ({} → {window}) only before the first prefill: indexed keys \
                 do not leave the index",
                self.config.window
            )));
        }
        self.end_replay();
        self.config = config;
        self.merge_window(0)
    }

    /// Sets ℓ, the partitions probed per query head (`1..=C`).
    ///
    /// # Errors
    /// [`SaapError::Config`] unless `1 <= n_probe <= C`.
    pub fn set_n_probe(&mut self, n_probe: usize) -> Result<()> {
        self.config = self.config.with_n_probe(n_probe)?;
        self.end_replay();
        Ok(())
    }

    /// Sets a budget of keys read per decode step as a share of the keys in the context (window
    /// and sinks included, as [`ReadStats::selectivity`] counts them), or `None` to keep ℓ fixed.
    /// With [`Routing::Quest`] it sets the pages per step instead: the most whole pages that fit
    /// the budget beside sinks and window for every batch item (all pages where the budget covers
    /// the indexed keys), at least one; a group reads exactly those pages, so a step reads the
    /// budget, less the part of a page that does not fit, or a partial last page.
    /// Before each step, and when a replay is planned, ℓ becomes the largest value whose upper
    /// estimate of the keys read fits the budget for every batch item: sinks, window, and the
    /// indexed keys in G·ℓ of the C partitions (a group's G query heads probe at most that many
    /// between them). Partitions differ in size, so a step may read somewhat more or less than
    /// the estimate. At least one partition is probed: where sinks and window alone exceed the
    /// budget, ℓ = 1 and steps read more than asked. Dense routing reads everything regardless.
    /// Removing the budget leaves ℓ where the last step put it ([`SaapAttention::set_n_probe`]
    /// sets it again). With a probe plan ([`SaapAttention::set_probe_plan`]), classifier and
    /// Quest routing read this layer's share of a budget spent across layers instead.
    ///
    /// # Errors
    /// [`SaapError::Config`] unless the budget is finite and in (0, 1].
    pub fn set_keys_budget(&mut self, budget: Option<f64>) -> Result<()> {
        check_share("a keys budget (share of the context's keys)", budget)?;
        self.end_replay();
        self.keys_budget = budget;
        Ok(())
    }

    /// This layer's share of a keys budget spent across layers (see [`crate::budget`]): under
    /// [`SaapAttention::set_keys_budget`], where the budget allows u partitions per query head
    /// (fractional: the indexed keys it allows beside sinks and window, times C / (G · indexed
    /// keys), the least over batch items) and u ≥ 1, the entry of column
    /// [`crate::budget::plan_column`]`(u)` is this layer's p: with [`Routing::Classifier`] it
    /// probes ℓ = p; with [`Routing::Quest`] it reads p / u' times the pages the budget gives it,
    /// u' = [`crate::budget::column_probes`] of that column (its plan comes from a Quest curve,
    /// measured at u'·G/C of the indexed keys). Past the plan's end, or below one partition, the
    /// budget alone decides. A model's glue sets the plans of all its layers
    /// together ([`crate::budget::plan_probes`]), so that they read about the budget's keys
    /// between them. `None` follows the budget alone. Other routings and a fixed ℓ ignore it.
    ///
    /// # Errors
    /// [`SaapError::Config`] for an empty plan or an entry outside `1..=C`.
    pub fn set_probe_plan(&mut self, plan: Option<Vec<usize>>) -> Result<()> {
        let c = self.config.n_partitions;
        if let Some(plan) = &plan {
            if plan.is_empty() || plan.iter().any(|&l| l == 0 || l > c) {
                return Err(SaapError::Config(format!(
                    "a probe plan needs at least one ℓ, each in 1..={c} (C)"
                )));
            }
        }
        self.end_replay();
        self.probe_plan = plan;
        Ok(())
    }

    /// The probe plan in force, if any ([`SaapAttention::set_probe_plan`]).
    pub fn probe_plan(&self) -> Option<&[usize]> {
        self.probe_plan.as_deref()
    }

    /// Adaptive probing (top-p): with classifier routing each query head probes its partitions
    /// in the classifier's order until their predicted share of its attention mass (the softmax
    /// of its scores) reaches `mass`, at least one and at most ℓ of them; `None` probes ℓ
    /// always. Other routings ignore it. Unused probe slots hold C, which the kernels skip.
    ///
    /// # Errors
    /// [`SaapError::Config`] unless `mass` is finite and in (0, 1].
    pub fn set_probe_mass(&mut self, mass: Option<f64>) -> Result<()> {
        check_share(
            "a probe mass (share of a head's predicted attention mass)",
            mass,
        )?;
        self.end_replay();
        self.probe_mass = mass;
        Ok(())
    }

    /// Whether a decode step routed through partitions (classifier or nearest centroid, with an
    /// index) also estimates the partitions it does not read: each unread partition holding
    /// `n` keys enters every query's softmax as one pseudo-key, the mean of its post-RoPE keys
    /// with logit `scale·q·k̄ + ln n` and the mean of its values (see
    /// `crate::partition::summary`). Exact keys are still read exactly; the estimate adds one K
    /// and one V row per unread partition to what a step reads
    /// ([`ReadStats::partitions_estimated`]), outside the keys budget. Dense and Quest steps
    /// ignore it. The per-partition sums exist only while this is on: switched on mid-sequence,
    /// the next decode step builds them from every indexed key; switched off, they are freed
    /// (they cost a pass over the new keys at every merge and `2·B·Hkv·C·D` f32, 67 MB per
    /// Llama-3.1-8B layer at batch 8).
    pub fn set_estimate_unread(&mut self, on: bool) {
        self.end_replay();
        self.estimate_unread = on;
        if let (false, Some(state)) = (on, &mut self.state) {
            state.summaries = None;
        }
    }

    /// With the estimate on and an index, the summaries of every indexed key: built from the
    /// directory when the estimate was switched on after the sequences began.
    fn ensure_summaries(&mut self) -> Result<()> {
        let c = self.config.n_partitions;
        let l = self.config.layout;
        let Some(state) = &mut self.state else {
            return Ok(());
        };
        let Some(dir) = &state.dir else {
            return Ok(());
        };
        if !self.estimate_unread || state.summaries.is_some() {
            return Ok(());
        }
        let shape = (state.lens.len(), l.n_kv_heads, c, l.head_dim);
        let summaries = Summaries::new(shape, self.dtype, &self.device)?;
        // Every list from its start: the sums of the keys indexed so far, in position order.
        let ranges: Vec<(usize, usize)> = state.seqs.iter().map(|s| (0, s.indexed_end)).collect();
        summaries.add(&state.kv, dir, &ranges)?;
        state.summaries = Some(summaries);
        Ok(())
    }

    /// Whether decode estimates the unread partitions ([`SaapAttention::set_estimate_unread`]).
    pub fn estimate_unread(&self) -> bool {
        self.estimate_unread
    }

    /// The probe mass of adaptive probing, if any ([`SaapAttention::set_probe_mass`]).
    pub fn probe_mass(&self) -> Option<f64> {
        self.probe_mass
    }

    /// The budget of keys read per step, if any ([`SaapAttention::set_keys_budget`]).
    pub fn keys_budget(&self) -> Option<f64> {
        self.keys_budget
    }

    /// Sets ℓ, or with Quest routing the pages per step, for the keys budget at the current
    /// lengths, counting the token the next step appends. Nothing changes without a budget or a
    /// state, nor for ℓ without an index.
    fn apply_keys_budget(&mut self) {
        let (Some(budget), Some(state)) = (self.keys_budget, &self.state) else {
            return;
        };
        let quest = self.routing == Routing::Quest;
        if !quest && self.index.is_none() {
            return;
        }
        let c = self.config.n_partitions;
        let group = self.config.layout.group_size();
        // Per batch item with indexed keys: the indexed keys the budget allows beside sinks and
        // window, and how many are indexed.
        // Keys per page of each item: partition pages are shorter than 16 on average.
        let page_keys = |b: usize| {
            state
                .quest
                .as_ref()
                .map_or(QUEST_PAGE as f64, |pages| pages.page_keys(b))
        };
        let items: Vec<(f64, usize, f64)> = state
            .seqs
            .iter()
            .enumerate()
            .filter_map(|(b, s)| {
                let len = s.len + 1;
                let fixed = self.config.sinks.min(len) + (len - s.indexed_end.min(len));
                let indexed = len.saturating_sub(fixed);
                let allowed = ((budget * len as f64).floor() - fixed as f64).max(0.0);
                (indexed > 0).then_some((allowed, indexed, page_keys(b)))
            })
            .collect();
        // Partitions per query head the budget allows for every item, fractional, as if a
        // group's G·u probes were all different partitions of average size (none: no bound).
        let probes = items
            .iter()
            .map(|&(allowed, indexed, _)| allowed * c as f64 / (group * indexed) as f64)
            .min_by(f64::total_cmp);
        // This layer's entry in the plan's column for that budget, with the column's ℓ.
        let planned = probes
            .and_then(crate::budget::plan_column)
            .and_then(|column| {
                let p = *self.probe_plan.as_ref()?.get(column)?;
                Some((p, crate::budget::column_probes(column)))
            });
        if quest {
            // A plan moves this layer's pages by the ratio it moves the budget's ℓ (its curve
            // measures Quest at u·G/C of the indexed keys, the share that ℓ allows).
            let scale = planned.map_or(1.0, |(p, u)| p as f64 / u);
            let pages = items
                .iter()
                .map(|&(allowed, indexed, page_keys)| {
                    let allowed = allowed * scale;
                    if allowed >= indexed as f64 {
                        // Every page of the item fits (its last may be partial): no bound.
                        MAX_QUEST_PAGES
                    } else {
                        (allowed / page_keys) as usize
                    }
                })
                .min();
            if let Some(pages) = pages {
                self.quest_pages = pages.clamp(1, MAX_QUEST_PAGES);
            }
        } else {
            let uniform = probes.map_or(c, |u| u.floor() as usize).clamp(1, c);
            self.config.n_probe = match (self.routing, planned) {
                (Routing::Classifier, Some((p, _))) => p,
                _ => uniform,
            };
        }
    }

    /// [`SaapError::Config`] when Quest routing would rank more pages than [`MAX_QUEST_PAGES`].
    fn check_quest_pages(&self) -> Result<()> {
        let (Routing::Quest, Some(state)) = (self.routing, &self.state) else {
            return Ok(());
        };
        // Partition pages: at most one more page per partition (its short last one).
        let (page, extra) = match self.page_layout {
            PageLayout::Consecutive => (QUEST_PAGE, 0),
            PageLayout::Partitions { page } => (page, self.config.n_partitions),
        };
        let pages = state
            .seqs
            .iter()
            .map(|s| pages_of(s, self.config.sinks, page) + extra)
            .max()
            .unwrap_or(0);
        if pages > MAX_QUEST_PAGES {
            return Err(SaapError::Config(format!(
                "Quest routing over up to {pages} pages of {page} tokens; at most \
                 {MAX_QUEST_PAGES} ({} indexed tokens; with partition pages, less one page per \
                 partition) are supported",
                MAX_QUEST_PAGES * page
            )));
        }
        Ok(())
    }

    /// Whether decode counts the keys it reads (one small device-to-host copy per step on GPU).
    pub fn set_track_reads(&mut self, on: bool) {
        self.track_reads = on;
    }

    /// Whether NaN and infinity are checked for (on by default): in the inputs, in queries and
    /// new keys after RoPE (a finite f16/bf16 value can overflow once rotated), in routing scores
    /// where they are computed apart from the fused CUDA routing kernel, and in the outputs. A few
    /// scalars read back per call; a rejected call leaves the sequences as they were.
    pub fn set_check_finite(&mut self, on: bool) {
        self.check_finite = on;
    }

    /// Records every prefill's pre-RoPE queries and keys into `recorder` (calibration).
    pub fn set_recorder(&mut self, recorder: Option<Recorder>) {
        self.recorder = recorder;
    }

    /// A deep copy of the op and its sequences: decoding from the copy leaves this one untouched
    /// (e.g. to compare routings after one shared prefill).
    ///
    /// # Errors
    /// [`SaapError::Candle`] when the state cannot be copied (device memory);
    /// [`SaapError::Config`] while replaying (see [`SaapAttention::begin_replay`]).
    pub fn snapshot(&self) -> Result<Self> {
        self.not_replaying("snapshot")?;
        let state = match &self.state {
            None => None,
            Some(s) => Some({
                let (k, v, kv) = split_kv(s.kv.copy()?)?;
                State {
                    kv,
                    k,
                    v,
                    labels: s.labels.as_ref().map(Tensor::copy).transpose()?,
                    dir: s.dir.as_ref().map(Tensor::copy).transpose()?,
                    summaries: s.summaries.as_ref().map(Summaries::copy).transpose()?,
                    quest: s.quest.as_ref().map(QuestPages::copy).transpose()?,
                    seqs: s.seqs.clone(),
                    lens: s.lens.clone(),
                    cap: s.cap,
                }
            }),
        };
        Ok(Self {
            config: self.config.clone(),
            rope: self.rope.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            index: self.index.clone(),
            routing: self.routing,
            state,
            recorder: self.recorder.clone(),
            track_reads: self.track_reads,
            check_finite: self.check_finite,
            last_read: self.last_read,
            replay: None,
            keys_budget: self.keys_budget,
            probe_mass: self.probe_mass,
            quest_pages: self.quest_pages,
            page_score: self.page_score,
            page_layout: self.page_layout,
            estimate_unread: self.estimate_unread,
            probe_plan: self.probe_plan.clone(),
        })
    }

    /// Drops the index and keeps the cache: from now on the op is exact dense attention over the
    /// same sequences, with no per-step index upkeep (a dense baseline after one shared prefill,
    /// or a fallback). The partition state is freed.
    pub fn drop_index(&mut self) {
        self.end_replay();
        self.index = None;
        self.routing = Routing::Dense;
        self.page_layout = PageLayout::Consecutive;
        if let Some(state) = &mut self.state {
            state.labels = None;
            state.dir = None;
            state.summaries = None;
            state.quest = None;
        }
    }

    /// Keeps the batch items whose `keep` flag is set and drops the others (e.g. sequences that
    /// reached their end of text), in order: item `b` of the new batch is the `b`-th kept one.
    /// Their caches, partition lists and lengths are copied as they were, so decoding the kept
    /// items from here gives what it gives in a batch that never held the dropped ones; later
    /// calls carry the smaller batch. Keeping every item changes nothing; keeping none forgets
    /// the sequences as [`SaapAttention::reset`] does (the next prefill starts a new batch).
    /// The cache keeps its capacity. Not while replaying: a [`crate::graph::DecodeGraph`]
    /// retains through [`crate::graph::DecodeGraph::retain`], which ends the replay first.
    ///
    /// # Errors
    /// [`SaapError::Config`] while replaying (see [`SaapAttention::begin_replay`]);
    /// [`SaapError::EmptyContext`] with no sequences cached; [`SaapError::Shape`] unless `keep`
    /// has one flag per cached sequence; [`SaapError::Candle`] when the kept rows cannot be
    /// copied (device memory). The sequences are unchanged after any of these.
    pub fn retain(&mut self, keep: &[bool]) -> Result<()> {
        self.not_replaying("retain")?;
        let Some(state) = &mut self.state else {
            return Err(SaapError::EmptyContext(0));
        };
        if keep.len() != state.lens.len() {
            return Err(SaapError::Shape {
                name: "keep",
                expected: format!("{} flags, one per cached sequence", state.lens.len()),
                got: vec![keep.len()],
            });
        }
        let kept: Vec<u32> = (0..keep.len() as u32)
            .filter(|&b| keep[b as usize])
            .collect();
        if kept.len() == keep.len() {
            return Ok(());
        }
        if kept.is_empty() {
            self.reset();
            return Ok(());
        }
        let rows = Tensor::new(kept.as_slice(), &self.device)?;
        let select = |t: &Tensor| t.index_select(&rows, 0);
        // Every copy is made before any is stored: a failed one leaves the state whole.
        let (k, v, kv) = split_kv(state.kv.index_select(&rows, 1)?)?;
        let labels = state.labels.as_ref().map(select).transpose()?;
        let dir = state.dir.as_ref().map(select).transpose()?;
        let summaries = state
            .summaries
            .as_ref()
            .map(|s| s.select(&rows))
            .transpose()?;
        let quest = state.quest.as_ref().map(|q| q.select(&rows)).transpose()?;
        (state.kv, state.k, state.v) = (kv, k, v);
        (state.labels, state.dir, state.quest) = (labels, dir, quest);
        state.summaries = summaries;
        state.seqs = kept.iter().map(|&b| state.seqs[b as usize]).collect();
        state.lens = kept.iter().map(|&b| state.lens[b as usize]).collect();
        // The counts of the last step include the dropped items.
        self.last_read = None;
        Ok(())
    }

    /// Forgets the sequences.
    pub fn reset(&mut self) {
        self.replay = None;
        self.state = None;
        self.last_read = None;
    }

    /// Tokens cached per batch item.
    pub fn seq_lens(&self) -> &[usize] {
        self.state.as_ref().map_or(&[], |s| &s.lens)
    }

    /// Extent of each sequence: length and end of the indexed positions.
    pub fn extents(&self) -> &[SeqExtent] {
        self.state.as_ref().map_or(&[], |s| &s.seqs)
    }

    /// Keys read by the last decode call, when tracked.
    pub fn last_read(&self) -> Option<ReadStats> {
        self.last_read
    }

    /// The cache `(k, v)`, `[B, Hkv, capacity, D]`, post-RoPE keys; rows past each length unused.
    pub fn cache(&self) -> Option<(&Tensor, &Tensor)> {
        self.state.as_ref().map(|s| (&s.k, &s.v))
    }

    /// Per batch item and KV head, the index `(perm, offsets)` on the host: `perm` holds the
    /// indexed positions grouped by partition, `offsets` has `C + 1` entries.
    ///
    /// # Errors
    /// [`SaapError::Candle`] when the directory cannot be read back from the device.
    pub fn index_lists(&self) -> Result<Vec<Vec<IndexList>>> {
        let (Some(state), Some(_)) = (&self.state, &self.index) else {
            return Ok(Vec::new());
        };
        let dir = state.dir.as_ref().expect("indexed state has a directory");
        let c = self.config.n_partitions;
        Ok(dir
            .to_vec3::<u32>()?
            .into_iter()
            .map(|heads| {
                heads
                    .into_iter()
                    .map(|row| {
                        let offsets = row[..=c].to_vec();
                        let perm = row[c + 1..c + 1 + offsets[c] as usize].to_vec();
                        (perm, offsets)
                    })
                    .collect()
            })
            .collect())
    }

    fn check_input(&self, name: &'static str, x: &Tensor, heads: usize) -> Result<(usize, usize)> {
        let d = self.config.layout.head_dim;
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != heads || dims[3] != d {
            return Err(SaapError::Shape {
                name,
                expected: format!("[B, {heads}, T, {d}]"),
                got: dims.to_vec(),
            });
        }
        if x.dtype() != self.dtype {
            return Err(SaapError::DType {
                name,
                expected: self.dtype,
                got: x.dtype(),
            });
        }
        if !x.device().same_device(&self.device) {
            return Err(SaapError::Device {
                name,
                expected: self.device.location(),
                got: x.device().location(),
            });
        }
        self.check(name, &[x])?;
        Ok((dims[0], dims[2]))
    }

    fn check_inputs(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize)> {
        let l = self.config.layout;
        let (b, t) = self.check_input("q", q, l.n_q_heads)?;
        for (name, x) in [("k", k), ("v", v)] {
            if self.check_input(name, x, l.n_kv_heads)? != (b, t) {
                return Err(SaapError::Shape {
                    name,
                    expected: format!("[{b}, {}, {t}, {}]", l.n_kv_heads, l.head_dim),
                    got: x.dims().to_vec(),
                });
            }
        }
        self.check_batch(b)?;
        Ok((b, t))
    }

    /// Once sequences are cached, every call must carry the same batch.
    fn check_batch(&self, batch: usize) -> Result<()> {
        match &self.state {
            Some(state) if state.lens.len() != batch => Err(SaapError::Shape {
                name: "batch",
                expected: format!("batch of {} (the cached sequences)", state.lens.len()),
                got: vec![batch],
            }),
            _ => Ok(()),
        }
    }

    /// [`SaapError::NonFinite`] naming `name` if `xs` hold a NaN or infinity, when checks are on.
    fn check(&self, name: &'static str, xs: &[&Tensor]) -> Result<()> {
        // A recorded step must not synchronize with the host; NaN reaches the model's output.
        if self.check_finite && self.replay.is_none() {
            ensure_finite(name, xs)?;
        }
        Ok(())
    }

    /// The extents before a call appends, for [`SaapAttention::or_rollback`].
    fn undo_point(&self) -> Undo {
        self.state
            .as_ref()
            .map(|s| (s.seqs.clone(), s.lens.clone()))
    }

    /// Passes `result` on; when it is an error, first forgets the tokens appended since `undo`
    /// (rows past each length are never read), so a rejected call leaves the sequences as they
    /// were. Only valid before `merge_window`, which changes the index itself.
    fn or_rollback<T>(&mut self, result: Result<T>, undo: Undo) -> Result<T> {
        if result.is_err() {
            match (&mut self.state, undo) {
                (Some(state), Some((seqs, lens))) => {
                    state.seqs = seqs;
                    state.lens = lens;
                }
                (state, None) => *state = None,
                (None, Some(_)) => {}
            }
        }
        result
    }

    /// Makes room for `needed` tokens per sequence, growing the state geometrically.
    fn reserve(&mut self, batch: usize, needed: usize) -> Result<()> {
        let l = self.config.layout;
        let c = self.config.n_partitions;
        if let Some(state) = &self.state {
            if state.cap >= needed {
                return Ok(());
            }
        }
        if needed > MAX_CONTEXT {
            return Err(SaapError::Config(format!(
                "{needed} tokens per sequence exceed the index's {MAX_CONTEXT} positions"
            )));
        }
        let old_cap = self.state.as_ref().map_or(0, |s| s.cap);
        let cap = needed.max(old_cap.saturating_mul(2)).min(MAX_CONTEXT);
        let cap = cap
            .checked_next_multiple_of(256)
            .unwrap_or(cap)
            .min(MAX_CONTEXT);
        let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &self.device);
        let (k, v, kv) = split_kv(zeros(
            &[2, batch, l.n_kv_heads, cap, l.head_dim],
            self.dtype,
        )?)?;
        let indexed = self.index.is_some();
        let mut next = State {
            kv,
            k,
            v,
            labels: indexed
                .then(|| zeros(&[batch, l.n_kv_heads, cap], DType::U32))
                .transpose()?,
            dir: indexed
                .then(|| zeros(&[batch, l.n_kv_heads, dir_len(c, cap)], DType::U32))
                .transpose()?,
            summaries: (indexed && self.estimate_unread)
                .then(|| {
                    let shape = (batch, l.n_kv_heads, c, l.head_dim);
                    Summaries::new(shape, self.dtype, &self.device)
                })
                .transpose()?,
            quest: None,
            seqs: vec![
                SeqExtent {
                    len: 0,
                    indexed_end: 0
                };
                batch
            ],
            lens: vec![0; batch],
            cap,
        };
        if let Some(old) = self.state.take() {
            next.kv.slice_set(&old.kv, 3, 0)?;
            for (new, old) in [(&next.labels, &old.labels), (&next.dir, &old.dir)] {
                if let (Some(new), Some(old)) = (new, old) {
                    new.slice_set(old, 2, 0)?;
                }
            }
            // The capacity changes no page, only the perm that partition pages' directory holds.
            next.quest = old
                .quest
                .map(|pages| pages.regrown(next.dir.as_ref(), c))
                .transpose()?;
            // Per partition, not per position: the capacity does not change them.
            if old.summaries.is_some() {
                next.summaries = old.summaries;
            }
            next.seqs = old.seqs;
            next.lens = old.lens;
        }
        self.state = Some(next);
        Ok(())
    }

    /// Rotates k (and q, when given), appends k and v (and the keys' partitions) to the cache at
    /// each sequence's end. Returns the rotated queries and the append's launches, which the
    /// caller joins before reading the cache. On error nothing is appended.
    fn append(
        &mut self,
        q: Option<&Tensor>,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
        beside_routing: bool,
    ) -> Result<(Option<Tensor>, SideLaunches)> {
        let undo = self.undo_point();
        let appended = self.append_rows(q, k, v, lens, beside_routing);
        self.or_rollback(appended, undo)
    }

    /// [`SaapAttention::append`], which undoes what this did before an error.
    fn append_rows(
        &mut self,
        q: Option<&Tensor>,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
        beside_routing: bool,
    ) -> Result<(Option<Tensor>, SideLaunches)> {
        let (batch, t_len) = (k.dim(0)?, k.dim(2)?);
        let starts: Vec<usize> = self
            .state
            .as_ref()
            .map_or(vec![0; batch], |s| s.lens.clone());
        let needed = starts
            .iter()
            .zip(lens)
            .map(|(s, l)| s.checked_add(*l).unwrap_or(usize::MAX))
            .max()
            .unwrap_or(0);
        self.reserve(batch, needed)?;
        let check_finite = self.check_finite && self.replay.is_none();
        let advance = self.replay.as_ref().map(|r| r.advance.clone());
        // Queries: every row rotated (padding included, as a model's own RoPE would); keys and
        // values: the valid rows written into the cache at each sequence's end.
        let q = q.map(Tensor::contiguous).transpose()?;
        let mut rotate = self.rope.writer(&starts, &vec![t_len; batch], true, false);
        rotate.advance.clone_from(&advance);
        let rotate_q = || q.as_ref().map(|q| q.apply_op1_no_bwd(&rotate)).transpose();
        // The classifier and the centroids read the query before RoPE, so its rotation is a side
        // launch too; Quest scores its pages with the rotated query and rotates it first.
        let q_beside = beside_routing && self.routing != Routing::Quest;
        let mut q_rot = if q_beside { None } else { rotate_q()? };
        let state = self.state.as_mut().expect("reserved above");
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let mut write = self.rope.writer(&starts, lens, true, true);
        write.advance.clone_from(&advance);
        // Nothing before the attention reads what these write: on CUDA they run beside the
        // routing, on a second stream. With no routing to overlap, the fork and join would only
        // lengthen the step (measured: dense decoding 5–8% slower).
        let side = match beside_routing {
            true => SideLaunches::fork(&self.device)?,
            false => SideLaunches::joined(),
        };
        side.run(|| -> Result<()> {
            if q_beside {
                q_rot = rotate_q()?;
            }
            state.kv.inplace_op3(&k, &v, &KvWrite(write))?;
            if let (Some(labels), Some(index)) = (&state.labels, &self.index) {
                let centroids = (
                    &index.centroids_t,
                    &index.half_norms,
                    index.centroids_rounded.as_ref(),
                );
                assign_rows(labels, &k, centroids, &starts, lens, advance.as_ref())?;
            }
            Ok(())
        })?;
        // The finite checks read the rotated query and the cache now.
        let side = match check_finite {
            true => {
                side.join()?;
                SideLaunches::joined()
            }
            false => side,
        };
        if check_finite {
            if let Some(q_rot) = &q_rot {
                ensure_finite("q after RoPE", &[q_rot])?;
            }
            // Rotation preserves a pair's norm, so a component can grow by up to √2: a finite
            // f16 or bf16 key near the type's maximum can overflow to infinity in the cache.
            let written = starts
                .iter()
                .zip(lens)
                .enumerate()
                .filter(|(_, (_, &len))| len > 0)
                .map(|(b, (&start, &len))| state.k.get(b)?.narrow(1, start, len))
                .collect::<candle_core::Result<Vec<_>>>()?;
            ensure_finite("k after RoPE", &written.iter().collect::<Vec<_>>())?;
        }
        for (b, (&start, &len)) in starts.iter().zip(lens).enumerate() {
            if len == 0 {
                continue;
            }
            state.lens[b] = start + len;
            let seq = &mut state.seqs[b];
            seq.len = start + len;
            // Sinks are never indexed: the indexed region starts after them.
            seq.indexed_end = seq.indexed_end.max(self.config.sinks.min(seq.len));
        }
        Ok((q_rot, side))
    }

    /// Whether tokens leaving the window are merged into the indexed region: with an index, or
    /// for Quest's pages.
    fn merges(&self) -> bool {
        self.index.is_some() || self.routing == Routing::Quest
    }

    /// Quest's routing runs kernels whose shapes follow the page count, which changes at merges
    /// (candle's where its own do not apply): routing a zero query once, eagerly, lets a CUDA
    /// graph capture of the next step find their launch parameters already uploaded, modules
    /// loaded and shared memory opted in (see [`crate::graph`]).
    fn warm_up_quest_routing(&self, batch: usize) -> Result<()> {
        let (Routing::Quest, Some(state), true) =
            (self.routing, &self.state, self.device.is_cuda())
        else {
            return Ok(());
        };
        if let Some(pages) = state.quest.as_ref().filter(|p| p.n_pages() > 0) {
            let l = self.config.layout;
            let q = Tensor::zeros((batch, l.n_q_heads, l.head_dim), self.dtype, &self.device)?;
            pages.route(&q, self.quest_pages)?;
        }
        Ok(())
    }

    /// Moves tokens that left the window into the indexed region (the index, and Quest's pages),
    /// for sequences whose window exceeds `window + slack` tokens. Builds Quest's pages when the
    /// routing is Quest and has none yet, and drops them when it is not.
    fn merge_window(&mut self, slack: usize) -> Result<()> {
        let quest = self.routing == Routing::Quest;
        let sinks = self.config.sinks;
        let c = self.config.n_partitions;
        let (score, layout) = (self.page_score, self.page_layout);
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        let refresh = |state: &State, seqs: &[SeqExtent], old: Option<&QuestPages>, first| {
            let cut = match (layout, &state.dir) {
                (PageLayout::Partitions { page }, Some(dir)) => PageCut::Partitions {
                    dir,
                    n_partitions: c,
                    page,
                },
                _ => PageCut::Consecutive,
            };
            QuestPages::refresh(old, first, &state.k, seqs, sinks, score, cut)
        };
        match (quest, &state.quest) {
            (true, None) => state.quest = Some(refresh(state, &state.seqs, None, 0)?),
            (false, Some(_)) => state.quest = None,
            _ => {}
        }
        if !quest && self.index.is_none() {
            return Ok(());
        }
        let window = self.config.window;
        // Saturating: a bound beyond any length merges nothing, where a wrapped one would merge
        // past the cache.
        let bound = window.saturating_add(slack);
        let ranges: Vec<(usize, usize)> = state
            .seqs
            .iter()
            .map(|s| {
                if s.len - s.indexed_end > bound {
                    (s.indexed_end, s.len - window)
                } else {
                    (0, 0)
                }
            })
            .collect();
        if ranges.iter().all(|(s, e)| s == e) {
            return Ok(());
        }
        let merged: Vec<SeqExtent> = state
            .seqs
            .iter()
            .zip(&ranges)
            .map(|(seq, &(s, e))| SeqExtent {
                indexed_end: if e > s { e } else { seq.indexed_end },
                ..*seq
            })
            .collect();
        let partition_pages = layout.over_partitions() && state.dir.is_some();
        // Consecutive pages first: nothing has changed yet if they cannot be computed.
        let pages = match (&state.quest, partition_pages) {
            (Some(old), false) => {
                // Pages before the one holding the earliest merged position keep their keys.
                let first = ranges
                    .iter()
                    .filter(|(s, e)| e > s)
                    .map(|(s, _)| s.saturating_sub(sinks) / QUEST_PAGE)
                    .min()
                    .unwrap_or(0);
                Some(refresh(state, &merged, Some(old), first)?)
            }
            _ => None,
        };
        if let (Some(dir), Some(labels)) = (state.dir.as_ref(), state.labels.as_ref()) {
            let op = MergeOp {
                ranges,
                n_partitions: c,
                n_kv_heads: self.config.layout.n_kv_heads,
            };
            merge(dir, labels, &op)?;
            if let Some(summaries) = &state.summaries {
                summaries.add(&state.kv, dir, &op.ranges)?;
            }
        }
        state.seqs = merged;
        if pages.is_some() {
            state.quest = pages;
        } else if partition_pages && state.quest.is_some() {
            // Partition pages follow the merged lists, the old ones kept where their keys are.
            // Should they fail, none are kept (the next Quest step reads every key, exactly),
            // rather than pages of the lists before.
            let old = state.quest.take();
            state.quest = Some(refresh(state, &state.seqs, old.as_ref(), 0)?);
        }
        Ok(())
    }

    /// Appends context without computing attention: pre-RoPE keys `k` and values `v`
    /// (`[B, Hkv, T, D]`, `lens[b]` valid per item), rotated, cached and indexed like prefill's.
    /// For models that run their own prefill kernel, and for loading a cache.
    ///
    /// # Errors
    /// [`SaapError::Shape`], [`SaapError::DType`] or [`SaapError::Device`] for inputs that do
    /// not fit the op or the cached batch; [`SaapError::EmptyContext`] when every length is 0;
    /// [`SaapError::NonFinite`] for NaN or infinity in `k` or `v`, or in a key after RoPE (with
    /// checks on); [`SaapError::Config`] beyond [`crate::config::MAX_CONTEXT`] tokens. The
    /// sequences are unchanged after any of these.
    pub fn extend(&mut self, k: &Tensor, v: &Tensor, lens: &[usize]) -> Result<()> {
        let n_kv = self.config.layout.n_kv_heads;
        let (batch, t_len) = self.check_input("k", k, n_kv)?;
        if self.check_input("v", v, n_kv)? != (batch, t_len) {
            return Err(SaapError::Shape {
                name: "v",
                expected: format!("{:?}", k.dims()),
                got: v.dims().to_vec(),
            });
        }
        self.check_lens(batch, t_len, lens)?;
        self.not_replaying("extend")?;
        self.append(None, k, v, lens, false)?;
        self.merge_window(0)
    }

    fn check_lens(&self, batch: usize, t_len: usize, lens: &[usize]) -> Result<()> {
        self.check_batch(batch)?;
        if lens.len() != batch || lens.iter().any(|&l| l > t_len) {
            return Err(SaapError::Shape {
                name: "lens",
                expected: format!("{batch} lengths, each <= {t_len}"),
                got: lens.to_vec(),
            });
        }
        if lens.iter().all(|&l| l == 0) {
            return Err(SaapError::EmptyContext(0));
        }
        Ok(())
    }

    /// Appends a prompt chunk and returns its causal attention output.
    ///
    /// `q`: `[B, Hq, T, D]`, `k` and `v`: `[B, Hkv, T, D]`; `q` and `k` pre-RoPE (the op rotates
    /// them, positions continuing from each sequence's cached length). `lens[b] <= T` tokens of
    /// item `b` are valid (right padding). Returns `[B, Hq, T, D]`, zero past each length. May be
    /// called repeatedly (chunked prefill); tokens older than the window are indexed.
    ///
    /// # Errors
    /// As [`SaapAttention::extend`], and [`SaapError::NonFinite`] for NaN or infinity in `q`, in the
    /// rotated queries or in the output (with checks on): the sequences are then unchanged.
    pub fn prefill(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
    ) -> Result<Tensor> {
        let (batch, t_len) = self.check_inputs(q, k, v)?;
        self.check_lens(batch, t_len, lens)?;
        self.not_replaying("prefill")?;
        let undo = self.undo_point();
        let starts: Vec<usize> = self
            .state
            .as_ref()
            .map_or(vec![0; batch], |s| s.lens.clone());
        if let Some(recorder) = &self.recorder {
            recorder.push(Recorded {
                q: q.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                k: k.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                v: v.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                lens: lens.to_vec(),
                starts: starts.clone(),
            });
        }
        let q_rot = self
            .append(Some(q), k, v, lens, false)?
            .0
            .expect("queries given");
        let state = self.state.as_ref().expect("appended");
        let scale = 1.0 / (self.config.layout.head_dim as f32).sqrt();
        let out = prefill_attention(&q_rot, &state.k, &state.v, &starts, lens, scale)?;
        let checked = self.check("output", &[&out]);
        self.or_rollback(checked, undo)?;
        self.merge_window(0)?;
        Ok(out)
    }

    /// One decode step: one new token per batch item (`T == 1`, shapes as in
    /// [`SaapAttention::prefill`]). Reads sinks ∪ probed partitions ∪ window (or every key with
    /// dense routing). Returns `[B, Hq, 1, D]`.
    ///
    /// # Errors
    /// As [`SaapAttention::prefill`]; also [`SaapError::Shape`] unless `T == 1`,
    /// [`SaapError::EmptyContext`] for a batch item with no context, [`SaapError::NonFinite`]
    /// for non-finite routing scores (with checks on), and [`SaapError::Config`] with
    /// [`Routing::Quest`] over more than [`MAX_QUEST_PAGES`] pages. The sequences are unchanged
    /// after any of these.
    pub fn decode(&mut self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (batch, t_len) = self.check_inputs(q, k, v)?;
        if t_len != 1 {
            return Err(SaapError::Shape {
                name: "q",
                expected: "one token per sequence (T = 1)".into(),
                got: q.dims().to_vec(),
            });
        }
        let Some(state) = &self.state else {
            return Err(SaapError::EmptyContext(0));
        };
        if let Some(b) = state.lens.iter().position(|&l| l == 0) {
            return Err(SaapError::EmptyContext(b));
        }
        self.check_quest_pages()?;
        if self.replay.is_none() {
            self.apply_keys_budget();
            self.ensure_summaries()?;
        }
        let undo = self.undo_point();
        let step = self.decode_step(q, k, v, batch);
        if let Some(replay) = &self.replay {
            // A recorded step: the host's view stays where the replay began (positions move
            // on through the device count); `replayed` counts each execution.
            let out = match replay.ticks {
                true => step
                    .and_then(|out| Ok(replay.advance.inplace_op1(&AdvanceReplay).map(|_| out)?)),
                false => step,
            };
            let state = self.state.as_mut().expect("replaying has a state");
            (state.seqs, state.lens) = undo.expect("replaying has a state");
            return Ok(out?.unsqueeze(2)?);
        }
        let out = self.or_rollback(step, undo)?;
        self.merge_window(self.config.merge_every - 1)?;
        Ok(out.unsqueeze(2)?)
    }

    /// Prepares up to `steps` decode steps that are recorded once and replayed, typically as a
    /// CUDA graph (see [`crate::graph::DecodeGraph`]): a replayed step cannot pass new positions
    /// to its kernels, so while replaying they add a device-side count of replayed steps to
    /// the positions they were recorded with. Reserves cache rows for the steps and returns how
    /// many may run before an ordinary [`SaapAttention::decode`] is due (the window must be merged
    /// into the index, or the cache grow): `min(steps, room)`, 0 when none (then nothing
    /// changes).
    ///
    /// While replaying, each [`SaapAttention::decode`] records one step: its kernels are
    /// enqueued (into a capture, or run once; on the CPU they run once, reading the count), the
    /// host's view of the sequences
    /// ([`SaapAttention::seq_lens`]) stays at the start of the replay, nothing is synchronized
    /// with the host (no finite checks, no read tracking), and no window is merged. Every
    /// execution of a recorded step must be followed by [`SaapAttention::replayed`];
    /// [`SaapAttention::end_replay`] brings the host's view up to date. Changing the routing,
    /// ℓ, the index or the sequences ends the replay (a graph recorded before then must not be
    /// launched again).
    ///
    /// # Errors
    /// [`SaapError::Config`] for `steps == 0`, while already replaying, or with
    /// [`Routing::Quest`] over more than [`MAX_QUEST_PAGES`] pages;
    /// [`SaapError::EmptyContext`] without a prefilled context; [`SaapError::Config`] or
    /// [`SaapError::Candle`] when the rows cannot be reserved.
    pub fn begin_replay(&mut self, steps: usize) -> Result<usize> {
        self.start_replay(steps, None)
    }

    /// [`SaapAttention::begin_replay`] on a count shared with other ops: the recorded steps do
    /// not advance it; the caller enqueues [`ReplayClock::tick`] once after every op's step (one
    /// launch per model step rather than one per layer). The clock must be at 0 when the replay
    /// begins, and ticked once per recorded step.
    ///
    /// # Errors
    /// As [`SaapAttention::begin_replay`]; also [`SaapError::Config`] for a clock that was ever
    /// ticked, [`SaapError::Shape`] unless the clock counts this op's batch, and
    /// [`SaapError::Device`] for a clock on another device.
    pub fn begin_shared_replay(&mut self, steps: usize, clock: &ReplayClock) -> Result<usize> {
        self.start_replay(steps, Some(clock))
    }

    fn start_replay(&mut self, steps: usize, clock: Option<&ReplayClock>) -> Result<usize> {
        if steps == 0 {
            return Err(SaapError::Config("a replay of 0 steps".into()));
        }
        self.not_replaying("begin_replay")?;
        let Some(state) = &self.state else {
            return Err(SaapError::EmptyContext(0));
        };
        if let Some(b) = state.lens.iter().position(|&l| l == 0) {
            return Err(SaapError::EmptyContext(b));
        }
        if let Some(clock) = clock {
            if clock.ticked.load(Ordering::Relaxed) {
                return Err(SaapError::Config(
                    "begin_shared_replay: the clock has been ticked; a replay begins on a new one"
                        .into(),
                ));
            }
            if clock.batch() != state.lens.len() {
                return Err(SaapError::Shape {
                    name: "replay clock",
                    expected: format!("{} batch items", state.lens.len()),
                    got: vec![clock.batch()],
                });
            }
            if !clock.counts.device().same_device(&self.device) {
                return Err(SaapError::Device {
                    name: "replay clock",
                    expected: self.device.location(),
                    got: clock.counts.device().location(),
                });
            }
        }
        // Steps until a window outgrows `window + merge_every - 1`, which `decode` would merge.
        let room = match self.merges() {
            false => steps,
            true => state
                .seqs
                .iter()
                .map(|s| {
                    (self.config.window + self.config.merge_every - 1)
                        .saturating_sub(s.len - s.indexed_end)
                })
                .min()
                .unwrap_or(0)
                .min(steps),
        };
        if room == 0 {
            return Ok(0);
        }
        let (batch, longest) = (
            state.lens.len(),
            state.lens.iter().copied().max().unwrap_or(0),
        );
        self.check_quest_pages()?;
        // ℓ (or Quest's pages) stays as recorded for the whole replay: set it for the budget now.
        self.apply_keys_budget();
        self.reserve(batch, longest.saturating_add(room))?;
        // Built here, not inside a recorded step.
        self.ensure_summaries()?;
        self.warm_up_quest_routing(batch)?;
        let (advance, ticks) = match clock {
            Some(clock) => (clock.counts.clone(), false),
            None => (Tensor::zeros(batch, DType::U32, &self.device)?, true),
        };
        self.replay = Some(Replay {
            id: NEXT_REPLAY.fetch_add(1, Ordering::Relaxed),
            advance,
            ticks,
            steps: 0,
            room,
        });
        Ok(room)
    }

    /// Counts one execution of the recorded step (a graph launch, or the recording call itself
    /// when it ran eagerly).
    ///
    /// # Errors
    /// [`SaapError::Config`] when not replaying, or past the steps [`SaapAttention::begin_replay`]
    /// planned (the device count would then have outrun the reserved rows).
    pub fn replayed(&mut self) -> Result<()> {
        let Some(replay) = &mut self.replay else {
            return Err(SaapError::Config("replayed: not replaying".into()));
        };
        if replay.steps >= replay.room {
            return Err(SaapError::Config(format!(
                "replayed: {} steps were planned",
                replay.room
            )));
        }
        replay.steps += 1;
        Ok(())
    }

    /// Ends a replay: the sequences now hold the replayed steps' tokens, and
    /// [`SaapAttention::decode`] runs step by step again. Nothing happens when not replaying.
    pub fn end_replay(&mut self) {
        let (Some(replay), Some(state)) = (self.replay.take(), &mut self.state) else {
            return;
        };
        for (seq, len) in state.seqs.iter_mut().zip(&mut state.lens) {
            seq.len += replay.steps;
            *len += replay.steps;
        }
    }

    /// Steps replayed so far and the steps planned, while replaying.
    pub fn replay_progress(&self) -> Option<(usize, usize)> {
        self.replay.as_ref().map(|r| (r.steps, r.room))
    }

    /// Identifies the current replay: a recorded graph stays valid while every op it ran still
    /// reports the id it had at recording.
    pub fn replay_id(&self) -> Option<u64> {
        self.replay.as_ref().map(|r| r.id)
    }

    fn not_replaying(&self, what: &str) -> Result<()> {
        match self.replay {
            Some(_) => Err(SaapError::Config(format!(
                "{what} while replaying recorded decode steps; call end_replay first"
            ))),
            None => Ok(()),
        }
    }

    /// [`SaapAttention::decode`] up to the merge: append, route, attend, check; `[B, Hq, D]`.
    fn decode_step(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, batch: usize) -> Result<Tensor> {
        let routes = match self.routing {
            Routing::Dense => false,
            Routing::Quest => true,
            Routing::Classifier | Routing::NearestCentroid => self.index.is_some(),
        };
        let (q_rot, side) = self.append(Some(q), k, v, &vec![1; batch], routes)?;
        let q_rot = q_rot.expect("queries given");
        let n_probe = self.config.n_probe;
        let state = self.state.as_ref().expect("appended");
        // With no page yet (nothing indexed) sinks and window are every key: read them all.
        let quest_pages = match (self.routing, &state.quest) {
            (Routing::Quest, Some(pages)) if pages.n_pages() > 0 => Some(pages),
            _ => None,
        };
        let (probes, scores) = match (&self.index, self.routing) {
            (Some(index), Routing::Classifier) => match self.probe_mass {
                None => {
                    let (probes, scores) = index.classifier.route(&q.squeeze(2)?, n_probe)?;
                    (Some(probes), scores)
                }
                Some(mass) => {
                    let scores = index.classifier.scores(&q.squeeze(2)?)?;
                    let probes = probes_to_mass(&scores, n_probe, mass)?;
                    (Some(probes), Some(scores))
                }
            },
            (Some(index), Routing::NearestCentroid) => {
                let scores = centroid_scores(&q.squeeze(2)?, &index.centroids)?;
                (Some(top_probes(&scores, n_probe)?), Some(scores))
            }
            (_, Routing::Quest) => match quest_pages {
                Some(pages) => {
                    let (probes, scores) = pages.route(&q_rot.squeeze(2)?, self.quest_pages)?;
                    (Some(probes), Some(scores))
                }
                None => (None, None),
            },
            _ => (None, None),
        };
        if let Some(scores) = &scores {
            self.check("routing scores", &[scores])?;
        }
        let (partitions, n_partitions) = match quest_pages {
            Some(pages) => match &pages.dir {
                Some(dir) => (Some(Partitions::Directory(dir.clone())), pages.n_pages()),
                None => (Some(Partitions::Pages(QUEST_PAGE)), pages.n_pages()),
            },
            None => (
                state.dir.clone().map(Partitions::Directory),
                self.config.n_partitions,
            ),
        };
        let means = match (self.estimate_unread, quest_pages, &state.summaries) {
            (true, None, Some(summaries)) if probes.is_some() => Some(summaries.means.clone()),
            _ => None,
        };
        let op = DecodeOp {
            k_cache: state.k.clone(),
            v_cache: state.v.clone(),
            partitions: probes.as_ref().and(partitions),
            probes,
            seqs: state.seqs.clone(),
            sinks: self.config.sinks,
            n_partitions,
            scale: 1.0 / (self.config.layout.head_dim as f32).sqrt(),
            advance: self.replay.as_ref().map(|r| r.advance.clone()),
            means,
        };
        // The attention reads the query and the cache the side launches wrote.
        side.join()?;
        let q_rot = q_rot.squeeze(2)?.contiguous()?;
        let out = q_rot.apply_op1_no_bwd(&op)?;
        self.check("output", &[&out])?;
        self.last_read = if self.track_reads && self.replay.is_none() {
            Some(read_stats(&op)?)
        } else {
            None
        };
        Ok(out)
    }
}

/// Counts the keys a decode op reads, from its probes and the index offsets.
fn read_stats(op: &DecodeOp) -> Result<ReadStats> {
    let (_, hkv, _, _) = op.k_cache.dims4()?;
    let mut stats = ReadStats::default();
    let (Some(partitions), Some(probes)) = (&op.partitions, &op.probes) else {
        for seq in &op.seqs {
            stats.keys_read += seq.len * hkv;
            stats.keys_in_context += seq.len * hkv;
            stats.window_and_sinks += (op.sinks.min(seq.len) + seq.len - seq.indexed_end) * hkv;
        }
        return Ok(stats);
    };
    let c = op.n_partitions;
    let offsets = match partitions {
        // Contiguous first: on CUDA `to_vec3` copies the whole storage (the directory's perm too).
        Partitions::Directory(dir) => dir.narrow(2, 0, c + 1)?.contiguous()?.to_vec3::<u32>()?,
        Partitions::Pages(size) => op
            .seqs
            .iter()
            .map(|&seq| vec![page_offsets(seq, op.sinks, *size, c); hkv])
            .collect(),
    };
    // One probe list per query head, or one a group shares (Quest's pages).
    let lists = probes.dim(1)? / hkv;
    let probes = probes.to_vec3::<u32>()?;
    for (b, seq) in op.seqs.iter().enumerate() {
        let fixed = op.sinks.min(seq.len) + seq.len - seq.indexed_end;
        for h in 0..hkv {
            let mut probed = vec![false; c];
            for head in &probes[b][h * lists..(h + 1) * lists] {
                // C marks a slot adaptive probing left empty.
                for &p in head.iter().filter(|&&p| (p as usize) < c) {
                    probed[p as usize] = true;
                }
            }
            let off = &offsets[b][h];
            for (p, &probed) in probed.iter().enumerate() {
                let n = (off[p + 1] - off[p]) as usize;
                if probed {
                    stats.keys_read += n;
                    stats.partitions_probed += 1;
                } else if op.means.is_some() && n > 0 {
                    stats.partitions_estimated += 1;
                }
            }
            stats.keys_read += fixed;
            stats.window_and_sinks += fixed;
            stats.keys_in_context += seq.len;
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-partition sums exist only while the estimate is on: none after a prefill with it
    /// off, built when it is switched on mid-sequence, freed when it is switched off.
    #[test]
    fn summaries_follow_the_estimate_switch() {
        let mut config = crate::index::tests::config();
        (config.window, config.sinks, config.merge_every) = (4, 1, 2);
        let dev = Device::Cpu;
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let layer = crate::index::tests::layer(&config, 0.5);
        let index = SaapIndex::new(config, "synthetic", vec![layer]).unwrap();
        let mut op = SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap();
        let has = |op: &SaapAttention| op.state.as_ref().unwrap().summaries.is_some();
        let qkv = |t: usize| {
            (
                randn(&[1, 4, t, 8]),
                randn(&[1, 2, t, 8]),
                randn(&[1, 2, t, 8]),
            )
        };
        let (q, k, v) = qkv(20);
        op.prefill(&q, &k, &v, &[20]).unwrap();
        assert!(!has(&op));
        op.set_estimate_unread(true);
        let (q, k, v) = qkv(1);
        op.decode(&q, &k, &v).unwrap();
        assert!(has(&op));
        op.set_estimate_unread(false);
        assert!(!has(&op));
    }
}
