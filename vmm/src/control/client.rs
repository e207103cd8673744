//! The control socket's client (`veil inspect`): connect, send one request line, read one
//! reply line.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::protocol::Request;
use super::wire::{send_all, Line, LineReader};

/// Longest reply accepted (a stage-2 dump of 64 GiB as SVG is a few MB).
pub const MAX_REPLY: usize = 256 << 20;
/// How long `veil inspect` waits for the reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the path (no file, or a stale socket).
    #[error("no veil run is listening on {}: start one with --control {}", .0.display(), .0.display())]
    NotListening(PathBuf),
    /// The path is a file of another kind, not a socket.
    #[error("{} is not a socket: give the PATH a `veil run --control PATH` serves", .0.display())]
    NotASocket(PathBuf),
    /// Connecting or talking failed otherwise.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The run closed the connection before a whole reply came.
    #[error("control socket {}: the run closed the connection without a reply (it may have ended)", .0.display())]
    NoReply(PathBuf),
    /// No reply within [`REPLY_TIMEOUT`].
    #[error("control socket {}: no reply within {} s", .0.display(), REPLY_TIMEOUT.as_secs())]
    Timeout(PathBuf),
    /// The reply is not a protocol reply.
    #[error("control socket {}: the reply is not a JSON object with \"ok\": {why}", path.display())]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// A reply: the raw line and the parsed object.
#[derive(Debug)]
pub struct Reply {
    /// The line as received (no newline).
    pub raw: String,
    /// The parsed object (`ok` is a bool).
    pub value: Value,
}

impl Reply {
    /// Whether the run answered `"ok":true`.
    pub fn ok(&self) -> bool {
        self.value["ok"] == Value::Bool(true)
    }
}

/// Sends `req` to the run listening at `path` and returns its reply.
pub fn request(path: &Path, req: Request) -> Result<Reply, ClientError> {
    let io_err = |source: io::Error| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(_) if path.metadata().is_ok_and(|m| !m.file_type().is_socket()) => {
            return Err(ClientError::NotASocket(path.to_path_buf()))
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ECONNREFUSED | libc::ENOTSOCK)
            ) =>
        {
            return Err(ClientError::NotListening(path.to_path_buf()))
        }
        Err(e) => return Err(io_err(e)),
    };
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io_err)?;
    send_all(&stream, req.to_line().as_bytes()).map_err(io_err)?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut lines = LineReader::new(MAX_REPLY);
    let line = loop {
        match lines.next_line(&mut stream).map_err(io_err)? {
            Line::Complete(l) => break l,
            Line::Closed { .. } => return Err(ClientError::NoReply(path.to_path_buf())),
            Line::TooLong => {
                return Err(ClientError::BadReply {
                    path: path.to_path_buf(),
                    why: format!("longer than {MAX_REPLY} bytes"),
                })
            }
            Line::Idle if Instant::now() >= deadline => {
                return Err(ClientError::Timeout(path.to_path_buf()))
            }
            Line::Idle => {}
        }
    };
    let bad = |why: String| ClientError::BadReply {
        path: path.to_path_buf(),
        why,
    };
    let raw = String::from_utf8(line).map_err(|_| bad("not UTF-8".into()))?;
    let value: Value = serde_json::from_str(&raw).map_err(|e| bad(e.to_string()))?;
    if !value["ok"].is_boolean() {
        return Err(bad("no \"ok\" field".into()));
    }
    Ok(Reply { raw, value })
}
