//! k-means on a subset of the key dimensions (`TrainParams::key_dims`): the centroids are zero
//! outside the kept dimensions, and the unchanged assignment (nearest centroid over all
//! dimensions) then equals k-means on the kept dimensions alone.

mod common;

use candle_core::Tensor;
use common::*;
use saap::partition::assign::assign;
use saap::partition::kmeans::{kmeans, KMeansParams};
use saap::train::data::Sequence;
use saap::train::{train_centroids, KeyDims, TrainParams};
use saap::{RopeKind, SaapError};

const D: usize = 8;

/// Two sequences of `[Hkv = 2, n, D]` random keys (queries and values unused here).
fn sequences(seed: u64) -> Vec<Sequence> {
    let mut r = rng(seed);
    (0..2)
        .map(|_| Sequence {
            q: randn(&mut r, &[4, 300, D], 1.0),
            k: randn(&mut r, &[2, 300, D], 1.0),
            v: randn(&mut r, &[2, 300, D], 1.0),
        })
        .collect()
}

/// Columns `dims` of a `[H, N, D]` tensor.
fn columns(x: &Tensor, dims: &[usize]) -> Tensor {
    let idx = Tensor::from_vec(
        dims.iter().map(|&i| i as u32).collect(),
        dims.len(),
        x.device(),
    )
    .unwrap();
    x.index_select(&idx, 2).unwrap()
}

/// Largest absolute value of `x`.
fn max_abs(x: &Tensor) -> f32 {
    x.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn masked_centroids_are_kmeans_on_the_kept_dims() {
    for kind in [RopeKind::Interleaved, RopeKind::Neox] {
        let config = config(4, 2, D, 16, kind);
        let seqs = sequences(7);
        let mut params = TrainParams::new(&config);
        params.kmeans_iters = 6;
        params.key_dims = KeyDims::Slowest(0.5);
        let kept = params.key_dims.kept(&config).unwrap();
        // D = 8: pairs 2 and 3 rotate slowest.
        let expected: Vec<usize> = match kind {
            RopeKind::Interleaved => vec![4, 5, 6, 7],
            RopeKind::Neox => vec![2, 3, 6, 7],
        };
        assert_eq!(kept, expected);
        let dropped: Vec<usize> = (0..D).filter(|i| !kept.contains(i)).collect();
        let centroids = train_centroids(&seqs, &config, &params).unwrap();
        assert_eq!(centroids.dims(), &[2, 16, D]);
        let zeros = max_abs(&columns(&centroids, &dropped));
        assert_eq!(zeros, 0.0, "{kind:?}: dropped dimensions not zero");
        let kept_c = columns(&centroids, &kept);
        assert!(
            max_abs(&kept_c) > 0.1,
            "kept dimensions should hold the centroids"
        );

        for h in 0..2 {
            // The same k-means run by hand on the kept columns of the indexed keys.
            let mut points = Vec::new();
            for s in &seqs {
                let k =
                    s.k.get(h)
                        .unwrap()
                        .narrow(0, config.sinks, 300 - config.sinks)
                        .unwrap();
                let k = columns(&k.unsqueeze(0).unwrap(), &kept);
                points.extend(k.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            let km = kmeans(
                &points,
                kept.len(),
                &KMeansParams {
                    k: 16,
                    iters: 6,
                    max_points_per_centroid: params.max_points_per_centroid,
                    init: params.kmeans_init,
                    seed: params.seed + h as u64,
                },
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let got = kept_c
                .get(h)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, km.centroids, "{kind:?} head {h}: centroids differ");
        }

        // Assignment over all dimensions with the zero-padded centroids equals assignment on
        // the kept dimensions, and ignores the dropped ones entirely.
        let keys = seqs[1].k.clone();
        let full = assign(&keys, &centroids).unwrap().to_vec2::<u32>().unwrap();
        let sub = assign(&columns(&keys, &kept), &kept_c)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        assert_eq!(full, sub);
        let mut r = rng(99);
        let noise = randn(&mut r, &[2, 300, D], 50.0);
        let mask: Vec<f32> = (0..D)
            .map(|i| if kept.contains(&i) { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, D), keys.device()).unwrap();
        let shaken = (&keys + noise.broadcast_mul(&mask).unwrap()).unwrap();
        let moved = assign(&shaken, &centroids)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        assert_eq!(full, moved, "dropped dimensions changed an assignment");
        // Unmasked centroids do depend on them (the test could fail).
        let all = train_centroids(
            &seqs,
            &config,
            &TrainParams {
                key_dims: KeyDims::All,
                ..params.clone()
            },
        )
        .unwrap();
        let a = assign(&keys, &all).unwrap().to_vec2::<u32>().unwrap();
        let b = assign(&shaken, &all).unwrap().to_vec2::<u32>().unwrap();
        assert_ne!(a, b);
    }
}

#[test]
fn invalid_key_dims_are_config_errors() {
    let config = config(4, 2, D, 16, RopeKind::Neox);
    let seqs = sequences(3);
    for key_dims in [
        KeyDims::Slowest(0.0),
        KeyDims::Slowest(f64::NAN),
        KeyDims::Turns {
            turns: -1.0,
            tokens: 100,
        },
        // θ = 1e4, D = 8: the slowest pair turns 1e-3·100/2π ≈ 0.016 times over 100 tokens.
        KeyDims::Turns {
            turns: 0.001,
            tokens: 100,
        },
    ] {
        let mut params = TrainParams::new(&config);
        params.key_dims = key_dims;
        assert!(
            matches!(
                train_centroids(&seqs, &config, &params),
                Err(SaapError::Config(_))
            ),
            "{key_dims:?} accepted"
        );
    }
}

#[test]
fn query_directions_span_where_the_queries_live() {
    // Queries only in dimensions 0..4 (interleaved pairs 0 and 1): rotations keep them there,
    // so the top half of the directions is span(e0..e3) and the keys' dimensions 4..8 must not
    // matter.
    let config = config(4, 2, D, 16, RopeKind::Interleaved);
    let mut seqs = sequences(11);
    let mask = Tensor::from_vec(
        (0..D).map(|i| if i < 4 { 1f32 } else { 0.0 }).collect(),
        (1, 1, D),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for s in &mut seqs {
        s.q = s.q.broadcast_mul(&mask).unwrap();
    }
    let mut params = TrainParams::new(&config);
    params.kmeans_iters = 6;
    params.key_dims = KeyDims::parse("queries:0.5", 300).unwrap();
    assert_eq!(params.key_dims.rank(&config).unwrap(), 4);
    assert!(matches!(
        params.key_dims.kept(&config),
        Err(SaapError::Config(_))
    ));
    let centroids = train_centroids(&seqs, &config, &params).unwrap();
    let outside = max_abs(&columns(&centroids, &[4, 5, 6, 7]));
    assert!(outside < 1e-5, "centroids leave the query span: {outside}");
    let inside = max_abs(&columns(&centroids, &[0, 1, 2, 3]));
    assert!(inside > 0.1);
    let keys = seqs[0].k.clone();
    let mut r = rng(5);
    let shaken = (&keys
        + randn(&mut r, &[2, 300, D], 50.0)
            .broadcast_mul(&(1.0 - &mask).unwrap())
            .unwrap())
    .unwrap();
    assert_eq!(
        assign(&keys, &centroids).unwrap().to_vec2::<u32>().unwrap(),
        assign(&shaken, &centroids)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    );
}

#[test]
fn weighted_kmeans_follows_the_weights() {
    use saap::partition::kmeans::kmeans_weighted;
    // Two well separated groups on a line; one centroid: its position is the weighted mean.
    let points: Vec<f32> = vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0];
    let params = KMeansParams {
        k: 1,
        iters: 3,
        ..KMeansParams::new(1, 0)
    };
    let cpu = candle_core::Device::Cpu;
    let plain = kmeans(&points, 1, &params, &cpu).unwrap();
    assert!((plain.centroids[0] - 6.0).abs() < 1e-5);
    let ones = kmeans_weighted(&points, Some(&[1.0; 6]), 1, &params, &cpu).unwrap();
    assert_eq!(ones.centroids, plain.centroids);
    let w = [0.0, 0.0, 0.0, 1.0, 1.0, 2.0];
    let heavy = kmeans_weighted(&points, Some(&w), 1, &params, &cpu).unwrap();
    assert!(
        (heavy.centroids[0] - 11.25).abs() < 1e-5,
        "{:?}",
        heavy.centroids
    );
    for bad in [
        vec![1.0; 5],
        vec![1.0, 1.0, 1.0, -1.0, 1.0, 1.0],
        vec![f32::NAN; 6],
    ] {
        assert!(matches!(
            kmeans_weighted(&points, Some(&bad), 1, &params, &cpu),
            Err(SaapError::Training(_))
        ));
    }
}

#[test]
fn attention_weighted_centroids_train_and_reject_bad_exponents() {
    let config = config(4, 2, D, 16, RopeKind::Interleaved);
    let seqs = sequences(13);
    let mut params = TrainParams::new(&config);
    params.kmeans_iters = 4;
    params.queries_per_seq = 32;
    params.min_indexed = 16;
    let plain = train_centroids(&seqs, &config, &params).unwrap();
    params.attention_weight = Some(1.0);
    let weighted = train_centroids(&seqs, &config, &params).unwrap();
    assert_eq!(weighted.dims(), plain.dims());
    let diff = max_abs(&(&weighted - &plain).unwrap());
    assert!(diff > 1e-3, "weights changed nothing");
    for p in [0.0, -1.0, f64::NAN] {
        params.attention_weight = Some(p);
        assert!(matches!(
            train_centroids(&seqs, &config, &params),
            Err(SaapError::Config(_))
        ));
    }
}
