//! Console output on the 16550 UART at `SERIAL_PORT` (every port access is a VM exit).

use core::arch::asm;
use core::fmt;
use veil_abi::SERIAL_PORT;

use core::sync::atomic::{AtomicU8, Ordering};

/// Line status register offset and its "transmit holding register empty" bit.
const LSR: u16 = SERIAL_PORT + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// FIFO control register offset and "enable and clear both FIFOs".
const FCR: u16 = SERIAL_PORT + 2;
const FCR_ENABLE_CLEAR: u8 = 0x07;
/// Depth of the 16550A transmit FIFO: bytes that may follow one "THR empty".
const TX_FIFO: u8 = 16;

/// Bytes that may still be written before the line status must be polled again.
static TX_CREDIT: AtomicU8 = AtomicU8::new(0);

/// Enables the transmit FIFO, so one status poll covers 16 bytes (every port access is an exit).
pub fn init() {
    // SAFETY: programming the UART's FIFO control register only affects the console.
    unsafe { asm!("out dx, al", in("dx") FCR, in("al") FCR_ENABLE_CLEAR, options(nomem, nostack)) };
}

/// Writes one byte, waiting (boundedly) for the transmitter when its FIFO may be full.
pub fn write_byte(b: u8) {
    let credit = TX_CREDIT.load(Ordering::Relaxed);
    if credit == 0 {
        for _ in 0..64 {
            let lsr: u8;
            // SAFETY: reading the UART's line status register has no side effect on memory.
            unsafe { asm!("in al, dx", out("al") lsr, in("dx") LSR, options(nomem, nostack)) };
            if lsr & LSR_THR_EMPTY != 0 {
                break;
            }
        }
        TX_CREDIT.store(TX_FIFO - 1, Ordering::Relaxed);
    } else {
        TX_CREDIT.store(credit - 1, Ordering::Relaxed);
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
