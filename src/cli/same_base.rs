//! `merge --method task-arithmetic|ties|dare-linear|dare-ties|slerp|linear`: the same-base
//! merges (`mudsc::same_base`), optionally after putting every model in the first one's unit
//! order (`--align-first`).

use std::path::PathBuf;

use anyhow::Result;
use mudsc::merge::Method;
use mudsc::onnx::{Model, TensorData};
use mudsc::same_base::{Combine, SameBaseOptions, DIFFERENT_BASES};

use super::merge::{finish, first_samples, options, MergeArgs, Merged, Outputs};

pub fn execute(args: &mut MergeArgs, combine: Combine) -> Result<Merged> {
    refuse_permutation_options(args, combine)?;
    let outputs = Outputs::check(args)?;
    let started = std::time::Instant::now();
    let models = args
        .models
        .iter()
        .map(mudsc::onnx::load)
        .collect::<mudsc::Result<Vec<_>>>()?;
    let base = args.base.as_ref().map(mudsc::onnx::load).transpose()?;
    let mut protect: Vec<PathBuf> = models
        .iter()
        .chain(&base)
        .flat_map(|m| m.source_files())
        .collect();
    protect.extend(args.calib.iter().cloned());
    protect.extend(args.eval_data.iter().cloned());
    outputs.refuse_protected(args, &protect)?;
    let read_seconds = started.elapsed().as_secs_f64();
    let opts = SameBaseOptions {
        combine,
        weights: args.weights.clone(),
        lambda: args.lambda,
        density: args.density,
        t: args.t,
        seed: args.seed,
    };
    let calib = read_calib(args, &models[0])?;
    let (models, base, align_seconds) = if args.align_first {
        let calib = calib.as_deref().ok_or_else(|| {
            mudsc::Error::Usage("--align-first matches units on --calib: give it".into())
        })?;
        let clock = std::time::Instant::now();
        let (models, base) = align_first(args, models, base, calib)?;
        (models, base, Some(clock.elapsed().as_secs_f64()))
    } else {
        (models, base, None)
    };
    let (mut merged, mut report) = mudsc::same_base::merge(&models, base.as_ref(), &opts)?;
    report.aligned_first = args.align_first;
    warn_if_unrelated(&report.identity_weight_correlation, args.align_first);
    if let (Some(calib), true) = (&calib, args.repair_samples > 0) {
        let clock = std::time::Instant::now();
        let repair = options(args, Method::Avg, 0.5, None);
        let (layers, norms) = mudsc::merge::repair_merged(&models, &mut merged, calib, &repair)?;
        report.repaired_layers = layers;
        report.reset_batch_norms = norms;
        report
            .seconds
            .insert("repair".into(), clock.elapsed().as_secs_f64());
    }
    let saved = outputs.write(&merged, &args.output, &protect, &mut report.seconds)?;
    report.seconds.insert("read".into(), read_seconds);
    if let Some(s) = align_seconds {
        report.seconds.insert("align".into(), s);
    }
    let mut json = serde_json::to_value(&report)?;
    json["peak_rss_mib"] = mudsc::merge::peak_rss_mib().into();
    let card = |accuracy| {
        args.card
            .as_ref()
            .map(|_| super::card::render_same_base(args, &report, accuracy))
    };
    if let Err(e) = finish(args, &mut json, &protect, card) {
        saved.remove();
        return Err(e);
    }
    let total: f64 = report.seconds.values().sum();
    let summary = vec![format!(
        "merged {} models with {}{} over {} tensors ({} parameters; {} equal in all, {} not \
         float){} → {} in {total:.2}s",
        args.models.len(),
        combine.name(),
        if args.align_first {
            " after aligning them to the first"
        } else {
            ""
        },
        report.tensors_merged,
        report.parameters_merged,
        report.tensors_equal,
        report.tensors_not_float,
        if report.repaired_layers + report.reset_batch_norms > 0 {
            format!(
                ", repaired {} layers and {} BatchNorms",
                report.repaired_layers, report.reset_batch_norms
            )
        } else {
            String::new()
        },
        args.output.display()
    )];
    Ok(Merged { summary, json })
}

/// `--calib` (or the Python API's arrays) bound to the models' inputs, when given: it serves
/// `--align-first` and statistics repair.
fn read_calib(args: &mut MergeArgs, model: &Model) -> Result<Option<Vec<TensorData>>> {
    let Some(path) = args.calib.clone() else {
        return Ok(None);
    };
    let arrays = match args.calib_arrays.take() {
        Some(a) => {
            args.calib_arrays_given = true;
            a
        }
        None => mudsc::data::read(&path)?,
    };
    let mut calib = mudsc::data::into_inputs(arrays, model, &path)?;
    if let Some(n) = args.samples {
        calib = first_samples(&calib, n)?;
    }
    Ok(Some(calib))
}

/// The models (and the base) in the first model's unit order, by mudsc-align matching on
/// the calibration data.
fn align_first(
    args: &MergeArgs,
    models: Vec<Model>,
    base: Option<Model>,
    calib: &[TensorData],
) -> Result<(Vec<Model>, Option<Model>)> {
    let alpha = match args.alpha.parse::<f64>() {
        Ok(a) if (0.0..=1.0).contains(&a) => a,
        _ => {
            return Err(mudsc::Error::Usage(format!(
                "--alpha {} with --align-first: give a number in [0, 1]",
                args.alpha
            ))
            .into())
        }
    };
    let opts = options(args, Method::MudscAlign, alpha, None);
    let had_base = base.is_some();
    let mut all = models;
    all.extend(base);
    let mut progress = super::progress::Progress::default();
    let mut aligned =
        mudsc::merge::align_to_first(&all, calib, &opts, &mut |phase, done, total| {
            progress.update(phase, done, total)
        })?;
    progress.finish();
    // The aligned copies are model 0's graph: keep each input's file name for the report.
    for (a, m) in aligned.iter_mut().zip(&all) {
        a.path = m.path.clone();
    }
    let base = if had_base { aligned.pop() } else { None };
    Ok((aligned, base))
}

/// Same-base arithmetic on models whose units are in unrelated orders averages unrelated
/// units: say so (the merge still runs: the user may know better).
fn warn_if_unrelated(correlations: &[Option<f64>], aligned: bool) {
    let low = correlations
        .iter()
        .flatten()
        .copied()
        .fold(f64::INFINITY, f64::min);
    if low < DIFFERENT_BASES {
        eprintln!(
            "warning: the models do not look fine-tuned from one base (weights correlate {low:.3} \
             unit for unit{}): their units are likely in different orders, and entry-by-entry \
             arithmetic mixes unrelated units; {}",
            if aligned { " after alignment" } else { "" },
            if aligned {
                "a permutation merge (--method mudsc-zip) may serve better"
            } else {
                "add --align-first (with --calib) to match units first, or use a permutation \
                 method (--method mudsc-zip)"
            }
        );
    }
}

/// The permutation merge's options mean nothing here: refused rather than ignored.
fn refuse_permutation_options(args: &MergeArgs, combine: Combine) -> Result<()> {
    let given = [
        ("--zip-until", args.zip_until.is_some()),
        ("--stats", !args.stats.is_empty()),
        ("--calib-labels", args.calib_labels.is_some()),
    ];
    if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
        return Err(mudsc::Error::Usage(format!(
            "{flag} applies to the permutation methods, not to --method {}",
            combine.name()
        ))
        .into());
    }
    Ok(())
}
