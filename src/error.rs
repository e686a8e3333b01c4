//! Typed errors of the crate.

use candle_core::{DType, DeviceLocation, Tensor};

/// Everything that can go wrong in saap. Bad input is reported here, never by a panic.
#[derive(Debug, thiserror::Error)]
pub enum SaapError {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A tensor does not have the shape the operation needs.
    #[error("shape mismatch for `{name}`: expected {expected}, got {got:?}")]
    Shape {
        /// Which argument.
        name: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// A tensor has the wrong element type.
    #[error("dtype mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    DType {
        /// Which argument.
        name: &'static str,
        /// The expected dtype.
        expected: DType,
        /// The dtype that was passed.
        got: DType,
    },
    /// A dtype the operation does not support at all.
    #[error("unsupported dtype {0:?}: saap works on f32, bf16 and f16")]
    UnsupportedDType(DType),
    /// A tensor lives on another device than the attention state.
    #[error("device mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    Device {
        /// Which argument.
        name: &'static str,
        /// The device of the state.
        expected: DeviceLocation,
        /// The device of the argument.
        got: DeviceLocation,
    },
    /// A NaN or infinity in an input, or produced from finite inputs (an overflow after RoPE in
    /// a half-precision cache, in routing scores or in an attention output).
    #[error("non-finite values in `{0}`")]
    NonFinite(&'static str),
    /// Decoding was asked of a sequence that holds no context yet.
    #[error("empty context: batch item {0} has no tokens; call prefill first")]
    EmptyContext(usize),
    /// An index file cannot be read or used: missing, damaged, another format version, or tensors
    /// that do not fit its configuration. The message starts with the file's path.
    #[error("index file rejected: {0}")]
    IndexFormat(String),
    /// An index made for another model or layout.
    #[error("index does not match: {0}")]
    IndexMismatch(String),
    /// Training could not proceed (too few samples, bad data).
    #[error("training: {0}")]
    Training(String),
    /// Error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Error from the safetensors library.
    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),
    /// Filesystem error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Error from a CUDA kernel launch or the driver.
    #[error("cuda: {0}")]
    Cuda(String),
}

/// Result with [`SaapError`].
pub type Result<T> = std::result::Result<T, SaapError>;

/// [`SaapError::NonFinite`] naming `name` unless every value of the float tensors `xs` is finite;
/// one scalar read back for all of them.
pub(crate) fn ensure_finite(name: &'static str, xs: &[&Tensor]) -> Result<()> {
    if all_finite(xs)? {
        Ok(())
    } else {
        Err(SaapError::NonFinite(name))
    }
}

/// Whether every value of the float tensors `xs` is finite.
pub(crate) fn all_finite(xs: &[&Tensor]) -> Result<bool> {
    // inf·0 and NaN·0 are NaN, so a sum of x·0 is finite exactly when every x is.
    let probes = xs
        .iter()
        .map(|x| (x.to_dtype(DType::F32)? * 0.0)?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if probes.is_empty() {
        return Ok(true);
    }
    let probe = Tensor::stack(&probes, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(probe.is_finite())
}
