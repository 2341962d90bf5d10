use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use mudsc::data;
use mudsc::onnx::{Model, TensorData};
use mudsc::symmetry::{self, Discovery, GroupKind};

/// How a command gets the model's concrete shapes and, optionally, data.
#[derive(Args, Clone, Debug)]
pub struct DiscoverArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Input data (.npz/.npy/.pb/test_data_set dir); its shapes are used for discovery.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// An input shape, `name=1,3,28,28` (repeatable); symbolic dimensions default to 1.
    #[arg(long, value_parser = parse_shape)]
    pub shape: Vec<(String, Vec<usize>)>,
    /// Override discovery with an edited `groups --json` document: groups it omits or marks
    /// `"fixed": true` stay in place.
    #[arg(long, value_name = "SPEC.json")]
    pub groups: Option<PathBuf>,
    /// Arrays given in memory (the Python API's numpy arrays), used instead of reading
    /// `--data`, which then only names them in messages.
    #[arg(skip)]
    pub data_arrays: Option<data::NamedArrays>,
}

fn parse_shape(s: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not name=d0,d1,..."))?;
    let dims = dims
        .split(',')
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad dimension '{d}' in '{s}'"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_string(), dims))
}

pub struct Discovered {
    pub model: Model,
    pub discovery: Discovery,
    pub inputs: Option<Vec<TensorData>>,
}

pub fn discover(args: &DiscoverArgs) -> Result<Discovered> {
    let model = mudsc::onnx::load(&args.model)?;
    let inputs = match (&args.data, &args.data_arrays) {
        (Some(p), Some(arrays)) => Some(data::bind_inputs(arrays, &model, p)?),
        (Some(p), None) => Some(data::bind_inputs(&data::read(p)?, &model, p)?),
        (None, _) => None,
    };
    let shapes = data::input_shapes(&model, inputs.as_deref(), &args.shape, 1)?;
    let value_shapes = mudsc::graph::infer_shapes(&model, &shapes)?;
    let mut discovery = symmetry::discover(&model, &value_shapes)?;
    if let Some(spec) = &args.groups {
        let dropped = symmetry::spec::apply_override(&mut discovery, spec)
            .with_context(|| format!("applying {}", spec.display()))?;
        eprintln!("{}: {dropped} group(s) fixed by the spec", spec.display());
    }
    Ok(Discovered {
        model,
        discovery,
        inputs,
    })
}

#[derive(Args)]
pub struct GroupsArgs {
    #[command(flatten)]
    pub discover: DiscoverArgs,
    /// Print the stable JSON document (can be edited and fed back with --groups).
    #[arg(long)]
    json: bool,
    /// Compare with a committed `groups --json` document: exit 0 when the groups are the same
    /// up to numbering, else exit 1 listing what changed (groups that appeared or vanished,
    /// widths, blocks, weight axes moved between groups). The CI gate for exported graphs.
    #[arg(long, value_name = "SPEC.json")]
    expect: Option<PathBuf>,
}

/// The `mudsc-groups/1` document of the model (`groups --json`; `mudsc.groups()` in Python).
pub fn document(args: &DiscoverArgs) -> Result<serde_json::Value> {
    let d = discover(args)?;
    let name = args.model.display().to_string();
    Ok(serde_json::to_value(symmetry::spec::report(
        &name,
        &d.discovery,
    ))?)
}

pub fn run(args: GroupsArgs) -> Result<()> {
    let d = discover(&args.discover)?;
    let disc = &d.discovery;
    let name = args.discover.model.display().to_string();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&symmetry::spec::report(&name, disc))?
        );
    } else {
        print_groups(&name, disc);
    }
    if let Some(spec) = &args.expect {
        let changes = symmetry::expect::compare(spec, disc)?;
        // With --json, stdout is the document: the verdict goes to stderr.
        let say = |line: String| {
            if args.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        };
        if !changes.is_empty() {
            say(String::new());
            for c in &changes {
                say(c.to_string());
            }
            bail!(
                "{name}: {} difference(s) from {}",
                changes.len(),
                spec.display()
            );
        }
        say(format!(
            "{name}: the {} groups match {} (up to numbering)",
            disc.groups.len(),
            spec.display()
        ));
    }
    Ok(())
}

fn print_groups(name: &str, disc: &Discovery) {
    println!(
        "{name}: {} groups, {} fixed weight axes",
        disc.groups.len(),
        disc.fixed.len()
    );
    for g in &disc.groups {
        let kind = match &g.kind {
            GroupKind::Plain => String::new(),
            GroupKind::Blocked {
                blocks,
                block_size,
                block_perm_shared_with,
            } => {
                let shared = if block_perm_shared_with.is_empty() {
                    String::new()
                } else {
                    let ids: Vec<String> = block_perm_shared_with
                        .iter()
                        .map(|i| format!("g{i}"))
                        .collect();
                    format!(", block order shared with {}", ids.join(" "))
                };
                format!("  ({blocks} blocks × {block_size}{shared})")
            }
        };
        println!("\ng{}  width {}{kind}", g.id, g.width);
        if let Some(tap) = &g.tap {
            println!("    tap     {tap}");
        }
        for m in &g.members {
            println!(
                "    {}[axis {}]  {}  = {}",
                m.tensor, m.axis, m.size, m.layout
            );
        }
    }
    if !disc.fixed.is_empty() {
        println!("\nfixed weight axes:");
        for f in &disc.fixed {
            println!(
                "    {}[axis {}]  {}: {}",
                f.tensor,
                f.axis,
                f.size,
                f.reasons.join("; ")
            );
        }
    }
    for (op, n) in &disc.unknown_ops {
        println!("unknown op {op} ×{n}: its axes are fixed");
    }
}
