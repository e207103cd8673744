//! `--secret START,SIZE` ranges for foreign kernels: parsed, checked against RAM and each other,
//! and turned into the memory map (e820 / multiboot) that marks them reserved.

use thiserror::Error;

use crate::addr::Gpa;
use crate::foreign::multiboot::MapEntry;

/// Page size secret ranges are aligned to.
pub const SECRET_ALIGN: u64 = 4096;
/// Start of the legacy hole (EBDA, VGA, BIOS) reported reserved below 1 MiB.
pub const LOW_HOLE: u64 = 0x9f000;
/// End of the legacy hole.
pub const LOW_HOLE_END: u64 = 0x100000;

/// One `--secret` range: `[start, start + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecretRange {
    /// First byte.
    pub start: Gpa,
    /// Length in bytes.
    pub size: u64,
}

impl SecretRange {
    /// First byte after the range.
    pub fn end(&self) -> u64 {
        self.start.raw().saturating_add(self.size)
    }

    /// Whether `gpa` is inside.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.start.raw() && gpa < self.end()
    }

    /// Whether `[start, end)` meets the range.
    pub fn meets(&self, start: u64, end: u64) -> bool {
        start < self.end() && self.start.raw() < end
    }
}

/// A malformed or misplaced `--secret` range.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    /// Not `START,SIZE`.
    #[error("--secret {0:?}: expected START,SIZE (e.g. 0x10000000,16M; START in bytes, decimal or 0x hex; SIZE with an optional K/M/G suffix)")]
    Syntax(String),
    /// Empty range.
    #[error("--secret {0:?}: the size is zero")]
    Empty(String),
    /// Not page-aligned.
    #[error("--secret {start:#x},{size:#x}: start and size must be multiples of 4 KiB")]
    Unaligned {
        /// Start.
        start: u64,
        /// Size.
        size: u64,
    },
    /// Outside RAM or in the low MiB.
    #[error("--secret {start:#x},{size:#x}: outside guest RAM [0x100000, {ram_size:#x}) (the first MiB holds the boot structures)")]
    OutOfRam {
        /// Start.
        start: u64,
        /// Size.
        size: u64,
        /// RAM size.
        ram_size: u64,
    },
    /// Two ranges overlap.
    #[error("--secret ranges [{a:#x}, {a_end:#x}) and [{b:#x}, {b_end:#x}) overlap")]
    Overlap {
        /// First range start.
        a: u64,
        /// First range end.
        a_end: u64,
        /// Second range start.
        b: u64,
        /// Second range end.
        b_end: u64,
    },
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16).ok(),
        None => crate::memory::parse_size(s).ok(),
    }
}

/// Parses `START,SIZE`.
pub fn parse(s: &str) -> Result<SecretRange, SecretError> {
    {
        let (a, b) = s
            .split_once(',')
            .ok_or_else(|| SecretError::Syntax(s.into()))?;
        let start = parse_u64(a).ok_or_else(|| SecretError::Syntax(s.into()))?;
        let size = parse_u64(b).ok_or_else(|| SecretError::Syntax(s.into()))?;
        if size == 0 {
            return Err(SecretError::Empty(s.into()));
        }
        if !start.is_multiple_of(SECRET_ALIGN) || !size.is_multiple_of(SECRET_ALIGN) {
            return Err(SecretError::Unaligned { start, size });
        }
        Ok(SecretRange {
            start: Gpa(start),
            size,
        })
    }
}

/// Checks `ranges` against RAM and each other; returns them sorted by start.
pub fn check(ranges: &[SecretRange], ram_size: u64) -> Result<Vec<SecretRange>, SecretError> {
    let mut v = ranges.to_vec();
    for r in &v {
        let end = r.start.raw().checked_add(r.size);
        if r.start.raw() < LOW_HOLE_END || end.is_none_or(|e| e > ram_size) {
            return Err(SecretError::OutOfRam {
                start: r.start.raw(),
                size: r.size,
                ram_size,
            });
        }
    }
    v.sort_by_key(|r| r.start);
    for w in v.windows(2) {
        if w[1].start.raw() < w[0].end() {
            return Err(SecretError::Overlap {
                a: w[0].start.raw(),
                a_end: w[0].end(),
                b: w[1].start.raw(),
                b_end: w[1].end(),
            });
        }
    }
    Ok(v)
}

/// The memory map of `ram_size` bytes of RAM with the legacy hole and `secrets` (sorted,
/// checked) reserved.
pub fn memory_map(ram_size: u64, secrets: &[SecretRange]) -> Vec<MapEntry> {
    let mut map = vec![
        MapEntry {
            start: 0,
            end: LOW_HOLE,
            usable: true,
        },
        MapEntry {
            start: LOW_HOLE,
            end: LOW_HOLE_END,
            usable: false,
        },
    ];
    let mut at = LOW_HOLE_END;
    for s in secrets {
        if s.start.raw() > at {
            map.push(MapEntry {
                start: at,
                end: s.start.raw(),
                usable: true,
            });
        }
        map.push(MapEntry {
            start: s.start.raw(),
            end: s.end(),
            usable: false,
        });
        at = s.end();
    }
    if at < ram_size {
        map.push(MapEntry {
            start: at,
            end: ram_size,
            usable: true,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let r: SecretRange = "0x10000000,16M".parse().unwrap();
        assert_eq!(r.start, Gpa(0x1000_0000));
        assert_eq!(r.size, 16 << 20);
        assert!(matches!(
            "0x1000".parse::<SecretRange>(),
            Err(SecretError::Syntax(_))
        ));
        assert!(matches!(
            "0x1001,4096".parse::<SecretRange>(),
            Err(SecretError::Unaligned { .. })
        ));
        assert!(matches!(
            "0x1000,0".parse::<SecretRange>(),
            Err(SecretError::Empty(_))
        ));
    }

    #[test]
    fn checks_ram_and_overlap() {
        let ram = 64 << 20;
        let a: SecretRange = "0x1000000,1M".parse().unwrap();
        let b: SecretRange = "0x1080000,1M".parse().unwrap();
        assert!(matches!(
            check(&[a, b], ram),
            Err(SecretError::Overlap { .. })
        ));
        let out: SecretRange = "0x3f00000,2M".parse().unwrap();
        assert!(matches!(
            check(&[out], ram),
            Err(SecretError::OutOfRam { .. })
        ));
        let low: SecretRange = "0x80000,4K".parse().unwrap();
        assert!(matches!(
            check(&[low], ram),
            Err(SecretError::OutOfRam { .. })
        ));
        let c: SecretRange = "0x2000000,1M".parse().unwrap();
        assert_eq!(check(&[c, a], ram).unwrap(), vec![a, c]);
    }

    #[test]
    fn map_reserves_the_ranges() {
        let a: SecretRange = "0x1000000,1M".parse().unwrap();
        let map = memory_map(64 << 20, &[a]);
        let reserved: Vec<_> = map.iter().filter(|e| !e.usable).collect();
        assert_eq!(reserved.len(), 2);
        assert_eq!(reserved[1].start, 0x100_0000);
        assert_eq!(reserved[1].end, 0x110_0000);
        assert_eq!(map.last().unwrap().end, 64 << 20);
        let total: u64 = map.iter().map(|e| e.end - e.start).sum();
        assert_eq!(total, 64 << 20);
    }
}
