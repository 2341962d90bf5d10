use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mudsc::data;
use mudsc::merge::{statistics, MergeOptions};

use super::BackendArgs;

#[derive(Args)]
pub struct StatsArgs {
    /// The models to merge later, in the order `merge` will be given them.
    #[arg(required = true, num_args = 2..)]
    models: Vec<PathBuf>,
    /// This shard of the calibration inputs.
    #[arg(long)]
    calib: PathBuf,
    /// Statistics file to write (summed by `merge --stats`).
    #[arg(long, short)]
    output: PathBuf,
    /// Tap positions used per calibration sample, evenly spread; 0 = all (as `merge`).
    #[arg(long, default_value_t = 0)]
    tap_positions: usize,
    /// Where groups are observed (as `merge`; shards taken otherwise are refused there).
    #[arg(long, value_enum, default_value_t = super::TapMode::Tokens)]
    taps: super::TapMode,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Calibrates the models on one shard of the data and writes the groups' moments.
pub fn run(args: StatsArgs) -> Result<()> {
    let models = args
        .models
        .iter()
        .map(mudsc::onnx::load)
        .collect::<mudsc::Result<Vec<_>>>()?;
    let mut protect: Vec<PathBuf> = models.iter().flat_map(|m| m.source_files()).collect();
    protect.push(args.calib.clone());
    mudsc::atomic::refuse_protected(&args.output, &protect)?;
    let arrays = data::read(&args.calib)?;
    let calib = data::into_inputs(arrays, &models[0], &args.calib)?;
    let opts = MergeOptions {
        backend: args.backend.kind(),
        backend_options: args.backend.options(),
        batch: args.backend.batch.min(64),
        tap_positions: args.tap_positions,
        token_taps: args.taps == super::TapMode::Tokens,
        ..Default::default()
    };
    let mut progress = super::progress::Progress::default();
    let stats = statistics(&models, &calib, &opts, &mut |phase, done, total| {
        progress.update(phase, done, total)
    })?;
    progress.finish();
    stats.save(&args.output, &protect)?;
    println!(
        "statistics of {} groups over {} samples → {}",
        stats.groups.len(),
        stats.samples,
        args.output.display()
    );
    Ok(())
}
