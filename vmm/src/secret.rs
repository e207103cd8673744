//! The per-run secret that [`veil_abi::Hc::PlantSecret`] writes into guest pages: bytes the
//! guest must never learn, computable by the VMM for any GPA from a random per-run key, so
//! the VMM can later tell "still intact" or "this byte came from the secret" without storing
//! what it planted.
//!
//! Every secret byte lies in [`SECRET_MIN`]`..=`[`SECRET_MAX`] (never 0x00, the poison byte
//! 0xa5 or 0xff, the values a blocked access produces) and depends on its GPA, so a constant
//! pattern is not mistaken for it.

/// Smallest value a secret byte takes.
pub const SECRET_MIN: u8 = 0x10;
/// Largest value a secret byte takes.
pub const SECRET_MAX: u8 = 0x9f;

/// A per-run secret key.
#[derive(Clone)]
pub struct Secret {
    key: [u64; 2],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 16 random bytes from the kernel (getrandom(2)); falls back to the clock and the process
/// id if the call fails, which only weakens the key, never the checks.
fn random_key() -> [u64; 2] {
    let mut b = [0u8; 16];
    // SAFETY: `b` is a valid, writable buffer of `b.len()` bytes for the whole call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == b.len() as isize {
        let (lo, hi) = b.split_at(8);
        let w = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        return [w(lo), w(hi)];
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    [mix(t), mix(t ^ u64::from(std::process::id()))]
}

impl Secret {
    /// A fresh secret with a random key.
    pub fn random() -> Secret {
        Secret { key: random_key() }
    }

    /// A secret with a given key (for tests that need a reproducible one).
    pub fn with_key(key: [u64; 2]) -> Secret {
        Secret { key }
    }

    /// The secret byte at `gpa`.
    pub fn byte(&self, gpa: u64) -> u8 {
        let word = mix(mix((gpa >> 3) ^ self.key[0]) ^ self.key[1]);
        let b = (word >> ((gpa & 7) * 8)) as u8;
        SECRET_MIN + b % (SECRET_MAX - SECRET_MIN + 1)
    }

    /// Fills `buf` with the secret bytes of `[gpa, gpa + buf.len())`.
    pub fn fill(&self, gpa: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.byte(gpa.wrapping_add(i as u64));
        }
    }

    /// Whether `b` is a value a secret byte can take.
    pub const fn is_secret_byte(b: u8) -> bool {
        b >= SECRET_MIN && b <= SECRET_MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_stay_in_range_and_vary_with_position() {
        let s = Secret::random();
        let mut page = [0u8; 4096];
        s.fill(0x40_0000, &mut page);
        assert!(page.iter().all(|&b| Secret::is_secret_byte(b)));
        assert!(!page.contains(&veil_abi::POISON_BYTE));
        let distinct = page.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct > 100, "only {distinct} distinct byte values");
        let mut next = [0u8; 4096];
        s.fill(0x40_1000, &mut next);
        assert_ne!(page, next, "two pages got the same secret");
    }

    #[test]
    fn keys_differ_between_runs_and_bytes_are_reproducible() {
        let a = Secret::with_key([1, 2]);
        let b = Secret::with_key([1, 3]);
        let pa: Vec<u8> = (0..64).map(|i| a.byte(0x1000 + i)).collect();
        let pb: Vec<u8> = (0..64).map(|i| b.byte(0x1000 + i)).collect();
        assert_ne!(pa, pb);
        assert_eq!(pa[5], a.byte(0x1005));
        assert!(!Secret::is_secret_byte(0) && !Secret::is_secret_byte(0xff));
        assert!(!Secret::is_secret_byte(veil_abi::POISON_BYTE));
    }
}
