//! Calibration in several passes when the statistics of all groups do not fit in memory.
//!
//! Each tapped group holds Σxxᵀ over its units concatenated across models: the upper
//! triangle of (N·W)² f64 during calibration, then its correlation, the same triangle in f32,
//! kept for the matching loop. A ViT-L-sized pair has 24 MLP groups of 2 × 4,096 units: 6.4 GB
//! of Σxxᵀ at once. Moments are exact sums, so groups can be calibrated in separate passes over
//! the same data and give the same statistics; each pass costs one more forward pass of every
//! model, and what stays between passes is the f32 correlations of the groups done.

use crate::stats::Symmetric;

/// Bytes of one group's f64 moments (Σxxᵀ's triangle; Σx is negligible).
pub fn moment_bytes(units: usize) -> u64 {
    Symmetric::<f64>::elements(units) as u64 * 8
}

/// Bytes of one group's correlation as the matching keeps it (the triangle in f32).
pub fn correlation_bytes(units: usize) -> u64 {
    Symmetric::<f32>::elements(units) as u64 * 4
}

/// What calibration holds besides the moments: each engine's copy of its model (about the
/// model's size), two batches of outputs (one computed while the other is folded) and the
/// engines' own activations for one (measured on a ViT-B pair: 0.6 GB of engines, 0.7 GB
/// for batches of 0.22 GB).
pub fn engine_bytes(model_bytes: &[u64], batch_bytes: usize) -> u64 {
    model_bytes.iter().sum::<u64>() + 3 * batch_bytes as u64
}

/// Groups (id, units across models) split into passes, in the order given: a pass takes
/// groups while its f64 moments plus the f32 correlations of the passes before it (where
/// they are held in memory, `kept_held`, not spilled) stay within `budget` bytes. A group larger than
/// the budget by itself gets a pass of its own. `None`: one pass.
pub fn plan(groups: &[(usize, usize)], budget: Option<u64>, kept_held: bool) -> Vec<Vec<usize>> {
    let Some(budget) = budget else {
        return vec![groups.iter().map(|g| g.0).collect()];
    };
    let mut passes: Vec<Vec<usize>> = Vec::new();
    let (mut kept, mut current, mut correlations) = (0u64, 0u64, 0u64);
    let mut pass = Vec::new();
    for &(id, units) in groups {
        let bytes = moment_bytes(units);
        if !pass.is_empty() && kept + current + bytes > budget {
            passes.push(std::mem::take(&mut pass));
            kept += correlations;
            (current, correlations) = (0, 0);
        }
        pass.push(id);
        current += bytes;
        if kept_held {
            correlations += correlation_bytes(units);
        }
    }
    if !pass.is_empty() || passes.is_empty() {
        passes.push(pass);
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_fit_the_budget_and_keep_every_group_once() {
        // Four groups of 1,000 units: moments are a triangle (a little over half the square),
        // correlations the same triangle at half the bytes.
        let (m, c) = (moment_bytes(1000), correlation_bytes(1000));
        assert!(m > 4_000_000 && m < 5_200_000, "{m}");
        assert_eq!(2 * c, m);
        let groups: Vec<(usize, usize)> = (0..4).map(|i| (i, 1000)).collect();
        assert_eq!(plan(&groups, None, true), vec![vec![0, 1, 2, 3]]);
        assert_eq!(plan(&groups, Some(4 * m), true), vec![vec![0, 1, 2, 3]]);
        // Two groups' moments: two, then their correlations (m) + one more, then 1.5 m + one.
        let p = plan(&groups, Some(2 * m + 1), true);
        assert_eq!(p, vec![vec![0, 1], vec![2], vec![3]]);
        // Spilled correlations take nothing from the later passes: two and two.
        let spilled = plan(&groups, Some(2 * m + 1), false);
        assert_eq!(spilled, vec![vec![0, 1], vec![2, 3]]);
        // Smaller than one group: one pass each.
        assert_eq!(plan(&groups, Some(1), true).len(), 4);
        let mut all: Vec<usize> = p.into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }
}
