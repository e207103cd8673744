//! The Veil VMM: boots a guest on KVM, owns its memory through the `allocator` crate and
//! enforces unmapped pages at stage 2 by shaping memslots.

pub mod caps;
pub mod dump;
pub mod kvm_stats;
pub mod stage2;
pub mod replay_kvm;
