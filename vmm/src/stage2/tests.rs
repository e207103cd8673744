//! Tests of the stage-2 engine: unit tests and property tests over [`ModelSlots`], and one test
//! against real KVM.

use super::*;
use crate::addr::{Gpa, HostAddr};
use crate::memory::{Backing, GuestRam, MemSize};
use allocator::{Stage2, Stage2Error};
use proptest::prelude::*;
use std::sync::Arc;

const P: u64 = PAGE_SIZE;

type ModelEngine = Stage2Engine<Slots<ModelSlots>>;

fn engine(pages: u64, reserved: u64, max: u32) -> ModelEngine {
    Stage2Engine::new(
        Slots::new(ModelSlots::recording(max), pages * P),
        pages * P,
        Gpa(reserved * P),
    )
    .unwrap()
}

fn slots(e: &ModelEngine) -> Vec<(u64, u64)> {
    e.memslots()
        .iter()
        .map(|s| (s.gpa / P, s.end() / P))
        .collect()
}

fn assert_consistent(e: &ModelEngine) {
    e.check_invariants().unwrap();
    assert_eq!(
        e.memslots(),
        e.backend().table().slots(),
        "engine and backend slot tables differ"
    );
    assert_eq!(e.backend().table().refused_calls(), 0);
    let c = e.counters();
    assert_eq!(c.memslot_updates, e.backend().table().set_slot_calls());
    assert_eq!(c.slots_created, e.backend().table().creates());
    assert_eq!(c.slots_deleted, e.backend().table().deletes());
    assert_eq!(c.slots_created - c.slots_deleted, c.memslots_in_use);
}

/// Opens /dev/kvm, or explains loudly why not; fails under CI=true.
pub(crate) fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match kvm_ioctls::Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            let msg = format!("!!!!! {test}: /dev/kvm unavailable ({e}); KVM test SKIPPED !!!!!");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg} (CI=true: a missing /dev/kvm is a failure)");
            }
            eprintln!("{msg}");
            None
        }
    }
}

#[test]
fn initial_layout_is_one_slot() {
    let e = engine(1024, 512, 8);
    assert_eq!(slots(&e), vec![(0, 1024)]);
    assert_eq!(e.state_at(Gpa(0)), Some(RangeState::Reserved));
    assert_eq!(e.state_at(Gpa(511 * P)), Some(RangeState::Reserved));
    assert_eq!(e.state_at(Gpa(512 * P)), Some(RangeState::Mapped));
    assert_eq!(e.state_at(Gpa(1024 * P)), None);
    let r = e.ranges();
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].state, r[0].slot, r[0].pages()),
        (RangeState::Reserved, Some(0), 512)
    );
    assert_eq!(
        (r[1].state, r[1].slot, r[1].pages()),
        (RangeState::Mapped, Some(0), 512)
    );
    assert_eq!(e.counters().memslot_updates, 1);
    assert_consistent(&e);
}

#[test]
fn all_reserved_or_no_reserved() {
    let e = engine(16, 16, 1);
    assert_eq!(e.ranges().len(), 1);
    let e = engine(16, 0, 1);
    assert_eq!(e.ranges()[0].state, RangeState::Mapped);
    assert!(matches!(
        Stage2Engine::new(Slots::new(ModelSlots::new(1), 0), 0, Gpa(0)),
        Err(EngineError::BadRamSize(0))
    ));
    assert!(matches!(
        Stage2Engine::new(Slots::new(ModelSlots::new(1), 3 * P), 3 * P, Gpa(4 * P)),
        Err(EngineError::BadReservedEnd { .. })
    ));
    assert!(matches!(
        Stage2Engine::new(Slots::new(ModelSlots::new(0), 4 * P), 4 * P, Gpa(0)),
        Err(EngineError::OutOfSlots { .. })
    ));
}

#[test]
fn split_and_merge_use_minimal_calls() {
    let mut e = engine(1024, 512, 8);
    // Unmap in the middle: delete + two creates.
    e.unmap(600, 10).unwrap();
    assert_eq!(slots(&e), vec![(0, 600), (610, 1024)]);
    assert_eq!(e.counters().memslot_updates, 1 + 3);
    assert_eq!(e.state_at(Gpa(605 * P)), Some(RangeState::Unmapped));
    // Grow the hole at its right edge: delete + one create.
    e.unmap(610, 10).unwrap();
    assert_eq!(slots(&e), vec![(0, 600), (620, 1024)]);
    assert_eq!(e.counters().memslot_updates, 4 + 2);
    // Unmap the tail of RAM: delete + create.
    e.unmap(1000, 24).unwrap();
    assert_eq!(slots(&e), vec![(0, 600), (620, 1000)]);
    assert_eq!(e.counters().memslot_updates, 6 + 2);
    // Map a part of a hole that touches nothing: one create.
    e.map(605, 5).unwrap();
    assert_eq!(slots(&e), vec![(0, 600), (605, 610), (620, 1000)]);
    assert_eq!(e.counters().memslot_updates, 8 + 1);
    // Map the rest of the hole: three slots become one (3 deletes + 1 create).
    e.map(600, 5).unwrap();
    e.map(610, 10).unwrap();
    assert_eq!(slots(&e), vec![(0, 1000)]);
    let ranges = e.ranges();
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[2].state, RangeState::Unmapped);
    assert_eq!(ranges[2].slot, None);
    let c = e.counters();
    assert_eq!(
        (c.unmap_calls, c.map_calls, c.pages_unmapped, c.pages_mapped),
        (3, 3, 44, 20)
    );
    assert_eq!(c.peak_memslots, 3);
    assert_eq!(c.memslots_in_use, 1);
    assert_consistent(&e);
}

#[test]
fn freed_ids_are_reused() {
    let mut e = engine(1024, 0, 4);
    for _ in 0..50 {
        e.unmap(100, 1).unwrap();
        e.unmap(300, 1).unwrap();
        e.map(100, 1).unwrap();
        e.map(300, 1).unwrap();
    }
    let max_id = e
        .backend()
        .table()
        .calls()
        .iter()
        .filter_map(|c| match c {
            SlotCall::SetSlot { slot, .. } => Some(*slot),
            SlotCall::Zero { .. } => None,
        })
        .max()
        .unwrap();
    assert!(max_id < 3, "ids grew to {max_id}");
    assert_consistent(&e);
}

#[test]
fn bad_updates_are_rejected_without_side_effects() {
    let mut e = engine(1024, 512, 8);
    e.unmap(600, 10).unwrap();
    let before = (
        e.ranges(),
        e.memslots(),
        e.backend().table().set_slot_calls(),
    );
    let cases: Vec<(&str, Result<(), Stage2Error>)> = vec![
        ("unmap unmapped", e.unmap(600, 1)),
        ("unmap partly unmapped", e.unmap(595, 10)),
        ("unmap reserved", e.unmap(0, 1)),
        ("unmap straddling reserved", e.unmap(510, 4)),
        ("map mapped", e.map(700, 1)),
        ("map partly mapped", e.map(605, 10)),
        ("map reserved", e.map(100, 1)),
        ("unmap past RAM", e.unmap(1020, 8)),
        ("unmap outside RAM", e.unmap(5000, 1)),
        ("overflow", e.unmap(u64::MAX / 2, 4)),
        ("empty", e.unmap(700, 0)),
        ("zero reserved", e.zero(500, 20)),
        ("zero past RAM", e.zero(1023, 2)),
    ];
    for (what, r) in cases {
        assert!(matches!(r, Err(Stage2Error::Backend(_))), "{what}: {r:?}");
    }
    assert!(matches!(e.last_error(), Some(EngineError::OutOfRam { .. })));
    assert_eq!(
        (
            e.ranges(),
            e.memslots(),
            e.backend().table().set_slot_calls()
        ),
        before
    );
    assert_eq!(e.counters().rejected_updates, 13);
    assert_eq!(e.backend().table().zero_calls(), 0);
    assert!(matches!(
        e.unmap_range(Gpa(P), P),
        Err(EngineError::WrongState {
            found: RangeState::Reserved,
            ..
        })
    ));
    assert!(matches!(
        e.map_range(Gpa(700 * P), P),
        Err(EngineError::WrongState {
            found: RangeState::Mapped,
            ..
        })
    ));
    assert!(matches!(
        e.unmap_range(Gpa(700 * P + 1), P),
        Err(EngineError::OutOfRam { .. })
    ));
    assert_consistent(&e);
}

#[test]
fn zero_goes_to_backend_for_mapped_and_unmapped() {
    let mut e = engine(1024, 512, 8);
    e.unmap(600, 10).unwrap();
    e.zero(600, 10).unwrap();
    e.zero(700, 512 - 188).unwrap();
    assert_eq!(e.backend().table().zero_calls(), 2);
    assert_eq!(e.backend().table().bytes_zeroed(), (10 + 324) * P);
    let c = e.counters();
    assert_eq!((c.zero_calls, c.pages_zeroed), (2, 334));
    assert!(e.backend().table().calls().contains(&SlotCall::Zero {
        gpa: 600 * P,
        len: 10 * P
    }));
}

#[test]
fn out_of_slots_is_refused_before_touching_the_backend() {
    let mut e = engine(1024, 0, 2);
    e.unmap(100, 10).unwrap();
    assert_eq!(slots(&e), vec![(0, 100), (110, 1024)]);
    let calls = e.backend().table().set_slot_calls();
    let ranges = e.ranges();
    assert_eq!(e.unmap(500, 10), Err(Stage2Error::OutOfSlots));
    assert!(matches!(
        e.last_error(),
        Some(EngineError::OutOfSlots { needed: 3, max: 2 })
    ));
    assert_eq!(e.backend().table().set_slot_calls(), calls);
    assert_eq!(e.ranges(), ranges);
    // Edge unmaps and merges still work at the limit.
    e.unmap(1000, 24).unwrap();
    e.unmap(110, 10).unwrap();
    e.map(100, 20).unwrap();
    assert_eq!(slots(&e), vec![(0, 1000)]);
    assert_consistent(&e);
}

#[test]
fn backend_failure_rolls_back() {
    for fail_after in 0..3 {
        let mut e = engine(1024, 0, 8);
        e.unmap(100, 10).unwrap();
        let ranges = e.ranges();
        let table = e.memslots();
        e.backend_mut().table_mut().fail_after(Some(fail_after));
        // Unmap in the middle of slot [110, 1024): delete, create, create.
        let r = e.unmap(500, 10);
        assert_eq!(
            r,
            Err(Stage2Error::Backend(-libc::EIO)),
            "fail_after {fail_after}"
        );
        assert_eq!(e.ranges(), ranges);
        let mut got: Vec<_> = e.memslots().iter().map(|s| (s.gpa, s.len)).collect();
        let mut want: Vec<_> = table.iter().map(|s| (s.gpa, s.len)).collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_consistent(&e);
        // And the engine still works afterwards.
        e.unmap(500, 10).unwrap();
        e.map(500, 10).unwrap();
        e.map(100, 10).unwrap();
        assert_eq!(slots(&e), vec![(0, 1024)]);
        assert_consistent(&e);
    }
}

#[test]
fn model_refuses_kvm_rule_breaks() {
    let mut m = ModelSlots::new(4);
    m.set_slot(0, 0, 16 * P, false).unwrap();
    assert!(m.set_slot(1, 8 * P, 16 * P, false).is_err(), "overlap");
    assert!(m.set_slot(0, 32 * P, P, false).is_err(), "id in use");
    assert!(m.set_slot(2, 0, 0, false).is_err(), "delete of a free id");
    assert!(
        m.set_slot(4, 64 * P, P, false).is_err(),
        "id past the limit"
    );
    assert!(m.set_slot(1, 3, P, false).is_err(), "unaligned");
    m.set_slot(1, 16 * P, P, false).unwrap();
    assert_eq!(m.refused_calls(), 5);
    assert!(m.is_exposed(16 * P) && !m.is_exposed(17 * P));
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Unmap(u64, u64),
    Map(u64, u64),
    Protect(u64, u64),
    Zero(u64, u64),
}

impl Op {
    fn range(self) -> (u64, u64) {
        match self {
            Op::Unmap(s, n) | Op::Map(s, n) | Op::Protect(s, n) | Op::Zero(s, n) => (s, n),
        }
    }

    /// Applies the op to `e` (pages relative to `base`).
    fn apply<B: Stage2Backend>(
        self,
        e: &mut Stage2Engine<B>,
        base: u64,
    ) -> Result<(), Stage2Error> {
        let (s, n) = self.range();
        match self {
            Op::Unmap(..) => e.unmap(base + s, n),
            Op::Map(..) => e.map(base + s, n),
            Op::Protect(..) => e
                .lock_range(Gpa((base + s) * P), n * P, RangeState::ReadOnly)
                .map_err(|e| e.to_stage2()),
            Op::Zero(..) => e.zero(base + s, n),
        }
    }

    /// The per-page model after the op, if the op is valid on `model` (whose first
    /// `reserved` pages are reserved memory, locked or not).
    fn next(self, model: &[RangeState], reserved: u64) -> Option<Vec<RangeState>> {
        use RangeState::{Mapped, ReadOnly, Reserved, Unmapped};
        let (s, n) = self.range();
        if s + n > model.len() as u64 {
            return None;
        }
        let (from, to): (&[RangeState], RangeState) = match self {
            Op::Unmap(..) => (&[Mapped], Unmapped),
            Op::Map(..) => (&[Unmapped], Mapped),
            Op::Protect(..) => (&[Mapped, Reserved], ReadOnly),
            Op::Zero(..) => (&[], Reserved),
        };
        let valid = (s..s + n).all(|p| match from {
            [] => p >= reserved,
            f => f.contains(&model[p as usize]),
        });
        let mut next = model.to_vec();
        if !from.is_empty() {
            for p in s..s + n {
                next[p as usize] = to;
            }
        }
        valid.then_some(next)
    }
}

fn op_strategy(pages: u64) -> impl Strategy<Value = Op> {
    (0..7u8, 0..pages + 2, 1..24u64).prop_map(|(k, s, n)| match k {
        0 | 1 => Op::Unmap(s, n),
        2 | 3 => Op::Map(s, n),
        4 => Op::Protect(s, n),
        _ => Op::Zero(s, n),
    })
}

/// The memslots the slots backend must hold for `model`: maximal runs of equal, non-none
/// permission, as (first page, end page, readonly).
fn slot_runs_of(model: &[RangeState]) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for (i, s) in model.iter().enumerate() {
        let i = i as u64;
        let perm = View::GUEST.perm(*s);
        if perm == Perm::None {
            continue;
        }
        let ro = perm == Perm::Read;
        match runs.last_mut() {
            Some(r) if r.1 == i && r.2 == ro => r.1 = i + 1,
            _ => runs.push((i, i + 1, ro)),
        }
    }
    runs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random unmap/map/protect/zero sequences against a per-page model, through the slots
    /// backend over the model memslot table.
    #[test]
    fn engine_matches_per_page_model(
        reserved in 0..8u64,
        max_slots in 1..10u32,
        ops in prop::collection::vec(op_strategy(96), 1..80),
    ) {
        let pages = 96u64;
        let mut e = engine(pages, reserved, max_slots);
        let mut model: Vec<RangeState> = (0..pages)
            .map(|p| if p < reserved { RangeState::Reserved } else { RangeState::Mapped })
            .collect();
        let (mut unmapped, mut mapped, mut zeroed, mut rejected) = (0u64, 0u64, 0u64, 0u64);
        for op in ops {
            let (_, n) = op.range();
            let calls_before = e.backend().table().set_slot_calls();
            let r = op.apply(&mut e, 0);
            let next = op.next(&model, reserved);
            let fits = next
                .as_ref()
                .is_none_or(|m| slot_runs_of(m).len() as u64 <= u64::from(max_slots));
            match (next, fits) {
                (Some(next), true) => {
                    prop_assert!(r.is_ok(), "{:?}: {:?}", op, r);
                    model = next;
                    match op {
                        Op::Unmap(..) => unmapped += n,
                        Op::Map(..) => mapped += n,
                        Op::Protect(..) => {}
                        Op::Zero(..) => zeroed += n,
                    }
                }
                (Some(_), false) => {
                    prop_assert_eq!(r, Err(Stage2Error::OutOfSlots));
                    prop_assert_eq!(e.backend().table().set_slot_calls(), calls_before);
                    rejected += 1;
                }
                (None, _) => {
                    prop_assert!(matches!(r, Err(Stage2Error::Backend(_))), "{:?}: {:?}", op, r);
                    prop_assert_eq!(e.backend().table().set_slot_calls(), calls_before);
                    rejected += 1;
                }
            }
            // The engine's states equal the model's, page by page, and the table realises the
            // view: exposed exactly where readable, a read-only slot exactly where read-only.
            for p in 0..pages {
                let st = model[p as usize];
                prop_assert_eq!(e.state_at(Gpa(p * P)), Some(st));
                let perm = View::GUEST.perm(st);
                prop_assert_eq!(e.backend().perm_at(Gpa(p * P)), Some(perm));
                prop_assert_eq!(e.backend().table().is_exposed(p * P), perm.readable());
                prop_assert_eq!(e.backend().table().is_readonly(p * P), perm == Perm::Read);
            }
            // Minimal: one slot per maximal run of equal permission.
            let runs = slot_runs_of(&model);
            let got: Vec<(u64, u64, bool)> = e
                .memslots()
                .iter()
                .map(|s| (s.gpa / P, s.end() / P, s.readonly))
                .collect();
            prop_assert_eq!(got, runs);
            prop_assert!(e.check_invariants().is_ok(), "{:?}", e.check_invariants());
            prop_assert_eq!(e.backend().table().refused_calls(), 0);
        }
        let c = e.counters();
        prop_assert_eq!(c.pages_unmapped, unmapped);
        prop_assert_eq!(c.pages_mapped, mapped);
        prop_assert_eq!(c.pages_zeroed, zeroed);
        prop_assert_eq!(c.rejected_updates, rejected);
        prop_assert_eq!(c.memslot_updates, e.backend().table().set_slot_calls());
        prop_assert_eq!(c.slots_created - c.slots_deleted, c.memslots_in_use);
        prop_assert_eq!(c.memslots_in_use, e.memslots().len() as u64);
        prop_assert!(c.peak_memslots <= u64::from(max_slots));
        prop_assert_eq!(c.zero_calls, e.backend().table().zero_calls());
    }
}

/// Guest RAM for the KVM tests, with byte accessors.
fn test_ram(len: u64) -> Arc<GuestRam> {
    Arc::new(GuestRam::new(MemSize(len)).expect("guest RAM"))
}

fn read_byte(ram: &GuestRam, gpa: u64) -> u8 {
    let mut b = [0u8];
    ram.read(gpa, &mut b).unwrap();
    b[0]
}

#[test]
fn kvm_split_merge_and_zero() {
    let Some(kvm) = kvm_or_skip("kvm_split_merge_and_zero") else {
        return;
    };
    let vm = std::sync::Arc::new(kvm.create_vm().expect("create_vm"));
    let ram = 32u64 << 20;
    let mem = test_ram(ram);
    let max = kvm.get_nr_memslots() as u32;
    assert!(max >= 4, "KVM offers {max} memslots");
    let mut table = KvmSlots::new(vm.clone(), mem.clone(), max);
    table.keep_durations(true);
    let mut e =
        Stage2Engine::new(Slots::new(table, ram), ram, Gpa(2 << 20)).expect("engine on KVM");
    assert_eq!(
        e.backend().table().host_addr(Gpa(0x1000)),
        HostAddr(mem.host_base() + 0x1000)
    );
    let pb = 512u64; // pages per pageblock
                     // Splits and merges over pageblocks, including several holes at once.
    for round in 0..20u64 {
        let a = 2 * pb + (round % 5) * pb;
        e.unmap(a, pb).unwrap();
        e.unmap(10 * pb, 3 * pb).unwrap();
        e.unmap(15 * pb + round, 1).unwrap();
        e.check_invariants().unwrap();
        assert_eq!(e.memslots().len(), 4, "{:?}", e.memslots());
        assert_eq!(e.state_at(Gpa(a * P)), Some(RangeState::Unmapped));
        e.map(15 * pb + round, 1).unwrap();
        e.map(10 * pb, 3 * pb).unwrap();
        e.map(a, pb).unwrap();
        assert_eq!(e.memslots().len(), 1);
    }
    // KVM's own table agrees with the engine: a probe slot over an exposed page is refused
    // (EEXIST: overlap), over a hole it is accepted.
    e.unmap(4 * pb, pb).unwrap();
    let probe_id = max - 1;
    let probe = |gpa: u64| {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: probe_id,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: P,
            userspace_addr: mem.host_base() + gpa,
        };
        // SAFETY: the region lies inside the live test mapping `mem`, which outlives the VM's
        // use of it (the VM never runs; the engine's table holds `mem` too).
        unsafe { vm.set_user_memory_region(region) }
    };
    let err = probe(5 * pb * P).expect_err("overlap with an exposed page must be refused");
    assert_eq!(err.errno(), libc::EEXIST);
    probe(4 * pb * P + 7 * P).expect("a hole must accept a slot");
    let del = kvm_bindings::kvm_userspace_memory_region {
        slot: probe_id,
        flags: 0,
        guest_phys_addr: 4 * pb * P + 7 * P,
        memory_size: 0,
        userspace_addr: mem.host_base() + 4 * pb * P + 7 * P,
    };
    // SAFETY: deletes the probe slot created above.
    unsafe { vm.set_user_memory_region(del) }.unwrap();
    // Zeroing through the host mapping, for an unmapped and a mapped range.
    mem.fill(4 * pb * P, pb * P, 0x5a).unwrap();
    mem.fill(6 * pb * P, 3 * P, 0xc3).unwrap();
    assert_eq!(read_byte(&mem, 4 * pb * P + 100), 0x5a);
    e.zero(4 * pb, pb).unwrap();
    e.zero(6 * pb, 2).unwrap();
    assert_eq!(read_byte(&mem, 4 * pb * P), 0);
    assert_eq!(read_byte(&mem, 5 * pb * P - 1), 0);
    assert_eq!(read_byte(&mem, 6 * pb * P + 2 * P - 1), 0);
    assert_eq!(
        read_byte(&mem, 6 * pb * P + 2 * P),
        0xc3,
        "zero went past its range"
    );
    e.map(4 * pb, pb).unwrap();
    assert_eq!(e.memslots().len(), 1);
    e.check_invariants().unwrap();
    // Whole-update cost: a split in the middle of the slot (delete + 2 creates) and the merge
    // back (2 deletes + 1 create).
    let (mut split, mut merge) = (Vec::new(), Vec::new());
    for i in 0..50u64 {
        let pfn = 8 * pb + (i % 6) * pb;
        let t = std::time::Instant::now();
        e.unmap(pfn, pb).unwrap();
        split.push(t.elapsed().as_nanos());
        let t = std::time::Instant::now();
        e.map(pfn, pb).unwrap();
        merge.push(t.elapsed().as_nanos());
    }
    split.sort_unstable();
    merge.sort_unstable();
    eprintln!(
        "KVM stage-2 update cost: split (3 set_slot) median {:.1} us, merge (3 set_slot) median {:.1} us",
        split[25] as f64 / 1000.0,
        merge[25] as f64 / 1000.0
    );
    let c = e.counters();
    assert_eq!(c.memslot_updates, e.backend().table().timing().calls);
    let mut d: Vec<u32> = e.backend().table().durations_ns().to_vec();
    d.sort_unstable();
    let median = d[d.len() / 2];
    eprintln!(
        "KVM memslot timing: {} set_slot calls, median {:.1} us, max {:.1} us, {} unmaps, {} maps",
        d.len(),
        f64::from(median) / 1000.0,
        e.backend().table().timing().max_ns as f64 / 1000.0,
        c.unmap_calls,
        c.map_calls
    );
    drop(e);
    drop(vm);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Driven by the VMM's allocator (a two-CPU zone): after any alloc/free sequence on either
    /// CPU, a managed pageblock is unmapped at stage 2 exactly when its freetype is unmapped,
    /// and the slots stay minimal.
    #[test]
    fn engine_tracks_allocator_flips(
        ops in prop::collection::vec(
            (any::<bool>(), any::<bool>(), 0..10u8, any::<u16>(), 0..2usize),
            1..300,
        ),
    ) {
        use allocator::{Config, Gfp, Zone};
        let ram = 32u64 << 20;
        let reserved = 2u64 << 20;
        let engine = Stage2Engine::new(Slots::new(ModelSlots::new(64), ram), ram, Gpa(reserved)).unwrap();
        let a = Zone::new(reserved / P, (ram - reserved) / P, engine, Config::default(), 2).unwrap();
        let mut live = Vec::new();
        for (alloc, unmapped, order, pick, cpu) in ops {
            if alloc || live.is_empty() {
                let gfp = if unmapped { Gfp::UNMAPPED } else { Gfp::empty() };
                if let Ok(al) = a.alloc_pages(cpu, gfp, order) {
                    live.push(al);
                }
            } else {
                let al = live.swap_remove(usize::from(pick) % live.len());
                a.free_pages(cpu, al.pfn, al.order).unwrap();
            }
            let blocks: Vec<(u64, bool)> = (reserved..ram)
                .step_by(2 << 20)
                .map(|pb| (pb, a.pageblock_freetype(pb / P).unwrap().is_unmapped()))
                .collect();
            let (inv, refused, rejected, wrong) = a.with_stage2(|e| {
                let wrong: Vec<u64> = blocks
                    .iter()
                    .filter(|&&(pb, unmapped)| {
                        [pb, pb + (2 << 20) - P].iter().any(|&probe| {
                            (e.state_at(Gpa(probe)) == Some(RangeState::Unmapped)) != unmapped
                        })
                    })
                    .map(|&(pb, _)| pb)
                    .collect();
                (
                    e.check_invariants(),
                    e.backend().table().refused_calls(),
                    e.counters().rejected_updates,
                    wrong,
                )
            });
            prop_assert!(inv.is_ok(), "{:?}", inv);
            prop_assert_eq!(refused, 0);
            prop_assert_eq!(rejected, 0);
            prop_assert!(wrong.is_empty(), "blocks {:x?}", wrong);
        }
        a.check_invariants().unwrap();
        let s = a.snapshot();
        let c = a.with_stage2(|e| e.counters());
        prop_assert_eq!(s.stage2_unmap_calls, c.unmap_calls);
        prop_assert_eq!(s.stage2_map_calls, c.map_calls);
        prop_assert_eq!(s.stage2_pages_unmapped, c.pages_unmapped);
        prop_assert_eq!(s.pages_zeroed, c.pages_zeroed);
    }
}

#[test]
fn read_only_is_a_readonly_slot_and_has_no_way_back() {
    let mut e = engine(1024, 512, 8);
    e.lock_range(Gpa(600 * P), 10 * P, RangeState::ReadOnly)
        .unwrap();
    assert_eq!(e.state_at(Gpa(605 * P)), Some(RangeState::ReadOnly));
    let got: Vec<(u64, u64, bool)> = e
        .memslots()
        .iter()
        .map(|s| (s.gpa / P, s.end() / P, s.readonly))
        .collect();
    assert_eq!(
        got,
        vec![(0, 600, false), (600, 610, true), (610, 1024, false)]
    );
    assert!(e.backend().table().is_readonly(600 * P) && !e.backend().table().is_readonly(610 * P));
    // Locked pages can be neither unlocked (mapped), unmapped nor locked read-only again; a
    // lock to a non-lock state is refused.
    for r in [
        e.map_range(Gpa(600 * P), P),
        e.unmap_range(Gpa(600 * P), P),
        e.lock_range(Gpa(600 * P), P, RangeState::ReadOnly),
    ] {
        assert!(matches!(r, Err(EngineError::WrongState { .. })), "{r:?}");
    }
    assert!(matches!(
        e.lock_range(Gpa(700 * P), P, RangeState::Mapped),
        Err(EngineError::NotALock(RangeState::Mapped))
    ));
    // An unmapped neighbour leaves the read-only slot alone.
    e.unmap_range(Gpa(610 * P), 4 * P).unwrap();
    assert_eq!(e.memslots().len(), 3);
    // Tightening to no access turns the read-only slot into a hole; nothing loosens it.
    e.lock_range(Gpa(608 * P), 2 * P, RangeState::NoAccess)
        .unwrap();
    assert_eq!(e.state_at(Gpa(609 * P)), Some(RangeState::NoAccess));
    assert!(!e.backend().table().is_exposed(609 * P));
    assert!(e.backend().table().is_readonly(607 * P));
    assert!(matches!(
        e.lock_range(Gpa(609 * P), P, RangeState::ReadOnly),
        Err(EngineError::WrongState { .. })
    ));
    // Reserved pages can be locked (which ones is the session's rule: the guest's image), and
    // stay reserved memory: never zeroed, never unlocked.
    e.lock_range(Gpa(P), P, RangeState::ReadOnly).unwrap();
    e.lock_range(Gpa(2 * P), P, RangeState::NoAccess).unwrap();
    assert_eq!(e.state_at(Gpa(P)), Some(RangeState::ReadOnly));
    assert!(e.backend().table().is_readonly(P) && !e.backend().table().is_exposed(2 * P));
    for r in [
        e.zero_range(Gpa(P), P),
        e.zero_range(Gpa(2 * P), P),
        e.map_range(Gpa(P), P),
        e.lock_range(Gpa(P), P, RangeState::ReadOnly),
    ] {
        assert!(matches!(r, Err(EngineError::WrongState { .. })), "{r:?}");
    }
    e.lock_range(Gpa(P), P, RangeState::NoAccess).unwrap();
    e.lock_range(Gpa(P), 2 * P, RangeState::NoAccess)
        .unwrap_err();
    let c = e.counters();
    assert_eq!((c.protect_calls, c.pages_protected), (5, 15));
    assert_consistent(&e);
}

/// The protection of every page of the mprotect backend's guest view, from /proc/self/maps.
fn guest_view_perms(e: &Stage2Engine<Mprotect>, pages: u64) -> Vec<Perm> {
    let base = e.backend().guest_view_addr(Gpa(0)).raw();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut out = vec![None; pages as usize];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, prot) = (f.next().unwrap(), f.next().unwrap());
        let (s, t) = range.split_once('-').unwrap();
        let (s, t) = (
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(t, 16).unwrap(),
        );
        let perm = match &prot[..2] {
            "rw" => Perm::ReadWrite,
            "r-" => Perm::Read,
            _ => Perm::None,
        };
        for p in 0..pages {
            let a = base + p * P;
            if s <= a && a < t {
                out[p as usize] = Some(perm);
            }
        }
    }
    out.into_iter()
        .map(|p| p.expect("page in no VMA"))
        .collect()
}

fn mprotect_engine(
    kvm: &kvm_ioctls::Kvm,
    ram: u64,
    reserved: u64,
) -> (Stage2Engine<Mprotect>, Arc<GuestRam>) {
    let vm = Arc::new(kvm.create_vm().expect("create_vm"));
    let mem = Arc::new(
        GuestRam::create(
            MemSize(ram),
            crate::memory::CoreDump::Exclude,
            Backing::Memfd,
        )
        .unwrap(),
    );
    let backend = Mprotect::new(vm, mem.clone()).expect("mprotect backend");
    (Stage2Engine::new(backend, ram, Gpa(reserved)).unwrap(), mem)
}

#[test]
fn mprotect_needs_memfd_ram_and_zeroes_through_the_vmm_view() {
    let Some(kvm) = kvm_or_skip("mprotect_needs_memfd_ram_and_zeroes_through_the_vmm_view") else {
        return;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    assert!(matches!(
        Mprotect::new(vm, test_ram(8 << 20)),
        Err(MprotectError::NotMemfd)
    ));
    let (mut e, mem) = mprotect_engine(&kvm, 8 << 20, 4 << 20);
    assert_eq!(e.memslots().len(), 1);
    let g = 1100 * P;
    mem.fill(g, 3 * P, 0x5a).unwrap();
    e.unmap_range(Gpa(g), 2 * P).unwrap();
    assert_eq!(
        guest_view_perms(&e, 1103)[1100..],
        [Perm::None, Perm::None, Perm::ReadWrite]
    );
    // The VMM view stays readable and writable while the guest view is closed.
    assert_eq!(read_byte(&mem, g + 5), 0x5a);
    mem.fill(g, 1, 0x11).unwrap();
    assert_eq!(read_byte(&mem, g), 0x11);
    // Zeroing punches the memfd: both pages read zero, the neighbour keeps its data.
    e.zero_range(Gpa(g), 2 * P).unwrap();
    assert_eq!(read_byte(&mem, g), 0);
    assert_eq!(read_byte(&mem, g + 2 * P - 1), 0);
    assert_eq!(read_byte(&mem, g + 2 * P), 0x5a);
    e.map_range(Gpa(g), 2 * P).unwrap();
    assert_eq!(e.memslots().len(), 1);
    e.check_invariants().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random unmap/map/protect/zero sequences through the mprotect backend on real KVM: the
    /// guest view's host protections (/proc/self/maps) are the view of the model's states,
    /// page by page, and there is always exactly one memslot.
    #[test]
    fn mprotect_backend_matches_per_page_model(
        ops in prop::collection::vec(op_strategy(64), 1..40),
    ) {
        let Some(kvm) = kvm_or_skip("mprotect_backend_matches_per_page_model") else {
            return Ok(());
        };
        let (ram, reserved) = (8u64 << 20, 4u64 << 20);
        let base = reserved / P;
        let pages = (ram - reserved) / P;
        let (mut e, _mem) = mprotect_engine(&kvm, ram, reserved);
        let mut model = vec![RangeState::Mapped; pages as usize];
        for op in ops {
            let r = op.apply(&mut e, base);
            match op.next(&model, 0) {
                Some(next) => {
                    prop_assert!(r.is_ok(), "{:?}: {:?}", op, r);
                    model = next;
                }
                None => prop_assert!(r.is_err(), "{:?} accepted", op),
            }
            let got = guest_view_perms(&e, base + pages);
            for p in 0..pages {
                let want = View::GUEST.perm(model[p as usize]);
                prop_assert_eq!(got[(base + p) as usize], want, "page {}", p);
                prop_assert_eq!(e.state_at(Gpa((base + p) * P)), Some(model[p as usize]));
            }
            prop_assert!(got[..base as usize].iter().all(|&p| p == Perm::ReadWrite));
            prop_assert_eq!(e.memslots().len(), 1);
            prop_assert_eq!(e.counters().memslots_in_use, 1);
            prop_assert!(e.check_invariants().is_ok(), "{:?}", e.check_invariants());
        }
    }
}
