//! The Veil VMM: boots a guest on KVM, owns its memory through the `allocator` crate and
//! enforces unmapped pages at stage 2 by shaping memslots.
//!
//! Entry points: [`vm::VmConfig`] + [`vm::run`] boot a guest and return a [`report::RunReport`];
//! [`cli`] is the `veil` command line.

pub mod boot;
pub mod caps;
pub mod cli;
pub mod console;
pub mod dump;
pub mod elf;
pub mod expect;
pub mod guest_image;
pub mod kvm_stats;
pub mod memory;
pub mod replay_kvm;
pub mod report;
pub mod session;
pub mod stage2;
pub mod vm;
pub mod watchdog;

pub use report::{exit_code, RunReport};
pub use vm::{run, ViolationPolicy, VmConfig, VmError};
