//! Drawing the landscape as a PNG: one filled-contour panel per loss (each task, then the
//! joint loss), the three models marked and labelled, one colour bar shared by all panels so
//! that their colours compare.
//!
//! Filled contours are drawn per pixel rather than as polygons: every pixel takes the level of
//! log(loss) interpolated bilinearly from the four grid points around it, and a pixel whose
//! right or lower neighbour falls in another level is darkened, which draws the contour lines.
//! That is the filled contour plot of the bilinear interpolant, the surface that marching
//! squares approximates with one straight segment per cell edge; at pixel resolution the two
//! look the same, and this needs none of marching squares' case analysis (saddle cells, nested
//! rings, NaN holes). Levels are evenly spaced in log(loss) because losses on a merge plane
//! span orders of magnitude (0.1 at a trained model, 10+ at the far corners): linear levels
//! would spend every colour on the corners.
//!
//! Text is DejaVu Sans, embedded and laid out by [`super::canvas`], so the picture renders the
//! same without any system font.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use super::canvas::Canvas;
use super::Landscape;
use crate::error::{Error, Result};

const FAMILY: &str = "sans-serif";
/// Number of filled levels.
const LEVELS: usize = 14;
/// Losses below this are drawn as this (log scale needs a positive floor).
const FLOOR: f64 = 1e-3;

/// What the picture says besides the data.
#[derive(Clone, Debug)]
pub struct PlotOptions {
    pub width: u32,
    pub height: u32,
    pub title: String,
    /// A second, smaller title line (data, method, notes).
    pub subtitle: String,
    pub x_desc: String,
    pub y_desc: String,
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Plot(e.to_string())
}

/// The shared colour scale: `LEVELS` bands evenly spaced in log10(loss).
struct Scale {
    lo: f64,
    hi: f64,
}

impl Scale {
    fn new(l: &Landscape) -> Scale {
        let all = l
            .losses
            .iter()
            .flatten()
            .chain(l.markers.iter().flat_map(|m| &m.losses))
            .copied()
            .filter(|v| v.is_finite());
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        if !lo.is_finite() {
            return Scale { lo: -1.0, hi: 1.0 };
        }
        let (lo, hi) = (lo.max(FLOOR).log10(), hi.max(FLOOR).log10());
        if hi - lo < 1e-6 {
            Scale {
                lo: lo - 0.05,
                hi: hi + 0.05,
            }
        } else {
            Scale { lo, hi }
        }
    }

    /// Position of log10(loss) on the scale, 0..=1.
    fn t(&self, log_loss: f64) -> f64 {
        ((log_loss - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
    }

    fn level(&self, log_loss: f64) -> Option<usize> {
        log_loss
            .is_finite()
            .then(|| ((self.t(log_loss) * LEVELS as f64) as usize).min(LEVELS - 1))
    }

    /// Loss at level boundary `k` (0..=LEVELS).
    fn boundary(&self, k: usize) -> f64 {
        10f64.powf(self.lo + (self.hi - self.lo) * k as f64 / LEVELS as f64)
    }

    fn colour(k: usize) -> RGBColor {
        viridis((k as f64 + 0.5) / LEVELS as f64)
    }
}

/// The viridis colour map (perceptually uniform, readable in grey and by colour-blind
/// readers), interpolated between nine of its published stops.
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn darken(c: RGBColor) -> RGBColor {
    RGBColor(
        (c.0 as f64 * 0.55) as u8,
        (c.1 as f64 * 0.55) as u8,
        (c.2 as f64 * 0.55) as u8,
    )
}

/// log10(loss) at (x, y), bilinear between the grid points around it.
fn interpolate(l: &Landscape, logs: &[f64], x: f64, y: f64) -> f64 {
    let frac = |v: f64, axis: &[f64]| -> (usize, f64) {
        let n = axis.len();
        let step = (axis[n - 1] - axis[0]) / (n - 1) as f64;
        let p = ((v - axis[0]) / step).clamp(0.0, (n - 1) as f64);
        let i = (p as usize).min(n - 2);
        (i, p - i as f64)
    };
    let (i, fx) = frac(x, &l.xs);
    let (j, fy) = frac(y, &l.ys);
    let nx = l.xs.len();
    let at = |i: usize, j: usize| logs[j * nx + i];
    let bottom = at(i, j) * (1.0 - fx) + at(i + 1, j) * fx;
    let top = at(i, j + 1) * (1.0 - fx) + at(i + 1, j + 1) * fx;
    bottom * (1.0 - fy) + top * fy
}

/// Renders the picture and returns the PNG bytes.
pub fn render_png(l: &Landscape, o: &PlotOptions) -> Result<Vec<u8>> {
    let (w, h) = (o.width, o.height);
    if w < 200 || h < 150 || l.xs.len() < 2 || l.ys.len() < 2 {
        return Err(Error::Usage(format!(
            "a {w}x{h} picture of a {}x{} grid is too small (at least 200x150 pixels, 2x2 points)",
            l.xs.len(),
            l.ys.len()
        )));
    }
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = Canvas::new(BitMapBackend::with_buffer(&mut buf, (w, h))).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root, l, o)?;
        root.present().map_err(plot_err)?;
    }
    encode(&buf, w, h)
}

fn draw(root: &DrawingArea<Canvas, Shift>, l: &Landscape, o: &PlotOptions) -> Result<()> {
    let scale = Scale::new(l);
    let (w, h) = root.dim_in_pixel();
    let big = (h as f64 / 28.0).clamp(14.0, 26.0).round();
    let small = (big * 0.72).max(12.0).round();
    let (header, body) = root.split_vertically((big * 2.9) as u32);
    let title_size = fit(&header, &o.title, big, w)?;
    header
        .draw(&Text::new(
            o.title.clone(),
            (w as i32 / 2, (big * 0.35) as i32),
            (FAMILY, title_size)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(plot_err)?;
    let subtitle_size = fit(&header, &o.subtitle, small, w)?;
    header
        .draw(&Text::new(
            o.subtitle.clone(),
            (w as i32 / 2, (big * 1.65) as i32),
            (FAMILY, subtitle_size)
                .into_font()
                .color(&RGBColor(70, 70, 70))
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(plot_err)?;
    let bar_width = (small * 7.5) as u32;
    let (panels, bar) = body.split_horizontally(w.saturating_sub(bar_width));
    let areas = panels.split_evenly((1, l.names.len().max(1)));
    for (k, area) in areas.iter().enumerate() {
        panel(area, l, k, &scale, o, big, small)?;
    }
    colour_bar(&bar, &scale, small)
}

/// The largest size up to `size` at which `text` fits in `width` pixels (less a margin).
fn fit(area: &DrawingArea<Canvas, Shift>, text: &str, size: f64, width: u32) -> Result<f64> {
    let mut size = size;
    while size > 8.0 {
        let (tw, _) = area
            .estimate_text_size(text, &(FAMILY, size).into_font().color(&BLACK))
            .map_err(plot_err)?;
        if tw + 16 <= width {
            break;
        }
        size -= 1.0;
    }
    Ok(size)
}

fn panel_title(name: &str) -> String {
    if name == "joint" {
        "joint loss (all classes, all samples)".into()
    } else {
        format!("{name} loss (its classes, its samples)")
    }
}

fn panel(
    area: &DrawingArea<Canvas, Shift>,
    l: &Landscape,
    k: usize,
    scale: &Scale,
    o: &PlotOptions,
    big: f64,
    small: f64,
) -> Result<()> {
    let (x0, x1) = (l.xs[0], l.xs[l.xs.len() - 1]);
    let (y0, y1) = (l.ys[0], l.ys[l.ys.len() - 1]);
    let mut chart = ChartBuilder::on(area)
        .caption(panel_title(&l.names[k]), (FAMILY, (big * 0.8).round()))
        .margin_left(6)
        .margin_right(14)
        .margin_top(4)
        .margin_bottom(4)
        .x_label_area_size((small * 3.2) as u32)
        .y_label_area_size((small * 4.2) as u32)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;

    // The filled levels, pixel by pixel.
    // NaN stays NaN (drawn grey); f64::max would turn it into the floor.
    let logs: Vec<f64> = l.losses[k]
        .iter()
        .map(|&v| if v.is_nan() { v } else { v.max(FLOOR).log10() })
        .collect();
    let (xr, yr) = chart.plotting_area().get_pixel_range();
    let (pw, ph) = ((xr.end - xr.start) as usize, (yr.end - yr.start) as usize);
    let mut levels = vec![None; pw * ph];
    for py in 0..ph {
        let y = y1 - (py as f64 + 0.5) / ph as f64 * (y1 - y0);
        for px in 0..pw {
            let x = x0 + (px as f64 + 0.5) / pw as f64 * (x1 - x0);
            levels[py * pw + px] = scale.level(interpolate(l, &logs, x, y));
        }
    }
    let pixels = chart.plotting_area().strip_coord_spec();
    for py in 0..ph {
        for px in 0..pw {
            let lv = levels[py * pw + px];
            let edge = (px + 1 < pw && levels[py * pw + px + 1] != lv)
                || (py + 1 < ph && levels[(py + 1) * pw + px] != lv);
            let c = match lv {
                Some(v) if edge => darken(Scale::colour(v)),
                Some(v) => Scale::colour(v),
                None => RGBColor(190, 190, 190),
            };
            pixels
                .draw_pixel((px as i32, py as i32), &c)
                .map_err(plot_err)?;
        }
    }

    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(o.x_desc.as_str())
        .y_desc(o.y_desc.as_str())
        .x_labels(6)
        .y_labels(6)
        .label_style((FAMILY, small))
        .axis_desc_style((FAMILY, small))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(plot_err)?;

    // The models: white symbols with a black outline, labelled with their loss.
    let right_edge = xr.end;
    for (i, m) in l.markers.iter().enumerate() {
        let loss = m.losses.get(k).copied().unwrap_or(f64::NAN);
        let text = format!("{} {}", m.label, fmt_loss(loss));
        let font = (FAMILY, small).into_font().color(&BLACK);
        let (tw, th) = area.estimate_text_size(&text, &font).map_err(plot_err)?;
        let (tw, th) = (tw as i32, th as i32);
        let r = (small * 0.55) as i32 + 2;
        let (px, _) = chart.backend_coord(&(m.x, m.y));
        let dx = if px + r + 6 + tw + 4 > right_edge {
            -(r + 6 + tw + 4)
        } else {
            r + 4
        };
        let label = EmptyElement::at((m.x, m.y))
            + Rectangle::new(
                [(dx, -th / 2 - 3), (dx + tw + 6, th / 2 + 3)],
                WHITE.mix(0.85).filled(),
            )
            + Text::new(
                text,
                (dx + 3, 0),
                font.pos(Pos::new(HPos::Left, VPos::Center)),
            );
        chart
            .draw_series(std::iter::once(label))
            .map_err(plot_err)?;
        let fill = ShapeStyle {
            color: WHITE.to_rgba(),
            filled: true,
            stroke_width: 1,
        };
        let line = ShapeStyle {
            color: BLACK.to_rgba(),
            filled: false,
            stroke_width: 2,
        };
        let at = (m.x, m.y);
        match i {
            0 => chart
                .draw_series([Circle::new(at, r, fill), Circle::new(at, r, line)])
                .map(|_| ()),
            1 => chart
                .draw_series([
                    EmptyElement::at(at) + Rectangle::new([(-r, -r), (r, r)], fill),
                    EmptyElement::at(at) + Rectangle::new([(-r, -r), (r, r)], line),
                ])
                .map(|_| ()),
            _ => {
                // TriangleMarker is always filled with its colour: draw the outline as a path.
                let t = r + 3;
                let corners = vec![(0, -t), (t, t * 3 / 4), (-t, t * 3 / 4)];
                let mut closed = corners.clone();
                closed.push(corners[0]);
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at(at) + Polygon::new(corners, fill),
                    ))
                    .map(|_| ())
                    .map_err(plot_err)?;
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at(at) + PathElement::new(closed, line),
                    ))
                    .map(|_| ())
            }
        }
        .map_err(plot_err)?;
    }
    Ok(())
}

fn colour_bar(area: &DrawingArea<Canvas, Shift>, scale: &Scale, small: f64) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let top = (small * 2.6) as i32;
    let bottom = h - (small * 3.6) as i32;
    let left = (small * 0.8) as i32;
    let right = left + (small * 1.6) as i32;
    let step = (bottom - top) as f64 / LEVELS as f64;
    for k in 0..LEVELS {
        // Level 0 (lowest loss) at the bottom.
        let y_hi = bottom - (k as f64 * step) as i32;
        let y_lo = bottom - ((k + 1) as f64 * step) as i32;
        area.draw(&Rectangle::new(
            [(left, y_lo), (right, y_hi)],
            Scale::colour(k).filled(),
        ))
        .map_err(plot_err)?;
    }
    area.draw(&Rectangle::new(
        [(left, top), (right, bottom)],
        BLACK.stroke_width(1),
    ))
    .map_err(plot_err)?;
    let font = (FAMILY, (small * 0.9).round()).into_font().color(&BLACK);
    // Label every other boundary when the bar is short.
    let every = if step < small * 1.2 { 2 } else { 1 };
    for k in (0..=LEVELS).step_by(every) {
        let y = bottom - (k as f64 * step) as i32;
        area.draw(&PathElement::new(
            vec![(right, y), (right + 4, y)],
            BLACK.stroke_width(1),
        ))
        .map_err(plot_err)?;
        area.draw(&Text::new(
            fmt_loss(scale.boundary(k)),
            (right + 6, y),
            font.pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(plot_err)?;
    }
    area.draw(&Text::new(
        "cross-entropy (log scale)",
        (w - (small * 0.4) as i32, (top + bottom) / 2),
        (FAMILY, small)
            .into_font()
            .transform(FontTransform::Rotate90)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))
    .map_err(plot_err)?;
    Ok(())
}

/// A loss with two significant digits (0.042, 0.42, 4.2, 42).
fn fmt_loss(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let digits = if v >= 10.0 {
        0
    } else {
        (1 - v.abs().max(1e-12).log10().floor() as i32).clamp(0, 6) as usize
    };
    format!("{v:.digits$}")
}

/// An axis tick value, short.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// RGB buffer → PNG bytes.
fn encode(buf: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    let mut writer = enc.write_header().map_err(plot_err)?;
    writer.write_image_data(buf).map_err(plot_err)?;
    writer.finish().map_err(plot_err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_labels_have_two_significant_digits() {
        assert_eq!(fmt_loss(0.04213), "0.042");
        assert_eq!(fmt_loss(0.4213), "0.42");
        assert_eq!(fmt_loss(4.213), "4.2");
        assert_eq!(fmt_loss(42.13), "42");
        assert_eq!(fmt_loss(f64::NAN), "n/a");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(-10.0), "-10");
    }

    #[test]
    fn levels_span_the_losses_on_a_log_scale() {
        let l = Landscape {
            names: vec!["joint".into()],
            xs: vec![0.0, 1.0],
            ys: vec![0.0, 1.0],
            losses: vec![vec![0.1, 1.0, 10.0, f64::NAN]],
            markers: vec![],
        };
        let s = Scale::new(&l);
        assert!((s.boundary(0) - 0.1).abs() < 1e-9 && (s.boundary(LEVELS) - 10.0).abs() < 1e-9);
        assert_eq!(s.level(0.1f64.log10()), Some(0));
        assert_eq!(s.level(10f64.log10()), Some(LEVELS - 1));
        assert_eq!(s.level(1f64.log10()), Some(LEVELS / 2));
        assert_eq!(s.level(f64::NAN), None);
        // Bilinear in log space: the centre of the cell is the mean of the four logs.
        let logs = [-1.0, 0.0, 1.0, 0.0];
        assert!((interpolate(&l, &logs, 0.5, 0.5) - 0.0).abs() < 1e-12);
        assert!((interpolate(&l, &logs, 1.0, 0.0) - 0.0).abs() < 1e-12);
    }
}
