//! Guest RIPs as `function+0xoff`: the function symbols of a guest ELF's symbol table
//! (parsed with `goblin`, Rust names demangled with `rustc-demangle`), for the report's
//! violation and crash RIPs (`rip_symbol` in JSON, `(name+0xoff)` in text).
//!
//! The ELF is untrusted: a file without a symbol table (stripped), with a malformed one, or one
//! the parser rejects gives an empty table, never an error, so such a guest runs as before.

use std::fmt;

/// Most symbols kept from one file (a larger table is cut: lookups of the rest give none).
pub const MAX_SYMBOLS: usize = 1 << 20;

/// Longest symbol name kept, in bytes (longer names are cut at a character boundary).
pub const MAX_NAME: usize = 512;

/// One function (or assembly label) symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sym {
    start: u64,
    /// Bytes; 0 for a label without a size (it then extends to the next symbol).
    size: u64,
    name: String,
}

/// A symbol table sorted by address, for [`Symbols::resolve`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Symbols {
    syms: Vec<Sym>,
    /// Executable sections `[start, end)`: a label without a size covers only addresses in
    /// the same one.
    text: Vec<(u64, u64)>,
}

/// A resolved address: the symbol and the offset into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    /// The demangled name (without Rust's hash suffix).
    pub name: &'a str,
    /// Bytes from the symbol's start.
    pub offset: u64,
}

impl fmt::Display for Resolved<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.name, self.offset)
    }
}

const STT_NOTYPE: u8 = 0;
const STT_FUNC: u8 = 2;
const SHF_EXECINSTR: u64 = 4;

impl Symbols {
    /// The function symbols of ELF `bytes`; empty when it has none or cannot be parsed.
    pub fn from_elf(bytes: &[u8]) -> Symbols {
        // goblin bounds-checks what it reads; a panic on some input it did not foresee must
        // still not take the VMM down, so it is contained here and means "no symbols".
        std::panic::catch_unwind(|| Self::parse(bytes)).unwrap_or_default()
    }

    fn parse(bytes: &[u8]) -> Symbols {
        let Ok(elf) = goblin::elf::Elf::parse(bytes) else {
            return Symbols::default();
        };
        let text: Vec<(u64, u64)> = elf
            .section_headers
            .iter()
            .filter(|s| s.sh_flags & SHF_EXECINSTR != 0 && s.sh_size > 0)
            .filter_map(|s| Some((s.sh_addr, s.sh_addr.checked_add(s.sh_size)?)))
            .collect();
        let mut syms = Vec::new();
        for s in elf.syms.iter() {
            if syms.len() >= MAX_SYMBOLS {
                break;
            }
            let kind = s.st_type();
            if !(kind == STT_FUNC || kind == STT_NOTYPE) || s.st_value == 0 || s.st_shndx == 0 {
                continue;
            }
            let Some(raw) = elf.strtab.get_at(s.st_name) else {
                continue;
            };
            if raw.is_empty() || raw.starts_with(".L") || raw.starts_with('$') {
                continue;
            }
            let in_text = text.iter().any(|&(a, b)| (a..b).contains(&s.st_value));
            if !in_text {
                continue;
            }
            syms.push(Sym {
                start: s.st_value,
                size: s.st_size,
                name: demangle(raw),
            });
        }
        // By address; at one address a sized symbol before a label, then by name, so the
        // choice is deterministic.
        syms.sort_by(|a, b| (a.start, a.size == 0, &a.name).cmp(&(b.start, b.size == 0, &b.name)));
        syms.dedup_by(|b, a| a.start == b.start);
        Symbols { syms, text }
    }

    /// Whether the table has no symbols (a stripped file).
    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// How many symbols the table holds.
    pub fn len(&self) -> usize {
        self.syms.len()
    }

    /// The function containing `addr`: the last symbol starting at or below it, if `addr` is
    /// inside its size (a label without a size: before the next symbol and in the same
    /// executable section).
    pub fn resolve(&self, addr: u64) -> Option<Resolved<'_>> {
        let i = self
            .syms
            .partition_point(|s| s.start <= addr)
            .checked_sub(1)?;
        let s = &self.syms[i];
        let offset = addr - s.start;
        let inside = if s.size > 0 {
            offset < s.size
        } else {
            let next = self.syms.get(i + 1).map_or(u64::MAX, |n| n.start);
            addr < next
                && self
                    .text
                    .iter()
                    .any(|&(a, b)| (a..b).contains(&s.start) && (a..b).contains(&addr))
        };
        inside.then_some(Resolved {
            name: &s.name,
            offset,
        })
    }

    /// `resolve` as the report's string (`name+0xoff`).
    pub fn name(&self, addr: u64) -> Option<String> {
        self.resolve(addr).map(|r| r.to_string())
    }
}

/// Appends section headers to `elf` (as [`crate::elf::build_elf`] makes it: one segment at
/// `gpa` holding `code_len` bytes right after the headers) so that it has a `.text` section
/// over the code and a symbol table with `syms` (name, offset into the code, size) as
/// functions. For tests and hand-made guests that want their RIPs named.
pub fn add_symbols(
    mut elf: Vec<u8>,
    gpa: u64,
    code_len: u64,
    syms: &[(&str, u64, u64)],
) -> Vec<u8> {
    const CODE_OFFSET: u64 = 64 + 56;
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; 24];
    for &(name, off, size) in syms {
        let mut e = [0u8; 24];
        e[0..4].copy_from_slice(&(strtab.len() as u32).to_le_bytes());
        e[4] = 0x10 | STT_FUNC; // STB_GLOBAL, STT_FUNC
        e[6..8].copy_from_slice(&1u16.to_le_bytes()); // .text
        e[8..16].copy_from_slice(&(gpa + off).to_le_bytes());
        e[16..24].copy_from_slice(&size.to_le_bytes());
        symtab.extend_from_slice(&e);
        strtab.extend_from_slice(name.as_bytes());
        strtab.push(0);
    }
    let shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0".to_vec();
    let sym_off = elf.len() as u64;
    elf.extend_from_slice(&symtab);
    let str_off = elf.len() as u64;
    elf.extend_from_slice(&strtab);
    let shstr_off = elf.len() as u64;
    elf.extend_from_slice(&shstrtab);
    while !elf.len().is_multiple_of(8) {
        elf.push(0);
    }
    let shoff = elf.len() as u64;
    // Fields of an ELF64 section header and their widths in bytes: name, type, flags, addr,
    // offset, size, link, info, align, entsize.
    const WIDTHS: [usize; 10] = [4, 4, 8, 8, 8, 8, 4, 4, 8, 8];
    let shdrs: [[u64; 10]; 5] = [
        [0; 10],
        [
            1,
            1,
            2 | SHF_EXECINSTR,
            gpa,
            CODE_OFFSET,
            code_len,
            0,
            0,
            16,
            0,
        ],
        [7, 2, 0, 0, sym_off, symtab.len() as u64, 3, 1, 8, 24],
        [15, 3, 0, 0, str_off, strtab.len() as u64, 0, 0, 1, 0],
        [23, 3, 0, 0, shstr_off, shstrtab.len() as u64, 0, 0, 1, 0],
    ];
    for h in shdrs {
        for (v, w) in h.iter().zip(WIDTHS) {
            elf.extend_from_slice(&v.to_le_bytes()[..w]);
        }
    }
    elf[40..48].copy_from_slice(&shoff.to_le_bytes()); // e_shoff
    elf[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf[60..62].copy_from_slice(&5u16.to_le_bytes()); // e_shnum
    elf[62..64].copy_from_slice(&4u16.to_le_bytes()); // e_shstrndx
    elf
}

/// A Rust (legacy or v0) name demangled without its hash; other names as they are. Cut at
/// [`MAX_NAME`] bytes.
fn demangle(raw: &str) -> String {
    let mut s = format!("{:#}", rustc_demangle::demangle(raw));
    if s.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(syms: &[(u64, u64, &str)], text: &[(u64, u64)]) -> Symbols {
        Symbols {
            syms: syms
                .iter()
                .map(|&(start, size, name)| Sym {
                    start,
                    size,
                    name: name.into(),
                })
                .collect(),
            text: text.to_vec(),
        }
    }

    #[test]
    fn sized_symbols_cover_their_size_only() {
        let t = table(
            &[(0x1000, 0x10, "a"), (0x1020, 0x8, "b")],
            &[(0x1000, 0x2000)],
        );
        assert_eq!(t.name(0x1000).as_deref(), Some("a+0x0"));
        assert_eq!(t.name(0x100f).as_deref(), Some("a+0xf"));
        assert_eq!(t.name(0x1010), None, "a gap between functions");
        assert_eq!(t.name(0x1027).as_deref(), Some("b+0x7"));
        assert_eq!(t.name(0x1028), None);
        assert_eq!(t.name(0xfff), None, "below every symbol");
    }

    #[test]
    fn labels_reach_the_next_symbol_inside_their_section() {
        let t = table(
            &[(0x1000, 0, "entry"), (0x1100, 0x10, "f")],
            &[(0x1000, 0x1200)],
        );
        assert_eq!(t.name(0x10ff).as_deref(), Some("entry+0xff"));
        assert_eq!(t.name(0x1100).as_deref(), Some("f+0x0"));
        let t = table(&[(0x1000, 0, "last")], &[(0x1000, 0x1200)]);
        assert_eq!(t.name(0x11ff).as_deref(), Some("last+0x1ff"));
        assert_eq!(t.name(0x1200), None, "past the section");
    }

    #[test]
    fn bad_and_stripped_files_have_no_symbols() {
        assert!(Symbols::from_elf(b"").is_empty());
        assert!(Symbols::from_elf(b"\x7fELF garbage").is_empty());
        assert!(Symbols::from_elf(&[0xffu8; 4096]).is_empty());
    }

    #[test]
    fn the_default_guest_resolves_its_functions() {
        let t = Symbols::from_elf(crate::guest_image::DEFAULT_GUEST);
        assert!(
            t.len() > 50,
            "the default guest keeps its symbol table: {}",
            t.len()
        );
        // Every symbol resolves to itself at offset 0.
        for s in &t.syms {
            let r = t.resolve(s.start).unwrap();
            assert_eq!((r.name, r.offset), (s.name.as_str(), 0));
        }
        assert!(
            t.syms
                .iter()
                .any(|s| s.name.ends_with("unmapped::unmapped_read_direct")),
            "demangled, without the hash"
        );
    }

    #[test]
    fn a_hand_made_elf_gets_its_symbols() {
        let code = [0x90u8; 32];
        let elf = crate::elf::build_elf(0x20_0000, &code, 0);
        assert!(
            Symbols::from_elf(&elf).is_empty(),
            "build_elf alone is stripped"
        );
        let elf = add_symbols(elf, 0x20_0000, 32, &[("start", 0, 16), ("spin", 16, 16)]);
        let t = Symbols::from_elf(&elf);
        assert_eq!(t.name(0x20_0003).as_deref(), Some("start+0x3"));
        assert_eq!(t.name(0x20_0010).as_deref(), Some("spin+0x0"));
        assert_eq!(t.name(0x20_0020), None);
        // Still a loadable guest.
        assert!(crate::elf::parse(&elf, 64 << 20).is_ok());
    }

    #[test]
    fn rust_names_lose_their_hash_and_long_names_are_cut() {
        assert_eq!(
            demangle("_ZN10veil_guest5tests8unmapped20unmapped_read_direct17heb65b88d65641d8bE"),
            "veil_guest::tests::unmapped::unmapped_read_direct"
        );
        assert_eq!(demangle("entry64"), "entry64");
        assert_eq!(demangle(&"é".repeat(400)).len(), MAX_NAME);
    }
}
