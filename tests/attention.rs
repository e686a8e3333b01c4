//! The op end to end on the CPU: ℓ = C equals dense equals a plain reference, over prefill and
//! many decode steps with window merges, ragged batches, GQA and every dtype; the index
//! invariant after thousands of steps; and batch items dropped by `retain`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use saap::budget::PLAN_STEPS;
use saap::partition::assign::assign;
use saap::{RopeKind, Routing, SaapAttention, SaapConfig, SaapError};

/// Host copy of one sequence's pre-RoPE keys and values, per KV head.
#[derive(Default, Clone)]
struct History {
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
}

impl History {
    /// Appends tokens `0..len` of item `b` of `k`, `v` (`[B, Hkv, T, D]`).
    fn push(&mut self, k: &Tensor, v: &Tensor, b: usize, len: usize) {
        let k = k
            .to_dtype(DType::F32)
            .unwrap()
            .get(b)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let v = v
            .to_dtype(DType::F32)
            .unwrap()
            .get(b)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        if self.k.is_empty() {
            self.k = vec![Vec::new(); k.len()];
            self.v = vec![Vec::new(); k.len()];
        }
        for h in 0..k.len() {
            self.k[h].extend(k[h][..len].iter().cloned());
            self.v[h].extend(v[h][..len].iter().cloned());
        }
    }

    /// Exact attention of pre-RoPE query `q` (head `head`) at position `pos` over `0..=pos`.
    fn attend(&self, q: &[f32], head: usize, group: usize, pos: usize, c: &SaapConfig) -> Vec<f64> {
        let (kind, theta) = (c.rope.kind, c.rope.theta);
        let h = head / group;
        let q = rope_ref(q, pos, kind, theta);
        let scale = 1.0 / (q.len() as f64).sqrt();
        let scores: Vec<f64> = (0..=pos)
            .map(|j| {
                let k = rope_ref(&self.k[h][j], j, kind, theta);
                q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() * scale
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (j, wj) in w.iter().enumerate() {
            for (o, &x) in out.iter_mut().zip(&self.v[h][j]) {
                *o += wj / total * x as f64;
            }
        }
        out
    }
}

fn exactness(dtype: DType, kind: RopeKind, tol: f32) {
    let config = config(6, 2, 16, 8, kind);
    let index = random_index(&config, 1, 7);
    let dev = Device::Cpu;
    let mut sparse = SaapAttention::from_index(&index, 0, &dev, dtype).unwrap();
    sparse.set_n_probe(config.n_partitions).unwrap();
    let mut dense = SaapAttention::from_index(&index, 0, &dev, dtype).unwrap();
    dense.set_routing(Routing::Dense).unwrap();
    let mut r = rng(11);
    let (b, t) = (3, 40);
    let lens = [40, 23, 31];
    let q = randn(&mut r, &[b, 6, t, 16], 1.0).to_dtype(dtype).unwrap();
    let k = randn(&mut r, &[b, 2, t, 16], 1.0).to_dtype(dtype).unwrap();
    let v = randn(&mut r, &[b, 2, t, 16], 1.0).to_dtype(dtype).unwrap();
    let out_s = sparse.prefill(&q, &k, &v, &lens).unwrap();
    let out_d = dense.prefill(&q, &k, &v, &lens).unwrap();
    assert_eq!(out_s.dims(), &[b, 6, t, 16]);
    assert!(max_abs_diff(&out_s, &out_d) <= tol);
    let mut history = vec![History::default(); b];
    for (i, h) in history.iter_mut().enumerate() {
        h.push(&k, &v, i, lens[i]);
    }
    // Prefill against the reference at a few positions; rows past each length are zero.
    let q32 = q.to_dtype(DType::F32).unwrap();
    let o32 = out_d.to_dtype(DType::F32).unwrap();
    let row = |x: &Tensor, i: usize, head: usize, pos: usize| {
        x.get(i)
            .unwrap()
            .get(head)
            .unwrap()
            .get(pos)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    for (i, hist) in history.iter().enumerate() {
        for pos in [0, lens[i] / 2, lens[i] - 1] {
            let head = (pos + i) % 6;
            let expect = hist.attend(&row(&q32, i, head, pos), head, 3, pos, &config);
            for (a, e) in row(&o32, i, head, pos).iter().zip(&expect) {
                assert!(
                    (*a as f64 - e).abs() <= 4.0 * tol as f64 + 1e-4,
                    "prefill {a} vs {e}"
                );
            }
        }
        if lens[i] < t {
            assert!(row(&o32, i, 0, lens[i]).iter().all(|&x| x == 0.0));
        }
    }
    for step in 0..120 {
        let q = randn(&mut r, &[b, 6, 1, 16], 1.0).to_dtype(dtype).unwrap();
        let k = randn(&mut r, &[b, 2, 1, 16], 1.0).to_dtype(dtype).unwrap();
        let v = randn(&mut r, &[b, 2, 1, 16], 1.0).to_dtype(dtype).unwrap();
        let o_s = sparse.decode(&q, &k, &v).unwrap();
        let o_d = dense.decode(&q, &k, &v).unwrap();
        let diff = max_abs_diff(&o_s, &o_d);
        assert!(diff <= tol, "step {step}: sparse vs dense differ by {diff}");
        let read = sparse.last_read().unwrap();
        assert_eq!(
            read.keys_read, read.keys_in_context,
            "ℓ = C reads every key"
        );
        if step % 30 == 29 {
            let q_host = q.to_dtype(DType::F32).unwrap();
            let o_host = o_d.to_dtype(DType::F32).unwrap();
            for (i, hist) in history.iter_mut().enumerate() {
                hist.push(&k, &v, i, 1);
                let pos = sparse.seq_lens()[i] - 1;
                for head in 0..6 {
                    let qv = q_host
                        .get(i)
                        .unwrap()
                        .get(head)
                        .unwrap()
                        .get(0)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let ov = o_host
                        .get(i)
                        .unwrap()
                        .get(head)
                        .unwrap()
                        .get(0)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let expect = hist.attend(&qv, head, 3, pos, &config);
                    for (a, e) in ov.iter().zip(&expect) {
                        assert!(
                            (*a as f64 - e).abs() <= 4.0 * tol as f64 + 1e-4,
                            "reference mismatch {a} vs {e}"
                        );
                    }
                }
            }
        } else {
            for (i, hist) in history.iter_mut().enumerate() {
                hist.push(&k, &v, i, 1);
            }
        }
    }
    let ext = sparse.extents();
    assert_eq!(sparse.seq_lens(), &[160, 143, 151]);
    assert!(
        ext.iter().all(|e| e.indexed_end > config.sinks),
        "merges happened: {ext:?}"
    );
}

#[test]
fn all_partitions_equal_dense_f32_interleaved() {
    exactness(DType::F32, RopeKind::Interleaved, 2e-5);
}

#[test]
fn all_partitions_equal_dense_f32_neox() {
    exactness(DType::F32, RopeKind::Neox, 2e-5);
}

#[test]
fn all_partitions_equal_dense_bf16() {
    exactness(DType::BF16, RopeKind::Neox, 2e-2);
}

#[test]
fn all_partitions_equal_dense_f16() {
    exactness(DType::F16, RopeKind::Interleaved, 4e-3);
}

/// After thousands of decode steps every position is in exactly one of sinks / indexed / window,
/// each partition list is sorted and holds exactly the keys assigned to it.
#[test]
fn every_position_in_exactly_one_region() {
    let mut config = config(4, 2, 8, 5, RopeKind::Neox);
    config.n_probe = 2;
    let index = random_index(&config, 1, 3);
    let dev = Device::Cpu;
    let mut op = SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap();
    let mut r = rng(5);
    let (b, t) = (2, 30);
    let lens = [3, 30];
    let k = randn(&mut r, &[b, 2, t, 8], 1.0);
    let v = randn(&mut r, &[b, 2, t, 8], 1.0);
    op.prefill(&randn(&mut r, &[b, 4, t, 8], 1.0), &k, &v, &lens)
        .unwrap();
    let mut keys: Vec<Vec<Tensor>> = (0..b)
        .map(|i| {
            (0..2)
                .map(|h| {
                    k.get(i)
                        .unwrap()
                        .get(h)
                        .unwrap()
                        .narrow(0, 0, lens[i])
                        .unwrap()
                })
                .collect()
        })
        .collect();
    let steps = 2500;
    for step in 0..steps {
        let k = randn(&mut r, &[b, 2, 1, 8], 1.0);
        let v = randn(&mut r, &[b, 2, 1, 8], 1.0);
        op.decode(&randn(&mut r, &[b, 4, 1, 8], 1.0), &k, &v)
            .unwrap();
        for (i, per_head) in keys.iter_mut().enumerate() {
            for (h, kh) in per_head.iter_mut().enumerate() {
                *kh = Tensor::cat(
                    &[&*kh, &k.get(i).unwrap().get(h).unwrap().squeeze(1).unwrap()],
                    0,
                )
                .unwrap();
            }
        }
        if step % 500 != 499 {
            continue;
        }
        let lists = op.index_lists().unwrap();
        let centroids = index.layer(0).unwrap().centroids.clone();
        for (i, ext) in op.extents().iter().enumerate() {
            assert_eq!(ext.len, lens[i] + step + 1);
            let window = ext.len - ext.indexed_end;
            assert!(
                window >= config.window && window < config.window + config.merge_every,
                "window {window}"
            );
            let sink_end = config.sinks.min(ext.len);
            for (h, (perm, offsets)) in lists[i].iter().enumerate() {
                let mut seen = vec![0u32; ext.len];
                seen[..sink_end].iter_mut().for_each(|s| *s += 1);
                seen[ext.indexed_end..].iter_mut().for_each(|s| *s += 1);
                for &id in perm {
                    seen[id as usize] += 1;
                }
                assert!(
                    seen.iter().all(|&s| s == 1),
                    "item {i} head {h}: a position is missing or repeated"
                );
                let labels = assign(
                    &keys[i][h].unsqueeze(0).unwrap(),
                    &centroids.get(h).unwrap().unsqueeze(0).unwrap(),
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
                for c in 0..config.n_partitions {
                    let list = &perm[offsets[c] as usize..offsets[c + 1] as usize];
                    assert!(
                        list.windows(2).all(|w| w[0] < w[1]),
                        "partition {c} not in position order"
                    );
                    assert!(
                        list.iter().all(|&id| labels[id as usize] == c as u32),
                        "id in the wrong partition"
                    );
                }
            }
        }
    }
}

/// The cache append's RoPE writer equals `Rope::apply` on `Rope::tables`, bit for bit: every
/// dtype, both pair layouts, YaRN's scaled cos/sin, ragged positions; rows past `lens` untouched.
#[test]
fn rope_writer_equals_tables() {
    use saap::rope::Rope;
    use saap::{RopeConfig, RopeScaling};
    let mut r = rng(11);
    let (b, h, t, d) = (3, 2, 5, 64);
    let starts = [0, 17, 40_000];
    let lens = [5, 2, 4];
    for kind in [RopeKind::Interleaved, RopeKind::Neox] {
        let yarn = RopeScaling::Yarn {
            factor: 4.0,
            original_max_positions: 32_768,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        for scaling in [RopeScaling::None, yarn] {
            let rope = Rope::new(
                &RopeConfig {
                    kind,
                    theta: 1e6,
                    scaling,
                },
                d,
            );
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = randn(&mut r, &[b, h, t, d], 2.0).to_dtype(dtype).unwrap();
                let (cos, sin) = rope.tables(&starts, t, dtype, &Device::Cpu).unwrap();
                let want = rope.apply(&x, &cos, &sin).unwrap();
                let fresh = rope.writer(&starts, &[t; 3], true, false);
                let got = x.apply_op1_no_bwd(&fresh).unwrap();
                assert_eq!(
                    max_abs_diff(&want, &got),
                    0.0,
                    "{kind:?} {dtype:?} new tensor"
                );
                let rows = 40_010;
                let cache = Tensor::zeros((b, h, rows, d), dtype, &Device::Cpu).unwrap();
                let write = rope.writer(&starts, &lens, true, true);
                cache.inplace_op2(&x, &write).unwrap();
                for (i, (&s, &n)) in starts.iter().zip(&lens).enumerate() {
                    let row = |x: &Tensor, at: usize, n: usize| {
                        x.get(i).unwrap().narrow(1, at, n).unwrap()
                    };
                    let diff = max_abs_diff(&row(&cache, s, n), &row(&want, 0, n));
                    assert_eq!(diff, 0.0, "{kind:?} {dtype:?} cache rows of item {i}");
                    let after = row(&cache, s + n, 1).to_dtype(DType::F32).unwrap();
                    assert_eq!(
                        after
                            .abs()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap(),
                        0.0
                    );
                }
            }
        }
    }
}

/// A context long enough that the CPU kernel splits each KV head's keys into several pieces
/// (merged by log-sum-exp): dense and sparse decode still match the plain reference, and ℓ = C
/// still equals dense.
#[test]
fn long_context_split_decode_matches_reference() {
    let config = config(6, 2, 16, 8, RopeKind::Neox);
    let index = random_index(&config, 1, 3);
    let dev = Device::Cpu;
    let mut dense = SaapAttention::dense(&config, &dev, DType::F32).unwrap();
    let mut all = SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap();
    all.set_n_probe(config.n_partitions).unwrap();
    let mut r = rng(5);
    let n = 1700;
    let k = randn(&mut r, &[1, 2, n, 16], 1.0);
    let v = randn(&mut r, &[1, 2, n, 16], 1.0);
    let q = randn(&mut r, &[1, 6, n, 16], 1.0);
    dense.prefill(&q, &k, &v, &[n]).unwrap();
    all.prefill(&q, &k, &v, &[n]).unwrap();
    let mut hist = History::default();
    hist.push(&k, &v, 0, n);
    let q1 = randn(&mut r, &[1, 6, 1, 16], 1.0);
    let k1 = randn(&mut r, &[1, 2, 1, 16], 1.0);
    let v1 = randn(&mut r, &[1, 2, 1, 16], 1.0);
    hist.push(&k1, &v1, 0, 1);
    let o_d = dense.decode(&q1, &k1, &v1).unwrap();
    let o_a = all.decode(&q1, &k1, &v1).unwrap();
    assert!(max_abs_diff(&o_d, &o_a) <= 1e-5);
    assert_eq!(dense.last_read().unwrap().keys_read, 2 * (n + 1));
    let qv = q1
        .squeeze(2)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let ov = o_d
        .squeeze(2)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for head in 0..6 {
        let expect = hist.attend(&qv[head], head, 3, n, &config);
        for (a, e) in ov[head].iter().zip(&expect) {
            assert!((*a as f64 - e).abs() <= 1e-4, "head {head}: {a} vs {e}");
        }
    }
}

/// The CPU routing fast path (MLP and top-ℓ over the raw weights) picks the same partitions,
/// best first, as top-ℓ of the candle MLP's scores.
#[test]
fn cpu_probes_match_candle_scores() {
    let config = config(6, 2, 16, 32, RopeKind::Neox);
    let index = random_index(&config, 1, 9);
    let classifier = &index.layer(0).unwrap().classifier;
    let mut r = rng(2);
    let q = randn(&mut r, &[3, 6, 16], 1.0);
    for n_probe in [1, 5, 32] {
        let fast = classifier
            .probes(&q, n_probe)
            .unwrap()
            .to_vec3::<u32>()
            .unwrap();
        let scores = classifier.scores(&q).unwrap();
        let slow = saap::classify::top_probes(&scores, n_probe)
            .unwrap()
            .to_vec3::<u32>()
            .unwrap();
        assert_eq!(fast, slow, "ℓ = {n_probe}");
    }
}

/// An op of a random index (seed `seed`) with two prompts of `lens` tokens prefilled (f32, CPU,
/// 8 query / 2 KV heads, d 32), and the q, k, v of one decode step.
fn prefilled_pair(
    config: &SaapConfig,
    seed: u64,
    lens: [usize; 2],
) -> (SaapAttention, (Tensor, Tensor, Tensor)) {
    let index = random_index(config, 1, seed);
    let mut r = rng(seed + 1);
    let mut qkv = |t: usize| {
        let [q, k, v] = [8, 2, 2].map(|h| randn(&mut r, &[2, h, t, 32], 1.0));
        (q, k, v)
    };
    let (q, k, v) = qkv(lens[0]);
    let mut op = SaapAttention::from_index(&index, 0, &Device::Cpu, DType::F32).unwrap();
    op.prefill(&q, &k, &v, &lens).unwrap();
    (op, qkv(1))
}

/// A keys budget sets ℓ per step: the keys read stay near the budget as the context grows
/// (window and sinks included), ℓ grows with the budget, a budget of 1 lets a group's heads
/// probe C partitions between them, one below the window's share falls back to ℓ = 1, and bad
/// budgets are refused.
#[test]
fn keys_budget_sets_n_probe() {
    let mut config = config(8, 2, 32, 64, RopeKind::Neox);
    config.window = 32;
    config.merge_every = 16;
    let (mut base, steps) = prefilled_pair(&config, 61, [2000, 1500]);
    for bad in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        assert!(base.set_keys_budget(Some(bad)).is_err(), "{bad}");
    }
    let mut probes = Vec::new();
    for budget in [0.1, 0.3, 1.0] {
        let mut op = base.snapshot().unwrap();
        op.set_keys_budget(Some(budget)).unwrap();
        let mut reads = saap::ReadStats::default();
        for _ in 0..40 {
            op.decode(&steps.0, &steps.1, &steps.2).unwrap();
            reads.add(&op.last_read().unwrap());
        }
        probes.push(op.config().n_probe);
        let share = reads.selectivity();
        println!(
            "budget {budget}: ℓ {}, keys read {share:.3}",
            op.config().n_probe
        );
        // The estimate bounds the union by G·ℓ whole partitions: reads stay at or under the
        // budget up to the spread of partition sizes.
        assert!(share <= budget * 1.25, "budget {budget}: read {share}");
        assert!(share >= budget * 0.3, "budget {budget}: read only {share}");
    }
    assert!(probes[0] < probes[1] && probes[1] < probes[2], "{probes:?}");
    // A budget of 1 allows G·ℓ = C: each of the 4 heads of a group may probe a quarter.
    assert_eq!(probes[2], 64 / 4);
    // Sinks and window alone are 36 of the ~1540 keys of the shorter item: 1% cannot be met.
    let mut op = base.snapshot().unwrap();
    op.set_keys_budget(Some(0.01)).unwrap();
    op.decode(&steps.0, &steps.1, &steps.2).unwrap();
    assert_eq!(op.config().n_probe, 1);
}

/// A probe plan turns the ℓ a keys budget gives into this layer's own: the same budget, another
/// ℓ, and only for classifier routing; a bad plan is refused.
#[test]
fn probe_plan_maps_the_budgets_probe() {
    let mut config = config(8, 2, 32, 64, RopeKind::Neox);
    config.window = 32;
    config.merge_every = 16;
    let (base, steps) = prefilled_pair(&config, 61, [2000, 1500]);
    let probe_after = |plan: Option<Vec<usize>>, routing: Routing| {
        let mut op = base.snapshot().unwrap();
        op.set_routing(routing).unwrap();
        op.set_probe_plan(plan).unwrap();
        op.set_keys_budget(Some(0.3)).unwrap();
        op.decode(&steps.0, &steps.1, &steps.2).unwrap();
        (op.config().n_probe, op.last_read().unwrap().keys_read)
    };
    let (uniform, uniform_reads) = probe_after(None, Routing::Classifier);
    assert!(
        uniform > 1,
        "the test needs a budget above ℓ = 1, got {uniform}"
    );
    // Plan: every column up to u + 1 maps to 1 (fewer keys) and, past the plan's end, the
    // budget's ℓ holds.
    let columns = uniform * PLAN_STEPS;
    let (planned, planned_reads) = probe_after(Some(vec![1; columns]), Routing::Classifier);
    assert_eq!(planned, 1);
    assert!(
        planned_reads < uniform_reads,
        "{planned_reads} vs {uniform_reads}"
    );
    let (short, _) = probe_after(
        Some(vec![1; (uniform - 1) * PLAN_STEPS]),
        Routing::Classifier,
    );
    assert_eq!(short, uniform);
    // Nearest-centroid routing ignores the plan.
    let (nc, _) = probe_after(Some(vec![1; columns]), Routing::NearestCentroid);
    assert_eq!(nc, uniform);
    let mut op = base.snapshot().unwrap();
    for bad in [vec![], vec![0], vec![2, 65]] {
        assert!(op.set_probe_plan(Some(bad.clone())).is_err(), "{bad:?}");
    }
    op.set_probe_plan(Some(vec![3, 4])).unwrap();
    assert_eq!(op.probe_plan(), Some(&[3, 4][..]));
}

/// Adaptive probing (top-p): reads grow with the probe mass, a mass of 1 probes ℓ partitions and
/// matches fixed ℓ exactly, a tiny mass probes one partition per head, and bad masses are
/// refused.
#[test]
fn probe_mass_adapts_partitions_probed() {
    let mut config = config(8, 2, 32, 64, RopeKind::Neox);
    config.window = 32;
    config.n_probe = 8;
    let (mut base, step) = prefilled_pair(&config, 71, [1500, 1200]);
    for bad in [0.0, 1.01, f64::NAN] {
        assert!(base.set_probe_mass(Some(bad)).is_err(), "{bad}");
    }
    let run = |mass: Option<f64>, n_probe: usize| {
        let mut op = base.snapshot().unwrap();
        op.set_n_probe(n_probe).unwrap();
        op.set_probe_mass(mass).unwrap();
        let out = op.decode(&step.0, &step.1, &step.2).unwrap();
        (out, op.last_read().unwrap())
    };
    let (fixed_out, fixed) = run(None, 8);
    let (all_out, all) = run(Some(1.0), 8);
    assert_eq!(fixed, all);
    assert_eq!(max_abs_diff(&fixed_out, &all_out), 0.0);
    let (_, one) = run(None, 1);
    let (_, tiny) = run(Some(1e-6), 8);
    assert_eq!(
        one, tiny,
        "a tiny mass probes only each head's best partition"
    );
    let reads: Vec<usize> = [0.2, 0.5, 0.9]
        .iter()
        .map(|&m| run(Some(m), 8).1.keys_read)
        .collect();
    assert!(
        tiny.keys_read <= reads[0] && reads[0] <= reads[1] && reads[1] <= reads[2],
        "{reads:?}"
    );
    assert!(reads[2] <= fixed.keys_read && tiny.keys_read < fixed.keys_read);
}

/// A window set smaller than the index's: before the prefill the op is the one an index with that
/// window builds (bit for bit); after it, the tokens leaving the window are indexed at once and
/// the op reads the same keys as that one, with the same outputs up to summation order — for
/// classifier and Quest routing, across window merges. Growing a window that holds tokens, and
/// absurd windows, are refused with the op unchanged.
#[test]
fn window_shrinks_into_the_index() {
    let mut wide = config(8, 2, 32, 64, RopeKind::Neox);
    (wide.window, wide.merge_every, wide.n_probe) = (48, 16, 4);
    let narrow = SaapConfig {
        window: 12,
        ..wide.clone()
    };
    // Same seed, same shapes: the same centroids and classifiers under either window.
    let (wide_index, narrow_index) = (random_index(&wide, 1, 81), random_index(&narrow, 1, 81));
    let mut r = rng(82);
    let lens = [300, 220];
    let [q, k, v] = [8, 2, 2].map(|h| randn(&mut r, &[2, h, lens[0], 32], 1.0));
    let steps: Vec<[Tensor; 3]> = (0..40)
        .map(|_| [8, 2, 2].map(|h| randn(&mut r, &[2, h, 1, 32], 1.0)))
        .collect();
    let op = |index| SaapAttention::from_index(index, 0, &Device::Cpu, DType::F32).unwrap();
    for routing in [Routing::Classifier, Routing::Quest] {
        let mut reference = op(&narrow_index);
        let mut before = op(&wide_index);
        before.set_window(12).unwrap();
        let mut after = op(&wide_index);
        for o in [&mut reference, &mut before, &mut after] {
            o.set_routing(routing).unwrap();
            o.set_quest_pages(4).unwrap();
            o.prefill(&q, &k, &v, &lens).unwrap();
        }
        assert!(
            after.set_window(49).is_err(),
            "a window holding tokens cannot grow"
        );
        assert!(after.set_window(saap::config::MAX_SPAN + 1).is_err());
        assert_eq!(after.config().window, 48, "refusals leave the window");
        after.set_window(12).unwrap();
        assert_eq!(after.extents(), reference.extents(), "{routing:?}");
        for [q, k, v] in &steps {
            let want = reference.decode(q, k, v).unwrap();
            let got_before = before.decode(q, k, v).unwrap();
            let got_after = after.decode(q, k, v).unwrap();
            assert_eq!(max_abs_diff(&want, &got_before), 0.0, "{routing:?}");
            assert!(max_abs_diff(&want, &got_after) < 1e-5, "{routing:?}");
            let reads = reference.last_read().unwrap();
            assert_eq!(before.last_read().unwrap(), reads, "{routing:?}");
            assert_eq!(after.last_read().unwrap(), reads, "{routing:?}");
            assert!(
                reads.keys_read < reads.keys_in_context,
                "{routing:?} reads sparsely"
            );
        }
    }
    // Without tokens the window may grow.
    let mut fresh = op(&narrow_index);
    fresh.set_window(48).unwrap();
    assert_eq!(fresh.config().window, 48);
}

/// Retaining items 0 and 2 of a ragged batch of 3 leaves an op that decodes exactly as one that
/// only ever held those two: the same cache rows, index and outputs, through classifier routing
/// (ℓ < C) and window merges after the retain. Keeping every item changes nothing, keeping none
/// forgets the batch, and bad calls are refused with the sequences left as they were.
#[test]
fn retain_decodes_as_if_dropped_items_were_never_batched() {
    let mut config = config(8, 2, 32, 16, RopeKind::Neox);
    config.n_probe = 3;
    let index = random_index(&config, 1, 81);
    let dev = Device::Cpu;
    let mut r = rng(82);
    let mut qkv =
        |batch: usize, t: usize| [8, 2, 2].map(|h| randn(&mut r, &[batch, h, t, 32], 1.0));
    let kept_rows = Tensor::new(&[0u32, 2], &dev).unwrap();
    let kept = |x: &Tensor| x.index_select(&kept_rows, 0).unwrap();
    let lens = [90, 140, 61];
    let mut three = SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap();
    assert!(matches!(
        three.retain(&[true, false, true]),
        Err(SaapError::EmptyContext(0))
    ));
    let mut two = SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap();
    // The unread partitions' means are per item too: retained with the rest.
    three.set_estimate_unread(true);
    two.set_estimate_unread(true);
    let [q, k, v] = qkv(3, 140);
    three.prefill(&q, &k, &v, &lens).unwrap();
    two.prefill(&kept(&q), &kept(&k), &kept(&v), &[90, 61])
        .unwrap();
    // A few steps of the whole batch first, so that the retained state holds decoded tokens.
    for _ in 0..5 {
        let [q, k, v] = qkv(3, 1);
        three.decode(&q, &k, &v).unwrap();
        two.decode(&kept(&q), &kept(&k), &kept(&v)).unwrap();
    }

    // Refused calls change nothing.
    let before = three.seq_lens().to_vec();
    assert!(matches!(
        three.retain(&[true, false]),
        Err(SaapError::Shape { name: "keep", .. })
    ));
    assert!(three.begin_replay(4).unwrap() > 0);
    assert!(matches!(
        three.retain(&[true, false, true]),
        Err(SaapError::Config(_))
    ));
    three.end_replay();
    three.retain(&[true; 3]).unwrap();
    assert_eq!(three.seq_lens(), before);
    assert!(three.last_read().is_some());

    three.retain(&[true, false, true]).unwrap();
    assert_eq!(three.seq_lens(), &[95, 66]);
    assert_eq!(three.seq_lens(), two.seq_lens());
    assert_eq!(three.extents(), two.extents());
    assert_eq!(three.index_lists().unwrap(), two.index_lists().unwrap());
    assert_eq!(three.last_read(), None, "the last counts included item 1");
    let (k3, _) = three.cache().unwrap();
    let (k2, _) = two.cache().unwrap();
    for (b, &len) in two.seq_lens().iter().enumerate() {
        let rows = |c: &Tensor| c.get(b).unwrap().narrow(1, 0, len).unwrap();
        assert_eq!(max_abs_diff(&rows(k3), &rows(k2)), 0.0, "item {b}'s keys");
    }
    decode_alike(&mut three, &mut two, 40, &mut qkv);
    assert_eq!(three.index_lists().unwrap(), two.index_lists().unwrap());

    // Keeping none forgets the batch; a new prefill starts another of any size.
    three.retain(&[false, false]).unwrap();
    assert!(three.seq_lens().is_empty() && three.cache().is_none());
    let [q, k, v] = qkv(1, 1);
    assert!(matches!(
        three.decode(&q, &k, &v),
        Err(SaapError::EmptyContext(0))
    ));
    let [q, k, v] = qkv(1, 30);
    three.prefill(&q, &k, &v, &[30]).unwrap();
    assert_eq!(three.seq_lens(), &[30]);
}

/// `retain` under Quest routing (no index): the kept items' page bounds go with them, so the op
/// reads and answers as one that only ever held those items, through merges that add pages.
#[test]
fn retain_keeps_quest_pages_of_the_kept_items() {
    let mut config = config(8, 2, 32, 16, RopeKind::Neox);
    config.window = 24;
    config.merge_every = 8;
    let dev = Device::Cpu;
    let mut r = rng(83);
    let mut qkv =
        |batch: usize, t: usize| [8, 2, 2].map(|h| randn(&mut r, &[batch, h, t, 32], 1.0));
    let kept_rows = Tensor::new(&[0u32, 2], &dev).unwrap();
    let kept = |x: &Tensor| x.index_select(&kept_rows, 0).unwrap();
    let mut three = SaapAttention::dense(&config, &dev, DType::F32).unwrap();
    let mut two = SaapAttention::dense(&config, &dev, DType::F32).unwrap();
    let [q, k, v] = qkv(3, 200);
    three.prefill(&q, &k, &v, &[120, 200, 90]).unwrap();
    two.prefill(&kept(&q), &kept(&k), &kept(&v), &[120, 90])
        .unwrap();
    for op in [&mut three, &mut two] {
        op.set_routing(Routing::Quest).unwrap();
        op.set_quest_pages(2).unwrap();
    }
    let [q, k, v] = qkv(3, 1);
    three.decode(&q, &k, &v).unwrap();
    two.decode(&kept(&q), &kept(&k), &kept(&v)).unwrap();
    three.retain(&[true, false, true]).unwrap();
    decode_alike(&mut three, &mut two, 30, &mut qkv);
}

/// `steps` random decode steps of a batch of 2 through `retained` (items kept by `retain`) and
/// `alone` (an op that only ever held them): identical outputs and reads at every step, sparse
/// reads, the same extents after, and every window merged into the index on the way.
fn decode_alike(
    retained: &mut SaapAttention,
    alone: &mut SaapAttention,
    steps: usize,
    qkv: &mut impl FnMut(usize, usize) -> [Tensor; 3],
) {
    let merged_before = alone.extents().to_vec();
    for step in 0..steps {
        let [q, k, v] = qkv(2, 1);
        let got = retained.decode(&q, &k, &v).unwrap();
        let want = alone.decode(&q, &k, &v).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "step {step}");
        assert_eq!(retained.last_read(), alone.last_read(), "step {step}");
        assert!(retained.last_read().unwrap().partitions_probed > 0);
    }
    assert_eq!(retained.extents(), alone.extents());
    assert!(
        retained
            .extents()
            .iter()
            .zip(&merged_before)
            .all(|(now, then)| now.indexed_end > then.indexed_end),
        "windows merged after the retain: {:?}",
        retained.extents()
    );
}

/// Random queries `[B, Hq, D]` and K/V caches `[B, Hkv, cap, D]`, and each item's
/// `(len, indexed_end)` as extents.
fn decode_inputs(
    r: &mut rand::rngs::StdRng,
    (hq, hkv, d, cap): (usize, usize, usize, usize),
    extents: &[(usize, usize)],
) -> (Tensor, Tensor, Tensor, Vec<saap::attend::SeqExtent>) {
    let b = extents.len();
    let q = randn(r, &[b, hq, d], 1.0);
    let k = randn(r, &[b, hkv, cap, d], 1.0);
    let v = randn(r, &[b, hkv, cap, d], 1.0);
    let seqs = extents
        .iter()
        .map(|&(len, indexed_end)| saap::attend::SeqExtent { len, indexed_end })
        .collect();
    (q, k, v, seqs)
}

/// The CPU decode of `q` over caches `k`, `v` reading the probed `partitions` (scale 1/4).
fn decode_probed(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    seqs: &[saap::attend::SeqExtent],
    sinks: usize,
    (partitions, n_partitions): (saap::attend::Partitions, usize),
    probes: Tensor,
    means: Option<Tensor>,
) -> candle_core::Result<Tensor> {
    q.apply_op1_no_bwd(&saap::attend::DecodeOp {
        k_cache: k.clone(),
        v_cache: v.clone(),
        partitions: Some(partitions),
        probes: Some(probes),
        seqs: seqs.to_vec(),
        sinks,
        n_partitions,
        scale: 0.25,
        advance: None,
        means,
    })
}

/// A KV group's shared probe list (`[B, Hkv, ℓ]`, Quest's pages) reads exactly what the same list
/// given to each of the group's query heads reads (`[B, Hq, ℓ]`); probes of a third shape, or a
/// directory of the wrong length, are refused with an error naming them.
#[test]
fn group_shared_probes_read_as_per_head_copies() {
    use rand::Rng;
    use saap::attend::Partitions;
    use saap::partition::scan::{dir_len, naive_partition};
    let (b, hq, hkv, d, c, cap, n, sinks) = (2, 8, 2, 16, 12, 200, 3, 4);
    let mut r = rng(21);
    let (q, k, v, seqs) = decode_inputs(&mut r, (hq, hkv, d, cap), &[(200, 150), (90, 40)]);
    let labels: Vec<u32> = (0..cap).map(|_| r.random_range(0..c as u32)).collect();
    let mut dir = Vec::new();
    for seq in &seqs {
        for _ in 0..hkv {
            let (ids, offsets) = naive_partition(&labels, sinks, seq.indexed_end, c);
            dir.extend_from_slice(&offsets);
            dir.extend_from_slice(&ids);
            dir.extend(std::iter::repeat_n(0, cap - ids.len()));
        }
    }
    let dir = Tensor::from_vec(dir, (b, hkv, dir_len(c, cap)), &Device::Cpu).unwrap();
    let shared: Vec<u32> = (0..b * hkv * n)
        .map(|_| r.random_range(0..c as u32))
        .collect();
    let copies: Vec<u32> = shared
        .chunks(n)
        .flat_map(|list| list.repeat(hq / hkv))
        .collect();
    let decode = |probes: &[u32], heads: usize, dir: &Tensor| {
        let probes = Tensor::from_slice(probes, (b, heads, n), &Device::Cpu).unwrap();
        let partitions = (Partitions::Directory(dir.clone()), c);
        decode_probed(&q, (&k, &v), &seqs, sinks, partitions, probes, None)
    };
    let once = decode(&shared, hkv, &dir).unwrap();
    let per_head = decode(&copies, hq, &dir).unwrap();
    assert_eq!(max_abs_diff(&once, &per_head), 0.0);
    let other = vec![0u32; b * (hkv + 1) * n];
    let err = decode(&other, hkv + 1, &dir).unwrap_err().to_string();
    assert!(err.contains("probes"), "{err}");
    let short = dir.narrow(2, 0, dir_len(c, cap) - 1).unwrap();
    let err = decode(&shared, hkv, &short).unwrap_err().to_string();
    assert!(err.contains("directory"), "{err}");
}

/// Pages (`Partitions::Pages`, Quest's) read what a directory of the same page starts and the
/// identity perm reads, for ascending lists with unused slots last (the kernels' listed path),
/// shuffled lists with a repeat, and lists per query head; ragged items whose indexed region
/// ends before some listed pages. Pages of 0 positions, or pages with partition means, are
/// refused; a corrupt directory (offsets and ids past the cache) reads only inside the cache.
#[test]
fn pages_read_as_their_directory() {
    use rand::seq::SliceRandom;
    use rand::Rng;
    use saap::attend::Partitions;
    let (b, hq, hkv, d, cap, sinks, page) = (2, 8, 2, 16, 300, 5usize, 16usize);
    let mut r = rng(22);
    let (q, k, v, seqs) = decode_inputs(&mut r, (hq, hkv, d, cap), &[(300, 250), (120, 61)]);
    let c = (250 - sinks).div_ceil(page);
    let mut dir = Vec::new();
    for seq in &seqs {
        for _ in 0..hkv {
            dir.extend((0..=c).map(|p| (sinks + page * p).min(seq.indexed_end) as u32));
            dir.extend(0..cap as u32);
        }
    }
    let dir = Tensor::from_vec(dir, (b, hkv, c + 1 + cap), &Device::Cpu).unwrap();
    let n = 6;
    let mut ascending = Vec::new();
    let mut shuffled = Vec::new();
    for _ in 0..b * hkv {
        let mut pages: Vec<u32> = (0..c as u32).collect();
        pages.shuffle(&mut r);
        let mut list = pages[..n - 2].to_vec();
        list.sort_unstable();
        list.extend([c as u32; 2]);
        ascending.extend_from_slice(&list);
        list[n - 1] = list[0];
        list.shuffle(&mut r);
        shuffled.extend(list);
    }
    let per_head: Vec<u32> = (0..b * hq * n)
        .map(|_| r.random_range(0..=c as u32))
        .collect();
    let decode_with = |partitions: Partitions, probes: &[u32], heads: usize, means| {
        let probes = Tensor::from_slice(probes, (b, heads, n), &Device::Cpu).unwrap();
        decode_probed(&q, (&k, &v), &seqs, sinks, (partitions, c), probes, means)
    };
    let decode = |partitions, probes: &[u32], heads| decode_with(partitions, probes, heads, None);
    for (probes, heads) in [(&ascending, hkv), (&shuffled, hkv), (&per_head, hq)] {
        let pages = decode(Partitions::Pages(page), probes, heads).unwrap();
        let table = decode(Partitions::Directory(dir.clone()), probes, heads).unwrap();
        assert_eq!(max_abs_diff(&pages, &table), 0.0, "lists {heads}");
    }
    let err = decode(Partitions::Pages(0), &ascending, hkv)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pages"), "{err}");
    let means = Tensor::zeros((2, b, hkv, c, d), DType::F32, &Device::Cpu).unwrap();
    let err = decode_with(Partitions::Pages(page), &ascending, hkv, Some(means))
        .unwrap_err()
        .to_string();
    assert!(err.contains("means"), "{err}");
    // Page 0's ids point past the cache (reading it equals not listing it) and page 1's end
    // does (it is read up to the cache's end, not past it).
    let mut corrupt = dir.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let row = c + 1 + cap;
    for group in 0..b * hkv {
        corrupt[group * row + 2] = 10 * cap as u32;
        corrupt[group * row + c + 1..group * row + c + 1 + sinks + page].fill(cap as u32 + 7);
    }
    let corrupt = Tensor::from_vec(corrupt, (b, hkv, row), &Device::Cpu).unwrap();
    let with_first = vec![0u32; b * hkv * n];
    let none = vec![c as u32; b * hkv * n];
    let corrupt_read = decode(Partitions::Directory(corrupt.clone()), &with_first, hkv).unwrap();
    let skipped = decode(Partitions::Directory(corrupt.clone()), &none, hkv).unwrap();
    assert_eq!(max_abs_diff(&corrupt_read, &skipped), 0.0);
    let past_end = decode(
        Partitions::Directory(corrupt),
        &vec![1u32; b * hkv * n],
        hkv,
    )
    .unwrap();
    let values = past_end.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|x| x.is_finite()));
}
