//! `merge --card` and `merge --eval-data`: the command's options and files turned into the
//! model card's inputs (`mudsc::card`), and the accuracy lines scored as `mudsc eval` scores.

use std::path::{Path, PathBuf};

use anyhow::Result;
use mudsc::card::{Accuracy, Card, Input, SameBaseCard};
use mudsc::merge::{AlphaChoice, MergeReport};

use super::merge::MergeArgs;

/// The merged model, then every input model, scored on `data` (file names, not paths, name
/// them).
pub fn accuracy(args: &MergeArgs, data: &Path) -> Result<Accuracy> {
    let mut models: Vec<PathBuf> = vec![args.output.clone()];
    models.extend(args.models.iter().cloned());
    let mut eval = super::eval::EvalArgs::for_models(
        models.clone(),
        data.to_path_buf(),
        args.eval_labels.clone(),
        args.tasks.clone(),
        args.backend.clone(),
    );
    let scores = super::eval::scores(&mut eval)?;
    let names = models.iter().map(|p| Input::file(p).name);
    Ok(Accuracy {
        data: Input::file(data),
        scores: names.zip(scores.into_iter().map(|(_, r)| r)).collect(),
    })
}

/// The card's markdown.
pub fn render(
    args: &MergeArgs,
    report: &MergeReport,
    choice: Option<&AlphaChoice>,
    accuracy: Option<Accuracy>,
) -> String {
    let calibration = if args.calib_arrays_given {
        Input {
            name: "numpy arrays".into(),
            sha256: None,
        }
    } else {
        match &args.calib {
            Some(c) => Input::file(c),
            None => Input {
                name: "none".into(),
                sha256: None,
            },
        }
    };
    let mut options: Vec<(&'static str, String)> = Vec::new();
    if let Some(c) = choice {
        options.push((
            "alpha choice",
            format!(
                "auto: best {} on {} held-out samples",
                c.criterion, c.held_out
            ),
        ));
    }
    options.extend([
        ("zip a / b", format!("{} / {}", args.zip_a, args.zip_b)),
        ("seed", args.seed.to_string()),
        ("max sweeps", args.max_sweeps.to_string()),
        ("patience", args.patience.to_string()),
        ("sweep tolerance", args.tol.to_string()),
        ("repair samples", args.repair_samples.to_string()),
        ("repair passes", args.repair_passes.to_string()),
        ("output refit samples", args.output_fit.to_string()),
        (
            "refit layers",
            format!("{:?}", args.refit_layers).to_lowercase(),
        ),
        ("tap positions", args.tap_positions.to_string()),
        ("taps", format!("{:?}", args.taps).to_lowercase()),
    ]);
    if let Some(z) = &args.zip_until {
        options.push(("zip until", z.clone()));
    }
    if args.width != 1.0 {
        options.push(("width", args.width.to_string()));
    }
    if report.method == mudsc::merge::Method::Cca {
        options.push(("cca ridge", args.cca_ridge.to_string()));
    }
    if let Some(n) = args.samples {
        options.push(("calibration samples used", n.to_string()));
    }
    if !args.stats.is_empty() {
        let shards: Vec<String> = args.stats.iter().map(|p| Input::file(p).name).collect();
        options.push(("statistics shards", shards.join(", ")));
    }
    Card {
        output: Input::file(&args.output).name,
        models: args.models.iter().map(|p| Input::file(p)).collect(),
        calibration,
        options,
        report,
        accuracy,
    }
    .render()
}

/// The card of a same-base merge.
pub fn render_same_base(
    args: &MergeArgs,
    report: &mudsc::same_base::SameBaseReport,
    accuracy: Option<Accuracy>,
) -> String {
    let calibration = match (&args.calib, args.calib_arrays_given) {
        (_, true) => Some(Input {
            name: "numpy arrays".into(),
            sha256: None,
        }),
        (Some(c), false) => Some(Input::file(c)),
        (None, false) => None,
    };
    SameBaseCard {
        output: Input::file(&args.output).name,
        models: args.models.iter().map(|p| Input::file(p)).collect(),
        base: args.base.as_deref().map(Input::file),
        calibration,
        report,
        accuracy,
    }
    .render()
}
