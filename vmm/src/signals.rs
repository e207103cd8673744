//! SIGINT, SIGTERM and SIGHUP: ask the run to stop cleanly instead of ending the process.
//!
//! [`install`] (done by the `veil` binary) replaces the default actions. The first signal is
//! recorded ([`pending`]) and every registered vCPU thread is sent the kick signal (which
//! interrupts `KVM_RUN`; the handler touches no `kvm_run`, and the watchdog kicks with
//! `immediate_exit` at its next tick for a vCPU that was about to enter it); the run loop then stops
//! the guest, the report and dumps are written, guest RAM is wiped, and `veil` exits with
//! 128 + the signal number (130, 143, 129). A second signal while that happens restores the
//! default action and re-raises it: the process dies at once.
//!
//! SIGUSR1 asks for a stage-2 dump: its handler only raises a flag ([`take_dump_request`])
//! and kicks the vCPU threads as above (the watchdogs also kick while the flag is up); the
//! first run loop to see it writes the next numbered dump beside `--dump-ept` under the
//! session lock (`Session::signal_dump`), or says on stderr why nothing was written. Outside
//! `veil run` it is ignored.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use libc::c_int;

/// The signals handled.
pub const SIGNALS: [c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A SIGUSR1 dump request not yet taken by a run loop.
static DUMP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// The first signal received (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);
/// `pthread_t`s of the vCPU threads to kick (0: a free slot).
static VCPUS: [AtomicU64; veil_abi::MAX_VCPUS as usize] =
    [const { AtomicU64::new(0) }; veil_abi::MAX_VCPUS as usize];

extern "C" fn on_signal(sig: c_int) {
    if PENDING
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // SAFETY: signal() and raise() are async-signal safe; the default action of these
        // signals ends the process.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    kick_vcpus();
}

extern "C" fn on_dump_signal(_sig: c_int) {
    DUMP_REQUESTED.store(true, Ordering::SeqCst);
    kick_vcpus();
}

/// Sends the kick signal to every registered vCPU thread (async-signal safe).
fn kick_vcpus() {
    for slot in &VCPUS {
        let t = slot.load(Ordering::SeqCst);
        if t != 0 {
            // SAFETY: pthread_kill is async-signal safe; `t` was registered by a live vCPU
            // thread that unregisters itself before it ends (`VcpuRegistration::drop`).
            unsafe { libc::pthread_kill(t as libc::pthread_t, crate::watchdog::kick_signal()) };
        }
    }
}

/// Installs the handlers for [`SIGNALS`] and SIGUSR1 (and the watchdog's kick handler they
/// rely on).
pub fn install() -> std::io::Result<()> {
    crate::watchdog::install_handler()?;
    let handlers = SIGNALS
        .map(|sig| (sig, on_signal as extern "C" fn(c_int), 0))
        .into_iter()
        // SA_RESTART: a dump request must not make another thread's read fail with EINTR.
        .chain([(
            libc::SIGUSR1,
            on_dump_signal as extern "C" fn(c_int),
            libc::SA_RESTART,
        )]);
    for (sig, handler, flags) in handlers {
        // SAFETY: a zeroed sigaction with a plain handler, the given flags (no SA_RESTART for
        // the stop signals) and an empty mask is valid; the handlers only touch atomics and
        // async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as libc::sighandler_t;
            sa.sa_flags = flags;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Whether a SIGUSR1 dump request is waiting (the watchdogs kick while it is).
pub fn dump_requested() -> bool {
    DUMP_REQUESTED.load(Ordering::SeqCst)
}

/// Takes a waiting SIGUSR1 dump request: true for exactly one caller per request.
pub fn take_dump_request() -> bool {
    DUMP_REQUESTED.swap(false, Ordering::SeqCst)
}

/// The signal that asked the run to stop, if any.
pub fn pending() -> Option<c_int> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit code for a run stopped by `sig`: 128 + its number (130 SIGINT, 143 SIGTERM, 129
/// SIGHUP), as a shell reports a process killed by it.
pub fn exit_code(sig: c_int) -> i32 {
    128 + sig
}

/// The signal's name ("SIGINT", ...).
pub fn name(sig: c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// Makes the calling thread one of those a signal kicks out of `KVM_RUN`, until dropped.
pub struct VcpuRegistration(Option<usize>);

impl VcpuRegistration {
    /// Registers the calling thread (in a free slot; with none free, a vCPU of an embedder
    /// running more than [`veil_abi::MAX_VCPUS`] at once, it is not kicked by signals but still
    /// stops at the next exit that checks [`pending`]).
    pub fn new() -> VcpuRegistration {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        VcpuRegistration(VCPUS.iter().position(|slot| {
            slot.compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        }))
    }
}

impl Default for VcpuRegistration {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for VcpuRegistration {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            VCPUS[i].store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_names() {
        assert_eq!(exit_code(libc::SIGINT), 130);
        assert_eq!(exit_code(libc::SIGTERM), 143);
        assert_eq!(exit_code(libc::SIGHUP), 129);
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
