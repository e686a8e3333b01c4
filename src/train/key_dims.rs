//! Which dimensions of the pre-RoPE keys the partitions are clustered on.
//!
//! Decode scores a key with the post-RoPE dot product `q·R(t - j)k`. A rotary pair that turns
//! many times over the context contributes a term whose sign depends on the distance, not on
//! what the key says, so clustering on it groups keys by something attention to distant keys
//! does not follow. Clustering only on the pairs that rotate slowly over the context groups keys
//! by the part of `q·k` that survives the rotation.
//!
//! A subset needs no change to the index format or the assignment kernels: assignment is
//! `argmax k·c − ‖c‖²/2`, and a centroid that is zero outside the kept dimensions scores only
//! the kept dimensions of the key. So [`crate::train::train_centroids`] runs k-means on the
//! kept dimensions and scatters the centroids back into `D` with zeros elsewhere. (Soft
//! per-dimension weights would not survive that way: the `‖c‖²` term would weight them again.)

use crate::config::{RopeKind, SaapConfig};
use crate::error::{Result, SaapError};
use crate::rope::Rope;

/// The dimensions k-means clusters the keys of a layer on.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum KeyDims {
    /// Every dimension (the paper's pre-RoPE k-means).
    #[default]
    All,
    /// The given share, in (0, 1], of the rotary pairs that rotate slowest (at least one pair;
    /// rounded up).
    Slowest(f64),
    /// The rotary pairs that turn less than `turns` full turns over `tokens` positions.
    Turns {
        /// Full turns (2π) over `tokens`; finite and > 0.
        turns: f64,
        /// Positions the turns are counted over (the context the index is made for); > 0.
        tokens: usize,
    },
    /// Not dimensions but directions: the top `share` (in (0, 1], rounded up) of the
    /// eigenvectors of the queries' second moment averaged over the rotations RoPE applies at
    /// distances from the window to `tokens` (`E[R(Δ)q (R(Δ)q)ᵀ]` over the KV group's query
    /// heads): the directions in which distant keys' logits vary. An orthonormal basis U keeps
    /// assignment exact: a centroid `U c'` has `‖U c'‖ = ‖c'‖`, so `argmax k·Uc' − ‖Uc'‖²/2` is
    /// nearest centroid on `Uᵀk`.
    Queries {
        /// Share of the head dimension kept as directions.
        share: f64,
        /// Largest query-key distance averaged over (the context the index is made for); > 0.
        tokens: usize,
    },
}

/// The space one KV head's keys are clustered in.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Basis {
    /// These dimensions of the key, ascending.
    Axes(Vec<usize>),
    /// Orthonormal directions: `u[d * rank + j]` is coordinate d of direction j.
    Directions {
        /// `[D, rank]` row-major.
        u: Vec<f64>,
        /// Directions kept.
        rank: usize,
    },
}

impl KeyDims {
    /// Parses a command-line value: `all`, `slowest:<share>`, `turns:<turns>` (counted over
    /// `tokens` positions) or `queries:<share>` (distances up to `tokens`).
    ///
    /// # Errors
    /// [`SaapError::Config`] for any other form or a number that does not parse or fails
    /// [`KeyDims::validate`].
    pub fn parse(spec: &str, tokens: usize) -> Result<Self> {
        let bad = || {
            SaapError::Config(format!(
                "key dims `{spec}`: expected `all`, `slowest:<share in (0, 1]>`, `turns:<turns > 0>` \
                 or `queries:<share in (0, 1]>`"
            ))
        };
        let number = |x: &str| x.trim().parse::<f64>().map_err(|_| bad());
        let dims = match spec.trim().split_once(':') {
            None if spec.trim() == "all" => KeyDims::All,
            Some(("slowest", x)) => KeyDims::Slowest(number(x)?),
            Some(("turns", x)) => KeyDims::Turns {
                turns: number(x)?,
                tokens,
            },
            Some(("queries", x)) => KeyDims::Queries {
                share: number(x)?,
                tokens,
            },
            _ => return Err(bad()),
        };
        dims.validate()?;
        Ok(dims)
    }

    /// Checks the values (not yet against a model: see [`KeyDims::kept`]).
    ///
    /// # Errors
    /// [`SaapError::Config`] for a share outside (0, 1], turns not finite and > 0, or zero tokens.
    pub fn validate(&self) -> Result<()> {
        match *self {
            KeyDims::All => Ok(()),
            KeyDims::Slowest(share) if share.is_finite() && share > 0.0 && share <= 1.0 => Ok(()),
            KeyDims::Slowest(share) => Err(SaapError::Config(format!(
                "key dims: share of slowest pairs must be in (0, 1], got {share}"
            ))),
            KeyDims::Turns { turns, tokens } if turns.is_finite() && turns > 0.0 && tokens > 0 => {
                Ok(())
            }
            KeyDims::Turns { turns, tokens } => Err(SaapError::Config(format!(
                "key dims: turns must be finite and > 0 over > 0 tokens, got {turns} over {tokens}"
            ))),
            KeyDims::Queries { share, tokens }
                if share.is_finite() && share > 0.0 && share <= 1.0 && tokens > 0 =>
            {
                Ok(())
            }
            KeyDims::Queries { share, tokens } => Err(SaapError::Config(format!(
                "key dims: share of query directions must be in (0, 1] over > 0 tokens, got \
                 {share} over {tokens}"
            ))),
        }
    }

    /// How many coordinates k-means sees for a head of `config`.
    ///
    /// # Errors
    /// As [`KeyDims::kept`].
    pub fn rank(&self, config: &SaapConfig) -> Result<usize> {
        match *self {
            KeyDims::Queries { share, .. } => {
                self.validate()?;
                let d = config.layout.head_dim;
                Ok(((share * d as f64).ceil() as usize).clamp(1, d))
            }
            _ => Ok(self.kept(config)?.len()),
        }
    }

    /// The space the keys of KV head `kv_head` are clustered in; `sequences` give the queries
    /// of [`KeyDims::Queries`] (the others ignore them).
    pub(crate) fn basis(
        &self,
        config: &SaapConfig,
        sequences: &[crate::train::data::Sequence],
        kv_head: usize,
    ) -> Result<Basis> {
        let KeyDims::Queries { tokens, .. } = *self else {
            return Ok(Basis::Axes(self.kept(config)?));
        };
        let rank = self.rank(config)?;
        let d = config.layout.head_dim;
        let g = config.layout.group_size();
        let second = query_second_moment(config, sequences, kv_head * g..(kv_head + 1) * g)?;
        let m = rotation_average(config, &second, config.window.max(1), tokens.max(2));
        let (values, vectors) = symmetric_eigen(m, d);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        let mut u = vec![0f64; d * rank];
        for (j, &e) in order[..rank].iter().enumerate() {
            for row in 0..d {
                u[row * rank + j] = vectors[row * d + e];
            }
        }
        Ok(Basis::Directions { u, rank })
    }

    /// The kept dimensions of a head vector of `config`, ascending: both dimensions of each kept
    /// rotary pair, in the pair layout of `config.rope.kind`, with the frequencies of
    /// `config.rope` (scaling included).
    ///
    /// # Errors
    /// [`SaapError::Config`] for invalid values ([`KeyDims::validate`]) or turns so few that no
    /// pair qualifies.
    pub fn kept(&self, config: &SaapConfig) -> Result<Vec<usize>> {
        self.validate()?;
        if let KeyDims::Queries { .. } = self {
            return Err(SaapError::Config(
                "key dims: query directions are not a set of dimensions".into(),
            ));
        }
        let d = config.layout.head_dim;
        let half = d / 2;
        let freq = Rope::new(&config.rope, d).inv_freq().to_vec();
        let pairs: Vec<usize> = match *self {
            KeyDims::All | KeyDims::Queries { .. } => return Ok((0..d).collect()),
            KeyDims::Slowest(share) => {
                let keep = ((share * half as f64).ceil() as usize).clamp(1, half);
                let mut order: Vec<usize> = (0..half).collect();
                order.sort_by(|&a, &b| freq[a].total_cmp(&freq[b]));
                order.truncate(keep);
                order
            }
            KeyDims::Turns { turns, tokens } => {
                let pairs: Vec<usize> = (0..half)
                    .filter(|&i| freq[i] * tokens as f64 / std::f64::consts::TAU < turns)
                    .collect();
                if pairs.is_empty() {
                    return Err(SaapError::Config(format!(
                        "key dims: no rotary pair turns less than {turns} times over {tokens} \
                         tokens (the slowest turns {:.4} times)",
                        freq.iter().copied().fold(f64::INFINITY, f64::min) * tokens as f64
                            / std::f64::consts::TAU
                    )));
                }
                pairs
            }
        };
        let mut dims: Vec<usize> = pairs
            .iter()
            .flat_map(|&i| match config.rope.kind {
                RopeKind::Interleaved => [2 * i, 2 * i + 1],
                RopeKind::Neox => [i, i + half],
            })
            .collect();
        dims.sort_unstable();
        Ok(dims)
    }
}

/// `Σ q qᵀ / count` (`[D, D]` row-major) over the pre-RoPE queries of `heads` at positions
/// with indexed keys (past sinks and window when the sequence is long enough), at most 4096 per
/// head and sequence.
fn query_second_moment(
    config: &SaapConfig,
    sequences: &[crate::train::data::Sequence],
    heads: std::ops::Range<usize>,
) -> Result<Vec<f64>> {
    let d = config.layout.head_dim;
    let mut m = vec![0f64; d * d];
    let mut count = 0usize;
    for seq in sequences {
        let n = seq.len();
        let first = (config.sinks + config.window).min(n.saturating_sub(1));
        if n == 0 {
            continue;
        }
        let step = (n - first).div_ceil(4096).max(1);
        for h in heads.clone() {
            let q = seq.q.get(h)?.to_vec2::<f32>()?;
            for row in q[first..].iter().step_by(step) {
                for (a, &x) in row.iter().enumerate() {
                    let x = x as f64;
                    for (b, &y) in row.iter().enumerate() {
                        m[a * d + b] += x * y as f64;
                    }
                }
                count += 1;
            }
        }
    }
    if count == 0 {
        return Err(SaapError::Training(
            "query directions need calibration queries".into(),
        ));
    }
    m.iter_mut().for_each(|x| *x /= count as f64);
    Ok(m)
}

/// `mean over Δ of R(Δ) S R(Δ)ᵀ` for 32 distances Δ spread evenly over `[from, to]`, where
/// `R(Δ)` is the RoPE rotation of `config` by Δ positions: the second moment of rotated queries
/// `R(Δ)q`, which is what a key `Δ` positions back is dotted with.
fn rotation_average(config: &SaapConfig, s: &[f64], from: usize, to: usize) -> Vec<f64> {
    let d = config.layout.head_dim;
    let half = d / 2;
    let freq = Rope::new(&config.rope, d).inv_freq().to_vec();
    // Row a of R: R[a][a] = cos, R[a][partner] = ∓ sin (first / second of its pair).
    let pair = |a: usize| -> (usize, usize, f64) {
        match config.rope.kind {
            RopeKind::Interleaved => {
                let i = a / 2;
                if a % 2 == 0 {
                    (i, a + 1, -1.0)
                } else {
                    (i, a - 1, 1.0)
                }
            }
            RopeKind::Neox => {
                if a < half {
                    (a, a + half, -1.0)
                } else {
                    (a - half, a - half, 1.0)
                }
            }
        }
    };
    let (from, to) = (from.min(to) as f64, from.max(to) as f64);
    let steps = 32;
    let mut m = vec![0f64; d * d];
    for step in 0..steps {
        let delta = from + (to - from) * (step as f64 + 0.5) / steps as f64;
        let row = |a: usize| {
            let (i, partner, sign) = pair(a);
            let (sin, cos) = (delta * freq[i]).sin_cos();
            [(a, cos), (partner, sign * sin)]
        };
        for a in 0..d {
            let ra = row(a);
            for b in 0..d {
                let rb = row(b);
                let mut x = 0.0;
                for &(a2, ca) in &ra {
                    for &(b2, cb) in &rb {
                        x += ca * s[a2 * d + b2] * cb;
                    }
                }
                m[a * d + b] += x / steps as f64;
            }
        }
    }
    m
}

/// Eigenvalues and eigenvectors (columns of a `[D, D]` row-major matrix) of the symmetric
/// `[D, D]` matrix `a` (nalgebra's symmetric QR).
fn symmetric_eigen(a: Vec<f64>, d: usize) -> (Vec<f64>, Vec<f64>) {
    let eigen = nalgebra::DMatrix::from_row_slice(d, d, &a).symmetric_eigen();
    let vectors = (0..d)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .map(|(i, j)| eigen.eigenvectors[(i, j)])
        .collect();
    (eigen.eigenvalues.iter().copied().collect(), vectors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HeadLayout, RopeConfig, RopeScaling};

    fn config(kind: RopeKind) -> SaapConfig {
        let layout = HeadLayout {
            n_q_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        };
        let rope = RopeConfig {
            kind,
            theta: 1e5,
            scaling: RopeScaling::None,
        };
        SaapConfig::for_context(layout, rope, 8192).unwrap()
    }

    #[test]
    fn slowest_pairs_follow_the_layout() {
        // With plain RoPE the frequency falls with the pair index: the slowest quarter of 32
        // pairs is pairs 24..32.
        let inter = KeyDims::Slowest(0.25)
            .kept(&config(RopeKind::Interleaved))
            .unwrap();
        assert_eq!(inter, (48..64).collect::<Vec<_>>());
        let neox = KeyDims::Slowest(0.25)
            .kept(&config(RopeKind::Neox))
            .unwrap();
        assert_eq!(neox, (24..32).chain(56..64).collect::<Vec<_>>());
        // Rounded up, at least one pair.
        let one = KeyDims::Slowest(1e-6)
            .kept(&config(RopeKind::Neox))
            .unwrap();
        assert_eq!(one, vec![31, 63]);
        assert_eq!(
            KeyDims::All.kept(&config(RopeKind::Neox)).unwrap(),
            (0..64).collect::<Vec<_>>()
        );
        assert_eq!(
            KeyDims::Slowest(1.0)
                .kept(&config(RopeKind::Interleaved))
                .unwrap(),
            (0..64).collect::<Vec<_>>()
        );
    }

    #[test]
    fn turns_threshold_picks_the_slow_pairs() {
        // θ = 1e5, D = 64, 8192 tokens: pair i turns 1e5^(-i/32)·8192/2π times, under half a
        // turn for i ≥ 22 (i = 21: 0.68 turns, i = 22: 0.48).
        let dims = KeyDims::Turns {
            turns: 0.5,
            tokens: 8192,
        };
        let inter = dims.kept(&config(RopeKind::Interleaved)).unwrap();
        assert_eq!(inter, (44..64).collect::<Vec<_>>());
        let neox = dims.kept(&config(RopeKind::Neox)).unwrap();
        assert_eq!(neox, (22..32).chain(54..64).collect::<Vec<_>>());
        // Twice the context, same turns: fewer pairs.
        let longer = KeyDims::Turns {
            turns: 0.5,
            tokens: 16384,
        }
        .kept(&config(RopeKind::Neox))
        .unwrap();
        assert!(longer.len() < neox.len() && !longer.is_empty());
    }

    #[test]
    fn bad_values_are_config_errors() {
        let c = config(RopeKind::Interleaved);
        for bad in [
            KeyDims::Slowest(0.0),
            KeyDims::Slowest(-0.5),
            KeyDims::Slowest(1.5),
            KeyDims::Slowest(f64::NAN),
            KeyDims::Turns {
                turns: 0.0,
                tokens: 8192,
            },
            KeyDims::Turns {
                turns: f64::INFINITY,
                tokens: 8192,
            },
            KeyDims::Turns {
                turns: 1.0,
                tokens: 0,
            },
            KeyDims::Queries {
                share: 0.0,
                tokens: 8192,
            },
            KeyDims::Queries {
                share: 1.5,
                tokens: 8192,
            },
            KeyDims::Queries {
                share: 0.5,
                tokens: 0,
            },
            // The slowest pair turns ~0.018 times over 8192 tokens.
            KeyDims::Turns {
                turns: 0.01,
                tokens: 8192,
            },
        ] {
            assert!(
                matches!(bad.kept(&c), Err(SaapError::Config(_))),
                "{bad:?} accepted"
            );
        }
        for spec in [
            "",
            "half",
            "slowest",
            "slowest:",
            "slowest:x",
            "slowest:2",
            "turns:-1",
            "all:1",
            "queries:0",
            "queries:x",
        ] {
            assert!(
                matches!(KeyDims::parse(spec, 8192), Err(SaapError::Config(_))),
                "`{spec}` accepted"
            );
        }
        assert_eq!(KeyDims::parse("all", 8192).unwrap(), KeyDims::All);
        assert_eq!(
            KeyDims::parse("slowest:0.5", 8192).unwrap(),
            KeyDims::Slowest(0.5)
        );
        assert_eq!(
            KeyDims::parse("turns:0.25", 4096).unwrap(),
            KeyDims::Turns {
                turns: 0.25,
                tokens: 4096
            }
        );
    }

    #[test]
    fn eigen_diagonalizes_a_symmetric_matrix() {
        let d = 5;
        let a: Vec<f64> = (0..d * d)
            .map(|k| {
                let (i, j) = (k / d, k % d);
                1.0 / (1.0 + i as f64 + j as f64) + if i == j { i as f64 } else { 0.0 }
            })
            .collect();
        let (values, v) = symmetric_eigen(a.clone(), d);
        for e in 0..d {
            // A v_e = λ_e v_e, and the eigenvectors are orthonormal.
            for i in 0..d {
                let av: f64 = (0..d).map(|j| a[i * d + j] * v[j * d + e]).sum();
                assert!((av - values[e] * v[i * d + e]).abs() < 1e-9);
            }
            for f in 0..d {
                let dot: f64 = (0..d).map(|i| v[i * d + e] * v[i * d + f]).sum();
                assert!((dot - if e == f { 1.0 } else { 0.0 }).abs() < 1e-9);
            }
        }
        let trace: f64 = (0..d).map(|i| a[i * d + i]).sum();
        assert!((values.iter().sum::<f64>() - trace).abs() < 1e-9);
    }

    #[test]
    fn rotation_average_mixes_fast_pairs_and_keeps_slow_ones() {
        // S = e0 e0ᵀ + e6 e6ᵀ (interleaved, D = 8): dimension 0 is in the fastest pair, which
        // turns many times over 100..2000 positions, so its energy spreads evenly over dims 0
        // and 1; dimension 6 is in the slowest pair (θ = 1e5: 1e5^(-6/8) ≈ 1.8e-4 rad per
        // position, at most 0.36 rad at 2000), so most of it stays.
        let mut c = config(RopeKind::Interleaved);
        c.layout = HeadLayout {
            n_q_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
        };
        c.window = 100;
        let mut s = vec![0f64; 64];
        s[0] = 1.0;
        s[6 * 8 + 6] = 1.0;
        let m = rotation_average(&c, &s, 100, 2000);
        assert!(
            (m[0] - 0.5).abs() < 0.1 && (m[9] - 0.5).abs() < 0.1,
            "{} {}",
            m[0],
            m[9]
        );
        assert!(
            m[6 * 8 + 6] > 0.9 && m[7 * 8 + 7] < 0.1,
            "{} {}",
            m[54],
            m[63]
        );
        let trace: f64 = (0..8).map(|i| m[i * 8 + i]).sum();
        assert!((trace - 2.0).abs() < 1e-9, "rotations keep the trace");
    }
}
