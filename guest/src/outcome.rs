//! What a test returns: `Ok(())`, or a failure/skip with a formatted message.

use core::fmt::{self, Write};
use veil_abi::{Status, TestResult};

/// Capacity of a failure message.
const MSG_MAX: usize = 200;

/// Result of a test function.
pub type Outcome = Result<(), Fail>;

/// A failed or skipped test with its message (formatted into a fixed buffer).
pub struct Fail {
    result: TestResult,
    len: usize,
    buf: [u8; MSG_MAX],
}

impl Fail {
    /// A failure (or skip) whose message is `args`, truncated to the buffer.
    pub fn new(result: TestResult, args: fmt::Arguments) -> Fail {
        let mut f = Fail {
            result,
            len: 0,
            buf: [0; MSG_MAX],
        };
        let _ = f.write_fmt(args);
        f
    }

    /// `Fail` or `Skip`.
    pub fn result(&self) -> TestResult {
        self.result
    }

    /// The message.
    pub fn message(&self) -> &str {
        // Only whole UTF-8 sequences are ever copied in (see write_str).
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("(bad message)")
    }
}

impl Write for Fail {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut tmp = [0u8; 4];
            let e = c.encode_utf8(&mut tmp).as_bytes();
            if self.len + e.len() > MSG_MAX {
                return Ok(());
            }
            self.buf[self.len..self.len + e.len()].copy_from_slice(e);
            self.len += e.len();
        }
        Ok(())
    }
}

/// Adds context to a failed hypercall: `hc::alloc(0, 0).ctx("alloc")?`.
pub trait Ctx<T> {
    /// Turns `Err(status)` into a test failure "what: status".
    fn ctx(self, what: &str) -> Result<T, Fail>;
}

impl<T> Ctx<T> for Result<T, Status> {
    fn ctx(self, what: &str) -> Result<T, Fail> {
        self.map_err(|s| Fail::new(TestResult::Fail, format_args!("{what}: {s:?}")))
    }
}

/// Returns from the test with a failure message.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::outcome::Fail::new(veil_abi::TestResult::Fail, format_args!($($arg)*)))
    };
}

/// Returns from the test as skipped, with a reason.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {
        return Err($crate::outcome::Fail::new(veil_abi::TestResult::Skip, format_args!($($arg)*)))
    };
}

/// Fails the test with a message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::fail!($($arg)*);
        }
    };
}
