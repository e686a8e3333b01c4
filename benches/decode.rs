//! One layer's decode step at Llama-3.1-8B shapes (32 query heads, 8 KV heads, d = 128, bf16,
//! batch 1): Saap (classifier + top-ℓ + union + attention, merges amortized) against dense
//! attention through the same op, at several context lengths; and the index build of one layer.
//!
//! `cargo bench --bench decode` runs on the CPU. Context lengths: `SAAP_BENCH_LENS` (comma
//! separated, default `32768,131072`).
//!
//! With `--features cuda` the same decode step and index build also run on the GPU
//! (`decode_step_gpu`, `index_build_gpu`): n from `SAAP_BENCH_GPU_LENS` (default 32k, 128k,
//! 171k, 256k, 512k), batch 1 and 8, the whole step counted (classifier, top-ℓ, attention and
//! the merge of splits, RoPE and append; read stats and finite checks off), each iteration
//! synchronized. Set `SAAP_BENCH_CPU=0` to skip the CPU groups. `examples/bench_report.rs`
//! gives the device-time breakdown and bytes read.

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
    filled_on(index, n, 1, routing, &Device::Cpu)
}

/// An op on `dev` holding `n` random tokens per batch item, indexed, with room for 1024 more.
fn filled_on(
    index: &SaapIndex,
    n: usize,
    batch: usize,
    routing: Routing,
    dev: &Device,
) -> SaapAttention {
    let mut op = SaapAttention::from_index(index, 0, dev, DType::BF16).expect("op");
    op.set_routing(routing).expect("routing");
    op.set_check_finite(false);
    // Chunks: 8192 tokens on the CPU; on a GPU two, the first large enough that the cache's
    // geometric growth leaves room for the decode steps.
    let chunks: Vec<usize> = if dev.is_cpu() {
        (0..n).step_by(8192).map(|s| 8192.min(n - s)).collect()
    } else {
        let first = n / 2 + 512;
        vec![first, n - first]
    };
    for t in chunks {
        let x = |_| {
            Tensor::randn(0f32, 1.0, &[batch, HKV, t, D], dev)
                .and_then(|x| x.to_dtype(DType::BF16))
                .expect("randn")
        };
        op.extend(&x(0), &x(1), &vec![t; batch]).expect("extend");
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

fn cpu_enabled() -> bool {
    std::env::var("SAAP_BENCH_CPU").map_or(true, |v| v != "0")
}

fn decode_cpu(c: &mut Criterion) {
    if cpu_enabled() {
        decode(c);
    }
}

fn index_build_cpu(c: &mut Criterion) {
    if cpu_enabled() {
        index_build(c);
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;

    fn lens() -> Vec<usize> {
        std::env::var("SAAP_BENCH_GPU_LENS")
            .ok()
            .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![32_768, 131_072, 171_000, 262_144, 524_288])
    }

    fn device() -> Option<Device> {
        Device::new_cuda(0)
            .map_err(|e| eprintln!("decode_step_gpu: no CUDA device ({e}); skipped"))
            .ok()
    }

    /// Whole decode steps on the GPU, each iteration synchronized.
    pub fn decode_gpu(c: &mut Criterion) {
        let Some(dev) = device() else { return };
        let mut config = llama_config();
        config.hidden = 256;
        let index = random_index(&config);
        let mut group = c.benchmark_group("decode_step_gpu_llama8b_layer");
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(300));
        for n in lens() {
            for batch in [1, 8] {
                let q = Tensor::randn(0f32, 1.0, &[batch, HQ, 1, D], &dev)
                    .and_then(|x| x.to_dtype(DType::BF16))
                    .expect("q");
                let kv = Tensor::randn(0f32, 1.0, &[batch, HKV, 1, D], &dev)
                    .and_then(|x| x.to_dtype(DType::BF16))
                    .expect("kv");
                let mut op = filled_on(&index, n, batch, Routing::Classifier, &dev);
                op.set_track_reads(false);
                for routing in [Routing::Classifier, Routing::Dense] {
                    op.set_routing(routing).expect("routing");
                    let id = BenchmarkId::new(format!("{routing:?}/b{batch}"), n);
                    group.bench_function(id, |b| {
                        b.iter(|| {
                            op.decode(&q, &kv, &kv).expect("decode");
                            dev.synchronize().expect("sync");
                        })
                    });
                }
            }
        }
        group.finish();
    }

    /// Index build of one layer on the GPU: a fresh op's `extend` of n tokens (RoPE, append,
    /// assignment, partition-scan merge).
    pub fn index_build_gpu(c: &mut Criterion) {
        let Some(dev) = device() else { return };
        let mut config = llama_config();
        config.hidden = 256;
        let index = random_index(&config);
        let mut group = c.benchmark_group("index_build_gpu_llama8b_layer");
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(300));
        for n in lens() {
            let k = Tensor::randn(0f32, 1.0, &[1, HKV, n, D], &dev)
                .and_then(|x| x.to_dtype(DType::BF16))
                .expect("k");
            group.bench_function(BenchmarkId::new("extend", n), |b| {
                b.iter(|| {
                    let mut op =
                        SaapAttention::from_index(&index, 0, &dev, DType::BF16).expect("op");
                    op.set_check_finite(false);
                    op.extend(&k, &k, &[n]).expect("extend");
                    dev.synchronize().expect("sync");
                })
            });
        }
        group.finish();
    }
}

#[cfg(feature = "cuda")]
criterion_group!(
    benches,
    decode_cpu,
    index_build_cpu,
    gpu::decode_gpu,
    gpu::index_build_gpu
);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, decode_cpu, index_build_cpu);
criterion_main!(benches);
