//! What this host's KVM offers that Veil cares about (`veil caps`).

use std::fmt;

use kvm_ioctls::Kvm;
use serde::Serialize;

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (include/uapi/linux/kvm.h, Linux 6.18); kvm-bindings 0.14 lacks it.
const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `GUEST_MEMFD_FLAG_MMAP` (Linux 6.18).
const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (Linux 6.18).
const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;

/// What this host's KVM offers that Veil cares about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Caps {
    /// `KVM_GET_API_VERSION` (always 12 on a sane host).
    pub api_version: i32,
    /// `KVM_CAP_NR_MEMSLOTS`: memslots per address space (Veil's stage-2 budget).
    pub nr_memslots: u32,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: u32,
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`: address spaces per VM (0 or 1: one). With 2 or more a
    /// vCPU could run in a second set of memslots (x86: the SMM one), which would let each
    /// vCPU have its own ASI view; Veil's view is per VM otherwise.
    pub multi_address_space: u32,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: bool,
    /// `KVM_CAP_READONLY_MEM`: read-only memslots.
    pub readonly_mem: bool,
    /// `KVM_CAP_SYNC_REGS`: the register sets KVM can sync through `kvm_run` (bit mask).
    pub sync_regs: u32,
    /// `KVM_CAP_MEMORY_FAULT_INFO`: `KVM_EXIT_MEMORY_FAULT` details.
    pub memory_fault_info: bool,
    /// What KVM delivered when a probe's guest ring 3 loaded from a page the `mprotect`
    /// backend closed: whether `KVM_EXIT_MEMORY_FAULT` is *observed*, not only advertised.
    pub memory_fault_exit: crate::fault_probe::FaultProbe,
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: flags `KVM_CREATE_GUEST_MEMFD` accepts (0 if unknown).
    pub guest_memfd_flags: u64,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`: supported attribute bits (system-wide answer).
    pub memory_attributes: u64,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` asked on a default VM (None if no VM could be created).
    pub memory_attributes_default_vm: Option<u64>,
    /// `KVM_CAP_VM_TYPES`: bit mask of VM types.
    pub vm_types: u32,
    /// `KVM_CAP_BINARY_STATS_FD`.
    pub binary_stats: bool,
    /// How the host itself runs.
    pub host: HostInfo,
    /// How much unmapped guest RAM can be locked against swap (`mlock`): `None` = no limit
    /// (`RLIMIT_MEMLOCK` infinite, or `CAP_IPC_LOCK` lets this process lock beyond it), else the
    /// limit in bytes; unmapped pages beyond it are not locked (the run report says so).
    pub memlock_bytes: Option<u64>,
    /// The stage-2 backends `veil run --stage2` offers, and the default.
    pub stage2_backends: Stage2Backends,
    /// Host direct-map removal for unmapped pages (`veil run --host-secretmem`).
    pub direct_map_removal: crate::stage2::secretmem::DirectMapRemoval,
}

/// The stage-2 backends and their host limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stage2Backends {
    /// Names `--stage2` takes.
    pub available: Vec<&'static str>,
    /// The backend `veil run` uses without `--stage2`.
    pub default: &'static str,
    /// `vm.max_map_count`: the `mprotect` backend's bound (each protected range is a VMA).
    pub max_map_count: Option<u64>,
}

fn stage2_backends() -> Stage2Backends {
    use clap::ValueEnum;
    Stage2Backends {
        available: crate::stage2::BackendKind::value_variants()
            .iter()
            .map(|k| k.name())
            .collect(),
        default: crate::stage2::BackendKind::default().name(),
        max_map_count: std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    }
}

/// The host's available memory (`MemAvailable` in `/proc/meminfo`), in bytes.
pub fn mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line["MemAvailable:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib.checked_mul(1024)?)
}

/// Probes how much memory this process may lock: see [`Caps::memlock_bytes`].
pub fn probe_memlock() -> Option<u64> {
    // SAFETY: getrlimit writes one rlimit.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    // Can we lock one page beyond the limit (CAP_IPC_LOCK)? Try on a fresh mapping, locked on
    // fault only, so nothing is populated.
    let len = (lim.rlim_cur as usize).saturating_add(4096);
    // SAFETY: a fresh private anonymous NORESERVE mapping, locked, unlocked and unmapped here;
    // nothing else refers to it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Some(lim.rlim_cur);
        }
        let beyond = libc::mlock2(p, len, libc::MLOCK_ONFAULT) == 0;
        libc::munlock(p, len);
        libc::munmap(p, len);
        if beyond {
            None
        } else {
            Some(lim.rlim_cur)
        }
    }
}

/// Whether this host is itself a guest, and what KVM flavour it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostInfo {
    /// CPUID leaf 1 ECX bit 31: the host runs under a hypervisor (Veil runs nested).
    pub hypervisor_bit: bool,
    /// CPUID leaf 0x40000000 vendor signature, when the bit is set (e.g. "KVMKVMKVM").
    pub hypervisor_vendor: Option<String>,
    /// Loaded KVM vendor module(s) seen in /sys/module (kvm_intel, kvm_amd, kvm_pvm).
    pub kvm_modules: Vec<String>,
    /// `vmx` in the host CPU flags.
    pub vmx: bool,
    /// `svm` in the host CPU flags.
    pub svm: bool,
    /// Two-dimensional paging (EPT/NPT) per the vendor module's parameter, if visible.
    pub tdp: Option<bool>,
}

impl HostInfo {
    /// Whether Veil runs nested (under another hypervisor).
    pub fn nested(&self) -> bool {
        self.hypervisor_bit
    }

    /// One-line description of how stage 2 is implemented on this host.
    pub fn mmu_description(&self) -> String {
        match (self.kvm_modules.iter().any(|m| m == "kvm_pvm"), self.tdp) {
            (true, _) => "shadow paging (kvm_pvm)".into(),
            (false, Some(true)) => "two-dimensional paging (EPT/NPT)".into(),
            (false, Some(false)) => "shadow paging".into(),
            (false, None) => "unknown".into(),
        }
    }
}

fn cap(kvm: &Kvm, c: u32) -> i32 {
    kvm.check_extension_raw(libc::c_ulong::from(c))
}

fn cap_u(kvm: &Kvm, c: u32) -> u32 {
    u32::try_from(cap(kvm, c)).unwrap_or(0)
}

/// Probes the host: KVM capabilities from `kvm`, CPU and module facts from CPUID and sysfs.
pub fn probe(kvm: &Kvm) -> Caps {
    use kvm_bindings::*;
    let memory_attributes_default_vm = kvm.create_vm().ok().map(|vm| {
        u64::try_from(vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MEMORY_ATTRIBUTES)))
            .unwrap_or(0)
    });
    let gmem_flags = cap(kvm, KVM_CAP_GUEST_MEMFD_FLAGS);
    Caps {
        api_version: kvm.get_api_version(),
        nr_memslots: u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX),
        max_vcpus: u32::try_from(kvm.get_max_vcpus()).unwrap_or(0),
        multi_address_space: cap_u(kvm, KVM_CAP_MULTI_ADDRESS_SPACE),
        user_memory2: cap(kvm, KVM_CAP_USER_MEMORY2) > 0,
        readonly_mem: cap(kvm, KVM_CAP_READONLY_MEM) > 0,
        sync_regs: cap_u(kvm, KVM_CAP_SYNC_REGS),
        memory_fault_info: cap(kvm, KVM_CAP_MEMORY_FAULT_INFO) > 0,
        memory_fault_exit: crate::fault_probe::probe(kvm),
        guest_memfd: cap(kvm, KVM_CAP_GUEST_MEMFD) > 0,
        guest_memfd_flags: u64::try_from(gmem_flags).unwrap_or(0),
        memory_attributes: u64::try_from(cap(kvm, KVM_CAP_MEMORY_ATTRIBUTES)).unwrap_or(0),
        memory_attributes_default_vm,
        vm_types: cap_u(kvm, KVM_CAP_VM_TYPES),
        binary_stats: cap(kvm, KVM_CAP_BINARY_STATS_FD) > 0,
        host: probe_host(),
        memlock_bytes: probe_memlock(),
        stage2_backends: stage2_backends(),
        direct_map_removal: crate::stage2::secretmem::probe(
            u64::try_from(gmem_flags).unwrap_or(0),
            probe_memlock(),
        ),
    }
}

/// Probes CPUID, /proc/cpuinfo and /sys/module.
pub fn probe_host() -> HostInfo {
    let (hypervisor_bit, hypervisor_vendor) = cpuid_hypervisor();
    let flags = cpu_flags();
    let kvm_modules: Vec<String> = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .filter(|m| std::path::Path::new("/sys/module").join(m).exists())
        .map(|m| (*m).to_string())
        .collect();
    let param = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let tdp = param("/sys/module/kvm_intel/parameters/ept")
        .or_else(|| param("/sys/module/kvm_amd/parameters/npt"))
        .map(|v| v == "Y" || v == "1");
    HostInfo {
        hypervisor_bit,
        hypervisor_vendor,
        kvm_modules,
        vmx: flags.iter().any(|f| f == "vmx"),
        svm: flags.iter().any(|f| f == "svm"),
        tdp,
    }
}

#[cfg(target_arch = "x86_64")]
fn cpuid_hypervisor() -> (bool, Option<String>) {
    // `__cpuid` is a safe function on x86_64: CPUID exists on every x86-64 CPU.
    let l1 = core::arch::x86_64::__cpuid(1);
    let bit = l1.ecx & (1 << 31) != 0;
    if !bit {
        return (false, None);
    }
    let h = core::arch::x86_64::__cpuid(0x4000_0000);
    let mut sig = Vec::with_capacity(12);
    for r in [h.ebx, h.ecx, h.edx] {
        sig.extend_from_slice(&r.to_le_bytes());
    }
    let s: String = sig
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as char)
        .collect();
    (true, Some(s.trim().to_string()).filter(|s| !s.is_empty()))
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid_hypervisor() -> (bool, Option<String>) {
    (false, None)
}

fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn bits(v: u64, names: &[(u64, &str)]) -> String {
    if v == 0 {
        return "none".into();
    }
    let mut parts: Vec<String> = names
        .iter()
        .filter(|(b, _)| v & b != 0)
        .map(|(_, n)| (*n).to_string())
        .collect();
    let known = names.iter().fold(0, |a, (b, _)| a | b);
    if v & !known != 0 {
        parts.push(format!("{:#x}", v & !known));
    }
    format!("{:#x} ({})", v, parts.join("|"))
}

impl Caps {
    /// The rows of the text table: (what, value, why Veil cares).
    pub fn rows(&self) -> Vec<(&'static str, String, &'static str)> {
        let sync = bits(
            u64::from(self.sync_regs),
            &[(1, "regs"), (2, "sregs"), (4, "events")],
        );
        let attrs = [(KVM_MEMORY_ATTRIBUTE_PRIVATE, "private")];
        let gmem = [
            (GUEST_MEMFD_FLAG_MMAP, "mmap"),
            (GUEST_MEMFD_FLAG_INIT_SHARED, "init_shared"),
        ];
        let h = &self.host;
        vec![
            (
                "KVM API version",
                self.api_version.to_string(),
                "12 expected",
            ),
            (
                "memslots (KVM_CAP_NR_MEMSLOTS)",
                self.nr_memslots.to_string(),
                "stage-2 hole budget",
            ),
            ("max vCPUs", self.max_vcpus.to_string(), ""),
            (
                "address spaces (KVM_CAP_MULTI_ADDRESS_SPACE)",
                self.multi_address_space.to_string(),
                if self.multi_address_space >= 2 {
                    "a per-vCPU ASI view is possible (not built: Veil's view is per VM)"
                } else {
                    "ASI view per VM: full while any vCPU is exited"
                },
            ),
            (
                "stage-2 backends (--stage2)",
                format!(
                    "{} (default {})",
                    self.stage2_backends.available.join(", "),
                    self.stage2_backends.default
                ),
                "same verdicts; see README",
            ),
            (
                "vm.max_map_count",
                self.stage2_backends
                    .max_map_count
                    .map_or("unknown".into(), |n| n.to_string()),
                "mprotect backend: ~half as many protected ranges",
            ),
            (
                "memlock for unmapped pages",
                match self.memlock_bytes {
                    None => "unlimited".into(),
                    Some(b) => format!("{} KiB (RLIMIT_MEMLOCK)", b >> 10),
                },
                "unmapped pages beyond it are not locked against swap",
            ),
            (
                "host direct-map removal",
                format!(
                    "{}; guest_memfd NO_DIRECT_MAP {}",
                    match &self.direct_map_removal.memfd_secret_error {
                        None => "memfd_secret".to_string(),
                        Some(e) => format!("none (memfd_secret: {e})"),
                    },
                    if self.direct_map_removal.guest_memfd_no_direct_map {
                        "offered (not used yet)"
                    } else {
                        "not offered"
                    }
                ),
                "veil run --host-secretmem",
            ),
            (
                "secret memory the memlock limit allows",
                match self.direct_map_removal.secret_bytes_allowed {
                    None => "unlimited".into(),
                    Some(b) => format!("{} MiB of unmapped RAM", b >> 20),
                },
                "each unmapped byte locks two (guest and VMM mapping)",
            ),
            (
                "KVM_SET_USER_MEMORY_REGION2",
                yes(self.user_memory2).into(),
                "needed for guest_memfd slots",
            ),
            (
                "read-only memslots",
                yes(self.readonly_mem).into(),
                "read-only stage-2 views",
            ),
            ("sync regs", sync, "hypercall args without extra ioctls"),
            (
                "memory fault exit",
                format!(
                    "advertised {}, observed {} ({})",
                    yes(self.memory_fault_info),
                    yes(self.memory_fault_exit.observed()),
                    self.memory_fault_exit.describe()
                ),
                "ring-3 fault on an mprotect page",
            ),
            (
                "guest_memfd",
                yes(self.guest_memfd).into(),
                "unmappable guest memory",
            ),
            ("guest_memfd flags", bits(self.guest_memfd_flags, &gmem), ""),
            (
                "memory attributes",
                bits(self.memory_attributes, &attrs),
                "per-page private/shared",
            ),
            (
                "memory attributes (default VM)",
                self.memory_attributes_default_vm
                    .map_or("n/a".into(), |v| bits(v, &attrs)),
                "",
            ),
            ("VM types", format!("{:#x}", self.vm_types), ""),
            (
                "binary stats",
                yes(self.binary_stats).into(),
                "KVM_GET_STATS_FD in dumps",
            ),
            (
                "nested (CPUID hypervisor bit)",
                yes(h.nested()).into(),
                "figures are nested figures",
            ),
            (
                "hypervisor vendor",
                h.hypervisor_vendor.clone().unwrap_or_else(|| "-".into()),
                "",
            ),
            (
                "KVM module",
                if h.kvm_modules.is_empty() {
                    "-".into()
                } else {
                    h.kvm_modules.join(",")
                },
                "",
            ),
            (
                "host CPU vmx / svm",
                format!("{} / {}", yes(h.vmx), yes(h.svm)),
                "",
            ),
            (
                "stage-2 MMU",
                h.mmu_description(),
                "shadow paging emulates ring 0",
            ),
        ]
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = self.rows();
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        for (k, v, note) in rows {
            if note.is_empty() {
                writeln!(f, "{k:<w0$}  {v}")?;
            } else {
                writeln!(f, "{k:<w0$}  {v:<w1$}  # {note}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn mem_available_is_read_in_bytes() {
        let m = "MemTotal:       24599452 kB\nMemFree:        23000000 kB\nMemAvailable:   23800000 kB\n";
        assert_eq!(parse_mem_available(m), Some(23_800_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: 12 MB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
    }

    use super::*;

    #[test]
    fn probe_on_real_kvm() {
        let Some(kvm) = crate::stage2::tests::kvm_or_skip("probe_on_real_kvm") else {
            return;
        };
        let c = probe(&kvm);
        assert_eq!(c.api_version, 12);
        assert!(c.nr_memslots > 0);
        let text = c.to_string();
        assert!(
            text.contains("KVM API version") && text.contains("12"),
            "{text}"
        );
        assert_eq!(text.lines().count(), c.rows().len());
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["api_version"], 12);
        assert!(j["host"]["hypervisor_bit"].is_boolean());
        let outcomes = ["memory_fault_exit", "efault_no_exit", "mmio", "not_probed"];
        let probed = j["memory_fault_exit"]["outcome"]
            .as_str()
            .unwrap_or("missing");
        assert!(outcomes.contains(&probed), "{}", j["memory_fault_exit"]);
        assert!(
            text.lines()
                .any(|l| l.starts_with("memory fault exit") && l.contains("advertised ")),
            "{text}"
        );
        eprintln!("{text}");
    }

    #[test]
    fn bit_names() {
        assert_eq!(bits(0, &[(1, "a")]), "none");
        assert_eq!(bits(3, &[(1, "a"), (2, "b")]), "0x3 (a|b)");
        assert_eq!(bits(9, &[(1, "a")]), "0x9 (a|0x8)");
    }
}
