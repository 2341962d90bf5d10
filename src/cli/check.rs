use anyhow::{bail, Result};
use clap::Args;
use mudsc::symmetry::check::{check, ATOL, RTOL};

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
    let mut d = discover(&args.discover)?;
    let inputs = match d.inputs.take() {
        Some(i) => i,
        None => {
            let shapes =
                mudsc::data::input_shapes(&d.model, None, &args.discover.shape, args.samples)?;
            mudsc::data::random_inputs(&d.model, &shapes, args.seed)?
        }
    };
    let trials = check(
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
        trials.len()
    );
    for t in &trials {
        println!(
            "  seed {:<4} max |diff| {:.3e}  max rel {:.3e}  {}",
            t.seed,
            t.max_abs_diff,
            t.max_rel_diff,
            if t.passed { "ok" } else { "FAILED" }
        );
    }
    if trials.iter().any(|t| !t.passed) {
        bail!("permuted model differs beyond rtol {RTOL} / atol {ATOL}: a group is wrong");
    }
    Ok(())
}
