//! Livelock detection: a vCPU that repeats one blocked access without making progress.
//!
//! Two shapes occur on this host (measured with tiny guests, see `tests/tests/livelock.rs`):
//! - **Fault loops**: `lgdt`/`lidt` from a hole restart on every MMIO exit, for ever (about
//!   140,000 exits a second). [`FaultRepeat`] counts consecutive violation exits at the same
//!   RIP on the same GPA with the same access and *identical* general registers: a guest loop
//!   that reads the same page again changes at least its counter or pointer between exits, and
//!   any other exit in between (a hypercall, port I/O, a violation elsewhere) resets the count.
//! - **Silent spins**: `sgdt`/`sidt` into a hole, `mov ds` with the GDT in a hole and `vmcall`
//!   leave the vCPU inside `KVM_RUN` with no exit at all. The watchdog samples a vCPU that has
//!   made no exit for a while ([`STALL_SAMPLE`]); [`StallSampler`] reports a stall when several
//!   samples in a row see identical registers and no exit in between. A stall alone is not a
//!   livelock (a `jmp $` stalls too, and ring-0 compute loops are emulated without exits); the
//!   run loop decodes the instruction at RIP and calls it a livelock only when that instruction
//!   touches a hole (or is one the host never completes, `vmcall`).

use std::time::Duration;

/// Consecutive identical violation exits that make a fault-loop livelock.
pub const FAULT_REPEATS: u32 = 1000;
/// How often the watchdog samples a vCPU that has made no exit since the last sample.
pub const STALL_SAMPLE: Duration = Duration::from_millis(50);
/// Consecutive identical samples (with no exit in between) that make a stall.
pub const STALL_SAMPLES: u32 = 4;

/// The registers a livelock check compares: rip, rflags and the sixteen general registers.
pub type RegFingerprint = [u64; 18];

/// Fingerprint of a register file.
pub fn fingerprint(r: &kvm_bindings::kvm_regs) -> RegFingerprint {
    [
        r.rip, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10,
        r.r11, r.r12, r.r13, r.r14, r.r15,
    ]
}

/// Counts consecutive identical violation exits.
#[derive(Debug, Default)]
pub struct FaultRepeat {
    last: Option<(u64, u8, RegFingerprint)>,
    count: u32,
}

impl FaultRepeat {
    /// A violation exit on `gpa` (access kind `access`) with registers `regs`: returns the number
    /// of identical exits in a row once it reaches [`FAULT_REPEATS`].
    pub fn fault(&mut self, gpa: u64, access: u8, regs: RegFingerprint) -> Option<u32> {
        let key = (gpa, access, regs);
        if self.last == Some(key) {
            self.count = self.count.saturating_add(1);
        } else {
            self.last = Some(key);
            self.count = 1;
        }
        (self.count >= FAULT_REPEATS).then_some(self.count)
    }

    /// Any other exit: the guest made progress.
    pub fn progress(&mut self) {
        self.last = None;
        self.count = 0;
    }
}

/// Detects a vCPU that sits on one instruction without exits.
#[derive(Debug, Default)]
pub struct StallSampler {
    last: Option<(u64, RegFingerprint)>,
    count: u32,
}

impl StallSampler {
    /// A watchdog sample: `exits` is the run's exit count so far, `regs` the registers now.
    /// Returns the number of identical samples in a row once it reaches [`STALL_SAMPLES`].
    pub fn sample(&mut self, exits: u64, regs: RegFingerprint) -> Option<u32> {
        let key = (exits, regs);
        if self.last == Some(key) {
            self.count = self.count.saturating_add(1);
        } else {
            self.last = Some(key);
            self.count = 1;
        }
        (self.count >= STALL_SAMPLES).then_some(self.count)
    }

    /// Forgets the samples so far (after a stall was judged not to be a livelock, so the next
    /// verdict waits for another full set of samples).
    pub fn reset(&mut self) {
        self.last = None;
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rip: u64, rcx: u64) -> RegFingerprint {
        let mut r = [0; 18];
        r[0] = rip;
        r[4] = rcx;
        r
    }

    #[test]
    fn identical_faults_reach_the_threshold_exactly() {
        let mut d = FaultRepeat::default();
        for _ in 1..FAULT_REPEATS {
            assert_eq!(d.fault(0x40_0000, 1, regs(0x1000, 0)), None);
        }
        assert_eq!(d.fault(0x40_0000, 1, regs(0x1000, 0)), Some(FAULT_REPEATS));
    }

    #[test]
    fn a_loop_over_the_same_page_is_not_a_livelock() {
        // Same RIP and GPA, but the loop counter changes between exits.
        let mut d = FaultRepeat::default();
        for i in 0..10 * u64::from(FAULT_REPEATS) {
            assert_eq!(d.fault(0x40_0000, 1, regs(0x1000, i)), None);
        }
    }

    #[test]
    fn different_pages_or_kinds_or_progress_reset_the_count() {
        let mut d = FaultRepeat::default();
        for i in 0..10 * u64::from(FAULT_REPEATS) {
            // rep movsb over a hole: same RIP, a new GPA each time.
            assert_eq!(d.fault(0x40_0000 + i, 1, regs(0x1000, 0)), None);
        }
        for i in 0..10 * FAULT_REPEATS {
            let kind = 1 + (i % 2) as u8;
            assert_eq!(d.fault(0x40_0000, kind, regs(0x1000, 0)), None);
        }
        for _ in 0..10 * FAULT_REPEATS {
            assert_eq!(d.fault(0x40_0000, 1, regs(0x1000, 0)), None);
            d.progress();
        }
    }

    #[test]
    fn stalls_need_identical_samples_without_exits() {
        let mut s = StallSampler::default();
        for _ in 1..STALL_SAMPLES {
            assert_eq!(s.sample(7, regs(0x1000, 0)), None);
        }
        assert_eq!(s.sample(7, regs(0x1000, 0)), Some(STALL_SAMPLES));
        s.reset();
        // An exit between samples, or moving registers, is progress.
        for i in 0..20 {
            assert_eq!(s.sample(8 + i, regs(0x1000, 0)), None);
            assert_eq!(s.sample(100, regs(0x1000, i)), None);
        }
    }
}
