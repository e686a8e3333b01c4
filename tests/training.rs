//! Training on a synthetic asymmetric problem: queries come from another distribution than the
//! keys they attend to, so routing a query to its nearest key centroids fails while the trained
//! classifier finds the partitions that hold its attention mass.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use rand::rngs::StdRng;
use rand::Rng;
use saap::train::data::{first_query_position, Sequence};
use saap::train::{evaluate_routing, probe_curve, train_layer, TrainParams};
use saap::{HeadLayout, RopeConfig, RopeKind, RopeScaling, Routing, SaapConfig};

const D: usize = 16;
const TOPICS: usize = 16;

/// A fixed synthetic "model": topic directions, a large common key offset, and a rotation that
/// maps a query's topic to where its queries live.
struct Problem {
    topics: Vec<Vec<f32>>,
    key_offset: Vec<f32>,
    rotation: Vec<Vec<f32>>,
}

/// A random orthogonal matrix acting on dimensions 2.. (Gram-Schmidt of a random matrix).
fn random_rotation(r: &mut StdRng) -> Vec<Vec<f32>> {
    let mut rows: Vec<Vec<f32>> = Vec::new();
    while rows.len() < D - 2 {
        let mut v: Vec<f32> = (0..D - 2).map(|_| r.random_range(-1.0f32..1.0)).collect();
        for u in &rows {
            let dot: f32 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        if norm > 1e-3 {
            rows.push(v.into_iter().map(|a| a / norm).collect());
        }
    }
    rows
}

impl Problem {
    fn new(r: &mut StdRng) -> Self {
        // Dimensions 0 and 1 stay zero: they form the one RoPE pair that rotates even with a huge
        // θ, so attention here is position-free and the problem is purely about routing.
        let vec = |r: &mut StdRng, scale: f32| -> Vec<f32> {
            (0..D)
                .map(|i| {
                    if i < 2 {
                        0.0
                    } else {
                        scale * r.random_range(-1.0f32..1.0)
                    }
                })
                .collect()
        };
        Self {
            topics: (0..TOPICS).map(|_| vec(r, 2.0)).collect(),
            key_offset: vec(r, 6.0),
            rotation: random_rotation(r),
        }
    }

    /// One sequence: keys `offset + topic + noise`; queries `3·R·topic + noise` for a random topic:
    /// a query attends to the keys whose topic best matches its rotated one, while its nearest key
    /// centroids (in L2) are unrelated to that.
    fn sequence(&self, r: &mut StdRng, n: usize, hq: usize) -> Sequence {
        let mut k = Vec::with_capacity(n * D);
        for _ in 0..n {
            let t = &self.topics[r.random_range(0..TOPICS)];
            k.extend((0..D).map(|i| {
                if i < 2 {
                    0.0
                } else {
                    self.key_offset[i] + t[i] + 0.3 * r.random_range(-1.0f32..1.0)
                }
            }));
        }
        let mut q = Vec::with_capacity(hq * n * D);
        for _ in 0..hq * n {
            let t = &self.topics[r.random_range(0..TOPICS)];
            q.extend([0.0, 0.0]);
            q.extend(self.rotation.iter().map(|row| {
                let rt: f32 = row.iter().zip(&t[2..]).map(|(a, b)| a * b).sum();
                3.0 * rt + 0.5 * r.random_range(-1.0f32..1.0)
            }));
        }
        let v: Vec<f32> = (0..n * D).map(|_| r.random_range(-1.0f32..1.0)).collect();
        Sequence {
            q: Tensor::from_vec(q, (hq, n, D), &Device::Cpu).unwrap(),
            k: Tensor::from_vec(k, (1, n, D), &Device::Cpu).unwrap(),
            v: Tensor::from_vec(v, (1, n, D), &Device::Cpu).unwrap(),
        }
    }
}

/// The configuration of the synthetic problem: 2 query heads on one KV head, window 16, 4 sinks,
/// ℓ = 2 of 16 partitions, classifier width `hidden`.
fn synthetic_config(hidden: usize) -> SaapConfig {
    let mut config = SaapConfig::new(
        HeadLayout {
            n_q_heads: 2,
            n_kv_heads: 1,
            head_dim: D,
        },
        // θ = 1e300 makes every pair but the first rotate by ~0 rad per token.
        RopeConfig {
            kind: RopeKind::Interleaved,
            theta: 1e300,
            scaling: RopeScaling::None,
        },
        TOPICS,
    )
    .unwrap();
    config.window = 16;
    config.sinks = 4;
    config.n_probe = 2;
    config.hidden = hidden;
    config
}

#[test]
fn classifier_beats_nearest_centroid_on_asymmetric_queries() {
    let config = synthetic_config(64);
    let mut r = rng(21);
    let problem = Problem::new(&mut r);
    let train: Vec<Sequence> = (0..6).map(|_| problem.sequence(&mut r, 700, 2)).collect();
    let held_out: Vec<Sequence> = (0..3).map(|_| problem.sequence(&mut r, 700, 2)).collect();
    let mut params = TrainParams::new(&config);
    params.min_indexed = 64;
    params.queries_per_seq = 300;
    let layer = train_layer(&train, &config, &params, None).unwrap();
    let first = first_query_position(&config, params.min_indexed);
    let eval = |routing| {
        evaluate_routing(
            &held_out,
            &layer,
            &config,
            routing,
            first,
            100,
            &Device::Cpu,
        )
        .unwrap()
    };
    let classifier = eval(Routing::Classifier);
    let nearest = eval(Routing::NearestCentroid);
    let dense = eval(Routing::Dense);
    println!("classifier {classifier:?}\nnearest    {nearest:?}\ndense      {dense:?}");
    assert!(
        (dense.indexed_recall - 1.0).abs() < 1e-9 && (dense.indexed_selectivity - 1.0).abs() < 1e-9
    );
    // Only the classifier finds the mass at equal ℓ...
    assert!(
        classifier.indexed_recall > 0.8,
        "classifier recall {}",
        classifier.indexed_recall
    );
    assert!(classifier.indexed_recall > nearest.indexed_recall + 0.3);
    // ...and at equal keys read: give nearest-centroid routing more probes until it reads at least
    // as many keys as the classifier did.
    let mut wider = config.clone();
    let nearest_wide = loop {
        let e = evaluate_routing(
            &held_out,
            &layer,
            &wider,
            Routing::NearestCentroid,
            first,
            100,
            &Device::Cpu,
        )
        .unwrap();
        if e.indexed_selectivity >= classifier.indexed_selectivity || wider.n_probe == TOPICS {
            break e;
        }
        wider = wider.with_n_probe(wider.n_probe + 1).unwrap();
    };
    println!("nearest at ℓ = {}: {nearest_wide:?}", wider.n_probe);
    assert!(classifier.indexed_recall > nearest_wide.indexed_recall + 0.25);
    assert!(classifier.oracle_indexed_recall >= classifier.indexed_recall - 1e-9);
    // A perfect classifier over the same partitions: it does not depend on the routing, and the
    // trained one comes close to it on this problem.
    assert!(
        (classifier.partition_oracle_indexed_recall - nearest.partition_oracle_indexed_recall)
            .abs()
            < 1e-9
    );
    assert!(
        classifier.partition_oracle_indexed_recall > classifier.indexed_recall - 0.05
            && classifier.partition_oracle_indexed_recall <= 1.0 + 1e-9,
        "partition oracle {}",
        classifier.partition_oracle_indexed_recall
    );
    // Partition pages: at dense's keys every page fits; at the classifier's, a perfect router
    // over them and the bounds' pick (whole pages within the same keys) hold at most what the
    // best single keys hold.
    for full in [
        dense.partition_page_bound_indexed_recall,
        dense.partition_page_mean_indexed_recall,
        dense.partition_page_probed_mean_indexed_recall,
        dense.partition_page_spread_indexed_recall,
        dense.partition_page_prior_indexed_recall,
        dense.fine_partition_page_oracle[0],
        dense.fine_partition_page_oracle[1],
        dense.fine_partition_page_mean[0],
        dense.fine_partition_page_mean[1],
        dense.group_partition_page_oracle[0],
        dense.group_partition_page_oracle[2],
        dense.group_partition_page_share[0],
        dense.group_partition_page_share[2],
        dense.quest_spread_indexed_recall,
        dense.partition_page_oracle_matched_indexed_recall,
        dense.quest_mean_indexed_recall,
        dense.quest_oracle_matched_indexed_recall,
    ] {
        assert!((full - 1.0).abs() < 1e-6, "{dense:?}");
    }
    // Reading every page leaves the output as dense's; at the classifier's keys it moves.
    let errors = |e: &saap::train::RoutingEval| {
        [
            e.partition_page_mean_output_error,
            e.partition_page_share_output_error,
        ]
        .concat()
    };
    assert!(errors(&dense).iter().all(|&x| x < 1e-6), "{dense:?}");
    assert!(
        errors(&classifier).iter().all(|&x| x > 1e-4 && x < 1.0),
        "{classifier:?}"
    );
    for cap in [
        classifier.group_partition_page_oracle[0],
        classifier.group_partition_page_oracle[2],
        classifier.fine_partition_page_oracle[0],
        classifier.fine_partition_page_oracle[1],
        classifier.partition_page_oracle_matched_indexed_recall,
        classifier.quest_oracle_matched_indexed_recall,
    ] {
        assert!(
            cap > 0.0 && cap <= classifier.oracle_indexed_recall + 1e-9,
            "{classifier:?}"
        );
    }
    for routed in [
        classifier.partition_page_bound_indexed_recall,
        classifier.partition_page_mean_indexed_recall,
        classifier.partition_page_probed_mean_indexed_recall,
        classifier.partition_page_spread_indexed_recall,
        classifier.partition_page_prior_indexed_recall,
        classifier.fine_partition_page_mean[0],
        classifier.fine_partition_page_mean[1],
        classifier.quest_mean_indexed_recall,
        classifier.quest_spread_indexed_recall,
    ] {
        assert!(
            routed > 0.0 && routed <= classifier.oracle_indexed_recall + 1e-9,
            "{classifier:?}"
        );
    }
    let all = config.clone().with_n_probe(TOPICS).unwrap();
    let every = evaluate_routing(
        &held_out,
        &layer,
        &all,
        Routing::Dense,
        first,
        100,
        &Device::Cpu,
    )
    .unwrap();
    assert!((every.partition_oracle_indexed_recall - 1.0).abs() < 1e-9);
    assert!((every.partition_oracle_indexed_selectivity - 1.0).abs() < 1e-9);
    assert!(dense.output_rel_error < 1e-6, "dense reads every key");
    assert!(classifier.output_rel_error < nearest.output_rel_error);
    // The probe curve: what each ℓ reads and finds; at the configured ℓ, the evaluation's.
    let curve = probe_curve(&held_out, &layer, &config, first, 100, &Device::Cpu).unwrap();
    // G = 2 heads: ⌈C / 2⌉ points.
    assert_eq!(curve.indexed_share.len(), TOPICS.div_ceil(2));
    let at = config.n_probe - 1;
    assert!((curve.indexed_share[at] - classifier.indexed_selectivity).abs() < 1e-9);
    assert!((curve.indexed_recall[at] - classifier.indexed_recall).abs() < 1e-9);
    for w in curve
        .indexed_share
        .windows(2)
        .chain(curve.indexed_recall.windows(2))
    {
        assert!(w[1] >= w[0] - 1e-12, "a curve never falls: {curve:?}");
    }
    // More probes read more keys.
    assert!(*curve.indexed_share.last().unwrap() > classifier.indexed_selectivity);
    let mass = 1.0 - classifier.window_sinks_mass;
    assert!(
        (curve.indexed_mass - mass).abs() < 1e-5,
        "{} vs {mass}",
        curve.indexed_mass
    );
    assert!(probe_curve(&held_out, &layer, &config, 10_000, 100, &Device::Cpu).is_err());
}

#[test]
fn calibration_serves_dense_the_layers_below_the_recall_target() {
    let config = synthetic_config(32);
    let mut r = rng(8);
    let problem = Problem::new(&mut r);
    let train: Vec<Sequence> = (0..3).map(|_| problem.sequence(&mut r, 500, 2)).collect();
    let held_out: Vec<Sequence> = (0..2).map(|_| problem.sequence(&mut r, 500, 2)).collect();
    let mut params = TrainParams::new(&config);
    params.min_indexed = 64;
    params.queries_per_seq = 200;
    params.mlp.epochs = 10;
    let layers = vec![train.clone(), train];
    let held = vec![held_out.clone(), held_out];
    let mut seen = 0;
    let (index, reports) = saap::train::calibrate_index(
        &layers,
        &held,
        &config,
        &params,
        0.5,
        "synthetic",
        None,
        |_| seen += 1,
    )
    .unwrap();
    assert_eq!(seen, 2);
    assert_eq!(index.n_layers(), 2);
    // Each layer's probe curve and sparse routing travel with the index; the sparse routing is
    // Quest exactly where Quest's pages found more of the held-out mass.
    for (((curve, quest), &sparse), report) in index
        .probe_curves()
        .iter()
        .zip(index.quest_curves())
        .zip(index.sparse_routing())
        .zip(&reports)
    {
        assert_eq!(quest.as_ref(), Some(&report.quest_curve));
        assert_eq!(curve.as_ref(), Some(&report.probe_curve));
        assert_eq!(sparse, report.sparse_routing);
        // Quest's curve: point u reads about u·G/C of the indexed keys (whole pages of 16, at
        // least one; at least 64 indexed keys per query), and reads them all by u = ⌈C/G⌉.
        let quest = &report.quest_curve;
        let (c, g) = (config.n_partitions, config.layout.group_size());
        assert_eq!(quest.indexed_share.len(), c.div_ceil(g));
        quest.check(c).unwrap();
        for (u, &share) in quest.indexed_share.iter().enumerate() {
            let target = ((u + 1) * g) as f64 / c as f64;
            assert!(
                share <= target.min(1.0) + 1e-9 && share >= target.min(1.0) - 16.0 / 64.0,
                "u {}: {share} vs {target}",
                u + 1
            );
        }
        assert!((quest.indexed_recall.last().unwrap() - 1.0).abs() < 1e-6);
        let quest_better =
            report.classifier.quest_indexed_recall > report.classifier.indexed_recall;
        assert_eq!(sparse == Routing::Quest, quest_better, "{report:?}");
    }
    assert!(reports
        .iter()
        .all(|r| r.routing == Routing::Classifier && r.classifier.recall >= 0.5));
    // A target no selector reaches at this ℓ: every layer falls back to dense.
    let (index, reports) = saap::train::calibrate_index(
        &layers,
        &held,
        &config,
        &params,
        0.999,
        "synthetic",
        None,
        |_| (),
    )
    .unwrap();
    assert!(reports.iter().all(|r| r.routing == Routing::Dense));
    assert_eq!(index.layer(1).unwrap().routing, Routing::Dense);
    assert!(saap::train::calibrate_index(
        &layers[..1],
        &held,
        &config,
        &params,
        0.5,
        "x",
        None,
        |_| ()
    )
    .is_err());
}

#[test]
fn context_sized_defaults() {
    let layout = HeadLayout {
        n_q_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let rope = RopeConfig {
        kind: RopeKind::Interleaved,
        theta: 1e5,
        scaling: RopeScaling::None,
    };
    let small = SaapConfig::for_context(layout, rope, 8192).unwrap();
    assert_eq!(
        (small.n_partitions, small.n_probe, small.window, small.sinks),
        (256, 5, 512, 4)
    );
    let large = SaapConfig::for_context(layout, rope, 131_072).unwrap();
    assert_eq!(
        (large.n_partitions, large.n_probe, large.window, large.sinks),
        (1024, 21, 2048, 16)
    );
}

#[test]
fn sparse_routing_is_quest_only_where_its_pages_find_more() {
    let eval = |classifier, quest| saap::train::RoutingEval {
        indexed_recall: classifier,
        quest_indexed_recall: quest,
        ..Default::default()
    };
    let choose = saap::train::choose_sparse_routing;
    assert_eq!(choose(&eval(0.4, 0.5)), Routing::Quest);
    assert_eq!(choose(&eval(0.5, 0.5)), Routing::Classifier);
    assert_eq!(choose(&eval(0.5, 0.4)), Routing::Classifier);
}
