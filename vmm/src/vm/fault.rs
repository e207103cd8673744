//! Exits that name no GPA but may be blocked accesses to unmapped RAM: emulation failures
//! (an instruction KVM cannot emulate touching a hole, an instruction fetch running into a
//! hole) and shutdowns (an exception frame pushed onto a stack in a hole). Each is attributed
//! here: the instruction at RIP is read through the stage-2-checked view, decoded with
//! iced-x86, its memory accesses translated with the checked walker, and every piece in an
//! unmapped page becomes a violation record answered by the policy
//! ([`crate::session::Session`]'s `unresumable`).

use iced_x86::Mnemonic;
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::SyncReg;

use veil_abi::{Hc, ADDRESS_UNKNOWN};

use super::{FetchOutcome, Vcpu};
use crate::addr::Gpa;
use crate::decode::{self, CpuState, DecodeError, MAX_INSN_LEN};
use crate::guest_view::ViewError;
use crate::page_walk::{self, WalkError};
use crate::report::asi::AsiVia;
use crate::report::{AccessKind, ExitInfo, InsnAccess, InsnAtRip};
use crate::run_types::BlockedAccess;
use crate::session::HcOut;
use crate::stage2::RangeState;

/// The #PF vector.
const PAGE_FAULT: u64 = 14;
/// KVM_INTERNAL_ERROR_DELIVERY_EV: KVM could not deliver an event (e.g. the frame push).
const SUBERROR_DELIVERY_EV: u32 = 3;
/// 64-bit interrupt frame: SS, RSP, RFLAGS, CS, RIP.
pub const INTERRUPT_FRAME: u64 = 40;
/// Largest 64-bit exception frame: the interrupt frame and an error code (charged when the
/// vector is not known, as at a shutdown).
pub const EXCEPTION_FRAME: u64 = 48;

/// One blocked access: GPA, kind, bytes.
pub(super) type Hit = BlockedAccess;

/// Where reading the instruction bytes at RIP stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FetchStop {
    /// The next byte is in an unmapped page at this GPA.
    Hole(u64),
    /// The walk for the next page read a table entry in a hole at this GPA.
    TableHole(u64),
}

impl Vcpu {
    /// GPA of guest-virtual `gva`: KVM_TRANSLATE (which walks through memslots only), else the
    /// VMM's checked walker.
    pub(super) fn translate(&self, cr3: u64, gva: u64) -> Result<u64, WalkError> {
        if let Ok(t) = self.vcpu.translate_gva(gva) {
            if t.valid != 0 {
                return Ok(t.physical_address);
            }
        }
        page_walk::walk(&self.vm().view(), cr3, gva)
    }

    /// Up to 15 instruction bytes at `rip`, read through the checked view.
    pub(super) fn fetch_insn(&self, cr3: u64, rip: u64) -> (Vec<u8>, Option<FetchStop>) {
        let mut bytes = Vec::with_capacity(MAX_INSN_LEN);
        let mut va = rip;
        while bytes.len() < MAX_INSN_LEN {
            let n = (MAX_INSN_LEN - bytes.len()).min((0x1000 - (va & 0xfff)) as usize);
            let gpa = match self.translate(cr3, va) {
                Ok(g) => g,
                Err(WalkError::TableInHole { entry_gpa }) => {
                    return (bytes, Some(FetchStop::TableHole(entry_gpa)))
                }
                Err(_) => return (bytes, None),
            };
            let mut buf = [0u8; MAX_INSN_LEN];
            match self.vm().view().read(gpa, &mut buf[..n]) {
                Ok(()) => bytes.extend_from_slice(&buf[..n]),
                Err(ViewError::Unmapped { gpa }) => return (bytes, Some(FetchStop::Hole(gpa))),
                Err(ViewError::NotRam { .. } | ViewError::ReadOnly { .. }) => return (bytes, None),
            }
            va = va.wrapping_add(n as u64);
        }
        (bytes, None)
    }

    /// Translates `[gva, gva + len)` page by page: the pieces in unmapped pages as `kind`
    /// accesses, and table entries in holes met on the way as 8-byte reads.
    fn holes_in(&self, cr3: u64, gva: u64, len: u64, kind: AccessKind) -> Vec<Hit> {
        let mut hits = Vec::new();
        let mut va = gva;
        let mut left = len;
        while left > 0 {
            let n = left.min(0x1000 - (va & 0xfff));
            match self.translate(cr3, va) {
                Ok(g) if self.vm().blocks(Gpa(g), kind) => hits.push((Gpa(g), kind, n as u32)),
                Err(WalkError::TableInHole { entry_gpa }) => {
                    hits.push((Gpa(entry_gpa), AccessKind::Read, 8))
                }
                _ => {}
            }
            left -= n;
            va = va.wrapping_add(n);
        }
        hits
    }

    /// The blocked accesses of the instruction at RIP (empty: none found), and what was read
    /// and decoded there. A software interrupt (`int n`, `int3`, `int1`, `into`: no memory
    /// operand) is charged with the frame it pushes.
    pub(super) fn attribute_insn(
        &self,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> (Vec<Hit>, InsnAtRip) {
        let cr3 = sregs.cr3;
        let (bytes, stop) = self.fetch_insn(cr3, regs.rip);
        let mut hits = Vec::new();
        let mut seen = InsnAtRip {
            bytes: bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
            decoded: String::new(),
            accesses: Vec::new(),
        };
        match decode::decode(&bytes, regs.rip, decode::bitness(sregs)) {
            Ok(insn) => {
                seen.decoded = format!("{:?}", insn.mnemonic()).to_lowercase();
                let cpu = CpuState { regs, sregs };
                let mut tables = Vec::new();
                let acc = decode::accesses(&insn, &cpu, &mut |va| match self.translate(cr3, va) {
                    Ok(g) => Some(g),
                    Err(WalkError::TableInHole { entry_gpa }) => {
                        tables.push(entry_gpa);
                        None
                    }
                    Err(_) => None,
                });
                hits.extend(tables.into_iter().map(|e| (Gpa(e), AccessKind::Read, 8)));
                for a in acc {
                    let state = a.gpa.map(|g| self.vm().state_at(Gpa(g)));
                    if let Some(g) = a.gpa.map(Gpa).filter(|&g| self.vm().blocks(g, a.access)) {
                        hits.push((g, a.access, a.size));
                    }
                    seen.accesses.push(InsnAccess {
                        gva: a.gva,
                        gpa: a.gpa,
                        access: a.access,
                        size: a.size,
                        state: state.map(state_name),
                    });
                }
                if matches!(
                    insn.mnemonic(),
                    Mnemonic::Int | Mnemonic::Int1 | Mnemonic::Int3 | Mnemonic::Into
                ) {
                    hits.extend(self.frame_holes(regs, sregs, INTERRUPT_FRAME));
                }
            }
            // The instruction runs on into a page the walk or the view refused.
            Err(DecodeError::Truncated { got }) => {
                seen.decoded = if got == 0 { "unreadable" } else { "truncated" }.into();
                match stop {
                    Some(FetchStop::Hole(g)) => hits.push((Gpa(g), AccessKind::Fetch, 1)),
                    Some(FetchStop::TableHole(e)) => hits.push((Gpa(e), AccessKind::Read, 8)),
                    None => {}
                }
            }
            Err(DecodeError::Invalid) => seen.decoded = "invalid".into(),
        }
        (hits, seen)
    }

    /// The `frame` bytes a ring-0 event delivery pushes below RSP (rounded down to 16), where
    /// they land in a hole.
    fn frame_holes(&self, regs: &kvm_regs, sregs: &kvm_sregs, frame: u64) -> Vec<Hit> {
        let top = regs.rsp & !0xf;
        self.holes_in(sregs.cr3, top.wrapping_sub(frame), frame, AccessKind::Write)
    }

    /// Records `first` and `more` at `rip` and applies the policy's answer; an access to a
    /// sensitive page among them (the vCPU is restricted) is an ASI exit instead: the VM
    /// switches to the full view and the guest re-enters at the same instruction, which then
    /// completes (a fetch by re-entry); anything in an unmapped page faults again and is
    /// recorded then.
    fn answer(&mut self, first: Hit, more: &[Hit], rip: u64, via: AsiVia) -> Option<ExitInfo> {
        let sensitive = std::iter::once(&first)
            .chain(more)
            .find(|h| self.vm().is_sensitive(h.0))
            .copied();
        if let Some((gpa, access, _)) = sensitive {
            match self.s().asi_exit(gpa, access, rip, via) {
                Ok(()) => return None,
                Err(e) => log::warn!("ASI exit at {gpa:#x} failed ({e}): a violation"),
            }
        }
        let outcome = self.s().unresumable(first, more, rip);
        self.resume_or_stop(outcome)
    }

    /// Applies the policy's answer to an access the guest cannot run on past.
    fn resume_or_stop(&mut self, outcome: FetchOutcome) -> Option<ExitInfo> {
        match outcome {
            FetchOutcome::Resume { rip, rsp } => {
                let m = self.vcpu.sync_regs_mut();
                m.regs.rip = rip;
                m.regs.rsp = rsp;
                self.vcpu.set_sync_dirty_reg(SyncReg::Register);
                None
            }
            FetchOutcome::Stop(e) => Some(*e),
        }
    }

    /// `Hc::Exception` while a reachability route is open: the guest took an exception inside
    /// the route and its route frame recovers, so the VM does not stop. A #PF whose address the
    /// checked walker cannot translate because a page-table page is in a hole is the blocked
    /// access KVM's own walk made without an exit: recorded as an 8-byte read of that entry at
    /// the faulting RIP. Any other call (or no open route) goes to the session as usual.
    pub(super) fn route_exception(&mut self, nr: u32, a: [u64; 4]) -> Option<HcOut> {
        if nr != Hc::Exception as u32 || !self.vm().route_is_open() {
            return None;
        }
        let [vector, _error_code, rip, cr2] = a;
        if vector == PAGE_FAULT {
            if let Ok(sregs) = self.vcpu.get_sregs() {
                if let Err(WalkError::TableInHole { entry_gpa }) = self.translate(sregs.cr3, cr2) {
                    self.s().route_fault_violation(Gpa(entry_gpa), rip);
                }
            }
        }
        Some(HcOut::ok(0))
    }

    /// An internal-error exit: attributed to the blocked accesses of the instruction at RIP
    /// (or of the event frame KVM could not push), else reported as KVM's error.
    pub(super) fn internal_error(&mut self) -> Option<ExitInfo> {
        let (suberror, data) = super::kvm_run::internal_error(&mut self.vcpu);
        let regs = self.vcpu.sync_regs().regs;
        let mut insn = None;
        if let Ok(sregs) = self.vcpu.get_sregs() {
            let (mut hits, seen) = self.attribute_insn(&regs, &sregs);
            if hits.is_empty() && suberror == SUBERROR_DELIVERY_EV {
                hits = self.frame_holes(&regs, &sregs, EXCEPTION_FRAME);
            }
            if let Some((first, more)) = hits.split_first() {
                return self.answer(*first, more, regs.rip, AsiVia::InternalError);
            }
            insn = Some(seen);
        }
        Some(ExitInfo::InternalError {
            suberror,
            data,
            insn,
            regs: self.regs_dump(),
        })
    }

    /// `KVM_RUN` failed with `EFAULT` and no `KVM_EXIT_MEMORY_FAULT`: KVM could not resolve a
    /// guest access through the backing it was given — under the `mprotect` backend, a guest
    /// ring-3 access to a page the guest view closes (this host delivers no GPA). The
    /// instruction at RIP is attributed as for an internal error; what [`efault_record`]
    /// decides is recorded and answered by the policy (recovery point, else a violation stop),
    /// an unlocated fault as a record at an unknown address. The same fault again and again
    /// without progress stops as a fault-loop livelock.
    pub(super) fn memory_fault(&mut self, e: &kvm_ioctls::Error) -> Option<ExitInfo> {
        let (Ok(regs), Ok(sregs)) = (self.vcpu.get_regs(), self.vcpu.get_sregs()) else {
            return Some(ExitInfo::KvmError {
                error: format!("{e}, and the vCPU registers could not be read"),
            });
        };
        let (hits, seen) = self.attribute_insn(&regs, &sregs);
        let record = efault_record(hits, &seen);
        let (key, access) = match &record {
            EfaultRecord::Located(h) => (h[0].0.raw(), h[0].1),
            EfaultRecord::Unknown { access, .. } => (ADDRESS_UNKNOWN, *access),
        };
        if let Some(stop) = self.fault_repeats(key, access, &regs) {
            return Some(stop);
        }
        // `answer` edits the synced registers: start from the vCPU's real ones.
        self.vcpu.sync_regs_mut().regs = regs;
        match record {
            EfaultRecord::Located(hits) => {
                self.answer(hits[0], &hits[1..], regs.rip, AsiVia::Efault)
            }
            EfaultRecord::Unknown { access, size } => {
                let outcome = self.s().unattributed(access, size, regs.rip);
                self.resume_or_stop(outcome)
            }
        }
    }

    /// `KVM_EXIT_MEMORY_FAULT`: KVM names the range `[gpa, gpa + size)` it could not resolve,
    /// so the record's GPA and size come from KVM, not from decoding (which only tells the
    /// access kind, see [`memory_fault_kind`]). Answered as an `EFAULT` is; a range the guest
    /// view does not block is not a guest violation but a host failure (a KVM error stop).
    /// `KVM_CAP_MEMORY_FAULT_INFO` needs no enabling: it only says KVM may annotate the
    /// `EFAULT` this way (kvm-ioctls turns the annotated one into `VcpuExit::MemoryFault`).
    pub(super) fn memory_fault_exit(&mut self, gpa: u64, size: u64) -> Option<ExitInfo> {
        let (Ok(regs), Ok(sregs)) = (self.vcpu.get_regs(), self.vcpu.get_sregs()) else {
            return Some(ExitInfo::KvmError {
                error: format!(
                    "KVM_EXIT_MEMORY_FAULT at GPA {gpa:#x}, and the vCPU registers could not be read"
                ),
            });
        };
        let (_, seen) = self.attribute_insn(&regs, &sregs);
        let at = Gpa(gpa);
        let readable = !self.vm().blocks(at, AccessKind::Read);
        let access = memory_fault_kind(gpa, size, &seen.accesses, readable);
        if !self.vm().blocks(at, access) {
            return Some(ExitInfo::KvmError {
                error: format!(
                    "KVM_EXIT_MEMORY_FAULT at GPA {gpa:#x} ({size} bytes, {}), which the guest \
                     view does not block",
                    state_name(self.vm().state_at(at))
                ),
            });
        }
        if let Some(stop) = self.fault_repeats(gpa, access, &regs) {
            return Some(stop);
        }
        self.vcpu.sync_regs_mut().regs = regs;
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        self.answer((at, access, size), &[], regs.rip, AsiVia::MemoryFault)
    }

    /// A shutdown (triple fault): the blocked accesses that explain it are recorded: the
    /// instruction at RIP's (e.g. a page walk through a page table in a hole, which KVM answers
    /// with a #PF the guest cannot take) and the exception frame pushed onto a stack in a hole.
    /// The VM stops either way: a shut-down vCPU is not resumed.
    pub(super) fn shutdown(&mut self) -> ExitInfo {
        let regs = self.regs_dump();
        if let (Ok(r), Ok(s)) = (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            let (mut hits, _) = self.attribute_insn(&r, &s);
            hits.extend(self.frame_holes(&r, &s, EXCEPTION_FRAME));
            if let Some((first, more)) = hits.split_first() {
                return self.s().fatal(*first, more, r.rip);
            }
        }
        ExitInfo::TripleFault { regs }
    }
}

/// What a stage-2 fault without an exit (`KVM_RUN` failing with `EFAULT`) is recorded as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum EfaultRecord {
    /// The blocked accesses the decoded instruction makes (at least one).
    Located(Vec<Hit>),
    /// None found: one record at an unknown address, of the kind and size decoding tells.
    Unknown {
        /// Access kind.
        access: AccessKind,
        /// Bytes.
        size: u32,
    },
}

/// The decision for an `EFAULT`, from the instruction's attribution (`hits`, `seen` as
/// [`Vm::attribute_insn`] returns them): the blocked accesses if any; else an unknown-address
/// record of the first access whose address could not be computed or translated, else of
/// the instruction's first access; an instruction with no memory access (or that did not
/// decode) is charged as a fetch of the bytes read at RIP, the only guest memory it is known
/// to touch.
pub(super) fn efault_record(hits: Vec<Hit>, seen: &InsnAtRip) -> EfaultRecord {
    if !hits.is_empty() {
        return EfaultRecord::Located(hits);
    }
    let access = seen.accesses.iter().find(|a| a.gpa.is_none());
    match access.or(seen.accesses.first()) {
        Some(a) => EfaultRecord::Unknown {
            access: a.access,
            size: a.size,
        },
        None => EfaultRecord::Unknown {
            access: AccessKind::Fetch,
            size: seen.bytes.split_whitespace().count().max(1) as u32,
        },
    }
}

/// The access kind of a `KVM_EXIT_MEMORY_FAULT` on `[gpa, gpa + size)` (the exit does not
/// say): that of the decoded access inside the range, else a store if the page is readable
/// (`readable`: only a store can fault on it), else a load.
pub(super) fn memory_fault_kind(
    gpa: u64,
    size: u64,
    accesses: &[InsnAccess],
    readable: bool,
) -> AccessKind {
    let inside = |a: &&InsnAccess| a.gpa.is_some_and(|g| g >= gpa && g - gpa < size.max(1));
    match accesses.iter().find(inside) {
        Some(a) => a.access,
        None if readable => AccessKind::Write,
        None => AccessKind::Read,
    }
}

/// Report name of a stage-2 state (None: not RAM).
fn state_name(s: Option<RangeState>) -> &'static str {
    s.map_or("not RAM", RangeState::name)
}

#[cfg(test)]
mod tests;
