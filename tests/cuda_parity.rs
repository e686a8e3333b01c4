//! The CUDA backend against the CPU reference on random inputs, a fresh seed per run (printed;
//! `SAAP_SEED=<seed>` replays one): merges give identical directories, decode agrees within
//! rounding for sparse and dense, every dtype, head dims 64 and 128, GQA groups 1 to 8, ragged
//! batches (more than one launch's worth too), and `SaapAttention` end to end routes identically;
//! the tensor-core prefill agrees with the CPU's tiled prefill, and the tensor-core assignment of
//! a prompt finds centroids as near as the CPU's (inertia).
//! Skips, with a line saying so, when no CUDA device is present.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rand::rngs::StdRng;
use rand::Rng;
use saap::attend::{DecodeOp, Partitions, SeqExtent};
use saap::partition::scan::{dir_len, merge, naive_partition, MergeOp};
use saap::{RopeKind, SaapAttention};

fn seed(test: &str) -> u64 {
    let seed = std::env::var("SAAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("{test}: seed {seed} (replay with SAAP_SEED={seed})");
    seed
}

fn random_labels(r: &mut StdRng, n: usize, c: usize) -> Vec<u32> {
    (0..n).map(|_| r.random_range(0..c as u32)).collect()
}

/// Merges rounds of ragged ranges on both backends and compares the directories after each.
fn merge_case(
    dev: &Device,
    r: &mut StdRng,
    (b, h, c, cap): (usize, usize, usize, usize),
    steps: &[usize],
) {
    let labels =
        Tensor::from_vec(random_labels(r, b * h * cap, c), (b, h, cap), &Device::Cpu).unwrap();
    let labels_gpu = labels.to_device(dev).unwrap();
    let dir = Tensor::zeros((b, h, dir_len(c, cap)), DType::U32, &Device::Cpu).unwrap();
    let dir_gpu = dir.to_device(dev).unwrap();
    let first: Vec<usize> = (0..b).map(|_| r.random_range(0..5)).collect();
    let mut ends = first.clone();
    for (round, &most) in steps.iter().enumerate() {
        let ranges: Vec<(usize, usize)> = ends
            .iter()
            .map(|&e| {
                let n = if r.random_bool(0.2) {
                    0
                } else {
                    r.random_range(0..=most)
                };
                (e, (e + n).min(cap))
            })
            .collect();
        let op = MergeOp {
            ranges: ranges.clone(),
            n_partitions: c,
            n_kv_heads: h,
        };
        merge(&dir, &labels, &op).unwrap();
        merge(&dir_gpu, &labels_gpu, &op).unwrap();
        let (cpu, gpu) = (
            dir.to_vec3::<u32>().unwrap(),
            dir_gpu.to_vec3::<u32>().unwrap(),
        );
        assert!(
            cpu == gpu,
            "merge round {round} differs: B={b} H={h} C={c} ranges {ranges:?}"
        );
        for (e, (_, end)) in ends.iter_mut().zip(&ranges) {
            *e = *end;
        }
    }
    // Both also equal the plain definition: a stable sort by partition of everything merged.
    let labels = labels.to_vec3::<u32>().unwrap();
    let dir = dir.to_vec3::<u32>().unwrap();
    for i in 0..b {
        for j in 0..h {
            let (ids, offsets) = naive_partition(&labels[i][j], first[i], ends[i], c);
            assert_eq!(&dir[i][j][..=c], &offsets[..]);
            assert_eq!(&dir[i][j][c + 1..c + 1 + ids.len()], &ids[..]);
        }
    }
}

#[test]
fn merge_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("merge_matches_cpu"));
    // Small ragged merges, one larger than a move pass (4096 entries), C = 1 and a large C.
    merge_case(&dev, &mut r, (3, 2, 37, 3000), &[400, 50, 0, 300, 17, 1000]);
    merge_case(
        &dev,
        &mut r,
        (2, 3, 1024, 20_000),
        &[9000, 64, 64, 3000, 1, 64],
    );
    merge_case(&dev, &mut r, (2, 1, 1, 500), &[100, 100, 100]);
    // More batch items than one launch takes.
    merge_case(&dev, &mut r, (67, 2, 16, 300), &[100, 30, 50]);
}

struct DecodeCase {
    dtype: DType,
    dim: usize,
    hq: usize,
    hkv: usize,
    lens: Vec<usize>,
    cap: usize,
    c: usize,
    n_probe: usize,
    sinks: usize,
    window: usize,
    tol: f32,
}

/// Quest's page size in the page cases.
const PAGE: usize = 16;

/// One decode call, sparse (random probes over a directory or pages) and dense, on both
/// backends.
fn decode_case(dev: &Device, r: &mut StdRng, t: &DecodeCase) {
    let (b, d, c, cap) = (t.lens.len(), t.dim, t.c, t.cap);
    let q = randn(r, &[b, t.hq, d], 1.0).to_dtype(t.dtype).unwrap();
    let k = randn(r, &[b, t.hkv, cap, d], 1.0)
        .to_dtype(t.dtype)
        .unwrap();
    let v = randn(r, &[b, t.hkv, cap, d], 1.0)
        .to_dtype(t.dtype)
        .unwrap();
    let seqs: Vec<SeqExtent> = t
        .lens
        .iter()
        .map(|&len| SeqExtent {
            len,
            indexed_end: t.sinks.min(len).max(len.saturating_sub(t.window)),
        })
        .collect();
    let labels = random_labels(r, cap, c);
    let mut dir = Vec::with_capacity(b * t.hkv * dir_len(c, cap));
    for seq in &seqs {
        for _ in 0..t.hkv {
            let (ids, offsets) = naive_partition(&labels, t.sinks.min(seq.len), seq.indexed_end, c);
            dir.extend_from_slice(&offsets);
            dir.extend_from_slice(&ids);
            dir.extend(std::iter::repeat_n(0, cap - ids.len()));
        }
    }
    let dir = Tensor::from_vec(dir, (b, t.hkv, dir_len(c, cap)), &Device::Cpu).unwrap();
    // One list per query head, and one per KV group (Quest's pages).
    let mut probe_lists = |heads: usize| {
        let probes = random_labels(r, b * heads * t.n_probe, c);
        Tensor::from_vec(probes, (b, heads, t.n_probe), &Device::Cpu).unwrap()
    };
    let (per_head, per_group) = (probe_lists(t.hq), probe_lists(t.hkv));
    // Quest's pages: per group ascending with unused slots last (the kernel's listed path), the
    // same lists reversed (its union path), and lists per query head.
    let pages = seqs
        .iter()
        .map(|s| s.indexed_end.saturating_sub(t.sinks).div_ceil(PAGE))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ascending = Vec::new();
    for _ in 0..b * t.hkv {
        let mut list = random_labels(r, t.n_probe, pages);
        list.sort_unstable();
        list.dedup();
        list.resize(t.n_probe, pages as u32);
        ascending.extend(list);
    }
    let reversed: Vec<u32> = ascending
        .chunks(t.n_probe)
        .flat_map(|l| l.iter().rev().copied())
        .collect();
    let page_lists = |lists: Vec<u32>, heads: usize| {
        Tensor::from_vec(lists, (b, heads, t.n_probe), &Device::Cpu).unwrap()
    };
    let page_probes = [
        page_lists(ascending, t.hkv),
        page_lists(reversed, t.hkv),
        page_lists(random_labels(r, b * t.hq * t.n_probe, pages + 1), t.hq),
    ];
    let cases = [
        (Some(c), &per_head),
        (Some(c), &per_group),
        (None, &per_head),
    ]
    .into_iter()
    .chain(page_probes.iter().map(|p| (Some(0), p)));
    // (partitions: C, or 0 for pages; None dense, probes)
    for (partitions, probes) in cases {
        let sparse = partitions.is_some();
        let op = |on: &Device| DecodeOp {
            k_cache: k.to_device(on).unwrap(),
            v_cache: v.to_device(on).unwrap(),
            partitions: partitions.map(|c| match c {
                0 => Partitions::Pages(PAGE),
                _ => Partitions::Directory(dir.to_device(on).unwrap()),
            }),
            probes: sparse.then(|| probes.to_device(on).unwrap()),
            seqs: seqs.clone(),
            sinks: t.sinks,
            n_partitions: if partitions == Some(0) { pages } else { c },
            scale: 1.0 / (d as f32).sqrt(),
            advance: None,
            means: None,
        };
        let cpu = q.apply_op1_no_bwd(&op(&Device::Cpu)).unwrap();
        let gpu = q
            .to_device(dev)
            .unwrap()
            .apply_op1_no_bwd(&op(dev))
            .unwrap();
        assert_eq!(gpu.dtype(), t.dtype);
        let diff = max_abs_diff(&cpu, &gpu.to_device(&Device::Cpu).unwrap());
        assert!(
            diff <= t.tol,
            "decode {:?} d={d} G={} partitions {partitions:?} probe lists {:?} lens {:?}: max \
             |cpu - gpu| = {diff}",
            t.dtype,
            t.hq / t.hkv,
            probes.dims(),
            t.lens
        );
    }
}

#[test]
fn decode_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("decode_matches_cpu"));
    for (dtype, tol) in [
        (DType::F32, 1e-4),
        (DType::BF16, 1.6e-2),
        (DType::F16, 2e-3),
    ] {
        for dim in [64, 128] {
            for (hq, hkv) in [(3, 3), (8, 2), (14, 2), (16, 2)] {
                let cap = 3000;
                let lens = vec![cap, r.random_range(1000..cap), r.random_range(20..700)];
                let case = DecodeCase {
                    dtype,
                    dim,
                    hq,
                    hkv,
                    lens,
                    cap,
                    c: 64,
                    n_probe: r.random_range(1..12),
                    sinks: 16,
                    window: 512,
                    tol,
                };
                decode_case(&dev, &mut r, &case);
            }
        }
    }
}

/// More items than one launch takes (64), whole rows per block and key lists longer than the
/// kernel's shared-memory pass (2048 ids); tiny sequences shorter than sinks + window.
#[test]
fn decode_large_batch_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("decode_large_batch_matches_cpu"));
    let cap = 2400;
    let lens = (0..66)
        .map(|i| match i % 4 {
            0 => cap,
            1 => r.random_range(2049..cap),
            2 => r.random_range(1..40),
            _ => r.random_range(1..cap),
        })
        .collect();
    let case = DecodeCase {
        dtype: DType::BF16,
        dim: 64,
        hq: 8,
        hkv: 8,
        lens,
        cap,
        c: 16,
        n_probe: 16,
        sinks: 4,
        window: 32,
        tol: 1.6e-2,
    };
    decode_case(&dev, &mut r, &case);
}

/// How a decode step chooses ℓ in [`end_to_end`].
#[derive(Clone, Copy, Debug)]
enum Probing {
    Fixed,
    /// `set_keys_budget`: ℓ follows the context's length.
    Budget(f64),
    /// `set_probe_mass`: top-p over the classifier's scores.
    Mass(f64),
    /// ℓ fixed, the unread partitions estimated from their means (`set_estimate_unread`).
    Estimate,
    /// ℓ fixed, the window shrunk to this after the prefill (`set_window`: its tokens merged).
    Window(usize),
}

/// Prefill, then 300 decode steps with window merges, on both backends: identical index, reads
/// and outputs within rounding at every step — in bf16 at all but a few steps, where the two
/// backends' scores of two partitions round to a near-tie at the ℓ-th place and a head probes
/// the other one (seen once in bf16 with the unread partitions estimated: `SAAP_SEED=
/// 1795773191536783085`, the same with the kernels before and after `bench/NOTES.md` §48).
fn end_to_end(dev: &Device, seed: u64, dtype: DType, tol: f32, probing: Probing) {
    let mut config = config(8, 2, 64, 32, RopeKind::Neox);
    config.window = 48;
    config.merge_every = 16;
    let index = random_index(&config, 1, seed);
    let mut cpu = SaapAttention::from_index(&index, 0, &Device::Cpu, dtype).unwrap();
    let mut gpu = SaapAttention::from_index(&index, 0, dev, dtype).unwrap();
    for op in [&mut cpu, &mut gpu] {
        op.set_n_probe(4).unwrap();
        match probing {
            Probing::Fixed => {}
            Probing::Budget(share) => op.set_keys_budget(Some(share)).unwrap(),
            Probing::Mass(mass) => op.set_probe_mass(Some(mass)).unwrap(),
            Probing::Estimate => op.set_estimate_unread(true),
            Probing::Window(_) => {}
        }
    }
    let mut r = rng(seed ^ 0x5eed);
    let (b, t) = (3, 300);
    let lens = [300, 211, 97];
    let mut step = |len: usize| {
        let q = randn(&mut r, &[b, 8, len, 64], 1.0)
            .to_dtype(dtype)
            .unwrap();
        let k = randn(&mut r, &[b, 2, len, 64], 1.0)
            .to_dtype(dtype)
            .unwrap();
        let v = randn(&mut r, &[b, 2, len, 64], 1.0)
            .to_dtype(dtype)
            .unwrap();
        (q, k, v)
    };
    let on = |x: &Tensor| x.to_device(dev).unwrap();
    let (q, k, v) = step(t);
    let out_c = cpu.prefill(&q, &k, &v, &lens).unwrap();
    let out_g = gpu.prefill(&on(&q), &on(&k), &on(&v), &lens).unwrap();
    let diff = max_abs_diff(&out_c, &out_g.to_device(&Device::Cpu).unwrap());
    assert!(diff <= tol, "{dtype:?} prefill differs by {diff}");
    if let Probing::Window(window) = probing {
        for op in [&mut cpu, &mut gpu] {
            op.set_window(window).unwrap();
        }
        assert_eq!(cpu.extents(), gpu.extents());
        assert_eq!(cpu.index_lists().unwrap(), gpu.index_lists().unwrap());
    }
    let mut other_probes = 0;
    for i in 0..300 {
        let (q, k, v) = step(1);
        let out_c = cpu.decode(&q, &k, &v).unwrap();
        let out_g = gpu.decode(&on(&q), &on(&k), &on(&v)).unwrap();
        if cpu.last_read() != gpu.last_read() {
            assert_ne!(
                dtype,
                DType::F32,
                "{probing:?} step {i}: reads differ in f32"
            );
            other_probes += 1;
            continue;
        }
        let diff = max_abs_diff(&out_c, &out_g.to_device(&Device::Cpu).unwrap());
        assert!(
            diff <= tol,
            "{dtype:?} {probing:?} step {i}: outputs differ by {diff}"
        );
    }
    assert!(
        other_probes <= 5,
        "{dtype:?} {probing:?}: {other_probes} of 300 steps read other partitions"
    );
    assert_eq!(cpu.extents(), gpu.extents());
    assert_eq!(cpu.index_lists().unwrap(), gpu.index_lists().unwrap());
    if matches!(probing, Probing::Estimate) {
        assert!(gpu.last_read().unwrap().partitions_estimated > 0);
    }
}

#[test]
fn attention_end_to_end_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let s = seed("attention_end_to_end_matches_cpu");
    end_to_end(&dev, s, DType::F32, 1e-4, Probing::Fixed);
    end_to_end(&dev, s, DType::BF16, 3e-2, Probing::Fixed);
}

/// The keys budget (ℓ chosen per step from the index's counts) and top-p probing (probes chosen
/// from the classifier's scores with candle ops) read the same keys on both backends.
#[test]
fn budget_and_probe_mass_match_cpu() {
    let Some(dev) = cuda() else { return };
    let s = seed("budget_and_probe_mass_match_cpu");
    end_to_end(&dev, s, DType::F32, 1e-4, Probing::Budget(0.5));
    end_to_end(&dev, s, DType::F32, 1e-4, Probing::Mass(0.3));
}

/// A window shrunk after the prefill merges the same tokens into the same partitions on both
/// backends, which then read the same keys.
#[test]
fn window_shrink_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let s = seed("window_shrink_matches_cpu");
    end_to_end(&dev, s, DType::F32, 1e-4, Probing::Window(20));
    end_to_end(&dev, s, DType::BF16, 3e-2, Probing::Window(5));
}

/// The unread partitions' means (sums kept at every merge, decode's pseudo-keys) agree across
/// backends: same reads and partitions estimated, outputs within rounding.
#[test]
fn estimate_unread_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let s = seed("estimate_unread_matches_cpu");
    end_to_end(&dev, s, DType::F32, 1e-4, Probing::Estimate);
    end_to_end(&dev, s, DType::BF16, 3e-2, Probing::Estimate);
}

/// Quest routing on both backends from the same cache (keys appended with `extend`): identical
/// page bounds (means within rounding), the same keys read and pages probed at every step,
/// outputs within rounding. Pages over partitions run on ops of a random index, whose lists
/// must agree too.
fn quest_case(
    dev: &Device,
    seed: u64,
    (dtype, score, layout): (DType, saap::PageScore, saap::PageLayout),
    tol: f32,
    lens: &[usize],
    steps: usize,
) {
    let mut config = config(8, 2, 64, 32, RopeKind::Neox);
    config.window = 48;
    config.merge_every = 16;
    let index = random_index(&config, 1, seed);
    let op = |dev: &Device| match layout {
        saap::PageLayout::Consecutive => SaapAttention::dense(&config, dev, dtype).unwrap(),
        saap::PageLayout::Partitions { .. } => {
            SaapAttention::from_index(&index, 0, dev, dtype).unwrap()
        }
    };
    let (mut cpu, mut gpu) = (op(&Device::Cpu), op(dev));
    let mut r = rng(seed ^ 0x9e57);
    let b = lens.len();
    let mut rows = |heads: usize, t: usize| {
        randn(&mut r, &[b, heads, t, 64], 1.0)
            .to_dtype(dtype)
            .unwrap()
    };
    let on = |x: &Tensor| x.to_device(dev).unwrap();
    let t = lens.iter().copied().max().unwrap();
    let (k, v) = (rows(2, t), rows(2, t));
    cpu.extend(&k, &v, lens).unwrap();
    gpu.extend(&on(&k), &on(&v), lens).unwrap();
    for op in [&mut cpu, &mut gpu] {
        op.set_page_layout(layout).unwrap();
        op.set_routing(saap::Routing::Quest).unwrap();
        op.set_quest_pages(3).unwrap();
        op.set_page_score(score).unwrap();
    }
    assert_eq!(cpu.index_lists().unwrap(), gpu.index_lists().unwrap());
    // The caches' RoPE rows may differ by a rounding step in bf16 (`rope_writer_matches_cpu`),
    // and the bounds with them; f32 min and max are identical, f32 means equal up to the order
    // of summation.
    let exact = dtype == DType::F32 && score == saap::PageScore::Bound;
    let bound_tol = match (exact, dtype) {
        (true, _) => 0.0,
        (false, DType::F32) => 1e-5,
        _ => 2.0 * tol,
    };
    let same_bounds = |cpu: &SaapAttention, gpu: &SaapAttention| {
        let (c, g) = (cpu.page_bounds().unwrap(), gpu.page_bounds().unwrap());
        let to_cpu = |x: &Tensor| x.to_device(&Device::Cpu).unwrap();
        max_abs_diff(c.0, &to_cpu(g.0)).max(max_abs_diff(c.1, &to_cpu(g.1))) <= bound_tol
    };
    assert!(
        same_bounds(&cpu, &gpu),
        "{dtype:?} {score:?} {layout:?}: page bounds differ"
    );
    let mut other_pages = 0;
    for i in 0..steps {
        let (q, k, v) = (rows(8, 1), rows(2, 1), rows(2, 1));
        let out_c = cpu.decode(&q, &k, &v).unwrap();
        let out_g = gpu.decode(&on(&q), &on(&k), &on(&v)).unwrap();
        // Same keys read and pages probed: the same pages chosen, barring near-ties (where the
        // bounds may differ by a rounding step, a few steps may pick another page).
        if cpu.last_read() != gpu.last_read() {
            assert!(!exact, "step {i}: reads differ");
            other_pages += 1;
            continue;
        }
        let diff = max_abs_diff(&out_c, &out_g.to_device(&Device::Cpu).unwrap());
        assert!(diff <= tol, "{dtype:?} step {i}: outputs differ by {diff}");
    }
    assert!(
        other_pages * 20 <= steps.max(20),
        "{dtype:?}: {other_pages} of {steps} steps read other pages"
    );
    assert_eq!(cpu.extents(), gpu.extents());
    assert_eq!(cpu.index_lists().unwrap(), gpu.index_lists().unwrap());
    assert!(
        same_bounds(&cpu, &gpu),
        "{dtype:?} {score:?} {layout:?}: page bounds differ after merges"
    );
}

#[test]
fn quest_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let s = seed("quest_matches_cpu");
    for score in [
        saap::PageScore::Bound,
        saap::PageScore::Mean,
        saap::PageScore::Shares,
    ] {
        for layout in [
            saap::PageLayout::Consecutive,
            saap::PageLayout::PARTITIONS,
            saap::PageLayout::Partitions { page: 4 },
        ] {
            let lens = [300, 211, 97];
            quest_case(&dev, s, (DType::F32, score, layout), 1e-4, &lens, 100);
            quest_case(&dev, s, (DType::BF16, score, layout), 3e-2, &lens, 100);
        }
    }
    // MAX_QUEST_PAGES pages (no merge within 8 steps): the routing's top-k over every page and
    // the decode kernel's shared memory at their largest.
    let pages = saap::config::MAX_QUEST_PAGES * saap::config::QUEST_PAGE;
    let bf16 = (
        DType::BF16,
        saap::PageScore::Bound,
        saap::PageLayout::Consecutive,
    );
    quest_case(&dev, s, bf16, 3e-2, &[pages + 4 + 48], 8);
}

/// `[B][Hq][k]` probes and `[B][Hkv][P]` group scores on the host.
type QuestRouted = (Vec<Vec<Vec<u32>>>, Vec<Vec<Vec<f32>>>);

/// `q` with every dimension of query head `head` of item `item` set to NaN.
fn poisoned(q: &Tensor, item: usize, head: usize) -> Tensor {
    let (_, hq, d) = q.dims3().unwrap();
    let mut values = q
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let at = (item * hq + head) * d;
    values[at..at + d].fill(f32::NAN);
    Tensor::from_vec(values, q.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap()
}

/// `saap::quest::route` on the CPU and the GPU from the same inputs: group scores within rounding
/// (NaN where the CPU has NaN), one list per KV group (`[B, Hkv, k]`), in page order (slots of P
/// last) and free of repeats, and the CPU's pages but for near-ties of the CPU's ranked scores at
/// the cut (none tolerated with `exact` inputs). Returns the GPU's probes and scores.
fn quest_route_case(
    dev: &Device,
    (q, min, max, filled): (&Tensor, &Tensor, &Tensor, &Tensor),
    k: usize,
    exact: bool,
) -> QuestRouted {
    let (b, hq, _) = q.dims3().unwrap();
    let (_, hkv, p, _) = min.dims4().unwrap();
    let what = format!("{:?} B={b} Hq={hq} Hkv={hkv} P={p} k={k}", q.dtype());
    let cpu = saap::quest::route(q, min, max, filled, k).unwrap();
    let on = |x: &Tensor| x.to_device(dev).unwrap();
    let gpu_in = (on(q), on(min), on(max), on(filled));
    assert!(
        saap::quest::route_on_kernels(&gpu_in.0, &gpu_in.1, &gpu_in.2, &gpu_in.3, k),
        "{what}: not on the CUDA kernels"
    );
    let gpu = saap::quest::route(&gpu_in.0, &gpu_in.1, &gpu_in.2, &gpu_in.3, k).unwrap();
    same_routes(&what, cpu, gpu, filled, k, exact)
}

/// The CPU's and the GPU's (probes, group scores) of one Quest route, as [`quest_route_case`]
/// compares them.
fn same_routes(
    what: &str,
    (cpu_probes, cpu_scores): (Tensor, Tensor),
    (gpu_probes, gpu_scores): (Tensor, Tensor),
    filled: &Tensor,
    k: usize,
    exact: bool,
) -> QuestRouted {
    let (b, hkv, p) = filled.dims3().unwrap();
    assert!(gpu_probes.device().is_cuda() && gpu_scores.device().is_cuda());
    assert_eq!(cpu_probes.dims(), [b, hkv, k.min(p)], "{what}");
    assert_eq!(gpu_probes.dims(), [b, hkv, k.min(p)], "{what}");
    assert_eq!(gpu_scores.dims(), [b, hkv, p], "{what}");
    let cpu_scores = cpu_scores.to_vec3::<f32>().unwrap();
    let gpu_s = gpu_scores.to_vec3::<f32>().unwrap();
    let filled = filled.to_vec3::<u8>().unwrap();
    for i in 0..b {
        for h in 0..hkv {
            for page in 0..p {
                let (c, gs) = (cpu_scores[i][h][page], gpu_s[i][h][page]);
                assert!(
                    (c.is_nan() && gs.is_nan()) || (c - gs).abs() <= 1e-4 * c.abs().max(1.0),
                    "{what}: item {i} kv head {h} page {page}: score cpu {c}, gpu {gs}"
                );
            }
        }
    }
    // The CPU's ranking key of a probe: P (no key) and NaN as -inf.
    let ranked = |i: usize, h: usize, page: u32| -> f32 {
        let page = page as usize;
        match page < p && filled[i][h][page] != 0 {
            true if !cpu_scores[i][h][page].is_nan() => cpu_scores[i][h][page],
            _ => f32::NEG_INFINITY,
        }
    };
    let cpu_p = cpu_probes.to_vec3::<u32>().unwrap();
    let gpu_p = gpu_probes.to_vec3::<u32>().unwrap();
    let near = |a: f32, b: f32| a == b || (a - b).abs() <= 1e-4 * a.abs().max(1.0);
    for i in 0..b {
        for h in 0..hkv {
            let (pc, pg) = (&cpu_p[i][h], &gpu_p[i][h]);
            for list in [pc, pg] {
                assert!(
                    list.windows(2).all(|w| w[0] < w[1] || w[1] == p as u32),
                    "{what}: item {i} group {h}: not in page order, or repeated: {list:?}"
                );
            }
            if exact {
                assert_eq!(pc, pg, "{what}: item {i} group {h}");
                continue;
            }
            // A page on one side only must rank at the other side's cut, within rounding.
            let cut = |list: &[u32]| {
                let ranks = list.iter().map(|&x| ranked(i, h, x));
                ranks.fold(f32::INFINITY, f32::min)
            };
            let (cut_c, cut_g) = (cut(pc), cut(pg));
            for &x in pg.iter().filter(|x| !pc.contains(x)) {
                let s = ranked(i, h, x);
                assert!(
                    near(cut_c, s),
                    "{what}: item {i} group {h}: gpu page {x} ({s}) below the cpu's cut {cut_c}"
                );
            }
            for &x in pc.iter().filter(|x| !pg.contains(x)) {
                let s = ranked(i, h, x);
                assert!(
                    near(cut_g, s),
                    "{what}: item {i} group {h}: cpu page {x} ({s}) left out, gpu's cut {cut_g}"
                );
            }
        }
    }
    (gpu_p, gpu_s)
}

/// Quest routing's CUDA kernels (group page scores, top-k with filled masks) against the CPU's
/// candle ops: every query dtype, G of 1, 2, 4 and 7, head dims 64 and 128, k from 1 to P =
/// MAX_QUEST_PAGES (rows of one to 16 chunks of 1024 pages, shared memory past the default
/// 48 KiB), ragged batches with items of fewer pages than k (slots of P) and of none, and a NaN
/// query head (its group's pages all rank as -inf: the first k pages).
#[test]
fn quest_route_matches_cpu() {
    use saap::config::MAX_QUEST_PAGES as MAX;
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("quest_route_matches_cpu"));
    let cases: [(DType, QuestShape, &[usize]); 6] = [
        (DType::F32, (3, 8, 2, 64, 700, 64), &[700, 40, 0]),
        (DType::BF16, (1, 32, 8, 128, MAX, 64), &[MAX]),
        (DType::BF16, (2, 28, 4, 128, MAX, MAX), &[MAX, 5000]),
        (DType::F16, (2, 4, 4, 64, 1000, 300), &[1000, 999]),
        (DType::F32, (2, 4, 2, 64, 33, 1), &[33, 1]),
        (DType::BF16, (2, 16, 8, 128, 300, 500), &[300, 300]),
    ];
    for (dtype, shape, pages) in cases {
        let k = shape.5;
        let (q, min, max, filled) = quest_inputs(&mut r, dtype, shape, pages, false);
        let (probes, _) = quest_route_case(&dev, (&q, &min, &max, &filled), k, false);
        // Items with fewer pages than k fill the rest of their slots with P.
        let (p, k) = (shape.4, k.min(shape.4));
        for (i, &n) in pages.iter().enumerate() {
            let empty = probes[i][0].iter().filter(|&&x| x == p as u32).count();
            assert_eq!(
                empty,
                k.saturating_sub(n),
                "{dtype:?} P={p} item {i}: slots of P"
            );
        }
    }
    // A NaN in the first query head of a group makes the group's scores NaN on both backends,
    // and its first k pages are chosen.
    let shape = (3, 8, 2, 64, 700, 64);
    let (q, min, max, filled) = quest_inputs(&mut r, DType::F32, shape, &[700, 40, 0], false);
    let q = poisoned(&q, 0, 4);
    let (probes, scores) = quest_route_case(&dev, (&q, &min, &max, &filled), 64, false);
    assert!(scores[0][1].iter().all(|s| s.is_nan()));
    assert!(scores[0][0].iter().all(|s| s.is_finite()));
    assert_eq!(
        probes[0][1],
        (0..64).collect::<Vec<u32>>(),
        "group of head 4"
    );
}

/// Quest by the group's shares (`route_by_shares`: candle ops score, the CUDA selection kernels
/// pick) against the CPU: G of 1 and 7, ragged items, k up to P, and P = MAX_QUEST_PAGES, past
/// what candle's CUDA sort ranks (`MAX_CANDLE_SORT`), which only the selection kernels reach.
#[test]
fn quest_shares_route_matches_cpu() {
    use saap::config::{MAX_CANDLE_SORT, MAX_QUEST_PAGES as MAX};
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("quest_shares_route_matches_cpu"));
    let cases: [(DType, QuestShape, &[usize]); 3] = [
        (DType::F32, (3, 8, 8, 64, 700, 64), &[700, 40, 0]),
        (DType::BF16, (2, 14, 2, 64, MAX, 1600), &[MAX, 9000]),
        (DType::BF16, (1, 28, 4, 128, 9000, 9000), &[9000]),
    ];
    const { assert!(MAX > MAX_CANDLE_SORT && 9000 > MAX_CANDLE_SORT) };
    for (dtype, shape, pages) in cases {
        let (b, hq, hkv, d, p, k) = shape;
        let (q, means, _, filled) = quest_inputs(&mut r, dtype, shape, pages, false);
        // 1 to 16 keys in a filled page, none in the others.
        let sizes: Vec<f32> = filled
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap()
            .into_iter()
            .map(|f| {
                if f == 0 {
                    0.0
                } else {
                    r.random_range(1..=16) as f32
                }
            })
            .collect();
        let sizes = Tensor::from_vec(sizes, (b, hkv, p), &Device::Cpu).unwrap();
        let what = format!("shares {dtype:?} B={b} Hq={hq} Hkv={hkv} D={d} P={p} k={k}");
        let cpu = saap::quest::route_by_shares(&q, &means, &sizes, &filled, k).unwrap();
        let on = |x: &Tensor| x.to_device(&dev).unwrap();
        let gpu = saap::quest::route_by_shares(&on(&q), &on(&means), &on(&sizes), &on(&filled), k)
            .unwrap();
        let (probes, _) = same_routes(&what, cpu, gpu, &filled, k, false);
        for (i, &n) in pages.iter().enumerate() {
            let empty = probes[i][0].iter().filter(|&&x| x == p as u32).count();
            assert_eq!(empty, k.saturating_sub(n), "{what} item {i}: slots of P");
        }
    }
}

/// Exact score ties (small integer queries and bounds) are broken by page index exactly as the
/// CPU's stable sort breaks them, empty pages included, for f32 and bf16 queries, also across
/// the GPU's chunks of 1024 pages (the cut's ties and empty pages in several); and a NaN in
/// any query head (on the GPU, not only the group's first) makes its group's scores NaN, so the
/// finite check of a decode step sees it.
#[test]
fn quest_route_ties_match_cpu() {
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("quest_route_ties_match_cpu"));
    for dtype in [DType::F32, DType::BF16] {
        for k in [1, 16, 100, 500] {
            let shape = (2, 8, 2, 64, 500, k);
            let (q, min, max, filled) = quest_inputs(&mut r, dtype, shape, &[500, 77], true);
            quest_route_case(&dev, (&q, &min, &max, &filled), k, true);
        }
    }
    for k in [1, 1100, 2999] {
        let shape = (2, 8, 2, 64, 3000, k);
        let (q, min, max, filled) = quest_inputs(&mut r, DType::F32, shape, &[3000, 1500], true);
        quest_route_case(&dev, (&q, &min, &max, &filled), k, true);
    }
    let shape = (2, 8, 2, 128, 200, 8);
    let (q, min, max, filled) = quest_inputs(&mut r, DType::BF16, shape, &[200, 200], true);
    let on = |x: &Tensor| x.to_device(&dev).unwrap();
    let q = poisoned(&q, 1, 7);
    let (probes, scores) =
        saap::quest::route(&on(&q), &on(&min), &on(&max), &on(&filled), 8).unwrap();
    let scores = scores.to_vec3::<f32>().unwrap();
    assert!(
        scores[1][1].iter().all(|s| s.is_nan()),
        "NaN of head 7 lost"
    );
    assert!(scores[1][0]
        .iter()
        .chain(&scores[0][1])
        .all(|s| s.is_finite()));
    let probes = probes.to_vec3::<u32>().unwrap();
    assert_eq!(
        probes[1][1],
        (0..8).collect::<Vec<u32>>(),
        "group of head 7"
    );
}

/// Overflowing Quest page scores computed by the CUDA kernels are reported by a checked decode
/// step, as on the CPU (`overflowing_quest_scores_are_reported` in tests/reliability.rs).
#[test]
fn quest_overflow_is_reported_on_cuda() {
    let Some(dev) = cuda() else { return };
    quest_overflow_is_reported(&dev);
}

/// Classifier routing: the CUDA kernels (MLP with f32 accumulation, top-ℓ) pick the CPU's
/// partitions, in its order, for f32 and bf16-rounded weights and every query dtype, at Llama
/// shapes (hidden 256: two MLP kernels), Qwen2.5 shapes (hidden 64: the fused kernel) and ragged
/// batches; the only tolerated differences are near-ties at the ℓ-th score.
#[test]
fn route_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let s = seed("route_matches_cpu");
    let mut r = rng(s);
    // ℓ of 32 and ℓ = C (the top-ℓ sort inside one warp) and ℓ = 100 (block-wide sort).
    for (hq, d, h, c, n_probe, b) in [
        (32, 128, 256, 1024, 32, 5),
        (32, 128, 256, 1024, 32, 1),
        (14, 64, 64, 1024, 9, 1),
        (14, 64, 64, 1024, 9, 8),
        (8, 64, 48, 40, 40, 1),
        (4, 64, 32, 200, 100, 3),
    ] {
        let classifier = saap::classify::Classifier {
            w1: randn(&mut r, &[hq, d, h], 0.1),
            b1: randn(&mut r, &[hq, 1, h], 0.1),
            w2: randn(&mut r, &[hq, h, c], 0.1),
            b2: randn(&mut r, &[hq, 1, c], 0.1),
        };
        for (op_dtype, q_dtype) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::F16, DType::F16),
            (DType::BF16, DType::F32),
        ] {
            let cpu_w = classifier.prepared(op_dtype, &Device::Cpu).unwrap();
            let gpu_w = classifier.prepared(op_dtype, &dev).unwrap();
            let q = randn(&mut r, &[b, hq, d], 1.0).to_dtype(q_dtype).unwrap();
            let scores = cpu_w.scores(&q).unwrap().to_vec3::<f32>().unwrap();
            let cpu = cpu_w.probes(&q, n_probe).unwrap().to_vec3::<u32>().unwrap();
            let gpu = gpu_w
                .probes(&q.to_device(&dev).unwrap(), n_probe)
                .unwrap()
                .to_vec3::<u32>()
                .unwrap();
            for i in 0..b {
                for head in 0..hq {
                    let (sc, pc, pg) = (&scores[i][head], &cpu[i][head], &gpu[i][head]);
                    for (rank, (&a, &g)) in pc.iter().zip(pg).enumerate() {
                        let (sa, sg) = (sc[a as usize], sc[g as usize]);
                        let tol = 1e-4 * sa.abs().max(1.0);
                        assert!(
                            a == g || (sa - sg).abs() <= tol,
                            "{op_dtype:?}/{q_dtype:?} item {i} head {head} rank {rank}: \
                             cpu {a} ({sa}), gpu {g} ({sg})"
                        );
                    }
                }
            }
        }
    }
}

/// The fused RoPE writer: fresh tensors and cache rows from the CUDA kernel equal the CPU's, for
/// both rotations, YaRN scaling, every dtype, positions up to 500k and a ragged batch. The sines
/// and cosines come from f64 on both sides, so at most a rare last-bit difference of the f64
/// `sincos` survives the rounding to f32 and T.
#[test]
fn rope_writer_matches_cpu() {
    use saap::rope::Rope;
    use saap::{RopeConfig, RopeScaling};
    let Some(dev) = cuda() else { return };
    let s = seed("rope_writer_matches_cpu");
    let mut r = rng(s);
    let (b, h, t, d) = (3, 4, 7, 128);
    let starts = [0, 1234, 499_990];
    // Cache writes at smaller positions keep the caches small.
    let (cache_starts, lens, rows) = ([0, 1234, 4090], [7, 3, 0], 4100);
    let yarn = RopeScaling::Yarn {
        factor: 4.0,
        original_max_positions: 32_768,
        beta_fast: 32.0,
        beta_slow: 1.0,
    };
    for kind in [RopeKind::Interleaved, RopeKind::Neox] {
        for scaling in [RopeScaling::None, yarn] {
            let rope = Rope::new(
                &RopeConfig {
                    kind,
                    theta: 5e5,
                    scaling,
                },
                d,
            );
            for (dtype, ulp) in [(DType::F32, 1e-6), (DType::BF16, 8e-3), (DType::F16, 1e-3)] {
                let x = randn(&mut r, &[b, h, t, d], 2.0).to_dtype(dtype).unwrap();
                let compare = |cpu: &Tensor, gpu: &Tensor, what: &str| {
                    let gpu = gpu.to_device(&Device::Cpu).unwrap();
                    let scale = cpu.to_dtype(DType::F32).unwrap().abs().unwrap();
                    let scale = scale.max_all().unwrap().to_scalar::<f32>().unwrap();
                    let diff = max_abs_diff(cpu, &gpu);
                    assert!(
                        diff <= ulp * scale.max(1.0),
                        "{kind:?} {dtype:?} {what}: differs by {diff}"
                    );
                };
                let fresh = rope.writer(&starts, &[t; 3], true, false);
                let cpu = x.apply_op1_no_bwd(&fresh).unwrap();
                let gpu = x.to_device(&dev).unwrap().apply_op1_no_bwd(&fresh).unwrap();
                compare(&cpu, &gpu, "new tensor");
                for rotate in [true, false] {
                    let write = rope.writer(&cache_starts, &lens, rotate, true);
                    let cache_cpu = Tensor::zeros((b, h, rows, d), dtype, &Device::Cpu).unwrap();
                    let cache_gpu = cache_cpu.to_device(&dev).unwrap();
                    cache_cpu.inplace_op2(&x, &write).unwrap();
                    cache_gpu
                        .inplace_op2(&x.to_device(&dev).unwrap(), &write)
                        .unwrap();
                    for (i, &start) in cache_starts.iter().enumerate() {
                        // The written rows and one on each side (zero on both).
                        let from = start.saturating_sub(1);
                        let n = (t + 2).min(rows - from);
                        let rows_of = |c: &Tensor| c.get(i).unwrap().narrow(1, from, n).unwrap();
                        compare(
                            &rows_of(&cache_cpu),
                            &rows_of(&cache_gpu),
                            &format!("cache item {i} rotate {rotate}"),
                        );
                    }
                }
            }
        }
    }
}

/// The fused nearest-centroid kernel labels the CPU's centroid for every key of a ragged batch
/// (C a multiple of the kernel's 64-centroid slice and not, head dims 64 and 128, every key
/// dtype), into the right rows; the only tolerated differences are near-ties in f32.
#[test]
fn assign_matches_cpu() {
    use saap::partition::assign::{assign_into, prepare_centroids};
    let Some(dev) = cuda() else { return };
    let s = seed("assign_matches_cpu");
    let mut r = rng(s);
    // Centroids split over blocks (decode-sized), several slices per block, and one block
    // per tile taking every slice (extend-sized).
    for (h, d, c, t) in [
        (8, 128, 1024, 37),
        (2, 64, 40, 1),
        (3, 64, 200, 300),
        (2, 64, 256, 2000),
    ] {
        let centroids = randn(&mut r, &[h, c, d], 1.0);
        let (ct, hn) = prepare_centroids(&centroids).unwrap();
        let (ct_g, hn_g) = (ct.to_device(&dev).unwrap(), hn.to_device(&dev).unwrap());
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let b = 3;
            let cap = 2 * t + 5;
            let starts = [0, t + 5, 1];
            let lens = [t, t, t / 2];
            let keys = randn(&mut r, &[b, h, t, d], 1.0).to_dtype(dtype).unwrap();
            let sentinel = c as u32 + 7;
            let fill = Tensor::full(sentinel, (b, h, cap), &Device::Cpu).unwrap();
            let labels_cpu = fill.copy().unwrap();
            let labels_gpu = fill.to_device(&dev).unwrap();
            assign_into(&labels_cpu, &keys, &ct, &hn, None, &starts, &lens).unwrap();
            let keys_g = keys.to_device(&dev).unwrap();
            assign_into(&labels_gpu, &keys_g, &ct_g, &hn_g, None, &starts, &lens).unwrap();
            // Twice on the GPU: the kernel's scratch and counters must be left zero.
            let again = fill.to_device(&dev).unwrap();
            assign_into(&again, &keys_g, &ct_g, &hn_g, None, &starts, &lens).unwrap();
            let cpu = labels_cpu.to_vec3::<u32>().unwrap();
            let gpu = labels_gpu.to_vec3::<u32>().unwrap();
            assert_eq!(
                gpu,
                again.to_vec3::<u32>().unwrap(),
                "second launch differs"
            );
            let keys32 = keys.to_dtype(DType::F32).unwrap();
            let scores = keys32
                .matmul(
                    &ct.unsqueeze(0)
                        .unwrap()
                        .broadcast_as((b, h, d, c))
                        .unwrap()
                        .contiguous()
                        .unwrap(),
                )
                .unwrap()
                .broadcast_sub(&hn.unsqueeze(0).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let scores: Vec<Vec<Vec<Vec<f32>>>> = (0..b)
                .map(|i| scores.get(i).unwrap().to_vec3().unwrap())
                .collect();
            for i in 0..b {
                for head in 0..h {
                    for row in 0..cap {
                        let (a, g) = (cpu[i][head][row], gpu[i][head][row]);
                        let key = row.checked_sub(starts[i]).filter(|&k| k < lens[i]);
                        let Some(key) = key else {
                            assert_eq!(g, sentinel, "{dtype:?} item {i} row {row} overwritten");
                            continue;
                        };
                        let sc = &scores[i][head][key];
                        assert!(g < c as u32, "{dtype:?} item {i} key {key}: label {g}");
                        let (sa, sg) = (sc[a as usize], sc[g as usize]);
                        assert!(
                            a == g || (sa - sg).abs() <= 1e-4 * sa.abs().max(1.0),
                            "{dtype:?} h{h} d{d} c{c} item {i} head {head} key {key}: \
                             cpu {a} ({sa}), gpu {g} ({sg})"
                        );
                    }
                }
            }
        }
    }
}

/// Exact score ties (output weights zero, biases from three values) are ordered by index, as the
/// CPU's stable sort orders them: the top-ℓ kernel's index digits decide, bit for bit.
#[test]
fn route_ties_match_cpu() {
    let Some(dev) = cuda() else { return };
    let s = seed("route_ties_match_cpu");
    let mut r = rng(s);
    let (hq, d, h, c, b) = (8, 64, 32, 256, 2);
    let b2: Vec<f32> = (0..hq * c).map(|_| r.random_range(0..3) as f32).collect();
    let classifier = saap::classify::Classifier {
        w1: randn(&mut r, &[hq, d, h], 0.1),
        b1: randn(&mut r, &[hq, 1, h], 0.1),
        w2: Tensor::zeros((hq, h, c), DType::F32, &Device::Cpu).unwrap(),
        b2: Tensor::from_vec(b2, (hq, 1, c), &Device::Cpu).unwrap(),
    };
    let q = randn(&mut r, &[b, hq, d], 1.0);
    for n_probe in [1, 7, 64, 100, 256] {
        let cpu = classifier
            .prepared(DType::F32, &Device::Cpu)
            .unwrap()
            .probes(&q, n_probe)
            .unwrap()
            .to_vec3::<u32>()
            .unwrap();
        let gpu = classifier
            .prepared(DType::F32, &dev)
            .unwrap()
            .probes(&q.to_device(&dev).unwrap(), n_probe)
            .unwrap()
            .to_vec3::<u32>()
            .unwrap();
        assert_eq!(cpu, gpu, "ℓ = {n_probe}");
    }
}

/// Tensor-core prefill against the CPU's tiled prefill: bf16 and f16 (f32 and d 80 take the GEMM
/// path), head dims 64 and 128, G from 1 to 8 (7 as in Qwen2.5), a ragged batch whose items have cached
/// prefixes of different lengths (tiles crossing the diagonal at every offset), lengths that are
/// not multiples of the tiles, and an item with no queries. Rows past each length stay zero.
#[test]
fn prefill_matches_cpu() {
    use saap::attend::prefill_attention;
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("prefill_matches_cpu"));
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2), (DType::F16, 4e-3)] {
        for (d, hq, hkv) in [
            (64, 14, 2),
            (128, 32, 8),
            (64, 4, 4),
            (128, 8, 1),
            (64, 6, 3),
            // No tensor-core kernel at d 80: the GEMM path must agree too.
            (80, 4, 2),
        ] {
            let t = 150;
            let starts = [0usize, 37, 200, 5];
            let lens = [150usize, 1, 97, 0];
            let cap = 512;
            let b = starts.len();
            let q = randn(&mut r, &[b, hq, t, d], 1.0).to_dtype(dtype).unwrap();
            let k = randn(&mut r, &[b, hkv, cap, d], 1.0)
                .to_dtype(dtype)
                .unwrap();
            let v = randn(&mut r, &[b, hkv, cap, d], 1.0)
                .to_dtype(dtype)
                .unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            let cpu = prefill_attention(&q, &k, &v, &starts, &lens, scale).unwrap();
            let on = |x: &Tensor| x.to_device(&dev).unwrap();
            let gpu = prefill_attention(&on(&q), &on(&k), &on(&v), &starts, &lens, scale).unwrap();
            assert_eq!(gpu.dtype(), dtype);
            let gpu = gpu.to_device(&Device::Cpu).unwrap();
            let diff = max_abs_diff(&cpu, &gpu);
            assert!(
                diff <= tol,
                "prefill {dtype:?} d={d} G={}: max |cpu - gpu| = {diff}",
                hq / hkv
            );
            for (i, &len) in lens.iter().enumerate() {
                let padding = gpu.get(i).unwrap().narrow(1, len, t - len).unwrap();
                let abs = padding.to_dtype(DType::F32).unwrap().abs().unwrap();
                assert_eq!(abs.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }
}

/// Chunked prefill through `SaapAttention` on the GPU (tensor-core kernel, chunks ending inside
/// and on tile boundaries) equals one CPU prefill of the whole prompt.
#[test]
fn chunked_prefill_matches_cpu() {
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("chunked_prefill_matches_cpu"));
    let dtype = DType::BF16;
    let (n, d) = (700, 64);
    let mut cfg = config(7, 1, d, 32, RopeKind::Neox);
    cfg.window = 64;
    let q = randn(&mut r, &[1, 7, n, d], 1.0).to_dtype(dtype).unwrap();
    let k = randn(&mut r, &[1, 1, n, d], 1.0).to_dtype(dtype).unwrap();
    let v = randn(&mut r, &[1, 1, n, d], 1.0).to_dtype(dtype).unwrap();
    let mut cpu = SaapAttention::dense(&cfg, &Device::Cpu, dtype).unwrap();
    let whole = cpu.prefill(&q, &k, &v, &[n]).unwrap();
    let mut gpu = SaapAttention::dense(&cfg, &dev, dtype).unwrap();
    let mut outs = vec![];
    let mut at = 0;
    for chunk in [64, 100, 1, 255, 280] {
        let part = |x: &Tensor| x.narrow(2, at, chunk).unwrap().to_device(&dev).unwrap();
        outs.push(
            gpu.prefill(&part(&q), &part(&k), &part(&v), &[chunk])
                .unwrap(),
        );
        at += chunk;
    }
    assert_eq!(at, n);
    let chunked = Tensor::cat(&outs, 2)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let diff = max_abs_diff(&whole, &chunked);
    assert!(diff <= 2e-2, "chunked GPU prefill vs CPU: {diff}");
}

/// The tensor-core assignment of a prompt (bf16/f16 keys, centroids rounded to the key type)
/// against the CPU's f32 nearest centroid: labels valid and written only where they belong,
/// nearly all equal, and where they differ the chosen centroid is as near to rounding (mean
/// inertia within 0.1%, every key's distance within 1% of the CPU's best).
#[test]
fn assign_on_tensor_cores_matches_cpu_inertia() {
    use saap::partition::assign::{assign_into, prepare_centroids, MMA_MIN_KEYS};
    let Some(dev) = cuda() else { return };
    let mut r = rng(seed("assign_on_tensor_cores_matches_cpu_inertia"));
    for (h, d, c, t) in [(8, 128, 1024, 700), (2, 64, 1000, 3000), (3, 64, 40, 65)] {
        assert!(t >= MMA_MIN_KEYS);
        let centroids = randn(&mut r, &[h, c, d], 1.0);
        let (ct, hn) = prepare_centroids(&centroids).unwrap();
        let on = |x: &Tensor| x.to_device(&dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let rounded = on(&centroids.to_dtype(dtype).unwrap());
            let (b, cap) = (2, 2 * t + 3);
            let (starts, lens) = ([3usize, 0], [t, t - 1]);
            // Keys near centroids, as real keys are: most assignments are clear-cut.
            let keys = randn(&mut r, &[b, h, t, d], 0.3);
            let picks: Vec<u32> = (0..b * h * t)
                .map(|_| r.random_range(0..c as u32))
                .collect();
            let picks = Tensor::from_vec(picks, (b, h, t), &Device::Cpu).unwrap();
            let near: Vec<Tensor> = (0..b)
                .map(|i| {
                    let rows: Vec<Tensor> = (0..h)
                        .map(|head| {
                            let ids = picks.get(i).unwrap().get(head).unwrap();
                            centroids.get(head).unwrap().index_select(&ids, 0).unwrap()
                        })
                        .collect();
                    Tensor::stack(&rows, 0).unwrap()
                })
                .collect();
            let keys = (keys + Tensor::stack(&near, 0).unwrap())
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let sentinel = c as u32 + 9;
            let fill = Tensor::full(sentinel, (b, h, cap), &Device::Cpu).unwrap();
            let labels_cpu = fill.copy().unwrap();
            let labels_gpu = on(&fill);
            assign_into(&labels_cpu, &keys, &ct, &hn, None, &starts, &lens).unwrap();
            let (ct_g, hn_g) = (on(&ct), on(&hn));
            assign_into(
                &labels_gpu,
                &on(&keys),
                &ct_g,
                &hn_g,
                Some(&rounded),
                &starts,
                &lens,
            )
            .unwrap();
            let cpu = labels_cpu.to_vec3::<u32>().unwrap();
            let gpu = labels_gpu.to_vec3::<u32>().unwrap();
            let keys32 = keys.to_dtype(DType::F32).unwrap();
            let cents = centroids.to_vec3::<f32>().unwrap();
            let (mut same, mut total, mut inertia_cpu, mut inertia_gpu) = (0, 0, 0f64, 0f64);
            for i in 0..b {
                let item = keys32.get(i).unwrap().to_vec3::<f32>().unwrap();
                for head in 0..h {
                    for row in 0..cap {
                        let g = gpu[i][head][row];
                        let Some(key) = row.checked_sub(starts[i]).filter(|&k| k < lens[i]) else {
                            assert_eq!(g, sentinel, "{dtype:?} item {i} row {row} overwritten");
                            continue;
                        };
                        assert!(g < c as u32, "{dtype:?} item {i} key {key}: label {g}");
                        let a = cpu[i][head][row];
                        let dist = |label: u32| -> f64 {
                            let x = &item[head][key];
                            let y = &cents[head][label as usize];
                            x.iter().zip(y).map(|(p, q)| f64::from(p - q).powi(2)).sum()
                        };
                        let (da, dg) = (dist(a), dist(g));
                        assert!(
                            dg <= da * 1.01 + 1e-6,
                            "key {key}: cpu {a} ({da}), gpu {g} ({dg})"
                        );
                        inertia_cpu += da;
                        inertia_gpu += dg;
                        same += usize::from(a == g);
                        total += 1;
                    }
                }
            }
            let agree = same as f64 / total as f64;
            assert!(
                agree >= 0.98,
                "{dtype:?} h{h} d{d} c{c}: labels agree on {agree}"
            );
            assert!(
                inertia_gpu <= inertia_cpu * 1.001,
                "{dtype:?}: inertia {inertia_gpu} vs cpu {inertia_cpu}"
            );
        }
    }
}

/// Two ops given the same keys, values and query build the same index lists, read the same keys
/// and return the same output, bit for bit: shapes of a Llama-3.1-8B layer (the tensor-core
/// assignment, several merges, a classifier-routed step), with a short window and with
/// `bench_report`'s (window 2048, 16 sinks, hidden 256, the default merge interval).
#[test]
fn extend_and_decode_are_deterministic() {
    let Some(dev) = cuda() else { return };
    let s = seed("extend_and_decode_are_deterministic");
    // (window, sinks, merge_every, hidden, theta, first chunk, second chunk)
    for (window, sinks, merge_every, hidden, theta, t0, t1) in [
        (512, 16, Some(64), 64, 10_000.0, 12_000, 9_000),
        (2048, 16, None, 256, 500_000.0, 16_896, 15_872),
    ] {
        let mut config = config(32, 8, 128, 1024, RopeKind::Neox);
        config.rope.theta = theta;
        config.window = window;
        config.sinks = sinks;
        config.merge_every = merge_every.unwrap_or((window / 8).max(1));
        config.hidden = hidden;
        let index = random_index(&config, 1, s);
        let mut r = rng(s ^ 0xd1);
        let on = |x: Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let chunks: Vec<(Tensor, Tensor, usize)> = [t0, t1]
            .into_iter()
            .map(|t| {
                let k = on(randn(&mut r, &[1, 8, t, 128], 1.0));
                let v = on(randn(&mut r, &[1, 8, t, 128], 1.0));
                (k, v, t)
            })
            .collect();
        let q = on(randn(&mut r, &[1, 32, 1, 128], 1.0));
        let kv = on(randn(&mut r, &[1, 8, 1, 128], 1.0));
        let run = || {
            let mut op = SaapAttention::from_index(&index, 0, &dev, DType::BF16).unwrap();
            op.set_n_probe(32).unwrap();
            op.set_track_reads(true);
            for (k, v, t) in &chunks {
                op.extend(k, v, &[*t]).unwrap();
            }
            let out = op.decode(&q, &kv, &kv).unwrap();
            let out = out.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
            (
                op.index_lists().unwrap(),
                op.last_read(),
                out.to_vec1::<f32>().unwrap(),
            )
        };
        let (lists_a, read_a, out_a) = run();
        for _ in 0..2 {
            let (lists_b, read_b, out_b) = run();
            assert!(
                lists_a == lists_b,
                "window {window}: index lists differ between identical runs"
            );
            assert_eq!(
                read_a, read_b,
                "window {window}: keys read differ between identical runs"
            );
            assert!(
                out_a
                    .iter()
                    .zip(&out_b)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "window {window}: outputs differ between identical runs"
            );
        }
    }
}
