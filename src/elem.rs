//! Element types the CPU kernels read: f32, bf16 and f16, all computed in f32.

use candle_core::{DType, Layout};
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

/// Whether the CUDA tensor-core kernels (prefill attention and prompt assignment, built on
/// `cuda/mma.cuh`) cover an element type and head dim: bf16/f16 at 64 or 128. Other shapes take
/// the GEMM prefill and the f32 assignment kernel.
pub(crate) fn tensor_core_shape(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 64 | 128)
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

/// The contiguous mutable slice a layout addresses inside a CPU storage.
pub(crate) fn contiguous_slice_mut<'a, T>(
    data: &'a mut [T],
    layout: &Layout,
) -> candle_core::Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
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

/// `x[i] = exp(x[i] - shift)` for `x[i] <= shift`, in a form the compiler vectorizes (libm's
/// `expf` is a call per element: 40 % of a CPU prefill's time at 8k). `2^y` with `y = (x -
/// shift)·log2 e` split as `n + f`, `n` the nearest integer (by the 1.5·2²³ rounding trick, no
/// `floor` needed), `|f| <= 1/2`, and a degree-6 Taylor polynomial of `e^(f ln 2)` (relative error
/// below 2e-6 for `x - shift >= -16`, where f32 rounding of `y` adds to it further down); inputs more than 126 octaves below `shift` give 2⁻¹²⁶ instead of 0 or a denormal.
#[inline(always)] // into the AVX2 version of the prefill tile
pub(crate) fn exp_shifted(x: &mut [f32], shift: f32) {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2: f32 = std::f32::consts::LN_2;
    for v in x.iter_mut() {
        let y = ((*v - shift) * std::f32::consts::LOG2_E).max(-126.0);
        let rounded = y + ROUND;
        let n = rounded.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
        let f = (y - (rounded - ROUND)) * LN2;
        // e^f for |f| <= ln2 / 2, Horner form.
        let p = 1.0
            + f * (1.0
                + f * (0.5
                    + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
        *v = p * f32::from_bits(((n + 127) as u32) << 23);
    }
}

#[cfg(test)]
mod tests {
    use super::exp_shifted;

    /// Within 2e-6 relative of `f32::exp` over the weights that matter, 1e-5 down to the smallest
    /// normal f32, and inputs far below the
    /// shift give a tiny positive value, never NaN or a negative one.
    #[test]
    fn exp_shifted_matches_exp() {
        let xs: Vec<f32> = (0..20_000).map(|i| -87.0 + i as f32 * 0.00435).collect();
        let mut got = xs.clone();
        exp_shifted(&mut got, 0.0);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = x.exp();
            // `x·log2 e` rounds to f32, so the error grows with |x|; weights below e⁻¹⁶ hardly
            // move a softmax.
            let tol = if x >= -16.0 { 2e-6 } else { 1e-5 };
            assert!(
                (g - want).abs() <= tol * want + 1e-37,
                "exp({x}): {g} vs {want}"
            );
        }
        let mut far = [-1e30f32, -500.0, f32::MIN];
        exp_shifted(&mut far, 3.0);
        assert!(far.iter().all(|&v| (0.0..1e-37).contains(&v)), "{far:?}");
    }
}
