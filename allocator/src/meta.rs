//! Per-page metadata: 12 bytes per managed page, kept outside the managed frames.

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

/// Metadata of one page frame. Only block heads carry a state; `next`/`prev` link free
/// blocks (and nothing else) into their free list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct PageMeta {
    /// Next free block on the same list (page offset), or [`NIL`].
    pub next: u32,
    /// Previous free block on the same list, or [`NIL`].
    pub prev: u32,
    /// `ST_*` bits | order.
    pub state: u8,
    /// Freetype index: of the allocation for `ST_ALLOC`, of the list for `ST_FREE`/`ST_CACHED`.
    pub ft: u8,
    _pad: [u8; 2],
}

impl PageMeta {
    /// A page that is not a head.
    pub const EMPTY: PageMeta = PageMeta {
        next: NIL,
        prev: NIL,
        state: ST_NONE,
        ft: 0,
        _pad: [0; 2],
    };
}

/// Bytes of per-page metadata ([`PageMeta`]).
pub const PAGE_META_BYTES: usize = core::mem::size_of::<PageMeta>();

const _: () = assert!(PAGE_META_BYTES == 12);
