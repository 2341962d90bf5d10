//! Classification accuracy, the way the merging papers score a model that serves several tasks:
//! joint accuracy (argmax over every class, all samples) and per-task accuracy (argmax over the
//! task's own classes, on that task's samples), and the mean of the per-task accuracies.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use ndarray::{ArrayView2, Axis};
use serde::Serialize;

use crate::error::{Error, Result};

/// An inclusive class range such as `0-4`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClassRange {
    pub first: usize,
    pub last: usize,
}

impl ClassRange {
    pub fn range(&self) -> RangeInclusive<usize> {
        self.first..=self.last
    }

    pub fn len(&self) -> usize {
        self.last - self.first + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, class: i64) -> bool {
        class >= 0 && self.range().contains(&(class as usize))
    }

    /// Errors if two tasks share a class (a duplicate or overlapping `--tasks` range would
    /// count its samples twice in the task mean).
    pub fn check_disjoint(tasks: &[ClassRange]) -> Result<()> {
        for (i, a) in tasks.iter().enumerate() {
            for b in &tasks[..i] {
                if a.first <= b.last && b.first <= a.last {
                    return Err(Error::Usage(format!(
                        "--tasks {b} and {a} overlap; every class belongs to one task"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Parses a comma-separated list of ranges, `0-4,5-9`.
    pub fn parse_list(s: &str) -> Result<Vec<ClassRange>> {
        s.split(',').map(str::parse).collect()
    }
}

impl FromStr for ClassRange {
    type Err = Error;

    fn from_str(s: &str) -> Result<ClassRange> {
        let bad = || Error::Usage(format!("'{s}' is not a class range like 0-4"));
        let (a, b) = s.trim().split_once('-').unwrap_or((s.trim(), s.trim()));
        let first: usize = a.trim().parse().map_err(|_| bad())?;
        let last: usize = b.trim().parse().map_err(|_| bad())?;
        if last < first {
            return Err(bad());
        }
        Ok(ClassRange { first, last })
    }
}

impl fmt::Display for ClassRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Correct predictions out of a sample count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
}

impl Accuracy {
    pub fn value(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

impl fmt::Display for Accuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:6.2} %  ({}/{})",
            100.0 * self.value(),
            self.correct,
            self.total
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskAccuracy {
    pub classes: ClassRange,
    pub accuracy: Accuracy,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// Top-1 over all the model's classes (= joint accuracy when there are tasks).
    pub top1: Accuracy,
    pub tasks: Vec<TaskAccuracy>,
    /// Mean of the per-task accuracies (`None` without tasks).
    pub task_mean: Option<f64>,
}

/// Scores logits `[N, C]` against labels. `classes` says which labels the C outputs stand for
/// (default `0-(C-1)`); samples whose label is outside it are not counted. NaN logits never win.
pub fn evaluate(
    logits: ArrayView2<f32>,
    labels: &[i64],
    tasks: &[ClassRange],
    classes: Option<&ClassRange>,
) -> Result<EvalReport> {
    let (n, c) = logits.dim();
    if labels.len() != n {
        return Err(Error::Usage(format!(
            "{} labels for {} samples",
            labels.len(),
            n
        )));
    }
    let classes = classes.cloned().unwrap_or(ClassRange {
        first: 0,
        last: c.saturating_sub(1),
    });
    if classes.len() != c || c == 0 {
        return Err(Error::Usage(format!(
            "the model has {c} outputs but classes {classes} name {}",
            classes.len()
        )));
    }
    ClassRange::check_disjoint(tasks)?;
    for t in tasks {
        if t.first < classes.first || t.last > classes.last {
            return Err(Error::Usage(format!(
                "task {t} lies outside the model's classes {classes}"
            )));
        }
    }
    let mut top1 = Accuracy::default();
    let mut per_task = vec![Accuracy::default(); tasks.len()];
    for (row, &label) in logits.axis_iter(Axis(0)).zip(labels) {
        if !classes.contains(label) {
            continue;
        }
        let col = |class: usize| class - classes.first;
        top1.total += 1;
        if argmax(row.iter().copied()) + classes.first == label as usize {
            top1.correct += 1;
        }
        for (task, acc) in tasks.iter().zip(per_task.iter_mut()) {
            if task.contains(label) {
                acc.total += 1;
                let scores = task.range().map(|k| row[col(k)]);
                if argmax(scores) + task.first == label as usize {
                    acc.correct += 1;
                }
            }
        }
    }
    // An accuracy over no samples is no result: 0/0 printed as 0 % read as a verdict.
    if top1.total == 0 {
        let (lo, hi) = (
            labels.iter().min().copied().unwrap_or(0),
            labels.iter().max().copied().unwrap_or(0),
        );
        return Err(Error::Usage(format!(
            "no sample has a label in the model's classes {classes} (the labels run from {lo} \
             to {hi}); check --classes and the labels"
        )));
    }
    if let Some((t, _)) = tasks.iter().zip(&per_task).find(|(_, a)| a.total == 0) {
        return Err(Error::Usage(format!(
            "task {t}: no sample has a label in it; check --tasks and the labels"
        )));
    }
    let task_mean = (!tasks.is_empty())
        .then(|| per_task.iter().map(Accuracy::value).sum::<f64>() / tasks.len() as f64);
    Ok(EvalReport {
        top1,
        tasks: tasks
            .iter()
            .cloned()
            .zip(per_task)
            .map(|(classes, accuracy)| TaskAccuracy { classes, accuracy })
            .collect(),
        task_mean,
    })
}

/// Index of the largest value; NaN counts as smaller than everything, ties go to the first.
fn argmax(values: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
        if i == 0 || v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn joint_and_per_task_accuracy() {
        // 4 classes, tasks 0-1 and 2-3.
        let logits = array![
            [5.0, 1.0, 0.0, 0.0], // label 0: joint ok, task ok
            [0.0, 1.0, 9.0, 0.0], // label 1: joint wrong (2), task ok (1 > 0)
            [0.0, 0.0, 1.0, 2.0], // label 2: joint wrong (3), task wrong (3)
            [0.0, 0.0, 1.0, 2.0], // label 3: joint ok, task ok
        ];
        let tasks = ClassRange::parse_list("0-1,2-3").unwrap();
        let r = evaluate(logits.view(), &[0, 1, 2, 3], &tasks, None).unwrap();
        assert_eq!(
            r.top1,
            Accuracy {
                correct: 2,
                total: 4
            }
        );
        assert_eq!(
            r.tasks[0].accuracy,
            Accuracy {
                correct: 2,
                total: 2
            }
        );
        assert_eq!(
            r.tasks[1].accuracy,
            Accuracy {
                correct: 1,
                total: 2
            }
        );
        assert!((r.task_mean.unwrap() - 0.75).abs() < 1e-12);
    }

    #[test]
    fn class_subset_skips_other_labels_and_nan_never_wins() {
        let logits = array![[f32::NAN, 1.0], [2.0, 1.0], [0.0, 3.0]];
        let classes: ClassRange = "5-6".parse().unwrap();
        let r = evaluate(logits.view(), &[6, 5, 0], &[], Some(&classes)).unwrap();
        assert_eq!(
            r.top1,
            Accuracy {
                correct: 2,
                total: 2
            }
        );
    }

    #[test]
    fn bad_ranges_are_errors() {
        assert!("4-1".parse::<ClassRange>().is_err());
        assert!("a-b".parse::<ClassRange>().is_err());
        let logits = array![[0.0f32, 1.0]];
        let tasks = ClassRange::parse_list("0-4").unwrap();
        assert!(evaluate(logits.view(), &[0], &tasks, None).is_err());
        assert!(evaluate(logits.view(), &[0, 1], &[], None).is_err());
    }
}
