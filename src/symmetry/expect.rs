//! Comparing a model's discovered groups with a committed `groups --json` document (`mudsc
//! groups --expect spec.json`): the CI gate that catches an exporter upgrade silently changing
//! a graph's structure. Groups are matched by the weight axes they rewrite, never by their
//! numbers, so a renumbering alone is no difference; what is reported is what a reviewer
//! needs: groups that appeared or vanished, changed width or block structure, and weight axes
//! that moved from one group to another (or into or out of the fixed set).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::{Discovery, GroupKind};
use crate::error::{Error, Result};

/// A weight axis: `tensor[axis N]`.
type Axis = (String, usize);

/// One group as the comparison sees it (from the spec or from discovery).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Shape {
    id: usize,
    width: usize,
    /// `(blocks, block size)` of a blocked group.
    blocks: Option<(usize, usize)>,
    members: BTreeSet<Axis>,
}

#[derive(Deserialize)]
struct Doc {
    format: String,
    groups: Vec<DocGroup>,
}

#[derive(Deserialize)]
struct DocGroup {
    id: usize,
    width: usize,
    #[serde(default)]
    blocks: Option<usize>,
    #[serde(default)]
    block_size: Option<usize>,
    members: Vec<DocMember>,
}

#[derive(Deserialize)]
struct DocMember {
    tensor: String,
    axis: usize,
}

/// One difference between the spec (its group numbers: `spec gN`) and the model (`gN`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A group the spec does not have; `from` says where its axes were in the spec.
    Appeared {
        group: usize,
        width: usize,
        axes: Vec<String>,
        from: Vec<String>,
    },
    /// A spec group the model no longer has; `now` says where its axes went.
    Vanished {
        group: usize,
        width: usize,
        axes: Vec<String>,
        now: Vec<String>,
    },
    Width {
        spec: usize,
        group: usize,
        was: usize,
        is: usize,
    },
    Blocks {
        spec: usize,
        group: usize,
        was: String,
        is: String,
    },
    /// A weight axis in another group than the spec says (`None`: in no group, i.e. fixed).
    Moved {
        axis: String,
        from: Option<usize>,
        to: Option<usize>,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Appeared {
                group,
                width,
                axes,
                from,
            } => write!(
                f,
                "group appeared: g{group} (width {width}: {}); in the spec these axes were: {}",
                axes.join(", "),
                from.join(", ")
            ),
            Change::Vanished {
                group,
                width,
                axes,
                now,
            } => write!(
                f,
                "group vanished: spec g{group} (width {width}: {}); these axes are now: {}",
                axes.join(", "),
                now.join(", ")
            ),
            Change::Width {
                spec,
                group,
                was,
                is,
            } => write!(f, "width changed: spec g{spec} → g{group}: {was} → {is}"),
            Change::Blocks {
                spec,
                group,
                was,
                is,
            } => write!(f, "blocks changed: spec g{spec} → g{group}: {was} → {is}"),
            Change::Moved { axis, from, to } => write!(
                f,
                "moved: {axis} from {} to {}",
                from.map_or("no group (fixed)".into(), |g| format!("spec g{g}")),
                to.map_or("no group (fixed)".into(), |g| format!("g{g}"))
            ),
        }
    }
}

fn axis_name((tensor, axis): &Axis) -> String {
    format!("{tensor}[axis {axis}]")
}

fn blocks_name(b: Option<(usize, usize)>) -> String {
    match b {
        Some((n, size)) => format!("{n} blocks × {size}"),
        None => "plain".into(),
    }
}

/// Reads the `mudsc-groups/1` document at `path` (errors name the file).
fn read_spec(path: &Path) -> Result<Vec<Shape>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let doc: Doc = serde_json::from_str(&text)
        .map_err(|e| Error::data(path, format!("not a groups document: {e}")))?;
    if doc.format != super::spec::FORMAT {
        return Err(Error::data(
            path,
            format!("format '{}' is not '{}'", doc.format, super::spec::FORMAT),
        ));
    }
    Ok(doc
        .groups
        .into_iter()
        .map(|g| Shape {
            id: g.id,
            width: g.width,
            blocks: g.blocks.zip(g.block_size),
            members: g.members.into_iter().map(|m| (m.tensor, m.axis)).collect(),
        })
        .collect())
}

fn discovered(d: &Discovery) -> Vec<Shape> {
    d.groups
        .iter()
        .map(|g| Shape {
            id: g.id,
            width: g.width,
            blocks: match &g.kind {
                GroupKind::Plain => None,
                GroupKind::Blocked {
                    blocks, block_size, ..
                } => Some((*blocks, *block_size)),
            },
            members: g
                .members
                .iter()
                .map(|m| (m.tensor.clone(), m.axis))
                .collect(),
        })
        .collect()
}

/// The differences between the groups the spec at `path` lists and the groups of `d`, empty
/// when they are equal up to numbering.
pub fn compare(path: &Path, d: &Discovery) -> Result<Vec<Change>> {
    Ok(diff(&read_spec(path)?, &discovered(d)))
}

fn diff(spec: &[Shape], model: &[Shape]) -> Vec<Change> {
    let owner = |groups: &[Shape]| -> BTreeMap<Axis, usize> {
        groups
            .iter()
            .flat_map(|g| g.members.iter().map(move |m| (m.clone(), g.id)))
            .collect()
    };
    let (in_spec, in_model) = (owner(spec), owner(model));
    // Pair each spec group with the model group sharing most axes, largest overlaps first.
    let mut overlaps: Vec<(usize, usize, usize)> = Vec::new();
    for (i, s) in spec.iter().enumerate() {
        for (j, m) in model.iter().enumerate() {
            let n = s.members.intersection(&m.members).count();
            if n > 0 {
                overlaps.push((n, i, j));
            }
        }
    }
    overlaps.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let (mut spec_pair, mut model_pair) = (vec![None; spec.len()], vec![None; model.len()]);
    for (_, i, j) in overlaps {
        if spec_pair[i].is_none() && model_pair[j].is_none() {
            spec_pair[i] = Some(j);
            model_pair[j] = Some(i);
        }
    }
    let places = |axes: &BTreeSet<Axis>, owners: &BTreeMap<Axis, usize>, prefix: &str| {
        let set: BTreeSet<String> = axes
            .iter()
            .map(|a| {
                owners
                    .get(a)
                    .map_or("fixed".into(), |g| format!("{prefix}g{g}"))
            })
            .collect();
        set.into_iter().collect::<Vec<_>>()
    };
    let names = |axes: &BTreeSet<Axis>| axes.iter().map(axis_name).collect::<Vec<_>>();
    let mut changes = Vec::new();
    let mut moved: BTreeSet<Axis> = BTreeSet::new();
    for (i, s) in spec.iter().enumerate() {
        let Some(j) = spec_pair[i] else {
            changes.push(Change::Vanished {
                group: s.id,
                width: s.width,
                axes: names(&s.members),
                now: places(&s.members, &in_model, ""),
            });
            continue;
        };
        let m = &model[j];
        if s.width != m.width {
            changes.push(Change::Width {
                spec: s.id,
                group: m.id,
                was: s.width,
                is: m.width,
            });
        }
        if s.blocks != m.blocks {
            changes.push(Change::Blocks {
                spec: s.id,
                group: m.id,
                was: blocks_name(s.blocks),
                is: blocks_name(m.blocks),
            });
        }
        moved.extend(s.members.symmetric_difference(&m.members).cloned());
    }
    for (j, m) in model.iter().enumerate() {
        if model_pair[j].is_none() {
            changes.push(Change::Appeared {
                group: m.id,
                width: m.width,
                axes: names(&m.members),
                from: places(&m.members, &in_spec, "spec "),
            });
        }
    }
    // Axes of a vanished or appeared group are reported with it; the rest moved one by one.
    let vanished: BTreeSet<usize> = (0..spec.len())
        .filter(|&i| spec_pair[i].is_none())
        .map(|i| spec[i].id)
        .collect();
    let appeared: BTreeSet<usize> = (0..model.len())
        .filter(|&j| model_pair[j].is_none())
        .map(|j| model[j].id)
        .collect();
    let whole = |a: &Axis| {
        in_spec.get(a).is_some_and(|g| vanished.contains(g))
            || in_model.get(a).is_some_and(|g| appeared.contains(g))
    };
    for a in moved.iter().filter(|a| !whole(a)) {
        changes.push(Change::Moved {
            axis: axis_name(a),
            from: in_spec.get(a).copied(),
            to: in_model.get(a).copied(),
        });
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: usize, width: usize, members: &[(&str, usize)]) -> Shape {
        Shape {
            id,
            width,
            blocks: None,
            members: members.iter().map(|(t, a)| (t.to_string(), *a)).collect(),
        }
    }

    fn mlp() -> Vec<Shape> {
        vec![
            group(0, 256, &[("fc1.w", 0), ("fc1.b", 0), ("fc2.w", 1)]),
            group(1, 128, &[("fc2.w", 0), ("fc2.b", 0), ("head.w", 1)]),
        ]
    }

    #[test]
    fn equal_up_to_numbering() {
        let mut renumbered = mlp();
        renumbered.reverse();
        renumbered[0].id = 7;
        renumbered[1].id = 3;
        assert!(diff(&mlp(), &renumbered).is_empty());
    }

    #[test]
    fn each_kind_of_change_is_named() {
        let spec = mlp();
        // Group 1 is gone (its axes fixed), group 0 lost fc1.b to a new group and is blocked.
        let mut model = vec![
            group(5, 256, &[("fc1.w", 0), ("fc2.w", 1)]),
            group(6, 64, &[("conv.w", 0), ("fc1.b", 0)]),
        ];
        model[0].blocks = Some((4, 64));
        let changes = diff(&spec, &model);
        let text: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            text,
            [
                "blocks changed: spec g0 → g5: plain → 4 blocks × 64",
                "group vanished: spec g1 (width 128: fc2.b[axis 0], fc2.w[axis 0], \
                 head.w[axis 1]); these axes are now: fixed",
                "group appeared: g6 (width 64: conv.w[axis 0], fc1.b[axis 0]); in the spec \
                 these axes were: fixed, spec g0",
            ],
            "{text:#?}"
        );
        // fc1.b moved with the appeared group; a move between kept groups is listed alone.
        let model = vec![
            group(0, 256, &[("fc1.w", 0), ("fc1.b", 0)]),
            group(
                1,
                128,
                &[("fc2.w", 0), ("fc2.b", 0), ("head.w", 1), ("fc2.w", 1)],
            ),
        ];
        let text: Vec<String> = diff(&spec, &model).iter().map(|c| c.to_string()).collect();
        assert_eq!(text, ["moved: fc2.w[axis 1] from spec g0 to g1"]);
        let mut wider = mlp();
        wider[1].width = 64;
        let text: Vec<String> = diff(&spec, &wider).iter().map(|c| c.to_string()).collect();
        assert_eq!(text, ["width changed: spec g1 → g1: 128 → 64"]);
    }
}
