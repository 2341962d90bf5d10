//! Progress bars for long phases (calibration batches, matching sweeps, grid points), drawn
//! on stderr only when it is a terminal, so logs and pipes stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One bar per phase; a new phase name finishes the previous bar.
#[derive(Default)]
pub struct Progress {
    phase: String,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn update(&mut self, phase: &str, done: usize, total: usize) {
        if phase != self.phase || self.bar.is_none() {
            self.finish();
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{msg:>12} [{bar:32}] {pos}/{len} {elapsed_precise} (eta {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(phase.to_string());
            self.phase = phase.to_string();
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
