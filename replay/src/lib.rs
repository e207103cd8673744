//! Replay real Linux page-allocation traces through direct-map policies.
//!
//! `veil replay` reads an ftrace `kmem` trace ([`reader`], [`parse`], [`trace`]), decides which
//! allocations are unmapped ([`classify`], by [`gfp`] flag rules or a seeded fraction), replays
//! the same events through each [`policy`] on the same amount of memory, and reports the stage-2
//! work (the TLB-flush analogue), direct-map fragmentation and memslot needs of each
//! ([`tracker`], [`report`], [`plot`]; [`output`] picks a file's format from its name,
//! renders SVG to PNG and announces every file written); with `--sensitive`, also the ranges an ASI view
//! switch would toggle under each placement ([`sensitive`]). Every policy drives stage 2 through
//! [`allocator::Stage2`], so the same code runs on a pure model or, from the `vmm` crate, on a
//! real VM's memslots.

#![warn(missing_docs)]

pub mod classify;
pub mod cli;
pub mod flush;
pub mod gfp;
pub mod output;
pub mod parse;
pub mod pfn_table;
pub mod plot;
pub mod policy;
pub mod reader;
pub mod report;
pub mod sensitive;
pub mod size;
pub mod stop;
pub mod sweep;
pub mod trace;
pub mod tracker;

pub use policy::{PolicyKind, PolicyResult};
pub use trace::{Event, Trace};
