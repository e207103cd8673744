//! `memfd_secret(2)` memory: pages the host kernel removes from its own direct map, used by the
//! `mprotect` backend under `--host-secretmem` to back unmapped pageblocks (see
//! [`super::Mprotect::use_secretmem`]).
//!
//! Each unmapped range gets a fresh secret file of its own size, mapped over the range in both
//! views and closed at once: the mappings keep it alive, and when both are replaced by the
//! ordinary memfd again the file and its pages are gone (nothing to punch: secret files cannot
//! be truncated or hole-punched). Secret mappings are `VM_LOCKED`: each counts against
//! `RLIMIT_MEMLOCK` (without `CAP_IPC_LOCK`), so an unmapped byte costs two bytes of the limit
//! (guest view and VMM view); `mmap` fails with `EAGAIN` beyond it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::Serialize;

/// `SYS_memfd_secret` on x86-64 (libc 0.2 does not name it on every target).
const SYS_MEMFD_SECRET: libc::c_long = 447;
/// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` as the guest_memfd direct-map-removal series proposes it
/// (bit 2 of `KVM_CAP_GUEST_MEMFD_FLAGS`; not in Linux 6.18, whose flags are MMAP and
/// INIT_SHARED).
pub const GUEST_MEMFD_FLAG_NO_DIRECT_MAP: u64 = 1 << 2;

/// A fresh secret file of `len` bytes (close-on-exec).
pub fn create(len: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_secret takes one flags argument and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(SYS_MEMFD_SECRET, libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns (it fits an i32: it is a descriptor).
    let f = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let l = i64::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: ftruncate on a descriptor this function owns.
    if unsafe { libc::ftruncate(f.as_raw_fd(), l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Maps `fd` at file offset `off` over `[addr, addr + len)` (`MAP_SHARED | MAP_FIXED`) with
/// `prot`: whatever was mapped there is replaced in one call.
///
/// # Safety
/// `[addr, addr + len)` must be page aligned and lie inside a mapping this process owns that no
/// Rust reference points into (its contents change under it), and nothing may run on it
/// concurrently (the vCPU is stopped while the VMM handles an exit).
pub unsafe fn map_fixed(
    addr: u64,
    len: u64,
    prot: libc::c_int,
    fd: libc::c_int,
    off: u64,
) -> std::io::Result<()> {
    let off =
        libc::off_t::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: per this function's contract; MAP_FIXED replaces only the pages of the range.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Which host direct-map removal this host offers (`veil caps`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectMapRemoval {
    /// guest_memfd with `NO_DIRECT_MAP` ([`GUEST_MEMFD_FLAG_NO_DIRECT_MAP`] in
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`). Veil does not use it yet: where this is true, the
    /// guest_memfd route would be the one to build.
    pub guest_memfd_no_direct_map: bool,
    /// `memfd_secret(2)` works here (`--host-secretmem` can run).
    pub memfd_secret: bool,
    /// Why `memfd_secret` does not work (errno text), if it does not.
    pub memfd_secret_error: Option<String>,
    /// The mechanism `--host-secretmem` uses here: "memfd_secret" or "none".
    pub mechanism: &'static str,
    /// Bytes of unmapped guest RAM `--host-secretmem` can back with secret memory now: the
    /// memlock room left (limit minus what this process has locked) divided by two (both
    /// views count), in whole 2 MiB pageblocks. `None`: no limit (`CAP_IPC_LOCK` or an
    /// infinite `RLIMIT_MEMLOCK`).
    pub secret_bytes_allowed: Option<u64>,
}

/// Probes `memfd_secret` and the room the memlock limit leaves; `gmem_flags` is
/// `KVM_CAP_GUEST_MEMFD_FLAGS`, `memlock` the limit [`crate::caps::probe_memlock`] found.
pub fn probe(gmem_flags: u64, memlock: Option<u64>) -> DirectMapRemoval {
    let err = create(4096).err().map(|e| e.to_string());
    let locked = locked_bytes().unwrap_or(0);
    let pageblock = veil_abi::PAGEBLOCK_SIZE;
    DirectMapRemoval {
        guest_memfd_no_direct_map: gmem_flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0,
        memfd_secret: err.is_none(),
        mechanism: if err.is_none() {
            "memfd_secret"
        } else {
            "none"
        },
        memfd_secret_error: err,
        secret_bytes_allowed: memlock
            .map(|limit| limit.saturating_sub(locked) / 2 / pageblock * pageblock),
    }
}

/// `VmLck` of this process in bytes.
fn locked_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmLck:"))?;
    let kb: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}
