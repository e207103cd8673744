//! The guest's view of its RAM: every read or write the VMM does *for the guest* (hypercall
//! buffers, text, names, the page-table walker, instruction bytes for decoding) goes through
//! [`GuestView`], which refuses any access touching a page that stage 2 does not expose.
//!
//! Host-side harness work (ELF loading, boot structures, host fills and assertions, planted
//! secrets, zeroing, dumps) uses the raw [`GuestRam`] on purpose: the two kinds of access are
//! different types, so a `GuestRam` call in guest-serving code stands out in review.

use allocator::Zone;

use crate::addr::Gpa;
use crate::memory::GuestRam;
use crate::stage2::{RangeState, Stage2Backend, Stage2Engine};

/// Where the stage-2 state of a page comes from (the engine's range map; a table in tests).
pub trait PageStates {
    /// Stage-2 state of the page holding `gpa` (None: not RAM).
    fn state_at(&self, gpa: u64) -> Option<RangeState>;
}

impl<B: Stage2Backend> PageStates for Stage2Engine<B> {
    fn state_at(&self, gpa: u64) -> Option<RangeState> {
        Stage2Engine::state_at(self, Gpa(gpa))
    }
}

/// The states of the engine a [`Zone`] allocates through (read under its stage-2 lock).
impl<B: Stage2Backend> PageStates for Zone<Stage2Engine<B>> {
    fn state_at(&self, gpa: u64) -> Option<RangeState> {
        self.with_stage2(|e| e.state_at(Gpa(gpa)))
    }
}

/// Why a checked access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// Some byte of the range is not RAM (or the range wraps around).
    #[error("[{gpa:#x}, +{len:#x}) is not guest RAM")]
    NotRam {
        /// Start of the access.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// A write touches a page the guest locked read-only; `gpa` is the first such byte.
    #[error("GPA {gpa:#x} is locked read-only")]
    ReadOnly {
        /// First byte of the write inside a read-only page.
        gpa: u64,
    },
    /// The access touches a page stage 2 does not expose; `gpa` is the first such byte.
    #[error("GPA {gpa:#x} is unmapped at stage 2")]
    Unmapped {
        /// First byte of the access inside an unmapped page.
        gpa: u64,
    },
}

/// RAM as the guest can reach it: reserved and mapped pages, never unmapped ones.
#[derive(Clone, Copy)]
pub struct GuestView<'a> {
    ram: &'a GuestRam,
    states: &'a dyn PageStates,
}

impl<'a> GuestView<'a> {
    /// The view of `ram` under the stage-2 states `states`.
    pub fn new(ram: &'a GuestRam, states: &'a dyn PageStates) -> GuestView<'a> {
        GuestView { ram, states }
    }

    /// Checks that every page of `[gpa, gpa + len)` is RAM the guest can reach.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), ViewError> {
        self.check_access(gpa, len, false)
    }

    /// Checks that every page of `[gpa, gpa + len)` is RAM the guest can reach, and write when
    /// `write`.
    fn check_access(&self, gpa: u64, len: u64, write: bool) -> Result<(), ViewError> {
        if !self.ram.contains(gpa, len) {
            return Err(ViewError::NotRam { gpa, len });
        }
        if len == 0 {
            return Ok(());
        }
        let mut page = gpa & !0xfff;
        let end = gpa + len;
        while page < end {
            match self.states.state_at(page) {
                Some(s)
                    if write
                        && !crate::stage2::View::GUEST.perm(s).writable()
                        && s.is_exposed() =>
                {
                    return Err(ViewError::ReadOnly { gpa: page.max(gpa) })
                }
                Some(s) if s.is_exposed() => {}
                Some(_) => return Err(ViewError::Unmapped { gpa: page.max(gpa) }),
                None => return Err(ViewError::NotRam { gpa, len }),
            }
            page += 0x1000;
        }
        Ok(())
    }

    /// Copies `[gpa, gpa + buf.len())` into `buf` if the guest can reach all of it.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ViewError> {
        let len = buf.len() as u64;
        self.check(gpa, len)?;
        self.ram
            .read(gpa, buf)
            .map_err(|_| ViewError::NotRam { gpa, len })
    }

    /// A little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, ViewError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Copies `buf` to `gpa` if the guest can reach all of `[gpa, gpa + buf.len())`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), ViewError> {
        let len = buf.len() as u64;
        self.check_access(gpa, len, true)?;
        self.ram
            .write(gpa, buf)
            .map_err(|_| ViewError::NotRam { gpa, len })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::MemSize;

    /// Fake stage 2: `[0, 4 MiB)` reserved, one unmapped page at `hole`, the rest mapped.
    pub(crate) struct OneHole {
        pub size: u64,
        pub hole: u64,
    }

    impl PageStates for OneHole {
        fn state_at(&self, gpa: u64) -> Option<RangeState> {
            if gpa >= self.size {
                None
            } else if gpa < 4 << 20 {
                Some(RangeState::Reserved)
            } else if gpa & !0xfff == self.hole {
                Some(RangeState::Unmapped)
            } else {
                Some(RangeState::Mapped)
            }
        }
    }

    #[test]
    fn refuses_any_byte_in_a_hole() {
        let ram = GuestRam::new(MemSize(8 << 20)).unwrap();
        let st = OneHole {
            size: 8 << 20,
            hole: 0x50_0000,
        };
        ram.fill(0x50_0000, 4096, 0x5a).unwrap();
        let v = GuestView::new(&ram, &st);
        let mut b = [0u8; 8];
        assert_eq!(
            v.read(0x4f_fffc, &mut b),
            Err(ViewError::Unmapped { gpa: 0x50_0000 })
        );
        assert_eq!(b, [0; 8], "nothing copied from a refused read");
        assert_eq!(
            v.write(0x50_0ff8, &[1; 8]),
            Err(ViewError::Unmapped { gpa: 0x50_0ff8 })
        );
        assert_eq!(ram.count(0x50_0000, 4096, 0x5a).unwrap(), 4096);
        assert!(v.read(0x4f_fff8, &mut b).is_ok());
        assert!(v.read(0x50_1000, &mut b).is_ok());
        assert!(v.write(0x10_0000, &[1; 8]).is_ok());
        assert_eq!(
            v.read(u64::MAX - 3, &mut b),
            Err(ViewError::NotRam {
                gpa: u64::MAX - 3,
                len: 8
            })
        );
        assert!(matches!(
            v.read((8 << 20) - 4, &mut b),
            Err(ViewError::NotRam { .. })
        ));
    }
}
