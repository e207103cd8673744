//! A small spin lock for [`crate::Zone`]: the zone lock and the per-CPU cache locks.
//!
//! `no_std` and dependency-free. Every critical section it guards is short and never calls
//! stage 2, so waiting is a spin; with the `std` feature a waiter yields its thread after a
//! few hundred spins (a lock holder preempted on an oversubscribed host would otherwise cost
//! a whole time slice of spinning).

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};

/// A mutual-exclusion lock that spins.
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `value` to one thread at a time (acquire/release on
// `locked`), so sharing it between threads is sound whenever `T` may be sent between them.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: owning the lock owns the value.
unsafe impl<T: Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// An unlocked lock around `value`.
    pub const fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Wait for the lock and take it.
    #[inline]
    pub fn lock(&self) -> SpinGuard<'_, T> {
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        SpinGuard { lock: self }
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                spins = spins.wrapping_add(1);
                #[cfg(feature = "std")]
                if spins.is_multiple_of(256) {
                    std::thread::yield_now();
                    continue;
                }
                core::hint::spin_loop();
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    /// The value, through exclusive access to the lock itself (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }

    /// The value, giving up the lock.
    pub fn into_inner(self) -> T {
        self.value.into_inner()
    }
}

/// Holds a [`SpinLock`] until dropped.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this thread holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard exists only while this thread holds the lock, and `&mut self`
        // makes this the only live reference obtained through the guard.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_gives_access_and_releases() {
        let l = SpinLock::new(1u32);
        *l.lock() += 1;
        *l.lock() += 1;
        assert_eq!(*l.lock(), 3);
        assert!(!l.locked.load(Ordering::Relaxed));
        assert_eq!(l.into_inner(), 3);
    }
}
