//! What an ASI transition costs on real /dev/kvm (issue 14, item 4), per stage-2 backend.
//!
//! `cargo bench -p vmm --bench asi_transitions` prints two tables:
//!
//! 1. **ASI exit + `AsiEnter` pair vs a bare exit**: the guest (a 16-bit ring-0 loop at GPA
//!    0x1000: `mov al, [0x8000]; out 0x10, al; jmp`) reads a page and makes a port exit. Bare:
//!    the page is mapped, one iteration is one port-exit round trip. ASI pair: the page is
//!    sensitive and the VM restricted; the load is an MMIO exit, the VMM switches the VM to
//!    the full view and completes the load from its own view (as `Session::asi_mmio` does),
//!    the guest runs on to its port exit (standing for the `AsiEnter` hypercall) and the VMM
//!    switches back to restricted. Medians over `ROUNDS`, with the switch costs alone.
//! 2. **Transition cost vs live sensitive pages** (1, 64, 4,096, 65,536) by placement:
//!    *grouped* (packed into adjacent sensitive pageblocks, as the allocator's pageblock
//!    grouping produces: 1 range), *blocks apart* (one sensitive pageblock in every other
//!    pageblock: one range per pageblock) and *per page* (every other 4 KiB page: one range per
//!    page). A transition is a switch to the full view plus the switch back (median). Where a
//!    layout needs more memslots than `KVM_CAP_NR_MEMSLOTS` or more VMAs than
//!    `vm.max_map_count` allows, the row is **modelled** from the measured cost per range of
//!    the largest measured per-page row, and labelled so.
//!
//! Unmapped ranges are not `mlock`ed here (as in `stage2_backends`), so the figures are the
//! stage-2 work alone; `veil run` locks sensitive ranges while they are absent, which adds an
//! `mlock2`/`munlock` per range and switch: table 1 has a second row per backend with that
//! lock on, as `veil run` has it.

mod loop_guest;

use loop_guest::{vcpu, write_loop, TOUCHED};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm::addr::Gpa;
use vmm::memory::{Backing, CoreDump, GuestRam, MemSize};
use vmm::stage2::{AsiView, KvmSlots, Mprotect, Slots, Stage2Backend, Stage2Engine};

const P: u64 = 4096;
const PB: u64 = 2 << 20;
const ROUNDS: usize = 200;
/// Where the sensitive layouts of table 2 start.
const BASE: u64 = 4 << 20;
const COUNTS: [u64; 4] = [1, 64, 4096, 65_536];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    (min, max)
}

/// Runs the guest to its next port write; each MMIO read on the way is an ASI exit the VMM
/// completes: the switch to the full view (timed into `switch`) and the byte from its view.
fn run_asi<B: Stage2Backend>(
    v: &mut VcpuFd,
    e: &mut Stage2Engine<B>,
    ram: &GuestRam,
    switch: &mut f64,
) -> u32 {
    let mut exits = 0;
    loop {
        match v.run().expect("KVM_RUN") {
            VcpuExit::IoOut(..) => return exits,
            VcpuExit::MmioRead(gpa, d) => {
                let t = Instant::now();
                e.switch_view(AsiView::Full).expect("switch to full");
                *switch += t.elapsed().as_secs_f64() * 1e6;
                ram.read(gpa, d).expect("complete the load");
                exits += 1;
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

struct Pair {
    bare_us: Vec<f64>,
    pair_us: Vec<f64>,
    to_full_us: Vec<f64>,
    to_restricted_us: Vec<f64>,
}

fn pair<B: Stage2Backend>(mut e: Stage2Engine<B>, mut v: VcpuFd, ram: &GuestRam) -> Pair {
    let mut p = Pair {
        bare_us: Vec::new(),
        pair_us: Vec::new(),
        to_full_us: Vec::new(),
        to_restricted_us: Vec::new(),
    };
    let mut none = 0.0;
    assert_eq!(run_asi(&mut v, &mut e, ram, &mut none), 0, "starts mapped");
    for _ in 0..ROUNDS {
        let t = Instant::now();
        assert_eq!(run_asi(&mut v, &mut e, ram, &mut none), 0);
        p.bare_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    e.make_sensitive_range(Gpa(TOUCHED), P).unwrap();
    for _ in 0..ROUNDS {
        let mut to_full = 0.0;
        let t = Instant::now();
        assert_eq!(
            run_asi(&mut v, &mut e, ram, &mut to_full),
            1,
            "one ASI exit"
        );
        let t1 = Instant::now();
        e.switch_view(AsiView::Restricted).unwrap();
        p.to_restricted_us.push(t1.elapsed().as_secs_f64() * 1e6);
        p.pair_us.push(t.elapsed().as_secs_f64() * 1e6);
        p.to_full_us.push(to_full);
    }
    e.check_invariants().unwrap();
    p
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    Grouped,
    BlocksApart,
    PerPage,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Grouped => "grouped",
            Placement::BlocksApart => "blocks apart",
            Placement::PerPage => "per page",
        }
    }

    /// The sensitive ranges of `n` pages: (gpa, len) each, and the RAM they need.
    fn layout(self, n: u64) -> (Vec<(u64, u64)>, u64) {
        let out: Vec<(u64, u64)> = match self {
            Placement::Grouped => vec![(BASE, n * P)],
            Placement::BlocksApart => {
                let blocks = n.div_ceil(512);
                (0..blocks)
                    .map(|b| {
                        let pages = (n - b * 512).min(512);
                        (BASE + 2 * b * PB, pages * P)
                    })
                    .collect()
            }
            Placement::PerPage => (0..n).map(|i| (BASE + 2 * i * P, P)).collect(),
        };
        let end = out.last().map_or(BASE, |&(g, l)| g + l);
        (out, (end + PB).next_multiple_of(PB))
    }
}

/// What the host allows for a layout of `ranges` isolated ranges.
struct Limits {
    memslots: u64,
    max_map_count: u64,
}

impl Limits {
    /// Why `backend` cannot hold `ranges` isolated ranges in the restricted view, if it cannot.
    fn refuses(&self, backend: &str, ranges: u64) -> Option<String> {
        match backend {
            // One memslot per mapped run between the holes.
            "slots" if ranges + 1 > self.memslots => Some(format!(
                "needs {} memslots > KVM_CAP_NR_MEMSLOTS {}",
                ranges + 1,
                self.memslots
            )),
            // One VMA per hole and per run between them, plus the process's own.
            "mprotect" if 2 * ranges + 1 + 1000 > self.max_map_count => Some(format!(
                "needs {} VMAs > vm.max_map_count {}",
                2 * ranges + 1,
                self.max_map_count
            )),
            _ => None,
        }
    }
}

enum Cost {
    Measured { ranges: u64, us: Vec<f64> },
    Modelled { ranges: u64, us: f64, why: String },
}

fn transition<B: Stage2Backend>(mut e: Stage2Engine<B>, ranges: &[(u64, u64)]) -> Cost {
    for &(g, l) in ranges {
        e.make_sensitive_range(Gpa(g), l).unwrap();
    }
    let rounds = if ranges.len() > 1000 { 5 } else { 40 };
    let mut us = Vec::with_capacity(rounds);
    let mut toggled = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        toggled = e.switch_view(AsiView::Full).unwrap().ranges;
        e.switch_view(AsiView::Restricted).unwrap();
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    e.check_invariants().unwrap();
    Cost::Measured {
        ranges: toggled,
        us,
    }
}

fn engine_for(
    kvm: &Kvm,
    backend: &str,
    ram_size: u64,
    lock: bool,
) -> (Box<dyn Stage2Backend>, Arc<GuestRam>, Arc<VmFd>) {
    let vm = Arc::new(kvm.create_vm().unwrap());
    let backing = if backend == "slots" {
        Backing::Anonymous
    } else {
        Backing::Memfd
    };
    let ram = Arc::new(GuestRam::create(MemSize(ram_size), CoreDump::Exclude, backing).unwrap());
    let max_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(32);
    let b: Box<dyn Stage2Backend> = if backend == "slots" {
        let mut t = KvmSlots::new(vm.clone(), ram.clone(), max_slots);
        t.lock_unmapped(lock);
        Box::new(Slots::new(t, ram_size))
    } else {
        let mut m = Mprotect::new(vm.clone(), ram.clone()).unwrap();
        m.lock_unmapped(lock);
        Box::new(m)
    };
    (b, ram, vm)
}

fn main() {
    // Under `cargo test --benches` the harness passes no --bench flag: skip the measurement.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("asi_transitions: /dev/kvm unavailable ({e}); nothing measured");
            return;
        }
    };
    let limits = Limits {
        memslots: kvm.get_nr_memslots() as u64,
        max_map_count: std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65_530),
    };

    println!("ASI exit + AsiEnter pair vs a bare exit ({ROUNDS} rounds, median [min, max] us)");
    println!(
        "{:<14} {:>26} {:>26} {:>8} {:>22} {:>22}",
        "backend", "bare exit", "ASI exit + enter", "ratio", "switch to full", "switch back"
    );
    for (backend, lock) in [
        ("slots", false),
        ("mprotect", false),
        ("slots", true),
        ("mprotect", true),
    ] {
        let ram_size = 16 << 20;
        let (b, ram, vm) = engine_for(&kvm, backend, ram_size, lock);
        write_loop(&ram);
        let v = vcpu(&vm);
        let p = pair(Stage2Engine::new(b, ram_size, Gpa(0)).unwrap(), v, &ram);
        let f = |v: &[f64]| {
            let (lo, hi) = range(v);
            format!("{:.1} [{:.1}, {:.1}]", median(v.to_vec()), lo, hi)
        };
        println!(
            "{:<14} {:>26} {:>26} {:>7.2}x {:>22} {:>22}",
            if lock {
                format!("{backend}+mlock")
            } else {
                backend.to_string()
            },
            f(&p.bare_us),
            f(&p.pair_us),
            median(p.pair_us.clone()) / median(p.bare_us.clone()),
            f(&p.to_full_us),
            f(&p.to_restricted_us)
        );
    }

    println!();
    println!("transition cost (switch to full + back, median us) vs live sensitive pages");
    println!(
        "{:<9} {:<13} {:>7} {:>8} {:>16} {:>14}  note",
        "backend", "placement", "pages", "ranges", "transition (us)", "per range (us)"
    );
    for backend in ["slots", "mprotect"] {
        let mut per_range: Option<f64> = None;
        for placement in [
            Placement::Grouped,
            Placement::BlocksApart,
            Placement::PerPage,
        ] {
            for n in COUNTS {
                let (ranges, ram_size) = placement.layout(n);
                let cost = match limits.refuses(backend, ranges.len() as u64) {
                    Some(why) => Cost::Modelled {
                        ranges: ranges.len() as u64,
                        us: per_range.unwrap_or(f64::NAN) * ranges.len() as f64,
                        why,
                    },
                    None => {
                        let (b, _ram, _vm) = engine_for(&kvm, backend, ram_size, false);
                        transition(Stage2Engine::new(b, ram_size, Gpa(0)).unwrap(), &ranges)
                    }
                };
                match cost {
                    Cost::Measured { ranges, us } => {
                        let m = median(us.clone());
                        let (lo, hi) = range(&us);
                        if placement == Placement::PerPage {
                            per_range = Some(m / ranges.max(1) as f64);
                        }
                        println!(
                            "{:<9} {:<13} {:>7} {:>8} {:>16.1} {:>14.2}  measured [{:.1}, {:.1}], {} rounds",
                            backend,
                            placement.name(),
                            n,
                            ranges,
                            m,
                            m / ranges.max(1) as f64,
                            lo,
                            hi,
                            us.len()
                        );
                    }
                    Cost::Modelled { ranges, us, why } => println!(
                        "{:<9} {:<13} {:>7} {:>8} {:>16.1} {:>14.2}  MODELLED ({why}): measured per-range cost x ranges",
                        backend,
                        placement.name(),
                        n,
                        ranges,
                        us,
                        us / ranges.max(1) as f64
                    ),
                }
            }
        }
    }
}
