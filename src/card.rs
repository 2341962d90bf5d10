//! The model card of a merge (`mudsc merge --card merged.md`): a markdown page that travels
//! with the merged model and says how it was made, in the spirit of mergekit's generated
//! README: the inputs with their sha256 (so the merge can be reproduced and audited), the
//! method and its options, the groups merged and the weight axes left fixed, the time per
//! phase and, when the merge was scored, its accuracy beside the endpoints'.

use std::fmt::Write;

use crate::eval::EvalReport;
use crate::merge::MergeReport;
use crate::same_base::SameBaseReport;

/// A file that went into the merge: its name and sha256 (`None` for arrays given in memory).
#[derive(Clone, Debug)]
pub struct Input {
    pub name: String,
    pub sha256: Option<String>,
}

impl Input {
    /// `path`'s file name (never the user's directories) and its sha256.
    pub fn file(path: &std::path::Path) -> Input {
        Input {
            name: path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into(),
            ),
            sha256: crate::merge::sha256_hex(path),
        }
    }
}

/// Accuracy lines: every model's report on one labelled data set, the merged model first.
#[derive(Clone, Debug)]
pub struct Accuracy {
    pub data: Input,
    pub scores: Vec<(String, EvalReport)>,
}

/// What the card is made from.
pub struct Card<'a> {
    pub output: String,
    pub models: Vec<Input>,
    pub calibration: Input,
    /// The merge's options as given (`name`, value), in command-line order.
    pub options: Vec<(&'static str, String)>,
    pub report: &'a MergeReport,
    pub accuracy: Option<Accuracy>,
}

fn sha(i: &Input) -> String {
    i.sha256
        .as_deref()
        .map_or_else(|| "(in memory)".into(), |h| format!("`{h}`"))
}

fn percent(x: f64) -> String {
    format!("{:.2} %", 100.0 * x)
}

impl Card<'_> {
    /// The card as markdown.
    pub fn render(&self) -> String {
        let r = self.report;
        let mut md = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(md, "# {}\n", self.output);
        let _ = writeln!(
            md,
            "Merged from {} models with **{}** (α {}) by mudsc {}, without training.\n",
            self.models.len(),
            r.method.name(),
            r.alpha,
            env!("CARGO_PKG_VERSION")
        );
        md.push_str("## Inputs\n\n| input | file | sha256 |\n|---|---|---|\n");
        for (i, m) in self.models.iter().enumerate() {
            let _ = writeln!(md, "| model {} | {} | {} |", i, m.name, sha(m));
        }
        let _ = writeln!(
            md,
            "| calibration ({} samples) | {} | {} |\n",
            r.calibration_samples,
            self.calibration.name,
            sha(&self.calibration)
        );
        md.push_str("## Method\n\n| option | value |\n|---|---|\n");
        let _ = writeln!(md, "| method | {} |", r.method.name());
        let _ = writeln!(md, "| alpha | {} |", r.alpha);
        for (name, value) in &self.options {
            let _ = writeln!(md, "| {name} | {value} |");
        }
        let _ = writeln!(md, "| engine | {} |\n", r.engine);
        if let Some(t) = &r.partial {
            let _ = writeln!(
                md,
                "Partial zip: {} trunk nodes merged up to `{}`; every model keeps its own {} \
                 remainder nodes (one output per model).\n",
                t.trunk_nodes, t.cut_node, t.remainder_nodes
            );
        }
        let _ = writeln!(
            md,
            "## Groups\n\n{} groups merged over {} sweep(s); {} weight axes fixed (not permutable: \
             graph inputs and outputs, ops without a rule, ...); {} layers repaired, {} \
             BatchNorms reset.\n",
            r.groups.len(),
            r.sweeps,
            r.fixed_weight_axes,
            r.repaired_layers,
            r.reset_batch_norms
        );
        for (op, n) in &r.unknown_ops {
            let _ = writeln!(md, "- op `{op}` ×{n} has no rule: its axes stayed fixed");
        }
        md.push_str("| group | width | kind | similarity | merge value |\n|---|---|---|---|---|\n");
        for g in &r.groups {
            let _ = writeln!(
                md,
                "| g{} | {} | {} | {} | {:.4} |",
                g.id, g.width, g.kind, g.similarity, g.merge_value
            );
        }
        md.push_str("\n## Time\n\n| phase | seconds |\n|---|---|\n");
        for (phase, s) in &r.seconds {
            let _ = writeln!(md, "| {phase} | {s:.2} |");
        }
        let total: f64 = r.seconds.values().sum();
        let _ = writeln!(
            md,
            "| total | {total:.2} |\n\nPeak memory {:.0} MiB.",
            r.peak_rss_mib
        );
        if let Some(acc) = &self.accuracy {
            accuracy_section(&mut md, acc);
        }
        md
    }
}

/// The accuracy table: the merged model, then every input, on one labelled data set.
fn accuracy_section(md: &mut String, acc: &Accuracy) {
    let _ = writeln!(
        md,
        "\n## Accuracy\n\nTop-1 on {} ({}):\n",
        acc.data.name,
        sha(&acc.data)
    );
    let tasks: Vec<String> = acc
        .scores
        .first()
        .map(|(_, r)| r.tasks.iter().map(|t| t.classes.to_string()).collect())
        .unwrap_or_default();
    let joint = if tasks.is_empty() { "top-1" } else { "joint" };
    let _ = write!(md, "| model | {joint} |");
    for t in &tasks {
        let _ = write!(md, " task {t} |");
    }
    if !tasks.is_empty() {
        md.push_str(" task mean |");
    }
    let _ = writeln!(
        md,
        "\n|---|---|{}",
        "---|".repeat(tasks.len() + usize::from(!tasks.is_empty()))
    );
    for (i, (name, r)) in acc.scores.iter().enumerate() {
        let merged = if i == 0 { " (merged)" } else { "" };
        let _ = write!(md, "| {name}{merged} | {} |", percent(r.top1.value()));
        for t in &r.tasks {
            let _ = write!(md, " {} |", percent(t.accuracy.value()));
        }
        if let Some(mean) = r.task_mean {
            let _ = write!(md, " {} |", percent(mean));
        } else if !tasks.is_empty() {
            md.push_str(" – |");
        }
        md.push('\n');
    }
}

/// The card of a same-base merge (`merge --base … --method ties --card merged.md`).
pub struct SameBaseCard<'a> {
    pub output: String,
    pub models: Vec<Input>,
    pub base: Option<Input>,
    /// Calibration data, when given (for `--align-first` and statistics repair).
    pub calibration: Option<Input>,
    pub report: &'a SameBaseReport,
    pub accuracy: Option<Accuracy>,
}

impl SameBaseCard<'_> {
    /// The card as markdown.
    pub fn render(&self) -> String {
        let r = self.report;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# {}
",
            self.output
        );
        let _ = writeln!(
            md,
            "Merged from {} models with **{}**{} by mudsc {}, without training.\n",
            self.models.len(),
            r.method.name(),
            if r.aligned_first {
                " after aligning every model to the first"
            } else {
                ""
            },
            env!("CARGO_PKG_VERSION")
        );
        md.push_str("## Inputs\n\n| input | file | sha256 |\n|---|---|---|\n");
        for (i, m) in self.models.iter().enumerate() {
            let _ = writeln!(md, "| model {} | {} | {} |", i, m.name, sha(m));
        }
        if let Some(b) = &self.base {
            let _ = writeln!(md, "| base | {} | {} |", b.name, sha(b));
        }
        if let Some(c) = &self.calibration {
            let _ = writeln!(md, "| calibration | {} | {} |", c.name, sha(c));
        }
        md.push_str("\n## Method\n\n| option | value |\n|---|---|\n");
        let _ = writeln!(md, "| method | {} |", r.method.name());
        let _ = writeln!(md, "| weights | {:?} |", r.weights);
        for (name, value) in [("lambda", r.lambda), ("density", r.density), ("t", r.t)] {
            if let Some(v) = value {
                let _ = writeln!(md, "| {name} | {v} |");
            }
        }
        if let Some(s) = r.seed {
            let _ = writeln!(md, "| seed | {s} |");
        }
        let _ = writeln!(
            md,
            "\n## Tensors\n\n{} float tensors merged ({} parameters); {} equal in every model \
             (copied); {} not float (model 0's); {} layers repaired, {} BatchNorms reset.\n",
            r.tensors_merged,
            r.parameters_merged,
            r.tensors_equal,
            r.tensors_not_float,
            r.repaired_layers,
            r.reset_batch_norms
        );
        md.push_str(
            "| model | weight correlation with the base (identity matching) |\n|---|---|\n",
        );
        for (m, c) in self.models.iter().zip(&r.identity_weight_correlation) {
            let c = c.map_or_else(|| "–".into(), |c| format!("{c:.4}"));
            let _ = writeln!(md, "| {} | {c} |", m.name);
        }
        if let Some(k) = r.kept_fraction {
            let _ = writeln!(md, "\nTask-vector entries kept: {}.", percent(k));
        }
        if let Some(c) = r.sign_conflicts {
            let _ = writeln!(md, "Parameters with conflicting signs: {}.", percent(c));
        }
        md.push_str("\n## Time\n\n| phase | seconds |\n|---|---|\n");
        for (phase, s) in &r.seconds {
            let _ = writeln!(md, "| {phase} | {s:.2} |");
        }
        if let Some(acc) = &self.accuracy {
            accuracy_section(&mut md, acc);
        }
        md
    }
}
