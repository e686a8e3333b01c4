//! Element types the CPU kernels read: f32, bf16 and f16, all computed in f32.

use candle_core::Layout;
use half::{bf16, f16};

/// A floating-point element stored in a cache or query tensor.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Widen to f32 for arithmetic.
    fn to_f32(self) -> f32;
    /// Narrow from f32 to store.
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Elem for f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// The contiguous slice a layout addresses inside a CPU storage.
pub(crate) fn contiguous_slice<'a, T>(
    data: &'a [T],
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op: "saap kernel" }),
    }
}
