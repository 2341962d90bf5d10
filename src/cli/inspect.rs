use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct InspectArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let model = mudsc::onnx::load(&args.model)?;
    let s = mudsc::inspect::summarize(&model)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("model       {}", s.path);
    println!("ir_version  {}", s.ir_version);
    let opsets: Vec<String> = s.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
    println!("opsets      {}", opsets.join(", "));
    println!("producer    {}", s.producer);
    for (label, values) in [("input ", &s.inputs), ("output", &s.outputs)] {
        for v in values {
            let shape = v
                .shape
                .as_ref()
                .map(|d| format!("[{}]", d.join(", ")))
                .unwrap_or_else(|| "(no shape)".into());
            println!("{label}      {} {} {}", v.name, v.dtype, shape);
        }
    }
    println!(
        "parameters  {} in {} initializers, {}",
        s.parameters,
        s.initializers,
        human_bytes(s.parameter_bytes)
    );
    for f in &s.external_data_files {
        println!("external    {f}");
    }
    for sg in &s.subgraphs {
        println!("subgraph    {sg}");
    }
    for (k, v) in &s.metadata {
        println!("metadata    {k} = {v}");
    }
    println!("nodes       {}", s.nodes);
    let mut ops: Vec<(&String, &usize)> = s.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, count) in ops {
        println!("  {count:>6}  {op}");
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
