use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mudsc::data;
use mudsc::eval::{evaluate, ClassRange};
use ndarray::Ix2;

use super::BackendArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// The ONNX classifiers (output 0 holds the logits, [N, classes]); each is scored.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// Also score the ensemble: the models' logits summed (same classes), or concatenated
    /// when every model has its own --classes head (give one range per model, comma-separated).
    #[arg(long)]
    ensemble: bool,
    /// Labelled data: inputs under the graph input names, labels under --labels.
    #[arg(long)]
    data: PathBuf,
    /// Key of the integer labels in the data file.
    #[arg(long, default_value = "labels")]
    labels: String,
    /// Tasks as class ranges, e.g. 0-4,5-9: adds per-task accuracy and their mean.
    #[arg(long, value_parser = parse_tasks)]
    tasks: Option<Tasks>,
    /// The classes each model's outputs stand for (default 0..outputs-1), e.g. 5-9 for a head
    /// trained on classes 5-9 only; samples of other classes are skipped. One range for all
    /// models, or one per model, comma-separated.
    #[arg(long, value_parser = parse_tasks)]
    classes: Option<Tasks>,
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
    let tasks = args.tasks.clone().map(|t| t.0).unwrap_or_default();
    let classes: Vec<Option<ClassRange>> = match &args.classes {
        None => vec![None; args.models.len()],
        Some(Tasks(c)) if c.len() == 1 => vec![Some(c[0].clone()); args.models.len()],
        Some(Tasks(c)) if c.len() == args.models.len() => c.iter().cloned().map(Some).collect(),
        Some(_) => {
            return Err(
                mudsc::Error::Usage("--classes needs one range, or one per model".into()).into(),
            )
        }
    };
    let mut all_logits = Vec::new();
    let mut reports = Vec::new();
    for (path, classes) in args.models.iter().zip(&classes) {
        let logits = logits_of(path, &arrays, &args)?;
        if logits.nrows() != labels.len() {
            return Err(mudsc::Error::Data {
                path: args.data.clone(),
                reason: format!(
                    "{} labels under '{}' for {} samples",
                    labels.len(),
                    args.labels,
                    logits.nrows()
                ),
            }
            .into());
        }
        // A head for some classes is scored on the tasks it covers.
        let own: Vec<ClassRange> = tasks
            .iter()
            .filter(|t| {
                classes
                    .as_ref()
                    .is_none_or(|c| c.first <= t.first && t.last <= c.last)
            })
            .cloned()
            .collect();
        let report = evaluate(logits.view(), &labels, &own, classes.as_ref())?;
        reports.push((path.display().to_string(), report));
        all_logits.push(logits);
    }
    if args.ensemble && all_logits.len() > 1 {
        let logits = if classes.iter().all(Option::is_some)
            && args.classes.as_ref().is_some_and(|c| c.0.len() > 1)
        {
            // Separate heads: concatenate, the classes laid out in model order.
            let views: Vec<_> = all_logits.iter().map(|l| l.view()).collect();
            ndarray::concatenate(ndarray::Axis(1), &views)?
        } else {
            if let Some((i, l)) = all_logits
                .iter()
                .enumerate()
                .find(|(_, l)| l.dim() != all_logits[0].dim())
            {
                return Err(mudsc::Error::Usage(format!(
                    "--ensemble sums logits, but {} gives {} classes and {} gives {}; give \
                     --classes one range per model to concatenate separate heads",
                    args.models[0].display(),
                    all_logits[0].ncols(),
                    args.models[i].display(),
                    l.ncols()
                ))
                .into());
            }
            all_logits
                .iter()
                .skip(1)
                .fold(all_logits[0].clone(), |acc, l| acc + l)
        };
        let span = classes
            .iter()
            .flatten()
            .fold(None::<ClassRange>, |acc, c| match acc {
                None => Some(c.clone()),
                Some(a) => Some(ClassRange {
                    first: a.first.min(c.first),
                    last: a.last.max(c.last),
                }),
            });
        let span = if args.classes.as_ref().is_some_and(|c| c.0.len() > 1) {
            span
        } else {
            classes[0].clone()
        };
        reports.push((
            "ensemble".into(),
            evaluate(logits.view(), &labels, &tasks, span.as_ref())?,
        ));
    }
    if args.json {
        let map: serde_json::Map<String, serde_json::Value> = reports
            .iter()
            .map(|(n, r)| Ok((n.clone(), serde_json::to_value(r)?)))
            .collect::<Result<_>>()?;
        let value = if reports.len() == 1 {
            serde_json::to_value(&reports[0].1)?
        } else {
            serde_json::Value::Object(map)
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let label = if tasks.is_empty() { "top-1" } else { "joint" };
    for (name, report) in &reports {
        println!("{name}  {label:<10} {}", report.top1);
        for t in &report.tasks {
            let task = format!("task {}", t.classes);
            println!("{name}  {task:<10} {}", t.accuracy);
        }
        if let Some(mean) = report.task_mean {
            println!("{name}  task mean  {:6.2} %", 100.0 * mean);
        }
    }
    Ok(())
}

/// Runs one model over the data and returns its first output as [samples, classes].
fn logits_of(
    path: &std::path::Path,
    arrays: &data::NamedArrays,
    args: &EvalArgs,
) -> Result<ndarray::Array2<f32>> {
    let model = mudsc::onnx::load(path)?;
    let mut session =
        mudsc::runtime::open_session(args.backend.kind(), &model, &[], &args.backend.options())?;
    let inputs = data::bind_inputs(arrays, &model, &args.data)?;
    let outputs = mudsc::runtime::run_batched(session.as_mut(), &inputs, args.backend.batch)?;
    let bad = |reason: String| mudsc::Error::Unsupported {
        path: path.to_path_buf(),
        reason,
    };
    let Some(first) = outputs.first() else {
        return Err(bad("the model has no outputs".into()).into());
    };
    first.to_f32().into_dimensionality::<Ix2>().map_err(|_| {
        bad(format!(
            "output '{}' has shape {:?}; eval needs logits [samples, classes]",
            session.output_names()[0],
            first.shape()
        ))
        .into()
    })
}
