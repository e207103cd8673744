//! KVM's binary statistics for a VM (`KVM_GET_STATS_FD`).
//!
//! Layout per the kernel's `Documentation/virt/kvm/api.rst` ("KVM_GET_STATS_FD"): the file
//! starts with a `kvm_stats_header` { flags, name_size, num_desc, id_offset, desc_offset,
//! data_offset } (six u32); at `desc_offset` lie `num_desc` descriptors of
//! `16 + name_size` bytes each ({ flags u32, exponent s16, size u16, offset u32, bucket_size
//! u32, `name[name_size]` }); the values of a descriptor are `size` u64 at
//! `data_offset + offset`. kvm-ioctls 0.25 does not wrap the ioctl, so it is issued here.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use serde::Serialize;

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)` (include/uapi/linux/kvm.h).
const KVM_GET_STATS_FD: u64 = (0xae << 8) | 0xce;
/// Size of `kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of the fixed part of `kvm_stats_desc`.
const DESC_FIXED: usize = 16;
/// Upper bound on descriptors accepted (a sanity limit against a corrupt header).
const MAX_DESCS: u32 = 4096;
/// Upper bound on `name_size`.
const MAX_NAME_SIZE: u32 = 4096;
/// Upper bound on values per stat.
const MAX_VALUES: u16 = 4096;

/// What a statistic measures (`KVM_STATS_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatKind {
    /// Monotonic counter.
    Cumulative,
    /// Current value.
    Instant,
    /// Highest value seen.
    Peak,
    /// Linear histogram (values are buckets).
    LinearHist,
    /// Logarithmic histogram (values are buckets).
    LogHist,
    /// A type this code does not know.
    Unknown,
}

/// Unit of a statistic (`KVM_STATS_UNIT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatUnit {
    /// Plain count.
    None,
    /// Bytes.
    Bytes,
    /// Seconds (scaled by the exponent).
    Seconds,
    /// CPU cycles.
    Cycles,
    /// 0 or 1.
    Boolean,
    /// A unit this code does not know.
    Unknown,
}

/// One statistic of the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stat {
    /// Name as KVM spells it (e.g. "remote_tlb_flush_requests").
    pub name: String,
    /// The value; the sum of all values for multi-value stats (histograms).
    pub value: u64,
    /// Unit.
    pub unit: StatUnit,
    /// Kind.
    pub kind: StatKind,
    /// Power (of 10 or 2, see `base2`) the value is scaled by (e.g. -9 for nanoseconds).
    pub exponent: i16,
    /// Whether the exponent is a power of 2 rather than 10.
    pub base2: bool,
    /// Number of u64 values (1 for scalars, buckets for histograms).
    pub values: u16,
}

/// Why the statistics could not be read.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum StatsError {
    /// The host lacks KVM_CAP_BINARY_STATS_FD.
    #[error("this KVM lacks KVM_CAP_BINARY_STATS_FD")]
    NotSupported,
    /// The KVM_GET_STATS_FD ioctl failed.
    #[error("KVM_GET_STATS_FD failed: {0}")]
    Ioctl(std::io::Error),
    /// Reading the stats file failed.
    #[error("reading KVM stats")]
    Io(#[from] std::io::Error),
    /// The stats file does not follow the documented layout.
    #[error("malformed KVM stats data: {0}")]
    Malformed(&'static str),
}

/// The parsed `kvm_stats_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsHeader {
    /// Bytes of the name field of every descriptor (including the NUL).
    pub name_size: u32,
    /// Number of descriptors.
    pub num_desc: u32,
    /// Offset of the id string.
    pub id_offset: u32,
    /// Offset of the descriptor block.
    pub desc_offset: u32,
    /// Offset of the data block.
    pub data_offset: u32,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// Parses a `kvm_stats_header` from the first 24 bytes of `b`.
pub fn parse_header(b: &[u8]) -> Result<StatsHeader, StatsError> {
    let f = |i: usize| u32_at(b, i * 4).ok_or(StatsError::Malformed("short header"));
    let h = StatsHeader {
        name_size: f(1)?,
        num_desc: f(2)?,
        id_offset: f(3)?,
        desc_offset: f(4)?,
        data_offset: f(5)?,
    };
    if h.num_desc > MAX_DESCS || h.name_size == 0 || h.name_size > MAX_NAME_SIZE {
        return Err(StatsError::Malformed("implausible header"));
    }
    Ok(h)
}

/// One parsed descriptor (name and where its values live).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatDesc {
    /// Name.
    pub name: String,
    /// Raw `flags` (type, unit, base).
    pub flags: u32,
    /// Exponent.
    pub exponent: i16,
    /// Number of u64 values.
    pub size: u16,
    /// Offset of the values from the data block.
    pub offset: u32,
}

/// Parses the descriptor block `b` (exactly `num_desc * (16 + name_size)` bytes).
pub fn parse_descs(h: &StatsHeader, b: &[u8]) -> Result<Vec<StatDesc>, StatsError> {
    let stride = DESC_FIXED + h.name_size as usize;
    if b.len() < stride * h.num_desc as usize {
        return Err(StatsError::Malformed("short descriptor block"));
    }
    (0..h.num_desc as usize)
        .map(|i| {
            let d = &b[i * stride..(i + 1) * stride];
            let flags = u32_at(d, 0).ok_or(StatsError::Malformed("desc"))?;
            let exponent = i16::from_ne_bytes([d[4], d[5]]);
            let size = u16::from_ne_bytes([d[6], d[7]]);
            let offset = u32_at(d, 8).ok_or(StatsError::Malformed("desc"))?;
            let raw = &d[DESC_FIXED..];
            let len = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            let name = String::from_utf8_lossy(&raw[..len]).into_owned();
            if name.is_empty() || size > MAX_VALUES {
                return Err(StatsError::Malformed("empty name or too many values"));
            }
            Ok(StatDesc {
                name,
                flags,
                exponent,
                size,
                offset,
            })
        })
        .collect()
}

/// Turns descriptors and the data block into [`Stat`]s.
pub fn build_stats(descs: &[StatDesc], data: &[u8]) -> Result<Vec<Stat>, StatsError> {
    use kvm_bindings::*;
    descs
        .iter()
        .map(|d| {
            let start = d.offset as usize;
            let end = start + 8 * d.size as usize;
            let bytes = data
                .get(start..end)
                .ok_or(StatsError::Malformed("value outside the data block"))?;
            let value = bytes
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
                .fold(0u64, u64::wrapping_add);
            let kind = match d.flags & KVM_STATS_TYPE_MASK {
                KVM_STATS_TYPE_CUMULATIVE => StatKind::Cumulative,
                KVM_STATS_TYPE_INSTANT => StatKind::Instant,
                KVM_STATS_TYPE_PEAK => StatKind::Peak,
                KVM_STATS_TYPE_LINEAR_HIST => StatKind::LinearHist,
                KVM_STATS_TYPE_LOG_HIST => StatKind::LogHist,
                _ => StatKind::Unknown,
            };
            let unit = match d.flags & KVM_STATS_UNIT_MASK {
                KVM_STATS_UNIT_NONE => StatUnit::None,
                KVM_STATS_UNIT_BYTES => StatUnit::Bytes,
                KVM_STATS_UNIT_SECONDS => StatUnit::Seconds,
                KVM_STATS_UNIT_CYCLES => StatUnit::Cycles,
                KVM_STATS_UNIT_BOOLEAN => StatUnit::Boolean,
                _ => StatUnit::Unknown,
            };
            Ok(Stat {
                name: d.name.clone(),
                value,
                unit,
                kind,
                exponent: d.exponent,
                base2: d.flags & KVM_STATS_BASE_MASK == KVM_STATS_BASE_POW2,
                values: d.size,
            })
        })
        .collect()
}

/// Reads every statistic from an open stats file.
pub fn read_stats_file(f: &File) -> Result<Vec<Stat>, StatsError> {
    let mut hb = [0u8; HEADER_SIZE];
    f.read_exact_at(&mut hb, 0)?;
    let h = parse_header(&hb)?;
    let mut db = vec![0u8; (DESC_FIXED + h.name_size as usize) * h.num_desc as usize];
    f.read_exact_at(&mut db, u64::from(h.desc_offset))?;
    let descs = parse_descs(&h, &db)?;
    let data_len = descs
        .iter()
        .map(|d| d.offset as usize + 8 * d.size as usize)
        .max()
        .unwrap_or(0);
    let mut data = vec![0u8; data_len];
    f.read_exact_at(&mut data, u64::from(h.data_offset))?;
    build_stats(&descs, &data)
}

/// Read the VM's binary stats (KVM_GET_STATS_FD). Err if the host lacks KVM_CAP_BINARY_STATS_FD.
pub fn read_vm_stats(vm: &kvm_ioctls::VmFd) -> Result<Vec<Stat>, StatsError> {
    if vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_BINARY_STATS_FD)) <= 0 {
        return Err(StatsError::NotSupported);
    }
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file descriptor (or -1); the
    // VM fd is valid for the duration of the call because `vm` borrows it.
    let fd = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_STATS_FD as _) };
    if fd < 0 {
        return Err(StatsError::Ioctl(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor returned by the kernel that nothing else owns; the File
    // takes ownership and closes it.
    let f = unsafe { File::from_raw_fd(fd) };
    read_stats_file(&f)
}

/// The value of the stat named `name`, if present.
pub fn find<'a>(stats: &'a [Stat], name: &str) -> Option<&'a Stat> {
    stats.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc_bytes(name: &str, name_size: usize, flags: u32, size: u16, offset: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&0i16.to_ne_bytes());
        v.extend_from_slice(&size.to_ne_bytes());
        v.extend_from_slice(&offset.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        v.extend_from_slice(&n);
        v
    }

    #[test]
    fn parses_a_synthetic_block() {
        let name_size = 48;
        let h = StatsHeader {
            name_size,
            num_desc: 2,
            id_offset: 24,
            desc_offset: 72,
            data_offset: 200,
        };
        let mut descs = desc_bytes(
            "a_counter",
            48,
            kvm_bindings::KVM_STATS_TYPE_CUMULATIVE,
            1,
            0,
        );
        descs.extend(desc_bytes(
            "hist",
            48,
            kvm_bindings::KVM_STATS_TYPE_LOG_HIST,
            3,
            8,
        ));
        let d = parse_descs(&h, &descs).unwrap();
        assert_eq!(d[1].name, "hist");
        let data: Vec<u8> = [7u64, 1, 2, 3]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let s = build_stats(&d, &data).unwrap();
        assert_eq!((s[0].value, s[0].kind), (7, StatKind::Cumulative));
        assert_eq!(
            (s[1].value, s[1].kind, s[1].values),
            (6, StatKind::LogHist, 3)
        );
        // Values past the data block are an error, not a panic.
        assert!(build_stats(&d, &data[..16]).is_err());
        assert!(parse_descs(&h, &descs[..50]).is_err());
        assert!(parse_header(&[0u8; 10]).is_err());
    }

    #[test]
    fn reads_real_vm_stats_after_memslot_churn() {
        let Some(kvm) =
            crate::stage2::tests::kvm_or_skip("reads_real_vm_stats_after_memslot_churn")
        else {
            return;
        };
        let vm = std::sync::Arc::new(kvm.create_vm().unwrap());
        let ram = 8u64 << 20;
        let mem =
            std::sync::Arc::new(crate::memory::GuestRam::new(crate::memory::MemSize(ram)).unwrap());
        let table = crate::stage2::KvmSlots::new(vm.clone(), mem, 64);
        let backend = crate::stage2::Slots::new(table, ram);
        let mut e =
            crate::stage2::Stage2Engine::new(backend, ram, crate::addr::Gpa(1 << 20)).unwrap();
        let before = read_vm_stats(&vm).unwrap();
        for i in 0..10 {
            let gpa = crate::addr::Gpa((2 << 20) + i * 4096);
            e.unmap_range(gpa, 4096).unwrap();
            e.map_range(gpa, 4096).unwrap();
        }
        let stats = read_vm_stats(&vm).unwrap();
        assert!(
            stats.len() >= 5 && stats.len() < 1000,
            "{} stats",
            stats.len()
        );
        assert!(stats
            .iter()
            .all(|s| !s.name.is_empty() && s.name.is_ascii()));
        let flush =
            find(&stats, "remote_tlb_flush_requests").or_else(|| find(&stats, "remote_tlb_flush"));
        let zapped = find(&stats, "mmu_shadow_zapped");
        assert!(flush.is_some() || zapped.is_some(), "{stats:?}");
        if let Some(f) = find(&stats, "remote_tlb_flush_requests") {
            let b = find(&before, "remote_tlb_flush_requests").map_or(0, |s| s.value);
            eprintln!(
                "remote_tlb_flush_requests: {b} -> {} over 20 memslot updates",
                f.value
            );
            eprintln!(
                "stats: {:?}",
                stats.iter().map(|s| (&s.name, s.value)).collect::<Vec<_>>()
            );
            assert!(f.value >= b);
        }
        drop(e);
    }
}
