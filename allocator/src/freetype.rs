//! Freetypes: a migratetype plus orthogonal flag bits, with a dense index over the
//! combinations that have free lists.

/// Linux's migratetypes (the ones this allocator models).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Migratetype {
    /// Pages that can never move (kernel data structures).
    Unmovable,
    /// Pages that can be migrated (user memory, page cache).
    Movable,
    /// Pages that can be reclaimed (slab caches with shrinkers).
    Reclaimable,
}

impl Migratetype {
    /// All migratetypes, in index order.
    pub const ALL: [Migratetype; 3] = [
        Migratetype::Unmovable,
        Migratetype::Movable,
        Migratetype::Reclaimable,
    ];

    /// Linux's fallback order for `self` (`fallbacks[]` in mm/page_alloc.c).
    pub const fn fallbacks(self) -> [Migratetype; 2] {
        match self {
            Migratetype::Unmovable => [Migratetype::Reclaimable, Migratetype::Movable],
            Migratetype::Movable => [Migratetype::Reclaimable, Migratetype::Unmovable],
            Migratetype::Reclaimable => [Migratetype::Unmovable, Migratetype::Movable],
        }
    }

    /// Short lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Migratetype::Unmovable => "unmovable",
            Migratetype::Movable => "movable",
            Migratetype::Reclaimable => "reclaimable",
        }
    }
}

/// Freetype flag bit: the pages are removed from the direct map (stage 2).
pub const FT_FLAG_UNMAPPED: u8 = 1 << 0;
/// Reserved flag bit for the later `SENSITIVE` freetype (ASI); no freetype uses it yet.
pub const FT_FLAG_SENSITIVE_RESERVED: u8 = 1 << 1;

/// A migratetype plus orthogonal flag bits (`UNMAPPED`; room for `SENSITIVE`).
///
/// Only combinations with users have free lists, exactly as in the kernel series where the
/// only flagged freetype is `UNMOVABLE|UNMAPPED`. The dense [`Freetype::index`] numbers them
/// `0..Freetype::COUNT`:
///
/// | index | freetype |
/// |---|---|
/// | 0 | unmovable |
/// | 1 | movable |
/// | 2 | reclaimable |
/// | 3 | unmovable\|unmapped |
///
/// `movable|unmapped` and `reclaimable|unmapped` do not exist ([`Freetype::new`] returns
/// `None`): unmapped pages cannot be migrated or reclaimed by touching them, so such a request
/// is a caller bug and is rejected ([`crate::AllocError::InvalidFlags`]) instead of being
/// silently turned into `unmovable|unmapped`. A `SENSITIVE` flag will add rows after index 3
/// without renumbering the existing ones.
///
/// Represented by its dense index, so [`Freetype::index`] is free on the hot path.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Freetype(u8);

/// Migratetype of each freetype, by index.
const FT_MT: [Migratetype; Freetype::COUNT] = [
    Migratetype::Unmovable,
    Migratetype::Movable,
    Migratetype::Reclaimable,
    Migratetype::Unmovable,
];
/// Flag bits of each freetype, by index.
const FT_FLAGS: [u8; Freetype::COUNT] = [0, 0, 0, FT_FLAG_UNMAPPED];
/// Names, by index.
const FT_NAMES: [&str; Freetype::COUNT] =
    ["unmovable", "movable", "reclaimable", "unmovable|unmapped"];

impl Freetype {
    /// Number of freetypes that have free lists (dense index range).
    pub const COUNT: usize = 4;
    /// `unmovable` (mapped).
    pub const UNMOVABLE: Freetype = Freetype(0);
    /// `movable` (mapped).
    pub const MOVABLE: Freetype = Freetype(1);
    /// `reclaimable` (mapped).
    pub const RECLAIMABLE: Freetype = Freetype(2);
    /// `unmovable|unmapped`.
    pub const UNMOVABLE_UNMAPPED: Freetype = Freetype(3);
    /// Every freetype with free lists, in index order.
    pub const ALL: [Freetype; Freetype::COUNT] = [
        Freetype::UNMOVABLE,
        Freetype::MOVABLE,
        Freetype::RECLAIMABLE,
        Freetype::UNMOVABLE_UNMAPPED,
    ];

    /// The freetype for `mt` with the given mapped-ness, if that combination has free lists.
    pub const fn new(mt: Migratetype, unmapped: bool) -> Option<Freetype> {
        match (mt, unmapped) {
            (Migratetype::Unmovable, false) => Some(Freetype::UNMOVABLE),
            (Migratetype::Movable, false) => Some(Freetype::MOVABLE),
            (Migratetype::Reclaimable, false) => Some(Freetype::RECLAIMABLE),
            (Migratetype::Unmovable, true) => Some(Freetype::UNMOVABLE_UNMAPPED),
            _ => None,
        }
    }

    /// The migratetype part.
    pub const fn migratetype(self) -> Migratetype {
        FT_MT[self.0 as usize]
    }

    /// The flag bits (`FT_FLAG_*`).
    pub const fn flags(self) -> u8 {
        FT_FLAGS[self.0 as usize]
    }

    /// Whether pages of this freetype are removed from the direct map.
    pub const fn is_unmapped(self) -> bool {
        self.flags() & FT_FLAG_UNMAPPED != 0
    }

    /// Dense index in `0..COUNT`.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// The freetype with dense index `i`.
    pub const fn from_index(i: usize) -> Option<Freetype> {
        if i < Freetype::COUNT {
            Some(Freetype(i as u8))
        } else {
            None
        }
    }

    /// Short name, e.g. "unmovable", "unmovable|unmapped".
    pub fn name(self) -> &'static str {
        FT_NAMES[self.0 as usize]
    }
}

impl core::fmt::Debug for Freetype {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Freetype({})", self.name())
    }
}

impl core::fmt::Display for Freetype {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Freetype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn index_round_trip_is_dense() {
        let mut seen = [false; Freetype::COUNT];
        for i in 0..Freetype::COUNT {
            let ft = Freetype::from_index(i).unwrap();
            assert_eq!(ft.index(), i);
            assert!(!seen[i]);
            seen[i] = true;
        }
        assert_eq!(Freetype::from_index(Freetype::COUNT), None);
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn new_matches_kernel_combinations() {
        for mt in Migratetype::ALL {
            let ft = Freetype::new(mt, false).unwrap();
            assert_eq!(ft.flags(), 0);
            assert_eq!(ft.migratetype(), mt);
            assert!(!ft.is_unmapped());
            assert_eq!(Freetype::from_index(ft.index()), Some(ft));
        }
        let u = Freetype::new(Migratetype::Unmovable, true).unwrap();
        assert!(u.is_unmapped());
        assert_eq!(u.migratetype(), Migratetype::Unmovable);
        assert_eq!(u.name(), "unmovable|unmapped");
        assert_eq!(Freetype::new(Migratetype::Movable, true), None);
        assert_eq!(Freetype::new(Migratetype::Reclaimable, true), None);
    }

    #[test]
    fn names_are_distinct() {
        for a in Freetype::ALL {
            for b in Freetype::ALL {
                assert_eq!(a == b, a.name() == b.name());
            }
        }
    }

    #[test]
    fn fallbacks_never_include_self() {
        for mt in Migratetype::ALL {
            assert!(!mt.fallbacks().contains(&mt));
        }
    }
}
