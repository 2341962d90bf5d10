//! The activation correlations the matching reads: every tapped group's, in every sweep of
//! the iterative loop. On a ViT-B pair they are 1.07 GB of f32 triangles, held from the end of
//! calibration to the end of the matching beside the models' weights and the matching's own
//! matrices. Under a `--max-memory` that cannot hold them there, they are written to an
//! unnamed temporary file as each calibration pass ends and read back one group at a time,
//! when that group is matched: the file's pages live in the page cache, which the process's
//! resident memory does not count, and a group's read costs a copy (a 6,144-unit MLP group's
//! 75 MB, against the 116-GFLOP Gram its matching computes).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::stats::Symmetric;

/// Each group's correlation (upper triangle, f32), held or spilled.
pub struct Correlations {
    held: HashMap<usize, Symmetric<f32>>,
    /// Spilled groups: (offset in the file, units).
    spilled: HashMap<usize, (u64, usize)>,
    spill: Option<Spill>,
}

/// The temporary file, removed by the system when it closes (or the process ends).
struct Spill {
    file: File,
    /// Where it was created, for errors (the file itself has no name).
    dir: PathBuf,
    end: u64,
}

impl Correlations {
    /// A store that holds every correlation in memory.
    pub fn held() -> Correlations {
        Correlations {
            held: HashMap::new(),
            spilled: HashMap::new(),
            spill: None,
        }
    }

    /// A store that writes every correlation to a temporary file in the system's temporary
    /// directory (`TMPDIR`).
    pub fn spilling() -> Result<Correlations> {
        let dir = std::env::temp_dir();
        let file = tempfile::tempfile_in(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Correlations {
            spill: Some(Spill { file, dir, end: 0 }),
            ..Correlations::held()
        })
    }

    /// Whether correlations go to the temporary file.
    pub fn spills(&self) -> bool {
        self.spill.is_some()
    }

    pub fn insert(&mut self, group: usize, correlation: Symmetric<f32>) -> Result<()> {
        let Some(spill) = &mut self.spill else {
            self.held.insert(group, correlation);
            return Ok(());
        };
        let start = spill.end;
        let mut written = 0u64;
        for panel in correlation.panels() {
            let bytes: &[u8] = bytemuck::cast_slice(panel);
            spill
                .file
                .write_all(bytes)
                .map_err(|e| Error::io(&spill.dir, e))?;
            written += bytes.len() as u64;
        }
        spill.end += written;
        self.spilled.insert(group, (start, correlation.units()));
        Ok(())
    }

    /// A group's correlation: borrowed where held, read back where spilled.
    pub fn get(&self, group: usize) -> Result<Option<Cow<'_, Symmetric<f32>>>> {
        if let Some(c) = self.held.get(&group) {
            return Ok(Some(Cow::Borrowed(c)));
        }
        let (Some(&(offset, units)), Some(spill)) = (self.spilled.get(&group), &self.spill) else {
            return Ok(None);
        };
        let mut out = Symmetric::<f32>::zeros(units);
        // Reads through a shared handle (`&File` reads and seeks): the store stays borrowed
        // immutably while the loop reads it.
        let mut file = &spill.file;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&spill.dir, e))?;
        for panel in out.panels_mut() {
            file.read_exact(bytemuck::cast_slice_mut(panel))
                .map_err(|e| Error::io(&spill.dir, e))?;
        }
        Ok(Some(Cow::Owned(out)))
    }

    /// Forgets a group's correlation (a spilled one's bytes stay in the file until it closes).
    pub fn remove(&mut self, group: usize) {
        self.held.remove(&group);
        self.spilled.remove(&group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triangle(units: usize, seed: f32) -> Symmetric<f32> {
        Symmetric::<f32>::zeros(units).map(|i, j, _| seed + (i * units + j) as f32 * 0.5)
    }

    #[test]
    fn spilled_correlations_read_back_as_written() {
        for mut store in [Correlations::held(), Correlations::spilling().unwrap()] {
            // Several panels (600 units) and one, in any order of reading.
            let (a, b) = (triangle(600, 1.0), triangle(37, -3.0));
            store.insert(4, a.clone()).unwrap();
            store.insert(9, b.clone()).unwrap();
            for (g, want) in [(9, &b), (4, &a), (9, &b)] {
                let got = store.get(g).unwrap().unwrap();
                assert_eq!(got.to_full(), want.to_full(), "group {g}");
            }
            assert!(store.get(5).unwrap().is_none());
            store.remove(4);
            assert!(store.get(4).unwrap().is_none());
            assert!(store.get(9).unwrap().is_some());
        }
    }
}
