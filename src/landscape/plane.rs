//! The plane through three parameter vectors: origin θ_A, an orthonormal basis (u, v) by
//! Gram–Schmidt, the three points' coordinates, and the grid around them.
//!
//! u points from A to B, v towards the merged model, so that A sits at (0, 0), B on the
//! x axis and the merged model above it: the picture reads the same for every pair. Distances
//! are Euclidean in parameter space (every float initializer, unweighted).

use crate::error::{Error, Result};

/// The points count as collinear when the merged model's offset from the A–B line is below
/// this share of the triangle's size: an average computed in float32 (or float16) is off the
/// line by its rounding, and a triangle 10⁻⁴ high is a line in any picture.
const COLLINEAR: f64 = 1e-4;
/// The grid's shorter side is at least this share of its longer one, so that a flat triangle
/// still gets a window with room on both sides of it, not a sliver.
const MIN_ASPECT: f64 = 0.25;

/// A plane in parameter space with its orthonormal basis.
#[derive(Clone, Debug)]
pub struct Plane {
    origin: Vec<f64>,
    u: Vec<f64>,
    v: Vec<f64>,
    /// Plane coordinates of the points the plane was built through, in the order given.
    pub coords: Vec<(f64, f64)>,
    /// Set when the points do not span a plane and v is an arbitrary direction.
    pub note: Option<String>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `a − c·b`, in place.
fn sub_scaled(a: &mut [f64], c: f64, b: &[f64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x -= c * y;
    }
}

impl Plane {
    /// The plane through `origin`, `b` and `c` (θ_A, θ_B', θ_M). When they are collinear
    /// (e.g. plain averaging without alignment puts the merged model on the A–B segment), v is
    /// a fixed direction orthogonal to u and `note` says so; when all three coincide there is
    /// no picture to draw and that is an error.
    pub fn through(origin: &[f64], b: &[f64], c: &[f64]) -> Result<Plane> {
        if b.len() != origin.len() || c.len() != origin.len() {
            return Err(Error::Usage(
                "the three parameter vectors differ in length".into(),
            ));
        }
        let diff = |p: &[f64]| -> Vec<f64> { p.iter().zip(origin).map(|(x, o)| x - o).collect() };
        let (db, dc) = (diff(b), diff(c));
        let (nb, nc) = (norm(&db), norm(&dc));
        let scale = nb.max(nc);
        if scale == 0.0 {
            return Err(Error::Usage(
                "model A, the aligned model B and the merged model have identical parameters: \
                 there is no plane to draw"
                    .into(),
            ));
        }
        // u along A→B, unless B coincides with A: then along A→merged.
        let first = if nb > 0.0 { &db } else { &dc };
        let nf = norm(first);
        let u: Vec<f64> = first.iter().map(|x| x / nf).collect();
        let mut v = dc.clone();
        sub_scaled(&mut v, dot(&dc, &u), &u);
        let mut note = None;
        if norm(&v) <= COLLINEAR * scale {
            v = orthogonal_to(&u);
            note = Some(
                "A, aligned B and the merged model lie on one line in parameter space; the \
                 second axis is an arbitrary direction orthogonal to it"
                    .into(),
            );
        }
        let nv = norm(&v);
        if nv == 0.0 {
            return Err(Error::Usage(
                "the parameter space has a single value: no plane to draw".into(),
            ));
        }
        v.iter_mut().for_each(|x| *x /= nv);
        let coords = [&db, &dc]
            .iter()
            .map(|d| (dot(d, &u), dot(d, &v)))
            .collect::<Vec<_>>();
        Ok(Plane {
            origin: origin.to_vec(),
            u,
            v,
            coords: std::iter::once((0.0, 0.0)).chain(coords).collect(),
            note,
        })
    }

    /// θ at plane coordinates (x, y): origin + x·u + y·v.
    pub fn theta_at(&self, x: f64, y: f64) -> Vec<f64> {
        self.origin
            .iter()
            .zip(self.u.iter().zip(&self.v))
            .map(|(o, (u, v))| o + x * u + y * v)
            .collect()
    }
}

/// A unit direction orthogonal to `u`, fixed for a given `u`: every entry of u flipped in sign
/// by a hash of its index (so it moves the same parameters by the same amounts as u does, in
/// a different pattern), then Gram–Schmidt against u. Falls back to a coordinate axis where u
/// is zero when u has a single non-zero entry.
fn orthogonal_to(u: &[f64]) -> Vec<f64> {
    let sign = |i: usize| {
        let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        if (z ^ (z >> 31)) & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    };
    let mut w: Vec<f64> = u.iter().enumerate().map(|(i, x)| x * sign(i)).collect();
    let along = dot(&w, u);
    sub_scaled(&mut w, along, u);
    if norm(&w) > 1e-6 {
        return w;
    }
    let mut w = vec![0.0; u.len()];
    if let Some(j) = u.iter().position(|x| *x == 0.0) {
        w[j] = 1.0;
    } else if u.len() > 1 {
        // u has every entry non-zero but only one of them counted: rotate in the first two.
        w[0] = u[1];
        w[1] = -u[0];
    }
    w
}

/// A square grid of points over the bounding box of `points`, extended by `margin` times the
/// box's extent on every side. A side shorter than `MIN_ASPECT` times the other is widened
/// about its centre to that length first (collinear points give a flat box).
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub xs: Vec<f64>,
    pub ys: Vec<f64>,
}

impl Grid {
    pub fn around(points: &[(f64, f64)], n: usize, margin: f64) -> Result<Grid> {
        if n < 2 {
            return Err(Error::Usage(format!(
                "the grid needs at least 2 points per side, got {n}"
            )));
        }
        if !(margin.is_finite() && margin >= 0.0) {
            return Err(Error::Usage(format!(
                "the margin must be a non-negative number, got {margin}"
            )));
        }
        let span = |f: fn(&(f64, f64)) -> f64| {
            let lo = points.iter().map(f).fold(f64::INFINITY, f64::min);
            let hi = points.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
            (lo, hi)
        };
        let (mut x0, mut x1) = span(|p| p.0);
        let (mut y0, mut y1) = span(|p| p.1);
        if !(x0.is_finite() && y0.is_finite()) {
            return Err(Error::Usage(
                "no finite points to draw a grid around".into(),
            ));
        }
        let size = (x1 - x0).max(y1 - y0).max(1e-12);
        let widen = |lo: &mut f64, hi: &mut f64| {
            if *hi - *lo < MIN_ASPECT * size {
                let mid = 0.5 * (*lo + *hi);
                (*lo, *hi) = (mid - 0.5 * MIN_ASPECT * size, mid + 0.5 * MIN_ASPECT * size);
            }
            let pad = margin * (*hi - *lo);
            (*lo, *hi) = (*lo - pad, *hi + pad);
        };
        widen(&mut x0, &mut x1);
        widen(&mut y0, &mut y1);
        let axis = |lo: f64, hi: f64| -> Vec<f64> {
            (0..n)
                .map(|k| lo + (hi - lo) * k as f64 / (n - 1) as f64)
                .collect()
        };
        Ok(Grid {
            xs: axis(x0, x1),
            ys: axis(y0, y1),
        })
    }

    /// Every grid point, row by row (y outer, x inner).
    pub fn points(&self) -> Vec<(f64, f64)> {
        self.ys
            .iter()
            .flat_map(|&y| self.xs.iter().map(move |&x| (x, y)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basis_is_orthonormal_and_reproduces_the_points() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [2.0, 2.0, 3.0, 5.0];
        let c = [1.0, 4.0, 0.0, 4.5];
        let p = Plane::through(&a, &b, &c).unwrap();
        assert!((norm(&p.u) - 1.0).abs() < 1e-12 && (norm(&p.v) - 1.0).abs() < 1e-12);
        assert!(dot(&p.u, &p.v).abs() < 1e-12);
        assert!(p.note.is_none());
        assert_eq!(p.coords[0], (0.0, 0.0));
        assert!((p.coords[1].0 - 2f64.sqrt()).abs() < 1e-12 && p.coords[1].1.abs() < 1e-12);
        assert!(p.coords[2].1 > 0.0);
        for (pt, want) in p.coords.iter().zip([&a[..], &b[..], &c[..]]) {
            let got = p.theta_at(pt.0, pt.1);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn collinear_points_get_an_orthogonal_axis_and_a_note() {
        let a = [0.0, 0.0, 0.0];
        let b = [2.0, 4.0, 6.0];
        let mid = [1.0, 2.0, 3.0];
        let p = Plane::through(&a, &b, &mid).unwrap();
        assert!(p.note.is_some());
        assert!(dot(&p.u, &p.v).abs() < 1e-12);
        assert!((norm(&p.v) - 1.0).abs() < 1e-12);
        assert!(p.coords[2].1.abs() < 1e-12);
        assert!(Plane::through(&a, &a, &a).is_err());
    }

    #[test]
    fn grid_covers_the_triangle_with_margin() {
        let g = Grid::around(&[(0.0, 0.0), (10.0, 0.0), (4.0, 5.0)], 5, 0.2).unwrap();
        assert_eq!(g.xs.len(), 5);
        assert!((g.xs[0] + 2.0).abs() < 1e-12 && (g.xs[4] - 12.0).abs() < 1e-12);
        assert!((g.ys[0] + 1.0).abs() < 1e-12 && (g.ys[4] - 6.0).abs() < 1e-12);
        assert_eq!(g.points().len(), 25);
        // Collinear: the flat direction gets a quarter of the other's extent.
        let flat = Grid::around(&[(0.0, 0.0), (4.0, 0.0)], 3, 0.0).unwrap();
        assert_eq!(flat.ys, vec![-0.5, 0.0, 0.5]);
        assert!(Grid::around(&[(0.0, 0.0)], 1, 0.3).is_err());
    }
}
