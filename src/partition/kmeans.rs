//! k-means (Lloyd) for the key partitions, as Faiss trains IVF quantizers: at most
//! `max_points_per_centroid` samples per centroid, random or k-means++ initialization, empty
//! clusters re-seeded.

use crate::error::{Result, SaapError};
use crate::partition::assign::assign;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

/// How the first centroids are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KMeansInit {
    /// k distinct random samples (Faiss' default; cheap at any size).
    Random,
    /// k-means++ (D² sampling): better starts, O(n·k·d) extra work.
    PlusPlus,
}

/// Parameters of one k-means run.
#[derive(Debug, Clone, Copy)]
pub struct KMeansParams {
    /// Number of centroids.
    pub k: usize,
    /// Lloyd iterations.
    pub iters: usize,
    /// Training samples are subsampled to `k * max_points_per_centroid`.
    pub max_points_per_centroid: usize,
    /// Initialization.
    pub init: KMeansInit,
    /// Seed of the subsampling and initialization.
    pub seed: u64,
}

impl KMeansParams {
    /// 25 iterations, 256 points per centroid, random init.
    pub fn new(k: usize, seed: u64) -> Self {
        Self {
            k,
            iters: 25,
            max_points_per_centroid: 256,
            init: KMeansInit::Random,
            seed,
        }
    }
}

/// Trained centroids and the inertia (sum of squared distances) measured at each assignment.
#[derive(Debug, Clone)]
pub struct KMeans {
    /// `[k, d]` row-major.
    pub centroids: Vec<f32>,
    /// Dimension of a point.
    pub dim: usize,
    /// Inertia after each iteration's assignment step, in order.
    pub inertia: Vec<f64>,
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum()
}

/// Nearest centroid of every point (the GEMM on `device`), with the squared distance to it.
fn nearest(
    points: &[f32],
    centroids: &[f32],
    dim: usize,
    device: &Device,
) -> Result<(Vec<u32>, Vec<f64>)> {
    let n = points.len() / dim;
    let k = centroids.len() / dim;
    let p = Tensor::from_slice(points, (1, n, dim), device)?;
    let c = Tensor::from_slice(centroids, (1, k, dim), device)?;
    let labels = assign(&p, &c)?.flatten_all()?.to_vec1::<u32>()?;
    let dists = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let l = l as usize;
            sq_dist(
                &points[i * dim..(i + 1) * dim],
                &centroids[l * dim..(l + 1) * dim],
            )
        })
        .collect();
    Ok((labels, dists))
}

fn init_centroids(points: &[f32], dim: usize, params: &KMeansParams, rng: &mut StdRng) -> Vec<f32> {
    let n = points.len() / dim;
    let row = |i: usize| &points[i * dim..(i + 1) * dim];
    match params.init {
        KMeansInit::Random => sample(rng, n, params.k)
            .into_iter()
            .flat_map(|i| row(i).to_vec())
            .collect(),
        KMeansInit::PlusPlus => {
            let first = rng.random_range(0..n);
            let mut centroids = row(first).to_vec();
            let mut best: Vec<f64> = (0..n).map(|i| sq_dist(row(i), row(first))).collect();
            while centroids.len() < params.k * dim {
                let total: f64 = best.iter().sum();
                let pick = if total > 0.0 {
                    let mut target = rng.random::<f64>() * total;
                    best.iter()
                        .position(|&d| {
                            target -= d;
                            target <= 0.0
                        })
                        .unwrap_or(n - 1)
                } else {
                    rng.random_range(0..n)
                };
                centroids.extend_from_slice(row(pick));
                for (i, b) in best.iter_mut().enumerate() {
                    *b = b.min(sq_dist(row(i), row(pick)));
                }
            }
            centroids
        }
    }
}

/// Runs k-means on `points` (`[n, dim]` row-major f32); assignments run on `device`.
///
/// # Errors
/// [`SaapError::Training`] when `points` do not form rows of `dim` or hold fewer than `k`
/// rows; [`SaapError::NonFinite`] for NaN or infinity in `points`.
pub fn kmeans(
    points: &[f32],
    dim: usize,
    params: &KMeansParams,
    device: &Device,
) -> Result<KMeans> {
    kmeans_weighted(points, None, dim, params, device)
}

/// [`kmeans`] where each point counts with a weight in the centroid updates (and the
/// inertia): centroids gather where the weight is. Subsampling and initialization ignore the
/// weights.
///
/// # Errors
/// As [`kmeans`]; [`SaapError::Training`] when `weights` are not one finite, non-negative value
/// per point.
pub fn kmeans_weighted(
    points: &[f32],
    weights: Option<&[f32]>,
    dim: usize,
    params: &KMeansParams,
    device: &Device,
) -> Result<KMeans> {
    if dim == 0 || points.len() % dim != 0 {
        return Err(SaapError::Training(format!(
            "{} values do not form rows of dimension {dim}",
            points.len()
        )));
    }
    let n_all = points.len() / dim;
    if params.k == 0 || n_all < params.k {
        return Err(SaapError::Training(format!(
            "k-means needs at least k = {} points, got {n_all}",
            params.k
        )));
    }
    if points.iter().any(|x| !x.is_finite()) {
        return Err(SaapError::NonFinite("k-means training points"));
    }
    if let Some(w) = weights {
        if w.len() != n_all || w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(SaapError::Training(format!(
                "k-means needs one finite weight >= 0 per point ({n_all}), got {} values",
                w.len()
            )));
        }
    }
    let mut rng = StdRng::seed_from_u64(params.seed);
    let cap = params.k * params.max_points_per_centroid.max(1);
    let sampled: Vec<f32>;
    let sampled_w: Vec<f32>;
    let (points, weights) = if n_all > cap {
        let mut ids = sample(&mut rng, n_all, cap).into_vec();
        ids.sort_unstable();
        sampled = ids
            .iter()
            .flat_map(|&i| points[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        sampled_w = weights.map_or(Vec::new(), |w| ids.iter().map(|&i| w[i]).collect());
        (&sampled[..], weights.map(|_| &sampled_w[..]))
    } else {
        (points, weights)
    };
    let weight = |i: usize| weights.map_or(1.0, |w| w[i] as f64);
    let n = points.len() / dim;
    let mut centroids = init_centroids(points, dim, params, &mut rng);
    let mut inertia = Vec::with_capacity(params.iters);
    for iter in 0..params.iters.max(1) {
        let (labels, dists) = nearest(points, &centroids, dim, device)?;
        inertia.push(dists.iter().enumerate().map(|(i, d)| weight(i) * d).sum());
        if iter + 1 == params.iters.max(1) {
            break;
        }
        let mut sums = vec![0f64; params.k * dim];
        let mut counts = vec![0usize; params.k];
        let mut mass = vec![0f64; params.k];
        for (i, &l) in labels.iter().enumerate() {
            let l = l as usize;
            counts[l] += 1;
            let w = weight(i);
            mass[l] += w;
            for (s, &x) in sums[l * dim..(l + 1) * dim]
                .iter_mut()
                .zip(&points[i * dim..(i + 1) * dim])
            {
                *s += w * x as f64;
            }
        }
        // Empty clusters take the points worst served by the current assignment: moving a centroid
        // onto a data point can only lower the inertia, so it never increases across iterations.
        let mut worst: Vec<usize> = (0..n).collect();
        worst.sort_by(|&a, &b| dists[b].total_cmp(&dists[a]));
        let mut worst = worst.into_iter();
        for c in 0..params.k {
            let centroid = &mut centroids[c * dim..(c + 1) * dim];
            if counts[c] > 0 && mass[c] > 0.0 {
                for (x, s) in centroid.iter_mut().zip(&sums[c * dim..(c + 1) * dim]) {
                    *x = (*s / mass[c]) as f32;
                }
            } else if counts[c] > 0 {
                // Only weightless points: the plain mean keeps the centroid among them.
                let rows = labels.iter().enumerate().filter(|(_, &l)| l as usize == c);
                centroid.iter_mut().for_each(|x| *x = 0.0);
                for (i, _) in rows {
                    for (x, &p) in centroid.iter_mut().zip(&points[i * dim..(i + 1) * dim]) {
                        *x += p / counts[c] as f32;
                    }
                }
            } else if let Some(p) = worst.next() {
                centroid.copy_from_slice(&points[p * dim..(p + 1) * dim]);
            }
        }
    }
    Ok(KMeans {
        centroids,
        dim,
        inertia,
    })
}
