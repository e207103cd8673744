//! Lists of pages a test owns, backed by one static arena and freed when the list is dropped.
//!
//! Tests allocate through a [`PageList`] so that every exit path (including an early `?`)
//! gives the pages back: the VMM's allocator must end each test as it began. Lists are carved
//! from the arena in stack order (drop order of locals is the reverse of creation).

use crate::hc;
use core::cell::{Cell, UnsafeCell};
use veil_abi::Status;

/// Entries in the arena (one u64 per allocation: GPA | order).
const ARENA_SLOTS: usize = 32 * 1024;

/// Backing store of all page lists.
struct Arena {
    slots: UnsafeCell<[u64; ARENA_SLOTS]>,
    top: Cell<usize>,
}

// SAFETY: the guest runs on one vCPU with interrupts off: there is never concurrent access.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena {
    slots: UnsafeCell::new([0; ARENA_SLOTS]),
    top: Cell::new(0),
};

/// Pages owned by a test: `(gpa, order)` pairs.
pub struct PageList {
    start: usize,
    cap: usize,
    len: usize,
}

impl PageList {
    /// A list with room for `cap` allocations (panics if the arena is exhausted: a test bug).
    pub fn new(cap: usize) -> PageList {
        let start = ARENA.top.get();
        assert!(start + cap <= ARENA_SLOTS, "page-list arena exhausted");
        ARENA.top.set(start + cap);
        PageList { start, cap, len: 0 }
    }

    fn slots(&self) -> &[u64] {
        // SAFETY: [start, start+cap) belongs to this list alone (bump-allocated, released on
        // drop); single vCPU, and no reference outlives the calling method.
        unsafe { &(&*ARENA.slots.get())[self.start..self.start + self.cap] }
    }

    fn slots_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `slots`; `&mut self` makes this the only live reference.
        unsafe { &mut (&mut *ARENA.slots.get())[self.start..self.start + self.cap] }
    }

    /// Number of allocations held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether another allocation fits.
    pub fn is_full(&self) -> bool {
        self.len == self.cap
    }

    /// The i-th allocation as `(gpa, order)`.
    pub fn get(&self, i: usize) -> (u64, u8) {
        let e = self.slots()[..self.len][i];
        (e & !hc::ENTRY_ORDER_MASK, (e & hc::ENTRY_ORDER_MASK) as u8)
    }

    /// Records an allocation made elsewhere (panics when full: callers check `is_full`).
    pub fn push(&mut self, gpa: u64, order: u8) {
        assert!(!self.is_full(), "page list full");
        let i = self.len;
        self.slots_mut()[i] = gpa | order as u64;
        self.len += 1;
    }

    /// Allocates `2^order` pages with `gfp` and records them (fails with NoMemory when full).
    pub fn alloc(&mut self, order: u8, gfp: u64) -> Result<u64, Status> {
        if self.is_full() {
            return Err(Status::NoMemory);
        }
        let gpa = hc::alloc(order, gfp)?;
        self.push(gpa, order);
        Ok(gpa)
    }

    /// Allocates `n` blocks of `2^order` pages with `gfp` in one batch and records them; on
    /// failure the ones that succeeded stay recorded. Fails with NoMemory if they cannot fit.
    pub fn alloc_many(&mut self, n: usize, order: u8, gfp: u64) -> Result<(), Status> {
        if self.cap - self.len < n {
            return Err(Status::NoMemory);
        }
        let start = self.len;
        let (done, err) = hc::alloc_batch(order, gfp, &mut self.slots_mut()[start..start + n]);
        self.len += done;
        err.map_or(Ok(()), Err)
    }

    /// Frees the i-th allocation now and forgets it (the last one takes its place).
    pub fn free_at(&mut self, i: usize) -> Result<(), Status> {
        let (gpa, order) = self.get(i);
        let last = self.len - 1;
        let slots = self.slots_mut();
        slots[i] = slots[last];
        self.len -= 1;
        hc::free(gpa, order)
    }

    /// Frees everything (oldest first, in batches); returns the first error but frees all it
    /// can.
    pub fn free_all(&mut self) -> Result<(), Status> {
        let mut first = Ok(());
        let mut i = 0;
        while i < self.len {
            let (done, err) = hc::free_batch(&self.slots()[i..self.len]);
            i += done;
            if let Some(s) = err {
                // Entry i failed: keep the first error, skip it and go on.
                if first.is_ok() {
                    first = Err(s);
                }
                i += 1;
            }
        }
        self.len = 0;
        first
    }
}

impl Drop for PageList {
    fn drop(&mut self) {
        if let Err(s) = self.free_all() {
            crate::println!("veil-guest: cleanup free failed: {s:?}");
        }
        if ARENA.top.get() == self.start + self.cap {
            ARENA.top.set(self.start);
        } else {
            crate::println!("veil-guest: page lists dropped out of order");
        }
    }
}
