//! Index files round-trip; bad files, bad configurations and bad inputs are typed errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use saap::{RopeKind, Routing, SaapAttention, SaapError, SaapIndex};

#[test]
fn index_round_trip() {
    let config = config(6, 2, 16, 8, RopeKind::Neox);
    let mut index = random_index(&config, 3, 1);
    index.set_layer_routing(1, Routing::Dense).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.safetensors");
    index.save(&path).unwrap();
    let loaded = SaapIndex::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), index.config());
    assert_eq!(loaded.model(), "synthetic");
    assert_eq!(loaded.n_layers(), 3);
    for l in 0..3 {
        let (a, b) = (index.layer(l).unwrap(), loaded.layer(l).unwrap());
        assert_eq!(a.routing, b.routing);
        assert_eq!(max_abs_diff(&a.centroids, &b.centroids), 0.0);
        assert_eq!(max_abs_diff(&a.classifier.w2, &b.classifier.w2), 0.0);
        assert_eq!(max_abs_diff(&a.classifier.b1, &b.classifier.b1), 0.0);
    }
    assert_eq!(loaded.layer(1).unwrap().routing, Routing::Dense);
    assert!(matches!(loaded.layer(3), Err(SaapError::IndexMismatch(_))));
}

#[test]
fn damaged_or_foreign_index_files_are_rejected() {
    let model = config(6, 2, 16, 8, RopeKind::Neox);
    let index = random_index(&model, 2, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.safetensors");
    index.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(
        SaapIndex::load(&truncated, &Device::Cpu),
        Err(SaapError::IndexFormat(_))
    ));

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not an index at all").unwrap();
    assert!(matches!(
        SaapIndex::load(&garbage, &Device::Cpu),
        Err(SaapError::IndexFormat(_))
    ));

    // Same length header rewritten with another version number.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let needle = "\"version\":\"3\"";
    assert!(text.contains(needle));
    let other = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap();
    let mut wrong_version = bytes.clone();
    wrong_version[other + needle.len() - 2] = b'9';
    let versioned = dir.path().join("v9.safetensors");
    std::fs::write(&versioned, &wrong_version).unwrap();
    match SaapIndex::load(&versioned, &Device::Cpu) {
        Err(SaapError::IndexFormat(msg)) => assert!(msg.contains("version 9"), "{msg}"),
        other => panic!("expected a version error, got {other:?}"),
    }

    assert!(matches!(
        SaapIndex::load(dir.path().join("missing.safetensors"), &Device::Cpu),
        Err(SaapError::IndexFormat(_))
    ));

    // An index for another head layout or another RoPE does not fit the model.
    let other_layout = config(8, 2, 16, 8, RopeKind::Neox);
    assert!(matches!(
        index.check_model(&other_layout, 2),
        Err(SaapError::IndexMismatch(_))
    ));
    let other_rope = config(6, 2, 16, 8, RopeKind::Interleaved);
    assert!(matches!(
        index.check_model(&other_rope, 2),
        Err(SaapError::IndexMismatch(_))
    ));
    assert!(matches!(
        index.check_model(&model, 3),
        Err(SaapError::IndexMismatch(_))
    ));
    index.check_model(&model, 2).unwrap();
}

#[test]
fn bad_configurations_are_typed_errors() {
    let config = config(6, 2, 16, 8, RopeKind::Neox);
    assert!(
        matches!(config.with_n_probe(9), Err(SaapError::Config(_))),
        "ℓ > C"
    );
    assert!(matches!(config.with_n_probe(0), Err(SaapError::Config(_))));
    let mut bad = config.clone();
    bad.layout.n_q_heads = 5;
    assert!(
        matches!(bad.validate(), Err(SaapError::Config(_))),
        "Hq not a multiple of Hkv"
    );
    let mut bad = config.clone();
    bad.layout.head_dim = 15;
    assert!(matches!(bad.validate(), Err(SaapError::Config(_))));
    let mut bad = config.clone();
    bad.rope.theta = f64::NAN;
    assert!(matches!(bad.validate(), Err(SaapError::Config(_))));
    for budget in [0.0, -0.5, 1.01, f64::NAN, f64::INFINITY] {
        let mut bad = config.clone();
        bad.keys_budget = Some(budget);
        assert!(
            matches!(bad.validate(), Err(SaapError::Config(_))),
            "keys budget {budget}"
        );
    }
    let index = random_index(&config, 1, 1);
    let mut op = SaapAttention::from_index(&index, 0, &Device::Cpu, DType::F32).unwrap();
    assert!(matches!(op.set_n_probe(100), Err(SaapError::Config(_))));
    assert!(matches!(
        SaapAttention::from_index(&index, 0, &Device::Cpu, DType::U32),
        Err(SaapError::UnsupportedDType(DType::U32))
    ));
    let mut dense = SaapAttention::dense(&config, &Device::Cpu, DType::F32).unwrap();
    assert!(matches!(
        dense.set_routing(Routing::Classifier),
        Err(SaapError::Config(_))
    ));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let config = config(6, 2, 16, 8, RopeKind::Neox);
    let index = random_index(&config, 1, 1);
    let mut op = SaapAttention::from_index(&index, 0, &Device::Cpu, DType::F32).unwrap();
    let mut r = rng(2);
    let q = randn(&mut r, &[2, 6, 1, 16], 1.0);
    let kv = randn(&mut r, &[2, 2, 1, 16], 1.0);

    // Decoding with no context.
    assert!(matches!(
        op.decode(&q, &kv, &kv),
        Err(SaapError::EmptyContext(0))
    ));
    assert!(matches!(
        op.prefill(&q, &kv, &kv, &[0, 0]),
        Err(SaapError::EmptyContext(_))
    ));

    // Wrong shapes: heads, head dim, batch of k vs q, lengths.
    let wrong_heads = randn(&mut r, &[2, 4, 1, 16], 1.0);
    assert!(matches!(
        op.prefill(&wrong_heads, &kv, &kv, &[1, 1]),
        Err(SaapError::Shape { name: "q", .. })
    ));
    let wrong_dim = randn(&mut r, &[2, 2, 1, 8], 1.0);
    assert!(matches!(
        op.prefill(&q, &wrong_dim, &kv, &[1, 1]),
        Err(SaapError::Shape { name: "k", .. })
    ));
    let wrong_batch = randn(&mut r, &[3, 2, 1, 16], 1.0);
    assert!(matches!(
        op.prefill(&q, &kv, &wrong_batch, &[1, 1]),
        Err(SaapError::Shape { name: "v", .. })
    ));
    assert!(matches!(
        op.prefill(&q, &kv, &kv, &[2, 1]),
        Err(SaapError::Shape { name: "lens", .. })
    ));
    assert!(matches!(
        op.prefill(&q, &kv, &kv, &[1]),
        Err(SaapError::Shape { name: "lens", .. })
    ));
    let rank3 = q.squeeze(2).unwrap();
    assert!(matches!(
        op.prefill(&rank3, &kv, &kv, &[1, 1]),
        Err(SaapError::Shape { .. })
    ));

    // Wrong dtype.
    let q16 = q.to_dtype(DType::BF16).unwrap();
    assert!(matches!(
        op.prefill(&q16, &kv, &kv, &[1, 1]),
        Err(SaapError::DType { name: "q", .. })
    ));

    // NaN and infinity.
    let mut poisoned = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    poisoned[7] = f32::NAN;
    let nan_q = Tensor::from_vec(poisoned.clone(), q.shape(), &Device::Cpu).unwrap();
    assert!(matches!(
        op.prefill(&nan_q, &kv, &kv, &[1, 1]),
        Err(SaapError::NonFinite("q"))
    ));
    poisoned[7] = f32::INFINITY;
    let inf_q = Tensor::from_vec(poisoned, q.shape(), &Device::Cpu).unwrap();
    assert!(matches!(
        op.prefill(&inf_q, &kv, &kv, &[1, 1]),
        Err(SaapError::NonFinite("q"))
    ));

    // Nothing above touched the state: a valid prefill then decode work, and the batch is fixed.
    op.prefill(&q, &kv, &kv, &[1, 1]).unwrap();
    assert_eq!(op.seq_lens(), &[1, 1]);
    op.decode(&q, &kv, &kv).unwrap();
    let q3 = randn(&mut r, &[3, 6, 1, 16], 1.0);
    let kv3 = randn(&mut r, &[3, 2, 1, 16], 1.0);
    assert!(matches!(
        op.decode(&q3, &kv3, &kv3),
        Err(SaapError::Shape { .. })
    ));
    let two = randn(&mut r, &[2, 6, 2, 16], 1.0);
    let kv_two = randn(&mut r, &[2, 2, 2, 16], 1.0);
    assert!(
        matches!(
            op.decode(&two, &kv_two, &kv_two),
            Err(SaapError::Shape { .. })
        ),
        "decode takes T = 1"
    );
    op.reset();
    assert!(op.seq_lens().is_empty());
}

/// A keys budget in the config travels with a saved index and becomes the default of every op
/// built from it; the op's setter still overrides it.
#[test]
fn index_carries_its_keys_budget() {
    let mut config = config(6, 2, 16, 8, RopeKind::Neox);
    config.keys_budget = Some(0.25);
    let index = random_index(&config, 2, 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("budget.safetensors");
    index.save(&path).unwrap();
    let loaded = SaapIndex::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.config().keys_budget, Some(0.25));
    let mut op = SaapAttention::from_index(&loaded, 1, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(op.keys_budget(), Some(0.25));
    op.set_keys_budget(None).unwrap();
    assert_eq!(op.keys_budget(), None);
    config.keys_budget = None;
    let plain = SaapAttention::dense(&config, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(plain.keys_budget(), None);
}
