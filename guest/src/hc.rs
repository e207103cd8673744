//! Hypercall client: the raw doorbell and one safe wrapper per call.

use core::arch::asm;
use veil_abi::{
    Access, AllocStats, AsiStats, Hc, Status, TestResult, ViolationRecord, BARE_PORT,
    HYPERCALL_PORT,
};

/// What a hypercall returned: `rax` (a [`Status`] code), `rdi` and `rsi`.
#[derive(Clone, Copy, Debug)]
pub struct Raw {
    /// Status code from `rax`.
    pub status: u64,
    /// First result (`rdi`).
    pub r0: u64,
    /// Second result (`rsi`); no call uses it yet.
    #[allow(dead_code)]
    pub r1: u64,
}

/// Rings the doorbell with hypercall number `nr` and arguments `a0..a3`.
///
/// # Safety
/// Pointer arguments let the VMM write guest memory: every pointer the call writes through must
/// name a live buffer of the right size that nothing else uses meanwhile.
#[inline(always)]
pub unsafe fn raw(nr: u32, a0: u64, a1: u64, a2: u64, a3: u64) -> Raw {
    let status: u64;
    let r0: u64;
    let r1: u64;
    // SAFETY: one port write; the VMM changes only rax/rdi/rsi (and memory the caller vouched
    // for), the others are declared clobbered to be safe.
    unsafe {
        asm!(
            "out dx, eax",
            in("dx") HYPERCALL_PORT,
            inout("rax") nr as u64 => status,
            inout("rdi") a0 => r0,
            inout("rsi") a1 => r1,
            inout("rcx") a2 => _,
            inout("r8") a3 => _,
            options(nostack),
        );
    }
    Raw { status, r0, r1 }
}

/// A hypercall that takes no pointer the VMM writes through.
fn call(hc: Hc, a0: u64, a1: u64, a2: u64, a3: u64) -> Result<Raw, Status> {
    // SAFETY: callers of `call` pass no pointer the VMM writes through (only read-only buffers
    // that are live for the duration of the call).
    let r = unsafe { raw(hc as u32, a0, a1, a2, a3) };
    status(r.status).map(|()| r)
}

/// Turns a status code into a `Result` (an unknown code reads as `BadState`).
pub fn status(code: u64) -> Result<(), Status> {
    match Status::from_u64(code) {
        Some(Status::Ok) => Ok(()),
        Some(s) => Err(s),
        None => Err(Status::BadState),
    }
}

/// The VMM's ABI version.
pub fn version() -> Result<u64, Status> {
    call(Hc::Version, 0, 0, 0, 0).map(|r| r.r0)
}

/// The cheapest hypercall.
pub fn nop() -> Result<(), Status> {
    call(Hc::Nop, 0, 0, 0, 0).map(|_| ())
}

/// A line for the VMM's log.
pub fn log(msg: &str) -> Result<(), Status> {
    call(Hc::Log, msg.as_ptr() as u64, msg.len() as u64, 0, 0).map(|_| ())
}

/// A formatted line for the VMM's log (truncated to 160 bytes).
pub fn logf(args: core::fmt::Arguments) {
    struct Line {
        buf: [u8; 160],
        len: usize,
    }
    impl core::fmt::Write for Line {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for c in s.chars() {
                let mut tmp = [0u8; 4];
                let e = c.encode_utf8(&mut tmp).as_bytes();
                if self.len + e.len() > self.buf.len() {
                    break;
                }
                self.buf[self.len..self.len + e.len()].copy_from_slice(e);
                self.len += e.len();
            }
            Ok(())
        }
    }
    let mut line = Line {
        buf: [0; 160],
        len: 0,
    };
    let _ = core::fmt::write(&mut line, args);
    // Only whole UTF-8 sequences were copied in.
    let _ = log(core::str::from_utf8(&line.buf[..line.len]).unwrap_or("(bad log line)"));
}

/// Allocates `2^order` pages with `gfp` bits; returns the GPA.
pub fn alloc(order: u8, gfp: u64) -> Result<u64, Status> {
    call(Hc::Alloc, order as u64, gfp, 0, 0).map(|r| r.r0)
}

/// Allocates through the context-taking entry point; returns the GPA.
pub fn alloc_special(context: u64, gfp: u64, order: u8) -> Result<u64, Status> {
    call(Hc::AllocSpecial, context, gfp, order as u64, 0).map(|r| r.r0)
}

/// Locks `pages` pages from `gpa` for the rest of the run (`perm`: a [`veil_abi::protect`]
/// value).
pub fn protect(gpa: u64, pages: u64, perm: u64) -> Result<(), Status> {
    call(Hc::Protect, gpa, pages, perm, 0).map(|_| ())
}

/// Asks the VMM to reconcile stage 2 now (`Ok`: the host realises what its engine intends).
pub fn verify_stage2() -> Result<(), Status> {
    call(Hc::VerifyStage2, 0, 0, 0, 0).map(|_| ())
}

/// Opens a stage-2 sweep in the current test.
pub fn sweep_begin() -> Result<(), Status> {
    call(Hc::Sweep, 0, 0, 0, 0).map(|_| ())
}

/// Ends the sweep: the guest loaded one byte of each of `pages` managed pages.
pub fn sweep_end(pages: u64) -> Result<(), Status> {
    call(Hc::Sweep, 1, pages, 0, 0).map(|_| ())
}

/// Test harness: closes the mapped page `gpa` (ours) behind the VMM's engine.
pub fn stage2_tamper(gpa: u64) -> Result<(), Status> {
    call(Hc::Stage2Tamper, gpa, 0, 0, 0).map(|_| ())
}

/// Gives back pages from [`alloc`].
pub fn free(gpa: u64, order: u8) -> Result<(), Status> {
    call(Hc::Free, gpa, order as u64, 0, 0).map(|_| ())
}

/// Mask of the order bits in a batch entry (`gpa | order`; GPAs are page-aligned).
pub const ENTRY_ORDER_MASK: u64 = 0xfff;

/// Fills `out` with `gpa | order` entries from up to `out.len()` `Alloc(order, gfp)` calls in
/// one tight loop (ring-0 code is emulated: a Rust loop around [`alloc`] costs several times
/// more per call). Returns how many succeeded and, if one failed, its status.
pub fn alloc_batch(order: u8, gfp: u64, out: &mut [u64]) -> (usize, Option<Status>) {
    if out.is_empty() {
        return (0, None);
    }
    let base = out.as_mut_ptr();
    let end: *mut u64;
    let st: u64;
    // SAFETY: the loop stores at most `out.len()` u64 into `out` (the count register runs down
    // from its length); the VMM changes only rax/rdi/rsi, the other scratch registers are
    // declared clobbered.
    unsafe {
        asm!(
            "2:",
            "mov eax, {nr}",
            "mov rdi, {order}",
            "mov rsi, {gfp}",
            "xor ecx, ecx",
            "xor r8d, r8d",
            "out dx, eax",
            "test rax, rax",
            "jnz 3f",
            "or rdi, {order}",
            "mov qword ptr [{p}], rdi",
            "add {p}, 8",
            "dec {n}",
            "jnz 2b",
            "3:",
            nr = const Hc::Alloc as u32,
            order = in(reg) order as u64,
            gfp = in(reg) gfp,
            p = inout(reg) base => end,
            n = inout(reg) out.len() => _,
            in("dx") HYPERCALL_PORT,
            out("rax") st, out("rdi") _, out("rsi") _, out("rcx") _, out("r8") _,
            options(nostack),
        );
    }
    // SAFETY: `end` was advanced from `base` in steps of one element, within `out`.
    let done = unsafe { end.offset_from(base) } as usize;
    (done, status(st).err())
}

/// Frees the `gpa | order` entries of `entries` in order with one tight loop (see
/// [`alloc_batch`]). Stops at the first failure: returns how many were freed and its status.
pub fn free_batch(entries: &[u64]) -> (usize, Option<Status>) {
    if entries.is_empty() {
        return (0, None);
    }
    let base = entries.as_ptr();
    let end: *const u64;
    let st: u64;
    // SAFETY: the loop reads at most `entries.len()` u64 from `entries`; the VMM changes only
    // rax/rdi/rsi, the other scratch registers are declared clobbered.
    unsafe {
        asm!(
            "2:",
            "mov rdi, qword ptr [{p}]",
            "mov rsi, rdi",
            "and rsi, {mask}",
            "xor rdi, rsi",
            "mov eax, {nr}",
            "xor ecx, ecx",
            "xor r8d, r8d",
            "out dx, eax",
            "test rax, rax",
            "jnz 3f",
            "add {p}, 8",
            "dec {n}",
            "jnz 2b",
            "3:",
            nr = const Hc::Free as u32,
            mask = const ENTRY_ORDER_MASK,
            p = inout(reg) base => end,
            n = inout(reg) entries.len() => _,
            in("dx") HYPERCALL_PORT,
            out("rax") st, out("rdi") _, out("rsi") _, out("rcx") _, out("r8") _,
            options(nostack, readonly),
        );
    }
    // SAFETY: `end` was advanced from `base` in steps of one element, within `entries`.
    let done = unsafe { end.offset_from(base) } as usize;
    (done, status(st).err())
}

/// Declares a test.
pub fn test_announce(name: &str) -> Result<(), Status> {
    call(
        Hc::TestAnnounce,
        name.as_ptr() as u64,
        name.len() as u64,
        0,
        0,
    )
    .map(|_| ())
}

/// Starts a test.
pub fn test_begin(name: &str) -> Result<(), Status> {
    call(Hc::TestBegin, name.as_ptr() as u64, name.len() as u64, 0, 0).map(|_| ())
}

/// Ends the current test.
pub fn test_end(result: TestResult, msg: &str) -> Result<(), Status> {
    let (p, l) = (msg.as_ptr() as u64, msg.len() as u64);
    call(Hc::TestEnd, result as u64, p, l, 0).map(|_| ())
}

/// Announces `count` violations of kind `access` on the page at `gpa`.
pub fn expect_violation(gpa: u64, access: Access, count: u64) -> Result<(), Status> {
    call(Hc::ExpectViolation, gpa, access as u64, count, 0).map(|_| ())
}

/// Copies the most recent violations of the current test into `buf`; returns the total count.
pub fn query_violations(buf: &mut [ViolationRecord]) -> Result<u64, Status> {
    let (p, n) = (buf.as_mut_ptr() as u64, buf.len() as u64);
    // SAFETY: the VMM writes at most `n` records into `buf`, which we borrow mutably.
    let r = unsafe { raw(Hc::QueryViolations as u32, p, n, 0, 0) };
    status(r.status).map(|()| r.r0)
}

/// Forgets the fetch-recovery point.
pub fn clear_recovery() -> Result<(), Status> {
    call(Hc::ClearRecovery, 0, 0, 0, 0).map(|_| ())
}

/// Asks the VMM for a stage-2 dump now.
#[allow(dead_code)]
pub fn dump() -> Result<(), Status> {
    call(Hc::Dump, 0, 0, 0, 0).map(|_| ())
}

/// Asks the VMM to check the allocator's invariants.
pub fn check_invariants() -> Result<(), Status> {
    call(Hc::CheckInvariants, 0, 0, 0, 0).map(|_| ())
}

/// The allocator and stage-2 counters.
pub fn stats() -> Result<AllocStats, Status> {
    let mut s = AllocStats::default();
    let p = &mut s as *mut AllocStats as u64;
    // SAFETY: the VMM writes one AllocStats into `s`, a live local.
    let r = unsafe { raw(Hc::Stats as u32, p, 0, 0, 0) };
    status(r.status).map(|()| s)
}

/// ASI enter (the flush point): returns the ranges the VM's view switch toggled (0 if the VM
/// stays full); `AlreadyRestricted` if this vCPU was not exited.
pub fn asi_enter() -> Result<u64, Status> {
    call(Hc::AsiEnter, 0, 0, 0, 0).map(|r| r.r0)
}

/// The ASI counters and this vCPU's ASI state.
pub fn asi_stats() -> Result<AsiStats, Status> {
    let mut s = AsiStats::default();
    let p = &mut s as *mut AsiStats as u64;
    // SAFETY: the VMM writes one AsiStats into `s`, a live local.
    let r = unsafe { raw(Hc::AsiStats as u32, p, 0, 0, 0) };
    status(r.status).map(|()| s)
}

/// Announces `count` ASI exits on the page at `gpa` in the current test.
pub fn expect_asi_exit(gpa: u64, count: u64) -> Result<(), Status> {
    call(Hc::ExpectAsiExit, gpa, count, 0, 0).map(|_| ())
}

/// Has the VMM fill `[gpa, gpa+len)` (owned by the guest) with `byte` from the host side.
pub fn host_fill(gpa: u64, len: u64, byte: u8) -> Result<(), Status> {
    call(Hc::HostFill, gpa, len, byte as u64, 0).map(|_| ())
}

/// Has the VMM count the bytes equal to `byte` in `[gpa, gpa+len)` from the host side
/// (pages the guest can reach only: `Unreachable` otherwise).
pub fn host_count(gpa: u64, len: u64, byte: u8) -> Result<u64, Status> {
    call(Hc::HostCount, gpa, len, byte as u64, 0).map(|r| r.r0)
}

/// A host assertion: exactly `count` bytes of `[gpa, gpa+len)` equal `what` (a byte value or
/// [`veil_abi::HOST_EXPECT_SECRET`]). The VMM judges it into the test's verdict; the guest
/// learns nothing but "recorded".
pub fn host_expect(gpa: u64, len: u64, what: u64, count: u64) -> Result<(), Status> {
    call(Hc::HostExpect, gpa, len, what, count).map(|_| ())
}

/// Has the VMM plant its per-run secret in `[gpa, gpa+len)` (test harness only).
pub fn plant_secret(gpa: u64, len: u64) -> Result<(), Status> {
    call(Hc::PlantSecret, gpa, len, 0, 0).map(|_| ())
}

/// Reports the round-trip measurement.
pub fn report_timing(bare_cycles: u64, hc_cycles: u64, iterations: u64) -> Result<(), Status> {
    call(Hc::ReportTiming, bare_cycles, hc_cycles, iterations, 0).map(|_| ())
}

/// Reports the revocation meter's figures ([`Hc::ReportRevocation`]).
pub fn report_revocation(
    revoke_cycles: u64,
    first_violation_cycles: u64,
    reads: u64,
    stale_reads: u64,
) -> Result<(), Status> {
    call(
        Hc::ReportRevocation,
        revoke_cycles,
        first_violation_cycles,
        reads,
        stale_reads,
    )
    .map(|_| ())
}

/// Stops the VM with `code`.
pub fn exit(code: u64) -> ! {
    let _ = call(Hc::Exit, code, 0, 0, 0);
    loop {
        // SAFETY: halting with interrupts off parks the vCPU for good; nothing is left to do.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// One bare port-I/O exit (the round-trip baseline).
#[allow(dead_code)]
pub fn bare_exit() {
    // SAFETY: a write to the bare port only makes the VMM count an exit.
    unsafe { asm!("out dx, eax", in("dx") BARE_PORT, in("eax") 0u32, options(nomem, nostack)) };
}

/// Opens the reachability route `name`; what it obtains goes into `[sink, sink+sink_len)`.
pub fn route_begin(name: &str, sink: u64, sink_len: u64) -> Result<(), Status> {
    let (p, l) = (name.as_ptr() as u64, name.len() as u64);
    call(Hc::RouteBegin, p, l, sink, sink_len).map(|_| ())
}

/// Closes the open route: the VMM judges it.
pub fn route_end() -> Result<(), Status> {
    call(Hc::RouteEnd, 0, 0, 0, 0).map(|_| ())
}

/// A hypercall with raw arguments, for routes that aim them at memory the guest cannot reach:
/// returns the status only.
pub fn aimed(hc: Hc, a0: u64, a1: u64, a2: u64, a3: u64) -> Result<u64, Status> {
    // SAFETY: the callers aim pointers only at pages the guest owns but cannot reach (the VMM
    // must refuse to write there) or at reserved-memory buffers they own.
    let r = unsafe { raw(hc as u32, a0, a1, a2, a3) };
    status(r.status).map(|()| r.r0)
}

/// Maps `pages` pages from `gpa` (unmapped pages this vCPU allocated) into this vCPU's mermap
/// window; returns the window GPA.
pub fn mermap_get(gpa: u64, pages: u64) -> Result<u64, Status> {
    call(Hc::MermapGet, gpa, pages, 0, 0).map(|r| r.r0)
}

/// Maps the page at `gpa` into this vCPU's reserved mermap slot; returns its GPA.
pub fn mermap_get_reserved(gpa: u64) -> Result<u64, Status> {
    call(Hc::MermapGetReserved, gpa, 0, 0, 0).map(|r| r.r0)
}

/// Puts back the live mermap mapping starting at `window_gpa`.
pub fn mermap_put(window_gpa: u64) -> Result<(), Status> {
    call(Hc::MermapPut, window_gpa, 0, 0, 0).map(|_| ())
}

/// `Hc::MermapInfo(what)`: (r0, r1) about this vCPU's window.
pub fn mermap_info(what: u64) -> Result<(u64, u64), Status> {
    call(Hc::MermapInfo, what, 0, 0, 0).map(|r| (r.r0, r.r1))
}

/// A host assertion: `[buf, buf+len)` holds the secret planted at `src`.
pub fn expect_secret_copy(buf: u64, src: u64, len: u64) -> Result<(), Status> {
    call(Hc::ExpectSecretCopy, buf, src, len, 0).map(|_| ())
}

/// The VMM's `--on-violation` policy: 0 report, 1 inject, 2 kill.
pub fn violation_policy() -> Result<u64, Status> {
    call(Hc::ViolationPolicy, 0, 0, 0, 0).map(|r| r.r0)
}

/// Rings vCPU `cpu`'s doorbell: if it is parked in `hlt`, it looks at its mailbox now.
pub fn wake(cpu: u32) -> Result<(), Status> {
    call(Hc::Wake, u64::from(cpu), 0, 0, 0).map(|_| ())
}
