//! The boot information block the VMM hands over, validated once and then read everywhere.

use core::sync::atomic::{AtomicU64, Ordering};
use veil_abi::{BootInfo, BootMode, ABI_VERSION, BOOT_MAGIC, PAGE_SIZE, SELECTION_MAX};

/// Address of the validated boot block (0 until [`init`] succeeded).
static INFO: AtomicU64 = AtomicU64::new(0);

/// Validates the boot block at `ptr` and remembers it.
pub fn init(ptr: u64) -> Result<&'static BootInfo, &'static str> {
    if ptr == 0 || !ptr.is_multiple_of(8) || ptr >= veil_abi::STACK_TOP_GPA {
        return Err("pointer outside the reserved low memory");
    }
    // SAFETY: the VMM passes the GPA of a BootInfo in the identity-mapped reserved memory
    // (checked to be low and aligned above); nothing writes it after boot.
    let info: &'static BootInfo = unsafe { &*(ptr as *const BootInfo) };
    if info.magic != BOOT_MAGIC {
        return Err("bad magic");
    }
    if info.abi_version != ABI_VERSION {
        return Err("ABI version mismatch");
    }
    if info.mode != BootMode::Run as u32 && info.mode != BootMode::List as u32 {
        return Err("unknown boot mode");
    }
    if info.selection_len as usize > SELECTION_MAX {
        return Err("selection too long");
    }
    if !info.managed_start.is_multiple_of(PAGE_SIZE)
        || info.managed_start > info.managed_end
        || info.managed_end > info.ram_size
        || info.direct_map_size < info.ram_size
    {
        return Err("inconsistent memory layout");
    }
    INFO.store(ptr, Ordering::Relaxed);
    Ok(info)
}

/// The validated boot block.
pub fn info() -> &'static BootInfo {
    let ptr = INFO.load(Ordering::Relaxed);
    assert!(ptr != 0, "boot info used before boot::init");
    // SAFETY: `init` validated this pointer and the block is never written after boot.
    unsafe { &*(ptr as *const BootInfo) }
}

/// What the VMM asked for.
pub fn mode() -> BootMode {
    if info().mode == BootMode::List as u32 {
        BootMode::List
    } else {
        BootMode::Run
    }
}

/// Whether the test `name` is in the selection (an empty selection selects every test).
pub fn selected(name: &str) -> bool {
    let info = info();
    let sel = &info.selection[..info.selection_len as usize];
    sel.iter().all(|b| b.is_ascii_whitespace()) || named(name)
}

/// Whether the selection names `name` explicitly (`veil run --tests name`).
pub fn named(name: &str) -> bool {
    let info = info();
    info.selection[..info.selection_len as usize]
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii() == name.as_bytes())
}
