//! [`Lines`]: a fixed-length slice of 4-byte values whose storage starts on a 128-byte
//! boundary, for the words several CPUs write (a [`crate::Zone`]'s ownership words and each
//! CPU's cache slots).
//!
//! A `Box<[u32]>` or `Vec<u32>` is only as aligned as the heap makes it: glibc serves a
//! large one by `mmap` behind a 16-byte header, so word `i` of one CPU's refill batch and
//! word `i + 1` of the next CPU's can share a cache line even when `i + 1` is a multiple of
//! 32. With [`Lines`], words `32k..32k + 32` are exactly one 128-byte pair of cache lines
//! (the unit Intel's adjacent-line prefetcher fetches), so blocks handed out in aligned
//! batches of 32 words never share a line with another batch.

use alloc::boxed::Box;
use core::ops::{Deref, DerefMut};

/// Values per 128-byte line pair.
pub(crate) const PER_LINE: usize = 32;

/// One 128-byte line pair of 32 values (exactly 128 bytes for a 4-byte `T`: no padding).
#[repr(C, align(128))]
struct Line<T>([T; PER_LINE]);

/// `len` values of a 4-byte `T`, stored in 128-byte-aligned [`Line`]s (the last one padded).
/// Derefs to a plain `[T]` of `len` values.
pub(crate) struct Lines<T> {
    lines: Box<[Line<T>]>,
    len: usize,
}

impl<T> Lines<T> {
    /// Checked at compile time for every `T` used: lines are exactly `PER_LINE` values.
    const NO_PADDING: () = assert!(
        core::mem::size_of::<Line<T>>() == PER_LINE * core::mem::size_of::<T>()
            && core::mem::align_of::<T>() <= 128
    );

    /// `len` values, each made by `f`.
    pub fn new(len: usize, mut f: impl FnMut() -> T) -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::NO_PADDING;
        let lines = (0..len.div_ceil(PER_LINE))
            .map(|_| Line(core::array::from_fn(|_| f())))
            .collect();
        Lines { lines, len }
    }

    /// Bytes of storage (whole lines).
    pub fn bytes(&self) -> usize {
        self.lines.len() * core::mem::size_of::<Line<T>>()
    }
}

impl<T> Deref for Lines<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: `Line<T>` is `repr(C)` around `[T; PER_LINE]` with no padding
        // (`NO_PADDING`, checked when the value was made), so the boxed slice of lines is
        // `lines.len() * PER_LINE` initialised, contiguous `T`s, of which `len` is a prefix;
        // the borrow of `self` keeps them alive and unaliased by `&mut`.
        unsafe { core::slice::from_raw_parts(self.lines.as_ptr().cast::<T>(), self.len) }
    }
}

impl<T> DerefMut for Lines<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access to the values.
        unsafe { core::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Clone> Clone for Lines<T> {
    fn clone(&self) -> Self {
        let mut it = self.iter().cloned();
        let last = self.last().cloned();
        // Padding values past `len` are never read; fill them with copies of the last one.
        Lines::new(self.len, || {
            it.next().or_else(|| last.clone()).expect("len > 0")
        })
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for Lines<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn aligned_contiguous_and_exact_length() {
        for n in [0usize, 1, 31, 32, 33, 1000] {
            let mut l = Lines::new(n, || 7u32);
            assert_eq!(l.len(), n);
            assert_eq!(l.bytes(), n.div_ceil(32) * 128);
            if n > 0 {
                assert_eq!(l.as_ptr() as usize % 128, 0);
                for (i, v) in l.iter_mut().enumerate() {
                    *v = i as u32;
                }
                assert!(l.iter().enumerate().all(|(i, &v)| v == i as u32));
                let c = l.clone();
                assert_eq!(&c[..], &l[..]);
            }
        }
        let a = Lines::new(100, || AtomicU32::new(0));
        a[64].store(5, Ordering::Relaxed);
        // Word 64 starts the third line pair.
        assert_eq!(
            (&a[64] as *const AtomicU32 as usize - a.as_ptr() as usize),
            256
        );
        assert_eq!(a[64].load(Ordering::Relaxed), 5);
    }
}
