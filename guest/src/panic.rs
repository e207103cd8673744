//! Panic handler: print the message and stop the VM with exit code 4.

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    match info.location() {
        Some(l) => crate::println!(
            "veil-guest: PANIC at {}:{}: {}",
            l.file(),
            l.line(),
            info.message()
        ),
        None => crate::println!("veil-guest: PANIC: {}", info.message()),
    }
    crate::hc::exit(4)
}
