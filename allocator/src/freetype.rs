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

/// Freetype flag bit: the pages are removed from the direct map (stage 2), in both views.
pub const FT_FLAG_UNMAPPED: u8 = 1 << 0;
/// Freetype flag bit: the pages are sensitive (ASI): mapped in the full view only, absent
/// from the restricted view.
pub const FT_FLAG_SENSITIVE: u8 = 1 << 1;

/// Where a freetype's pages are visible: the three kinds of memory, by the two views.
///
/// Blocks of different visibility never merge and never share a pageblock; a pageblock
/// changes visibility only by a flip of the whole free block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Visibility {
    /// Mapped in both views (ordinary kernel memory).
    Nonsensitive,
    /// Mapped in the full view only (ASI's sensitive memory: user and guest data).
    Sensitive,
    /// Mapped in neither view (`__GFP_UNMAPPED`).
    Unmapped,
}

impl Visibility {
    /// All three, in index order.
    pub const ALL: [Visibility; 3] = [
        Visibility::Nonsensitive,
        Visibility::Sensitive,
        Visibility::Unmapped,
    ];
    /// Dense index (0..3), in the order of [`Visibility::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
    /// Short lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Visibility::Nonsensitive => "nonsensitive",
            Visibility::Sensitive => "sensitive",
            Visibility::Unmapped => "unmapped",
        }
    }
    /// Whether a change from `self` to `to` makes pages visible somewhere they were not, so
    /// the allocator must zero them first (unmapped → sensitive, unmapped → nonsensitive,
    /// sensitive → nonsensitive).
    pub const fn gains_visibility(self, to: Visibility) -> bool {
        matches!(
            (self, to),
            (Visibility::Unmapped, Visibility::Sensitive)
                | (Visibility::Unmapped, Visibility::Nonsensitive)
                | (Visibility::Sensitive, Visibility::Nonsensitive)
        )
    }
}

/// A migratetype plus orthogonal flag bits (`UNMAPPED`, `SENSITIVE`).
///
/// Only combinations with users have free lists, exactly as in the kernel series where the
/// only unmapped freetype is `UNMOVABLE|UNMAPPED`, while ASI's sensitivity is orthogonal to
/// the migratetype (user pages are movable, `GFP_USER` pages unmovable). The dense
/// [`Freetype::index`] numbers them `0..Freetype::COUNT`:
///
/// | index | freetype | visibility |
/// |---|---|---|
/// | 0 | unmovable | nonsensitive |
/// | 1 | movable | nonsensitive |
/// | 2 | reclaimable | nonsensitive |
/// | 3 | unmovable\|unmapped | unmapped |
/// | 4 | unmovable\|sensitive | sensitive |
/// | 5 | movable\|sensitive | sensitive |
/// | 6 | reclaimable\|sensitive | sensitive |
///
/// `movable|unmapped` and `reclaimable|unmapped` do not exist ([`Freetype::new`] returns
/// `None`): unmapped pages cannot be migrated or reclaimed by touching them, so such a request
/// is a caller bug and is rejected ([`crate::AllocError::InvalidFlags`]) instead of being
/// silently turned into `unmovable|unmapped`. `unmapped|sensitive` does not exist either:
/// unmapped pages are absent from both views, which already keeps them out of the restricted
/// one, so the translation ([`crate::AllocRequest::from_gfp`]) lets `UNMAPPED` win.
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
    Migratetype::Unmovable,
    Migratetype::Movable,
    Migratetype::Reclaimable,
];
/// Flag bits of each freetype, by index.
const FT_FLAGS: [u8; Freetype::COUNT] = [
    0,
    0,
    0,
    FT_FLAG_UNMAPPED,
    FT_FLAG_SENSITIVE,
    FT_FLAG_SENSITIVE,
    FT_FLAG_SENSITIVE,
];
/// Names, by index.
const FT_NAMES: [&str; Freetype::COUNT] = [
    "unmovable",
    "movable",
    "reclaimable",
    "unmovable|unmapped",
    "unmovable|sensitive",
    "movable|sensitive",
    "reclaimable|sensitive",
];

impl Freetype {
    /// Number of freetypes that have free lists (dense index range).
    pub const COUNT: usize = 7;
    /// `unmovable` (nonsensitive).
    pub const UNMOVABLE: Freetype = Freetype(0);
    /// `movable` (nonsensitive).
    pub const MOVABLE: Freetype = Freetype(1);
    /// `reclaimable` (nonsensitive).
    pub const RECLAIMABLE: Freetype = Freetype(2);
    /// `unmovable|unmapped`.
    pub const UNMOVABLE_UNMAPPED: Freetype = Freetype(3);
    /// `unmovable|sensitive` (`GFP_USER`).
    pub const UNMOVABLE_SENSITIVE: Freetype = Freetype(4);
    /// `movable|sensitive` (`GFP_HIGHUSER_MOVABLE`: user pages).
    pub const MOVABLE_SENSITIVE: Freetype = Freetype(5);
    /// `reclaimable|sensitive`.
    pub const RECLAIMABLE_SENSITIVE: Freetype = Freetype(6);
    /// Every freetype with free lists, in index order.
    pub const ALL: [Freetype; Freetype::COUNT] = [
        Freetype::UNMOVABLE,
        Freetype::MOVABLE,
        Freetype::RECLAIMABLE,
        Freetype::UNMOVABLE_UNMAPPED,
        Freetype::UNMOVABLE_SENSITIVE,
        Freetype::MOVABLE_SENSITIVE,
        Freetype::RECLAIMABLE_SENSITIVE,
    ];

    /// The nonsensitive (`unmapped` false) or unmapped freetype for `mt`, if that combination
    /// has free lists (see [`Freetype::with_visibility`] for all three kinds).
    pub const fn new(mt: Migratetype, unmapped: bool) -> Option<Freetype> {
        Freetype::with_visibility(
            mt,
            if unmapped {
                Visibility::Unmapped
            } else {
                Visibility::Nonsensitive
            },
        )
    }

    /// The freetype for `mt` with visibility `v`, if that combination has free lists.
    pub const fn with_visibility(mt: Migratetype, v: Visibility) -> Option<Freetype> {
        match (mt, v) {
            (Migratetype::Unmovable, Visibility::Nonsensitive) => Some(Freetype::UNMOVABLE),
            (Migratetype::Movable, Visibility::Nonsensitive) => Some(Freetype::MOVABLE),
            (Migratetype::Reclaimable, Visibility::Nonsensitive) => Some(Freetype::RECLAIMABLE),
            (Migratetype::Unmovable, Visibility::Unmapped) => Some(Freetype::UNMOVABLE_UNMAPPED),
            (Migratetype::Unmovable, Visibility::Sensitive) => Some(Freetype::UNMOVABLE_SENSITIVE),
            (Migratetype::Movable, Visibility::Sensitive) => Some(Freetype::MOVABLE_SENSITIVE),
            (Migratetype::Reclaimable, Visibility::Sensitive) => {
                Some(Freetype::RECLAIMABLE_SENSITIVE)
            }
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

    /// Whether pages of this freetype are removed from the direct map (both views).
    pub const fn is_unmapped(self) -> bool {
        self.flags() & FT_FLAG_UNMAPPED != 0
    }

    /// Whether pages of this freetype are sensitive (full view only).
    pub const fn is_sensitive(self) -> bool {
        self.flags() & FT_FLAG_SENSITIVE != 0
    }

    /// Where pages of this freetype are visible.
    pub const fn visibility(self) -> Visibility {
        if self.is_unmapped() {
            Visibility::Unmapped
        } else if self.is_sensitive() {
            Visibility::Sensitive
        } else {
            Visibility::Nonsensitive
        }
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

    /// Short name, e.g. "unmovable", "unmovable|unmapped", "movable|sensitive".
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

    /// Every migratetype has a sensitive freetype; flags, visibility and names agree.
    #[test]
    fn sensitive_freetypes_and_visibility() {
        for mt in Migratetype::ALL {
            let s = Freetype::with_visibility(mt, Visibility::Sensitive).unwrap();
            assert!(s.is_sensitive() && !s.is_unmapped());
            assert_eq!(s.migratetype(), mt);
            assert_eq!(s.visibility(), Visibility::Sensitive);
            assert!(s.name().ends_with("|sensitive"));
            assert!(
                s.index() > Freetype::UNMOVABLE_UNMAPPED.index(),
                "existing rows kept"
            );
        }
        let mut per_vis = [0; 3];
        for ft in Freetype::ALL {
            per_vis[ft.visibility().index()] += 1;
            assert_eq!(
                Freetype::with_visibility(ft.migratetype(), ft.visibility()),
                Some(ft)
            );
            assert!(!(ft.is_sensitive() && ft.is_unmapped()));
        }
        assert_eq!(per_vis, [3, 3, 1]);
        use Visibility::*;
        for a in Visibility::ALL {
            assert!(!a.gains_visibility(a));
            assert!(!a.gains_visibility(Unmapped));
        }
        assert!(Unmapped.gains_visibility(Sensitive));
        assert!(Unmapped.gains_visibility(Nonsensitive));
        assert!(Sensitive.gains_visibility(Nonsensitive));
        assert!(!Nonsensitive.gains_visibility(Sensitive));
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
