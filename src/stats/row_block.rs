//! Row correlations of a matrix built from column blocks, each block's Gram kept by model
//! pair so that the iterative loop's re-reads cost what changed.
//!
//! A group's weight vectors stack the models' units (model-major rows) and put each member
//! tensor's features side by side (§2). A neighbour's matching maps a member's other axis: for
//! model i the block is `W_i U_i` with `U_i` model i's unmerge of that neighbour. Within one
//! model, a new matching only renumbers the merged columns (`U_i U_iᵀ` is the identity for a
//! permutation, and changes only where a unit merges with one of its own model's): the Gram of
//! model i's rows with themselves keeps its columns as a multiset and stays as it is. Only the
//! cross-model blocks `W_i U_i U_jᵀ W_jᵀ` change. Kept whole, the stacked Gram's triangle
//! ((n·w)²/2 per feature) was recomputed in full; kept by pairs, a neighbour moved by a
//! permutation costs the cross blocks (w² per feature for two models): half the GEMM. A zip
//! that merges units within one model changes that model's columns too (on the ResNet-50 pair
//! 15–45 % of a member's columns per sweep), and those triangles are updated as well.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2};

use super::symmetric::{add_rows, mirror_upper};
use super::{add_product_scaled, Symmetric};

/// `row_correlation` with the Gram product in f32 over rows centred in f64: weight similarity
/// only ranks candidate pairs for a matching, which f32's 24-bit mantissa over centred rows
/// does not change, and f32 runs the GEMM — the iterative loop's dominant cost on wide
/// convolutional groups — at twice f64's throughput in half the memory.
pub fn row_correlation_f32(z: ArrayView2<f64>) -> Array2<f64> {
    row_correlation_of_blocks(&[&RowBlock::new(z, 1)])
}

/// One block of columns' share of a row correlation: the Gram of the block's rows centred on
/// a point near their means (f32, as `row_correlation_f32`), with the means and Σv² in f64.
/// Blocks side by side add up to the whole matrix's correlation exactly (up to rounding), so
/// a weight similarity built from many member tensors recomputes only the members whose
/// neighbours moved (`merge::similarity`); a block that keeps its columns is updated by the
/// columns that changed, model pair by model pair. Centring per block keeps the f32 Gram well
/// conditioned; the between-block part of the covariance is added back in f64.
#[derive(Clone, Debug)]
pub struct RowBlock {
    /// The rows are `models` equal parts (model-major); the Gram is kept per pair of parts.
    models: usize,
    pairs: Vec<Pair>,
    centre: Vec<f64>,
    mean: Vec<f64>,
    sumsq: Vec<f64>,
    features: usize,
    /// The columns minus `centre`, and per part the hashes of its columns, kept by
    /// `updatable` blocks.
    columns: Option<(Array2<f32>, Vec<Vec<Hash>>)>,
}

/// The Gram of rows of part `a` with rows of part `b` (a ≤ b): a triangle on the diagonal
/// (half the GEMM and half the bytes a cache of blocks holds), a full block off it.
#[derive(Clone, Debug)]
struct Pair {
    a: usize,
    b: usize,
    gram: PairGram,
    /// Column updates since this Gram was last computed whole (f32 rounding accumulates).
    updates: usize,
}

#[derive(Clone, Debug)]
enum PairGram {
    Within(Symmetric<f32>),
    Across(Array2<f32>),
}

/// Column updates after which a pair's Gram is recomputed whole.
const MAX_UPDATES: usize = 8;

/// A column (of one part) told apart by two independent 64-bit hashes of its bits.
type Hash = (u64, u64);

impl RowBlock {
    /// From `z` ([units, features], its rows `models` equal model-major parts; 1 where they
    /// are not model-stacked); NaN and ±inf count as 0 (the reference's `nan_to_num`).
    pub fn new(z: ArrayView2<f64>, models: usize) -> RowBlock {
        RowBlock::build(z, models, false)
    }

    /// As `new`, keeping the centred columns so that `update` can re-read the block.
    pub fn updatable(z: ArrayView2<f64>, models: usize) -> RowBlock {
        RowBlock::build(z, models, true)
    }

    /// What `updatable` would hold for a `[units, features]` block of `models` parts.
    pub fn updatable_bytes((units, features): (usize, usize), models: usize) -> usize {
        let models = parts(units, models);
        let w = units / models;
        let grams = models * Symmetric::<f32>::elements(w) + models * (models - 1) / 2 * w * w;
        (grams + units * features) * 4 + units * 24 + models * features * 16
    }

    fn build(z: ArrayView2<f64>, models: usize, keep: bool) -> RowBlock {
        let models = parts(z.nrows(), models);
        let read = read_rows(z, None, keep.then_some(models), Vec::new());
        let w = z.nrows() / models;
        let mut pairs = Vec::new();
        for a in 0..models {
            for b in a..models {
                let gram = pair_gram(a, b, w, read.centred.view());
                pairs.push(Pair {
                    a,
                    b,
                    gram,
                    updates: 0,
                });
            }
        }
        let columns = read.hashes.map(|hashes| (read.centred, hashes));
        RowBlock {
            models,
            pairs,
            centre: read.mean.clone(),
            mean: read.mean,
            sumsq: read.sumsq,
            features: z.ncols(),
            columns,
        }
    }

    /// Re-reads the block as `z`, changing each pair's Gram by the columns that differ from
    /// the ones it holds (a neighbour whose matching moved a few units moves a few columns;
    /// one that renumbered them moves none within a model). Returns how many columns were
    /// re-correlated in some pair; a block that keeps no columns, or whose shape changed, is
    /// rebuilt, and so is a pair that most columns changed.
    pub fn update(&mut self, z: ArrayView2<f64>) -> usize {
        self.update_reusing(z, &mut Vec::new())
    }

    /// `update`, centring `z` into `spare`'s allocation and leaving the replaced columns'
    /// allocation in it: a ResNet-18's widest member is 19 MB of centred f32 columns, whose
    /// fresh allocation per update cost its page faults every time.
    pub fn update_reusing(&mut self, z: ArrayView2<f64>, spare: &mut Vec<f32>) -> usize {
        let Some((old, old_hashes)) = self.columns.take().filter(|(c, _)| c.dim() == z.dim())
        else {
            *self = RowBlock::updatable(z, self.models);
            return z.ncols();
        };
        let read = read_rows(
            z,
            Some(&self.centre),
            Some(self.models),
            std::mem::take(spare),
        );
        let (new, hashes) = (read.centred, read.hashes.unwrap_or_default());
        let w = z.nrows() / self.models;
        let mut touched = vec![false; z.ncols()];
        for pair in &mut self.pairs {
            let (a, b) = (pair.a, pair.b);
            // A Gram is a sum over columns in any order: only the columns that are not already
            // there (as a multiset of column pairs) count, wherever a renumbered neighbour put
            // them.
            let key = |h: &[Vec<Hash>], j: usize| (h[a][j], h[b][j]);
            let (added, removed) = column_difference(
                (0..z.ncols()).map(|j| key(&old_hashes, j)),
                (0..z.ncols()).map(|j| key(&hashes, j)),
            );
            if added.is_empty() && removed.is_empty() {
                continue;
            }
            if 2 * added.len() > z.ncols() || pair.updates >= MAX_UPDATES {
                pair.gram = pair_gram(a, b, w, new.view());
                pair.updates = 0;
                touched.fill(true);
                continue;
            }
            // A pair within one part reads its columns once (`add` reads `x` alone there).
            let gather = |x: &Array2<f32>, idx: &[usize]| {
                let of_a = columns_of(part(x, a, w), idx);
                let of_b = (a != b).then(|| columns_of(part(x, b, w), idx));
                (of_a, of_b)
            };
            for (x, idx, beta) in [(&old, &removed, -1.0), (&new, &added, 1.0)] {
                let (of_a, of_b) = gather(x, idx);
                let of_b = of_b.as_ref().unwrap_or(&of_a);
                pair.gram.add(of_a.view(), of_b.view(), beta);
            }
            pair.updates += 1;
            added.iter().for_each(|&j| touched[j] = true);
        }
        (self.mean, self.sumsq) = (read.mean, read.sumsq);
        self.columns = Some((new, hashes));
        *spare = old.into_raw_vec_and_offset().0;
        touched.iter().filter(|&&t| t).count()
    }

    /// Bytes held (what a cache of blocks counts).
    pub fn bytes(&self) -> usize {
        let grams: usize = self
            .pairs
            .iter()
            .map(|p| match &p.gram {
                PairGram::Within(t) => t.bytes(),
                PairGram::Across(full) => full.len() * 4,
            })
            .sum();
        let columns = self.columns.as_ref().map_or(0, |(c, h)| {
            c.len() * 4 + h.iter().map(Vec::len).sum::<usize>() * 16
        });
        grams + columns + self.mean.len() * 24
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// The block without its columns: what `new` builds where `updatable` built this.
    pub fn without_columns(self) -> RowBlock {
        RowBlock {
            columns: None,
            ..self
        }
    }
}

impl PairGram {
    fn within(&self) -> Option<&Symmetric<f32>> {
        match self {
            PairGram::Within(t) => Some(t),
            PairGram::Across(_) => None,
        }
    }

    fn across(&self) -> Option<&Array2<f32>> {
        match self {
            PairGram::Across(full) => Some(full),
            PairGram::Within(_) => None,
        }
    }

    /// `self += beta · x yᵀ` for the columns `x` of one part and `y` of the other (the same
    /// columns: `x` alone on the diagonal).
    fn add(&mut self, x: ArrayView2<f32>, y: ArrayView2<f32>, beta: f32) {
        match self {
            PairGram::Within(t) => t.add_scaled(x.t(), beta),
            PairGram::Across(full) => add_product_scaled(full.view_mut(), x, y.t(), beta),
        }
    }
}

/// How many equal model parts `units` rows make: `models` where it divides them, else one.
fn parts(units: usize, models: usize) -> usize {
    if models > 1 && units.is_multiple_of(models) {
        models
    } else {
        1
    }
}

/// Part `k` of `x`: rows `k·w .. (k+1)·w`.
fn part(x: &Array2<f32>, k: usize, w: usize) -> ArrayView2<'_, f32> {
    x.slice(s![k * w..(k + 1) * w, ..])
}

/// Columns `idx` of `x`, gathered row by row (ndarray's `select` along the inner axis
/// appends one column at a time: 7 % of a ResNet-50 pair's matching).
fn columns_of(x: ArrayView2<f32>, idx: &[usize]) -> Array2<f32> {
    let mut out = Array2::zeros((x.nrows(), idx.len()));
    for (mut dst, src) in out.rows_mut().into_iter().zip(x.rows()) {
        for (d, &j) in dst.iter_mut().zip(idx) {
            *d = src[j];
        }
    }
    out
}

/// The Gram of parts `a` and `b` of the centred columns.
fn pair_gram(a: usize, b: usize, w: usize, centred: ArrayView2<f32>) -> PairGram {
    let rows = |k: usize| centred.slice_move(s![k * w..(k + 1) * w, ..]);
    let mut gram = if a == b {
        PairGram::Within(Symmetric::zeros(w))
    } else {
        PairGram::Across(Array2::zeros((w, w)))
    };
    gram.add(rows(a), rows(b), 1.0);
    gram
}

/// The columns of `new` that `old` does not hold, and those of `old` that `new` does not
/// hold, as multisets of column keys (indices into each).
fn column_difference<K: std::hash::Hash + Eq>(
    old: impl Iterator<Item = K>,
    new: impl Iterator<Item = K>,
) -> (Vec<usize>, Vec<usize>) {
    let mut pool: std::collections::HashMap<K, Vec<usize>> = std::collections::HashMap::new();
    for (j, h) in old.enumerate() {
        pool.entry(h).or_default().push(j);
    }
    let mut added = Vec::new();
    for (j, h) in new.enumerate() {
        if pool.get_mut(&h).and_then(Vec::pop).is_none() {
            added.push(j);
        }
    }
    let mut removed: Vec<usize> = pool.into_values().flatten().collect();
    removed.sort_unstable();
    (added, removed)
}

/// A column's two independent multiplicative hashes before any value.
const HASH_SEED: Hash = (0xcbf2_9ce4_8422_2325, 0x9e37_79b9_7f4a_7c15);

/// Folds one value's bits into its column's hashes (rows in order).
fn hash_value(h: &mut Hash, v: f32) {
    let bits = u64::from(v.to_bits());
    h.0 = (h.0 ^ bits).wrapping_mul(0x0000_0100_0000_01b3);
    h.1 = (h.1 ^ bits.rotate_left(17)).wrapping_mul(0xff51_afd7_ed55_8ccd);
}

/// Σv and Σv² of a row (non-finite values as 0), in eight interleaved sums: one running sum
/// waited on each addition's latency, and was most of `read_rows`' time.
fn row_sums(row: &[f64]) -> (f64, f64) {
    const LANES: usize = 8;
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let (mut s, mut q) = ([0.0; LANES], [0.0; LANES]);
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for k in 0..LANES {
            let v = finite(chunk[k]);
            s[k] += v;
            q[k] += v * v;
        }
    }
    for (k, &v) in tail.iter().enumerate() {
        let v = finite(v);
        s[k] += v;
        q[k] += v * v;
    }
    (s.iter().sum(), q.iter().sum())
}

/// What one read of member vectors `z` gives a block: per row the mean and Σv² (non-finite
/// values as 0), the rows minus their centre as f32, and (where asked) each part's column
/// hashes.
struct Read {
    centred: Array2<f32>,
    hashes: Option<Vec<Vec<Hash>>>,
    mean: Vec<f64>,
    sumsq: Vec<f64>,
}

/// Reads `z` row by row, each row while it is in cache: its moments, then the row minus
/// `centre` (its own mean where `centre` is `None`; zeros past `centre`'s end) into `buffer`'s
/// allocation, and with `parts` the column hashes of each of that many equal row parts. Three
/// passes over the whole matrix (moments, centring, hashing) went through memory three times
/// and were a fifth of a ResNet-18 pair's matching. The buffer is dropped where it is far
/// larger than `z`: the block keeps what it is given, and its bytes count the columns, not
/// the allocation.
fn read_rows(
    z: ArrayView2<f64>,
    centre: Option<&[f64]>,
    parts: Option<usize>,
    mut buffer: Vec<f32>,
) -> Read {
    if buffer.capacity() > z.len() + z.len() / 8 {
        buffer = Vec::new();
    }
    // Written once, row after row, not zeroed first: the zeroing was most of the page faults
    // of a ResNet-18 pair's matching.
    buffer.clear();
    buffer.reserve(z.len());
    let w = parts.map_or(0, |p| z.nrows() / p.max(1));
    let mut hashes = parts.map(|p| vec![vec![HASH_SEED; z.ncols()]; p.max(1)]);
    let n = z.ncols().max(1) as f64;
    let (mut mean, mut sumsq) = (Vec::with_capacity(z.nrows()), Vec::with_capacity(z.nrows()));
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let mut strided = Vec::new();
    for (k, row) in z.rows().into_iter().enumerate() {
        // A slice, so that the centring below is a vectorised copy.
        let src = super::contiguous(&row, &mut strided);
        let (s, q) = row_sums(src);
        mean.push(s / n);
        sumsq.push(q);
        let start = buffer.len();
        match centre.map_or(Some(s / n), |c| c.get(k).copied()) {
            Some(c) => buffer.extend(src.iter().map(|&v| (finite(v) - c) as f32)),
            None => buffer.extend(std::iter::repeat_n(0.0, src.len())),
        }
        if let Some(h) = hashes.as_mut().and_then(|h| h.get_mut(k / w.max(1))) {
            for (h, &v) in h.iter_mut().zip(&buffer[start..]) {
                hash_value(h, v);
            }
        }
    }
    let centred = match Array2::from_shape_vec(z.dim(), buffer) {
        Ok(out) => out,
        Err(_) => unreachable!("one value per row and column"),
    };
    Read {
        centred,
        hashes,
        mean,
        sumsq,
    }
}

/// The Pearson correlation between rows of the matrix whose column blocks are `blocks` (all
/// with the same rows and parts). A row whose variance is rounding noise is dead: its
/// correlations are 0, as in `Moments::correlation`.
pub fn row_correlation_of_blocks(blocks: &[&RowBlock]) -> Array2<f64> {
    let mut gram = row_correlation_upper_of_blocks(blocks);
    mirror_upper(&mut gram);
    gram
}

/// `row_correlation_of_blocks` in its upper triangle and diagonal only (the lower one holds
/// intermediate sums): for a caller that blends the matrix with another before mirroring it,
/// so that a wide group's matrix is mirrored once instead of twice per sweep.
pub fn row_correlation_upper_of_blocks(blocks: &[&RowBlock]) -> Array2<f64> {
    let units = blocks.first().map_or(0, |b| b.mean.len());
    let features: usize = blocks.iter().map(|b| b.features).sum();
    let n = features.max(1) as f64;
    // Σ over blocks of Σ zzᵀ = G_c + f·(c cᵀ + d cᵀ + c dᵀ) = G_c + f·(m mᵀ − d dᵀ), with G_c
    // the Gram about the block's centre c, m its mean and d = m − c (0 unless the block was
    // updated): the uncentred Gram of the whole.
    let mut gram = super::spare::zeros(units, units);
    add_pair_grams(blocks, gram.view_mut());
    // Per unit and block, √f·m and √f·d: the rank-`blocks` terms f·(m mᵀ − d dᵀ), added by
    // two thin GEMMs (an element-by-element dot product over the blocks was 16 % of a
    // ResNet-50 pair's matching); the shifts only where a block was updated.
    let scaled = |value: &dyn Fn(&RowBlock, usize) -> f64| -> Array2<f64> {
        Array2::from_shape_fn((units, blocks.len()), |(i, k)| {
            value(blocks[k], i) * (blocks[k].features as f64).sqrt()
        })
    };
    let means = scaled(&|b, i| b.mean[i]);
    add_product_scaled(gram.view_mut(), means.view(), means.t(), 1.0);
    let shifts = scaled(&|b, i| b.mean[i] - b.centre[i]);
    if shifts.iter().any(|&d| d != 0.0) {
        add_product_scaled(gram.view_mut(), shifts.view(), shifts.t(), -1.0);
    }
    let mean: Vec<f64> = (0..units)
        .map(|i| {
            blocks
                .iter()
                .map(|b| b.features as f64 * b.mean[i])
                .sum::<f64>()
                / n
        })
        .collect();
    let second: Vec<f64> = (0..units)
        .map(|i| blocks.iter().map(|b| b.sumsq[i]).sum::<f64>())
        .collect();
    let var: Vec<f64> = (0..units)
        .map(|i| gram[[i, i]] / n - mean[i] * mean[i])
        .collect();
    let dead: Vec<bool> = (0..units)
        .map(|i| var[i] <= 1e-12 * (second[i] / n).max(f64::MIN_POSITIVE))
        .collect();
    let sd: Vec<f64> = var.iter().map(|v| v.max(0.0).sqrt()).collect();
    // One pass over the upper triangle, in place (the matrix is the largest thing a wide
    // group's matching holds).
    for (i, mut row) in gram.rows_mut().into_iter().enumerate() {
        for (j, g) in row.iter_mut().enumerate().skip(i) {
            let r = (*g / n - mean[i] * mean[j]) / (sd[i] * sd[j]).max(1e-7);
            *g = if dead[i] || dead[j] || !r.is_finite() {
                0.0
            } else {
                r
            };
        }
    }
    gram
}

/// Adds every block's pair Grams onto the upper triangle of `out` (units × units), block after
/// block in their order for each element: the same f64 sums whichever blocks were updated.
fn add_pair_grams(blocks: &[&RowBlock], mut out: ArrayViewMut2<f64>) {
    let Some(first) = blocks.first() else { return };
    assert!(
        blocks
            .iter()
            .all(|b| b.models == first.models && b.pairs.len() == first.pairs.len()),
        "blocks of different parts"
    );
    let w = out.nrows() / first.models;
    for (k, pair) in first.pairs.iter().enumerate() {
        let (a, b) = (pair.a, pair.b);
        let dst = out.slice_mut(s![a * w..(a + 1) * w, b * w..(b + 1) * w]);
        match pair.gram {
            PairGram::Within(_) => {
                let triangles: Vec<_> = blocks
                    .iter()
                    .filter_map(|b| b.pairs[k].gram.within())
                    .collect();
                Symmetric::add_all_upper_into(&triangles, dst);
            }
            PairGram::Across(_) => {
                let fulls: Vec<_> = blocks
                    .iter()
                    .filter_map(|b| b.pairs[k].gram.across())
                    .collect();
                add_all_into(&fulls, dst);
            }
        }
    }
}

/// `out += Σ all` (f32 matrices summed in f64, in their order), four per pass over `out`.
fn add_all_into(all: &[&Array2<f32>], mut out: ArrayViewMut2<f64>) {
    for four in all.chunks(4) {
        for (i, mut dst) in out.rows_mut().into_iter().enumerate() {
            let rows: Vec<&[f32]> = four
                .iter()
                .map(|m| m.row(i).to_slice().unwrap_or(&[]))
                .collect();
            match dst.as_slice_mut() {
                Some(dst) => add_rows(dst, &rows),
                None => unreachable!("rows of a standard-layout matrix are contiguous"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_correlation;
    use super::*;

    /// Rows of two model parts: model 1's units are model 0's in another order, with noise.
    fn stacked(w: usize, features: usize) -> Array2<f64> {
        Array2::from_shape_fn((2 * w, features), |(i, j)| {
            let u = if i < w { i } else { (i - w) * 5 % w };
            ((u * 7 + j * 3) as f64 * 0.41).sin() * (1.0 + u as f64)
                + 0.2 * j as f64
                + 0.01 * (i * j) as f64 % 0.3
        })
    }

    /// One read per row gives what separate passes give: the moments (non-finite values as
    /// 0), the rows minus the given centre (or their own mean), and each part's column
    /// hashes, equal for equal columns and apart for others; a strided view reads alike.
    #[test]
    fn one_read_gives_the_passes_it_replaced() {
        let mut z = stacked(4, 21);
        z[[1, 3]] = f64::NAN;
        z[[6, 20]] = f64::INFINITY;
        let two = z.column(2).to_owned();
        z.column_mut(7).assign(&two); // equal columns hash alike
        let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
        let centre: Vec<f64> = (0..8).map(|i| 0.5 * i as f64 - 1.0).collect();
        for given in [None, Some(&centre[..])] {
            let read = read_rows(z.view(), given, Some(2), Vec::new());
            for (i, row) in z.rows().into_iter().enumerate() {
                let s: f64 = row.iter().map(|&v| finite(v)).sum();
                let q: f64 = row.iter().map(|&v| finite(v) * finite(v)).sum();
                assert!((read.mean[i] - s / 21.0).abs() < 1e-12, "mean of row {i}");
                assert!(
                    (read.sumsq[i] - q).abs() < 1e-9 * q.max(1.0),
                    "Σv² of row {i}"
                );
                let c = given.map_or(s / 21.0, |c| c[i]);
                for (j, &v) in row.iter().enumerate() {
                    assert_eq!(read.centred[[i, j]], (finite(v) - c) as f32, "({i}, {j})");
                }
            }
            let hashes = read.hashes.expect("asked for");
            for (k, part) in hashes.iter().enumerate() {
                let rows = read.centred.slice(s![k * 4..(k + 1) * 4, ..]);
                for (j, column) in rows.columns().into_iter().enumerate() {
                    let mut h = HASH_SEED;
                    column.iter().for_each(|&v| hash_value(&mut h, v));
                    assert_eq!(part[j], h, "hash of column {j} of part {k}");
                }
                assert_eq!(part[7], part[2]);
                assert_ne!(part[7], part[3]);
            }
        }
        // A strided (transposed twice over a copy) view reads as the contiguous one.
        let t = z.t().to_owned();
        let strided = read_rows(t.t(), None, None, Vec::new());
        let contiguous = read_rows(z.view(), None, None, Vec::new());
        assert!(strided.hashes.is_none());
        assert_eq!(strided.mean, contiguous.mean);
        assert_eq!(strided.centred, contiguous.centred);
    }

    #[test]
    fn model_parts_give_the_whole_correlation() {
        let z = stacked(6, 40);
        let whole = row_correlation(z.view());
        for models in [1, 2, 3] {
            let parts = row_correlation_of_blocks(&[&RowBlock::new(z.view(), models)]);
            let d = (&whole - &parts).iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(d < 1e-5, "{models} parts differ from the whole by {d}");
        }
        // Rows that do not split into the parts are one part.
        let odd = z.slice(s![..11, ..]);
        assert_eq!(RowBlock::new(odd, 2).models, 1);
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
    fn column_blocks_add_up_to_the_whole_correlation() {
        // Blocks with very different means and scales (a bias block of one column, a block
        // offset far from zero) and a unit dead in one block only.
        let z = Array2::from_shape_fn((7, 61), |(i, j)| {
            let base = ((i * 11 + j * 5) as f64 * 0.29).cos() * (1.0 + i as f64);
            match j {
                0..=29 => base,
                30 => 3.0 * i as f64,
                _ => 40.0 + 0.01 * base,
            }
        });
        let mut z = z;
        z.row_mut(2).slice_mut(s![..30]).fill(1.5);
        let whole = row_correlation(z.view());
        let parts = [
            RowBlock::new(z.slice(s![.., ..30]), 1),
            RowBlock::new(z.slice(s![.., 30..31]), 1),
            RowBlock::new(z.slice(s![.., 31..]), 1),
        ];
        let joined = row_correlation_of_blocks(&parts.iter().collect::<Vec<_>>());
        let d = (&whole - &joined).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(d < 1e-5, "blocks differ from the whole by {d}");
        assert!(
            joined[[2, 3]] != 0.0,
            "a unit dead in one block only is alive"
        );
    }

    #[test]
    fn an_updated_block_equals_a_fresh_one() {
        let z = Array2::from_shape_fn((6, 40), |(i, j)| {
            ((i * 7 + j * 3) as f64 * 0.41).sin() * (1.0 + i as f64) + 0.2 * j as f64
        });
        let mut block = RowBlock::updatable(z.view(), 1);
        // Columns renumbered (a neighbour's merged units in another order) change nothing.
        let mut moved = z.clone();
        for j in 0..20 {
            moved.column_mut(j).assign(&z.column(39 - j));
            moved.column_mut(39 - j).assign(&z.column(j));
        }
        assert_eq!(block.update(moved.view()), 0, "a permutation of columns");
        // Three columns replaced (and the row means shifted by it).
        for j in [3, 17, 30] {
            moved.column_mut(j).mapv_inplace(|v| 2.0 * v + 1.0);
        }
        assert_eq!(block.update(moved.view()), 3);
        let other = RowBlock::new(z.slice(s![.., ..5]), 1);
        let updated = row_correlation_of_blocks(&[&block, &other]);
        let fresh = row_correlation_of_blocks(&[&RowBlock::new(moved.view(), 1), &other]);
        let d = (&updated - &fresh).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(d < 1e-5, "updated block differs by {d}");
        // Most columns changed: rebuilt whole.
        let scaled = moved.mapv(|v| v * 3.0);
        assert_eq!(block.update(scaled.view()), 40);
    }

    /// Two model parts: a neighbour that renumbers model 1's columns alone changes only the
    /// cross-model pair, and the updated block equals a fresh one; the same renumbering of
    /// both models changes nothing.
    #[test]
    fn a_moved_model_updates_only_its_cross_pair() {
        let (w, f) = (5, 30);
        let z = stacked(w, f);
        let mut block = RowBlock::updatable(z.view(), 2);
        let mut both = z.clone();
        let mut one = z.clone();
        for j in 0..f {
            both.column_mut(j).assign(&z.column((j * 7) % f));
        }
        for (i, j) in [(0, 1), (5, 9), (12, 20)] {
            one.slice_mut(s![w.., i]).assign(&z.slice(s![w.., j]));
            one.slice_mut(s![w.., j]).assign(&z.slice(s![w.., i]));
        }
        assert_eq!(block.update(both.view()), 0, "both models renumbered alike");
        let touched = block.update(one.view());
        assert_eq!(touched, 6, "columns re-correlated");
        for p in &block.pairs {
            let want = usize::from(p.a != p.b);
            assert_eq!(p.updates, want, "updates of pair ({}, {})", p.a, p.b);
        }
        let updated = row_correlation_of_blocks(&[&block]);
        let fresh = row_correlation_of_blocks(&[&RowBlock::new(one.view(), 2)]);
        let whole = row_correlation(one.view());
        for other in [&fresh, &whole] {
            let d = (&updated - other).iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(d < 1e-5, "updated block differs by {d}");
        }
    }
}
