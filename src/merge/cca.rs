//! CCA alignment (Horoi et al., 2024, "Harmony in Diversity: Merging Neural Networks with
//! Canonical Correlation Analysis"): instead of a permutation, each model's units are mapped
//! into model 0's by the linear transform that canonical correlation analysis of their
//! activations gives, and the transformed weights are averaged.
//!
//! With the (regularised) covariances C₀₀, Cᵢᵢ and cross-covariance C₀ᵢ of the two models'
//! units at the group's tap, whitening both sides and taking the SVD
//! C₀₀^{-1/2} C₀ᵢ Cᵢᵢ^{-1/2} = U S Vᵀ gives the canonical directions; model i's units map to
//! model 0's as Tᵢ = C₀₀^{1/2} U Vᵀ Cᵢᵢ^{-1/2} (whiten, rotate canonical variable onto canonical
//! variable, colour with model 0's covariance), so that Cov(Tᵢ xᵢ) = C₀₀ exactly and Tᵢ xᵢ is
//! the best linear match of x₀. The producer of the units is merged as mean(Tᵢ Wᵢ), the consumer
//! as mean(Vᵢ Tᵢ⁻¹), with Tᵢ⁻¹ = Cᵢᵢ^{1/2} V Uᵀ C₀₀^{-1/2}. Exact for linear paths; through an
//! activation function it is the paper's approximation.

use std::collections::BTreeMap;

use faer::{Mat, Side};
use ndarray::{s, Array1, Array2};

use super::units::Unmerge;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::symmetry::{Group, GroupKind};

/// One model's map into model 0's units.
#[derive(Clone, Debug)]
pub struct LinearMap {
    /// x₀ ≈ T xᵢ, [width, width].
    pub t: Array2<f64>,
    /// T⁻¹.
    pub inverse: Array2<f64>,
}

/// The maps of every model (model 0: the identity), and how well the mapped units correlate
/// with model 0's (the group's merge value).
#[derive(Clone, Debug)]
pub struct GroupMaps {
    pub maps: Vec<LinearMap>,
    pub unit_correlation: f64,
}

/// Which groups a linear map can align: `Ok` for those, the reason for the others (they keep
/// a permutation). A dense map commutes only with linear use of the units: every member tensor
/// must be a dense layer's weight or bias (Conv with one group, Gemm, MatMul) or an added
/// term. Per-unit scales (BatchNorm, LayerNorm and GroupNorm parameters, depthwise kernels,
/// layer scales) would become dense matrices, and blocked groups (attention heads, norm
/// groups) are matched block-wise; those stay permutations. Elementwise activations between a
/// producer and its consumer are crossed, as the paper does (an approximation there).
pub fn scope(groups: &[Group], graph: &Graph) -> BTreeMap<usize, std::result::Result<(), String>> {
    groups
        .iter()
        .map(|g| (g.id, linear_use(g, graph)))
        .collect()
}

fn linear_use(g: &Group, graph: &Graph) -> std::result::Result<(), String> {
    if !matches!(g.kind, GroupKind::Plain) {
        return Err("blocked group (heads or norm groups): matched block-wise".into());
    }
    if g.tap.is_none() {
        return Err("no activation tap".into());
    }
    super::dense_use::only_dense_use(g, graph, &[])
}

/// CCA maps from one group's covariance over all models' units (model-major, models × width),
/// anchored to the group's permutation `p`.
///
/// `ridge` is added to each covariance's diagonal, relative to its mean variance: dead or
/// collinear units, and directions the samples barely explore, make the covariances
/// (near-)singular, and an unregularised inverse square root maps noise directions of one
/// model onto arbitrary directions of the other at full gain. As the ridge grows the map tends
/// to the orthogonal Procrustes rotation of the cross-covariance.
///
/// Where the cross-covariance is (near) zero — units dead in both models — the canonical
/// rotation is undetermined (any rotation of that subspace fits), and a rotation among dead
/// units turns them into live ones. The permutation breaks the tie: the rotation is fitted to
/// the whitened cross-covariance plus a small multiple of the permutation matrix, which moves
/// well-determined directions negligibly and maps the undetermined ones as the permutation
/// does. A model and a permuted copy of it get exactly that permutation, whatever the ridge.
pub fn maps(cov: &Array2<f64>, p: &Unmerge, ridge: f64) -> Result<GroupMaps> {
    let models = p.target.len() / p.merged.max(1);
    let w = cov.nrows() / models;
    let block = |i: usize, j: usize| {
        cov.slice(s![i * w..(i + 1) * w, j * w..(j + 1) * w])
            .to_owned()
    };
    let c00 = regularise(block(0, 0), ridge);
    let (root0, inv_root0) = roots(&c00)?;
    let mut out = vec![LinearMap {
        t: Array2::eye(w),
        inverse: Array2::eye(w),
    }];
    let mut correlation = 0.0;
    for i in 1..models {
        let (root_i, inv_root_i) = roots(&regularise(block(i, i), ridge))?;
        let mut whitened = inv_root0.dot(&block(0, i)).dot(&inv_root_i);
        // The permutation as a map from model i's units to model 0's: row = model 0's unit.
        let scale = ANCHOR
            * (whitened.iter().map(|v| v * v).sum::<f64>() / w as f64)
                .sqrt()
                .max(1e-12);
        for c in 0..w {
            let r = p.target[i * w + c] as usize;
            if r < w {
                whitened[[r, c]] += scale;
            }
        }
        let (u, _, vt) = svd(&whitened)?;
        let rotation = u.dot(&vt);
        let t = root0.dot(&rotation).dot(&inv_root_i);
        correlation += unit_correlation(&t, &block(i, 0), &block(i, i), &block(0, 0));
        out.push(LinearMap {
            inverse: root_i.dot(&rotation.t()).dot(&inv_root0),
            t,
        });
    }
    Ok(GroupMaps {
        maps: out,
        unit_correlation: correlation / (models - 1).max(1) as f64,
    })
}

/// The permutation's weight beside the whitened cross-covariance, relative to its RMS singular
/// value.
const ANCHOR: f64 = 1e-3;

/// How well the mapped units match model 0's: the mean over units of corr((T xᵢ)ⱼ, x₀ⱼ), from
/// the unregularised covariances (units dead in either model left out); comparable with a
/// permutation's mean matched correlation.
fn unit_correlation(
    t: &Array2<f64>,
    ci0: &Array2<f64>,
    cii: &Array2<f64>,
    c00: &Array2<f64>,
) -> f64 {
    let cross = t.dot(ci0);
    let var = t.dot(cii).dot(&t.t());
    let (mut sum, mut n) = (0.0, 0);
    for j in 0..t.nrows() {
        let denominator = (var[[j, j]] * c00[[j, j]]).sqrt();
        if denominator > 1e-12 {
            sum += cross[[j, j]] / denominator;
            n += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

fn regularise(mut c: Array2<f64>, ridge: f64) -> Array2<f64> {
    let w = c.nrows();
    let mean_var = (0..w).map(|i| c[[i, i]].max(0.0)).sum::<f64>() / w.max(1) as f64;
    let r = ridge * mean_var + 1e-12;
    for i in 0..w {
        c[[i, i]] += r;
    }
    c
}

/// C^{1/2} and C^{-1/2} of a symmetric positive definite matrix, by its eigendecomposition.
fn roots(c: &Array2<f64>) -> Result<(Array2<f64>, Array2<f64>)> {
    let w = c.nrows();
    let m = Mat::<f64>::from_fn(w, w, |i, j| c[[i, j]]);
    let eig = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Usage(format!("CCA: eigendecomposition failed: {e:?}")))?;
    let q = to_ndarray(eig.U());
    let values: Vec<f64> = eig
        .S()
        .column_vector()
        .iter()
        .map(|v| v.max(1e-300))
        .collect();
    let scaled = |f: &dyn Fn(f64) -> f64| {
        let mut qs = q.clone();
        for (j, v) in values.iter().enumerate() {
            qs.column_mut(j).mapv_inplace(|x| x * f(*v));
        }
        qs.dot(&q.t())
    };
    Ok((scaled(&|v| v.sqrt()), scaled(&|v| 1.0 / v.sqrt())))
}

/// U, singular values and Vᵀ of a square matrix.
fn svd(a: &Array2<f64>) -> Result<(Array2<f64>, Array1<f64>, Array2<f64>)> {
    let w = a.nrows();
    let m = Mat::<f64>::from_fn(w, a.ncols(), |i, j| a[[i, j]]);
    let d = m
        .svd()
        .map_err(|e| Error::Usage(format!("CCA: singular value decomposition failed: {e:?}")))?;
    let s: Array1<f64> = d.S().column_vector().iter().copied().collect();
    Ok((to_ndarray(d.U()), s, to_ndarray(d.V()).reversed_axes()))
}

fn to_ndarray(m: faer::MatRef<'_, f64>) -> Array2<f64> {
    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model 1's units are an invertible mix of model 0's (plus a little noise): CCA finds the
    /// mix, and its inverse undoes it.
    #[test]
    fn a_linearly_mixed_copy_is_mapped_back() {
        let (w, n) = (6, 4000);
        let mut rng = crate::symmetry::permute::SplitMix(12345);
        let mut normal = || {
            // Box–Muller.
            let (a, b) = (rng.uniform(), rng.uniform());
            (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
        };
        let mix = Array2::from_shape_fn((w, w), |(i, j)| {
            if i == j {
                2.0
            } else {
                0.3 * ((i * 7 + j * 3) % 5) as f64 - 0.5
            }
        });
        let mut moments = crate::stats::Moments::new(2 * w);
        let mut batch = Array2::<f64>::zeros((n, 2 * w));
        for r in 0..n {
            let x: Array1<f64> = (0..w).map(|k| normal() * (1.0 + k as f64)).collect();
            let y = mix.dot(&x);
            for k in 0..w {
                batch[[r, k]] = x[k];
                batch[[r, w + k]] = y[k] + 0.001 * normal();
            }
        }
        moments.add_f64(batch.view());
        let cov = moments.correlation();
        let (_, sd) = moments.mean_std();
        let cov = Array2::from_shape_fn(cov.dim(), |(i, j)| cov[[i, j]] * sd[i] * sd[j]);
        let identity = Unmerge {
            target: (0..w as u32).chain(0..w as u32).collect(),
            merged: w,
        };
        let g = maps(&cov, &identity, 1e-6).unwrap();
        let t = &g.maps[1].t;
        // T · mix ≈ I: model 1's units mapped back onto model 0's.
        let back = t.dot(&mix);
        for ((i, j), v) in back.indexed_iter() {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((v - want).abs() < 0.02, "T·mix[{i},{j}] = {v}");
        }
        let id = t.dot(&g.maps[1].inverse);
        for ((i, j), v) in id.indexed_iter() {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((v - want).abs() < 1e-8, "T·T⁻¹[{i},{j}] = {v}");
        }
        assert!(g.unit_correlation > 0.99, "{}", g.unit_correlation);
    }
}
