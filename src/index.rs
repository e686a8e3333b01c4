//! `SaapIndex`: the trained artifact of one model (centroids and classifiers of every layer),
//! saved as safetensors with JSON metadata and sha256 digests (format documented on
//! [`SaapIndex`]).

use crate::budget::ProbeCurve;
use crate::classify::Classifier;
use crate::config::{Routing, SaapConfig};
use crate::error::{all_finite, Result, SaapError};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Format tag in the file's metadata.
pub const FORMAT: &str = "saap-index";
/// Version of the file layout this build reads and writes. Older files are rejected with a
/// message saying to recalibrate: version 1 had no digests (damage could not be told apart from
/// trained values), version 2 stored every tensor in f32 (twice the bytes of version 3's bf16).
pub const FORMAT_VERSION: u32 = 3;

/// Metadata key of the digest of every other metadata entry.
const META_DIGEST: &str = "sha256";
/// Metadata key of the JSON map from tensor name to the digest of its bytes.
const TENSOR_DIGESTS: &str = "tensor_sha256";
/// Metadata key of the sha256 of the model file the index was calibrated for (optional).
const MODEL_SHA256: &str = "model_sha256";
/// Metadata key of the per-layer probe curves (optional).
const PROBE_CURVES: &str = "probe_curves";
/// Metadata key of the per-layer Quest curves (optional).
const QUEST_CURVES: &str = "quest_curves";
/// Metadata key of the per-layer routing when served sparse ([`SaapIndex::sparse_routing`]).
const SPARSE_ROUTING: &str = "sparse_routing";

/// Whether `s` is a lowercase hex sha256 (64 digits).
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `t` as f32 holding its values rounded to bf16 (round to nearest even): the precision an index
/// keeps.
fn bf16_precision(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

/// Trained routing state of one layer. In a [`SaapIndex`] every tensor is f32 holding values of
/// bf16 precision ([`SaapIndex::new`] rounds them).
#[derive(Debug, Clone)]
pub struct LayerIndex {
    /// Key centroids per KV head, `[Hkv, C, D]` f32, in pre-RoPE key space.
    pub centroids: Tensor,
    /// Query classifier per query head.
    pub classifier: Classifier,
    /// How this layer reads keys by default: `Classifier`, or `Dense` where calibration found that
    /// no selector reaches the recall target.
    pub routing: Routing,
}

/// Names of a layer's tensors in the file (`layers.{i}.{name}`), in name order.
const LAYER_TENSORS: [&str; 5] = ["b1", "b2", "centroids", "w1", "w2"];

impl LayerIndex {
    /// The tensors with their names, in the order of [`LAYER_TENSORS`].
    fn tensors(&self) -> [(&'static str, &Tensor); 5] {
        let c = &self.classifier;
        let tensors = [&c.b1, &c.b2, &self.centroids, &c.w1, &c.w2];
        std::array::from_fn(|i| (LAYER_TENSORS[i], tensors[i]))
    }
}

/// The trained artifact of one model: a [`LayerIndex`] per layer, plus the configuration and the
/// name of the model it was trained for (and, optionally, the sha256 of that model's file). Every
/// tensor is finite and has the shape the configuration implies.
///
/// # Precision
///
/// An index keeps its tensors at **bf16 precision**: [`SaapIndex::new`] rounds every centroid
/// and classifier weight to the nearest bf16 (round to nearest even) and holds the result as
/// f32, and the file stores those bf16 values, so a saved and loaded index is the index that was
/// built, bit for bit. Every op uses these values: bf16/f16 ops would round the classifier to
/// bf16 and the centroids to their type anyway; f32 ops widen them to f32 exactly, so an f32 op
/// routes with the bf16-rounded weights and assigns keys to the bf16-rounded centroids (the
/// arithmetic stays f32). Calibration trains in f32 and measures its held-out recall before the
/// rounding; the rounding moves a weight by at most 2⁻⁹ of its magnitude.
///
/// # File format, version 3
///
/// A [safetensors](https://github.com/huggingface/safetensors) file: an 8-byte little-endian
/// header length, a JSON header padded with spaces to a multiple of 8 bytes, then the tensor
/// data. For each layer `i` in `0..n_layers` it holds five BF16 (little-endian, row-major)
/// tensors, with `Hq`, `Hkv`, `D`, `C` and `hidden` from the configuration:
///
/// | name | shape |
/// |---|---|
/// | `layers.{i}.centroids` | `[Hkv, C, D]`, pre-RoPE key centroids |
/// | `layers.{i}.w1` | `[Hq, D, hidden]` |
/// | `layers.{i}.b1` | `[Hq, 1, hidden]` |
/// | `layers.{i}.w2` | `[Hq, hidden, C]` |
/// | `layers.{i}.b2` | `[Hq, 1, C]` |
///
/// and no other tensor. The header's `__metadata__` maps strings to strings:
///
/// | key | value |
/// |---|---|
/// | `format` | `saap-index` |
/// | `version` | `2` ([`FORMAT_VERSION`]) |
/// | `model` | name of the model the index was trained for |
/// | `model_sha256` | optional: lowercase hex sha256 of the model file it was calibrated on |
/// | `probe_curves` | optional: JSON array, per layer a [`ProbeCurve`] or `null` (what each ℓ read and found on held-out text; see [`crate::budget`]) |
/// | `quest_curves` | optional: JSON array, per layer a [`ProbeCurve`] of Quest's pages or `null` (at point u, pages filling u·G/C of the indexed keys; see [`crate::budget`]) |
/// | `sparse_routing` | optional: JSON array of each layer's [`Routing`] when served sparse, `Classifier` or `Quest` (see [`SaapIndex::sparse_routing`]); absent: `Classifier` everywhere |
/// | `n_layers` | number of layers, decimal |
/// | `config` | the [`SaapConfig`] as JSON |
/// | `routing` | JSON array of each layer's [`Routing`] |
/// | `tensor_sha256` | JSON object: tensor name → lowercase hex sha256 of its data bytes |
/// | `sha256` | lowercase hex sha256 of every other metadata entry in key order, each as `key`, a NUL byte, `value`, a NUL byte |
///
/// Keys and tensors are written in sorted order and tensor data in the order of their names,
/// so saving the same index twice gives the same bytes. Loading checks all of the above:
/// digests, names, dtypes, shapes against the configuration (hidden width included), the
/// configuration's limits ([`SaapConfig::validate`]), and that every value is finite.
/// Version 2 differed only in storing F32 tensors and had no `model_sha256`. `probe_curves`
/// came later within version 3: files without it load with no curves, and builds before it
/// ignore it; `sparse_routing` and `quest_curves` likewise.
///
/// Usually made by calibration (`saap::train::calibrate_index`, or `train_layer` per layer);
/// here by hand, with random weights, to show the shapes and a save/load round trip:
///
/// ```
/// use candle_core::{Device, Tensor};
/// use saap::classify::Classifier;
/// use saap::{HeadLayout, LayerIndex, RopeConfig, RopeKind, RopeScaling, Routing, SaapConfig, SaapIndex};
///
/// let dev = Device::Cpu;
/// let layout = HeadLayout { n_q_heads: 4, n_kv_heads: 2, head_dim: 16 };
/// let rope = RopeConfig { kind: RopeKind::Neox, theta: 10_000.0, scaling: RopeScaling::None };
/// let mut config = SaapConfig::new(layout, rope, 8)?; // C = 8
/// config.hidden = 12;
/// let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
/// let layer = LayerIndex {
///     centroids: r(&[2, 8, 16])?, // [Hkv, C, D]
///     classifier: Classifier { w1: r(&[4, 16, 12])?, b1: r(&[4, 1, 12])?, w2: r(&[4, 12, 8])?, b2: r(&[4, 1, 8])? },
///     routing: Routing::Classifier,
/// };
/// let index = SaapIndex::new(config, "my-model", vec![layer])?;
/// let dir = tempfile::tempdir()?; // removed when dropped
/// let path = dir.path().join("my-model.safetensors");
/// index.save(&path)?;
/// let loaded = SaapIndex::load(&path, &dev)?;
/// assert_eq!((loaded.model(), loaded.n_layers()), ("my-model", 1));
/// assert_eq!(loaded.config(), index.config());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SaapIndex {
    config: SaapConfig,
    model: String,
    model_sha256: Option<String>,
    layers: Vec<LayerIndex>,
    /// Per layer, what each ℓ read and found on held-out text, where calibration measured it.
    probe_curves: Vec<Option<ProbeCurve>>,
    /// Per layer, what Quest's pages read and found at each uniform ℓ's budget, likewise.
    quest_curves: Vec<Option<ProbeCurve>>,
    /// Per layer, how it reads keys when served sparse (`Classifier` or `Quest`).
    sparse_routing: Vec<Routing>,
}

/// Lowercase hex sha256 of `parts`, each fed in turn.
fn sha256_hex<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Digest of the metadata: every entry but the digest itself, as `key NUL value NUL`.
fn metadata_digest(meta: &BTreeMap<String, String>) -> String {
    sha256_hex(
        meta.iter()
            .filter(|(key, _)| *key != META_DIGEST)
            .flat_map(|(k, v)| [k.as_bytes(), b"\0", v.as_bytes(), b"\0"]),
    )
}

/// One tensor's entry in the safetensors header.
#[derive(Serialize)]
struct HeaderEntry<'a> {
    dtype: &'static str,
    shape: &'a [usize],
    data_offsets: [usize; 2],
}

impl SaapIndex {
    /// Assembles an index, checking every layer against `config`, and rounds every tensor to
    /// bf16 precision (held as f32 on the tensor's device; see *Precision* above).
    ///
    /// # Errors
    /// [`SaapError::Config`] for an invalid configuration or no layers;
    /// [`SaapError::Shape`] for a tensor whose shape does not follow from `config`;
    /// [`SaapError::UnsupportedDType`] for a tensor that is not f32, bf16 or f16;
    /// [`SaapError::NonFinite`] for a NaN or infinity in any tensor, also one that rounding to
    /// bf16 makes (a magnitude above bf16's largest finite value, about 3.39e38).
    pub fn new(
        config: SaapConfig,
        model: impl Into<String>,
        layers: Vec<LayerIndex>,
    ) -> Result<Self> {
        config.validate()?;
        if layers.is_empty() {
            return Err(SaapError::Config(
                "an index needs at least one layer".into(),
            ));
        }
        let l = config.layout;
        let mut rounded = Vec::with_capacity(layers.len());
        for layer in layers {
            let expected = [l.n_kv_heads, config.n_partitions, l.head_dim];
            if layer.centroids.dims() != expected {
                return Err(SaapError::Shape {
                    name: "centroids",
                    expected: format!("{expected:?}"),
                    got: layer.centroids.dims().to_vec(),
                });
            }
            layer
                .classifier
                .check(l.n_q_heads, l.head_dim, config.hidden, config.n_partitions)?;
            for (_, tensor) in layer.tensors() {
                if !matches!(tensor.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                    return Err(SaapError::UnsupportedDType(tensor.dtype()));
                }
            }
            let c = &layer.classifier;
            let layer = LayerIndex {
                centroids: bf16_precision(&layer.centroids)?,
                classifier: Classifier {
                    w1: bf16_precision(&c.w1)?,
                    b1: bf16_precision(&c.b1)?,
                    w2: bf16_precision(&c.w2)?,
                    b2: bf16_precision(&c.b2)?,
                },
                routing: layer.routing,
            };
            for (name, tensor) in layer.tensors() {
                // NaN weights or centroids make NaN routing scores: arbitrary partitions read.
                if !all_finite(&[tensor])? {
                    return Err(SaapError::NonFinite(name));
                }
            }
            rounded.push(layer);
        }
        Ok(Self {
            config,
            model: model.into(),
            model_sha256: None,
            probe_curves: vec![None; rounded.len()],
            quest_curves: vec![None; rounded.len()],
            sparse_routing: vec![Routing::Classifier; rounded.len()],
            layers: rounded,
        })
    }

    /// Records the sha256 of the model file the index was calibrated on (saved with it), so that
    /// a tool can refuse the index for another model of the same shape.
    ///
    /// # Errors
    /// [`SaapError::Config`] unless `sha256` is 64 lowercase hex digits.
    pub fn with_model_sha256(mut self, sha256: impl Into<String>) -> Result<Self> {
        let sha256 = sha256.into();
        if !is_sha256_hex(&sha256) {
            return Err(SaapError::Config(format!(
                "model sha256 `{sha256}` is not 64 lowercase hex digits"
            )));
        }
        self.model_sha256 = Some(sha256);
        Ok(self)
    }

    /// Records each layer's probe curve (saved with the index), from which
    /// [`crate::budget::plan_probes`] spends a keys budget layer by layer.
    ///
    /// # Errors
    /// [`SaapError::Config`] unless there is one entry per layer and every curve passes
    /// [`ProbeCurve::check`] for this index's C.
    pub fn with_probe_curves(mut self, curves: Vec<Option<ProbeCurve>>) -> Result<Self> {
        self.probe_curves = self.checked_curves(curves, "probe")?;
        Ok(self)
    }

    /// Records each layer's Quest curve (saved with the index): what Quest's pages read and
    /// find at the keys budgets of each uniform ℓ, from which [`crate::budget::plan_probes`]
    /// spends a keys budget over the layers routed by Quest as well.
    ///
    /// # Errors
    /// As [`SaapIndex::with_probe_curves`].
    pub fn with_quest_curves(mut self, curves: Vec<Option<ProbeCurve>>) -> Result<Self> {
        self.quest_curves = self.checked_curves(curves, "Quest")?;
        Ok(self)
    }

    /// `curves` if there is one per layer and each passes [`ProbeCurve::check`] for this C.
    fn checked_curves(
        &self,
        curves: Vec<Option<ProbeCurve>>,
        kind: &str,
    ) -> Result<Vec<Option<ProbeCurve>>> {
        if curves.len() != self.layers.len() {
            return Err(SaapError::Config(format!(
                "{} {kind} curves for {} layers",
                curves.len(),
                self.layers.len()
            )));
        }
        for curve in curves.iter().flatten() {
            curve.check(self.config.n_partitions)?;
        }
        Ok(curves)
    }

    /// Per layer, its probe curve where calibration measured one.
    pub fn probe_curves(&self) -> &[Option<ProbeCurve>] {
        &self.probe_curves
    }

    /// Per layer, its Quest curve where calibration measured one.
    pub fn quest_curves(&self) -> &[Option<ProbeCurve>] {
        &self.quest_curves
    }

    /// Records how each layer reads keys when it is served sparse (with
    /// [`crate::models::Llama::serve_all_sparse`], or the CLIs' `--hybrid`): `Classifier`, or
    /// `Quest` where calibration found Quest's pages holding more of the held-out attention than
    /// the classifier's partitions at the same keys read.
    ///
    /// # Errors
    /// [`SaapError::Config`] unless there is one entry per layer, each `Classifier` or `Quest`.
    pub fn with_sparse_routing(mut self, routing: Vec<Routing>) -> Result<Self> {
        if routing.len() != self.layers.len() {
            return Err(SaapError::Config(format!(
                "{} sparse routings for {} layers",
                routing.len(),
                self.layers.len()
            )));
        }
        if let Some(r) = routing
            .iter()
            .find(|r| !matches!(r, Routing::Classifier | Routing::Quest))
        {
            return Err(SaapError::Config(format!(
                "sparse routing {r:?}: a layer served sparse is routed by the classifier or Quest"
            )));
        }
        self.sparse_routing = routing;
        Ok(self)
    }

    /// Per layer, how it reads keys when served sparse: `Classifier` unless calibration recorded
    /// `Quest` ([`SaapIndex::with_sparse_routing`]).
    pub fn sparse_routing(&self) -> &[Routing] {
        &self.sparse_routing
    }

    /// The sha256 of the model file the index was calibrated on, if it was recorded.
    pub fn model_sha256(&self) -> Option<&str> {
        self.model_sha256.as_deref()
    }

    /// The configuration the index was trained with.
    pub fn config(&self) -> &SaapConfig {
        &self.config
    }

    /// Name of the model the index was trained for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// One layer's routing state.
    ///
    /// # Errors
    /// [`SaapError::IndexMismatch`] when the index has no layer `layer`.
    pub fn layer(&self, layer: usize) -> Result<&LayerIndex> {
        self.layers.get(layer).ok_or_else(|| {
            SaapError::IndexMismatch(format!(
                "layer {layer} requested from an index of {} layers",
                self.layers.len()
            ))
        })
    }

    /// Sets a layer's default routing (e.g. dense for layers calibration found unservable).
    ///
    /// # Errors
    /// [`SaapError::IndexMismatch`] when the index has no layer `layer`.
    pub fn set_layer_routing(&mut self, layer: usize, routing: Routing) -> Result<()> {
        let n = self.layers.len();
        let entry = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| SaapError::IndexMismatch(format!("layer {layer} of {n}")))?;
        entry.routing = routing;
        Ok(())
    }

    /// Checks that this index fits a model with `config`'s head layout and RoPE, and `n_layers`.
    ///
    /// # Errors
    /// [`SaapError::IndexMismatch`] naming the first difference.
    pub fn check_model(&self, config: &SaapConfig, n_layers: usize) -> Result<()> {
        if config.layout != self.config.layout {
            return Err(SaapError::IndexMismatch(format!(
                "index head layout {:?}, model {:?}",
                self.config.layout, config.layout
            )));
        }
        if config.rope != self.config.rope {
            return Err(SaapError::IndexMismatch(format!(
                "index RoPE {:?}, model {:?}",
                self.config.rope, config.rope
            )));
        }
        if n_layers != self.layers.len() {
            return Err(SaapError::IndexMismatch(format!(
                "index has {} layers, model {n_layers}",
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// Checks that this index was calibrated on the model file whose sha256 is `sha256`, when the
    /// index recorded one (an index without a recorded sha256 passes).
    ///
    /// # Errors
    /// [`SaapError::IndexMismatch`] naming both digests when they differ.
    pub fn check_model_sha256(&self, sha256: &str) -> Result<()> {
        match &self.model_sha256 {
            Some(own) if own != sha256 => Err(SaapError::IndexMismatch(format!(
                "index calibrated on model `{}` (file sha256 {own}), this model file has sha256 \
                 {sha256}",
                self.model
            ))),
            _ => Ok(()),
        }
    }

    /// The file's bytes (see the format above): the same index always gives the same bytes.
    fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut data: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, t) in layer.tensors() {
                // Exact: the tensors already hold bf16 values.
                let values = t
                    .to_dtype(DType::BF16)?
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?;
                let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                data.insert(format!("layers.{i}.{name}"), (t.dims().to_vec(), bytes));
            }
        }
        let digests: BTreeMap<&String, String> = data
            .iter()
            .map(|(name, (_, bytes))| (name, sha256_hex([bytes.as_slice()])))
            .collect();
        let routing: Vec<Routing> = self.layers.iter().map(|l| l.routing).collect();
        let mut meta = BTreeMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), FORMAT_VERSION.to_string()),
            ("model".to_string(), self.model.clone()),
            ("n_layers".to_string(), self.layers.len().to_string()),
            ("config".to_string(), json(&self.config)?),
            ("routing".to_string(), json(&routing)?),
            (TENSOR_DIGESTS.to_string(), json(&digests)?),
        ]);
        if let Some(sha) = &self.model_sha256 {
            meta.insert(MODEL_SHA256.to_string(), sha.clone());
        }
        for (key, curves) in [
            (PROBE_CURVES, &self.probe_curves),
            (QUEST_CURVES, &self.quest_curves),
        ] {
            if curves.iter().any(Option::is_some) {
                meta.insert(key.to_string(), json(curves)?);
            }
        }
        if self
            .sparse_routing
            .iter()
            .any(|&r| r != Routing::Classifier)
        {
            meta.insert(SPARSE_ROUTING.to_string(), json(&self.sparse_routing)?);
        }
        meta.insert(META_DIGEST.to_string(), metadata_digest(&meta));
        let mut header = BTreeMap::from([(
            "__metadata__".to_string(),
            serde_json::to_value(&meta).map_err(format_error)?,
        )]);
        let mut offset = 0;
        for (name, (shape, bytes)) in &data {
            let entry = HeaderEntry {
                dtype: "BF16",
                shape,
                data_offsets: [offset, offset + bytes.len()],
            };
            offset += bytes.len();
            let entry = serde_json::to_value(&entry).map_err(format_error)?;
            header.insert(name.clone(), entry);
        }
        let mut header = json(&header)?.into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut file = Vec::with_capacity(8 + header.len() + offset);
        file.extend((header.len() as u64).to_le_bytes());
        file.extend(header);
        for (_, bytes) in data.values() {
            file.extend(bytes);
        }
        Ok(file)
    }

    /// Writes the index as safetensors (bf16 tensors) with JSON metadata and digests, in the
    /// format documented on [`SaapIndex`]. The file is written next to `path` and renamed into
    /// place, so a failed save leaves any previous file whole.
    ///
    /// # Errors
    /// [`SaapError::Io`] when the file cannot be written; [`SaapError::Candle`] when a tensor
    /// cannot be read back from its device.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, path)?;
        Ok(())
    }

    /// Reads an index written by [`SaapIndex::save`], onto `device`.
    ///
    /// # Errors
    /// [`SaapError::IndexFormat`], its message starting with the path, when the file cannot be
    /// read, is damaged (a digest differs, the container is malformed, a tensor is missing, extra,
    /// not BF16, of the wrong shape or not finite), has another format version (the message then
    /// says to recalibrate), or holds an invalid configuration or model sha256. [`SaapError::Candle`] when the checked tensors cannot be moved to `device`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let index = Self::read(path)
            .map_err(|why| SaapError::IndexFormat(format!("{}: {why}", path.display())))?;
        let on_device = |t: &Tensor| t.to_device(device);
        let layers = index
            .layers
            .iter()
            .map(|l| {
                let c = &l.classifier;
                Ok(LayerIndex {
                    centroids: on_device(&l.centroids)?,
                    classifier: Classifier {
                        w1: on_device(&c.w1)?,
                        b1: on_device(&c.b1)?,
                        w2: on_device(&c.w2)?,
                        b2: on_device(&c.b2)?,
                    },
                    routing: l.routing,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, ..index })
    }

    /// Reads and checks a file on the CPU; the error says why it was rejected.
    fn read(path: &Path) -> std::result::Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read ({e})"))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| format!("not a safetensors file ({e})"))?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .ok_or("no metadata")?
            .into_iter()
            .collect();
        let field = |key: &str| {
            meta.get(key)
                .map(String::as_str)
                .ok_or_else(|| format!("metadata lacks `{key}`"))
        };
        if field("format")? != FORMAT {
            return Err(format!("format `{}` is not `{FORMAT}`", field("format")?));
        }
        let version = field("version")?;
        if version != FORMAT_VERSION.to_string() {
            return Err(format!(
                "format version {version}, this build reads version {FORMAT_VERSION} \
                 (recalibrate to write one)"
            ));
        }
        if field(META_DIGEST)? != metadata_digest(&meta) {
            return Err("metadata digest mismatch: the header was altered or damaged".into());
        }
        /// A metadata entry's JSON `text` as a `T`; the error names the entry.
        fn parse<T: serde::de::DeserializeOwned>(
            key: &str,
            text: &str,
        ) -> std::result::Result<T, String> {
            serde_json::from_str(text).map_err(|e| format!("{key}: {e}"))
        }
        let config: SaapConfig = parse("config", field("config")?)?;
        let routing: Vec<Routing> = parse("routing", field("routing")?)?;
        let digests: BTreeMap<String, String> = parse(TENSOR_DIGESTS, field(TENSOR_DIGESTS)?)?;
        let n_layers: usize = field("n_layers")?
            .parse()
            .map_err(|e| format!("n_layers: {e}"))?;
        if routing.len() != n_layers {
            return Err(format!("{} routings for {n_layers} layers", routing.len()));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| format!("damaged tensors ({e})"))?;
        // Each layer's tensors are looked up by name below: equal counts leave no extra one.
        let expected = LAYER_TENSORS.len().saturating_mul(n_layers);
        if st.len() != expected || digests.len() != expected {
            return Err(format!(
                "{} tensors and {} digests, {n_layers} layers need {expected}",
                st.len(),
                digests.len(),
            ));
        }
        let tensor = |name: &String| -> std::result::Result<Tensor, String> {
            let view = st.tensor(name).map_err(|e| format!("{name}: {e}"))?;
            if view.dtype() != safetensors::Dtype::BF16 {
                return Err(format!(
                    "{name}: dtype {}, the format stores BF16",
                    view.dtype()
                ));
            }
            if digests.get(name).map(String::as_str) != Some(&sha256_hex([view.data()])) {
                return Err(format!(
                    "{name}: data digest mismatch, the tensor is damaged"
                ));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect();
            Tensor::from_vec(values, view.shape(), &Device::Cpu).map_err(|e| format!("{name}: {e}"))
        };
        let layers = routing
            .into_iter()
            .enumerate()
            .map(|(i, routing)| {
                let [b1, b2, centroids, w1, w2] =
                    LAYER_TENSORS.map(|name| format!("layers.{i}.{name}"));
                Ok(LayerIndex {
                    centroids: tensor(&centroids)?,
                    classifier: Classifier {
                        w1: tensor(&w1)?,
                        b1: tensor(&b1)?,
                        w2: tensor(&w2)?,
                        b2: tensor(&b2)?,
                    },
                    routing,
                })
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        let index = Self::new(config, field("model")?, layers).map_err(|e| e.to_string())?;
        let index = match meta.get(MODEL_SHA256) {
            Some(sha) => index
                .with_model_sha256(sha.as_str())
                .map_err(|e| format!("{MODEL_SHA256}: {e}"))?,
            None => index,
        };
        // Optional entries: checked as the builders check them.
        let index = match meta.get(PROBE_CURVES) {
            Some(text) => index
                .with_probe_curves(parse(PROBE_CURVES, text)?)
                .map_err(|e| format!("{PROBE_CURVES}: {e}"))?,
            None => index,
        };
        let index = match meta.get(QUEST_CURVES) {
            Some(text) => index
                .with_quest_curves(parse(QUEST_CURVES, text)?)
                .map_err(|e| format!("{QUEST_CURVES}: {e}"))?,
            None => index,
        };
        match meta.get(SPARSE_ROUTING) {
            Some(text) => index
                .with_sparse_routing(parse(SPARSE_ROUTING, text)?)
                .map_err(|e| format!("{SPARSE_ROUTING}: {e}")),
            None => Ok(index),
        }
    }
}

fn format_error(e: serde_json::Error) -> SaapError {
    SaapError::IndexFormat(e.to_string())
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(format_error)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{HeadLayout, RopeConfig, RopeKind, RopeScaling};

    /// A layer of `config`'s shapes with every value `value`.
    pub(crate) fn layer(config: &SaapConfig, value: f32) -> LayerIndex {
        let l = config.layout;
        let (c, h) = (config.n_partitions, config.hidden);
        let full = |shape: &[usize]| Tensor::full(value, shape, &Device::Cpu).unwrap();
        LayerIndex {
            centroids: full(&[l.n_kv_heads, c, l.head_dim]),
            classifier: Classifier {
                w1: full(&[l.n_q_heads, l.head_dim, h]),
                b1: full(&[l.n_q_heads, 1, h]),
                w2: full(&[l.n_q_heads, h, c]),
                b2: full(&[l.n_q_heads, 1, c]),
            },
            routing: Routing::Classifier,
        }
    }

    /// 4 query heads, 2 KV heads of 8 dimensions, C = 8, hidden width 4.
    pub(crate) fn config() -> SaapConfig {
        let layout = HeadLayout {
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let rope = RopeConfig {
            kind: RopeKind::Neox,
            theta: 10_000.0,
            scaling: RopeScaling::None,
        };
        let mut config = SaapConfig::new(layout, rope, 8).unwrap();
        config.hidden = 4;
        config
    }

    #[test]
    fn tensors_are_kept_and_stored_at_bf16_precision() {
        let config = config();
        // 1 + 2⁻⁹ lies halfway between two bf16 values: ties go to the even one, 1.0;
        // 1 + 3·2⁻⁹ rounds up to 1 + 2⁻⁷.
        let tie = 1.0 + 2f32.powi(-9);
        let index = SaapIndex::new(config.clone(), "m", vec![layer(&config, tie)]).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let l = index.layer(0).unwrap();
        assert!(values(&l.centroids).iter().all(|&x| x == 1.0));
        assert!(values(&l.classifier.w2).iter().all(|&x| x == 1.0));
        let up = 1.0 + 3.0 * 2f32.powi(-9);
        let index = SaapIndex::new(config.clone(), "m", vec![layer(&config, up)]).unwrap();
        let w1 = values(&index.layer(0).unwrap().classifier.w1);
        assert!(w1.iter().all(|&x| x == 1.0 + 2f32.powi(-7)), "{w1:?}");
        // Beyond bf16's largest finite value, rounding makes infinity: refused.
        assert!(matches!(
            SaapIndex::new(config.clone(), "m", vec![layer(&config, f32::MAX)]),
            Err(SaapError::NonFinite(_))
        ));
    }

    #[test]
    fn file_holds_two_bytes_per_value_and_the_model_digest() {
        let config = config();
        let sha = "ab".repeat(32);
        let index = SaapIndex::new(config.clone(), "m", vec![layer(&config, 0.5)])
            .unwrap()
            .with_model_sha256(sha.clone())
            .unwrap();
        let bytes = index.to_bytes().unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // centroids 2·8·8, w1 4·8·4, b1 4·4, w2 4·4·8, b2 4·8 values.
        let values = 128 + 128 + 16 + 128 + 32;
        assert_eq!(bytes.len(), 8 + header + 2 * values);
        let dir = std::env::temp_dir().join(format!("saap-index-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("i.safetensors");
        index.save(&path).unwrap();
        let loaded = SaapIndex::load(&path, &Device::Cpu);
        std::fs::remove_dir_all(&dir).unwrap();
        let loaded = loaded.unwrap();
        assert_eq!(loaded.model_sha256(), Some(sha.as_str()));
        loaded.check_model_sha256(&sha).unwrap();
        assert!(matches!(
            loaded.check_model_sha256(&"cd".repeat(32)),
            Err(SaapError::IndexMismatch(msg)) if msg.contains(&sha)
        ));
        assert!(matches!(
            index.clone().with_model_sha256("ABCD"),
            Err(SaapError::Config(_))
        ));
    }

    #[test]
    fn curves_are_saved_checked_and_optional() {
        type With = fn(SaapIndex, Vec<Option<ProbeCurve>>) -> Result<SaapIndex>;
        type Get = fn(&SaapIndex) -> &[Option<ProbeCurve>];
        let kinds: [(&str, With, Get); 2] = [
            (
                PROBE_CURVES,
                SaapIndex::with_probe_curves,
                SaapIndex::probe_curves,
            ),
            (
                QUEST_CURVES,
                SaapIndex::with_quest_curves,
                SaapIndex::quest_curves,
            ),
        ];
        let config = config();
        let index = SaapIndex::new(config.clone(), "m", vec![layer(&config, 0.5); 2]).unwrap();
        let curve = ProbeCurve {
            indexed_mass: 0.25,
            indexed_share: vec![0.1, 0.2, 0.35],
            indexed_recall: vec![0.4, 0.6, 0.7],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.safetensors");
        // Without curves: none saved, none loaded.
        index.save(&path).unwrap();
        let loaded = SaapIndex::load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.probe_curves(), &[None, None]);
        assert_eq!(loaded.quest_curves(), &[None, None]);
        for (key, with_curves, curves) in kinds {
            let with = with_curves(index.clone(), vec![None, Some(curve.clone())]).unwrap();
            with.save(&path).unwrap();
            let loaded = SaapIndex::load(&path, &Device::Cpu).unwrap();
            assert_eq!(curves(&loaded), &[None, Some(curve.clone())], "{key}");
            // The other kind stays without curves.
            let other = kinds.iter().find(|k| k.0 != key).unwrap().2;
            assert_eq!(other(&loaded), &[None, None], "{key}");
            // One per layer, each valid for this C.
            assert!(with_curves(index.clone(), vec![None]).is_err());
            let mut long = curve.clone();
            long.indexed_share = vec![0.1; 9];
            long.indexed_recall = vec![0.1; 9];
            assert!(with_curves(index.clone(), vec![None, Some(long)]).is_err());
            // A file whose digests agree but whose curve is out of range is refused on load.
            let mut bad = curve.clone();
            bad.indexed_recall[2] = 1.5;
            let mut tampered = with.clone();
            match key {
                PROBE_CURVES => tampered.probe_curves[1] = Some(bad),
                _ => tampered.quest_curves[1] = Some(bad),
            }
            std::fs::write(&path, tampered.to_bytes().unwrap()).unwrap();
            assert!(matches!(
                SaapIndex::load(&path, &Device::Cpu),
                Err(SaapError::IndexFormat(msg)) if msg.contains(key) && msg.contains("1.5")
            ));
        }
    }

    #[test]
    fn sparse_routing_is_saved_checked_and_optional() {
        let config = config();
        let index = SaapIndex::new(config.clone(), "m", vec![layer(&config, 0.5); 2]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.safetensors");
        // Classifier everywhere is the default, and is not written.
        index.save(&path).unwrap();
        let plain = std::fs::read(&path).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains(SPARSE_ROUTING));
        let loaded = SaapIndex::load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.sparse_routing(), &[Routing::Classifier; 2]);
        let hybrid = vec![Routing::Quest, Routing::Classifier];
        let with = index.clone().with_sparse_routing(hybrid.clone()).unwrap();
        with.save(&path).unwrap();
        assert_eq!(
            SaapIndex::load(&path, &Device::Cpu)
                .unwrap()
                .sparse_routing(),
            hybrid.as_slice()
        );
        // One per layer, and only the two sparse routings.
        assert!(index
            .clone()
            .with_sparse_routing(vec![Routing::Quest])
            .is_err());
        for other in [Routing::Dense, Routing::NearestCentroid] {
            assert!(matches!(
                index
                    .clone()
                    .with_sparse_routing(vec![Routing::Classifier, other]),
                Err(SaapError::Config(_))
            ));
        }
        // A file whose digests agree but which serves a layer dense "sparsely" is refused.
        let mut bad = with.clone();
        bad.sparse_routing[1] = Routing::Dense;
        std::fs::write(&path, bad.to_bytes().unwrap()).unwrap();
        assert!(matches!(
            SaapIndex::load(&path, &Device::Cpu),
            Err(SaapError::IndexFormat(msg)) if msg.contains(SPARSE_ROUTING)
        ));
    }
}
