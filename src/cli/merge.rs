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

#[derive(Args)]
pub struct MergeArgs {
    /// The models to merge (same architecture; the first one gives names and opsets).
    #[arg(required = true, num_args = 2..)]
    models: Vec<PathBuf>,
    /// Output model.
    #[arg(long, short)]
    output: PathBuf,
    /// Calibration inputs (.npz keyed by graph input name, .npy, .pb or test_data_set dir).
    #[arg(long)]
    calib: PathBuf,
    #[arg(long, value_enum, default_value_t = MethodArg::MudscZip)]
    method: MethodArg,
    /// Weight-space share of the dual similarity (0 = activations only, 1 = weights only).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Zip: similarity decay of merged clusters.
    #[arg(long, default_value_t = 0.5)]
    zip_a: f64,
    /// Zip: same-model merge budget factor.
    #[arg(long, default_value_t = 1.0)]
    zip_b: f64,
    /// Seed of the group order in the iterative loop.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a JSON report (per group: width, similarity, merge value; time per phase).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Store the initializers in one external data file beside the output.
    #[arg(long)]
    external_data: bool,
    /// Statistics repair (REPAIR folded into Conv/Gemm weights, BatchNorm reset) on this many
    /// calibration samples; 0 turns it off.
    #[arg(long, default_value_t = 256)]
    repair_samples: usize,
    /// Only use the first N calibration samples.
    #[arg(long)]
    samples: Option<usize>,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: MergeArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.alpha) {
        return Err(mudsc::Error::Usage(format!("--alpha {} is not in [0, 1]", args.alpha)).into());
    }
    let models = args
        .models
        .iter()
        .map(mudsc::onnx::load)
        .collect::<mudsc::Result<Vec<_>>>()?;
    let mut calib = data::bind_inputs(&data::read(&args.calib)?, &models[0], &args.calib)?;
    if let Some(n) = args.samples {
        calib = calib
            .iter()
            .map(|t| t.slice_rows(0, n.min(t.shape()[0])))
            .collect();
    }
    let opts = MergeOptions {
        method: args.method.into(),
        alpha: args.alpha,
        zip_a: args.zip_a,
        zip_b: args.zip_b,
        seed: args.seed,
        backend: args.backend.kind(),
        backend_options: args.backend.options(),
        batch: args.backend.batch.min(256),
        repair_samples: args.repair_samples,
        ..Default::default()
    };
    let mut last = String::new();
    let (merged, report) = merge(&models, &calib, &opts, &mut |phase, done, total| {
        let line = format!("{phase}: {done}/{total}");
        if line != last && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\r{line}   ");
            last = line;
        }
    })?;
    let mut protect: Vec<PathBuf> = models.iter().flat_map(|m| m.source_files()).collect();
    protect.push(args.calib.clone());
    let save = SaveOptions {
        external_data: if args.external_data {
            ExternalData::Always(None)
        } else {
            ExternalData::Auto
        },
        protect: protect.clone(),
    };
    mudsc::onnx::save(&merged.proto, &args.output, &save)?;
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report)?;
        mudsc::atomic::write_atomic(path, &protect, &json)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!();
    println!(
        "merged {} models with {} (α {}) over {} groups, {} calibration samples → {}",
        models.len(),
        report.method.name(),
        report.alpha,
        report.groups.len(),
        report.calibration_samples,
        args.output.display()
    );
    let total: f64 = report.seconds.values().sum();
    let phases: Vec<String> = report
        .seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}s"))
        .collect();
    println!("time {total:.2}s ({})", phases.join(", "));
    Ok(())
}
