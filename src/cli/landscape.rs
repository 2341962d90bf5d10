use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mudsc::data;
use mudsc::landscape::plot::{render_png, PlotOptions};
use mudsc::landscape::{
    evaluate, merge_settings, Data, EvalOptions, Grid, Landscape, LossSpec, Marker, ParamSpace,
    Plane,
};
use mudsc::merge::{align_to_first, MergeOptions};
use mudsc::onnx::TensorData;

use super::eval::{parse_tasks, Tasks};
use super::BackendArgs;

#[derive(Args)]
pub struct LandscapeArgs {
    /// Model A (the picture's origin).
    #[arg(value_name = "A")]
    a: PathBuf,
    /// Model B (aligned to A before drawing).
    #[arg(value_name = "B")]
    b: PathBuf,
    /// The model merged from A and B, with A's initializer names (as `mudsc merge` writes it).
    #[arg(value_name = "MERGED")]
    merged: PathBuf,
    /// Labelled data the losses are measured on: inputs under the graph input names, labels
    /// under --labels.
    #[arg(long)]
    data: PathBuf,
    /// Key of the integer labels in the data file.
    #[arg(long, default_value = "labels")]
    labels: String,
    /// Tasks as class ranges, e.g. 0-4,5-9: one panel per task (softmax over its classes, on its
    /// samples) besides the joint loss.
    #[arg(long, value_parser = parse_tasks)]
    tasks: Option<Tasks>,
    /// The picture (PNG).
    #[arg(long, short)]
    output: PathBuf,
    /// Grid points per side.
    #[arg(long, default_value_t = 21)]
    grid: usize,
    /// How far the grid reaches beyond the triangle of the three models, as a share of its
    /// extent on each side.
    #[arg(long, default_value_t = 0.3)]
    margin: f64,
    /// Also write every grid point's losses (and the three models') as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Only use the first N data samples (faster).
    #[arg(long)]
    samples: Option<usize>,
    /// Data for aligning B to A (default: --data, all of it).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Picture size in pixels [default: 500 per panel x 500].
    #[arg(long, value_parser = parse_size, value_name = "WxH")]
    size: Option<(u32, u32)>,
    /// Worker threads evaluating grid points (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    backend: BackendArgs,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("'{s}' is not a size like 1500x500");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h) = (
        w.trim().parse::<u32>().map_err(|_| bad())?,
        h.trim().parse::<u32>().map_err(|_| bad())?,
    );
    if !(200..=20_000).contains(&w) || !(150..=20_000).contains(&h) {
        return Err(format!(
            "size {w}x{h} is outside 200x150 .. 20000x20000 pixels"
        ));
    }
    Ok((w, h))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

pub fn run(args: LandscapeArgs) -> Result<()> {
    let started = Instant::now();
    let (a_path, b_path, m_path) = (&args.a, &args.b, &args.merged);
    if args.grid < 2 || args.grid > 401 {
        return Err(mudsc::Error::Usage(format!(
            "--grid {} must be between 2 and 401 points per side",
            args.grid
        ))
        .into());
    }
    // Outputs first: one file under two spellings, special files, missing directories.
    let mut outputs: Vec<(&str, &Path)> = vec![("-o", args.output.as_path())];
    if let Some(csv) = &args.csv {
        outputs.push(("--csv", csv.as_path()));
    }
    mudsc::atomic::refuse_same_outputs(&outputs)?;
    for (_, out) in &outputs {
        mudsc::atomic::check_output(out, &[])?;
    }
    let a = mudsc::onnx::load(a_path)?;
    let b = mudsc::onnx::load(b_path)?;
    let merged = mudsc::onnx::load(m_path)?;
    let mut protect: Vec<PathBuf> = [&a, &b, &merged]
        .iter()
        .flat_map(|m| m.source_files())
        .collect();
    protect.push(args.data.clone());
    protect.extend(args.calib.clone());
    // Refused now rather than after minutes of evaluation.
    for (_, out) in &outputs {
        mudsc::atomic::refuse_protected(out, &protect)?;
    }

    // Data and labels.
    let mut arrays = data::read(&args.data)?;
    let mut labels = data::take_labels(&mut arrays, &args.labels, &args.data)?;
    let all_inputs = data::bind_inputs(&arrays, &a, &args.data)?;
    let mut inputs = all_inputs.clone();
    if let Some(n) = args.samples {
        if n == 0 {
            return Err(mudsc::Error::Usage("--samples must be at least 1".into()).into());
        }
        inputs = head(&inputs, n);
        labels.truncate(n);
    }
    if labels.len() != data::sample_count(&inputs) {
        return Err(mudsc::Error::Data {
            path: args.data.clone(),
            reason: format!(
                "{} labels for {} samples",
                labels.len(),
                data::sample_count(&inputs)
            ),
        }
        .into());
    }
    let calib = match &args.calib {
        Some(p) => data::bind_inputs(&data::read(p)?, &a, p)?,
        None => all_inputs,
    };

    // Checked before the (slower) alignment: the merged model must be a point of A's space.
    let settings = merge_settings(&merged)?;
    if let Some(note) = &settings.note {
        eprintln!("note: {note}");
    }
    let space = ParamSpace::new(&a, &merged)?;

    // B in A's coordinates, with the matching the merge used.
    let align_method = settings.method.alignment();
    let opts = MergeOptions {
        method: settings.method,
        alpha: settings.alpha,
        backend: args.backend.kind(),
        backend_options: args.backend.options(),
        batch: args.backend.batch.clamp(1, 256),
        repair_samples: 0,
        ..Default::default()
    };
    eprintln!(
        "aligning B to A with {} (α {})",
        align_method.name(),
        settings.alpha
    );
    let mut progress = super::progress::Progress::default();
    let aligned = align_to_first(
        &[a.clone(), b.clone()],
        &calib,
        &opts,
        &mut |phase, done, total| progress.update(phase, done, total),
    )
    .with_context(|| format!("aligning {} to {}", b_path.display(), a_path.display()))?;
    progress.finish();
    let Some(b_aligned) = aligned.get(1) else {
        bail!("the alignment returned no model B");
    };
    let align_secs = started.elapsed().as_secs_f64();

    // The plane.
    let thetas = [
        space.flatten(&a)?,
        space.flatten(b_aligned)?,
        space.flatten(&merged)?,
    ];
    let plane = Plane::through(&thetas[0], &thetas[1], &thetas[2])?;
    if let Some(note) = &plane.note {
        eprintln!("note: {note}");
    }
    let grid = Grid::around(&plane.coords, args.grid, args.margin)?;

    // Losses at the three models and over the grid.
    let eval_opts = EvalOptions {
        backend: args.backend.kind(),
        backend_options: args.backend.options(),
        batch: args.backend.batch.max(1),
        threads: args.threads,
    };
    let outputs = mudsc::landscape::grid::output_width(&a, &inputs, &eval_opts)?;
    let tasks = args.tasks.clone().map(|t| t.0).unwrap_or_default();
    let spec = LossSpec::new(tasks, outputs)?;
    if spec.head == mudsc::landscape::Head::PerTask {
        eprintln!(
            "note: the models have {outputs} outputs and every task has {outputs} classes: each \
             task reads the outputs as its own classes (separate heads); there is no joint loss"
        );
    }
    spec.check_labels(&labels)?;
    let data = Data {
        inputs: &inputs,
        labels: &labels,
        spec: &spec,
    };
    let at_models = evaluate(&space, &plane, &plane.coords, &data, &eval_opts, &|| {})?;
    let points = grid.points();
    // One bar shared by the worker threads (indicatif's bar is thread-safe), in the style of
    // the other phases' bars, drawn only when stderr is a terminal.
    let bar =
        ProgressBar::with_draw_target(Some(points.len() as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>12} [{bar:32}] {pos}/{len} {elapsed_precise} (eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("grid points");
    let grid_started = Instant::now();
    let at_grid = evaluate(&space, &plane, &points, &data, &eval_opts, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let grid_secs = grid_started.elapsed().as_secs_f64();

    let labels_of = ["A", "B", "merged"];
    let markers: Vec<Marker> = plane
        .coords
        .iter()
        .zip(at_models)
        .zip(labels_of)
        .map(|((&(x, y), losses), label)| Marker {
            label: label.into(),
            x,
            y,
            losses,
        })
        .collect();
    let landscape = Landscape::new(spec.names(), &grid, at_grid, markers)?;

    // Outputs.
    let panels = landscape.names.len() as u32;
    let aligns = align_method != mudsc::merge::Method::Avg;
    let (w, h) = args.size.unwrap_or((500 * panels.max(1) + 90, 520));
    let plot = PlotOptions {
        width: w,
        height: h,
        title: format!(
            "Loss landscape on the plane through A = {}, B = {}{} and merged = {}",
            file_name(a_path),
            file_name(b_path),
            if aligns { " (aligned to A)" } else { "" },
            file_name(m_path)
        ),
        subtitle: format!(
            "merged by {} (α {}); {}; mean cross-entropy on {} samples of {}{}",
            settings.method.name(),
            settings.alpha,
            if aligns {
                format!("B aligned by {}", align_method.name())
            } else {
                "B as given (plain averaging matches no units)".into()
            },
            labels.len(),
            file_name(&args.data),
            if plane.note.is_some() {
                "; the three models are collinear"
            } else {
                ""
            }
        ) + &if spec.head == mudsc::landscape::Head::PerTask {
            format!("; separate heads: each task reads the {outputs} outputs as its classes")
        } else {
            String::new()
        },
        x_desc: "direction A → B (parameter-space distance)".into(),
        y_desc: if plane.note.is_some() {
            "an orthogonal direction".into()
        } else {
            "orthogonal, towards merged".into()
        },
    };
    let png = render_png(&landscape, &plot)?;
    mudsc::atomic::write_atomic(&args.output, &protect, &png)
        .with_context(|| format!("writing {}", args.output.display()))?;
    if let Some(path) = &args.csv {
        // A CSV that cannot be written takes the picture with it: nothing half-done stays.
        if let Err(e) = mudsc::atomic::write_atomic(path, &protect, landscape.to_csv().as_bytes()) {
            let _ = std::fs::remove_file(&args.output);
            return Err(e).with_context(|| format!("writing {}", path.display()));
        }
    }

    print_summary(&landscape, &plane);
    println!(
        "wrote {} ({w}x{h}){}; {}x{} grid over x [{:.3}, {:.3}], y [{:.3}, {:.3}]",
        args.output.display(),
        args.csv
            .as_ref()
            .map(|p| format!(" and {}", p.display()))
            .unwrap_or_default(),
        args.grid,
        args.grid,
        grid.xs[0],
        grid.xs[grid.xs.len() - 1],
        grid.ys[0],
        grid.ys[grid.ys.len() - 1],
    );
    println!(
        "time {:.1}s (alignment {:.1}s, {} grid points {:.1}s, {} samples each)",
        started.elapsed().as_secs_f64(),
        align_secs,
        points.len(),
        grid_secs,
        labels.len()
    );
    Ok(())
}

fn head(inputs: &[TensorData], n: usize) -> Vec<TensorData> {
    inputs
        .iter()
        .map(|t| t.slice_rows(0, n.min(t.shape()[0])))
        .collect()
}

fn print_summary(l: &Landscape, plane: &Plane) {
    let (bx, mx, my) = (plane.coords[1].0, plane.coords[2].0, plane.coords[2].1);
    println!(
        "plane: |B − A| = {bx:.4}, merged at ({mx:.4}, {my:.4}) (A at the origin, B on the x axis)"
    );
    let mut header = format!("{:<8}", "loss");
    for n in &l.names {
        header.push_str(&format!(" {n:>10}"));
    }
    println!("{header}");
    for m in &l.markers {
        let mut row = format!("{:<8}", m.label);
        for v in &m.losses {
            row.push_str(&format!(" {v:>10.4}"));
        }
        println!("{row}");
    }
}
