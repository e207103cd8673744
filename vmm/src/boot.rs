//! Direct 64-bit boot: the GDT, the VMM-built page tables, the vCPU registers and the
//! [`BootInfo`] block, all laid out as `veil_abi` says.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use veil_abi::{
    BootInfo, BootMode, ABI_VERSION, BOOT_INFO_GPA, BOOT_MAGIC, CODE_SELECTOR, DATA_SELECTOR,
    DIRECT_MAP_BASE, GDT_GPA, IMAGE_MIN_GPA, PAGE_SIZE, PAGE_TABLES_GPA, SELECTION_MAX,
    STACK_TOP_GPA,
};
use vm_memory::ByteValued;

use crate::memory::GuestRam;

/// CR0 bits: protected mode, monitor coprocessor, extension type, native FPU errors,
/// write protect, paging.
pub const CR0_BOOT: u64 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
/// CR4 bits: PAE, OSFXSR, OSXMMEXCPT (SSE usable by guests that want it).
pub const CR4_BOOT: u64 = 0x20 | 0x200 | 0x400;
/// EFER bits: long mode enable and active.
pub const EFER_BOOT: u64 = 0x100 | 0x400;
/// Selector of the TSS descriptor in the boot GDT (for a valid TR).
pub const TSS_SELECTOR: u16 = 0x18;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 2;
const PTE_USER: u64 = 4;
const PTE_HUGE: u64 = 0x80;
const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

/// Errors while writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The page tables do not fit below the guest image.
    #[error("boot page tables need {0} pages, more than fit below the guest image")]
    PageTablesTooLarge(u64),
    /// The selection string is longer than the boot block holds.
    #[error("test selection is {0} bytes, at most {SELECTION_MAX} fit in the boot block")]
    SelectionTooLong(usize),
    /// Guest memory could not be written.
    #[error("cannot write boot structures into guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A [`BootInfo`] as vm-memory plain bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct BootInfoBytes(pub BootInfo);
// SAFETY: BootInfo is repr(C), Copy, made only of integers and a byte array, with no padding
// (16 + 8 + 64 + 8 + 1024 bytes, all fields naturally aligned), so every byte pattern is valid.
unsafe impl ByteValued for BootInfoBytes {}

/// Entry `i` of a flat GDT: base 0, limit 0xfffff (4 KiB granular), `flags` = access byte in
/// bits 0..8 and the G/DB/L flags in bits 12..16 (Firecracker's `gdt_entry` layout).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18, 16 bytes).
pub fn gdt() -> [u64; 5] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: P, DPL0, S, exec/read, accessed; G, L
        gdt_entry(0xc093, 0, 0xfffff), // data: P, DPL0, S, read/write, accessed; G, DB
        gdt_entry(0x008b, 0, 0x67),    // TSS: P, busy 64-bit TSS
        0,
    ]
}

fn segment(selector: u16, type_: u8, s: u8, l: u8, db: u8, g: u8, limit: u32) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Layout of the VMM-built page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTableLayout {
    /// GPA of the PML4 (CR3).
    pub pml4: u64,
    /// Pages used from [`PAGE_TABLES_GPA`].
    pub pages: u64,
}

/// Writes the page tables: an identity map of `[0, identity_size)` and the direct map of
/// `[0, direct_map_size)` at [`DIRECT_MAP_BASE`], 2 MiB pages, writable, executable.
pub fn write_page_tables(
    ram: &GuestRam,
    identity_size: u64,
    direct_map_size: u64,
) -> Result<PageTableLayout, BootError> {
    let id_pds = identity_size.div_ceil(GIB).max(1);
    let dm_pds = direct_map_size.div_ceil(GIB).max(1);
    let pages = 1 + 1 + id_pds + 1 + dm_pds;
    if dm_pds > 512 || PAGE_TABLES_GPA + pages * PAGE_SIZE > IMAGE_MIN_GPA {
        return Err(BootError::PageTablesTooLarge(pages));
    }
    let pml4 = PAGE_TABLES_GPA;
    let id_pdpt = pml4 + PAGE_SIZE;
    let id_pd0 = id_pdpt + PAGE_SIZE;
    let dm_pdpt = id_pd0 + id_pds * PAGE_SIZE;
    let dm_pd0 = dm_pdpt + PAGE_SIZE;
    let table = PTE_PRESENT | PTE_WRITE | PTE_USER;
    let zero = vec![0u8; (pages * PAGE_SIZE) as usize];
    ram.write(pml4, &zero)?;

    let dm_pml4_index = (DIRECT_MAP_BASE >> 39) & 511;
    write_u64(ram, pml4, id_pdpt | table)?;
    write_u64(ram, pml4 + dm_pml4_index * 8, dm_pdpt | table)?;
    map_2m(ram, id_pdpt, id_pd0, identity_size)?;
    map_2m(ram, dm_pdpt, dm_pd0, direct_map_size)?;
    Ok(PageTableLayout { pml4, pages })
}

/// Fills a PDPT at `pdpt` and consecutive PDs from `pd0` mapping `[0, size)` with 2 MiB pages.
fn map_2m(ram: &GuestRam, pdpt: u64, pd0: u64, size: u64) -> Result<(), BootError> {
    let table = PTE_PRESENT | PTE_WRITE | PTE_USER;
    let n_pds = size.div_ceil(GIB).max(1);
    for i in 0..n_pds {
        write_u64(ram, pdpt + i * 8, (pd0 + i * PAGE_SIZE) | table)?;
    }
    let n_2m = size.div_ceil(MIB2);
    let mut entries = vec![0u8; (n_pds * PAGE_SIZE) as usize];
    for j in 0..n_2m {
        let e = (j * MIB2) | table | PTE_HUGE;
        let off = (j * 8) as usize;
        entries[off..off + 8].copy_from_slice(&e.to_le_bytes());
    }
    ram.write(pd0, &entries)?;
    Ok(())
}

fn write_u64(ram: &GuestRam, gpa: u64, v: u64) -> Result<(), BootError> {
    ram.write(gpa, &v.to_le_bytes())?;
    Ok(())
}

/// Writes the boot GDT at [`GDT_GPA`].
pub fn write_gdt(ram: &GuestRam) -> Result<(), BootError> {
    let bytes: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(GDT_GPA, &bytes)?;
    Ok(())
}

/// Special registers for long mode with paging rooted at `cr3` (based on `base`, KVM's current
/// values, so fields we do not care about keep their reset state).
pub fn long_mode_sregs(mut base: kvm_sregs, cr3: u64) -> kvm_sregs {
    let code = segment(CODE_SELECTOR, 0xb, 1, 1, 0, 1, 0xffff_ffff);
    let data = segment(DATA_SELECTOR, 0x3, 1, 0, 1, 1, 0xffff_ffff);
    let tss = segment(TSS_SELECTOR, 0xb, 0, 0, 0, 0, 0x67);
    base.cs = code;
    base.ds = data;
    base.es = data;
    base.fs = data;
    base.gs = data;
    base.ss = data;
    base.tr = tss;
    base.gdt.base = GDT_GPA;
    base.gdt.limit = (gdt().len() * 8 - 1) as u16;
    base.idt.base = 0;
    base.idt.limit = 0;
    base.cr0 = CR0_BOOT;
    base.cr3 = cr3;
    base.cr4 = CR4_BOOT;
    base.efer = EFER_BOOT;
    base
}

/// General registers at entry of vCPU `vcpu`: `rip = entry`, `rsp = stack_top`, `rdi` = the
/// boot info, `rsi` = its index.
pub fn entry_regs(entry: u64, stack_top: u64, vcpu: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top,
        rbp: 0,
        rdi: BOOT_INFO_GPA,
        rsi: u64::from(vcpu),
        rflags: 2,
        ..Default::default()
    }
}

/// FPU state at entry: default control word and MXCSR.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// What goes into the [`BootInfo`] block.
#[derive(Clone, Debug)]
pub struct BootParams {
    /// Run the tests or only list them.
    pub mode: BootMode,
    /// Comma-separated test selection ("" = all).
    pub selection: String,
    /// Bytes of RAM.
    pub ram_size: u64,
    /// End of the reserved low memory.
    pub reserved_end: u64,
    /// vCPUs the VM runs.
    pub vcpus: u32,
    /// Bytes the direct map covers from GPA 0 (at least `ram_size`; RAM plus the mermap
    /// windows above it).
    pub direct_map_size: u64,
}

/// Builds the boot block for vCPU 0.
pub fn boot_info(p: &BootParams) -> Result<BootInfo, BootError> {
    let sel = p.selection.as_bytes();
    if sel.len() > SELECTION_MAX {
        return Err(BootError::SelectionTooLong(sel.len()));
    }
    let mut selection = [0u8; SELECTION_MAX];
    selection[..sel.len()].copy_from_slice(sel);
    Ok(BootInfo {
        magic: BOOT_MAGIC,
        abi_version: ABI_VERSION,
        mode: p.mode as u32,
        vcpu: 0,
        ram_size: p.ram_size,
        reserved_end: p.reserved_end,
        managed_start: p.reserved_end,
        managed_end: p.ram_size,
        direct_map_base: DIRECT_MAP_BASE,
        direct_map_size: p.direct_map_size.max(p.ram_size),
        mailbox_gpa: veil_abi::MAILBOX_GPA,
        stack_top: STACK_TOP_GPA,
        selection_len: sel.len() as u32,
        vcpus: p.vcpus,
        selection,
    })
}

/// Writes the GDT, the page tables and the boot block; returns CR3.
pub fn write_boot_structures(ram: &GuestRam, p: &BootParams) -> Result<u64, BootError> {
    write_gdt(ram)?;
    let pt = write_page_tables(ram, p.reserved_end, p.direct_map_size.max(p.ram_size))?;
    let info = boot_info(p)?;
    ram.write(BOOT_INFO_GPA, BootInfoBytes(info).as_slice())?;
    Ok(pt.pml4)
}

/// `cpuid` as vCPU `vcpu` sees it: the host's supported leaves with its initial APIC id
/// (leaf 1 EBX bits 31..24) and x2APIC id (leaves 0xB and 0x1F, EDX) set to `vcpu`.
pub fn vcpu_cpuid(supported: &kvm_bindings::CpuId, vcpu: u32) -> kvm_bindings::CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((vcpu & 0xff) << 24),
            0xb | 0x1f => e.edx = vcpu,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_view::{tests::OneHole, GuestView};
    use crate::memory::MemSize;
    use crate::page_walk::walk;

    /// The walker over `ram` with every page reachable.
    fn walk_page_tables(ram: &GuestRam, cr3: u64, gva: u64) -> Option<u64> {
        let all = OneHole {
            size: ram.size(),
            hole: !0xfff,
        };
        walk(&GuestView::new(ram, &all), cr3, gva).ok()
    }

    #[test]
    fn gdt_matches_firecracker_encoding() {
        let g = gdt();
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn page_tables_map_identity_and_direct_map() {
        let ram = GuestRam::new(MemSize(1 << 30 | 64 << 20)).unwrap();
        let size = ram.size();
        let pt = write_page_tables(&ram, 4 << 20, size).unwrap();
        assert_eq!(walk_page_tables(&ram, pt.pml4, 0x20_1234), Some(0x20_1234));
        assert_eq!(walk_page_tables(&ram, pt.pml4, 5 << 20), None);
        assert_eq!(
            walk_page_tables(&ram, pt.pml4, DIRECT_MAP_BASE + 0x4000_1234),
            Some(0x4000_1234)
        );
        assert_eq!(
            walk_page_tables(&ram, pt.pml4, DIRECT_MAP_BASE + size - 1),
            Some(size - 1)
        );
        assert_eq!(
            walk_page_tables(&ram, pt.pml4, DIRECT_MAP_BASE + size),
            None
        );
    }

    #[test]
    fn page_tables_fit_for_64g() {
        let ram = GuestRam::new(MemSize(64 << 30)).unwrap();
        let pt = write_page_tables(&ram, 4 << 20, 64 << 30).unwrap();
        assert!(PAGE_TABLES_GPA + pt.pages * PAGE_SIZE <= IMAGE_MIN_GPA);
        assert_eq!(
            walk_page_tables(&ram, pt.pml4, DIRECT_MAP_BASE + (63 << 30)),
            Some(63 << 30)
        );
    }

    #[test]
    fn boot_info_rejects_long_selection() {
        let p = BootParams {
            vcpus: 1,
            mode: BootMode::Run,
            selection: "a".repeat(SELECTION_MAX + 1),
            ram_size: 256 << 20,
            reserved_end: 4 << 20,
            direct_map_size: 0,
        };
        assert!(matches!(boot_info(&p), Err(BootError::SelectionTooLong(_))));
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_ids() {
        let mut entries = [kvm_bindings::kvm_cpuid_entry2::default(); 3];
        entries[0].function = 1;
        entries[0].ebx = 0x0012_3456 | (7 << 24);
        entries[1].function = 0xb;
        entries[2].function = 0x1f;
        let supported = kvm_bindings::CpuId::from_entries(&entries).unwrap();
        let c = vcpu_cpuid(&supported, 3);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0312_3456, "leaf 1: APIC id 3, the rest kept");
        assert_eq!((e[1].edx, e[2].edx), (3, 3), "x2APIC ids");
        assert_eq!(
            supported.as_slice()[0].ebx >> 24,
            7,
            "the host's list is not changed"
        );
    }
}
