//! Tap tensors folded into statistics at inference speed. A tap holds the units on one axis
//! (channels of an NCHW map, features of a token stream); every other element is a sample.
//! The data are read in place through a permuted view, a bounded chunk of rows at a time, so
//! a tap costs one pass over its elements plus the Σxxᵀ GEMM — never a transposed copy, a
//! per-model column block, and a concatenation of them (what the first version did: four
//! copies per tap per model per batch).

use ndarray::{Array1, ArrayViewD, CowArray, IxDyn};

use crate::error::{Error, Result};
use crate::onnx::TensorData;
use crate::stats::{CentredSums, Moments};

/// Rows per chunk: 64 K rows of 64 units is 16 MiB of f32; wide groups take fewer rows, so a
/// chunk stays within a few tens of MiB however large the batch and the maps. A GEMM over
/// few rows spends its time reading and writing the Σxxᵀ it adds into: a ViT-B MLP group
/// (6,144 units) takes 682 rows per chunk (170 when chunks were 1 Mi f64 elements).
const CHUNK_ELEMENTS: usize = 1 << 22;

/// The tap as f32 without a copy when it is f32 (the usual case).
fn as_f32(t: &TensorData) -> CowArray<'_, f32, IxDyn> {
    match t {
        TensorData::F32(a) => CowArray::from(a.view()),
        other => CowArray::from(other.to_f32()),
    }
}

/// Folds one batch of a group's taps — one tensor per model, aligned sample by sample — into
/// `m`, whose units are the models' units concatenated (model-major). NaN and ±inf count as 0.
///
/// Each tap is read as [outer, units, inner] (a free reshape of a standard-layout tensor:
/// `outer` the axes before the units, `inner` those after), whose unit rows are contiguous
/// runs of samples. They are copied as runs into a unit-major chunk, and the chunk's
/// transposed view goes to the GEMM, which takes any strides: one contiguous copy per element.
///
/// `positions` > 0 keeps about that many tap positions per calibration sample (every k-th
/// position along the spatial or token axes, evenly spread), for wide maps where the Σxxᵀ
/// arithmetic would outweigh the forward pass; 0 keeps them all.
pub fn add_joint(
    m: &mut Moments,
    taps: &[ArrayViewD<'_, f32>],
    axis: usize,
    width: usize,
    names: &[String],
    positions: usize,
) -> Result<()> {
    let mut blocks = Vec::with_capacity(taps.len());
    for (v, name) in taps.iter().zip(names) {
        if v.shape().get(axis) != Some(&width) {
            return Err(Error::tensor(
                name,
                format!(
                    "tap has shape {:?}, expected {width} units on axis {axis}",
                    v.shape()
                ),
            ));
        }
        if v.shape() != taps[0].shape() {
            return Err(Error::tensor(
                name,
                format!(
                    "tap has shape {:?} in this model and {:?} in model 0",
                    v.shape(),
                    taps[0].shape()
                ),
            ));
        }
        let outer: usize = v.shape()[..axis].iter().product();
        let inner: usize = v.shape()[axis + 1..].iter().product();
        let standard = v.as_standard_layout();
        blocks.push((standard, outer, inner));
    }
    let Some(&(_, outer, inner)) = blocks.first().map(|(a, o, i)| (a, *o, *i)).as_ref() else {
        return Ok(());
    };
    // Positions per calibration sample: the inner axes, or (units last) the outer ones after
    // the batch axis.
    let batch = taps[0].shape().first().copied().unwrap_or(1).max(1);
    let per_sample = if inner > 1 { inner } else { outer / batch };
    let stride = if positions == 0 {
        1
    } else {
        per_sample.div_ceil(positions).max(1)
    };
    let views: Vec<ndarray::ArrayView3<'_, f32>> = blocks
        .iter()
        .map(|(a, _, _)| {
            let v = a
                .view()
                .into_shape_with_order((outer, width, inner))
                .expect("standard layout reshapes freely");
            match (stride, inner > 1) {
                (1, _) => v,
                (k, true) => v.slice_move(ndarray::s![.., .., ..;k]),
                (k, false) => v.slice_move(ndarray::s![..;k, .., ..]),
            }
        })
        .collect();
    let (outer, inner) = (views[0].shape()[0], views[0].shape()[2]);
    let cols = width * views.len();
    let samples = outer * inner;
    let rows_per_chunk = (CHUNK_ELEMENTS / cols.max(1)).clamp(1, samples.max(1));
    CHUNK.with_borrow_mut(|buffer| {
        // Unit-major: chunk[col, row]; its transpose is the [rows, cols] sample matrix. The
        // buffer is the thread's, kept between taps (`release_buffers`), not fresh zeroed
        // pages per tap; with the centring below, `mudsc stats` on the ResNet-18 bench pair
        // went 9.63–9.79 → 9.36–9.49 s (alternating runs), the statistics bit for bit.
        if buffer.len() < cols * rows_per_chunk {
            buffer.resize(cols * rows_per_chunk, 0.0);
        }
        let mut chunk = ndarray::ArrayViewMut2::from_shape(
            (cols, rows_per_chunk),
            &mut buffer[..cols * rows_per_chunk],
        )
        .expect("the buffer holds the chunk");
        let (mut o, mut i, mut taken) = (0, 0, 0);
        let mut strided = Vec::new();
        while o < outer {
            let rows = rows_per_chunk.min(samples - taken);
            // Once the moments have their shift (after their first chunk), each run is
            // centred as it is copied, with `centre_f32`'s sums; the first chunk is copied
            // as it is and sets the shift. Units last, the tiled transpose copies as it is
            // and `add_f32` centres the chunk: centring inside the transpose, value by
            // value, made the bundled ViTs' calibration slower (0.64 → 0.75 s).
            let shift = m.shift().filter(|_| inner > 1).map(|c| c.to_vec());
            let mut sums = CentredSums::new(cols, rows);
            // Fill the chunk's `rows` rows with runs (o, i..i_end) of the same outer index.
            let mut filled = 0;
            while filled < rows {
                if inner == 1 {
                    // Units last (token streams, Gemm outputs): each outer index is one row,
                    // so the runs would be single elements; `run` rows go over as a tiled
                    // transpose.
                    let run = rows - filled;
                    for (k, v) in views.iter().enumerate() {
                        transpose_into(
                            v.slice(ndarray::s![o..o + run, .., 0]),
                            chunk.slice_mut(ndarray::s![
                                k * width..(k + 1) * width,
                                filled..filled + run
                            ]),
                        );
                    }
                    filled += run;
                    o += run;
                    continue;
                }
                let run = (inner - i).min(rows - filled);
                for (k, v) in views.iter().enumerate() {
                    for u in 0..width {
                        let src = v.slice(ndarray::s![o, u, i..i + run]);
                        let mut dst =
                            chunk.slice_mut(ndarray::s![k * width + u, filled..filled + run]);
                        let Some(dst) = dst.as_slice_mut() else {
                            unreachable!("a row of the standard-layout chunk is contiguous")
                        };
                        let unit = k * width + u;
                        let shift = shift.as_ref().map(|c| c[unit]);
                        // A strided view (`positions` keeps every k-th one) is gathered,
                        // then copied straight into the chunk's row.
                        let src = crate::stats::contiguous(&src, &mut strided);
                        copy_run(&mut sums, shift, unit, filled, src, dst);
                    }
                }
                filled += run;
                i += run;
                if i == inner {
                    i = 0;
                    o += 1;
                }
            }
            taken += rows;
            let batch = chunk.slice_mut(ndarray::s![.., ..rows]);
            match shift {
                Some(_) => m.add_centred_f32(batch.view(), &sums.sums()),
                None => m.add_f32(batch),
            }
        }
    });
    Ok(())
}

/// Copies one run of unit `unit`'s samples into its chunk row at position `at`: centred on
/// `shift` (with `sums`) where the moments have one, else as they are; NaN and ±inf as 0.
fn copy_run(
    sums: &mut CentredSums,
    shift: Option<f64>,
    unit: usize,
    at: usize,
    src: &[f32],
    dst: &mut [f32],
) {
    match shift {
        Some(c) => sums.centre_run(unit, at, src, dst, c),
        None => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = if s.is_finite() { s } else { 0.0 };
            }
        }
    }
}

thread_local! {
    /// Each thread's chunk buffer (`add_joint`): at most `CHUNK_ELEMENTS` f32 but for a group
    /// wider than that.
    static CHUNK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees the chunk buffers of this thread and of rayon's workers (where calibration folds
/// groups side by side): once calibration ends they would hold 16 MiB a thread for nothing.
pub fn release_buffers() {
    let free = || CHUNK.with_borrow_mut(|b| *b = Vec::new());
    free();
    if crate::stats::spread_cores().is_some() {
        rayon::broadcast(|_| free());
    }
}

/// Writes `src` ([rows, units]) transposed into `dst` ([units, rows]), NaN and ±inf as 0, in
/// square tiles so that both the reads along a row and the strided writes stay in cache
/// (element-wise slicing, what the runs of one element would do, cost more than the GEMM).
fn transpose_into(src: ndarray::ArrayView2<'_, f32>, mut dst: ndarray::ArrayViewMut2<'_, f32>) {
    const TILE: usize = 32;
    let (rows, units) = src.dim();
    for r0 in (0..rows).step_by(TILE) {
        for u0 in (0..units).step_by(TILE) {
            let u1 = (u0 + TILE).min(units);
            for r in r0..(r0 + TILE).min(rows) {
                let row = src.row(r);
                for u in u0..u1 {
                    let s = row[u];
                    dst[[u, r]] = if s.is_finite() { s } else { 0.0 };
                }
            }
        }
    }
}

/// Σx and Σx² of `values` (as `finite` reads them) in f64, over eight lanes so that the
/// loop vectorizes: a plain f64 sum is one chain of dependent additions, and repair's
/// endpoint statistics run it over every value of every corrected layer's output (on the
/// ResNet-18 bench pair about 1.2 G values, a second of calibration).
fn sums_in_lanes(values: &[f32], finite: impl Fn(f32) -> f64) -> (f64, f64) {
    let (mut s, mut q) = ([0f64; 8], [0f64; 8]);
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for k in 0..8 {
            let x = finite(chunk[k]);
            s[k] += x;
            q[k] += x * x;
        }
    }
    let (mut s, mut q) = (s.iter().sum::<f64>(), q.iter().sum::<f64>());
    for &x in chunks.remainder() {
        let x = finite(x);
        s += x;
        q += x * x;
    }
    (s, q)
}

/// Per-unit count, Σx and Σx² of one tap: all that statistics repair needs (mean and
/// standard deviation), without the units² of a full second moment. Additive over batches.
#[derive(Clone, Debug)]
pub struct UnitMoments {
    pub count: u64,
    pub sum: Array1<f64>,
    pub sumsq: Array1<f64>,
    /// The units' axis; `None`: axis 1 for rank ≥ 3 (channels of a map), else the last.
    pub axis: Option<usize>,
}

impl UnitMoments {
    pub fn new(units: usize) -> UnitMoments {
        UnitMoments::along(units, None)
    }

    /// Moments of `units` units on `axis` (`None` as in `new`): a token layer's [B, N, D]
    /// output has its units last, which the rank alone cannot tell from channels.
    pub fn along(units: usize, axis: Option<usize>) -> UnitMoments {
        UnitMoments {
            count: 0,
            sum: Array1::zeros(units),
            sumsq: Array1::zeros(units),
            axis,
        }
    }

    /// Folds in a batch of tap `t`, units on `self.axis`. NaN and ±inf count as 0.
    pub fn add(&mut self, t: &TensorData, name: &str) -> Result<()> {
        self.add_f32(as_f32(t).view(), name)
    }

    /// `add` for f32 values read in place.
    pub fn add_f32(&mut self, v: ArrayViewD<'_, f32>, name: &str) -> Result<()> {
        let axis = self.axis.unwrap_or(if v.ndim() >= 3 {
            1
        } else {
            v.ndim().saturating_sub(1)
        });
        let width = self.sum.len();
        if v.shape().get(axis) != Some(&width) {
            return Err(Error::tensor(
                name,
                format!("tap has shape {:?}, expected {width} units", v.shape()),
            ));
        }
        let outer: usize = v.shape()[..axis].iter().product();
        let inner: usize = v.shape()[axis + 1..].iter().product();
        let standard = v.as_standard_layout();
        let x = standard
            .view()
            .into_shape_with_order((outer, width, inner))
            .expect("standard layout reshapes freely");
        let finite = |x: f32| if x.is_finite() { f64::from(x) } else { 0.0 };
        for run in x.outer_iter() {
            if inner == 1 {
                // Units last: one value per unit, added across the units (the loop
                // vectorizes), each unit's sum in row order as before.
                let (Some(sum), Some(sumsq)) = (self.sum.as_slice_mut(), self.sumsq.as_slice_mut())
                else {
                    unreachable!("owned 1-D arrays are contiguous")
                };
                for ((s, q), &x) in sum.iter_mut().zip(sumsq.iter_mut()).zip(run.iter()) {
                    let x = finite(x);
                    *s += x;
                    *q += x * x;
                }
                continue;
            }
            for (u, lane) in run.outer_iter().enumerate() {
                let Some(values) = lane.as_slice() else {
                    unreachable!("a standard-layout array's last axis is contiguous")
                };
                let (s, q) = sums_in_lanes(values, finite);
                self.sum[u] += s;
                self.sumsq[u] += q;
            }
        }
        self.count += (outer * inner) as u64;
        Ok(())
    }

    /// Folds in rows of f64 values, one unit per column (a layer's output as the refit reads
    /// it). NaN and ±inf count as 0.
    pub fn add_rows(&mut self, rows: ndarray::ArrayView2<'_, f64>, name: &str) -> Result<()> {
        if rows.ncols() != self.sum.len() {
            return Err(Error::tensor(
                name,
                format!("{} units, expected {}", rows.ncols(), self.sum.len()),
            ));
        }
        let finite = |x: f64| if x.is_finite() { x } else { 0.0 };
        // Unit by unit along each row: independent sums, which the compiler vectorises.
        for row in rows.rows() {
            ndarray::Zip::from(&mut self.sum)
                .and(&mut self.sumsq)
                .and(&row)
                .for_each(|s, q, &x| {
                    let x = finite(x);
                    *s += x;
                    *q += x * x;
                });
        }
        self.count += rows.nrows() as u64;
        Ok(())
    }

    /// Folds in one batch's per-unit mean and (biased) variance over `n` samples: pooled, the
    /// batches give the moments of all of them.
    pub fn add_batch(&mut self, n: u64, mean: &[f32], var: &[f32]) {
        if self.sum.len() != mean.len() {
            *self = UnitMoments::along(mean.len(), self.axis);
        }
        let w = n as f64;
        for (u, (&m, &v)) in mean.iter().zip(var).enumerate() {
            let (m, v) = (f64::from(m), f64::from(v));
            let (m, v) = if m.is_finite() && v.is_finite() {
                (m, v)
            } else {
                (0.0, 0.0)
            };
            self.sum[u] += w * m;
            self.sumsq[u] += w * (v + m * m);
        }
        self.count += n;
    }

    /// Mean and standard deviation per unit (variance clamped at 0).
    pub fn mean_std(&self) -> (Array1<f64>, Array1<f64>) {
        let n = self.count.max(1) as f64;
        let mean = &self.sum / n;
        let sd = Array1::from_shape_fn(mean.len(), |i| {
            (self.sumsq[i] / n - mean[i] * mean[i]).max(0.0).sqrt()
        });
        (mean, sd)
    }
}

/// The width of a tap's unit axis, as `UnitMoments::add` reads it.
pub fn unit_width(t: &TensorData, axis: Option<usize>) -> usize {
    unit_width_of(t.shape(), axis)
}

/// `unit_width` of a value of shape `s`.
pub fn unit_width_of(s: &[usize], axis: Option<usize>) -> usize {
    match (axis, s.len()) {
        (Some(a), _) => s.get(a).copied().unwrap_or(0),
        (None, 0) => 1,
        (None, 1 | 2) => s[s.len() - 1],
        (None, _) => s[1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, Axis};

    /// The joint moments equal those of the concatenated, transposed, flattened taps.
    #[test]
    fn joint_moments_match_the_copied_columns() {
        let shape = [3usize, 4, 5, 2];
        let f = |seed: f32| {
            ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
                ((ix[0] * 7 + ix[1] * 3 + ix[2] * 11 + ix[3] * 5) as f32 * seed).sin()
            })
        };
        let (a, b) = (f(0.7), f(1.3));
        let names = vec!["a".to_string(), "b".to_string()];
        let mut m = Moments::new(8);
        add_joint(&mut m, &[a.view(), b.view()], 1, 4, &names, 0).unwrap();
        let cols = |x: &ArrayD<f32>| {
            x.view()
                .permuted_axes(vec![0, 2, 3, 1])
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order((30, 4))
                .unwrap()
        };
        let x = ndarray::concatenate(Axis(1), &[cols(&a).view(), cols(&b).view()]).unwrap();
        let mut want = Moments::new(8);
        want.add(x.view());
        assert_eq!(m.count, want.count);
        // Centred samples are multiplied in f32: agreement to f32 rounding.
        assert!((&m.raw_sum() - &want.sum).iter().all(|d| d.abs() < 1e-5));
        for ((i, j), w) in want.outer.to_full().indexed_iter() {
            assert!((m.raw_outer(i, j) - w).abs() < 1e-6 * w.abs().max(1.0));
        }
        // Unit moments of one tap agree with the diagonal.
        let mut u = UnitMoments::new(4);
        u.add(&TensorData::F32(a), "a").unwrap();
        let mut single = Moments::new(4);
        single.add(cols(&f(0.7)).view());
        let (m1, s1) = u.mean_std();
        let (m2, s2) = single.mean_std();
        assert!((&m1 - &m2).iter().all(|d| d.abs() < 1e-9));
        assert!((&s1 - &s2).iter().all(|d| d.abs() < 1e-9));
    }

    /// Channels first over several chunks, where runs are centred as they are copied: the
    /// moments are bit for bit those of copying each chunk as it is and centring it in
    /// `Moments::add_f32` (the first chunk sets the shift), with NaN and ±inf as 0 and runs
    /// that straddle chunks.
    #[test]
    fn runs_centred_while_copied_give_the_copied_chunks_bits() {
        // 2 × 2,048 joint columns: chunks of 1,024 rows over 3 × 700 samples.
        let (width, inner) = (2048, 700);
        let f = |seed: f32| {
            let mut x = ArrayD::from_shape_fn(IxDyn(&[3, width, inner]), |ix| {
                ((ix[0] * 13 + ix[1] * 7 + ix[2] * 3) as f32 * seed).sin() * 2.0
                    + (ix[1] % 5) as f32
            });
            x[[1, 5, 33]] = f32::NAN;
            x[[2, 2047, 699]] = f32::NEG_INFINITY;
            x
        };
        let (a, b) = (f(0.37), f(0.91));
        let mut got = Moments::new(2 * width);
        let views = [a.view(), b.view()];
        add_joint(&mut got, &views, 1, width, &["a".into(), "b".into()], 0).unwrap();
        let rows_per_chunk = CHUNK_ELEMENTS / (2 * width);
        assert!(3 * inner > 2 * rows_per_chunk, "more than two chunks");
        let columns = |x: &ArrayD<f32>| {
            x.mapv(|v| if v.is_finite() { v } else { 0.0 })
                .permuted_axes(vec![1, 0, 2])
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order((width, 3 * inner))
                .unwrap()
        };
        let all = ndarray::concatenate(Axis(0), &[columns(&a).view(), columns(&b).view()]).unwrap();
        let mut want = Moments::new(2 * width);
        for start in (0..3 * inner).step_by(rows_per_chunk) {
            let end = (start + rows_per_chunk).min(3 * inner);
            let mut chunk = all.slice(ndarray::s![.., start..end]).to_owned();
            want.add_f32(chunk.view_mut());
        }
        assert_eq!(got.count, want.count);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&got.raw_sum().to_vec()),
            bits(&want.raw_sum().to_vec())
        );
        let (g, w) = (got.outer.to_full(), want.outer.to_full());
        assert!(g.iter().zip(&w).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// Units last (token streams): the tiled transpose, across tiles and chunks, gives the
    /// moments of the concatenated rows, with NaN and ±inf counted as 0.
    #[test]
    fn units_last_taps_match_the_copied_rows() {
        // 2 × 1,800 rows of 600 units per model: 1,200 joint columns, so a chunk holds
        // 3,495 rows and the second sample straddles two chunks.
        let f = |seed: f32| {
            let mut x = ArrayD::from_shape_fn(IxDyn(&[2, 1800, 600]), |ix| {
                ((ix[0] * 13 + ix[1] * 7 + ix[2] * 3) as f32 * seed).sin() + ix[2] as f32 * 1e-3
            });
            x[[1, 5, 33]] = f32::NAN;
            x[[0, 1799, 599]] = f32::INFINITY;
            x
        };
        let (a, b) = (f(0.37), f(0.91));
        let mut m = Moments::new(1200);
        add_joint(
            &mut m,
            &[a.view(), b.view()],
            2,
            600,
            &["a".into(), "b".into()],
            0,
        )
        .unwrap();
        let rows = |x: &ArrayD<f32>| {
            x.mapv(|v| if v.is_finite() { v } else { 0.0 })
                .into_shape_with_order((3600, 600))
                .unwrap()
        };
        let x = ndarray::concatenate(Axis(1), &[rows(&a).view(), rows(&b).view()]).unwrap();
        let mut want = Moments::new(1200);
        want.add(x.view());
        assert_eq!(m.count, 3600);
        assert!((&m.raw_sum() - &want.sum).iter().all(|d| d.abs() < 1e-3));
        let full = want.outer.to_full();
        for ((i, j), w) in full.indexed_iter() {
            // f32 products: within 1e-6 of the Cauchy–Schwarz bound of the sum's terms
            // (≈ 2e-3 here), far below one misplaced O(1) product.
            let scale = (full[[i, i]] * full[[j, j]]).sqrt();
            assert!(
                (m.raw_outer(i, j) - w).abs() < 1e-6 * scale.max(1.0),
                "Σxxᵀ[{i}, {j}]: {} against {w}",
                m.raw_outer(i, j)
            );
        }
        // Unit moments of one tap, units last, against f64 sums of its rows.
        let mut u = UnitMoments::along(600, Some(2));
        u.add_f32(a.view(), "a").unwrap();
        let x = rows(&a).mapv(f64::from);
        assert_eq!(u.count, 3600);
        let (sum, sumsq) = (x.sum_axis(Axis(0)), x.mapv(|v| v * v).sum_axis(Axis(0)));
        assert!((&u.sum - &sum).iter().all(|d| d.abs() < 1e-9));
        assert!((&u.sumsq - &sumsq).iter().all(|d| d.abs() < 1e-9));
    }

    /// Sampling positions keeps every k-th one: the moments of the kept rows.
    #[test]
    fn sampled_positions_are_every_kth() {
        let a = ArrayD::from_shape_fn(IxDyn(&[2, 3, 10]), |ix| {
            (ix[0] * 30 + ix[1] * 10 + ix[2]) as f32
        });
        let mut m = Moments::new(3);
        add_joint(&mut m, &[a.view()], 1, 3, &["a".into()], 4).unwrap();
        // 10 positions, at most 4 kept: every 3rd (0, 3, 6, 9) of each sample.
        assert_eq!(m.count, 8);
        let want: f64 = [0, 3, 6, 9, 30, 33, 36, 39].iter().map(|&v| v as f64).sum();
        assert_eq!(m.raw_sum()[0], want);
        // Units last ([samples, tokens, units]): tokens are sampled.
        let t = ArrayD::from_shape_fn(IxDyn(&[2, 6, 3]), |ix| (ix[1] + 10 * ix[0]) as f32);
        let mut m = Moments::new(3);
        add_joint(&mut m, &[t.view()], 2, 3, &["t".into()], 3).unwrap();
        assert_eq!(m.count, 6);
        assert_eq!(
            m.raw_sum()[0],
            [0, 2, 4, 10, 12, 14].iter().sum::<i32>() as f64
        );
    }

    #[test]
    fn wrong_width_names_the_tap() {
        let t = ArrayD::<f32>::zeros(IxDyn(&[2, 3]));
        let mut m = Moments::new(8);
        let e = add_joint(
            &mut m,
            &[t.view(), t.view()],
            1,
            4,
            &["x".into(), "y".into()],
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains('x'), "{e}");
    }
}
