//! [`Mprotect`]: the `mprotect` backend, a view realised as 4 KiB host page protections.
//!
//! Guest RAM is a memfd ([`Backing::Memfd`]) mapped twice: the VMM view (the [`GuestRam`]
//! mapping every VMM access uses: host fills and assertions, zeroing, dumps, hypercall buffers,
//! ELF loading) and the guest view, a second shared mapping of the same pages that this backend
//! owns. KVM's one memslot points at the guest view, and a permission change is one `mprotect`
//! of the guest view's pages (`PROT_NONE`, `PROT_READ`, `PROT_READ | PROT_WRITE`); KVM's MMU
//! notifier drops its stage-2 entries for them. The VMM never touches the guest view, so it never
//! faults on its own accesses and never opens a page to do its work.
//!
//! Limits: one memslot for any layout; every run of distinct protection is a VMA, bounded by
//! `vm.max_map_count` (an `ENOMEM` from `mprotect` is reported as out of slots, nothing changed).
//!
//! `--host-secretmem` ([`Mprotect::use_secretmem`]): an `Unmapped` range is backed in both
//! views by a fresh `memfd_secret` file (guest view `PROT_NONE`, VMM view read-write: the VMM
//! still zeroes and fills it), so neither the guest nor the host kernel's direct map reaches
//! it; the memfd's pages under it are punched out. Mapping it again puts the memfd back in both
//! views (hole punched: it reads zero) and drops the secret file. The guest view stays
//! `PROT_NONE` while secret: this host emulates guest ring 0 through that mapping.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use allocator::Stage2Error;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use super::plan::{RangeMap, Run};
use super::{
    host_maps, secretmem, BackendUsage, EngineError, HostBacking, LockStats, Perm, RangeState,
    Realised, SlotInfo, Stage2Backend, PAGE_SIZE,
};
use crate::addr::{Gpa, HostAddr};
use crate::memory::{Backing, CoreDump, GuestRam};

/// The memslot id of the guest view.
const SLOT: u32 = 0;

/// The `mprotect` backend (see the module docs).
pub struct Mprotect {
    // Declared first: dropped (after the memslot is deleted in `Drop`) before the RAM.
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    /// Host address of the guest view (GPA 0).
    guest_base: u64,
    size: u64,
    perms: RangeMap<Perm>,
    usage: BackendUsage,
    lock: LockStats,
    lock_unmapped: bool,
    /// Under `--host-secretmem`: which pages are backed by secret memory now.
    secret: Option<RangeMap<bool>>,
    /// The memfd under both views.
    memfd: RawFd,
}

/// Why the `mprotect` backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum MprotectError {
    /// The RAM is not a memfd, so it cannot be mapped a second time.
    #[error("the mprotect backend needs memfd-backed guest RAM")]
    NotMemfd,
    /// The second mapping or the memslot failed.
    #[error("cannot set up the guest view: {0}")]
    Setup(std::io::Error),
    /// `--host-secretmem` on a host where `memfd_secret` does not work.
    #[error("--host-secretmem: memfd_secret(2) is not available here ({0}); `veil caps` says which direct-map removal this host offers")]
    NoSecretMem(std::io::Error),
}

impl Mprotect {
    /// Maps the guest view of `ram` (a memfd) with no access and gives it to `vm` as memslot 0
    /// covering all of RAM.
    pub fn new(vm: Arc<VmFd>, ram: Arc<GuestRam>) -> Result<Mprotect, MprotectError> {
        let fd = match (ram.backing(), ram.memfd()) {
            (Backing::Memfd, Some(f)) => f.as_raw_fd(),
            _ => return Err(MprotectError::NotMemfd),
        };
        let size = ram.size();
        let len = usize::try_from(size).map_err(|_| MprotectError::NotMemfd)?;
        // SAFETY: a new shared mapping of the memfd at an address the kernel chooses; no
        // existing memory is affected. It starts PROT_NONE: nothing is reachable until the
        // engine sets permissions.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MprotectError::Setup(std::io::Error::last_os_error()));
        }
        let mut me = Mprotect {
            vm,
            ram,
            guest_base: p as u64,
            size,
            perms: RangeMap::new(
                size,
                &[Run {
                    start: 0,
                    end: size,
                    state: Perm::None,
                }],
            ),
            usage: BackendUsage {
                vmas_in_use: 1,
                peak_vmas: 1,
                ..BackendUsage::default()
            },
            lock: LockStats::default(),
            lock_unmapped: true,
            secret: None,
            memfd: fd,
        };
        if me.ram.core_dump() == CoreDump::Exclude {
            // SAFETY: the guest view just mapped; MADV_DONTDUMP only changes what a core holds.
            if unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) } != 0 {
                return Err(MprotectError::Setup(std::io::Error::last_os_error()));
            }
        }
        me.set_slot(size).map_err(MprotectError::Setup)?;
        Ok(me)
    }

    /// Whether unreachable ranges are locked against swap (default on; off for replays).
    pub fn lock_unmapped(&mut self, on: bool) {
        self.lock_unmapped = on;
    }

    /// Backs every range that becomes `Unmapped` from now on with `memfd_secret` memory in both
    /// views (`--host-secretmem`; see the module docs). Fails where `memfd_secret` does not work.
    pub fn use_secretmem(&mut self) -> Result<(), MprotectError> {
        secretmem::create(PAGE_SIZE).map_err(MprotectError::NoSecretMem)?;
        self.secret = Some(RangeMap::new(
            self.size,
            &[Run {
                start: 0,
                end: self.size,
                state: false,
            }],
        ));
        Ok(())
    }

    /// Whether the page at `gpa` is backed by secret memory now (the backend's record).
    pub fn is_secret(&self, gpa: Gpa) -> bool {
        self.secret
            .as_ref()
            .and_then(|m| m.run_at(gpa.0))
            .is_some_and(|r| r.state)
    }

    /// Host address of `gpa` in the guest view.
    pub fn guest_view_addr(&self, gpa: Gpa) -> HostAddr {
        HostAddr(self.guest_base + gpa.0)
    }

    fn set_slot(&mut self, len: u64) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: len,
            userspace_addr: self.guest_base,
        };
        self.usage.memslot_updates += 1;
        // SAFETY: the region is the guest view, a mapping of `size` bytes this backend owns and
        // unmaps only after deleting the slot (Drop); KVM reaches the memfd pages through it,
        // never VMM-owned Rust memory.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if len == 0 {
            self.usage.slots_deleted += 1;
            self.usage.memslots_in_use = 0;
        } else {
            self.usage.slots_created += 1;
            self.usage.memslots_in_use = 1;
            self.usage.peak_memslots = 1;
        }
        Ok(())
    }

    fn protect(&mut self, gpa: u64, len: u64, perm: Perm) -> std::io::Result<()> {
        let prot = match perm {
            Perm::None => libc::PROT_NONE,
            Perm::Read => libc::PROT_READ,
            Perm::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        self.usage.mprotect_calls += 1;
        // SAFETY: [gpa, gpa + len) lies inside the guest view (checked by the caller), a mapping
        // no Rust reference points into; changing its protection affects only the guest.
        let r = unsafe {
            libc::mprotect(
                (self.guest_base + gpa) as *mut libc::c_void,
                len as usize,
                prot,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mprotect {
    fn drop(&mut self) {
        // The slot goes first so KVM holds no reference to the guest view once it is unmapped.
        let _ = self.set_slot(0);
        // SAFETY: unmaps exactly the guest view mapped in `new`, whose memslot is gone.
        unsafe { libc::munmap(self.guest_base as *mut libc::c_void, self.size as usize) };
    }
}

impl Stage2Backend for Mprotect {
    fn name(&self) -> &'static str {
        "mprotect"
    }

    fn set_perm(&mut self, gpa: Gpa, len: u64, perm: Perm) -> Result<(), EngineError> {
        let end = self.range_end(gpa, len)?;
        self.apply_perm(gpa.0, end, perm, self.lock_unmapped)
    }

    fn set_state(
        &mut self,
        gpa: Gpa,
        len: u64,
        perm: Perm,
        to: RangeState,
    ) -> Result<(), EngineError> {
        let end = self.range_end(gpa, len)?;
        let Some(secret) = &self.secret else {
            return self.apply_perm(gpa.0, end, perm, self.lock_unmapped);
        };
        if to == RangeState::Unmapped {
            return self.make_secret(gpa.0, end);
        }
        let was_secret: Vec<Run<bool>> =
            secret.overlapping(gpa.0, end).filter(|r| r.state).collect();
        for r in &was_secret {
            self.unsecret(r.start, r.end)?;
        }
        // Secret pages were never locked with mlock: no unlock to count for them.
        self.apply_perm(
            gpa.0,
            end,
            perm,
            self.lock_unmapped && was_secret.is_empty(),
        )
    }

    fn zero(&mut self, gpa: Gpa, len: u64) -> Result<(), Stage2Error> {
        let Some(secret) = &self.secret else {
            return super::zero_ram(&self.ram, gpa, len);
        };
        let end = gpa.0.saturating_add(len).min(self.size);
        let runs: Vec<Run<bool>> = secret.overlapping(gpa.0, end).collect();
        if runs.is_empty() {
            return super::zero_ram(&self.ram, gpa, len);
        }
        for r in runs {
            let n = r.end - r.start;
            if r.state {
                // Secret memory cannot be hole-punched. Whole pageblocks (the zero before a
                // flip back) get a fresh secret file, which drops the old pages at once and
                // keeps the VMA count; smaller ranges (init_on_free of a page), and a fresh
                // file that cannot be mapped (the memlock limit), are overwritten where
                // resident.
                let block = veil_abi::PAGEBLOCK_SIZE;
                if r.start.is_multiple_of(block)
                    && n.is_multiple_of(block)
                    && self.fresh_secret(r.start, r.end).is_ok()
                {
                    continue;
                }
                self.ram.zero_resident(r.start, n).map_err(|e| match e {
                    vm_memory::GuestMemoryError::IOError(io) => {
                        Stage2Error::Backend(-io.raw_os_error().unwrap_or(libc::EIO))
                    }
                    _ => Stage2Error::Backend(-libc::ERANGE),
                })?;
            } else {
                super::zero_ram(&self.ram, Gpa(r.start), n)?;
            }
        }
        Ok(())
    }

    fn perm_at(&self, gpa: Gpa) -> Option<Perm> {
        self.perms.run_at(gpa.0).map(|r| r.state)
    }

    fn memslots(&self) -> Vec<SlotInfo> {
        vec![SlotInfo {
            slot: SLOT,
            gpa: 0,
            len: self.size,
            readonly: false,
        }]
    }

    fn slot_containing(&self, gpa: Gpa) -> Option<SlotInfo> {
        (gpa.0 < self.size).then(|| self.memslots()[0])
    }

    fn usage(&self) -> BackendUsage {
        self.usage
    }

    fn lock_stats(&self) -> LockStats {
        self.lock
    }

    fn check(&self) -> Result<(), String> {
        if self.usage.memslots_in_use != 1 {
            return Err(format!(
                "{} memslots in use, not 1",
                self.usage.memslots_in_use
            ));
        }
        if self.usage.vmas_in_use != self.vmas() {
            return Err("vmas_in_use disagrees with the protection map".into());
        }
        if let Some(m) = &self.secret {
            // Secret exactly where the protection is none (never under a readable page).
            if let Some(r) = m.iter().find(|r| {
                r.state
                    && self
                        .perms
                        .overlapping(r.start, r.end)
                        .any(|p| p.state != Perm::None)
            }) {
                return Err(format!("secret range {:#x} is reachable", r.start));
            }
        }
        Ok(())
    }

    /// From `/proc/self/maps` over both views: the guest view's protections, and whether each
    /// range is `memfd_secret` memory in the guest view, the VMM view, both or neither.
    fn realised(&self) -> Result<Vec<Realised>, String> {
        let guest = host_maps::read(self.guest_base, self.guest_base + self.size)
            .map_err(|e| format!("guest view: {e}"))?;
        let vmm_base = self.ram.host_base();
        let vmm = host_maps::read(vmm_base, vmm_base + self.size)
            .map_err(|e| format!("VMM view: {e}"))?;
        let mut runs = Vec::new();
        let (mut gi, mut vi) = (0, 0);
        let mut at = 0;
        while at < self.size {
            while guest[gi].end - self.guest_base <= at {
                gi += 1;
            }
            while vmm[vi].end - vmm_base <= at {
                vi += 1;
            }
            let (g, v) = (guest[gi], vmm[vi]);
            let end = (g.end - self.guest_base).min(v.end - vmm_base);
            let perm = match (g.read, g.write) {
                (_, true) => Perm::ReadWrite,
                (true, false) => Perm::Read,
                (false, false) => Perm::None,
            };
            let backing = match (g.secret, v.secret, v.read && v.write) {
                (_, _, false) => HostBacking::Split,
                (true, true, true) => HostBacking::Secret,
                (false, false, true) => HostBacking::Memory,
                _ => HostBacking::Split,
            };
            super::verify::push_run(
                &mut runs,
                Realised {
                    start: Gpa(at),
                    end: Gpa(end),
                    perm,
                    backing,
                },
            );
            at = end;
        }
        Ok(runs)
    }

    fn secret_unmapped(&self) -> bool {
        self.secret.is_some()
    }

    fn tamper(&mut self, gpa: Gpa) -> Result<Perm, String> {
        let want = self.perm_at(gpa).ok_or("not RAM")?;
        let now = if want == Perm::None {
            Perm::Read
        } else {
            Perm::None
        };
        let page = gpa.0 & !(PAGE_SIZE - 1);
        // Behind the engine's back on purpose: the protection map keeps `want`.
        self.protect(page, PAGE_SIZE, now)
            .map_err(|e| e.to_string())?;
        Ok(now)
    }

    fn untamper(&mut self, gpa: Gpa) -> Result<(), String> {
        let want = self.perm_at(gpa).ok_or("not RAM")?;
        self.protect(gpa.0 & !(PAGE_SIZE - 1), PAGE_SIZE, want)
            .map_err(|e| e.to_string())
    }
}

impl Mprotect {
    fn range_end(&self, gpa: Gpa, len: u64) -> Result<u64, EngineError> {
        match gpa.0.checked_add(len) {
            Some(end)
                if len > 0
                    && end <= self.size
                    && gpa.is_page_aligned()
                    && len.is_multiple_of(PAGE_SIZE) =>
            {
                Ok(end)
            }
            e => Err(EngineError::OutOfRam {
                start: gpa,
                end: Gpa(e.unwrap_or(u64::MAX)),
                ram_size: self.size,
            }),
        }
    }

    /// Protects [start, end) with `perm` (rolled back on failure); `relock`: lock ranges that
    /// become unreachable and unlock ones that become reachable (`mlock`).
    fn apply_perm(
        &mut self,
        start: u64,
        end: u64,
        perm: Perm,
        relock: bool,
    ) -> Result<(), EngineError> {
        let len = end - start;
        let before: Vec<Run<Perm>> = self.perms.overlapping(start, end).collect();
        if let Err(e) = self.protect(start, len, perm) {
            // mprotect may have changed part of the range: put every piece back.
            for r in &before {
                let _ = self.protect(r.start, r.end - r.start, r.state);
            }
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            return Err(EngineError::Backend(if errno == libc::ENOMEM {
                Stage2Error::OutOfSlots
            } else {
                Stage2Error::Backend(-errno)
            }));
        }
        self.perms.set(start, end, perm);
        self.note_vmas();
        if relock {
            for r in &before {
                let (base, n) = (self.guest_base + r.start, r.end - r.start);
                let change = match (r.state == Perm::None, perm == Perm::None) {
                    (false, true) => Some(true),
                    (true, false) => Some(false),
                    _ => None,
                };
                if let Some(locked) = change {
                    // SAFETY: the run lies inside the guest view, a live mapping of this backend.
                    unsafe { crate::memory::set_locked(base, n, locked, &mut self.lock) };
                }
            }
        }
        Ok(())
    }

    /// Protection runs, plus one per secret range (its VMA in the VMM view).
    fn vmas(&self) -> u64 {
        let secret_runs = self
            .secret
            .as_ref()
            .map_or(0, |m| m.iter().filter(|r| r.state).count() as u64);
        self.perms.len() as u64 + secret_runs
    }

    fn note_vmas(&mut self) {
        self.usage.vmas_in_use = self.vmas();
        self.usage.peak_vmas = self.usage.peak_vmas.max(self.usage.vmas_in_use);
    }

    /// Maps `fd` at offset `off` over [start, end) of the guest view (`PROT_NONE`) and the VMM
    /// view (read-write).
    fn map_both(&mut self, start: u64, end: u64, fd: RawFd, off: u64) -> std::io::Result<()> {
        let len = end - start;
        // SAFETY: [start, end) is a page-aligned range of the guest view (this backend's own
        // mapping, no Rust reference into it; the vCPU is stopped while an exit is handled).
        unsafe { secretmem::map_fixed(self.guest_base + start, len, libc::PROT_NONE, fd, off) }?;
        // SAFETY: the same range of the VMM view (`GuestRam`'s mapping, which vm-memory and the
        // VMM only touch through volatile copies or short in-place fills while the vCPU is
        // stopped); it stays mapped (MAP_FIXED replaces, never unmaps), so `GuestRam`'s munmap
        // at drop still covers it.
        unsafe {
            secretmem::map_fixed(
                self.ram.host_base() + start,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                fd,
                off,
            )
        }
    }

    /// Puts the memfd back over [start, end) of both views with the guest view's recorded
    /// protections, after a failed move (best effort: it only maps the memfd again).
    fn restore_memfd(&mut self, start: u64, end: u64) {
        let _ = self.map_both(start, end, self.memfd, start);
        let runs: Vec<Run<Perm>> = self.perms.overlapping(start, end).collect();
        for r in runs {
            let _ = self.protect(r.start, r.end - r.start, r.state);
        }
    }

    /// Backs [start, end) with a fresh secret file in both views (guest view `PROT_NONE`) and
    /// punches the memfd out under it. On failure (the memlock limit: `EAGAIN`) nothing changed.
    fn make_secret(&mut self, start: u64, end: u64) -> Result<(), EngineError> {
        let err = |op, e: std::io::Error| EngineError::SecretMemory {
            op,
            start: Gpa(start),
            end: Gpa(end),
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        };
        let op = "back with memfd_secret";
        let fd = secretmem::create(end - start).map_err(|e| err(op, e))?;
        self.usage.mprotect_calls += 2;
        if let Err(e) = self.map_both(start, end, fd.as_raw_fd(), 0) {
            self.restore_memfd(start, end);
            return Err(err(op, e));
        }
        drop(fd);
        // The ordinary pages under the secret ones go: nothing of the range stays in the memfd.
        super::zero_ram(&self.ram, Gpa(start), end - start).map_err(EngineError::Backend)?;
        self.perms.set(start, end, Perm::None);
        if let Some(m) = &mut self.secret {
            m.set(start, end, true);
        }
        self.note_vmas();
        Ok(())
    }

    /// Replaces the secret memory of [start, end) (all secret) by a fresh, zero secret file in
    /// both views; on failure the old one stays.
    fn fresh_secret(&mut self, start: u64, end: u64) -> std::io::Result<()> {
        let fd = secretmem::create(end - start)?;
        self.usage.mprotect_calls += 2;
        // Guest view first: if the VMM view then fails, the guest view (PROT_NONE either way)
        // holds the fresh file and the VMM view the old one: put the old contents out of use by
        // overwriting them through the VMM view instead (the caller's fallback).
        self.map_both(start, end, fd.as_raw_fd(), 0)
    }

    /// Puts the memfd back over [start, end) (all secret) in both views, still `PROT_NONE` in
    /// the guest view, with its hole punched (it reads zero); the secret file goes with its
    /// last mapping.
    fn unsecret(&mut self, start: u64, end: u64) -> Result<(), EngineError> {
        self.usage.mprotect_calls += 2;
        self.map_both(start, end, self.memfd, start)
            .map_err(|e| EngineError::SecretMemory {
                op: "return to the memfd",
                start: Gpa(start),
                end: Gpa(end),
                errno: e.raw_os_error().unwrap_or(libc::EIO),
            })?;
        if let Some(m) = &mut self.secret {
            m.set(start, end, false);
        }
        super::zero_ram(&self.ram, Gpa(start), end - start).map_err(EngineError::Backend)?;
        self.note_vmas();
        Ok(())
    }
}
