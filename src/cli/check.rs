use anyhow::{bail, Result};
use clap::Args;
use mudsc::symmetry::check::{check_report, ATOL, CONTROL_MARGIN, NOISE_FACTOR, RTOL};

use super::groups::{discover, DiscoverArgs};
use super::BackendArgs;

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    discover: DiscoverArgs,
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

pub fn run(args: CheckArgs) -> Result<()> {
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
    println!(
        "{}: {} groups permuted, {} trials",
        args.discover.model.display(),
        d.discovery.groups.len(),
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
