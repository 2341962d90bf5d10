use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use mudsc::data;
use mudsc::merge::{merge, MergeOptions, Method};
use mudsc::onnx::{ExternalData, SaveOptions};

use super::BackendArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    Avg,
    Rebasin,
    ActAlign,
    Zipit,
    WeightZip,
    MudscAlign,
    MudscZip,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Method {
        match m {
            MethodArg::Avg => Method::Avg,
            MethodArg::Rebasin => Method::Rebasin,
            MethodArg::ActAlign => Method::ActAlign,
            MethodArg::Zipit => Method::Zipit,
            MethodArg::WeightZip => Method::WeightZip,
            MethodArg::MudscAlign => Method::MudscAlign,
            MethodArg::MudscZip => Method::MudscZip,
        }
    }
}

/// Below this many calibration samples, activation statistics are too noisy to match by (the
/// bundled pairs lose most of their merge gain under 32); the merge warns.
const MIN_CALIBRATION_SAMPLES: usize = 32;

#[derive(Args)]
pub struct MergeArgs {
    /// The models to merge (same architecture; the first one gives names and opsets).
    #[arg(required = true, num_args = 2..)]
    pub(super) models: Vec<PathBuf>,
    /// Output model.
    #[arg(long, short)]
    pub(super) output: PathBuf,
    /// Calibration inputs (.npz keyed by graph input name, .npy, .pb or test_data_set dir).
    #[arg(long)]
    pub(super) calib: PathBuf,
    #[arg(long, value_enum, default_value_t = MethodArg::MudscZip)]
    pub(super) method: MethodArg,
    /// Weight-space share of the dual similarity (0 = activations only, 1 = weights only), or
    /// `auto`: try 0.1 … 0.9 on a held-out fifth of the calibration data (accuracy when it has
    /// --calib-labels, else top-1 agreement with the endpoints) and keep the best.
    #[arg(long, default_value = "0.5")]
    pub(super) alpha: String,
    /// Key of integer labels in the calibration file, for `--alpha auto` by accuracy.
    #[arg(long)]
    pub(super) calib_labels: Option<String>,
    /// Zip: similarity decay of merged clusters.
    #[arg(long, default_value_t = 0.5)]
    pub(super) zip_a: f64,
    /// Zip: same-model merge budget factor.
    #[arg(long, default_value_t = 1.0)]
    pub(super) zip_b: f64,
    /// Most sweeps of the iterative loop (it also stops after 5 sweeps without improvement).
    #[arg(long, default_value_t = 100)]
    pub(super) max_sweeps: usize,
    /// Improvement of the iterative loop's mean merge value, relative, below which a sweep
    /// counts as no improvement (its matchings are still kept); 0: any rise counts.
    #[arg(long, default_value_t = crate::merge::DEFAULT_TOL)]
    pub(super) tol: f64,
    /// Seed of the group order in the iterative loop.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// Write a JSON report (per group: width, similarity, merge value; time per phase).
    #[arg(long)]
    pub(super) report: Option<PathBuf>,
    /// Store the initializers in one external data file beside the output.
    #[arg(long)]
    pub(super) external_data: bool,
    /// Statistics repair (REPAIR folded into Conv/Gemm weights, BatchNorm reset) on this many
    /// calibration samples; 0 turns it off.
    #[arg(long, default_value_t = 256)]
    pub(super) repair_samples: usize,
    /// Passes of the merged model for statistics repair: each runs the model with every
    /// corrected layer normalised in the graph (BatchNorms in training mode) and folds the
    /// measured statistics into the weights; 0 = one pass per layer, in graph order (the
    /// sequential scheme, as slow as the model is deep).
    #[arg(long, default_value_t = 1)]
    pub(super) repair_passes: usize,
    /// Samples per batch of repair's pass over the merged model. One batch holding all
    /// --repair-samples makes it exactly the sequential scheme; a smaller one needs less
    /// memory on large models and pools per-batch statistics (within 0.5 points on the
    /// bundled pairs).
    #[arg(long, default_value_t = 256)]
    pub(super) repair_batch: usize,
    /// Statistics repair also corrects token layers (a transformer's MatMul + bias Add, units
    /// on the last axis); off by default (+7 points on one bundled ViT pair, −2 on the other)
    #[arg(long)]
    pub(super) repair_token_layers: bool,
    /// Where groups are observed: `tokens` also observes a group seen at one token per sample
    /// (a class token) at every token tensor a layer reads; `one`: one tap per group (the
    /// reference)
    #[arg(long, value_enum, default_value_t = super::TapMode::Tokens)]
    pub(super) taps: super::TapMode,
    /// Tap positions (pixels, tokens) used per calibration sample, evenly spread; 0 = all.
    /// Cuts the statistics arithmetic on large maps (e.g. 64 on 224² models).
    #[arg(long, default_value_t = 0)]
    pub(super) tap_positions: usize,
    /// Memory the activation statistics may hold at once (bytes, or with K/M/G: 512M, 8G);
    /// when all groups' Σxxᵀ exceed it, the groups are calibrated in several passes over the
    /// data. Default: half of the machine's RAM.
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE")]
    pub(super) max_memory: Option<u64>,
    /// Partial zip: merge only up to a node (a node name, or the name of the value it makes)
    /// or a depth (the first K weight layers; -K: all but the last K), and keep each model's
    /// own layers after it, fed through its unmerge. The merged model then has one copy of
    /// every output per model, `<output>.m0`, `<output>.m1`, …
    #[arg(long, allow_hyphen_values = true, value_name = "NODE|DEPTH")]
    pub(super) zip_until: Option<String>,
    /// Only use the first N calibration samples.
    #[arg(long)]
    pub(super) samples: Option<usize>,
    /// Activation statistics made by `mudsc stats` (shards of the calibration data, possibly
    /// computed elsewhere), summed and used instead of calibrating; --calib then gives the
    /// input shapes and statistics repair's samples only.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub(super) stats: Vec<PathBuf>,
    /// Write a model card (markdown) describing the merge: inputs with sha256, method and
    /// options, groups merged and weight axes fixed, time per phase, and accuracies with
    /// --eval-data.
    #[arg(long, value_name = "CARD.md")]
    pub card: Option<PathBuf>,
    /// Labelled data on which the merged model and its inputs are scored after the merge (as
    /// `mudsc eval`), for the card's accuracy lines and the report's `accuracy`.
    #[arg(long, value_name = "DATA")]
    pub eval_data: Option<PathBuf>,
    /// Key of the integer labels in --eval-data.
    #[arg(long, default_value = "labels", requires = "eval_data")]
    pub eval_labels: String,
    /// Tasks for --eval-data's per-task accuracy, e.g. 0-4,5-9.
    #[arg(long, value_parser = super::eval::parse_tasks, requires = "eval_data")]
    pub tasks: Option<super::eval::Tasks>,
    #[command(flatten)]
    pub(super) backend: BackendArgs,
    /// Calibration arrays given in memory (the Python API's numpy arrays), used instead of
    /// reading `--calib`, which then only names them in messages.
    #[arg(skip)]
    pub calib_arrays: Option<data::NamedArrays>,
    /// Whether `calib_arrays` were given (they are consumed by the merge).
    #[arg(skip)]
    pub calib_arrays_given: bool,
}

/// What a merge did: its report, and the report as `--report` writes it (`alpha_auto` and
/// `accuracy` added when there are).
pub struct Merged {
    pub report: mudsc::merge::MergeReport,
    pub json: serde_json::Value,
}

pub fn run(mut args: MergeArgs) -> Result<()> {
    let Merged { report, .. } = execute(&mut args)?;
    println!(
        "merged {} models with {} (α {}) over {} groups, {} calibration samples on {} → {}",
        args.models.len(),
        report.method.name(),
        report.alpha,
        report.groups.len(),
        report.calibration_samples,
        report.engine,
        args.output.display()
    );
    if let Some(t) = &report.partial {
        println!(
            "partial zip: {} trunk nodes merged up to '{}', {} remainder nodes kept per model, \
             {} values unmerged",
            t.trunk_nodes,
            t.cut_node,
            t.remainder_nodes,
            t.cut_values.len()
        );
    }
    let total: f64 = report.seconds.values().sum();
    let phases: Vec<String> = report
        .seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}s"))
        .collect();
    println!(
        "time {total:.2}s ({}), peak memory {:.0} MiB",
        phases.join(", "),
        report.peak_rss_mib
    );
    Ok(())
}

/// The whole merge: outputs checked, models and calibration read, merged, written (the model,
/// then `--report`); nothing on stdout (`mudsc.merge()` in Python returns `json`).
pub fn execute(args: &mut MergeArgs) -> Result<Merged> {
    let alpha: Option<f64> = match args.alpha.as_str() {
        "auto" => None,
        v => match v.parse::<f64>() {
            Ok(a) if (0.0..=1.0).contains(&a) => Some(a),
            _ => {
                return Err(
                    mudsc::Error::Usage(format!("--alpha {v} is not 'auto' or in [0, 1]")).into(),
                )
            }
        },
    };
    for (flag, v) in [("--zip-a", args.zip_a), ("--zip-b", args.zip_b)] {
        if !v.is_finite() || v < 0.0 {
            return Err(
                mudsc::Error::Usage(format!("{flag} {v} must be a finite number ≥ 0")).into(),
            );
        }
    }
    let save = SaveOptions {
        external_data: if args.external_data {
            ExternalData::Always(None)
        } else {
            ExternalData::Auto
        },
        protect: Vec::new(),
    };
    // Every output is checked before any work (directories, special files, one file under two
    // names), so that a refusal costs nothing and nothing is overwritten by another output.
    // Without --external-data a model over 2 GiB still gets `<output>.data`: no other output
    // may take that name either.
    let always = SaveOptions {
        external_data: ExternalData::Always(None),
        protect: Vec::new(),
    };
    let data_file = mudsc::onnx::data_file_for(&args.output, &always);
    let mut outputs: Vec<(&str, &std::path::Path)> = vec![("-o", args.output.as_path())];
    if let Some(d) = &data_file {
        outputs.push(("the external data file", d.as_path()));
    }
    if let Some(r) = &args.report {
        outputs.push(("--report", r.as_path()));
    }
    if let Some(c) = &args.card {
        outputs.push(("--card", c.as_path()));
    }
    mudsc::atomic::refuse_same_outputs(&outputs)?;
    for (_, out) in &outputs {
        mudsc::atomic::check_output(out, &[])?;
    }
    // Read only after the merge: a missing file must not cost the merge first.
    if let Some(p) = args.eval_data.as_ref().filter(|p| !p.exists()) {
        return Err(mudsc::Error::Data {
            path: p.clone(),
            reason: "no such file or directory".into(),
        }
        .into());
    }
    let started = std::time::Instant::now();
    let zip_until = args
        .zip_until
        .as_deref()
        .map(str::parse::<mudsc::merge::Cut>)
        .transpose()?;
    let models = args
        .models
        .iter()
        .map(mudsc::onnx::load)
        .collect::<mudsc::Result<Vec<_>>>()?;
    let mut arrays = match args.calib_arrays.take() {
        Some(a) => {
            args.calib_arrays_given = true;
            a
        }
        None => data::read(&args.calib)?,
    };
    let mut labels = match &args.calib_labels {
        Some(key) => Some(
            arrays
                .take(key)
                .and_then(|t| t.to_labels())
                .ok_or_else(|| mudsc::Error::Data {
                    path: args.calib.clone(),
                    reason: format!("no integer labels under '{key}'"),
                })?,
        ),
        None => None,
    };
    let mut protect: Vec<PathBuf> = models.iter().flat_map(|m| m.source_files()).collect();
    protect.push(args.calib.clone());
    protect.extend(args.stats.iter().cloned());
    protect.extend(args.eval_data.iter().cloned());
    if alpha.is_none() && !args.stats.is_empty() {
        return Err(mudsc::Error::Usage(
            "--alpha auto calibrates on part of --calib and scores on the rest: it cannot use \
             --stats"
                .into(),
        )
        .into());
    }
    for (what, out) in &outputs {
        // The data file an inline model might get is checked at save time, if it comes to it.
        if args.external_data || *what != "the external data file" {
            mudsc::atomic::refuse_protected(out, &protect)?;
        }
    }
    let mut calib = data::bind_inputs(&arrays, &models[0], &args.calib)?;
    if let Some(n) = args.samples {
        if n == 0 {
            return Err(mudsc::Error::Usage("--samples must be at least 1".into()).into());
        }
        calib = calib
            .iter()
            .map(|t| t.slice_rows(0, n.min(t.shape()[0])))
            .collect();
        if let Some(l) = labels.as_mut() {
            l.truncate(n);
        }
    }
    let samples = data::sample_count(&calib);
    let by_activations = !matches!(
        args.method,
        MethodArg::Avg | MethodArg::Rebasin | MethodArg::WeightZip
    );
    if by_activations && samples < MIN_CALIBRATION_SAMPLES {
        eprintln!(
            "warning: {samples} calibration sample(s): unit correlations estimated from so few \
             are mostly noise and the merge will be poor; use at least \
             {MIN_CALIBRATION_SAMPLES} (ideally as many as the widest layer has units)"
        );
    }
    let read_seconds = started.elapsed().as_secs_f64();
    let opts = MergeOptions {
        method: args.method.into(),
        alpha: alpha.unwrap_or(0.5),
        zip_a: args.zip_a,
        zip_b: args.zip_b,
        seed: args.seed,
        backend: args.backend.kind(),
        backend_options: args.backend.options(),
        // Calibration streams its taps: batches of 64 keep the engine's activations small
        // at no cost in accuracy (statistics are exact sums over any batching).
        batch: args.backend.batch.min(64),
        repair_samples: args.repair_samples,
        repair_passes: args.repair_passes,
        repair_batch: args.repair_batch.max(1),
        repair_token_layers: args.repair_token_layers,
        tap_positions: args.tap_positions,
        token_taps: args.taps == super::TapMode::Tokens,
        max_memory: args.max_memory.or_else(crate::merge::half_of_ram),
        zip_until,
        max_sweeps: args.max_sweeps.max(1),
        tol: if args.tol.is_finite() {
            args.tol.max(0.0)
        } else {
            0.0
        },
        ..Default::default()
    };
    let mut opts = opts;
    if !args.stats.is_empty() {
        let shards = args
            .stats
            .iter()
            .map(|p| Ok((p.clone(), mudsc::merge::Stats::load(p)?)))
            .collect::<mudsc::Result<Vec<_>>>()?;
        opts.stats = Some(std::sync::Arc::new(mudsc::merge::Stats::sum(shards)?));
    }
    let mut choice = None;
    if alpha.is_none() {
        let grid: Vec<f64> = (1..10).map(|k| k as f64 / 10.0).collect();
        let c = mudsc::merge::choose_alpha(&models, &calib, labels.as_deref(), &opts, &grid)?;
        for p in &c.curve {
            eprintln!("α {:.1}: {} {:.4}", p.alpha, c.criterion, p.score);
        }
        eprintln!(
            "chose α {} ({} on {} held-out samples)",
            c.alpha, c.criterion, c.held_out
        );
        opts.alpha = c.alpha;
        choice = Some(c);
    }
    let mut progress = super::progress::Progress::default();
    let (merged, mut report) = merge(&models, &calib, &opts, &mut |phase, done, total| {
        progress.update(phase, done, total)
    })?;
    progress.finish();
    let save = SaveOptions {
        protect: protect.clone(),
        ..save
    };
    let clock = std::time::Instant::now();
    let saved = mudsc::onnx::save(&merged.proto, &args.output, &save)?;
    report
        .seconds
        .insert("write".into(), clock.elapsed().as_secs_f64());
    report.seconds.insert("read".into(), read_seconds);
    report.peak_rss_mib = mudsc::merge::peak_rss_mib();
    let mut json = serde_json::to_value(&report)?;
    if let Some(c) = &choice {
        json["alpha_auto"] = serde_json::to_value(c)?;
    }
    // Everything after the save takes the model with it when it fails: nothing half-done
    // stays. Only what this run wrote is removed (never a data file that was there before).
    let finish = |json: &mut serde_json::Value| -> Result<()> {
        let accuracy = match &args.eval_data {
            Some(data) => Some(super::card::accuracy(args, data)?),
            None => None,
        };
        if let Some(acc) = &accuracy {
            json["accuracy"] = super::eval::document(&acc.scores)?;
        }
        let card = args
            .card
            .as_ref()
            .map(|_| super::card::render(args, &report, choice.as_ref(), accuracy));
        let mut written: Vec<&std::path::Path> = Vec::new();
        let outputs = [(&args.report, None), (&args.card, card)];
        for (path, text) in outputs {
            let Some(path) = path else { continue };
            let bytes = match text {
                Some(t) => t.into_bytes(),
                None => serde_json::to_vec_pretty(json)?,
            };
            if let Err(e) = mudsc::atomic::write_atomic(path, &protect, &bytes) {
                for w in written {
                    let _ = std::fs::remove_file(w);
                }
                return Err(e).with_context(|| format!("writing {}", path.display()));
            }
            written.push(path);
        }
        Ok(())
    };
    if let Err(e) = finish(&mut json) {
        saved.remove();
        return Err(e);
    }
    Ok(Merged { report, json })
}

/// A byte count for `--max-memory`.
fn parse_bytes(s: &str) -> Result<u64, String> {
    crate::merge::parse_size(s)
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            format!("'{s}': expected a positive number of bytes, or with a K/M/G suffix (512M, 8G)")
        })
}
