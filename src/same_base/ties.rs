//! TIES-merging (Yadav et al., 2023): trim each task vector to its largest entries, elect one
//! sign per parameter, and average only the entries that agree with it.
//!
//! Trimming is per tensor (as mergekit does), not over the whole flattened model as in the
//! paper's code: a model-wide threshold lets the tensors with the largest updates (often the
//! embedding or the head) take the whole budget and leaves other layers at their base.

/// Keeps the `k = ⌊density · n⌋` entries of largest magnitude, zeroes the rest. Equal
/// magnitudes at the threshold are kept in index order, so exactly `k` entries survive (the
/// order a stable sort by decreasing magnitude gives). Returns the number kept that are
/// nonzero.
pub fn trim(tau: &mut [f64], density: f64) -> usize {
    let n = tau.len();
    let k = ((density * n as f64).floor() as usize).min(n);
    if k == n {
        return tau.iter().filter(|v| **v != 0.0).count();
    }
    if k == 0 {
        tau.fill(0.0);
        return 0;
    }
    let mut mags: Vec<f64> = tau.iter().map(|v| v.abs()).collect();
    let (_, threshold, _) = mags.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *threshold;
    let above = tau.iter().filter(|v| v.abs() > threshold).count();
    let mut ties_left = k - above;
    for v in tau.iter_mut() {
        let m = v.abs();
        if m > threshold {
            continue;
        }
        if m == threshold && ties_left > 0 {
            ties_left -= 1;
            continue;
        }
        *v = 0.0;
    }
    tau.iter().filter(|v| **v != 0.0).count()
}

/// What the sign election saw: parameters where the (nonzero) task-vector entries disagreed
/// in sign.
#[derive(Clone, Copy, Debug, Default)]
pub struct Election {
    pub conflicts: usize,
}

/// The elected sign's disjoint mean, entry by entry: the sign of Σᵢ wᵢ τᵢ, then
/// Σᵢ wᵢ τᵢ [sign τᵢ = elected] / Σᵢ wᵢ [sign τᵢ = elected], 0 where no entry agrees (all
/// zero, or a sum of exactly 0). Writes into `out`.
pub fn elect_and_mean(taus: &[Vec<f64>], weights: &[f64], out: &mut [f64]) -> Election {
    let mut election = Election::default();
    for (j, o) in out.iter_mut().enumerate() {
        let total: f64 = taus.iter().zip(weights).map(|(t, w)| w * t[j]).sum();
        let sign = if total > 0.0 {
            1.0
        } else if total < 0.0 {
            -1.0
        } else {
            0.0
        };
        let (mut num, mut den) = (0.0, 0.0);
        let (mut pos, mut neg) = (false, false);
        for (t, w) in taus.iter().zip(weights) {
            let v = t[j];
            pos |= v > 0.0;
            neg |= v < 0.0;
            if sign != 0.0 && v * sign > 0.0 {
                num += w * v;
                den += w;
            }
        }
        election.conflicts += usize::from(pos && neg);
        *o = if den != 0.0 { num / den } else { 0.0 };
    }
    election
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_keeps_exactly_the_largest_and_breaks_ties_in_index_order() {
        let mut t = vec![0.5, -2.0, 1.0, -1.0, 0.1];
        assert_eq!(trim(&mut t, 0.6), 3); // k = 3: -2, then 1 and -1 tie at the threshold
        assert_eq!(t, vec![0.0, -2.0, 1.0, -1.0, 0.0]);
        let mut t = vec![1.0, -1.0, 1.0, 3.0];
        assert_eq!(trim(&mut t, 0.5), 2); // k = 2: 3, then the first of three ties
        assert_eq!(t, vec![1.0, 0.0, 0.0, 3.0]);
        let mut t = vec![1.0, 2.0];
        assert_eq!(trim(&mut t, 0.4), 0);
        assert_eq!(t, vec![0.0, 0.0]);
    }

    #[test]
    fn the_disjoint_mean_averages_only_the_agreeing_entries() {
        let taus = vec![vec![1.0, -1.0, 0.0, 2.0], vec![3.0, 4.0, 0.0, -2.0]];
        let mut out = vec![9.0; 4];
        let e = elect_and_mean(&taus, &[1.0, 1.0], &mut out);
        // entry 1: sum 3 > 0, only 4 agrees; entry 3: sum 0, no sign, nothing agrees.
        assert_eq!(out, vec![2.0, 4.0, 0.0, 0.0]);
        assert_eq!(e.conflicts, 2);
    }
}
