//! Calibration in several passes when the statistics of all groups do not fit in memory.
//!
//! Each tapped group holds Σxxᵀ over its units concatenated across models: (N·W)² f64 during
//! calibration, then its correlation, kept in f32 for the matching loop. A ViT-L-sized pair
//! has 24 MLP groups of 2 × 4,096 units: 12.9 GB of Σxxᵀ at once. Moments are exact sums, so
//! groups can be calibrated in separate passes over the same data and give the same
//! statistics; each pass costs one more forward pass of every model, and what stays between
//! passes is the f32 correlations of the groups done.

/// Bytes of one group's f64 moments (Σxxᵀ; Σx is negligible).
pub fn moment_bytes(units: usize) -> u64 {
    (units as u64).pow(2) * 8
}

/// Groups (id, units across models) split into passes, in the order given: a pass takes
/// groups while its f64 moments plus the f32 correlations of the passes before it stay
/// within `budget` bytes. A group larger than the budget by itself gets a pass of its own.
/// `None`: one pass.
pub fn plan(groups: &[(usize, usize)], budget: Option<u64>) -> Vec<Vec<usize>> {
    let Some(budget) = budget else {
        return vec![groups.iter().map(|g| g.0).collect()];
    };
    let mut passes: Vec<Vec<usize>> = Vec::new();
    let (mut kept, mut current, mut pass) = (0u64, 0u64, Vec::new());
    for &(id, units) in groups {
        let bytes = moment_bytes(units);
        if !pass.is_empty() && kept + current + bytes > budget {
            passes.push(std::mem::take(&mut pass));
            kept += current / 2;
            current = 0;
        }
        pass.push(id);
        current += bytes;
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
        // Four groups of 1,000 units (8 MB of moments each, 4 MB as f32 correlations).
        let groups: Vec<(usize, usize)> = (0..4).map(|i| (i, 1000)).collect();
        assert_eq!(plan(&groups, None), vec![vec![0, 1, 2, 3]]);
        assert_eq!(plan(&groups, Some(32_000_000)), vec![vec![0, 1, 2, 3]]);
        // 17 MB: two groups (16 MB), then 8 MB kept + two more (16 MB) > 17 MB: one, ...
        let p = plan(&groups, Some(17_000_000));
        assert_eq!(p, vec![vec![0, 1], vec![2], vec![3]]);
        // Smaller than one group: one pass each.
        assert_eq!(plan(&groups, Some(1)).len(), 4);
        let mut all: Vec<usize> = p.into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }
}
