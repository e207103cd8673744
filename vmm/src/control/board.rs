//! What each vCPU's run loop publishes for the control socket's `vcpus` command: its state,
//! its exit counters and the RIP of its last exit, in atomics (a few relaxed stores per exit),
//! read as a snapshot that may be one exit old.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use serde::Serialize;

use crate::report::ExitCounts;

/// What a vCPU is doing, as its run loop last said.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuRunState {
    /// Not started its run loop yet.
    Starting,
    /// In `KVM_RUN` or handling an exit.
    Running,
    /// Waiting at the `KVM_RUN` gate while another vCPU's stage-2 update parks it.
    Parked,
    /// Idle after a `hlt` (vCPUs other than 0 sleep and resume).
    Halted,
    /// Left its run loop: the VM is stopping.
    Exited,
}

impl VcpuRunState {
    fn from_u8(v: u8) -> VcpuRunState {
        match v {
            1 => VcpuRunState::Running,
            2 => VcpuRunState::Parked,
            3 => VcpuRunState::Halted,
            4 => VcpuRunState::Exited,
            _ => VcpuRunState::Starting,
        }
    }
}

/// One vCPU's published status.
#[derive(Default)]
struct Slot {
    state: AtomicU8,
    total: AtomicU64,
    hypercalls: AtomicU64,
    bare: AtomicU64,
    pio: AtomicU64,
    mmio: AtomicU64,
    memory_faults: AtomicU64,
    /// RIP of the last exit + 1 (0: no exit yet), so RIP 0 stays distinguishable.
    last_rip: AtomicU64,
}

/// The status of every vCPU of one run.
pub struct VcpuBoard {
    slots: Vec<Slot>,
}

/// One vCPU in a `vcpus` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VcpuStatus {
    /// The vCPU's index.
    pub index: u32,
    /// What it is doing.
    pub state: VcpuRunState,
    /// Its exits so far, by kind (the report's counters, not yet added up).
    pub exits: ExitCounts,
    /// Guest RIP at its last exit (None before the first).
    pub last_rip: Option<u64>,
}

impl VcpuBoard {
    /// A board for `count` vCPUs, all [`VcpuRunState::Starting`].
    pub fn new(count: usize) -> VcpuBoard {
        VcpuBoard {
            slots: (0..count).map(|_| Slot::default()).collect(),
        }
    }

    /// vCPU `index` is now in `state` (an index past the board is ignored).
    pub fn set_state(&self, index: usize, state: VcpuRunState) {
        if let Some(s) = self.slots.get(index) {
            s.state.store(state as u8, Ordering::Relaxed);
        }
    }

    /// vCPU `index` made an exit at `rip`; its counters are now `exits`.
    pub fn publish(&self, index: usize, exits: &ExitCounts, rip: u64) {
        let Some(s) = self.slots.get(index) else {
            return;
        };
        s.total.store(exits.total, Ordering::Relaxed);
        s.hypercalls.store(exits.hypercalls, Ordering::Relaxed);
        s.bare.store(exits.bare, Ordering::Relaxed);
        s.pio.store(exits.pio, Ordering::Relaxed);
        s.mmio.store(exits.mmio, Ordering::Relaxed);
        s.memory_faults
            .store(exits.memory_faults, Ordering::Relaxed);
        s.last_rip.store(rip.wrapping_add(1), Ordering::Relaxed);
    }

    /// Every vCPU's status now (each field as last published; not one consistent instant).
    pub fn snapshot(&self) -> Vec<VcpuStatus> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let rip = l(&s.last_rip);
                VcpuStatus {
                    index: i as u32,
                    state: VcpuRunState::from_u8(s.state.load(Ordering::Relaxed)),
                    exits: ExitCounts {
                        total: l(&s.total),
                        hypercalls: l(&s.hypercalls),
                        bare: l(&s.bare),
                        pio: l(&s.pio),
                        mmio: l(&s.mmio),
                        memory_faults: l(&s.memory_faults),
                    },
                    last_rip: rip.checked_sub(1),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_and_snapshots() {
        let b = VcpuBoard::new(2);
        let s = b.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].state, VcpuRunState::Starting);
        assert_eq!(s[0].last_rip, None);
        b.set_state(1, VcpuRunState::Halted);
        let e = ExitCounts {
            total: 5,
            hypercalls: 3,
            mmio: 2,
            ..Default::default()
        };
        b.publish(1, &e, 0);
        b.publish(7, &e, 0x1000); // ignored
        b.set_state(9, VcpuRunState::Exited); // ignored
        let s = b.snapshot();
        assert_eq!(s[1].state, VcpuRunState::Halted);
        assert_eq!(s[1].exits, e);
        assert_eq!(s[1].last_rip, Some(0));
        assert_eq!(s[0].exits, ExitCounts::default());
        let v = serde_json::to_value(&s[1]).unwrap();
        assert_eq!(v["state"], "halted");
        assert_eq!(v["exits"]["hypercalls"], 3);
    }
}
