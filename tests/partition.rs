//! Partition-scan and merges against a stable sort; k-means against a plain Lloyd.

mod common;

use candle_core::Device;
use common::*;
use rand::Rng;
use saap::partition::kmeans::{kmeans, KMeansInit, KMeansParams};
use saap::partition::scan::{merge_row, naive_partition};

#[test]
fn partition_scan_equals_stable_sort() {
    let mut r = rng(1);
    for &(n, c) in &[(0usize, 3usize), (1, 1), (17, 4), (1000, 32), (5000, 257)] {
        let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..c as u32)).collect();
        let mut dir = vec![0u32; c + 1 + n];
        merge_row(&mut dir, &labels, 0, n, c);
        let (perm, offsets) = naive_partition(&labels, 0, n, c);
        assert_eq!(&dir[..=c], &offsets[..]);
        assert_eq!(&dir[c + 1..c + 1 + n], &perm[..]);
    }
}

#[test]
fn successive_merges_equal_one_scan() {
    let mut r = rng(2);
    let (n, c, first) = (3000usize, 19usize, 7usize);
    // Skewed labels: some partitions stay empty for a while, others fill fast.
    let labels: Vec<u32> = (0..n)
        .map(|_| (r.random_range(0..c * c) as f64).sqrt() as u32)
        .collect();
    let mut dir = vec![0u32; c + 1 + n];
    let mut start = first;
    while start < n {
        let end = (start + r.random_range(1..300)).min(n);
        merge_row(&mut dir, &labels, start, end, c);
        let (perm, offsets) = naive_partition(&labels, first, end, c);
        assert_eq!(
            &dir[..=c],
            &offsets[..],
            "offsets after merging up to {end}"
        );
        assert_eq!(
            &dir[c + 1..c + 1 + end - first],
            &perm[..],
            "perm after merging up to {end}"
        );
        start = end;
    }
}

/// Plain Lloyd on all points with the same initial centroids.
fn lloyd_reference(points: &[f32], dim: usize, init: &[f32], iters: usize) -> Vec<f32> {
    let n = points.len() / dim;
    let k = init.len() / dim;
    let mut centroids = init.to_vec();
    for _ in 0..iters - 1 {
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for i in 0..n {
            let p = &points[i * dim..(i + 1) * dim];
            let best = (0..k)
                .min_by(|&a, &b| {
                    let d = |c: usize| -> f64 {
                        p.iter()
                            .zip(&centroids[c * dim..(c + 1) * dim])
                            .map(|(x, y)| ((x - y) as f64).powi(2))
                            .sum()
                    };
                    d(a).total_cmp(&d(b))
                })
                .unwrap();
            counts[best] += 1;
            for (s, &x) in sums[best * dim..(best + 1) * dim].iter_mut().zip(p) {
                *s += x as f64;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                for j in 0..dim {
                    centroids[c * dim + j] = (sums[c * dim + j] / counts[c] as f64) as f32;
                }
            }
        }
    }
    centroids
}

#[test]
fn kmeans_matches_plain_lloyd_and_never_increases_inertia() {
    let mut r = rng(3);
    let (dim, k) = (4, 6);
    // Well-separated blobs so that no cluster empties and the reference needs no re-seeding.
    let centers: Vec<Vec<f32>> = (0..k)
        .map(|_| (0..dim).map(|_| r.random_range(-20.0..20.0)).collect())
        .collect();
    let points: Vec<f32> = (0..600)
        .flat_map(|i| {
            let c = &centers[i % k];
            c.iter()
                .map(|&x| x + r.random_range(-1.0f32..1.0))
                .collect::<Vec<_>>()
        })
        .collect();
    let params = KMeansParams {
        k,
        iters: 10,
        max_points_per_centroid: 1000,
        init: KMeansInit::Random,
        seed: 9,
    };
    let one_iter = kmeans(
        &points,
        dim,
        &KMeansParams { iters: 1, ..params },
        &Device::Cpu,
    )
    .unwrap();
    let full = kmeans(&points, dim, &params, &Device::Cpu).unwrap();
    let reference = lloyd_reference(&points, dim, &one_iter.centroids, params.iters);
    for (a, b) in full.centroids.iter().zip(&reference) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
    assert_eq!(full.inertia.len(), params.iters);
    // On noisy data with many centroids (empty clusters happen), inertia still never increases.
    let noisy: Vec<f32> = (0..4000 * 8)
        .map(|_| r.random_range(-1.0f32..1.0).powi(3))
        .collect();
    for init in [KMeansInit::Random, KMeansInit::PlusPlus] {
        let km = kmeans(
            &noisy,
            8,
            &KMeansParams {
                k: 64,
                iters: 25,
                max_points_per_centroid: 40,
                init,
                seed: 4,
            },
            &Device::Cpu,
        )
        .unwrap();
        assert!(
            km.inertia.windows(2).all(|w| w[1] <= w[0] * (1.0 + 1e-9)),
            "{init:?}: {:?}",
            km.inertia
        );
        assert!(km.inertia.last().unwrap() < &(km.inertia[0] * 0.9));
    }
}

#[test]
fn kmeans_rejects_bad_input() {
    assert!(kmeans(&[1.0, 2.0, 3.0], 2, &KMeansParams::new(1, 0), &Device::Cpu).is_err());
    assert!(kmeans(&[1.0, 2.0], 2, &KMeansParams::new(2, 0), &Device::Cpu).is_err());
    assert!(kmeans(
        &[f32::NAN, 2.0, 1.0, 1.0],
        2,
        &KMeansParams::new(1, 0),
        &Device::Cpu
    )
    .is_err());
}
