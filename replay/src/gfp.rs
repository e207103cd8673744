//! GFP flag names as the kernel prints them, turned into bit masks.
//!
//! The kernel prints `gfp_flags=` with `show_gfp_flags()`: composite names first
//! (`GFP_KERNEL_ACCOUNT`, `GFP_HIGHUSER_MOVABLE`, ...) greedily consume their bits, the remaining
//! single bits follow (`__GFP_ZERO`, ...). The same bits can therefore print differently
//! (`GFP_HIGHUSER|__GFP_ACCOUNT` has every bit of `GFP_KERNEL_ACCOUNT`). To compare flags the way
//! the kernel does (`(gfp & GFP_X) == GFP_X`), every name is expanded to the single `__GFP_*`
//! bits it stands for, using the definitions of Linux 6.18 (`include/linux/gfp_types.h`).
//! Names this table does not know (future flags, raw `0x...` residues) become opaque bits of
//! their own and match only themselves.

use std::collections::HashMap;

/// A set of GFP bits (this module's own numbering, not the kernel's config-dependent one).
pub type GfpMask = u64;

/// The single `__GFP_*` flags, in bit order 0..
const SINGLE: &[&str] = &[
    "__GFP_DMA",
    "__GFP_HIGHMEM",
    "__GFP_DMA32",
    "__GFP_MOVABLE",
    "__GFP_RECLAIMABLE",
    "__GFP_HIGH",
    "__GFP_IO",
    "__GFP_FS",
    "__GFP_ZERO",
    "__GFP_DIRECT_RECLAIM",
    "__GFP_KSWAPD_RECLAIM",
    "__GFP_WRITE",
    "__GFP_NOWARN",
    "__GFP_RETRY_MAYFAIL",
    "__GFP_NOFAIL",
    "__GFP_NORETRY",
    "__GFP_MEMALLOC",
    "__GFP_COMP",
    "__GFP_NOMEMALLOC",
    "__GFP_HARDWALL",
    "__GFP_THISNODE",
    "__GFP_ACCOUNT",
    "__GFP_ZEROTAGS",
    "__GFP_SKIP_ZERO",
    "__GFP_SKIP_KASAN",
    "__GFP_NOLOCKDEP",
    "__GFP_NO_OBJ_EXT",
];

/// First bit used for names the table does not know.
const OPAQUE_FIRST: u32 = 32;
/// Bit shared by every unknown name beyond the 31 that get their own bit.
const OPAQUE_OVERFLOW: u32 = 63;

/// Bit of a single flag.
fn bit(name: &str) -> GfpMask {
    SINGLE.iter().position(|n| *n == name).map_or(0, |i| 1 << i)
}

/// Bits of a set of single flags.
fn bits(names: &[&str]) -> GfpMask {
    names.iter().fold(0, |m, n| m | bit(n))
}

/// Expand a known name (single or composite) to its bits; `None` if the table does not know it.
pub fn known_mask(name: &str) -> Option<GfpMask> {
    if SINGLE.contains(&name) {
        return Some(bit(name));
    }
    let reclaim = bits(&["__GFP_DIRECT_RECLAIM", "__GFP_KSWAPD_RECLAIM"]);
    let kernel = reclaim | bits(&["__GFP_IO", "__GFP_FS"]);
    let user = kernel | bit("__GFP_HARDWALL");
    let highuser = user | bit("__GFP_HIGHMEM");
    let highuser_movable = highuser | bits(&["__GFP_MOVABLE", "__GFP_SKIP_KASAN"]);
    let transhuge_light =
        (highuser_movable | bits(&["__GFP_COMP", "__GFP_NOMEMALLOC", "__GFP_NOWARN"])) & !reclaim;
    Some(match name {
        "__GFP_RECLAIM" => reclaim,
        "GFP_ATOMIC" => bits(&["__GFP_HIGH", "__GFP_KSWAPD_RECLAIM"]),
        "GFP_KERNEL" => kernel,
        "GFP_KERNEL_ACCOUNT" => kernel | bit("__GFP_ACCOUNT"),
        "GFP_NOWAIT" => bits(&["__GFP_KSWAPD_RECLAIM", "__GFP_NOWARN"]),
        "GFP_NOIO" => reclaim,
        "GFP_NOFS" => reclaim | bit("__GFP_IO"),
        "GFP_USER" => user,
        "GFP_DMA" => bit("__GFP_DMA"),
        "GFP_DMA32" => bit("__GFP_DMA32"),
        "GFP_HIGHUSER" => highuser,
        "GFP_HIGHUSER_MOVABLE" => highuser_movable,
        "GFP_TRANSHUGE_LIGHT" => transhuge_light,
        "GFP_TRANSHUGE" => transhuge_light | bit("__GFP_DIRECT_RECLAIM"),
        "none" => 0,
        _ => return None,
    })
}

/// Bit of `__GFP_DIRECT_RECLAIM`: allocations without it cannot sleep (atomic/nowait context).
pub fn direct_reclaim_bit() -> GfpMask {
    bit("__GFP_DIRECT_RECLAIM")
}

/// One distinct `gfp_flags=` string seen in a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GfpClass {
    /// The text as printed.
    pub text: String,
    /// Its bits.
    pub mask: GfpMask,
    /// Allocations that carried it.
    pub count: u64,
}

/// Interns `gfp_flags=` strings and unknown flag names.
#[derive(Debug, Default)]
pub struct GfpTable {
    by_text: HashMap<Vec<u8>, u32>,
    /// Distinct flag strings, indexed by the id stored in events.
    pub classes: Vec<GfpClass>,
    opaque: HashMap<String, GfpMask>,
    /// The last string interned and its id: consecutive allocations mostly share their flags.
    last: Option<(Vec<u8>, u32)>,
}

/// Two tables are equal when they hold the same strings under the same ids with the same
/// counts and masks, and the same opaque names (the lookup caches do not count).
impl PartialEq for GfpTable {
    fn eq(&self, other: &Self) -> bool {
        self.classes == other.classes && self.opaque == other.opaque
    }
}

impl Eq for GfpTable {}

impl GfpTable {
    /// Id of a flag string, interning it on first sight.
    pub fn intern(&mut self, text: &[u8]) -> u32 {
        if let Some((last, id)) = &self.last {
            if last == text {
                self.classes[*id as usize].count += 1;
                return *id;
            }
        }
        let id = self.intern_slow(text);
        match &mut self.last {
            Some((buf, last_id)) => {
                buf.clear();
                buf.extend_from_slice(text);
                *last_id = id;
            }
            None => self.last = Some((text.to_vec(), id)),
        }
        id
    }

    /// One more allocation carrying the string of `id` (as [`GfpTable::intern`] counts it).
    #[inline]
    pub(crate) fn count(&mut self, id: u32) {
        self.classes[id as usize].count += 1;
    }

    fn intern_slow(&mut self, text: &[u8]) -> u32 {
        if let Some(&id) = self.by_text.get(text) {
            self.classes[id as usize].count += 1;
            return id;
        }
        let s = String::from_utf8_lossy(text).into_owned();
        let mask = s.split('|').fold(0, |m, name| m | self.name_mask(name));
        let id = u32::try_from(self.classes.len()).unwrap_or(u32::MAX);
        if id == u32::MAX {
            // 4 billion distinct strings cannot happen in practice; fold them together.
            return id - 1;
        }
        self.classes.push(GfpClass {
            text: s,
            mask,
            count: 1,
        });
        self.by_text.insert(text.to_vec(), id);
        id
    }

    /// Bits of one flag name, giving unknown names an opaque bit.
    fn name_mask(&mut self, name: &str) -> GfpMask {
        if let Some(m) = known_mask(name) {
            return m;
        }
        if let Some(&m) = self.opaque.get(name) {
            return m;
        }
        let n = self.opaque.len() as u32;
        let m = 1u64 << (OPAQUE_FIRST + n).min(OPAQUE_OVERFLOW);
        self.opaque.insert(name.to_string(), m);
        m
    }

    /// Bits of a name given on the command line: known names, or names seen in this trace.
    pub fn lookup(&self, name: &str) -> Option<GfpMask> {
        known_mask(name).or_else(|| self.opaque.get(name).copied())
    }

    /// Mask of an interned id (0 for an unknown id).
    pub fn mask(&self, id: u32) -> GfpMask {
        self.classes.get(id as usize).map_or(0, |c| c.mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composites_expand_to_bits() {
        let mut t = GfpTable::default();
        let a = t.intern(b"GFP_KERNEL_ACCOUNT|__GFP_ZERO|__GFP_COMP");
        let b = t.intern(b"GFP_HIGHUSER|__GFP_ACCOUNT");
        let c = t.intern(b"GFP_HIGHUSER_MOVABLE|__GFP_COMP");
        let ka = known_mask("GFP_KERNEL_ACCOUNT").unwrap();
        // Both print differently but carry every bit of GFP_KERNEL_ACCOUNT.
        assert_eq!(t.mask(a) & ka, ka);
        assert_eq!(t.mask(b) & ka, ka);
        assert_ne!(t.mask(c) & ka, ka);
        assert_eq!(t.intern(b"GFP_KERNEL_ACCOUNT|__GFP_ZERO|__GFP_COMP"), a);
        assert_eq!(t.classes[a as usize].count, 2);
        // GFP_NOWAIT cannot sleep; GFP_KERNEL can.
        assert_eq!(known_mask("GFP_NOWAIT").unwrap() & direct_reclaim_bit(), 0);
        assert_ne!(known_mask("GFP_KERNEL").unwrap() & direct_reclaim_bit(), 0);
    }

    #[test]
    fn unknown_names_are_opaque_bits() {
        let mut t = GfpTable::default();
        let a = t.intern(b"GFP_KERNEL|__GFP_FUTURE|0x8000000");
        let fut = t.lookup("__GFP_FUTURE").unwrap();
        let raw = t.lookup("0x8000000").unwrap();
        assert_ne!(fut, raw);
        assert_eq!(
            fut & ((1u64 << 32) - 1),
            0,
            "opaque bits stay clear of known ones"
        );
        assert_eq!(t.mask(a) & fut, fut);
        assert_eq!(t.lookup("__GFP_NEVER_SEEN"), None);
        for i in 0..100 {
            t.intern(format!("X{i}").as_bytes());
        }
        assert_eq!(t.lookup("X99"), Some(1 << 63));
    }
}
