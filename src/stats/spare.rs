//! One recycled allocation for the loop's similarity matrices: the largest thing a wide
//! group's matching holds (4,096² f64 for a ResNet-50 pair's 2,048-wide group, 128 MiB), made
//! afresh for every group in every sweep. Fresh, its pages were faulted in one by one as the
//! Gram sums first wrote them: 6 % of the pair's matching time. The allocator hands so large
//! a block back to the system when it is freed, so it is kept here instead, one per thread,
//! until `release`.

use std::cell::RefCell;

use ndarray::Array2;

thread_local! {
    static SPARE: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// A zeroed `rows × cols` matrix, in the spare allocation where it is large enough and not
/// more than four times so (a small matrix kept for long should not pin a large block).
pub fn zeros(rows: usize, cols: usize) -> Array2<f64> {
    let n = rows * cols;
    let mut buffer = SPARE.with(|s| {
        let mut s = s.borrow_mut();
        match s.capacity() >= n && s.capacity() <= 4 * n.max(1) {
            true => std::mem::take(&mut *s),
            false => Vec::new(),
        }
    });
    buffer.clear();
    buffer.resize(n, 0.0);
    match Array2::from_shape_vec((rows, cols), buffer) {
        Ok(m) => m,
        Err(_) => unreachable!("a buffer of rows × cols elements"),
    }
}

/// Keeps `m`'s allocation for the next `zeros`, if it is larger than the one kept.
pub fn give_back(m: Array2<f64>) {
    let (buffer, _) = m.into_raw_vec_and_offset();
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if buffer.capacity() > s.capacity() {
            *s = buffer;
        }
    });
}

/// Frees the kept allocation (the loop is over: the next phases hold other things).
pub fn release() {
    SPARE.with(|s| *s.borrow_mut() = Vec::new());
}

/// Calls `release` when dropped: held by the loop, so that the allocation goes with it on
/// every way out, an error's included.
pub struct Released;

impl Drop for Released {
    fn drop(&mut self) {
        release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A given-back matrix's allocation serves the next one of its size or a little smaller,
    /// zeroed; a much smaller one gets its own; `release` frees it.
    #[test]
    fn the_spare_allocation_is_reused_zeroed_and_released() {
        let mut m = zeros(64, 64);
        m.fill(3.0);
        let at = m.as_ptr();
        give_back(m);
        let again = zeros(40, 60);
        assert_eq!(again.as_ptr(), at);
        assert!(again.iter().all(|&v| v == 0.0));
        give_back(again);
        let small = zeros(8, 8);
        assert_ne!(small.as_ptr(), at);
        assert!(kept() >= 64 * 64);
        release();
        assert_eq!(kept(), 0);
    }

    fn kept() -> usize {
        SPARE.with(|s| s.borrow().capacity())
    }
}
