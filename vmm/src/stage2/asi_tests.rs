//! Tests of the two ASI views: the engine's sensitive state, the view switch over the model
//! slot table (ranges toggled, memslots, rollback) and over the real `mprotect` backend.

use super::tests::kvm_or_skip;
use super::*;
use crate::addr::Gpa;
use crate::memory::{Backing, GuestRam, MemSize};
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

fn perm(e: &ModelEngine, page: u64) -> Option<Perm> {
    e.backend().perm_at(Gpa(page * P))
}

#[test]
fn sensitive_pages_are_absent_only_from_the_restricted_view() {
    let mut e = engine(1024, 512, 64);
    e.make_sensitive_range(Gpa(600 * P), 4 * P).unwrap();
    e.unmap_range(Gpa(700 * P), P).unwrap();
    assert_eq!(e.state_at(Gpa(601 * P)), Some(RangeState::Sensitive));
    assert_eq!(e.asi_view(), AsiView::Restricted);
    assert_eq!(perm(&e, 600), Some(Perm::None));
    assert_eq!(perm(&e, 604), Some(Perm::ReadWrite));
    assert_eq!(e.sensitive_runs(), 1);
    e.check_invariants().unwrap();

    let sw = e.switch_view(AsiView::Full).unwrap();
    assert_eq!(
        sw,
        ViewSwitch {
            ranges: 1,
            pages: 4
        }
    );
    assert_eq!(perm(&e, 600), Some(Perm::ReadWrite));
    assert_eq!(perm(&e, 603), Some(Perm::ReadWrite));
    // Unmapped pages are violations in both views.
    assert_eq!(perm(&e, 700), Some(Perm::None));
    e.check_invariants().unwrap();
    // Switching to the current view does nothing.
    assert_eq!(e.switch_view(AsiView::Full).unwrap(), ViewSwitch::default());

    let sw = e.switch_view(AsiView::Restricted).unwrap();
    assert_eq!(sw.ranges, 1);
    assert_eq!(perm(&e, 600), Some(Perm::None));
    let c = e.counters();
    assert_eq!(
        (c.view_switches, c.ranges_toggled, c.max_ranges_toggled),
        (2, 2, 1)
    );
    assert_eq!((c.sensitive_calls, c.pages_made_sensitive), (1, 4));
    e.check_invariants().unwrap();
}

#[test]
fn sensitive_moves_from_any_managed_state_and_back() {
    let mut e = engine(1024, 512, 64);
    // Unmapped -> sensitive -> mapped, mapped -> sensitive -> unmapped.
    e.unmap_range(Gpa(600 * P), 2 * P).unwrap();
    e.make_sensitive_range(Gpa(600 * P), 2 * P).unwrap();
    e.map_range(Gpa(600 * P), 2 * P).unwrap();
    assert_eq!(e.state_at(Gpa(600 * P)), Some(RangeState::Mapped));
    e.make_sensitive_range(Gpa(600 * P), 2 * P).unwrap();
    e.unmap_range(Gpa(600 * P), 2 * P).unwrap();
    assert_eq!(e.state_at(Gpa(600 * P)), Some(RangeState::Unmapped));
    // Reserved and locked pages never become sensitive.
    assert!(matches!(
        e.make_sensitive_range(Gpa(0), P),
        Err(EngineError::WrongState { .. })
    ));
    e.lock_range(Gpa(800 * P), P, RangeState::ReadOnly).unwrap();
    assert!(e.make_sensitive_range(Gpa(800 * P), P).is_err());
    // A sensitive page made in the full view is readable at once and leaves at AsiEnter.
    e.switch_view(AsiView::Full).unwrap();
    e.make_sensitive_range(Gpa(900 * P), P).unwrap();
    assert_eq!(perm(&e, 900), Some(Perm::ReadWrite));
    assert_eq!(e.switch_view(AsiView::Restricted).unwrap().ranges, 1);
    assert_eq!(perm(&e, 900), Some(Perm::None));
    e.check_invariants().unwrap();
}

#[test]
fn ranges_toggled_are_the_sensitive_runs() {
    let mut e = engine(4096, 512, 4096);
    // 64 scattered pages (each its own run) and 4 adjacent pageblocks (one run).
    for i in 0..64 {
        e.make_sensitive_range(Gpa((1000 + 2 * i) * P), P).unwrap();
    }
    e.make_sensitive_range(Gpa(2048 * P), 2048 * P).unwrap();
    assert_eq!(e.sensitive_runs(), 65);
    let slots_restricted = e.memslots().len();
    assert_eq!(e.switch_view(AsiView::Full).unwrap().ranges, 65);
    // In the full view every managed page is read-write: one memslot.
    assert_eq!(e.memslots().len(), 1);
    assert_eq!(e.switch_view(AsiView::Restricted).unwrap().ranges, 65);
    assert_eq!(e.memslots().len(), slots_restricted);
    e.check_invariants().unwrap();
    assert_eq!(e.backend().table().refused_calls(), 0);
}

#[test]
fn a_failed_switch_changes_nothing() {
    let mut e = engine(1024, 512, 64);
    for i in 0..4 {
        e.make_sensitive_range(Gpa((600 + 2 * i) * P), P).unwrap();
    }
    e.switch_view(AsiView::Full).unwrap();
    // Fail in the middle of going back to restricted.
    e.backend_mut().table_mut().fail_after(Some(3));
    assert!(e.switch_view(AsiView::Restricted).is_err());
    assert_eq!(e.asi_view(), AsiView::Full);
    for i in 0..4 {
        assert_eq!(perm(&e, 600 + 2 * i), Some(Perm::ReadWrite));
    }
    e.check_invariants().unwrap();
    assert_eq!(e.counters().rejected_updates, 1);
    assert_eq!(e.switch_view(AsiView::Restricted).unwrap().ranges, 4);
    e.check_invariants().unwrap();
}

#[test]
fn mprotect_backend_toggles_sensitive_ranges_on_real_kvm() {
    let Some(kvm) = kvm_or_skip("mprotect_backend_toggles_sensitive_ranges_on_real_kvm") else {
        return;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let ram = 8 << 20;
    let mem = Arc::new(
        GuestRam::create(
            MemSize(ram),
            crate::memory::CoreDump::Exclude,
            Backing::Memfd,
        )
        .unwrap(),
    );
    let backend = Mprotect::new(vm, mem.clone()).unwrap();
    let mut e = Stage2Engine::new(backend, ram, Gpa(4 << 20)).unwrap();
    let g = Gpa(1100 * P);
    mem.fill(g.raw(), P, 0x5a).unwrap();
    e.make_sensitive_range(g, P).unwrap();
    let realised = |e: &Stage2Engine<Mprotect>| {
        e.backend()
            .realised()
            .unwrap()
            .into_iter()
            .find(|r| r.start <= g && g < r.end)
            .map(|r| r.perm)
    };
    assert_eq!(realised(&e), Some(Perm::None));
    assert_eq!(verify::reconcile(&e).unwrap(), vec![]);
    e.switch_view(AsiView::Full).unwrap();
    assert_eq!(realised(&e), Some(Perm::ReadWrite));
    assert_eq!(verify::reconcile(&e).unwrap(), vec![]);
    // The contents survive both switches (nothing is zeroed by a view change).
    e.switch_view(AsiView::Restricted).unwrap();
    assert_eq!(realised(&e), Some(Perm::None));
    let mut b = [0u8; 1];
    mem.read(g.raw() + 7, &mut b).unwrap();
    assert_eq!(b[0], 0x5a);
    e.check_invariants().unwrap();
}
