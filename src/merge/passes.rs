//! Calibration in several passes when the statistics of all groups do not fit in memory.
//!
//! Each tapped group holds Σxxᵀ over its units concatenated across models: the upper
//! triangle of (N·W)² f64 during calibration, then its correlation, the same triangle in f32,
//! kept for the matching loop. A ViT-L-sized pair has 24 MLP groups of 2 × 4,096 units: 6.4 GB
//! of Σxxᵀ at once. Moments are exact sums, so groups can be calibrated in separate passes over
//! the same data and give the same statistics; each pass costs one more forward pass of every
//! model, and what stays between passes is the f32 correlations of the groups done.

use crate::stats::Symmetric;

use super::calib::BATCH_BYTES;

/// Bytes of one group's f64 moments (Σxxᵀ's triangle; Σx is negligible).
pub fn moment_bytes(units: usize) -> u64 {
    Symmetric::<f64>::elements(units) as u64 * 8
}

/// Bytes of one group's correlation as the matching keeps it (the triangle in f32).
pub fn correlation_bytes(units: usize) -> u64 {
    Symmetric::<f32>::elements(units) as u64 * 4
}

/// Bytes one calibration batch's outputs may take (and, under a budget that binds, the
/// engines' activations for it: `Batching::activations`): `calib::BATCH_BYTES`, or a 32nd of
/// a `--max-memory` below 8 GiB, at least 32 MiB. Three batches' worth is set aside for the
/// engines (`engine_bytes`), so under a 2 GB budget the full 768 MiB left a ViT-B pair's
/// statistics almost nothing: 23 and more passes at 256 images. Smaller batches cost the
/// transformers nothing (ViT-B in ONNX Runtime: 2.65 images/s one at a time, 2.41 at 32).
pub fn batch_bytes(max_memory: Option<u64>) -> usize {
    let Some(budget) = max_memory else {
        return BATCH_BYTES;
    };
    usize::try_from(budget / 32)
        .unwrap_or(usize::MAX)
        .clamp(MIN_BATCH_BYTES, BATCH_BYTES)
}

/// The smallest `batch_bytes`: below it per-batch costs start to show on small models.
const MIN_BATCH_BYTES: usize = 32 << 20;

/// What calibration holds besides the moments: each engine's copy of its model (about the
/// model's size), two batches of outputs (one computed while the other is folded) and the
/// engines' own activations for one (measured on a ViT-B pair: 0.6 GB of engines, 0.7 GB
/// for batches of 0.22 GB).
pub fn engine_bytes(model_bytes: &[u64], batch_bytes: usize) -> u64 {
    model_bytes.iter().sum::<u64>() + 3 * batch_bytes as u64
}

/// A tapped group as the plan sees it.
#[derive(Clone, Copy, Debug)]
pub struct Tapped {
    pub id: usize,
    /// Units across models (the moments' side).
    pub units: usize,
    /// Bytes of one sample's tap outputs, across models: what a batch holds at least.
    pub sample_outputs: u64,
}

/// One calibration pass of a plan: the groups it taps, and what it holds beyond
/// `engine_bytes` while it runs: its f64 moments, the correlations held from the passes
/// before it, and its batches' outputs where one sample's already exceed `batch_bytes`.
#[derive(Debug, PartialEq, Eq)]
pub struct Planned {
    pub groups: Vec<usize>,
    pub held: u64,
}

/// Groups split into passes, in the order given: a pass takes groups while what it holds
/// (`Planned::held`) stays within `budget` bytes. A batch is cut to `batch_bytes` of outputs
/// but never below one sample, and three batches' worth are alive at once (one folded, one
/// computed, and its copy out of the engine), so where a pass's taps of one sample exceed
/// `batch_bytes` the excess counts three times: a ViT-B pass with every tap of 12 groups had
/// 183 MiB of outputs a sample against 64 MiB set aside. A group larger than the budget by
/// itself gets a pass of its own. `None`: one pass. `first_outputs`: one sample's outputs
/// the first pass takes besides its taps (statistics repair's endpoint values ride on it).
pub fn plan(
    groups: &[Tapped],
    first_outputs: u64,
    budget: Option<u64>,
    batch_bytes: usize,
    kept_held: bool,
) -> Vec<Planned> {
    let holds =
        |moments: u64, outputs: u64| moments + 3 * outputs.saturating_sub(batch_bytes as u64);
    let Some(budget) = budget else {
        return vec![Planned {
            groups: groups.iter().map(|g| g.id).collect(),
            held: holds(
                groups.iter().map(|g| moment_bytes(g.units)).sum(),
                first_outputs + groups.iter().map(|g| g.sample_outputs).sum::<u64>(),
            ),
        }];
    };
    let mut passes: Vec<Planned> = Vec::new();
    let (mut kept, mut moments, mut outputs, mut correlations) = (0u64, 0u64, first_outputs, 0u64);
    let mut pass = Vec::new();
    for g in groups {
        let with = kept + holds(moments + moment_bytes(g.units), outputs + g.sample_outputs);
        if !pass.is_empty() && with > budget {
            passes.push(Planned {
                groups: std::mem::take(&mut pass),
                held: kept + holds(moments, outputs),
            });
            kept += correlations;
            (moments, outputs, correlations) = (0, 0, 0);
        }
        pass.push(g.id);
        moments += moment_bytes(g.units);
        outputs += g.sample_outputs;
        if kept_held {
            correlations += correlation_bytes(g.units);
        }
    }
    if !pass.is_empty() || passes.is_empty() {
        passes.push(Planned {
            groups: pass,
            held: kept + holds(moments, outputs),
        });
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
        let groups: Vec<Tapped> = (0..4)
            .map(|id| Tapped {
                id,
                units: 1000,
                sample_outputs: 1000,
            })
            .collect();
        let ids =
            |p: &[Planned]| -> Vec<Vec<usize>> { p.iter().map(|p| p.groups.clone()).collect() };
        let held = |p: &[Planned]| -> Vec<u64> { p.iter().map(|p| p.held).collect() };
        let one = plan(&groups, 0, None, BATCH, true);
        assert_eq!(ids(&one), vec![vec![0, 1, 2, 3]]);
        assert_eq!(held(&one), vec![4 * m]);
        assert_eq!(
            ids(&plan(&groups, 0, Some(4 * m), BATCH, true)),
            vec![vec![0, 1, 2, 3]]
        );
        // Two groups' moments: two, then their correlations (m) + one more, then 1.5 m + one.
        let p = plan(&groups, 0, Some(2 * m + 1), BATCH, true);
        assert_eq!(ids(&p), vec![vec![0, 1], vec![2], vec![3]]);
        // The last is over the budget: its group alone does not fit beside what is kept.
        assert_eq!(held(&p), vec![2 * m, m + m, m + c + m]);
        // Spilled correlations take nothing from the later passes: two and two.
        let spilled = plan(&groups, 0, Some(2 * m + 1), BATCH, false);
        assert_eq!(ids(&spilled), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(held(&spilled), vec![2 * m, 2 * m]);
        // Smaller than one group: one pass each, each over the budget by its own moments.
        let tiny = plan(&groups, 0, Some(1), BATCH, true);
        assert_eq!(tiny.len(), 4);
        assert_eq!(tiny[0].held, m);
        let mut all: Vec<usize> = p.into_iter().flat_map(|p| p.groups).collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }

    /// Batches of 1 MB of outputs: below it, one sample's outputs cost nothing more.
    const BATCH: usize = 1 << 20;

    #[test]
    fn outputs_beyond_a_batch_count_three_times() {
        let m = moment_bytes(1000);
        let wide = |id| Tapped {
            id,
            units: 1000,
            sample_outputs: m / 2,
        };
        let groups = [wide(0), wide(1), wide(2)];
        // One sample of two groups: m of outputs, m - BATCH over the batch, three times.
        let over = |outputs: u64| 3 * outputs.saturating_sub(BATCH as u64);
        let one = plan(&groups, 0, None, BATCH, true);
        assert_eq!(one[0].held, 3 * m + over(3 * m / 2));
        // A budget for two groups' moments alone now takes one group a pass.
        let p = plan(&groups, 0, Some(2 * m + 1), BATCH, false);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].held, m + over(m / 2));
        assert!(p.iter().all(|p| p.held <= 2 * m + 1));
        // Batches that hold a sample's outputs of every group: moments alone decide.
        let roomy = plan(&groups, 0, Some(2 * m + 1), 2 * m as usize, false);
        assert_eq!(roomy.len(), 2);
        assert_eq!(roomy[0].held, 2 * m);
        // The first pass's own outputs leave it room for fewer groups: all three without
        // them, two with m of them, one with 2 m.
        let bare = plan(&groups, 0, Some(3 * m), 2 * m as usize, false);
        assert_eq!(bare[0].groups, vec![0, 1, 2]);
        let side = plan(&groups, m, Some(3 * m), 2 * m as usize, false);
        assert_eq!(side[0].groups, vec![0, 1]);
        assert_eq!(side[0].held, 2 * m);
        assert_eq!(side[1].held, m);
        let side = plan(&groups, 2 * m, Some(3 * m), 2 * m as usize, false);
        assert_eq!(side[0].groups, vec![0]);
    }

    #[test]
    fn batches_shrink_only_under_a_small_budget() {
        assert_eq!(batch_bytes(None), BATCH_BYTES);
        assert_eq!(batch_bytes(Some(12 << 30)), BATCH_BYTES);
        assert_eq!(batch_bytes(Some(8 << 30)), BATCH_BYTES);
        assert_eq!(batch_bytes(Some(2 << 30)), 64 << 20);
        assert_eq!(batch_bytes(Some(1)), MIN_BATCH_BYTES);
        let models = [300u64 << 20, 300 << 20];
        assert_eq!(
            engine_bytes(&models, batch_bytes(Some(2 << 30))),
            (600 << 20) + (192 << 20)
        );
    }
}
