//! Regression tests of the reliability findings (issue 15): each failed before its fix.
//! Damaged index files, hostile configurations and overflowing inputs are typed errors; nothing
//! panics and no non-finite value passes silently.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use saap::classify::top_probes;
use saap::config::{MAX_PARTITIONS, MAX_SPAN};
use saap::{RopeKind, Routing, SaapAttention, SaapConfig, SaapError, SaapIndex};
use std::path::{Path, PathBuf};

/// A saved two-layer index and its bytes.
fn saved_index(dir: &Path) -> (SaapIndex, Vec<u8>) {
    let index = random_index(&config(6, 2, 16, 8, RopeKind::Neox), 2, 1);
    let path = dir.join("index.safetensors");
    index.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (index, bytes)
}

/// Loads `bytes` from a file; a rejection must be `IndexFormat` naming that file.
fn load_bytes(dir: &Path, bytes: &[u8]) -> Result<SaapIndex, String> {
    let path: PathBuf = dir.join("edited.safetensors");
    std::fs::write(&path, bytes).unwrap();
    match SaapIndex::load(&path, &Device::Cpu) {
        Ok(index) => Ok(index),
        Err(SaapError::IndexFormat(msg)) => {
            assert!(msg.starts_with(&path.display().to_string()), "{msg}");
            Err(msg)
        }
        Err(other) => panic!("not an IndexFormat error: {other:?}"),
    }
}

fn rejected(dir: &Path, bytes: &[u8], why: &str) -> String {
    match load_bytes(dir, bytes) {
        Ok(_) => panic!("accepted an index with {why}"),
        Err(msg) => msg,
    }
}

#[test]
fn bit_flips_in_tensor_data_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_index(dir.path());
    let file = IndexFile::parse(&bytes);
    for name in file.tensor_names() {
        // The lowest mantissa bit of the third bf16 value: a finite value that looks like any
        // trained one.
        let mut edited = file.clone();
        edited.tensor_data(&name)[4] ^= 1;
        let msg = rejected(dir.path(), &edited.to_bytes(), "a flipped bit");
        assert!(msg.contains(&name) && msg.contains("digest"), "{msg}");
    }
}

#[test]
fn non_finite_tensors_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bytes) = saved_index(dir.path());
    let file = IndexFile::parse(&bytes);
    for (name, value) in [
        ("layers.0.centroids", f32::NAN),
        ("layers.1.w2", f32::INFINITY),
        ("layers.0.b1", f32::NEG_INFINITY),
    ] {
        // Resealed: the digests agree, only the finiteness check is left to catch it.
        let mut edited = file.clone();
        edited.tensor_data(name)[8..10].copy_from_slice(&half::bf16::from_f32(value).to_le_bytes());
        edited.reseal();
        let msg = rejected(dir.path(), &edited.to_bytes(), "a non-finite value");
        assert!(msg.contains("non-finite"), "{msg}");
    }
    // Building one in memory is refused as well.
    let layer = index.layer(0).unwrap();
    let mut poisoned = layer.clone();
    let mut w1 = layer
        .classifier
        .w1
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    w1[3] = f32::NAN;
    poisoned.classifier.w1 =
        Tensor::from_vec(w1, layer.classifier.w1.shape(), &Device::Cpu).unwrap();
    assert!(matches!(
        SaapIndex::new(index.config().clone(), "x", vec![poisoned]),
        Err(SaapError::NonFinite("w1"))
    ));
}

#[test]
fn swapped_tensors_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_index(dir.path());
    let file = IndexFile::parse(&bytes);
    // Two tensors of equal shape trade places: in the data, and by their header entries.
    let (a, b) = ("layers.0.w1", "layers.1.w1");
    let mut edited = file.clone();
    let (wa, wb) = (
        file.clone().tensor_data(a).to_vec(),
        file.clone().tensor_data(b).to_vec(),
    );
    edited.tensor_data(a).copy_from_slice(&wb);
    edited.tensor_data(b).copy_from_slice(&wa);
    rejected(dir.path(), &edited.to_bytes(), "swapped data");
    let mut edited = file.clone();
    let offsets = edited.header[a]["data_offsets"].clone();
    edited.header[a]["data_offsets"] = edited.header[b]["data_offsets"].clone();
    edited.header[b]["data_offsets"] = offsets;
    rejected(dir.path(), &edited.to_bytes(), "swapped header entries");
}

#[test]
fn dtype_relabels_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_index(dir.path());
    let file = IndexFile::parse(&bytes);
    // Types of the same width: the bytes would be read as other numbers.
    for dtype in ["F16", "I16"] {
        let mut edited = file.clone();
        edited.header["layers.1.centroids"]["dtype"] = dtype.into();
        edited.reseal();
        let msg = rejected(dir.path(), &edited.to_bytes(), "relabelled data");
        assert!(msg.contains(dtype) && msg.contains("BF16"), "{msg}");
    }
    // A wider type no longer fits the data: the container itself is damaged.
    let mut edited = file.clone();
    edited.header["layers.1.centroids"]["dtype"] = "F32".into();
    edited.reseal();
    rejected(dir.path(), &edited.to_bytes(), "data relabelled as F32");
}

#[test]
fn bad_ranks_and_hidden_widths_are_index_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bytes) = saved_index(dir.path());
    let file = IndexFile::parse(&bytes);
    // w1 [6, 16, 16] seen as [96, 16]: was a `Candle` error without the path.
    let mut edited = file.clone();
    edited.header["layers.0.w1"]["shape"] = serde_json::json!([96, 16]);
    edited.reseal();
    let msg = rejected(dir.path(), &edited.to_bytes(), "a rank-2 weight");
    assert!(msg.contains("w1"), "{msg}");
    // A config whose hidden width is not the tensors'.
    let mut edited = file.clone();
    let mut config: SaapConfig = serde_json::from_str(&file.metadata("config")).unwrap();
    config.hidden = 8;
    edited.set_metadata("config", serde_json::to_string(&config).unwrap());
    edited.reseal();
    rejected(dir.path(), &edited.to_bytes(), "another hidden width");
    let layers = (0..2).map(|i| index.layer(i).unwrap().clone()).collect();
    assert!(matches!(
        SaapIndex::new(config, "x", layers),
        Err(SaapError::Shape { .. })
    ));
}

#[test]
fn header_edits_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_index(dir.path());
    let file = IndexFile::parse(&bytes);
    let routing = serde_json::to_string(&[Routing::Dense, Routing::Dense]).unwrap();
    for (key, value) in [("routing", routing.as_str()), ("model", "another model")] {
        let mut edited = file.clone();
        edited.set_metadata(key, value);
        let msg = rejected(dir.path(), &edited.to_bytes(), "an edited header");
        assert!(msg.contains("metadata digest"), "{msg}");
    }
    for old in ["1", "2"] {
        let mut edited = file.clone();
        edited.set_metadata("version", old);
        edited.reseal();
        let msg = rejected(dir.path(), &edited.to_bytes(), "an old version");
        assert!(
            msg.contains(&format!("version {old}")) && msg.contains("recalibrate"),
            "{msg}"
        );
    }
    // A model sha256 that is not one.
    let mut edited = file.clone();
    edited.set_metadata("model_sha256", "not a digest");
    edited.reseal();
    let msg = rejected(dir.path(), &edited.to_bytes(), "a malformed model sha256");
    assert!(msg.contains("model_sha256"), "{msg}");
    // An extra tensor, even one with a digest.
    let mut edited = file.clone();
    let end = edited.data.len();
    edited.header.insert(
        "layers.2.w1".into(),
        serde_json::json!({"dtype": "BF16", "shape": [1], "data_offsets": [end, end + 2]}),
    );
    edited.data.extend(half::bf16::ONE.to_le_bytes());
    edited.reseal();
    rejected(dir.path(), &edited.to_bytes(), "an extra tensor");
    // Unreadable: named too.
    let missing = dir.path().join("missing.safetensors");
    match SaapIndex::load(&missing, &Device::Cpu) {
        Err(SaapError::IndexFormat(msg)) => assert!(msg.contains("missing.safetensors"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

/// A file of the previous format, version 2, as its code wrote it: the same layout with F32
/// tensors and no `model_sha256`. It must be refused naming the path and saying to recalibrate
/// (`llama_decode` then recalibrates a cached one), not read as damaged data.
#[test]
fn version_2_files_are_refused_with_advice_to_recalibrate() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = saved_index(dir.path());
    let file = IndexFile::parse(&bytes);
    let mut v2 = file.clone();
    v2.data.clear();
    for name in file.tensor_names() {
        let (a, b) = file.offsets(&name);
        let start = v2.data.len();
        for pair in file.data[a..b].chunks_exact(2) {
            let x = half::bf16::from_le_bytes([pair[0], pair[1]]).to_f32();
            v2.data.extend(x.to_le_bytes());
        }
        v2.header[&name]["dtype"] = "F32".into();
        v2.header[&name]["data_offsets"] = serde_json::json!([start, v2.data.len()]);
    }
    v2.set_metadata("version", "2");
    v2.reseal();
    assert_eq!(v2.data.len(), 2 * file.data.len());
    let msg = rejected(dir.path(), &v2.to_bytes(), "a version-2 file");
    assert!(
        msg.contains("format version 2")
            && msg.contains("version 3")
            && msg.contains("recalibrate"),
        "{msg}"
    );
}

#[test]
fn saving_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bytes) = saved_index(dir.path());
    let again = dir.path().join("again.safetensors");
    index.save(&again).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), bytes);
    // Through a load, and from an independently built identical index.
    let loaded = SaapIndex::load(&again, &Device::Cpu).unwrap();
    assert!(same_index(&index, &loaded));
    loaded.save(&again).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), bytes);
    let twin = random_index(index.config(), 2, 1);
    twin.save(&again).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), bytes);
    // The test's resealer follows the documented format: resealing changes nothing.
    let mut file = IndexFile::parse(&bytes);
    file.reseal();
    assert_eq!(file.to_bytes(), bytes);
}

#[test]
fn nan_scores_rank_last_without_panicking() {
    // C > 20: Rust's sort detects the broken total order and panicked.
    let c = 64;
    let mut r = rng(3);
    let scores = randn(&mut r, &[2, 3, c], 1.0);
    let mut values = scores.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in (0..values.len()).step_by(3) {
        values[i] = f32::NAN;
    }
    let poisoned = Tensor::from_vec(values.clone(), (2, 3, c), &Device::Cpu).unwrap();
    let probes = top_probes(&poisoned, c).unwrap().to_vec3::<u32>().unwrap();
    for (row, order) in values.chunks(c).zip(probes.iter().flatten()) {
        let finite = row.iter().filter(|x| !x.is_nan()).count();
        assert!(order[..finite].iter().all(|&p| !row[p as usize].is_nan()));
        // NaN ties rank in partition order: deterministic.
        let nans: Vec<u32> = (0..c as u32)
            .filter(|&p| row[p as usize].is_nan())
            .collect();
        assert_eq!(order[finite..], nans);
        assert!(order[..finite]
            .windows(2)
            .all(|w| row[w[0] as usize] >= row[w[1] as usize]));
    }
}

/// An indexed op with C = 64 whose trained tensors are finite but huge (a hostile index that
/// passes every load check), after a short f32 prefill.
fn huge_index_op(routing: Routing, check_finite: bool) -> SaapAttention {
    let mut config = config(4, 2, 16, 64, RopeKind::Neox);
    config.window = 2;
    config.sinks = 1;
    let mut layer = random_index(&config, 1, 5).layer(0).unwrap().clone();
    let huge = |t: &Tensor| (t * 1e20).unwrap();
    layer.centroids = huge(&layer.centroids);
    layer.classifier.w1 = huge(&layer.classifier.w1);
    layer.classifier.w2 = huge(&layer.classifier.w2);
    let index = SaapIndex::new(config, "huge", vec![layer]).unwrap();
    let mut op = SaapAttention::from_index(&index, 0, &Device::Cpu, DType::F32).unwrap();
    op.set_routing(routing).unwrap();
    op.set_check_finite(check_finite);
    let mut r = rng(6);
    let q = randn(&mut r, &[1, 4, 40, 16], 1.0);
    let kv = randn(&mut r, &[1, 2, 40, 16], 1.0);
    op.prefill(&q, &kv, &kv, &[40]).unwrap();
    op
}

#[test]
fn overflowing_routing_scores_are_reported() {
    let mut r = rng(7);
    // Finite queries whose routing scores overflow f32 into NaN: top-ℓ panicked (C > 20), and
    // the scores went unnoticed.
    let q = (randn(&mut r, &[1, 4, 1, 16], 1.0) * 1e20).unwrap();
    let kv = randn(&mut r, &[1, 2, 1, 16], 1.0);
    for routing in [Routing::Classifier, Routing::NearestCentroid] {
        let mut op = huge_index_op(routing, true);
        match op.decode(&q, &kv, &kv) {
            Err(SaapError::NonFinite(what)) => assert_eq!(what, "routing scores"),
            other => panic!("{routing:?}: {other:?}"),
        }
        assert_eq!(op.seq_lens(), &[40], "a rejected step is not cached");
        // Unchecked, the same step must not panic either.
        let mut op = huge_index_op(routing, false);
        op.decode(&q, &kv, &kv).unwrap();
        assert_eq!(op.seq_lens(), &[41]);
    }
}

#[test]
fn overflowing_quest_scores_are_reported() {
    quest_overflow_is_reported(&Device::Cpu);
}

#[test]
fn overflowing_outputs_are_reported() {
    let mut r = rng(8);
    // q·k ≈ 1e40 overflows f32: the outputs were all NaN, and Ok.
    let q = (randn(&mut r, &[1, 4, 3, 16], 1.0) * 1e20).unwrap();
    let k = (randn(&mut r, &[1, 2, 3, 16], 1.0) * 1e20).unwrap();
    let v = randn(&mut r, &[1, 2, 3, 16], 1.0);
    let mut op = SaapAttention::dense(
        &config(4, 2, 16, 8, RopeKind::Neox),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert!(matches!(
        op.prefill(&q, &k, &v, &[3]),
        Err(SaapError::NonFinite("output"))
    ));
    assert!(op.seq_lens().is_empty(), "a rejected prefill is not cached");
    let small = |x: &Tensor| (x * 1e-20).unwrap();
    op.prefill(&small(&q), &small(&k), &v, &[3]).unwrap();
    // A new key along its query: q·k = |q|² ≈ 1e40 overflows whatever the signs.
    let u = (randn(&mut r, &[1, 1, 1, 16], 1.0) * 1e20).unwrap();
    let (q1, k1) = (
        u.broadcast_as((1, 4, 1, 16)).unwrap().contiguous().unwrap(),
        u.broadcast_as((1, 2, 1, 16)).unwrap().contiguous().unwrap(),
    );
    let v1 = v.narrow(2, 0, 1).unwrap();
    assert!(matches!(
        op.decode(&q1, &k1, &v1),
        Err(SaapError::NonFinite("output"))
    ));
    assert_eq!(op.seq_lens(), &[3]);
    op.decode(&small(&q1), &small(&k1), &v1).unwrap();
    assert_eq!(op.seq_lens(), &[4]);
}

#[test]
fn half_precision_keys_overflowing_after_rope_are_reported() {
    for (dtype, max) in [(DType::F16, 65_000f32), (DType::BF16, 3.3e38)] {
        let config = config(2, 1, 4, 8, RopeKind::Interleaved);
        let mut op = SaapAttention::dense(&config, &Device::Cpu, dtype).unwrap();
        // Pairs (x, -x): rotated to position p, the first becomes x·(cos p + sin p), up to √2·x.
        let pair: Vec<f32> = (0..3).flat_map(|_| [max, -max, 1.0, 1.0]).collect();
        let k = Tensor::from_vec(pair, (1, 1, 3, 4), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let q = Tensor::ones((1, 2, 3, 4), dtype, &Device::Cpu).unwrap();
        assert!(
            matches!(
                op.prefill(&q, &k, &q.narrow(1, 0, 1).unwrap(), &[3]),
                Err(SaapError::NonFinite("k after RoPE"))
            ),
            "{dtype:?}"
        );
        assert!(op.seq_lens().is_empty());
        // Position 0 alone does not rotate: accepted.
        op.prefill(&q, &k, &q.narrow(1, 0, 1).unwrap(), &[1])
            .unwrap();
    }
}

#[test]
fn extreme_configurations_are_rejected_or_safe() {
    let base = config(4, 2, 16, 8, RopeKind::Neox);
    type Edit = (&'static str, fn(&mut SaapConfig));
    let edits: [Edit; 7] = [
        ("window", |c| c.window = usize::MAX),
        ("merge_every", |c| c.merge_every = usize::MAX),
        ("sinks", |c| c.sinks = usize::MAX - 1),
        ("hidden", |c| c.hidden = usize::MAX),
        ("n_partitions", |c| {
            c.n_partitions = MAX_PARTITIONS + 1;
            c.n_probe = 1;
        }),
        ("head_dim", |c| c.layout.head_dim = 1 << 20),
        ("rope", |c| {
            c.rope.scaling = saap::RopeScaling::Yarn {
                factor: 4.0,
                original_max_positions: 4096,
                beta_fast: 32.0,
                beta_slow: -1.0,
            }
        }),
    ];
    for (what, edit) in edits {
        let mut bad = base.clone();
        edit(&mut bad);
        assert!(
            matches!(bad.validate(), Err(SaapError::Config(_))),
            "{what} accepted"
        );
    }
    // At the limits, the op's position arithmetic must not overflow (window + merge slack
    // overflowed in `merge_window`); every key stays read once.
    let mut edge = base.clone();
    edge.window = MAX_SPAN;
    edge.merge_every = MAX_SPAN;
    edge.sinks = MAX_SPAN;
    edge.validate().unwrap();
    let index = random_index(&edge, 1, 9);
    let mut op = SaapAttention::from_index(&index, 0, &Device::Cpu, DType::F32).unwrap();
    let mut r = rng(10);
    let q = randn(&mut r, &[1, 4, 5, 16], 1.0);
    let kv = randn(&mut r, &[1, 2, 5, 16], 1.0);
    op.prefill(&q, &kv, &kv, &[5]).unwrap();
    for _ in 0..3 {
        let q1 = randn(&mut r, &[1, 4, 1, 16], 1.0);
        let kv1 = randn(&mut r, &[1, 2, 1, 16], 1.0);
        op.decode(&q1, &kv1, &kv1).unwrap();
    }
    assert_eq!(op.seq_lens(), &[8]);
    assert_eq!(op.extents()[0].indexed_end, 8, "all sinks");
    assert_eq!(op.last_read().unwrap().keys_read, 2 * 8);
}
