//! `SaapIndex`: the trained artifact of one model (centroids and classifiers of every layer),
//! saved as safetensors with JSON metadata.

use crate::classify::Classifier;
use crate::config::{Routing, SaapConfig};
use crate::error::{Result, SaapError};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Format tag in the file's metadata.
pub const FORMAT: &str = "saap-index";
/// Version of the file layout this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Trained routing state of one layer.
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

/// The trained artifact of one model: a [`LayerIndex`] per layer, plus the configuration and the
/// name of the model it was trained for.
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
    layers: Vec<LayerIndex>,
}

impl SaapIndex {
    /// Assembles an index, checking every layer's shapes against `config`.
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
        for layer in &layers {
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
                .check(l.n_q_heads, l.head_dim, config.n_partitions)?;
        }
        Ok(Self {
            config,
            model: model.into(),
            layers,
        })
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
    pub fn layer(&self, layer: usize) -> Result<&LayerIndex> {
        self.layers.get(layer).ok_or_else(|| {
            SaapError::IndexMismatch(format!(
                "layer {layer} requested from an index of {} layers",
                self.layers.len()
            ))
        })
    }

    /// Sets a layer's default routing (e.g. dense for layers calibration found unservable).
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

    /// Writes the index as safetensors (f32 tensors) with JSON metadata.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let c = &layer.classifier;
            for (name, t) in [
                ("centroids", &layer.centroids),
                ("w1", &c.w1),
                ("b1", &c.b1),
                ("w2", &c.w2),
                ("b2", &c.b2),
            ] {
                let t = t
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .contiguous()?;
                tensors.push((format!("layers.{i}.{name}"), t));
            }
        }
        let routing: Vec<Routing> = self.layers.iter().map(|l| l.routing).collect();
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), FORMAT_VERSION.to_string()),
            ("model".to_string(), self.model.clone()),
            ("n_layers".to_string(), self.layers.len().to_string()),
            ("config".to_string(), json(&self.config)?),
            ("routing".to_string(), json(&routing)?),
        ]);
        safetensors::serialize_to_file(tensors, Some(metadata), path.as_ref())?;
        Ok(())
    }

    /// Reads an index written by [`SaapIndex::save`], onto `device`. A damaged file, another
    /// format version, or tensors that do not fit the stored configuration are
    /// [`SaapError::IndexFormat`].
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path.as_ref())?;
        let bad =
            |what: String| SaapError::IndexFormat(format!("{}: {what}", path.as_ref().display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("no metadata".into()))?;
        let field = |key: &str| {
            meta.get(key)
                .ok_or_else(|| bad(format!("metadata lacks `{key}`")))
        };
        if field("format")? != FORMAT {
            return Err(bad(format!(
                "format `{}` is not `{FORMAT}`",
                field("format")?
            )));
        }
        let version = field("version")?;
        if version != &FORMAT_VERSION.to_string() {
            return Err(bad(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        let config: SaapConfig =
            serde_json::from_str(field("config")?).map_err(|e| bad(format!("config: {e}")))?;
        let routing: Vec<Routing> =
            serde_json::from_str(field("routing")?).map_err(|e| bad(format!("routing: {e}")))?;
        let n_layers: usize = field("n_layers")?
            .parse()
            .map_err(|e| bad(format!("n_layers: {e}")))?;
        if routing.len() != n_layers {
            return Err(bad(format!(
                "{} routings for {n_layers} layers",
                routing.len()
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("damaged tensors ({e})")))?;
        let get = |name: String| -> Result<Tensor> {
            let view = st.tensor(&name).map_err(|e| bad(format!("{name}: {e}")))?;
            Ok(view.load(device)?)
        };
        let layers = (0..n_layers)
            .zip(routing)
            .map(|(i, routing)| {
                Ok(LayerIndex {
                    centroids: get(format!("layers.{i}.centroids"))?,
                    classifier: Classifier {
                        w1: get(format!("layers.{i}.w1"))?,
                        b1: get(format!("layers.{i}.b1"))?,
                        w2: get(format!("layers.{i}.w2"))?,
                        b2: get(format!("layers.{i}.b2"))?,
                    },
                    routing,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = field("model")?.clone();
        Self::new(config, model, layers).map_err(|e| match e {
            SaapError::Shape { .. } | SaapError::Config(_) => bad(e.to_string()),
            other => other,
        })
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| SaapError::IndexFormat(e.to_string()))
}
