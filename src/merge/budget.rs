//! Memory pre-flight: the matchers and the rewrite hold dense f64 matrices whose side is a
//! group's width times the number of models (Σxxᵀ and correlations, similarities, zip
//! workspaces, unmerge and axis maps). A 2.4 MB model with one 50,000-unit layer needs tens of
//! GB for them, and the allocation aborts the process. Before calibration, the merge estimates
//! what `--method` will hold for every group and refuses, naming the widest group, when that
//! is more than the machine has (or `MUDSC_MEMORY_LIMIT` allows).

use super::{MergeOptions, Method};
use crate::error::{Error, Result};
use crate::symmetry::Group;

/// Bytes of one f64.
const F64: u64 = 8;

/// What one group costs under `method` with `models` models, in bytes: (peak while it is
/// matched, statistics held for it during the whole matching).
pub(super) fn group_bytes(g: &Group, models: usize, method: Method) -> (u64, u64) {
    // Saturating: a hostile file's widths must not overflow the estimate itself.
    let w = g.width as u64;
    let n = (models as u64).saturating_mul(w); // units of all models
    let square = |a: u64, b: u64| F64.saturating_mul(a).saturating_mul(b);
    // Per-model axis maps of the rewrite and the dense unmerge the matchers return.
    let maps = square(n, w).saturating_mul(2);
    if method == Method::Avg {
        return (maps, 0);
    }
    // The correlation held through the matching, in f32 (calibration's f64 Σxxᵀ of all
    // groups at once is bounded separately, by `--max-memory`'s passes).
    let stats = if method.uses_activations() && g.tap.is_some() {
        square(n, n) / 2
    } else {
        0
    };
    // Similarity, its copy for this group, the weight similarity and the dual mix of the
    // iterative loop, the zip's (or LAP's) workspace.
    let copies = if method.iterates() { 4 } else { 2 };
    (
        maps.saturating_add(square(n, n).saturating_mul(copies)),
        stats,
    )
}

/// Refuses a merge whose dense matrices would not fit in memory, naming the group that
/// needs the most.
pub(super) fn check(groups: &[Group], models: usize, opts: &MergeOptions) -> Result<()> {
    let Some(available) = available_bytes() else {
        return Ok(());
    };
    let costs: Vec<(u64, u64)> = groups
        .iter()
        .map(|g| group_bytes(g, models, opts.method))
        .collect();
    let stats: u64 = costs.iter().map(|c| c.1).fold(0, u64::saturating_add);
    let Some((worst, &(peak, _))) = costs.iter().enumerate().max_by_key(|(_, c)| c.0) else {
        return Ok(());
    };
    let total = stats.saturating_add(peak);
    if total <= available {
        return Ok(());
    }
    let g = &groups[worst];
    let cheaper = if opts.method == Method::Avg {
        "Merge narrower models, or fewer at a time"
    } else {
        "Merge narrower models, fewer at a time, or with --method avg (no statistics, no \
         similarity)"
    };
    Err(Error::TooLarge(format!(
        "merging needs about {} of memory with --method {}, more than the {} available{}: \
         group g{} ({} units{}) alone needs {} for its dense f64 matrices over {} models × {} \
         units{}. {cheaper}",
        gib(total),
        opts.method.name(),
        gib(available),
        if std::env::var_os(LIMIT_VAR).is_some() {
            format!(" ({LIMIT_VAR})")
        } else {
            String::new()
        },
        g.id,
        g.width,
        g.tap
            .as_ref()
            .map(|t| format!(", read at '{t}'"))
            .unwrap_or_default(),
        gib(peak),
        models,
        g.width,
        if stats > 0 {
            format!(
                ", and the activation statistics of all groups take {}",
                gib(stats)
            )
        } else {
            String::new()
        }
    )))
}

/// Environment variable capping the memory the pre-flight allows (bytes, or with a K, M or
/// G suffix), for shared machines and for tests.
pub const LIMIT_VAR: &str = "MUDSC_MEMORY_LIMIT";

/// `MUDSC_MEMORY_LIMIT`, else the kernel's MemAvailable; `None` when neither can be read.
fn available_bytes() -> Option<u64> {
    if let Some(v) = std::env::var_os(LIMIT_VAR) {
        if let Some(b) = v.to_str().and_then(parse_size) {
            return Some(b);
        }
    }
    meminfo("MemAvailable:")
}

/// Half of the machine's physical memory: `--max-memory`'s default.
pub(crate) fn half_of_ram() -> Option<u64> {
    meminfo("MemTotal:").map(|b| b / 2)
}

/// A line of Linux's /proc/meminfo, in bytes; `None` where it cannot be read.
fn meminfo(key: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// A byte count: digits with an optional K, M or G suffix (powers of 1024), e.g. `512M`.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(mult)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("x"), None);
    }
}
