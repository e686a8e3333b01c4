//! One layer's decode step at Llama-3.1-8B shapes (32 query heads, 8 KV heads, d = 128, bf16,
//! batch 1): Saap (classifier + top-ℓ + union + attention, merges amortized) against dense
//! attention through the same op, at several context lengths; and the index build of one layer.
//!
//! `cargo bench --bench decode` runs on the CPU. Context lengths: `SAAP_BENCH_LENS` (comma
//! separated, default `32768,131072`).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use saap::classify::Classifier;
use saap::{
    HeadLayout, LayerIndex, RopeConfig, RopeKind, RopeScaling, Routing, SaapAttention, SaapConfig,
    SaapIndex,
};
use std::time::Duration;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn llama_config() -> SaapConfig {
    let mut config = SaapConfig::new(
        HeadLayout {
            n_q_heads: HQ,
            n_kv_heads: HKV,
            head_dim: D,
        },
        RopeConfig {
            kind: RopeKind::Neox,
            theta: 500_000.0,
            scaling: RopeScaling::None,
        },
        1024,
    )
    .expect("valid config");
    config.n_probe = 32;
    config.window = 2048;
    config.sinks = 16;
    config.hidden = 128;
    config
}

fn randn(shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu).expect("randn")
}

/// An index with random centroids and classifiers: timing does not depend on what is learned,
/// only on how many keys the probes select, which the bench prints.
fn random_index(config: &SaapConfig) -> SaapIndex {
    let (c, h) = (config.n_partitions, config.hidden);
    let layer = LayerIndex {
        centroids: randn(&[HKV, c, D], 1.0),
        classifier: Classifier {
            w1: randn(&[HQ, D, h], 0.1),
            b1: randn(&[HQ, 1, h], 0.1),
            w2: randn(&[HQ, h, c], 0.1),
            b2: randn(&[HQ, 1, c], 0.1),
        },
        routing: Routing::Classifier,
    };
    SaapIndex::new(config.clone(), "random", vec![layer]).expect("index")
}

/// An op holding `n` random tokens, indexed.
fn filled(index: &SaapIndex, n: usize, routing: Routing) -> SaapAttention {
    let mut op = SaapAttention::from_index(index, 0, &Device::Cpu, DType::BF16).expect("op");
    op.set_routing(routing).expect("routing");
    op.set_check_finite(false);
    let chunk = 8192;
    for start in (0..n).step_by(chunk) {
        let t = chunk.min(n - start);
        let k = randn(&[1, HKV, t, D], 1.0)
            .to_dtype(DType::BF16)
            .expect("k");
        let v = randn(&[1, HKV, t, D], 1.0)
            .to_dtype(DType::BF16)
            .expect("v");
        op.extend(&k, &v, &[t]).expect("extend");
    }
    op
}

fn lens() -> Vec<usize> {
    std::env::var("SAAP_BENCH_LENS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![32_768, 131_072])
}

fn decode(c: &mut Criterion) {
    let config = llama_config();
    let index = random_index(&config);
    let mut group = c.benchmark_group("decode_step_llama8b_layer");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(1));
    let q = randn(&[1, HQ, 1, D], 1.0).to_dtype(DType::BF16).expect("q");
    let kv = randn(&[1, HKV, 1, D], 1.0)
        .to_dtype(DType::BF16)
        .expect("kv");
    for n in lens() {
        for routing in [Routing::Dense, Routing::Classifier] {
            let mut op = filled(&index, n, routing);
            op.decode(&q, &kv, &kv).expect("decode");
            let read = op.last_read().expect("tracked");
            eprintln!(
                "n = {n}, {routing:?}: keys read {:.2}% of context ({:.2}% of indexed keys), classifier {} bytes",
                100.0 * read.selectivity(),
                100.0 * read.indexed_selectivity(),
                index.layer(0).expect("layer").classifier.weight_bytes(),
            );
            group.bench_function(BenchmarkId::new(format!("{routing:?}"), n), |b| {
                b.iter(|| op.decode(&q, &kv, &kv).expect("decode"))
            });
        }
    }
    group.finish();
}

fn index_build(c: &mut Criterion) {
    let config = llama_config();
    let index = random_index(&config);
    let mut group = c.benchmark_group("index_build_llama8b_layer");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(1));
    let n = 32_768;
    let k = randn(&[1, HKV, n, D], 1.0)
        .to_dtype(DType::BF16)
        .expect("k");
    group.bench_function(BenchmarkId::new("assign_and_scan", n), |b| {
        b.iter(|| {
            let mut op =
                SaapAttention::from_index(&index, 0, &Device::Cpu, DType::BF16).expect("op");
            op.set_check_finite(false);
            op.extend(&k, &k, &[n]).expect("extend");
        })
    });
    group.finish();
}

criterion_group!(benches, decode, index_build);
criterion_main!(benches);
