//! Per-page metadata, kept outside the managed frames in two parallel arrays indexed by page
//! offset: a 2-byte head record ([`PageMeta`]: state and freetype) and an 8-byte pair of
//! free-list links ([`Links`]), 10 bytes per page in total.
//!
//! The split (struct of arrays) keeps the bytes every free and merge step must read, a head's
//! state, in a dense array (256 KiB for 2^17 pages, which stays in a 1 MiB L2 cache), so the
//! buddy checks on the critical path of a free rarely miss; the links are only touched to
//! unlink or push a block.

/// "No page" in a 32-bit link.
pub(crate) const NIL: u32 = u32::MAX;

/// State byte of a page that is not the head of any block (a tail, or nothing).
pub(crate) const ST_NONE: u8 = 0;
/// State bit: head of a free block on a buddy free list (low 4 bits: order).
pub(crate) const ST_FREE: u8 = 0x40;
/// State bit: head of a live allocation (low 4 bits: order).
pub(crate) const ST_ALLOC: u8 = 0x80;
/// State bit: head of a small block parked in a cache ([`crate::pcp`]) (low 4 bits: order).
pub(crate) const ST_CACHED: u8 = 0x20;
/// Mask of the order in a state byte.
pub(crate) const ST_ORDER: u8 = 0x0f;

/// Head record of one page frame. Only block heads carry a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct PageMeta {
    /// `ST_*` bits | order.
    pub state: u8,
    /// Freetype index: of the allocation for `ST_ALLOC`, of the list for `ST_FREE`/`ST_CACHED`.
    pub ft: u8,
}

impl PageMeta {
    /// A page that is not a head.
    pub const EMPTY: PageMeta = PageMeta {
        state: ST_NONE,
        ft: 0,
    };
}

/// Free-list links of one page frame: meaningful only while the page heads a free block on
/// a buddy free list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Links {
    /// Next free block on the same list (page offset), or [`NIL`].
    pub next: u32,
    /// Previous free block on the same list, or [`NIL`].
    pub prev: u32,
}

impl Links {
    /// Not on a list.
    pub const EMPTY: Links = Links {
        next: NIL,
        prev: NIL,
    };
}

/// Bytes of per-page metadata ([`PageMeta`] plus [`Links`]).
pub const PAGE_META_BYTES: usize = core::mem::size_of::<PageMeta>() + core::mem::size_of::<Links>();

const _: () = assert!(PAGE_META_BYTES == 10);
