//! DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each task-vector entry with
//! probability p = 1 − density and rescale the survivors by 1 / density, so the task vector's
//! expectation is unchanged.
//!
//! The drop mask is a counter-based hash of (seed, model index, tensor name, entry index),
//! written out rather than drawn from `rand`: the same seed must drop the same entries on
//! every build and in any tensor order, and a test (tests/python) recomputes the mask
//! independently in numpy.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bits, of the tensor's name.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The key of one model's tensor: every entry's draw derives from it.
pub fn key(seed: u64, model: usize, name: &str) -> u64 {
    mix(seed.wrapping_mul(GOLDEN) ^ fnv1a(name) ^ mix((model as u64).wrapping_add(1)))
}

/// Entry `j`'s uniform draw in [0, 1), 53 bits.
fn uniform(key: u64, j: usize) -> f64 {
    let z = mix(key.wrapping_add((j as u64).wrapping_add(1).wrapping_mul(GOLDEN)));
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Drops and rescales `tau` in place: entry j survives when its draw is below `density`.
/// Returns the number of survivors that are nonzero. `density` 1 leaves `tau` as it is.
pub fn drop_and_rescale(tau: &mut [f64], density: f64, key: u64) -> usize {
    if density >= 1.0 {
        return tau.iter().filter(|v| **v != 0.0).count();
    }
    let mut kept = 0;
    for (j, v) in tau.iter_mut().enumerate() {
        if uniform(key, j) < density {
            *v /= density;
            kept += usize::from(*v != 0.0);
        } else {
            *v = 0.0;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_rate_is_one_minus_density_and_the_rest_is_rescaled() {
        let n = 200_000;
        let mut tau = vec![1.0; n];
        let kept = drop_and_rescale(&mut tau, 0.3, key(7, 0, "w"));
        let rate = kept as f64 / n as f64;
        assert!((rate - 0.3).abs() < 0.005, "kept {rate}");
        assert!(tau
            .iter()
            .all(|v| *v == 0.0 || (*v - 1.0 / 0.3).abs() < 1e-12));
        // The mean of the task vector is kept in expectation.
        let mean = tau.iter().sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn masks_differ_by_seed_model_and_tensor_and_repeat_for_the_same_key() {
        let mask = |k: u64| {
            let mut t = vec![1.0; 64];
            drop_and_rescale(&mut t, 0.5, k);
            t
        };
        let k = key(1, 0, "w");
        assert_eq!(mask(k), mask(key(1, 0, "w")));
        for other in [key(2, 0, "w"), key(1, 1, "w"), key(1, 0, "v")] {
            assert_ne!(mask(k), mask(other));
        }
    }
}
