//! The SMP runtime. Every vCPU enters `_start` (the VMM sets its stack and `rsi` = its index);
//! vCPU 0 runs the suite, the others [`park`] on their mailbox. A test runs code on another
//! vCPU with [`post`] / [`wait`] (or [`run_on`]) and orders vCPUs with a [`Barrier`]. Per-CPU
//! data is indexed by [`this_cpu`], which the boot stack layout gives
//! ([`veil_abi::ap_stack_top`]).
//!
//! A parked vCPU executes `hlt` between looks at its mailbox (interrupts are off and there is
//! no interrupt controller): the VMM resumes it when [`post`] rings its doorbell (`Hc::Wake`),
//! or after an idle timeout, so idle vCPUs cost the host almost nothing.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use veil_abi::{ap_stack_top, AP_STACK_SIZE, MAX_VCPUS};

/// A function a test runs on another vCPU: argument in, result out.
pub type Job = fn(u64) -> u64;

/// One vCPU's mailbox: `posted` counts jobs handed over, `done` the jobs finished.
#[repr(C, align(64))]
struct Mailbox {
    online: AtomicU32,
    posted: AtomicU64,
    done: AtomicU64,
    job: AtomicU64,
    arg: AtomicU64,
    result: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Mailbox = Mailbox {
    online: AtomicU32::new(0),
    posted: AtomicU64::new(0),
    done: AtomicU64::new(0),
    job: AtomicU64::new(0),
    arg: AtomicU64::new(0),
    result: AtomicU64::new(0),
};

static MAILBOXES: [Mailbox; MAX_VCPUS as usize] = [EMPTY; MAX_VCPUS as usize];

/// Spins of a waiting vCPU before it gives up (about seconds of emulated ring 0).
const WAIT_SPINS: u64 = 4_000_000;

/// Why a cross-vCPU call did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// No such vCPU in this VM, or the calling one.
    NoSuchCpu,
    /// The vCPU did not come online, or did not finish, in time.
    Timeout,
}

/// vCPUs in this VM (`veil run --vcpus`).
pub fn cpus() -> u32 {
    crate::boot::info().vcpus.clamp(1, MAX_VCPUS)
}

/// The index of the vCPU running this code (from its stack pointer: each vCPU runs on the
/// boot stack the VMM gave it).
pub fn this_cpu() -> u32 {
    let rsp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    if rsp > ap_stack_top(1) {
        return 0;
    }
    let below = ap_stack_top(1) - rsp;
    (below / AP_STACK_SIZE) as u32 + 1
}

/// The parked loop of vCPU `cpu` (never returns): runs each job posted to its mailbox.
pub fn park(cpu: u32) -> ! {
    let mb = &MAILBOXES[cpu as usize];
    mb.online.store(1, Ordering::Release);
    loop {
        let posted = mb.posted.load(Ordering::Acquire);
        if posted == mb.done.load(Ordering::Relaxed) {
            // SAFETY: interrupts are off: `hlt` exits to the VMM, which resumes after it.
            unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
            continue;
        }
        let job = mb.job.load(Ordering::Relaxed) as usize;
        // SAFETY: `post` stored a `Job` (a plain fn pointer) before publishing `posted`.
        let job: Job = unsafe { core::mem::transmute::<usize, Job>(job) };
        let result = job(mb.arg.load(Ordering::Relaxed));
        mb.result.store(result, Ordering::Relaxed);
        mb.done.store(posted, Ordering::Release);
    }
}

fn mailbox(cpu: u32) -> Result<&'static Mailbox, SmpError> {
    if cpu == this_cpu() || cpu >= cpus() {
        return Err(SmpError::NoSuchCpu);
    }
    let mb = &MAILBOXES[cpu as usize];
    spin_until(|| mb.online.load(Ordering::Acquire) != 0)?;
    Ok(mb)
}

fn spin_until(mut done: impl FnMut() -> bool) -> Result<(), SmpError> {
    for _ in 0..WAIT_SPINS {
        if done() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(SmpError::Timeout)
}

/// Hands `job(arg)` to vCPU `cpu` (which must have finished its previous job) and returns at
/// once.
pub fn post(cpu: u32, job: Job, arg: u64) -> Result<(), SmpError> {
    let mb = mailbox(cpu)?;
    let posted = mb.posted.load(Ordering::Relaxed);
    spin_until(|| mb.done.load(Ordering::Acquire) == posted)?;
    mb.job.store(job as usize as u64, Ordering::Relaxed);
    mb.arg.store(arg, Ordering::Relaxed);
    mb.posted.store(posted + 1, Ordering::Release);
    // Wake it if it is parked in `hlt`. Should the ring fail, the VMM still resumes a parked
    // vCPU after its idle timeout, so the job runs, later.
    let _ = crate::hc::wake(cpu);
    Ok(())
}

/// Waits for vCPU `cpu`'s last job and returns its result.
pub fn wait(cpu: u32) -> Result<u64, SmpError> {
    let mb = mailbox(cpu)?;
    let posted = mb.posted.load(Ordering::Relaxed);
    spin_until(|| mb.done.load(Ordering::Acquire) == posted)?;
    Ok(mb.result.load(Ordering::Relaxed))
}

/// Runs `job(arg)` on vCPU `cpu` and returns its result.
pub fn run_on(cpu: u32, job: Job, arg: u64) -> Result<u64, SmpError> {
    post(cpu, job, arg)?;
    wait(cpu)
}

/// A reusable barrier in shared memory (sense-reversing: `generation` moves on each time the
/// last of `n` vCPUs arrives).
pub struct Barrier {
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl Barrier {
    /// A barrier nobody has reached.
    pub const fn new() -> Barrier {
        Barrier {
            arrived: AtomicU32::new(0),
            generation: AtomicU32::new(0),
        }
    }

    /// Waits until `n` vCPUs have called `wait` for this generation.
    pub fn wait(&self, n: u32) -> Result<(), SmpError> {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return Ok(());
        }
        spin_until(|| self.generation.load(Ordering::Acquire) != generation)
    }
}
