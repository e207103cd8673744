//! `--cpuid-mask FEATURE,...`: CPUID feature bits hidden from a foreign kernel, so that it does
//! not use instructions this host's KVM cannot run for it (on a nested host without EPT, guest
//! ring-0 code is emulated instruction by instruction, and the emulator lacks some).

use kvm_bindings::CpuId;
use thiserror::Error;

/// Which CPUID output register a feature bit is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One feature `--cpuid-mask` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Its name on the command line (Linux's `/proc/cpuinfo` spelling).
    pub name: &'static str,
    /// CPUID leaf.
    pub leaf: u32,
    /// Subleaf (index).
    pub index: u32,
    /// Register.
    pub reg: Reg,
    /// Bit.
    pub bit: u32,
    /// Why one would hide it (shown in `--help` and the docs).
    pub why: &'static str,
}

/// Every feature `--cpuid-mask` accepts.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "cx16",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 13,
        why: "cmpxchg16b: the nested emulator lacks it (Linux uses it for per-CPU slabs)",
    },
    Feature {
        name: "xsave",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 26,
        why: "xsave/xrstor/xgetbv: the emulator lacks xgetbv; hiding it makes Linux use fxsave",
    },
    Feature {
        name: "avx",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 28,
        why: "AVX needs XSAVE; hide both together",
    },
    Feature {
        name: "sse4_1",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 19,
        why: "SSE integer instructions are not emulated in ring 0 here",
    },
    Feature {
        name: "sse4_2",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 20,
        why: "crc32/pcmpistri: not emulated in ring 0 here",
    },
    Feature {
        name: "popcnt",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 23,
        why: "popcnt: not emulated on a stage-2 hole",
    },
    Feature {
        name: "aes",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 25,
        why: "AES-NI: SSE-class, not emulated in ring 0",
    },
    Feature {
        name: "x2apic",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 21,
        why: "keeps a kernel on the xAPIC MMIO interface",
    },
    Feature {
        name: "tsc_deadline_timer",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 24,
        why: "forces the LAPIC's periodic/one-shot timer",
    },
    Feature {
        name: "rdrand",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 30,
        why: "rdrand: hide for deterministic runs",
    },
    Feature {
        name: "pcid",
        leaf: 1,
        index: 0,
        reg: Reg::Ecx,
        bit: 17,
        why: "process-context ids: fewer CR3 paths for the shadow MMU",
    },
    Feature {
        name: "avx2",
        leaf: 7,
        index: 0,
        reg: Reg::Ebx,
        bit: 5,
        why: "AVX2 needs AVX",
    },
    Feature {
        name: "smep",
        leaf: 7,
        index: 0,
        reg: Reg::Ebx,
        bit: 7,
        why: "supervisor-mode execution prevention",
    },
    Feature {
        name: "smap",
        leaf: 7,
        index: 0,
        reg: Reg::Ebx,
        bit: 20,
        why: "stac/clac: the emulator lacks clac",
    },
    Feature {
        name: "avx512f",
        leaf: 7,
        index: 0,
        reg: Reg::Ebx,
        bit: 16,
        why: "AVX-512 needs XSAVE",
    },
    Feature {
        name: "clflushopt",
        leaf: 7,
        index: 0,
        reg: Reg::Ebx,
        bit: 23,
        why: "clflushopt: not emulated here",
    },
    Feature {
        name: "clwb",
        leaf: 7,
        index: 0,
        reg: Reg::Ebx,
        bit: 24,
        why: "clwb: the emulator lacks it (kvm-unit-tests' memory test uses it)",
    },
    Feature {
        name: "pku",
        leaf: 7,
        index: 0,
        reg: Reg::Ecx,
        bit: 3,
        why: "protection keys (rdpkru/wrpkru)",
    },
    Feature {
        name: "la57",
        leaf: 7,
        index: 0,
        reg: Reg::Ecx,
        bit: 16,
        why: "5-level paging",
    },
    Feature {
        name: "spec_ctrl",
        leaf: 7,
        index: 0,
        reg: Reg::Edx,
        bit: 26,
        why: "IA32_SPEC_CTRL/PRED_CMD: KVM here refuses some writes (kvm-unit-tests' msr test)",
    },
    Feature {
        name: "flush_l1d",
        leaf: 7,
        index: 0,
        reg: Reg::Edx,
        bit: 28,
        why: "IA32_FLUSH_CMD (kvm-unit-tests' msr test)",
    },
    Feature {
        name: "arch_capabilities",
        leaf: 7,
        index: 0,
        reg: Reg::Edx,
        bit: 29,
        why: "IA32_ARCH_CAPABILITIES MSR",
    },
    Feature {
        name: "ssbd",
        leaf: 7,
        index: 0,
        reg: Reg::Edx,
        bit: 31,
        why: "speculative store bypass disable (SPEC_CTRL bit 2)",
    },
    Feature {
        name: "pdpe1gb",
        leaf: 0x8000_0001,
        index: 0,
        reg: Reg::Edx,
        bit: 26,
        why: "1 GiB pages",
    },
    Feature {
        name: "rdtscp",
        leaf: 0x8000_0001,
        index: 0,
        reg: Reg::Edx,
        bit: 27,
        why: "rdtscp and IA32_TSC_AUX",
    },
];

/// An unknown feature name.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("--cpuid-mask: unknown feature {0:?} (known: {known})", known = known_names())]
pub struct UnknownFeature(pub String);

/// The known names, comma-separated.
pub fn known_names() -> String {
    FEATURES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a feature name (case-insensitive, `-` or `_`).
pub fn parse(s: &str) -> Result<Feature, UnknownFeature> {
    {
        let want = s.trim().to_ascii_lowercase().replace('-', "_");
        FEATURES
            .iter()
            .find(|f| f.name == want)
            .copied()
            .ok_or_else(|| UnknownFeature(s.trim().to_string()))
    }
}

/// Clears `features` in `cpuid` (entries the host does not report are left alone).
pub fn apply(cpuid: &mut CpuId, features: &[Feature]) {
    for e in cpuid.as_mut_slice() {
        for f in features {
            if e.function == f.leaf && e.index == f.index {
                let r = match f.reg {
                    Reg::Ebx => &mut e.ebx,
                    Reg::Ecx => &mut e.ecx,
                    Reg::Edx => &mut e.edx,
                };
                *r &= !(1u32 << f.bit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn names_parse_and_bits_clear() {
        let f: Feature = "CX16".parse().unwrap();
        assert_eq!((f.leaf, f.bit), (1, 13));
        assert!("nosuch".parse::<Feature>().is_err());
        let e = kvm_cpuid_entry2 {
            function: 1,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        };
        let mut c = CpuId::from_entries(&[e]).unwrap();
        apply(&mut c, &[f, "xsave".parse().unwrap()]);
        let got = c.as_slice()[0];
        assert_eq!(got.ecx, !(1u32 << 13) & !(1 << 26));
        assert_eq!(got.edx, u32::MAX);
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in FEATURES.iter().enumerate() {
            assert!(FEATURES[i + 1..].iter().all(|b| b.name != a.name));
        }
    }
}
