//! The contract between the Veil VMM and its guests.
//!
//! Everything a guest and the VMM must agree on lives here and nowhere else: the guest-physical
//! layout of the reserved low memory, the boot information block, the hypercall doorbell, the
//! hypercall numbers, their register convention, the status codes and the records the VMM writes
//! back into guest memory. The crate is `no_std`, dependency-free and shared by `vmm/` (host) and
//! `guest/` (built for `x86_64-unknown-none`).
//!
//! # Hypercall convention
//!
//! A hypercall is one port-I/O exit: the guest executes `out dx, eax` with
//! `dx = HYPERCALL_PORT` and `eax = ` the hypercall number ([`Hc`]). Arguments travel in
//! `rdi, rsi, rcx, r8` (a0..a3). On return `rax` holds a [`Status`] and `rdi`, `rsi` hold
//! results (r0, r1); the VMM leaves every other register untouched. Pointer arguments are
//! guest-physical addresses of buffers inside the reserved low memory (identity-mapped in the
//! guest, so a pointer to a guest static *is* its GPA); the VMM rejects anything else with
//! [`Status::BadAddress`].
//!
//! A write to [`BARE_PORT`] is a bare exit: the VMM counts it and resumes at once, so a guest can
//! measure the round trip of a hypercall against the cheapest possible exit.
#![no_std]

/// Byte pattern a load from unmapped memory returns under `--on-violation report`.
pub const POISON_BYTE: u8 = 0xa5;
/// Top of the boot stack of vCPU 0 (GPA, identity-mapped); the stack grows down towards
/// [`ap_stack_top`]`(1)`.
pub const STACK_TOP_GPA: u64 = 0x10_0000;
/// Most vCPUs a Veil guest can be started with (stacks and mailboxes are sized for them).
pub const MAX_VCPUS: u32 = 16;
/// Bytes of stack vCPU 0 gets below [`STACK_TOP_GPA`].
pub const BSP_STACK_SIZE: u64 = 0x6_0000;
/// Bytes of stack each other vCPU gets, below vCPU 0's.
pub const AP_STACK_SIZE: u64 = 0x8000;

/// Top of vCPU `vcpu`'s boot stack (GPA, 16-byte aligned): vCPU 0 at [`STACK_TOP_GPA`], the
/// others packed below its [`BSP_STACK_SIZE`] bytes (all above 0x20000).
pub const fn ap_stack_top(vcpu: u32) -> u64 {
    match vcpu {
        0 => STACK_TOP_GPA,
        n => STACK_TOP_GPA - BSP_STACK_SIZE - (n as u64 - 1) * AP_STACK_SIZE,
    }
}

/// Version of this ABI; [`Hc::Version`] returns it.
pub const ABI_VERSION: u64 = 1;

/// Port whose `out dx, eax` is the hypercall doorbell.
pub const HYPERCALL_PORT: u16 = 0x5e0;
/// Port whose writes are bare exits: counted and resumed, nothing else.
pub const BARE_PORT: u16 = 0x5e1;
/// The 16550 UART of the guest console.
pub const SERIAL_PORT: u16 = 0x3f8;

/// Size of a page frame.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a pageblock (order 9): the unit at which stage-2 state changes.
pub const PAGEBLOCK_SIZE: u64 = 2 << 20;

/// Guest-virtual base of the guest's direct map of all RAM (as in Linux).
pub const DIRECT_MAP_BASE: u64 = 0xffff_8880_0000_0000;

/// GPA of the boot GDT (built by the VMM: null, 64-bit code at 0x08, data at 0x10).
pub const GDT_GPA: u64 = 0x1000;
/// GPA of the [`BootInfo`] block; the VMM also passes it in `rdi` at entry.
pub const BOOT_INFO_GPA: u64 = 0x2000;
/// GPA of the first per-vCPU mailbox page (vCPU n uses `MAILBOX_GPA + n * PAGE_SIZE`).
pub const MAILBOX_GPA: u64 = 0x4000;
/// GPA of the first page of the VMM-built page tables (PML4 first).
pub const PAGE_TABLES_GPA: u64 = 0x10_0000;
/// Lowest GPA a guest ELF segment may be loaded at.
pub const IMAGE_MIN_GPA: u64 = 0x20_0000;
/// Code segment selector in the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector in the boot GDT.
pub const DATA_SELECTOR: u16 = 0x10;

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"VEILBOOT");
/// Capacity of [`BootInfo::selection`].
pub const SELECTION_MAX: usize = 1024;

/// What the guest is asked to do.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMode {
    /// Announce every test ([`Hc::TestAnnounce`]), run the selected ones, then exit.
    Run = 0,
    /// Announce every test, run none, exit 0.
    List = 1,
}

/// Information the VMM hands to the guest at [`BOOT_INFO_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u64,
    /// A [`BootMode`] as `u32`.
    pub mode: u32,
    /// Index of the vCPU this block is for.
    pub vcpu: u32,
    /// Bytes of guest RAM (GPA `0..ram_size`).
    pub ram_size: u64,
    /// End of the reserved, always-mapped low memory (a multiple of [`PAGEBLOCK_SIZE`]).
    pub reserved_end: u64,
    /// First GPA managed by the allocator (pages come only from [`Hc::Alloc`]).
    pub managed_start: u64,
    /// End of the managed memory.
    pub managed_end: u64,
    /// Guest-virtual base of the direct map ([`DIRECT_MAP_BASE`]).
    pub direct_map_base: u64,
    /// Bytes covered by the direct map, starting at GPA 0 (RAM plus any probe range above it).
    pub direct_map_size: u64,
    /// GPA of this vCPU's mailbox page.
    pub mailbox_gpa: u64,
    /// Top of this vCPU's boot stack (GPA, identity-mapped).
    pub stack_top: u64,
    /// Number of valid bytes in `selection`.
    pub selection_len: u32,
    /// vCPUs the VM runs (`veil run --vcpus`; 1..=[`MAX_VCPUS`]). vCPU 0 enters with `rsi` = 0
    /// and runs the suite; vCPU n enters at the same entry point with `rsi` = n and
    /// `rsp` = [`ap_stack_top`]`(n)`.
    pub vcpus: u32,
    /// Comma-separated names of the tests to run; empty means all.
    pub selection: [u8; SELECTION_MAX],
}

/// Hypercall numbers (the value of `eax` at the doorbell).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hc {
    /// () -> r0 = [`ABI_VERSION`].
    Version = 0,
    /// Does nothing; the round-trip benchmark's payload.
    Nop = 1,
    /// (ptr, len): one line of text for the VMM's log.
    Log = 2,
    /// (order, gfp) -> r0 = GPA. `gfp` holds [`gfp`] bits.
    Alloc = 3,
    /// (context, gfp, order) -> r0 = GPA. `context` is a [`context`] value.
    AllocSpecial = 4,
    /// (gpa, order): give back pages from [`Hc::Alloc`].
    Free = 5,
    /// (ptr, len): declare a test the guest can run (name is `[a-z0-9_]+`, at most 64 bytes).
    TestAnnounce = 6,
    /// (ptr, len): the named test starts; violations are counted per test from here.
    TestBegin = 7,
    /// (result, ptr, len): the current test ends with a [`TestResult`] and a message.
    TestEnd = 8,
    /// (gpa, access, count): the current test expects `count` violations of kind `access`
    /// ([`Access`] as u64) on the page at `gpa` ([`ADDRESS_UNKNOWN`]: at an unknown address).
    /// Unexpected violations fail the test on the VMM side.
    ExpectViolation = 9,
    /// (buf_ptr, max) -> r0 = violations in the current test; copies up to `max`
    /// [`ViolationRecord`]s (the most recent ones) to `buf_ptr`.
    QueryViolations = 10,
    /// (rip, rsp): where to resume after an access the guest cannot run on past: an instruction
    /// fetch from unmapped memory, an instruction KVM cannot emulate touching a hole (used once).
    SetRecovery = 11,
    /// (): forget the recovery point.
    ClearRecovery = 12,
    /// (): write a stage-2 dump now (if the VMM was asked for dumps).
    Dump = 13,
    /// () -> Ok if the allocator's `check_invariants()` holds.
    CheckInvariants = 14,
    /// (buf_ptr): copy an [`AllocStats`] to `buf_ptr`.
    Stats = 15,
    /// (gpa, len, byte): the VMM fills guest-owned memory with `byte` through its host mapping.
    /// A range with a page the guest cannot reach at stage 2 needs the test-harness capability
    /// ([`Status::HarnessOnly`] otherwise).
    HostFill = 16,
    /// (gpa, len, byte) -> r0 = number of bytes in the range equal to `byte`, read by the VMM
    /// through its host mapping; only over pages the guest can reach at stage 2
    /// ([`Status::Unreachable`] otherwise: use [`Hc::HostExpect`] for the others).
    HostCount = 17,
    /// (vector, error_code, rip, cr2): the guest took an exception it could not handle.
    Exception = 18,
    /// (bare_cycles, hypercall_cycles, iterations): the guest's round-trip measurement.
    ReportTiming = 19,
    /// (code): stop the VM; the VMM exits with `code` (0 = success).
    Exit = 20,
    /// (gpa, len, what, count): a **host assertion**. The VMM counts, through its own mapping,
    /// the bytes of `[gpa, gpa + len)` (pages the current test's guest owns) that match `what`
    /// (a byte value 0..=255, or [`HOST_EXPECT_SECRET`]: "equal to the secret the VMM planted
    /// at that address") and records in the current test's verdict whether exactly `count`
    /// matched. It returns only `Ok` ("recorded"): nothing derived from the contents. A failed
    /// assertion fails the test on the VMM side (message: range, what, expected, found). Errors
    /// come from the arguments alone: `what` or `count > len` ([`Status::BadArgument`]), the
    /// range (as [`Hc::HostFill`]), no test running ([`Status::BadState`]).
    HostExpect = 21,
    /// (gpa, len): test-harness only. The VMM writes its per-run secret (bytes the guest never
    /// learns) into pages the guest owns, whatever their stage-2 state.
    PlantSecret = 22,
    /// (name_ptr, name_len, sink_gpa, sink_len): a reachability route starts inside the current
    /// test (`BadState` outside one or while a route is open); the guest will put whatever the
    /// route obtains into the sink (1..=64 KiB of reserved memory). The ranges planted with
    /// [`Hc::PlantSecret`] since the previous `RouteBegin` are the route's targets.
    RouteBegin = 23,
    /// (): the current route ends; the VMM judges it (blocked and recorded / blocked but
    /// unrecorded / leaked) from its own records and mapping, and returns only `Ok`. A cell
    /// other than "blocked and recorded" fails the test on the VMM side.
    RouteEnd = 24,
    /// (gpa, pages, perm): lock `pages` pages from `gpa` (page aligned; pages the guest
    /// allocated, or pages of its own loaded ELF image in reserved memory) for the rest of the
    /// run, as Heki locks kernel text and rodata: `perm` is
    /// [`protect::READ_ONLY`] (stores become violations) or [`protect::NO_ACCESS`] (every access
    /// does). Locks only tighten: [`protect::READ_WRITE`] (an unlock) and a read-only lock of a
    /// no-access page are refused with [`Status::BadState`], as is freeing a locked page.
    /// Errors: unknown `perm` or `pages` 0 or too many ([`Status::BadArgument`]), a misaligned
    /// range or a reserved one that is not wholly the image (the VMM's structures, mailbox,
    /// stack, free low pages, padding after the image: [`Status::BadAddress`]), managed pages
    /// not allocated to the guest
    /// ([`Status::NotAllocated`]), unmapped pages ([`Status::BadState`]).
    Protect = 25,
    /// (): reconcile stage 2 now: the VMM compares what the host realises (the kernel's
    /// mappings, KVM's slot table) with its engine's intended state. `Ok`: they agree (a page
    /// changed by [`Hc::Stage2Tamper`] is caught and put back); [`Status::InvariantBroken`]:
    /// they do not, which the report records and which fails the run.
    VerifyStage2 = 26,
    /// (op, pages): the stage-2 sweep inside the current test. `op` 0 begins it: from then on
    /// the test's loads of blocked pages are judged by the sweep, not by `ExpectViolation`.
    /// `op` 1 ends it, the guest saying it loaded one byte of each of `pages` managed pages:
    /// the VMM compares the pages whose loads were violations with the pages its engine makes
    /// unreachable and fails the test on any difference. Returns only `Ok` ("recorded").
    /// Errors: no test running, a sweep already open (begin) or none (end)
    /// ([`Status::BadState`]), another `op` ([`Status::BadArgument`]), a begin when the host's
    /// available memory could not back a load of every managed page ([`Status::NoMemory`]:
    /// nothing is opened, and the VMM prints the figures).
    Sweep = 27,
    /// (gpa): test-harness only. Closes the page at `gpa` (a mapped page the guest allocated)
    /// in the stage-2 backend behind the engine's back, so that reconciliation must catch it;
    /// the VMM fails the test if it has not by the test's end (`mprotect`: the page's
    /// protection; `slots`: a hole punched into its memslot). [`Status::BadState`] outside a
    /// test, while a tampered page is not caught yet, for a page that is not mapped, or where a
    /// backend has no such hook; [`Status::HarnessOnly`] without the test-harness capability.
    Stage2Tamper = 28,
    /// (revoke_cycles, first_violation_cycles, reads, stale_reads): the revocation meter's
    /// figures (guest TSC cycles from the revoke call: until it returned, until the reading
    /// vCPU's first violation; the reader's successful reads, and those after it saw the revoke
    /// return). The VMM puts them in the report; `stale_reads > reads` is `BadArgument`.
    ReportRevocation = 29,
    /// (): ASI enter, the flush point: the calling vCPU returns to the restricted view (its
    /// sensitive pages absent again) before it runs untrusted code. The VM's view is per VM on
    /// hosts without a second address space, so it goes back to restricted only when no vCPU
    /// is ASI-exited any more; r0 = ranges that switch toggled (0 if the VM stays full).
    /// [`Status::AlreadyRestricted`] when the vCPU is already entered (a no-op, counted).
    AsiEnter = 30,
    /// (buf_ptr): copy an [`AsiStats`] (the run's ASI counters and the calling vCPU's state) to
    /// `buf_ptr` (reserved memory, as [`Hc::Stats`]).
    AsiStats = 31,
    /// (gpa, count): the current test expects `count` ASI exits (a restricted vCPU's touch of
    /// a sensitive page) on the page at `gpa`. At `TestEnd` the VMM compares the exits it
    /// recorded during the test with the declarations: an undeclared or missing one fails
    /// the test. Errors: no test running ([`Status::BadState`]), too many declarations
    /// ([`Status::BadArgument`]).
    ExpectAsiExit = 32,
    /// (gpa, pages) -> r0 = window GPA. Maps `pages` pages from `gpa` (unmapped pages of one
    /// or more live allocations this vCPU made) into the calling vCPU's mermap window
    /// ([`mermap`]), bump-allocated: a slot that was put back keeps its stale mapping until
    /// the bump pointer wraps, when the whole window is flushed at once (one batch of stage-2
    /// changes). Tries hard to be fast, not hard to succeed. Errors: `pages` 0
    /// ([`Status::BadArgument`]), more than [`mermap::BUMP_PAGES`]
    /// ([`Status::MermapTooBig`]), no room without overlapping a live slot after the wrap
    /// ([`Status::MermapBusy`]), a misaligned or non-managed `gpa` ([`Status::BadAddress`]),
    /// a page that is not allocated ([`Status::NotAllocated`]), allocated by another vCPU
    /// ([`Status::NotOwner`]), or not unmapped ([`Status::BadState`]), a page backed by
    /// `memfd_secret` memory on a host where KVM reaches guest memory by GUP
    /// ([`Status::SecretNeedsGup`]).
    MermapGet = 33,
    /// (gpa) -> r0 = window GPA: maps one page into the calling vCPU's reserved slot, which is
    /// kept back from the bump allocation and succeeds whenever the slot is not live (errors as
    /// [`Hc::MermapGet`], and [`Status::MermapBusy`] while it is live).
    MermapGetReserved = 34,
    /// (window_gpa): puts back the live mapping that starts at `window_gpa` in the calling
    /// vCPU's window; its slots keep their stale mapping until the next wrap (the reserved
    /// slot's until it is taken again or the window wraps). [`Status::BadState`] for a slot
    /// that is not live, [`Status::BadAddress`] outside the caller's window.
    MermapPut = 35,
    /// (what) -> r0, r1: the calling vCPU's window. `what` 0: (window base GPA, bump pages);
    /// 1: (flushes, wraps) since boot; 2: (bump pointer, live mappings); 3: (reserved slot
    /// GPA, stage-2 operations of the last flush). Anything else: [`Status::BadArgument`].
    MermapInfo = 36,
    /// (buf_gpa, src_gpa, len): a **host assertion**: the VMM checks, through its own mapping,
    /// that the `len` bytes at `buf_gpa` (reserved memory or pages the guest owns) equal the
    /// secret planted at `src_gpa` (pages the guest owns), i.e. that a copy the guest made
    /// through its window holds the page's real contents, and records the outcome in the
    /// current test's verdict. Returns only `Ok` (errors from the arguments alone, as
    /// [`Hc::HostExpect`]).
    ExpectSecretCopy = 37,
    /// () -> r0 = the `--on-violation` policy: 0 report, 1 inject, 2 kill.
    ViolationPolicy = 38,
    /// (vcpu): rings vCPU `vcpu`'s doorbell, so a vCPU parked in `hlt` looks at its mailbox
    /// now rather than after the VMM's idle timeout (the SMP runtime's `post` makes it after
    /// publishing a job). Any vCPU of the VM may be rung; another index is
    /// [`Status::BadArgument`].
    Wake = 39,
}

impl Hc {
    /// The lowest hypercall number with no call (everything from here up is unknown).
    pub const FIRST_UNUSED: u32 = 40;
}

/// The mermap: each vCPU's window of GPAs above RAM where unmapped pages it owns can be mapped
/// ephemerally ([`Hc::MermapGet`]).
pub mod mermap {
    /// Pages of each vCPU's window handed out by the bump allocator.
    pub const BUMP_PAGES: u64 = 64;
    /// Pages kept back for [`super::Hc::MermapGetReserved`] (after the bump pages).
    pub const RESERVED_PAGES: u64 = 1;
    /// Pages of each vCPU's window: vCPU n's starts at the window base + n * this * 4 KiB.
    pub const WINDOW_PAGES: u64 = BUMP_PAGES + RESERVED_PAGES;
}

/// Vector of the virtualization exception `--on-violation inject` injects (#VE).
pub const VE_VECTOR: u8 = 20;
/// Offset in each vCPU's mailbox page of the [`VeInfo`] the VMM writes before it injects #VE.
pub const VE_INFO_OFFSET: u64 = 0xe00;

/// What `--on-violation inject` tells the guest about the violation it injects #VE for,
/// written at [`VE_INFO_OFFSET`] of the vCPU's mailbox page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VeInfo {
    /// #VEs injected into this vCPU since boot (the one being delivered included).
    pub count: u64,
    /// GPA of the access.
    pub gpa: u64,
    /// RIP KVM reported for the access (a load: the instruction; a store: the next one).
    pub rip: u64,
    /// An [`Access`] as u64.
    pub access: u64,
}

/// `perm` of [`Hc::Protect`].
pub mod protect {
    /// No access at all.
    pub const NO_ACCESS: u64 = 0;
    /// Loads and fetches only.
    pub const READ_ONLY: u64 = 1;
    /// Every access: an unlock, always refused.
    pub const READ_WRITE: u64 = 2;
}

/// `what` of [`Hc::HostExpect`]: match against the secret planted by [`Hc::PlantSecret`].
pub const HOST_EXPECT_SECRET: u64 = 0x100;

impl Hc {
    /// The hypercall with number `nr`, if any.
    pub const fn from_u32(nr: u32) -> Option<Hc> {
        Some(match nr {
            0 => Hc::Version,
            1 => Hc::Nop,
            2 => Hc::Log,
            3 => Hc::Alloc,
            4 => Hc::AllocSpecial,
            5 => Hc::Free,
            6 => Hc::TestAnnounce,
            7 => Hc::TestBegin,
            8 => Hc::TestEnd,
            9 => Hc::ExpectViolation,
            10 => Hc::QueryViolations,
            11 => Hc::SetRecovery,
            12 => Hc::ClearRecovery,
            13 => Hc::Dump,
            14 => Hc::CheckInvariants,
            15 => Hc::Stats,
            16 => Hc::HostFill,
            17 => Hc::HostCount,
            18 => Hc::Exception,
            19 => Hc::ReportTiming,
            20 => Hc::Exit,
            21 => Hc::HostExpect,
            22 => Hc::PlantSecret,
            23 => Hc::RouteBegin,
            24 => Hc::RouteEnd,
            25 => Hc::Protect,
            26 => Hc::VerifyStage2,
            27 => Hc::Sweep,
            28 => Hc::Stage2Tamper,
            29 => Hc::ReportRevocation,
            30 => Hc::AsiEnter,
            31 => Hc::AsiStats,
            32 => Hc::ExpectAsiExit,
            33 => Hc::MermapGet,
            34 => Hc::MermapGetReserved,
            35 => Hc::MermapPut,
            36 => Hc::MermapInfo,
            37 => Hc::ExpectSecretCopy,
            38 => Hc::ViolationPolicy,
            39 => Hc::Wake,
            _ => return None,
        })
    }
}

/// Hypercall status, returned in `rax`.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// No such hypercall number.
    UnknownCall = 1,
    /// An argument is out of its domain (length, result code, access kind...).
    BadArgument = 2,
    /// A pointer or GPA is outside what the guest may name for this call.
    BadAddress = 3,
    /// Order above the allocator's maximum.
    BadOrder = 4,
    /// Unknown GFP bits or context.
    BadFlags = 5,
    /// No free memory of the requested kind.
    NoMemory = 6,
    /// A flip was needed but no whole free pageblock exists.
    NoFreePageblock = 7,
    /// A flip was needed but the request may not block.
    WouldBlock = 8,
    /// The page is not allocated to the guest (double free, never allocated).
    NotAllocated = 9,
    /// Freed with an order other than the one allocated.
    WrongOrder = 10,
    /// GPA not aligned to the order.
    Misaligned = 11,
    /// Stage 2 could not be updated (e.g. out of memslots).
    Stage2Failed = 12,
    /// Call not valid in the current state (e.g. `TestEnd` without `TestBegin`).
    BadState = 13,
    /// The allocator's invariants do not hold.
    InvariantBroken = 14,
    /// A test-harness call ([`Hc::PlantSecret`], a host write into a page the guest cannot
    /// reach) while the harness capability is off (`veil run --test-harness` turns it on for a
    /// `--guest` ELF; the embedded suite has it).
    HarnessOnly = 15,
    /// The call would return something derived from, or write into, a page the guest cannot
    /// reach at stage 2.
    Unreachable = 16,
    /// [`Hc::AsiEnter`] by a vCPU that is not ASI-exited: nothing to do (counted).
    AlreadyRestricted = 17,
    /// [`Hc::MermapGet`]: no room in the window without overlapping a live mapping (put some
    /// back), or the reserved slot is live.
    MermapBusy = 18,
    /// [`Hc::MermapGet`]: more pages than the window's bump area holds.
    MermapTooBig = 19,
    /// [`Hc::MermapGet`]: a page of the range was allocated by another vCPU (only the
    /// allocation's owner may map it).
    NotOwner = 20,
    /// [`Hc::MermapGet`]: the page is `memfd_secret` memory and this host's KVM reaches guest
    /// memory by GUP, which secret memory refuses.
    SecretNeedsGup = 21,
}

impl Status {
    /// The status with code `v`, if any.
    pub const fn from_u64(v: u64) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::UnknownCall,
            2 => Status::BadArgument,
            3 => Status::BadAddress,
            4 => Status::BadOrder,
            5 => Status::BadFlags,
            6 => Status::NoMemory,
            7 => Status::NoFreePageblock,
            8 => Status::WouldBlock,
            9 => Status::NotAllocated,
            10 => Status::WrongOrder,
            11 => Status::Misaligned,
            12 => Status::Stage2Failed,
            13 => Status::BadState,
            14 => Status::InvariantBroken,
            15 => Status::HarnessOnly,
            16 => Status::Unreachable,
            17 => Status::AlreadyRestricted,
            18 => Status::MermapBusy,
            19 => Status::MermapTooBig,
            20 => Status::NotOwner,
            21 => Status::SecretNeedsGup,
            _ => return None,
        })
    }
}

/// GFP bits accepted by [`Hc::Alloc`]; same values as `allocator::Gfp`.
pub mod gfp {
    /// Zero the pages before returning them.
    pub const ZERO: u64 = 1 << 0;
    /// Pages removed from the direct map (stage 2).
    pub const UNMAPPED: u64 = 1 << 1;
    /// Movable migratetype.
    pub const MOVABLE: u64 = 1 << 2;
    /// Reclaimable migratetype.
    pub const RECLAIMABLE: u64 = 1 << 3;
    /// May not block: never flips a pageblock.
    pub const ATOMIC: u64 = 1 << 4;
    /// Sensitive pages (ASI's `__GFP_SENSITIVE`): mapped in the full view only.
    pub const SENSITIVE: u64 = 1 << 5;
    /// Every bit defined so far.
    pub const ALL: u64 = ZERO | UNMAPPED | MOVABLE | RECLAIMABLE | ATOMIC | SENSITIVE;
    /// `GFP_KERNEL`: ordinary kernel memory (nonsensitive).
    pub const KERNEL: u64 = 0;
    /// `GFP_USER`: user memory, sensitive as ASI makes it.
    pub const USER: u64 = SENSITIVE;
    /// `GFP_HIGHUSER`: equal to [`USER`] (no highmem).
    pub const HIGHUSER: u64 = USER;
    /// `GFP_HIGHUSER_MOVABLE`: user pages (movable, sensitive).
    pub const HIGHUSER_MOVABLE: u64 = HIGHUSER | MOVABLE;
}

/// Values of the `context` argument of [`Hc::AllocSpecial`]; same order as
/// `allocator::BuddyContext`.
pub mod context {
    /// An ordinary allocation: the GFP bits alone decide.
    pub const DEFAULT: u64 = 0;
    /// Pages removed from the direct map.
    pub const UNMAPPED: u64 = 1;
    /// Sensitive pages (full view only).
    pub const SENSITIVE: u64 = 2;
    /// The lowest value with no context (everything from here up is unknown).
    pub const FIRST_UNUSED: u64 = 3;
}

/// Result of a test, the first argument of [`Hc::TestEnd`].
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestResult {
    /// The test passed.
    Pass = 0,
    /// The test failed; the message says why.
    Fail = 1,
    /// The test could not run here; the message says why.
    Skip = 2,
}

/// Kind of a stray access.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A load.
    Read = 1,
    /// A store.
    Write = 2,
    /// An instruction fetch.
    Fetch = 3,
}

/// The GPA of a violation whose address is unknown (a stage-2 fault that names no GPA and
/// whose instruction did not explain it): [`ViolationRecord::gpa`] holds it, and
/// [`Hc::ExpectViolation`] declares such violations with it.
pub const ADDRESS_UNKNOWN: u64 = u64::MAX;

/// One violation as [`Hc::QueryViolations`] writes it into guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViolationRecord {
    /// Guest-physical address of the access ([`ADDRESS_UNKNOWN`] if unknown).
    pub gpa: u64,
    /// Guest RIP of the instruction.
    pub rip: u64,
    /// Bytes accessed by this exit.
    pub size: u32,
    /// An [`Access`] as u8.
    pub access: u8,
    /// Dense freetype index of the page's pageblock (allocator's `Freetype::index`), 0xff if none.
    pub freetype: u8,
    /// vCPU index.
    pub vcpu: u16,
}

/// ASI counters as [`Hc::AsiStats`] writes them into guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AsiStats {
    /// ASI exits so far (a restricted vCPU's access to a sensitive page completed by the VMM).
    pub exits: u64,
    /// `Hc::AsiEnter` calls that returned an exited vCPU to restricted.
    pub enters: u64,
    /// `Hc::AsiEnter` calls by a vCPU that was already entered ([`Status::AlreadyRestricted`]).
    pub noop_enters: u64,
    /// Switches of the VM's view (restricted to full and back).
    pub view_switches: u64,
    /// Ranges the last view switch toggled.
    pub last_ranges_toggled: u64,
    /// Sensitive runs now (what the next switch toggles).
    pub sensitive_runs: u64,
    /// 1 while the VM is in the full view.
    pub vm_full: u64,
    /// 1 while the calling vCPU is ASI-exited.
    pub vcpu_exited: u64,
    /// Nanoseconds the calling vCPU spent ASI-entered while the VM was in the full view
    /// (exposed: its sensitive pages were reachable because another vCPU was exited).
    pub vcpu_exposed_ns: u64,
    /// Full-view windows in which the calling vCPU was exposed.
    pub vcpu_exposed_windows: u64,
}

/// Allocator and stage-2 counters as [`Hc::Stats`] writes them into guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Free pages in the managed range.
    pub free_pages: u64,
    /// Pages in the managed range.
    pub managed_pages: u64,
    /// Pageblock flips mapped -> unmapped.
    pub flips_to_unmapped: u64,
    /// Pageblock flips unmapped -> mapped.
    pub flips_to_mapped: u64,
    /// Stage-2 unmap calls made by the allocator.
    pub stage2_unmap_calls: u64,
    /// Stage-2 map calls made by the allocator.
    pub stage2_map_calls: u64,
    /// Stage-2 zero calls made by the allocator.
    pub stage2_zero_calls: u64,
    /// Pages zeroed by the allocator (GFP zero, init_on_free, flips back).
    pub pages_zeroed: u64,
    /// Memslot updates (KVM_SET_USER_MEMORY_REGION calls) made by the stage-2 engine.
    pub memslot_updates: u64,
    /// Memslots in use now.
    pub memslots_in_use: u64,
    /// Violations recorded since boot.
    pub violations: u64,
}
