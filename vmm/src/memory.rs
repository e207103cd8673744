//! Guest RAM: one anonymous, lazily backed host mapping at GPA 0, and the `--mem` size parser.

use std::str::FromStr;

use veil_abi::{IMAGE_MIN_GPA, PAGEBLOCK_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Largest RAM size Veil accepts (the direct map is built for at most this much).
pub const MAX_RAM: u64 = 64 << 30;
/// Default RAM size (`--mem`).
pub const DEFAULT_RAM: u64 = 256 << 20;
/// Smallest RAM size: the smallest reserved area (4 MiB) plus one managed pageblock.
pub const MIN_RAM: u64 = MIN_RESERVED + PAGEBLOCK_SIZE;
/// Smallest reserved area: the first pageblock and at least one pageblock of guest image.
pub const MIN_RESERVED: u64 = 2 * PAGEBLOCK_SIZE;

/// Errors about the guest RAM size or mapping.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    /// The size string is not a number with an optional K/M/G suffix.
    #[error("invalid memory size {0:?}: expected a number of bytes with an optional K, M or G suffix (e.g. 256M, 1G)")]
    Syntax(String),
    /// The size overflows 64 bits.
    #[error("memory size {0:?} is too large")]
    Overflow(String),
    /// The size is not a multiple of a pageblock.
    #[error("memory size {0} bytes is not a multiple of 2 MiB (the pageblock size)")]
    NotPageblockMultiple(u64),
    /// The size is below the minimum.
    #[error("memory size {size} bytes is too small: need at least {min} bytes ({} MiB)", min >> 20)]
    TooSmall {
        /// Requested size.
        size: u64,
        /// Minimum size.
        min: u64,
    },
    /// The size is above [`MAX_RAM`].
    #[error("memory size {0} bytes is too large: at most 64 GiB")]
    TooLarge(u64),
    /// The host refused the mapping.
    #[error("cannot map {size} bytes of guest RAM: {msg}")]
    Map {
        /// Requested size.
        size: u64,
        /// What the host said.
        msg: String,
    },
}

/// A validated guest RAM size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSize(pub u64);

impl MemSize {
    /// Checks the bounds and alignment of a size in bytes.
    pub fn new(size: u64) -> Result<MemSize, MemoryError> {
        if !size.is_multiple_of(PAGEBLOCK_SIZE) {
            return Err(MemoryError::NotPageblockMultiple(size));
        }
        if size < MIN_RAM {
            return Err(MemoryError::TooSmall { size, min: MIN_RAM });
        }
        if size > MAX_RAM {
            return Err(MemoryError::TooLarge(size));
        }
        Ok(MemSize(size))
    }
}

impl Default for MemSize {
    fn default() -> Self {
        MemSize(DEFAULT_RAM)
    }
}

/// Parses `256M`, `1G`, `4096K`, `268435456` (suffixes are binary: K = 1024); case-insensitive,
/// an optional trailing `B` or `iB` is accepted (`256MiB`).
pub fn parse_size(s: &str) -> Result<u64, MemoryError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        _ => (body, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MemoryError::Syntax(s.to_string()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| MemoryError::Overflow(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| MemoryError::Overflow(s.to_string()))
}

impl FromStr for MemSize {
    type Err = MemoryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MemSize::new(parse_size(s)?)
    }
}

impl std::fmt::Display for MemSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0;
        if v.is_multiple_of(1 << 30) {
            write!(f, "{}G", v >> 30)
        } else {
            write!(f, "{}M", v >> 20)
        }
    }
}

/// Guest RAM: `[0, size)` backed by one anonymous `MAP_NORESERVE` mapping, touched lazily.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    host_base: u64,
}

impl GuestRam {
    /// Maps `size` bytes of guest RAM (nothing is touched until used).
    pub fn new(size: MemSize) -> Result<GuestRam, MemoryError> {
        let len = usize::try_from(size.0).map_err(|_| MemoryError::TooLarge(size.0))?;
        // from_ranges maps MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).map_err(|e| {
            MemoryError::Map {
                size: size.0,
                msg: e.to_string(),
            }
        })?;
        let host_base = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| MemoryError::Map {
                size: size.0,
                msg: e.to_string(),
            })? as u64;
        Ok(GuestRam {
            mem,
            size: size.0,
            host_base,
        })
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of GPA 0.
    pub fn host_base(&self) -> u64 {
        self.host_base
    }

    /// The vm-memory view (for `Bytes` reads and writes).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Whether `[gpa, gpa + len)` lies inside RAM (no overflow).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Copies `buf` to guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
        self.mem.write_slice(buf, GuestAddress(gpa))
    }

    /// Copies guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        self.mem.read_slice(buf, GuestAddress(gpa))
    }

    /// Fills `[gpa, gpa + len)` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), vm_memory::GuestMemoryError> {
        let chunk = [byte; 4096];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(4096) as usize;
            self.write(gpa + off, &chunk[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// Counts the bytes equal to `byte` in `[gpa, gpa + len)`.
    pub fn count(&self, gpa: u64, len: u64, byte: u8) -> Result<u64, vm_memory::GuestMemoryError> {
        let mut buf = [0u8; 4096];
        let mut off = 0;
        let mut n_eq = 0u64;
        while off < len {
            let n = (len - off).min(4096) as usize;
            self.read(gpa + off, &mut buf[..n])?;
            n_eq += buf[..n].iter().filter(|&&b| b == byte).count() as u64;
            off += n as u64;
        }
        Ok(n_eq)
    }
}

/// The lowest GPA the allocator may manage: image end rounded up to a pageblock, at least
/// [`MIN_RESERVED`].
pub fn reserved_end_for(image_end: u64) -> u64 {
    let end = image_end.max(IMAGE_MIN_GPA);
    end.div_ceil(PAGEBLOCK_SIZE)
        .saturating_mul(PAGEBLOCK_SIZE)
        .max(MIN_RESERVED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096K").unwrap(), 4 << 20);
        assert_eq!(parse_size("268435456").unwrap(), 256 << 20);
        assert_eq!(parse_size("64GiB").unwrap(), 64 << 30);
        assert_eq!(parse_size("8MB").unwrap(), 8 << 20);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(parse_size(""), Err(MemoryError::Syntax(_))));
        assert!(matches!(parse_size("M"), Err(MemoryError::Syntax(_))));
        assert!(matches!(parse_size("12X"), Err(MemoryError::Syntax(_))));
        assert!(matches!(parse_size("-1M"), Err(MemoryError::Syntax(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(MemoryError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999G"),
            Err(MemoryError::Overflow(_))
        ));
        assert_eq!(
            "3M".parse::<MemSize>(),
            Err(MemoryError::NotPageblockMultiple(3 << 20))
        );
        assert!(matches!(
            "2M".parse::<MemSize>(),
            Err(MemoryError::TooSmall { .. })
        ));
        assert_eq!(
            "66G".parse::<MemSize>(),
            Err(MemoryError::TooLarge(66 << 30))
        );
        assert_eq!("6M".parse::<MemSize>(), Ok(MemSize(6 << 20)));
    }

    #[test]
    fn reserved_end_rounds_up() {
        assert_eq!(reserved_end_for(0), 4 << 20);
        assert_eq!(reserved_end_for(0x20_1000), 4 << 20);
        assert_eq!(reserved_end_for(0x40_0001), 6 << 20);
    }

    #[test]
    fn maps_64g_lazily() {
        let ram = GuestRam::new(MemSize(64 << 30)).unwrap();
        ram.fill(0x1000, 16, 7).unwrap();
        assert_eq!(ram.count(0x1000, 4096, 7).unwrap(), 16);
        assert!(ram.contains(0, 64 << 30));
        assert!(!ram.contains(u64::MAX, 2));
    }
}
