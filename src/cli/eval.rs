use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use mudsc::data;
use mudsc::eval::{evaluate, ClassRange};
use ndarray::Ix2;

use super::BackendArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// The ONNX classifier (output 0 holds the logits, [N, classes]).
    model: PathBuf,
    /// Labelled data: inputs under the graph input names, labels under --labels.
    #[arg(long)]
    data: PathBuf,
    /// Key of the integer labels in the data file.
    #[arg(long, default_value = "labels")]
    labels: String,
    /// Tasks as class ranges, e.g. 0-4,5-9: adds per-task accuracy and their mean.
    #[arg(long, value_parser = parse_tasks)]
    tasks: Option<Tasks>,
    /// The classes the model's outputs stand for (default 0..outputs-1), e.g. 5-9 for a head
    /// trained on classes 5-9 only; samples of other classes are skipped.
    #[arg(long)]
    classes: Option<ClassRange>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

/// A task list as one argument (`0-4,5-9`).
#[derive(Clone, Debug)]
pub struct Tasks(pub Vec<ClassRange>);

fn parse_tasks(s: &str) -> Result<Tasks, String> {
    ClassRange::parse_list(s)
        .map(Tasks)
        .map_err(|e| e.to_string())
}

pub fn run(args: EvalArgs) -> Result<()> {
    let model = mudsc::onnx::load(&args.model)?;
    let mut arrays = data::read(&args.data)?;
    let labels = arrays
        .take(&args.labels)
        .ok_or_else(|| mudsc::Error::Data {
            path: args.data.clone(),
            reason: format!(
                "no labels under key '{}' (the file has: {}); use --labels",
                args.labels,
                arrays.names().join(", ")
            ),
        })?
        .to_labels()
        .ok_or_else(|| mudsc::Error::Data {
            path: args.data.clone(),
            reason: format!("labels '{}' must be integers", args.labels),
        })?;
    let mut session =
        mudsc::runtime::open_session(args.backend.kind(), &model, &[], &args.backend.options())?;
    let inputs = data::bind_inputs(&arrays, &model, &args.data)?;
    let outputs = mudsc::runtime::run_batched(session.as_mut(), &inputs, args.backend.batch)?;
    let Some(first) = outputs.first() else {
        bail!("{} has no outputs", args.model.display());
    };
    let logits = first
        .to_f32()
        .into_dimensionality::<Ix2>()
        .with_context(|| {
            format!(
                "output '{}' has shape {:?}; eval needs logits [samples, classes]",
                session.output_names()[0],
                first.shape()
            )
        })?;
    let tasks = args.tasks.map(|t| t.0).unwrap_or_default();
    let report = evaluate(logits.view(), &labels, &tasks, args.classes.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let label = if tasks.is_empty() { "top-1" } else { "joint" };
    println!("{}  {label:<10} {}", args.model.display(), report.top1);
    for t in &report.tasks {
        println!(
            "{}  task {:<5} {}",
            args.model.display(),
            t.classes,
            t.accuracy
        );
    }
    if let Some(mean) = report.task_mean {
        println!(
            "{}  task mean  {:6.2} %",
            args.model.display(),
            100.0 * mean
        );
    }
    Ok(())
}
