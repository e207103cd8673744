//! Stopping a replay early on request (SIGINT/SIGTERM/SIGHUP, as the `veil` binary arranges):
//! reading the trace stops (the report counts the lines read so far), the policy being replayed
//! stops where it is (its `events` says how far it got), later ones are skipped, and the report
//! says it was interrupted.

use std::io::{self, BufRead, Read};
use std::sync::OnceLock;

use serde::Serialize;

/// Answers "has a stop been requested, and by which signal (number, name)?".
pub type StopCheck = fn() -> Option<(i32, &'static str)>;

static CHECK: OnceLock<StopCheck> = OnceLock::new();

/// Installs the process's stop check (the first one installed stays).
pub fn set_check(f: StopCheck) {
    let _ = CHECK.set(f);
}

/// The stop request, if any.
pub fn requested() -> Option<Interrupted> {
    let (signal, name) = CHECK.get().and_then(|f| f())?;
    Some(Interrupted { signal, name })
}

/// Why a replay stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Interrupted {
    /// The signal number.
    pub signal: i32,
    /// Its name ("SIGINT", ...).
    pub name: &'static str,
}

impl Interrupted {
    /// 128 + the signal number, as a shell reports a process killed by it.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

/// A reader that ends (EOF) once a stop is requested, including when the request interrupts a
/// blocking read (`EINTR`, e.g. on a pipe with no writer activity) or breaks a decoder.
pub struct StopAtRequest<R>(pub R);

impl<R: Read> Read for StopAtRequest<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if requested().is_some() {
                return Ok(0);
            }
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) if requested().is_some() => return Ok(0),
                r => return r,
            }
        }
    }
}

impl<R: BufRead> BufRead for StopAtRequest<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if requested().is_some() {
            return Ok(&[]);
        }
        loop {
            match self.0.fill_buf() {
                Ok(_) => break,
                Err(_) if requested().is_some() => return Ok(&[]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // A second call after a successful one hands out the same buffered bytes.
        self.0.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.0.consume(n)
    }
}
