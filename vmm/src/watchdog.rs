//! The watchdog: a thread that kicks a runaway vCPU out of `KVM_RUN` at `--timeout`, and
//! samples a vCPU that has made no exit for a while (the livelock detector's silent-spin check).
//!
//! The vCPU thread publishes the address of its `kvm_run.immediate_exit` byte in a thread-local;
//! the watchdog sends it a real-time signal whose handler sets that byte, so a kick that lands
//! just before `KVM_RUN` is not lost, and keeps kicking every few milliseconds until the run
//! loop notices the timeout. Every [`STALL_SAMPLE`] it compares the run loop's exit counter with
//! the last tick's; only when no exit happened in between does it kick for a sample, so a guest
//! that exits on its own pays nothing.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::livelock::STALL_SAMPLE;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

thread_local! {
    /// Address of the current thread's `kvm_run.immediate_exit`, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // A const-initialised thread-local without destructor is a plain TLS access: async-signal
    // safe in practice.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` was published by this thread from its live kvm_run mapping and is cleared
        // (set to null) before that mapping goes away; a volatile byte store is signal safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

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

/// Publishes (or clears, with null) this thread's `immediate_exit` byte for the kick handler.
pub fn publish_immediate_exit(p: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(p));
}

struct Thread(libc::pthread_t);
// SAFETY: the handle comes from pthread_self() of a thread that outlives the watchdog (the
// watchdog is stopped and joined before the vCPU thread returns from its run loop).
unsafe impl Killable for Thread {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0
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
    /// Starts a watchdog for the calling thread: it kicks the thread for good after `timeout`
    /// (if any), and for a sample whenever `exits` (the run loop's exit counter) has not moved
    /// for a whole [`STALL_SAMPLE`].
    pub fn start(
        timeout: Option<Duration>,
        exits: Arc<AtomicU64>,
    ) -> Result<Watchdog, std::io::Error> {
        install_handler()?;
        // SAFETY: pthread_self has no preconditions.
        let target = Thread(unsafe { libc::pthread_self() });
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
                    let now = exits.load(Ordering::Relaxed);
                    if now == seen {
                        sample2.store(true, Ordering::SeqCst);
                        let _ = target.kill(kick_signal());
                    }
                    seen = now;
                }
                fired2.store(true, Ordering::SeqCst);
                loop {
                    let _ = target.kill(kick_signal());
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
