//! Runs a command under a low `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK` (which would ignore the
//! limit): for the `veil` binary's memlock tests (`vmm/tests/*.rs` include this file by path).

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd` run with `RLIMIT_MEMLOCK` = `bytes` and without `CAP_IPC_LOCK`.
pub fn limit_memlock(cmd: &mut Command, bytes: u64) -> &mut Command {
    // SAFETY: setrlimit and prctl are async-signal safe and touch no parent state.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // As root, CAP_IPC_LOCK would ignore the limit: drop it across exec (fails
            // harmlessly without CAP_SETPCAP, where the process lacks CAP_IPC_LOCK anyway).
            libc::prctl(libc::PR_CAPBSET_DROP, 14 /* CAP_IPC_LOCK */, 0, 0, 0);
            Ok(())
        })
    }
}
