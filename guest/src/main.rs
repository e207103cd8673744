//! The default Veil guest: a tiny `no_std` x86-64 kernel that runs the isolation suite.
//!
//! The VMM enters [`entry`] in 64-bit mode with its own page tables (identity map of the
//! reserved low memory, direct map of all RAM at `DIRECT_MAP_BASE`) and `rdi` pointing at the
//! [`veil_abi::BootInfo`]. The kernel loads its IDT, checks the boot block, announces every test
//! of the [`registry`], runs the selected ones and exits through a hypercall.
#![no_std]
#![no_main]
// A test failure carries its formatted message inline (no heap here): a large `Err` is fine.
#![allow(clippy::result_large_err)]

mod boot;
mod dm;
mod entry;
mod hc;
mod idt;
mod outcome;
mod pages;
mod panic;
mod registry;
mod ring3;
mod route;
mod serial;
mod smp;
mod tests;

use veil_abi::{BootMode, TestResult, ABI_VERSION};

/// Rust entry point, called by `_start` with the boot-info pointer and the vCPU index the VMM
/// passed in `rdi` and `rsi`. vCPUs other than 0 load the IDT vCPU 0 fills and park.
#[no_mangle]
extern "C" fn kmain(boot_info: u64, cpu: u64) -> ! {
    if cpu != 0 {
        idt::load();
        smp::park(cpu.min(u64::from(veil_abi::MAX_VCPUS) - 1) as u32);
    }
    idt::init();
    serial::init();
    // The first hypercall comes before any console output: the VMM times process start to it.
    match hc::version() {
        Ok(ABI_VERSION) => {}
        Ok(v) => {
            println!("veil-guest: VMM speaks ABI {v}, guest {ABI_VERSION}");
            hc::exit(2);
        }
        Err(s) => {
            println!("veil-guest: Version hypercall failed: {s:?}");
            hc::exit(2);
        }
    }
    let info = match boot::init(boot_info) {
        Ok(info) => info,
        Err(why) => {
            println!("veil-guest: bad boot info: {why}");
            hc::exit(2);
        }
    };
    println!(
        "veil-guest: up, {} MiB RAM, managed {:#x}..{:#x}",
        info.ram_size >> 20,
        info.managed_start,
        info.managed_end
    );
    let _ = hc::log("veil-guest: kernel up, announcing tests");
    for test in registry::TESTS {
        if let Err(s) = hc::test_announce(test.name) {
            println!("veil-guest: announce {} failed: {s:?}", test.name);
        }
    }
    if boot::mode() == BootMode::List {
        hc::exit(0);
    }
    let failed = run_selected();
    hc::exit(if failed == 0 { 0 } else { 1 });
}

/// Runs every selected test between `TestBegin` and `TestEnd`; returns how many failed.
fn run_selected() -> u32 {
    let mut failed = 0;
    for test in registry::TESTS {
        if !boot::selected(test.name) {
            continue;
        }
        if let Err(s) = hc::test_begin(test.name) {
            println!("veil-guest: {}: TestBegin failed: {s:?}", test.name);
            failed += 1;
            continue;
        }
        let outcome = (test.run)();
        let (result, msg) = match &outcome {
            Ok(()) => (TestResult::Pass, "ok"),
            Err(f) => (f.result(), f.message()),
        };
        if result == TestResult::Fail {
            failed += 1;
        }
        println!("veil-guest: {} {:?}: {}", test.name, result, msg);
        if let Err(s) = hc::test_end(result, msg) {
            println!("veil-guest: {}: TestEnd failed: {s:?}", test.name);
            failed += 1;
        }
    }
    failed
}
