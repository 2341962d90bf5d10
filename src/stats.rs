//! Streaming first and second moments of unit activations, in f64, and the Pearson correlation
//! they give. Memory is the statistics (units²), never the data: each batch is folded in and
//! dropped.

use ndarray::{Array1, Array2, ArrayView2, Axis};

/// Σx and Σxxᵀ over samples, for `units` units.
#[derive(Clone, Debug)]
pub struct Moments {
    pub count: u64,
    pub sum: Array1<f64>,
    pub outer: Array2<f64>,
}

impl Moments {
    pub fn new(units: usize) -> Moments {
        Moments {
            count: 0,
            sum: Array1::zeros(units),
            outer: Array2::zeros((units, units)),
        }
    }

    /// Folds in a batch `x` of shape [samples, units]. NaN and ±inf count as 0 (the reference's
    /// `nan_to_num`), so one bad activation cannot poison a whole group.
    pub fn add(&mut self, x: ArrayView2<f32>) {
        let clean = x.mapv(|v| if v.is_finite() { v as f64 } else { 0.0 });
        self.add_f64(clean.view());
    }

    /// `add` for f64 samples (already finite).
    pub fn add_f64(&mut self, clean: ArrayView2<f64>) {
        self.count += clean.nrows() as u64;
        self.sum += &clean.sum_axis(Axis(0));
        add_gram(&mut self.outer, clean);
    }

    /// Pearson correlation: Cov ⊘ max(σσᵀ, 1e-7), as the reference computes it. Variances are
    /// clamped at 0 (E[x²]−μ² can round below it); a dead unit (σ = 0) correlates 0 with all.
    pub fn correlation(&self) -> Array2<f64> {
        self.clone().into_correlation()
    }

    /// `correlation` computed in the Σxxᵀ buffer itself: on wide groups the statistics are
    /// the merge's largest allocation, and this way they are never held twice.
    pub fn into_correlation(self) -> Array2<f64> {
        let n = self.count.max(1) as f64;
        let mean = &self.sum / n;
        let mut cov = self.outer;
        let units = mean.len();
        let second: Vec<f64> = (0..units).map(|i| cov[[i, i]] / n).collect();
        for ((i, j), c) in cov.indexed_iter_mut() {
            *c = *c / n - mean[i] * mean[j];
        }
        // A unit whose variance is rounding noise relative to its second moment is dead:
        // E[x²]−μ² of a constant is ~1e-16·x², not 0, and dividing by the 1e-7 clamp would
        // turn that noise into spurious correlations.
        let dead: Vec<bool> = (0..units)
            .map(|i| cov[[i, i]] <= 1e-12 * second[i].max(f64::MIN_POSITIVE))
            .collect();
        let sd: Vec<f64> = (0..units).map(|i| cov[[i, i]].max(0.0).sqrt()).collect();
        for ((i, j), c) in cov.indexed_iter_mut() {
            let r = *c / (sd[i] * sd[j]).max(1e-7);
            *c = if dead[i] || dead[j] || !r.is_finite() {
                0.0
            } else {
                r
            };
        }
        cov
    }

    /// Mean and standard deviation per unit (for statistics repair).
    pub fn mean_std(&self) -> (Array1<f64>, Array1<f64>) {
        let n = self.count.max(1) as f64;
        let mean = &self.sum / n;
        let sd = Array1::from_shape_fn(mean.len(), |i| {
            (self.outer[[i, i]] / n - mean[i] * mean[i]).max(0.0).sqrt()
        });
        (mean, sd)
    }
}

/// Pearson correlation between the rows of `z` ([units, features]), each row a sample of its
/// unit's values (weight vectors).
pub fn row_correlation(z: ArrayView2<f64>) -> Array2<f64> {
    let mut m = Moments::new(z.nrows());
    if z.iter().all(|v| v.is_finite()) {
        // Samples are z's columns: Σxxᵀ straight from z's transposed view, no copy.
        m.add_f64(z.t());
    } else {
        m.add_f64(z.t().mapv(|v| if v.is_finite() { v } else { 0.0 }).view());
    }
    m.into_correlation()
}

/// `row_correlation` with the Gram product in f32 over rows centred in f64: weight similarity
/// only ranks candidate pairs for a matching, which f32's 24-bit mantissa over centred rows
/// does not change, and f32 runs the GEMM — the iterative loop's dominant cost on wide
/// convolutional groups — at twice f64's throughput in half the memory.
pub fn row_correlation_f32(z: ArrayView2<f64>) -> Array2<f64> {
    let (units, features) = z.dim();
    let mut centred = Array2::<f32>::zeros((units, features));
    let mut second = vec![0.0f64; units];
    for ((mut dst, src), sq) in centred
        .rows_mut()
        .into_iter()
        .zip(z.rows())
        .zip(&mut second)
    {
        let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
        let mean = src.iter().map(|&v| finite(v)).sum::<f64>() / features.max(1) as f64;
        for (d, &v) in dst.iter_mut().zip(src) {
            let v = finite(v);
            *sq += v * v;
            *d = (v - mean) as f32;
        }
    }
    let mut gram = Array2::<f32>::zeros((units, units));
    if units > 0 && features > 0 {
        // SAFETY: `gram` is an owned, standard-layout units×units array (element [i, j] at
        // i·units + j); `centred` is an owned, standard-layout units×features array read as
        // lhs (units×features: row stride features, column stride 1) and as rhs = its
        // transpose (features×units: row stride 1, column stride features). Every index the
        // kernel forms is in bounds, and the output is a separate buffer.
        unsafe {
            gemm::gemm(
                units,
                units,
                features,
                gram.as_mut_ptr(),
                1,
                units as isize,
                false,
                centred.as_ptr(),
                1,
                features as isize,
                centred.as_ptr(),
                features as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
    let n = features.max(1) as f64;
    let var: Vec<f64> = (0..units).map(|i| f64::from(gram[[i, i]]) / n).collect();
    // As in `into_correlation`: a row whose variance is rounding noise is dead.
    let dead: Vec<bool> = (0..units)
        .map(|i| var[i] <= 1e-12 * (second[i] / n).max(f64::MIN_POSITIVE))
        .collect();
    let sd: Vec<f64> = var.iter().map(|v| v.max(0.0).sqrt()).collect();
    Array2::from_shape_fn((units, units), |(i, j)| {
        let r = f64::from(gram[[i, j]]) / n / (sd[i] * sd[j]).max(1e-7);
        if dead[i] || dead[j] || !r.is_finite() {
            0.0
        } else {
            r
        }
    })
}

/// `outer += XᵀX` for a batch X [samples, units]: the dominant cost of calibration (a GEMM
/// over every batch). Done by the `gemm` crate, a pure-Rust BLAS-class kernel that dispatches
/// to AVX-512/AVX2/NEON at run time: measured at the machine's GEMM peak, 2× ndarray's
/// matrixmultiply in f64 (`benches/scaling.rs`), with no system library to install. Any
/// strides: a transposed view is read in place, never copied.
pub fn add_gram(outer: &mut Array2<f64>, x: ArrayView2<f64>) {
    let (n, c) = x.dim();
    assert_eq!(outer.dim(), (c, c), "gram matrix of {c} units");
    if n == 0 || c == 0 {
        return;
    }
    let (s0, s1) = (x.strides()[0], x.strides()[1]);
    let (d0, d1) = (outer.strides()[0], outer.strides()[1]);
    // SAFETY: `outer` is an owned c×c array whose element [i, j] sits at i·d0 + j·d1 from its
    // pointer. `x` is a view whose element [k, i] sits at k·s0 + i·s1 from its pointer, valid
    // for k < n, i < c (any strides, a transposed view included). XᵀX reads x as lhs (c×n:
    // lhs[i,k] = x[k,i], row stride s1, column stride s0) and as rhs (n×c: row stride s0,
    // column stride s1); every index the kernel forms is one of those, and `outer` is a
    // separate owned buffer.
    unsafe {
        gemm::gemm(
            c,
            c,
            n,
            outer.as_mut_ptr(),
            d1,
            d0,
            true,
            x.as_ptr(),
            s0,
            s1,
            x.as_ptr(),
            s1,
            s0,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn gram_accumulation_matches_a_triple_loop() {
        let (n, c) = (37, 19);
        let x = Array2::from_shape_fn((n, c), |(i, j)| ((i * 31 + j * 17) % 13) as f64 - 6.5);
        let mut outer = Array2::from_elem((c, c), 0.5);
        add_gram(&mut outer, x.view());
        // A column-major view, and a column-major accumulator, by their strides.
        add_gram(&mut outer, x.t().as_standard_layout().t());
        let mut fortran = Array2::from_elem((c, c), 0.0).reversed_axes();
        add_gram(&mut fortran, x.view());
        assert_eq!(
            fortran.mapv(|v| v + 0.5) + &fortran,
            outer,
            "column-major accumulator"
        );
        for i in 0..c {
            for j in 0..c {
                let want: f64 = 0.5 + 2.0 * (0..n).map(|k| x[[k, i]] * x[[k, j]]).sum::<f64>();
                assert!((outer[[i, j]] - want).abs() < 1e-9, "[{i},{j}]");
            }
        }
    }

    #[test]
    fn correlation_matches_a_direct_computation() {
        // Unit 1 = 2·unit 0 + 1 (corr 1), unit 2 = −unit 0 (corr −1), unit 3 dead.
        let x = array![
            [1.0f32, 3.0, -1.0, 5.0],
            [2.0, 5.0, -2.0, 5.0],
            [4.0, 9.0, -4.0, 5.0]
        ];
        let mut m = Moments::new(4);
        m.add(x.slice(ndarray::s![..2, ..]));
        m.add(x.slice(ndarray::s![2.., ..]));
        let c = m.correlation();
        assert!((c[[0, 1]] - 1.0).abs() < 1e-9);
        assert!((c[[0, 2]] + 1.0).abs() < 1e-9);
        assert_eq!(c[[3, 0]], 0.0);
        assert_eq!(c[[3, 3]], 0.0);
        let (mean, sd) = m.mean_std();
        assert!((mean[0] - 7.0 / 3.0).abs() < 1e-12);
        assert!(sd[3] == 0.0);
    }

    #[test]
    fn f32_row_correlation_matches_the_f64_one() {
        let z = Array2::from_shape_fn((9, 40), |(i, j)| {
            ((i * 13 + j * 7) as f64 * 0.37).sin() * (1.0 + i as f64) + 0.3 * i as f64
        });
        let mut z = z;
        z.row_mut(4).fill(2.5); // a dead unit
        let (a, b) = (row_correlation(z.view()), row_correlation_f32(z.view()));
        let d = (&a - &b).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(d < 1e-5, "f32 correlation differs by {d}");
        assert!(b.row(4).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn nan_and_inf_do_not_poison_the_statistics() {
        let x = array![[1.0f32, f32::NAN], [2.0, f32::INFINITY], [3.0, 1.0]];
        let mut m = Moments::new(2);
        m.add(x.view());
        assert!(m.correlation().iter().all(|v| v.is_finite()));
    }
}
