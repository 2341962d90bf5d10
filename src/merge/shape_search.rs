//! `--zip-until auto --max-params X`: the merged model's shape chosen on held-out calibration
//! data. Partial zip (each model keeps its last layers) and `--width` (wider zipped groups) both
//! buy accuracy with parameters; within a budget of X times one model's parameters, every
//! candidate — full merges at widths 1, 1.1, 1.2, 1.25, 1.5, … (spread evenly, worst-first and
//! per parameter)
//! and cuts keeping the last 1, 2, 3, 4, 6, 8 weight layers separate — is merged on four fifths
//! of the data and scored on the rest (`held_out`), and the best is kept (on equal scores, the
//! one met first: fewer parameters).

use serde::Serialize;

use super::held_out::HeldOut;
use super::{Cut, MergeOptions, Spread};
use crate::error::Result;
use crate::onnx::{Model, TensorData};

/// Width factors tried (those up to the number of models), each spread over every widenable
/// group and, for the iterating zip methods, given to the worst-merged groups first and by
/// merge loss per parameter.
const WIDTHS: &[f64] = &[1.0, 1.1, 1.2, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0];
/// Weight layers kept separate at the end, as cuts tried.
const CUTS: &[i64] = &[1, 2, 3, 4, 6, 8];

#[derive(Clone, Debug, Serialize)]
pub struct ShapePoint {
    /// `--zip-until` of the candidate (`null`: a full merge).
    pub zip_until: Option<i64>,
    pub width: f64,
    /// Which groups the width's extra units went to (`--widen`).
    pub widen: Spread,
    /// Merged parameters ÷ one model's.
    pub parameters: f64,
    /// Held-out score; `null` when over the budget (not scored).
    pub score: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShapeChoice {
    pub zip_until: Option<i64>,
    pub width: f64,
    pub widen: Spread,
    pub parameters: f64,
    pub max_params: f64,
    pub criterion: String,
    pub held_out: usize,
    pub curve: Vec<ShapePoint>,
}

impl ShapeChoice {
    pub fn cut(&self) -> Option<Cut> {
        self.zip_until.map(|k| Cut::Depth(-k))
    }
}

/// Tries the candidates within `max_params` and returns the best (a full merge at width 1 is
/// always a candidate, whatever the budget).
pub fn choose_shape(
    models: &[Model],
    calib: &[TensorData],
    labels: Option<&[i64]>,
    opts: &MergeOptions,
    max_params: f64,
) -> Result<ShapeChoice> {
    let held = HeldOut::new(models, calib, labels, opts, "--zip-until auto")?;
    let mut curve: Vec<ShapePoint> = Vec::new();
    let mut try_one = |zip_until: Option<i64>, width: f64, widen: Spread| -> Result<bool> {
        let candidate = MergeOptions {
            zip_until: zip_until.map(|k| Cut::Depth(-k)),
            width,
            widen,
            ..opts.clone()
        };
        let (score, report) = held.score(&candidate)?;
        let parameters = report.merged_parameters as f64 / report.model_parameters.max(1) as f64;
        let within = parameters <= max_params || (zip_until.is_none() && width == 1.0);
        curve.push(ShapePoint {
            zip_until,
            width,
            widen,
            parameters,
            score: within.then_some(score),
        });
        Ok(within)
    };
    let n = models.len() as f64;
    // Widening needs a zip method (and the spreads that read merge values its iterative
    // loop); parameters only grow with the width.
    let spreads: &[Spread] = match (opts.method_zips(), opts.method_iterates()) {
        (true, true) => &[Spread::All, Spread::Worst, Spread::PerParameter],
        (true, false) => &[Spread::All],
        _ => &[],
    };
    try_one(None, 1.0, Spread::All)?;
    for &spread in spreads {
        for &w in WIDTHS.iter().filter(|&&w| w > 1.0 && w <= n) {
            if !try_one(None, w, spread)? {
                break;
            }
        }
    }
    for &k in CUTS {
        // A cut past the first layer is refused by the merge: the list ends there.
        match try_one(Some(k), 1.0, Spread::All) {
            Ok(true) => {}
            Ok(false) | Err(crate::Error::Usage(_)) => break,
            Err(e) => return Err(e),
        }
    }
    let best = curve
        .iter()
        .filter(|p| p.score.is_some())
        .fold(None::<&ShapePoint>, |b, p| match b {
            Some(b) if b.score >= p.score => Some(b),
            _ => Some(p),
        })
        .cloned()
        .expect("the width-1 full merge is always scored");
    Ok(ShapeChoice {
        zip_until: best.zip_until,
        width: best.width,
        widen: best.widen,
        parameters: best.parameters,
        max_params,
        criterion: held.criterion().into(),
        held_out: held.held_out,
        curve,
    })
}
