//! Element types the CPU kernels read: f32, bf16 and f16, all computed in f32.

use candle_core::Layout;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// A floating-point element stored in a cache or query tensor.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Widen to f32 for arithmetic.
    fn to_f32(self) -> f32;
    /// Narrow from f32 to store.
    fn from_f32(x: f32) -> Self;
    /// Widens a row into `dst` (same length); vectorized for the half types.
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    /// The row itself when it already is f32 (no copy needed), else `None`.
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
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
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
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
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
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
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
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

/// Dot product with eight independent accumulators, so that it vectorizes.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
