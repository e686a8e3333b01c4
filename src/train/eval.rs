//! Held-out evaluation of a routing: attention-mass recall, keys read, and the recall a perfect
//! top-k selector gets when it reads as many keys.

use crate::budget::ProbeCurve;
use crate::classify::{centroid_scores, top_probes};
use crate::config::{Routing, SaapConfig, QUEST_PAGE};
use crate::error::{Result, SaapError};
use crate::index::LayerIndex;
use crate::train::data::{query_attention, query_positions, Sequence};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// Keys per page of the finer partition pages [`RoutingEval::fine_partition_page_oracle`] and
/// [`RoutingEval::fine_partition_page_mean`] measure (the others have [`QUEST_PAGE`]).
pub const FINE_PARTITION_PAGES: [usize; 2] = [8, 4];

/// Keys per page of the partition pages [`RoutingEval::group_partition_page_oracle`] and
/// [`RoutingEval::group_partition_page_share`] measure: Quest's 16, then the finer ones.
pub const PARTITION_PAGE_SIZES: [usize; 3] =
    [QUEST_PAGE, FINE_PARTITION_PAGES[0], FINE_PARTITION_PAGES[1]];

/// Positions per time block of [`RoutingEval::partition_block_oracle_matched_indexed_recall`].
pub const AGE_BLOCK: usize = 1024;

/// Means over held-out queries and heads.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoutingEval {
    /// Share of the attention mass on indexed keys that falls in the keys read.
    pub indexed_recall: f64,
    /// Share of all attention mass in the keys read (sinks and window included).
    pub recall: f64,
    /// Share of all attention mass in sinks and window alone.
    pub window_sinks_mass: f64,
    /// Indexed keys read / indexed keys (union over the GQA group, as decode reads them).
    pub indexed_selectivity: f64,
    /// Keys read / keys in context, sinks and window included.
    pub selectivity: f64,
    /// Indexed-mass recall of the best possible selector reading as many indexed keys.
    pub oracle_indexed_recall: f64,
    /// Total recall of that oracle (sinks and window included).
    pub oracle_recall: f64,
    /// Indexed-mass recall when every head of a group probes the ℓ partitions that hold most of
    /// its own indexed mass (read as their union, as decode does): a perfect classifier over the
    /// same partitions. Far above `indexed_recall`: the classifier is the gap; close to it: the
    /// partitions are. (Reports written before it existed read back as 0.)
    #[serde(default)]
    pub partition_oracle_indexed_recall: f64,
    /// Indexed keys that partition oracle reads / indexed keys.
    #[serde(default)]
    pub partition_oracle_indexed_selectivity: f64,
    /// The perfect classifier at the keys this routing reads: each head takes its partitions in
    /// order of its own indexed mass until it has as many keys as the routing read (the last
    /// partition credited pro rata), like the top-k oracle, which reads as many single keys.
    /// `partition_oracle_indexed_selectivity` reads more than the routing when the heads of a
    /// group want different partitions; this one compares at equal keys. (0 in older reports.)
    #[serde(default)]
    pub partition_oracle_matched_indexed_recall: f64,
    /// The same at Saap's keys over finer partitions: each partition cut into blocks of
    /// [`AGE_BLOCK`] positions (partition × block, as an index that also splits by time would
    /// have): does position, which pre-RoPE partitions ignore, decide where the mass is?
    #[serde(default)]
    pub partition_block_oracle_matched_indexed_recall: f64,
    /// Relative L2 error of the attention output (exact softmax over the keys read) against
    /// dense attention.
    pub output_rel_error: f64,
    /// `output_rel_error` when the softmax also counts the partitions not read, each estimated
    /// from a summary: its count of indexed keys `n_p`, the mean of its post-RoPE keys `k̄_p`
    /// and of its values `v̄_p`, adding `n_p·exp(q·k̄_p/√D)` to the denominator and that times
    /// `v̄_p` to the numerator (Jensen: at most the partition's true exp-mass). Offline only
    /// (issue 14 item 3c); 0 in older reports.
    #[serde(default)]
    pub output_rel_error_summary: f64,
    /// The same correction with each unread partition's true attention mass and its mean value:
    /// the best any estimate of the mass alone can do.
    #[serde(default)]
    pub output_rel_error_exact_mass: f64,
    /// Quest at this routing's keys: pages of [`QUEST_PAGE`] indexed keys ranked by their
    /// upper bound `Σ_d max(q_d·min_d, q_d·max_d)` over post-RoPE keys (the best of the group's
    /// heads), taken in that order while they fit in the keys this routing read (at least one):
    /// the share of the indexed mass they hold. (0 in older reports.)
    #[serde(default)]
    pub quest_indexed_recall: f64,
    /// Indexed keys those pages hold / indexed keys.
    #[serde(default)]
    pub quest_indexed_selectivity: f64,
    /// The perfect router at this routing's keys over *partition pages*: each partition's
    /// indexed keys in position order cut into pages of [`QUEST_PAGE`] (the last one may be
    /// partial), as an op that appends to a partition's list at its tail would keep them. Each
    /// head takes pages by its own mass until it has as many keys as the routing read (the last
    /// one pro rata). [`evaluate_routing`] measures it and the four fields after it;
    /// calibration does not (0 there and in older reports).
    #[serde(default)]
    pub partition_page_oracle_matched_indexed_recall: f64,
    /// Every partition page ranked by Quest's bound (the best of the group's heads), whole pages
    /// while they fit in the keys this routing read (the best one always): the share of the
    /// indexed mass they hold. Training-free, like Quest, over pages of one cluster each.
    #[serde(default)]
    pub partition_page_bound_indexed_recall: f64,
    /// The same with pages ranked by `q·k̄`, k̄ the mean of the page's post-RoPE keys (the best
    /// of the group's heads): a bound's looseness varies with a page's spread, a mean's does not.
    #[serde(default)]
    pub partition_page_mean_indexed_recall: f64,
    /// Pages by mean only among those of the partitions in the union of the group's top-2ℓ
    /// probes of this routing: the routing narrows, the means choose inside.
    #[serde(default)]
    pub partition_page_probed_mean_indexed_recall: f64,
    /// Pages ranked by the second-order estimate of the log of the page's mean `exp(s·q·k)`
    /// (s = 1/√D): `q·k̄ + (s/2)·Σ_d q_d²·σ_d²`, the mean's score plus the variance of the
    /// logits over its keys (diagonal), which the mean alone (a lower bound, by Jensen) leaves
    /// out.
    #[serde(default)]
    pub partition_page_spread_indexed_recall: f64,
    /// [`RoutingEval::partition_page_oracle_matched_indexed_recall`] over partition pages of
    /// each size of [`FINE_PARTITION_PAGES`] keys.
    #[serde(default)]
    pub fine_partition_page_oracle: [f64; 2],
    /// [`RoutingEval::partition_page_mean_indexed_recall`] over partition pages of each size of
    /// [`FINE_PARTITION_PAGES`] keys.
    #[serde(default)]
    pub fine_partition_page_mean: [f64; 2],
    /// The perfect router for *one* page list per KV group (as decode reads it) over partition
    /// pages of each size of [`PARTITION_PAGE_SIZES`]: pages by the group's summed share of each
    /// head's indexed mass until the list holds the keys this routing read (the last pro rata),
    /// each head's recall counted on that list. The per-head routers above may give each head
    /// its own list of that size: no shared list reaches them when the heads disagree.
    #[serde(default)]
    pub group_partition_page_oracle: [f64; 3],
    /// Pages of each size of [`PARTITION_PAGE_SIZES`] ranked by the sum over the group's heads
    /// of each head's estimated share of its indexed mass per key,
    /// `Σ_h exp(s·q_h·k̄_p − LSE_h)` with `LSE_h = log Σ_p′ n_p′·exp(s·q_h·k̄_p′)` (s = 1/√D),
    /// whole pages within the keys this routing read.
    #[serde(default)]
    pub group_partition_page_share: [f64; 3],
    /// The attention output's relative error (as [`RoutingEval::output_rel_error`]) when the
    /// group reads its window, sinks and the pages of the route by mean
    /// ([`RoutingEval::partition_page_mean_indexed_recall`],
    /// [`RoutingEval::fine_partition_page_mean`]), per size of [`PARTITION_PAGE_SIZES`]. Indexed recall weighs every head alike; this weighs the mass a
    /// head leaves unread by its share of all the head's attention, as decode sees it.
    #[serde(default)]
    pub partition_page_mean_output_error: [f64; 3],
    /// Likewise for the route by the group's shares
    /// ([`RoutingEval::group_partition_page_share`]).
    #[serde(default)]
    pub partition_page_share_output_error: [f64; 3],
    /// Pages ranked with the routing's scores as a prior: the partition's predicted share of the
    /// mass (its log-softmax) times the page's share of it as the means estimate it,
    /// `log p̂(c) + s·q·k̄_p − LSE_{p′ of c}(s·q·k̄_{p′} + ln n_{p′})` for page p of partition c.
    #[serde(default)]
    pub partition_page_prior_indexed_recall: f64,
    /// Quest's consecutive pages ranked by mean instead of bound, at the same keys: what the
    /// clustering adds to the mean.
    #[serde(default)]
    pub quest_mean_indexed_recall: f64,
    /// Quest's consecutive pages ranked by mean and spread (as
    /// [`RoutingEval::partition_page_spread_indexed_recall`]), at the same keys.
    #[serde(default)]
    pub quest_spread_indexed_recall: f64,
    /// The perfect router over Quest's consecutive pages at this routing's keys (each head takes
    /// pages by its own mass, the last one pro rata): the cap of Quest's routes.
    #[serde(default)]
    pub quest_oracle_matched_indexed_recall: f64,
    /// Queries × heads averaged.
    pub samples: usize,
}

/// `a + b` element by element.
fn add<const N: usize>(a: [f64; N], b: [f64; N]) -> [f64; N] {
    std::array::from_fn(|i| a[i] + b[i])
}

impl RoutingEval {
    /// Field-wise sum (for accumulating per-query sums before the mean).
    fn plus(self, o: Self) -> Self {
        Self {
            indexed_recall: self.indexed_recall + o.indexed_recall,
            recall: self.recall + o.recall,
            window_sinks_mass: self.window_sinks_mass + o.window_sinks_mass,
            indexed_selectivity: self.indexed_selectivity + o.indexed_selectivity,
            selectivity: self.selectivity + o.selectivity,
            oracle_indexed_recall: self.oracle_indexed_recall + o.oracle_indexed_recall,
            oracle_recall: self.oracle_recall + o.oracle_recall,
            partition_oracle_indexed_recall: self.partition_oracle_indexed_recall
                + o.partition_oracle_indexed_recall,
            partition_oracle_indexed_selectivity: self.partition_oracle_indexed_selectivity
                + o.partition_oracle_indexed_selectivity,
            partition_oracle_matched_indexed_recall: self.partition_oracle_matched_indexed_recall
                + o.partition_oracle_matched_indexed_recall,
            partition_block_oracle_matched_indexed_recall: self
                .partition_block_oracle_matched_indexed_recall
                + o.partition_block_oracle_matched_indexed_recall,
            output_rel_error: self.output_rel_error + o.output_rel_error,
            output_rel_error_summary: self.output_rel_error_summary + o.output_rel_error_summary,
            output_rel_error_exact_mass: self.output_rel_error_exact_mass
                + o.output_rel_error_exact_mass,
            quest_indexed_recall: self.quest_indexed_recall + o.quest_indexed_recall,
            quest_indexed_selectivity: self.quest_indexed_selectivity + o.quest_indexed_selectivity,
            partition_page_oracle_matched_indexed_recall: self
                .partition_page_oracle_matched_indexed_recall
                + o.partition_page_oracle_matched_indexed_recall,
            partition_page_bound_indexed_recall: self.partition_page_bound_indexed_recall
                + o.partition_page_bound_indexed_recall,
            partition_page_mean_indexed_recall: self.partition_page_mean_indexed_recall
                + o.partition_page_mean_indexed_recall,
            partition_page_probed_mean_indexed_recall: self
                .partition_page_probed_mean_indexed_recall
                + o.partition_page_probed_mean_indexed_recall,
            partition_page_spread_indexed_recall: self.partition_page_spread_indexed_recall
                + o.partition_page_spread_indexed_recall,
            partition_page_prior_indexed_recall: self.partition_page_prior_indexed_recall
                + o.partition_page_prior_indexed_recall,
            fine_partition_page_oracle: add(
                self.fine_partition_page_oracle,
                o.fine_partition_page_oracle,
            ),
            fine_partition_page_mean: add(
                self.fine_partition_page_mean,
                o.fine_partition_page_mean,
            ),
            group_partition_page_oracle: add(
                self.group_partition_page_oracle,
                o.group_partition_page_oracle,
            ),
            group_partition_page_share: add(
                self.group_partition_page_share,
                o.group_partition_page_share,
            ),
            partition_page_mean_output_error: add(
                self.partition_page_mean_output_error,
                o.partition_page_mean_output_error,
            ),
            partition_page_share_output_error: add(
                self.partition_page_share_output_error,
                o.partition_page_share_output_error,
            ),
            quest_mean_indexed_recall: self.quest_mean_indexed_recall + o.quest_mean_indexed_recall,
            quest_spread_indexed_recall: self.quest_spread_indexed_recall
                + o.quest_spread_indexed_recall,
            quest_oracle_matched_indexed_recall: self.quest_oracle_matched_indexed_recall
                + o.quest_oracle_matched_indexed_recall,
            samples: self.samples + o.samples,
        }
    }

    /// The field-wise mean of `evals` (such as one layer's each, averaged over layers), each
    /// counted once; `samples` is their count.
    pub fn mean_of<'a>(evals: impl IntoIterator<Item = &'a RoutingEval>) -> Self {
        evals
            .into_iter()
            .map(|e| Self { samples: 1, ..*e })
            .fold(Self::default(), Self::plus)
            .mean()
    }

    /// The means of field-wise sums over `samples`.
    fn mean(self) -> Self {
        let k = self.samples.max(1) as f64;
        Self {
            indexed_recall: self.indexed_recall / k,
            recall: self.recall / k,
            window_sinks_mass: self.window_sinks_mass / k,
            indexed_selectivity: self.indexed_selectivity / k,
            selectivity: self.selectivity / k,
            oracle_indexed_recall: self.oracle_indexed_recall / k,
            oracle_recall: self.oracle_recall / k,
            partition_oracle_indexed_recall: self.partition_oracle_indexed_recall / k,
            partition_oracle_indexed_selectivity: self.partition_oracle_indexed_selectivity / k,
            partition_oracle_matched_indexed_recall: self.partition_oracle_matched_indexed_recall
                / k,
            partition_block_oracle_matched_indexed_recall: self
                .partition_block_oracle_matched_indexed_recall
                / k,
            output_rel_error: self.output_rel_error / k,
            output_rel_error_summary: self.output_rel_error_summary / k,
            output_rel_error_exact_mass: self.output_rel_error_exact_mass / k,
            quest_indexed_recall: self.quest_indexed_recall / k,
            quest_indexed_selectivity: self.quest_indexed_selectivity / k,
            partition_page_oracle_matched_indexed_recall: self
                .partition_page_oracle_matched_indexed_recall
                / k,
            partition_page_bound_indexed_recall: self.partition_page_bound_indexed_recall / k,
            partition_page_mean_indexed_recall: self.partition_page_mean_indexed_recall / k,
            partition_page_probed_mean_indexed_recall: self
                .partition_page_probed_mean_indexed_recall
                / k,
            partition_page_spread_indexed_recall: self.partition_page_spread_indexed_recall / k,
            partition_page_prior_indexed_recall: self.partition_page_prior_indexed_recall / k,
            fine_partition_page_oracle: self.fine_partition_page_oracle.map(|x| x / k),
            fine_partition_page_mean: self.fine_partition_page_mean.map(|x| x / k),
            group_partition_page_oracle: self.group_partition_page_oracle.map(|x| x / k),
            group_partition_page_share: self.group_partition_page_share.map(|x| x / k),
            partition_page_mean_output_error: self.partition_page_mean_output_error.map(|x| x / k),
            partition_page_share_output_error: self
                .partition_page_share_output_error
                .map(|x| x / k),
            quest_mean_indexed_recall: self.quest_mean_indexed_recall / k,
            quest_spread_indexed_recall: self.quest_spread_indexed_recall / k,
            quest_oracle_matched_indexed_recall: self.quest_oracle_matched_indexed_recall / k,
            samples: self.samples,
        }
    }
}

/// One held-out sequence's queries (`queries_per_seq` after `first`), prepared once for every
/// evaluation of a layer: their attention over the sequence (computed on the work device, read
/// back once), the keys' partitions, and the pre-RoPE queries `[P, Hq, D]` where the layer's
/// weights live (routing runs there, as on the model's device).
struct HeldOut {
    positions: Vec<usize>,
    q: Tensor,
    /// `[Hq][P][n]` softmax weights.
    probs: Vec<Vec<Vec<f32>>>,
    /// `[Hkv][n]` partitions.
    labels: Vec<Vec<u32>>,
    /// Post-RoPE queries `[Hq][P][D]` and keys `[Hkv][n][D]`, values `[Hkv][n][D]`.
    q_rot: Vec<Vec<Vec<f32>>>,
    k_rot: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
    /// Per KV group, Quest's page bounds from the sinks.
    pages: Vec<PageBounds>,
}

impl HeldOut {
    /// `None` when the sequence is too short for a query.
    fn new(
        seq: &Sequence,
        layer: &LayerIndex,
        config: &SaapConfig,
        first: usize,
        queries_per_seq: usize,
        device: &Device,
    ) -> Result<Option<Self>> {
        let positions = query_positions(seq.len(), first, queries_per_seq);
        if positions.is_empty() {
            return Ok(None);
        }
        let qa = query_attention(seq, config, &positions, &layer.centroids, device)?;
        let q =
            qa.q.transpose(0, 1)?
                .contiguous()?
                .to_device(layer.centroids.device())?;
        let k_rot: Vec<Vec<Vec<f32>>> = qa.k_rot.to_vec3()?;
        let pages = k_rot
            .par_iter()
            .map(|keys| PageBounds::new(keys, config.sinks.min(keys.len())..keys.len()))
            .collect();
        Ok(Some(Self {
            positions,
            q,
            probs: qa.probs.to_vec3()?,
            labels: qa.labels.to_vec2()?,
            q_rot: qa.q_rot.to_vec3()?,
            k_rot,
            values: seq.v.to_vec3()?,
            pages,
        }))
    }

    /// The sequences prepared one at a time (at 120k tokens one sequence's attention is
    /// gigabytes), those too short for a query left out.
    fn each<'a>(
        sequences: &'a [Sequence],
        layer: &'a LayerIndex,
        config: &'a SaapConfig,
        first: usize,
        queries_per_seq: usize,
        device: &'a Device,
    ) -> impl Iterator<Item = Result<Self>> + 'a {
        sequences.iter().filter_map(move |seq| {
            Self::new(seq, layer, config, first, queries_per_seq, device).transpose()
        })
    }
}

/// Points of a probe curve: ℓ = 1 ..= ⌈C / G⌉, where a group's G heads can read every partition
/// between them.
fn curve_points(config: &SaapConfig) -> usize {
    config.n_partitions.div_ceil(config.layout.group_size())
}

/// Evaluates `routing` for one layer on held-out `sequences`, `queries_per_seq` queries each,
/// placed after `first` (see [`crate::train::data::first_query_position`]); the true attention
/// is computed on `device`.
///
/// # Errors
/// [`SaapError::Config`] for an ℓ outside `1..=C`, or for
/// [`Routing::Quest`], which these recorded pre-RoPE queries cannot evaluate;
/// [`SaapError::Candle`] when the sequences or the layer do not fit
/// `config`.
pub fn evaluate_routing(
    sequences: &[Sequence],
    layer: &LayerIndex,
    config: &SaapConfig,
    routing: Routing,
    first: usize,
    queries_per_seq: usize,
    device: &Device,
) -> Result<RoutingEval> {
    let mut sum = RoutingEval::default();
    for h in HeldOut::each(sequences, layer, config, first, queries_per_seq, device) {
        sum = sum.plus(routing_sums(&h?, layer, config, routing, true)?);
    }
    Ok(sum.mean())
}

/// What calibration measures for one layer on held-out queries ([`evaluate_for_calibration`]).
pub(crate) struct CalibrationEval {
    /// The classifier at the configured ℓ.
    pub classifier: RoutingEval,
    /// Nearest-centroid routing at the configured ℓ.
    pub nearest: RoutingEval,
    /// The classifier's probe curve ([`probe_curve`]); `None` when no query fits.
    pub probe_curve: Option<ProbeCurve>,
    /// Quest's curve on the same x-axis ([`quest_curve_sums`]); `None` when no query has
    /// indexed keys.
    pub quest_curve: Option<ProbeCurve>,
}

/// The classifier's and nearest centroid's evaluations at the configured ℓ, and the probe
/// curves of the classifier ([`probe_curve`]) and of Quest for one layer, each held-out
/// sequence's attention computed once for all four.
pub(crate) fn evaluate_for_calibration(
    sequences: &[Sequence],
    layer: &LayerIndex,
    config: &SaapConfig,
    first: usize,
    queries_per_seq: usize,
    device: &Device,
) -> Result<CalibrationEval> {
    let (mut classifier, mut nearest) = (RoutingEval::default(), RoutingEval::default());
    let mut curve = CurveSums::zero(curve_points(config));
    let mut quest = CurveSums::zero(curve_points(config));
    for h in HeldOut::each(sequences, layer, config, first, queries_per_seq, device) {
        let h = h?;
        // Calibration needs no partition pages (an offline study, §52): they would double the
        // held-out evaluation's time at long contexts.
        let sums = |routing| routing_sums(&h, layer, config, routing, false);
        classifier = classifier.plus(sums(Routing::Classifier)?);
        nearest = nearest.plus(sums(Routing::NearestCentroid)?);
        curve = curve.plus(curve_sums(&h, layer, config)?);
        quest = quest.plus(quest_curve_sums(&h, config));
    }
    Ok(CalibrationEval {
        classifier: classifier.mean(),
        nearest: nearest.mean(),
        probe_curve: curve.mean(),
        quest_curve: quest.mean(),
    })
}

/// [`evaluate_routing`]'s sums (not yet means) over one sequence's queries; the partition-page
/// fields only `with_pages` (0 otherwise).
fn routing_sums(
    h: &HeldOut,
    layer: &LayerIndex,
    config: &SaapConfig,
    routing: Routing,
    with_pages: bool,
) -> Result<RoutingEval> {
    let (g, c) = (config.layout.group_size(), config.n_partitions);
    let scores = match routing {
        Routing::Classifier => Some(layer.classifier.scores(&h.q)?),
        Routing::NearestCentroid => Some(centroid_scores(&h.q, &layer.centroids)?),
        Routing::Dense => None,
        Routing::Quest => {
            return Err(SaapError::Config(
                "Quest needs post-RoPE keys and pages: it is evaluated by decoding".into(),
            ))
        }
    };
    // Probes per (query, query head): [P, Hq, ℓ], and the 2ℓ the two-level route narrows to.
    let top = |n_probe: usize| -> Result<Option<Vec<Vec<Vec<u32>>>>> {
        scores
            .as_ref()
            .map(|s| Ok(top_probes(s, n_probe)?.to_vec3::<u32>()?))
            .transpose()
    };
    let probes = top(config.n_probe)?;
    // The partition pages' two-level route narrows to 2ℓ (every partition without probes).
    let wide_probes = match with_pages && probes.is_some() {
        true => top((2 * config.n_probe).min(c))?,
        false => None,
    };
    // The routing's scores as log-probabilities per (query, query head): [P][Hq][C] (the
    // classifier's are trained as each partition's share of the mass).
    let log_prior = match (with_pages, &scores) {
        (true, Some(s)) => {
            Some(candle_nn::ops::log_softmax(s, candle_core::D::Minus1)?.to_vec3::<f32>()?)
        }
        _ => None,
    };
    // Queries are independent: score them in parallel, then add the partial sums.
    let (probs, labels, values) = (&h.probs, &h.labels, &h.values);
    let (q_rot, k_rot) = (&h.q_rot, &h.k_rot);
    Ok(h.positions
        .par_iter()
        .enumerate()
        .map(|(i, &t)| {
            let mut sum = RoutingEval::default();
            let n = t + 1;
            let sink_end = config.sinks.min(n);
            let index_end = (t + 1).saturating_sub(config.window).max(sink_end);
            for (kvh, (lab, vals)) in labels.iter().zip(values).enumerate() {
                let heads = kvh * g..(kvh + 1) * g;
                let mut probed = vec![probes.is_none(); c];
                if let Some(probes) = &probes {
                    for &part in probes[i][heads.clone()].iter().flatten() {
                        probed[part as usize] = true;
                    }
                }
                // Indexed keys a partition selection reads, and the mass of `w` on them.
                let in_sel = |sel: &[bool], j: usize| sel[lab[j] as usize];
                let count_in =
                    |sel: &[bool]| (sink_end..index_end).filter(|&j| in_sel(sel, j)).count();
                let mass_in = |sel: &[bool], w: &[f32]| -> f64 {
                    (sink_end..index_end)
                        .filter(|&j| in_sel(sel, j))
                        .map(|j| w[j] as f64)
                        .sum()
                };
                let read = count_in(&probed);
                let unread = unread_summaries(lab, vals, sink_end..index_end, &probed);
                let indexed = index_end - sink_end;
                let best = best_partitions(
                    probs[heads.clone()]
                        .iter()
                        .map(|p| &p[i][sink_end..index_end]),
                    &lab[sink_end..index_end],
                    c,
                    config.n_probe,
                );
                let best_read = count_in(&best);
                let mut sizes = vec![0usize; c];
                for &p in &lab[sink_end..index_end] {
                    sizes[p as usize] += 1;
                }
                let blocks = index_end.div_ceil(AGE_BLOCK).max(1);
                let block_lab: Vec<u32> = (sink_end..index_end)
                    .map(|j| (lab[j] as usize * blocks + j / AGE_BLOCK) as u32)
                    .collect();
                let mut block_sizes = vec![0usize; c * blocks];
                for &p in &block_lab {
                    block_sizes[p as usize] += 1;
                }
                let group_q: Vec<&[f32]> = q_rot[heads.clone()]
                    .iter()
                    .map(|h| h[i].as_slice())
                    .collect();
                let ranked = quest_order(&group_q, &k_rot[kvh], &h.pages[kvh], sink_end..index_end);
                let quest = quest_pages(&ranked, read);
                let quest_read: usize = quest.iter().map(|r| r.len()).sum();
                let page_routes = with_pages.then(|| {
                    let mut wide = vec![wide_probes.is_none(); c];
                    if let Some(wide_probes) = &wide_probes {
                        for &part in wide_probes[i][heads.clone()].iter().flatten() {
                            wide[part as usize] = true;
                        }
                    }
                    let prior: Option<Vec<&[f32]>> = log_prior
                        .as_ref()
                        .map(|p| heads.clone().map(|h| p[i][h].as_slice()).collect());
                    PageRoutes::new(
                        lab,
                        sink_end..index_end,
                        &wide,
                        &group_q,
                        prior.as_deref(),
                        &k_rot[kvh],
                        read,
                    )
                });
                // The group cap per page size: pages by the heads' summed shares of their indexed
                // mass (a head without indexed mass has recall 1 on any list).
                let group_caps: [f64; 3] = match &page_routes {
                    Some(pages) => {
                        let mut summed = vec![0f32; index_end - sink_end];
                        let mut massless = 0;
                        for head_probs in &probs[heads.clone()] {
                            let w = &head_probs[i][sink_end..index_end];
                            let mass: f64 = w.iter().map(|&x| x as f64).sum();
                            if mass > 0.0 {
                                for (s, &x) in summed.iter_mut().zip(w) {
                                    *s += (x as f64 / mass) as f32;
                                }
                            } else {
                                massless += 1;
                            }
                        }
                        pages.sized.each_ref().map(|p| {
                            (mass_at_keys(&summed, &p.labels, &p.sizes, read) + massless as f64)
                                / g as f64
                        })
                    }
                    None => [0.0; 3],
                };
                // Per page size, the indexed keys the mean and the shares routes read.
                let page_reads = page_routes.as_ref().map(|pages| {
                    let marks = |ids: &[usize]| {
                        let mut read = vec![false; index_end];
                        ids.iter().for_each(|&j| read[j] = true);
                        read
                    };
                    pages
                        .sized
                        .each_ref()
                        .map(|p| (marks(&p.mean), marks(&p.share)))
                });
                for head_probs in &probs[heads] {
                    let w = &head_probs[i];
                    let fixed: f64 = w[..sink_end]
                        .iter()
                        .chain(&w[index_end..n])
                        .map(|&x| x as f64)
                        .sum();
                    let mut idx_w: Vec<f64> =
                        w[sink_end..index_end].iter().map(|&x| x as f64).collect();
                    let idx_mass: f64 = idx_w.iter().sum();
                    let got = mass_in(&probed, w);
                    let got_best = mass_in(&best, w);
                    idx_w.sort_by(|a, b| b.total_cmp(a));
                    let oracle: f64 = idx_w[..read].iter().sum();
                    let share = |x: f64| if idx_mass > 0.0 { x / idx_mass } else { 1.0 };
                    sum.indexed_recall += share(got);
                    sum.oracle_indexed_recall += share(oracle);
                    sum.partition_oracle_indexed_recall += share(got_best);
                    sum.partition_oracle_matched_indexed_recall += share(mass_at_keys(
                        &w[sink_end..index_end],
                        &lab[sink_end..index_end],
                        &sizes,
                        read,
                    ));
                    sum.partition_block_oracle_matched_indexed_recall += share(mass_at_keys(
                        &w[sink_end..index_end],
                        &block_lab,
                        &block_sizes,
                        read,
                    ));
                    sum.partition_oracle_indexed_selectivity +=
                        best_read as f64 / indexed.max(1) as f64;
                    sum.recall += fixed + got;
                    sum.oracle_recall += fixed + oracle;
                    sum.window_sinks_mass += fixed;
                    sum.indexed_selectivity += read as f64 / indexed.max(1) as f64;
                    sum.selectivity += (read + n - indexed) as f64 / n as f64;
                    let keep = |j: usize| j < sink_end || j >= index_end || in_sel(&probed, j);
                    sum.output_rel_error += output_error(&w[..n], vals, keep);
                    let (est, exact) = corrected_output_errors(&w[..n], vals, keep, &unread);
                    sum.output_rel_error_summary += est;
                    sum.output_rel_error_exact_mass += exact;
                    let quest_mass: f64 = quest
                        .iter()
                        .flat_map(|r| w[r.clone()].iter())
                        .map(|&x| x as f64)
                        .sum();
                    sum.quest_indexed_recall += share(quest_mass);
                    sum.quest_indexed_selectivity += quest_read as f64 / indexed.max(1) as f64;
                    if let Some(pages) = &page_routes {
                        let mass_of =
                            |ids: &[usize]| -> f64 { ids.iter().map(|&j| w[j] as f64).sum() };
                        let cap = |p: &SizedPages| {
                            share(mass_at_keys(
                                &w[sink_end..index_end],
                                &p.labels,
                                &p.sizes,
                                read,
                            ))
                        };
                        let [sixteen, fine @ ..] = &pages.sized;
                        sum.partition_page_oracle_matched_indexed_recall += cap(sixteen);
                        sum.partition_page_bound_indexed_recall += share(mass_of(&pages.bound));
                        sum.partition_page_mean_indexed_recall += share(mass_of(&sixteen.mean));
                        sum.partition_page_probed_mean_indexed_recall +=
                            share(mass_of(&pages.probed_mean));
                        sum.partition_page_spread_indexed_recall += share(mass_of(&pages.spread));
                        sum.partition_page_prior_indexed_recall += share(mass_of(&pages.prior));
                        sum.quest_mean_indexed_recall += share(mass_of(&pages.quest_mean));
                        sum.quest_spread_indexed_recall += share(mass_of(&pages.quest_spread));
                        for (i, p) in fine.iter().enumerate() {
                            sum.fine_partition_page_oracle[i] += cap(p);
                            sum.fine_partition_page_mean[i] += share(mass_of(&p.mean));
                        }
                        for (i, p) in pages.sized.iter().enumerate() {
                            sum.group_partition_page_oracle[i] += group_caps[i];
                            sum.group_partition_page_share[i] += share(mass_of(&p.share));
                        }
                        if let Some(reads) = &page_reads {
                            let error = |read: &[bool]| {
                                let keep = |j: usize| j >= index_end || j < sink_end || read[j];
                                output_error(&w[..n], vals, keep)
                            };
                            for (i, (by_mean, by_share)) in reads.iter().enumerate() {
                                sum.partition_page_mean_output_error[i] += error(by_mean);
                                sum.partition_page_share_output_error[i] += error(by_share);
                            }
                        }
                        sum.quest_oracle_matched_indexed_recall += share(mass_at_keys(
                            &w[sink_end..index_end],
                            &pages.quest_labels,
                            &pages.quest_sizes,
                            read,
                        ));
                    }
                    sum.samples += 1;
                }
            }
            sum
        })
        .reduce(RoutingEval::default, RoutingEval::plus))
}

/// The partition pages of one (query, KV group) and what routes over them read, as key ids
/// ([`RoutingEval::partition_page_oracle_matched_indexed_recall`] and the fields after it).
struct PageRoutes {
    /// Partition pages of each size of [`PARTITION_PAGE_SIZES`].
    sized: [SizedPages; 3],
    /// Each indexed key's page, and each page's size, of Quest's consecutive pages.
    quest_labels: Vec<u32>,
    quest_sizes: Vec<usize>,
    /// The keys of every partition page of 16 ranked by bound, by mean among the `wide`
    /// partitions, by mean and spread, with the routing's prior ([`prior_scores`]), and of
    /// Quest's consecutive pages by mean and by mean and spread, whole pages within `read` keys.
    bound: Vec<usize>,
    probed_mean: Vec<usize>,
    spread: Vec<usize>,
    prior: Vec<usize>,
    quest_mean: Vec<usize>,
    quest_spread: Vec<usize>,
}

/// Partition pages of one size: each indexed key's page, each page's size, and the keys of the
/// pages by mean and by the group's estimated shares ([`share_scores`]) within the keys read.
struct SizedPages {
    labels: Vec<u32>,
    sizes: Vec<usize>,
    mean: Vec<usize>,
    share: Vec<usize>,
}

impl PageRoutes {
    /// Over the indexed keys `range` (partitions `labels`, post-RoPE `keys`), for the group's
    /// post-RoPE queries `group_q` at `read` keys; `wide` marks the two-level route's partitions,
    /// `prior` holds the group's heads' log-probabilities of the partitions.
    fn new(
        labels: &[u32],
        range: std::ops::Range<usize>,
        wide: &[bool],
        group_q: &[&[f32]],
        prior: Option<&[&[f32]]>,
        keys: &[Vec<f32>],
        read: usize,
    ) -> Self {
        let page_labels = |pages: &[(u32, Vec<usize>)]| {
            let mut page_labels = vec![0u32; range.len()];
            for (p, (_, ids)) in pages.iter().enumerate() {
                for &j in ids {
                    page_labels[j - range.start] = p as u32;
                }
            }
            page_labels
        };
        let bound = |ids: &[usize]| bound_score(group_q, &bounds_of(ids.iter().map(|&j| &keys[j])));
        let ids = |route: Vec<&[usize]>| route.concat();
        let means_of = |pages: &[&[usize]]| -> Vec<Vec<f32>> {
            pages.iter().map(|ids| mean_of(keys, ids)).collect()
        };
        let mean_scores = |means: &[Vec<f32>]| -> Vec<f32> {
            means.iter().map(|m| mean_score(group_q, m)).collect()
        };
        // Per page size, the pages, their mean keys and mean scores, computed once for every
        // route over them.
        let cuts = PARTITION_PAGE_SIZES.map(|size| {
            let pages = partition_pages(labels, range.clone(), wide.len(), size);
            let all: Vec<&[usize]> = pages.iter().map(|(_, ids)| ids.as_slice()).collect();
            let means = means_of(&all);
            let scores = mean_scores(&means);
            (pages, means, scores)
        });
        let sized = cuts.each_ref().map(|(pages, means, scores)| {
            let all: Vec<&[usize]> = pages.iter().map(|(_, ids)| ids.as_slice()).collect();
            SizedPages {
                labels: page_labels(pages),
                sizes: all.iter().map(|ids| ids.len()).collect(),
                mean: ids(fitting(&all, scores, read)),
                share: ids(fitting(&all, &share_scores(pages, means, group_q), read)),
            }
        });
        let (pages, means, scores) = &cuts[0];
        let all: Vec<&[usize]> = pages.iter().map(|(_, ids)| ids.as_slice()).collect();
        let (probed, probed_scores): (Vec<&[usize]>, Vec<f32>) = pages
            .iter()
            .zip(scores)
            .filter(|((p, _), _)| wide[*p as usize])
            .map(|((_, ids), &score)| (ids.as_slice(), score))
            .unzip();
        let spread_scores = |pages: &[&[usize]], means: &[Vec<f32>]| -> Vec<f32> {
            pages
                .iter()
                .zip(means)
                .map(|(ids, mean)| spread_score(group_q, keys, ids, mean))
                .collect()
        };
        let consecutive: Vec<Vec<usize>> = consecutive_pages(range.clone())
            .into_iter()
            .map(Iterator::collect)
            .collect();
        let consecutive: Vec<&[usize]> = consecutive.iter().map(Vec::as_slice).collect();
        let consecutive_means = means_of(&consecutive);
        Self {
            quest_labels: (0..range.len()).map(|j| (j / QUEST_PAGE) as u32).collect(),
            quest_sizes: consecutive.iter().map(|ids| ids.len()).collect(),
            bound: ids(pages_by(&all, &bound, read)),
            probed_mean: ids(fitting(&probed, &probed_scores, read)),
            spread: ids(fitting(&all, &spread_scores(&all, means), read)),
            prior: ids(fitting(
                &all,
                &prior_scores(pages, means, wide.len(), group_q, prior),
                read,
            )),
            quest_mean: ids(fitting(
                &consecutive,
                &mean_scores(&consecutive_means),
                read,
            )),
            quest_spread: ids(fitting(
                &consecutive,
                &spread_scores(&consecutive, &consecutive_means),
                read,
            )),
            sized,
        }
    }
}

/// Measures one layer's [`ProbeCurve`] on held-out `sequences` (queries placed as in
/// [`evaluate_routing`]): for ℓ = 1 ..= ⌈C / G⌉ (where a group's G heads can read every
/// partition between them), the indexed keys the classifier's top-ℓ probes read as the group's
/// union, and the share of each head's indexed attention mass in them. At ℓ = the configured
/// one, the two columns are [`evaluate_routing`]'s `indexed_selectivity` and `indexed_recall`
/// with [`Routing::Classifier`].
///
/// # Errors
/// [`SaapError::Training`] when no query fits the sequences;
/// [`SaapError::Candle`] when the sequences or the layer do not fit
/// `config`.
pub fn probe_curve(
    sequences: &[Sequence],
    layer: &LayerIndex,
    config: &SaapConfig,
    first: usize,
    queries_per_seq: usize,
    device: &Device,
) -> Result<ProbeCurve> {
    let mut sum = CurveSums::zero(curve_points(config));
    for h in HeldOut::each(sequences, layer, config, first, queries_per_seq, device) {
        sum = sum.plus(curve_sums(&h?, layer, config)?);
    }
    sum.mean().ok_or_else(|| {
        SaapError::Training(format!(
            "no held-out query fits: sequences are shorter than {first} tokens"
        ))
    })
}

/// Sums over (query, head) samples of a probe curve: share read and recall per ℓ, indexed mass.
struct CurveSums {
    shares: Vec<f64>,
    recalls: Vec<f64>,
    mass: f64,
    samples: usize,
}

impl CurveSums {
    fn zero(points: usize) -> Self {
        Self {
            shares: vec![0.0; points],
            recalls: vec![0.0; points],
            mass: 0.0,
            samples: 0,
        }
    }

    fn plus(mut self, o: Self) -> Self {
        self.shares
            .iter_mut()
            .zip(&o.shares)
            .for_each(|(x, y)| *x += y);
        self.recalls
            .iter_mut()
            .zip(&o.recalls)
            .for_each(|(x, y)| *x += y);
        self.mass += o.mass;
        self.samples += o.samples;
        self
    }

    /// One group's point `point` of a curve: the share of the indexed keys it read, and per
    /// head of the group the mass `got` of its indexed mass `totals` in them.
    fn add_point(&mut self, point: usize, share: f64, got: &[f64], totals: &[f64]) {
        for (x, total) in got.iter().zip(totals) {
            self.shares[point] += share;
            self.recalls[point] += if *total > 0.0 { x / total } else { 1.0 };
        }
    }

    /// Counts one group's heads as samples, with their indexed masses `totals`.
    fn add_group(&mut self, totals: &[f64]) {
        self.mass += totals.iter().sum::<f64>();
        self.samples += totals.len();
    }

    /// The sums of `each(i, indexed, sums)` over a sequence's queries in parallel, `i` the
    /// query's number and `indexed` its indexed keys (after the sinks, before the window).
    fn over_queries(
        h: &HeldOut,
        config: &SaapConfig,
        each: impl Fn(usize, std::ops::Range<usize>, &mut Self) + Sync,
    ) -> Self {
        let points = curve_points(config);
        h.positions
            .par_iter()
            .enumerate()
            .map(|(i, &t)| {
                let mut acc = Self::zero(points);
                let sink_end = config.sinks.min(t + 1);
                each(
                    i,
                    sink_end..(t + 1).saturating_sub(config.window).max(sink_end),
                    &mut acc,
                );
                acc
            })
            .reduce(|| Self::zero(points), Self::plus)
    }

    /// The curve of the means; `None` without samples.
    fn mean(self) -> Option<ProbeCurve> {
        if self.samples == 0 {
            return None;
        }
        let n = self.samples as f64;
        // Rounding can leave a mean a hair above 1.
        let mean = |x: f64| (x / n).clamp(0.0, 1.0);
        Some(ProbeCurve {
            indexed_mass: mean(self.mass),
            indexed_share: self.shares.into_iter().map(mean).collect(),
            indexed_recall: self.recalls.into_iter().map(mean).collect(),
        })
    }
}

/// [`probe_curve`]'s sums over one sequence's queries.
fn curve_sums(h: &HeldOut, layer: &LayerIndex, config: &SaapConfig) -> Result<CurveSums> {
    let (g, c) = (config.layout.group_size(), config.n_partitions);
    let points = curve_points(config);
    // [P, Hq, points]: each head's partitions in the classifier's order.
    let order = top_probes(&layer.classifier.scores(&h.q)?, points)?.to_vec3::<u32>()?;
    let (probs, labels) = (&h.probs, &h.labels);
    Ok(CurveSums::over_queries(h, config, |i, indexed, acc| {
        for (kvh, lab) in labels.iter().enumerate() {
            let heads = kvh * g..(kvh + 1) * g;
            let mut sizes = vec![0usize; c];
            // Per head of the group, its indexed mass in each partition.
            let mut masses = vec![vec![0.0f64; c]; g];
            for j in indexed.clone() {
                let p = lab[j] as usize;
                sizes[p] += 1;
                for (m, h) in masses.iter_mut().zip(heads.clone()) {
                    m[p] += probs[h][i][j] as f64;
                }
            }
            let totals: Vec<f64> = masses.iter().map(|m| m.iter().sum()).collect();
            let (mut probed, mut read, mut got) = (vec![false; c], 0usize, vec![0.0; g]);
            let head_orders = &order[i][heads.clone()];
            for l in 0..points {
                for head_order in head_orders {
                    let p = head_order[l] as usize;
                    if !std::mem::replace(&mut probed[p], true) {
                        read += sizes[p];
                        got.iter_mut().zip(&masses).for_each(|(x, m)| *x += m[p]);
                    }
                }
                acc.add_point(l, read as f64 / indexed.len().max(1) as f64, &got, &totals);
            }
            acc.add_group(&totals);
        }
    }))
}

/// A Quest curve's sums over one sequence's queries, on the x-axis of [`curve_sums`]: at point
/// u (1-based) Quest reads as many pages of its order as fit in u·G/C of the indexed keys (at
/// least one; what a keys budget whose uniform ℓ is u allows, counting each of the G heads'
/// partitions as distinct), and the share of each head's indexed mass they hold.
fn quest_curve_sums(h: &HeldOut, config: &SaapConfig) -> CurveSums {
    let (g, c) = (config.layout.group_size(), config.n_partitions);
    let points = curve_points(config);
    let (probs, q_rot, k_rot) = (&h.probs, &h.q_rot, &h.k_rot);
    CurveSums::over_queries(h, config, |i, indexed, acc| {
        if indexed.is_empty() {
            return;
        }
        for (kvh, (keys, table)) in k_rot.iter().zip(&h.pages).enumerate() {
            let heads = kvh * g..(kvh + 1) * g;
            let group_q: Vec<&[f32]> = q_rot[heads.clone()]
                .iter()
                .map(|h| h[i].as_slice())
                .collect();
            let ranked = quest_order(&group_q, keys, table, indexed.clone());
            let totals: Vec<f64> = heads
                .clone()
                .map(|h| probs[h][i][indexed.clone()].iter().map(|&x| x as f64).sum())
                .collect();
            let (mut taken, mut read, mut got) = (0usize, 0usize, vec![0.0f64; g]);
            for u in 0..points {
                let keys = (u + 1) * g * indexed.len() / c;
                // As decode counts pages: all of them (the last partial) once the keys cover
                // the indexed ones.
                let pages = match keys >= indexed.len() {
                    true => ranked.len(),
                    false => (keys / QUEST_PAGE).clamp(1, ranked.len()),
                };
                // `pages` only grows with u: add the pages this point reads beyond the last.
                for page in &ranked[taken..pages] {
                    read += page.len();
                    for (x, h) in got.iter_mut().zip(heads.clone()) {
                        *x += probs[h][i][page.clone()]
                            .iter()
                            .map(|&w| w as f64)
                            .sum::<f64>();
                    }
                }
                taken = pages;
                acc.add_point(u, read as f64 / indexed.len() as f64, &got, &totals);
            }
            acc.add_group(&totals);
        }
    })
}

/// Per-dimension bounds (min, max) of a KV group's post-RoPE keys over each whole page of
/// [`QUEST_PAGE`] keys from `start`: computed once per held-out sequence, since every query's
/// indexed keys start at the sinks and differ only in their last, partial page.
struct PageBounds {
    start: usize,
    bounds: Vec<(Vec<f32>, Vec<f32>)>,
}

impl PageBounds {
    /// The whole pages of `keys[range]` (`[n][D]`).
    fn new(keys: &[Vec<f32>], range: std::ops::Range<usize>) -> Self {
        let bounds = range
            .clone()
            .step_by(QUEST_PAGE)
            .take_while(|&a| a + QUEST_PAGE <= range.end)
            .map(|a| bounds_of(&keys[a..a + QUEST_PAGE]))
            .collect();
        Self {
            start: range.start,
            bounds,
        }
    }

    /// The bounds of `keys[page]`, from the table where it is one of its pages.
    fn of(
        &self,
        keys: &[Vec<f32>],
        page: &std::ops::Range<usize>,
    ) -> std::borrow::Cow<'_, (Vec<f32>, Vec<f32>)> {
        let whole = page.len() == QUEST_PAGE
            && page.start >= self.start
            && (page.start - self.start) % QUEST_PAGE == 0;
        match whole
            .then(|| self.bounds.get((page.start - self.start) / QUEST_PAGE))
            .flatten()
        {
            Some(b) => std::borrow::Cow::Borrowed(b),
            None => std::borrow::Cow::Owned(bounds_of(&keys[page.clone()])),
        }
    }
}

/// Per-dimension (min, max) over `rows`.
fn bounds_of<'a>(rows: impl IntoIterator<Item = &'a Vec<f32>>) -> (Vec<f32>, Vec<f32>) {
    let mut rows = rows.into_iter().peekable();
    let d = rows.peek().map_or(0, |row| row.len());
    let (mut lo, mut hi) = (vec![f32::INFINITY; d], vec![f32::NEG_INFINITY; d]);
    for row in rows {
        for (x, (l, h)) in row.iter().zip(lo.iter_mut().zip(hi.iter_mut())) {
            *l = l.min(*x);
            *h = h.max(*x);
        }
    }
    (lo, hi)
}

/// Quest's pages among the indexed keys `range` for one KV group, best first: pages of
/// [`QUEST_PAGE`] keys from `range.start` (the last one may be partial), ranked by the best over
/// the group's post-RoPE queries `group_q` of `Σ_d max(q_d·min_d, q_d·max_d)` (bounds over the
/// page's rows of `keys`, `[n][D]`, from `table` where it holds them), ties to the earlier page.
fn quest_order(
    group_q: &[&[f32]],
    keys: &[Vec<f32>],
    table: &PageBounds,
    range: std::ops::Range<usize>,
) -> Vec<std::ops::Range<usize>> {
    let pages = consecutive_pages(range);
    let scores: Vec<f32> = pages
        .iter()
        .map(|page| bound_score(group_q, &table.of(keys, page)))
        .collect();
    ranked_by(&pages, &scores)
}

/// Quest's pages of the indexed keys `range`: [`QUEST_PAGE`] positions each from `range.start`,
/// the last one possibly partial.
fn consecutive_pages(range: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
    range
        .clone()
        .step_by(QUEST_PAGE)
        .map(|a| a..(a + QUEST_PAGE).min(range.end))
        .collect()
}

/// Quest's upper bound `Σ_d max(q_d·min_d, q_d·max_d)` of a page with `bounds` (min, max),
/// the best over the group's queries `group_q`.
fn bound_score(group_q: &[&[f32]], bounds: &(Vec<f32>, Vec<f32>)) -> f32 {
    let (lo, hi) = bounds;
    group_q
        .iter()
        .map(|q| {
            q.iter()
                .zip(lo.iter().zip(hi))
                .map(|(&q, (&l, &h))| (q * l).max(q * h))
                .sum::<f32>()
        })
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The mean of the rows `ids` of `keys` (zeros for none).
fn mean_of(keys: &[Vec<f32>], ids: &[usize]) -> Vec<f32> {
    let mut mean = vec![0f32; keys.first().map_or(0, Vec::len)];
    let n = ids.len().max(1) as f32;
    for &j in ids {
        mean.iter_mut().zip(&keys[j]).for_each(|(m, x)| *m += x / n);
    }
    mean
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// `max over the group's queries of q·k̄`, k̄ a page's `mean` key.
fn mean_score(group_q: &[&[f32]], mean: &[f32]) -> f32 {
    group_q
        .iter()
        .map(|q| dot(q, mean))
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Each head's logits `s·q_h·k̄_p` of the pages' `means` (s = 1/√D).
fn head_logits(group_q: &[&[f32]], means: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let scale = 1.0 / (means.first().map_or(1, Vec::len) as f32).sqrt();
    group_q
        .iter()
        .map(|q| means.iter().map(|m| scale * dot(q, m)).collect())
        .collect()
}

/// Scores of `pages` (partition, key ids) with a routing's prior: for query head h of the
/// group, `prior_h[c] + s·q_h·k̄_p − LSE_{p′ of c}(s·q_h·k̄_{p′} + ln n_{p′})` for page p of
/// partition c — the log of the partition's predicted share of the mass times the page's share
/// of its partition as the pages' means estimate it, per key (s = 1/√D). The best of the
/// group's heads; without a prior, every partition alike.
fn prior_scores(
    pages: &[(u32, Vec<usize>)],
    means: &[Vec<f32>],
    n_partitions: usize,
    group_q: &[&[f32]],
    prior: Option<&[&[f32]]>,
) -> Vec<f32> {
    let mut best = vec![f32::NEG_INFINITY; pages.len()];
    for (h, logits) in head_logits(group_q, means).iter().enumerate() {
        let mut lse = vec![f32::NEG_INFINITY; n_partitions];
        for ((part, ids), &logit) in pages.iter().zip(logits) {
            let l = &mut lse[*part as usize];
            *l = log_add(*l, logit + (ids.len() as f32).ln());
        }
        for (p, ((part, _), &logit)) in pages.iter().zip(logits).enumerate() {
            let c = *part as usize;
            let score = prior.map_or(0.0, |prior| prior[h][c]) + logit - lse[c];
            best[p] = best[p].max(score);
        }
    }
    best
}

/// Scores of `pages` (partition, key ids) by the group's estimated shares: for each query head
/// h of the group, `exp(s·q_h·k̄_p − LSE_h)` with `LSE_h = log Σ_p′ n_p′·exp(s·q_h·k̄_p′)` — the
/// share of h's mass per key of page p if each key held its page's mean logit — summed over the
/// group's heads (s = 1/√D).
fn share_scores(pages: &[(u32, Vec<usize>)], means: &[Vec<f32>], group_q: &[&[f32]]) -> Vec<f32> {
    let mut summed = vec![0f32; pages.len()];
    for logits in head_logits(group_q, means) {
        let lse = pages
            .iter()
            .zip(&logits)
            .fold(f32::NEG_INFINITY, |l, ((_, ids), &logit)| {
                log_add(l, logit + (ids.len() as f32).ln())
            });
        for (s, &logit) in summed.iter_mut().zip(&logits) {
            *s += (logit - lse).exp();
        }
    }
    summed
}

/// `ln(eˡ + eˣ)` without overflow (`l` may be −∞).
fn log_add(l: f32, x: f32) -> f32 {
    let hi = l.max(x);
    hi + ((l - hi).exp() + (x - hi).exp()).ln()
}

/// The best over the group's queries `group_q` of the second-order estimate of
/// `log mean_j exp(s·q·k_j) / s` over the rows `ids` of `keys` (s = 1/√D, the softmax scale):
/// `q·k̄ + (s/2)·Σ_d q_d²·σ_d²`, k̄ (`mean`, [`mean_of`] the rows) and σ² the rows' mean and
/// variance per dimension. The mean's score ([`mean_score`]) is the first term, a lower bound
/// (Jensen); the second adds what the keys' spread along the query makes of the page's largest
/// logits.
fn spread_score(group_q: &[&[f32]], keys: &[Vec<f32>], ids: &[usize], mean: &[f32]) -> f32 {
    let d = mean.len();
    let n = ids.len().max(1) as f32;
    let mut var = vec![0f32; d];
    for &j in ids {
        var.iter_mut()
            .zip(keys[j].iter().zip(mean))
            .for_each(|(v, (x, m))| *v += (x - m) * (x - m) / n);
    }
    let half_scale = 0.5 / (d.max(1) as f32).sqrt();
    group_q
        .iter()
        .map(|q| {
            q.iter()
                .zip(mean.iter().zip(&var))
                .map(|(q, (m, v))| q * m + half_scale * q * q * v)
                .sum::<f32>()
        })
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `pages` (key ids) ranked by `score`, taken whole while they fit in `budget` keys
/// ([`take_fitting`]).
fn pages_by<'a>(
    pages: &[&'a [usize]],
    score: &dyn Fn(&[usize]) -> f32,
    budget: usize,
) -> Vec<&'a [usize]> {
    let scores: Vec<f32> = pages.iter().map(|ids| score(ids)).collect();
    fitting(pages, &scores, budget)
}

/// `pages` (key ids) ranked by their `scores`, taken whole while they fit in `budget` keys
/// ([`take_fitting`]).
fn fitting<'a>(pages: &[&'a [usize]], scores: &[f32], budget: usize) -> Vec<&'a [usize]> {
    take_fitting(&ranked_by(pages, scores), |ids| ids.len(), budget)
}

/// `items` by descending `scores`; equal scores keep the earlier item first.
fn ranked_by<T: Clone>(items: &[T], scores: &[f32]) -> Vec<T> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order.into_iter().map(|p| items[p].clone()).collect()
}

/// Partition pages of the indexed keys `range`: each partition's keys (by `labels`) in position
/// order, cut into pages of `page` keys from its first key, the last one possibly partial;
/// with each page's partition. A partition's list grows only at its tail as tokens are indexed,
/// so these pages are as stable as Quest's consecutive ones.
fn partition_pages(
    labels: &[u32],
    range: std::ops::Range<usize>,
    n_partitions: usize,
    page: usize,
) -> Vec<(u32, Vec<usize>)> {
    let mut members = vec![Vec::new(); n_partitions];
    for j in range {
        members[labels[j] as usize].push(j);
    }
    members
        .iter()
        .enumerate()
        .flat_map(|(p, ids)| ids.chunks(page).map(move |keys| (p as u32, keys.to_vec())))
        .collect()
}

/// The pages of [`quest_order`] taken in order while their keys fit in `budget` (the first one
/// always): what Quest reads at a routing's keys.
fn quest_pages(ranked: &[std::ops::Range<usize>], budget: usize) -> Vec<std::ops::Range<usize>> {
    take_fitting(ranked, |page| page.len(), budget)
}

/// The `ranked` pages of `len` keys taken in order while their keys fit in `budget` (the first
/// one always; a page that does not fit is skipped, a smaller later one may still fit).
fn take_fitting<T: Clone>(ranked: &[T], len: impl Fn(&T) -> usize, budget: usize) -> Vec<T> {
    let mut taken = Vec::new();
    let mut keys_read = 0;
    for page in ranked {
        if !taken.is_empty() && keys_read + len(page) > budget {
            continue;
        }
        keys_read += len(page);
        taken.push(page.clone());
    }
    taken
}

/// Union over the heads of a group of each head's `n_probe` partitions with the most attention
/// mass; `weights` per head and `labels` cover the same indexed keys.
fn best_partitions<'a>(
    weights: impl Iterator<Item = &'a [f32]>,
    labels: &[u32],
    n_partitions: usize,
    n_probe: usize,
) -> Vec<bool> {
    let mut best = vec![false; n_partitions];
    let mut order: Vec<usize> = (0..n_partitions).collect();
    for w in weights {
        let mut mass = vec![0f64; n_partitions];
        for (&x, &p) in w.iter().zip(labels) {
            mass[p as usize] += x as f64;
        }
        order.sort_by(|&a, &b| mass[b].total_cmp(&mass[a]));
        for &p in &order[..n_probe.min(n_partitions)] {
            best[p] = true;
        }
    }
    best
}

/// Per partition not read (over the indexed keys `range`): the ids of its keys and its mean
/// value.
fn unread_summaries(
    labels: &[u32],
    values: &[Vec<f32>],
    range: std::ops::Range<usize>,
    probed: &[bool],
) -> Vec<(Vec<usize>, Vec<f64>)> {
    let dim = values.first().map_or(0, Vec::len);
    let mut slot = vec![usize::MAX; probed.len()];
    let mut out: Vec<(Vec<usize>, Vec<f64>)> = Vec::new();
    for j in range {
        let p = labels[j] as usize;
        if probed[p] {
            continue;
        }
        if slot[p] == usize::MAX {
            slot[p] = out.len();
            out.push((Vec::new(), vec![0.0; dim]));
        }
        let (ids, sum) = &mut out[slot[p]];
        ids.push(j);
        for (s, &x) in sum.iter_mut().zip(&values[j]) {
            *s += x as f64;
        }
    }
    for (ids, sum) in &mut out {
        let inv = 1.0 / ids.len() as f64;
        sum.iter_mut().for_each(|s| *s *= inv);
    }
    out
}

/// Output errors against dense attention when the keys `keep` are read exactly and every
/// unread partition of `unread` adds an estimated mass `m_p` with its mean value: `m_p` from the
/// summary (`n_p·exp(mean of the keys' scores)`, i.e. the geometric mean of their weights times
/// `n_p`, since `w_j = exp(s_j − lse)`), and `m_p` exact (the partition's true mass).
fn corrected_output_errors(
    w: &[f32],
    values: &[Vec<f32>],
    keep: impl Fn(usize) -> bool,
    unread: &[(Vec<usize>, Vec<f64>)],
) -> (f64, f64) {
    let sums = OutputSums::new(w, values, keep);
    let error = |mass: &dyn Fn(&[usize]) -> f64| {
        sums.error(
            unread
                .iter()
                .map(|(ids, mean_v)| (mass(ids), mean_v.as_slice())),
        )
    };
    let summary = error(&|ids| {
        let mean_ln = ids
            .iter()
            .map(|&j| (w[j].max(f32::MIN_POSITIVE) as f64).ln())
            .sum::<f64>()
            / ids.len() as f64;
        ids.len() as f64 * mean_ln.exp()
    });
    let exact = error(&|ids| ids.iter().map(|&j| w[j] as f64).sum());
    (summary, exact)
}

/// The dense output `o = Σ w_j v_j`, the same sum over the kept keys, and their mass.
struct OutputSums {
    dense: Vec<f64>,
    kept: Vec<f64>,
    kept_mass: f64,
}

impl OutputSums {
    fn new(w: &[f32], values: &[Vec<f32>], keep: impl Fn(usize) -> bool) -> Self {
        let dim = values.first().map_or(0, Vec::len);
        let mut dense = vec![0f64; dim];
        let mut kept = vec![0f64; dim];
        let mut kept_mass = 0f64;
        for (j, (&wj, v)) in w.iter().zip(values).enumerate() {
            let wj = wj as f64;
            let on = keep(j);
            if on {
                kept_mass += wj;
            }
            for ((d, k), &x) in dense.iter_mut().zip(kept.iter_mut()).zip(v) {
                *d += wj * x as f64;
                if on {
                    *k += wj * x as f64;
                }
            }
        }
        Self {
            dense,
            kept,
            kept_mass,
        }
    }

    /// `||o' - o|| / ||o||`, `o'` the softmax over the kept keys plus `extra` (mass, mean value)
    /// pairs, renormalized.
    fn error<'a>(&self, extra: impl Iterator<Item = (f64, &'a [f64])>) -> f64 {
        let mut num = self.kept.clone();
        let mut den = self.kept_mass;
        for (m, mean_v) in extra {
            den += m;
            for (a, &v) in num.iter_mut().zip(mean_v) {
                *a += m * v;
            }
        }
        let inv = if den > 0.0 { 1.0 / den } else { 0.0 };
        let err: f64 = num
            .iter()
            .zip(&self.dense)
            .map(|(a, d)| (a * inv - d).powi(2))
            .sum();
        let norm: f64 = self.dense.iter().map(|d| d * d).sum();
        (err / norm.max(1e-30)).sqrt()
    }
}

/// Mass of the partitions a head reads in order of its own mass `w` (over the indexed keys, with
/// their `labels`; `sizes` counts the keys per partition) until it has `budget` keys, the last
/// partition credited for the share of its keys that fits.
fn mass_at_keys(w: &[f32], labels: &[u32], sizes: &[usize], budget: usize) -> f64 {
    let mut mass = vec![0f64; sizes.len()];
    for (&x, &p) in w.iter().zip(labels) {
        mass[p as usize] += x as f64;
    }
    let mut order: Vec<usize> = (0..sizes.len()).filter(|&p| sizes[p] > 0).collect();
    order.sort_by(|&a, &b| mass[b].total_cmp(&mass[a]));
    let (mut left, mut got) = (budget, 0.0);
    for p in order {
        if left == 0 {
            break;
        }
        let take = sizes[p].min(left);
        got += mass[p] * take as f64 / sizes[p] as f64;
        left -= take;
    }
    got
}

/// `||o_kept - o|| / ||o||` where `o = Σ w_j v_j` and `o_kept` is the softmax restricted to the
/// kept keys (renormalized), as sparse decode computes it.
fn output_error(w: &[f32], values: &[Vec<f32>], keep: impl Fn(usize) -> bool) -> f64 {
    OutputSums::new(w, values, keep).error(std::iter::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mass_at_keys_fills_the_budget_by_partition_mass() {
        // Partition 0: keys 0, 1 (mass 0.1 + 0.1); partition 1: keys 2..5 (0.5 in all);
        // partition 2: key 5 (0.3).
        let w = [0.1, 0.1, 0.2, 0.2, 0.1, 0.3];
        let labels = [0, 0, 1, 1, 1, 2];
        let sizes = [2, 3, 1];
        let at = |budget| mass_at_keys(&w, &labels, &sizes, budget);
        assert!((at(0) - 0.0).abs() < 1e-9);
        // Partition 1 first (0.5), pro rata: 2 of its 3 keys.
        assert!((at(2) - 0.5 * 2.0 / 3.0).abs() < 1e-6);
        assert!((at(3) - 0.5).abs() < 1e-6);
        // Then partition 2 (0.3), then partition 0.
        assert!((at(4) - 0.8).abs() < 1e-6);
        assert!((at(5) - 0.9).abs() < 1e-6);
        assert!((at(6) - 1.0).abs() < 1e-6);
        assert!((at(60) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn page_bounds_table_ranks_as_bounds_computed_per_query() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        let keys: Vec<Vec<f32>> = (0..300)
            .map(|_| (0..8).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        let table = PageBounds::new(&keys, 4..300);
        let none = PageBounds::new(&keys, 4..4);
        assert_eq!((table.bounds.len(), none.bounds.len()), (18, 0));
        for end in [5, 20, 21, 100, 131, 299, 300] {
            let q: Vec<f32> = (0..8).map(|_| rng.random_range(-1.0..1.0)).collect();
            let group = [q.as_slice()];
            assert_eq!(
                quest_order(&group, &keys, &table, 4..end),
                quest_order(&group, &keys, &none, 4..end),
                "end {end}"
            );
        }
    }

    #[test]
    fn quest_pages_rank_by_bound_and_fit_the_budget() {
        // 40 indexed keys from position 4: pages 4..20, 20..36, 36..44 (partial). One key of the
        // middle page points along the query; the others are small.
        let keys: Vec<Vec<f32>> = (0..44)
            .map(|j| match j {
                25 => vec![3.0, 0.0],
                _ => vec![0.1 * (j % 3) as f32 - 0.1, 0.05],
            })
            .collect();
        let q = [1.0f32, 0.0];
        let table = PageBounds::new(&keys, 4..44);
        let pages = |budget| quest_pages(&quest_order(&[&q], &keys, &table, 4..44), budget);
        assert_eq!(pages(16), vec![20..36]);
        // A budget below one page still reads the best page.
        assert_eq!(pages(3), vec![20..36]);
        // Then the remaining pages in score order, as long as they fit: the partial one (8 keys)
        // fits beside the first 16, the second full page does not.
        let two = pages(24);
        assert_eq!(two.len(), 2);
        assert_eq!(two[0], 20..36);
        assert_eq!(pages(40).iter().map(|r| r.len()).sum::<usize>(), 40);
        // The best head of a group decides: a second head that prefers nothing changes nothing.
        let other = [0.0f32, 1.0];
        assert_eq!(
            quest_pages(&quest_order(&[&other, &q], &keys, &table, 4..44), 16),
            vec![20..36]
        );
    }

    #[test]
    fn mean_of_averages_each_field_once_per_eval() {
        let a = RoutingEval {
            indexed_recall: 0.2,
            quest_oracle_matched_indexed_recall: 0.5,
            samples: 128,
            ..RoutingEval::default()
        };
        let b = RoutingEval {
            indexed_recall: 0.6,
            samples: 7,
            ..RoutingEval::default()
        };
        let m = RoutingEval::mean_of([&a, &b]);
        assert!((m.indexed_recall - 0.4).abs() < 1e-12);
        assert!((m.quest_oracle_matched_indexed_recall - 0.25).abs() < 1e-12);
        assert_eq!((m.samples, m.recall), (2, 0.0));
        assert_eq!(RoutingEval::mean_of([]), RoutingEval::default());
    }

    #[test]
    fn partition_pages_follow_each_partitions_list() {
        // Keys 2..40 indexed; partition 1 holds every third key, partition 0 the rest.
        let labels: Vec<u32> = (0..40).map(|j| u32::from(j % 3 == 0)).collect();
        let pages = partition_pages(&labels, 2..40, 3, QUEST_PAGE);
        let of = |p: u32| -> Vec<Vec<usize>> {
            pages
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, ids)| ids.clone())
                .collect()
        };
        let zeros: Vec<usize> = (2..40).filter(|j| j % 3 != 0).collect();
        assert_eq!(of(0), vec![zeros[..16].to_vec(), zeros[16..].to_vec()]);
        assert_eq!(of(1), vec![(3..40).step_by(3).collect::<Vec<_>>()]);
        assert!(of(2).is_empty());
        // Finer pages cut the same lists: partition 1's 13 keys in pages of 4, 4, 4 and 1.
        let fine = partition_pages(&labels, 2..40, 3, 4);
        let ones: Vec<usize> = (3..40).step_by(3).collect();
        let fine_ones: Vec<&[usize]> = fine
            .iter()
            .filter(|(p, _)| *p == 1)
            .map(|(_, ids)| ids.as_slice())
            .collect();
        assert_eq!(fine_ones, ones.chunks(4).collect::<Vec<_>>());
        assert_eq!(fine.len(), 7 + 4);
        // Bounds over a partition's pages find its keys wherever they sit: the keys of
        // partition 1 point along the query, scattered among small ones.
        let keys: Vec<Vec<f32>> = (0..40)
            .map(|j| {
                if j % 3 == 0 {
                    vec![2.0, 0.1]
                } else {
                    vec![0.1, 0.5]
                }
            })
            .collect();
        let q = [1.0f32, 0.0];
        let refs: Vec<&[usize]> = pages.iter().map(|(_, ids)| ids.as_slice()).collect();
        let scores: Vec<f32> = refs
            .iter()
            .map(|ids| bound_score(&[&q], &bounds_of(ids.iter().map(|&j| &keys[j]))))
            .collect();
        let ranked = ranked_by(&refs, &scores);
        assert_eq!(ranked[0], of(1)[0].as_slice());
        // 13 keys of partition 1 fit in 16; neither page of partition 0 fits in the 3 left.
        assert_eq!(take_fitting(&ranked, |ids| ids.len(), 16), vec![ranked[0]]);
        // A page's bound grows with its spread, its mean does not: a loose page (keys ±3 along
        // the query, mean 0) outbounds a tight one (all at 1), the mean ranks the tight first.
        let spread: Vec<Vec<f32>> = (0..32)
            .map(|j| match j {
                0..16 => vec![if j % 2 == 0 { 3.0 } else { -3.0 }, 0.0],
                _ => vec![1.0, 0.0],
            })
            .collect();
        let (loose, tight): (Vec<usize>, Vec<usize>) = ((0..16).collect(), (16..32).collect());
        let two = [loose.as_slice(), tight.as_slice()];
        let bound = |ids: &[usize]| bound_score(&[&q], &bounds_of(ids.iter().map(|&j| &spread[j])));
        let mean = |ids: &[usize]| mean_score(&[&q], &mean_of(&spread, ids));
        assert_eq!((bound(&loose), bound(&tight)), (3.0, 1.0));
        assert_eq!((mean(&loose), mean(&tight)), (0.0, 1.0));
        assert_eq!(pages_by(&two, &bound, 16), vec![loose.as_slice()]);
        assert_eq!(pages_by(&two, &mean, 16), vec![tight.as_slice()]);
        // Mean and spread: the loose page's variance 9 along the query adds (s/2)·9 with
        // s = 1/√2, the tight page's nothing.
        let spread_of = |ids: &[usize]| spread_score(&[&q], &spread, ids, &mean_of(&spread, ids));
        assert!((spread_of(&loose) - 4.5 / 2f32.sqrt()).abs() < 1e-5);
        assert!((spread_of(&tight) - 1.0).abs() < 1e-6);
        assert_eq!(pages_by(&two, &spread_of, 16), vec![loose.as_slice()]);
        // Consecutive pages mix both partitions, so Quest's bound cannot single them out.
        let table = PageBounds::new(&keys, 2..40);
        let consecutive = quest_pages(&quest_order(&[&q], &keys, &table, 2..40), 16);
        assert_eq!(consecutive, vec![2..18]);
    }

    #[test]
    fn the_prior_weighs_partitions_and_the_means_split_them() {
        // Partition 0: two pages of keys at 2 and at 1 along the query; partition 1: one page
        // at 0. A page's score is its partition's log-share plus its log-share of the partition
        // by the means, per key: s·q·k̄ − LSE(s·q·k̄′ + ln n′) with s = 1/√2.
        let keys: Vec<Vec<f32>> = (0..48)
            .map(|j| vec![[2.0, 1.0, 0.0][j / 16], 0.0])
            .collect();
        let pages: Vec<(u32, Vec<usize>)> = (0..3)
            .map(|p| (u32::from(p == 2), (16 * p..16 * p + 16).collect()))
            .collect();
        let q = [1.0f32, 0.0];
        let s = 1.0 / 2f32.sqrt();
        let means: Vec<Vec<f32>> = pages.iter().map(|(_, ids)| mean_of(&keys, ids)).collect();
        let flat = prior_scores(&pages, &means, 2, &[&q], None);
        let ln16 = 16f32.ln();
        let first = 2.0 * s - (ln16 + 2.0 * s + (1.0 + (-s).exp()).ln());
        assert!((flat[0] - first).abs() < 1e-5, "{flat:?}");
        assert!((flat[2] + ln16).abs() < 1e-5, "{flat:?}");
        // A prior for partition 1 reverses the order; the pages inside partition 0 keep theirs.
        let prior = [-5.0f32, 0.0];
        let weighed = prior_scores(&pages, &means, 2, &[&q], Some(&[&prior]));
        assert!(
            weighed[2] > weighed[0] && weighed[0] > weighed[1],
            "{weighed:?}"
        );
        assert!((weighed[0] - (flat[0] - 5.0)).abs() < 1e-5);
    }

    #[test]
    fn group_shares_sum_each_heads_estimate() {
        // Pages of 16 keys at [2, 0], [0, 2] and [0, 0]; head 1 looks along x, head 2 along y.
        let keys: Vec<Vec<f32>> = (0..48)
            .map(|j| [vec![2.0, 0.0], vec![0.0, 2.0], vec![0.0, 0.0]][j / 16].clone())
            .collect();
        let pages: Vec<(u32, Vec<usize>)> = (0..3)
            .map(|p| (p, (16 * p as usize..16 * p as usize + 16).collect()))
            .collect();
        let (q1, q2) = ([1.0f32, 0.0], [0.0f32, 1.0]);
        let means: Vec<Vec<f32>> = pages.iter().map(|(_, ids)| mean_of(&keys, ids)).collect();
        let shares = share_scores(&pages, &means, &[&q1, &q2]);
        // Each head's estimated shares per key, times the keys, sum to 1: the group's to 2.
        let total: f32 = shares.iter().map(|s| 16.0 * s).sum();
        assert!((total - 2.0).abs() < 1e-5, "{shares:?}");
        let e = (2.0 / 2f32.sqrt()).exp();
        let wanted = (e + 1.0) / (16.0 * (e + 2.0));
        assert!((shares[0] - wanted).abs() < 1e-6 && (shares[1] - wanted).abs() < 1e-6);
        assert!(shares[2] < shares[0]);
    }

    #[test]
    fn unread_partition_summaries_correct_the_softmax() {
        // Keys 0..6; partition 0 = keys 0, 1 (read), partition 1 = keys 2, 3, partition 2 =
        // keys 4, 5 (unread). Values are constant within partitions 1 and 2, weights equal within
        // partition 1: its summary estimate is exact.
        let w = [0.3f32, 0.2, 0.1, 0.1, 0.25, 0.05];
        let labels = [0u32, 0, 1, 1, 2, 2];
        let values: Vec<Vec<f32>> = vec![
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![2.0, 2.0],
            vec![2.0, 2.0],
            vec![-1.0, 3.0],
            vec![-1.0, 3.0],
        ];
        let probed = [true, false, false];
        let unread = unread_summaries(&labels, &values, 0..6, &probed);
        assert_eq!(unread.len(), 2);
        assert_eq!(unread[0].0, vec![2, 3]);
        assert_eq!(unread[0].1, vec![2.0, 2.0]);
        let keep = |j: usize| probed[labels[j] as usize];
        let plain = output_error(&w, &values, keep);
        let (summary, exact) = corrected_output_errors(&w, &values, keep, &unread);
        assert!(plain > 0.1, "{plain}");
        // Exact masses with exact mean values: dense attention back.
        assert!(exact < 1e-6, "{exact}");
        // Partition 2's weights differ: the geometric mean under-counts its mass (Jensen), yet
        // the estimate still beats reading nothing of it.
        assert!(summary > 1e-4 && summary < plain, "{summary} vs {plain}");
    }
}
