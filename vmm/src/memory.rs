//! Guest RAM: one lazily backed host mapping at GPA 0 (kept out of core dumps unless asked
//! for) — private anonymous memory, or a memfd when a second mapping of the same pages is needed
//! (the `mprotect` stage-2 backend) — its zeroing and wiping without touching memory that is
//! already zero, and the `--mem` size parser.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::str::FromStr;

use crate::stage2::LockStats;
use replay::size::{SizeError, RUN_MEM};
use veil_abi::{IMAGE_MIN_GPA, PAGEBLOCK_SIZE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Largest RAM size Veil accepts (the direct map is built for at most this much).
pub const MAX_RAM: u64 = RUN_MEM.max;
/// Default RAM size (`--mem`).
pub const DEFAULT_RAM: u64 = 256 << 20;
/// Smallest RAM size: the smallest reserved area (4 MiB) plus one managed pageblock.
pub const MIN_RAM: u64 = MIN_RESERVED + PAGEBLOCK_SIZE;
/// Smallest reserved area: the first pageblock and at least one pageblock of guest image.
pub const MIN_RESERVED: u64 = 2 * PAGEBLOCK_SIZE;
const _: () = assert!(RUN_MEM.min == MIN_RAM && RUN_MEM.multiple == PAGEBLOCK_SIZE);

/// Errors about the guest RAM size or mapping.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    /// The size is malformed or out of `veil run --mem`'s bounds ([`replay::size::RUN_MEM`]).
    #[error("memory size {size}: {error}")]
    Size {
        /// The size as given (or in bytes).
        size: String,
        /// What is wrong with it.
        #[source]
        error: SizeError,
    },
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
    /// Checks the bounds and alignment of a size in bytes ([`replay::size::RUN_MEM`]).
    pub fn new(size: u64) -> Result<MemSize, MemoryError> {
        RUN_MEM.check(size).map_err(|problem| MemoryError::Size {
            size: replay::size::human(size),
            error: SizeError {
                problem,
                bare: true,
                suggestions: Vec::new(),
            },
        })?;
        Ok(MemSize(size))
    }
}

impl Default for MemSize {
    fn default() -> Self {
        MemSize(DEFAULT_RAM)
    }
}

/// Parses a size without bounds: `256M`, `1G`, `4096K`, `268435456`, `1T` (binary units,
/// case-insensitive, `B`/`iB` optional), the syntax of every size on the command line.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    replay::size::ANY.parse(s)
}

impl FromStr for MemSize {
    type Err = MemoryError;
    /// `--mem`'s syntax and bounds, worded as `veil replay --mem` is.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RUN_MEM
            .parse(s)
            .map(MemSize)
            .map_err(|error| MemoryError::Size {
                size: s.to_string(),
                error,
            })
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

/// Whether guest RAM appears in the VMM's core dumps (`veil run --dump-guest-core`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CoreDump {
    /// Excluded (`MADV_DONTDUMP`): the default.
    #[default]
    Exclude,
    /// Included, for debugging the guest from a VMM core.
    Include,
}

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// A private anonymous mapping (zeroing: `MADV_DONTNEED`).
    #[default]
    Anonymous,
    /// A memfd mapped shared, so the same pages can be mapped a second time (zeroing:
    /// `fallocate(PUNCH_HOLE)`; `MADV_DONTNEED` does not zero shared memory).
    Memfd,
}

/// Guest RAM: `[0, size)` backed by one `MAP_NORESERVE` mapping (the VMM's view of the pages),
/// touched lazily and excluded from core dumps (`MADV_DONTDUMP`) unless [`CoreDump::Include`].
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    host_base: u64,
    core: CoreDump,
    /// The memfd under a [`Backing::Memfd`] mapping.
    memfd: Option<File>,
}

impl GuestRam {
    /// Maps `size` bytes of guest RAM (nothing is touched until used), out of core dumps.
    pub fn new(size: MemSize) -> Result<GuestRam, MemoryError> {
        GuestRam::with_core_dump(size, CoreDump::Exclude)
    }

    /// Maps `size` bytes of guest RAM; `core` says whether it may appear in core dumps.
    pub fn with_core_dump(size: MemSize, core: CoreDump) -> Result<GuestRam, MemoryError> {
        GuestRam::create(size, core, Backing::Anonymous)
    }

    /// Maps `size` bytes of guest RAM backed by `backing`; `core` says whether it may appear in
    /// core dumps.
    pub fn create(
        size: MemSize,
        core: CoreDump,
        backing: Backing,
    ) -> Result<GuestRam, MemoryError> {
        let len = usize::try_from(size.0).map_err(|_| MemoryError::Map {
            size: size.0,
            msg: "larger than this host's address space".into(),
        })?;
        let map_err = |msg: String| MemoryError::Map { size: size.0, msg };
        let (file, memfd) = match backing {
            Backing::Anonymous => (None, None),
            Backing::Memfd => {
                let f = memfd(size.0).map_err(|e| map_err(format!("memfd: {e}")))?;
                let dup = f.try_clone().map_err(|e| map_err(format!("memfd: {e}")))?;
                (Some(FileOffset::new(dup, 0)), Some(f))
            }
        };
        // Without a file this maps MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE; with the memfd,
        // MAP_SHARED | MAP_NORESERVE.
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, file)])
            .map_err(|e| map_err(e.to_string()))?;
        let host_base = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| MemoryError::Map {
                size: size.0,
                msg: e.to_string(),
            })? as u64;
        if core == CoreDump::Exclude {
            // SAFETY: [host_base, host_base + len) is the mapping vm-memory just created and
            // owns; MADV_DONTDUMP only changes which VMAs a core dump includes.
            let r =
                unsafe { libc::madvise(host_base as *mut libc::c_void, len, libc::MADV_DONTDUMP) };
            if r != 0 {
                return Err(MemoryError::Map {
                    size: size.0,
                    msg: format!(
                        "madvise(MADV_DONTDUMP) failed: {}",
                        std::io::Error::last_os_error()
                    ),
                });
            }
        }
        Ok(GuestRam {
            mem,
            size: size.0,
            host_base,
            core,
            memfd,
        })
    }

    /// The memfd under this RAM ([`Backing::Memfd`]), for a second mapping of its pages.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// What backs this RAM.
    pub fn backing(&self) -> Backing {
        match self.memfd {
            Some(_) => Backing::Memfd,
            None => Backing::Anonymous,
        }
    }

    /// Whether this RAM may appear in core dumps.
    pub fn core_dump(&self) -> CoreDump {
        self.core
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

    /// Fills `[gpa, gpa + len)` with `byte`, in place (no copy of the pattern is left behind
    /// in VMM memory, e.g. on the stack).
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), vm_memory::GuestMemoryError> {
        let s = self.host_slice(gpa, len)?;
        // SAFETY: `s` is a checked range of this live mapping; u8 has no alignment or validity
        // requirements; vm-memory only touches guest RAM through volatile copies and the vCPU
        // does not run while the VMM handles an exit, so nothing else writes it concurrently.
        unsafe { std::ptr::write_bytes(s, byte, len as usize) };
        Ok(())
    }

    /// Counts the bytes equal to `byte` in `[gpa, gpa + len)`, in place (no copy of guest data
    /// is made in VMM memory).
    pub fn count(&self, gpa: u64, len: u64, byte: u8) -> Result<u64, vm_memory::GuestMemoryError> {
        let s = self.host_slice(gpa, len)?;
        // SAFETY: as in `fill`: a checked range of this live mapping that nothing writes while
        // the shared slice exists (the vCPU is stopped while the VMM handles an exit).
        let bytes = unsafe { std::slice::from_raw_parts(s, len as usize) };
        Ok(bytes.iter().filter(|&&b| b == byte).count() as u64)
    }

    /// The host address of `[gpa, gpa + len)` after checking it lies inside RAM.
    fn host_slice(&self, gpa: u64, len: u64) -> Result<*mut u8, vm_memory::GuestMemoryError> {
        if !self.contains(gpa, len) || usize::try_from(len).is_err() {
            return Err(vm_memory::GuestMemoryError::InvalidGuestAddress(
                GuestAddress(gpa),
            ));
        }
        Ok((self.host_base + gpa) as *mut u8)
    }

    /// Zeroes `[gpa, gpa + len)` without touching pages that are already zero: partial pages at
    /// the edges are written, whole pages are released (`MADV_DONTNEED`: the next access sees a
    /// fresh zero page, so a fresh mapping costs no RSS). Locked pages are unlocked first.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), vm_memory::GuestMemoryError> {
        if !self.contains(gpa, len) {
            return Err(vm_memory::GuestMemoryError::InvalidGuestAddress(
                GuestAddress(gpa),
            ));
        }
        let end = gpa + len;
        let page_start = gpa.next_multiple_of(PAGE).min(end);
        let page_end = (end / PAGE * PAGE).max(page_start);
        for (s, e) in [(gpa, page_start), (page_end, end)] {
            if s < e {
                self.fill(s, e - s, 0)?;
            }
        }
        if page_start < page_end {
            let len = page_end - page_start;
            let r = match &self.memfd {
                Some(f) => punch_hole(f, page_start, len),
                // SAFETY: [page_start, page_end) lies inside this private anonymous mapping
                // (checked above) and is page aligned (host_base comes from mmap); no Rust
                // reference points into guest RAM (vm-memory accesses it through volatile
                // copies).
                None => unsafe { release_pages(self.host_base + page_start, len) },
            };
            r.map_err(vm_memory::GuestMemoryError::IOError)?;
        }
        Ok(())
    }

    /// Wipes `[gpa, gpa + len)` (page aligned): every resident page is overwritten with zeroes
    /// (so the secret does not linger in a freed host page) and then released. Returns the
    /// bytes that were resident and overwritten.
    pub fn wipe(&self, gpa: u64, len: u64) -> Result<u64, vm_memory::GuestMemoryError> {
        let wiped = self.zero_resident(gpa, len)?;
        self.zero(gpa, len)?;
        Ok(wiped)
    }

    /// Overwrites every resident page of `[gpa, gpa + len)` (page aligned) with zeroes through
    /// this mapping and releases nothing: the zeroing for memory that cannot be released by a
    /// hole (`memfd_secret` pages, `--host-secretmem`). Pages that are not resident read zero
    /// already. Returns the bytes overwritten.
    pub fn zero_resident(&self, gpa: u64, len: u64) -> Result<u64, vm_memory::GuestMemoryError> {
        if !self.contains(gpa, len) || !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(vm_memory::GuestMemoryError::InvalidGuestAddress(
                GuestAddress(gpa),
            ));
        }
        let mut resident = vec![0u8; (len / PAGE) as usize];
        // SAFETY: the range is page aligned and inside this mapping; `resident` has one byte per
        // page of it, as mincore(2) requires.
        let r = unsafe {
            libc::mincore(
                (self.host_base + gpa) as *mut libc::c_void,
                len as usize,
                resident.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(vm_memory::GuestMemoryError::IOError(
                std::io::Error::last_os_error(),
            ));
        }
        let mut wiped = 0;
        for (i, flags) in resident.iter().enumerate() {
            if flags & 1 != 0 {
                self.fill(gpa + i as u64 * PAGE, PAGE, 0)?;
                wiped += PAGE;
            }
        }
        Ok(wiped)
    }
}

const PAGE: u64 = 4096;

/// A sealed-size memfd of `size` bytes for guest RAM.
fn memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated static string; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"veil-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// Frees whole pages `[off, off + len)` of a memfd: later reads through any mapping see zeroes.
fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    let (o, l) = match (i64::try_from(off), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    };
    // SAFETY: fallocate on an fd this process owns; punching a hole frees page-cache pages and
    // every mapping of them sees zero pages afterwards; no Rust reference points into them.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Locks `[addr, addr + len)` against swap as it is faulted in (`mlock2(MLOCK_ONFAULT)`) or
/// unlocks it, counting into `stats`. Best effort: a failed lock (over `RLIMIT_MEMLOCK`) is
/// counted, not returned.
///
/// # Safety
/// `[addr, addr + len)` must lie inside one live mapping of this process.
pub unsafe fn set_locked(addr: u64, len: u64, locked: bool, stats: &mut LockStats) {
    let p = addr as *mut libc::c_void;
    let n = len as usize;
    if locked {
        // SAFETY: per this function's contract; MLOCK_ONFAULT neither populates nor moves the
        // mapping.
        if unsafe { libc::mlock2(p, n, libc::MLOCK_ONFAULT) } == 0 {
            stats.locked_bytes += len;
            stats.peak_locked_bytes = stats.peak_locked_bytes.max(stats.locked_bytes);
        } else {
            stats.failed_bytes += len;
            stats.errno = std::io::Error::last_os_error().raw_os_error();
        }
    } else {
        // SAFETY: as above; munlock of a range that is not locked is a no-op.
        unsafe { libc::munlock(p, n) };
        stats.locked_bytes = stats.locked_bytes.saturating_sub(len);
    }
}

/// Releases whole pages of a private anonymous mapping (`MADV_DONTNEED`), unlocking them first
/// if they are locked (`MADV_DONTNEED` fails with `EINVAL` on locked memory) and locking them
/// again, on fault, afterwards.
///
/// # Safety
/// `[addr, addr + len)` must be page aligned, inside one live private anonymous mapping that no
/// Rust reference points into.
pub unsafe fn release_pages(addr: u64, len: u64) -> std::io::Result<()> {
    let p = addr as *mut libc::c_void;
    let n = len as usize;
    // SAFETY: per this function's contract.
    if unsafe { libc::madvise(p, n, libc::MADV_DONTNEED) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // SAFETY: munlock/madvise/mlock2 on a range of a live mapping (this function's contract);
    // none of them moves or unmaps it.
    unsafe {
        if libc::munlock(p, n) != 0 || libc::madvise(p, n, libc::MADV_DONTNEED) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Locked again lazily (pages lock as they are faulted in); failure leaves them unlocked,
        // which the lock statistics of the stage-2 backend report.
        let _ = libc::mlock2(p, n, libc::MLOCK_ONFAULT);
    }
    Ok(())
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
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("64GiB").unwrap(), 64 << 30);
        assert_eq!("6M".parse::<MemSize>(), Ok(MemSize(6 << 20)));
        assert_eq!("64G".parse::<MemSize>(), Ok(MemSize(64 << 30)));
    }

    /// The wording is replay::size's (unit-tested there); here: that --mem uses its bounds.
    #[test]
    fn rejects_bad_sizes_in_the_shared_words() {
        let e = |s: &str| s.parse::<MemSize>().unwrap_err().to_string();
        assert_eq!(e("3M"), "memory size 3M: at least 6M");
        assert_eq!(e("100T"), "memory size 100T: at most 64G");
        assert_eq!(
            e("3"),
            "memory size 3: 3 bytes is not a multiple of 2 MiB; did you mean 3G?"
        );
        assert!(e("12X").starts_with("memory size 12X: not a size"));
        assert_eq!(
            MemSize::new((6 << 20) + 1).unwrap_err().to_string(),
            "memory size 6291457: 6291457 bytes is not a multiple of 2 MiB"
        );
        assert!(parse_size("-1M").is_err());
    }

    #[test]
    fn reserved_end_rounds_up() {
        assert_eq!(reserved_end_for(0), 4 << 20);
        assert_eq!(reserved_end_for(0x20_1000), 4 << 20);
        assert_eq!(reserved_end_for(0x40_0001), 6 << 20);
    }

    #[test]
    fn zero_and_wipe_work_on_locked_pages_and_touch_nothing_fresh() {
        let ram = GuestRam::new(MemSize(16 << 20)).unwrap();
        let (gpa, len) = (8 << 20, 64 << 10);
        ram.fill(gpa, len, 0x5a).unwrap();
        // SAFETY: a range inside the live mapping; mlock2 neither moves nor unmaps it.
        let locked = unsafe {
            libc::mlock2(
                (ram.host_base() + gpa) as *mut libc::c_void,
                len as usize,
                libc::MLOCK_ONFAULT,
            )
        } == 0;
        // Partial edges are written, whole pages released, locked or not.
        ram.zero(gpa + 100, len - 200).unwrap();
        assert_eq!(ram.count(gpa, 100, 0x5a).unwrap(), 100);
        assert_eq!(ram.count(gpa + 100, len - 200, 0).unwrap(), len - 200);
        assert_eq!(ram.count(gpa + len - 100, 100, 0x5a).unwrap(), 100);
        ram.fill(gpa, len, 0x5a).unwrap();
        assert_eq!(ram.wipe(gpa, len).unwrap(), len, "locked={locked}");
        assert_eq!(ram.count(gpa, len, 0).unwrap(), len);
        // Nothing resident in a fresh range: nothing to overwrite.
        assert_eq!(ram.wipe(12 << 20, 1 << 20).unwrap(), 0);
        assert!(ram.wipe(gpa + 1, 4096).is_err());
        assert!(ram.zero(16 << 20, 1).is_err());
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
