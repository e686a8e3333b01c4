//! Machine-readable GPU benchmark of one Llama-3.1-8B attention layer (32 query heads, 8 KV
//! heads, d = 128, bf16; Saap C = 1024, ℓ = 32, window 2048, 16 sinks, classifier hidden width
//! `SAAP_REPORT_HIDDEN`, default 256) at several context lengths and batch sizes:
//!
//! - `saap_step` / `dense_step`: a whole decode step through `SaapAttention::decode` (RoPE,
//!   append, assignment of the new key, classifier + top-ℓ, attention, merge of the splits),
//!   read stats and finite checks off; `dense_step` is the same op with dense routing.
//!   `us` = device time per step with the queue kept full, `wall_us` = time per step of steps
//!   issued back to back from an idle GPU (host launch work included), `host_us` = host time to
//!   enqueue one step. Layers (ops) are rotated so that L2 does not serve repeated reads.
//!   `graph_us`, `graph_wall_us`, `graph_host_us`: the same step recorded once per op as a CUDA
//!   graph (`SaapAttention::begin_replay`) and replayed, one launch per step.
//!   `saap_estimate_step`: `saap_step` with the unread partitions estimated from their means
//!   (`SaapAttention::set_estimate_unread`).
//! - `saap_kernel` / `dense_kernel`: the attention kernel alone (`DecodeOp`) on a random index
//!   whose group unions are as large as in `saap_step`.
//! - `route` / `route_candle`: classifier + top-ℓ alone, with the CUDA kernels (bf16 weights) and
//!   with the candle ops on f32 weights (the path before the kernels).
//! - `quest`: Quest's routing alone (`saap::quest::route`: page scores, top-k pages in page
//!   order) over n / 16 pages of random bounds, k = 6% of them, for this layer's heads
//!   (`hkv` 8) and Qwen2.5-0.5B's (14 query heads, 2 KV heads, d = 64, `hkv` 2).
//! - `index_build`: a fresh op's `extend` of n tokens (RoPE, append, tensor-core assignment,
//!   partition-scan merge), the f32 `assign` alone, the tensor-core assignment alone
//!   (`assign_mma_us`) and the partition-scan merge alone.
//!
//! Bytes per step count everything read: K/V rows, selected ids, offsets of the probed
//! partitions, probes, classifier weights, centroids (assignment of the new key), the new token.
//! Every measurement is one `JSON {...}` line on stdout.
//!
//! Usage: `bench_report [LENGTHS] [BATCHES]`, e.g. `bench_report 32768,131072 1,8`;
//! `SAAP_REPORT_ONLY=route,quest,kernels,steps,index` runs only those sections (e.g. under a profiler).

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use saap::attend::{DecodeOp, Partitions, SeqExtent};
use saap::classify::Classifier;
use saap::partition::assign::{assign, assign_into, prepare_centroids};
use saap::partition::scan::{dir_len, merge, naive_partition, MergeOp};
use saap::{
    HeadLayout, LayerIndex, RopeConfig, RopeKind, RopeScaling, Routing, SaapAttention, SaapConfig,
    SaapIndex,
};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const HQ: usize = 32;
const HKV: usize = 8;
const G: usize = HQ / HKV;
const D: usize = 128;
const C: usize = 1024;
const N_PROBE: usize = 32;
/// Partitions a group's query heads draw their probes from (union ≈ 47 of 1024 per KV head).
const POOL: usize = 48;
/// Bytes of reads that rotation across layers must exceed so that L2 (50 MB) does not help.
const ROTATE_BYTES: usize = 200 << 20;
/// Decode steps an op may take after filling (cache slack).
const SLACK: usize = 1024;

fn config(hidden: usize) -> Res<SaapConfig> {
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
        C,
    )?;
    config.n_probe = N_PROBE;
    config.window = 2048;
    config.sinks = 16;
    config.hidden = hidden;
    Ok(config)
}

/// Random centroids and classifier; the output bias of a group's query heads favours a pool of
/// `POOL` partitions so that the heads of a group overlap as trained classifiers do.
fn random_index(config: &SaapConfig, rng: &mut StdRng) -> Res<SaapIndex> {
    let h = config.hidden;
    let cpu = Device::Cpu;
    let mut b2 = vec![0f32; HQ * C];
    for g in 0..HKV {
        for p in sample(rng, C, POOL).into_iter() {
            for head in g * G..(g + 1) * G {
                b2[head * C + p] = 8.0;
            }
        }
    }
    let mut normal = |shape: &[usize], std: f32| -> Res<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| std * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, rng))
            .collect();
        Ok(Tensor::from_vec(data, shape, &cpu)?)
    };
    let layer = LayerIndex {
        centroids: normal(&[HKV, C, D], 1.0)?,
        classifier: Classifier {
            w1: normal(&[HQ, D, h], 0.1)?,
            b1: normal(&[HQ, 1, h], 0.1)?,
            w2: normal(&[HQ, h, C], 0.1)?,
            b2: Tensor::from_vec(b2, (HQ, 1, C), &cpu)?,
        },
        routing: Routing::Classifier,
    };
    Ok(SaapIndex::new(config.clone(), "random", vec![layer])?)
}

/// Random bf16; tensors of 2^31 elements or more are made per batch item (candle's elementwise
/// launches count elements in u32).
fn randn_bf16(shape: &[usize], dev: &Device) -> Res<Tensor> {
    let numel: usize = shape.iter().product();
    if numel >= 1 << 31 && shape[0] > 1 {
        let parts: Vec<Tensor> = (0..shape[0])
            .map(|_| randn_bf16(&[&[1], &shape[1..]].concat(), dev))
            .collect::<Res<_>>()?;
        return Ok(Tensor::cat(&parts, 0)?);
    }
    Ok(Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16)?)
}

/// Standard normal values of `shape` from a seeded host generator, as bf16 on `dev`: the same in
/// every run and binary.
fn seeded_bf16(shape: &[usize], seed: u64, dev: &Device) -> Res<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let numel: usize = shape.iter().product();
    let data: Vec<half::bf16> = (0..numel)
        .map(|_| half::bf16::from_f32(StandardNormal.sample(&mut rng)))
        .collect();
    Ok(Tensor::from_vec(data, shape, dev)?)
}

/// The keys and values of `n` tokens for each of `batch` items, in two chunks as a prompt's
/// prefill would come: the same for every item, run and binary (`seeded_bf16`). The first chunk
/// makes the cache grow to max(n, 2 · first) ≥ n + SLACK rows.
fn prompt_chunks(n: usize, batch: usize, dev: &Device) -> Res<Vec<(Tensor, Tensor)>> {
    let first = n / 2 + SLACK / 2;
    [first, n - first]
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let chunk = |seed: u64| -> Res<Tensor> {
                Ok(seeded_bf16(&[1, HKV, t, D], seed, dev)?.repeat((batch, 1, 1, 1))?)
            };
            Ok((chunk(2 * i as u64)?, chunk(2 * i as u64 + 1)?))
        })
        .collect()
}

/// An op whose cache holds the `chunks` (`prompt_chunks`), extended in order.
fn filled(index: &SaapIndex, chunks: &[(Tensor, Tensor)], dev: &Device) -> Res<SaapAttention> {
    let mut op = SaapAttention::from_index(index, 0, dev, DType::BF16)?;
    op.set_check_finite(false);
    for (k, v) in chunks {
        let (batch, _, t, _) = k.dims4()?;
        op.extend(k, v, &vec![t; batch])?;
    }
    Ok(op)
}

fn timed_event(dev: &Device) -> Res<candle_core::cuda_backend::cudarc::driver::CudaEvent> {
    let Device::Cuda(cuda) = dev else {
        return Err("not a CUDA device".into());
    };
    Ok(cuda
        .cuda_stream()
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?)
}

/// `(device µs per call with a full queue, wall µs per call from idle, host µs per call)`.
fn time(dev: &Device, mut call: impl FnMut(usize) -> Res<()>) -> Res<(f64, f64, f64)> {
    for i in 0..10 {
        call(i)?;
    }
    dev.synchronize()?;
    let calls = 24;
    // From idle: what a caller pays per call when the GPU waits on the host.
    let mut wall = f64::MAX;
    let mut host = f64::MAX;
    for r in 0..3 {
        dev.synchronize()?;
        let start = timed_event(dev)?;
        let t0 = Instant::now();
        for i in 0..calls {
            call(r * calls + i)?;
        }
        host = host.min(t0.elapsed().as_secs_f64() * 1e6 / calls as f64);
        let end = timed_event(dev)?;
        wall = wall.min(start.elapsed_ms(&end)? as f64 * 1e3 / calls as f64);
    }
    // Full queue: ~10 ms of matmul keep the GPU busy while the host enqueues the calls.
    let a = Tensor::randn(0f32, 1.0, (8192, 8192), dev)?.to_dtype(DType::BF16)?;
    let mut device = f64::MAX;
    for r in 0..4 {
        dev.synchronize()?;
        let _busy: Vec<Tensor> = (0..8).map(|_| a.matmul(&a)).collect::<Result<_, _>>()?;
        let start = timed_event(dev)?;
        for i in 0..calls {
            call(r * calls + i)?;
        }
        let end = timed_event(dev)?;
        device = device.min(start.elapsed_ms(&end)? as f64 * 1e3 / calls as f64);
    }
    dev.synchronize()?;
    Ok((device, wall, host))
}

fn emit(kind: &str, n: usize, batch: usize, fields: &[(&str, f64)]) {
    let mut line = format!("JSON {{\"kind\":\"{kind}\",\"n\":{n},\"batch\":{batch}");
    for (k, v) in fields {
        line.push_str(&format!(",\"{k}\":{v:.3}"));
    }
    line.push('}');
    println!("{line}");
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let list = |i: usize, default: &[usize]| -> Vec<usize> {
        args.get(i).map_or(default.to_vec(), |s| {
            s.split(',').filter_map(|x| x.trim().parse().ok()).collect()
        })
    };
    let lens = list(0, &[32768, 131072, 171000, 262144, 524288]);
    let batches = list(1, &[1, 8]);
    let hidden: usize = std::env::var("SAAP_REPORT_HIDDEN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let dev = Device::new_cuda(0)?;
    let config = config(hidden)?;
    let mut rng = StdRng::seed_from_u64(0);
    let index = random_index(&config, &mut rng)?;
    let weights = index.layer(0)?.classifier.prepared(DType::BF16, &dev)?;
    let weight_bytes = weights.weight_bytes();
    let centroid_bytes = HKV * C * D * 4 + HKV * C * 4;
    println!("# bench_report: Hq={HQ} Hkv={HKV} D={D} bf16; C={C} l={N_PROBE} window=2048 sinks=16 hidden={hidden}; classifier {weight_bytes} B (bf16), centroids {centroid_bytes} B (f32)");

    let only = std::env::var("SAAP_REPORT_ONLY").ok();
    let section = |name: &str| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|s| s == name))
    };

    // Routing alone (batch-dependent, length-independent).
    for &b in batches.iter().filter(|_| section("route")) {
        let q = randn_bf16(&[b, HQ, D], &dev)?;
        let (us, wall, host) = time(&dev, |_| {
            weights.probes(&q, N_PROBE)?;
            Ok(())
        })?;
        let bytes = weight_bytes as f64 + (b * HQ * N_PROBE * 4) as f64;
        emit(
            "route",
            0,
            b,
            &[
                ("us", us),
                ("wall_us", wall),
                ("host_us", host),
                ("bytes", bytes),
            ],
        );
        let f32w = index.layer(0)?.classifier.prepared(DType::F32, &dev)?;
        let (us, wall, host) = time(&dev, |_| {
            let scores = f32w.scores(&q)?;
            saap::classify::top_probes(&scores, N_PROBE)?;
            Ok(())
        })?;
        let bytes = f32w.weight_bytes() as f64;
        emit(
            "route_candle",
            0,
            b,
            &[
                ("us", us),
                ("wall_us", wall),
                ("host_us", host),
                ("bytes", bytes),
            ],
        );
    }

    for &n in &lens {
        for &b in &batches {
            if section("kernels") {
                kernels(&dev, &mut rng, n, b)?;
            }
            if section("quest") {
                quest(&dev, n, b)?;
            }
            if section("steps") {
                steps(&dev, &index, weight_bytes, centroid_bytes, n, b)?;
            }
        }
        if section("index") {
            index_build(&dev, &index, n)?;
        }
    }
    Ok(())
}

/// Quest's routing alone at 6% of n / 16 pages, for this layer's heads and Qwen2.5-0.5B's; bytes
/// count the page bounds read. Shapes past the kernels' pages are skipped.
fn quest(dev: &Device, n: usize, b: usize) -> Res<()> {
    let p = n / saap::config::QUEST_PAGE;
    if p > saap::config::MAX_QUEST_PAGES {
        return Ok(());
    }
    let k = (p * 6).div_ceil(100);
    for (hq, hkv, d) in [(HQ, HKV, D), (14, 2, 64)] {
        let q = randn_bf16(&[b, hq, d], dev)?;
        let max = Tensor::randn(0f32, 1.0, (b, hkv, p, d), dev)?;
        let min = (&max - Tensor::randn(0f32, 1.0, (b, hkv, p, d), dev)?.abs()?)?;
        let filled = Tensor::ones((b, hkv, p), DType::U8, dev)?;
        if !saap::quest::route_on_kernels(&q, &min, &max, &filled, k) {
            return Err(format!("quest: {p} pages not on the CUDA kernels").into());
        }
        let (us, wall, host) = time(dev, |_| {
            saap::quest::route(&q, &min, &max, &filled, k)?;
            Ok(())
        })?;
        emit(
            "quest",
            n,
            b,
            &[
                ("us", us),
                ("wall_us", wall),
                ("host_us", host),
                ("bytes", (2 * b * hkv * p * d * 4) as f64),
                ("hkv", hkv as f64),
                ("pages", p as f64),
                ("k", k as f64),
            ],
        );
    }
    Ok(())
}

/// The attention kernel alone, sparse and dense.
fn kernels(dev: &Device, rng: &mut StdRng, n: usize, b: usize) -> Res<()> {
    let seq = SeqExtent {
        len: n,
        indexed_end: n - 2048,
    };
    let row = C + 1 + n;
    let (mut dir, mut probes, mut selected, mut probed) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..b * HKV {
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..C as u32)).collect();
        let (ids, offsets) = naive_partition(&labels, 16, seq.indexed_end, C);
        let pool = sample(rng, C, POOL).into_vec();
        let mut union = vec![false; C];
        for _ in 0..G {
            for i in sample(rng, POOL, N_PROBE).into_iter() {
                probes.push(pool[i] as u32);
                union[pool[i]] = true;
            }
        }
        selected += 16 + 2048;
        for (c, _) in union.iter().enumerate().filter(|(_, &u)| u) {
            selected += (offsets[c + 1] - offsets[c]) as usize;
            probed += 1;
        }
        dir.extend_from_slice(&offsets);
        dir.extend_from_slice(&ids);
        dir.extend(std::iter::repeat_n(0, n - ids.len()));
    }
    let dir = Tensor::from_vec(dir, (b, HKV, row), dev)?;
    let probes = Tensor::from_vec(probes, (b, HQ, N_PROBE), dev)?;
    let kv_row = 2 * D * 2;
    let index_bytes = probed * 8 + b * HQ * N_PROBE * 4 + (selected - b * HKV * 2064) * 4;
    let sparse_bytes = selected * kv_row + index_bytes;
    let dense_bytes = b * HKV * n * kv_row;
    let kv_bytes = 2 * b * HKV * n * D * 2;
    let nbuf = ROTATE_BYTES
        .div_ceil(sparse_bytes)
        .clamp(1, 8)
        .min((24usize << 30) / kv_bytes)
        .max(1);
    let caches: Vec<(Tensor, Tensor)> = (0..nbuf)
        .map(|_| {
            Ok((
                randn_bf16(&[b, HKV, n, D], dev)?,
                randn_bf16(&[b, HKV, n, D], dev)?,
            ))
        })
        .collect::<Res<_>>()?;
    let q = randn_bf16(&[b, HQ, D], dev)?;
    for (kind, sparse, bytes, keys) in [
        ("saap_kernel", true, sparse_bytes, selected),
        ("dense_kernel", false, dense_bytes, b * HKV * n),
    ] {
        let ops: Vec<DecodeOp> = caches
            .iter()
            .map(|(k, v)| DecodeOp {
                k_cache: k.clone(),
                v_cache: v.clone(),
                partitions: sparse.then(|| Partitions::Directory(dir.clone())),
                probes: sparse.then(|| probes.clone()),
                seqs: vec![seq; b],
                sinks: 16,
                n_partitions: C,
                scale: 1.0 / (D as f32).sqrt(),
                advance: None,
                means: None,
            })
            .collect();
        let (us, wall, host) = time(dev, |i| {
            q.apply_op1_no_bwd(&ops[i % ops.len()])?;
            Ok(())
        })?;
        emit(
            kind,
            n,
            b,
            &[
                ("us", us),
                ("wall_us", wall),
                ("host_us", host),
                ("bytes", bytes as f64),
                ("keys_read", keys as f64),
                ("keys_in_context", (b * HKV * n) as f64),
                ("buffers", nbuf as f64),
            ],
        );
    }
    Ok(())
}

/// Whole decode steps through `SaapAttention`, Saap and dense routing.
fn steps(
    dev: &Device,
    index: &SaapIndex,
    weight_bytes: usize,
    centroid_bytes: usize,
    n: usize,
    b: usize,
) -> Res<()> {
    let kv_row = 2 * D * 2;
    // Rough selection (≈ 4.6 % + window) to choose how many layers to rotate through.
    let guess = b * HKV * (2064 + n / 20) * kv_row;
    let kv_bytes = 2 * b * HKV * n * D * 2;
    let layers = ROTATE_BYTES
        .div_ceil(guess)
        .clamp(1, 6)
        .min((30usize << 30) / kv_bytes)
        .max(1);
    // Generated once (and freed once copied): every layer's cache holds the same tokens, each in
    // its own memory.
    let mut ops: Vec<SaapAttention> = {
        let chunks = prompt_chunks(n, b, dev)?;
        (0..layers)
            .map(|_| filled(index, &chunks, dev))
            .collect::<Res<_>>()?
    };
    // The same query in every run and binary: it decides the keys read.
    let q = seeded_bf16(&[b, HQ, 1, D], 100, dev)?;
    let kv = seeded_bf16(&[b, HKV, 1, D], 101, dev)?;
    let new_token = b * (HQ + 2 * HKV) * D * 2 * 2;
    for (kind, routing, estimate) in [
        ("saap_step", Routing::Classifier, false),
        ("saap_estimate_step", Routing::Classifier, true),
        ("dense_step", Routing::Dense, false),
    ] {
        for op in ops.iter_mut() {
            op.set_routing(routing)?;
            op.set_estimate_unread(estimate);
            op.set_track_reads(true);
        }
        ops[0].decode(&q, &kv, &kv)?;
        let read = ops[0].last_read().ok_or("read stats")?;
        let indexed_read = read.keys_read - read.window_and_sinks;
        // A partition's means are one K and one V row.
        let rows = read.keys_read + read.partitions_estimated;
        let mut bytes = rows * kv_row + centroid_bytes + new_token;
        if routing == Routing::Classifier {
            bytes += indexed_read * 4 + read.partitions_probed * 8 + weight_bytes;
            bytes += b * HQ * N_PROBE * 4;
        }
        for op in ops.iter_mut() {
            op.set_track_reads(false);
        }
        let (us, wall, host) = time(dev, |i| {
            let l = i % ops.len();
            ops[l].decode(&q, &kv, &kv)?;
            Ok(())
        })?;
        let mut fields = vec![
            ("us", us),
            ("wall_us", wall),
            ("host_us", host),
            ("bytes", bytes as f64),
            ("keys_read", read.keys_read as f64),
            ("keys_in_context", read.keys_in_context as f64),
            ("partitions_probed", read.partitions_probed as f64),
            ("partitions_estimated", read.partitions_estimated as f64),
            ("layers", layers as f64),
        ];
        if routing == Routing::Classifier && !estimate && b == 1 {
            // What the defaults cost: read stats and finite checks on.
            for op in ops.iter_mut() {
                op.set_track_reads(true);
                op.set_check_finite(true);
            }
            let (_, wall_defaults, _) = time(dev, |i| {
                let l = i % ops.len();
                ops[l].decode(&q, &kv, &kv)?;
                Ok(())
            })?;
            for op in ops.iter_mut() {
                op.set_track_reads(false);
                op.set_check_finite(false);
            }
            fields.push(("wall_us_defaults", wall_defaults));
        }
        let (us, wall, host) = replayed_steps(dev, &mut ops, &q, &kv)?;
        fields.extend([
            ("graph_us", us),
            ("graph_wall_us", wall),
            ("graph_host_us", host),
        ]);
        emit(kind, n, b, &fields);
    }
    Ok(())
}

/// Each op's decode step recorded as a CUDA graph and replayed: `time`'s triple per step.
fn replayed_steps(
    dev: &Device,
    ops: &mut [SaapAttention],
    q: &Tensor,
    kv: &Tensor,
) -> Res<(f64, f64, f64)> {
    let Device::Cuda(cuda) = dev else {
        return Err("not a CUDA device".into());
    };
    // One stream: cross-stream event tracking would make the capture wait on outside events.
    unsafe { cuda.disable_event_tracking() };
    // Candle's small host uploads (dims, strides) come from a cache the eager steps fill.
    let _uploads = cuda.enable_cuda_graph_htod_cache();
    let stream = cuda.cuda_stream();
    // `time` makes 178 calls, spread over the ops.
    let calls = 178usize.div_ceil(ops.len());
    let mut graphs = Vec::with_capacity(ops.len());
    for op in ops.iter_mut() {
        // Eager steps until a merge leaves room for the calls (and the cache holds the uploads).
        loop {
            op.decode(q, kv, kv)?;
            if op.begin_replay(SLACK)? >= calls {
                break;
            }
            op.end_replay();
        }
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        // The output is dropped inside the capture: the graph frees what it allocates.
        let recorded = op.decode(q, kv, kv).map(drop);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
        recorded?;
        graphs.push(graph.ok_or("nothing was recorded")?);
    }
    let timed = time(dev, |i| {
        let l = i % ops.len();
        graphs[l].launch()?;
        ops[l].replayed()?;
        Ok(())
    });
    dev.synchronize()?;
    ops.iter_mut().for_each(SaapAttention::end_replay);
    timed
}

/// Index build of one layer at batch 1: `extend` of n tokens (allocation, RoPE, append,
/// assignment, merge), and `assign` and the partition-scan `merge` alone.
fn index_build(dev: &Device, index: &SaapIndex, n: usize) -> Res<()> {
    let k = randn_bf16(&[1, HKV, n, D], dev)?;
    let centroids = index.layer(0)?.centroids.to_device(dev)?;
    let mut best_extend = f64::MAX;
    let mut best_assign = f64::MAX;
    let mut best_merge = f64::MAX;
    let mut best_assign_mma = f64::MAX;
    let labels = assign(&k.get(0)?, &centroids)?.unsqueeze(0)?;
    let (centroids_t, half_norms) = prepare_centroids(&centroids)?;
    let rounded = centroids.to_dtype(DType::BF16)?;
    for _ in 0..3 {
        let dir = Tensor::zeros((1, HKV, dir_len(C, n)), DType::U32, dev)?;
        let merge_op = MergeOp {
            ranges: vec![(16, n - 2048)],
            n_partitions: C,
            n_kv_heads: HKV,
        };
        dev.synchronize()?;
        let t0 = Instant::now();
        merge(&dir, &labels, &merge_op)?;
        dev.synchronize()?;
        best_merge = best_merge.min(t0.elapsed().as_secs_f64() * 1e6);
        let mut op = SaapAttention::from_index(index, 0, dev, DType::BF16)?;
        op.set_check_finite(false);
        dev.synchronize()?;
        let t0 = Instant::now();
        op.extend(&k, &k, &[n])?;
        dev.synchronize()?;
        best_extend = best_extend.min(t0.elapsed().as_secs_f64() * 1e6);
        let t0 = Instant::now();
        assign(&k.get(0)?, &centroids)?;
        dev.synchronize()?;
        best_assign = best_assign.min(t0.elapsed().as_secs_f64() * 1e6);
        let t0 = Instant::now();
        assign_into(
            &labels,
            &k,
            &centroids_t,
            &half_norms,
            Some(&rounded),
            &[0],
            &[n],
        )?;
        dev.synchronize()?;
        best_assign_mma = best_assign_mma.min(t0.elapsed().as_secs_f64() * 1e6);
    }
    emit(
        "index_build",
        n,
        1,
        &[
            ("extend_us", best_extend),
            ("assign_us", best_assign),
            ("assign_mma_us", best_assign_mma),
            ("merge_us", best_merge),
        ],
    );
    Ok(())
}
