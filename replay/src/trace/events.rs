//! The trace's event list, eight bytes an event.
//!
//! A load writes one event per allocation or matched free, and a trace of a busy machine has
//! millions: at 16 bytes each ([`Event`]'s size) the list was the largest thing a load faults in
//! and frees (634 of about 820 fresh pages a load of the shared trace). Each event is packed into
//! one `u64` instead, with the rare event whose fields do not fit kept whole on the side:
//!
//! | bits | allocation | free |
//! |---|---|---|
//! | 0 | 0 (1: bits 8-63 index the side list) | 0 |
//! | 1 | 0 | 1 |
//! | 2-3 | flags | flags |
//! | 4-7 | order | order |
//! | 8-10 | migratetype | allocation id (bits 8-39) |
//! | 11-23 | gfp id | |
//! | 24-63 | pfn | |
//!
//! So an allocation packs when its pfn is below 2^40 (4 PiB of RAM), its gfp id below 2^13 (8,192 distinct flag strings),
//! its order below 16, its migratetype below 8 and its flags below 4; a real trace's always do.

use super::Event;

/// Bit 0: the event is on the side list.
const WIDE: u64 = 1;
/// Bit 1: a free.
const FREE: u64 = 2;
const FLAGS_SHIFT: u32 = 2;
const FLAGS_MASK: u64 = 0b11;
const ORDER_SHIFT: u32 = 4;
const ORDER_MASK: u64 = 0b1111;
const MT_SHIFT: u32 = 8;
const MT_MASK: u64 = 0b111;
const GFP_SHIFT: u32 = 11;
const GFP_BITS: u32 = 13;
const GFP_MASK: u64 = (1 << GFP_BITS) - 1;
const PFN_SHIFT: u32 = 24;
const ALLOC_SHIFT: u32 = 8;

/// Allocations and matched frees in file order, eight bytes each.
#[derive(Clone, Default)]
pub struct Events {
    words: Vec<u64>,
    /// Events whose fields do not fit a word, in order; their words index this.
    wide: Vec<Event>,
}

/// `ev` as one word, if its fields fit.
#[inline(always)]
fn pack(ev: Event) -> Option<u64> {
    match ev {
        Event::Alloc {
            pfn,
            gfp,
            order,
            migratetype,
            flags,
        } => {
            let fits = pfn >> (64 - PFN_SHIFT) == 0
                && u64::from(gfp) <= GFP_MASK
                && u64::from(order) <= ORDER_MASK
                && u64::from(migratetype) <= MT_MASK
                && u64::from(flags) <= FLAGS_MASK;
            fits.then(|| {
                pfn << PFN_SHIFT
                    | u64::from(gfp) << GFP_SHIFT
                    | u64::from(migratetype) << MT_SHIFT
                    | u64::from(order) << ORDER_SHIFT
                    | u64::from(flags) << FLAGS_SHIFT
            })
        }
        Event::Free {
            alloc,
            order,
            flags,
        } => {
            let fits = u64::from(order) <= ORDER_MASK && u64::from(flags) <= FLAGS_MASK;
            fits.then(|| {
                u64::from(alloc) << ALLOC_SHIFT
                    | u64::from(order) << ORDER_SHIFT
                    | u64::from(flags) << FLAGS_SHIFT
                    | FREE
            })
        }
    }
}

/// The event of word `w`, `wide` being the side list.
#[inline(always)]
fn unpack(wide: &[Event], w: u64) -> Event {
    if w & WIDE != 0 {
        return wide[(w >> ALLOC_SHIFT) as usize];
    }
    let order = ((w >> ORDER_SHIFT) & ORDER_MASK) as u8;
    let flags = ((w >> FLAGS_SHIFT) & FLAGS_MASK) as u8;
    if w & FREE != 0 {
        Event::Free {
            alloc: (w >> ALLOC_SHIFT) as u32,
            order,
            flags,
        }
    } else {
        Event::Alloc {
            pfn: w >> PFN_SHIFT,
            gfp: ((w >> GFP_SHIFT) & GFP_MASK) as u32,
            order,
            migratetype: ((w >> MT_SHIFT) & MT_MASK) as u8,
            flags,
        }
    }
}

impl Events {
    /// An empty list with room for `n` events.
    pub fn with_capacity(n: usize) -> Events {
        Events {
            words: Vec::with_capacity(n),
            wide: Vec::new(),
        }
    }

    /// Number of events.
    #[inline]
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether there are none.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Events kept whole on the side (their fields do not fit a word).
    pub fn unpacked(&self) -> usize {
        self.wide.len()
    }

    /// Appends `ev`.
    #[inline(always)]
    pub fn push(&mut self, ev: Event) {
        match pack(ev) {
            Some(w) => self.words.push(w),
            None => {
                self.words
                    .push(WIDE | (self.wide.len() as u64) << ALLOC_SHIFT);
                self.wide.push(ev);
            }
        }
    }

    #[inline(always)]
    fn unpack(&self, w: u64) -> Event {
        unpack(&self.wide, w)
    }

    /// Event `i`, if there is one.
    #[inline]
    pub fn get(&self, i: usize) -> Option<Event> {
        self.words.get(i).map(|&w| self.unpack(w))
    }

    /// The events in order.
    #[inline]
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            words: self.words.iter(),
            wide: &self.wide,
        }
    }

    /// Sets the flags of event `i` (an allocation's or a free's).
    ///
    /// # Panics
    /// If there is no event `i`.
    pub fn set_flags(&mut self, i: usize, new: u8) {
        let w = self.words[i];
        if w & WIDE != 0 {
            match &mut self.wide[(w >> ALLOC_SHIFT) as usize] {
                Event::Alloc { flags, .. } | Event::Free { flags, .. } => *flags = new,
            }
        } else if u64::from(new) <= FLAGS_MASK {
            self.words[i] = w & !(FLAGS_MASK << FLAGS_SHIFT) | u64::from(new) << FLAGS_SHIFT;
        } else {
            let mut ev = self.unpack(w);
            match &mut ev {
                Event::Alloc { flags, .. } | Event::Free { flags, .. } => *flags = new,
            }
            self.words[i] = WIDE | (self.wide.len() as u64) << ALLOC_SHIFT;
            self.wide.push(ev);
        }
    }

    /// Sets every event's flags to `f(event)`, in order.
    pub fn set_all_flags(&mut self, mut f: impl FnMut(Event) -> u8) {
        for i in 0..self.words.len() {
            let new = f(self.unpack(self.words[i]));
            self.set_flags(i, new);
        }
    }

    /// The events as a vector.
    pub fn to_vec(&self) -> Vec<Event> {
        self.iter().collect()
    }

    /// Gives back the room reserved beyond the events.
    pub fn shrink_to_fit(&mut self) {
        self.words.shrink_to_fit();
        self.wide.shrink_to_fit();
    }
}

/// The events of an [`Events`] in order, by value.
pub struct Iter<'a> {
    words: std::slice::Iter<'a, u64>,
    wide: &'a [Event],
}

impl Iterator for Iter<'_> {
    type Item = Event;

    #[inline(always)]
    fn next(&mut self) -> Option<Event> {
        self.words.next().map(|&w| unpack(self.wide, w))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.words.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Events {
    type Item = Event;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl PartialEq for Events {
    fn eq(&self, other: &Events) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Events {}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl FromIterator<Event> for Events {
    fn from_iter<I: IntoIterator<Item = Event>>(it: I) -> Events {
        let mut e = Events::default();
        for ev in it {
            e.push(ev);
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = Event> {
        // Small values (which pack) and any value (which may not), mixed.
        let pfn = prop_oneof![
            0u64..1 << 24,
            (1u64 << 40) - 2..(1u64 << 40) + 2,
            any::<u64>()
        ];
        let small_or_any_u32 = prop_oneof![0u32..8200, any::<u32>()];
        let small_or_any_u8 = || prop_oneof![0u8..17, any::<u8>()];
        prop_oneof![
            (
                pfn,
                small_or_any_u32,
                small_or_any_u8(),
                small_or_any_u8(),
                small_or_any_u8()
            )
                .prop_map(|(pfn, gfp, order, migratetype, flags)| Event::Alloc {
                    pfn,
                    gfp,
                    order,
                    migratetype,
                    flags
                }),
            (any::<u32>(), small_or_any_u8(), small_or_any_u8()).prop_map(
                |(alloc, order, flags)| Event::Free {
                    alloc,
                    order,
                    flags
                }
            ),
        ]
    }

    proptest! {
        /// Every event comes back as it went in, in order, packed or not, and so after its
        /// flags are set.
        #[test]
        fn round_trip(evs in proptest::collection::vec(event(), 0..64),
                      sets in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8)) {
            let mut e = Events::default();
            for &ev in &evs {
                e.push(ev);
            }
            prop_assert_eq!(e.len(), evs.len());
            prop_assert_eq!(e.to_vec(), evs.clone());
            let mut want = evs;
            for (i, f) in sets {
                if want.is_empty() {
                    break;
                }
                let i = i.index(want.len());
                e.set_flags(i, f);
                match &mut want[i] {
                    Event::Alloc { flags, .. } | Event::Free { flags, .. } => *flags = f,
                }
            }
            prop_assert_eq!(e.to_vec(), want.clone());
            for (i, ev) in want.iter().enumerate() {
                prop_assert_eq!(e.get(i), Some(*ev));
            }
            prop_assert_eq!(e.get(want.len()), None);
        }
    }

    #[test]
    fn real_events_pack_and_edge_values_do_not() {
        let real = Event::Alloc {
            pfn: 0x14f_ffff,
            gfp: 12,
            order: 10,
            migratetype: 2,
            flags: 3,
        };
        let far = Event::Alloc {
            pfn: 1 << 40,
            gfp: 0,
            order: 0,
            migratetype: 0,
            flags: 0,
        };
        let many_gfp = Event::Alloc {
            pfn: 1,
            gfp: GFP_MASK as u32 + 1,
            order: 0,
            migratetype: 0,
            flags: 0,
        };
        let e: Events = [real, far, many_gfp].into_iter().collect();
        assert_eq!(e.wide, vec![far, many_gfp]);
        assert_eq!(e.to_vec(), vec![real, far, many_gfp]);
    }
}
