//! Command-line interface: argument parsing and human-readable output only; every computation
//! is a library call. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input.

mod card;
pub mod check;
pub mod eval;
pub mod groups;
mod inspect;
mod landscape;
pub mod merge;
mod progress;
mod run;
mod same_base;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mudsc::runtime::{BackendKind, BackendOptions, Device};

#[derive(Parser)]
#[command(
    name = "mudsc",
    bin_name = "mudsc",
    version,
    about = "Merge neural networks given as ONNX files, without training (MuDSC)",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show a model's IR version, opsets, inputs/outputs, op histogram and parameter count.
    #[command(
        after_help = "Example:\n  mudsc inspect fixtures/models/mlp_a.onnx\n  mudsc inspect model.onnx --json"
    )]
    Inspect(inspect::InspectArgs),
    /// Run a model on input data and print (or save) its outputs.
    #[command(
        after_help = "Example:\n  mudsc run fixtures/models/mlp_a.onnx --input fixtures/data/calib.npz --output out.npz\n  mudsc run model.onnx --input test_data_set_0 --backend ort"
    )]
    Run(run::RunArgs),
    /// Top-1 accuracy of a classifier on labelled data; joint and per-task with --tasks.
    #[command(
        after_help = "Example:\n  mudsc eval fixtures/models/mlp_a.onnx --data fixtures/data/test.npz --tasks 0-4,5-9"
    )]
    Eval(eval::EvalArgs),
    /// Discover the permutation-coupled unit groups of a model (and the axes that stay fixed).
    #[command(
        after_help = "Example:\n  mudsc groups fixtures/models/resnet20_gn_a.onnx\n  mudsc groups model.onnx --shape input=1,3,224,224 --json > spec.json"
    )]
    Groups(groups::GroupsArgs),
    /// Prove discovery on a model: permute every group at random and compare outputs.
    #[command(
        after_help = "Example:\n  mudsc check fixtures/models/vit_a.onnx --data fixtures/data/calib.npz --trials 3"
    )]
    Check(check::CheckArgs),
    /// Merge two or more models of one architecture into one (MuDSC and its baselines).
    #[command(
        after_help = "Example:\n  mudsc merge fixtures/models/mlp_a.onnx fixtures/models/mlp_b.onnx -o merged.onnx --calib fixtures/data/calib.npz\n  mudsc merge a.onnx b.onnx -o m.onnx --calib c.npz --method zipit --report merge.json"
    )]
    Merge(Box<merge::MergeArgs>),
    /// Draw the loss landscape on the plane through A, B (aligned to A) and their merge.
    #[command(
        after_help = "Example:\n  mudsc merge fixtures/models/mlp_a.onnx fixtures/models/mlp_b.onnx -o merged.onnx --calib fixtures/data/calib.npz\n  mudsc landscape fixtures/models/mlp_a.onnx fixtures/models/mlp_b.onnx merged.onnx --data fixtures/data/test.npz --tasks 0-4,5-9 -o landscape.png --csv landscape.csv\n  mudsc landscape a.onnx b.onnx m.onnx --data test.npz --tasks 0-4,5-9 -o l.png --grid 11 --samples 500"
    )]
    Landscape(landscape::LandscapeArgs),
    /// Calibration statistics of one shard of the data, for `merge --stats` (calibration
    /// spread over machines: activation moments add up).
    #[command(
        after_help = "Example:\n  mudsc stats a.onnx b.onnx --calib part1.npz -o part1.stats\n  mudsc stats a.onnx b.onnx --calib part2.npz -o part2.stats\n  mudsc merge a.onnx b.onnx -o m.onnx --calib part1.npz --stats part1.stats part2.stats"
    )]
    Stats(stats::StatsArgs),
}

/// Backend selection shared by every command that runs a model.
#[derive(Args, Clone, Debug)]
pub struct BackendArgs {
    /// Inference engine [default: ort where its library is found, else tract].
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Path of libonnxruntime.so for --backend ort (default: $ORT_DYLIB_PATH, then the library
    /// of an installed onnxruntime Python package, then the copy fetched by
    /// scripts/fetch-onnxruntime.sh).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Samples per inference batch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Device: cpu, cuda or cuda:N (ONNX Runtime's CUDA execution provider; where it cannot
    /// start, a warning and the CPU).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse().map_err(|e: mudsc::Error| e.to_string())
}

/// Where calibration observes each group (`merge --taps`, `stats --taps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TapMode {
    /// One tap per group, as the reference.
    One,
    /// Groups seen at one token per sample also at every token tensor a layer reads.
    Tokens,
}

/// Which layers the output refit fits (`merge --refit-layers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RefitLayers {
    /// The output layer: the last linear layer whose weights differ between the models.
    Output,
    /// Every linear layer (1×1 convolutions included) whose output units are fixed or one
    /// group in order (attention heads included), in graph order, each on the merged model
    /// as refitted so far: one pass of the merged model per layer, and of every endpoint
    /// where their outputs are not kept.
    All,
    /// Every layer where calibration can keep the endpoints' outputs of all of them (512 MiB:
    /// small models), else the output layer.
    Auto,
}

impl RefitLayers {
    pub(crate) fn into_library(self) -> crate::merge::RefitLayers {
        use crate::merge::RefitLayers as L;
        match self {
            RefitLayers::Output => L::Output,
            RefitLayers::All => L::All,
            RefitLayers::Auto => L::Auto,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Backend {
    /// Embedded pure-Rust engine.
    Tract,
    /// ONNX Runtime (needs the `ort` build feature and the shared library).
    Ort,
}

impl BackendArgs {
    /// The chosen backend; `Auto` (ONNX Runtime where its library is found) when none was
    /// asked for. `check` relies on that too: ONNX Runtime's normalisations sum in a stable
    /// order, where tract's GroupNorm drifts by up to 7e-4 under channel permutations.
    pub fn kind(&self) -> BackendKind {
        match self.backend {
            Some(Backend::Tract) => BackendKind::Tract,
            Some(Backend::Ort) => BackendKind::Ort,
            None => BackendKind::Auto,
        }
    }

    pub fn options(&self) -> BackendOptions {
        BackendOptions {
            ort_library: self.ort_lib.clone(),
            threads: 0,
            device: self.device,
        }
    }
}

/// Runs the command line `args` (the program name first) as the `mudsc` binary does, signal
/// handling included.
pub fn main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    ExitCode::from(run(args))
}

/// [`main`] returning the exit status as a number: the Python package's `mudsc` command.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    reset_sigpipe();
    clean_up_on_signals();
    let cli = Cli::parse_from(args); // usage errors exit with code 2
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Run(a) => run::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Groups(a) => groups::run(a),
        Command::Check(a) => check::run(a),
        Command::Merge(a) => merge::run(*a),
        Command::Landscape(a) => landscape::run(a),
        Command::Stats(a) => stats::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            exit_code(&e)
        }
    }
}

/// The error and its causes on one line, each cause only once: our I/O errors already name
/// their OS error, which `{:#}` would print a second time as the source.
pub fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// On SIGINT, SIGTERM or SIGHUP, removes the temporary files of outputs being written (the
/// hidden `.mudsc-*.tmp` beside each output) before exiting with status 130 (interrupted).
/// The `ctrlc` crate runs the handler on its own thread, so it may lock and remove files
/// freely. Temporary files of a process killed outright (SIGKILL) are removed by the next run
/// that writes into the same directory.
fn clean_up_on_signals() {
    let _ = ctrlc::set_handler(|| {
        mudsc::atomic::remove_live_temps();
        std::process::exit(130);
    });
}

/// Rust ignores SIGPIPE, so `println!` into a closed pipe (`mudsc groups m.onnx | head`)
/// panics; the default action ends the process quietly, as every Unix filter does.
fn reset_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; only restores the default.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// 2 when the input was at fault, 1 when the work itself failed.
fn exit_code(e: &anyhow::Error) -> u8 {
    if is_bad_input(e) {
        2
    } else {
        1
    }
}

/// Whether an error is the user's input's fault (exit code 2; `BadInputError` in Python).
pub fn is_bad_input(e: &anyhow::Error) -> bool {
    e.downcast_ref::<mudsc::Error>()
        .is_some_and(mudsc::Error::is_bad_input)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
