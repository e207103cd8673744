//! Multiboot v1 kernels (kvm-unit-tests' `.flat` ELF32 and `.elf` ELF64 images, GRUB-style
//! kernels): the header in the first 8 KiB, loading by the header's address fields or the ELF
//! program headers (parsed by `goblin`), and the multiboot information block.

use goblin::elf::program_header::PT_LOAD;
use goblin::elf::Elf;
use thiserror::Error;

use crate::memory::GuestRam;

/// The header's magic value.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What the boot loader leaves in `EAX`.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Where the header must start: in the first 8 KiB of the file, 4-byte aligned.
pub const SEARCH_LEN: usize = 8192;

/// Header flag: align modules on 4 KiB pages.
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: pass memory information.
const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: pass video mode information (a text console here: honoured by ignoring it).
const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the address fields are valid (load without reading the ELF headers).
const FLAG_ADDRESS: u32 = 1 << 16;

/// Info block flags set by Veil: mem_lower/upper, cmdline, mods, memory map.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

/// Where the information block and what it points to are written (below the 640 KiB hole).
pub const INFO_GPA: u64 = 0x9000;
const MMAP_GPA: u64 = INFO_GPA + 0x100;
const MODS_GPA: u64 = INFO_GPA + 0x800;
const STRINGS_GPA: u64 = INFO_GPA + 0x1000;
const STRINGS_END: u64 = 0x20000;
/// The lowest GPA a kernel segment may be loaded at (below it: the info block and BIOS area).
pub const LOAD_MIN: u64 = 0x100000;
/// Conventional memory reported as `mem_lower` (KiB).
const MEM_LOWER_KIB: u32 = 640;
/// Largest command line (with the kernel's name).
pub const MAX_CMDLINE: usize = 4096;

/// Why a multiboot kernel cannot be loaded.
#[derive(Debug, Error)]
pub enum MultibootError {
    /// No header.
    #[error("no multiboot v1 header (magic 0x1badb002 with a valid checksum, 4-byte aligned) in the first 8 KiB")]
    NoHeader,
    /// The header asks for something Veil does not provide.
    #[error("the multiboot header requires features Veil does not provide (flags {flags:#x}: bits 3-15 beyond page alignment, memory info and video mode)")]
    UnsupportedFlags {
        /// The flags.
        flags: u32,
    },
    /// The header's address fields are inconsistent.
    #[error("the multiboot header's address fields are inconsistent: {0}")]
    BadAddresses(String),
    /// The file is not an ELF the loader can use and has no address fields.
    #[error("not a loadable ELF (and the multiboot header has no address fields): {0}")]
    BadElf(String),
    /// A segment or the image does not fit.
    #[error("{what} [{start:#x}, {end:#x}) does not fit guest RAM above {LOAD_MIN:#x} and below 4 GiB / the {ram_size:#x}-byte RAM (try a larger --mem)")]
    OutOfRam {
        /// What.
        what: String,
        /// Start GPA.
        start: u64,
        /// End GPA.
        end: u64,
        /// RAM size.
        ram_size: u64,
    },
    /// Two segments overlap.
    #[error("ELF segments overlap at {0:#x}")]
    Overlap(u64),
    /// Entry point outside the loaded image or above 4 GiB.
    #[error("entry point {0:#x} is not inside a loaded segment below 4 GiB")]
    BadEntry(u64),
    /// The command line is too long or contains a NUL.
    #[error("command line is {len} bytes or contains a NUL byte: at most {MAX_CMDLINE} bytes with the kernel's name, no NUL")]
    BadCmdline {
        /// Its length.
        len: usize,
    },
    /// Too much string data (command lines and module names).
    #[error("command line and module names take more than {0} bytes")]
    StringsTooLong(u64),
    /// A guest memory write failed.
    #[error("cannot write guest memory at {0:#x}")]
    Write(u64),
}

/// A parsed multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Offset in the file.
    pub offset: usize,
    /// Flags.
    pub flags: u32,
    /// The address fields, when flag 16 is set.
    pub addresses: Option<Addresses>,
}

/// The header's address fields (flag 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    /// Physical address the header itself is loaded at.
    pub header_addr: u32,
    /// Start of the text segment.
    pub load_addr: u32,
    /// End of the data to load (0: to the end of the file).
    pub load_end_addr: u32,
    /// End of the bss (0: no bss).
    pub bss_end_addr: u32,
    /// Entry point.
    pub entry_addr: u32,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Finds the multiboot header in the first 8 KiB of `image` (`None`: not a multiboot kernel).
pub fn find_header(image: &[u8]) -> Option<Header> {
    let limit = image.len().min(SEARCH_LEN);
    let mut off = 0;
    while off + 12 <= limit {
        if u32_at(image, off) == Some(HEADER_MAGIC) {
            let flags = u32_at(image, off + 4)?;
            let sum = u32_at(image, off + 8)?;
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) == 0 {
                let addresses = if flags & FLAG_ADDRESS != 0 {
                    Some(Addresses {
                        header_addr: u32_at(image, off + 12)?,
                        load_addr: u32_at(image, off + 16)?,
                        load_end_addr: u32_at(image, off + 20)?,
                        bss_end_addr: u32_at(image, off + 24)?,
                        entry_addr: u32_at(image, off + 28)?,
                    })
                } else {
                    None
                };
                return Some(Header {
                    offset: off,
                    flags,
                    addresses,
                });
            }
        }
        off += 4;
    }
    None
}

/// One piece of the kernel to put in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub gpa: u64,
    /// File range copied there.
    pub file: std::ops::Range<usize>,
    /// Bytes in memory (the rest after the file bytes is zero).
    pub mem_len: u64,
}

/// A kernel laid out: its segments and its 32-bit entry point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Segments, sorted by address, non-overlapping.
    pub segments: Vec<Segment>,
    /// Entry point (a physical address, entered with paging off).
    pub entry: u32,
}

impl Layout {
    /// The first byte after the highest segment.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.gpa + s.mem_len)
            .max()
            .unwrap_or(LOAD_MIN)
    }
}

/// Lays out a multiboot kernel in `ram_size` bytes of RAM.
pub fn layout(image: &[u8], header: &Header, ram_size: u64) -> Result<Layout, MultibootError> {
    let unknown = header.flags & 0xffff & !(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE);
    if unknown != 0 {
        return Err(MultibootError::UnsupportedFlags {
            flags: header.flags,
        });
    }
    let limit = ram_size.min(1 << 32);
    let lay = match header.addresses {
        Some(a) => by_addresses(image, header.offset, &a)?,
        None => by_elf(image)?,
    };
    let mut prev_end = 0u64;
    for s in &lay.segments {
        let end = s.gpa.saturating_add(s.mem_len);
        if s.gpa < LOAD_MIN || end > limit {
            return Err(MultibootError::OutOfRam {
                what: "kernel segment".into(),
                start: s.gpa,
                end,
                ram_size,
            });
        }
        if s.gpa < prev_end {
            return Err(MultibootError::Overlap(s.gpa));
        }
        prev_end = end;
    }
    let e = u64::from(lay.entry);
    if !lay
        .segments
        .iter()
        .any(|s| e >= s.gpa && e < s.gpa + s.mem_len)
    {
        return Err(MultibootError::BadEntry(e));
    }
    Ok(lay)
}

fn by_addresses(image: &[u8], offset: usize, a: &Addresses) -> Result<Layout, MultibootError> {
    let bad = |m: &str| MultibootError::BadAddresses(m.to_string());
    if a.load_addr > a.header_addr {
        return Err(bad("load_addr is above header_addr"));
    }
    let skip = (a.header_addr - a.load_addr) as usize;
    let start = offset
        .checked_sub(skip)
        .ok_or_else(|| bad("header_addr - load_addr is more than the header's file offset"))?;
    let load_end = if a.load_end_addr == 0 {
        u64::from(a.load_addr) + (image.len() - start) as u64
    } else {
        u64::from(a.load_end_addr)
    };
    if load_end < u64::from(a.load_addr) {
        return Err(bad("load_end_addr is below load_addr"));
    }
    let file_len = (load_end - u64::from(a.load_addr)) as usize;
    if start + file_len > image.len() {
        return Err(bad("load_end_addr is past the end of the file"));
    }
    let mem_end = if a.bss_end_addr == 0 {
        load_end
    } else if u64::from(a.bss_end_addr) < load_end {
        return Err(bad("bss_end_addr is below load_end_addr"));
    } else {
        u64::from(a.bss_end_addr)
    };
    Ok(Layout {
        segments: vec![Segment {
            gpa: u64::from(a.load_addr),
            file: start..start + file_len,
            mem_len: mem_end - u64::from(a.load_addr),
        }],
        entry: a.entry_addr,
    })
}

fn by_elf(image: &[u8]) -> Result<Layout, MultibootError> {
    let elf = Elf::parse(image).map_err(|e| MultibootError::BadElf(e.to_string()))?;
    use goblin::elf::header::{EM_386, EM_X86_64};
    if elf.header.e_machine != EM_386 && elf.header.e_machine != EM_X86_64 {
        return Err(MultibootError::BadElf(format!(
            "machine {} is neither i386 nor x86-64",
            elf.header.e_machine
        )));
    }
    if !elf.little_endian {
        return Err(MultibootError::BadElf("big-endian".into()));
    }
    let mut segments = Vec::new();
    for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        if ph.p_memsz == 0 {
            continue;
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(MultibootError::BadElf(format!(
                "segment at {:#x} has p_filesz {:#x} > p_memsz {:#x}",
                ph.p_paddr, ph.p_filesz, ph.p_memsz
            )));
        }
        let off = usize::try_from(ph.p_offset).ok();
        let len = usize::try_from(ph.p_filesz).ok();
        let file = match (off, len) {
            (Some(o), Some(l)) if o.checked_add(l).is_some_and(|e| e <= image.len()) => o..o + l,
            _ => {
                return Err(MultibootError::BadElf(format!(
                    "segment at {:#x} reads past the end of the file",
                    ph.p_paddr
                )))
            }
        };
        segments.push(Segment {
            gpa: ph.p_paddr,
            file,
            mem_len: ph.p_memsz,
        });
    }
    if segments.is_empty() {
        return Err(MultibootError::BadElf("no PT_LOAD segment".into()));
    }
    segments.sort_by_key(|s| s.gpa);
    let entry = u32::try_from(elf.header.e_entry)
        .map_err(|_| MultibootError::BadEntry(elf.header.e_entry))?;
    Ok(Layout { segments, entry })
}

/// Copies the kernel's segments into RAM (bss zeroed: fresh RAM reads zero already, but a
/// segment may share a page with another's file bytes).
pub fn load(ram: &GuestRam, image: &[u8], lay: &Layout) -> Result<(), MultibootError> {
    for s in &lay.segments {
        ram.write(s.gpa, &image[s.file.clone()])
            .map_err(|_| MultibootError::Write(s.gpa))?;
        let filled = s.file.len() as u64;
        if s.mem_len > filled {
            ram.zero(s.gpa + filled, s.mem_len - filled)
                .map_err(|_| MultibootError::Write(s.gpa + filled))?;
        }
    }
    Ok(())
}

/// A module to hand the kernel.
#[derive(Clone, Debug)]
pub struct Module {
    /// Its command line (GRUB's: the file name).
    pub cmdline: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// One entry of the memory map: `[start, end)`, usable RAM (`type 1`) or reserved (`2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First byte.
    pub start: u64,
    /// First byte after.
    pub end: u64,
    /// RAM (true) or reserved.
    pub usable: bool,
}

/// Writes the information block at [`INFO_GPA`] (with its command line, modules placed after
/// `kernel_end`, and the memory map `map`) and returns its address (for `EBX`).
pub fn write_info(
    ram: &GuestRam,
    cmdline: &str,
    modules: &[Module],
    kernel_end: u64,
    map: &[MapEntry],
) -> Result<u32, MultibootError> {
    if cmdline.len() >= MAX_CMDLINE || cmdline.contains('\0') {
        return Err(MultibootError::BadCmdline { len: cmdline.len() });
    }
    let w = |gpa: u64, b: &[u8]| ram.write(gpa, b).map_err(|_| MultibootError::Write(gpa));
    let mut strings = STRINGS_GPA;
    let mut put_string = |s: &str| -> Result<u32, MultibootError> {
        let at = strings;
        let end = at + s.len() as u64 + 1;
        if end > STRINGS_END {
            return Err(MultibootError::StringsTooLong(STRINGS_END - STRINGS_GPA));
        }
        w(at, s.as_bytes())?;
        w(at + s.len() as u64, &[0])?;
        strings = end;
        Ok(at as u32)
    };
    let cmd_at = put_string(cmdline)?;
    let ram_size = ram.size();
    let limit = ram_size.min(1 << 32);
    let mut next = kernel_end.next_multiple_of(4096);
    let mut mods = Vec::new();
    if modules.len() > 64 {
        return Err(MultibootError::StringsTooLong(64));
    }
    for m in modules {
        if m.cmdline.contains('\0') {
            return Err(MultibootError::BadCmdline {
                len: m.cmdline.len(),
            });
        }
        let start = next;
        let end = start + m.bytes.len() as u64;
        if end > limit {
            return Err(MultibootError::OutOfRam {
                what: format!("module {}", m.cmdline),
                start,
                end,
                ram_size,
            });
        }
        w(start, &m.bytes)?;
        let name = put_string(&m.cmdline)?;
        mods.extend_from_slice(&(start as u32).to_le_bytes());
        mods.extend_from_slice(&(end as u32).to_le_bytes());
        mods.extend_from_slice(&name.to_le_bytes());
        mods.extend_from_slice(&0u32.to_le_bytes());
        next = end.next_multiple_of(4096);
    }
    w(MODS_GPA, &mods)?;
    let mut mmap = Vec::new();
    for e in map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.start.to_le_bytes());
        mmap.extend_from_slice(&(e.end - e.start).to_le_bytes());
        mmap.extend_from_slice(&(if e.usable { 1u32 } else { 2 }).to_le_bytes());
    }
    if mmap.len() as u64 > MODS_GPA - MMAP_GPA {
        return Err(MultibootError::StringsTooLong(MODS_GPA - MMAP_GPA));
    }
    w(MMAP_GPA, &mmap)?;
    let loader = put_string("veil")?;
    // mem_upper: KiB of contiguous usable RAM from 1 MiB (to the first reserved range).
    let upper_end = map
        .iter()
        .filter(|e| !e.usable && e.end > LOAD_MIN)
        .map(|e| e.start.max(LOAD_MIN))
        .min()
        .unwrap_or(limit)
        .min(limit);
    let mem_upper = ((upper_end - LOAD_MIN) / 1024) as u32;
    let mut info = [0u32; 22];
    info[0] = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME;
    info[1] = MEM_LOWER_KIB;
    info[2] = mem_upper;
    info[4] = cmd_at;
    info[5] = modules.len() as u32;
    info[6] = MODS_GPA as u32;
    info[11] = mmap.len() as u32;
    info[12] = MMAP_GPA as u32;
    info[16] = loader;
    let bytes: Vec<u8> = info.iter().flat_map(|v| v.to_le_bytes()).collect();
    w(INFO_GPA, &bytes)?;
    Ok(INFO_GPA as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[8..12].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        v[12..16].copy_from_slice(&flags.to_le_bytes());
        let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
        v[16..20].copy_from_slice(&sum.to_le_bytes());
        v
    }

    #[test]
    fn header_found_only_with_checksum_and_alignment() {
        let h = header(3);
        assert_eq!(find_header(&h).unwrap().offset, 8);
        let mut bad = h.clone();
        bad[16] ^= 1;
        assert_eq!(find_header(&bad), None);
        let mut off = vec![0u8; 2];
        off.extend_from_slice(&h);
        assert_eq!(find_header(&off), None, "not 4-byte aligned");
        let mut far = vec![0u8; SEARCH_LEN];
        far.extend_from_slice(&h);
        assert_eq!(find_header(&far), None, "past 8 KiB");
    }

    #[test]
    fn address_fields_lay_out_one_segment() {
        let mut img = header(FLAG_ADDRESS);
        // header at file offset 8, loaded at 0x100008: load_addr 0x100000 = file offset 0.
        let fields = [0x100008u32, 0x100000, 0x100040, 0x101000, 0x100020];
        for (i, f) in fields.iter().enumerate() {
            img[20 + 4 * i..24 + 4 * i].copy_from_slice(&f.to_le_bytes());
        }
        let h = find_header(&img).unwrap();
        let lay = layout(&img, &h, 64 << 20).unwrap();
        assert_eq!(lay.entry, 0x100020);
        assert_eq!(lay.segments[0].file, 0..0x40);
        assert_eq!(lay.segments[0].mem_len, 0x1000);
        // load_end past the file
        img[28..32].copy_from_slice(&0x200000u32.to_le_bytes());
        assert!(matches!(
            layout(&img, &find_header(&img).unwrap(), 64 << 20),
            Err(MultibootError::BadAddresses(_))
        ));
    }

    #[test]
    fn unknown_required_flags_and_non_elf_are_refused() {
        let img = header(1 << 3);
        assert!(matches!(
            layout(&img, &find_header(&img).unwrap(), 64 << 20),
            Err(MultibootError::UnsupportedFlags { .. })
        ));
        let img = header(0);
        assert!(matches!(
            layout(&img, &find_header(&img).unwrap(), 64 << 20),
            Err(MultibootError::BadElf(_))
        ));
    }
}
