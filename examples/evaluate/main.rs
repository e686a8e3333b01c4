//! Held-out evaluation of Saap on a real model, dense and Saap and the symmetric
//! nearest-centroid ablation and the training-free Quest side by side, through the same op and
//! kernels that decode:
//! per-layer attention-mass recall, attention-output error and keys read (with the recall of a
//! perfect selector reading as many keys), perplexity of teacher-forced decoding, and a passkey
//! (needle in a haystack) grid. Quest decodes at Saap's keys read: its keys budget is the share
//! Saap's routed layers read in the perplexity run; its per-layer indexed recall is computed
//! offline at the keys Saap read (pages of post-RoPE keys ranked by their bound). Writes `report.json`, `report.md` and PNG plots (recall vs keys
//! read per layer, the passkey grid; see `plots.rs`) into `--out`.
//!
//! `cargo run --release --example evaluate -- --help` lists the options.

use candle_core::{Tensor, D};
use clap::{Parser, ValueEnum};
use common::{exit_code, Loaded, ModelArgs, Res};
use saap::models::calibrate::{cached_or_trained_index, record, windows, IndexSources, Plan};
use saap::models::fetch::{self, Text};
use saap::models::Llama;
use saap::train::data::first_query_position;
use saap::train::{evaluate_routing, RoutingEval};
use saap::{PageLayout, PageScore, ReadStats, Routing, SaapIndex};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

#[path = "../common/mod.rs"]
mod common;
mod plots;

#[derive(Parser)]
#[command(about = "Held-out evaluation of Saap on a real model: dense, Saap and nearest centroid")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Index to evaluate; default the cached one (calibrated on first use)
    #[arg(long)]
    index: Option<PathBuf>,
    /// Held-out text (never a calibration text)
    #[arg(long, value_enum, default_value_t = HeldOut::Shakespeare)]
    text: HeldOut,
    /// Tokens per evaluation window
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Windows for the per-layer routing evaluation
    #[arg(long, default_value_t = 2)]
    seqs: usize,
    /// Teacher-forced decode steps for perplexity
    #[arg(long, default_value_t = 256)]
    ppl_tokens: usize,
    /// Passkey prompt lengths in tokens
    #[arg(long, value_delimiter = ',', default_values_t = [1024, 2048, 4096])]
    nih_lengths: Vec<usize>,
    /// Needle depths in 0..1
    #[arg(long, value_delimiter = ',', default_values_t = [0.1, 0.5, 0.9])]
    nih_depths: Vec<f64>,
    /// Passkey haystack: the classic repeated sentences (SmolLM2-135M fails the task even dense
    /// on real prose) or the held-out text
    #[arg(long, value_enum, default_value_t = Haystack::Filler)]
    haystack: Haystack,
    /// Override ℓ
    #[arg(long)]
    probe: Option<usize>,
    /// Keys budget of Saap and nearest centroid (share of the context read per step, window and
    /// sinks included), instead of a fixed ℓ
    #[arg(long, conflicts_with = "probe")]
    keys_budget: Option<f64>,
    /// Spend --keys-budget as one ℓ in every layer (by default layer by layer, from the index's
    /// probe curves where it has them)
    #[arg(long, requires = "keys_budget")]
    uniform_budget: bool,
    /// The least share of the uniform ℓ a layer keeps when --keys-budget is spent layer by layer
    #[arg(long, default_value_t = saap::budget::DEFAULT_FLOOR, conflicts_with = "uniform_budget")]
    plan_floor: f64,
    /// Saap and nearest centroid also estimate the partitions they do not read from their mean
    /// key and value (`SaapAttention::set_estimate_unread`)
    #[arg(long)]
    estimate_unread: bool,
    /// Quest's keys budget (share of the context read per step); default: the share Saap's
    /// routed layers read in the perplexity section
    #[arg(long)]
    quest_budget: Option<f64>,
    /// Route every layer (ignoring the layers the index serves dense)
    #[arg(long)]
    all_sparse: bool,
    /// Layers served dense in every mode besides those the index serves dense (with
    /// --all-sparse: the only dense layers), comma-separated
    #[arg(long, value_delimiter = ',')]
    dense_layers: Vec<usize>,
    /// Layers Saap routes by Quest instead of the classifier, at its keys budget (needs
    /// --keys-budget), comma-separated: a per-layer hybrid
    #[arg(long, value_delimiter = ',', requires = "keys_budget")]
    quest_layers: Vec<usize>,
    /// With --all-sparse: Saap routes by Quest the layers the index recorded for it (where
    /// calibration found Quest's pages holding more of the attention than the classifier at
    /// equal keys), as --quest-layers with the index's list
    #[arg(long, requires_all = ["keys_budget", "all_sparse"], conflicts_with = "quest_layers")]
    hybrid: bool,
    /// Recent window of every layer in every mode (the prefill keeps the widest window asked
    /// for; each mode shrinks it) [default: the index's]
    #[arg(long)]
    window: Option<usize>,
    /// Recent window of the layers a mode routes by Quest (Saap's hybrid layers, every routed
    /// layer in Quest's mode) [default: --window's]
    #[arg(long)]
    quest_window: Option<usize>,
    /// What the pages of layers routed by Quest keep and rank by: `bound` (min and max, Quest's
    /// own), `mean` (the mean key) or `shares` (the mean key, ranked by the group's summed
    /// estimated shares)
    #[arg(long, value_parser = common::parse_page_score, default_value = "bound")]
    page_score: PageScore,
    /// How the pages of layers routed by Quest cut the indexed keys: `consecutive` (Quest's
    /// own) or `partitions` (each partition's list of the index, cut into pages of 16)
    #[arg(long, value_parser = common::parse_page_layout, default_value = "consecutive")]
    page_layout: PageLayout,
    /// The per-layer routing evaluation places its queries where at least this many keys lie
    /// outside sinks and window; default C (pass the same value to compare indexes of different
    /// C on the same queries)
    #[arg(long)]
    min_indexed: Option<usize>,
    /// Sections to leave out (a 128k evaluation split over several runs)
    #[arg(long, value_enum, value_delimiter = ',')]
    skip: Vec<Section>,
    /// Output folder; default <cache>/eval/eval-<model>-ctx<N> (pass bench/results/... to
    /// update the committed results)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only draw the PNGs of an existing report.json into its folder (e.g. one written on a
    /// machine that could not fetch the plot font)
    #[arg(long = "plots", value_name = "REPORT_JSON")]
    plots_of: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum HeldOut {
    Shakespeare,
    Rustbook,
    Jargon,
    Pride,
}

impl HeldOut {
    fn text(self) -> Text {
        match self {
            HeldOut::Shakespeare => Text::Shakespeare,
            HeldOut::Rustbook => Text::RustBook,
            HeldOut::Jargon => Text::JargonFile,
            HeldOut::Pride => Text::PrideAndPrejudice,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Haystack {
    Filler,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Section {
    Routing,
    Ppl,
    Nih,
}

/// The name a value has on the command line.
fn flag_value(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map_or(String::new(), |p| p.get_name().to_string())
}

/// The four ways decode reads keys, compared on the same prefilled cache. Saap comes before
/// Quest: Quest's budget is what Saap read.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
enum Mode {
    Dense,
    Saap,
    NearestCentroid,
    Quest,
}

const MODES: [Mode; 4] = [Mode::Dense, Mode::Saap, Mode::NearestCentroid, Mode::Quest];

/// How each layer is routed: as the index says, or every layer by the classifier; `--dense-layers`
/// dense and (Saap only) `--quest-layers` by Quest in either case.
#[derive(Clone, Copy)]
struct Policy<'a> {
    index: &'a SaapIndex,
    all_sparse: bool,
    dense_layers: &'a [usize],
    quest_layers: &'a [usize],
    /// Keys budget of the trained routings (Saap, nearest centroid), else their ℓ.
    keys_budget: Option<f64>,
    /// Whether the trained routings estimate their unread partitions.
    estimate_unread: bool,
    /// Recent window of every layer (`None`: the index's).
    window: Option<usize>,
    /// Recent window of the layers routed by Quest (`None`: `window`).
    quest_window: Option<usize>,
}

impl Policy<'_> {
    /// Forgets the model's sequences and sets the window the next prefill keeps, so that each
    /// mode's layers can then shrink to theirs ([`common::keep_widest_window`]).
    fn reset(self, model: &mut Llama) -> Res<()> {
        model.reset();
        let asked = self.window.into_iter().chain(self.quest_window);
        common::keep_widest_window(model, asked, self.index.config().window)
    }

    fn routing(self, layer: usize) -> Res<Routing> {
        Ok(if self.dense_layers.contains(&layer) {
            Routing::Dense
        } else if self.quest_layers.contains(&layer) {
            Routing::Quest
        } else if self.all_sparse {
            Routing::Classifier
        } else {
            self.index.layer(layer)?.routing
        })
    }
}

/// Sets every layer's routing for `mode`; layers the policy serves dense stay dense (for Quest
/// too, so that every mode reads the same layers sparsely). Quest reads `quest_budget` of the
/// keys of each routed layer.
fn apply_mode(
    model: &mut Llama,
    policy: Policy,
    mode: Mode,
    probe: usize,
    quest_budget: Option<f64>,
) -> Res<()> {
    // Quest as the training-free peer reads its budget's pages in every layer; the hybrid's
    // Quest layers take part in Saap's plan (where the index holds Quest curves).
    model.set_plan_quest(matches!(mode, Mode::Saap))?;
    for layer in 0..model.n_layers() {
        let trained = policy.routing(layer)?;
        let routing = match (mode, trained) {
            (Mode::Dense, _) | (_, Routing::Dense) => Routing::Dense,
            (Mode::Saap, r) => r,
            (Mode::NearestCentroid, _) => Routing::NearestCentroid,
            (Mode::Quest, _) => Routing::Quest,
        };
        // Through the model, so that a keys budget's per-layer plan follows the routings.
        model.set_routing(layer, routing)?;
        let attn = model.attention_mut(layer)?;
        attn.set_n_probe(probe)?;
        if policy.keys_budget.is_some() {
            attn.set_keys_budget(policy.keys_budget)?;
        }
        // Partition routings only: dense and Quest steps ignore it.
        attn.set_estimate_unread(policy.estimate_unread);
        if routing == Routing::Quest {
            // Saap's Quest layers (the hybrid) read Saap's budget.
            let budget = match mode {
                Mode::Saap => policy.keys_budget,
                _ => quest_budget,
            };
            let budget = budget.ok_or(
                "Quest needs a keys budget: run the perplexity section or pass --quest-budget",
            )?;
            attn.set_keys_budget(Some(budget))?;
        }
    }
    let index_window = policy.index.config().window;
    common::set_layer_windows(model, policy.window, policy.quest_window, index_window)
}

/// Keys read in one decode step by the layers the index routes (those it serves dense left out).
fn routed_reads(model: &Llama, policy: Policy) -> ReadStats {
    let mut total = ReadStats::default();
    for (layer, stats) in model.read_stats().into_iter().enumerate() {
        let routed = policy.routing(layer).is_ok_and(|r| r != Routing::Dense);
        if let (true, Some(stats)) = (routed, stats) {
            total.add(&stats);
        }
    }
    total
}

/// Keys read in one decode step, over all layers.
fn step_reads(model: &Llama) -> ReadStats {
    let mut total = ReadStats::default();
    for stats in model.read_stats().into_iter().flatten() {
        total.add(&stats);
    }
    total
}

#[derive(Debug, Serialize, Deserialize)]
struct LayerRow {
    layer: usize,
    routing: Routing,
    saap: RoutingEval,
    nearest_centroid: RoutingEval,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct DecodeRow {
    mode: String,
    perplexity: f64,
    keys_read_share: f64,
    indexed_keys_read_share: f64,
    nih_correct: usize,
    nih_total: usize,
    /// Decode steps after the first, per second.
    tokens_per_s: f64,
    /// Seconds of the first decode step (cache growth, kernel loading); absent from older reports.
    #[serde(default)]
    first_step_s: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct NihCell {
    length: usize,
    depth: f64,
    passkey: String,
    answers: Vec<(String, String, bool)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    model: String,
    text: String,
    context: usize,
    n_partitions: usize,
    n_probe: usize,
    /// Quest's keys budget (absent from reports written before Quest).
    #[serde(default)]
    quest_keys_budget: Option<f64>,
    window: usize,
    sinks: usize,
    dense_layers: Vec<usize>,
    layers: Vec<LayerRow>,
    decode: Vec<DecodeRow>,
    nih: Vec<NihCell>,
}

fn main() -> std::process::ExitCode {
    common::fix_thread_count();
    exit_code(run())
}

fn run() -> Res<()> {
    let args = Args::parse();
    saap::budget::check_floor(args.plan_floor)?;
    if let Some(path) = &args.plots_of {
        let report: Report = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let out = path.parent().unwrap_or(std::path::Path::new("."));
        write_plots(&report, out)?;
        println!(
            "wrote the plots of {} into {}",
            path.display(),
            out.display()
        );
        return Ok(());
    }
    let Loaded {
        device,
        name,
        path: model_path,
        tok,
        mut model,
    } = args.model.load()?;
    common::check_layers("--dense-layers", &args.dense_layers, model.n_layers())?;
    common::check_layers("--quest-layers", &args.quest_layers, model.n_layers())?;
    let runs = |section: Section| !args.skip.contains(&section);
    let text = args.text.text();
    let (index, index_path) = match &args.index {
        Some(p) => (SaapIndex::load(p, &device)?, p.clone()),
        None => {
            // The full plan's cache only: the shipped index is a quick one.
            let sources = IndexSources {
                model_sha256: Some(saap::models::fetch::sha256_file(&model_path)?),
                ..IndexSources::default()
            };
            cached_or_trained_index(&mut model, &tok, &name, args.context, Plan::Full, &sources)?
        }
    };
    let config = index.config().clone();
    let probe = args.probe.unwrap_or(config.n_probe);
    let config = config.with_n_probe(probe)?;
    println!(
        "{name}: index {} (C = {}, ℓ = {probe}, window {}, sinks {}), held-out text {:?}",
        index_path.display(),
        config.n_partitions,
        config.window,
        config.sinks,
        text
    );
    let ids = tok.encode(&fetch::read_text(text)?)?;

    // 1. Per-layer routing quality on recorded held-out windows.
    let eval_windows = windows(&ids, args.context, args.seqs);
    if eval_windows.is_empty() {
        return Err(format!("{text:?} is shorter than {} tokens", args.context).into());
    }
    let recorded = if runs(Section::Routing) {
        record(&mut model, &eval_windows, 512, None)?
    } else {
        Vec::new()
    };
    let first = first_query_position(&config, args.min_indexed.unwrap_or(config.n_partitions));
    let mut layers = Vec::new();
    for (layer, seqs) in recorded.iter().enumerate() {
        let trained = index.layer(layer)?;
        let eval = |routing| evaluate_routing(seqs, trained, &config, routing, first, 128, &device);
        layers.push(LayerRow {
            layer,
            routing: trained.routing,
            saap: eval(Routing::Classifier)?,
            nearest_centroid: eval(Routing::NearestCentroid)?,
        });
        println!(
            "layer {layer:>2} {:?}: Saap recall {:.3} err {:.3} reading {:.1}% | nearest centroid {:.3} err {:.3} reading {:.1}% | oracle {:.3}",
            trained.routing,
            layers[layer].saap.recall,
            layers[layer].saap.output_rel_error,
            100.0 * layers[layer].saap.indexed_selectivity,
            layers[layer].nearest_centroid.recall,
            layers[layer].nearest_centroid.output_rel_error,
            100.0 * layers[layer].nearest_centroid.indexed_selectivity,
            layers[layer].saap.oracle_recall,
        );
        println!(
            "         indexed mass: Saap {:.3} | nearest centroid {:.3} | Quest at Saap's keys {:.3} reading {:.1}% | perfect classifier {:.3} reading {:.1}%, {:.3} at Saap's keys | top-k oracle {:.3}",
            layers[layer].saap.indexed_recall,
            layers[layer].nearest_centroid.indexed_recall,
            layers[layer].saap.quest_indexed_recall,
            100.0 * layers[layer].saap.quest_indexed_selectivity,
            layers[layer].saap.partition_oracle_indexed_recall,
            100.0 * layers[layer].saap.partition_oracle_indexed_selectivity,
            layers[layer].saap.partition_oracle_matched_indexed_recall,
            layers[layer].saap.oracle_indexed_recall,
        );
        println!(
            "         perfect classifier at Saap's keys over partitions × blocks of {} positions: {:.3}",
            saap::train::eval::AGE_BLOCK,
            layers[layer].saap.partition_block_oracle_matched_indexed_recall,
        );
        println!(
            "         partition pages at Saap's keys: perfect router {:.3} | by Quest's bound {:.3} | by mean {:.3} | by mean inside the classifier's top-2ℓ {:.3} | by mean and spread {:.3} | with the classifier's prior {:.3} | (consecutive pages by mean {:.3}, by mean and spread {:.3}, perfect router {:.3})",
            layers[layer].saap.partition_page_oracle_matched_indexed_recall,
            layers[layer].saap.partition_page_bound_indexed_recall,
            layers[layer].saap.partition_page_mean_indexed_recall,
            layers[layer].saap.partition_page_probed_mean_indexed_recall,
            layers[layer].saap.partition_page_spread_indexed_recall,
            layers[layer].saap.partition_page_prior_indexed_recall,
            layers[layer].saap.quest_mean_indexed_recall,
            layers[layer].saap.quest_spread_indexed_recall,
            layers[layer].saap.quest_oracle_matched_indexed_recall,
        );
        let fine = &layers[layer].saap;
        println!(
            "         finer partition pages at Saap's keys (keys per page: perfect router, by mean): {}",
            saap::train::eval::FINE_PARTITION_PAGES
                .iter()
                .enumerate()
                .map(|(i, size)| format!(
                    "{size}: {:.3}, {:.3}",
                    fine.fine_partition_page_oracle[i], fine.fine_partition_page_mean[i]
                ))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!(
            "         output error with unread partitions estimated: Saap {:.3} → {:.3} from summaries, {:.3} with their exact mass",
            layers[layer].saap.output_rel_error,
            layers[layer].saap.output_rel_error_summary,
            layers[layer].saap.output_rel_error_exact_mass,
        );
    }
    drop(recorded);

    // 2. Perplexity of teacher-forced decoding after a shared dense prefill.
    model.attach_index(Some(&index))?;
    model.set_page_score(args.page_score)?;
    model.set_page_layout(args.page_layout)?;
    model.set_budget_by_layer(!args.uniform_budget)?;
    model.set_plan_floor(args.plan_floor)?;
    let quest_layers: Vec<usize> = match args.hybrid {
        true => (0..index.n_layers())
            .filter(|&l| index.sparse_routing()[l] == Routing::Quest)
            .collect(),
        false => args.quest_layers.clone(),
    };
    let policy = Policy {
        index: &index,
        all_sparse: args.all_sparse,
        dense_layers: &args.dense_layers,
        quest_layers: &quest_layers,
        keys_budget: args.keys_budget,
        estimate_unread: args.estimate_unread,
        window: args.window,
        quest_window: args.quest_window,
    };
    let window = &eval_windows[0];
    let split = window.len() - args.ppl_tokens.min(window.len() - 1);
    let mut decode = Vec::new();
    let mut quest_budget = args.quest_budget;
    if runs(Section::Ppl) {
        policy.reset(&mut model)?;
        let start = Instant::now();
        model.prefill_chunked(&window[..split], model.default_prefill_chunk())?;
        // CUDA queues work: without a sync its tail would be billed to the first decode mode.
        device.synchronize()?;
        println!(
            "prefill: {split} tokens in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        let base = model.snapshot_attention()?;
        for mode in MODES {
            model.restore_attention(&base)?;
            apply_mode(&mut model, policy, mode, probe, quest_budget)?;
            device.synchronize()?;
            let (mut nll, mut reads, mut routed) =
                (0.0, ReadStats::default(), ReadStats::default());
            // The first step grows the restored caches and loads kernels: timed apart.
            let (mut start, mut first_step_s) = (Instant::now(), 0.0);
            for t in split - 1..window.len() - 1 {
                if t == split {
                    first_step_s = start.elapsed().as_secs_f64();
                    start = Instant::now();
                }
                let logits = model.forward_last(
                    &Tensor::new(&window[t..t + 1], &device)?.unsqueeze(0)?,
                    &[1],
                )?;
                let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?.squeeze(0)?;
                nll -= log_p.get(window[t + 1] as usize)?.to_scalar::<f32>()? as f64;
                reads.add(&step_reads(&model));
                routed.add(&routed_reads(&model, policy));
            }
            if mode == Mode::Saap {
                quest_budget = quest_budget.or(Some(routed.selectivity()));
            }
            let steps = (window.len() - split) as f64;
            let timed_steps = (steps - 1.0).max(1.0);
            decode.push(DecodeRow {
                mode: format!("{mode:?}"),
                perplexity: (nll / steps).exp(),
                keys_read_share: reads.selectivity(),
                indexed_keys_read_share: reads.indexed_selectivity(),
                tokens_per_s: timed_steps / start.elapsed().as_secs_f64(),
                first_step_s,
                ..Default::default()
            });
            println!(
                "{mode:?}: perplexity {:.3}, keys read {:.1}% ({:.1}% of indexed; routed layers {:.1}%), first step {first_step_s:.2} s, then {:.1} tokens/s",
                (nll / steps).exp(),
                100.0 * reads.selectivity(),
                100.0 * reads.indexed_selectivity(),
                100.0 * routed.selectivity(),
                timed_steps / start.elapsed().as_secs_f64()
            );
        }
    }

    // 3. Passkey grid: greedy answers after a shared dense prefill of the haystack.
    let mut nih = Vec::new();
    let intro = tok.encode(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n",
    )?;
    let question = tok.encode("\nWhat is the pass key? The pass key is")?;
    let haystack = if args.haystack == Haystack::Filler {
        tok.encode(&"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ".repeat(
            args.nih_lengths.iter().max().copied().unwrap_or(0) / 16 + 1,
        ))?
    } else {
        ids[ids.len() / 3..].to_vec()
    };
    for &length in args.nih_lengths.iter().filter(|_| runs(Section::Nih)) {
        for (d, &depth) in args.nih_depths.iter().enumerate() {
            let passkey = format!("{}", 10_000 + (length * 7919 + d * 104_729) % 90_000);
            let needle = tok.encode(&format!(
                " The pass key is {passkey}. Remember it. {passkey} is the pass key. "
            ))?;
            let hay_len = length.saturating_sub(intro.len() + needle.len() + question.len());
            if haystack.len() < hay_len {
                return Err(format!("haystack shorter than {hay_len} tokens").into());
            }
            let hay = &haystack[..hay_len];
            let at = (depth * hay_len as f64) as usize;
            let prompt: Vec<u32> = intro
                .iter()
                .chain(&hay[..at])
                .chain(&needle)
                .chain(&hay[at..])
                .chain(&question)
                .copied()
                .collect();
            policy.reset(&mut model)?;
            model.prefill_chunked(&prompt[..prompt.len() - 1], model.default_prefill_chunk())?;
            let base = model.snapshot_attention()?;
            let mut answers = Vec::new();
            for mode in MODES {
                model.restore_attention(&base)?;
                apply_mode(&mut model, policy, mode, probe, quest_budget)?;
                let mut next = *prompt.last().expect("prompt");
                let mut out = Vec::new();
                for _ in 0..8 {
                    let logits =
                        model.forward_last(&Tensor::new(&[next], &device)?.unsqueeze(0)?, &[1])?;
                    next = logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
                    out.push(next);
                }
                let text = tok.decode(&out)?;
                let ok = text.contains(&passkey);
                answers.push((format!("{mode:?}"), text, ok));
            }
            println!(
                "NIH length {length} depth {depth}: {:?}",
                answers.iter().map(|a| (&a.0, a.2)).collect::<Vec<_>>()
            );
            nih.push(NihCell {
                length,
                depth,
                passkey,
                answers,
            });
        }
    }
    for (row, mode) in decode.iter_mut().zip(MODES) {
        let name = format!("{mode:?}");
        row.nih_total = nih.len();
        row.nih_correct = nih
            .iter()
            .filter(|c| c.answers.iter().any(|a| a.0 == name && a.2))
            .count();
    }

    let report = Report {
        model: name.clone(),
        text: format!("{text:?}"),
        context: args.context,
        n_partitions: config.n_partitions,
        n_probe: probe,
        quest_keys_budget: quest_budget,
        window: config.window,
        sinks: config.sinks,
        // With --all-sparse none is, whatever the index says.
        dense_layers: (0..index.n_layers())
            .filter(|&l| policy.routing(l).is_ok_and(|r| r == Routing::Dense))
            .collect(),
        layers,
        decode,
        nih,
    };
    let out = match args.out.clone() {
        Some(out) => out,
        None => saap::models::fetch::cache_dir()?
            .join("eval")
            .join(format!("eval-{name}-ctx{}", args.context)),
    };
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out.join("report.md"), markdown(&report, &args))?;
    write_plots(&report, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// `recall_vs_keys_read.png` and `passkey_grid.png` for the sections that ran. Without the plot
/// font (offline, no cache) the plots are left out with a message; the reports stand alone.
fn write_plots(report: &Report, out: &std::path::Path) -> Res<()> {
    if let Err(e) = plots::register_font() {
        eprintln!("plots left out: cannot get their font ({e})");
        return Ok(());
    }
    let title = format!(
        "{}: held-out {}, {} tokens, C = {}, ℓ = {}",
        report.model, report.text, report.context, report.n_partitions, report.n_probe
    );
    if !report.layers.is_empty() {
        let path = out.join("recall_vs_keys_read.png");
        plots::recall_vs_keys_read(&report.layers, &title, &path)?;
    }
    if !report.nih.is_empty() {
        let modes: Vec<String> = MODES.iter().map(|m| format!("{m:?}")).collect();
        plots::passkey_grid(&report.nih, &modes, &title, &out.join("passkey_grid.png"))?;
    }
    Ok(())
}

/// The options of this run, with paths cut to their file names (they are machine-specific).
fn command_line(args: &Args) -> String {
    let joined = |xs: &[String]| xs.join(",");
    let mut s = format!(
        "--text {} --context {} --seqs {} --ppl-tokens {} --nih-lengths {} --nih-depths {} --haystack {}",
        flag_value(args.text),
        args.context,
        args.seqs,
        args.ppl_tokens,
        joined(&args.nih_lengths.iter().map(|x| x.to_string()).collect::<Vec<_>>()),
        joined(&args.nih_depths.iter().map(|x| x.to_string()).collect::<Vec<_>>()),
        flag_value(args.haystack),
    );
    let file = |p: &PathBuf| {
        p.file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned())
    };
    for (flag, value) in [
        ("--qwen", args.model.qwen.then(String::new)),
        ("--cuda", args.model.cuda.then(String::new)),
        ("--model", args.model.model.as_ref().map(file)),
        ("--index", args.index.as_ref().map(file)),
        ("--probe", args.probe.map(|p| p.to_string())),
        ("--all-sparse", args.all_sparse.then(String::new)),
        ("--dense-layers", layer_list(&args.dense_layers)),
        ("--quest-layers", layer_list(&args.quest_layers)),
        ("--hybrid", args.hybrid.then(String::new)),
        ("--window", args.window.map(|w| w.to_string())),
        ("--quest-window", args.quest_window.map(|w| w.to_string())),
        (
            "--page-score",
            (args.page_score != PageScore::Bound)
                .then(|| common::page_score_arg(args.page_score).to_string()),
        ),
        (
            "--page-layout",
            args.page_layout
                .over_partitions()
                .then(|| common::page_layout_arg(args.page_layout)),
        ),
        ("--keys-budget", args.keys_budget.map(|b| b.to_string())),
        ("--uniform-budget", args.uniform_budget.then(String::new)),
        (
            "--plan-floor",
            (args.keys_budget.is_some() && !args.uniform_budget)
                .then(|| args.plan_floor.to_string()),
        ),
        ("--estimate-unread", args.estimate_unread.then(String::new)),
        ("--quest-budget", args.quest_budget.map(|b| b.to_string())),
        ("--yarn", args.model.yarn.map(|f| f.to_string())),
        (
            "--skip",
            (!args.skip.is_empty()).then(|| {
                let names: Vec<String> = args.skip.iter().map(|&s| flag_value(s)).collect();
                names.join(",")
            }),
        ),
    ] {
        if let Some(value) = value {
            let _ = write!(s, " {flag}");
            if !value.is_empty() {
                let _ = write!(s, " {value}");
            }
        }
    }
    s
}

/// A per-layer table's header and rule: `columns`, each once per page size of `sizes`.
fn by_size_header(columns: &[&str], sizes: &[usize]) -> String {
    let head: String = sizes
        .iter()
        .flat_map(|n| columns.iter().map(move |c| format!(" {c} ({n}) |")))
        .collect();
    format!(
        "| layer |{head}\n|---|{}",
        "---|".repeat(columns.len() * sizes.len())
    )
}

fn markdown(r: &Report, args: &Args) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Saap evaluation: {} on held-out {} ({} tokens)\n",
        r.model, r.text, r.context
    );
    let _ = writeln!(
        s,
        "C = {}, ℓ = {}, window {}, sinks {}; layers served dense: {:?}.\n\nCommand: `cargo run --release --example evaluate -- {}`\n",
        r.n_partitions, r.n_probe, r.window, r.sinks, r.dense_layers, command_line(args)
    );
    if let Some(budget) = r.quest_keys_budget {
        let _ = writeln!(
            s,
            "Quest: {}, keys budget {:.1}% of the context per routed layer (the --quest-budget given, else the share Saap's routed layers read); in the per-layer tables, its indexed recall at Saap's keys of each layer (pages of 16 consecutive keys by their bound).\n",
            common::describe_pages(args.page_layout, args.page_score),
            100.0 * budget
        );
    }
    // Sections left out with --skip have no rows and no table.
    if !r.decode.is_empty() {
        let _ = writeln!(s, "## Decoding (same prefill, same op)\n\n| mode | perplexity | keys read (all) | keys read (indexed only) | passkey | first step | tokens/s after |\n|---|---|---|---|---|---|---|");
    }
    for d in &r.decode {
        let passkey = if d.nih_total == 0 {
            "-".to_string()
        } else {
            format!("{}/{}", d.nih_correct, d.nih_total)
        };
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.1}% | {:.1}% | {passkey} | {:.2} s | {:.1} |",
            d.mode,
            d.perplexity,
            100.0 * d.keys_read_share,
            100.0 * d.indexed_keys_read_share,
            d.first_step_s,
            d.tokens_per_s
        );
    }
    if !r.layers.is_empty() {
        let _ = writeln!(s, "\n## Per layer (held-out queries; recall = share of attention mass read)\n\n| layer | routing | Saap recall | oracle recall at Saap's budget | Saap output error | Saap indexed keys read | nearest-centroid recall | NC output error | NC indexed keys read |\n|---|---|---|---|---|---|---|---|---|");
    }
    for l in &r.layers {
        let _ = writeln!(
            s,
            "| {} | {:?} | {:.3} | {:.3} | {:.3} | {:.1}% | {:.3} | {:.3} | {:.1}% |",
            l.layer,
            l.routing,
            l.saap.recall,
            l.saap.oracle_recall,
            l.saap.output_rel_error,
            100.0 * l.saap.indexed_selectivity,
            l.nearest_centroid.recall,
            l.nearest_centroid.output_rel_error,
            100.0 * l.nearest_centroid.indexed_selectivity
        );
    }
    if !r.layers.is_empty() {
        let _ = writeln!(s, "\n## Per layer, the indexed mass alone (outside window and sinks)\n\nPerfect classifier: each head probes the ℓ partitions holding most of its mass (same partitions, group union). At Saap's keys: each head takes its partitions by mass until it has as many keys as Saap read (the last one pro rata). Top-k: the best keys, as many as Saap reads. Quest: pages of 16 keys by their upper bound, as many whole pages as fit in Saap's keys (the best one always).\n\n| layer | Saap | Saap indexed keys read | nearest centroid | Quest at Saap's keys | its indexed keys read | perfect classifier | its indexed keys read | perfect classifier at Saap's keys | top-k at Saap's keys |\n|---|---|---|---|---|---|---|---|---|---|");
    }
    let row = |e: &RoutingEval, nc: &RoutingEval| {
        format!(
            "{:.3} | {:.1}% | {:.3} | {:.3} | {:.1}% | {:.3} | {:.1}% | {:.3} | {:.3} |",
            e.indexed_recall,
            100.0 * e.indexed_selectivity,
            nc.indexed_recall,
            e.quest_indexed_recall,
            100.0 * e.quest_indexed_selectivity,
            e.partition_oracle_indexed_recall,
            100.0 * e.partition_oracle_indexed_selectivity,
            e.partition_oracle_matched_indexed_recall,
            e.oracle_indexed_recall
        )
    };
    for l in &r.layers {
        let _ = writeln!(s, "| {} | {}", l.layer, row(&l.saap, &l.nearest_centroid));
    }
    if !r.layers.is_empty() {
        let avg = |nc: bool| {
            RoutingEval::mean_of(r.layers.iter().map(|l| match nc {
                true => &l.nearest_centroid,
                false => &l.saap,
            }))
        };
        let _ = writeln!(s, "| mean | {}", row(&avg(false), &avg(true)));
    }
    if r.layers
        .iter()
        .any(|l| l.saap.output_rel_error_summary > 0.0)
    {
        let _ = writeln!(s, "\n## Saap's output error with the unread partitions estimated (offline)\n\nEach unread partition adds n_p·exp(q·k̄_p/√D) (k̄_p: mean post-RoPE key of its indexed keys) with its mean value to the softmax; \"exact mass\" adds its true mass instead.\n\n| layer | Saap output error | with summaries | with exact mass |\n|---|---|---|---|");
        for l in &r.layers {
            let e = &l.saap;
            let _ = writeln!(
                s,
                "| {} | {:.4} | {:.4} | {:.4} |",
                l.layer,
                e.output_rel_error,
                e.output_rel_error_summary,
                e.output_rel_error_exact_mass
            );
        }
        let n = r.layers.len() as f64;
        let mean =
            |f: fn(&RoutingEval) -> f64| r.layers.iter().map(|l| f(&l.saap)).sum::<f64>() / n;
        let _ = writeln!(
            s,
            "| mean | {:.4} | {:.4} | {:.4} |",
            mean(|e| e.output_rel_error),
            mean(|e| e.output_rel_error_summary),
            mean(|e| e.output_rel_error_exact_mass)
        );
    }
    if r.layers
        .iter()
        .any(|l| l.saap.partition_page_oracle_matched_indexed_recall > 0.0)
    {
        let _ = writeln!(s, "\n## Partition pages at Saap's keys (offline)\n\nEach partition's indexed keys in position order, cut into pages of 16. Perfect router: each head takes pages by its own mass until it has Saap's keys (the last pro rata). By bound: every partition page ranked by Quest's bound (best head of the group), whole pages while they fit in Saap's keys. By mean: ranked by q·k̄ (k̄ the page's mean post-RoPE key) instead. Two-level: by mean over the pages of the group's classifier top-2ℓ partitions only. By mean and spread: q·k̄ + (s/2)·Σ_d q_d²σ_d² (σ² the page's key variance per dimension, s = 1/√D), the second-order estimate of the page's log-mean-exp. With the classifier's prior: log p̂(c) + s·q·k̄ − LSE over c's pages of (s·q·k̄′ + ln n′), the partition's predicted share of the mass times the page's share of it by the means. Quest: consecutive pages by bound, by mean, and by mean and spread.\n\n| layer | Saap | perfect classifier (partitions) | perfect router (partition pages) | by bound | by mean | by mean, top-2ℓ partitions | by mean and spread | with the classifier's prior | Quest | consecutive pages by mean | consecutive pages by mean and spread | perfect router (consecutive pages) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let cells = |e: &RoutingEval| {
            format!(
                "{:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                e.indexed_recall,
                e.partition_oracle_matched_indexed_recall,
                e.partition_page_oracle_matched_indexed_recall,
                e.partition_page_bound_indexed_recall,
                e.partition_page_mean_indexed_recall,
                e.partition_page_probed_mean_indexed_recall,
                e.partition_page_spread_indexed_recall,
                e.partition_page_prior_indexed_recall,
                e.quest_indexed_recall,
                e.quest_mean_indexed_recall,
                e.quest_spread_indexed_recall,
                e.quest_oracle_matched_indexed_recall
            )
        };
        for l in &r.layers {
            let _ = writeln!(s, "| {} | {}", l.layer, cells(&l.saap));
        }
        let avg = RoutingEval::mean_of(r.layers.iter().map(|l| &l.saap));
        let _ = writeln!(s, "| mean | {}", cells(&avg));
        let sizes = saap::train::eval::PARTITION_PAGE_SIZES;
        let _ = writeln!(
            s,
            "\n## Partition pages by size at Saap's keys (offline)\n\nPer page size (keys): the perfect router per head (each head its own list of Saap's keys), the perfect router for one list per KV group (pages by the heads' summed shares of their mass), the route by mean (the group's best q·k̄), and the route by the group's summed estimated shares (Σ_h exp(s·q_h·k̄ − LSE_h)).\n\n{}",
            by_size_header(&["per head", "per group", "by mean", "by shares"], &sizes)
        );
        let cells = |e: &RoutingEval| {
            (0..sizes.len())
                .map(|i| {
                    let (per_head, by_mean) = match i {
                        0 => (
                            e.partition_page_oracle_matched_indexed_recall,
                            e.partition_page_mean_indexed_recall,
                        ),
                        _ => (
                            e.fine_partition_page_oracle[i - 1],
                            e.fine_partition_page_mean[i - 1],
                        ),
                    };
                    format!(
                        " {per_head:.3} | {:.3} | {by_mean:.3} | {:.3} |",
                        e.group_partition_page_oracle[i], e.group_partition_page_share[i]
                    )
                })
                .collect::<String>()
        };
        for l in &r.layers {
            let _ = writeln!(s, "| {} |{}", l.layer, cells(&l.saap));
        }
        let _ = writeln!(s, "| mean |{}", cells(&avg));
        let _ = writeln!(
            s,
            "\n## Partition page routes' output error at Saap's keys (offline)\n\nThe attention output's relative error ||o' − o|| / ||o|| when the group reads its window, sinks and the pages the route by mean or by the group's shares picks (the tables above), per page size (keys): indexed recall weighs every head alike, this weighs what a head leaves unread by its share of all its attention.\n\n{}",
            by_size_header(&["by mean", "by shares"], &sizes)
        );
        let errors = |e: &RoutingEval| {
            e.partition_page_mean_output_error
                .iter()
                .zip(&e.partition_page_share_output_error)
                .map(|(by_mean, by_share)| format!(" {by_mean:.4} | {by_share:.4} |"))
                .collect::<String>()
        };
        for l in &r.layers {
            let _ = writeln!(s, "| {} |{}", l.layer, errors(&l.saap));
        }
        let _ = writeln!(s, "| mean |{}", errors(&avg));
    }
    if !r.nih.is_empty() {
        let _ = writeln!(s, "\n## Passkey grid\n\n| length | depth | passkey | Dense | Saap | NearestCentroid | Quest |\n|---|---|---|---|---|---|---|");
    }
    for c in &r.nih {
        let cell = |m: &str| {
            c.answers
                .iter()
                .find(|a| a.0 == m)
                .map_or("-".to_string(), |a| {
                    format!(
                        "{} `{}`",
                        if a.2 { "✓" } else { "✗" },
                        a.1.replace('\n', " ").trim()
                    )
                })
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            c.length,
            c.depth,
            c.passkey,
            cell("Dense"),
            cell("Saap"),
            cell("NearestCentroid"),
            cell("Quest")
        );
    }
    s
}

/// A `--…-layers` value as given, or `None` for an empty list.
fn layer_list(layers: &[usize]) -> Option<String> {
    let names: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
    (!names.is_empty()).then(|| names.join(","))
}
