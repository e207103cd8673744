//! The VMM's own 4-level page walker (used when `KVM_TRANSLATE` cannot answer): it reads the
//! guest's page tables through the stage-2-checked [`GuestView`], so a table entry in an
//! unmapped page yields no translation, never one computed from secret bytes.

use crate::guest_view::{GuestView, ViewError};

const PTE_PRESENT: u64 = 1;
const PTE_HUGE: u64 = 0x80;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Why a guest-virtual address has no translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// An entry on the way is not present.
    #[error("not mapped by the guest's page tables")]
    NotPresent,
    /// A page-table entry lies in a page stage 2 does not expose: the walk itself is a
    /// violation (a read of 8 bytes at `entry_gpa`).
    #[error("page-table entry at GPA {entry_gpa:#x} is in an unmapped page")]
    TableInHole {
        /// GPA of the entry the walk would have read.
        entry_gpa: u64,
    },
    /// A page-table entry lies outside RAM.
    #[error("page-table entry at GPA {entry_gpa:#x} is not RAM")]
    TableNotRam {
        /// GPA of the entry.
        entry_gpa: u64,
    },
}

/// The GPA that `gva` maps to under the 4-level tables rooted at `cr3`, read through `view`.
pub fn walk(view: &GuestView<'_>, cr3: u64, gva: u64) -> Result<u64, WalkError> {
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let index = (gva >> (12 + 9 * level)) & 511;
        let entry_gpa = table + index * 8;
        let e = view.read_u64(entry_gpa).map_err(|e| match e {
            ViewError::Unmapped { .. } => WalkError::TableInHole { entry_gpa },
            // Reads are never refused as read-only.
            ViewError::NotRam { .. } | ViewError::ReadOnly { .. } => {
                WalkError::TableNotRam { entry_gpa }
            }
        })?;
        if e & PTE_PRESENT == 0 {
            return Err(WalkError::NotPresent);
        }
        let addr = e & ADDR_MASK;
        if level > 0 && level < 3 && e & PTE_HUGE != 0 {
            let size = 1u64 << (12 + 9 * level);
            return Ok((addr & !(size - 1)) | (gva & (size - 1)));
        }
        if level == 0 {
            return Ok(addr | (gva & 0xfff));
        }
        table = addr;
    }
    Err(WalkError::NotPresent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_view::tests::OneHole;
    use crate::memory::{GuestRam, MemSize};

    #[test]
    fn a_table_in_a_hole_is_a_violation_not_a_translation() {
        let ram = GuestRam::new(MemSize(8 << 20)).unwrap();
        // PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x50_0000 (the hole): a 2 MiB page at 0.
        ram.write(0x1000, &(0x2000u64 | 7).to_le_bytes()).unwrap();
        ram.write(0x2000, &(0x50_0000u64 | 7).to_le_bytes())
            .unwrap();
        ram.write(0x50_0000, &(0x60_0000u64 | 0x87).to_le_bytes())
            .unwrap();
        let hole = OneHole {
            size: 8 << 20,
            hole: 0x50_0000,
        };
        let v = GuestView::new(&ram, &hole);
        assert_eq!(
            walk(&v, 0x1000, 0x1234),
            Err(WalkError::TableInHole {
                entry_gpa: 0x50_0000
            })
        );
        let none = OneHole {
            size: 8 << 20,
            hole: 0x70_0000,
        };
        let v = GuestView::new(&ram, &none);
        assert_eq!(walk(&v, 0x1000, 0x1234), Ok(0x60_1234));
        assert_eq!(walk(&v, 0x1000, 1 << 30), Err(WalkError::NotPresent));
        assert_eq!(
            walk(&v, 16 << 20, 0),
            Err(WalkError::TableNotRam {
                entry_gpa: 16 << 20
            })
        );
    }
}
