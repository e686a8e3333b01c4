//! Keys budgets spent where attention needs them: each layer's ℓ chosen from what calibration
//! measured on held-out text, rather than the same ℓ everywhere.
//!
//! Under a keys budget ([`crate::SaapAttention::set_keys_budget`]) every routed layer would
//! probe the same ℓ, the largest that fits the budget at the current lengths. Layers differ: in
//! some, sinks and window hold almost all of the attention, and probing more partitions finds
//! little; in others much of the mass lies among the indexed keys and each partition read finds
//! some. A [`ProbeCurve`] records, per layer, what each ℓ reads and finds on held-out queries;
//! [`plan_probes`] trades partitions between layers so that, for every budget (u partitions per
//! query head, fractional), the layers together read no more of their indexed keys than at u
//! everywhere (as measured) while finding as much of the attention mass as the curves allow. A
//! layer routed by Quest takes part through its *Quest curve*, on the same axis: at point u, the
//! pages that fill the u·G/C of its indexed keys a budget allowing u gives; planned p, it reads
//! p/u times the budget's pages ([`crate::SaapAttention::set_probe_plan`]).

use crate::error::{Result, SaapError};
use serde::{Deserialize, Serialize};

/// The least share of the uniform ℓ a layer keeps in a plan ([`plan_probes`]) unless told
/// otherwise: a quarter. On Qwen2.5 (H200, every layer sparse, `bench/NOTES.md` §32) it found the
/// most attention of the floors tried at 120k and 8% of the keys (perplexity ×1.026 against ×1.034
/// with no floor and ×1.069 with the uniform ℓ), and at 32k it equals no floor within noise;
/// half cost perplexity at 32k. With an index trained on 32k-token sequences, no floor below ¾
/// kept two of five passkeys at 120k with 4% of the keys (the uniform ℓ, 3, kept them); with one
/// trained on 64k-token sequences, floor ¼ kept all five (§33).
pub const DEFAULT_FLOOR: f64 = 0.25;

/// What probing ℓ = 1, 2, … partitions per query head read and find in one layer, measured on
/// held-out queries (means over queries and query heads; a group's heads read the union of
/// their probes, as decode does). A Quest curve has the same form: at point u, what the group's
/// best pages filling u·G/C of the indexed keys read and find.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeCurve {
    /// Share of all attention mass on the indexed keys (outside sinks and window).
    pub indexed_mass: f64,
    /// At ℓ = i + 1: indexed keys read / indexed keys.
    pub indexed_share: Vec<f64>,
    /// At ℓ = i + 1: share of the indexed attention mass in the keys read.
    pub indexed_recall: Vec<f64>,
}

impl ProbeCurve {
    /// Checks the curve for an index of `n_partitions` partitions.
    ///
    /// # Errors
    /// [`SaapError::Config`] when the curve is empty or longer than `n_partitions`, its two
    /// columns differ in length, a value is not finite or outside [0, 1], or a column falls as ℓ
    /// grows (a group's union only grows with ℓ, and so do the keys and mass in it).
    pub fn check(&self, n_partitions: usize) -> Result<()> {
        let n = self.indexed_share.len();
        if n == 0 || n > n_partitions || self.indexed_recall.len() != n {
            return Err(SaapError::Config(format!(
                "a probe curve needs 1..={n_partitions} points in both columns, got {n} shares \
                 and {} recalls",
                self.indexed_recall.len()
            )));
        }
        let values = std::iter::once(&self.indexed_mass)
            .chain(&self.indexed_share)
            .chain(&self.indexed_recall);
        if let Some(bad) = values.into_iter().find(|x| !(0.0..=1.0).contains(*x)) {
            return Err(SaapError::Config(format!(
                "probe curve value {bad} is not in [0, 1]"
            )));
        }
        for column in [&self.indexed_share, &self.indexed_recall] {
            if let Some(l) = column.windows(2).position(|w| w[1] < w[0]) {
                return Err(SaapError::Config(format!(
                    "probe curve falls from ℓ = {} to ℓ = {}",
                    l + 1,
                    l + 2
                )));
            }
        }
        Ok(())
    }

    /// Points of the curve (ℓ − 1 as the index).
    fn len(&self) -> usize {
        self.indexed_share.len()
    }

    /// Share of the indexed keys read at a fractional ℓ: on the line between the two whole ℓ
    /// around it, at most the curve's last point.
    fn share_at(&self, probes: f64) -> f64 {
        let below = (probes.floor() as usize).clamp(1, self.len());
        let above = (below + 1).min(self.len());
        let fraction = (probes - below as f64).clamp(0.0, 1.0);
        let (lo, hi) = (self.indexed_share[below - 1], self.indexed_share[above - 1]);
        lo + fraction * (hi - lo)
    }

    /// Share of the layer's attention mass found among the indexed keys at ℓ = `i` + 1.
    fn found(&self, i: usize) -> f64 {
        self.indexed_mass * self.indexed_recall[i]
    }

    /// The points a budget-optimal choice can stop at: the upper concave hull of (share, found)
    /// from ℓ = `start` + 1, as indices. Between two of them, no other ℓ finds more per key read.
    fn hull(&self, start: usize) -> Vec<usize> {
        let mut hull: Vec<usize> = vec![start];
        for i in start + 1..self.len() {
            // A point that reads no more and finds no more than the last kept one adds nothing.
            let last = *hull.last().expect("starts at the floor");
            if self.indexed_share[i] <= self.indexed_share[last]
                && self.found(i) <= self.found(last)
            {
                continue;
            }
            while hull.len() >= 2 {
                let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
                // b lies below the segment from a to i: drop it (a point on it, up to the
                // sums' rounding, stays as a place to stop between a and i).
                let cross = (self.indexed_share[b] - self.indexed_share[a])
                    * (self.found(i) - self.found(a))
                    - (self.found(b) - self.found(a))
                        * (self.indexed_share[i] - self.indexed_share[a]);
                if cross > 1e-12 {
                    hull.pop();
                } else {
                    break;
                }
            }
            hull.push(i);
        }
        hull
    }
}

/// A step of one layer along its hull: from ℓ = `from` + 1 to `to` + 1.
struct Step {
    layer: usize,
    from: usize,
    to: usize,
    cost: f64,
    /// Attention mass found per indexed key read.
    ratio: f64,
}

/// Columns of a plan per partition of the budget's ℓ: column k is for budgets that allow between
/// 1 + k / `PLAN_STEPS` and 1 + (k + 1) / `PLAN_STEPS` partitions per query head, so a plan also
/// spends the part of a budget a whole ℓ leaves over (Qwen2.5 at 120k: a 3% budget allows about
/// 1.9 partitions per head, where a whole ℓ of 1 left nothing to trade; `bench/NOTES.md` §50).
pub const PLAN_STEPS: usize = 8;

/// The budget's ℓ of plan column `column`: 1 + `column` / [`PLAN_STEPS`] partitions per query
/// head, fractional.
pub fn column_probes(column: usize) -> f64 {
    1.0 + column as f64 / PLAN_STEPS as f64
}

/// The plan column for a budget that allows `probes` partitions per query head (fractional:
/// allowed indexed keys · C / (G · indexed keys)); `None` below one partition.
pub fn plan_column(probes: f64) -> Option<usize> {
    // A little slack for the rounding of `allowed · C / (G · indexed)`.
    (probes >= 1.0).then(|| ((probes - 1.0) * PLAN_STEPS as f64 + 1e-9).floor() as usize)
}

/// Per layer, the ℓ to probe for each budget: `plan[layer][k]` where the budget allows
/// [`column_probes`]`(k)` partitions per query head, for k up to the longest curve's ℓ. A layer
/// without a curve (`None`: served dense, routed otherwise, or calibrated before curves existed)
/// keeps the budget's whole ℓ (the fractional one rounded down) and takes no part in the trade.
///
/// For each column, allowing u partitions per head, every layer with a curve starts at its
/// floor, ℓ = max(1, ⌈`floor` · ⌊u⌋⌉); then steps along the layers' concave hulls (from the
/// floor up) are taken in order of attention mass found per indexed key read, while the layers'
/// total share of indexed keys read stays within what they read at u (each layer's curve at
/// min(u, its length), between two whole ℓ on the line joining them). Layers whose indexed keys
/// hold little of the attention give up partitions to layers where reading more finds more.
/// `floor` bounds how far: the curves measure the mass of natural text, and a layer that finds
/// little there may still be the one that retrieves a rare fact (a passkey), so a layer keeps at
/// least that share of the whole ℓ (0: as few as one partition; 1: the whole ℓ itself, and
/// more where the fraction allows). The shares are the curves' measurements: a plan reads about
/// as many keys as the budget's ℓ everywhere would, not exactly (partitions and lengths differ
/// from calibration's). Budgeted instead at the u·G/C of the indexed keys the budget allows on
/// paper, a plan read 8.7% of the keys for a 10% budget (Qwen2.5 at 32k, `bench/NOTES.md` §50):
/// calibration's shares overstated decode's reads by about a quarter; measured against the same
/// ℓ everywhere, that bias cancels.
///
/// # Errors
/// [`SaapError::Config`] for a curve that fails [`ProbeCurve::check`] against `n_partitions`,
/// or a `floor` outside [0, 1] (NaN included).
pub fn plan_probes(
    curves: &[Option<&ProbeCurve>],
    n_partitions: usize,
    floor: f64,
) -> Result<Vec<Vec<usize>>> {
    check_floor(floor)?;
    for curve in curves.iter().flatten() {
        curve.check(n_partitions)?;
    }
    let longest = curves.iter().flatten().map(|c| c.len()).max().unwrap_or(0);
    // Columns from ℓ = 1 to the longest curve's end; past it a budget's whole ℓ holds.
    let columns = match longest {
        0 => 0,
        _ => (longest - 1) * PLAN_STEPS + 1,
    };
    let mut plan = vec![Vec::with_capacity(columns); curves.len()];
    // The ordered steps depend on the column only through the floor's least ℓ.
    let mut ordered: Option<(usize, Vec<Step>)> = None;
    for column in 0..columns {
        let probes = column_probes(column);
        let whole = probes.floor() as usize;
        let least = least_probes(floor, whole);
        let start = |c: &ProbeCurve| least.min(c.len()) - 1;
        let budget: f64 = curves.iter().flatten().map(|c| c.share_at(probes)).sum();
        let mut spent: f64 = curves
            .iter()
            .flatten()
            .map(|c| c.indexed_share[start(c)])
            .sum();
        let mut at_point: Vec<usize> = curves.iter().map(|c| c.map_or(0, &start)).collect();
        // A layer's hull is concave: its steps come in order, and one that does not fit ends it.
        let mut stopped = vec![false; curves.len()];
        if ordered.as_ref().map(|(l, _)| *l) != Some(least) {
            ordered = Some((least, steps(curves, start)));
        }
        let (_, order) = ordered.as_ref().expect("set above");
        for s in order {
            if stopped[s.layer] || at_point[s.layer] != s.from {
                continue;
            }
            // A little slack for the sums' rounding.
            if spent + s.cost <= budget + 1e-9 {
                spent += s.cost;
                at_point[s.layer] = s.to;
            } else {
                stopped[s.layer] = true;
            }
        }
        for (layer, c) in curves.iter().enumerate() {
            plan[layer].push(match c {
                Some(_) => at_point[layer] + 1,
                None => whole,
            });
        }
    }
    Ok(plan)
}

/// The fewest partitions a layer probes in a plan where the uniform ℓ is `uniform`:
/// max(1, ⌈`floor` · `uniform`⌉), never above `uniform` (floor ≤ 1). The product is rounded
/// first, so that 0.28 · 25 (7.000000000000001 in f64) gives 7, not 8.
fn least_probes(floor: f64, uniform: usize) -> usize {
    let product = floor * uniform as f64;
    let ceil = (product - 1e-9 * product.max(1.0)).ceil();
    (ceil as usize).clamp(1, uniform)
}

/// Checks a plan's floor (see [`plan_probes`]).
///
/// # Errors
/// [`SaapError::Config`] for a floor outside [0, 1] (NaN included).
pub fn check_floor(floor: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&floor) {
        return Err(SaapError::Config(format!(
            "a probe plan's floor is a share of the uniform ℓ in [0, 1], got {floor}"
        )));
    }
    Ok(())
}

/// The steps of every layer with a curve along its hull from `start`, best mass found per key
/// read first; within a layer, in hull order.
fn steps(curves: &[Option<&ProbeCurve>], start: impl Fn(&ProbeCurve) -> usize) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for (layer, c) in curves.iter().enumerate() {
        let Some(c) = c else { continue };
        // Found per key read, never above the layer's previous step's: on a hull it falls
        // anyway, and rounding must not put a later step of a layer before an earlier one.
        let mut ratio = f64::INFINITY;
        for w in c.hull(start(c)).windows(2) {
            let (cost, gain) = (
                c.indexed_share[w[1]] - c.indexed_share[w[0]],
                c.found(w[1]) - c.found(w[0]),
            );
            // A step that reads no more keys is free: before any other.
            if cost > 0.0 {
                ratio = ratio.min(gain / cost);
            }
            steps.push(Step {
                layer,
                from: w[0],
                to: w[1],
                cost,
                ratio,
            });
        }
    }
    steps.sort_by(|a, b| {
        (b.ratio.total_cmp(&a.ratio))
            .then(a.layer.cmp(&b.layer))
            .then(a.from.cmp(&b.from))
    });
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A curve from (share, recall) points.
    fn curve(indexed_mass: f64, points: &[(f64, f64)]) -> ProbeCurve {
        ProbeCurve {
            indexed_mass,
            indexed_share: points.iter().map(|p| p.0).collect(),
            indexed_recall: points.iter().map(|p| p.1).collect(),
        }
    }

    /// ℓ = 1..=`k` reading and finding ℓ / 10.
    fn linear(indexed_mass: f64, k: usize) -> ProbeCurve {
        let points: Vec<(f64, f64)> = (1..=k)
            .map(|i| (i as f64 / 10.0, i as f64 / 10.0))
            .collect();
        curve(indexed_mass, &points)
    }

    /// Total found and share read by a plan's column.
    fn totals(curves: &[ProbeCurve], plan: &[Vec<usize>], column: usize) -> (f64, f64) {
        curves.iter().zip(plan).fold((0.0, 0.0), |(f, s), (c, p)| {
            let i = p[column] - 1;
            (f + c.found(i), s + c.indexed_share[i])
        })
    }

    /// The column of a whole ℓ.
    fn at(probes: usize) -> usize {
        (probes - 1) * PLAN_STEPS
    }

    #[test]
    fn columns_follow_the_budgets_fractional_probes() {
        for column in 0..1000 {
            assert_eq!(plan_column(column_probes(column)), Some(column));
        }
        assert_eq!(plan_column(0.999), None);
        assert_eq!(plan_column(1.0), Some(0));
        assert_eq!(plan_column(3.4), Some(19));
        assert_eq!(plan_column(f64::NAN), None);
    }

    #[test]
    fn partitions_move_to_where_the_mass_is() {
        // Layer 0: the window holds nearly everything; layer 1: the indexed keys hold half.
        let (flat, rich) = (linear(0.02, 10), linear(0.5, 10));
        let curves = [flat.clone(), rich.clone()];
        let plan = plan_probes(&[Some(&flat), Some(&rich)], 16, 0.0).unwrap();
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(|p| p.len() == at(10) + 1));
        // At u = 1 nothing can move; at u = 3 the flat layer gives two of its partitions, and at
        // u = 3.5 the half partition per layer the budget adds buys the rich layer one more.
        assert_eq!((plan[0][0], plan[1][0]), (1, 1));
        assert_eq!((plan[0][at(3)], plan[1][at(3)]), (1, 5));
        assert_eq!(plan_column(3.5), Some(at(3) + PLAN_STEPS / 2));
        assert_eq!((plan[0][at(3) + 4], plan[1][at(3) + 4]), (1, 6));
        for column in 0..=at(10) {
            let (found, share) = totals(&curves, &plan, column);
            let budget = flat.share_at(column_probes(column)) * 2.0;
            assert!(
                share <= budget + 1e-9,
                "column {column}: {share} > {budget}"
            );
            let whole = column_probes(column).floor() as usize;
            let uniform = totals(&curves, &[vec![whole; 73], vec![whole; 73]], column);
            assert!(found >= uniform.0 - 1e-12, "column {column}");
        }
    }

    #[test]
    fn fractional_budgets_read_between_whole_ones() {
        let c = curve(0.4, &[(0.1, 0.3), (0.3, 0.5), (0.4, 0.6)]);
        for (probes, share) in [
            (1.0, 0.1),
            (1.5, 0.2),
            (2.25, 0.325),
            (3.0, 0.4),
            (7.5, 0.4),
        ] {
            assert!((c.share_at(probes) - share).abs() < 1e-12, "{probes}");
        }
    }

    #[test]
    fn a_floor_keeps_a_share_of_the_uniform_probe_in_every_layer() {
        let (flat, rich) = (linear(0.02, 10), linear(0.5, 10));
        let refs = [Some(&flat), Some(&rich)];
        // Floor ½ at u = 3: the flat layer keeps 2 and gives one partition (0 gave two).
        let half = plan_probes(&refs, 16, 0.5).unwrap();
        assert_eq!((half[0][at(3)], half[1][at(3)]), (2, 4));
        // At u = 6 it keeps 3, and the rich layer reads 9.
        assert_eq!((half[0][at(6)], half[1][at(6)]), (3, 9));
        // Floor 1: the whole ℓ in every layer, and where the budget allows a fraction more,
        // the rich layer takes it.
        let uniform = plan_probes(&refs, 16, 1.0).unwrap();
        for u in 1..=10 {
            assert!(uniform.iter().all(|p| p[at(u)] == u), "u {u}");
        }
        assert_eq!((uniform[0][at(3) + 4], uniform[1][at(3) + 4]), (3, 4));
        for bad in [-0.1, 1.01, f64::NAN, f64::INFINITY] {
            assert!(plan_probes(&refs, 16, bad).is_err(), "floor {bad}");
        }
    }

    #[test]
    fn the_floor_rounds_up_exact_products_exactly() {
        // Products just above a whole number in f64.
        assert_eq!(0.28 * 25.0_f64, 7.000000000000001);
        assert_eq!(least_probes(0.28, 25), 7);
        assert_eq!(least_probes(0.14, 150), 21);
        assert_eq!(least_probes(0.07, 100), 7);
        assert_eq!(least_probes(0.25, 3), 1);
        assert_eq!(least_probes(0.5, 3), 2);
        assert_eq!(least_probes(0.0, 5), 1);
        assert_eq!(least_probes(1.0, 128), 128);
        assert_eq!(least_probes(0.01, 1000), 10);
        assert_eq!(least_probes(0.011, 1000), 11);
    }

    #[test]
    fn matches_exhaustive_search_on_concave_curves() {
        // Three layers of concave curves: the greedy is then optimal up to one step that does
        // not fit; compare with every combination, at whole and fractional budgets.
        let concave = |mass: f64, pow: f64| {
            let pts: Vec<(f64, f64)> = (1..=6)
                .map(|i| {
                    let s = i as f64 / 6.0;
                    (s, s.powf(pow))
                })
                .collect();
            curve(mass, &pts)
        };
        let curves = [concave(0.3, 0.5), concave(0.1, 0.3), concave(0.6, 0.8)];
        let refs: Vec<Option<&ProbeCurve>> = curves.iter().map(Some).collect();
        let plan = plan_probes(&refs, 8, 0.0).unwrap();
        for column in 0..=at(6) {
            let budget: f64 = curves
                .iter()
                .map(|c| c.share_at(column_probes(column)))
                .sum();
            let mut best = 0.0f64;
            for a in 0..6 {
                for b in 0..6 {
                    for c in 0..6 {
                        let pick = [a, b, c];
                        let share: f64 = curves
                            .iter()
                            .zip(pick)
                            .map(|(k, i)| k.indexed_share[i])
                            .sum();
                        if share <= budget + 1e-9 {
                            best = best.max(curves.iter().zip(pick).map(|(k, i)| k.found(i)).sum());
                        }
                    }
                }
            }
            let (found, share) = totals(&curves, &plan, column);
            assert!(share <= budget + 1e-9);
            // Within the largest single step's gain of the optimum (the step that did not fit).
            let step = curves
                .iter()
                .flat_map(|k| (1..6).map(move |i| k.found(i) - k.found(i - 1)))
                .fold(0.0, f64::max);
            assert!(
                found >= best - step,
                "column {column}: {found} vs best {best}"
            );
            let whole = column_probes(column).floor() as usize;
            let uniform = vec![whole; at(6) + 1];
            let uniform = totals(
                &curves,
                &[uniform.clone(), uniform.clone(), uniform],
                column,
            );
            assert!(found >= uniform.0 - 1e-12);
        }
    }

    #[test]
    fn layers_without_curves_keep_the_uniform_probe() {
        let c = curve(0.4, &[(0.1, 0.3), (0.2, 0.5), (0.3, 0.6)]);
        let plan = plan_probes(&[None, Some(&c), None], 8, 0.0).unwrap();
        let whole: Vec<usize> = (0..=at(3)).map(|k| 1 + k / PLAN_STEPS).collect();
        assert_eq!(plan[0], whole);
        assert_eq!(plan[2], whole);
        // Alone, a layer can only spend its own keys.
        assert_eq!(plan[1], whole);
        assert!(plan_probes(&[None, None], 8, 0.0)
            .unwrap()
            .iter()
            .all(Vec::is_empty));
    }

    #[test]
    fn bad_curves_are_refused() {
        let good = curve(0.4, &[(0.1, 0.3), (0.2, 0.5)]);
        assert!(good.check(2).is_ok());
        assert!(good.check(1).is_err(), "longer than C");
        let mut bad = good.clone();
        bad.indexed_recall.pop();
        assert!(bad.check(8).is_err(), "columns differ");
        for value in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
            let mut bad = good.clone();
            bad.indexed_share[1] = value;
            assert!(bad.check(8).is_err(), "{value}");
            assert!(plan_probes(&[Some(&bad)], 8, 0.0).is_err());
        }
        let falling = curve(0.4, &[(0.2, 0.3), (0.1, 0.5)]);
        assert!(falling.check(8).is_err(), "shares fall");
        let falling = curve(0.4, &[(0.1, 0.5), (0.2, 0.3)]);
        assert!(falling.check(8).is_err(), "recalls fall");
        let empty = curve(0.4, &[]);
        assert!(empty.check(8).is_err());
    }

    #[test]
    fn any_valid_curves_give_a_plan_within_the_budget() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        // Curves as a valid file may hold them: any rising columns in [0, 1], of any length.
        let mut rng = StdRng::seed_from_u64(23);
        for _ in 0..200 {
            let layers = rng.random_range(1..6);
            let curves: Vec<Option<ProbeCurve>> = (0..layers)
                .map(|_| {
                    let n = rng.random_range(1..9);
                    let mut col = || {
                        let mut x: Vec<f64> = (0..n).map(|_| rng.random_range(0.0..=1.0)).collect();
                        x.sort_by(f64::total_cmp);
                        x
                    };
                    let (indexed_share, indexed_recall) = (col(), col());
                    let indexed_mass = rng.random_range(0.0..=1.0);
                    rng.random_bool(0.8).then_some(ProbeCurve {
                        indexed_mass,
                        indexed_share,
                        indexed_recall,
                    })
                })
                .collect();
            let refs: Vec<Option<&ProbeCurve>> = curves.iter().map(Option::as_ref).collect();
            // Half the draws with a floor, some of them at its ends.
            let floor = match rng.random_range(0..4) {
                0 => 0.0,
                1 => 1.0,
                _ => rng.random_range(0.0..=1.0),
            };
            let plan = plan_probes(&refs, 8, floor).unwrap();
            let longest = curves
                .iter()
                .flatten()
                .map(ProbeCurve::len)
                .max()
                .unwrap_or(0);
            let columns = plan.first().map_or(0, Vec::len);
            assert_eq!(
                columns,
                longest.saturating_sub(1) * PLAN_STEPS + (longest > 0) as usize
            );
            for column in 0..columns {
                let whole = column_probes(column).floor() as usize;
                let least = least_probes(floor, whole);
                let (mut read, mut budget) = (0.0, 0.0);
                for (c, p) in curves.iter().zip(&plan) {
                    let l = p[column];
                    match c {
                        Some(c) => {
                            assert!((1..=c.len()).contains(&l), "ℓ {l} beyond the curve");
                            assert!(l >= least.min(c.len()), "ℓ {l} below floor {floor}");
                            if floor == 1.0 && column % PLAN_STEPS == 0 {
                                assert_eq!(l, whole.min(c.len()), "floor 1 is the whole ℓ");
                            }
                            read += c.indexed_share[l - 1];
                            budget += c.share_at(column_probes(column));
                        }
                        None => assert_eq!(l, whole),
                    }
                }
                assert!(read <= budget + 1e-6, "column {column}: {read} > {budget}");
            }
        }
    }
}
