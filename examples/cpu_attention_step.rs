//! The attention part of one SmolLM2-135M decode step on the CPU, Saap against dense, through
//! the decode op alone (no model, no routing): 30 layers of 3 KV heads × 7168 rows of 64 f32 (each
//! layer its own cache, 290 MB in all, as in the main job), 9 query heads, 7088 keys in context;
//! 26 layers read 4 sinks, a 512-token window and the union of ℓ = 5 random partitions of C = 256
//! per query head (random labels, so partitions hold scattered rows), 4 layers read everything.
//! Prints the median and fastest of 40 steps each, alternating.
//!
//! `cargo run --release --example cpu_attention_step` (figures in
//! `bench/results/2026-11-26-cpu-first-run/`).

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use saap::attend::decode::{DecodeOp, Partitions, SeqExtent};
use std::time::Instant;

const HQ: usize = 9;
const HKV: usize = 3;
const D: usize = 64;
const C: usize = 256;
const PROBE: usize = 5;
const CONTEXT: usize = 7088;
const CAP: usize = 7168;
const SINKS: usize = 4;
const WINDOW: usize = 512;
const LAYERS: usize = 30;
const DENSE_LAYERS: usize = 4;

/// One layer's cache, directory (`[1, Hkv, C + 1 + cap]`: offsets then perm) and probes.
struct Layer {
    k: Tensor,
    v: Tensor,
    dir: Tensor,
    probes: Tensor,
}

fn layer(rng: &mut rand::rngs::StdRng, dev: &Device) -> candle_core::Result<Layer> {
    let indexed_end = CONTEXT - WINDOW;
    let mut dir = Vec::with_capacity(HKV * (C + 1 + CAP));
    for _ in 0..HKV {
        let labels: Vec<usize> = (SINKS..indexed_end)
            .map(|_| rng.random_range(0..C))
            .collect();
        let mut offsets = vec![0u32; C + 1];
        for &l in &labels {
            offsets[l + 1] += 1;
        }
        for i in 0..C {
            offsets[i + 1] += offsets[i];
        }
        let mut perm = vec![0u32; CAP];
        let mut next = offsets.clone();
        for (i, &l) in labels.iter().enumerate() {
            perm[next[l] as usize] = (SINKS + i) as u32;
            next[l] += 1;
        }
        dir.extend(offsets);
        dir.extend(perm);
    }
    let probes: Vec<u32> = (0..HQ * PROBE)
        .map(|_| rng.random_range(0..C as u32))
        .collect();
    Ok(Layer {
        k: Tensor::randn(0f32, 1.0, (1, HKV, CAP, D), dev)?,
        v: Tensor::randn(0f32, 1.0, (1, HKV, CAP, D), dev)?,
        dir: Tensor::from_vec(dir, (1, HKV, C + 1 + CAP), dev)?,
        probes: Tensor::from_vec(probes, (1, HQ, PROBE), dev)?,
    })
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let layers = (0..LAYERS)
        .map(|_| layer(&mut rng, &dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let q = Tensor::randn(0f32, 1.0, (1, HQ, D), &dev)?;
    let seqs = vec![SeqExtent {
        len: CONTEXT,
        indexed_end: CONTEXT - WINDOW,
    }];
    let step = |sparse: bool| -> candle_core::Result<f64> {
        let start = Instant::now();
        for (i, l) in layers.iter().enumerate() {
            let routed = sparse && i >= DENSE_LAYERS;
            let op = DecodeOp {
                k_cache: l.k.clone(),
                v_cache: l.v.clone(),
                partitions: routed.then(|| Partitions::Directory(l.dir.clone())),
                probes: routed.then(|| l.probes.clone()),
                seqs: seqs.clone(),
                sinks: SINKS,
                n_partitions: C,
                scale: 1.0 / (D as f32).sqrt(),
                advance: None,
                means: None,
            };
            std::hint::black_box(q.apply_op1_no_bwd(&op)?);
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..3 {
        step(true)?;
        step(false)?;
    }
    let (mut saap, mut dense) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        saap.push(step(true)?);
        dense.push(step(false)?);
    }
    saap.sort_by(f64::total_cmp);
    dense.sort_by(f64::total_cmp);
    println!(
        "attention of one step ({LAYERS} layers, {DENSE_LAYERS} dense): Saap median {:.2} ms \
         (fastest {:.2}), dense median {:.2} ms (fastest {:.2})",
        saap[20], saap[0], dense[20], dense[0]
    );
    Ok(())
}
