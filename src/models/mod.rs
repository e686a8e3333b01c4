//! Model glue: Llama-family decoders that call Saap in every layer, tokenizers built from GGUF
//! metadata, and fetching of the models and texts the crate is measured on.
//!
//! Enabled by the `models` cargo feature (on by default).

pub mod calibrate;
pub mod fetch;
pub mod llama;
pub mod tokenizer;

mod html;
mod norm;
mod rdata;
mod swiglu;

pub use llama::{Architecture, Llama, LlamaConfig};
pub use tokenizer::GgufTokenizer;

use crate::error::SaapError;

/// Errors of model loading, tokenization and fetching.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Error of the attention op.
    #[error(transparent)]
    Saap(#[from] SaapError),
    /// Error from the tensor library (also GGUF parsing).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Filesystem error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint is missing something or holds values the decoder cannot use.
    #[error("model: {0}")]
    Model(String),
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A model or text could not be found in the cache or fetched.
    #[error("fetch: {0}")]
    Fetch(String),
    /// A downloaded or cached file does not have the pinned content.
    #[error("{path}: sha256 {got} does not match the pinned {expected}")]
    Hash {
        /// The file.
        path: std::path::PathBuf,
        /// The pinned digest.
        expected: String,
        /// The digest of the file.
        got: String,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Attaches a path to an I/O error.
pub(crate) fn io_err(path: impl Into<std::path::PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Opens a GGUF checkpoint and parses its header, with errors that name the file and the fix:
/// a missing file, a file that is not GGUF at all, or a damaged/truncated one.
pub(crate) fn read_gguf(
    path: &std::path::Path,
) -> Result<(std::fs::File, candle_core::quantized::gguf_file::Content)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(io_err(path))?;
    if n < 4 || &magic != b"GGUF" {
        return Err(Error::Model(format!(
            "{} is not a GGUF file (it does not start with `GGUF`); pass a .gguf checkpoint of \
             the llama or qwen2 architecture",
            path.display()
        )));
    }
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
        // candle may append a backtrace after the message: keep the first line.
        let e = e.to_string();
        Error::Model(format!(
            "{}: damaged or truncated GGUF file ({}); fetch it again",
            path.display(),
            e.lines().next().unwrap_or("")
        ))
    })?;
    // A file cut short keeps a whole header: check that every tensor's data is there before
    // candle reads one and fails with a message that names neither file nor fix.
    let len = file.metadata().map_err(io_err(path))?.len();
    for (name, info) in &content.tensor_infos {
        let dtype = info.ggml_dtype;
        let bytes = ((info.shape.elem_count() / dtype.block_size().max(1)) as u64)
            .saturating_mul(dtype.type_size() as u64);
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if end > len {
            return Err(Error::Model(format!(
                "{}: damaged or truncated GGUF file (tensor `{name}` ends at byte {end}, the file \
                 has {len}); fetch it again",
                path.display()
            )));
        }
    }
    Ok((file, content))
}

/// Largest `|a - b| / (1 + |b|)` of two tensors on any device (the CUDA kernel tests of the
/// glue): bf16 results differ by an ulp of values up to ~16.
#[cfg(all(test, feature = "cuda"))]
pub(crate) fn max_rel_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    use candle_core::{DType, Device, Tensor};
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (a, b) = (cpu(a), cpu(b));
    let err = ((&a - &b).unwrap().abs().unwrap() / (b.abs().unwrap() + 1.0).unwrap()).unwrap();
    err.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
