//! `reachability`: every route class the guest can try against pages removed from stage 2 that
//! hold the VMM's planted secret. Per route: plant the secret into the route's own page of an
//! unmapped pageblock, zero the sink, `RouteBegin`, run the access inside a recovery frame
//! (`route::protected`: an exception or a blocked fetch ends the route, not the run), leave what
//! it obtained in the sink, `RouteEnd`. The VMM judges each route and prints the matrix; its
//! verdict, not this test's, decides (a cell other than "blocked and recorded" fails the test).
//!
//! Routes whose cell depends on work not in this build carry `needs`: they are listed in the
//! log and not run, so the default suite stays green until that work lands (then delete the
//! `needs`).

use crate::hc;
use crate::outcome::{Ctx as _, Outcome};
use crate::pages::PageList;
use crate::route::{protected, Body, Ctx, Ended};
use crate::{dm, ensure, ring3};
use core::arch::asm;
use core::ptr::addr_of_mut;
use veil_abi::{gfp, Hc, PAGEBLOCK_SIZE, PAGE_SIZE};

/// Offset of the access inside the route's page.
const OFFSET: u64 = 0x40;
/// PML4 slot of the guest-built alias window (unused by the VMM's tables: they use the
/// identity slot 0 and the direct map's slot 273).
const ALIAS_SLOT: u64 = 400;
/// Guest-virtual base of the alias window.
const ALIAS_BASE: u64 = 0xffff_0000_0000_0000 | (ALIAS_SLOT << 39);
/// Present | writable | user (user for the ring-3 routes; no SMEP/SMAP here, so ring 0 uses
/// the same entries).
const PW: u64 = 0b111;
/// Guest-virtual base of the user alias of the image's 2 MiB block (ring-3 code).
const USER_IMAGE: u64 = ALIAS_BASE + 3 * PAGEBLOCK_SIZE;
/// Guest-virtual base of the user alias of GPA 0..2 MiB (the stack, where the sink lives).
const USER_LOW: u64 = ALIAS_BASE + 4 * PAGEBLOCK_SIZE;
/// Page-size bit of a PDE (a 2 MiB page).
const PS: u64 = 1 << 7;

/// How a route reaches its page.
#[derive(Clone, Copy)]
enum Via {
    /// The guest's direct map.
    Direct,
    /// A 4 KiB PTE the guest wrote into its own page tables.
    Alias4k,
    /// A 2 MiB PDE the guest wrote into its own page tables.
    Alias2m,
    /// A PDE of the guest's own tables naming the page as a page table.
    TableInHole,
    /// This many bytes before the end of a mapped page that the guest's tables place right
    /// below the unmapped one (a 4 KiB alias pair): the access straddles the boundary.
    Boundary(u64),
    /// From ring 3, through the 4 KiB alias: `iretq` to this stub (see `ring3.rs`).
    Ring3(unsafe extern "C" fn()),
    /// With the GDT moved onto the page (`lgdt`), restored right after the body.
    GdtInHole,
    /// This hypercall with the page's GPA and this length.
    Hypercall(Hc, u64),
    /// `wrmsr` of this PV MSR with the page's GPA | these flag bits.
    Msr(u32, u64),
}

/// One route of the matrix.
struct Route {
    name: &'static str,
    via: Via,
    body: Body,
    /// Work this route's cell depends on that is not in this build: not run while set.
    needs: Option<&'static str>,
}

const fn r(name: &'static str, body: Body) -> Route {
    Route {
        name,
        via: Via::Direct,
        body,
        needs: None,
    }
}

const fn via(name: &'static str, via: Via, body: Body) -> Route {
    Route {
        name,
        via,
        body,
        needs: None,
    }
}

const fn pending(name: &'static str, body: Body, needs: &'static str) -> Route {
    Route {
        name,
        via: Via::Direct,
        body,
        needs: Some(needs),
    }
}

/// A body of inline assembly with `r8` = the target address and `r9` = the sink.
macro_rules! body {
    ($name:ident, $($asm:literal),+ $(,)?) => {
        unsafe extern "C" fn $name(c: *mut Ctx) {
            // SAFETY: `c` is the live context `run_route` passes; the access goes to a page this
            // test owns and stage 2 blocks (loads get poison, stores are dropped, fetches are
            // recovered); the sink is `c.out`. Only the declared registers change (xmm0 is
            // scratch on this soft-float target, see dm.rs); rbx is restored by the body.
            unsafe {
                asm!($($asm),+,
                     in("r8") (*c).va, in("r9") addr_of_mut!((*c).out),
                     out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
                     out("r10") _, out("r11") _);
            }
        }
    };
}

body!(load_1, "movzx eax, byte ptr [r8]", "mov [r9], rax");
body!(load_2, "movzx eax, word ptr [r8]", "mov [r9], rax");
body!(load_4, "mov eax, dword ptr [r8]", "mov [r9], rax");
body!(load_8, "mov rax, qword ptr [r8]", "mov [r9], rax");
body!(
    load_16,
    "movdqu xmm0, xmmword ptr [r8]",
    "movdqu xmmword ptr [r9], xmm0"
);
body!(
    load_8_misaligned,
    "mov rax, qword ptr [r8 + 3]",
    "mov [r9], rax"
);
body!(
    load_16_misaligned,
    "movdqu xmm0, xmmword ptr [r8 + 5]",
    "movdqu xmmword ptr [r9], xmm0"
);
body!(store_1, "mov byte ptr [r8], 0x77");
body!(store_2, "mov word ptr [r8], 0x7777");
body!(store_4, "mov dword ptr [r8], 0x77777777");
body!(
    store_8,
    "mov rax, 0x7777777777777777",
    "mov qword ptr [r8], rax"
);
body!(
    store_16,
    "movdqu xmm0, xmmword ptr [r9]",
    "movdqu xmmword ptr [r8], xmm0"
);
body!(
    store_8_misaligned,
    "mov rax, 0x7777777777777777",
    "mov qword ptr [r8 + 3], rax"
);
body!(rmw_add_8, "add qword ptr [r8], 1");
body!(rmw_inc_1, "inc byte ptr [r8]");
body!(rmw_xor_4, "xor dword ptr [r8], 0x5a5a");
body!(
    alu_load_operand,
    "xor eax, eax",
    "add rax, qword ptr [r8]",
    "mov [r9], rax"
);
body!(lock_add_8, "lock add qword ptr [r8], 1");
body!(
    lock_xadd_8,
    "mov eax, 1",
    "lock xadd qword ptr [r8], rax",
    "mov [r9], rax"
);
body!(
    xchg_8,
    "xor eax, eax",
    "xchg qword ptr [r8], rax",
    "mov [r9], rax"
);
body!(
    lock_cmpxchg_8,
    "xor eax, eax",
    "mov ecx, 1",
    "lock cmpxchg qword ptr [r8], rcx",
    "mov [r9], rax"
);
body!(
    lock_cmpxchg8b,
    "mov r10, rbx",
    "xor eax, eax",
    "xor edx, edx",
    "xor ebx, ebx",
    "mov ecx, 1",
    "lock cmpxchg8b qword ptr [r8]",
    "mov rbx, r10",
    "mov [r9], eax",
    "mov [r9 + 4], edx"
);
body!(
    rep_movsb_from,
    "mov rsi, r8",
    "mov rdi, r9",
    "mov ecx, 8",
    "rep movsb"
);
body!(movsq_from, "mov rsi, r8", "mov rdi, r9", "movsq");
body!(
    rep_movsb_to,
    "mov rsi, r9",
    "mov rdi, r8",
    "mov ecx, 8",
    "rep movsb"
);
body!(
    rep_stosb,
    "mov rdi, r8",
    "xor eax, eax",
    "mov ecx, 8",
    "rep stosb"
);
body!(stosq, "mov rdi, r8", "xor eax, eax", "stosq");
body!(
    lodsb,
    "mov rsi, r8",
    "xor eax, eax",
    "lodsb",
    "mov [r9], rax"
);
body!(
    rep_lodsq,
    "mov rsi, r8",
    "mov ecx, 2",
    "rep lodsq",
    "mov [r9], rax"
);
// cmps/scas: what they learn is where the first (in)equality is; the remaining count goes to
// the sink (a small number: never a secret byte, see the VMM's secret).
body!(
    repe_cmpsb,
    "mov rsi, r8",
    "lea rdi, [r9 + 8]",
    "mov ecx, 8",
    "repe cmpsb",
    "mov [r9], rcx"
);
body!(
    repne_scasb,
    "mov rdi, r8",
    "mov al, 0x5e",
    "mov ecx, 8",
    "repne scasb",
    "mov [r9], rcx"
);
body!(clflush, "clflush byte ptr [r8]");
body!(clflushopt, "clflushopt byte ptr [r8]");
body!(prefetcht0, "prefetcht0 byte ptr [r8]");
body!(prefetchnta, "prefetchnta byte ptr [r8]");
body!(prefetchw, "prefetchw byte ptr [r8]");
body!(
    movnti_8,
    "mov rax, 0x7777777777777777",
    "movnti qword ptr [r8], rax"
);
// Instructions this host's emulator cannot emulate: the exit names no GPA; helper 8b's decode
// path (i8b, merged) attributes them and resumes at the recovery point.
body!(
    cmpxchg16b,
    "mov r10, rbx",
    "xor eax, eax",
    "xor edx, edx",
    "xor ebx, ebx",
    "xor ecx, ecx",
    "lock cmpxchg16b xmmword ptr [r8]",
    "mov rbx, r10"
);
body!(fxsave, "fxsave [r8]");
body!(fxrstor, "fxrstor [r8]");
body!(fnstenv, "fnstenv [r8]");
body!(popcnt_m64, "popcnt rax, qword ptr [r8]", "mov [r9], rax");
body!(
    crc32_m32,
    "xor eax, eax",
    "crc32 eax, dword ptr [r8]",
    "mov [r9], rax"
);
body!(fld_m80, "fld tbyte ptr [r8]", "fstp st(0)");
body!(
    movntdqa,
    "movntdqa xmm0, xmmword ptr [r8]",
    "movdqu xmmword ptr [r9], xmm0"
);
body!(clwb, "clwb byte ptr [r8]");
// No pxor to clear xmm0 first: an SSE integer op on registers alone is unemulatable here too
// (and stops the VM: nothing to attribute); the sum is not kept.
body!(paddd_m128, "paddd xmm0, xmmword ptr [r8]");
// rex.WB ff /3: far call through the m16:64 at [r8].
body!(far_call_m16_64, ".byte 0x49, 0xff, 0x18");
// An exception frame pushed onto a stack in the hole: `int 0x20` is past the IDT's limit, so
// the CPU delivers #GP, whose frame cannot be pushed (i8b attributes the push).
body!(stack_in_hole, "lea rsp, [r8 + 0xfc0]", "int 0x20");
body!(fetch_jmp, "jmp r8");
// The straddling load's upper 4 bytes come from the hole: only they go to the sink (the lower 4
// are the guest's own mapped bytes, which hold code bytes of the fetch route).
body!(
    straddle_load_8,
    "mov rax, qword ptr [r8]",
    "shr rax, 32",
    "mov [r9], rax"
);
// `call` pushes its return address onto our (mapped) stack; the recovery frame resets rsp.
body!(fetch_call, "call r8");
body!(
    wrmsr_gpa,
    "mov rax, r8",
    "mov rdx, r8",
    "shr rdx, 32",
    "mov ecx, dword ptr [r9 - 8]",
    "wrmsr"
);

// With the GDT in the hole: `lar`/`verr` read the descriptor of selector 0x10 (unemulatable
// here: i8b's decode path records the descriptor read and resumes at the recovery point).
body!(lar_gdt_in_hole, "mov ecx, 0x10", "lar eax, ecx");
body!(verr_gdt_in_hole, "mov ecx, 0x10", "verr cx");
// Livelocks on this host (issue 8 item 4): KVM spins with no exit (sgdt, sidt, mov ds) or loops
// on MMIO exits (lgdt, lidt) for ever; the lead's detector (i8d, merged) records them and
// resumes at the recovery point. lgdt/lidt may load poison: the tables are restored after every
// route.
body!(sgdt_into_hole, "sgdt [r8]");
body!(sidt_into_hole, "sidt [r8]");
body!(lgdt_from_hole, "lgdt [r8]");
body!(lidt_from_hole, "lidt [r8]");
body!(mov_ds_gdt_in_hole, "mov ecx, 0x10", "mov ds, ecx");

/// The operand of `sgdt`/`lgdt`/`sidt`/`lidt`.
#[repr(C, packed)]
struct TableReg {
    limit: u16,
    base: u64,
}

/// GDTR and IDTR as they were before a route (a route may move or clobber either).
struct Tables {
    gdtr: TableReg,
    idtr: TableReg,
}

impl Tables {
    /// Saves GDTR and IDTR.
    fn save() -> Tables {
        let mut t = Tables {
            gdtr: TableReg { limit: 0, base: 0 },
            idtr: TableReg { limit: 0, base: 0 },
        };
        // SAFETY: sgdt/sidt write the 10-byte operands.
        unsafe {
            asm!("sgdt [{}]", "sidt [{}]", in(reg) &mut t.gdtr, in(reg) &mut t.idtr,
                 options(nostack));
        }
        t
    }

    /// Moves the GDT to `base`, keeping its limit (the route body is the only user: no segment
    /// load or exception delivery happens before [`Tables::restore`]).
    fn move_gdt(&self, base: u64) {
        let new = TableReg {
            limit: self.gdtr.limit,
            base,
        };
        // SAFETY: see above.
        unsafe { asm!("lgdt [{}]", in(reg) &new, options(readonly, nostack)) };
    }

    /// Puts both back.
    fn restore(&self) {
        // SAFETY: the registers in use before the route.
        unsafe {
            asm!("lgdt [{}]", "lidt [{}]", in(reg) &self.gdtr, in(reg) &self.idtr,
                 options(readonly, nostack));
        }
    }
}

/// Leaves for ring 3 at the stub in `aux` (user VA) with the target and the sink's user alias.
unsafe extern "C" fn ring3_body(c: *mut Ctx) {
    // SAFETY: `c` is the live context; run_route mapped the stub, the target and the sink for
    // ring 3 and runs this inside a recovery frame.
    unsafe {
        let sink = USER_LOW + addr_of_mut!((*c).out) as u64;
        ring3::enter((*c).aux, (*c).va, sink)
    }
}

/// A hypercall aimed at the unmapped page (`aux` = number | length << 32; the GPA goes where
/// the call takes its pointer): it must be refused (the refusal is the record).
unsafe extern "C" fn hc_aimed(c: *mut Ctx) {
    // SAFETY: `c` is the live context run_route passes.
    let (gpa, aux) = unsafe { ((*c).gpa, (*c).aux) };
    let len = aux >> 32;
    match Hc::from_u32(aux as u32) {
        // TestEnd takes (result, ptr, len): a pass whose message is in the hole.
        Some(Hc::TestEnd) => {
            let _ = hc::aimed(Hc::TestEnd, 0, gpa, len, 0);
        }
        Some(hc) => {
            let _ = hc::aimed(hc, gpa, len, 0, 0);
        }
        None => {}
    }
}

/// HostCount as a byte-equality oracle on the first target byte; the byte found goes to the
/// sink (refused here: each of the 256 calls is a record). HostFill into an unreachable page is
/// a test-harness capability like PlantSecret, on for this suite, so it is no route here
/// (without the harness it is refused, see `bad_hypercalls`); HostExpect returns nothing
/// derived from the contents.
unsafe extern "C" fn hc_host_count_oracle(c: *mut Ctx) {
    // SAFETY: as in hc_aimed; `out` is the sink.
    let (gpa, out) = unsafe { ((*c).gpa, addr_of_mut!((*c).out)) };
    for b in 0..=255u64 {
        if hc::aimed(Hc::HostCount, gpa, 1, b, 0) == Ok(1) {
            // SAFETY: `out` points into the live context.
            unsafe { (*out)[0] = b };
            return;
        }
    }
}

const MSR_KVM_WALL_CLOCK: u32 = 0x11;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

/// A prefetch is a hint that makes no architectural access and never faults; KVM's emulator
/// treats it as a no-op: no exit reaches the VMM, so the cell is "blocked but unrecorded" by
/// construction (nothing is loaded either; measured on this host).
const NO_EXIT: &str = "an exit: prefetches reach no one (blocked but unrecorded here)";

/// Every route, in run order.
#[rustfmt::skip]
static ROUTES: &[Route] = &[
    r("load_1", load_1),
    r("load_2", load_2),
    r("load_4", load_4),
    r("load_8", load_8),
    r("load_16", load_16),
    r("load_8_misaligned", load_8_misaligned),
    r("load_16_misaligned", load_16_misaligned),
    r("store_1", store_1),
    r("store_2", store_2),
    r("store_4", store_4),
    r("store_8", store_8),
    r("store_16", store_16),
    r("store_8_misaligned", store_8_misaligned),
    r("rmw_add_8", rmw_add_8),
    r("rmw_inc_1", rmw_inc_1),
    r("rmw_xor_4", rmw_xor_4),
    r("alu_load_operand", alu_load_operand),
    r("lock_add_8", lock_add_8),
    r("lock_xadd_8", lock_xadd_8),
    r("xchg_8", xchg_8),
    r("lock_cmpxchg_8", lock_cmpxchg_8),
    r("lock_cmpxchg8b", lock_cmpxchg8b),
    r("rep_movsb_from", rep_movsb_from),
    r("movsq_from", movsq_from),
    r("rep_movsb_to", rep_movsb_to),
    r("rep_stosb", rep_stosb),
    r("stosq", stosq),
    r("lodsb", lodsb),
    r("rep_lodsq", rep_lodsq),
    r("repe_cmpsb", repe_cmpsb),
    r("repne_scasb", repne_scasb),
    r("clflush", clflush),
    r("clflushopt", clflushopt),
    pending("prefetcht0", prefetcht0, NO_EXIT),
    pending("prefetchnta", prefetchnta, NO_EXIT),
    pending("prefetchw", prefetchw, NO_EXIT),
    r("movnti_8", movnti_8),
    r("cmpxchg16b", cmpxchg16b),
    r("fxsave", fxsave),
    r("fxrstor", fxrstor),
    r("fnstenv", fnstenv),
    r("popcnt_m64", popcnt_m64),
    r("crc32_m32", crc32_m32),
    r("fld_m80", fld_m80),
    r("movntdqa", movntdqa),
    r("clwb", clwb),
    r("paddd_m128", paddd_m128),
    r("far_call_m16_64", far_call_m16_64),
    r("stack_in_hole", stack_in_hole),
    // KVM's own walk through the table in the hole fails and it injects #PF without an exit;
    // the route frame reports the #PF and the VMM's checked walker attributes it.
    via("page_table_in_hole", Via::TableInHole, load_8),
    via("straddle_load_8", Via::Boundary(4), straddle_load_8),
    via("straddle_store_8", Via::Boundary(4), store_8),
    // A fetch that starts in the mapped page and runs into the hole (i8b's decode path).
    via("fetch_runs_into_hole", Via::Boundary(3), fetch_jmp),
    r("fetch_jmp", fetch_jmp),
    r("fetch_call", fetch_call),
    via("alias_4k_load", Via::Alias4k, load_8),
    via("alias_4k_store", Via::Alias4k, store_8),
    via("alias_2m_load", Via::Alias2m, load_8),
    via("alias_2m_store", Via::Alias2m, store_8),
    via("msr_kvm_wall_clock", Via::Msr(MSR_KVM_WALL_CLOCK, 0), wrmsr_gpa),
    via("msr_kvm_system_time", Via::Msr(MSR_KVM_SYSTEM_TIME, 1), wrmsr_gpa),
    via("msr_kvm_wall_clock_new", Via::Msr(MSR_KVM_WALL_CLOCK_NEW, 0), wrmsr_gpa),
    via("msr_kvm_system_time_new", Via::Msr(MSR_KVM_SYSTEM_TIME_NEW, 1), wrmsr_gpa),
    via("msr_kvm_async_pf_en", Via::Msr(MSR_KVM_ASYNC_PF_EN, 1), wrmsr_gpa),
    via("msr_kvm_steal_time", Via::Msr(MSR_KVM_STEAL_TIME, 1), wrmsr_gpa),
    via("msr_kvm_pv_eoi_en", Via::Msr(MSR_KVM_PV_EOI_EN, 1), wrmsr_gpa),
    via("ring3_load_8", Via::Ring3(ring3::veil_ring3_load8), ring3_body),
    via("ring3_store_8", Via::Ring3(ring3::veil_ring3_store8), ring3_body),
    via("ring3_paddd", Via::Ring3(ring3::veil_ring3_paddd), ring3_body),
    via("lar_gdt_in_hole", Via::GdtInHole, lar_gdt_in_hole),
    via("verr_gdt_in_hole", Via::GdtInHole, verr_gdt_in_hole),
    r("sgdt_into_hole", sgdt_into_hole),
    r("sidt_into_hole", sidt_into_hole),
    r("lgdt_from_hole", lgdt_from_hole),
    r("lidt_from_hole", lidt_from_hole),
    via("mov_ds_gdt_in_hole", Via::GdtInHole, mov_ds_gdt_in_hole),
    via("hc_log", Via::Hypercall(Hc::Log, 64), hc_aimed),
    via("hc_test_announce", Via::Hypercall(Hc::TestAnnounce, 8), hc_aimed),
    via("hc_query_violations", Via::Hypercall(Hc::QueryViolations, 4), hc_aimed),
    via("hc_stats", Via::Hypercall(Hc::Stats, 0), hc_aimed),
    via("hc_test_begin", Via::Hypercall(Hc::TestBegin, 8), hc_aimed),
    via("hc_test_end", Via::Hypercall(Hc::TestEnd, 8), hc_aimed),
    r("hc_host_count_oracle", hc_host_count_oracle),
];

/// The guest's alias window: three zeroed mapped pages (PDPT, PD, PT) hooked into PML4 slot
/// [`ALIAS_SLOT`]; PD[0] -> PT (4 KiB aliases), PD[1] a 2 MiB alias. Unhooked on drop.
struct AliasWindow {
    pml4: *mut u64,
    pd: *mut u64,
    pt: *mut u64,
}

impl AliasWindow {
    /// Builds the window in `pages` (3 order-0 pages).
    fn new(pages: &mut PageList) -> Result<AliasWindow, crate::outcome::Fail> {
        let mut table = || {
            pages
                .alloc(0, gfp::ZERO)
                .ctx("alloc page-table page")
                .map(|g| (g, dm::va(g) as *mut u64))
        };
        let (pdpt_gpa, pdpt) = table()?;
        let (pd_gpa, pd) = table()?;
        let (pt_gpa, pt) = table()?;
        let cr3: u64;
        // SAFETY: reading CR3 has no side effect.
        unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
        // The VMM's page tables sit in identity-mapped reserved memory: GPA == VA.
        let pml4 = (cr3 & !0xfff) as *mut u64;
        // SAFETY: the three pages are ours, zeroed and mapped (direct map); PML4 slot
        // ALIAS_SLOT is unused (see its doc); single vCPU, interrupts off.
        unsafe {
            ensure!(
                *pml4.add(ALIAS_SLOT as usize) == 0,
                "PML4 slot {ALIAS_SLOT} in use"
            );
            *pdpt = pd_gpa | PW;
            *pd = pt_gpa | PW;
            *pml4.add(ALIAS_SLOT as usize) = pdpt_gpa | PW;
        }
        Ok(AliasWindow { pml4, pd, pt })
    }

    /// Points the 4 KiB alias at `page`; returns its VA.
    fn map_4k(&self, page: u64) -> u64 {
        // SAFETY: PT entry 0 of our own table; invlpg drops any stale translation.
        unsafe {
            *self.pt = page | PW;
            asm!("invlpg [{}]", in(reg) ALIAS_BASE, options(nostack));
        }
        ALIAS_BASE
    }

    /// Maps `mapped` then `page` at two consecutive 4 KiB alias pages; returns the VA of the
    /// boundary between them.
    fn map_boundary(&self, mapped: u64, page: u64) -> u64 {
        // SAFETY: PT entries 0 and 1 of our own table; invlpg as above.
        unsafe {
            *self.pt = mapped | PW;
            *self.pt.add(1) = page | PW;
            asm!("invlpg [{}]", in(reg) ALIAS_BASE, options(nostack));
            asm!("invlpg [{}]", in(reg) ALIAS_BASE + PAGE_SIZE, options(nostack));
        }
        ALIAS_BASE + PAGE_SIZE
    }

    /// Points the 2 MiB alias at the pageblock holding `page`; returns the VA of `page` in it.
    fn map_2m(&self, page: u64) -> u64 {
        let block = page & !(PAGEBLOCK_SIZE - 1);
        let va = ALIAS_BASE + PAGEBLOCK_SIZE + (page - block);
        // SAFETY: PD entry 1 of our own table; invlpg as above.
        unsafe {
            *self.pd.add(1) = block | PW | PS;
            asm!("invlpg [{}]", in(reg) va, options(nostack));
        }
        va
    }
}

impl AliasWindow {
    /// Maps the image's and the low 2 MiB for ring 3; returns the user VA of `stub`.
    fn user_code(&self, stub: u64) -> Result<u64, crate::outcome::Fail> {
        let image = veil_abi::IMAGE_MIN_GPA;
        ensure!(
            (image..image + PAGEBLOCK_SIZE).contains(&stub),
            "ring-3 stub {stub:#x} outside the image's first 2 MiB"
        );
        // SAFETY: PD entries 3 and 4 of our own table (2 MiB user pages over the image and
        // over GPA 0); invlpg as in map_4k.
        unsafe {
            *self.pd.add(3) = image | PW | PS;
            *self.pd.add(4) = PW | PS;
            asm!("invlpg [{}]", in(reg) USER_IMAGE, options(nostack));
            asm!("invlpg [{}]", in(reg) USER_LOW, options(nostack));
        }
        Ok(USER_IMAGE + (stub - image))
    }

    /// Makes the page the page table of PD entry 2; returns the VA of that table's first page.
    fn table_in(&self, page: u64) -> u64 {
        let va = ALIAS_BASE + 2 * PAGEBLOCK_SIZE;
        // SAFETY: PD entry 2 of our own table; invlpg as in map_4k.
        unsafe {
            *self.pd.add(2) = page | PW;
            asm!("invlpg [{}]", in(reg) va, options(nostack));
        }
        va
    }
}

impl Drop for AliasWindow {
    fn drop(&mut self) {
        // SAFETY: unhooks our slot and flushes the whole TLB (CR3 reload; no global pages).
        unsafe {
            *self.pml4.add(ALIAS_SLOT as usize) = 0;
            asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack));
        }
    }
}

/// Runs every route not waiting on other work against its own planted page.
pub fn reachability() -> Outcome {
    let mut pages = PageList::new(5);
    let block = pages
        .alloc(9, gfp::UNMAPPED)
        .ctx("alloc order-9 UNMAPPED")?;
    ensure!(
        ROUTES.len() as u64 <= PAGEBLOCK_SIZE / PAGE_SIZE,
        "more routes than pages in a pageblock"
    );
    let window = AliasWindow::new(&mut pages)?;
    // The mapped page placed below the route's page for the boundary routes; its last 3 bytes
    // start a 10-byte `movabs rax, imm64` whose other 7 bytes lie in the hole.
    let below = pages.alloc(0, gfp::ZERO).ctx("alloc mapped page")?;
    ring3::init();
    let (mut ran, mut faulted) = (0, 0);
    for (i, route) in ROUTES.iter().enumerate() {
        if let Some(needs) = route.needs {
            hc::logf(format_args!("route {} not run: needs {needs}", route.name));
            continue;
        }
        let page = block + i as u64 * PAGE_SIZE;
        hc::plant_secret(page, PAGE_SIZE).ctx("PlantSecret")?;
        let gpa = page + OFFSET;
        let (va, aux) = match route.via {
            Via::Direct => (dm::va(gpa), 0),
            Via::Alias4k => (window.map_4k(page) + OFFSET, 0),
            Via::Alias2m => (window.map_2m(page) + OFFSET, 0),
            Via::TableInHole => (window.table_in(page) + OFFSET, 0),
            Via::Boundary(back) => {
                // SAFETY: `below` is ours and mapped; the direct map reaches it. Rewritten for
                // each route: the straddling store changes it.
                unsafe { *((dm::va(below) + PAGE_SIZE - 3) as *mut [u8; 3]) = [0x48, 0xb8, 0] };
                (window.map_boundary(below, page) - back, 0)
            }
            Via::Msr(index, flags) => (page | flags, u64::from(index)),
            Via::GdtInHole => (dm::va(page), 0),
            Via::Hypercall(hc, len) => (0, hc as u64 | len << 32),
            Via::Ring3(stub) => (
                window.map_4k(page) + OFFSET,
                window.user_code(stub as usize as u64)?,
            ),
        };
        let mut ctx = Ctx {
            va,
            gpa,
            aux,
            out: [0; 4],
        };
        let sink = addr_of_mut!(ctx.out) as u64;
        hc::route_begin(route.name, sink, core::mem::size_of_val(&ctx.out) as u64)
            .ctx("RouteBegin")?;
        let tables = Tables::save();
        if let Via::GdtInHole = route.via {
            tables.move_gdt(dm::va(page));
        }
        // SAFETY: the bodies own nothing and touch only the target and `ctx`.
        let ended = unsafe { protected(route.body, &mut ctx) };
        tables.restore();
        hc::route_end().ctx("RouteEnd")?;
        if let Via::Ring3(_) = route.via {
            ring3::restore_kernel_segments();
        }
        if ended != Ended::Returned {
            faulted += 1;
            hc::logf(format_args!("route {}: {ended:?}", route.name));
        }
        ran += 1;
    }
    drop(window);
    hc::logf(format_args!(
        "reachability: {ran} routes run, {faulted} ended by an exception or a recovery"
    ));
    pages.free_all().ctx("free")?;
    Ok(())
}
