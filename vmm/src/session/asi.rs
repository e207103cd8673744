//! ASI in the session: per-vCPU entered/exited state, the ASI exit (a restricted vCPU's touch
//! of a sensitive page: the VM switches to the full view, the transition is recorded, the
//! access is completed), `Hc::AsiEnter` (the flush point), `Hc::AsiStats`,
//! `Hc::ExpectAsiExit` and the exposure accounting.
//!
//! The view is per VM here (memslots and host protections are per VM; no second address
//! space): the VM is in the full view while any vCPU is exited, and every vCPU that is
//! entered meanwhile is *exposed*: the report says for how long.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use veil_abi::{AsiStats, Status};
use vm_memory::ByteValued;

use super::Session;
use crate::addr::Gpa;
use crate::report::asi::{
    AsiReport, AsiTransition, AsiTransitionKind, AsiVcpu, AsiVia, Exposed, ExposureWindow,
    MAX_TRANSITIONS, MAX_WINDOWS,
};
use crate::report::AccessKind;
use crate::stage2::{AsiView, EngineError, RangeState};

/// Most ASI-exit declarations one test may make.
pub const MAX_ASI_EXPECTATIONS: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
struct VcpuAsi {
    exited: bool,
    exits: u64,
    enters: u64,
    noop_enters: u64,
    exposed: Duration,
    exposed_windows: u64,
}

/// The window open while the VM is in the full view.
struct Window {
    start: Instant,
    opened_by: u32,
    max_exited: u32,
    exposed: BTreeMap<u32, Duration>,
}

/// The run's ASI state.
pub(super) struct Asi {
    origin: Instant,
    vcpus: Vec<VcpuAsi>,
    last_event: Instant,
    window: Option<Window>,
    windows: Vec<ExposureWindow>,
    windows_total: u64,
    full_total: Duration,
    longest: Duration,
    transitions: Vec<AsiTransition>,
    transitions_total: u64,
    completed: u64,
    switch_total: Duration,
    switch_max: Duration,
    switches: u64,
    ranges_toggled: u64,
    max_ranges: u64,
    last_ranges: u64,
}

impl Asi {
    /// Every one of `vcpus` vCPUs ASI-entered, the VM restricted.
    pub(super) fn new(vcpus: usize) -> Asi {
        let now = Instant::now();
        Asi {
            origin: now,
            vcpus: vec![VcpuAsi::default(); vcpus.max(1)],
            last_event: now,
            window: None,
            windows: Vec::new(),
            windows_total: 0,
            full_total: Duration::ZERO,
            longest: Duration::ZERO,
            transitions: Vec::new(),
            transitions_total: 0,
            completed: 0,
            switch_total: Duration::ZERO,
            switch_max: Duration::ZERO,
            switches: 0,
            ranges_toggled: 0,
            max_ranges: 0,
            last_ranges: 0,
        }
    }

    fn vcpu(&mut self, i: usize) -> &mut VcpuAsi {
        if i >= self.vcpus.len() {
            self.vcpus.resize(i + 1, VcpuAsi::default());
        }
        &mut self.vcpus[i]
    }

    fn exited_count(&self) -> u32 {
        self.vcpus.iter().filter(|v| v.exited).count() as u32
    }

    /// Charges the time since the last event to every vCPU entered while the VM is full.
    fn account(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last_event);
        self.last_event = now;
        let Some(w) = self.window.as_mut() else {
            return;
        };
        for (i, v) in self.vcpus.iter_mut().enumerate() {
            if !v.exited {
                v.exposed += dt;
                *w.exposed.entry(i as u32).or_default() += dt;
            }
        }
    }

    fn us(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.origin).as_secs_f64() * 1e6
    }

    fn note_switch(&mut self, took: Duration, ranges: u64) {
        self.switches += 1;
        self.switch_total += took;
        self.switch_max = self.switch_max.max(took);
        self.ranges_toggled += ranges;
        self.max_ranges = self.max_ranges.max(ranges);
        self.last_ranges = ranges;
    }

    fn push(&mut self, t: AsiTransition) {
        self.transitions_total += 1;
        if self.transitions.len() < MAX_TRANSITIONS {
            self.transitions.push(t);
        }
    }

    fn close_window(&mut self, now: Instant) {
        let Some(w) = self.window.take() else {
            return;
        };
        let d = now.saturating_duration_since(w.start);
        self.full_total += d;
        self.longest = self.longest.max(d);
        self.windows_total += 1;
        let exposed: Vec<Exposed> = w
            .exposed
            .iter()
            .filter(|(_, d)| !d.is_zero())
            .map(|(&vcpu, d)| Exposed {
                vcpu,
                us: d.as_secs_f64() * 1e6,
            })
            .collect();
        for e in &exposed {
            self.vcpu(e.vcpu as usize).exposed_windows += 1;
        }
        if self.windows.len() < MAX_WINDOWS {
            self.windows.push(ExposureWindow {
                start_us: self.us(w.start),
                duration_us: d.as_secs_f64() * 1e6,
                opened_by: w.opened_by,
                max_exited: w.max_exited,
                exposed,
            });
        }
    }

    /// The report's `asi` object (an open window is closed at `now`).
    pub(super) fn report(&mut self, now: Instant, view_switches: u64) -> AsiReport {
        self.account(now);
        self.close_window(now);
        let (exits, enters, noop) = self.vcpus.iter().fold((0, 0, 0), |a, v| {
            (a.0 + v.exits, a.1 + v.enters, a.2 + v.noop_enters)
        });
        AsiReport {
            view_scope: "per_vm",
            exits,
            enters,
            noop_enters: noop,
            completed_accesses: self.completed,
            view_switches: view_switches.max(self.switches),
            ranges_toggled: self.ranges_toggled,
            max_ranges_toggled: self.max_ranges,
            mean_switch_us: self.switch_total.as_secs_f64() * 1e6 / self.switches.max(1) as f64,
            max_switch_us: self.switch_max.as_secs_f64() * 1e6,
            full_view_ms: self.full_total.as_secs_f64() * 1e3,
            windows: self.windows_total,
            longest_window_us: self.longest.as_secs_f64() * 1e6,
            exposed_vcpu_ms: self
                .vcpus
                .iter()
                .map(|v| v.exposed.as_secs_f64() * 1e3)
                .sum(),
            vcpus: self
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, v)| AsiVcpu {
                    vcpu: i as u32,
                    exits: v.exits,
                    enters: v.enters,
                    noop_enters: v.noop_enters,
                    exited_at_end: v.exited,
                    exposed_us: v.exposed.as_secs_f64() * 1e6,
                    exposed_windows: v.exposed_windows,
                })
                .collect(),
            transitions: std::mem::take(&mut self.transitions),
            transitions_total: self.transitions_total,
            exposure_windows: std::mem::take(&mut self.windows),
        }
    }
}

/// A test's ASI-exit declarations and the exits it made, per page.
#[derive(Clone, Debug, Default)]
pub(super) struct TestAsi {
    expected: BTreeMap<u64, u64>,
    declarations: usize,
    got: BTreeMap<u64, u64>,
}

impl TestAsi {
    /// `Ok` if every page's exits equal its declared total; otherwise the differences.
    pub(super) fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        let pages: std::collections::BTreeSet<u64> = self
            .expected
            .keys()
            .chain(self.got.keys())
            .copied()
            .collect();
        for p in pages {
            let (want, got) = (
                self.expected.get(&p).copied().unwrap_or(0),
                self.got.get(&p).copied().unwrap_or(0),
            );
            if want != got {
                problems.push(format!(
                    "expected {want} ASI exits on page {p:#x}, recorded {got}"
                ));
            }
        }
        match problems.len() {
            0 => Ok(()),
            n if n > 16 => Err(format!(
                "{}; and {} more ASI differences",
                problems[..16].join("; "),
                n - 16
            )),
            _ => Err(problems.join("; ")),
        }
    }
}

/// An [`AsiStats`] as plain bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct AsiStatsBytes(AsiStats);
// SAFETY: AsiStats is repr(C) and made of ten u64: no padding, any bit pattern valid.
unsafe impl ByteValued for AsiStatsBytes {}
const _: () = assert!(std::mem::size_of::<AsiStats>() == 80);

impl Session {
    /// Whether the page at `gpa` is sensitive.
    pub(crate) fn is_sensitive(&self, gpa: Gpa) -> bool {
        self.state_at(gpa) == Some(RangeState::Sensitive)
    }

    /// The ASI exit: the lent vCPU's `access` to the sensitive page at `gpa` (at `rip`, reaching
    /// the VMM `via`). The VM switches to the full view if it is not there yet, the vCPU is
    /// exited from now on and the transition recorded (and counted for the running test).
    /// The caller completes the access. A failed switch changes nothing (the caller answers
    /// the access as a violation).
    pub(crate) fn asi_exit(
        &mut self,
        gpa: Gpa,
        access: AccessKind,
        rip: u64,
        via: AsiVia,
    ) -> Result<(), EngineError> {
        let now = Instant::now();
        self.asi.account(now);
        let vcpu = self.cpu.index;
        let t0 = Instant::now();
        let sw = self.alloc.with_stage2(|e| e.switch_view(AsiView::Full))?;
        let took = t0.elapsed();
        let switched = self.asi.window.is_none();
        if switched {
            self.asi.note_switch(took, sw.ranges);
            self.asi.window = Some(Window {
                start: now,
                opened_by: vcpu as u32,
                max_exited: 0,
                exposed: BTreeMap::new(),
            });
        }
        let v = self.asi.vcpu(vcpu);
        v.exited = true;
        v.exits += 1;
        let exited = self.asi.exited_count();
        if let Some(w) = self.asi.window.as_mut() {
            w.max_exited = w.max_exited.max(exited);
        }
        let at_us = self.asi.us(now);
        let test = self.current_name();
        self.asi.push(AsiTransition {
            kind: AsiTransitionKind::Exit,
            vcpu: vcpu as u32,
            gpa: Some(gpa.raw()),
            rip,
            access: Some(access),
            via: Some(via),
            at_us,
            switched_view: switched,
            ranges_toggled: sw.ranges,
            switch_us: took.as_secs_f64() * 1e6,
            test,
        });
        if let Some(c) = self.current.as_mut() {
            *c.asi.got.entry(gpa.page_start().raw()).or_default() += 1;
        }
        Ok(())
    }

    /// An MMIO exit at a sensitive page: an ASI exit if the vCPU is entered, then the access
    /// completed from the VMM's view (a load fills `data`, a store writes it). `Err`: the
    /// switch failed, and the caller answers the access as a violation.
    pub(crate) fn asi_mmio(
        &mut self,
        gpa: Gpa,
        access: AccessKind,
        data: &mut [u8],
        rip: u64,
    ) -> Result<(), EngineError> {
        let vcpu = self.cpu.index;
        if !self.asi.vcpu(vcpu).exited
            || self.alloc.with_stage2(|e| e.asi_view()) == AsiView::Restricted
        {
            self.asi_exit(gpa, access, rip, AsiVia::Mmio)?;
        }
        // The page is reachable in the full view now: the guest could make this access
        // itself, so completing it from the VMM's view gives it nothing more.
        let r = match access {
            AccessKind::Write => self.ram.write(gpa.raw(), data),
            _ => self.ram.read(gpa.raw(), data),
        };
        if r.is_err() {
            log::warn!("cannot complete the ASI access at {gpa:#x}");
        }
        self.asi.completed += 1;
        Ok(())
    }

    /// `Hc::AsiEnter` from the lent vCPU.
    pub(super) fn hc_asi_enter(&mut self) -> Result<u64, Status> {
        let now = Instant::now();
        self.asi.account(now);
        let vcpu = self.cpu.index;
        if !self.asi.vcpu(vcpu).exited {
            self.asi.vcpu(vcpu).noop_enters += 1;
            return Err(Status::AlreadyRestricted);
        }
        self.asi.vcpu(vcpu).exited = false;
        let last = self.asi.exited_count() == 0;
        let (mut ranges, mut took) = (0, Duration::ZERO);
        if last {
            let t0 = Instant::now();
            match self
                .alloc
                .with_stage2(|e| e.switch_view(AsiView::Restricted))
            {
                Ok(sw) => {
                    took = t0.elapsed();
                    ranges = sw.ranges;
                    self.asi.note_switch(took, ranges);
                    self.asi.close_window(Instant::now());
                }
                Err(e) => {
                    log::warn!("AsiEnter: cannot switch back to the restricted view: {e}");
                    self.asi.vcpu(vcpu).exited = true;
                    return Err(Status::Stage2Failed);
                }
            }
        }
        self.asi.vcpu(vcpu).enters += 1;
        let at_us = self.asi.us(now);
        let test = self.current_name();
        self.asi.push(AsiTransition {
            kind: AsiTransitionKind::Enter,
            vcpu: vcpu as u32,
            gpa: None,
            rip: 0,
            access: None,
            via: None,
            at_us,
            switched_view: last,
            ranges_toggled: ranges,
            switch_us: took.as_secs_f64() * 1e6,
            test,
        });
        Ok(ranges)
    }

    /// `Hc::AsiStats`: the counters and the lent vCPU's state into reserved memory.
    pub(super) fn hc_asi_stats(&mut self, ptr: Gpa) -> Result<u64, Status> {
        self.asi.account(Instant::now());
        let vcpu = self.cpu.index;
        let (vm_full, runs, switches) = self.alloc.with_stage2(|e| {
            (
                e.asi_view() == AsiView::Full,
                e.sensitive_runs(),
                e.counters().view_switches,
            )
        });
        let (exits, enters, noop) = self.asi.vcpus.iter().fold((0, 0, 0), |a, v| {
            (a.0 + v.exits, a.1 + v.enters, a.2 + v.noop_enters)
        });
        let last = self.asi.last_ranges;
        let v = *self.asi.vcpu(vcpu);
        // Windows this vCPU is exposed in, the open one included.
        let open = self
            .asi
            .window
            .as_ref()
            .is_some_and(|w| w.exposed.get(&(vcpu as u32)).is_some_and(|d| !d.is_zero()));
        let stats = AsiStats {
            exits,
            enters,
            noop_enters: noop,
            view_switches: switches,
            last_ranges_toggled: last,
            sensitive_runs: runs,
            vm_full: vm_full as u64,
            vcpu_exited: v.exited as u64,
            vcpu_exposed_ns: v.exposed.as_nanos() as u64,
            vcpu_exposed_windows: v.exposed_windows + open as u64,
        };
        self.write_buf(ptr, AsiStatsBytes(stats).as_slice())?;
        Ok(0)
    }

    /// `Hc::ExpectAsiExit`: the running test expects `count` ASI exits on the page at `gpa`.
    pub(super) fn hc_expect_asi_exit(&mut self, gpa: Gpa, count: u64) -> Result<u64, Status> {
        let c = self.current.as_mut().ok_or(Status::BadState)?;
        if c.asi.declarations >= MAX_ASI_EXPECTATIONS {
            return Err(Status::BadArgument);
        }
        c.asi.declarations += 1;
        let e = c.asi.expected.entry(gpa.page_start().raw()).or_default();
        *e = e.saturating_add(count);
        Ok(0)
    }

    /// The report's `asi` object.
    pub(super) fn asi_report(&mut self) -> AsiReport {
        let switches = self.alloc.with_stage2(|e| e.counters().view_switches);
        self.asi.report(Instant::now(), switches)
    }
}
