//! Spherical linear interpolation of two tensors (as mergekit's `slerp`): along the great
//! circle through their directions, so that the interpolated tensor keeps a norm between
//! theirs instead of shrinking as a straight average of two dissimilar vectors does.

/// Directions closer than this (|cos|) are interpolated linearly: the sine of a tiny angle
/// would amplify rounding.
const COLINEAR: f64 = 0.9995;

/// (1 − t)·a + t·b along the sphere; `t` = 0 gives `a`, 1 gives `b`.
pub fn slerp(a: &[f64], b: &[f64], t: f64, out: &mut [f64]) {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    let lerp = |out: &mut [f64]| {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = (1.0 - t) * x + t * y;
        }
    };
    if na <= f64::EPSILON || nb <= f64::EPSILON {
        return lerp(out);
    }
    let cos = (a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (na * nb)).clamp(-1.0, 1.0);
    if cos.abs() > COLINEAR {
        return lerp(out);
    }
    let theta = cos.acos();
    let sin = theta.sin();
    let (s0, s1) = (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin);
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = s0 * x + s1 * y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_unit_vectors_stay_on_the_circle() {
        let mut out = vec![0.0; 2];
        slerp(&[1.0, 0.0], &[0.0, 1.0], 0.5, &mut out);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert!((out[0] - h).abs() < 1e-12 && (out[1] - h).abs() < 1e-12);
        slerp(&[1.0, 0.0], &[0.0, 1.0], 1.0 / 3.0, &mut out);
        let angle = out[1].atan2(out[0]);
        assert!((angle - std::f64::consts::FRAC_PI_6).abs() < 1e-12);
        assert!(((out[0] * out[0] + out[1] * out[1]).sqrt() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_ends_and_colinear_or_zero_vectors() {
        let (a, b) = ([1.0, 2.0, 3.0], [-3.0, 0.5, 1.0]);
        let mut out = vec![0.0; 3];
        slerp(&a, &b, 0.0, &mut out);
        assert!(out.iter().zip(&a).all(|(o, x)| (o - x).abs() < 1e-12));
        slerp(&a, &b, 1.0, &mut out);
        assert!(out.iter().zip(&b).all(|(o, x)| (o - x).abs() < 1e-12));
        slerp(&a, &[2.0, 4.0, 6.0], 0.5, &mut out);
        assert_eq!(out, vec![1.5, 3.0, 4.5]);
        slerp(&a, &[0.0; 3], 0.5, &mut out);
        assert_eq!(out, vec![0.5, 1.0, 1.5]);
    }
}
