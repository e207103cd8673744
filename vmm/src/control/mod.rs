//! Live inspection of a running guest: `veil run --control PATH` serves a Unix socket with a
//! JSON-lines protocol ([`protocol`]) from a thread of the run ([`server`]); `veil inspect` is
//! its client ([`client`], [`inspect`]); the vCPUs publish their state for it ([`board`]);
//! [`wire`] moves the lines. The replies are computed by the session's `live_*` calls under
//! the session lock (`vmm/src/session/live.rs`).

pub mod board;
pub mod client;
pub mod inspect;
pub mod protocol;
pub mod server;
pub mod wire;

pub use board::{VcpuBoard, VcpuRunState};
pub use server::{ControlError, ControlSocket};
