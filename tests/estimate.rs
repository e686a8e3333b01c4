//! Estimating the unread partitions from their means (`set_estimate_unread`), on the CPU: every
//! step equals a plain f64 reference built from the keys, the index lists and the routing; the
//! estimate moves the output towards dense attention; the means follow merges, snapshots and
//! retained batches.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use saap::classify::{centroid_scores, top_probes};
use saap::{RopeKind, Routing, SaapAttention, SaapConfig, SaapIndex};

/// Pre-RoPE keys and values of one batch item, per KV head and position.
#[derive(Default, Clone)]
struct Item {
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
}

impl Item {
    /// Appends the first `len` tokens of item `b` of `k`, `v` (`[B, Hkv, T, D]`).
    fn push(&mut self, k: &Tensor, v: &Tensor, b: usize, len: usize) {
        let rows = |x: &Tensor| x.get(b).unwrap().to_vec3::<f32>().unwrap();
        let (k, v) = (rows(k), rows(v));
        self.k.resize(k.len(), Vec::new());
        self.v.resize(v.len(), Vec::new());
        for h in 0..k.len() {
            self.k[h].extend(k[h][..len].iter().cloned());
            self.v[h].extend(v[h][..len].iter().cloned());
        }
    }
}

/// Softmax over `(logit, value)` pairs.
fn softmax_out(terms: &[(f64, Vec<f64>)], d: usize) -> Vec<f64> {
    let max = terms.iter().map(|t| t.0).fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0.0; d];
    let mut total = 0.0;
    for (logit, value) in terms {
        let w = (logit - max).exp();
        total += w;
        out.iter_mut().zip(value).for_each(|(o, x)| *o += w * x);
    }
    out.iter().map(|o| o / total).collect()
}

/// The expected output of one decode step of a nearest-centroid op (ℓ `n_probe`, estimate on or
/// off) for pre-RoPE queries `q` (`[B, Hq, 1, D]`), given the items' keys including the step's
/// token, the index lists and extents before the step. Also the partitions estimated.
#[allow(clippy::too_many_arguments)]
fn reference(
    config: &SaapConfig,
    centroids: &Tensor,
    items: &[Item],
    lists: &[Vec<(Vec<u32>, Vec<u32>)>],
    indexed_ends: &[usize],
    q: &Tensor,
    estimate: bool,
) -> (Vec<Vec<Vec<f64>>>, usize) {
    let (hq, hkv, d) = (
        config.layout.n_q_heads,
        config.layout.n_kv_heads,
        config.layout.head_dim,
    );
    let g = hq / hkv;
    let (kind, theta) = (config.rope.kind, config.rope.theta);
    let scale = 1.0 / (d as f64).sqrt();
    let q_pre = q.squeeze(2).unwrap();
    let probes = top_probes(&centroid_scores(&q_pre, centroids).unwrap(), config.n_probe)
        .unwrap()
        .to_vec3::<u32>()
        .unwrap();
    let q_pre = q_pre.to_vec3::<f32>().unwrap();
    let mut estimated = 0;
    let out = items
        .iter()
        .enumerate()
        .map(|(b, item)| {
            let len = item.k[0].len();
            let pos = len - 1;
            (0..hq)
                .map(|head| {
                    let h = head / g;
                    let (perm, offsets) = &lists[b][h];
                    let list = |c: usize| &perm[offsets[c] as usize..offsets[c + 1] as usize];
                    let mut probed = vec![false; config.n_partitions];
                    for p in probes[b][h * g..(h + 1) * g].iter().flatten() {
                        probed[*p as usize] = true;
                    }
                    let q = rope_ref(&q_pre[b][head], pos, kind, theta);
                    let dot = |k: &[f64]| q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale;
                    let key = |j: usize| rope_ref(&item.k[h][j], j, kind, theta);
                    let value = |j: usize| item.v[h][j].iter().map(|&x| x as f64).collect();
                    let mut ids: Vec<usize> = (0..config.sinks.min(len)).collect();
                    for c in (0..config.n_partitions).filter(|&c| probed[c]) {
                        ids.extend(list(c).iter().map(|&j| j as usize));
                    }
                    ids.extend(indexed_ends[b]..len);
                    let mut terms: Vec<(f64, Vec<f64>)> =
                        ids.iter().map(|&j| (dot(&key(j)), value(j))).collect();
                    for c in (0..config.n_partitions).filter(|&c| estimate && !probed[c]) {
                        let members = list(c);
                        if members.is_empty() {
                            continue;
                        }
                        if head % g == 0 {
                            estimated += 1;
                        }
                        let n = members.len() as f64;
                        let mut k_mean = vec![0.0; d];
                        let mut v_mean = vec![0.0; d];
                        for &j in members {
                            let (k, v): (Vec<f64>, Vec<f64>) = (key(j as usize), value(j as usize));
                            k_mean.iter_mut().zip(&k).for_each(|(m, x)| *m += x / n);
                            v_mean.iter_mut().zip(&v).for_each(|(m, x)| *m += x / n);
                        }
                        terms.push((dot(&k_mean) + n.ln(), v_mean));
                    }
                    softmax_out(&terms, d)
                })
                .collect()
        })
        .collect();
    (out, estimated)
}

fn setup() -> (SaapConfig, SaapIndex) {
    let mut config = config(8, 2, 16, 8, RopeKind::Neox);
    config.n_probe = 2;
    config.window = 8;
    config.merge_every = 4;
    let index = random_index(&config, 1, 301);
    (config, index)
}

/// Every step (prefill, then decode through many merges, a ragged batch) equals the reference,
/// with the estimate on and off; switched on mid-sequence (the summaries built then from every
/// indexed key), off (freed) and on again.
#[test]
fn decode_with_estimate_equals_reference() {
    let (config, index) = setup();
    let centroids = index.layer(0).unwrap().centroids.clone();
    let dev = Device::Cpu;
    let mut op = SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap();
    op.set_routing(Routing::NearestCentroid).unwrap();
    let mut r = rng(302);
    let lens = [70, 41];
    let rows = |r: &mut _, heads: usize, t: usize| randn(r, &[2, heads, t, 16], 1.0);
    let (q, k, v) = (
        rows(&mut r, 8, 70),
        rows(&mut r, 2, 70),
        rows(&mut r, 2, 70),
    );
    op.prefill(&q, &k, &v, &lens).unwrap();
    let mut items = vec![Item::default(); 2];
    for (b, item) in items.iter_mut().enumerate() {
        item.push(&k, &v, b, lens[b]);
    }
    let mut estimated_any = false;
    for step in 0..60 {
        let estimate = (10..30).contains(&step) || step >= 40;
        op.set_estimate_unread(estimate);
        assert_eq!(op.estimate_unread(), estimate);
        let lists = op.index_lists().unwrap();
        let ends: Vec<usize> = op.extents().iter().map(|e| e.indexed_end).collect();
        let (q, k, v) = (rows(&mut r, 8, 1), rows(&mut r, 2, 1), rows(&mut r, 2, 1));
        let out = op.decode(&q, &k, &v).unwrap().squeeze(2).unwrap();
        for (b, item) in items.iter_mut().enumerate() {
            item.push(&k, &v, b, 1);
        }
        let (expect, estimated) =
            reference(&config, &centroids, &items, &lists, &ends, &q, estimate);
        let got = out.to_vec3::<f32>().unwrap();
        for (b, heads) in expect.iter().enumerate() {
            for (h, row) in heads.iter().enumerate() {
                for (a, e) in got[b][h].iter().zip(row) {
                    assert!(
                        (*a as f64 - e).abs() < 2e-5,
                        "step {step} item {b} head {h}: {a} vs {e}"
                    );
                }
            }
        }
        let read = op.last_read().unwrap();
        assert_eq!(read.partitions_estimated, estimated, "step {step}");
        estimated_any |= estimated > 0;
    }
    assert!(estimated_any, "some partitions were estimated");
    assert!(
        op.extents().iter().all(|e| e.indexed_end > 50),
        "merges happened: {:?}",
        op.extents()
    );
}

/// On keys that cluster around the centroids (as real keys do), the estimate brings a sparse
/// step's output closer to dense attention's on average: the point of the feature.
#[test]
fn estimate_moves_sparse_output_towards_dense() {
    let (_, index) = setup();
    let centroids = index.layer(0).unwrap().centroids.clone();
    let dev = Device::Cpu;
    let mut r = rng(303);
    let (b, t) = (2, 300);
    // Keys near their head's centroids (small noise), values that depend on the centroid.
    let labels = Tensor::rand(0f32, 8.0, (b, 2, t), &dev)
        .unwrap()
        .floor()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let centers = (0..2)
        .map(|h| {
            centroids
                .get(h)
                .unwrap()
                .index_select(&labels.narrow(1, h, 1).unwrap().flatten_all().unwrap(), 0)
                .unwrap()
                .reshape((b, 1, t, 16))
                .unwrap()
        })
        .collect::<Vec<_>>();
    let centers = Tensor::cat(&centers, 1).unwrap();
    let k = (&centers * 3.0).unwrap() + randn(&mut r, &[b, 2, t, 16], 0.3);
    let k = k.unwrap();
    let v = (&centers + randn(&mut r, &[b, 2, t, 16], 0.3)).unwrap();
    let q = randn(&mut r, &[b, 8, t, 16], 1.0);
    let mut dense = SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap();
    dense.set_routing(Routing::Dense).unwrap();
    let mut plain = SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap();
    plain.set_routing(Routing::NearestCentroid).unwrap();
    for op in [&mut dense, &mut plain] {
        op.prefill(&q, &k, &v, &[t, t]).unwrap();
    }
    let mut estimated = plain.snapshot().unwrap();
    estimated.set_estimate_unread(true);
    let (mut err_plain, mut err_estimated) = (0f64, 0f64);
    for _ in 0..20 {
        let q = randn(&mut r, &[b, 8, 1, 16], 1.0);
        let k1 = randn(&mut r, &[b, 2, 1, 16], 1.0);
        let v1 = randn(&mut r, &[b, 2, 1, 16], 1.0);
        let want = dense.decode(&q, &k1, &v1).unwrap();
        for (op, err) in [
            (&mut plain, &mut err_plain),
            (&mut estimated, &mut err_estimated),
        ] {
            let got = op.decode(&q, &k1, &v1).unwrap();
            *err += ((got - &want).unwrap().sqr().unwrap().sum_all().unwrap())
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
    }
    assert!(
        err_estimated < 0.7 * err_plain,
        "squared error with the estimate {err_estimated} vs without {err_plain}"
    );
}

/// A snapshot and a bf16 op keep and use the means: the snapshot decodes exactly as the
/// original, and a bf16 op with the estimate stays within rounding of the f32 one.
#[test]
fn estimate_survives_snapshot_and_runs_in_bf16() {
    let (_, index) = setup();
    let dev = Device::Cpu;
    let mut r = rng(304);
    let rows = |r: &mut _, heads: usize, t: usize| randn(r, &[1, heads, t, 16], 1.0);
    let (q, k, v) = (
        rows(&mut r, 8, 90),
        rows(&mut r, 2, 90),
        rows(&mut r, 2, 90),
    );
    let op = |dtype: DType| {
        let mut op = SaapAttention::from_index(&index, 0, &dev, dtype).unwrap();
        op.set_routing(Routing::NearestCentroid).unwrap();
        op.set_estimate_unread(true);
        let cast = |x: &Tensor| x.to_dtype(dtype).unwrap();
        op.prefill(&cast(&q), &cast(&k), &cast(&v), &[90]).unwrap();
        op
    };
    let mut f32_op = op(DType::F32);
    let mut copy = f32_op.snapshot().unwrap();
    assert!(copy.estimate_unread());
    let mut bf16_op = op(DType::BF16);
    for step in 0..30 {
        let (q, k, v) = (rows(&mut r, 8, 1), rows(&mut r, 2, 1), rows(&mut r, 2, 1));
        let a = f32_op.decode(&q, &k, &v).unwrap();
        let b = copy.decode(&q, &k, &v).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "step {step}");
        let cast = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let c = bf16_op.decode(&cast(&q), &cast(&k), &cast(&v)).unwrap();
        let diff = max_abs_diff(&a, &c.to_dtype(DType::F32).unwrap());
        // A near-tie may route one bf16 step elsewhere; every step must stay close.
        assert!(diff < 0.1, "step {step}: bf16 differs by {diff}");
    }
    assert!(f32_op.last_read().unwrap().partitions_estimated > 0);
}
