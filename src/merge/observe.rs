//! Where each group's units are observed during calibration.
//!
//! Discovery picks one tap per group: the last value carrying the group's units that a layer
//! reads. For a transformer's residual stream that is the class token before the head — one
//! position per sample, in the last block only — although the stream is written and read by
//! every block at every token. Such a group is also observed at every token tensor (units on
//! the last axis of a [B, N, D] value) that carries its units and that a layer reads (each
//! block's normalised stream, all tokens); the samples of all of them add into the group's one
//! moment matrix. On the bundled ViT pairs (mudsc-zip, loop seeds 0–3, task mean / joint):
//! `vit` 46.9 / 30.7 → 50.8 / 29.0, `vit_mha` 30.6 / 15.1 → 42.4 / 23.0. Convolutional
//! groups are not widened: their taps are already maps with many positions per sample, and
//! adding a ResNet's in-stage maps to its pooled stream tap lowered the merge by 4 points
//! (BN ResNet-20) and 7 (GroupNorm). The reference observes one tap (`--taps one`).

use crate::graph::Graph;
use crate::symmetry::groups::read_by_layer;
use crate::symmetry::slots::Slots;
use crate::symmetry::Group;

use super::units::Layout;

/// The values (and their unit axes) whose samples make group `g`'s moments: its discovery tap,
/// then, with `token_taps` and a tap of rank ≤ 2, the token tensors described above.
pub fn tap_points(
    g: &Group,
    graph: &Graph,
    slots: &Slots,
    layout: &Layout,
    token_taps: bool,
) -> Vec<(String, usize)> {
    let (Some(tap), Some(axis)) = (g.tap.clone(), g.tap_axis) else {
        return Vec::new();
    };
    let rank = |name: &str| slots.of(name).map_or(0, <[_]>::len);
    let thin = rank(&tap) <= 2;
    let mut out = vec![(tap, axis)];
    if !token_taps || !thin {
        return out;
    }
    for name in &g.taps {
        if out.iter().any(|(t, _)| t == name) || rank(name) < 3 || !read_by_layer(graph, name) {
            continue;
        }
        let Some(axes) = slots.of(name) else {
            continue;
        };
        // The group's whole units, in order, on the value's last axis.
        let last = axes.len() - 1;
        let whole = axes[last].is_some_and(|s| {
            let units = layout.units_along(layout.st.comp_of[s], g);
            units.len() == g.width && units.iter().enumerate().all(|(i, u)| *u == Some(i))
        });
        if whole {
            out.push((name.clone(), last));
        }
    }
    out
}
