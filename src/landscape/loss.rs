//! Cross-entropy per task and joint, with the conventions of `eval`'s accuracies: a task's
//! loss is the softmax over that task's classes on that task's samples; the joint loss is the
//! softmax over every class on every sample. Sums run in f64 with a stable log-sum-exp.

use ndarray::ArrayView2;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::eval::ClassRange;

/// How the model's outputs stand for the tasks' classes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Head {
    /// Output k is class k (one shared output space): task losses and the joint loss.
    Shared,
    /// Every task reads the same outputs as its own classes (separate heads of equal width
    /// exported as one output): output k is class `task.first + k` for each task; no joint
    /// loss, since no output says which task a sample belongs to.
    PerTask,
}

/// The tasks and how the outputs map onto their classes.
#[derive(Clone, Debug, Serialize)]
pub struct LossSpec {
    pub tasks: Vec<ClassRange>,
    pub head: Head,
    /// Width of the model's output.
    pub outputs: usize,
}

impl LossSpec {
    /// Picks the head reading for a model with `outputs` logits: shared when every task fits
    /// in 0..outputs, per-task when every task is exactly `outputs` wide (and some does not
    /// fit), else an error naming the task.
    pub fn new(tasks: Vec<ClassRange>, outputs: usize) -> Result<LossSpec> {
        if outputs == 0 {
            return Err(Error::Usage(
                "the model's first output has no classes".into(),
            ));
        }
        ClassRange::check_disjoint(&tasks)?;
        let head = if tasks.iter().all(|t| t.last < outputs) {
            Head::Shared
        } else if tasks.iter().all(|t| t.len() == outputs) {
            Head::PerTask
        } else {
            let bad = tasks
                .iter()
                .find(|t| t.last >= outputs)
                .map(|t| t.to_string());
            return Err(Error::Usage(format!(
                "task {} lies outside the model's {outputs} outputs",
                bad.unwrap_or_default()
            )));
        };
        Ok(LossSpec {
            tasks,
            head,
            outputs,
        })
    }

    /// Whether there is a joint loss (shared outputs only).
    pub fn has_joint(&self) -> bool {
        self.head == Head::Shared
    }

    /// Panel names: one per task, then the joint.
    pub fn names(&self) -> Vec<String> {
        let mut out: Vec<String> = self.tasks.iter().map(|t| format!("task {t}")).collect();
        if self.has_joint() {
            out.push("joint".into());
        }
        out
    }

    /// Errors when a task has no sample among `labels` (its loss would be undefined).
    pub fn check_labels(&self, labels: &[i64]) -> Result<()> {
        for t in &self.tasks {
            if !labels.iter().any(|&l| t.contains(l)) {
                return Err(Error::Usage(format!(
                    "the data has no sample of task {t} (labels {})",
                    label_summary(labels)
                )));
            }
        }
        if self.has_joint()
            && !labels
                .iter()
                .any(|&l| l >= 0 && (l as usize) < self.outputs)
        {
            return Err(Error::Usage(format!(
                "no label lies among the model's {} classes",
                self.outputs
            )));
        }
        Ok(())
    }
}

fn label_summary(labels: &[i64]) -> String {
    match (labels.iter().min(), labels.iter().max()) {
        (Some(lo), Some(hi)) => format!("{lo}..{hi}"),
        _ => "none".into(),
    }
}

/// Mean cross-entropy per task (in task order) and joint (last, when the head is shared).
/// Samples whose label is outside a task are not counted for it; NaN logits give NaN.
pub fn cross_entropy(logits: ArrayView2<f32>, labels: &[i64], spec: &LossSpec) -> Result<Vec<f64>> {
    let (n, c) = logits.dim();
    if labels.len() != n {
        return Err(Error::Usage(format!(
            "{} labels for {n} samples",
            labels.len()
        )));
    }
    if c != spec.outputs {
        return Err(Error::Usage(format!(
            "the model has {c} outputs, expected {}",
            spec.outputs
        )));
    }
    let mut sums = vec![(0.0f64, 0usize); spec.names().len()];
    for (row, &label) in logits.rows().into_iter().zip(labels) {
        for (t, task) in spec.tasks.iter().enumerate() {
            if !task.contains(label) {
                continue;
            }
            let first = match spec.head {
                Head::Shared => task.first,
                Head::PerTask => 0,
            };
            let cols = first..first + task.len();
            let target = first + (label as usize - task.first);
            sums[t].0 += nll(row.iter().skip(cols.start).take(cols.len()), row[target]);
            sums[t].1 += 1;
        }
        if spec.has_joint() && label >= 0 && (label as usize) < c {
            let j = spec.tasks.len();
            sums[j].0 += nll(row.iter(), row[label as usize]);
            sums[j].1 += 1;
        }
    }
    Ok(sums
        .into_iter()
        .map(|(s, k)| if k == 0 { f64::NAN } else { s / k as f64 })
        .collect())
}

/// −log softmax(target) over `scores`: log Σ exp(s − max) + max − target.
fn nll<'a>(scores: impl Iterator<Item = &'a f32> + Clone, target: f32) -> f64 {
    let max = scores
        .clone()
        .fold(f64::NEG_INFINITY, |m, &s| m.max(f64::from(s)));
    let sum: f64 = scores.map(|&s| (f64::from(s) - max).exp()).sum();
    sum.ln() + max - f64::from(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn task_and_joint_losses_by_hand() {
        let logits = array![[2.0f32, 0.0, 1.0, 1.0], [0.0, 0.0, 3.0, 0.0]];
        let tasks = ClassRange::parse_list("0-1,2-3").unwrap();
        let spec = LossSpec::new(tasks, 4).unwrap();
        assert_eq!(spec.head, Head::Shared);
        let l = cross_entropy(logits.view(), &[0, 3], &spec).unwrap();
        let ln = |x: f64| x.ln();
        let e = std::f64::consts::E;
        // Task 0-1, sample 0: softmax over [2, 0], target 2.
        assert!((l[0] - (ln(e * e + 1.0) - 2.0)).abs() < 1e-12);
        // Task 2-3, sample 1: softmax over [3, 0], target 0.
        assert!((l[1] - (ln(e.powi(3) + 1.0) - 0.0)).abs() < 1e-12);
        // Joint: mean of sample 0 over all four (target 2) and sample 1 (target 0).
        let j0 = ln(e * e + 1.0 + e + e) - 2.0;
        let j1 = ln(3.0 + e.powi(3)) - 0.0;
        assert!((l[2] - 0.5 * (j0 + j1)).abs() < 1e-12);
    }

    #[test]
    fn per_task_head_reads_the_same_outputs_for_each_task() {
        let logits = array![[1.0f32, 0.0], [0.0, 1.0]];
        let spec = LossSpec::new(ClassRange::parse_list("0-1,5-6").unwrap(), 2).unwrap();
        assert_eq!(spec.head, Head::PerTask);
        assert_eq!(spec.names(), vec!["task 0-1", "task 5-6"]);
        let l = cross_entropy(logits.view(), &[0, 6], &spec).unwrap();
        let want = (1.0f64.exp() + 1.0).ln() - 1.0;
        assert!((l[0] - want).abs() < 1e-12 && (l[1] - want).abs() < 1e-12);
        assert!(LossSpec::new(ClassRange::parse_list("0-1,5-7").unwrap(), 2).is_err());
        assert!(spec.check_labels(&[0, 1]).is_err());
    }
}
