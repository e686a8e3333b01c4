//! Batched decode throughput and quality, dense vs Saap, in one process: for each batch size,
//! ragged prompts of held-out text (Shakespeare; item i starts elsewhere in the text and is a
//! little shorter than item i − 1) are prefilled as one batch with the index attached; then the
//! same caches are decoded — dense (the index dropped: the op's dense kernel over all keys, no
//! index upkeep) and with Saap's routing at each ℓ asked for — each step by step (eager) and as
//! one CUDA graph per step (`saap::graph::DecodeGraph`). Decoding is teacher-forced on the text's
//! own continuation, so every mode sees the same inputs: the tool prints time to first token,
//! tokens/s, keys read (window and sinks included), perplexity relative to dense on those
//! tokens, and how often Saap's top-1 token is dense's.
//!
//! `cargo run --release --features cuda --example throughput -- --qwen --cuda --index I
//!  --context 32000 --batch 1,8`. `--all-sparse` routes every layer through the classifier
//! (ignoring the index's dense layers; with `--hybrid`, by Quest where the index recorded that
//! Quest finds more); `--n-probe 8,16` sweeps ℓ, `--keys-budget 0.05,0.1` budgets of keys read
//! (ℓ chosen per step to fit), `--probe-mass 0.5,0.8` adaptive probing (top-p), `--quest-budget
//! 0.1` Quest (training-free page bounds) in every layer at that keys budget; `--estimate-unread`
//! runs each Saap setting again with the unread partitions estimated from their means;
//! `--compare-uniform` runs each keys budget both spent layer by layer (the index's probe curves,
//! the default) and as one ℓ for all; `--graph on|off|both` picks the step modes.
//! `--dense-layers 0,5` serves those layers dense in every Saap run, `--quest-layers` routes those
//! by Quest; `--layer-sweep` runs each Saap setting once more per layer with that layer dense as
//! well (a budget's plan then spreads over the other layers anew).

mod common;

use candle_core::{DType, Tensor, D};
use clap::Parser;
use common::{exit_code, ModelArgs, Res};
use saap::graph::DecodeGraph;
use saap::models::fetch::{self, Text};
use saap::models::Llama;
use saap::{PageLayout, PageScore, ReadStats, Routing, SaapIndex};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Batched decode throughput: dense vs Saap on the same prefilled caches")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Saap index of this model (from `calibrate`)
    #[arg(long)]
    index: std::path::PathBuf,
    /// Prompt tokens of the longest item
    #[arg(long, default_value_t = 32000)]
    context: usize,
    /// Batch sizes to run, comma-separated
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Tokens decoded per item and mode
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Route every layer through the classifier, ignoring the index's dense layers
    #[arg(long)]
    all_sparse: bool,
    /// With --all-sparse: route by Quest the layers where calibration found Quest's pages holding
    /// more of the attention than the classifier at equal keys (the index's sparse routing)
    #[arg(long, requires_all = ["all_sparse", "keys_budget"], conflicts_with = "quest_layers")]
    hybrid: bool,
    /// Prefill chunk [default: the model's, 8192 on CUDA]
    #[arg(long)]
    chunk: Option<usize>,
    /// Decode steps as CUDA graphs (on), step by step (off), or both, each timed
    #[arg(long, value_enum, default_value = "both")]
    graph: GraphMode,
    /// ℓ values to run Saap with, comma-separated [default: the index's]
    #[arg(long, value_delimiter = ',', conflicts_with = "keys_budget")]
    n_probe: Vec<usize>,
    /// Budgets of keys read per step (share of the context, window and sinks included) to run
    /// Saap with, comma-separated: ℓ is then chosen per step to fit each
    #[arg(long, value_delimiter = ',')]
    keys_budget: Vec<f64>,
    /// Probe masses (top-p) to run Saap with as well, comma-separated: each head probes until
    /// the classifier's predicted mass reaches it, at most --mass-cap partitions
    #[arg(long, value_delimiter = ',')]
    probe_mass: Vec<f64>,
    /// Most partitions a head probes with --probe-mass [default: 4 × the index's ℓ, at most C]
    #[arg(long)]
    mass_cap: Option<usize>,
    /// Keys budgets to run Quest with as well (every layer, training-free page bounds),
    /// comma-separated
    #[arg(long, value_delimiter = ',')]
    quest_budget: Vec<f64>,
    /// Run every Saap setting a second time with the unread partitions estimated from their
    /// means (`SaapAttention::set_estimate_unread`)
    #[arg(long)]
    estimate_unread: bool,
    /// Run each --keys-budget a second time with the same ℓ in every layer (by default a
    /// budget is spent layer by layer from the index's probe curves, where it has them)
    #[arg(long)]
    compare_uniform: bool,
    /// Run each planned --keys-budget a second time with the Quest layers outside the plan
    /// (each reading the budget's pages, as before indexes held Quest curves)
    #[arg(long)]
    compare_quest_plan: bool,
    /// Floors of the per-layer plan to run each --keys-budget with, comma-separated: the least
    /// share of the uniform ℓ a layer keeps (`saap::budget::plan_probes`)
    #[arg(long, value_delimiter = ',', default_values_t = [saap::budget::DEFAULT_FLOOR])]
    plan_floor: Vec<f64>,
    /// Layers served dense in every Saap run (their keys count in the keys read), comma-separated
    #[arg(long, value_delimiter = ',')]
    dense_layers: Vec<usize>,
    /// Run each Saap setting again once per layer, with that layer served dense as well
    #[arg(long)]
    layer_sweep: bool,
    /// Layers routed by Quest in every Saap run (training-free page bounds, at the keys budget;
    /// needs --keys-budget), comma-separated
    #[arg(long, value_delimiter = ',', requires = "keys_budget")]
    quest_layers: Vec<usize>,
    /// Recent windows to run each Saap setting with, comma-separated (the prefill keeps the
    /// largest of these and the index's; each run indexes the tokens that leave its own)
    /// [default: the index's]
    #[arg(long, value_delimiter = ',')]
    window: Vec<usize>,
    /// Recent windows of the layers routed by Quest, comma-separated, each run beside every
    /// --window (which the other layers keep) [default: the same as the other layers']
    #[arg(long, value_delimiter = ',')]
    quest_window: Vec<usize>,
    /// What the pages of layers routed by Quest keep and rank by, comma-separated, each run
    /// beside every window: `bound` (min and max, Quest's own), `mean` (the mean key) or
    /// `shares` (the mean key, ranked by the group's summed estimated shares)
    #[arg(long, value_delimiter = ',', value_parser = common::parse_page_score, default_value = "bound")]
    page_score: Vec<PageScore>,
    /// How the pages of layers routed by Quest cut the indexed keys, comma-separated, each run
    /// beside every page score: `consecutive` (Quest's own) or `partitions` (each partition's
    /// list of the index, cut into pages of 16)
    #[arg(long, value_delimiter = ',', value_parser = common::parse_page_layout, default_value = "consecutive")]
    page_layout: Vec<PageLayout>,
}

/// One decode of the caches with Saap: how ℓ is set, whether the unread partitions are
/// estimated, a layer served dense besides `--dense-layers` (the layer sweep), and the recent
/// window of every layer and of those routed by Quest (`None`: the prefill's).
#[derive(Clone, Copy)]
struct SaapRun {
    setting: Setting,
    estimate: bool,
    also_dense: Option<usize>,
    window: Option<usize>,
    quest_window: Option<usize>,
    page_score: PageScore,
    page_layout: PageLayout,
}

impl SaapRun {
    /// Puts the model's restored ops in this run's state: `quest_layers` routed by Quest,
    /// `dense_layers` dense (Quest settings route every layer by Quest already).
    fn apply(
        self,
        model: &mut Llama,
        index_window: usize,
        quest_layers: &[usize],
        dense_layers: &[usize],
    ) -> Res<()> {
        self.setting.apply(model)?;
        model.set_estimate_unread(self.estimate);
        model.set_page_score(self.page_score)?;
        model.set_page_layout(self.page_layout)?;
        for &layer in quest_layers {
            model.set_routing(layer, Routing::Quest)?;
        }
        for &layer in dense_layers.iter().chain(&self.also_dense) {
            model.set_routing(layer, Routing::Dense)?;
        }
        // Windows last, each layer's once: the restored caches hold the widest, which a layer
        // can only shrink.
        common::set_layer_windows(model, self.window, self.quest_window, index_window)
    }

    fn label(self) -> String {
        let mut label = self.setting.label();
        if self.estimate {
            label += " + estimate";
        }
        if let Some(layer) = self.also_dense {
            label += &format!(", layer {layer} dense");
        }
        if let Some(window) = self.window {
            label += &format!(", window {window}");
        }
        if let Some(window) = self.quest_window {
            label += &format!(", Quest layers' window {window}");
        }
        if self.page_score != PageScore::Bound {
            label += &format!(
                ", Quest pages by {}",
                common::page_score_arg(self.page_score)
            );
        }
        if let PageLayout::Partitions { page } = self.page_layout {
            label += &format!(", Quest pages of {page} over partitions");
        }
        label
    }
}

/// How a Saap run sets ℓ.
#[derive(Clone, Copy)]
enum Setting {
    Probe(usize),
    /// A keys budget, spent layer by layer from the index's curves (with this floor; the Quest
    /// layers too where `quest_planned`) or as the same ℓ everywhere (`floor: None`).
    Budget {
        budget: f64,
        floor: Option<f64>,
        quest_planned: bool,
    },
    /// Probe mass, with at most this many partitions per head.
    Mass(f64, usize),
    /// Quest in every layer, pages chosen per step to fit this keys budget.
    Quest(f64),
}

impl Setting {
    fn apply(self, model: &mut Llama) -> Res<()> {
        match self {
            Setting::Probe(n_probe) | Setting::Mass(_, n_probe) => {
                model.set_keys_budget(None)?;
                for layer in 0..model.n_layers() {
                    model.attention_mut(layer)?.set_n_probe(n_probe)?;
                }
            }
            Setting::Budget {
                budget,
                floor,
                quest_planned,
            } => {
                model.set_budget_by_layer(floor.is_some())?;
                model.set_plan_quest(quest_planned)?;
                if let Some(floor) = floor {
                    model.set_plan_floor(floor)?;
                }
                model.set_keys_budget(Some(budget))?;
            }
            Setting::Quest(budget) => {
                // The training-free peer: each layer reads the budget's pages, unplanned.
                model.set_plan_quest(false)?;
                for layer in 0..model.n_layers() {
                    model.set_routing(layer, Routing::Quest)?;
                }
                model.set_keys_budget(Some(budget))?;
            }
        }
        let mass = match self {
            Setting::Mass(mass, _) => Some(mass),
            _ => None,
        };
        model.set_probe_mass(mass)?;
        Ok(())
    }

    fn label(self) -> String {
        match self {
            Setting::Probe(n_probe) => format!("ℓ {n_probe}"),
            Setting::Budget {
                budget,
                floor: Some(floor),
                quest_planned,
            } => format!(
                "budget {budget}, floor {floor}{}",
                if quest_planned {
                    ""
                } else {
                    ", Quest unplanned"
                }
            ),
            Setting::Budget {
                budget,
                floor: None,
                ..
            } => format!("budget {budget}, uniform ℓ"),
            Setting::Mass(mass, cap) => format!("mass {mass}, at most {cap}"),
            Setting::Quest(budget) => format!("Quest, budget {budget}"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GraphMode {
    On,
    Off,
    Both,
}

impl GraphMode {
    /// The modes to time: `false` step by step, `true` graphs.
    fn runs(self) -> Vec<bool> {
        match self {
            GraphMode::On => vec![true],
            GraphMode::Off => vec![false],
            GraphMode::Both => vec![false, true],
        }
    }
}

fn main() -> std::process::ExitCode {
    common::fix_thread_count();
    exit_code(run(Args::parse()))
}

fn run(args: Args) -> Res<()> {
    for &floor in &args.plan_floor {
        saap::budget::check_floor(floor)?;
    }
    let common::Loaded {
        device,
        name,
        tok: tokenizer,
        path: _,
        mut model,
    } = args.model.load()?;
    let index = SaapIndex::load(&args.index, &device)?;
    model.attach_index(Some(&index))?;
    let text = tokenizer.encode(&fetch::read_text(Text::Shakespeare)?)?;
    let longest_batch = args.batch.iter().max().copied().unwrap_or(1);
    let stride = 4099;
    if args.tokens < 2 {
        return Err("--tokens must be at least 2 (one step and the token it predicts)".into());
    }
    let needed = args.context + stride * longest_batch + args.tokens;
    if args.context == 0 || args.batch.contains(&0) || text.len() < needed {
        return Err(format!(
            "--context {} with batch {longest_batch} needs {needed} tokens of text; Shakespeare has {}",
            args.context,
            text.len()
        )
        .into());
    }
    let chunk = args.chunk.unwrap_or(model.default_prefill_chunk());
    println!(
        "# {name} on {:?}: context {} (ragged), {} tokens per item and mode, all sparse: {}",
        device.location(),
        args.context,
        args.tokens,
        args.all_sparse
    );
    println!("batch | graph | ℓ | prefill = time to first token (s) | dense tok/s | Saap tok/s | speedup | keys read | perplexity vs dense | top-1 as dense");
    let index_probe = index.config().n_probe;
    let mut settings: Vec<Setting> = if !args.keys_budget.is_empty() {
        let spreads: Vec<Option<f64>> = args
            .plan_floor
            .iter()
            .map(|&f| Some(f))
            .chain(args.compare_uniform.then_some(None))
            .collect();
        args.keys_budget
            .iter()
            .flat_map(|&budget| {
                spreads.iter().flat_map(move |&floor| {
                    // The Quest layers outside the plan as well, where asked (a uniform ℓ has
                    // no plan to leave).
                    let unplanned = args.compare_quest_plan && floor.is_some();
                    std::iter::once(true).chain(unplanned.then_some(false)).map(
                        move |quest_planned| Setting::Budget {
                            budget,
                            floor,
                            quest_planned,
                        },
                    )
                })
            })
            .collect()
    } else if !args.n_probe.is_empty() {
        args.n_probe.iter().map(|&l| Setting::Probe(l)).collect()
    } else {
        vec![Setting::Probe(index_probe)]
    };
    let cap = args
        .mass_cap
        .unwrap_or(4 * index_probe)
        .min(index.config().n_partitions);
    settings.extend(args.probe_mass.iter().map(|&m| Setting::Mass(m, cap)));
    settings.extend(args.quest_budget.iter().map(|&b| Setting::Quest(b)));
    // Each setting without, then (if asked) with the estimate of the unread partitions; Quest
    // reads pages, which have no means. Then (if asked) each of those once per layer dense.
    let sweep: Vec<Option<usize>> = std::iter::once(None)
        .chain(
            (0..model.n_layers())
                .filter(|l| args.layer_sweep && !args.dense_layers.contains(l))
                .map(Some),
        )
        .collect();
    let some_or_none = |values: &[usize]| -> Vec<Option<usize>> {
        match values.is_empty() {
            true => vec![None],
            false => values.iter().map(|&w| Some(w)).collect(),
        }
    };
    let windows: Vec<(Option<usize>, Option<usize>, PageScore, PageLayout)> =
        some_or_none(&args.window)
            .into_iter()
            .flat_map(|w| {
                some_or_none(&args.quest_window)
                    .into_iter()
                    .map(move |q| (w, q))
            })
            .flat_map(|(w, q)| args.page_score.iter().map(move |&score| (w, q, score)))
            .flat_map(|(w, q, score)| {
                args.page_layout
                    .iter()
                    .map(move |&layout| (w, q, score, layout))
            })
            .collect();
    let runs: Vec<SaapRun> = settings
        .iter()
        .flat_map(|&s| {
            let again = args.estimate_unread && !matches!(s, Setting::Quest(_));
            std::iter::once(false)
                .chain(again.then_some(true))
                .map(move |e| (s, e))
        })
        .flat_map(|(setting, estimate)| {
            sweep
                .iter()
                .map(move |&also_dense| (setting, estimate, also_dense))
        })
        .flat_map(|(setting, estimate, also_dense)| {
            windows.iter().map(
                move |&(window, quest_window, page_score, page_layout)| SaapRun {
                    setting,
                    estimate,
                    also_dense,
                    window,
                    quest_window,
                    page_score,
                    page_layout,
                },
            )
        })
        .collect();
    common::check_layers("--dense-layers", &args.dense_layers, model.n_layers())?;
    common::check_layers("--quest-layers", &args.quest_layers, model.n_layers())?;
    for &batch in &args.batch {
        // Item i: ~1.5% shorter than item i − 1, from its own place in the text; it is then fed
        // its own continuation.
        let (prompts, continuations): (Vec<&[u32]>, Vec<&[u32]>) = (0..batch)
            .map(|i| {
                let (start, len) = (i * stride, args.context - i * args.context / 64);
                (
                    &text[start..start + len],
                    &text[start + len..start + len + args.tokens],
                )
            })
            .unzip();
        model.attach_index(Some(&index))?;
        if args.all_sparse {
            model.serve_all_sparse(args.hybrid)?;
        }
        // The prefill keeps the largest window asked for; each run shrinks it to its own.
        let asked = args.window.iter().chain(&args.quest_window).copied();
        common::keep_widest_window(&mut model, asked, index.config().window)?;
        let start = Instant::now();
        model.prefill_batch(&prompts, chunk)?;
        device.synchronize()?;
        let prefill_s = start.elapsed().as_secs_f64();
        let snapshot = model.snapshot_attention()?;
        for graph in args.graph.runs() {
            // Dense: the same caches without the index (no per-step assignment or merges).
            model.restore_attention(&snapshot)?;
            for layer in 0..model.n_layers() {
                model.attention_mut(layer)?.drop_index();
            }
            let dense = decode(&mut model, &continuations, graph)?;
            for &run in &runs {
                let SaapRun {
                    setting, estimate, ..
                } = run;
                // The prefilled caches, put in this run's state.
                let restore = |model: &mut Llama| -> Res<()> {
                    model.restore_attention(&snapshot)?;
                    let window = index.config().window;
                    run.apply(model, window, &args.quest_layers, &args.dense_layers)
                };
                restore(&mut model)?;
                let saap = decode(&mut model, &continuations, graph)?;
                // Keys read: a few tracked steps (tracking syncs every layer: not timed).
                restore(&mut model)?;
                let reads = keys_read(&mut model, &continuations, 8)?;
                // ℓ of the routed layers after the last step (a budget sets it per step).
                let probes = (0..model.n_layers())
                    .map(|l| {
                        let op = model.attention_mut(l)?;
                        Ok((op.routing() != Routing::Dense).then(|| op.config().n_probe))
                    })
                    .collect::<Res<Vec<_>>>()?;
                let probes: Vec<usize> = probes.into_iter().flatten().collect();
                let routings = model.routings();
                let quest_layers: Vec<usize> = (0..routings.len())
                    .filter(|&l| routings[l] == Routing::Quest)
                    .collect();
                let n_probe = probes.first().copied().unwrap_or(0);
                // The window of the first layer of each kind (Quest or not), if any.
                let window_of = |model: &mut Llama, quest: bool| -> Res<String> {
                    for l in 0..model.n_layers() {
                        let op = model.attention_mut(l)?;
                        if (op.routing() == Routing::Quest) == quest {
                            return Ok(op.config().window.to_string());
                        }
                    }
                    Ok("null".into())
                };
                let (window, quest_window) =
                    (window_of(&mut model, false)?, window_of(&mut model, true)?);
                let ell = match probes.iter().all(|&l| l == n_probe) {
                    true => n_probe.to_string(),
                    false => format!("{probes:?}"),
                };
                let label = run.label();
                // Rows of partition means read beside the keys, as a share of the context.
                let estimated =
                    reads.partitions_estimated as f64 / reads.keys_in_context.max(1) as f64;
                let (budget, mass) = match setting {
                    Setting::Budget { budget: b, .. } | Setting::Quest(b) => (b, 0.0),
                    Setting::Probe(_) => (0.0, 0.0),
                    Setting::Mass(m, _) => (0.0, m),
                };
                let steps = (batch * (args.tokens - 1)) as f64;
                let ppl_ratio = (saap.nll - dense.nll).exp();
                let top1 = agreement(&dense.top1, &saap.top1);
                let mode = if graph { "on" } else { "off" };
                println!(
                    "{batch} | {mode} | {label} (ℓ now {ell}) | {prefill_s:.2} | {:.1} | {:.1} | {:.2}× | {:.1}%{} | {ppl_ratio:.4} | {:.1}% (launches: dense {}, Saap {})",
                    steps / dense.seconds,
                    steps / saap.seconds,
                    dense.seconds / saap.seconds,
                    100.0 * reads.selectivity(),
                    match estimate {
                        true => format!(" + {:.1}% means", 100.0 * estimated),
                        false => String::new(),
                    },
                    100.0 * top1,
                    dense.launches,
                    saap.launches,
                );
                println!(
                    "JSON {{\"kind\":\"throughput\",\"quest\":{},\"model\":\"{name}\",\"context\":{},\"batch\":{batch},\"graph\":{graph},\"all_sparse\":{},\"n_probe\":{n_probe},\"keys_budget\":{budget},\"budget_by_layer\":{},\"plan_quest\":{},\"plan_floor\":{},\"probes\":{probes:?},\"probe_mass\":{mass},\"index_n_probe\":{index_probe},\"estimate_unread\":{estimate},\"dense_layers\":{:?},\"quest_layers\":{:?},\"estimated_rows\":{estimated:.4},\"window\":{window},\"quest_window\":{quest_window},\"page_score\":\"{:?}\",\"page_layout\":\"{:?}\",\"prefill_s\":{prefill_s:.3},\"dense_tok_s\":{:.2},\"saap_tok_s\":{:.2},\"keys_read\":{:.4},\"dense_nll\":{:.5},\"saap_nll\":{:.5},\"ppl_ratio\":{ppl_ratio:.5},\"top1_agree\":{top1:.4},\"tokens\":{}}}",
                    matches!(setting, Setting::Quest(_)),
                    args.context,
                    args.all_sparse,
                    matches!(setting, Setting::Budget { floor: Some(_), .. }),
                    matches!(
                        setting,
                        Setting::Budget {
                            floor: Some(_),
                            quest_planned: true,
                            ..
                        }
                    ),
                    match setting {
                        Setting::Budget {
                            floor: Some(floor), ..
                        } => floor.to_string(),
                        _ => "null".into(),
                    },
                    args.dense_layers
                        .iter()
                        .chain(&run.also_dense)
                        .collect::<Vec<_>>(),
                    quest_layers,
                    run.page_score,
                    run.page_layout,
                    steps / dense.seconds,
                    steps / saap.seconds,
                    reads.selectivity(),
                    dense.nll,
                    saap.nll,
                    args.tokens
                );
            }
        }
    }
    Ok(())
}

/// Share of positions where two runs' top-1 tokens agree.
fn agreement(a: &[Vec<u32>], b: &[Vec<u32>]) -> f64 {
    let (same, all) = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y))
        .fold((0, 0), |(same, all), (x, y)| {
            (same + usize::from(x == y), all + 1)
        });
    same as f64 / all.max(1) as f64
}

/// A timed teacher-forced decode.
struct Decoded {
    seconds: f64,
    /// Mean negative log-likelihood of each next continuation token, over items and steps.
    nll: f64,
    /// Per item and step, the top-1 next token.
    top1: Vec<Vec<u32>>,
    /// How the steps ran: eager steps, recordings, graph launches.
    launches: String,
}

/// Feeds each item its continuation (`inputs[b][s]` at step `s`, the last one only predicted)
/// through a [`DecodeGraph`] (graphs on or off), read statistics and the ops' finite checks off
/// (each would sync the host every layer; the graph checks the logits of every step instead).
/// The log-likelihoods are computed after the clock stops.
fn decode(model: &mut Llama, inputs: &[&[u32]], graph: bool) -> Res<Decoded> {
    for layer in 0..model.n_layers() {
        let op = model.attention_mut(layer)?;
        op.set_track_reads(false);
        op.set_check_finite(false);
    }
    let device = model.device().clone();
    let (batch, steps) = (inputs.len(), inputs[0].len() - 1);
    let mut stepper = DecodeGraph::new(&device, batch, 256)?;
    if !graph {
        stepper.disable();
    }
    let mut logits = Vec::with_capacity(steps);
    device.synchronize()?;
    let start = Instant::now();
    for step in 0..steps {
        let tokens: Vec<u32> = inputs.iter().map(|item| item[step]).collect();
        logits.push(stepper.step(model, &tokens)?);
    }
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    let stats = stepper.stats();
    // [steps, B, vocab] → per step the log-probability of the true next token.
    let logits = Tensor::stack(&logits, 0)?;
    let targets: Vec<u32> = (1..=steps)
        .flat_map(|s| inputs.iter().map(move |item| item[s]))
        .collect();
    let targets = Tensor::from_vec(targets, (steps, batch, 1), &device)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let nll = -logp
        .gather(&targets, D::Minus1)?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?;
    let by_step = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
    let top1 = (0..batch)
        .map(|b| by_step.iter().map(|row| row[b]).collect())
        .collect();
    Ok(Decoded {
        seconds,
        nll,
        top1,
        launches: format!(
            "{} eager, {} recorded, {} replayed",
            stats.eager, stats.recordings, stats.replays
        ),
    })
}

/// Keys read over `steps` teacher-forced steps, window and sinks included.
fn keys_read(model: &mut Llama, inputs: &[&[u32]], steps: usize) -> Res<ReadStats> {
    for layer in 0..model.n_layers() {
        model.attention_mut(layer)?.set_track_reads(true);
    }
    let device = model.device().clone();
    let mut reads = ReadStats::default();
    for step in 0..steps.min(inputs[0].len()) {
        let tokens: Vec<u32> = inputs.iter().map(|item| item[step]).collect();
        let tokens = Tensor::from_vec(tokens, (inputs.len(), 1), &device)?;
        model.forward(&tokens, &vec![1; inputs.len()])?;
        model
            .read_stats()
            .iter()
            .flatten()
            .for_each(|s| reads.add(s));
    }
    Ok(reads)
}
