//! Shared helpers of the integration tests: seeded random tensors and indexes.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use saap::classify::Classifier;
use saap::{
    HeadLayout, LayerIndex, RopeConfig, RopeKind, RopeScaling, Routing, SaapAttention, SaapConfig,
    SaapIndex,
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

/// GPU 0, or `None` with a line saying the test skips (no CUDA device or no `cuda` feature).
pub fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            println!("skipping: no CUDA device ({e})");
            None
        }
    }
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

/// An index file taken apart, to be edited as an attacker or a damaged disk would: the JSON
/// header of the safetensors container and the tensor data after it.
#[derive(Clone)]
pub struct IndexFile {
    pub header: serde_json::Map<String, serde_json::Value>,
    pub data: Vec<u8>,
}

impl IndexFile {
    pub fn parse(bytes: &[u8]) -> Self {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(bytes[8..8 + n].trim_ascii_end()).unwrap();
        Self {
            header,
            data: bytes[8 + n..].to_vec(),
        }
    }

    pub fn metadata(&self, key: &str) -> String {
        self.header["__metadata__"][key]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn set_metadata(&mut self, key: &str, value: impl Into<String>) {
        self.header["__metadata__"][key] = serde_json::Value::String(value.into());
    }

    /// Names of the tensors whose data offsets are well formed, in data order.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .header
            .keys()
            .filter(|k| *k != "__metadata__" && self.try_offsets(k).is_some())
            .cloned()
            .collect();
        names.sort_by_key(|n| self.offsets(n).0);
        names
    }

    /// A tensor's data range, if its header entry holds one inside the data.
    fn try_offsets(&self, name: &str) -> Option<(usize, usize)> {
        let o = &self.header[name]["data_offsets"];
        let (a, b) = (o[0].as_u64()? as usize, o[1].as_u64()? as usize);
        (a <= b && b <= self.data.len()).then_some((a, b))
    }

    pub fn offsets(&self, name: &str) -> (usize, usize) {
        self.try_offsets(name).unwrap()
    }

    pub fn tensor_data(&mut self, name: &str) -> &mut [u8] {
        let (a, b) = self.offsets(name);
        &mut self.data[a..b]
    }

    /// Recomputes the digests the way the format documents them (independently of the crate's
    /// code), so that only the loader's other checks stand between an edit and acceptance.
    pub fn reseal(&mut self) {
        use sha2::{Digest, Sha256};
        let hex = |parts: &[&[u8]]| -> String {
            let mut h = Sha256::new();
            for p in parts {
                h.update(p);
            }
            h.finalize().iter().map(|b| format!("{b:02x}")).collect()
        };
        let digests: std::collections::BTreeMap<String, String> = self
            .tensor_names()
            .into_iter()
            .map(|name| {
                let (a, b) = self.offsets(&name);
                let digest = hex(&[&self.data[a..b]]);
                (name, digest)
            })
            .collect();
        self.set_metadata("tensor_sha256", serde_json::to_string(&digests).unwrap());
        let meta = self.header["__metadata__"].as_object().unwrap();
        let mut parts: Vec<&[u8]> = Vec::new();
        for (k, v) in meta.iter().filter(|(k, _)| *k != "sha256") {
            parts.extend([k.as_bytes(), b"\0", v.as_str().unwrap().as_bytes(), b"\0"]);
        }
        let digest = hex(&parts);
        self.set_metadata("sha256", digest);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut header = serde_json::to_vec(&self.header).unwrap();
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(&self.data);
        out
    }
}

/// Whether two indexes hold the same configuration, model, routings and tensor bits.
pub fn same_index(a: &SaapIndex, b: &SaapIndex) -> bool {
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let layer_bits = |l: &LayerIndex| {
        let c = &l.classifier;
        [&l.centroids, &c.w1, &c.b1, &c.w2, &c.b2].map(|t| (t.dims().to_vec(), bits(t)))
    };
    a.config() == b.config()
        && a.model() == b.model()
        && a.n_layers() == b.n_layers()
        && (0..a.n_layers()).all(|i| {
            let (la, lb) = (a.layer(i).unwrap(), b.layer(i).unwrap());
            la.routing == lb.routing && layer_bits(la) == layer_bits(lb)
        })
}

/// Plain f64 RoPE of one head vector at `pos`.
pub fn rope_ref(x: &[f32], pos: usize, kind: RopeKind, theta: f64) -> Vec<f64> {
    let d = x.len();
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for i in 0..d / 2 {
        let angle = pos as f64 * theta.powf(-(2.0 * i as f64) / d as f64);
        let (a, b) = match kind {
            RopeKind::Interleaved => (2 * i, 2 * i + 1),
            RopeKind::Neox => (i, i + d / 2),
        };
        let (x0, x1) = (x[a] as f64, x[b] as f64);
        out[a] = x0 * angle.cos() - x1 * angle.sin();
        out[b] = x0 * angle.sin() + x1 * angle.cos();
    }
    out
}

/// Quest routing whose page scores overflow f32 is refused on `dev`: an op holding 80 keys of
/// magnitude 1e20 (appended with `extend`, so no attention overflows first), switched to Quest;
/// a decode step with finite queries of magnitude 1e20 fails as non-finite routing scores and
/// leaves the sequences as they were, a NaN query fails as non-finite `q`, and unchecked the
/// overflowing step runs without panicking.
pub fn quest_overflow_is_reported(dev: &Device) {
    use saap::SaapError;
    let config = config(4, 2, 64, 8, RopeKind::Neox);
    let mut r = rng(11);
    let on = |x: Tensor| x.to_device(dev).unwrap();
    let huge_k = on((randn(&mut r, &[1, 2, 80, 64], 1.0) * 1e20).unwrap());
    let v = on(randn(&mut r, &[1, 2, 80, 64], 1.0));
    let q = on((randn(&mut r, &[1, 4, 1, 64], 1.0) * 1e20).unwrap());
    let (k1, v1) = (
        on(randn(&mut r, &[1, 2, 1, 64], 1.0)),
        on(randn(&mut r, &[1, 2, 1, 64], 1.0)),
    );
    let nan_q = (q.zeros_like().unwrap() * f64::NAN).unwrap();
    for checked in [true, false] {
        let mut op = SaapAttention::dense(&config, dev, DType::F32).unwrap();
        op.extend(&huge_k, &v, &[80]).unwrap();
        op.set_routing(Routing::Quest).unwrap();
        op.set_check_finite(checked);
        let pages = op.page_bounds().expect("Quest pages").0.dim(2).unwrap();
        assert!(pages > 0, "no page to route over");
        if checked {
            assert!(matches!(
                op.decode(&nan_q, &k1, &v1),
                Err(SaapError::NonFinite("q"))
            ));
            match op.decode(&q, &k1, &v1) {
                Err(SaapError::NonFinite(what)) => assert_eq!(what, "routing scores"),
                other => panic!("{:?}: {other:?}", dev.location()),
            }
            assert_eq!(op.seq_lens(), &[80], "a rejected step is not cached");
        } else {
            op.decode(&q, &k1, &v1).unwrap();
            assert_eq!(op.seq_lens(), &[81]);
        }
    }
}

/// Shapes of one direct Quest routing case: `(B, Hq, Hkv, D, P, k)`.
pub type QuestShape = (usize, usize, usize, usize, usize, usize);

/// Random Quest routing inputs on the CPU: queries `[B, Hq, D]` in `dtype`, bounds
/// `[B, Hkv, P, D]` (min <= max) and `filled` `[B, Hkv, P]`, item `i` holding `pages[i]` pages
/// (bounds of the others zero, as `QuestPages` keeps them). With `exact`, small integers: every
/// score is exact in f32 whatever the order of summation, so scores tie exactly and often.
pub fn quest_inputs(
    r: &mut StdRng,
    dtype: DType,
    (b, hq, hkv, d, p, _): QuestShape,
    pages: &[usize],
    exact: bool,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let mut value = |lo: i32, hi: i32| -> f32 {
        if exact {
            r.random_range(lo..=hi) as f32
        } else {
            r.random_range(lo as f32..hi as f32)
        }
    };
    let q: Vec<f32> = (0..b * hq * d).map(|_| value(-2, 2)).collect();
    let (mut min, mut max) = (vec![0f32; b * hkv * p * d], vec![0f32; b * hkv * p * d]);
    let mut filled = vec![0u8; b * hkv * p];
    for (i, &n) in pages.iter().enumerate().take(b) {
        for h in 0..hkv {
            for page in 0..n {
                let row = (i * hkv + h) * p + page;
                filled[row] = 1;
                for e in row * d..(row + 1) * d {
                    let (mid, half) = (value(-3, 3), value(0, 2));
                    (min[e], max[e]) = (mid - half, mid + half);
                }
            }
        }
    }
    let cpu = &Device::Cpu;
    (
        Tensor::from_vec(q, (b, hq, d), cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        Tensor::from_vec(min, (b, hkv, p, d), cpu).unwrap(),
        Tensor::from_vec(max, (b, hkv, p, d), cpu).unwrap(),
        Tensor::from_vec(filled, (b, hkv, p), cpu).unwrap(),
    )
}
