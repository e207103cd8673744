//! The two request shapes (GFP-style flags, and a context plus flags) and the single function
//! that turns either into the allocator's internal request.
//!
//! # GFP flags vs. `alloc_pages_special(ctx, gfp, order)`
//!
//! GFP flags are the kernel's classic way to say everything about a request in one word, but
//! they mix two different things: *what the page is* (zeroed, movable, unmapped) and *where and
//! how it may be found* (may it block, may it flip a pageblock). Bits are scarce (`gfp_t` is
//! nearly full), every new use case wants one, and each new bit multiplies the combinations
//! every caller and every path must handle. The alternative proposed in the `__GFP_UNMAPPED`
//! thread is one extensible internal entry point, `alloc_pages_special(enum buddy_context ctx,
//! gfp_t gfp, ...)`: the context names the special use case (unmapped memory today, sensitive
//! memory tomorrow) while the GFP bits keep their ordinary meaning. A new use case then costs a
//! new enum variant instead of a new GFP bit and a new public function, and the set of valid
//! combinations is decided in one place. The price is a second API shape and a rule for how
//! the two interact. Veil offers both: [`crate::BuddyAllocator::alloc_pages`] takes [`Gfp`]
//! (with [`Gfp::UNMAPPED`]), [`crate::BuddyAllocator::alloc_pages_special`] takes a
//! [`BuddyContext`] plus [`Gfp`], and both go through [`AllocRequest::from_gfp`], the one
//! documented translation, so they cannot drift apart. `BuddyContext::Unmapped` with empty GFP
//! bits is exactly `Gfp::UNMAPPED`, `BuddyContext::Sensitive` exactly `Gfp::SENSITIVE`.
//!
//! # Sensitive memory and the user composites
//!
//! ASI adds `__GFP_SENSITIVE` and makes `GFP_USER` imply it: user (and guest) data is absent
//! from the restricted address space. The kernel's `GFP_*` composites are built from
//! `__GFP_*` bits; Veil builds the same composites from its bits ([`Gfp::KERNEL`],
//! [`Gfp::USER`], [`Gfp::HIGHUSER`], [`Gfp::HIGHUSER_MOVABLE`]; the reclaim, I/O, FS and
//! hardwall bits have no meaning here, and there is no highmem). Which requests are sensitive:
//!
//! | request | freetype | sensitive |
//! |---|---|---|
//! | `KERNEL` (empty), `MOVABLE`, `RECLAIMABLE`, `ZERO`, `ATOMIC` | nonsensitive | no |
//! | `USER` = `HIGHUSER` = `SENSITIVE` | unmovable\|sensitive | yes |
//! | `HIGHUSER_MOVABLE` = `SENSITIVE \| MOVABLE` | movable\|sensitive | yes |
//! | `SENSITIVE \| RECLAIMABLE` | reclaimable\|sensitive | yes |
//! | any of the above `\| ZERO` / `\| ATOMIC` | the same | the same (`ATOMIC`: never flips) |
//! | `UNMAPPED`, `USER \| UNMAPPED` (secretmem-like) | unmovable\|unmapped | no: absent from both views |
//! | `HIGHUSER_MOVABLE \| UNMAPPED`, `UNMAPPED \| RECLAIMABLE` | — | [`AllocError::InvalidFlags`] |
//! | `MOVABLE \| RECLAIMABLE` (with anything) | — | [`AllocError::InvalidFlags`] |
//!
//! `UNMAPPED` wins over `SENSITIVE`: an unmapped page is already out of the restricted view,
//! and out of the full one as well. The contexts add their bit: `(Sensitive, gfp)` ≡
//! `(Default, gfp | SENSITIVE)`.

use crate::error::AllocError;
use crate::freetype::{Freetype, Migratetype, Visibility};

/// GFP-style allocation flags (bit values equal `veil_abi::gfp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Gfp(u32);

impl Gfp {
    /// Zero the pages before returning them (through [`crate::Stage2::zero`]).
    pub const ZERO: Gfp = Gfp(1 << 0);
    /// Pages removed from the direct map (stage 2).
    pub const UNMAPPED: Gfp = Gfp(1 << 1);
    /// Movable migratetype.
    pub const MOVABLE: Gfp = Gfp(1 << 2);
    /// Reclaimable migratetype.
    pub const RECLAIMABLE: Gfp = Gfp(1 << 3);
    /// May not block: never flips a pageblock (fails with [`AllocError::WouldBlock`] instead).
    pub const ATOMIC: Gfp = Gfp(1 << 4);
    /// Sensitive pages (ASI's `__GFP_SENSITIVE`): mapped in the full view only, absent from
    /// the restricted view.
    pub const SENSITIVE: Gfp = Gfp(1 << 5);
    /// Every defined bit.
    pub const ALL: Gfp = Gfp(0x3f);

    /// `GFP_KERNEL`: ordinary kernel memory (unmovable, nonsensitive, may flip).
    pub const KERNEL: Gfp = Gfp(0);
    /// `GFP_USER`: memory for user space, sensitive as ASI makes it (`__GFP_SENSITIVE`).
    pub const USER: Gfp = Gfp(Gfp::SENSITIVE.0);
    /// `GFP_HIGHUSER` = `GFP_USER | __GFP_HIGHMEM`; no highmem here, so equal to [`Gfp::USER`].
    pub const HIGHUSER: Gfp = Gfp(Gfp::USER.0);
    /// `GFP_HIGHUSER_MOVABLE` = `GFP_HIGHUSER | __GFP_MOVABLE`: user pages (movable, sensitive).
    pub const HIGHUSER_MOVABLE: Gfp = Gfp(Gfp::HIGHUSER.0 | Gfp::MOVABLE.0);

    /// No flags: an unmovable, mapped, non-zeroed request that may flip.
    pub const fn empty() -> Gfp {
        Gfp(0)
    }

    /// The flags with bits `b`; None if unknown bits are set.
    pub const fn from_bits(b: u32) -> Option<Gfp> {
        if b & !Gfp::ALL.0 != 0 {
            None
        } else {
            Some(Gfp(b))
        }
    }

    /// The flags from a 64-bit hypercall register; None if unknown bits are set.
    pub const fn from_u64(b: u64) -> Option<Gfp> {
        if b > u32::MAX as u64 {
            None
        } else {
            Gfp::from_bits(b as u32)
        }
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `o` is set in `self`.
    pub const fn contains(self, o: Gfp) -> bool {
        self.0 & o.0 == o.0
    }

    /// `self` without the bits of `o`.
    pub const fn without(self, o: Gfp) -> Gfp {
        Gfp(self.0 & !o.0)
    }
}

impl core::ops::BitOr for Gfp {
    type Output = Gfp;
    fn bitor(self, o: Gfp) -> Gfp {
        Gfp(self.0 | o.0)
    }
}

impl core::ops::BitOrAssign for Gfp {
    fn bitor_assign(&mut self, o: Gfp) {
        self.0 |= o.0;
    }
}

/// Context for `alloc_pages_special` (extensible; values equal `veil_abi::context`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BuddyContext {
    /// An ordinary allocation: the GFP bits alone decide (`veil_abi::context::DEFAULT` = 0).
    Default,
    /// Pages removed from the direct map (`veil_abi::context::UNMAPPED` = 1).
    Unmapped,
    /// Sensitive pages, full view only (`veil_abi::context::SENSITIVE` = 2).
    Sensitive,
}

impl BuddyContext {
    /// The context with ABI value `v`, if any.
    pub const fn from_u64(v: u64) -> Option<BuddyContext> {
        match v {
            0 => Some(BuddyContext::Default),
            1 => Some(BuddyContext::Unmapped),
            2 => Some(BuddyContext::Sensitive),
            _ => None,
        }
    }

    /// The ABI value of this context.
    pub const fn as_u64(self) -> u64 {
        match self {
            BuddyContext::Default => 0,
            BuddyContext::Unmapped => 1,
            BuddyContext::Sensitive => 2,
        }
    }

    /// Short lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            BuddyContext::Default => "default",
            BuddyContext::Unmapped => "unmapped",
            BuddyContext::Sensitive => "sensitive",
        }
    }
}

/// The allocator's internal request: what every public entry point is translated into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocRequest {
    /// The freetype the pages must have.
    pub freetype: Freetype,
    /// Zero the pages before returning them.
    pub zero: bool,
    /// Whether the request may flip a pageblock (false for `ATOMIC`).
    pub may_flip: bool,
}

impl AllocRequest {
    /// Translate a context plus GFP bits into an internal request: THE one translation.
    ///
    /// Rules:
    /// - the context contributes flags: `Default` none, `Unmapped` the `UNMAPPED` bit (so
    ///   `(Unmapped, gfp)` ≡ `(Default, gfp | UNMAPPED)`), `Sensitive` the `SENSITIVE` bit;
    ///   a new context adds one arm here;
    /// - migratetype: `MOVABLE` → movable, `RECLAIMABLE` → reclaimable, neither → unmovable,
    ///   both → [`AllocError::InvalidFlags`] (Linux gives that combination no ordinary meaning);
    /// - `UNMAPPED` selects the unmapped freetype; only `unmovable|unmapped` exists, so
    ///   `UNMAPPED` with `MOVABLE` or `RECLAIMABLE` is [`AllocError::InvalidFlags`] (rejected,
    ///   not silently rewritten: unmapped pages cannot be migrated or reclaimed);
    /// - `SENSITIVE` (without `UNMAPPED`) selects the sensitive freetype of the migratetype;
    ///   with `UNMAPPED`, `UNMAPPED` wins (absent from both views is stricter);
    /// - `ZERO` → zero through stage 2 (works for every freetype);
    /// - `ATOMIC` → may not block, hence may not flip a pageblock.
    ///
    /// The rules are evaluated once, at compile time, into a 192-entry table (one byte per
    /// (context, gfp) pair), so the hot path pays one load for the translation.
    #[inline]
    pub const fn from_gfp(ctx: BuddyContext, gfp: Gfp) -> Result<AllocRequest, AllocError> {
        let e = TRANSLATION[ctx.as_u64() as usize * NR_GFP + (gfp.0 & Gfp::ALL.0) as usize];
        if e & ENC_INVALID != 0 {
            return Err(AllocError::InvalidFlags);
        }
        Ok(AllocRequest {
            freetype: Freetype::ALL[(e & ENC_FT) as usize],
            zero: e & ENC_ZERO != 0,
            may_flip: e & ENC_MAY_FLIP != 0,
        })
    }

    /// The rules of [`AllocRequest::from_gfp`], evaluated directly (builds the table).
    pub const fn translate_rules(ctx: BuddyContext, gfp: Gfp) -> Result<AllocRequest, AllocError> {
        let gfp = match ctx {
            BuddyContext::Default => gfp,
            BuddyContext::Unmapped => Gfp(gfp.0 | Gfp::UNMAPPED.0),
            BuddyContext::Sensitive => Gfp(gfp.0 | Gfp::SENSITIVE.0),
        };
        let vis = if gfp.contains(Gfp::UNMAPPED) {
            Visibility::Unmapped
        } else if gfp.contains(Gfp::SENSITIVE) {
            Visibility::Sensitive
        } else {
            Visibility::Nonsensitive
        };
        let mt = match (gfp.contains(Gfp::MOVABLE), gfp.contains(Gfp::RECLAIMABLE)) {
            (false, false) => Migratetype::Unmovable,
            (true, false) => Migratetype::Movable,
            (false, true) => Migratetype::Reclaimable,
            (true, true) => return Err(AllocError::InvalidFlags),
        };
        let freetype = match Freetype::with_visibility(mt, vis) {
            Some(ft) => ft,
            None => return Err(AllocError::InvalidFlags),
        };
        Ok(AllocRequest {
            freetype,
            zero: gfp.contains(Gfp::ZERO),
            may_flip: !gfp.contains(Gfp::ATOMIC),
        })
    }
}

/// Number of GFP bit patterns.
const NR_GFP: usize = Gfp::ALL.0 as usize + 1;
/// Contexts known to the table.
const CONTEXTS: [BuddyContext; 3] = [
    BuddyContext::Default,
    BuddyContext::Unmapped,
    BuddyContext::Sensitive,
];
/// Table encoding: freetype index bits.
const ENC_FT: u8 = 0x0f;
/// Table encoding: zero the pages.
const ENC_ZERO: u8 = 0x10;
/// Table encoding: may flip.
const ENC_MAY_FLIP: u8 = 0x20;
/// Table encoding: invalid combination.
const ENC_INVALID: u8 = 0x80;

/// [`AllocRequest::translate_rules`] for every (context, gfp) pair, encoded in a byte.
const TRANSLATION: [u8; CONTEXTS.len() * NR_GFP] = {
    let mut t = [0u8; CONTEXTS.len() * NR_GFP];
    let mut c = 0;
    while c < CONTEXTS.len() {
        assert!(CONTEXTS[c].as_u64() as usize == c);
        let mut g = 0;
        while g < NR_GFP {
            t[c * NR_GFP + g] = match AllocRequest::translate_rules(CONTEXTS[c], Gfp(g as u32)) {
                Ok(r) => {
                    r.freetype.index() as u8
                        | if r.zero { ENC_ZERO } else { 0 }
                        | if r.may_flip { ENC_MAY_FLIP } else { 0 }
                }
                Err(_) => ENC_INVALID,
            };
            g += 1;
        }
        c += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The values in `veil_abi::gfp` and `veil_abi::context` (abi/src/lib.rs), restated.
    #[test]
    fn bit_values_match_veil_abi() {
        assert_eq!(Gfp::ZERO.bits(), 1 << 0);
        assert_eq!(Gfp::UNMAPPED.bits(), 1 << 1);
        assert_eq!(Gfp::MOVABLE.bits(), 1 << 2);
        assert_eq!(Gfp::RECLAIMABLE.bits(), 1 << 3);
        assert_eq!(Gfp::ATOMIC.bits(), 1 << 4);
        assert_eq!(Gfp::SENSITIVE.bits(), 1 << 5);
        assert_eq!(Gfp::ALL.bits(), 0x3f);
        assert_eq!(Gfp::KERNEL.bits(), 0);
        assert_eq!(Gfp::USER.bits(), 1 << 5);
        assert_eq!(Gfp::HIGHUSER.bits(), 1 << 5);
        assert_eq!(Gfp::HIGHUSER_MOVABLE.bits(), (1 << 5) | (1 << 2));
        assert_eq!(BuddyContext::from_u64(0), Some(BuddyContext::Default));
        assert_eq!(BuddyContext::from_u64(1), Some(BuddyContext::Unmapped));
        assert_eq!(BuddyContext::from_u64(2), Some(BuddyContext::Sensitive));
        assert_eq!(BuddyContext::from_u64(3), None);
        assert_eq!(BuddyContext::from_u64(u64::MAX), None);
        for c in CONTEXTS {
            assert_eq!(BuddyContext::from_u64(c.as_u64()), Some(c));
        }
    }

    #[test]
    fn from_bits_rejects_unknown() {
        for b in 0..64u32 {
            assert_eq!(Gfp::from_bits(b).map(|g| g.bits()), Some(b));
        }
        assert_eq!(Gfp::from_bits(1 << 6), None);
        assert_eq!(Gfp::from_bits(u32::MAX), None);
        assert_eq!(Gfp::from_u64(1 << 40), None);
        assert_eq!(Gfp::from_u64(3), Some(Gfp::ZERO | Gfp::UNMAPPED));
    }

    #[test]
    fn translation_table() {
        use BuddyContext::*;
        let t = |c, g| AllocRequest::from_gfp(c, g);
        let r = t(Default, Gfp::empty()).unwrap();
        assert_eq!(r.freetype, Freetype::UNMOVABLE);
        assert!(!r.zero && r.may_flip);
        assert_eq!(
            t(Default, Gfp::MOVABLE).unwrap().freetype,
            Freetype::MOVABLE
        );
        assert_eq!(
            t(Default, Gfp::RECLAIMABLE).unwrap().freetype,
            Freetype::RECLAIMABLE
        );
        assert_eq!(
            t(Default, Gfp::UNMAPPED).unwrap().freetype,
            Freetype::UNMOVABLE_UNMAPPED
        );
        assert_eq!(
            t(Unmapped, Gfp::empty()).unwrap().freetype,
            Freetype::UNMOVABLE_UNMAPPED
        );
        assert_eq!(
            t(Default, Gfp::MOVABLE | Gfp::RECLAIMABLE),
            Err(AllocError::InvalidFlags)
        );
        assert_eq!(
            t(Default, Gfp::MOVABLE | Gfp::UNMAPPED),
            Err(AllocError::InvalidFlags)
        );
        assert_eq!(t(Unmapped, Gfp::RECLAIMABLE), Err(AllocError::InvalidFlags));
        let r = t(Unmapped, Gfp::ZERO | Gfp::ATOMIC).unwrap();
        assert!(r.zero && !r.may_flip);
    }

    /// The table behind `from_gfp` equals the rules for every (context, gfp) pair.
    #[test]
    fn table_equals_rules() {
        for c in CONTEXTS {
            for b in 0..=Gfp::ALL.bits() {
                let g = Gfp::from_bits(b).unwrap();
                assert_eq!(
                    AllocRequest::from_gfp(c, g),
                    AllocRequest::translate_rules(c, g)
                );
            }
        }
    }

    /// `(Unmapped, gfp)` and `(Default, gfp | UNMAPPED)` are the same request, for every gfp.
    #[test]
    fn context_is_equivalent_to_the_flag() {
        for b in 0..=Gfp::ALL.bits() {
            let g = Gfp::from_bits(b).unwrap();
            assert_eq!(
                AllocRequest::from_gfp(BuddyContext::Unmapped, g),
                AllocRequest::from_gfp(BuddyContext::Default, g | Gfp::UNMAPPED)
            );
            assert_eq!(
                AllocRequest::from_gfp(BuddyContext::Sensitive, g),
                AllocRequest::from_gfp(BuddyContext::Default, g | Gfp::SENSITIVE)
            );
            if let Ok(r) = AllocRequest::from_gfp(BuddyContext::Default, g) {
                assert_eq!(r.freetype.is_unmapped(), g.contains(Gfp::UNMAPPED));
                assert_eq!(
                    r.freetype.is_sensitive(),
                    g.contains(Gfp::SENSITIVE) && !g.contains(Gfp::UNMAPPED)
                );
                assert_eq!(r.zero, g.contains(Gfp::ZERO));
                assert_eq!(r.may_flip, !g.contains(Gfp::ATOMIC));
            }
        }
    }

    /// The documented table of composites (module docs): which requests are sensitive.
    #[test]
    fn composites_table() {
        use Visibility::*;
        let z = Gfp::ZERO;
        let at = Gfp::ATOMIC;
        // (request, expected freetype or None for InvalidFlags)
        let rows: &[(&str, Gfp, Option<Freetype>)] = &[
            ("KERNEL", Gfp::KERNEL, Some(Freetype::UNMOVABLE)),
            ("KERNEL|ZERO", Gfp::KERNEL | z, Some(Freetype::UNMOVABLE)),
            ("MOVABLE", Gfp::MOVABLE, Some(Freetype::MOVABLE)),
            ("RECLAIMABLE", Gfp::RECLAIMABLE, Some(Freetype::RECLAIMABLE)),
            ("ATOMIC", at, Some(Freetype::UNMOVABLE)),
            ("USER", Gfp::USER, Some(Freetype::UNMOVABLE_SENSITIVE)),
            (
                "USER|ZERO",
                Gfp::USER | z,
                Some(Freetype::UNMOVABLE_SENSITIVE),
            ),
            (
                "USER|ATOMIC",
                Gfp::USER | at,
                Some(Freetype::UNMOVABLE_SENSITIVE),
            ),
            (
                "HIGHUSER",
                Gfp::HIGHUSER,
                Some(Freetype::UNMOVABLE_SENSITIVE),
            ),
            (
                "HIGHUSER_MOVABLE",
                Gfp::HIGHUSER_MOVABLE,
                Some(Freetype::MOVABLE_SENSITIVE),
            ),
            (
                "HIGHUSER_MOVABLE|ZERO",
                Gfp::HIGHUSER_MOVABLE | z,
                Some(Freetype::MOVABLE_SENSITIVE),
            ),
            (
                "SENSITIVE|RECLAIMABLE",
                Gfp::SENSITIVE | Gfp::RECLAIMABLE,
                Some(Freetype::RECLAIMABLE_SENSITIVE),
            ),
            (
                "UNMAPPED",
                Gfp::UNMAPPED,
                Some(Freetype::UNMOVABLE_UNMAPPED),
            ),
            (
                "USER|UNMAPPED",
                Gfp::USER | Gfp::UNMAPPED,
                Some(Freetype::UNMOVABLE_UNMAPPED),
            ),
            (
                "HIGHUSER_MOVABLE|UNMAPPED",
                Gfp::HIGHUSER_MOVABLE | Gfp::UNMAPPED,
                None,
            ),
            (
                "SENSITIVE|UNMAPPED|RECLAIMABLE",
                Gfp::SENSITIVE | Gfp::UNMAPPED | Gfp::RECLAIMABLE,
                None,
            ),
            (
                "HIGHUSER_MOVABLE|RECLAIMABLE",
                Gfp::HIGHUSER_MOVABLE | Gfp::RECLAIMABLE,
                None,
            ),
        ];
        for &(name, g, want) in rows {
            let got = AllocRequest::from_gfp(BuddyContext::Default, g);
            match want {
                Some(ft) => {
                    let r = got.unwrap_or_else(|e| panic!("{name}: {e:?}"));
                    assert_eq!(r.freetype, ft, "{name}");
                    assert_eq!(r.zero, g.contains(z), "{name}");
                    assert_eq!(r.may_flip, !g.contains(at), "{name}");
                }
                None => assert_eq!(got, Err(AllocError::InvalidFlags), "{name}"),
            }
        }
        let sensitive: alloc::vec::Vec<&str> = rows
            .iter()
            .filter(|r| r.2.is_some_and(|f| f.visibility() == Sensitive))
            .map(|r| r.0)
            .collect();
        assert_eq!(
            sensitive,
            [
                "USER",
                "USER|ZERO",
                "USER|ATOMIC",
                "HIGHUSER",
                "HIGHUSER_MOVABLE",
                "HIGHUSER_MOVABLE|ZERO",
                "SENSITIVE|RECLAIMABLE"
            ]
        );
        // The context shape gives the same freetypes.
        assert_eq!(
            AllocRequest::from_gfp(BuddyContext::Sensitive, Gfp::MOVABLE)
                .unwrap()
                .freetype,
            Freetype::MOVABLE_SENSITIVE
        );
        assert_eq!(
            AllocRequest::from_gfp(BuddyContext::Sensitive, Gfp::UNMAPPED)
                .unwrap()
                .freetype,
            Freetype::UNMOVABLE_UNMAPPED
        );
        assert_eq!(
            AllocRequest::from_gfp(BuddyContext::Unmapped, Gfp::USER)
                .unwrap()
                .freetype,
            Freetype::UNMOVABLE_UNMAPPED
        );
        assert_eq!(Nonsensitive, Freetype::UNMOVABLE.visibility());
        assert_eq!(Unmapped, Freetype::UNMOVABLE_UNMAPPED.visibility());
    }
}
