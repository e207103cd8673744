//! The mermap hypercalls (`Hc::MermapGet`, `MermapGetReserved`, `MermapPut`, `MermapInfo`),
//! the host assertion on a copy made through the window (`Hc::ExpectSecretCopy`), the policy
//! query, and the mermap's hooks into allocation, free and MMIO exits.

use veil_abi::{Status, PAGE_SIZE};

use super::host_calls::HostFailure;
use super::Session;
use crate::addr::Gpa;
use crate::mermap::{Mermap, MermapError, BUMP_PAGES};
use crate::run_types::ViolationPolicy;
use crate::stage2::RangeState;

fn status_of(e: MermapError) -> Status {
    match e {
        MermapError::Empty => Status::BadArgument,
        MermapError::TooBig(_) => Status::MermapTooBig,
        MermapError::Busy => Status::MermapBusy,
        MermapError::NotInWindow(_) => Status::BadAddress,
        MermapError::NotLive(_) => Status::BadState,
        MermapError::Backend(e) => {
            log::warn!("mermap window: {e}");
            Status::Stage2Failed
        }
    }
}

impl Session {
    /// Gives the session its mermap (set up by the VM); `secret_needs_gup`: this host's KVM
    /// reaches guest memory by GUP, so `memfd_secret` pages cannot be windowed.
    pub fn set_mermap(&mut self, m: Mermap, secret_needs_gup: bool) {
        self.mermap = Some(m);
        self.mermap_secret_needs_gup = secret_needs_gup;
    }

    /// The mermap, if the VM has one.
    pub fn mermap(&self) -> Option<&Mermap> {
        self.mermap.as_ref()
    }

    /// Whether `gpa` lies in a mermap window.
    pub(crate) fn in_mermap(&self, gpa: Gpa) -> bool {
        self.mermap.as_ref().is_some_and(|m| m.contains(gpa))
    }

    /// After an allocation: the calling vCPU owns it.
    pub(super) fn mermap_note_alloc(&mut self, gpa: Gpa, order: u8) {
        let vcpu = self.cpu.index;
        if let Some(m) = self.mermap.as_mut() {
            m.note_alloc(gpa, order, vcpu);
        }
    }

    /// Before a free of `[gpa, end)`: refused while a live window mapping shows a page of it;
    /// stale mappings of it are torn down.
    pub(super) fn mermap_before_free(&mut self, gpa: Gpa, end: Gpa) -> Result<(), Status> {
        match self.mermap.as_mut().map(|m| m.before_free(gpa, end)) {
            None | Some(Ok(true)) => Ok(()),
            Some(Ok(false)) => Err(Status::BadState),
            Some(Err(e)) => Err(status_of(e)),
        }
    }

    /// After a successful free of the allocation at `gpa`.
    pub(super) fn mermap_note_free(&mut self, gpa: Gpa) {
        if let Some(m) = self.mermap.as_mut() {
            m.note_free(gpa);
        }
    }

    /// Checks that `pages` pages from `gpa` may go into the calling vCPU's window.
    fn mermap_check(&self, gpa: Gpa, pages: u64) -> Result<(), Status> {
        let m = self.mermap.as_ref().ok_or(Status::UnknownCall)?;
        let len = pages * PAGE_SIZE;
        let end = gpa.raw().checked_add(len).ok_or(Status::BadAddress)?;
        if !gpa.is_page_aligned() || gpa < self.reserved_end || end > self.ram.size() {
            return Err(Status::BadAddress);
        }
        for i in 0..pages {
            let page = Gpa(gpa.raw() + i * PAGE_SIZE);
            if self.alloc.allocation_containing(page.pfn().raw()).is_none() {
                return Err(Status::NotAllocated);
            }
            if m.owner_of(page) != Some(self.cpu.index) {
                return Err(Status::NotOwner);
            }
        }
        let states = self.engine(|e| e.ranges_in(gpa, Gpa(end)));
        if states.iter().any(|r| r.state != RangeState::Unmapped) {
            return Err(Status::BadState);
        }
        if self.mermap_secret_needs_gup && self.engine(|e| e.backend().secret_unmapped()) {
            return Err(Status::SecretNeedsGup);
        }
        Ok(())
    }

    /// `Hc::MermapGet(gpa, pages)`.
    pub(super) fn hc_mermap_get(&mut self, gpa: Gpa, pages: u64) -> Result<u64, Status> {
        if self.mermap.is_none() {
            return Err(Status::UnknownCall);
        }
        if pages == 0 {
            return Err(Status::BadArgument);
        }
        if pages > BUMP_PAGES {
            return Err(Status::MermapTooBig);
        }
        self.mermap_check(gpa, pages)?;
        let vcpu = self.cpu.index;
        let m = self.mermap.as_mut().ok_or(Status::UnknownCall)?;
        m.get(vcpu, gpa, pages).map(Gpa::raw).map_err(status_of)
    }

    /// `Hc::MermapGetReserved(gpa)`.
    pub(super) fn hc_mermap_get_reserved(&mut self, gpa: Gpa) -> Result<u64, Status> {
        self.mermap_check(gpa, 1)?;
        let vcpu = self.cpu.index;
        let m = self.mermap.as_mut().ok_or(Status::UnknownCall)?;
        m.get_reserved(vcpu, gpa).map(Gpa::raw).map_err(status_of)
    }

    /// `Hc::MermapPut(window_gpa)`.
    pub(super) fn hc_mermap_put(&mut self, window: Gpa) -> Result<u64, Status> {
        let vcpu = self.cpu.index;
        let m = self.mermap.as_mut().ok_or(Status::UnknownCall)?;
        m.put(vcpu, window).map(|()| 0).map_err(status_of)
    }

    /// `Hc::MermapInfo(what)`.
    pub(super) fn hc_mermap_info(&mut self, what: u64) -> Result<(u64, u64), Status> {
        let m = self.mermap.as_ref().ok_or(Status::UnknownCall)?;
        let w = m.window(self.cpu.index).ok_or(Status::BadState)?;
        let c = &w.counters;
        match what {
            0 => Ok((w.base, BUMP_PAGES)),
            1 => Ok((c.flushes, c.wraps)),
            2 => Ok((w.next, w.live.len() as u64)),
            3 => Ok((w.reserved_gpa().raw(), c.last_flush_ops)),
            _ => Err(Status::BadArgument),
        }
    }

    /// `Hc::ExpectSecretCopy(buf, src, len)`: a host assertion that the bytes at `buf` (a
    /// page the guest can reach: reserved memory or owned mapped pages) equal the secret
    /// planted at `src` (owned pages). Returns only `Ok`.
    pub(super) fn hc_expect_secret_copy(
        &mut self,
        buf: Gpa,
        src: Gpa,
        len: u64,
    ) -> Result<u64, Status> {
        self.check_owned(src, len)?;
        let end = buf.raw().checked_add(len).ok_or(Status::BadAddress)?;
        if len == 0 || end > self.ram.size() {
            return Err(Status::BadAddress);
        }
        if buf >= self.reserved_end {
            self.check_owned(buf, len)?;
        } else if end > self.reserved_end.raw() {
            return Err(Status::BadAddress);
        }
        let reachable = self.engine(|e| {
            let view = e.view();
            e.ranges_in(buf, Gpa(end))
                .iter()
                .all(|r| view.perm(r.state).readable())
        });
        if !reachable {
            return Err(Status::Unreachable);
        }
        if self.current.is_none() {
            return Err(Status::BadState);
        }
        let mut got = vec![0u8; len as usize];
        self.ram
            .read(buf.raw(), &mut got)
            .map_err(|_| Status::BadAddress)?;
        let found = got
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b == self.secret_byte(Gpa(src.raw() + i as u64)))
            .count() as u64;
        if let Some(c) = self.current.as_mut() {
            c.host.record(HostFailure {
                gpa: buf,
                len,
                what: veil_abi::HOST_EXPECT_SECRET,
                count: len,
                found,
            });
        }
        Ok(0)
    }

    /// `Hc::ViolationPolicy`.
    pub(super) fn hc_violation_policy(&self) -> u64 {
        match self.policy {
            ViolationPolicy::Report => 0,
            ViolationPolicy::Inject => 1,
            ViolationPolicy::Kill => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use veil_abi::{gfp, Hc, Status, IMAGE_MIN_GPA, PAGE_SIZE};

    use crate::console::ConsoleSink;
    use crate::memory::MemSize;
    use crate::session::{Session, VcpuState};
    use crate::stage2::BackendKind;
    use crate::vm::{Vm, VmConfig};

    /// A VM that is never run (its session is driven directly), `vcpus` vCPUs.
    fn vm(test: &str, vcpus: u32, backend: BackendKind, secretmem: bool) -> Option<Vm> {
        crate::stage2::tests::kvm_or_skip(test)?;
        let code = [0xeb, 0xfe]; // jmp $
        let mut c = VmConfig::new(crate::elf::build_elf(IMAGE_MIN_GPA, &code, 0));
        c.mem = MemSize(32 << 20);
        c.console = ConsoleSink::Null;
        c.echo_logs = false;
        c.vcpus = vcpus;
        c.stage2 = backend;
        c.host_secretmem = secretmem;
        Some(Vm::new(c).expect("boot"))
    }

    fn call(s: &mut Session, hc: Hc, a: [u64; 4]) -> Result<u64, Status> {
        let out = s.hypercall(hc as u32, a);
        match out.status {
            Status::Ok => Ok(out.r0),
            e => Err(e),
        }
    }

    /// Ownership through the hypercalls, per backend: vCPU 1 may not window vCPU 0's page nor
    /// put vCPU 0's slot; its own page goes into its own window.
    #[test]
    fn only_the_owner_windows_a_page_and_windows_are_per_vcpu() {
        for backend in [BackendKind::Mprotect, BackendKind::Slots] {
            let Some(mut vm) = vm("mermap owner", 2, backend, false) else {
                return;
            };
            let s = vm.session_mut();
            let p = call(s, Hc::Alloc, [0, gfp::UNMAPPED, 0, 0]).unwrap();
            let w0 = call(s, Hc::MermapGet, [p, 1, 0, 0]).unwrap();
            let mut one = VcpuState::new(1);
            s.lend(&mut one);
            assert_eq!(call(s, Hc::MermapGet, [p, 1, 0, 0]), Err(Status::NotOwner));
            assert_eq!(
                call(s, Hc::MermapPut, [w0, 0, 0, 0]),
                Err(Status::BadAddress)
            );
            let q = call(s, Hc::Alloc, [0, gfp::UNMAPPED, 0, 0]).unwrap();
            let w1 = call(s, Hc::MermapGet, [q, 1, 0, 0]).unwrap();
            assert!(w1 >= w0 + 65 * PAGE_SIZE, "{w1:#x} vs {w0:#x}");
            s.lend(&mut one);
            assert_eq!(call(s, Hc::Free, [p, 0, 0, 0]), Err(Status::BadState));
            call(s, Hc::MermapPut, [w0, 0, 0, 0]).unwrap();
            call(s, Hc::Free, [p, 0, 0, 0]).unwrap();
            let m = s.mermap().unwrap();
            assert_eq!(m.window(0).unwrap().counters.free_teardowns, 1);
            assert_eq!(m.window(1).unwrap().live.len(), 1);
        }
    }

    /// `--host-secretmem` pages: windowed on a host where KVM reads through the VMM's mapping,
    /// `SecretNeedsGup` where it needs GUP.
    #[test]
    fn secret_pages_need_a_host_without_gup() {
        let Some(mut vm) = vm("mermap secretmem", 1, BackendKind::Mprotect, true) else {
            return;
        };
        let s = vm.session_mut();
        let p = call(s, Hc::Alloc, [0, gfp::UNMAPPED, 0, 0]).unwrap();
        let gup = s.mermap_secret_needs_gup;
        s.mermap_secret_needs_gup = true;
        assert_eq!(
            call(s, Hc::MermapGet, [p, 1, 0, 0]),
            Err(Status::SecretNeedsGup)
        );
        assert_eq!(
            call(s, Hc::MermapGetReserved, [p, 0, 0, 0]),
            Err(Status::SecretNeedsGup)
        );
        s.mermap_secret_needs_gup = false;
        let w = call(s, Hc::MermapGet, [p, 1, 0, 0]).unwrap();
        call(s, Hc::MermapPut, [w, 0, 0, 0]).unwrap();
        // This host (kvm_pvm) windows secret pages.
        let pvm = crate::caps::probe_host()
            .kvm_modules
            .iter()
            .any(|m| m == "kvm_pvm");
        assert_eq!(gup, !pvm);
    }

    /// Random mermap calls (and allocations and frees) with edge-biased arguments: nothing
    /// panics, every answer is a known status, and no window ever shows a page that is not
    /// allocated to the vCPU whose window it is, live or stale.
    #[test]
    fn random_mermap_calls_never_show_a_page_that_is_not_the_windows_vcpus() {
        let Some(mut vm) = vm("mermap fuzz", 2, BackendKind::Mprotect, false) else {
            return;
        };
        let s = vm.session_mut();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        let mut held: Vec<u64> = Vec::new();
        let mut windows: Vec<u64> = Vec::new();
        // The session holds one vCPU's state, `other` the other's: a lend swaps them.
        let mut other = VcpuState::new(1);
        let mut got = 0u32;
        for i in 0..20_000u32 {
            if rnd(50) == 0 {
                s.lend(&mut other);
            }
            let pick = |v: &Vec<u64>, r: u64| v.get(r as usize).copied().unwrap_or(0);
            let any_gpa = match rnd(6) {
                0 => pick(&held, rnd(held.len() as u64)),
                1 => pick(&held, rnd(held.len() as u64)) + rnd(4) * PAGE_SIZE,
                2 => pick(&windows, rnd(windows.len() as u64)),
                3 => u64::MAX - rnd(3),
                4 => rnd(64 << 20),
                _ => (32 << 20) + rnd(3 * 65) * PAGE_SIZE,
            };
            let out = match rnd(8) {
                0 => {
                    let g = rnd(2) * gfp::UNMAPPED;
                    let r = call(s, Hc::Alloc, [rnd(3), g, 0, 0]);
                    if let Ok(p) = r {
                        held.push(p);
                    }
                    r
                }
                1 => call(s, Hc::Free, [any_gpa, rnd(3), 0, 0]),
                2 | 3 => {
                    let n = [1, 1, 2, 4, 0, 64, 65, u64::MAX][rnd(8) as usize];
                    let r = call(s, Hc::MermapGet, [any_gpa, n, 0, 0]);
                    if let Ok(w) = r {
                        windows.push(w);
                        got += 1;
                    }
                    r
                }
                4 => call(s, Hc::MermapGetReserved, [any_gpa, 0, 0, 0]),
                5 | 6 => call(s, Hc::MermapPut, [any_gpa, 0, 0, 0]),
                _ => call(s, Hc::MermapInfo, [rnd(5), 0, 0, 0]),
            };
            if let Err(st) = out {
                assert!(
                    !matches!(st, Status::UnknownCall | Status::InvariantBroken),
                    "call {i}: {st:?}"
                );
            }
            let m = s.mermap().unwrap();
            for w in m.windows() {
                assert!(
                    w.live.iter().map(|l| l.pages).sum::<u64>() <= 65,
                    "call {i}"
                );
                for l in w.live.iter().chain(&w.stale) {
                    for k in 0..l.pages {
                        let page = crate::addr::Gpa(l.target + k * PAGE_SIZE);
                        assert_eq!(
                            m.owner_of(page),
                            Some(w.vcpu),
                            "call {i}: vCPU {}'s window shows {page:#x}",
                            w.vcpu
                        );
                        assert!(s
                            .allocator()
                            .allocation_containing(page.pfn().raw())
                            .is_some());
                    }
                }
            }
        }
        assert!(
            got >= 100,
            "only {got} gets succeeded: the fuzz reached too little"
        );
        assert!(s.allocator().check_invariants().is_ok());
    }
}
