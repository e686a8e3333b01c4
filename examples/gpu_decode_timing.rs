//! Times one decode step of one Llama-3.1-8B attention layer (32 query heads, 8 KV heads, head
//! dim 128, bf16, batch 1) on the GPU: the dense kernel over every key, and Saap (C = 1024,
//! ℓ = 32, window 2048, 16 sinks) over random but realistic selections — uniform partition
//! sizes, and the 4 query heads of a group probing overlapping partitions (a union of ≈ 47 of
//! 1024 per KV head, ≈ 4.6 % of the indexed keys).
//!
//! Two numbers per case: `device` is the GPU time per call with the queue kept full (a long
//! matmul first, then 20 calls back to back between two events: host overhead hidden), `call`
//! is the median over single calls bracketed by events, host launch latency included (the
//! method of `fa2_decode_anchor.py`). Bandwidth is bytes read / `device` time, where bytes are
//! the K and V rows read plus the index (offsets, selected ids, probes) once per KV head.
//!
//! Usage: `gpu_decode_timing [LENGTH...]` (default 32768 131072 171000).

use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use saap::attend::{DecodeOp, Partitions, SeqExtent};
use saap::partition::scan::naive_partition;
use std::sync::Arc;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const C: usize = 1024;
const N_PROBE: usize = 32;
const WINDOW: usize = 2048;
const SINKS: usize = 16;
/// Partitions a group's query heads draw their probes from (their union is close to this).
const POOL: usize = 48;
/// K/V buffers rotated through, so that the 50 MB L2 does not serve repeated reads.
const BUFFERS: usize = 8;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lengths: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let lengths = if lengths.is_empty() {
        vec![32768, 131072, 171000]
    } else {
        lengths
    };
    let dev = Device::new_cuda(0)?;
    let Device::Cuda(cuda) = &dev else {
        return Err("not a CUDA device".into());
    };
    let stream = cuda.cuda_stream();
    let mut rng = StdRng::seed_from_u64(0);
    println!("# saap gpu_decode_timing: Hq={HQ} Hkv={HKV} D={D} bf16 batch 1; C={C} l={N_PROBE} window={WINDOW} sinks={SINKS}");
    println!(
        "# {:>7} {:>6} {:>9} {:>10} {:>9} {:>9} {:>8}",
        "N", "kind", "keys%", "MB read", "device_us", "call_us", "TB/s"
    );
    for &n in &lengths {
        let q = Tensor::randn(0f32, 1.0, (1, HQ, D), &dev)?.to_dtype(DType::BF16)?;
        let mut caches = Vec::with_capacity(BUFFERS);
        for _ in 0..BUFFERS {
            let k = Tensor::randn(0f32, 1.0, (1, HKV, n, D), &dev)?.to_dtype(DType::BF16)?;
            let v = Tensor::randn(0f32, 1.0, (1, HKV, n, D), &dev)?.to_dtype(DType::BF16)?;
            caches.push((k, v));
        }
        let seq = SeqExtent {
            len: n,
            indexed_end: n - WINDOW,
        };
        let (dir, probes, selected) = random_index(&mut rng, n, seq)?;
        let (dir, probes) = (dir.to_device(&dev)?, probes.to_device(&dev)?);
        let ops = |sparse: bool| -> Vec<DecodeOp> {
            caches
                .iter()
                .map(|(k, v)| DecodeOp {
                    k_cache: k.clone(),
                    v_cache: v.clone(),
                    partitions: sparse.then(|| Partitions::Directory(dir.clone())),
                    probes: sparse.then(|| probes.clone()),
                    seqs: vec![seq],
                    sinks: SINKS,
                    n_partitions: C,
                    scale: 1.0 / (D as f32).sqrt(),
                    advance: None,
                    means: None,
                })
                .collect()
        };
        let row_bytes = 2 * D * 2; // one K row and one V row, bf16
        let dense_bytes = HKV * n * row_bytes;
        let index_bytes = HKV * ((C + 1) * 4 + (HQ / HKV) * N_PROBE * 4);
        let sparse_bytes =
            selected * row_bytes + index_bytes + (selected - HKV * (SINKS + WINDOW)) * 4;
        for (kind, ops, bytes, keys) in [
            ("dense", ops(false), dense_bytes, HKV * n),
            ("saap", ops(true), sparse_bytes, selected),
        ] {
            let (device_us, call_us) = time(&dev, &stream, &q, &ops)?;
            println!(
                "{:>9} {:>6} {:>8.2}% {:>10.2} {:>9.1} {:>9.1} {:>8.2}",
                n,
                kind,
                100.0 * keys as f64 / (HKV * n) as f64,
                bytes as f64 / 1e6,
                device_us,
                call_us,
                bytes as f64 / (device_us * 1e-6) / 1e12
            );
        }
    }
    Ok(())
}

/// Directory with uniform random labels, probes drawn per group from a pool of `POOL`
/// partitions, and the number of keys the op reads (summed over KV heads).
fn random_index(
    rng: &mut StdRng,
    n: usize,
    seq: SeqExtent,
) -> Result<(Tensor, Tensor, usize), Box<dyn std::error::Error>> {
    let row = C + 1 + n;
    let mut dir = Vec::with_capacity(HKV * row);
    let mut probes = Vec::with_capacity(HQ * N_PROBE);
    let mut selected = 0;
    let group = HQ / HKV;
    for _ in 0..HKV {
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..C as u32)).collect();
        let (ids, offsets) = naive_partition(&labels, SINKS, seq.indexed_end, C);
        let pool = sample(rng, C, POOL).into_vec();
        let mut union = vec![false; C];
        for _ in 0..group {
            for i in sample(rng, POOL, N_PROBE).into_iter() {
                probes.push(pool[i] as u32);
                union[pool[i]] = true;
            }
        }
        selected += SINKS + (seq.len - seq.indexed_end);
        for (c, _) in union.iter().enumerate().filter(|(_, &u)| u) {
            selected += (offsets[c + 1] - offsets[c]) as usize;
        }
        dir.extend_from_slice(&offsets);
        dir.extend_from_slice(&ids);
        dir.extend(std::iter::repeat_n(0, n - ids.len()));
    }
    Ok((
        Tensor::from_vec(dir, (1, HKV, row), &Device::Cpu)?,
        Tensor::from_vec(probes, (1, HQ, N_PROBE), &Device::Cpu)?,
        selected,
    ))
}

/// `(device µs per call with a full queue, median µs of single calls)`.
fn time(
    dev: &Device,
    stream: &Arc<CudaStream>,
    q: &Tensor,
    ops: &[DecodeOp],
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    for op in ops.iter().cycle().take(20) {
        q.apply_op1_no_bwd(op)?;
    }
    dev.synchronize()?;
    // Full queue: a few ms of matmul keep the GPU busy while the host enqueues the calls.
    let a = Tensor::randn(0f32, 1.0, (8192, 8192), dev)?.to_dtype(DType::BF16)?;
    let mut device_us = f64::MAX;
    for _ in 0..5 {
        let _busy = (a.matmul(&a)?, a.matmul(&a)?);
        let start = stream.record_event(timed)?;
        let calls = 20;
        for op in ops.iter().cycle().take(calls) {
            q.apply_op1_no_bwd(op)?;
        }
        let end = stream.record_event(timed)?;
        let ms = start.elapsed_ms(&end)? as f64;
        device_us = device_us.min(ms * 1e3 / calls as f64);
    }
    let mut single = Vec::new();
    for op in ops.iter().cycle().take(50) {
        dev.synchronize()?;
        let start = stream.record_event(timed)?;
        q.apply_op1_no_bwd(op)?;
        let end = stream.record_event(timed)?;
        single.push(start.elapsed_ms(&end)? as f64 * 1e3);
    }
    single.sort_by(f64::total_cmp);
    Ok((device_us, single[single.len() / 2]))
}
