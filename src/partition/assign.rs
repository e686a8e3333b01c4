//! Nearest-centroid assignment of pre-RoPE keys: one GEMM and an argmax, on either backend.

use crate::elem::tensor_core_shape;
use crate::error::{Result, SaapError};
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, D};

/// Rows of the score matrix computed at once, so that `[H, rows, C]` f32 stays near 128 MiB.
fn chunk_rows(heads: usize, n_partitions: usize) -> usize {
    ((32 << 20) / (heads * n_partitions).max(1)).max(1)
}

/// Nearest centroid (squared L2) of each key. `keys`: `[H, N, D]`, `centroids`: `[H, C, D]`
/// (f32). Returns the partition of every key, u32 `[H, N]`.
///
/// `argmin ||k - c||² = argmax (k·c - ||c||²/2)`: the key norm is the same for every centroid,
/// so the distance is a GEMM plus a per-centroid bias.
///
/// # Errors
/// [`SaapError::Shape`] when the centroids' heads or dimension differ from the keys';
/// [`SaapError::Candle`] for keys that are not `[H, N, D]`.
pub fn assign(keys: &Tensor, centroids: &Tensor) -> Result<Tensor> {
    let (heads, n, dim) = keys.dims3()?;
    let (c_heads, _, c_dim) = centroids.dims3()?;
    if c_heads != heads || c_dim != dim {
        return Err(SaapError::Shape {
            name: "centroids",
            expected: format!("[{heads}, C, {dim}]"),
            got: centroids.dims().to_vec(),
        });
    }
    if n == 0 {
        return Ok(Tensor::zeros((heads, 0), DType::U32, keys.device())?);
    }
    let (centroids_t, half_norms) = prepare_centroids(centroids)?;
    assign_prepared(keys, &centroids_t, &half_norms)
}

/// What [`assign`] derives from the centroids `[H, C, D]`: their transpose `[H, D, C]` f32
/// (contiguous) and half squared norms `[H, 1, C]` f32. Computed once per op, not per step.
///
/// # Errors
/// [`SaapError::Candle`] for centroids that are not `[H, C, D]` floats.
pub fn prepare_centroids(centroids: &Tensor) -> Result<(Tensor, Tensor)> {
    let centroids = centroids.to_dtype(DType::F32)?;
    let half_norms = (centroids.sqr()?.sum_keepdim(D::Minus1)? * 0.5)?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((centroids.transpose(1, 2)?.contiguous()?, half_norms))
}

/// [`assign`] with centroids prepared by [`prepare_centroids`]; same result.
///
/// # Errors
/// [`SaapError::Candle`] when the shapes do not fit (keys `[H, N, D]`).
pub fn assign_prepared(keys: &Tensor, centroids_t: &Tensor, half_norms: &Tensor) -> Result<Tensor> {
    let (heads, n, _) = keys.dims3()?;
    if n == 0 {
        return Ok(Tensor::zeros((heads, 0), DType::U32, keys.device())?);
    }
    if keys.device().is_cuda() {
        let labels = Tensor::zeros((1, heads, n), DType::U32, keys.device())?;
        assign_into(
            &labels,
            &keys.unsqueeze(0)?,
            centroids_t,
            half_norms,
            None,
            &[0],
            &[n],
        )?;
        return Ok(labels.squeeze(0)?);
    }
    let n_partitions = centroids_t.dim(2)?;
    let step = chunk_rows(heads, n_partitions);
    let mut labels = Vec::with_capacity(n.div_ceil(step));
    for start in (0..n).step_by(step) {
        let rows = step.min(n - start);
        let chunk = keys.narrow(1, start, rows)?.to_dtype(DType::F32)?;
        let scores = chunk.matmul(centroids_t)?.broadcast_sub(half_norms)?;
        labels.push(scores.argmax(D::Minus1)?);
    }
    if labels.len() == 1 {
        return Ok(labels.pop().expect("one chunk"));
    }
    Ok(Tensor::cat(&labels, 1)?)
}

/// Prompt length from which CUDA assigns on tensor cores when given rounded centroids: one block
/// of the tensor-core kernel labels 64 keys, and a decode step's single key is served better by
/// the f32 kernel, which spreads the centroids over many blocks.
pub const MMA_MIN_KEYS: usize = 64;

/// Labels the new keys of a batch in place: for item `b`, the partitions of
/// `keys[b, :, t]` (`[B, H, T, D]`, pre-RoPE), `t < lens[b]`, go to
/// `labels[b, :, starts[b] + t]` (`[B, H, cap]` u32). One fused kernel on CUDA ([`AssignOp`]),
/// [`assign_prepared`] per item on the CPU; the same nearest centroid up to f32 summation order.
///
/// `rounded`: the centroids `[H, C, D]` rounded to the keys' type (bf16/f16), or `None`. With it,
/// CUDA labels a prompt of at least [`MMA_MIN_KEYS`] bf16/f16 keys of dimension 64 or 128 on tensor cores: `k·c` with the rounded
/// centroids, f32 accumulation, minus the f32 half norms. Keys near a tie between two centroids
/// may then go to the other one (the inertia is the same to rounding); the CPU ignores `rounded`.
///
/// # Errors
/// [`SaapError::Candle`] when the shapes do not fit or a row falls outside `labels`.
pub fn assign_into(
    labels: &Tensor,
    keys: &Tensor,
    centroids_t: &Tensor,
    half_norms: &Tensor,
    rounded: Option<&Tensor>,
    starts: &[usize],
    lens: &[usize],
) -> Result<()> {
    assign_rows(
        labels,
        keys,
        (centroids_t, half_norms, rounded),
        starts,
        lens,
        None,
    )
}

/// [`assign_into`], and for a decode step recorded for replay, `advance`: the replayed steps per
/// item (`[B]` u32), added to `starts` by the kernel.
pub(crate) fn assign_rows(
    labels: &Tensor,
    keys: &Tensor,
    (centroids_t, half_norms, rounded): (&Tensor, &Tensor, Option<&Tensor>),
    starts: &[usize],
    lens: &[usize],
    advance: Option<&Tensor>,
) -> Result<()> {
    if keys.device().is_cuda() {
        let longest = lens.iter().max().copied().unwrap_or(0);
        let op = AssignOp {
            centroids_t: centroids_t.clone(),
            half_norms: half_norms.clone(),
            rounded: rounded
                .filter(|_| longest >= MMA_MIN_KEYS)
                .filter(|_| {
                    tensor_core_shape(keys.dtype(), keys.dims().last().copied().unwrap_or(0))
                })
                .cloned(),
            starts: starts.to_vec(),
            lens: lens.to_vec(),
            advance: advance.cloned(),
        };
        return Ok(labels.inplace_op2(&keys.contiguous()?, &op)?);
    }
    // The rows the recorded step was given, moved on by the replayed steps.
    let steps = crate::attend::decode::replayed_steps(advance, starts.len())?;
    let starts: Vec<usize> = starts.iter().zip(steps).map(|(s, n)| s + n).collect();
    for (b, (&start, &len)) in starts.iter().zip(lens).enumerate() {
        if len == 0 {
            continue;
        }
        let item = keys.get(b)?.narrow(1, 0, len)?;
        let assigned = assign_prepared(&item, centroids_t, half_norms)?.unsqueeze(0)?;
        labels.narrow(0, b, 1)?.slice_set(&assigned, 2, start)?;
    }
    Ok(())
}

/// The CUDA kernel of [`assign_into`] (`labels.inplace_op2(keys, op)`): scores every centroid
/// without materializing the `[N, C]` score matrix, ties to the lower index.
#[derive(Debug, Clone)]
pub struct AssignOp {
    /// `[H, D, C]` f32, from [`prepare_centroids`].
    pub centroids_t: Tensor,
    /// `[H, 1, C]` f32, from [`prepare_centroids`].
    pub half_norms: Tensor,
    /// `[H, C, D]` in the keys' type: score on tensor cores (see [`assign_into`]).
    pub rounded: Option<Tensor>,
    /// Per item, the label row of its first key.
    pub starts: Vec<usize>,
    /// Per item, its keys to label.
    pub lens: Vec<usize>,
    /// Decode steps replayed from a CUDA graph per item (`[B]` u32), added to `starts` on the
    /// device; `None` outside replay.
    pub advance: Option<Tensor>,
}

impl InplaceOp2 for AssignOp {
    fn name(&self) -> &'static str {
        "saap-assign"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("saap assign: the CUDA kernel has no CPU twin; use assign_into")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        labels: &mut candle_core::CudaStorage,
        labels_l: &Layout,
        keys: &candle_core::CudaStorage,
        keys_l: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::assign(self, labels, labels_l, keys, keys_l)
    }
}
