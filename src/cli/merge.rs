use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use mudsc::data;
use mudsc::merge::{merge, MergeOptions, Method, Spread};
use mudsc::onnx::{ExternalData, SaveOptions};
use mudsc::same_base::Combine;

use super::BackendArgs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    Avg,
    Rebasin,
    ActAlign,
    Zipit,
    WeightZip,
    MudscAlign,
    MudscZip,
    /// CCA Merge: linear maps from canonical correlation analysis where units meet only linear
    /// layers, mudsc-align's permutations elsewhere; averaged.
    Cca,
    /// Same-base: θ_base + λ Σ wᵢ τᵢ (needs --base).
    TaskArithmetic,
    /// Same-base: TIES (trim to --density, elect signs, disjoint mean; needs --base).
    Ties,
    /// Same-base: DARE drop-and-rescale, then task arithmetic (needs --base).
    DareLinear,
    /// Same-base: DARE drop-and-rescale, then TIES's sign election (needs --base).
    DareTies,
    /// Same-base: spherical interpolation of two models at --t.
    Slerp,
    /// Same-base: weighted average with --weights (normalised; equal by default).
    Linear,
}

/// How `--width` spreads its extra units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Widen {
    All,
    Worst,
    PerParameter,
}

/// What `--method` names: a permutation merge, or a same-base one.
pub enum Kind {
    Permutation(Method),
    SameBase(Combine),
}

impl MethodArg {
    pub fn kind(self) -> Kind {
        match self {
            MethodArg::Avg => Kind::Permutation(Method::Avg),
            MethodArg::Rebasin => Kind::Permutation(Method::Rebasin),
            MethodArg::ActAlign => Kind::Permutation(Method::ActAlign),
            MethodArg::Zipit => Kind::Permutation(Method::Zipit),
            MethodArg::WeightZip => Kind::Permutation(Method::WeightZip),
            MethodArg::MudscAlign => Kind::Permutation(Method::MudscAlign),
            MethodArg::MudscZip => Kind::Permutation(Method::MudscZip),
            MethodArg::Cca => Kind::Permutation(Method::Cca),
            MethodArg::TaskArithmetic => Kind::SameBase(Combine::TaskArithmetic),
            MethodArg::Ties => Kind::SameBase(Combine::Ties),
            MethodArg::DareLinear => Kind::SameBase(Combine::DareLinear),
            MethodArg::DareTies => Kind::SameBase(Combine::DareTies),
            MethodArg::Slerp => Kind::SameBase(Combine::Slerp),
            MethodArg::Linear => Kind::SameBase(Combine::Linear),
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
    /// Needed by every method except the same-base ones (unless --align-first).
    #[arg(long)]
    pub(super) calib: Option<PathBuf>,
    /// The merge method: the permutation methods (mudsc-zip, the default, and the baselines of
    /// the MuDSC paper) for models trained from different initialisations; the same-base ones
    /// (task-arithmetic, ties, dare-linear, dare-ties, slerp, linear) for fine-tunes of one
    /// checkpoint (--base).
    #[arg(long, value_enum, default_value_t = MethodArg::MudscZip)]
    pub(super) method: MethodArg,
    /// --zip-until auto: the budget, in parameters relative to one model, within which the
    /// cut or the width is chosen (on a held-out fifth of --calib, the best log-likelihood of
    /// the endpoints' ensemble, or of the labels with --calib-labels).
    #[arg(long, default_value_t = 1.5)]
    pub(super) max_params: f64,
    /// Zip methods: merged units per group as a factor of one model's width (1 = one model's
    /// size; the number of models = every unit kept). The least similar units stay apart;
    /// attention heads and GroupNorm groups widen by whole heads and groups; a group whose
    /// width the graph uses otherwise keeps one model's (the report says why). Parameters grow
    /// about as the square of the factor (the report gives both counts).
    #[arg(long, default_value_t = 1.0)]
    pub(super) width: f64,
    /// With --width: `all` widens every widenable group by the factor; `worst` gives the same
    /// number of extra units to the groups the matching merged worst (GroupNorm groups take
    /// whole groups; heads, which share their order with other groups, widen only with `all`
    /// and `per-parameter`); `per-parameter` gives the parameters `all` would add (to first
    /// order) to the groups whose merge lost the most per parameter a unit costs (attention
    /// heads whole, Q/K with V/O). `worst` and `per-parameter` read the loop's merge values
    /// (mudsc-zip, weight-zip). `--zip-until auto` tries all three.
    #[arg(long, value_enum, default_value_t = Widen::All)]
    pub(super) widen: Widen,
    /// --method cca: ridge added to each model's activation covariance, relative to its mean
    /// variance, before whitening (small: exact CCA, noisy directions at full gain; large:
    /// tends to an orthogonal Procrustes rotation).
    #[arg(long, default_value_t = crate::merge::DEFAULT_CCA_RIDGE)]
    pub(super) cca_ridge: f64,
    /// Same-base methods: the checkpoint the models were fine-tuned from (task vectors are
    /// each model minus it).
    #[arg(long, value_name = "BASE.onnx")]
    pub(super) base: Option<PathBuf>,
    /// Same-base methods: scale of the merged task vector.
    #[arg(long, default_value_t = 1.0)]
    pub(super) lambda: f64,
    /// ties: fraction of each task vector's entries kept (largest magnitudes, per tensor);
    /// dare-*: probability that an entry survives the drop (p = 1 − density).
    #[arg(long, default_value_t = 0.2)]
    pub(super) density: f64,
    /// slerp: interpolation point (0 = the first model, 1 = the second).
    #[arg(long, default_value_t = 0.5)]
    pub(super) t: f64,
    /// Same-base methods: one weight per model, comma-separated (linear: normalised to sum 1;
    /// the task-vector methods: each task vector's weight). Default: equal.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub(super) weights: Option<Vec<f64>>,
    /// Same-base methods on models of different initialisations: put every model (and the
    /// base) in the first model's unit order by mudsc-align matching on --calib first.
    #[arg(long)]
    pub(super) align_first: bool,
    /// Weight-space share of the dual similarity (0 = activations only, 1 = weights only), or
    /// `auto`: try 0.1 … 0.9 on a held-out fifth of the calibration data (the log-likelihood of
    /// its --calib-labels, else of the endpoints' ensemble) and keep the best.
    #[arg(long, default_value = "0.5")]
    pub(super) alpha: String,
    /// Key of integer labels in the calibration file, for `--alpha auto` and `--zip-until auto`
    /// scored on them.
    #[arg(long)]
    pub(super) calib_labels: Option<String>,
    /// Zip: similarity decay of merged clusters.
    #[arg(long, default_value_t = 0.5)]
    pub(super) zip_a: f64,
    /// Zip: same-model merge budget factor.
    #[arg(long, default_value_t = 1.0)]
    pub(super) zip_b: f64,
    /// Most sweeps of the iterative loop (it also stops after --patience sweeps without
    /// improvement).
    #[arg(long, default_value_t = 100)]
    pub(super) max_sweeps: usize,
    /// Sweeps in a row without a real improvement (see --tol) after which the iterative loop
    /// stops; the best matchings seen are kept.
    #[arg(long, default_value_t = crate::merge::DEFAULT_PATIENCE)]
    pub(super) patience: usize,
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
    #[arg(long, default_value_t = crate::merge::DEFAULT_REPAIR_SAMPLES)]
    pub(super) repair_samples: usize,
    /// Passes of the merged model for statistics repair: each runs the model with every
    /// corrected layer normalised in the graph (BatchNorms in training mode) and folds the
    /// measured statistics into the weights; 0 = one pass per layer, in graph order (the
    /// sequential scheme, as slow as the model is deep).
    #[arg(long, default_value_t = 1)]
    pub(super) repair_passes: usize,
    /// Samples per batch of repair's pass over the merged model (N, or auto). One batch
    /// holding all --repair-samples makes it exactly the sequential scheme; a smaller one needs
    /// less memory on large models and pools per-batch statistics (batches of 64 and 16 within
    /// 0.5 points of 256 on the bundled pairs). auto: all of them while their activations fit
    /// in 2 GiB (every bundled pair), else the largest batch that does
    #[arg(long, default_value = "auto", value_parser = parse_repair_batch, value_name = "N|auto")]
    pub(super) repair_batch: usize,
    /// Statistics repair also corrects token layers (a transformer's MatMul + bias Add, units
    /// on the last axis, a packed QKV projection included): `false` leaves them alone (the
    /// bundled ViT pairs lose 7 and 3 task-mean points)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub(super) repair_token_layers: bool,
    /// Output refit on this many calibration samples: the output layers (a classifier, a
    /// projection onto a fixed class embedding) are refitted by least squares to the
    /// endpoints' average output there (no labels); 0 turns it off
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub(super) output_fit: usize,
    /// Layers the output refit fits: `output` (the last linear layer whose weights differ
    /// between the models), `all` linear layers (1×1 convolutions included) whose output
    /// units are fixed or one group in order, in graph order (one merged-model pass per layer;
    /// transformers and depthwise CNNs gain most), or `auto`: all where calibration can keep
    /// the endpoints' outputs of every such layer (512 MiB: small models), else the output layer
    #[arg(long, value_enum, default_value_t = super::RefitLayers::Auto)]
    pub(super) refit_layers: super::RefitLayers,
    /// Where groups are observed: `tokens` also observes a group seen at one token per sample
    /// (a class token) at every token tensor a layer reads; `one`: one tap per group (the
    /// reference)
    #[arg(long, value_enum, default_value_t = super::TapMode::Tokens)]
    pub(super) taps: super::TapMode,
    /// Tap positions (pixels, tokens) used per calibration sample, evenly spread; 0 = all.
    /// Cuts the statistics arithmetic on large maps (e.g. 64 on 224² models).
    #[arg(long, default_value_t = 0)]
    pub(super) tap_positions: usize,
    /// The merge's memory budget (bytes, or with K/M/G: 512M, 8G). Calibration counts what
    /// the process holds, the engines and their batches against it; when all groups' Σxxᵀ
    /// do not fit beside them, the groups are calibrated in several passes over the data
    /// (one forward pass of every model each); when their correlations do not fit beside the
    /// weights, they are held in a temporary file ($TMPDIR) and read back group by group. The
    /// matching's weight-similarity cache takes only what is left (up to 1 GiB). Default: half
    /// of the machine's RAM.
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE")]
    pub(super) max_memory: Option<u64>,
    /// Partial zip: merge only up to a node (a node name, or the name of the value it makes)
    /// or a depth (the first K weight layers; -K: all but the last K), and keep each model's
    /// own layers after it, fed through its unmerge. The merged model then has one copy of
    /// every output per model, `<output>.m0`, `<output>.m1`, … `auto`: choose the cut, or a
    /// --width, within --max-params on held-out calibration data.
    #[arg(long, allow_hyphen_values = true, value_name = "NODE|DEPTH|auto")]
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

/// What a merge did: its summary for the terminal, and the report as `--report` writes it
/// (`alpha_auto` and `accuracy` added when there are).
pub struct Merged {
    pub summary: Vec<String>,
    pub json: serde_json::Value,
}

pub fn run(mut args: MergeArgs) -> Result<()> {
    for line in execute(&mut args)?.summary {
        println!("{line}");
    }
    Ok(())
}

/// The terminal summary of a permutation merge.
fn summary(args: &MergeArgs, report: &mudsc::merge::MergeReport) -> Vec<String> {
    let mut lines = vec![format!(
        "merged {} models with {} (α {}) over {} groups, {} calibration samples on {} → {}",
        args.models.len(),
        report.method.name(),
        report.alpha,
        report.groups.len(),
        report.calibration_samples,
        report.engine,
        args.output.display()
    )];
    if let Some(t) = &report.partial {
        lines.push(format!(
            "partial zip: {} trunk nodes merged up to '{}', {} remainder nodes kept per model, \
             {} values unmerged",
            t.trunk_nodes,
            t.cut_node,
            t.remainder_nodes,
            t.cut_values.len()
        ));
    }
    let total: f64 = report.seconds.values().sum();
    let phases: Vec<String> = report
        .seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}s"))
        .collect();
    lines.push(format!(
        "time {total:.2}s ({}), peak memory {:.0} MiB",
        phases.join(", "),
        report.peak_rss_mib
    ));
    lines
}

/// The whole merge: outputs checked, models and calibration read, merged, written (the model,
/// then `--report`); nothing on stdout (`mudsc.merge()` in Python returns `json`).
pub fn execute(args: &mut MergeArgs) -> Result<Merged> {
    let method = match args.method.kind() {
        Kind::SameBase(combine) => return super::same_base::execute(args, combine),
        Kind::Permutation(m) => m,
    };
    refuse_same_base_options(args)?;
    let alpha = parse_alpha(&args.alpha)?;
    let outputs = Outputs::check(args)?;
    let started = std::time::Instant::now();
    let shape_auto = args.zip_until.as_deref() == Some("auto");
    if shape_auto && args.width != 1.0 {
        return Err(mudsc::Error::Usage(
            "--zip-until auto chooses the width itself: leave --width out".into(),
        )
        .into());
    }
    let zip_until = args
        .zip_until
        .as_deref()
        .filter(|_| !shape_auto)
        .map(str::parse::<mudsc::merge::Cut>)
        .transpose()?;
    let models = args
        .models
        .iter()
        .map(mudsc::onnx::load)
        .collect::<mudsc::Result<Vec<_>>>()?;
    let calib_path = args.calib.clone().ok_or_else(|| {
        mudsc::Error::Usage(format!(
            "--method {} needs --calib: the calibration data its statistics come from",
            method.name()
        ))
    })?;
    let mut arrays = match args.calib_arrays.take() {
        Some(a) => {
            args.calib_arrays_given = true;
            a
        }
        None => data::read(&calib_path)?,
    };
    let mut labels = match &args.calib_labels {
        Some(key) => Some(
            arrays
                .take(key)
                .and_then(|t| t.to_labels())
                .ok_or_else(|| mudsc::Error::Data {
                    path: calib_path.clone(),
                    reason: format!("no integer labels under '{key}'"),
                })?,
        ),
        None => None,
    };
    let mut protect: Vec<PathBuf> = models.iter().flat_map(|m| m.source_files()).collect();
    protect.push(calib_path.clone());
    protect.extend(args.stats.iter().cloned());
    protect.extend(args.eval_data.iter().cloned());
    if shape_auto && !args.stats.is_empty() {
        return Err(mudsc::Error::Usage(
            "--zip-until auto merges on part of --calib and scores on the rest: it cannot use \
             --stats"
                .into(),
        )
        .into());
    }
    if alpha.is_none() && !args.stats.is_empty() {
        return Err(mudsc::Error::Usage(
            "--alpha auto calibrates on part of --calib and scores on the rest: it cannot use \
             --stats"
                .into(),
        )
        .into());
    }
    outputs.refuse_protected(args, &protect)?;
    let mut calib = data::into_inputs(arrays, &models[0], &calib_path)?;
    if let Some(n) = args.samples {
        calib = first_samples(&calib, n)?;
        if let Some(l) = labels.as_mut() {
            l.truncate(n);
        }
    }
    let samples = data::sample_count(&calib);
    let by_activations = !matches!(method, Method::Avg | Method::Rebasin | Method::WeightZip);
    if by_activations && samples < MIN_CALIBRATION_SAMPLES {
        eprintln!(
            "warning: {samples} calibration sample(s): unit correlations estimated from so few \
             are mostly noise and the merge will be poor; use at least \
             {MIN_CALIBRATION_SAMPLES} (ideally as many as the widest layer has units)"
        );
    }
    let read_seconds = started.elapsed().as_secs_f64();
    let mut opts = options(args, method, alpha.unwrap_or(0.5), zip_until);
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
    let mut shape = None;
    if shape_auto {
        let c =
            mudsc::merge::choose_shape(&models, &calib, labels.as_deref(), &opts, args.max_params)?;
        for p in &c.curve {
            let what = match p.zip_until {
                Some(k) => format!("last {k} layer(s) separate"),
                None => format!(
                    "width {}{}",
                    p.width,
                    match p.widen {
                        Spread::All => "",
                        Spread::Worst => " (worst first)",
                        Spread::PerParameter => " (per parameter)",
                    }
                ),
            };
            match p.score {
                Some(s) => eprintln!(
                    "{what}: {:.2}× parameters, {} {s:.4}",
                    p.parameters, c.criterion
                ),
                None => eprintln!("{what}: {:.2}× parameters, over the budget", p.parameters),
            }
        }
        eprintln!(
            "chose {} ({:.2}× parameters, budget {}×; {} on {} held-out samples)",
            match c.zip_until {
                Some(k) => format!("--zip-until -{k}"),
                None if c.widen == Spread::All => format!("--width {}", c.width),
                None => format!("--width {} --widen {}", c.width, c.widen.name()),
            },
            c.parameters,
            c.max_params,
            c.criterion,
            c.held_out
        );
        opts.zip_until = c.cut();
        opts.width = c.width;
        opts.widen = c.widen;
        shape = Some(c);
    }
    let mut progress = super::progress::Progress::default();
    let (merged, mut report) = merge(&models, &calib, &opts, &mut |phase, done, total| {
        progress.update(phase, done, total)
    })?;
    progress.finish();
    if let Some(r) = report.identity_weight_correlation {
        if r >= mudsc::same_base::SAME_BASE {
            eprintln!(
                "note: the models look fine-tuned from one base (their weights correlate {r:.3} \
                 unit for unit): no matching is needed; with the base checkpoint, --base \
                 BASE.onnx --method ties (or task-arithmetic, dare-ties) usually merges them \
                 better, and --method linear needs no base"
            );
        }
    }
    let saved = outputs.write(&merged, &args.output, &protect, &mut report.seconds)?;
    report.seconds.insert("read".into(), read_seconds);
    report.peak_rss_mib = mudsc::merge::peak_rss_mib();
    let mut json = serde_json::to_value(&report)?;
    if let Some(c) = &choice {
        json["alpha_auto"] = serde_json::to_value(c)?;
    }
    if let Some(c) = &mut shape {
        // The chosen shape was measured on four fifths of the data; merged on all of it, the
        // worst-first spread may widen other groups, so the parameters are the final model's.
        let ratio = report.merged_parameters as f64 / report.model_parameters.max(1) as f64;
        if ratio > args.max_params.max(1.0) + 1e-9 {
            eprintln!(
                "warning: merged on all the data, the chosen shape has {ratio:.2}× parameters, \
                 over the budget of {}× (it had {:.2}× on the held-out split)",
                args.max_params, c.parameters
            );
        }
        c.parameters = ratio;
        json["shape_auto"] = serde_json::to_value(&*c)?;
    }
    // Everything after the save takes the model with it when it fails: nothing half-done
    // stays. Only what this run wrote is removed (never a data file that was there before).
    let card = |accuracy| {
        args.card
            .as_ref()
            .map(|_| super::card::render(args, &report, choice.as_ref(), accuracy))
    };
    if let Err(e) = finish(args, &mut json, &protect, card) {
        saved.remove();
        return Err(e);
    }
    Ok(Merged {
        summary: summary(args, &report),
        json,
    })
}

/// After the model is saved: `--eval-data`'s accuracy into the report, then `--report` and
/// `--card` (made by `card` from the accuracy). On an error, what this wrote is removed again.
pub(super) fn finish(
    args: &MergeArgs,
    json: &mut serde_json::Value,
    protect: &[PathBuf],
    card: impl FnOnce(Option<mudsc::card::Accuracy>) -> Option<String>,
) -> Result<()> {
    let accuracy = match &args.eval_data {
        Some(data) => Some(super::card::accuracy(args, data)?),
        None => None,
    };
    if let Some(acc) = &accuracy {
        json["accuracy"] = super::eval::document(&acc.scores)?;
    }
    let card = card(accuracy);
    let mut written: Vec<&std::path::Path> = Vec::new();
    let outputs = [(&args.report, None), (&args.card, card)];
    for (path, text) in outputs {
        let Some(path) = path else { continue };
        let bytes = match text {
            Some(t) => t.into_bytes(),
            None => serde_json::to_vec_pretty(json)?,
        };
        if let Err(e) = mudsc::atomic::write_atomic(path, protect, &bytes) {
            for w in written {
                let _ = std::fs::remove_file(w);
            }
            return Err(e).with_context(|| format!("writing {}", path.display()));
        }
        written.push(path);
    }
    Ok(())
}

/// `--alpha`: a number in [0, 1], or `None` for `auto`.
fn parse_alpha(v: &str) -> Result<Option<f64>> {
    match v {
        "auto" => Ok(None),
        v => match v.parse::<f64>() {
            Ok(a) if (0.0..=1.0).contains(&a) => Ok(Some(a)),
            _ => Err(mudsc::Error::Usage(format!("--alpha {v} is not 'auto' or in [0, 1]")).into()),
        },
    }
}

/// The same-base options mean nothing to a permutation merge: refused rather than ignored.
fn refuse_same_base_options(args: &MergeArgs) -> Result<()> {
    let given = [
        ("--base", args.base.is_some()),
        ("--weights", args.weights.is_some()),
        ("--align-first", args.align_first),
    ];
    if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
        return Err(mudsc::Error::Usage(format!(
            "{flag} belongs to the same-base methods (task-arithmetic, ties, dare-linear, \
             dare-ties, slerp, linear), not to --method {:?}",
            args.method
        ))
        .into());
    }
    Ok(())
}

/// The first `n` calibration samples.
pub(super) fn first_samples(
    calib: &[mudsc::onnx::TensorData],
    n: usize,
) -> Result<Vec<mudsc::onnx::TensorData>> {
    if n == 0 {
        return Err(mudsc::Error::Usage("--samples must be at least 1".into()).into());
    }
    Ok(calib
        .iter()
        .map(|t| t.slice_rows(0, n.min(t.shape()[0])))
        .collect())
}

/// The permutation merge's options from the command line.
pub(super) fn options(
    args: &MergeArgs,
    method: Method,
    alpha: f64,
    zip_until: Option<mudsc::merge::Cut>,
) -> MergeOptions {
    MergeOptions {
        method,
        alpha,
        zip_a: args.zip_a,
        zip_b: args.zip_b,
        seed: args.seed,
        backend: args.backend.kind(),
        backend_options: args.backend.options(),
        // Calibration streams its taps: batches of 64 keep the engine's activations small
        // at no cost in accuracy (statistics are exact sums over any batching).
        batch: args.backend.batch.min(64),
        repair_samples: args.repair_samples,
        output_fit_samples: args.output_fit,
        refit_layers: args.refit_layers.into_library(),
        repair_passes: args.repair_passes,
        repair_batch: args.repair_batch,
        repair_token_layers: args.repair_token_layers,
        tap_positions: args.tap_positions,
        token_taps: args.taps == super::TapMode::Tokens,
        max_memory: args.max_memory.or_else(crate::merge::half_of_ram),
        zip_until,
        width: args.width,
        widen: match args.widen {
            Widen::All => Spread::All,
            Widen::Worst => Spread::Worst,
            Widen::PerParameter => Spread::PerParameter,
        },
        cca_ridge: if args.cca_ridge.is_finite() {
            args.cca_ridge.max(0.0)
        } else {
            crate::merge::DEFAULT_CCA_RIDGE
        },
        max_sweeps: args.max_sweeps.max(1),
        patience: args.patience.max(1),
        tol: if args.tol.is_finite() {
            args.tol.max(0.0)
        } else {
            0.0
        },
        ..Default::default()
    }
}

/// Every output of a merge, checked before any work (directories, special files, one file
/// under two names), so that a refusal costs nothing and nothing is overwritten by another
/// output. Without --external-data a model over 2 GiB still gets `<output>.data`: no other
/// output may take that name either.
pub(super) struct Outputs {
    paths: Vec<(&'static str, PathBuf)>,
    external_data: bool,
}

impl Outputs {
    pub(super) fn check(args: &MergeArgs) -> Result<Outputs> {
        for (flag, v) in [("--zip-a", args.zip_a), ("--zip-b", args.zip_b)] {
            if !v.is_finite() || v < 0.0 {
                return Err(
                    mudsc::Error::Usage(format!("{flag} {v} must be a finite number ≥ 0")).into(),
                );
            }
        }
        let always = SaveOptions {
            external_data: ExternalData::Always(None),
            protect: Vec::new(),
        };
        let mut paths = vec![("-o", args.output.clone())];
        if let Some(d) = mudsc::onnx::data_file_for(&args.output, &always) {
            paths.push(("the external data file", d));
        }
        if let Some(r) = &args.report {
            paths.push(("--report", r.clone()));
        }
        if let Some(c) = &args.card {
            paths.push(("--card", c.clone()));
        }
        let named: Vec<(&str, &std::path::Path)> =
            paths.iter().map(|(w, p)| (*w, p.as_path())).collect();
        mudsc::atomic::refuse_same_outputs(&named)?;
        for (_, out) in &paths {
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
        Ok(Outputs {
            paths,
            external_data: args.external_data,
        })
    }

    /// No output may be one of the inputs.
    pub(super) fn refuse_protected(&self, args: &MergeArgs, protect: &[PathBuf]) -> Result<()> {
        for (what, out) in &self.paths {
            // The data file an inline model might get is checked at save time, if it comes to it.
            if args.external_data || *what != "the external data file" {
                mudsc::atomic::refuse_protected(out, protect)?;
            }
        }
        Ok(())
    }

    /// Saves the merged model to `output` (atomically, never over one of `protect`) and
    /// records the seconds it took as the `write` phase.
    pub(super) fn write(
        &self,
        merged: &mudsc::onnx::Model,
        output: &std::path::Path,
        protect: &[PathBuf],
        seconds: &mut std::collections::BTreeMap<String, f64>,
    ) -> Result<mudsc::onnx::Saved> {
        let clock = std::time::Instant::now();
        let options = SaveOptions {
            external_data: if self.external_data {
                ExternalData::Always(None)
            } else {
                ExternalData::Auto
            },
            protect: protect.to_vec(),
        };
        let saved = mudsc::onnx::save(&merged.proto, output, &options)?;
        seconds.insert("write".into(), clock.elapsed().as_secs_f64());
        Ok(saved)
    }
}

/// `--repair-batch`: a positive count, or `auto` (0, `MergeOptions::repair_batch`).
fn parse_repair_batch(s: &str) -> Result<usize, String> {
    match s {
        "auto" => Ok(0),
        n => n
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("'{s}': expected a positive number of samples, or auto")),
    }
}

/// A byte count for `--max-memory`.
fn parse_bytes(s: &str) -> Result<u64, String> {
    crate::merge::parse_size(s)
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            format!("'{s}': expected a positive number of bytes, or with a K/M/G suffix (512M, 8G)")
        })
}
