//! The default guest kernel (built from `guest/` by `vmm/build.rs`), embedded in the binary.

/// The default guest's ELF bytes.
pub static DEFAULT_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/veil-guest.elf"));
