//! Hypercalls where the VMM reads or writes guest pages through its own mapping on the
//! guest's behalf: `HostFill`, `HostCount`, the host assertion `HostExpect` and `PlantSecret`.
//!
//! The rule: nothing derived from the contents of a page the guest cannot reach at stage 2
//! goes back to the guest, and the VMM writes into such a page only for the test harness.
//! `HostCount` therefore answers only over reachable pages; `HostExpect` judges any owned
//! page but returns only `Ok` and records its outcome in the test's verdict.

use veil_abi::{Status, HOST_EXPECT_SECRET};

use super::Session;
use crate::addr::Gpa;
use crate::secret::Secret;

/// Most failed host assertions one test describes (the rest are only counted).
pub const MAX_HOST_FAILURES: usize = 16;

/// One failed host assertion, kept as numbers and put into words only at the verdict (so the
/// call costs the same whether it held or not, up to a tiny copy).
#[derive(Clone, Copy, Debug)]
pub(super) struct HostFailure {
    pub(super) gpa: Gpa,
    pub(super) len: u64,
    pub(super) what: u64,
    pub(super) count: u64,
    pub(super) found: u64,
}

impl std::fmt::Display for HostFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}): expected {} byte(s) ",
            self.gpa,
            self.gpa.raw() + self.len,
            self.count
        )?;
        if self.what == HOST_EXPECT_SECRET {
            f.write_str("equal to the planted secret")?;
        } else {
            write!(f, "equal to {:#04x}", self.what)?;
        }
        write!(f, ", found {}", self.found)
    }
}

/// The host assertions of one test.
#[derive(Debug, Default)]
pub(super) struct HostVerdict {
    checked: u64,
    failed: u64,
    failures: Vec<HostFailure>,
}

impl HostVerdict {
    pub(super) fn record(&mut self, a: HostFailure) {
        self.checked += 1;
        if a.found != a.count {
            self.failed += 1;
            if self.failures.len() < MAX_HOST_FAILURES {
                self.failures.push(a);
            }
        }
    }

    /// `Ok` if every host assertion held; otherwise the failures (at most
    /// [`MAX_HOST_FAILURES`] described).
    pub(super) fn check(&self) -> Result<(), String> {
        if self.failed == 0 {
            return Ok(());
        }
        let named: Vec<String> = self.failures.iter().map(|f| f.to_string()).collect();
        let mut m = format!(
            "{} of {} host assertion(s) failed: {}",
            self.failed,
            self.checked,
            named.join("; ")
        );
        let unnamed = self.failed - self.failures.len() as u64;
        if unnamed > 0 {
            m.push_str(&format!("; and {unnamed} more"));
        }
        Err(m)
    }
}

impl Session {
    /// Whether every page of `[gpa, gpa + len)` is exposed at stage 2 (reachable by the guest).
    fn reachable(&self, gpa: Gpa, len: u64) -> bool {
        let end = Gpa(gpa.raw().saturating_add(len));
        self.engine(|e| e.ranges_in(gpa, end).iter().all(|r| r.state.is_exposed()))
    }

    /// Whether some page of `[gpa, gpa + len)` is locked by `Hc::Protect`.
    fn locked(&self, gpa: Gpa, len: u64) -> bool {
        let end = Gpa(gpa.raw().saturating_add(len));
        self.engine(|e| e.ranges_in(gpa, end).iter().any(|r| r.state.is_locked()))
    }

    /// HostFill / HostCount arguments: a byte value and a range of pages the guest owns.
    fn host_range_args(&self, gpa: Gpa, len: u64, byte: u64) -> Result<u8, Status> {
        let byte = u8::try_from(byte).map_err(|_| Status::BadArgument)?;
        self.check_owned(gpa, len)?;
        Ok(byte)
    }

    pub(super) fn hc_host_fill(&mut self, gpa: Gpa, len: u64, byte: u64) -> Result<u64, Status> {
        let byte = self.host_range_args(gpa, len, byte)?;
        if self.locked(gpa, len) {
            // A lock holds against the VMM's writes on the guest's behalf too.
            return Err(Status::BadState);
        }
        if !self.test_harness && !self.reachable(gpa, len) {
            return Err(Status::HarnessOnly);
        }
        self.ram
            .fill(gpa.raw(), len, byte)
            .map_err(|_| Status::BadAddress)?;
        Ok(0)
    }

    pub(super) fn hc_host_count(&mut self, gpa: Gpa, len: u64, byte: u64) -> Result<u64, Status> {
        let byte = self.host_range_args(gpa, len, byte)?;
        if !self.reachable(gpa, len) {
            return Err(Status::Unreachable);
        }
        self.ram
            .count(gpa.raw(), len, byte)
            .map_err(|_| Status::BadAddress)
    }

    pub(super) fn hc_plant_secret(&mut self, gpa: Gpa, len: u64) -> Result<u64, Status> {
        if !self.test_harness {
            return Err(Status::HarnessOnly);
        }
        self.check_owned(gpa, len)?;
        let mut buf = [0u8; 4096];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            self.secret.fill(gpa.raw() + off, &mut buf[..n]);
            self.ram
                .write(gpa.raw() + off, &buf[..n])
                .map_err(|_| Status::BadAddress)?;
            off += n as u64;
        }
        self.note_planted(gpa, len);
        Ok(0)
    }

    pub(super) fn hc_host_expect(
        &mut self,
        gpa: Gpa,
        len: u64,
        what: u64,
        count: u64,
    ) -> Result<u64, Status> {
        if what > HOST_EXPECT_SECRET || count > len {
            return Err(Status::BadArgument);
        }
        self.check_owned(gpa, len)?;
        if self.current.is_none() {
            return Err(Status::BadState);
        }
        let found = if what == HOST_EXPECT_SECRET {
            self.secret_matches(gpa, len)
        } else {
            self.ram.count(gpa.raw(), len, what as u8)
        }
        .map_err(|_| Status::BadAddress)?;
        if let Some(c) = self.current.as_mut() {
            c.host.record(HostFailure {
                gpa,
                len,
                what,
                count,
                found,
            });
        }
        Ok(0)
    }

    // ----- the planted secret, for other parts of the VMM -----

    /// The secret byte [`veil_abi::Hc::PlantSecret`] writes at `gpa` in this run.
    pub fn secret_byte(&self, gpa: Gpa) -> u8 {
        self.secret.byte(gpa.raw())
    }

    /// Whether `b` is a value a secret byte can take (0x10..=0x9f).
    pub fn is_secret_byte(b: u8) -> bool {
        Secret::is_secret_byte(b)
    }

    /// How many bytes of `[gpa, gpa + len)` still hold the planted secret (read through the
    /// VMM's own mapping, whatever the stage-2 state).
    pub fn secret_matches(&self, gpa: Gpa, len: u64) -> Result<u64, vm_memory::GuestMemoryError> {
        let mut got = [0u8; 4096];
        let mut want = [0u8; 4096];
        let mut off = 0;
        let mut n_eq = 0u64;
        while off < len {
            let n = (len - off).min(got.len() as u64) as usize;
            self.ram.read(gpa.raw() + off, &mut got[..n])?;
            self.secret.fill(gpa.raw() + off, &mut want[..n]);
            n_eq += got[..n]
                .iter()
                .zip(&want[..n])
                .filter(|(a, b)| a == b)
                .count() as u64;
            off += n as u64;
        }
        Ok(n_eq)
    }

    /// Whether every byte of `[gpa, gpa + len)` still holds the planted secret.
    pub fn secret_intact(&self, gpa: Gpa, len: u64) -> bool {
        self.secret_matches(gpa, len).is_ok_and(|n| n == len)
    }
}
