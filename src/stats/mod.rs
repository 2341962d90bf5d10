//! Streaming first and second moments of unit activations, in f64, and the Pearson correlation
//! they give. Memory is the statistics (units²), never the data: each batch is folded in and
//! dropped.

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis};

mod row_block;
pub mod spare;
mod symmetric;

pub use row_block::{
    row_correlation_f32, row_correlation_of_blocks, row_correlation_upper_of_blocks, RowBlock,
};
pub(crate) use symmetric::mirror_upper;
pub use symmetric::{Symmetric, SymmetricGram};

/// Σx and Σxxᵀ over samples, for `units` units, taken about a fixed point near the units'
/// means (`shift`): covariances do not depend on it, and centred samples keep calibration's
/// f32 products (`add_f32`) as accurate as f64 ones of raw activations.
#[derive(Clone, Debug)]
pub struct Moments {
    pub count: u64,
    /// Σ(x − shift).
    pub sum: Array1<f64>,
    /// Σ(x − shift)(x − shift)ᵀ, symmetric: its upper triangle (half the memory and half the
    /// GEMM).
    pub outer: SymmetricGram,
    /// Zero, or (set by the first `add_f32` batch) that batch's mean per unit.
    shift: Array1<f64>,
}

/// Rows of an f32 batch multiplied in one GEMM before the product is added into the f64
/// sums: f32 accumulates over at most this many centred samples (relative error ~1e-6),
/// f64 across them.
const F32_ROWS: usize = 4096;

impl Moments {
    pub fn new(units: usize) -> Moments {
        Moments {
            count: 0,
            sum: Array1::zeros(units),
            outer: SymmetricGram::zeros(units),
            shift: Array1::zeros(units),
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
        let centred;
        let x = if self.shift.iter().any(|&c| c != 0.0) {
            centred = &clean - &self.shift;
            centred.view()
        } else {
            clean
        };
        self.count += x.nrows() as u64;
        self.sum += &x.sum_axis(Axis(0));
        self.outer.add(x);
    }

    /// Folds in a batch held unit-major (`[units, samples]`, finite), the products in f32 —
    /// twice f64's GEMM throughput, calibration's largest arithmetic — and their sums in f64.
    /// The batch is centred in place on `shift`, which the first batch sets to its means.
    pub fn add_f32(&mut self, mut batch: ArrayViewMut2<f32>) {
        if self.count == 0 && batch.ncols() > 0 {
            self.shift = batch.map_axis(Axis(1), |row| {
                row.iter().map(|&v| f64::from(v)).sum::<f64>() / row.len() as f64
            });
        }
        let sums: Vec<f64> = batch
            .rows_mut()
            .into_iter()
            .zip(self.shift.iter())
            .map(|(mut row, &c)| centre_f32(row.view_mut(), c))
            .collect();
        self.add_centred_f32(batch.view(), &sums);
    }

    /// The point the moments are taken about, once the first `add_f32` batch has set it:
    /// what a caller centring its own copy of the samples (`CentredSums`) subtracts.
    pub fn shift(&self) -> Option<&Array1<f64>> {
        (self.count > 0).then_some(&self.shift)
    }

    /// Folds in a unit-major batch already centred on `shift()` (each difference rounded to
    /// f32 once), with `sums[u]` the f64 sum of unit u's exact differences: `add_f32` without
    /// its centring pass, for a caller that centres while it copies the samples in.
    pub fn add_centred_f32(&mut self, batch: ArrayView2<f32>, sums: &[f64]) {
        for (s, &d) in self.sum.iter_mut().zip(sums) {
            *s += d;
        }
        self.count += batch.ncols() as u64;
        let mut start = 0;
        while start < batch.ncols() {
            let end = (start + F32_ROWS).min(batch.ncols());
            self.outer
                .add_f32(batch.slice(ndarray::s![.., start..end]).t());
            start = end;
        }
    }

    /// Moments about 0 from their sums (a statistics file's).
    pub fn about_zero(count: u64, sum: Array1<f64>, outer: SymmetricGram) -> Moments {
        let shift = Array1::zeros(sum.len());
        Moments {
            count,
            sum,
            outer,
            shift,
        }
    }

    /// Σx, about 0 (what statistics files hold).
    pub fn raw_sum(&self) -> Array1<f64> {
        &self.sum + &(&self.shift * self.count as f64)
    }

    /// Σxᵢxⱼ about 0: Σ(x−c)(x−c)ᵀ + c·Σ(x−c)ᵀ + Σ(x−c)·cᵀ + n·ccᵀ.
    pub fn raw_outer(&self, i: usize, j: usize) -> f64 {
        let (c, s, n) = (&self.shift, &self.sum, self.count as f64);
        self.outer.get(i, j) + c[i] * s[j] + s[i] * c[j] + n * c[i] * c[j]
    }

    /// `self += other`: statistics of the same units from other data, taken about the same
    /// point (statistics files are about 0).
    pub fn add_assign(&mut self, other: &Moments) {
        assert_eq!(self.shift, other.shift, "moments about different points");
        self.count += other.count;
        self.sum += &other.sum;
        self.outer.add_assign(&other.outer);
    }

    /// Pearson correlation: Cov ⊘ max(σσᵀ, 1e-7), as the reference computes it. Variances are
    /// clamped at 0 (E[x²]−μ² can round below it); a dead unit (σ = 0) correlates 0 with all.
    pub fn correlation(&self) -> Array2<f64> {
        self.outer.map_full(self.pearson())
    }

    /// `correlation` rounded to f32 as it is computed, and kept as its upper triangle: what
    /// matching holds for every group through the iterative loop (on a ViT-B pair, twelve
    /// MLP groups of 6,144 units: 0.9 GB so, 3.6 GB as full f64 matrices).
    pub fn correlation_f32(&self) -> Symmetric<f32> {
        let r = self.pearson();
        self.outer.map(|i, j, outer| r(i, j, outer) as f32)
    }

    /// The correlation of units `i`, `j` from their Σxᵢxⱼ.
    fn pearson(&self) -> impl Fn(usize, usize, f64) -> f64 {
        let n = self.count.max(1) as f64;
        let mean = &self.sum / n;
        let units = mean.len();
        let second: Vec<f64> = (0..units).map(|i| self.outer.get(i, i) / n).collect();
        let var: Vec<f64> = (0..units).map(|i| second[i] - mean[i] * mean[i]).collect();
        // A unit whose variance is rounding noise relative to its second moment (about 0) is
        // dead: E[x²]−μ² of a constant is ~1e-16·x², not 0, and dividing by the 1e-7 clamp
        // would turn that noise into spurious correlations.
        let c = &self.shift;
        let dead: Vec<bool> = (0..units)
            .map(|i| {
                let raw = second[i] + 2.0 * c[i] * mean[i] + c[i] * c[i];
                var[i] <= 1e-12 * raw.max(f64::MIN_POSITIVE)
            })
            .collect();
        let sd: Vec<f64> = var.iter().map(|v| v.max(0.0).sqrt()).collect();
        move |i, j, outer| {
            let r = (outer / n - mean[i] * mean[j]) / (sd[i] * sd[j]).max(1e-7);
            if dead[i] || dead[j] || !r.is_finite() {
                0.0
            } else {
                r
            }
        }
    }

    /// Mean and standard deviation per unit (for statistics repair).
    pub fn mean_std(&self) -> (Array1<f64>, Array1<f64>) {
        let n = self.count.max(1) as f64;
        let mean = &self.sum / n;
        let sd = Array1::from_shape_fn(mean.len(), |i| {
            (self.outer.get(i, i) / n - mean[i] * mean[i])
                .max(0.0)
                .sqrt()
        });
        (mean + &self.shift, sd)
    }
}

/// Per unit, the f64 sum of centred values written run by run into a unit-major chunk of
/// `len` samples, with the additions of `centre_f32` over the whole row in its order: the
/// first `8·⌊len/8⌋` positions into eight lanes by position, the rest added one by one after
/// the lanes. A tap's samples arrive as runs (an image's pixels, a block of tokens), and
/// centring them as they are copied saves a pass over every tapped value; the sums stay the
/// bits `centre_f32` gives, so the moments do not depend on which path made them.
pub struct CentredSums {
    lanes: Vec<[f64; 8]>,
    tails: Vec<[f64; 8]>,
    body: usize,
    len: usize,
}

impl CentredSums {
    pub fn new(units: usize, len: usize) -> CentredSums {
        CentredSums {
            lanes: vec![[0.0; 8]; units],
            tails: vec![[0.0; 8]; units],
            body: len / 8 * 8,
            len,
        }
    }

    /// Writes `src` (NaN and ±inf as 0) minus `c`, each difference rounded to f32 once, into
    /// `dst`, which holds positions `start..start + src.len()` of unit `u`'s row.
    pub fn centre_run(&mut self, u: usize, start: usize, src: &[f32], dst: &mut [f32], c: f64) {
        debug_assert_eq!(src.len(), dst.len());
        debug_assert!(start + src.len() <= self.len);
        let lanes = &mut self.lanes[u];
        let diff = |s: f32| f64::from(if s.is_finite() { s } else { 0.0 }) - c;
        // Up to the next multiple of 8 (or the end of the body), one at a time.
        let in_body = self.body.saturating_sub(start).min(src.len());
        let head = ((8 - start % 8) % 8).min(in_body);
        for i in 0..head {
            let d = diff(src[i]);
            dst[i] = d as f32;
            lanes[(start + i) % 8] += d;
        }
        // Whole groups of eight, lane k taking position 8m + k: the loop vectorizes.
        let (src_body, dst_body) = (&src[head..in_body], &mut dst[head..in_body]);
        for (s8, d8) in src_body.chunks_exact(8).zip(dst_body.chunks_exact_mut(8)) {
            for k in 0..8 {
                let d = diff(s8[k]);
                d8[k] = d as f32;
                lanes[k] += d;
            }
        }
        let done = head + (in_body - head) / 8 * 8;
        debug_assert!(done <= in_body);
        for i in done..in_body {
            let d = diff(src[i]);
            dst[i] = d as f32;
            lanes[(start + i) % 8] += d;
        }
        // Past the body: kept by position, added after the lanes.
        for i in in_body..src.len() {
            let d = diff(src[i]);
            dst[i] = d as f32;
            self.tails[u][start + i - self.body] = d;
        }
    }

    /// Each unit's sum, once its whole row has been written.
    pub fn sums(&self) -> Vec<f64> {
        let tail = self.len - self.body;
        self.lanes
            .iter()
            .zip(&self.tails)
            .map(|(lanes, tails)| {
                let mut sum: f64 = lanes.iter().sum();
                for &d in &tails[..tail] {
                    sum += d;
                }
                sum
            })
            .collect()
    }
}

/// `row −= c` in place (each difference rounded to f32 once), returning the sum of the exact
/// differences in f64 — over eight lanes, so that the loop vectorizes: a plain f64 sum is
/// sequential, and this loop runs over every tapped value.
fn centre_f32(mut row: ndarray::ArrayViewMut1<f32>, c: f64) -> f64 {
    let Some(values) = row.as_slice_mut() else {
        return row.iter_mut().fold(0.0, |s, v| {
            let d = f64::from(*v) - c;
            *v = d as f32;
            s + d
        });
    };
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (v, lane) in chunk.iter_mut().zip(&mut lanes) {
            let d = f64::from(*v) - c;
            *v = d as f32;
            *lane += d;
        }
    }
    let mut sum: f64 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        let d = f64::from(*v) - c;
        *v = d as f32;
        sum += d;
    }
    sum
}

/// `v` as a slice: in place where it is contiguous, else gathered into `scratch` (a strided
/// row or run). Slices go to vectorised loops; ndarray's iterator into `extend` or `zip` was
/// pushed element by element.
pub fn contiguous<'a, T: Copy>(
    v: &'a ndarray::ArrayView1<'_, T>,
    scratch: &'a mut Vec<T>,
) -> &'a [T] {
    match v.as_slice() {
        Some(s) => s,
        None => {
            scratch.clear();
            scratch.extend(v.iter());
            scratch
        }
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
    m.correlation()
}

/// `gram = alpha · gram + beta · x xᵀ` for x [rows, k], any strides, in f32 or f64 (the gemm
/// crate's kernel for either): the one GEMM call behind calibration's Σxxᵀ and the weight
/// similarities' Gram blocks.
fn add_outer<T: Copy + 'static>(gram: &mut Array2<T>, x: ArrayView2<T>, alpha: T, beta: T) {
    add_outer_on(gram, x, alpha, beta, gemm_threads());
}

/// The GEMM kernel's parallelism: every core on a machine with more than two. On two cores
/// (the reference machine: about one under numeric load) calibration already runs the engine
/// and the statistics side by side, and a threaded kernel only contends with the engine; on
/// sixteen, one thread left matching and the statistics on one core while fifteen idled
/// (docs/benchmarks-real.md, the H100 machine). The kernel splits the output, not the sums,
/// so the result does not depend on the thread count (tested).
fn gemm_threads() -> gemm::Parallelism {
    match spread_cores() {
        Some(cores) => gemm::Parallelism::Rayon(cores),
        None => gemm::Parallelism::None,
    }
}

/// The cores that independent statistics work (the kernel's output tiles, calibration's
/// groups) may spread over: all of them on a machine with more than two, `None` on two or
/// fewer (see `gemm_threads`).
pub fn spread_cores() -> Option<usize> {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    (cores > 2).then_some(cores)
}

fn add_outer_on<T: Copy + 'static>(
    gram: &mut Array2<T>,
    x: ArrayView2<T>,
    alpha: T,
    beta: T,
    parallelism: gemm::Parallelism,
) {
    let rows = x.nrows();
    assert_eq!(gram.dim(), (rows, rows), "gram matrix of {rows} rows");
    product_on(gram.view_mut(), x, x.t(), alpha, beta, parallelism);
}

/// `c += beta·a·b` (the machine's cores as `gemm_threads` says).
fn add_product_scaled<T: ndarray::LinalgScalar>(
    c: ArrayViewMut2<T>,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
) {
    product_on(c, a, b, T::one(), beta, gemm_threads());
}

/// `c = a·b`, `c`'s old values not read (no zeroing pass before a product made in a
/// scratch buffer: a ResNet-50 pair's calibration spent 1.2 s zeroing them).
fn set_product<T: ndarray::LinalgScalar>(
    mut c: ArrayViewMut2<T>,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
) {
    if a.ncols() == 0 {
        // An empty sum: the kernel is not called at all.
        c.fill(T::zero());
        return;
    }
    product_on(c, a, b, None, T::one(), gemm_threads());
}

/// `c = alpha·c + beta·a·b` for views of any strides (a transposed view is read in place);
/// `alpha` `None`: `c = beta·a·b`, its old values not read.
fn product_on<T: Copy + 'static>(
    mut c: ArrayViewMut2<T>,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    alpha: impl Into<Option<T>>,
    beta: T,
    parallelism: gemm::Parallelism,
) {
    let alpha: Option<T> = alpha.into();
    let ((m, k), n) = (a.dim(), b.ncols());
    assert_eq!(b.nrows(), k, "inner dimensions");
    assert_eq!(c.dim(), (m, n), "product of {m}×{n}");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let (a0, a1) = (a.strides()[0], a.strides()[1]);
    let (b0, b1) = (b.strides()[0], b.strides()[1]);
    let (c0, c1) = (c.strides()[0], c.strides()[1]);
    // SAFETY: `c` is an owned m×n array whose element [i, j] sits at i·c0 + j·c1 from its
    // pointer; `a` (m×k) and `b` (k×n) are views whose element [i, l] sits at i·s0 + l·s1,
    // valid within their dims (any strides, transposed views included). The kernel takes
    // column then row strides and forms only those indices; `c` is a separate owned buffer,
    // so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c1,
            c0,
            alpha.is_some(),
            a.as_ptr(),
            a1,
            a0,
            b.as_ptr(),
            b1,
            b0,
            alpha.unwrap_or(beta),
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `outer += XᵀX` for a batch X [samples, units]: the dominant cost of calibration (a GEMM
/// over every batch). Done by the `gemm` crate, a pure-Rust BLAS-class kernel that dispatches
/// to AVX-512/AVX2/NEON at run time: measured at the machine's GEMM peak, 2× ndarray's
/// matrixmultiply in f64 (`benches/scaling.rs`), with no system library to install. Any
/// strides: a transposed view is read in place, never copied. Generic so that the benchmarks
/// can measure the same kernel's f32 peak, the precision calibration multiplies in.
pub fn add_gram<T: ndarray::LinalgScalar>(outer: &mut Array2<T>, x: ArrayView2<T>) {
    add_outer(outer, x.t(), T::one(), T::one());
}

/// `c += a·b` in f64 on the same kernel (the refit's normal equations' right-hand side).
pub fn add_product(c: ArrayViewMut2<f64>, a: ArrayView2<f64>, b: ArrayView2<f64>) {
    add_product_scaled(c, a, b, 1.0);
}

/// `c += a·b` for f32 factors: the product in f32 (twice f64's throughput), made in
/// `scratch` (grown as needed, so that a caller multiplying often reuses it), then added
/// into the f64 sums. The caller keeps the inner dimension short (f32 sums over it).
pub fn add_product_f32(
    mut c: ArrayViewMut2<f64>,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    scratch: &mut Vec<f32>,
) {
    let (m, n) = c.dim();
    if scratch.len() < m * n {
        scratch.resize(m * n, 0.0);
    }
    let mut product = ArrayViewMut2::from_shape((m, n), &mut scratch[..m * n])
        .expect("scratch holds the product");
    set_product(product.view_mut(), a, b);
    c.zip_mut_with(&product, |d, &s| *d += f64::from(s));
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
    fn threaded_gemm_gives_the_single_threaded_sums_bit_for_bit() {
        // Large enough to pass the kernel's threading threshold; x xᵀ as Σxxᵀ forms it (the
        // transposed view of a samples × units batch), in f64 and f32.
        let (units, samples) = (512, 1024);
        let x = Array2::from_shape_fn((samples, units), |(i, j)| {
            (((i * 7919 + j * 104_729) % 1000) as f64 / 137.0).sin()
        });
        let mut one = Array2::from_elem((units, units), 0.25);
        let mut many = one.clone();
        add_outer_on(&mut one, x.t(), 1.0, 1.0, gemm::Parallelism::None);
        add_outer_on(&mut many, x.t(), 1.0, 1.0, gemm::Parallelism::Rayon(4));
        assert!(one
            .iter()
            .zip(&many)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let x32 = x.mapv(|v| v as f32);
        let mut one = Array2::<f32>::zeros((units, units));
        let mut many = one.clone();
        add_outer_on(&mut one, x32.t(), 0.0, 1.0, gemm::Parallelism::None);
        add_outer_on(&mut many, x32.t(), 0.0, 1.0, gemm::Parallelism::Rayon(4));
        assert!(one
            .iter()
            .zip(&many)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// Activations far from 0 beside their spread (a unit with mean 1,000 and σ ≈ 1) over
    /// more samples than one f32 product takes: the f32 path, centred on the first batch,
    /// gives the f64 correlations, means and deviations, and the sums about 0.
    #[test]
    fn f32_batches_give_the_f64_moments() {
        let (units, samples) = (7, 3 * F32_ROWS + 123);
        let x = Array2::from_shape_fn((samples, units), |(r, u)| {
            let wave = ((r * (u + 3)) as f64 * 0.013).sin() + 0.3 * ((r * 7 + u) as f64).cos();
            (1000.0 * (u % 2) as f64 + wave * (u + 1) as f64 * 0.5) as f32
        });
        let mut want = Moments::new(units);
        want.add(x.view());
        let mut got = Moments::new(units);
        // Two batches: the second is centred on the first one's means.
        for part in [
            x.slice(ndarray::s![..5000, ..]),
            x.slice(ndarray::s![5000.., ..]),
        ] {
            let mut batch = part.t().to_owned();
            got.add_f32(batch.view_mut());
        }
        assert_eq!(got.count, want.count);
        let (r_got, r_want) = (got.correlation(), want.correlation());
        let worst = (&r_got - &r_want).iter().fold(0f64, |m, d| m.max(d.abs()));
        assert!(worst < 1e-5, "correlations differ by {worst}");
        let ((m1, s1), (m2, s2)) = (got.mean_std(), want.mean_std());
        assert!((&m1 - &m2).iter().all(|d| d.abs() < 1e-6));
        assert!((&s1 - &s2).iter().all(|d| d.abs() < 1e-5));
        let sums = got.raw_sum();
        for i in 0..units {
            assert!((sums[i] - want.sum[i]).abs() < 1e-9 * want.sum[i].abs().max(1.0));
            for j in 0..units {
                let w = want.outer.get(i, j);
                let d = (got.raw_outer(i, j) - w).abs() / w.abs().max(1.0);
                assert!(d < 1e-6, "Σxx [{i},{j}] off by {d:e} relative");
            }
        }
    }

    /// Centring run by run, in runs of any length (1 to 10) and start, gives the values and the sums `centre_f32` gives over the whole row, bit for bit,
    /// with NaN and ±inf read as 0: for rows shorter than 8, of whole groups of 8, and with
    /// a tail that runs straddle.
    #[test]
    fn centring_in_runs_gives_the_whole_row_bits() {
        let mut rng = crate::symmetry::permute::SplitMix(11);
        for len in [1usize, 5, 8, 16, 29, 103] {
            let units = 3;
            let x = Array2::from_shape_fn((units, len), |(u, j)| match (u + j) % 17 {
                3 => f32::NAN,
                9 => f32::INFINITY,
                _ => (rng.uniform() * 100.0 - 20.0) as f32,
            });
            let shift = [1.25f64, -3.0, 17.123];
            let mut want = x.mapv(|v| if v.is_finite() { v } else { 0.0 });
            let want_sums: Vec<f64> = want
                .rows_mut()
                .into_iter()
                .zip(shift)
                .map(|(mut row, c)| centre_f32(row.view_mut(), c))
                .collect();
            let mut got = Array2::<f32>::from_elem((units, len), f32::NAN);
            let mut sums = CentredSums::new(units, len);
            for (u, &c) in shift.iter().enumerate() {
                let src = x.row(u).to_vec();
                let mut dst = vec![0f32; len];
                let mut at = 0;
                while at < len {
                    let run = ((rng.uniform() * 11.0) as usize).clamp(1, len - at);
                    sums.centre_run(u, at, &src[at..at + run], &mut dst[at..at + run], c);
                    at += run;
                }
                got.row_mut(u).assign(&Array1::from(dst));
            }
            let bits = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "values, row of {len}");
            let sum_bits = |v: &[f64]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                sum_bits(&sums.sums()),
                sum_bits(&want_sums),
                "sums, row of {len}"
            );
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
    fn nan_and_inf_do_not_poison_the_statistics() {
        let x = array![[1.0f32, f32::NAN], [2.0, f32::INFINITY], [3.0, 1.0]];
        let mut m = Moments::new(2);
        m.add(x.view());
        assert!(m.correlation().iter().all(|v| v.is_finite()));
    }
}
