//! The control socket's server: `veil run --control PATH` binds a Unix socket before the guest
//! boots ([`ControlSocket::bind`]) and serves it from a thread of the run's thread scope
//! ([`serve`]) until the run ends; the socket file is removed when the [`ControlSocket`] drops.
//!
//! Each connection gets a thread of its own (at most [`MAX_CLIENTS`] at once), reads request
//! lines with a short read timeout so that it sees the run's end, answers each under the
//! session lock (the socket is written after the lock is dropped), and closes after
//! [`IDLE_LIMIT`] without a request, on a line over [`MAX_REQUEST_LINE`], or when the client
//! goes. Nothing a client sends or fails to send reaches a vCPU thread.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::board::VcpuBoard;
use super::protocol::{error_line, ok_line, parse_request, Request, MAX_REQUEST_LINE};
use super::wire::{send_all, Line, LineReader};
use crate::session::Session;

/// Most clients served at once; one more gets an error reply and is closed.
pub const MAX_CLIENTS: usize = 8;
/// A connection with no complete request for this long is closed.
pub const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// How long one reply may take to write before the client is given up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop and each connection look at the run's end.
const POLL: Duration = Duration::from_millis(20);
/// Read timeout of a connection (its reaction time to the run's end).
const READ_POLL: Duration = Duration::from_millis(100);

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The path exists and is not a socket.
    #[error("--control {0}: the path exists and is not a socket (refusing to replace it)")]
    NotASocket(PathBuf),
    /// Another process answers on the socket.
    #[error("--control {0}: another process is listening on this socket")]
    InUse(PathBuf),
    /// The path is empty or too long for a Unix socket address.
    #[error("--control {path}: {why}")]
    BadPath {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// bind/listen or the stale socket's removal failed.
    #[error("--control {path}: cannot open the socket: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Longest socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The listening socket of `--control PATH`; removes PATH when dropped (if it is still the
/// socket this bound).
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file this bound.
    id: (u64, u64),
}

impl ControlSocket {
    /// Binds a listening socket at `path`. An existing socket nobody answers on (left by a run
    /// that was killed) is replaced; an existing file of any other kind, or a socket another
    /// process listens on, is refused.
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let bad = |why| ControlError::BadPath {
            path: path.to_path_buf(),
            why,
        };
        let len = path.as_os_str().as_bytes().len();
        if len == 0 {
            return Err(bad("empty path"));
        }
        if len > MAX_SOCKET_PATH {
            return Err(bad("longer than the 107 bytes a Unix socket path may have"));
        }
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Ok(_) => return Err(ControlError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let m = std::fs::symlink_metadata(path).map_err(io_err)?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// What the server answers from.
pub struct Live<'a> {
    /// The run's session (replies are built under its lock).
    pub session: &'a Mutex<Session>,
    /// The vCPUs' published status.
    pub board: &'a VcpuBoard,
}

impl Live<'_> {
    /// The reply line for `req`.
    pub fn answer(&self, req: Request) -> String {
        let lock = || self.session.lock().unwrap_or_else(|e| e.into_inner());
        let fields = match req {
            Request::Dump(format) => lock().live_dump(format),
            Request::Stats => lock().live_stats(),
            Request::Violations => lock().live_violations(),
            Request::Vcpus => serde_json::json!({
                "snapshot": true,
                "vcpus": self.board.snapshot(),
            }),
        };
        ok_line(fields)
    }
}

/// Serves `sock` until `stop` is raised, then returns after every connection thread ended
/// (each notices within [`READ_POLL`], or [`WRITE_TIMEOUT`] while writing a reply).
pub fn serve(sock: &ControlSocket, live: &Live<'_>, stop: &AtomicBool) {
    let active = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        while !stop.load(Ordering::SeqCst) {
            match sock.listener.accept() {
                Ok((stream, _)) => {
                    if active.load(Ordering::SeqCst) >= MAX_CLIENTS {
                        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                        let _ = send_all(
                            &stream,
                            error_line(&format!("too many clients: at most {MAX_CLIENTS} at once"))
                                .as_bytes(),
                        );
                        continue;
                    }
                    active.fetch_add(1, Ordering::SeqCst);
                    let active = &active;
                    scope.spawn(move || {
                        if let Err(e) = client(stream, live, stop) {
                            log::debug!("control: client dropped: {e}");
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    std::thread::sleep(POLL);
                }
            }
        }
    });
}

/// One connection: request lines in, reply lines out.
fn client(mut stream: UnixStream, live: &Live<'_>, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_POLL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut lines = LineReader::new(MAX_REQUEST_LINE);
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        match lines.next_line(&mut stream)? {
            Line::Complete(line) => {
                last = Instant::now();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let reply = match parse_request(&line) {
                    Ok(req) => live.answer(req),
                    Err(e) => error_line(&e.to_string()),
                };
                send_all(&stream, reply.as_bytes())?;
            }
            Line::TooLong => {
                let msg = format!(
                    "request line longer than {MAX_REQUEST_LINE} bytes: closing the connection"
                );
                send_all(&stream, error_line(&msg).as_bytes())?;
                drain_and_close(stream);
                return Ok(());
            }
            Line::Closed { .. } => return Ok(()),
            Line::Idle if last.elapsed() >= IDLE_LIMIT => {
                let msg = format!(
                    "no request for {} s: closing the connection",
                    IDLE_LIMIT.as_secs()
                );
                return send_all(&stream, error_line(&msg).as_bytes());
            }
            Line::Idle => {}
        }
    }
    Ok(())
}

/// Most bytes read and dropped after refusing an over-long line, and for how long.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_millis(200);

/// Closes our side for writing, then reads and drops what the client still sends (bounded),
/// so that the close does not reset the connection before the client read the error reply
/// (closing a Unix stream socket with unread input makes the peer's reads fail with
/// `ECONNRESET`).
fn drain_and_close(mut stream: UnixStream) {
    use std::io::Read;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let start = Instant::now();
    let mut dropped = 0;
    let mut buf = [0u8; 8192];
    while dropped < DRAIN_BYTES && start.elapsed() < DRAIN_TIME {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => dropped += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("veil-ctl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn bind_refuses_files_and_live_sockets_and_replaces_stale_ones() {
        let d = scratch("bind");
        let file = d.join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(matches!(
            ControlSocket::bind(&file),
            Err(ControlError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        assert!(matches!(
            ControlSocket::bind(&d),
            Err(ControlError::NotASocket(_))
        ));
        let sock = d.join("s");
        let a = ControlSocket::bind(&sock).unwrap();
        assert!(matches!(
            ControlSocket::bind(&sock),
            Err(ControlError::InUse(_))
        ));
        drop(a);
        assert!(!sock.exists(), "removed at drop");
        // A stale socket (its listener gone, file left) is replaced.
        let stale = UnixListener::bind(&sock).unwrap();
        drop(stale);
        assert!(sock.exists());
        let b = ControlSocket::bind(&sock).unwrap();
        assert_eq!(b.path(), sock);
        drop(b);
        let long = d.join("x".repeat(120));
        assert!(matches!(
            ControlSocket::bind(&long),
            Err(ControlError::BadPath { .. })
        ));
        assert!(matches!(
            ControlSocket::bind(Path::new("")),
            Err(ControlError::BadPath { .. })
        ));
        assert!(matches!(
            ControlSocket::bind(&d.join("missing/s")),
            Err(ControlError::Io { .. })
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
