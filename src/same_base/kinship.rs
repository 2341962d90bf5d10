//! Do two models look fine-tuned from one base? Their weights then correlate almost perfectly
//! unit for unit (the identity matching): fine-tuning moves weights a little. Models trained
//! from different random initialisations correlate about 0 on the identity matching, because
//! their units are in unrelated orders; they need permutation matching before any averaging.

/// Mean identity-matching correlation at and above which two models are taken to share a base.
pub const SAME_BASE: f64 = 0.8;
/// Below this, the models are taken not to share one: their units must be matched first.
pub const DIFFERENT_BASES: f64 = 0.5;

/// Tensors smaller than this say little (a correlation of three biases is noise).
const MIN_ENTRIES: usize = 16;

/// A size-weighted mean of per-tensor Pearson correlations. Per tensor, not over all weights
/// at once: tensors differ in mean and scale (BatchNorm variances near 1, weights near 0), and
/// those offsets alone would correlate two unrelated models.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kinship {
    weighted: f64,
    entries: usize,
}

impl Kinship {
    /// Adds one tensor pair (same length). Constant tensors (in either model) and tiny ones
    /// are left out.
    pub fn add<T: Copy + Into<f64>>(&mut self, a: &[T], b: &[T]) {
        if a.len() < MIN_ENTRIES {
            return;
        }
        if let Some(r) = correlation(a, b) {
            self.weighted += r * a.len() as f64;
            self.entries += a.len();
        }
    }

    /// The mean correlation, `None` when no tensor counted.
    pub fn value(&self) -> Option<f64> {
        (self.entries > 0).then(|| self.weighted / self.entries as f64)
    }
}

/// Pearson correlation in f64 (of f32 or f64 values, read in place); `None` for a constant or
/// non-finite tensor.
pub fn correlation<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> Option<f64> {
    let n = a.len() as f64;
    let sum = |v: &[T]| v.iter().map(|&x| x.into()).sum::<f64>();
    let (ma, mb) = (sum(a) / n, sum(b) / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x.into() - ma, y.into() - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    let r = sab / (saa * sbb).sqrt();
    (saa > 0.0 && sbb > 0.0 && r.is_finite()).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permuted_copy_correlates_far_less_than_a_perturbed_one() {
        let a: Vec<f64> = (0..256)
            .map(|i| (i as f64 * 2.3 + 0.5 * (i * i) as f64).sin())
            .collect();
        let nudged: Vec<f64> = a
            .iter()
            .enumerate()
            .map(|(i, v)| v + 0.01 * (i as f64).cos())
            .collect();
        // Units in another order (i → 17·i mod 256, a permutation): correlation 0.02.
        let permuted: Vec<f64> = (0..256).map(|i| a[i * 17 % 256]).collect();
        let mut same = Kinship::default();
        same.add(&a, &nudged);
        assert!(same.value().is_some_and(|r| r > 0.99));
        let mut other = Kinship::default();
        other.add(&a, &permuted);
        assert!(other.value().is_some_and(|r| r.abs() < 0.1));
        let mut none = Kinship::default();
        none.add(&[1.0; 32], &a[..32]);
        assert!(none.value().is_none());
    }
}
