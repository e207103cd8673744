//! Validating ELF loader for guest images read from untrusted bytes.
//!
//! Parses the ELF64 header and program headers by hand with checked arithmetic (no section
//! headers, symbols or relocations are looked at, so there is little to get wrong): the file must
//! be a little-endian ELF64 `ET_EXEC` for x86-64 whose `PT_LOAD` segments lie inside
//! `[IMAGE_MIN_GPA, ram_size)`, do not overlap, have `filesz <= memsz`, file ranges inside
//! the file and `p_vaddr == p_paddr` (the image runs identity-mapped), and whose entry point lies in an executable loaded segment. Every failure is an
//! [`ElfError`]; nothing here panics on any input.

use veil_abi::{IMAGE_MIN_GPA, PAGE_SIZE};

use crate::addr::Gpa;

use crate::memory::GuestRam;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
/// Most program headers accepted.
pub const MAX_PHDRS: u16 = 64;
/// Largest total in-memory size of the loaded segments (1 GiB).
pub const MAX_IMAGE_SIZE: u64 = 1 << 30;

/// Why an ELF file was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// The file is shorter than a structure it must contain.
    #[error("truncated ELF file: {what} needs bytes {start}..{end}, the file has {len}")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// Its first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// File length.
        len: u64,
    },
    /// No ELF magic.
    #[error("not an ELF file (bad magic)")]
    BadMagic,
    /// Not ELFCLASS64.
    #[error("not a 64-bit ELF file (class {0})")]
    NotElf64(u8),
    /// Not little-endian.
    #[error("not a little-endian ELF file (data encoding {0})")]
    NotLittleEndian(u8),
    /// Not an executable.
    #[error(
        "ELF type {0} is not ET_EXEC (2): the guest must be a static, non-relocatable executable"
    )]
    NotExecutable(u16),
    /// Wrong machine.
    #[error("ELF machine {0} is not x86-64 (62)")]
    WrongMachine(u16),
    /// Program header entries of the wrong size.
    #[error("program header entry size {0} is not 56")]
    BadPhentsize(u16),
    /// No or too many program headers.
    #[error("ELF has {0} program headers; need 1..={MAX_PHDRS}")]
    BadPhnum(u16),
    /// A segment's file size exceeds its memory size.
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileszExceedsMemsz {
        /// Program header index.
        index: usize,
        /// p_filesz.
        filesz: u64,
        /// p_memsz.
        memsz: u64,
    },
    /// A segment lies outside the loadable GPA window.
    #[error("segment {index} [{start:#x}, {end:#x}) lies outside the loadable guest RAM [{min:#x}, {max:#x}){}", if *start >= *min && *end > *max && *end != u64::MAX { "; use a larger --mem" } else { "" })]
    OutOfRam {
        /// Program header index.
        index: usize,
        /// First GPA.
        start: u64,
        /// One past the last GPA (saturated on overflow).
        end: u64,
        /// Lowest allowed GPA.
        min: u64,
        /// RAM size.
        max: u64,
    },
    /// Two segments overlap.
    #[error("segments {a} and {b} overlap in guest memory")]
    Overlap {
        /// One segment.
        a: usize,
        /// The other.
        b: usize,
    },
    /// No PT_LOAD segment.
    #[error("ELF has no PT_LOAD segment")]
    NoLoadSegments,
    /// The image is too large.
    #[error("loaded image is {0:#x} bytes, more than the 1 GiB limit")]
    TooLarge(u64),
    /// The entry point is not in an executable segment.
    #[error("entry point {0:#x} is not inside an executable loaded segment")]
    EntryOutside(u64),
    /// The file asks for a program interpreter: a dynamically linked user program.
    #[error("program header {0} is PT_INTERP: this is a dynamically linked user program, not a guest kernel (link it static, ET_EXEC, with its own entry point)")]
    NeedsInterpreter(usize),
    /// A segment's virtual address differs from its physical load address.
    #[error("segment {index}: p_vaddr {vaddr:#x} differs from p_paddr {paddr:#x}; the guest is loaded at p_paddr and entered with an identity map, so link it with virtual = physical addresses")]
    VaddrMismatch {
        /// Program header index.
        index: usize,
        /// p_vaddr.
        vaddr: u64,
        /// p_paddr.
        paddr: u64,
    },
    /// Guest memory write failed (should not happen after validation).
    #[error("cannot copy segment into guest memory: {0}")]
    Memory(String),
}

/// One validated `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address (p_paddr; equals p_vaddr for the identity-mapped image).
    pub gpa: u64,
    /// Bytes in memory.
    pub memsz: u64,
    /// Offset of the file bytes.
    pub offset: u64,
    /// Bytes in the file (the rest up to memsz is zeroed).
    pub filesz: u64,
    /// Executable.
    pub exec: bool,
}

/// A validated guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// Entry point (guest virtual = physical).
    pub entry: u64,
    /// The loadable segments, sorted by GPA.
    pub segments: Vec<Segment>,
}

impl ElfImage {
    /// One past the highest loaded byte.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.gpa + s.memsz)
            .max()
            .unwrap_or(IMAGE_MIN_GPA)
    }

    /// The guest's own pages: every page a loaded segment touches (bss included), as sorted,
    /// disjoint, page-aligned `[start, end)` ranges (adjacent ones merged).
    pub fn pages(&self) -> Vec<(Gpa, Gpa)> {
        let mut out: Vec<(Gpa, Gpa)> = Vec::new();
        for s in &self.segments {
            // `parse` bounds every segment inside RAM, so neither end overflows.
            let start = Gpa(s.gpa).page_start();
            let end = Gpa((s.gpa + s.memsz).div_ceil(PAGE_SIZE) * PAGE_SIZE);
            match out.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => out.push((start, end)),
            }
        }
        out
    }
}

fn slice<'a>(b: &'a [u8], start: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let end = start.checked_add(len);
    match end {
        Some(end) if end <= b.len() as u64 => Ok(&b[start as usize..end as usize]),
        _ => Err(ElfError::Truncated {
            what,
            start,
            end: end.unwrap_or(u64::MAX),
            len: b.len() as u64,
        }),
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Validates `bytes` as a guest image for a VM with `ram_size` bytes of RAM.
pub fn parse(bytes: &[u8], ram_size: u64) -> Result<ElfImage, ElfError> {
    if bytes.len() >= 4 && &bytes[0..4] != b"\x7fELF" {
        return Err(ElfError::BadMagic);
    }
    let eh = slice(bytes, 0, EHDR_SIZE as u64, "ELF header")?;
    if &eh[0..4] != b"\x7fELF" {
        return Err(ElfError::BadMagic);
    }
    if eh[4] != 2 {
        return Err(ElfError::NotElf64(eh[4]));
    }
    if eh[5] != 1 {
        return Err(ElfError::NotLittleEndian(eh[5]));
    }
    let e_type = u16_at(eh, 16);
    let e_machine = u16_at(eh, 18);
    if e_machine != EM_X86_64 {
        return Err(ElfError::WrongMachine(e_machine));
    }
    if e_type != ET_EXEC {
        return Err(ElfError::NotExecutable(e_type));
    }
    let entry = u64_at(eh, 24);
    let phoff = u64_at(eh, 32);
    let phentsize = u16_at(eh, 54);
    let phnum = u16_at(eh, 56);
    if phentsize as usize != PHDR_SIZE {
        return Err(ElfError::BadPhentsize(phentsize));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(ElfError::BadPhnum(phnum));
    }
    let phdrs = slice(
        bytes,
        phoff,
        u64::from(phnum) * PHDR_SIZE as u64,
        "program headers",
    )?;
    let mut segments: Vec<(usize, Segment)> = Vec::new();
    let mut total = 0u64;
    for index in 0..phnum as usize {
        let ph = &phdrs[index * PHDR_SIZE..(index + 1) * PHDR_SIZE];
        match u32_at(ph, 0) {
            PT_LOAD => {}
            PT_INTERP => return Err(ElfError::NeedsInterpreter(index)),
            _ => continue,
        }
        let flags = u32_at(ph, 4);
        let offset = u64_at(ph, 8);
        let vaddr = u64_at(ph, 16);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(ElfError::FileszExceedsMemsz {
                index,
                filesz,
                memsz,
            });
        }
        slice(bytes, offset, filesz, "segment data")?;
        if vaddr != paddr {
            return Err(ElfError::VaddrMismatch {
                index,
                vaddr,
                paddr,
            });
        }
        let end = paddr.checked_add(memsz);
        match end {
            Some(end) if paddr >= IMAGE_MIN_GPA && end <= ram_size => {}
            _ => {
                return Err(ElfError::OutOfRam {
                    index,
                    start: paddr,
                    end: end.unwrap_or(u64::MAX),
                    min: IMAGE_MIN_GPA,
                    max: ram_size,
                })
            }
        }
        total = total.saturating_add(memsz);
        if total > MAX_IMAGE_SIZE {
            return Err(ElfError::TooLarge(total));
        }
        segments.push((
            index,
            Segment {
                gpa: paddr,
                memsz,
                offset,
                filesz,
                exec: flags & PF_X != 0,
            },
        ));
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadSegments);
    }
    segments.sort_by_key(|(_, s)| s.gpa);
    for w in segments.windows(2) {
        let (ia, a) = w[0];
        let (ib, b) = w[1];
        if a.gpa + a.memsz > b.gpa {
            return Err(ElfError::Overlap {
                a: ia.min(ib),
                b: ia.max(ib),
            });
        }
    }
    if !segments
        .iter()
        .any(|(_, s)| s.exec && entry >= s.gpa && entry < s.gpa + s.memsz)
    {
        return Err(ElfError::EntryOutside(entry));
    }
    Ok(ElfImage {
        entry,
        segments: segments.into_iter().map(|(_, s)| s).collect(),
    })
}

/// Copies a validated image into guest RAM and zeroes each segment's bss.
pub fn load(image: &ElfImage, bytes: &[u8], ram: &GuestRam) -> Result<(), ElfError> {
    for s in &image.segments {
        let data = slice(bytes, s.offset, s.filesz, "segment data")?;
        ram.write(s.gpa, data)
            .map_err(|e| ElfError::Memory(e.to_string()))?;
        if s.memsz > s.filesz {
            // Released, not written: a fresh mapping is already zero, so a 1 GiB .bss costs
            // one partial page of RSS, not 1 GiB.
            ram.zero(s.gpa + s.filesz, s.memsz - s.filesz)
                .map_err(|e| ElfError::Memory(e.to_string()))?;
        }
    }
    Ok(())
}

/// Builds a minimal valid ELF64 x86-64 executable: one RWX segment at `gpa` holding `code`,
/// `bss` zero bytes after it, entry at its first byte. For tests and hand-made guests.
pub fn build_elf(gpa: u64, code: &[u8], bss: u64) -> Vec<u8> {
    let mut out = vec![0u8; EHDR_SIZE + PHDR_SIZE];
    out[0..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // ELFCLASS64
    out[5] = 1; // little-endian
    out[6] = 1; // EV_CURRENT
    out[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
    out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&gpa.to_le_bytes());
    out[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
    out[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    out[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out[56..58].copy_from_slice(&1u16.to_le_bytes());
    let offset = (EHDR_SIZE + PHDR_SIZE) as u64;
    let ph = &mut out[EHDR_SIZE..];
    ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // R W X
    ph[8..16].copy_from_slice(&offset.to_le_bytes());
    ph[16..24].copy_from_slice(&gpa.to_le_bytes());
    ph[24..32].copy_from_slice(&gpa.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    out.extend_from_slice(code);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: u64 = 64 << 20;
    const CODE: &[u8] = &[0xeb, 0xfe]; // jmp $

    fn phdr_mut(elf: &mut [u8], i: usize) -> &mut [u8] {
        &mut elf[EHDR_SIZE + i * PHDR_SIZE..EHDR_SIZE + (i + 1) * PHDR_SIZE]
    }

    /// An ELF with two program headers: the code segment and a second segment at `gpa2`.
    fn two_segments(gpa2: u64, memsz2: u64) -> Vec<u8> {
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        // Make room for a second header by appending it at the end and moving phoff there.
        let mut ph2 = phdr_mut(&mut elf, 0).to_vec();
        ph2[4..8].copy_from_slice(&6u32.to_le_bytes());
        ph2[16..24].copy_from_slice(&gpa2.to_le_bytes());
        ph2[24..32].copy_from_slice(&gpa2.to_le_bytes());
        ph2[32..40].copy_from_slice(&0u64.to_le_bytes());
        ph2[40..48].copy_from_slice(&memsz2.to_le_bytes());
        let ph1 = phdr_mut(&mut elf, 0).to_vec();
        let phoff = elf.len() as u64;
        elf.extend_from_slice(&ph1);
        elf.extend_from_slice(&ph2);
        elf[32..40].copy_from_slice(&phoff.to_le_bytes());
        elf[56..58].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn accepts_minimal_image() {
        let elf = build_elf(IMAGE_MIN_GPA, CODE, 0x3000);
        let img = parse(&elf, RAM).unwrap();
        assert_eq!(img.entry, IMAGE_MIN_GPA);
        assert_eq!(img.segments.len(), 1);
        assert_eq!(img.end(), IMAGE_MIN_GPA + 2 + 0x3000);
        assert_eq!(
            img.pages(),
            vec![(Gpa(IMAGE_MIN_GPA), Gpa(IMAGE_MIN_GPA + 0x4000))]
        );
    }

    #[test]
    fn pages_round_out_and_merge_segments() {
        let img = |segs: &[(u64, u64)]| ElfImage {
            entry: IMAGE_MIN_GPA,
            segments: segs
                .iter()
                .map(|&(gpa, memsz)| Segment {
                    gpa,
                    memsz,
                    offset: 0,
                    filesz: 0,
                    exec: false,
                })
                .collect(),
        };
        let b = IMAGE_MIN_GPA;
        // Two segments sharing a page merge; a gap of a whole page keeps them apart.
        assert_eq!(
            img(&[(b, 0x1001), (b + 0x1800, 0x10), (b + 0x3000, 0x800)]).pages(),
            vec![
                (Gpa(b), Gpa(b + 0x2000)),
                (Gpa(b + 0x3000), Gpa(b + 0x4000))
            ]
        );
        assert_eq!(
            img(&[(b + 0x10, 0x1000), (b + 0x2000, 0x1000)]).pages(),
            vec![(Gpa(b), Gpa(b + 0x3000))]
        );
    }

    #[test]
    fn load_copies_and_zeroes_bss() {
        let ram = GuestRam::new(crate::memory::MemSize(RAM)).unwrap();
        ram.fill(IMAGE_MIN_GPA, 0x2000, 0xcc).unwrap();
        let elf = build_elf(IMAGE_MIN_GPA, CODE, 0x1000);
        let img = parse(&elf, RAM).unwrap();
        load(&img, &elf, &ram).unwrap();
        let mut b = [0u8; 4];
        ram.read(IMAGE_MIN_GPA, &mut b).unwrap();
        assert_eq!(b, [0xeb, 0xfe, 0, 0]);
        assert_eq!(ram.count(IMAGE_MIN_GPA + 2, 0x1000, 0).unwrap(), 0x1000);
        assert_eq!(ram.count(IMAGE_MIN_GPA + 0x1002, 16, 0xcc).unwrap(), 16);
    }

    #[test]
    fn rejects_truncated() {
        let elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        for len in [0, 10, 63, 64, 100, elf.len() - 1] {
            let e = parse(&elf[..len], RAM).unwrap_err();
            assert!(matches!(e, ElfError::Truncated { .. }), "{len}: {e}");
        }
    }

    #[test]
    fn rejects_wrong_machine_class_type() {
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        elf[18] = 183; // aarch64
        assert_eq!(parse(&elf, RAM), Err(ElfError::WrongMachine(183)));
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        elf[4] = 1;
        assert_eq!(parse(&elf, RAM), Err(ElfError::NotElf64(1)));
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        elf[16] = 3; // ET_DYN
        assert_eq!(parse(&elf, RAM), Err(ElfError::NotExecutable(3)));
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        elf[0] = 0;
        assert_eq!(parse(&elf, RAM), Err(ElfError::BadMagic));
    }

    #[test]
    fn rejects_overlapping() {
        let elf = two_segments(IMAGE_MIN_GPA + 1, 0x1000);
        assert_eq!(parse(&elf, RAM), Err(ElfError::Overlap { a: 0, b: 1 }));
        let ok = two_segments(IMAGE_MIN_GPA + 0x1000, 0x1000);
        assert_eq!(parse(&ok, RAM).unwrap().segments.len(), 2);
    }

    #[test]
    fn rejects_out_of_ram() {
        let elf = build_elf(0x1000, CODE, 0);
        assert!(matches!(parse(&elf, RAM), Err(ElfError::OutOfRam { .. })));
        let elf = build_elf(RAM - 1, CODE, 0);
        assert!(matches!(parse(&elf, RAM), Err(ElfError::OutOfRam { .. })));
        let elf = two_segments(u64::MAX - 10, 0x1000);
        assert!(matches!(parse(&elf, RAM), Err(ElfError::OutOfRam { .. })));
    }

    #[test]
    fn rejects_entry_outside() {
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        elf[24..32].copy_from_slice(&(IMAGE_MIN_GPA + 0x10).to_le_bytes());
        assert_eq!(
            parse(&elf, RAM),
            Err(ElfError::EntryOutside(IMAGE_MIN_GPA + 0x10))
        );
        // Entry in a non-executable segment.
        let mut elf = two_segments(IMAGE_MIN_GPA + 0x1000, 0x1000);
        elf[24..32].copy_from_slice(&(IMAGE_MIN_GPA + 0x1000).to_le_bytes());
        assert!(matches!(parse(&elf, RAM), Err(ElfError::EntryOutside(_))));
    }

    #[test]
    fn rejects_filesz_above_memsz_and_bad_file_ranges() {
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        phdr_mut(&mut elf, 0)[40..48].copy_from_slice(&1u64.to_le_bytes());
        assert!(matches!(
            parse(&elf, RAM),
            Err(ElfError::FileszExceedsMemsz { .. })
        ));
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        phdr_mut(&mut elf, 0)[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&elf, RAM), Err(ElfError::Truncated { .. })));
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        elf[56..58].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(parse(&elf, RAM), Err(ElfError::BadPhnum(0)));
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&elf, RAM), Err(ElfError::Truncated { .. })));
    }

    #[test]
    fn out_of_ram_suggests_more_memory_only_when_that_helps() {
        let e = parse(&build_elf(IMAGE_MIN_GPA, CODE, RAM), RAM).unwrap_err();
        assert!(e.to_string().ends_with("use a larger --mem"), "{e}");
        let e = parse(&build_elf(0x1000, CODE, 0), RAM).unwrap_err();
        assert!(!e.to_string().contains("--mem"), "{e}");
    }

    #[test]
    fn rejects_huge_image() {
        let elf = build_elf(IMAGE_MIN_GPA, CODE, 2 << 30);
        assert!(matches!(parse(&elf, 64 << 30), Err(ElfError::TooLarge(_))));
    }

    #[test]
    fn rejects_dynamically_linked_programs() {
        let mut elf = two_segments(IMAGE_MIN_GPA + 0x1000, 0x1000);
        let phoff = u64_at(&elf, 32) as usize;
        elf[phoff + PHDR_SIZE..phoff + PHDR_SIZE + 4].copy_from_slice(&PT_INTERP.to_le_bytes());
        assert_eq!(parse(&elf, RAM), Err(ElfError::NeedsInterpreter(1)));
    }

    #[test]
    fn rejects_vaddr_differing_from_paddr() {
        let mut elf = build_elf(IMAGE_MIN_GPA, CODE, 0);
        phdr_mut(&mut elf, 0)[16..24].copy_from_slice(&0xffff_ffff_8000_0000u64.to_le_bytes());
        assert_eq!(
            parse(&elf, RAM),
            Err(ElfError::VaddrMismatch {
                index: 0,
                vaddr: 0xffff_ffff_8000_0000,
                paddr: IMAGE_MIN_GPA
            })
        );
    }

    #[test]
    fn default_guest_is_accepted_and_its_truncations_rejected() {
        let g = crate::guest_image::DEFAULT_GUEST;
        let img = parse(g, RAM).unwrap();
        check_image(&img, g, RAM);
        // Cutting the file anywhere inside its headers or loaded data is a typed error.
        let need = img
            .segments
            .iter()
            .map(|s| s.offset + s.filesz)
            .max()
            .unwrap();
        for cut in (0..need as usize).step_by(997).chain([need as usize - 1]) {
            assert!(parse(&g[..cut], RAM).is_err(), "cut at {cut}");
        }
    }

    /// What every accepted image must satisfy (the loader's contract).
    fn check_image(img: &ElfImage, bytes: &[u8], ram: u64) {
        assert!(!img.segments.is_empty());
        let mut total = 0u64;
        for (i, s) in img.segments.iter().enumerate() {
            assert!(s.memsz > 0 && s.filesz <= s.memsz, "{s:?}");
            assert!(s.gpa >= IMAGE_MIN_GPA, "{s:?}");
            let end = s.gpa.checked_add(s.memsz).expect("segment end overflows");
            assert!(end <= ram, "{s:?} beyond RAM {ram:#x}");
            let fend = s.offset.checked_add(s.filesz).expect("file end overflows");
            assert!(fend <= bytes.len() as u64, "{s:?} beyond file");
            if let Some(next) = img.segments.get(i + 1) {
                assert!(end <= next.gpa, "{s:?} overlaps {next:?}");
            }
            total += s.memsz;
        }
        assert!(total <= MAX_IMAGE_SIZE);
        assert!(img
            .segments
            .iter()
            .any(|s| s.exec && img.entry >= s.gpa && img.entry < s.gpa + s.memsz));
        assert!(img.end() <= ram);
    }

    /// One edit of an ELF file.
    #[derive(Clone, Debug)]
    enum Edit {
        /// Cut the file at this fraction of its length (per mille).
        Truncate(u16),
        /// Overwrite one byte in the ELF header or program header table.
        HeaderByte(u16, u8),
        /// Overwrite one byte anywhere.
        AnyByte(u32, u8),
        /// Set a 64-bit program header field (0 offset, 1 vaddr, 2 paddr, 3 filesz, 4 memsz) of
        /// header `i` (modulo phnum) to a value.
        PhField(u8, u8, u64),
        /// Set p_vaddr and p_paddr of header `i` to the same value.
        PhAddr(u8, u64),
        /// Set the entry point.
        Entry(u64),
        /// Set e_phnum.
        Phnum(u16),
        /// Set e_phoff.
        Phoff(u64),
        /// Make header `i` a copy of header `j` (overlapping segments).
        CopyPh(u8, u8),
    }

    /// Values that stress checked arithmetic: zero, one, the top of u64, RAM edges, the image
    /// window, powers of two, and anything.
    fn interesting() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::MAX),
            Just(u64::MAX - 0xfff),
            Just(1 << 63),
            Just(RAM),
            Just(RAM - 1),
            Just(RAM - 0x1000),
            Just(IMAGE_MIN_GPA),
            Just(IMAGE_MIN_GPA - 1),
            Just(MAX_IMAGE_SIZE),
            Just(MAX_IMAGE_SIZE + 1),
            (0u32..64).prop_map(|b| 1u64 << b),
            IMAGE_MIN_GPA..RAM,
            0u64..0x2_0000,
            any::<u64>(),
        ]
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (0u16..=1000).prop_map(Edit::Truncate),
            (any::<u16>(), any::<u8>()).prop_map(|(p, v)| Edit::HeaderByte(p, v)),
            (any::<u32>(), any::<u8>()).prop_map(|(p, v)| Edit::AnyByte(p, v)),
            (any::<u8>(), 0u8..5, interesting()).prop_map(|(i, f, v)| Edit::PhField(i, f, v)),
            (any::<u8>(), interesting()).prop_map(|(i, v)| Edit::PhAddr(i, v)),
            interesting().prop_map(Edit::Entry),
            prop_oneof![
                Just(0u16),
                Just(1),
                Just(2),
                Just(64),
                Just(65),
                any::<u16>()
            ]
            .prop_map(Edit::Phnum),
            interesting().prop_map(Edit::Phoff),
            (any::<u8>(), any::<u8>()).prop_map(|(i, j)| Edit::CopyPh(i, j)),
        ]
    }

    fn put(b: &mut [u8], off: u64, v: &[u8]) {
        let Ok(off) = usize::try_from(off) else {
            return;
        };
        if let Some(end) = off.checked_add(v.len()) {
            if end <= b.len() {
                b[off..end].copy_from_slice(v);
            }
        }
    }

    fn apply(b: &mut Vec<u8>, e: &Edit) {
        let phoff = if b.len() >= 40 { u64_at(b, 32) } else { 0 };
        let phnum = if b.len() >= 58 {
            u64::from(u16_at(b, 56).max(1))
        } else {
            1
        };
        let ph = |i: u8| phoff.saturating_add((u64::from(i) % phnum) * PHDR_SIZE as u64);
        match *e {
            Edit::Truncate(pm) => {
                let n = b.len() * usize::from(pm) / 1000;
                b.truncate(n);
            }
            Edit::HeaderByte(p, v) => {
                let span = (EHDR_SIZE as u64 + phnum * PHDR_SIZE as u64).max(1);
                let off = if u64::from(p) % 2 == 0 {
                    u64::from(p) % EHDR_SIZE as u64
                } else {
                    phoff.saturating_add(u64::from(p) % span)
                };
                put(b, off, &[v]);
            }
            Edit::AnyByte(p, v) => {
                if !b.is_empty() {
                    let n = b.len();
                    b[p as usize % n] = v;
                }
            }
            Edit::PhField(i, f, v) => {
                let field = [8u64, 16, 24, 32, 40][usize::from(f)];
                put(b, ph(i).saturating_add(field), &v.to_le_bytes());
            }
            Edit::PhAddr(i, v) => {
                put(b, ph(i).saturating_add(16), &v.to_le_bytes());
                put(b, ph(i).saturating_add(24), &v.to_le_bytes());
            }
            Edit::Entry(v) => put(b, 24, &v.to_le_bytes()),
            Edit::Phnum(n) => put(b, 56, &n.to_le_bytes()),
            Edit::Phoff(v) => put(b, 32, &v.to_le_bytes()),
            Edit::CopyPh(i, j) => {
                let (src, dst) = (ph(i), ph(j));
                if let (Ok(s), Ok(_)) = (usize::try_from(src), usize::try_from(dst)) {
                    if s.checked_add(PHDR_SIZE).is_some_and(|e| e <= b.len()) {
                        let h = b[s..s + PHDR_SIZE].to_vec();
                        put(b, dst, &h);
                    }
                }
            }
        }
    }

    /// The base images the mutations start from: the embedded default guest (three segments),
    /// a one-segment image with bss, and a two-segment image.
    fn base(which: u8) -> Vec<u8> {
        match which % 3 {
            0 => crate::guest_image::DEFAULT_GUEST.to_vec(),
            1 => build_elf(IMAGE_MIN_GPA, CODE, 0x100),
            _ => two_segments(IMAGE_MIN_GPA + 0x1000, 0x3000),
        }
    }

    /// Guest RAM shared by the load checks (mapped once, lazily backed).
    fn shared_ram() -> &'static GuestRam {
        static RAM_ONCE: std::sync::OnceLock<GuestRam> = std::sync::OnceLock::new();
        RAM_ONCE.get_or_init(|| GuestRam::new(crate::memory::MemSize(RAM)).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Mutated images (truncations, header bytes, huge or overflowing segment fields,
        /// overlapping copies, bad entry points, zero or too many headers) are either rejected
        /// with a typed error or accepted as an image that satisfies every loader invariant and
        /// loads into RAM; nothing panics.
        #[test]
        fn mutated_images_are_rejected_or_sound(which in any::<u8>(), edits in proptest::collection::vec(edit(), 1..5)) {
            let mut elf = base(which);
            for e in &edits {
                apply(&mut elf, e);
            }
            for ram in [RAM, crate::memory::MIN_RAM] {
                if let Ok(img) = parse(&elf, ram) {
                    check_image(&img, &elf, ram);
                    if ram == RAM {
                        load(&img, &elf, shared_ram()).unwrap();
                    }
                }
            }
        }

        /// Arbitrary bytes behind a valid ELF header prefix never panic the parser.
        #[test]
        fn random_bytes_never_panic(prefix in any::<bool>(), bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut b = if prefix { build_elf(IMAGE_MIN_GPA, CODE, 0)[..EHDR_SIZE].to_vec() } else { Vec::new() };
            b.extend_from_slice(&bytes);
            if let Ok(img) = parse(&b, RAM) {
                check_image(&img, &b, RAM);
            }
        }
    }
}
