//! Σxxᵀ held as its upper triangle. The second moment of a group's units is symmetric, and on
//! wide groups it is the merge's largest allocation and its calibration's largest arithmetic:
//! a ViT-B pair's twelve MLP groups of 2 × 3,072 units hold 3.6 GB of f64 Σxxᵀ, and each
//! batch costs samples × 6,144² multiply-adds per group. Computing and storing only the upper
//! triangle halves both. BLAS has `syrk` for this; the `gemm` crate (our pure-Rust GEMM) has
//! no symmetric rank-k update, so the triangle is cut into column panels and each panel is one
//! ordinary GEMM: `X[:, ..end]ᵀ · X[:, start..end]`.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// Columns per panel. The triangle costs `n²/2 + n·PANEL/2` elements: 4 % over the exact
/// half at 6,144 units, while each panel stays a GEMM wide enough to run at the kernel's peak.
const PANEL: usize = 256;

/// A symmetric `units × units` matrix, stored as its upper triangle in column panels.
#[derive(Clone, Debug)]
pub struct Symmetric<T> {
    units: usize,
    panel: usize,
    /// Panel `p` holds columns `p·panel .. end` of rows `0 .. end` (row-major), where
    /// `end = min(units, (p + 1)·panel)`: the upper triangle with its diagonal blocks whole.
    panels: Vec<Array2<T>>,
}

/// Σxxᵀ of a group's units, accumulated in f64.
pub type SymmetricGram = Symmetric<f64>;

impl<T: Copy + Default> Symmetric<T> {
    pub fn zeros(units: usize) -> Symmetric<T> {
        Symmetric::with_panel(units, PANEL)
    }

    fn with_panel(units: usize, panel: usize) -> Symmetric<T> {
        let (panel, shapes) = panel_shapes(units, panel);
        Symmetric {
            units,
            panel,
            panels: shapes.map(Array2::default).collect(),
        }
    }

    /// The matrix's side.
    pub fn units(&self) -> usize {
        self.units
    }

    /// Elements the triangle of `units` holds (what `bytes` counts, before allocating it).
    pub fn elements(units: usize) -> usize {
        panel_shapes(units, PANEL)
            .1
            .map(|(rows, cols)| rows * cols)
            .sum()
    }

    /// Element `[i, j]` of the full matrix.
    pub fn get(&self, i: usize, j: usize) -> T {
        let (i, j) = if i <= j { (i, j) } else { (j, i) };
        self.panels[j / self.panel][[i, j % self.panel]]
    }

    /// The same triangle with every element mapped by `f(i, j, value)` (i ≤ j).
    pub fn map<U: Copy + Default>(&self, f: impl Fn(usize, usize, T) -> U) -> Symmetric<U> {
        let panels = self
            .panels
            .iter()
            .enumerate()
            .map(|(p, panel)| {
                let start = p * self.panel;
                Array2::from_shape_fn(panel.dim(), |(i, c)| f(i, start + c, panel[[i, c]]))
            })
            .collect();
        Symmetric {
            units: self.units,
            panel: self.panel,
            panels,
        }
    }

    /// Calls `f(i, j, value)` once for every element of the upper triangle (i ≤ j), panel by
    /// panel and row by row: what touches the mirrored element `[j, i]` of a full matrix beside
    /// `[i, j]` stays within one panel's columns, in cache.
    pub fn for_each_upper(&self, mut f: impl FnMut(usize, usize, T)) {
        for (p, panel) in self.panels.iter().enumerate() {
            let start = p * self.panel;
            for (i, row) in panel.outer_iter().enumerate() {
                for (c, &v) in row.iter().enumerate().skip(i.max(start) - start) {
                    f(i, start + c, v);
                }
            }
        }
    }

    /// The full matrix, each element `f(i, j, value)`, where `f` must be symmetric in
    /// `(i, j)`: it is evaluated on the upper triangle and mirrored.
    pub fn map_full<U: Copy + Default>(&self, f: impl Fn(usize, usize, T) -> U) -> Array2<U> {
        let n = self.units;
        let mut out = Array2::<U>::default((n, n));
        self.for_each_upper(|i, j, v| out[[i, j]] = f(i, j, v));
        mirror_upper(&mut out);
        out
    }

    /// The full matrix.
    pub fn to_full(&self) -> Array2<T> {
        self.map_full(|_, _, v| v)
    }

    /// The triangle's storage: each panel's elements in row-major order, panel by panel (what
    /// a spill file holds; `panels_mut` of a triangle of the same units reads it back).
    pub fn panels(&self) -> impl Iterator<Item = &[T]> {
        self.panels
            .iter()
            .map(|p| p.as_slice().expect("panels are built in standard layout"))
    }

    /// The triangle's storage to fill, in the order `panels` gives it.
    pub fn panels_mut(&mut self) -> impl Iterator<Item = &mut [T]> {
        self.panels.iter_mut().map(|p| {
            p.as_slice_mut()
                .expect("panels are built in standard layout")
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.panels.iter().map(|p| p.len()).sum::<usize>() * std::mem::size_of::<T>()
    }
}

impl<T: ndarray::LinalgScalar + Default> Symmetric<T> {
    /// `self += beta · xᵀx` for a batch `x` of `[samples, units]` (any strides; a transposed
    /// view is read in place), in f64 or f32: the gemm crate's kernel for either.
    pub fn add_scaled(&mut self, x: ArrayView2<T>, beta: T) {
        assert_eq!(x.ncols(), self.units, "batch of {} units", self.units);
        for (p, panel) in self.panels.iter_mut().enumerate() {
            let (start, end) = (p * self.panel, panel.nrows());
            super::add_product_scaled(
                panel.view_mut(),
                x.slice(ndarray::s![.., ..end]).t(),
                x.slice(ndarray::s![.., start..end]),
                beta,
            );
        }
    }

    /// `add_upper_into` of every triangle in `all`, in their order, several per pass over
    /// `out`: each element gets the same f64 additions in the same order, but `out` (the
    /// largest matrix of a wide group's weight similarity) is read and written once per four
    /// triangles instead of once per triangle. All must have the same units.
    pub fn add_all_upper_into(all: &[&Symmetric<T>], mut out: ArrayViewMut2<f64>)
    where
        f64: From<T>,
    {
        let Some(first) = all.first() else { return };
        let units = first.units;
        assert!(
            all.iter()
                .all(|t| t.units == units && t.panel == first.panel),
            "sum of triangles of different units"
        );
        assert_eq!(out.dim(), (units, units), "sum of {units} units");
        for four in all.chunks(4) {
            for p in 0..first.panels.len() {
                let start = p * first.panel;
                let panels: Vec<&Array2<T>> = four.iter().map(|t| &t.panels[p]).collect();
                for i in 0..panels[0].nrows() {
                    let skip = i.max(start) - start;
                    let end = start + panels[0].ncols();
                    let mut dst = out.slice_mut(ndarray::s![i, start + skip..end]);
                    let Some(dst) = dst.as_slice_mut() else {
                        unreachable!("rows of a standard-layout matrix are contiguous")
                    };
                    let rows: Vec<&[T]> = panels
                        .iter()
                        .map(|panel| {
                            let row = panel.row(i).to_slice().unwrap_or(&[]);
                            &row[skip..]
                        })
                        .collect();
                    add_rows(dst, &rows);
                }
            }
        }
    }

    /// Adds the triangle onto the upper triangle (and diagonal) of `out`, a full
    /// `units × units` matrix; its lower triangle is left as it is (`mirror_upper` completes
    /// it). Row slices of each panel go onto row slices of `out`: contiguous both sides.
    pub fn add_upper_into(&self, out: &mut Array2<f64>)
    where
        f64: From<T>,
    {
        Symmetric::add_all_upper_into(&[self], out.view_mut());
    }
}

impl Symmetric<f64> {
    /// `self += xᵀx` for a batch `x` of `[samples, units]` (any strides).
    pub fn add(&mut self, x: ArrayView2<f64>) {
        self.add_scaled(x, 1.0);
    }

    /// `self += other` (statistics of the same units from other data).
    pub fn add_assign(&mut self, other: &Symmetric<f64>) {
        assert_eq!(self.units, other.units, "sums of different widths");
        for (a, b) in self.panels.iter_mut().zip(&other.panels) {
            *a += b;
        }
    }

    /// `self += xᵀx` for f32 samples `x` (`[samples, units]`, any strides): each panel's
    /// product in f32 (twice f64's throughput), added into the f64 panel. The caller keeps
    /// the samples few (f32 sums) and centred (`Moments::add_f32`).
    pub fn add_f32(&mut self, x: ArrayView2<f32>) {
        assert_eq!(x.ncols(), self.units, "batch of {} units", self.units);
        let mut scratch = Vec::new();
        for (p, panel) in self.panels.iter_mut().enumerate() {
            let (start, end) = (p * self.panel, panel.nrows());
            super::add_product_f32(
                panel.view_mut(),
                x.slice(ndarray::s![.., ..end]).t(),
                x.slice(ndarray::s![.., start..end]),
                &mut scratch,
            );
        }
    }

    /// The upper triangle of a full matrix (what `to_full` gives back).
    pub fn from_full(full: ArrayView2<f64>) -> Symmetric<f64> {
        let mut s = Symmetric::zeros(full.nrows());
        for (p, panel) in s.panels.iter_mut().enumerate() {
            let start = p * s.panel;
            for ((i, c), v) in panel.indexed_iter_mut() {
                *v = full[[i, start + c]];
            }
        }
        s
    }
}

/// The panel width `panel` comes to for `units` (at least 1, at most `units`), and each
/// panel's `(rows, columns)`: rows `0 .. end` of columns `start .. end`.
fn panel_shapes(units: usize, panel: usize) -> (usize, impl Iterator<Item = (usize, usize)>) {
    let panel = panel.clamp(1, units.max(1));
    let shapes = (0..units.div_ceil(panel)).map(move |p| {
        let end = ((p + 1) * panel).min(units);
        (end, end - p * panel)
    });
    (panel, shapes)
}

/// Copies the strict upper triangle of a square matrix onto its lower one, tile by tile so
/// that the transposed writes stay in cache.
pub(crate) fn mirror_upper<T: Copy>(a: &mut Array2<T>) {
    const TILE: usize = 64;
    let n = a.nrows();
    for ti in (0..n).step_by(TILE) {
        for tj in (ti..n).step_by(TILE) {
            for i in ti..(ti + TILE).min(n) {
                for j in tj.max(i + 1)..(tj + TILE).min(n) {
                    a[[j, i]] = a[[i, j]];
                }
            }
        }
    }
}

/// `dst[k] += rows[0][k]; dst[k] += rows[1][k]; …` in f64, in that order (what adding the rows
/// one after the other gives), for one to four rows: a loop per count, so that it vectorises.
pub(super) fn add_rows<T: Copy>(dst: &mut [f64], rows: &[&[T]])
where
    f64: From<T>,
{
    let f = |v: T| f64::from(v);
    match rows {
        [a] => dst.iter_mut().zip(*a).for_each(|(d, &a)| *d += f(a)),
        [a, b] => dst
            .iter_mut()
            .zip(a.iter().zip(*b))
            .for_each(|(d, (&a, &b))| *d = *d + f(a) + f(b)),
        [a, b, c] => dst
            .iter_mut()
            .zip(a.iter().zip(b.iter().zip(*c)))
            .for_each(|(d, (&a, (&b, &c)))| *d = *d + f(a) + f(b) + f(c)),
        [a, b, c, e] => dst
            .iter_mut()
            .zip(a.iter().zip(b.iter().zip(c.iter().zip(*e))))
            .for_each(|(d, (&a, (&b, (&c, &e))))| *d = *d + f(a) + f(b) + f(c) + f(e)),
        _ => rows.iter().for_each(|r| add_rows(dst, &[r])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(samples: usize, units: usize, seed: usize) -> Array2<f64> {
        Array2::from_shape_fn((samples, units), |(i, j)| {
            (((i * 7919 + j * 104_729 + seed * 31) % 1000) as f64 / 137.0).sin()
        })
    }

    /// Panels of every size (one column, uneven last panel, one panel for all) hold the
    /// upper triangle of the plain GEMM's Σxxᵀ, and give it back whole.
    #[test]
    fn panels_add_up_to_the_full_gram() {
        let units = 37;
        let (x, y) = (batch(50, units, 1), batch(23, units, 2));
        let mut want = Array2::<f64>::zeros((units, units));
        super::super::add_gram(&mut want, x.view());
        super::super::add_gram(&mut want, y.t().as_standard_layout().t());
        for panel in [1, 5, 16, 37, 64] {
            let mut s = SymmetricGram::with_panel(units, panel);
            s.add(x.view());
            // A column-major batch is read in place too.
            s.add(y.t().as_standard_layout().t());
            let full = s.to_full();
            for i in 0..units {
                for j in 0..units {
                    let w = want[[i.min(j), i.max(j)]];
                    assert!((full[[i, j]] - w).abs() < 1e-9, "panel {panel} [{i},{j}]");
                    assert_eq!(full[[i, j]], s.get(i, j));
                    assert_eq!(full[[i, j]].to_bits(), full[[j, i]].to_bits());
                }
            }
            assert!(s.bytes() < 8 * units * units || panel >= units);
            // f32 products added into the f64 panels give the same sums to f32 rounding.
            let mut s32 = SymmetricGram::with_panel(units, panel);
            s32.add_f32(x.mapv(|v| v as f32).view());
            s32.add_f32(y.mapv(|v| v as f32).t().as_standard_layout().t());
            for i in 0..units {
                for j in 0..units {
                    let w = want[[i.min(j), i.max(j)]];
                    let d = (s32.get(i, j) - w).abs();
                    assert!(d < 1e-5 * w.abs().max(1.0), "f32, panel {panel} [{i},{j}]");
                }
            }
        }
    }

    /// In f32, a scaled update (columns taken out with β = −1, as a weight block's update
    /// does) and the sum onto a full matrix's upper triangle give the direct Gram; `elements`
    /// counts what is allocated.
    #[test]
    fn f32_updates_sum_onto_a_full_matrix() {
        let units = 29;
        let x = batch(units, 40, 5).mapv(|v| v as f32);
        let kept = x.slice(ndarray::s![.., ..31]);
        let mut want = Array2::<f64>::zeros((units, units));
        for i in 0..units {
            for j in 0..units {
                want[[i, j]] = kept
                    .row(i)
                    .iter()
                    .zip(kept.row(j))
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
            }
        }
        for panel in [1, 4, 29, 64] {
            let mut s = Symmetric::<f32>::with_panel(units, panel);
            s.add_scaled(x.t(), 1.0);
            s.add_scaled(x.slice(ndarray::s![.., 31..]).t(), -1.0);
            // Onto ones: the sum adds to what is there; mirroring copies the upper triangle.
            let mut full = Array2::from_elem((units, units), 1.0);
            s.add_upper_into(&mut full);
            mirror_upper(&mut full);
            for ((i, j), &got) in full.indexed_iter() {
                assert!(
                    (got - 1.0 - want[[i, j]]).abs() < 1e-3,
                    "panel {panel} [{i},{j}]"
                );
            }
        }
        let s = Symmetric::<f32>::zeros(2000);
        assert_eq!(s.bytes(), 4 * Symmetric::<f32>::elements(2000));
        assert!(Symmetric::<f32>::elements(2000) < 2000 * 2000 * 6 / 10);
    }

    #[test]
    fn triangles_added_four_at_a_time_sum_as_one_after_the_other() {
        // Six f32 triangles over two panels (256 + 44 columns): a pass of four, then two.
        let units = 300;
        let all: Vec<Symmetric<f32>> = (0..6)
            .map(|k| {
                let x = batch(20 + k, units, k).mapv(|v| v as f32);
                let mut t = Symmetric::<f32>::zeros(units);
                t.add_scaled(x.view(), 1.0);
                t
            })
            .collect();
        let refs: Vec<&Symmetric<f32>> = all.iter().collect();
        let mut got = Array2::<f64>::zeros((units, units));
        Symmetric::add_all_upper_into(&refs, got.view_mut());
        let mut want = Array2::<f64>::zeros((units, units));
        for t in &all {
            want = want + t.to_full().mapv(f64::from);
        }
        for i in 0..units {
            for j in 0..units {
                let w = if i <= j { want[[i, j]] } else { 0.0 };
                assert_eq!(got[[i, j]].to_bits(), w.to_bits(), "[{i},{j}]");
            }
        }
    }

    #[test]
    fn sums_add_and_round_trip_through_the_full_matrix() {
        let units = 300;
        let mut a = SymmetricGram::zeros(units);
        a.add(batch(40, units, 3).view());
        let mut b = SymmetricGram::zeros(units);
        b.add(batch(60, units, 4).view());
        let mut both = SymmetricGram::zeros(units);
        both.add(
            ndarray::concatenate(
                ndarray::Axis(0),
                &[batch(40, units, 3).view(), batch(60, units, 4).view()],
            )
            .unwrap()
            .view(),
        );
        a.add_assign(&b);
        let diff = (&a.to_full() - &both.to_full()).mapv(f64::abs);
        assert!(
            diff.iter().all(|&d| d < 1e-9),
            "max {:?}",
            diff.iter().cloned().fold(0.0, f64::max)
        );
        assert_eq!(
            SymmetricGram::from_full(a.to_full().view()).to_full(),
            a.to_full()
        );
        // Storage is the triangle, not the square (two panels of 256: 256² + 300·44).
        let f32s = a.map(|_, _, v| v as f32);
        assert_eq!(f32s.bytes(), 4 * (256 * 256 + 300 * 44));
        let mut seen = Array2::<u32>::zeros((units, units));
        f32s.for_each_upper(|i, j, v| {
            assert!(i <= j);
            assert_eq!(v, a.get(i, j) as f32);
            seen[[i, j]] += 1;
        });
        assert!(seen
            .indexed_iter()
            .all(|((i, j), &k)| k == u32::from(i <= j)));
        assert_eq!(a.bytes(), 8 * (256 * 256 + 300 * 44));
    }
}
