use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mudsc::data::{self, NamedArrays};
use mudsc::onnx::TensorData;

use super::BackendArgs;

#[derive(Args)]
pub struct RunArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Input data: .npz/.npy (keys = graph input names), .pb, or a test_data_set directory.
    #[arg(long, short)]
    input: PathBuf,
    /// Save the outputs to this .npz file (keys = output names).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Also return these intermediate values (ONNX tensor names), comma-separated.
    #[arg(long, value_delimiter = ',')]
    extra: Vec<String>,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: RunArgs) -> Result<()> {
    // Checked first: a bad output path should cost nothing.
    if let Some(path) = &args.output {
        mudsc::atomic::check_output(path, &[args.model.clone(), args.input.clone()])?;
    }
    let model = mudsc::onnx::load(&args.model)?;
    let arrays = data::read(&args.input)?;
    let mut session = mudsc::runtime::open_session(
        args.backend.kind(),
        &model,
        &args.extra,
        &args.backend.options(),
    )?;
    let inputs = data::into_inputs(arrays, &model, &args.input)?;
    let outputs = mudsc::runtime::run_batched(session.as_mut(), &inputs, args.backend.batch)?;
    let names = session.output_names().to_vec();
    for (name, t) in names.iter().zip(&outputs) {
        println!("{}", describe(name, t));
    }
    if let Some(path) = &args.output {
        let mut protect = model.source_files();
        protect.push(args.input.clone());
        let named = NamedArrays(names.into_iter().zip(outputs).collect());
        data::write_npz(path, &named, &protect)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One line per output: name, dtype, shape and value statistics.
fn describe(name: &str, t: &TensorData) -> String {
    let v = t.to_f32();
    let finite: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let non_finite = v.len() - finite.len();
    let (min, max, mean) = if finite.is_empty() {
        (f32::NAN, f32::NAN, f64::NAN)
    } else {
        let min = finite.iter().copied().fold(f32::INFINITY, f32::min);
        let max = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mean = finite.iter().map(|&x| x as f64).sum::<f64>() / finite.len() as f64;
        (min, max, mean)
    };
    let mut line = format!(
        "{name}: {} {:?}  min {min:.6} max {max:.6} mean {mean:.6}",
        t.dtype().name(),
        t.shape()
    );
    if non_finite > 0 {
        line.push_str(&format!("  ({non_finite} NaN/inf)"));
    }
    line
}
