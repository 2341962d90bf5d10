use anyhow::{bail, Result};
use clap::Args;
use mudsc::symmetry::check::{
    check_report, CheckDocument, ATOL, CONTROL_MARGIN, NOISE_FACTOR, RTOL,
};

use super::groups::{discover, DiscoverArgs};
use super::BackendArgs;

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub discover: DiscoverArgs,
    /// Print the verdict as JSON (`mudsc-check/1`: verdict, per-trial differences, the
    /// tolerance and its parts); the exit code is the same (0 pass, 1 fail, 2 bad input).
    #[arg(long)]
    json: bool,
    /// Random permutations to try.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Seed of the first trial.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples of random input when no --data is given (symbolic batch dimensions).
    #[arg(long, default_value_t = 4)]
    samples: usize,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Runs the check and returns its document (`check --json`; `mudsc.check()` in Python).
pub fn document(args: &CheckArgs) -> Result<CheckDocument> {
    if args.trials == 0 {
        return Err(mudsc::Error::Usage(
            "--trials must be at least 1: no trial proves nothing".into(),
        )
        .into());
    }
    let mut d = discover(&args.discover)?;
    let inputs = match d.inputs.take() {
        Some(i) => i,
        None => {
            let shapes =
                mudsc::data::input_shapes(&d.model, None, &args.discover.shape, args.samples)?;
            mudsc::data::random_inputs(&d.model, &shapes, args.seed)?
        }
    };
    let report = check_report(
        &d.model,
        &d.discovery,
        &inputs,
        args.trials,
        args.seed,
        args.backend.kind(),
        &args.backend.options(),
    )?;
    Ok(report.document(
        &args.discover.model.display().to_string(),
        d.discovery.groups.len(),
    ))
}

pub fn run(args: CheckArgs) -> Result<()> {
    let doc = document(&args)?;
    let report = &doc.report;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_report(&doc);
    }
    if !report.passed() {
        bail!(
            "the permuted model differs by more than the tolerance ({:.3e}): a group is wrong",
            report.tolerance
        );
    }
    if !report.discriminates() {
        eprintln!(
            "warning: a wrongly permuted tensor changes the outputs by less than \
             {CONTROL_MARGIN} × the tolerance on this data; the check cannot tell a wrong group \
             from rounding here (try --data with real inputs)"
        );
    }
    Ok(())
}

fn print_report(doc: &CheckDocument) {
    let report = &doc.report;
    println!(
        "{}: {} groups permuted, {} trials",
        doc.model,
        doc.groups,
        report.trials.len()
    );
    println!(
        "  tolerance {:.3e} (output scale {:.3e}, float32 noise floor {:.3e}: \
         max(atol {ATOL:.0e}, rtol {RTOL:.0e} × scale, {NOISE_FACTOR} × noise))",
        report.tolerance, report.scale, report.noise_floor
    );
    for t in &report.trials {
        println!(
            "  seed {:<4} max |diff| {:.3e}  max rel {:.3e}  {:.2e} × tolerance  {}",
            t.seed,
            t.max_abs_diff,
            t.max_rel_diff,
            t.ratio,
            if t.passed { "ok" } else { "FAILED" }
        );
    }
    if let Some(c) = &report.control {
        println!(
            "  negative control (one tensor, '{}', left unpermuted): max |diff| {:.3e} = \
             {:.2e} × tolerance{}",
            c.tensor,
            c.max_abs_diff,
            c.ratio,
            if report.discriminates() {
                ""
            } else {
                "  (too close: inconclusive)"
            }
        );
    }
}
