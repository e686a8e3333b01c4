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
}

impl KeyDims {
    /// Parses a command-line value: `all`, `slowest:<share>` or `turns:<turns>` (counted over
    /// `tokens` positions).
    ///
    /// # Errors
    /// [`SaapError::Config`] for any other form or a number that does not parse or fails
    /// [`KeyDims::validate`].
    pub fn parse(spec: &str, tokens: usize) -> Result<Self> {
        let bad = || {
            SaapError::Config(format!(
                "key dims `{spec}`: expected `all`, `slowest:<share in (0, 1]>` or `turns:<turns > 0>`"
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
        }
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
        let d = config.layout.head_dim;
        let half = d / 2;
        let freq = Rope::new(&config.rope, d).inv_freq().to_vec();
        let pairs: Vec<usize> = match *self {
            KeyDims::All => return Ok((0..d).collect()),
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
}
