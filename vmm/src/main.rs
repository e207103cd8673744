//! `veil`: the Veil VMM command line. See `veil --help`.

use std::time::Instant;

fn main() {
    let start = Instant::now();
    // SAFETY: restoring the default SIGPIPE action before any thread exists: `veil run | head`
    // then ends quietly like other command-line tools instead of panicking in println!.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = vmm::signals::install() {
        eprintln!("veil: warning: cannot handle SIGINT/SIGTERM/SIGHUP ({e}): a signal ends the process without a report");
    }
    // Log lines and clap's usage errors look like the VMM's own: `veil: debug: module: ...`,
    // `veil: error: unexpected argument ...` (exit code 2; --help/--version unchanged).
    vmm::messages::init_logger();
    let cli = vmm::messages::parse_cli();
    let mut code = vmm::cli::main_with(cli, start);
    // A signal that arrived where no run loop saw it (e.g. during `veil caps`, or while an
    // error was being reported) still decides the exit code.
    if let Some(sig) = vmm::signals::pending() {
        code = vmm::signals::exit_code(sig);
    }
    std::process::exit(code);
}
