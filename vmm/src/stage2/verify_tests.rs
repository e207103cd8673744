//! `--host-secretmem` and reconciliation on real KVM: secret backing exactly while unmapped,
//! zero on the way back, and [`verify::reconcile`] against both backends and a tampered page.

use std::sync::Arc;

use super::tests::kvm_or_skip;
use super::*;
use crate::addr::Gpa;
use crate::memory::{Backing, CoreDump, GuestRam, MemSize};

const P: u64 = 4096;
const BLOCK: u64 = 2 << 20;

fn mprotect(kvm: &kvm_ioctls::Kvm, secret: bool) -> (Stage2Engine<Mprotect>, Arc<GuestRam>) {
    let vm = Arc::new(kvm.create_vm().expect("create_vm"));
    let ram =
        Arc::new(GuestRam::create(MemSize(16 << 20), CoreDump::Exclude, Backing::Memfd).unwrap());
    let mut b = Mprotect::new(vm, ram.clone()).expect("mprotect backend");
    if secret {
        b.use_secretmem().expect("memfd_secret works on this host");
    }
    (Stage2Engine::new(b, 16 << 20, Gpa(4 << 20)).unwrap(), ram)
}

/// The GPA ranges of the VMM view that are `/secretmem` mappings, from /proc/self/maps.
fn secret_in_vmm_view(ram: &GuestRam) -> Vec<(u64, u64)> {
    let base = ram.host_base();
    host_maps::read(base, base + ram.size())
        .unwrap()
        .into_iter()
        .filter(|m| m.secret)
        .map(|m| (m.start - base, m.end - base))
        .collect()
}

#[test]
fn a_block_is_secretmem_backed_exactly_while_unmapped_and_reads_zero_back() {
    let Some(kvm) = kvm_or_skip("a_block_is_secretmem_backed_exactly_while_unmapped") else {
        return;
    };
    let (mut e, ram) = mprotect(&kvm, true);
    let g = 8 << 20;
    ram.fill(g, BLOCK + P, 0x5a).unwrap();
    assert!(secret_in_vmm_view(&ram).is_empty());
    assert_eq!(verify::reconcile(&e).unwrap(), vec![]);

    e.unmap_range(Gpa(g), BLOCK).unwrap();
    assert_eq!(secret_in_vmm_view(&ram), vec![(g, g + BLOCK)]);
    assert!(e.backend().is_secret(Gpa(g)) && !e.backend().is_secret(Gpa(g + BLOCK)));
    let r = e.backend().realised().unwrap();
    assert!(r.contains(&Realised {
        start: Gpa(g),
        end: Gpa(g + BLOCK),
        perm: Perm::None,
        backing: HostBacking::Secret,
    }));
    assert_eq!(verify::reconcile(&e).unwrap(), vec![]);
    e.check_invariants().unwrap();
    // Fresh secret memory: the old contents are gone; the neighbour keeps its data. The VMM
    // view still writes (fills, planted secrets) and zeroes it.
    assert_eq!(ram.count(g, BLOCK, 0).unwrap(), BLOCK);
    assert_eq!(ram.count(g + BLOCK, P, 0x5a).unwrap(), P);
    ram.fill(g + 3 * P, 2 * P, 0x77).unwrap();
    assert_eq!(ram.count(g, BLOCK, 0x77).unwrap(), 2 * P);
    e.zero_range(Gpa(g + 3 * P), P).unwrap();
    assert_eq!(ram.count(g, BLOCK, 0x77).unwrap(), P);

    // Mapped again: the memfd is back in both views and the block reads zero.
    ram.fill(g, BLOCK, 0x66).unwrap();
    e.map_range(Gpa(g), BLOCK).unwrap();
    assert!(secret_in_vmm_view(&ram).is_empty());
    assert!(!e.backend().is_secret(Gpa(g)));
    assert_eq!(ram.count(g, BLOCK, 0).unwrap(), BLOCK);
    assert_eq!(verify::reconcile(&e).unwrap(), vec![]);

    // A guest lock to no-access is not unmapped: it keeps its memory and contents.
    ram.fill(g, P, 0x42).unwrap();
    e.lock_range(Gpa(g), P, RangeState::NoAccess).unwrap();
    assert!(secret_in_vmm_view(&ram).is_empty());
    assert_eq!(ram.count(g, P, 0x42).unwrap(), P);
    assert_eq!(verify::reconcile(&e).unwrap(), vec![]);
    e.check_invariants().unwrap();
}

#[test]
fn reconciliation_catches_a_page_changed_behind_the_engine() {
    let Some(kvm) = kvm_or_skip("reconciliation_catches_a_page_changed_behind_the_engine") else {
        return;
    };
    for secret in [false, true] {
        let (mut e, _ram) = mprotect(&kvm, secret);
        e.unmap_range(Gpa(8 << 20), BLOCK).unwrap();
        e.lock_range(Gpa(12 << 20), 2 * P, RangeState::ReadOnly)
            .unwrap();
        assert_eq!(verify::reconcile(&e).unwrap(), vec![]);
        let page = Gpa((8 << 20) + 5 * P);
        assert_eq!(e.backend_mut().tamper(page).unwrap(), Perm::Read);
        let m = verify::reconcile(&e).unwrap();
        assert_eq!(
            m,
            vec![verify::Mismatch {
                start: page,
                end: Gpa(page.0 + P),
                state: RangeState::Unmapped,
                intended_perm: Perm::None,
                intended_backing: if secret {
                    HostBacking::Secret
                } else {
                    HostBacking::Memory
                },
                realised_perm: Perm::Read,
                realised_backing: if secret {
                    HostBacking::Secret
                } else {
                    HostBacking::Memory
                },
            }],
            "secret={secret}"
        );
        assert!(m[0].to_string().contains("intended None"), "{}", m[0]);
        e.backend_mut().untamper(page).unwrap();
        // A read-only page opened to writes is caught too.
        let ro = Gpa(12 << 20);
        assert_eq!(e.backend_mut().tamper(ro).unwrap(), Perm::None);
        let m = verify::reconcile(&e).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].start, m[0].realised_perm), (ro, Perm::None));
        e.backend_mut().untamper(ro).unwrap();
        assert_eq!(verify::reconcile(&e).unwrap(), vec![]);
    }
}

#[test]
fn slots_reconcile_from_the_slot_table_record() {
    let Some(kvm) = kvm_or_skip("slots_reconcile_from_the_slot_table_record") else {
        return;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let ram = Arc::new(GuestRam::new(MemSize(16 << 20)).unwrap());
    let max = u32::try_from(kvm.get_nr_memslots()).unwrap_or(32);
    let mut e = Stage2Engine::new(
        Slots::new(KvmSlots::new(vm, ram, max), 16 << 20),
        16 << 20,
        Gpa(4 << 20),
    )
    .unwrap();
    e.unmap_range(Gpa(8 << 20), BLOCK).unwrap();
    e.unmap_range(Gpa(11 << 20), P).unwrap();
    e.lock_range(Gpa(12 << 20), 3 * P, RangeState::ReadOnly)
        .unwrap();
    assert_eq!(verify::reconcile(&e).unwrap(), vec![]);
    let r = e.backend().realised().unwrap();
    assert_eq!(r.len(), 7, "{r:?}");
    assert!(r.contains(&Realised {
        start: Gpa(12 << 20),
        end: Gpa((12 << 20) + 3 * P),
        perm: Perm::Read,
        backing: HostBacking::Memory,
    }));
    // The tamper hook punches a real hole into KVM's table behind the engine: caught, undone.
    assert!(
        e.backend_mut().tamper(Gpa(8 << 20)).is_err(),
        "a hole already"
    );
    let page = Gpa((10 << 20) + 7 * P);
    assert_eq!(e.backend_mut().tamper(page).unwrap(), Perm::None);
    let m = verify::reconcile(&e).unwrap();
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(
        (m[0].start, m[0].end, m[0].intended_perm, m[0].realised_perm),
        (page, Gpa(page.0 + P), Perm::ReadWrite, Perm::None)
    );
    e.backend_mut().untamper(page).unwrap();
    assert_eq!(verify::reconcile(&e).unwrap(), vec![]);
    e.check_invariants().unwrap();
}
