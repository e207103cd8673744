//! Console output on the 16550 UART at `SERIAL_PORT` (every port access is a VM exit).

use core::arch::asm;
use core::fmt;
use veil_abi::SERIAL_PORT;

/// Line status register offset and its "transmit holding register empty" bit.
const LSR: u16 = SERIAL_PORT + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Writes one byte, waiting (boundedly) for the transmitter to be ready.
pub fn write_byte(b: u8) {
    for _ in 0..64 {
        let lsr: u8;
        // SAFETY: reading the UART's line status register has no side effect on guest memory.
        unsafe { asm!("in al, dx", out("al") lsr, in("dx") LSR, options(nomem, nostack)) };
        if lsr & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    // SAFETY: writing the UART's transmit register only emits a byte on the console.
    unsafe { asm!("out dx, al", in("dx") SERIAL_PORT, in("al") b, options(nomem, nostack)) };
}

/// A `fmt::Write` sink for the console.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(write_byte);
        Ok(())
    }
}

/// Formats to the console (used by the `print!`/`println!` macros).
pub fn print(args: fmt::Arguments) {
    let _ = fmt::write(&mut Serial, args);
}

/// Prints formatted text on the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print(format_args!($($arg)*)) };
}

/// Prints formatted text and a newline on the console.
#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_byte(b'\n') };
    ($($arg:tt)*) => {{
        $crate::serial::print(format_args!($($arg)*));
        $crate::serial::write_byte(b'\n');
    }};
}
