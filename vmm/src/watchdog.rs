//! The watchdog: a thread that kicks a runaway vCPU out of `KVM_RUN` at `--timeout`, and
//! samples a vCPU that has made no exit for a while (the livelock detector's silent-spin check).
//!
//! It also holds Veil's one way to kick a vCPU ([`Kick`]): the kicking thread sets the vCPU's
//! `kvm_run.immediate_exit` (atomically), then sends the vCPU thread a real-time signal whose
//! handler does nothing. A vCPU inside `KVM_RUN` leaves it with `EINTR` because of the signal;
//! one about to enter it returns at once because of `immediate_exit`, so no kick is lost; the
//! run loop clears the byte after the `EINTR`. No signal handler touches `kvm_run`. The
//! watchdog kicks every few milliseconds until the run loop notices the timeout, and every
//! [`STALL_SAMPLE`] compares the run loop's exit counter with the last tick's; only when no exit
//! happened in between does it kick for a sample, so a guest that exits on its own pays
//! nothing. It also kicks at each tick while a `SIGINT`/`SIGTERM`/`SIGHUP` or a SIGUSR1 dump
//! request is pending (the
//! handlers of those only signal the vCPU threads, which a vCPU between its check and
//! `KVM_RUN` can miss).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use crate::livelock::STALL_SAMPLE;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::register_signal_handler;

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// The kick signal's handler: nothing to do, its delivery interrupts `KVM_RUN`.
extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}

/// Installs the kick signal handler (once per process).
pub fn install_handler() -> Result<(), std::io::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// `vcpu`'s `kvm_run.immediate_exit` byte, as an atomic (KVM only reads it, at `KVM_RUN`).
fn immediate_exit(vcpu: &mut VcpuFd) -> *const AtomicU8 {
    let p: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    p as *const AtomicU8
}

/// Sets `vcpu`'s `immediate_exit` (from the vCPU's own thread: 0 after a kick's `EINTR`).
pub fn set_immediate_exit(vcpu: &mut VcpuFd, value: u8) {
    // SAFETY: the byte lives in `vcpu`'s kvm_run mapping, alive while `vcpu` is; every write
    // to it from Veil is atomic like this one.
    unsafe { &*immediate_exit(vcpu) }.store(value, Ordering::SeqCst);
}

/// A way to kick one vCPU thread out of `KVM_RUN` (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Kick {
    thread: libc::pthread_t,
    immediate_exit: *const AtomicU8,
}

// SAFETY: a Kick is a thread id and the address of an atomic byte; `Kick::new`'s contract keeps
// the byte alive for as long as any copy is used, from any thread.
unsafe impl Send for Kick {}

impl Kick {
    /// The kick of `vcpu`, run by the calling thread.
    ///
    /// # Safety
    /// The calling thread must be the one that runs `vcpu`, and every copy of the `Kick` must
    /// be dropped, or no longer used, before `vcpu` is dropped or that thread ends.
    pub unsafe fn new(vcpu: &mut VcpuFd) -> Kick {
        Kick {
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
            immediate_exit: immediate_exit(vcpu),
        }
    }

    /// The thread the kick signals.
    pub fn thread(&self) -> libc::pthread_t {
        self.thread
    }

    /// Kicks: `immediate_exit`, then the signal.
    pub fn kick(&self) {
        // SAFETY: per `Kick::new`'s contract the byte and the thread are still alive.
        unsafe {
            (*self.immediate_exit).store(1, Ordering::SeqCst);
            libc::pthread_kill(self.thread, kick_signal());
        }
    }
}

/// A running watchdog for the calling thread.
pub struct Watchdog {
    stop: Sender<()>,
    handle: Option<JoinHandle<()>>,
    fired: Arc<AtomicBool>,
    sample: Arc<AtomicBool>,
}

impl Watchdog {
    /// Starts a watchdog for the vCPU `target` kicks: it kicks it for good after `timeout` (if
    /// any), and for a sample whenever `exits` (the run loop's exit counter) has not moved for
    /// a whole [`STALL_SAMPLE`]. It must be dropped before `target`'s vCPU is.
    pub fn start(
        timeout: Option<Duration>,
        exits: Arc<AtomicU64>,
        target: Kick,
    ) -> Result<Watchdog, std::io::Error> {
        install_handler()?;
        let fired = Arc::new(AtomicBool::new(false));
        let sample = Arc::new(AtomicBool::new(false));
        let (fired2, sample2) = (fired.clone(), sample.clone());
        let (stop, rx) = channel::<()>();
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let handle = std::thread::Builder::new()
            .name("veil-watchdog".into())
            .spawn(move || {
                let mut seen = exits.load(Ordering::Relaxed);
                loop {
                    let tick = match deadline {
                        Some(d) => STALL_SAMPLE.min(d.saturating_duration_since(Instant::now())),
                        None => STALL_SAMPLE,
                    };
                    match rx.recv_timeout(tick) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    if crate::signals::pending().is_some() || crate::signals::dump_requested() {
                        target.kick();
                    }
                    let now = exits.load(Ordering::Relaxed);
                    if now == seen {
                        sample2.store(true, Ordering::SeqCst);
                        target.kick();
                    }
                    seen = now;
                }
                fired2.store(true, Ordering::SeqCst);
                loop {
                    target.kick();
                    match rx.recv_timeout(Duration::from_millis(5)) {
                        Err(RecvTimeoutError::Timeout) => continue,
                        _ => return,
                    }
                }
            })?;
        Ok(Watchdog {
            stop,
            handle: Some(handle),
            fired,
            sample,
        })
    }

    /// Whether the timeout has expired.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Whether a sample kick is pending (and clears it).
    pub fn take_sample(&self) -> bool {
        self.sample.swap(false, Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
