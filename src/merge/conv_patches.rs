//! A k×k convolution as a linear layer over its input patches, for the output refit.
//!
//! The refit fits a layer's weights by least squares from the merged model's input features to
//! the endpoints' average output. A 1×1 convolution is that over channels, pixel by pixel. A
//! k×k one is the same over patches (im2col): each output pixel is a row whose features are
//! the input values under the kernel. A depthwise convolution is one such layer per channel
//! (k² features each), a dense one a single layer over all channels' patches. On the bundled
//! BN ResNet-20 pair refitting every 3×3 convolution this way took mudsc-zip from 80.8 to
//! 87.4 % task mean (ensemble 88.7); the depthwise CNN's depthwise and stem convolutions added
//! about a point (73.4 → 74.3).
//!
//! Grouped convolutions other than depthwise ones are not handled (their group width is fixed
//! by discovery; they keep their merged weights). The patches are built here by hand: they feed
//! normal equations chunk by chunk, so the full im2col matrix is never held (a crate's im2col
//! would materialise it).

use ndarray::{s, Array2, ArrayD, ArrayView4, ArrayViewMut2};

use super::output_fit::System;
use crate::error::{Error, Result};
use crate::onnx::proto::NodeProto;
use crate::symmetry::rules::{attr_int, attr_ints};

/// Rows of patches multiplied at a time (`System::next_rows`): the f32 products sum over
/// this many rows, f64 across chunks; the last chunk holds what is left.
/// f32 against the f64 products before (2026-11-29): refit 1.3 → 1.05 s on the BN-folded
/// ResNet-20 pair; on every bundled pair the task means stayed the same, and the merged
/// models' logits moved by at most 6.4e-4 (logit std 2.5–4), every prediction unchanged on
/// 500 test images. 1,024 rows instead of 4,096 moved nothing: the difference is the f32
/// rounding of the rows and targets, not of the sums.
const CHUNK_ROWS: usize = 4096;

/// f32 elements a layer's pending chunks (rows and targets, every group's) may hold: fewer
/// rows per chunk where a convolution has many groups (a depthwise one has a system per
/// channel), at least `MIN_CHUNK_ROWS`.
const PENDING_ELEMENTS: usize = 1 << 24;
const MIN_CHUNK_ROWS: usize = 256;

/// Where a 2-D convolution reads its input: kernel, strides, pads and dilations, and whether
/// it is depthwise (one group per channel) rather than dense (one group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGeometry {
    pub depthwise: bool,
    kernel: [usize; 2],
    strides: [usize; 2],
    /// Begin (top, left) and end (bottom, right) pads.
    pads: [usize; 4],
    dilations: [usize; 2],
}

impl ConvGeometry {
    /// The geometry of a 2-D Conv with weight dims `dims` ([out, in / group, kh, kw]): dense
    /// (group 1) or depthwise (group = out channels, one input channel each), explicit or no
    /// padding. `None` for anything else (other groupings, `auto_pad` SAME_*, other ranks).
    pub fn of(node: &NodeProto, dims: &[i64]) -> Option<ConvGeometry> {
        if dims.len() != 4 || dims.iter().any(|&d| d <= 0) {
            return None;
        }
        let group = attr_int(node, "group").unwrap_or(1);
        let depthwise = group > 1 && dims[1] == 1 && dims[0] == group;
        if group != 1 && !depthwise {
            return None;
        }
        let auto_pad = node
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some("auto_pad"))
            .and_then(|a| a.s.as_deref());
        if auto_pad.is_some_and(|s| s != b"NOTSET" && s != b"VALID") {
            return None;
        }
        let pair = |name: &str, default: usize| -> Option<[usize; 2]> {
            match attr_ints(node, name) {
                None => Some([default; 2]),
                Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 1) => {
                    Some([v[0] as usize, v[1] as usize])
                }
                Some(_) => None,
            }
        };
        let kernel = [dims[2] as usize, dims[3] as usize];
        if let Some(k) = attr_ints(node, "kernel_shape") {
            if k.len() != 2 || k[0] as usize != kernel[0] || k[1] as usize != kernel[1] {
                return None;
            }
        }
        let pads = match attr_ints(node, "pads") {
            None => [0; 4],
            Some(p) if p.len() == 4 && p.iter().all(|&x| x >= 0) => {
                [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize]
            }
            Some(_) => return None,
        };
        Some(ConvGeometry {
            depthwise,
            kernel,
            strides: pair("strides", 1)?,
            pads,
            dilations: pair("dilations", 1)?,
        })
    }

    /// Groups of a layer whose input has `channels` channels.
    pub fn groups(&self, channels: usize) -> usize {
        if self.depthwise {
            channels
        } else {
            1
        }
    }

    /// Adds one batch to the per-group normal equations `systems` (created on the first
    /// batch): `x` the layer's merged input [batch, channels, h, w], `target` the endpoints'
    /// average output as rows (batch, y, x) × output channels.
    pub fn accumulate(
        &self,
        name: &str,
        x: &ArrayD<f32>,
        target: &Array2<f64>,
        systems: &mut Vec<System>,
    ) -> Result<()> {
        self.accumulate_in_chunks(name, x, target, systems, CHUNK_ROWS)
    }

    /// `accumulate` with the f32 products over `chunk` rows.
    fn accumulate_in_chunks(
        &self,
        name: &str,
        x: &ArrayD<f32>,
        target: &Array2<f64>,
        systems: &mut Vec<System>,
        chunk: usize,
    ) -> Result<()> {
        let x: ArrayView4<f32> = x
            .view()
            .into_dimensionality()
            .map_err(|_| Error::tensor(name, "a 2-D convolution's input is not 4-D"))?;
        let (batch, channels, height, width) = x.dim();
        let out_h = self.output_size(height, 0);
        let out_w = self.output_size(width, 1);
        let rows = batch * out_h * out_w;
        let groups = self.groups(channels);
        let outputs = target.ncols();
        if target.nrows() != rows || groups == 0 || !outputs.is_multiple_of(groups) {
            return Err(Error::tensor(
                name,
                format!(
                    "{} rows × {outputs} outputs against {rows} output pixels in {groups} groups",
                    target.nrows()
                ),
            ));
        }
        let per_group_in = channels / groups;
        let per_group_out = outputs / groups;
        let [kh, kw] = self.kernel;
        let features = per_group_in * kh * kw;
        if systems.is_empty() {
            *systems = (0..groups)
                .map(|_| System::new(features, per_group_out))
                .collect();
        }
        if systems.len() != groups {
            return Err(Error::tensor(
                name,
                "the channel count changed between batches",
            ));
        }
        // The rows go straight into each system's pending chunk (`System::next_rows`),
        // multiplied once it is full, whichever batch brought them.
        let per_row = groups * (features + 1 + per_group_out);
        let chunk = chunk.min((PENDING_ELEMENTS / per_row.max(1)).max(MIN_CHUNK_ROWS));
        for (g, system) in systems.iter_mut().enumerate() {
            // The group's channels contiguous (a copy only for grouped convolutions).
            let inputs = x.slice(s![.., g * per_group_in..(g + 1) * per_group_in, .., ..]);
            let inputs = inputs.as_standard_layout();
            let Some(data) = inputs.as_slice() else {
                unreachable!("a standard-layout array is one slice")
            };
            let mut start = 0;
            while start < rows {
                let (rows_in, mut t) = system.next_rows(rows - start, chunk);
                let end = start + rows_in.nrows();
                let dims = (per_group_in, height, width);
                self.patches(data, dims, start..end, [out_h, out_w], rows_in);
                t.zip_mut_with(
                    &target.slice(s![start..end, g * per_group_out..(g + 1) * per_group_out]),
                    |d, &v| *d = v as f32,
                );
                system.commit(end - start);
                start = end;
            }
        }
        Ok(())
    }

    /// Output size along spatial axis `axis` (0: height, 1: width) for an input of `size`.
    fn output_size(&self, size: usize, axis: usize) -> usize {
        let span = self.dilations[axis] * (self.kernel[axis] - 1) + 1;
        let padded = size + self.pads[axis] + self.pads[axis + 2];
        if padded < span {
            0
        } else {
            (padded - span) / self.strides[axis] + 1
        }
    }

    /// Rows `range` (batch, y, x in order) of the patch matrix of `x` ([batch, channels, h,
    /// w] of one group's channels, row-major), written into `p`: features in the weight's
    /// order (channel, ky, kx), zeros outside the input, and a last column of ones (the bias).
    fn patches(
        &self,
        x: &[f32],
        (channels, height, width): (usize, usize, usize),
        range: std::ops::Range<usize>,
        [out_h, out_w]: [usize; 2],
        mut p: ArrayViewMut2<f32>,
    ) {
        let [kh, kw] = self.kernel;
        let features = channels * kh * kw;
        let plane = height * width;
        p.fill(0.0);
        for (i, r) in range.enumerate() {
            let (b, pixel) = (r / (out_h * out_w), r % (out_h * out_w));
            let (oy, ox) = (pixel / out_w, pixel % out_w);
            let mut row = p.row_mut(i);
            let Some(row) = row.as_slice_mut() else {
                unreachable!("rows of a standard-layout matrix are contiguous")
            };
            row[features] = 1.0;
            for ky in 0..kh {
                let y = (oy * self.strides[0] + ky * self.dilations[0]).checked_sub(self.pads[0]);
                let Some(y) = y.filter(|&y| y < height) else {
                    continue;
                };
                for kx in 0..kw {
                    let xx =
                        (ox * self.strides[1] + kx * self.dilations[1]).checked_sub(self.pads[1]);
                    let Some(xx) = xx.filter(|&xx| xx < width) else {
                        continue;
                    };
                    // Channel 0's value; channel c's is a plane further on.
                    let at = b * channels * plane + y * width + xx;
                    for c in 0..channels {
                        let v = x[at + c * plane];
                        row[(c * kh + ky) * kw + kx] = if v.is_finite() { v } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// A [out, in/group, kh, kw] weight's rows for group `g` of `groups` as [features, outputs]
/// (the layout `System` solves for).
pub fn group_weights(w: &Array2<f64>, g: usize, groups: usize) -> Array2<f64> {
    let per = w.nrows() / groups.max(1);
    w.slice(s![g * per..(g + 1) * per, ..]).t().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::AttributeProto;

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: Some(name.to_string()),
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn conv(group: i64, strides: &[i64], pads: &[i64], dilations: &[i64]) -> NodeProto {
        NodeProto {
            op_type: Some("Conv".to_string()),
            attribute: vec![
                AttributeProto {
                    name: Some("group".to_string()),
                    i: Some(group),
                    ..Default::default()
                },
                ints("strides", strides),
                ints("pads", pads),
                ints("dilations", dilations),
            ],
            ..Default::default()
        }
    }

    /// The direct definition of a 2-D convolution (zero padding), for one image.
    fn direct(
        x: &ndarray::Array4<f32>,
        w: &ndarray::Array4<f64>,
        bias: &[f64],
        group: usize,
        g: &ConvGeometry,
        out: [usize; 2],
    ) -> ndarray::Array4<f64> {
        let (batch, channels, h, wd) = x.dim();
        let (o, ipg, kh, kw) = w.dim();
        let opg = o / group;
        let mut y = ndarray::Array4::<f64>::zeros((batch, o, out[0], out[1]));
        for b in 0..batch {
            for oc in 0..o {
                let gi = oc / opg;
                for oy in 0..out[0] {
                    for ox in 0..out[1] {
                        let mut acc = bias[oc];
                        for ci in 0..ipg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * g.strides[0] + ky * g.dilations[0]) as i64
                                        - g.pads[0] as i64;
                                    let ix = (ox * g.strides[1] + kx * g.dilations[1]) as i64
                                        - g.pads[1] as i64;
                                    if iy < 0 || ix < 0 || iy >= h as i64 || ix >= wd as i64 {
                                        continue;
                                    }
                                    let c = gi * ipg + ci;
                                    assert!(c < channels);
                                    acc += w[[oc, ci, ky, kx]]
                                        * f64::from(x[[b, c, iy as usize, ix as usize]]);
                                }
                            }
                        }
                        y[[b, oc, oy, ox]] = acc;
                    }
                }
            }
        }
        y
    }

    /// Outputs of a convolution computed directly, as the refit's target, give its weights
    /// and bias back from the patches' normal equations: dense and depthwise, with strides,
    /// pads and dilations, over two batches. A wrong feature order or pixel offset does not.
    #[test]
    fn patches_recover_a_convolution_from_its_outputs() {
        let mut rng = crate::symmetry::permute::SplitMix(7);
        let mut draw = || 2.0 * rng.uniform() - 1.0;
        for (group, channels, strides, pads, dilations) in [
            (1, 3, [1, 1], [1, 1, 1, 1], [1, 1]),
            (1, 2, [2, 1], [0, 2, 1, 0], [1, 2]),
            (4, 4, [2, 2], [1, 1, 0, 0], [1, 1]),
            (3, 3, [1, 2], [2, 0, 2, 1], [2, 1]),
        ] {
            let node = conv(group as i64, &strides, &pads, &dilations);
            let out_channels = if group > 1 { channels } else { 5 };
            let ipg = channels / group;
            let dims = [out_channels as i64, ipg as i64, 3, 2];
            let geom = ConvGeometry::of(&node, &dims).expect("a supported convolution");
            assert_eq!(geom.depthwise, group > 1);
            let w = ndarray::Array4::from_shape_fn((out_channels, ipg, 3, 2), |_| draw());
            let bias: Vec<f64> = (0..out_channels).map(|_| draw()).collect();
            let mut systems = Vec::new();
            for _ in 0..2 {
                let x = ndarray::Array4::from_shape_fn((3, channels, 7, 6), |_| draw() as f32);
                let out = [geom.output_size(7, 0), geom.output_size(6, 1)];
                let y = direct(&x, &w, &bias, group, &geom, out);
                let rows = y
                    .permuted_axes([0, 2, 3, 1])
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order((3 * out[0] * out[1], out_channels))
                    .expect("rows");
                geom.accumulate("conv", &x.into_dyn(), &rows, &mut systems)
                    .expect("accumulated");
            }
            assert_eq!(systems.len(), geom.groups(channels));
            let flat = w
                .clone()
                .into_shape_with_order((out_channels, ipg * 6))
                .expect("flat");
            let count = systems.len();
            for (g, system) in systems.iter_mut().enumerate() {
                let mut w0 = Array2::<f64>::zeros((ipg * 6 + 1, out_channels / count));
                w0.slice_mut(s![..ipg * 6, ..]).assign(&group_weights(
                    &flat.mapv(|_| 0.0),
                    g,
                    count,
                ));
                let solved = system.solve(&w0, true).expect("enough rows");
                let truth = group_weights(&flat, g, count);
                let per = out_channels / count;
                for o in 0..per {
                    for f in 0..ipg * 6 {
                        assert!(
                            (solved[[f, o]] - truth[[f, o]]).abs() < 1e-3,
                            "weight {f},{o}"
                        );
                    }
                    assert!((solved[[ipg * 6, o]] - bias[g * per + o]).abs() < 1e-3);
                }
            }
        }
    }

    /// The normal equations do not depend on how the rows were batched: rows wait in a
    /// chunk until it is full (calibration's kept outputs and the refit's own passes cut the
    /// same samples into different batches). One batch of 6 images, or batches of 1, 2
    /// and 3, give the same solution bit for bit, with chunks of 50 rows (an image is 49) that
    /// straddle the batches, and with the default chunk that none fills.
    #[test]
    fn batching_does_not_change_the_normal_equations() {
        let mut rng = crate::symmetry::permute::SplitMix(3);
        let node = conv(1, &[1, 1], &[1, 1, 1, 1], &[1, 1]);
        let geom = ConvGeometry::of(&node, &[4, 3, 3, 3]).expect("a supported convolution");
        let x = ndarray::Array4::from_shape_fn((6, 3, 7, 7), |_| rng.uniform() as f32 - 0.5);
        let t = Array2::from_shape_fn((6 * 49, 4), |_| rng.uniform() - 0.5);
        let solve = |cuts: &[usize], chunk: usize| {
            let mut systems = Vec::new();
            for w in cuts.windows(2) {
                let batch = x.slice(s![w[0]..w[1], .., .., ..]).to_owned().into_dyn();
                let rows = t.slice(s![w[0] * 49..w[1] * 49, ..]).to_owned();
                geom.accumulate_in_chunks("conv", &batch, &rows, &mut systems, chunk)
                    .expect("accumulated");
            }
            let w0 = Array2::<f64>::zeros((28, 4));
            systems[0].solve(&w0, true).expect("enough rows")
        };
        let bits = |a: Array2<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for chunk in [50, CHUNK_ROWS] {
            let whole = bits(solve(&[0, 6], chunk));
            assert_eq!(whole, bits(solve(&[0, 1, 3, 6], chunk)), "chunk {chunk}");
            assert_eq!(whole, bits(solve(&[0, 5, 6], chunk)), "chunk {chunk}");
        }
    }

    /// Only dense and depthwise 2-D convolutions with explicit or no padding have a geometry.
    #[test]
    fn other_convolutions_have_no_geometry() {
        let plain = conv(1, &[1, 1], &[0, 0, 0, 0], &[1, 1]);
        assert!(ConvGeometry::of(&plain, &[8, 4, 3, 3]).is_some());
        // Two groups of two channels: neither dense nor depthwise.
        assert!(
            ConvGeometry::of(&conv(2, &[1, 1], &[0, 0, 0, 0], &[1, 1]), &[4, 2, 3, 3]).is_none()
        );
        // A 1-D or 3-D kernel.
        assert!(ConvGeometry::of(&plain, &[8, 4, 3]).is_none());
        let mut same = plain.clone();
        same.attribute.push(AttributeProto {
            name: Some("auto_pad".to_string()),
            s: Some(b"SAME_UPPER".to_vec()),
            ..Default::default()
        });
        assert!(ConvGeometry::of(&same, &[8, 4, 3, 3]).is_none());
    }
}
