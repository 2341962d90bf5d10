//! Scaling of the merge's kernels, printed as markdown tables with ratios to their targets:
//! 1. LAP (exact assignment) and ZipIt zip time against units per model, 256 … 4096
//!    (targets: zip of 2 × 2048 units ≤ 1 s, LAP of 4096² well under 1 s);
//! 2. statistics accumulation (Σxxᵀ in f64) GFLOP/s against the machine's GEMM peak, and the
//!    upper-triangle accumulation calibration runs against the full product;
//! 3. calibration throughput of tract against ONNX Runtime on every fixture model.
//!
//! `cargo bench --bench scaling` (add `-- quick` to stop at 2048 units, `-- matching` for the
//! first table only, `-- gemm` for the second only, `-- peak` for the kernel's f64 and f32
//! peaks alone).

use std::path::Path;
use std::time::Instant;

use mudsc::merge::{lap, zip};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};
use mudsc::stats::{add_gram, row_correlation, SymmetricGram};
use ndarray::{Array2, ArrayView2};

/// Deterministic uniform numbers in [0, 1) (a benchmark must not depend on a crate's RNG
/// stream).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-12), self.next());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Unit features of two "models": B's units are A's, shuffled, plus noise (the realistic
/// matching case); returns their stacked correlation [2W, 2W].
fn paired_similarity(w: usize, rng: &mut Lcg) -> Array2<f64> {
    let f = 48;
    let a = Array2::from_shape_fn((w, f), |_| rng.normal());
    let mut order: Vec<usize> = (0..w).collect();
    for i in (1..w).rev() {
        order.swap(i, (rng.next() * (i + 1) as f64) as usize);
    }
    let mut z = Array2::zeros((2 * w, f));
    for u in 0..w {
        for k in 0..f {
            z[[u, k]] = a[[u, k]];
            z[[w + u, k]] = a[[order[u], k]] + 0.7 * rng.normal();
        }
    }
    let r = row_correlation(z.view());
    // Exactly symmetric, as the merge's similarities are.
    (&r + &r.t()) / 2.0
}

fn seconds<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

fn matching_table(widths: &[usize]) {
    println!("### Matching: time against units per model\n");
    println!("| units per model | LAP uniform | LAP correlated | zip 2×W | zip ÷ 1 s target | LAP corr. ÷ 1 s |");
    println!("|---|---|---|---|---|---|");
    let mut rng = Lcg(42);
    for &w in widths {
        let sim = paired_similarity(w, &mut rng);
        let cross: ArrayView2<f64> = sim.slice(ndarray::s![0..w, w..2 * w]);
        let uniform = Array2::from_shape_fn((w, w), |_| rng.next());
        let (t_uni, _) = seconds(|| lap(uniform.view()).expect("square"));
        let (t_corr, _) = seconds(|| lap(cross).expect("square"));
        let (t_zip, m) = seconds(|| zip(sim.view(), 2, 0.5, 1.0));
        assert_eq!(m.p.ncols(), w);
        println!(
            "| {w} | {t_uni:.3} s | {t_corr:.3} s | {t_zip:.3} s | {:.2} | {:.2} |",
            t_zip / 1.0,
            t_corr / 1.0
        );
    }
    println!();
}

/// The GEMM peak in GFLOP/s of mudsc's kernel (`stats::add_gram`, the gemm crate, threaded as
/// calibration threads it) in `T`: a 2048³ square product, its best case, best of three after
/// a warm-up. `scripts/bench-real.sh` takes its physical limit from this.
fn gemm_peak<T: ndarray::LinalgScalar + From<u8>>() -> f64 {
    let n = 2048;
    let a = Array2::from_shape_fn((n, n), |(i, j)| T::from(((i * 7 + j * 3) % 11) as u8));
    let mut c = Array2::<T>::zeros((n, n));
    let _ = seconds(|| add_gram(&mut c, a.view())); // warm-up
    let best = (0..3)
        .map(|_| seconds(|| add_gram(&mut c, a.view())).0)
        .fold(f64::INFINITY, f64::min);
    2.0 * (n as f64).powi(3) / best / 1e9
}

fn gemm_table() {
    println!("### Statistics accumulation (Σxxᵀ, f64) against the machine's GEMM peak\n");
    let peak = gemm_peak::<f64>();
    println!("GEMM peak (gemm crate, f64, 2048³): {peak:.1} GFLOP/s\n");
    println!("| units C | batch rows N | gemm crate GFLOP/s | ÷ peak | ndarray (matrixmultiply) GFLOP/s | speed-up | upper triangle (mudsc) s | full ÷ triangle |");
    println!("|---|---|---|---|---|---|---|---|");
    for c_units in [256, 1024, 2048] {
        let rows = 16384;
        let x = Array2::from_shape_fn((rows, c_units), |(i, j)| ((i * 13 + j * 5) % 17) as f64);
        let flops = 2.0 * rows as f64 * (c_units as f64).powi(2);
        let mut g = Array2::<f64>::zeros((c_units, c_units));
        let (t_gemm, _) = seconds(|| add_gram(&mut g, x.view()));
        let mut h = Array2::<f64>::zeros((c_units, c_units));
        let (t_nd, _) = seconds(|| {
            ndarray::linalg::general_mat_mul(1.0, &x.t(), &x, 1.0, &mut h);
        });
        let worst = (&g - &h).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(worst <= 1e-6 * h.iter().fold(1.0f64, |m, v| m.max(v.abs())));
        // What calibration runs: the upper triangle only (`stats::SymmetricGram`).
        let mut tri = SymmetricGram::zeros(c_units);
        let (t_tri, _) = seconds(|| tri.add(x.view()));
        let worst = (&tri.to_full() - &g)
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(worst <= 1e-6 * g.iter().fold(1.0f64, |m, v| m.max(v.abs())));
        let (gf, nd) = (flops / t_gemm / 1e9, flops / t_nd / 1e9);
        println!(
            "| {c_units} | {rows} | {gf:.1} | {:.2} | {nd:.1} | {:.2}× | {t_tri:.3} | {:.2}× |",
            gf / peak,
            gf / nd,
            t_gemm / t_tri
        );
    }
    println!();
}

fn throughput_table() {
    println!("### Calibration throughput: tract against ONNX Runtime (CPU, batch 64)\n");
    println!("| model | tract samples/s | ort samples/s | ort ÷ tract |");
    println!("|---|---|---|---|");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("fixtures/data/calib.npz");
    let mut models: Vec<_> = std::fs::read_dir(root.join("fixtures/models"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    models.retain(|p| p.to_string_lossy().ends_with("_a.onnx"));
    models.sort();
    for path in models {
        let Ok(model) = mudsc::onnx::load(&path) else {
            continue;
        };
        let Ok(arrays) = mudsc::data::read(&data) else {
            println!("(no calibration data at {})", data.display());
            return;
        };
        let Ok(inputs) = mudsc::data::bind_inputs(&arrays, &model, &data) else {
            continue;
        };
        let inputs: Vec<_> = inputs.iter().map(|t| t.slice_rows(0, 512)).collect();
        let rate = |kind: BackendKind| -> Option<f64> {
            let mut s = open_session(kind, &model, &[], &BackendOptions::default()).ok()?;
            run_batched(s.as_mut(), &inputs, 64).ok()?; // warm-up, plan building
            let (t, out) = seconds(|| run_batched(s.as_mut(), &inputs, 64));
            out.ok()?;
            Some(512.0 / t)
        };
        let name = path.file_name().map(|n| n.to_string_lossy().to_string());
        let (tract, ort) = (rate(BackendKind::Tract), rate(BackendKind::Ort));
        let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
        let ratio = match (tract, ort) {
            (Some(t), Some(o)) => format!("{:.2}", o / t),
            _ => "n/a".into(),
        };
        println!(
            "| {} | {} | {} | {ratio} |",
            name.unwrap_or_default(),
            fmt(tract),
            fmt(ort)
        );
    }
    println!();
}

fn main() {
    // `-- peak`: the kernel's f64 and f32 peaks only, one `name: GFLOP/s` line each.
    if std::env::args().any(|a| a == "peak") {
        println!("gemm f64 GFLOP/s: {:.1}", gemm_peak::<f64>());
        println!("gemm f32 GFLOP/s: {:.1}", gemm_peak::<f32>());
        return;
    }
    // `-- gemm`: the statistics table only.
    if std::env::args().any(|a| a == "gemm") {
        gemm_table();
        return;
    }
    let quick = std::env::args().any(|a| a == "quick");
    let widths: &[usize] = if quick {
        &[256, 512, 1024, 2048]
    } else {
        &[256, 512, 1024, 2048, 3072, 4096]
    };
    matching_table(widths);
    // `-- matching`: the first table only.
    if std::env::args().any(|a| a == "matching") {
        return;
    }
    gemm_table();
    throughput_table();
}
