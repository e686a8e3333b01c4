//! Shared helpers of the integration tests: seeded random tensors and indexes.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use saap::classify::Classifier;
use saap::{
    HeadLayout, LayerIndex, RopeConfig, RopeKind, RopeScaling, Routing, SaapConfig, SaapIndex,
};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn randn(rng: &mut StdRng, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| std * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, rng))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

pub fn config(
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    n_partitions: usize,
    kind: RopeKind,
) -> SaapConfig {
    let mut config = SaapConfig::new(
        HeadLayout {
            n_q_heads,
            n_kv_heads,
            head_dim,
        },
        RopeConfig {
            kind,
            theta: 10_000.0,
            scaling: RopeScaling::None,
        },
        n_partitions,
    )
    .unwrap();
    config.window = 16;
    config.sinks = 4;
    config.merge_every = 8;
    config.hidden = 16;
    config
}

/// An index with random centroids and classifiers (what it routes to does not matter when
/// every partition is probed).
pub fn random_index(config: &SaapConfig, n_layers: usize, seed: u64) -> SaapIndex {
    let mut r = rng(seed);
    let l = config.layout;
    let (c, h) = (config.n_partitions, config.hidden);
    let layers = (0..n_layers)
        .map(|_| LayerIndex {
            centroids: randn(&mut r, &[l.n_kv_heads, c, l.head_dim], 1.0),
            classifier: Classifier {
                w1: randn(&mut r, &[l.n_q_heads, l.head_dim, h], 0.3),
                b1: randn(&mut r, &[l.n_q_heads, 1, h], 0.1),
                w2: randn(&mut r, &[l.n_q_heads, h, c], 0.3),
                b2: randn(&mut r, &[l.n_q_heads, 1, c], 0.1),
            },
            routing: Routing::Classifier,
        })
        .collect();
    SaapIndex::new(config.clone(), "synthetic", layers).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
