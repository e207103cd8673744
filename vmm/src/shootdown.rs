//! Stage-2 updates as shootdowns, and the one way Veil kicks a vCPU thread out of `KVM_RUN`.
//!
//! **Kicking.** A vCPU thread registers its [`Kick`] here for the time it is in its run loop.
//! A kick sets the vCPU's `kvm_run.immediate_exit` and then signals its thread (the handler
//! does nothing; see [`crate::watchdog`]), so a kick just before `KVM_RUN` is not lost. The
//! timeout and stall samples (the watchdog), the stop of one vCPU by another
//! ([`Vcpus::kick_others`]) and a park all kick this way; `SIGINT`/`SIGTERM` handlers only
//! signal the registered threads (`signals.rs`), the watchdog then kicks properly.
//!
//! **Parking.** Each run loop enters the guest only through [`Vcpus::enter`], which holds the
//! read side of a gate for the `KVM_RUN` call. A backend whose update is not atomic for a
//! running sibling (the slots backend deletes memslots before it creates their replacements)
//! brackets it with [`Vcpus::park_others`]: it raises `pending` (no vCPU enters the guest
//! while it is up), kicks every other registered vCPU and takes the write side, which it
//! holds until the update is done. So when the update returns no vCPU can reach the old
//! mapping, and while it runs no vCPU runs at all. With one vCPU a park kicks nobody and takes
//! an uncontended lock. The `mprotect` backend needs no park: the host kernel's MMU notifier
//! zaps KVM's mappings and flushes every vCPU's TLB before `mprotect` returns, and its
//! changes never remove a page that stays mapped.
//!
//! Lock order: the session (VM state) lock, then the allocator's locks, then this gate's
//! write side; a vCPU takes the read side only around `KVM_RUN`, holding no other lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::watchdog::Kick;

/// How long a vCPU waits before it looks again whether a park is over.
const PARK_POLL: Duration = Duration::from_micros(20);

/// The vCPU threads of one VM: who to kick, and the gate a park closes.
#[derive(Default)]
pub struct Vcpus {
    threads: Mutex<Vec<Kick>>,
    gate: RwLock<()>,
    pending: AtomicU32,
    parks: AtomicU64,
    kicks: AtomicU64,
}

/// Every other vCPU is out of the guest until this is dropped.
pub struct Parked<'a> {
    _gate: RwLockWriteGuard<'a, ()>,
    vcpus: &'a Vcpus,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.vcpus.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Parks and kicks so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ParkCounts {
    /// Stage-2 updates that parked the other vCPUs.
    pub parks: u64,
    /// Kick signals those parks sent.
    pub kicks: u64,
}

impl Vcpus {
    /// Adds the calling thread's vCPU (`Some`, its kick) to those kicks reach, or removes it
    /// (`None`). A thread removes itself before it leaves its run loop, so every kick in the
    /// list is usable (the [`Kick::new`] contract).
    pub fn register(&self, kick: Option<Kick>) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|k| k.thread() != me);
        threads.extend(kick);
    }

    /// Kicks every registered vCPU thread but the caller; returns how many.
    pub fn kick_others(&self) -> u64 {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for k in threads.iter().filter(|k| k.thread() != me) {
            k.kick();
            n += 1;
        }
        n
    }

    /// Whether a park is pending: [`Vcpus::enter`] would wait now.
    pub fn parking(&self) -> bool {
        self.pending.load(Ordering::SeqCst) != 0
    }

    /// The right to run `KVM_RUN` once: waits while a park is pending.
    pub fn enter(&self) -> RwLockReadGuard<'_, ()> {
        loop {
            while self.pending.load(Ordering::SeqCst) != 0 {
                std::thread::sleep(PARK_POLL);
            }
            let g = self.gate.read().unwrap_or_else(|e| e.into_inner());
            // A park raised after the check kicks this thread: its KVM_RUN returns at once.
            if self.pending.load(Ordering::SeqCst) == 0 {
                return g;
            }
        }
    }

    /// Takes every other vCPU out of the guest (kicking those inside) until the guard drops.
    /// The caller must not be inside [`Vcpus::enter`].
    pub fn park_others(&self) -> Parked<'_> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let kicks = self.kick_others();
        self.kicks.fetch_add(kicks, Ordering::Relaxed);
        self.parks.fetch_add(1, Ordering::Relaxed);
        Parked {
            _gate: self.gate.write().unwrap_or_else(|e| e.into_inner()),
            vcpus: self,
        }
    }

    /// Parks and kicks so far.
    pub fn counts(&self) -> ParkCounts {
        ParkCounts {
            parks: self.parks.load(Ordering::Relaxed),
            kicks: self.kicks.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn a_park_waits_for_a_vcpu_inside_and_keeps_it_out_until_dropped() {
        let v = Arc::new(Vcpus::default());
        let entered_again = Arc::new(AtomicBool::new(false));
        let g = v.enter();
        let (v2, e2) = (v.clone(), entered_again.clone());
        let parker = std::thread::spawn(move || {
            let p = v2.park_others();
            std::thread::sleep(Duration::from_millis(20));
            let seen = e2.load(Ordering::SeqCst);
            drop(p);
            seen
        });
        // The "vCPU" leaves the guest a little later, as a kicked one would.
        std::thread::sleep(Duration::from_millis(10));
        drop(g);
        std::thread::sleep(Duration::from_millis(1));
        let (v3, e3) = (v.clone(), entered_again.clone());
        let reenter = std::thread::spawn(move || {
            let _g = v3.enter();
            e3.store(true, Ordering::SeqCst);
        });
        assert!(
            !parker.join().unwrap(),
            "a vCPU entered the guest during the park"
        );
        reenter.join().unwrap();
        assert!(entered_again.load(Ordering::SeqCst));
        assert_eq!(v.counts().parks, 1);
    }
}
