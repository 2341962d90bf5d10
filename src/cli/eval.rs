use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mudsc::data;
use mudsc::eval::{evaluate, ClassRange, EvalReport};
use ndarray::{Array2, Axis, Ix2};

use super::BackendArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// The ONNX classifiers (outputs shaped [N, classes] are logits heads); each is scored. A
    /// model with several heads (a partial zip) is scored on the heads summed, or side by
    /// side when --classes gives each head its own classes.
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
    /// The classes each head stands for (default 0..outputs-1), e.g. 5-9 for a head trained on
    /// classes 5-9 only; samples of other classes are skipped. One range for all heads, or one
    /// per head (models in order), comma-separated.
    #[arg(long, value_parser = parse_tasks)]
    classes: Option<Tasks>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendArgs,
    /// Arrays given in memory (the Python API's numpy arrays), used instead of reading
    /// `--data`, which then only names them in messages.
    #[arg(skip)]
    pub data_arrays: Option<data::NamedArrays>,
}

impl EvalArgs {
    /// Scoring `models` on `data` for another command (`merge --eval-data`).
    pub fn for_models(
        models: Vec<PathBuf>,
        data: PathBuf,
        labels: String,
        tasks: Option<Tasks>,
        backend: BackendArgs,
    ) -> EvalArgs {
        EvalArgs {
            models,
            ensemble: false,
            data,
            labels,
            tasks,
            classes: None,
            json: true,
            backend,
            data_arrays: None,
        }
    }
}

/// A task list as one argument (`0-4,5-9`).
#[derive(Clone, Debug)]
pub struct Tasks(pub Vec<ClassRange>);

pub(super) fn parse_tasks(s: &str) -> Result<Tasks, String> {
    ClassRange::parse_list(s)
        .map(Tasks)
        .map_err(|e| e.to_string())
}

pub fn run(mut args: EvalArgs) -> Result<()> {
    let reports = scores(&mut args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&document(&reports)?)?);
        return Ok(());
    }
    let no_tasks = args.tasks.as_ref().is_none_or(|t| t.0.is_empty());
    let label = if no_tasks { "top-1" } else { "joint" };
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

/// `eval --json`'s document (`mudsc.evaluate()` in Python): one model's report, or the
/// reports by model (and `ensemble`).
pub fn document(reports: &[(String, EvalReport)]) -> Result<serde_json::Value> {
    if let [(_, report)] = reports {
        return Ok(serde_json::to_value(report)?);
    }
    let map: serde_json::Map<String, serde_json::Value> = reports
        .iter()
        .map(|(n, r)| Ok((n.clone(), serde_json::to_value(r)?)))
        .collect::<Result<_>>()?;
    Ok(serde_json::Value::Object(map))
}

/// Every model's accuracy (and the ensemble's), by the name the user gave it.
pub fn scores(args: &mut EvalArgs) -> Result<Vec<(String, EvalReport)>> {
    let mut arrays = match args.data_arrays.take() {
        Some(a) => a,
        None => data::read(&args.data)?,
    };
    let labels = data::take_labels(&mut arrays, &args.labels, &args.data)?;
    let tasks = args.tasks.clone().map(|t| t.0).unwrap_or_default();
    let heads: Vec<Vec<Array2<f32>>> = args
        .models
        .iter()
        .map(|path| heads_of(path, &arrays, args))
        .collect::<Result<_>>()?;
    let total_heads: usize = heads.iter().map(Vec::len).sum();
    let head_classes: Vec<Option<ClassRange>> = match &args.classes {
        None => vec![None; total_heads],
        Some(Tasks(c)) if c.len() == 1 => vec![Some(c[0].clone()); total_heads],
        Some(Tasks(c)) if c.len() == total_heads => c.iter().cloned().map(Some).collect(),
        Some(Tasks(c)) => {
            return Err(mudsc::Error::Usage(format!(
                "--classes has {} ranges: give one for all, or one per output head ({} in all: \
                 {})",
                c.len(),
                total_heads,
                heads
                    .iter()
                    .zip(&args.models)
                    .map(|(h, p)| format!("{} in {}", h.len(), p.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into())
        }
    };
    let mut head_classes = head_classes.into_iter();
    let mut all_logits = Vec::new();
    let mut classes = Vec::new();
    let mut reports = Vec::new();
    for (path, model_heads) in args.models.iter().zip(heads) {
        let own: Vec<Option<ClassRange>> = head_classes.by_ref().take(model_heads.len()).collect();
        let (logits, model_classes) = combine_heads(model_heads, &own).map_err(|reason| {
            mudsc::Error::Usage(format!("{}: output heads: {reason}", path.display()))
        })?;
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
        let covered: Vec<ClassRange> = tasks
            .iter()
            .filter(|t| {
                model_classes
                    .as_ref()
                    .is_none_or(|c| c.first <= t.first && t.last <= c.last)
            })
            .cloned()
            .collect();
        let report = evaluate(logits.view(), &labels, &covered, model_classes.as_ref())?;
        reports.push((path.display().to_string(), report));
        all_logits.push(logits);
        classes.push(model_classes);
    }
    if args.ensemble && all_logits.len() > 1 {
        let separate =
            classes.iter().all(Option::is_some) && classes.windows(2).any(|w| w[0] != w[1]);
        let (logits, span) = if separate {
            // Separate heads: concatenate, the classes laid out in model order.
            let views: Vec<_> = all_logits.iter().map(|l| l.view()).collect();
            let span = span_of(&classes).map_err(mudsc::Error::Usage)?;
            (ndarray::concatenate(Axis(1), &views)?, span)
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
            let sum = all_logits
                .iter()
                .skip(1)
                .fold(all_logits[0].clone(), |acc, l| acc + l);
            (sum, classes[0].clone())
        };
        reports.push((
            "ensemble".into(),
            evaluate(logits.view(), &labels, &tasks, span.as_ref())?,
        ));
    }
    Ok(reports)
}

/// Runs one model over the data and returns its logits heads: every output shaped
/// [samples, classes] (a partially zipped model has one per merged model).
fn heads_of(
    path: &std::path::Path,
    arrays: &data::NamedArrays,
    args: &EvalArgs,
) -> Result<Vec<Array2<f32>>> {
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
    let heads: Vec<Array2<f32>> = outputs
        .iter()
        .filter_map(|o| o.to_f32().into_dimensionality::<Ix2>().ok())
        .filter(|o| o.nrows() == first.shape()[0])
        .collect();
    if heads.is_empty() {
        return Err(bad(format!(
            "output '{}' has shape {:?}; eval needs logits [samples, classes]",
            session.output_names()[0],
            first.shape()
        ))
        .into());
    }
    Ok(heads)
}

/// One model's heads as one logits matrix: heads for different classes side by side (their
/// ranges must follow each other), heads for the same classes summed (an ensemble over a
/// shared trunk).
fn combine_heads(
    heads: Vec<Array2<f32>>,
    classes: &[Option<ClassRange>],
) -> std::result::Result<(Array2<f32>, Option<ClassRange>), String> {
    let distinct = classes.iter().all(Option::is_some) && classes.windows(2).any(|w| w[0] != w[1]);
    if distinct {
        let views: Vec<_> = heads.iter().map(|h| h.view()).collect();
        let side_by_side = ndarray::concatenate(Axis(1), &views).map_err(|e| e.to_string())?;
        return Ok((side_by_side, span_of(classes)?));
    }
    let width = heads[0].ncols();
    if heads.iter().any(|h| h.ncols() != width) {
        return Err(format!(
            "heads of different widths ({:?}): give each its --classes range",
            heads.iter().map(|h| h.ncols()).collect::<Vec<_>>()
        ));
    }
    let sum = heads
        .iter()
        .skip(1)
        .fold(heads[0].clone(), |acc, h| acc + h);
    Ok((sum, classes.first().cloned().flatten()))
}

/// The classes of heads laid side by side, which must follow each other.
fn span_of(classes: &[Option<ClassRange>]) -> std::result::Result<Option<ClassRange>, String> {
    let ranges: Vec<&ClassRange> = classes.iter().flatten().collect();
    for w in ranges.windows(2) {
        if w[1].first != w[0].last + 1 {
            return Err(format!(
                "class ranges {} and {} do not follow each other; heads side by side need \
                 consecutive classes",
                w[0], w[1]
            ));
        }
    }
    Ok(match (ranges.first(), ranges.last()) {
        (Some(f), Some(l)) => Some(ClassRange {
            first: f.first,
            last: l.last,
        }),
        _ => None,
    })
}
