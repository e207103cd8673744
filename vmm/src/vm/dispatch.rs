//! The run loop's decision, as a pure function: what one `KVM_RUN` result asks of the VMM
//! ([`Action`]), which exit counters it moves and whether it is progress for the watchdog and
//! the livelock detector ([`Progress`]). Like Firecracker's `handle_kvm_exit`, it is tested
//! with fake exits, without KVM; the run loop (`Vm::run_loop`) only carries the action out.
//!
//! The one thing it writes is the exit's own answer: the bytes of a port read from a port no
//! device owns (all ones, as on an empty ISA bus).

use kvm_ioctls::VcpuExit;
use veil_abi::{BARE_PORT, HYPERCALL_PORT};

use crate::console::Console;
use crate::report::{AccessKind, ExitCounts};

/// What the run loop does for one `KVM_RUN` result.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing more: enter the guest again (a bare exit, an unowned port, `KVM_EXIT_INTR`).
    Resume,
    /// A kick (`EINTR`/`EAGAIN`): clear `immediate_exit`, take a pending stall sample.
    Kicked,
    /// A hypercall: its number and arguments are in the synced registers.
    Hypercall,
    /// A UART write: the exit's data (one write per element of the exit's I/O size).
    ConsoleOut {
        /// The UART port.
        port: u16,
        /// The data (count * size bytes).
        data: Vec<u8>,
    },
    /// A UART read of `len` bytes (count * size).
    ConsoleIn {
        /// The UART port.
        port: u16,
        /// Bytes to answer.
        len: usize,
    },
    /// An MMIO exit: a violation or a not-RAM access.
    Mmio {
        /// The GPA.
        gpa: u64,
        /// Read or write.
        access: AccessKind,
        /// Bytes.
        len: usize,
    },
    /// `KVM_EXIT_MEMORY_FAULT`.
    MemoryFault {
        /// The GPA.
        gpa: u64,
        /// Bytes.
        size: u64,
    },
    /// `KVM_RUN` failed with `EFAULT` (a stage-2 fault without an MMIO exit).
    Efault(kvm_ioctls::Error),
    /// `KVM_EXIT_X86_WRMSR` (a PV MSR the filter sends to the VMM).
    Wrmsr {
        /// The MSR.
        index: u32,
        /// The value written.
        value: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_SHUTDOWN` (a triple fault).
    Shutdown,
    /// `KVM_EXIT_HLT`.
    Halted,
    /// Any other exit: stop the VM, naming it.
    Unexpected(String),
    /// `KVM_RUN` failed otherwise: stop the VM.
    KvmError(String),
}

/// Whether an exit counts as progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// A kick or `KVM_EXIT_INTR`: not an exit of the guest's own.
    None,
    /// A violation exit: progress for the watchdog, but the livelock detector judges it.
    Fault,
    /// Any other exit: progress for both.
    Exit,
}

/// Decides what `exit` asks for, counting it in `counts`.
pub(crate) fn dispatch(
    exit: Result<VcpuExit<'_>, kvm_ioctls::Error>,
    counts: &mut ExitCounts,
) -> (Action, Progress) {
    counts.total += 1;
    let exit = match exit {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return (Action::Kicked, Progress::None)
        }
        Err(e) if e.errno() == libc::EFAULT => {
            counts.memory_faults += 1;
            return (Action::Efault(e), Progress::Fault);
        }
        Err(e) => return (Action::KvmError(e.to_string()), Progress::Exit),
    };
    let action = match exit {
        VcpuExit::IoOut(HYPERCALL_PORT, _) => {
            counts.hypercalls += 1;
            Action::Hypercall
        }
        VcpuExit::IoOut(BARE_PORT, _) => {
            counts.bare += 1;
            Action::Resume
        }
        VcpuExit::IoOut(port, data) => {
            counts.pio += 1;
            match Console::owns(port) {
                true => Action::ConsoleOut {
                    port,
                    data: data.to_vec(),
                },
                false => Action::Resume,
            }
        }
        VcpuExit::IoIn(port, data) => {
            counts.pio += 1;
            match Console::owns(port) {
                true => Action::ConsoleIn {
                    port,
                    len: data.len(),
                },
                false => {
                    data.fill(0xff);
                    Action::Resume
                }
            }
        }
        VcpuExit::MmioRead(gpa, data) => {
            counts.mmio += 1;
            return (
                Action::Mmio {
                    gpa,
                    access: AccessKind::Read,
                    len: data.len(),
                },
                Progress::Fault,
            );
        }
        VcpuExit::MmioWrite(gpa, data) => {
            counts.mmio += 1;
            return (
                Action::Mmio {
                    gpa,
                    access: AccessKind::Write,
                    len: data.len(),
                },
                Progress::Fault,
            );
        }
        VcpuExit::MemoryFault { gpa, size, .. } => {
            counts.memory_faults += 1;
            return (Action::MemoryFault { gpa, size }, Progress::Fault);
        }
        VcpuExit::Intr => return (Action::Resume, Progress::None),
        VcpuExit::X86Wrmsr(w) => Action::Wrmsr {
            index: w.index,
            value: w.data,
        },
        VcpuExit::InternalError => Action::InternalError,
        VcpuExit::Shutdown => Action::Shutdown,
        VcpuExit::Hlt => Action::Halted,
        other => Action::Unexpected(format!("{other:?}")),
    };
    (action, Progress::Exit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::{MsrExitReason, WriteMsrExit};

    fn run(exit: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> (Action, Progress, ExitCounts) {
        let mut c = ExitCounts::default();
        let (a, p) = dispatch(exit, &mut c);
        assert_eq!(c.total, 1, "every KVM_RUN return is counted once");
        (a, p, c)
    }

    #[test]
    fn hypercalls_and_bare_exits_are_counted_apart() {
        let (a, p, c) = run(Ok(VcpuExit::IoOut(HYPERCALL_PORT, &[0])));
        assert_eq!(
            (a, p, c.hypercalls, c.bare),
            (Action::Hypercall, Progress::Exit, 1, 0)
        );
        let (a, p, c) = run(Ok(VcpuExit::IoOut(BARE_PORT, &[0])));
        assert_eq!(
            (a, p, c.hypercalls, c.bare),
            (Action::Resume, Progress::Exit, 0, 1)
        );
    }

    #[test]
    fn console_writes_carry_all_their_data_and_other_ports_are_ignored() {
        let (a, _, c) = run(Ok(VcpuExit::IoOut(0x3f8, b"hi")));
        let want = Action::ConsoleOut {
            port: 0x3f8,
            data: b"hi".to_vec(),
        };
        assert_eq!((a, c.pio), (want, 1));
        let (a, _, c) = run(Ok(VcpuExit::IoOut(0x80, &[1])));
        assert_eq!((a, c.pio), (Action::Resume, 1));
    }

    #[test]
    fn an_unowned_port_reads_all_ones_and_the_uart_is_asked() {
        let mut data = [0u8; 4];
        let (a, _, _) = run(Ok(VcpuExit::IoIn(0x1234, &mut data)));
        assert_eq!((a, data), (Action::Resume, [0xff; 4]));
        let mut data = [0u8; 1];
        let (a, _, c) = run(Ok(VcpuExit::IoIn(0x3fd, &mut data)));
        assert_eq!(
            (a, c.pio),
            (
                Action::ConsoleIn {
                    port: 0x3fd,
                    len: 1
                },
                1
            )
        );
        assert_eq!(data, [0], "the UART's answer is the run loop's to give");
    }

    #[test]
    fn violations_are_fault_progress_not_livelock_progress() {
        let mut data = [0u8; 8];
        let (a, p, c) = run(Ok(VcpuExit::MmioRead(0xfc00080, &mut data)));
        let want = Action::Mmio {
            gpa: 0xfc00080,
            access: AccessKind::Read,
            len: 8,
        };
        assert_eq!((a, p, c.mmio), (want, Progress::Fault, 1));
        let (a, p, _) = run(Ok(VcpuExit::MmioWrite(0x10, &[1, 2])));
        let want = Action::Mmio {
            gpa: 0x10,
            access: AccessKind::Write,
            len: 2,
        };
        assert_eq!((a, p), (want, Progress::Fault));
        let exit = VcpuExit::MemoryFault {
            flags: 0,
            gpa: 0x5000,
            size: 4096,
        };
        let (a, p, c) = run(Ok(exit));
        let want = Action::MemoryFault {
            gpa: 0x5000,
            size: 4096,
        };
        assert_eq!((a, p, c.memory_faults), (want, Progress::Fault, 1));
        let e = kvm_ioctls::Error::new(libc::EFAULT);
        let (a, p, c) = run(Err(e));
        assert_eq!(
            (a, p, c.memory_faults),
            (Action::Efault(e), Progress::Fault, 1)
        );
    }

    #[test]
    fn kicks_are_not_progress_and_other_errors_stop() {
        for errno in [libc::EINTR, libc::EAGAIN] {
            let (a, p, _) = run(Err(kvm_ioctls::Error::new(errno)));
            assert_eq!((a, p), (Action::Kicked, Progress::None));
        }
        let (a, p, _) = run(Ok(VcpuExit::Intr));
        assert_eq!((a, p), (Action::Resume, Progress::None));
        let (a, _, _) = run(Err(kvm_ioctls::Error::new(libc::EINVAL)));
        assert!(matches!(a, Action::KvmError(_)), "{a:?}");
    }

    #[test]
    fn stops_and_msr_writes() {
        assert_eq!(run(Ok(VcpuExit::Hlt)).0, Action::Halted);
        assert_eq!(run(Ok(VcpuExit::Shutdown)).0, Action::Shutdown);
        assert_eq!(run(Ok(VcpuExit::InternalError)).0, Action::InternalError);
        let Action::Unexpected(what) = run(Ok(VcpuExit::Debug(Default::default()))).0 else {
            panic!("a debug exit is unexpected");
        };
        assert!(what.starts_with("Debug"), "{what}");
        let mut error = 0u8;
        let w = WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x4b56_4d01,
            data: 0x1001,
        };
        let want = Action::Wrmsr {
            index: 0x4b56_4d01,
            value: 0x1001,
        };
        let (a, p, _) = run(Ok(VcpuExit::X86Wrmsr(w)));
        assert_eq!((a, p), (want, Progress::Exit));
    }
}
