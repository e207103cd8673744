//! The Veil VMM: boots a guest on KVM, owns its memory through the `allocator` crate and
//! enforces unmapped and sensitive pages at stage 2 (memslot holes or `mprotect` of a second
//! mapping; restricted and full ASI views).
//!
//! Entry points: [`vm::VmConfig`] + [`vm::run`] (or [`vm::Vm::new`] then [`vm::Vm::run`]) boot
//! a guest and return a [`report::RunReport`]; [`cli`] is the `veil` command line.
//!
//! Module map:
//! - [`memory`]: guest RAM (one lazily backed anonymous mapping at GPA 0) and `--mem` sizes.
//! - [`elf`]: the validating ELF loader for guest images from untrusted bytes.
//! - [`guest_view`]: the stage-2-checked accessor for every access the VMM makes for the guest;
//!   [`page_walk`]: the page walker through it; [`decode`]: the instruction at RIP and the
//!   memory it touches (iced-x86), for exits that name no GPA.
//! - [`boot`]: GDT, page tables (identity map of reserved memory, direct map of all RAM at
//!   `DIRECT_MAP_BASE`), long-mode registers and the `BootInfo` block.
//! - [`vm`]: KVM setup and the vCPU run loop (port I/O, MMIO, internal errors, shutdown...).
//! - [`session`]: one run's state and the hypercall handlers (validation, tests, expectations,
//!   violations, recovery point, timing, dumps).
//! - [`expect`]: the VMM's own verdict on each test's violations.
//! - [`secret`]: the per-run secret `Hc::PlantSecret` writes, computable for any GPA.
//! - [`report`]: results, the table and the JSON document, exit codes, JUnit XML;
//!   [`symbols`]: guest RIPs as `function+0xoff` from the ELF's symbol table.
//! - [`console`]: the 16550 UART and where its output goes.
//! - [`watchdog`]: `--timeout` and the per-vCPU kick (`immediate_exit` plus a signal).
//! - [`signals`]: SIGINT/SIGTERM/SIGHUP stop the run cleanly (report kept, exit 128 + signal);
//!   SIGUSR1 asks for a numbered stage-2 dump.
//! - [`control`]: `veil run --control PATH` (the live-inspection socket) and `veil inspect`.
//! - [`stage2`], [`dump`], [`kvm_stats`], [`caps`]: the stage-2 engine, dumps, KVM binary
//!   statistics and host capabilities; [`replay_kvm`]: `veil replay --kvm`.
//! - [`mermap`], [`mermap_window`]: the per-vCPU mermap windows (bookkeeping, and their stage 2
//!   under each backend).
//! - [`foreign`]: `veil run --kernel`: multiboot v1 and Linux (linux-loader) kernels on their own
//!   machine (irqchip, PIT, COM1, fw_cfg, isa-debug-exit, INIT/SIPI), with `--secret` ranges.
//! - [`shootdown`]: the `KVM_RUN` gate that parks the other vCPUs around a slots-backend update.
//!
//! vCPU 0 runs in the calling thread, the others (`--vcpus`) in scoped threads of their own; a
//! run owns its VM, RAM and allocator, so several runs may proceed in parallel threads of one
//! process.

pub mod addr;
pub mod boot;
pub mod caps;
pub mod cli;
pub mod console;
pub mod control;
pub mod decode;
pub mod doorbell;
pub mod dump;
pub mod elf;
pub mod expect;
pub mod fault_probe;
pub mod foreign;
pub mod guest_image;
pub mod guest_view;
pub mod kvm_stats;
pub mod livelock;
pub mod memory;
pub mod mermap;
pub mod mermap_window;
pub mod messages;
pub mod page_walk;
pub mod pv_msrs;
pub mod replay_kvm;
pub mod report;
pub mod run_types;
pub mod secret;
pub mod session;
pub mod shootdown;
pub mod signals;
pub mod stage2;
pub mod symbols;
pub mod vm;
pub mod watchdog;

pub use report::{exit_code, RunReport};
pub use vm::{run, ViolationPolicy, VmConfig, VmError};
