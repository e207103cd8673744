//! Doorbells: how a parked vCPU idles in `hlt` without polling.
//!
//! A vCPU other than vCPU 0 parks in the guest's SMP runtime: it looks at its mailbox and
//! executes `hlt` while there is no job (interrupts are off and there is no interrupt
//! controller, so nothing in the guest would wake it). Its run loop then waits on its bell
//! here, outside `KVM_RUN` and holding no lock, until another vCPU rings it (`Hc::Wake`, which
//! the guest's `smp::post` makes after publishing a job), the VM stops ([`Doorbells::ring_all`])
//! or [`IDLE_MAX`] passes. Each bell counts its rings, and a waiter passes the count it has
//! already seen, so a ring that lands between the guest's look at its mailbox and the wait is
//! not lost: the wait returns at once.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The longest a parked vCPU waits for its bell before it runs again (a safety net for a guest
/// that publishes work without ringing; shorter than the watchdog's stall sample, so an idle
/// vCPU is never sampled as stalled, and the delay of a signal or a timeout seen by that vCPU).
pub const IDLE_MAX: Duration = Duration::from_millis(20);

/// One bell per vCPU.
pub struct Doorbells {
    bells: Vec<Bell>,
}

/// One vCPU's bell: how often it has been rung, and the waiter's wakeup.
struct Bell {
    rung: Mutex<u64>,
    wake: Condvar,
}

impl Doorbells {
    /// `n` bells, none rung.
    pub fn new(n: usize) -> Doorbells {
        Doorbells {
            bells: (0..n)
                .map(|_| Bell {
                    rung: Mutex::new(0),
                    wake: Condvar::new(),
                })
                .collect(),
        }
    }

    /// Rings vCPU `index`'s bell; false if there is no such vCPU.
    pub fn ring(&self, index: u64) -> bool {
        let Some(bell) = usize::try_from(index).ok().and_then(|i| self.bells.get(i)) else {
            return false;
        };
        let mut rung = bell.rung.lock().unwrap_or_else(|e| e.into_inner());
        *rung += 1;
        bell.wake.notify_all();
        true
    }

    /// Rings every bell (the VM is stopping: every parked vCPU must see it now).
    pub fn ring_all(&self) {
        for i in 0..self.bells.len() {
            self.ring(i as u64);
        }
    }

    /// Waits until vCPU `index`'s bell has been rung more than `*seen` times or `timeout`
    /// has passed, then records the count in `*seen`; true if it was rung. A bad index
    /// returns false at once.
    pub fn wait(&self, index: usize, seen: &mut u64, timeout: Duration) -> bool {
        let Some(bell) = self.bells.get(index) else {
            return false;
        };
        // A timeout too long to add is as good as a day.
        let now = Instant::now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(86_400));
        let mut rung = bell.rung.lock().unwrap_or_else(|e| e.into_inner());
        while *rung == *seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            rung = bell
                .wake
                .wait_timeout(rung, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *seen = *rung;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_ring_before_the_wait_is_not_lost() {
        let d = Doorbells::new(2);
        let mut seen = 0;
        assert!(d.ring(1));
        let t = Instant::now();
        assert!(d.wait(1, &mut seen, Duration::from_secs(5)));
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(seen, 1);
        // Seen now: the next wait times out.
        assert!(!d.wait(1, &mut seen, Duration::from_millis(5)));
        assert_eq!(seen, 1);
    }

    #[test]
    fn a_ring_wakes_a_waiter_and_bad_indices_are_refused() {
        let d = Arc::new(Doorbells::new(3));
        let d2 = d.clone();
        let waiter = std::thread::spawn(move || {
            let mut seen = 0;
            let t = Instant::now();
            let rung = d2.wait(2, &mut seen, Duration::from_secs(10));
            (rung, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(d.ring(2));
        let (rung, took) = waiter.join().unwrap();
        assert!(rung);
        assert!(took < Duration::from_secs(5), "woken after {took:?}");
        assert!(!d.ring(3));
        assert!(!d.ring(u64::MAX));
        let mut seen = 0;
        assert!(!d.wait(3, &mut seen, Duration::from_secs(10)));
        // A timeout too long to add does not panic.
        assert!(d.wait(2, &mut seen, Duration::MAX));
    }

    #[test]
    fn ring_all_wakes_every_bell() {
        let d = Doorbells::new(4);
        d.ring_all();
        for i in 0..4 {
            let mut seen = 0;
            assert!(d.wait(i, &mut seen, Duration::ZERO));
        }
    }
}
