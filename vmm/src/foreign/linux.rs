//! Linux kernels through `linux-loader`: bzImage and ELF vmlinux loading, the command line and
//! `boot_params` (the zero page, with an e820 map from Veil's layout), entered by the 64-bit
//! boot protocol: long mode, identity-mapped low 4 GiB, `rsi` = the zero page.

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use thiserror::Error;
use vm_memory::GuestAddress;

use crate::foreign::multiboot::MapEntry;
use crate::foreign::KernelKind;
use crate::memory::GuestRam;

/// The GDT (null, 64-bit code, data).
pub const GDT_GPA: u64 = 0x500;
/// The zero page (`boot_params`).
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// The top-level page table; the PDPT and four page directories follow.
pub const PML4_GPA: u64 = 0x9000;
/// The command line.
pub const CMDLINE_GPA: u64 = 0x20000;
/// Its largest size.
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel may load (high memory).
pub const HIMEM_START: u64 = 0x100000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX: usize = 128;

/// Why a Linux kernel cannot be booted.
#[derive(Debug, Error)]
pub enum LinuxError {
    /// linux-loader refused the image.
    #[error("cannot load the kernel: {0}")]
    Load(linux_loader::loader::Error),
    /// The command line.
    #[error("bad command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the zero page.
    #[error("cannot write boot_params: {0}")]
    BootParams(String),
    /// The initrd does not fit.
    #[error("the initrd ({size} bytes) does not fit below {limit:#x} above the kernel (try a larger --mem)")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// Too many memory-map entries.
    #[error("the memory map has more than {E820_MAX} entries (too many --secret ranges)")]
    E820Full,
    /// A guest memory write failed.
    #[error("cannot write guest memory at {0:#x}")]
    Write(u64),
}

/// A loaded kernel, ready to enter.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The 64-bit entry point.
    pub entry: u64,
    /// `[start, end)` of the kernel image.
    pub kernel: (u64, u64),
    /// `[start, end)` of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Whether the ELF has a PVH entry note (the 64-bit protocol is used regardless).
    pub pvh_note: bool,
}

/// Loads `kernel` (`kind`: bzImage or vmlinux) with `cmdline` and `initrd` into `ram`, whose
/// memory map is `map`; writes the zero page, GDT and page tables.
pub fn load(
    ram: &GuestRam,
    kind: KernelKind,
    kernel: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
    map: &[MapEntry],
) -> Result<Loaded, LinuxError> {
    let mem = ram.mem();
    let mut image = Cursor::new(kernel);
    let res: KernelLoaderResult = match kind {
        KernelKind::Bzimage => {
            BzImage::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START)))
        }
        _ => Elf::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START))),
    }
    .map_err(LinuxError::Load)?;
    let kernel_start = res.kernel_load.0;
    // linux-loader's kernel_end is the GPA after the image.
    let kernel_end = res.kernel_end.max(kernel_start);
    let entry = match kind {
        // startup_64 is 0x200 past the protected-mode code's start.
        KernelKind::Bzimage => kernel_start + 0x200,
        _ => kernel_start,
    };

    let mut line = Cmdline::new(CMDLINE_MAX).map_err(LinuxError::Cmdline)?;
    if !cmdline.is_empty() {
        line.insert_str(cmdline).map_err(LinuxError::Cmdline)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_GPA), &line).map_err(LinuxError::Load)?;
    let cmd_len = line.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);

    let mut params = boot_params::default();
    match res.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    params.hdr.cmdline_size = cmd_len as u32 + 1;

    let mut initrd_at = None;
    if let Some(rd) = initrd {
        let max = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => u64::from(m),
        };
        let limit = usable_top(map, kernel_end).min(max + 1);
        let size = rd.len() as u64;
        let start = limit
            .checked_sub(size)
            .map(|s| s & !0xfff)
            .filter(|s| *s >= kernel_end.next_multiple_of(4096))
            .ok_or(LinuxError::InitrdTooLarge { size, limit })?;
        ram.write(start, rd).map_err(|_| LinuxError::Write(start))?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
        initrd_at = Some((start, start + size));
    }

    if map.len() > E820_MAX {
        return Err(LinuxError::E820Full);
    }
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.start,
            size: e.end - e.start,
            r#type: if e.usable { E820_RAM } else { E820_RESERVED },
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_GPA)),
        mem,
    )
    .map_err(|e| LinuxError::BootParams(e.to_string()))?;
    write_gdt_and_page_tables(ram)?;
    Ok(Loaded {
        entry,
        kernel: (kernel_start, kernel_end),
        initrd: initrd_at,
        pvh_note: matches!(res.pvh_boot_cap, PvhBootCapability::PvhEntryPresent(_)),
    })
}

/// The end of the usable RAM run the kernel ends in (the initrd goes at its top).
fn usable_top(map: &[MapEntry], kernel_end: u64) -> u64 {
    map.iter()
        .filter(|e| e.usable && e.start <= kernel_end && kernel_end <= e.end)
        .map(|e| e.end)
        .next()
        .unwrap_or(kernel_end)
        .min(1 << 32)
}

/// GDT entries: null, 64-bit code (0x08), data (0x10).
const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

fn write_gdt_and_page_tables(ram: &GuestRam) -> Result<(), LinuxError> {
    let w = |gpa: u64, b: &[u8]| ram.write(gpa, b).map_err(|_| LinuxError::Write(gpa));
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    w(GDT_GPA, &gdt)?;
    let pdpt = PML4_GPA + 0x1000;
    let pd = PML4_GPA + 0x2000;
    w(PML4_GPA, &(pdpt | 0x3).to_le_bytes())?;
    let mut pdpt_entries = Vec::new();
    for i in 0..4u64 {
        pdpt_entries.extend_from_slice(&((pd + i * 0x1000) | 0x3).to_le_bytes());
    }
    w(pdpt, &pdpt_entries)?;
    let mut pds = Vec::with_capacity(4 * 4096);
    for i in 0..2048u64 {
        pds.extend_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    w(pd, &pds)
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// vCPU 0's special registers for the 64-bit boot protocol.
pub fn entry_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.gdt.base = GDT_GPA;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.cs = seg(0x08, 0xb, 1, 0);
    let data = seg(0x10, 0x3, 0, 1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.cr3 = PML4_GPA;
    s.cr4 = 1 << 5; // PAE
    s.cr0 = 0x8000_0031; // PG | NE | ET | PE
    s.efer = 0x500; // LME | LMA
    s
}

/// vCPU 0's registers: `rip` = entry, `rsi` = the zero page.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE_GPA,
        rflags: 0x2,
        rsp: 0x8ff0,
        ..Default::default()
    }
}
