//! xorshift64*, the deterministic generator of the fuzz and mutation tests (so a failure
//! reproduces from its seed); shared by `veil-tests` and the `veil` binary's tests
//! (`vmm/tests/elf_mutation.rs` includes this file by path).

/// A xorshift64* generator.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
