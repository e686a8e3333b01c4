//! What the command-line examples share: which model to run, on which device, and loading it.

use candle_core::Device;
use saap::models::fetch;
use saap::models::{GgufTokenizer, Llama};
use std::path::PathBuf;

/// The model options of every tool (flattened into each tool's own options).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// GGUF checkpoint (llama or qwen2); default SmolLM2-135M, fetched on demand
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Use Qwen2.5-Coder-0.5B-Instruct (fetched on demand, 491 MB)
    #[arg(long)]
    pub qwen: bool,
    /// YaRN RoPE scaling by F over the model's context (e.g. 4: Qwen2.5 at 128k); an index must
    /// have been calibrated with the same --yarn
    #[arg(long)]
    pub yarn: Option<f64>,
    /// Run on GPU 0 (build with --features cuda)
    #[arg(long)]
    pub cuda: bool,
}

/// A model ready to run, with its tokenizer.
pub struct Loaded {
    pub device: Device,
    /// File stem of the checkpoint: names cached indexes and reports.
    pub name: String,
    pub tok: GgufTokenizer,
    pub model: Llama,
}

impl ModelArgs {
    /// Fetches the model if it is not cached, loads it on the chosen device and applies YaRN.
    pub fn load(&self) -> Result<Loaded, Box<dyn std::error::Error>> {
        let device = if self.cuda {
            Device::new_cuda(0)?
        } else {
            Device::Cpu
        };
        let path = fetch::model_or_default(self.model.as_deref(), self.qwen)?;
        let name = path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        let tok = GgufTokenizer::from_gguf(&path)?;
        let mut model = Llama::from_gguf_auto(&path, &device)?;
        if let Some(factor) = self.yarn {
            model.set_yarn(factor)?;
        }
        Ok(Loaded {
            device,
            name,
            tok,
            model,
        })
    }
}
