//! The drawing surface: plotters' RGB bitmap backend with our own text layout.
//!
//! plotters 0.3.7 lays out `ab_glyph` text without each glyph's left side bearing and rounds
//! each glyph's vertical offset on its own, so "1000" reads "1 000" and a decimal point floats
//! above the baseline at odd sizes. This wrapper passes every shape through to the bitmap
//! backend and draws text itself: glyphs positioned on one baseline at their advance plus
//! kerning, rasterised by `ab_glyph` with coverage as alpha. Anchors and rotations follow
//! plotters' own conventions, so charts, captions and axis labels place text as before.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};
use plotters_bitmap::BitMapBackendError;

/// DejaVu Sans, embedded: its licence (`assets/fonts/LICENSE-DejaVu.txt`) allows
/// redistribution, and the picture then looks the same on every machine.
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn font() -> Option<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).ok())
        .as_ref()
}

type Failure = DrawingErrorKind<BitMapBackendError>;

fn font_error() -> Failure {
    DrawingErrorKind::FontError(Box::new(std::io::Error::other(
        "the embedded font could not be read",
    )))
}

/// A bitmap backend with correct text.
pub(super) struct Canvas<'a> {
    inner: BitMapBackend<'a>,
}

impl<'a> Canvas<'a> {
    pub(super) fn new(inner: BitMapBackend<'a>) -> Canvas<'a> {
        Canvas { inner }
    }
}

/// Laid-out text.
struct Layout {
    /// Width and height of the text's box.
    size: (i32, i32),
    /// Every glyph pixel as (x, y, coverage), (0, 0) the box's top-left corner, the baseline at
    /// the font's ascent.
    pixels: Vec<(i32, i32, f32)>,
}

fn layout(text: &str, size: f64) -> Option<Layout> {
    let font = font()?;
    let scale = PxScale::from(size as f32);
    let scaled = font.as_scaled(scale);
    let ascent = scaled.ascent();
    let height = (scaled.ascent() - scaled.descent()).ceil() as i32;
    let mut pixels = Vec::new();
    let mut x = 0.0f32;
    let mut prev = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = prev {
            x += scaled.kern(p, id);
        }
        prev = Some(id);
        let glyph = id.with_scale_and_position(scale, point(x, ascent));
        if let Some(outline) = scaled.outline_glyph(glyph) {
            let b = outline.px_bounds();
            let (x0, y0) = (b.min.x as i32, b.min.y as i32);
            outline.draw(|gx, gy, cov| pixels.push((x0 + gx as i32, y0 + gy as i32, cov)));
        }
        x += scaled.h_advance(id);
    }
    Some(Layout {
        size: (x.ceil() as i32, height),
        pixels,
    })
}

impl DrawingBackend for Canvas<'_> {
    type ErrorType = BitMapBackendError;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), Failure> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), Failure> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Result<(), Failure> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), Failure> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), Failure> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), Failure> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), Failure> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), Failure> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), Failure> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), Failure> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let Layout {
            size: (w, h),
            pixels,
        } = layout(text, style.size()).ok_or_else(font_error)?;
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Center => -w / 2,
            HPos::Right => -w,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let transform = style.transform();
        for (x, y, coverage) in pixels {
            let (x, y) = transform.transform(x + dx, y + dy);
            let c = BackendColor {
                alpha: color.alpha * f64::from(coverage.clamp(0.0, 1.0)),
                rgb: color.rgb,
            };
            self.inner.draw_pixel((pos.0 + x, pos.1 + y), c)?;
        }
        Ok(())
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), Failure> {
        let (w, h) = layout(text, style.size()).ok_or_else(font_error)?.size;
        Ok((w.max(0) as u32, h.max(0) as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_sit_on_one_baseline_with_their_bearings() {
        // "1" has a wide left bearing: its ink starts well right of the pen position, so a
        // layout that drops bearings draws "10" with a gap; here the ink of "1" and "0" are
        // as far apart as in "00".
        let ink_cols = |t: &str| {
            let px = layout(t, 40.0).unwrap().pixels;
            let mut cols: Vec<i32> = px.iter().filter(|p| p.2 > 0.5).map(|p| p.0).collect();
            cols.sort_unstable();
            cols.dedup();
            cols
        };
        let first = ink_cols("1")[0];
        assert!(
            first >= 4,
            "'1' starts at column {first}: no bearing applied"
        );
        // A period's ink bottom is on the digits' baseline.
        let bottom = |t: &str| {
            let px = layout(t, 13.0).unwrap().pixels;
            px.iter().filter(|p| p.2 > 0.5).map(|p| p.1).max().unwrap()
        };
        assert_eq!(bottom("."), bottom("0"));
        let (w, h) = layout("0.5", 20.0).unwrap().size;
        assert!(w > 20 && h == 20, "{w}x{h}");
    }
}
