//! Memory-mapped model files, and giving their pages back.
//!
//! A model file is mapped, not read (`external::read_file`), and its tensors are zero-copy
//! slices of the map. Each page the merge touches (encoding the model for ONNX Runtime,
//! reading its weights) then stays resident and counts in the process's memory: 2 × 330 MB on
//! a ViT-B pair, beside the engines' and mudsc's own copies of the same weights. The pages are
//! clean copies of the file, so they can be dropped from the process (`MADV_DONTNEED`) once a
//! step that read them is done; a later read faults them back in from the page cache.
//!
//! Every live map is registered here; a map leaves the registry before it is unmapped, under
//! the same lock, so that `release` never advises an address range that has been reused.

use std::sync::Mutex;

/// Start address and length of every live map.
static MAPS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// A read-only map of a whole file, registered while it lives.
pub(super) struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    pub(super) fn new(map: memmap2::Mmap) -> MappedFile {
        if let Ok(mut maps) = MAPS.lock() {
            maps.push((map.as_ptr() as usize, map.len()));
        }
        MappedFile { map }
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // Out of the registry before `map` is unmapped (after this body).
        let start = self.map.as_ptr() as usize;
        if let Ok(mut maps) = MAPS.lock() {
            maps.retain(|&(s, _)| s != start);
        }
    }
}

/// Drops every mapped model page from this process's resident memory. Nothing is lost: the
/// maps are read-only views of files, and a page read again is mapped again from the page
/// cache (or the disk). Call it after a step that read whole models.
pub fn release() {
    let Ok(maps) = MAPS.lock() else {
        return;
    };
    for &(start, len) in maps.iter() {
        advise_dont_need(start, len);
    }
}

#[cfg(unix)]
fn advise_dont_need(start: usize, len: usize) {
    // SAFETY: [start, start + len) is a live, page-aligned, read-only shared file map (it
    // leaves the registry, whose lock the caller holds, before it is unmapped); dropping its
    // pages cannot change what a later read sees. A failure only leaves the pages resident.
    unsafe {
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED);
    }
}

#[cfg(not(unix))]
fn advise_dont_need(_start: usize, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data.bin");
        let data: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        // SAFETY: a read-only map of a file this test owns.
        let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
        let mapped = MappedFile::new(map);
        assert_eq!(mapped.as_ref(), &data[..]);
        assert!(MAPS
            .lock()
            .expect("lock")
            .iter()
            .any(|&(_, l)| l == data.len()));
        release();
        assert_eq!(mapped.as_ref(), &data[..]);
        let start = mapped.as_ref().as_ptr() as usize;
        drop(mapped);
        assert!(!MAPS.lock().expect("lock").iter().any(|&(s, _)| s == start));
    }
}
