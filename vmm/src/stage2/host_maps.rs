//! What the host kernel has mapped in this process over an address range, read from
//! `/proc/self/maps`: protections and which mappings are `memfd_secret` memory. The
//! reconciliation of the `mprotect` backend (`--verify-stage2`) reads the protections actually
//! in force here, not the backend's own record of them.

/// One mapping (or the part of it inside the range asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMap {
    /// First host address.
    pub start: u64,
    /// Host address one past the end.
    pub end: u64,
    /// `r` in the permissions column.
    pub read: bool,
    /// `w` in the permissions column.
    pub write: bool,
    /// The mapping is `memfd_secret` memory (path `/secretmem`).
    pub secret: bool,
}

/// Why the maps could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostMapsError {
    /// Reading `/proc/self/maps` failed.
    #[error("cannot read /proc/self/maps: {0}")]
    Read(#[from] std::io::Error),
    /// A line did not parse.
    #[error("unparsable /proc/self/maps line {0:?}")]
    Parse(String),
    /// Part of the range is not mapped at all.
    #[error("host range [{start:#x}, {end:#x}) is not mapped")]
    Hole {
        /// First unmapped host address.
        start: u64,
        /// End of the hole.
        end: u64,
    },
}

/// The mappings covering [start, end) in this process, clipped to it, in address order.
pub fn read(start: u64, end: u64) -> Result<Vec<HostMap>, HostMapsError> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    parse(&text, start, end)
}

/// [`read`] over the text of a maps file.
pub fn parse(text: &str, start: u64, end: u64) -> Result<Vec<HostMap>, HostMapsError> {
    let mut out = Vec::new();
    let mut covered = start;
    for line in text.lines() {
        let bad = || HostMapsError::Parse(line.to_string());
        let mut cols = line.split_ascii_whitespace();
        let (range, perms) = (cols.next().ok_or_else(bad)?, cols.next().ok_or_else(bad)?);
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        let a = u64::from_str_radix(a, 16).map_err(|_| bad())?;
        let b = u64::from_str_radix(b, 16).map_err(|_| bad())?;
        if b <= start || a >= end {
            continue;
        }
        // offset, device, inode, then the path (may be absent or contain spaces).
        let path = cols.nth(3).unwrap_or("");
        let (a, b) = (a.max(start), b.min(end));
        if a > covered {
            return Err(HostMapsError::Hole {
                start: covered,
                end: a,
            });
        }
        let p = perms.as_bytes();
        out.push(HostMap {
            start: a,
            end: b,
            read: p.first() == Some(&b'r'),
            write: p.get(1) == Some(&b'w'),
            secret: path.starts_with("/secretmem"),
        });
        covered = b;
    }
    if covered < end {
        return Err(HostMapsError::Hole {
            start: covered,
            end,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f0000000000-7f0000200000 rw-s 00000000 00:01 12 /memfd:veil-guest-ram (deleted)
7f0000200000-7f0000400000 ---s 00000000 00:0e 13 /secretmem (deleted)
7f0000400000-7f0000401000 r--s 00400000 00:01 12 /memfd:veil-guest-ram (deleted)
7f0000401000-7f0000800000 ---s 00401000 00:01 12 /memfd:veil-guest-ram (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";

    #[test]
    fn clips_and_classifies() {
        let m = parse(MAPS, 0x7f00_0010_0000, 0x7f00_0040_1000).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].start, 0x7f00_0010_0000);
        assert!(m[0].read && m[0].write && !m[0].secret);
        assert!(!m[1].read && !m[1].write && m[1].secret);
        assert!(m[2].read && !m[2].write && !m[2].secret);
        assert_eq!(m[2].end, 0x7f00_0040_1000);
    }

    #[test]
    fn holes_and_garbage_are_errors() {
        assert!(matches!(
            parse(MAPS, 0x7f00_0000_0000, 0x7f00_0090_0000),
            Err(HostMapsError::Hole {
                start: 0x7f00_0080_0000,
                ..
            })
        ));
        assert!(matches!(
            parse("zz-10 rw-p", 0, 0x10),
            Err(HostMapsError::Parse(_))
        ));
        assert!(matches!(
            parse("", 0, 0x1000),
            Err(HostMapsError::Hole { .. })
        ));
    }
}
