//! Bytes on a control socket: sending without SIGPIPE (the `veil` binary restores SIGPIPE's
//! default action, which would end the process when a client has gone) and reading one line
//! at a time within a length limit.

use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

/// Sends all of `bytes` on `stream` with `MSG_NOSIGNAL` (a peer that went away is an
/// `EPIPE` error, not a signal); honours the stream's write timeout (`EAGAIN` after it).
pub fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live slice of `bytes.len()` readable bytes; the fd belongs to
        // `stream`, borrowed for the call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line (newline removed).
    Complete(Vec<u8>),
    /// More than the limit arrived without a newline.
    TooLong,
    /// The peer closed the connection; `partial` bytes of an unfinished line were dropped.
    Closed {
        /// Bytes after the last newline.
        partial: usize,
    },
    /// The read timed out with no complete line yet (call again to keep waiting).
    Idle,
}

/// Splits a stream into lines of at most `limit` bytes.
pub struct LineReader {
    buf: Vec<u8>,
    limit: usize,
}

impl LineReader {
    /// A reader for lines of at most `limit` bytes (newline excluded).
    pub fn new(limit: usize) -> LineReader {
        LineReader {
            buf: Vec::new(),
            limit,
        }
    }

    /// The next line from `r`: buffered bytes first, then one `read` at a time (a read
    /// timeout on `r` returns [`Line::Idle`]).
    pub fn next_line(&mut self, r: &mut impl Read) -> io::Result<Line> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                if line.len() > self.limit {
                    return Ok(Line::TooLong);
                }
                return Ok(Line::Complete(line));
            }
            if self.buf.len() > self.limit {
                return Ok(Line::TooLong);
            }
            let mut chunk = [0u8; 4096];
            match r.read(&mut chunk) {
                Ok(0) => {
                    return Ok(Line::Closed {
                        partial: self.buf.len(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Line::Idle)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_limits_and_half_lines() {
        let mut r = LineReader::new(8);
        let mut input: &[u8] = b"ab\n\ncdefghij\r\nklmnopqrstuv";
        assert_eq!(
            r.next_line(&mut input).unwrap(),
            Line::Complete(b"ab".to_vec())
        );
        assert_eq!(r.next_line(&mut input).unwrap(), Line::Complete(vec![]));
        // 9 bytes with the \r: over the limit of 8.
        assert_eq!(r.next_line(&mut input).unwrap(), Line::TooLong);
        let mut r = LineReader::new(64);
        let mut input: &[u8] = b"x\nhalf";
        assert_eq!(
            r.next_line(&mut input).unwrap(),
            Line::Complete(b"x".to_vec())
        );
        assert_eq!(
            r.next_line(&mut input).unwrap(),
            Line::Closed { partial: 4 }
        );
        let mut r = LineReader::new(4);
        let mut input: &[u8] = b"0123456789";
        assert_eq!(r.next_line(&mut input).unwrap(), Line::TooLong);
    }

    #[test]
    fn send_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        // SAFETY: setting SIGPIPE to its default action, as the veil binary does; a raised
        // SIGPIPE would end this test process.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        let e = send_all(&a, b"hello\n").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
        // SAFETY: back to Rust's default for test processes.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    }
}
