//! Matchers: from a similarity matrix over all models' units (model-major, `[N·W, N·W]`) to
//! the unmerge matrix P (`[N·W, W]`) and the merge value (mean similarity of what was matched),
//! following `shared/docs/algorithm.md` §4 and §5.

use ndarray::{s, Array2, ArrayView2};

use super::tournament::Tournament;
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Matched {
    pub p: Array2<f64>,
    pub value: f64,
}

/// Exact linear assignment maximising the total (the `lsap` crate, a port of scipy's solver).
/// Returns `col[r]` for every row.
pub fn lap(m: ArrayView2<f64>) -> Result<Vec<usize>> {
    let (nr, nc) = m.dim();
    let cost: Vec<f64> = m
        .iter()
        .map(|&v| if v.is_finite() { v } else { -1e9 })
        .collect();
    let (rows, cols) = lsap::solve(nr, nc, &cost, true)
        .map_err(|e| Error::Usage(format!("assignment failed: {e:?}")))?;
    let mut out = vec![0; nr];
    for (r, c) in rows.into_iter().zip(cols) {
        out[r] = c;
    }
    Ok(out)
}

/// Alignment (§4a): every model i > 0 is matched to model 0 by LAP on the (0, i) block;
/// merged unit r = model 0's unit r and model i's unit σ_i(r).
pub fn align(sim: ArrayView2<f64>, models: usize) -> Result<Matched> {
    let w = sim.nrows() / models;
    let mut p = Array2::zeros((models * w, w));
    for r in 0..w {
        p[[r, r]] = 1.0;
    }
    let mut total = 0.0;
    for i in 1..models {
        let block = sim.slice(s![0..w, i * w..(i + 1) * w]);
        let sigma = lap(block)?;
        for (r, &c) in sigma.iter().enumerate() {
            p[[i * w + c, r]] = 1.0;
            total += block[[r, c]];
        }
    }
    let value = if models > 1 {
        total / (w * (models - 1)).max(1) as f64
    } else {
        0.0
    };
    Ok(Matched { p, value })
}

/// Group alignment (§5a): for every pair of blocks (model 0's j, model i's k) an inner LAP
/// gives their unit matching and its mean similarity G[j,k]; an outer LAP on G (plus
/// `extra_g`, the G of groups that share this block order) pairs the blocks.
pub fn group_align(
    sim: ArrayView2<f64>,
    models: usize,
    blocks: usize,
    block_size: usize,
    shared: &[Array2<f64>],
) -> Result<(Matched, Array2<f64>)> {
    let w = blocks * block_size;
    let mut p = Array2::zeros((models * w, w));
    let mut bp = Array2::zeros((models * blocks, blocks));
    for j in 0..blocks {
        bp[[j, j]] = 1.0;
        for u in 0..block_size {
            p[[j * block_size + u, j * block_size + u]] = 1.0;
        }
    }
    let mut total = 0.0;
    for i in 1..models {
        let (g, inner) = block_scores(sim, i, w, blocks, block_size)?;
        let mut outer = g.clone();
        for extra in shared {
            outer += extra;
        }
        let tau = lap(outer.view())?;
        for (j, &k) in tau.iter().enumerate() {
            bp[[i * blocks + k, j]] = 1.0;
            total += g[[j, k]];
            for (u, &v) in inner[j * blocks + k].iter().enumerate() {
                p[[i * w + k * block_size + v, j * block_size + u]] = 1.0;
            }
        }
    }
    let value = if models > 1 {
        total / (blocks * (models - 1)) as f64
    } else {
        0.0
    };
    Ok((Matched { p, value }, bp))
}

/// Group zip (§5b): blocks are paired across models by the outer assignment of group
/// alignment (`shared` adds the scores of groups with the same block order), then each tuple
/// of paired blocks is zipped on its own down to one block. A merged block only ever holds
/// units of its paired blocks, so the block structure (heads, GroupNorm groups) survives.
/// Within a pair, same-model merges are bounded by half a block, the reference's group budget.
///
/// `target_blocks` above `blocks` (`--width` on attention heads) keeps the worst-paired
/// tuples apart, each model's block whole and unmerged, until that many blocks remain (each
/// tuple kept apart adds `models − 1`); ties keep the earlier tuple merged.
#[allow(clippy::too_many_arguments)]
pub fn group_zip(
    sim: ArrayView2<f64>,
    models: usize,
    blocks: usize,
    block_size: usize,
    shared: &[Array2<f64>],
    a: f64,
    b: f64,
    target_blocks: usize,
) -> Result<(Matched, Array2<f64>)> {
    let w = blocks * block_size;
    let mut partner = vec![(0..blocks).collect::<Vec<usize>>(); models];
    let mut score = vec![0.0; blocks];
    for (i, row) in partner.iter_mut().enumerate().skip(1) {
        let (g, _) = block_scores(sim, i, w, blocks, block_size)?;
        let mut outer = g;
        for extra in shared {
            outer += extra;
        }
        *row = lap(outer.view())?;
        for (j, s) in score.iter_mut().enumerate() {
            *s += outer[[j, row[j]]];
        }
    }
    let apart = apart_tuples(&score, models, blocks, target_blocks);
    let merged_blocks = blocks + apart.iter().filter(|&&x| x).count() * (models - 1);
    let mut p = Array2::zeros((models * w, merged_blocks * block_size));
    let mut bp = Array2::zeros((models * blocks, merged_blocks));
    let mut values = Vec::new();
    let mut slot = 0;
    for j in 0..blocks {
        if apart[j] {
            // Each model's block keeps its own slot, unit for unit.
            for (i, row) in partner.iter().enumerate() {
                let k = row[j];
                for u in 0..block_size {
                    p[[i * w + k * block_size + u, slot * block_size + u]] = 1.0;
                }
                bp[[i * blocks + k, slot]] = 1.0;
                slot += 1;
            }
            continue;
        }
        // Units of the paired blocks, model-major, and their similarities.
        let units: Vec<usize> = (0..models)
            .flat_map(|i| {
                let k = partner[i][j];
                (0..block_size).map(move |u| i * w + k * block_size + u)
            })
            .collect();
        let sub = Array2::from_shape_fn((units.len(), units.len()), |(r, c)| {
            sim[[units[r], units[c]]]
        });
        let m = zip(sub.view(), models, a, b);
        values.push(m.value);
        for (r, &unit) in units.iter().enumerate() {
            for c in 0..block_size {
                p[[unit, slot * block_size + c]] = m.p[[r, c]];
            }
        }
        for (i, row) in partner.iter().enumerate() {
            bp[[i * blocks + row[j], slot]] = 1.0;
        }
        slot += 1;
    }
    let value = values.iter().sum::<f64>() / values.len().max(1) as f64;
    Ok((Matched { p, value }, bp))
}

/// Which block tuples [`group_zip`] keeps apart to reach `target_blocks`: the lowest summed
/// scores first, the earlier tuple on ties.
fn apart_tuples(score: &[f64], models: usize, blocks: usize, target_blocks: usize) -> Vec<bool> {
    let mut apart = vec![false; blocks];
    if models < 2 {
        return apart;
    }
    let count = (target_blocks.saturating_sub(blocks) / (models - 1)).min(blocks);
    let mut order: Vec<usize> = (0..blocks).collect();
    order.sort_by(|&x, &y| score[x].total_cmp(&score[y]).then(x.cmp(&y)));
    for &j in order.iter().take(count) {
        apart[j] = true;
    }
    apart
}

/// Block-pair scores G (model 0 vs model i) and the inner matchings, `inner[j·blocks + k]`.
pub fn block_scores(
    sim: ArrayView2<f64>,
    i: usize,
    w: usize,
    blocks: usize,
    block_size: usize,
) -> Result<(Array2<f64>, Vec<Vec<usize>>)> {
    let mut g = Array2::zeros((blocks, blocks));
    let mut inner = Vec::with_capacity(blocks * blocks);
    for j in 0..blocks {
        for k in 0..blocks {
            let sub = sim.slice(s![
                j * block_size..(j + 1) * block_size,
                i * w + k * block_size..i * w + (k + 1) * block_size
            ]);
            let c = lap(sub)?;
            g[[j, k]] =
                c.iter().enumerate().map(|(r, &c)| sub[[r, c]]).sum::<f64>() / block_size as f64;
            inner.push(c);
        }
    }
    Ok((g, inner))
}

/// ZipIt's greedy zip (§4b) with MuDSC's defaults: repeatedly merge the most similar pair
/// (same-model pairs allowed up to a budget of W/2 per model; `a` scales a merged cluster's
/// similarities so that it merges again less eagerly) until W clusters remain.
///
/// Each row keeps its best pair (the maximum right of the diagonal, first on ties) and a
/// tournament tree holds the best row, so a step finds its pair in O(log O) instead of
/// scanning O² pairs, then refreshes the rows the merge touched: O(O²) in all instead of the
/// reference's O(O³). The pairs chosen are exactly the reference's (the test checks it
/// against a plain scan).
pub fn zip(sim: ArrayView2<f64>, models: usize, a: f64, b: f64) -> Matched {
    zip_to(sim, models, a, b, sim.nrows() / models.max(1))
}

/// `zip` down to `target` merged units (one model's width up to all models' units): wider
/// targets stop merging earlier, so the least similar units stay apart (each model's own).
pub fn zip_to(sim: ArrayView2<f64>, models: usize, a: f64, b: f64, target: usize) -> Matched {
    zip_owned(sim.to_owned(), models, a, b, target)
}

/// `zip_to` working in `sim` itself, which it consumes: on a wide group the similarity is the
/// largest matrix a matching holds (6,144² f64 on a ViT-B MLP group: 302 MB), and the caller
/// has no use for it after.
pub fn zip_owned(sim: Array2<f64>, models: usize, a: f64, b: f64, target: usize) -> Matched {
    let o = sim.nrows();
    let w = o / models;
    let target = target.clamp(w.min(o), o);
    // Rows scanned as slices (`row_best`).
    let mut s = if sim.is_standard_layout() {
        sim
    } else {
        sim.as_standard_layout().into_owned()
    };
    for k in 0..o {
        s[[k, k]] = f64::NEG_INFINITY;
    }
    let mut clusters: Vec<Vec<usize>> = (0..o).map(|k| vec![k]).collect();
    let model: Vec<usize> = (0..o).map(|k| k / w).collect();
    let mut alive = vec![true; o];
    // 0 for a live unit, −inf for a merged one (`row_best`).
    let mut floor = vec![0.0; o];
    let mut left = o;
    let mut budget = vec![(((o - target) / models) as f64 * b + 1e-4).floor() as i64; models];
    let mut values = Vec::new();
    let best_of: Vec<(f64, usize)> = (0..o).map(|x| row_best(&s, &floor, x)).collect();
    let mut best = Best {
        race: Tournament::new(best_of.iter().map(|b| b.0).collect()),
        of: best_of,
    };
    while left > target {
        let (v, i, j) = if let Some(x) = best.race.top() {
            (best.of[x].0, x, best.of[x].1)
        } else {
            // Only −inf left (cannot happen with a > 0 and b = 1, guarded all the same):
            // merge the two first live units rather than corrupting the clusters.
            let mut live = (0..o).filter(|&x| alive[x]);
            match (live.next(), live.next()) {
                (Some(i), Some(j)) => (f64::NAN, i, j),
                _ => break,
            }
        };
        if !v.is_nan() {
            values.push(v);
        }
        merge_into(&mut s, &mut clusters, &mut alive, &mut best, i, j, a);
        left -= 1;
        // Refresh the rows whose best pair was one of the two (the others above `i` saw
        // the merged cluster's new similarity in `merge_into`).
        let (i, j) = (i.min(j), i.max(j));
        floor[j] = f64::NEG_INFINITY;
        best.set(i, row_best(&s, &floor, i));
        for k in (0..o).filter(|&k| alive[k] && k != i) {
            let by = best.of[k].1;
            if by == i || by == j {
                best.set(k, row_best(&s, &floor, k));
            }
        }
        let (mi, mj) = (model[i], model[j]);
        if mi == mj && !v.is_nan() {
            budget[mi] -= 1;
            if budget[mi] <= 0 {
                let own: Vec<usize> = (0..o).filter(|&x| alive[x] && model[x] == mi).collect();
                for &x in &own {
                    for &y in &own {
                        s[[x, y]] = f64::NEG_INFINITY;
                    }
                }
                for &x in &own {
                    best.set(x, row_best(&s, &floor, x));
                }
            }
        }
    }
    // The assignment in the similarity's allocation (`match_unit` gives it back in turn).
    crate::stats::spare::give_back(s);
    let mut p = crate::stats::spare::zeros(o, target);
    for (col, k) in (0..o).filter(|&k| alive[k]).enumerate() {
        for &unit in &clusters[k] {
            p[[unit, col]] = 1.0;
        }
    }
    let value = if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    };
    Matched { p, value }
}

/// Row `x`'s best pair right of the diagonal among the live units: (value, column), the
/// first on ties; (−inf, `usize::MAX`) when no live value exceeds −inf (NaN never does).
/// `floor[y]` is 0 for a live unit and −inf for a merged one, so that a dead column adds to
/// −inf without a branch. The zip rescans rows after every merge, and a scan element by
/// element (the pair kept as it went, a branch on each unit's liveness) was 40 % of a
/// ResNet-50 zip: here the maximum is taken over eight independent lanes (a vector max),
/// then its first column found.
fn row_best(s: &Array2<f64>, floor: &[f64], x: usize) -> (f64, usize) {
    const LANES: usize = 8;
    let o = s.ncols();
    let Some(row) = s
        .as_slice()
        .and_then(|all| all.get(x * o + x + 1..(x + 1) * o))
    else {
        unreachable!("the zip's similarity is a square standard-layout matrix")
    };
    let floor = &floor[x + 1..];
    let mut lanes = [f64::NEG_INFINITY; LANES];
    let (rows, floors) = (row.chunks_exact(LANES), floor.chunks_exact(LANES));
    let tail = rows.remainder().iter().zip(floors.remainder());
    for (r, f) in rows.zip(floors) {
        for k in 0..LANES {
            let v = r[k] + f[k];
            lanes[k] = if v > lanes[k] { v } else { lanes[k] };
        }
    }
    let mut max = f64::NEG_INFINITY;
    for v in lanes.into_iter().chain(tail.map(|(&r, &f)| r + f)) {
        if v > max {
            max = v;
        }
    }
    if max == f64::NEG_INFINITY {
        return (max, usize::MAX);
    }
    match row.iter().zip(floor).position(|(&r, &f)| r + f == max) {
        Some(at) => (row[at], x + 1 + at),
        None => unreachable!("the maximum is one of the row's live values"),
    }
}

/// Merges cluster `j` into `i` (i < j keeps the lower index, as the reference does).
///
/// The similarity is symmetric and the zip reads only its upper triangle (a row's best pair
/// lies right of the diagonal), so the pair (k, i) is kept at `s[min, max]` alone: the
/// strided column writes, which cost more than the rest of the zip on a wide group, are only
/// those of the rows above `i`.
fn merge_into(
    s: &mut Array2<f64>,
    clusters: &mut [Vec<usize>],
    alive: &mut [bool],
    best: &mut Best,
    i: usize,
    j: usize,
    a: f64,
) {
    let (i, j) = (i.min(j), i.max(j));
    let moved = std::mem::take(&mut clusters[j]);
    clusters[i].extend(moved);
    alive[j] = false;
    best.set(j, (f64::NEG_INFINITY, usize::MAX));
    for k in (0..i).filter(|&k| alive[k]) {
        let v = s[[k, i]].min(s[[k, j]]) * a;
        s[[k, i]] = v;
        // Row k's best pair, unless it was one of the two (rescanned after the merge).
        let (bv, by) = best.of[k];
        if by != i && by != j && (v > bv || (v == bv && i < by)) {
            best.set(k, (v, i));
        }
    }
    for k in (i + 1..j).filter(|&k| alive[k]) {
        s[[i, k]] = s[[i, k]].min(s[[k, j]]) * a;
    }
    for k in (j + 1..alive.len()).filter(|&k| alive[k]) {
        s[[i, k]] = s[[i, k]].min(s[[j, k]]) * a;
    }
}

/// Each row's best pair right of the diagonal, and the race between the rows.
struct Best {
    of: Vec<(f64, usize)>,
    race: Tournament,
}

impl Best {
    fn set(&mut self, x: usize, best: (f64, usize)) {
        self.of[x] = best;
        self.race.set(x, best.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over all permutations: the exact optimum.
    fn best_by_brute_force(m: &Array2<f64>) -> f64 {
        fn go(m: &Array2<f64>, r: usize, used: &mut Vec<bool>) -> f64 {
            if r == m.nrows() {
                return 0.0;
            }
            let mut best = f64::NEG_INFINITY;
            for c in 0..m.ncols() {
                if !used[c] {
                    used[c] = true;
                    best = best.max(m[[r, c]] + go(m, r + 1, used));
                    used[c] = false;
                }
            }
            best
        }
        go(m, 0, &mut vec![false; m.ncols()])
    }

    #[test]
    fn lap_agrees_with_an_exact_solver_on_random_and_tie_heavy_matrices() {
        let mut rng = crate::symmetry::permute::SplitMix(42);
        let mut next = || rng.uniform();
        for trial in 0..60 {
            let n = 2 + trial % 6;
            let ties = trial % 2 == 0;
            let m = Array2::from_shape_fn((n, n), |_| {
                let v = next();
                if ties {
                    (v * 3.0).floor()
                } else {
                    v
                }
            });
            let cols = lap(m.view()).unwrap();
            let mut seen = cols.clone();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "not a permutation");
            let got: f64 = cols.iter().enumerate().map(|(r, &c)| m[[r, c]]).sum();
            assert!(
                (got - best_by_brute_force(&m)).abs() < 1e-9,
                "trial {trial}"
            );
        }
    }

    #[test]
    fn align_recovers_a_hidden_permutation() {
        let w = 5;
        let sigma = [3, 0, 4, 1, 2];
        let mut sim = Array2::from_elem((2 * w, 2 * w), 0.1);
        for (r, &c) in sigma.iter().enumerate() {
            sim[[r, w + c]] = 0.9;
            sim[[w + c, r]] = 0.9;
        }
        let m = align(sim.view(), 2).unwrap();
        for (r, &c) in sigma.iter().enumerate() {
            assert_eq!(m.p[[w + c, r]], 1.0);
            assert_eq!(m.p[[r, r]], 1.0);
        }
        assert!((m.value - 0.9).abs() < 1e-12);
    }

    #[test]
    fn zip_pairs_the_most_similar_units_and_keeps_the_width() {
        let w = 4;
        let mut sim = Array2::from_elem((2 * w, 2 * w), 0.0);
        for r in 0..w {
            sim[[r, w + (r + 1) % w]] = 1.0;
            sim[[w + (r + 1) % w, r]] = 1.0;
        }
        let m = zip(sim.view(), 2, 0.5, 1.0);
        assert_eq!(m.p.ncols(), w);
        for r in 0..w {
            let col = (0..w).find(|&c| m.p[[r, c]] == 1.0).unwrap();
            assert_eq!(
                m.p[[w + (r + 1) % w, col]],
                1.0,
                "unit {r} not zipped with its twin"
            );
        }
        // Every unit in exactly one cluster.
        assert!(m.p.rows().into_iter().all(|row| row.sum() == 1.0));
    }

    #[test]
    fn group_zip_keeps_blocks_whole() {
        // Two blocks of 2; B's blocks are swapped and units inside reversed.
        let (blocks, bs) = (2, 2);
        let w = blocks * bs;
        let mut sim = Array2::from_elem((2 * w, 2 * w), 0.0);
        let b_of = |u: usize| (1 - u / bs) * bs + (bs - 1 - u % bs);
        for u in 0..w {
            sim[[u, w + b_of(u)]] = 1.0;
            sim[[w + b_of(u), u]] = 1.0;
        }
        let (m, bp) = group_zip(sim.view(), 2, blocks, bs, &[], 0.5, 1.0, blocks).unwrap();
        for u in 0..w {
            let col = (0..w).find(|&c| m.p[[u, c]] == 1.0).unwrap();
            assert_eq!(
                m.p[[w + b_of(u), col]],
                1.0,
                "unit {u} not zipped with its twin"
            );
            assert_eq!(col / bs, u / bs, "unit {u} left its block");
        }
        assert_eq!(bp[[2 + 1, 0]], 1.0);
    }

    #[test]
    fn group_zip_keeps_the_worst_paired_blocks_apart_when_widened() {
        // Three blocks of 2; B's block k twins A's block k, block 1's twins the weakest.
        let (blocks, bs) = (3, 2);
        let w = blocks * bs;
        let mut sim = Array2::from_elem((2 * w, 2 * w), 0.0);
        for u in 0..w {
            let s = if u / bs == 1 { 0.4 } else { 0.9 };
            sim[[u, w + u]] = s;
            sim[[w + u, u]] = s;
        }
        let (m, bp) = group_zip(sim.view(), 2, blocks, bs, &[], 0.5, 1.0, 4).unwrap();
        assert_eq!(m.p.dim(), (2 * w, 4 * bs));
        assert_eq!(bp.dim(), (2 * blocks, 4));
        // Every unit in one cluster; blocks 0 and 2 zipped with their twins, block 1 of
        // each model alone in a block of its own.
        assert!(m.p.rows().into_iter().all(|row| row.sum() == 1.0));
        let col = |u: usize| (0..4 * bs).find(|&c| m.p[[u, c]] == 1.0).unwrap();
        for u in [0, 1, 4, 5] {
            assert_eq!(col(u), col(w + u), "unit {u} not zipped with its twin");
        }
        for u in [2, 3] {
            assert_ne!(col(u) / bs, col(w + u) / bs, "weak block {u} merged");
            let members = (0..2 * w).filter(|&r| m.p[[r, col(u)]] == 1.0).count();
            assert_eq!(members, 1);
        }
        // At the number of models nothing is merged; at one model's width, nothing kept apart.
        let (all, _) = group_zip(sim.view(), 2, blocks, bs, &[], 0.5, 1.0, 6).unwrap();
        assert_eq!(all.p.dim(), (2 * w, 2 * w));
        let (one, _) = group_zip(sim.view(), 2, blocks, bs, &[], 0.5, 1.0, blocks).unwrap();
        assert_eq!(one.p.dim(), (2 * w, w));
    }

    #[test]
    fn group_align_pairs_blocks_then_units() {
        // Two blocks of 2; B's blocks are swapped and units inside reversed.
        let (blocks, bs) = (2, 2);
        let w = blocks * bs;
        let mut sim = Array2::from_elem((2 * w, 2 * w), 0.0);
        let b_of = |u: usize| {
            let (j, k) = (u / bs, u % bs);
            (1 - j) * bs + (bs - 1 - k)
        };
        for u in 0..w {
            sim[[u, w + b_of(u)]] = 1.0;
        }
        let (m, bp) = group_align(sim.view(), 2, blocks, bs, &[]).unwrap();
        for u in 0..w {
            assert_eq!(m.p[[w + b_of(u), u]], 1.0);
        }
        assert_eq!(bp[[2 + 1, 0]], 1.0);
    }

    /// The reference's plain scan over all live pairs, to check the fast zip against.
    /// columns are dropped from an active list instead of being deleted.
    fn zip_by_scan(sim: ArrayView2<f64>, models: usize, a: f64, b: f64) -> Matched {
        let o = sim.nrows();
        let w = o / models;
        let target = w;
        let mut s = sim.to_owned();
        for k in 0..o {
            s[[k, k]] = f64::NEG_INFINITY;
        }
        let mut clusters: Vec<Vec<usize>> = (0..o).map(|k| vec![k]).collect();
        let model: Vec<usize> = (0..o).map(|k| k / w).collect();
        let mut active: Vec<usize> = (0..o).collect();
        let mut budget = vec![(((o - target) / models) as f64 * b + 1e-4).floor() as i64; models];
        let mut values = Vec::new();
        while active.len() > target {
            let mut best = (f64::NEG_INFINITY, usize::MAX, usize::MAX);
            for (xi, &x) in active.iter().enumerate() {
                for &y in &active[xi + 1..] {
                    if s[[x, y]] > best.0 {
                        best = (s[[x, y]], x, y);
                    }
                }
            }
            let (v, i, j) = best;
            if i == usize::MAX {
                // Only −inf left (cannot happen with a > 0 and b = 1, guarded all the same):
                // merge the two first active units rather than corrupting the clusters.
                let (i, j) = (active[0], active[1]);
                merge_dense(&mut s, &mut clusters, &mut active, i, j, a);
                continue;
            }
            values.push(v);
            let (mi, mj) = (model[i], model[j]);
            merge_dense(&mut s, &mut clusters, &mut active, i, j, a);
            if mi == mj {
                budget[mi] -= 1;
                if budget[mi] <= 0 {
                    for &x in &active {
                        for &y in &active {
                            if model[x] == mi && model[y] == mi {
                                s[[x, y]] = f64::NEG_INFINITY;
                            }
                        }
                    }
                }
            }
        }
        let mut p = Array2::zeros((o, target));
        for (col, &k) in active.iter().enumerate() {
            for &unit in &clusters[k] {
                p[[unit, col]] = 1.0;
            }
        }
        let value = if values.is_empty() {
            0.0
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        };
        Matched { p, value }
    }

    fn merge_dense(
        s: &mut Array2<f64>,
        clusters: &mut [Vec<usize>],
        active: &mut Vec<usize>,
        i: usize,
        j: usize,
        a: f64,
    ) {
        // The reference's dense update: row and column of the merged cluster.
        let (i, j) = (i.min(j), i.max(j));
        let moved = std::mem::take(&mut clusters[j]);
        clusters[i].extend(moved);
        active.retain(|&k| k != j);
        for &k in active.iter().filter(|&&k| k != i) {
            let col = s[[k, i]].min(s[[k, j]]) * a;
            let row = s[[i, k]].min(s[[j, k]]) * a;
            s[[k, i]] = col;
            s[[i, k]] = row;
        }
    }

    #[test]
    fn zip_chooses_the_pairs_of_a_plain_scan() {
        let mut rng = crate::symmetry::permute::SplitMix(7);
        let mut next = || rng.uniform();
        for (w, models, b, ties) in [
            (8, 2, 1.0, false),
            (16, 2, 0.5, false),
            (10, 3, 1.0, false),
            (12, 2, 1.0, true),
            (9, 3, 0.3, true),
        ] {
            let o = w * models;
            let mut sim = Array2::from_shape_fn((o, o), |_| {
                let v = next() * 2.0 - 1.0;
                if ties {
                    (v * 3.0).round() / 3.0
                } else {
                    v
                }
            });
            sim = &sim + &sim.t();
            let fast = zip(sim.view(), models, 0.5, b);
            let slow = zip_by_scan(sim.view(), models, 0.5, b);
            assert_eq!(fast.p, slow.p, "w {w} models {models} b {b} ties {ties}");
            assert!((fast.value - slow.value).abs() < 1e-12);
        }
    }
}
