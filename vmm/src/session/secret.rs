//! The per-run secret the VMM plants into pages the guest cannot reach (`Hc::PlantSecret`), and
//! the host-side checks on it.
//!
//! STAND-IN: helper 8a owns `Hc::PlantSecret` (with the `--test-harness` capability). This is
//! the minimum the reachability routes need, with the Session API shape 8a's work provides
//! (`secret_byte`, `is_secret_byte`, `secret_bytes_changed`); it is replaced on merge.
//!
//! The secret is 8 random bytes per run, all distinct, in `0x10..0xff` and never the poison
//! byte (so zeroed or poisoned memory, small counts and 0xff never look secret):
//! the byte at GPA `g` is `key[g % 8]`, so a planted page holds the key over and over.

use veil_abi::{Status, POISON_BYTE};

use super::Session;

/// The per-run secret.
#[derive(Clone, Copy, Debug)]
pub struct Secret {
    key: [u8; 8],
}

impl Secret {
    /// A fresh random secret (from the kernel's getrandom; a clock-derived fallback if that
    /// fails, still unknown to the guest).
    pub fn random() -> Secret {
        let mut seed = [0u8; 32];
        // SAFETY: getrandom writes at most `seed.len()` bytes into the live buffer.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        if n != seed.len() as isize {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            for (i, b) in seed.iter_mut().enumerate() {
                *b = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(0x9d);
            }
        }
        Secret::from_seed(&seed)
    }

    /// The secret whose key is the first 8 acceptable distinct bytes of `seed` (more fixed
    /// fallbacks if the seed has too few).
    pub fn from_seed(seed: &[u8]) -> Secret {
        let mut key = [0u8; 8];
        let mut n = 0;
        let fallback = (0u8..=255).map(|i| i.wrapping_mul(37).wrapping_add(11));
        for b in seed.iter().copied().chain(fallback) {
            if n == key.len() {
                break;
            }
            if (0x10..0xff).contains(&b) && b != POISON_BYTE && !key[..n].contains(&b) {
                key[n] = b;
                n += 1;
            }
        }
        Secret { key }
    }

    /// The secret byte planted at `gpa`.
    pub fn byte_at(&self, gpa: u64) -> u8 {
        self.key[(gpa % 8) as usize]
    }

    /// Whether `b` is one of the secret's bytes.
    pub fn is_secret_byte(&self, b: u8) -> bool {
        self.key.contains(&b)
    }

    /// Bytes of `bytes` that are secret bytes.
    pub fn count_secret_bytes(&self, bytes: &[u8]) -> u64 {
        bytes.iter().filter(|&&b| self.is_secret_byte(b)).count() as u64
    }

    /// Places in `bytes` where 8 consecutive bytes are the key, rotated any way (what an 8-byte
    /// or wider load of a planted page yields, wherever it was copied to).
    pub fn count_secret_words(&self, bytes: &[u8]) -> u64 {
        let mut index = [u8::MAX; 256];
        for (i, &k) in self.key.iter().enumerate() {
            index[k as usize] = i as u8;
        }
        let mut found = 0;
        let mut i = 0;
        while i + 8 <= bytes.len() {
            let first = index[bytes[i] as usize];
            if first != u8::MAX
                && (1..8).all(|j| bytes[i + j] == self.key[(first as usize + j) % 8])
            {
                found += 1;
                i += 8;
            } else {
                i += 1;
            }
        }
        found
    }

    /// Bytes of `bytes`, read at `gpa`, that no longer hold the secret.
    pub fn changed_bytes(&self, gpa: u64, bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b != self.byte_at(gpa + i as u64))
            .count() as u64
    }
}

impl Session {
    /// The secret byte planted (or that would be planted) at `gpa`.
    pub fn secret_byte(&self, gpa: u64) -> u8 {
        self.secret.byte_at(gpa)
    }

    /// Whether `b` is a byte of this run's secret.
    pub fn is_secret_byte(&self, b: u8) -> bool {
        self.secret.is_secret_byte(b)
    }

    /// Bytes of `[gpa, gpa + len)` that no longer hold the planted secret (all of them if the
    /// range cannot be read).
    pub fn secret_bytes_changed(&self, gpa: u64, len: u64) -> u64 {
        let mut b = vec![0u8; len as usize];
        match self.ram.read(gpa, &mut b) {
            Ok(()) => self.secret.changed_bytes(gpa, &b),
            Err(_) => len,
        }
    }

    /// `Hc::PlantSecret(gpa, len)`: writes the secret over pages the guest owns, whatever
    /// their stage-2 state, and remembers the range for the next route's judgement.
    pub(super) fn hc_plant_secret(&mut self, gpa: u64, len: u64) -> Result<u64, Status> {
        self.check_owned(gpa, len)?;
        let bytes: Vec<u8> = (0..len).map(|i| self.secret.byte_at(gpa + i)).collect();
        self.ram
            .write(gpa, &bytes)
            .map_err(|_| Status::BadAddress)?;
        self.note_planted(gpa, len)?;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_avoids_small_ff_poison_and_repeats() {
        let s = Secret::from_seed(&[0, 0xff, POISON_BYTE, 7, 0x70, 0x70, 0x90]);
        for b in (0..0x10).chain([0xff, POISON_BYTE]) {
            assert!(!s.is_secret_byte(b), "{b:#x}");
        }
        assert_eq!(s.byte_at(0), 0x70);
        assert_eq!(s.byte_at(1), 0x90);
        let mut k = s.key;
        k.sort();
        assert!(k.windows(2).all(|w| w[0] != w[1]), "{k:?}");
    }

    #[test]
    fn words_and_changes_are_counted() {
        let s = Secret::from_seed(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        let page: Vec<u8> = (0..64).map(|i| s.byte_at(0x1000 + i)).collect();
        assert_eq!(s.changed_bytes(0x1000, &page), 0);
        assert_eq!(s.changed_bytes(0x1001, &page), 64);
        // A rotated copy (a load from an address 3 mod 8) is still found.
        let mut buf = vec![0u8; 40];
        buf[5..13].copy_from_slice(&page[3..11]);
        assert_eq!(s.count_secret_words(&buf), 1);
        assert_eq!(s.count_secret_bytes(&buf), 8);
        buf[9] = 0;
        assert_eq!(s.count_secret_words(&buf), 0);
        assert_eq!(s.count_secret_words(&page), 8);
    }
}
