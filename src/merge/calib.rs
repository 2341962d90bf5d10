//! Calibration: run every model on the calibration data with the groups' taps as extra
//! outputs, and stream each group's moments over the concatenated units of all models
//! (model-major: model 0's units first). Every non-unit element of a tap is a sample.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, BackendKind, BackendOptions, Output};
use crate::stats::Moments;

use super::taps::{unit_width_of, UnitMoments};

/// Bytes of engine outputs (taps of every model) one calibration batch may hold: on 224²
/// models a batch of 64 with every layer tapped held gigabytes.
pub const BATCH_BYTES: usize = 256 << 20;

/// How calibration cuts the data into batches.
#[derive(Clone, Copy)]
pub struct Batching {
    /// The largest batch (`--batch`).
    pub batch: usize,
    /// An upper bound of one sample's outputs in one model (all its activations): the first
    /// batch is cut to fit `bytes` by it, before any output has been measured.
    pub sample_bytes: usize,
    /// Bytes one batch's outputs (the taps of every model) may take
    /// (`passes::batch_bytes`).
    pub bytes: usize,
    /// Bytes the engines' activations may take for one batch, bounded by `sample_bytes`
    /// (`None`: unbounded). Under a `--max-memory` that binds, ONNX Runtime's arenas grew with
    /// batches sized by their outputs alone: a ViT-B pair's later passes took batches of 55
    /// images and the engines went from 1.1 to 3.4 GB.
    pub activations: Option<usize>,
}

impl Batching {
    /// The first batch: at most 4 samples, fewer where even the bound says they would not fit
    /// (a ViT-B pair's four first samples with every tap and repair's endpoints: 0.9 GB of
    /// outputs, and the engines' arenas sized for them, raised calibration's peak by 0.5 GB).
    fn first(&self, models: usize) -> usize {
        let per_sample = self.sample_bytes.saturating_mul(models).max(1);
        self.cap(
            (self.bytes / per_sample).clamp(1, self.batch.clamp(1, 4)),
            models,
        )
    }

    /// The batch after one whose outputs took `per_sample` bytes a sample.
    fn next(&self, per_sample: usize, models: usize) -> usize {
        self.cap(
            (self.bytes / per_sample.max(1)).clamp(1, self.batch.max(1)),
            models,
        )
    }

    /// `size` cut to what `activations` allows every model's engine (at least one sample).
    fn cap(&self, size: usize, models: usize) -> usize {
        match self.activations {
            Some(bytes) => {
                let per_sample = self.sample_bytes.saturating_mul(models).max(1);
                size.min((bytes / per_sample).max(1))
            }
            None => size,
        }
    }
}

/// Each model's outputs of one batch, by name, read where the engine left them.
type Outputs = Vec<HashMap<String, Output>>;

/// Where a group is read in each model.
pub struct Tap {
    pub group: usize,
    /// The tap value's name in each model.
    pub names: Vec<String>,
    pub axis: usize,
    pub width: usize,
    /// Tap positions kept per calibration sample (0: all).
    pub positions: usize,
}

/// Values whose per-unit statistics (mean and standard deviation) are gathered on the same
/// passes over the first `samples` inputs: statistics repair's endpoint taps, which then cost
/// no passes of their own. `names[i]` are model i's names; results are keyed by `names[0]`.
pub struct Side {
    pub names: Vec<Vec<String>>,
    /// Per value (aligned with `names[0]`): its units' axis, `None` for the rank's default.
    pub axes: Vec<Option<usize>>,
    pub samples: usize,
    /// Values kept whole, batch by batch, each over the first `keep_samples` inputs (aligned
    /// with `keep[0]`; `keep[i]`: model i's names; results keyed by `keep[0]`): the output
    /// refit's targets, which then cost no endpoint passes of their own.
    pub keep: Vec<Vec<String>>,
    pub keep_samples: Vec<usize>,
}

impl Side {
    /// No side values: a pass that gathers only the groups' moments.
    pub fn none() -> Side {
        Side {
            names: Vec::new(),
            axes: Vec::new(),
            samples: 0,
            keep: Vec::new(),
            keep_samples: Vec::new(),
        }
    }
}

/// Per model: each side value's moments, by model-0 name.
pub type SideMoments = Vec<HashMap<String, UnitMoments>>;

/// Bytes of kept values beyond which calibration stops keeping them (the refit then runs the
/// endpoints itself, streaming): a classifier's logits are kilobytes per sample, a language
/// model's per-token vocabulary scores are not. `--refit-layers auto` refits every layer only
/// where their outputs fit in it.
pub const KEEP_BYTES: usize = 1 << 30;

/// Kept values (`Side::keep`): the calibration batches they cover, as sample ranges, and per
/// model each value's outputs on them, in order, by model-0 name. Empty when nothing was kept.
#[derive(Default)]
pub struct Kept {
    pub ranges: Vec<(usize, usize)>,
    pub values: Vec<HashMap<String, Vec<TensorData>>>,
}

/// Moments per group id, and the side values' unit moments.
#[allow(clippy::too_many_arguments)]
pub fn collect(
    models: &[Model],
    taps: &[Tap],
    side: &Side,
    inputs: &[TensorData],
    batching: Batching,
    backend: BackendKind,
    options: &BackendOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(HashMap<usize, Moments>, SideMoments, Kept)> {
    let n = models.len();
    // Each group's moments are made at its first batch, once the engines are open: building
    // an engine briefly holds its model two or three times over, and a ViT-B pass's moments
    // (0.8 GB, zeroed) beside that made the pass's peak.
    let mut moments: HashMap<usize, Moments> = HashMap::new();
    let mut side_moments: SideMoments = vec![HashMap::new(); n];
    let mut kept = Kept {
        ranges: Vec::new(),
        values: vec![HashMap::new(); n],
    };
    let (mut keeping, mut kept_bytes) = (
        side.keep_samples.iter().any(|&n| n > 0) && !side.keep.is_empty(),
        0,
    );
    // Sessions with the side values as extra outputs serve the batches that hold side
    // samples; the rest run without them (and without the kept values no later batch keeps),
    // so that the engine keeps its fusions there.
    let open = |with_side: bool| -> Result<Vec<Box<dyn crate::runtime::Session>>> {
        models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut extra: Vec<String> = taps.iter().map(|t| t.names[i].clone()).collect();
                if with_side {
                    extra.extend(side.names.get(i).into_iter().flatten().cloned());
                }
                // A kept value only while a batch still keeps it: a convolution's outputs
                // over its few samples are not copied out of every later batch.
                extra.extend(
                    side.keep
                        .get(i)
                        .into_iter()
                        .flatten()
                        .zip(&side.keep_samples)
                        .filter(|&(_, &n)| with_side || n > side.samples)
                        .map(|(name, _)| name.clone()),
                );
                let mut seen = std::collections::HashSet::new();
                extra.retain(|e| seen.insert(e.clone()));
                let session = open_session(backend, m, &extra, options);
                // The engine's parse of the model is freed once it is built, but kept by the
                // heap unless handed back.
                super::process_memory::give_back_freed_memory();
                session
            })
            .collect()
    };
    let mut with_side = if side.samples > 0 {
        Some(open(true)?)
    } else {
        None
    };
    super::process_memory::trace_memory("calibration sessions open");
    let mut plain: Option<Vec<Box<dyn crate::runtime::Session>>> = None;
    let total = crate::data::sample_count(inputs);
    let mut by_group: HashMap<usize, Vec<&Tap>> = HashMap::new();
    for t in taps {
        by_group.entry(t.group).or_default().push(t);
    }
    let spread = crate::stats::spread_cores().is_some();
    // Inference of the next batch runs on a second thread while this one folds the previous
    // batch into the statistics: the engine and the Σxxᵀ GEMM each keep a core busy.
    let folded = std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, usize, Outputs)>>(0);
        scope.spawn(move || {
            let mut start = 0;
            // The first batch is small; its outputs size the rest so that a batch's taps stay
            // within the budget (two batches are alive at once: one folded, one computed).
            let mut size = batching.first(n);
            while start < total {
                // A batch never straddles the end of the side samples: side values are
                // taken whole, whatever axis holds their batch (a sequence-first
                // transformer's [L, N, D]).
                let mut end = (start + size).min(total);
                if start < side.samples {
                    end = end.min(side.samples);
                }
                let slice: Vec<TensorData> =
                    inputs.iter().map(|t| t.slice_rows(start, end)).collect();
                let sessions = match (&mut with_side, start < side.samples) {
                    (Some(s), true) => s,
                    _ => {
                        // The side sessions go first: both sets alive at once would hold
                        // every model twice more.
                        with_side = None;
                        if plain.is_none() {
                            match open(false) {
                                Ok(s) => {
                                    plain = Some(s);
                                    super::process_memory::trace_memory(
                                        "calibration sessions reopened",
                                    );
                                }
                                Err(e) => {
                                    let _ = tx.send(Err(e));
                                    return;
                                }
                            }
                        }
                        plain.as_mut().expect("opened above")
                    }
                };
                let outs: Result<Outputs> = sessions
                    .iter_mut()
                    .map(|s| {
                        let out = s.run_lent(&slice)?;
                        Ok(s.output_names().iter().cloned().zip(out).collect())
                    })
                    .collect();
                if let Ok(o) = &outs {
                    let bytes: usize = o.iter().flat_map(|m| m.values()).map(Output::bytes).sum();
                    let per_sample = (bytes / (end - start).max(1)).max(1);
                    if super::process_memory::traced() {
                        eprintln!("memory: batch {start}..{end}: outputs {} MiB", bytes >> 20);
                    }
                    size = batching.next(per_sample, n);
                }
                let failed = outs.is_err();
                if tx.send(outs.map(|o| (start, end, o))).is_err() || failed {
                    return;
                }
                start = end;
            }
        });
        for received in rx {
            let (start, end, per_model) = received?;
            if start < side.samples {
                for (i, outs) in per_model.iter().enumerate() {
                    for ((name, key), axis) in
                        side.names[i].iter().zip(&side.names[0]).zip(&side.axes)
                    {
                        let Some(v) = outs.get(name) else {
                            continue;
                        };
                        side_moments[i]
                            .entry(key.clone())
                            .or_insert_with(|| {
                                UnitMoments::along(unit_width_of(&v.shape(), *axis), *axis)
                            })
                            .add_f32(v.f32().view(), name)?;
                    }
                }
            }
            if keeping && side.keep_samples.iter().any(|&n| start < n) {
                // Whole batches: their outputs' batch axis need not be the first.
                for (i, outs) in per_model.iter().enumerate() {
                    for ((name, key), _) in side.keep[i]
                        .iter()
                        .zip(&side.keep[0])
                        .zip(&side.keep_samples)
                        .filter(|(_, &n)| start < n)
                    {
                        let v = outs.get(name).ok_or_else(|| Error::Backend {
                            backend: backend.name(),
                            reason: format!("kept value '{name}' missing from the outputs"),
                        })?;
                        kept_bytes += v.bytes();
                        kept.values[i]
                            .entry(key.clone())
                            .or_default()
                            .push(v.to_tensor());
                    }
                }
                kept.ranges.push((start, end));
                if kept_bytes > KEEP_BYTES {
                    keeping = false;
                    kept = Kept::default();
                }
            }
            fold_taps(&mut moments, &by_group, &per_model, backend, spread)?;
            progress(end, total);
            super::process_memory::trace_memory("calibration batch");
        }
        Ok(())
    });
    super::taps::release_buffers();
    folded?;
    for t in taps {
        moments
            .entry(t.group)
            .or_insert_with(|| Moments::new(n * t.width));
    }
    Ok((moments, side_moments, kept))
}

/// Folds one batch's taps into their groups' moments (made at the first batch). Groups are
/// independent sums, so with `spread` (where `stats::spread_cores` allows) they are folded
/// side by side: on sixteen cores one thread folded every group while the engine waited for
/// it (ResNet-50: calibration 29.6 s against 4 s of bare passes and 5 s of Σxxᵀ at the
/// cores' peak). A group's taps keep their order, so each group gets the same additions in
/// the same order whatever the cores: the moments do not depend on them.
fn fold_taps(
    moments: &mut HashMap<usize, Moments>,
    by_group: &HashMap<usize, Vec<&Tap>>,
    per_model: &Outputs,
    backend: BackendKind,
    spread: bool,
) -> Result<()> {
    use rayon::prelude::*;
    let n = per_model.len();
    for (&group, taps) in by_group {
        moments
            .entry(group)
            .or_insert_with(|| Moments::new(n * taps[0].width));
    }
    let fold = |(m, taps): (&mut Moments, &Vec<&Tap>)| -> Result<()> {
        for t in taps {
            let values = per_model
                .iter()
                .zip(&t.names)
                .map(|(outs, name)| {
                    outs.get(name)
                        .map(Output::f32)
                        .ok_or_else(|| Error::Backend {
                            backend: backend.name(),
                            reason: format!("tap '{name}' missing from the outputs"),
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            let views: Vec<_> = values.iter().map(|v| v.view()).collect();
            super::taps::add_joint(m, &views, t.axis, t.width, &t.names, t.positions)?;
        }
        Ok(())
    };
    let work: Vec<_> = moments
        .iter_mut()
        .filter_map(|(g, m)| by_group.get(g).map(|taps| (m, taps)))
        .collect();
    if spread {
        work.into_par_iter().try_for_each(fold)
    } else {
        work.into_iter().try_for_each(fold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two models' outputs of one batch: two [4, 3, 5, 5] maps and a [6, 2] matrix each.
    fn outputs(batch: usize) -> Outputs {
        let value = |model: usize, shape: &[usize]| {
            let mut k = 0.0f32;
            TensorData::F32(ndarray::ArrayD::from_shape_fn(shape.to_vec(), |_| {
                k += 1.0;
                (k * 0.37 + (model * 7 + batch * 3) as f32).sin() * (1.0 + k / 50.0)
            }))
        };
        (0..2)
            .map(|model| {
                HashMap::from([
                    (format!("map{model}"), value(model, &[4, 3, 5, 5])),
                    (format!("alt{model}"), value(model + 2, &[4, 3, 5, 5])),
                    (format!("mat{model}"), value(model, &[6, 2])),
                ])
                .into_iter()
                .map(|(name, v)| (name, Output::Tensor(v)))
                .collect()
            })
            .collect()
    }

    #[test]
    fn groups_folded_side_by_side_give_the_same_moments_bit_for_bit() {
        let tap = |group, name: &str, axis, width| Tap {
            group,
            names: vec![format!("{name}0"), format!("{name}1")],
            axis,
            width,
            positions: 0,
        };
        // Group 0 is read at two taps (their order within the group matters to the bits),
        // group 1 at one.
        let taps = [
            tap(0, "map", 1, 3),
            tap(1, "mat", 1, 2),
            tap(0, "alt", 1, 3),
        ];
        let mut by_group: HashMap<usize, Vec<&Tap>> = HashMap::new();
        for t in &taps {
            by_group.entry(t.group).or_default().push(t);
        }
        let fold = |spread| {
            let mut moments = HashMap::new();
            for batch in 0..3 {
                fold_taps(
                    &mut moments,
                    &by_group,
                    &outputs(batch),
                    BackendKind::Tract,
                    spread,
                )
                .unwrap();
            }
            moments
        };
        let (one, side_by_side) = (fold(false), fold(true));
        assert_eq!(one.len(), 2);
        for (g, m) in &one {
            let p = &side_by_side[g];
            assert_eq!(m.count, p.count, "group {g}");
            // Every sample of every tap counted: 2 taps × 4·25 positions, or 6 rows; 3 batches.
            assert_eq!(m.count, if *g == 0 { 600 } else { 18 });
            let bits = |a: &ndarray::Array2<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&m.outer.to_full()),
                bits(&p.outer.to_full()),
                "group {g}"
            );
            assert_eq!(m.sum, p.sum, "group {g}");
            assert_eq!(m.correlation(), p.correlation(), "group {g}");
        }
        // A missing tap is an error naming it, on either path.
        let mut moments = HashMap::new();
        let mut outs = outputs(0);
        outs[1].remove("mat1");
        for spread in [false, true] {
            let e = fold_taps(&mut moments, &by_group, &outs, BackendKind::Tract, spread);
            assert!(e.unwrap_err().to_string().contains("mat1"));
        }
    }

    fn batching(activations: Option<usize>) -> Batching {
        Batching {
            batch: 64,
            sample_bytes: 10 << 20,
            bytes: 64 << 20,
            activations,
        }
    }

    #[test]
    fn batches_fit_the_outputs_and_the_engines_activations() {
        // Unbounded activations: the first batch is at most 4 (and fits 64 MiB at 10 MiB a
        // sample in each of two models: 3), later ones fit their measured outputs.
        let free = batching(None);
        assert_eq!(free.first(2), 3);
        assert_eq!(free.next(1 << 20, 2), 64);
        assert_eq!(free.next(2 << 20, 2), 32);
        // Outputs of one sample beyond the batch: still one sample.
        assert_eq!(free.next(100 << 20, 2), 1);
        // 40 MiB for the engines' activations: two samples of 20 MiB (two models).
        let capped = batching(Some(40 << 20));
        assert_eq!(capped.first(2), 2);
        assert_eq!(capped.next(1 << 20, 2), 2);
        // Below one sample: one.
        assert_eq!(batching(Some(1)).next(1 << 20, 2), 1);
        // `--batch 0` is read as 1, not a panic.
        let zero = Batching { batch: 0, ..free };
        assert_eq!(zero.next(1, 2), 1);
        assert_eq!(zero.first(2), 1);
    }
}
