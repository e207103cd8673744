//! The `veil` command line (clap derive) and what each subcommand does.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use veil_abi::BootMode;

use crate::console::ConsoleSink;
use crate::dump::DumpFormat;
use crate::memory::MemSize;
use crate::report::{exit_code, RunReport};
use crate::session::{DumpConfig, DumpTarget};
use crate::stage2::BackendKind;
use crate::vm::{self, ViolationPolicy, VmConfig, VmError};

const ABOUT: &str =
    "Veil: a KVM testbed for direct-map removal (__GFP_UNMAPPED) enforced at stage 2";

const LONG_ABOUT: &str = "\
Veil boots a small guest kernel on /dev/kvm, owns the guest's physical memory through a buddy
page allocator with freetypes and pageblock flips (the kernel's __GFP_UNMAPPED series), and
removes \"unmapped\" pages from stage 2 by shaping KVM memslots. Any guest access to such a page
is caught and reported as a violation. The default guest runs an isolation test suite.

Start with `veil run` (boots the default guest and runs the whole suite);
`veil <COMMAND> --help` explains each command's options, defaults and units.";

const LIST_ABOUT: &str = "\
Boot the guest in list mode and print the names of its tests, one per line: the names
`veil run --tests` accepts. Takes the same guest options as `veil run` (--guest to list another
guest's tests).";

const LIST_AFTER: &str = "\
Exit codes: 0 listed, 2 usage error (bad option, invalid guest ELF, /dev/kvm unavailable),
1 or 3 when the guest did not list its tests cleanly (3: it crashed or timed out), 130 / 143 /
129 stopped by SIGINT / SIGTERM / SIGHUP.

Example:
  veil list-tests";

const CAPS_ABOUT: &str = "\
Print what this host's KVM offers that Veil cares about: API version, memslot limit
(KVM_CAP_NR_MEMSLOTS, which bounds how fragmented stage 2 may get), read-only memslots, sync
regs, memory fault info, guest_memfd flags, memory attributes, binary stats, and whether this
host is itself a VM (nested KVM, where guest ring-0 code may be emulated and slow).
The memory fault exit row says whether KVM_EXIT_MEMORY_FAULT is advertised and whether it is
observed: a probe VM on the mprotect backend runs one ring-3 load from a page its guest view
closes and reports what KVM delivered (the exit with its GPA, KVM_RUN failing with EFAULT and
no exit, an MMIO exit, or why it could not probe). Boots no guest kernel; takes milliseconds.";

const CAPS_AFTER: &str = "\
Exit codes: 0 printed, 2 /dev/kvm cannot be opened.

Examples:
  veil caps
  veil caps --json";

const REPLAY_ABOUT: &str = "\
Replay a real Linux page-allocation trace (ftrace kmem events) through direct-map policies and
compare their stage-2 cost: stage-2 updates and TLB shootdowns per 1,000 allocations (--arch
x86: removals flush, additions do not; arm64: both; --cpus N: N-1 IPIs each), pageblock flips,
2 MiB blocks intact now and ever split (never re-merged, as in Linux; 1 GiB too), peak
memslots, failures by mapped/unmapped request and order, free memory stranded in partly used
blocks of the other kind, latency per path and replay speed. Each policy replays the same
events on the same amount of memory. Without --kvm the policies run on a model of stage 2; with
--kvm every memslot update goes to a real VM and is timed (--repeat N: N runs, median/min/max).

Malformed lines are counted and the first few reported with their line numbers (--strict makes
the first one fatal). Progress goes to stderr (--quiet silences it); the report goes to stdout.
Output files (--plot) are checked before the trace is read.";

const REPLAY_AFTER: &str = "\
Exit codes:
  0  report printed. Allocation failures, a memslot limit exceeded and stage-2 updates KVM
     refused are results in the report, not errors.
  2  any error, reported on stderr (nothing on stdout): bad option or --mem size (4M to 64G),
     unreadable or corrupt trace (including a truncated gzip file), an input without a single
     page-allocator event (not a kmem trace), a malformed line under --strict, an unwritable
     --plot file (a FIFO without reader or a socket included), a policy's memory above the
     64 GiB the replay models (linux-placement: the trace's PFN span), a report that cannot be
     written, or with --kvm: /dev/kvm unavailable or a KVM call that failed
  130 / 143 / 129  SIGINT / SIGTERM / SIGHUP stopped the replay: the report, text or complete
     JSON, is still printed, marked interrupted: the trace as read so far, the policy that was
     running cut short, later ones skipped; a second signal ends veil at once
  (killed by SIGPIPE, status 141 in a shell, when stdout's reader goes away: `| head`)

Examples:
  veil replay trace.txt.gz                       all five policies, text table
  veil replay trace.txt.gz --json -p freetype,per-page
  veil replay trace.txt.gz --unmapped-fraction 0.1 --seed 7 --plot blocks.svg
  veil replay trace.txt.gz --sensitive            + ranges an ASI view switch toggles (GFP_USER)
  cat /sys/kernel/tracing/trace_pipe | veil replay -     read standard input
  veil replay trace.txt.gz --kvm --repeat 5      measure on real memslots, 5 runs
  veil replay trace.txt.gz --headroom 0 --compaction     failures with and without compaction
  veil replay trace.txt.gz --sweep headroom=0,5,10,25,50 --plot sweep.svg
  veil replay trace.txt.gz --pcp --arch arm64 --cpus 8";

const EXIT_CODES: &str = "\
Exit codes of `veil run` (list-tests, caps and replay: see their --help):
  0  every selected test passed or skipped (skipped tests do not fail a run unless
     --fail-on-skip), the guest exited with code 0; with --repeat: in every run, with the same
     outcome in each; with --kernel: the kernel reported PASS or SKIP on port 0xf4
  1  a test failed or did not run, a violation happened outside any test, the guest exited
     with a non-zero code, stage-2 reconciliation found a mismatch, a test skipped under
     --fail-on-skip, or a test's outcome differed between --repeat runs (flaky); with
     --kernel: the kernel reported FAIL, or made a violation
  2  usage or configuration error: bad option (clap's errors included; --repeat 0), bad --mem
     size, invalid guest ELF, unknown or empty test name in --tests, a --dump-ept name whose
     extension is a format veil cannot write (.pdf, .jpg, ...), unwritable --dump-ept,
     --console or --junit path (a FIFO without a reader or a socket included: writing would
     block; checked before the guest boots; a dump or JUnit file that still fails at exit
     turns a passing run's 0 into 2), /dev/kvm unavailable
  3  the guest crashed or did not exit by itself: an exception it reported, a triple fault, an
     emulation failure, vCPU 0 halted (`hlt` with nothing to wake it: \"guest halted\"), an
     exit the VMM does not handle, KVM_RUN failing; was stopped by --on-violation kill (tests
     after it count as not run) or by a blocked access it cannot run on past (a fetch, an
     instruction KVM cannot emulate, an exception frame on a stack in a hole) with no recovery
     point; livelocked (one instruction repeating a blocked access with no progress, e.g. lgdt
     from an unmapped page: stopped at once, whatever --timeout says); or ran past --timeout.
     With --repeat: the worst run's code (3 over 2 over 1)
  130, 143, 129  SIGINT (Ctrl-C), SIGTERM or SIGHUP stopped the run: the guest is stopped,
     the report (table or complete JSON, exit kind \"interrupted\"), the requested dumps and
     --junit file are still written, unmapped guest pages are wiped; the test that was running
     and the ones after it count as not run (--repeat makes no further runs). A second signal
     while that happens ends veil at once.

Host memory: guest RAM is kept out of core dumps of veil (MADV_DONTDUMP) unless
--dump-guest-core; unmapped pages are locked against swap (mlock) as far as RLIMIT_MEMLOCK
allows (the report says whether locking held) and wiped at the end of every run.

ASI: pages allocated sensitive (gfp SENSITIVE, implied by GFP_USER-like flags) are absent from
the restricted view and read-write in the full one. A restricted vCPU's touch is an ASI exit,
not a violation: the VM switches to the full view (per VM: this host has no second address
space, see `veil caps`), the VMM completes the access and records the transition;
Hc::AsiEnter returns to restricted. The report's ASI lines give the transitions, the ranges
each switch toggled and the exposure windows.

Output: guest console output goes to stdout (stderr with --json, or --console FILE); the VMM's
own messages go to stderr prefixed with 'veil: '. --quiet keeps only errors and one summary
line (or the JSON with --json). Violation and crash RIPs are shown as function+0xoff
(`rip_symbol` in JSON) when the guest ELF has a symbol table (the default guest has).

Examples:
  veil run                              run the whole suite, print a table
  veil run --tests mapped_rw,unmapped_read_direct --json
  veil run --mem 1G --dump-ept dump.svg   SVG picture (format from the extension)
  veil run --quiet --junit results.xml --fail-on-skip   for CI: one line, JUnit XML, skips fail
  veil run --tests hypercall_timing --repeat 5   timing figures as median/min/max of 5 runs
  veil run --mem 1G --dump-ept dump.svg   SVG picture (format from the extension; .png too)
  veil dump diff dump.1.json dump.json  what changed between two JSON dumps
  veil run --guest my-kernel.elf --on-violation kill --timeout 10
  veil run --kernel x86/smptest.flat --vcpus 2   a kvm-unit-tests image (multiboot)
  veil run --kernel vmlinux --cmdline console=ttyS0 --secret 0x8000000,16M
  veil list-tests
  veil caps --json
  veil replay ../shared/data/<trace> --kvm
  veil run --control /tmp/veil.sock &   then: veil inspect /tmp/veil.sock stats

Live inspection: with --control PATH, `veil inspect PATH dump|stats|violations|vcpus` asks the
running guest (see `veil inspect --help`). SIGUSR1 to a running `veil run` writes the next
numbered stage-2 dump beside --dump-ept (dump.N.ext, the numbering of guest-requested dumps),
announced on stderr; without --dump-ept it says on stderr that nothing was written.";

/// The `veil` command line.
#[derive(Debug, Parser)]
#[command(name = "veil", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = EXIT_CODES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the guest and run its isolation suite; print a table (or JSON) of the results.
    /// With --kernel FILE: boot a multiboot or Linux kernel instead (see --kernel).
    #[command(after_long_help = EXIT_CODES)]
    Run(RunArgs),
    /// Boot the guest in list mode and print the names of its tests, one per line.
    #[command(long_about = LIST_ABOUT, after_long_help = LIST_AFTER)]
    ListTests(GuestArgs),
    /// Print what this host's KVM offers that Veil cares about (memslots, sync regs, memory
    /// fault info, guest_memfd, memory attributes, binary stats) and whether it runs nested.
    #[command(long_about = CAPS_ABOUT, after_long_help = CAPS_AFTER)]
    Caps(CapsArgs),
    /// Replay a real Linux page-allocation trace (ftrace kmem events) through direct-map
    /// policies and compare their stage-2 cost; `--kvm` applies every memslot update to a real
    /// VM. Exit codes: 0 report printed, 2 any error, 130/143/129 stopped by a signal.
    #[command(long_about = REPLAY_ABOUT, after_long_help = REPLAY_AFTER)]
    Replay(replay::cli::ReplayArgs),
    /// Ask a running `veil run --control PATH` for its stage-2 dump, counters, violations or
    /// vCPUs, without stopping it.
    #[command(long_about = crate::control::inspect::INSPECT_ABOUT, after_long_help = crate::control::inspect::INSPECT_AFTER)]
    Inspect(crate::control::inspect::InspectArgs),
    /// Work with stage-2 dump files: `veil dump diff A.json B.json` shows the ranges, memslots
    /// and counters that changed between two JSON dumps.
    Dump(crate::dump::cli::DumpArgs),
}

/// `--mem`'s parser: the one size parser, with `veil run`'s bounds.
fn mem_size() -> impl clap::builder::TypedValueParser<Value = MemSize> {
    use clap::builder::TypedValueParser;
    replay::size::RUN_MEM.value_parser().map(MemSize)
}

/// Options that say which guest to boot and how.
#[derive(Debug, Args, Clone)]
pub struct GuestArgs {
    /// Guest RAM size: bytes or a K/M/G/T suffix (binary units: 1G = 1024M; KB and KiB alike),
    /// a multiple of 2 MiB, at least 6M and at most 64G, e.g. 512M or 4G. The guest image and boot structures are
    /// reserved below the first managed 2 MiB block, so a large --guest needs more. RAM is mapped
    /// lazily (MAP_NORESERVE): a large size costs nothing until the guest touches it. The `sweep`
    /// test loads every managed page, so the host must back all of RAM: it is skipped, with a
    /// warning giving the figures, when that exceeds 90 % of the host's available memory.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = mem_size())]
    pub mem: MemSize,

    /// Boot this ELF64 x86-64 executable instead of the embedded default guest. It must be
    /// ET_EXEC with PT_LOAD segments at or above 0x200000 inside RAM, non-overlapping, with
    /// p_vaddr = p_paddr; it is entered in 64-bit mode at e_entry with rdi = the boot info block
    /// (see the veil-abi crate). A malformed file is rejected with the reason (exit code 2).
    #[arg(long, value_name = "PATH")]
    pub guest: Option<PathBuf>,

    /// Stop the guest after SECS seconds of wall time (fractions allowed, e.g. 0.5; 0 = never).
    /// A timeout prints the guest's registers, how long the vCPU had gone without an exit and
    /// the instruction it sat on, and exits with code 3. Livelocks on blocked accesses are
    /// stopped at once without waiting for it.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60.0,
        allow_negative_numbers = true
    )]
    pub timeout: f64,

    /// Write the guest's console output to FILE (created or truncated) instead of stdout. The
    /// file is checked before the guest boots: a FIFO without a reader or a socket is refused
    /// (it would block); "/dev/null" and pipes with a reader are fine.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
}

/// `veil run` options.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Run only these tests (comma-separated; default: all; `veil list-tests` prints the names).
    /// Each test runs once even if named twice. Unknown or empty names are a usage error (exit
    /// code 2) that lists the available tests.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    pub tests: Vec<String>,

    /// Print one JSON document on stdout instead of the table: tests[], counts (passed, failed,
    /// skipped, not_run), violations[], not_ram[], stage2 and allocator counters, memory_lock
    /// and wiped_bytes, timing, exit, the exit-time stage-2 dump, and the reachability matrix
    /// (`reachability`: routes[] with result and evidence, counts; filled by `--tests
    /// reachability`), and `asi` (ASI exits and enters with vCPU, GPA, RIP and cause, view
    /// switches and the ranges each toggled, exposure windows: how long the VM was in the full
    /// view and which ASI-entered vCPUs were exposed meanwhile, since the view is per VM).
    /// The guest console then goes to stderr (or --console FILE).
    #[arg(long)]
    pub json: bool,

    /// What to do when the guest touches memory stage 2 does not expose. `report`: loads read
    /// 0xa5 bytes, stores are dropped, the guest runs on; an access it cannot run on past (an
    /// instruction fetch, an instruction KVM cannot emulate, an exception frame pushed onto a
    /// stack in a hole, a livelock) resumes at the recovery point the test registered (or stops
    /// the VM if none; a triple fault always stops it). `kill`: stop at the first violation no
    /// test declared (ExpectViolation): a declared one is answered as under `report`; print the
    /// report, exit 3; tests after it count as not run. `inject`: as `report`, and after each
    /// load or store violation the guest is told: the GPA, access kind and RIP go into the
    /// vCPU's mailbox (veil_abi::VeInfo at offset 0xe00) and a #VE (vector 20) is injected once
    /// the access has completed, so its handler can count it and return past the access.
    /// Every policy records every violation.
    #[arg(long, value_enum, value_name = "report|inject|kill", default_value_t = ViolationPolicy::Report, hide_possible_values = true)]
    pub on_violation: ViolationPolicy,

    /// How stage 2 removes pages from the guest. `slots`: KVM memslots, an unmapped range is a
    /// hole between slots and a read-only range a KVM_MEM_READONLY slot (every 4 KiB change
    /// splits and merges slots; at most KVM_CAP_NR_MEMSLOTS pieces). `mprotect`: guest RAM is
    /// a memfd mapped twice, KVM's one memslot on the guest's mapping whose 4 KiB pages are
    /// mprotect()ed, the VMM working through its own mapping (at most vm.max_map_count
    /// pieces). Both give the same verdicts; the report and dumps name the one used.
    #[arg(long, value_enum, value_name = "slots|mprotect", default_value_t = BackendKind::default(), hide_possible_values = true)]
    pub stage2: BackendKind,

    /// Keep unmapped guest pages out of the host kernel's direct map too (mprotect backend
    /// only: with --stage2 slots this is a usage error). While a pageblock is unmapped, both
    /// mappings of it (the guest's, kept PROT_NONE, and the VMM's) are memfd_secret(2) memory;
    /// mapping it again puts the ordinary memfd back with a hole punched (it reads zero).
    /// Secret memory counts twice against RLIMIT_MEMLOCK (one per mapping) unless veil has
    /// CAP_IPC_LOCK: past the limit a flip fails, the guest sees an allocation failure
    /// (Stage2Failed) and the report lists the refused update. `veil caps` shows what the host
    /// offers and how much the limit allows.
    #[arg(long)]
    pub host_secretmem: bool,

    /// Reconcile stage 2 after every hypercall that changed it: compare what the host has in
    /// force (mprotect: the guest mapping's protections and, with --host-secretmem, which
    /// blocks are secret memory, both read from /proc/self/maps; slots: the record of KVM's
    /// slot table) with the engine's intended state. Without the flag it still runs at the end
    /// of every test and of the run, and when the guest asks (Hc::VerifyStage2). A mismatch is
    /// reported with its range and both states and fails the run (exit code 1).
    #[arg(long)]
    pub verify_stage2: bool,

    /// vCPUs to run, one host thread each (1 up to KVM's maximum, at most 16; anything else is a
    /// usage error). Veil's own guest enters every vCPU in 64-bit mode on its own stack; vCPU 0
    /// runs the suite, the others park in the guest's SMP runtime until a test hands them
    /// work (the cross-vCPU tests skip with one vCPU). A violation record names the vCPU that
    /// made it. The default is 1: a second vCPU costs the suite about 3 % of its wall time here
    /// and about 5 % more host CPU (a parked vCPU waits in the VMM until the guest rings its
    /// doorbell, `Hc::Wake`, or 20 ms pass).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(veil_abi::MAX_VCPUS)))]
    pub vcpus: u32,

    /// Write stage-2 ("EPT") dumps: every GPA range with state (sensitive included),
    /// freetype, memslot, host address and its permission in both ASI views (restricted,
    /// full), the VM's current view, the memslot table, allocator and engine counters, KVM's binary stats. The
    /// exit-time dump goes to FILE (default: veil-dump.txt / .json / .svg / .png by format, in
    /// the current directory, the name announced on stderr; "-" = stdout); every file written
    /// is announced on stderr (`veil: wrote stage-2 dump to FILE (svg, 312 KB)`, also with
    /// --json). The format follows FILE's extension unless --dump-format says otherwise: .json,
    /// .svg, .png; .txt, none or another: text; one that names a format veil cannot write
    /// (.pdf, .jpg, .html, ...) is refused before the guest boots. Each dump the guest requests (Hc::Dump) goes to a numbered file beside it:
    /// dump.json -> dump.1.json, dump.2.json, ... (only beside a regular file: with /dev/null or
    /// a link to it they are not written). The directory must exist; the path is checked before
    /// the guest boots (a FIFO without a reader or a socket is refused: it would block). With
    /// --kernel: the exit-time dump, from stage 2 alone (no allocator: freetypes "unmanaged",
    /// no allocator section), each --secret range an unmapped range with owner "secret".
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    pub dump_ept: Option<Option<PathBuf>>,

    /// Dump format: `text` (tables for people), `json` (one document for tools; `veil dump
    /// diff` compares two), `svg` (a picture on a GPA grid: rows labelled with their GPA, one
    /// cell per 2 MiB pageblock, or per N pageblocks above 4,096 of them (the legend says N;
    /// a cell shows its worst state, unmapped first), memslot boundaries drawn, the legend at
    /// the top), `png` (the SVG rendered to PNG at twice its size). Default: from the FILE's
    /// extension (.json, .svg, .png), otherwise text.
    #[arg(
        long,
        value_enum,
        value_name = "text|json|svg|png",
        hide_possible_values = true
    )]
    pub dump_format: Option<DumpFormat>,

    /// Leave guest RAM in core dumps of veil (for debugging the guest from a VMM core). By
    /// default it is excluded (MADV_DONTDUMP), as QEMU's dump-guest-core=off: a core of a
    /// crashed or killed veil then holds no guest page, unmapped secrets included.
    #[arg(long)]
    pub dump_guest_core: bool,

    /// Give a --guest ELF the test-harness capability the embedded suite always has: the
    /// hypercalls that plant a VMM secret (PlantSecret) or fill a page the guest cannot reach
    /// (HostFill on an unmapped page). Without it such calls get Status::HarnessOnly. Host
    /// assertions (HostExpect) need no capability: they return nothing but "recorded".
    #[arg(long)]
    pub test_harness: bool,

    /// Write the results as JUnit XML to FILE for CI: one testsuite "veil", one testcase per
    /// selected test with its time; a failed test has a <failure> with its message (type
    /// "flaky" when its outcome differed between --repeat runs), a skipped one <skipped>, one
    /// that did not run <error type="not_run">; each test's violations are in its
    /// <system-out>, the summary lines in the suite's. Checked before the guest boots; written
    /// after the run (also after a crash or a signal) and announced on stderr. Not with --kernel.
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    pub junit: Option<PathBuf>,

    /// Print only errors (stderr) and one summary line (stdout): "P passed, F failed, S
    /// skipped, N not run; V violations; exit: HOW" with "; failed: NAMES" before "exit:" when
    /// a test failed, "; not run: NAMES" when a crash, timeout or signal cut tests off, "; flaky:
    /// NAMES" for --repeat. No guest console (except
    /// into --console FILE), no guest log lines, no table, no "dump written"/"wrote"
    /// announcements. With --json: only the JSON document. Not with --kernel.
    #[arg(long, short = 'q', conflicts_with = "kernel")]
    pub quiet: bool,

    /// Boot and run the selection N times (1 to 1000), each on a fresh VM, as `veil replay
    /// --kvm --repeat N` replays: every timing figure of the report (first hypercall, boot,
    /// suite, run and total wall time, the hypercall round trip, the revocation meter, exit
    /// counts, each test's time) is reported as median, min and max with n (`repeat` in
    /// JSON). The verdicts must agree: a test whose outcome differs between runs is flaky and
    /// fails the run (exit 1). The rest of the report, and every dump, is the last run's.
    /// Stopped early by a signal. Not with --kernel.
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "kernel",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::report::repeat::MAX_REPEAT)))]
    pub repeat: u32,

    /// Skipped tests fail the run: exit 1 instead of 0 when every test passed or skipped and
    /// at least one skipped (e.g. the cross-vCPU tests with --vcpus 1). Not with --kernel.
    #[arg(long, conflicts_with = "kernel")]
    pub fail_on_skip: bool,

    /// Serve live inspection on a Unix socket at PATH while the guest runs (`veil inspect
    /// PATH dump|stats|violations|vcpus` is its client): a JSON-lines protocol, one request
    /// per line ({"cmd":"dump","format":"text|json|svg"}, {"cmd":"stats"},
    /// {"cmd":"violations"}, {"cmd":"vcpus"}), one reply per line ({"ok":true,...} or
    /// {"ok":false,"error":"..."}); requests over 4096 bytes are refused. PATH is opened before
    /// the guest boots: an existing file that is not a socket, or a socket another process
    /// listens on, is refused (exit code 2); a stale socket is replaced. The socket is removed
    /// when the run ends (also on SIGINT/SIGTERM/SIGHUP). Veil guests only (not --kernel).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Which guest, how much memory, timeout, console.
    #[command(flatten)]
    pub guest: GuestArgs,

    /// Foreign kernels: --kernel, --cmdline, --module, --initrd, --cpuid-mask, --secret.
    #[command(flatten)]
    pub foreign: crate::foreign::cli::ForeignArgs,
}

/// `veil caps` options.
#[derive(Debug, Args, Clone)]
pub struct CapsArgs {
    /// Print one JSON object (for scripts) instead of the text table.
    #[arg(long)]
    pub json: bool,
}

/// Prints a VMM message on stderr.
pub fn say(msg: &str) {
    eprintln!("veil: {msg}");
}

/// An error together with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// The error.
    pub error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure {
            code: exit_code::USAGE,
            error,
        }
    }
}

/// Largest guest ELF file read (the loaded image itself is limited to 1 GiB).
pub const MAX_GUEST_FILE: u64 = crate::elf::MAX_IMAGE_SIZE + (1 << 20);

/// Reads a guest image file: a regular file of at most [`MAX_GUEST_FILE`] bytes (so that
/// `--guest /dev/zero` or a FIFO is an error, not an endless read).
pub fn read_guest_file(p: &Path) -> Result<Vec<u8>> {
    let what = || format!("cannot read guest image {}", p.display());
    let f = std::fs::File::open(p).with_context(what)?;
    let meta = f.metadata().with_context(what)?;
    if !meta.is_file() {
        bail!(
            "guest image {} is not a regular file (a directory, device or pipe)",
            p.display()
        );
    }
    if meta.len() > MAX_GUEST_FILE {
        bail!(
            "guest image {} is {} bytes, more than the {MAX_GUEST_FILE} a guest ELF may have",
            p.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_GUEST_FILE + 1)
        .read_to_end(&mut bytes)
        .with_context(what)?;
    if bytes.len() as u64 > MAX_GUEST_FILE {
        bail!("guest image {} grew while being read", p.display());
    }
    Ok(bytes)
}

fn guest_bytes(args: &GuestArgs) -> Result<Vec<u8>> {
    match &args.guest {
        Some(p) => read_guest_file(p),
        None => Ok(crate::guest_image::DEFAULT_GUEST.to_vec()),
    }
}

/// `--timeout SECS` as a duration (`None` for 0 = never).
pub fn timeout(secs: f64) -> Result<Option<Duration>> {
    if !secs.is_finite() || secs < 0.0 {
        bail!("--timeout must be a non-negative number of seconds (0 = never), got {secs}");
    }
    if secs == 0.0 {
        return Ok(None);
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) => Ok(Some(d)),
        Err(_) => bail!("--timeout {secs} is too large (use 0 for no timeout)"),
    }
}

/// Checks, before any long work, that `path` can be written as an output file (`what` names
/// it in the error): its directory exists, it is not a directory, and it can be opened for
/// writing. An existing file is opened for appending (its contents are left alone); a new
/// one is created and removed again.
pub fn check_output_path(path: &Path, what: &str) -> Result<()> {
    replay::cli::check_output_path(path)
        .with_context(|| format!("cannot write {what} {}", path.display()))
}

/// The `--tests` list: trimmed, each name once (first occurrence order); an empty name or one
/// that is not 1-64 characters of `[a-z0-9_]` is a usage error.
pub fn test_selection(tests: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for raw in tests {
        let name = raw.trim();
        if name.is_empty() {
            bail!(
                "--tests {:?} contains an empty test name: give comma-separated names, e.g. \
                 --tests mapped_rw,oom (`veil list-tests` prints them)",
                tests.join(",")
            );
        }
        if !vm::valid_test_name(name) {
            bail!(
                "invalid test name {name:?} in --tests: names are 1-64 characters of [a-z0-9_] \
                 (`veil list-tests` prints them)"
            );
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

fn base_config(args: &GuestArgs, start: Instant) -> Result<VmConfig> {
    let mut cfg = VmConfig::new(guest_bytes(args)?);
    cfg.test_harness = args.guest.is_none();
    cfg.mem = args.mem;
    cfg.timeout = timeout(args.timeout)?;
    cfg.start = start;
    if let Some(p) = &args.console {
        check_output_path(p, "the console file")?;
        cfg.console = ConsoleSink::File(p.clone());
    }
    Ok(cfg)
}

fn vm_error(e: VmError, guest: &GuestArgs) -> Failure {
    let what = match &guest.guest {
        Some(p) => format!("cannot boot {}", p.display()),
        None => "cannot boot the default guest".to_string(),
    };
    Failure {
        code: exit_code::USAGE,
        error: anyhow::Error::new(e).context(what),
    }
}

/// The dump format: the one asked for, else the one FILE's extension names, else text (an
/// extension naming a format Veil cannot write also gives text here: [`dump_config`] refuses
/// it through [`crate::dump::format::resolve`]).
pub fn dump_format(explicit: Option<DumpFormat>, file: Option<&std::path::Path>) -> DumpFormat {
    crate::dump::format::resolve(explicit, file).unwrap_or(DumpFormat::Text)
}

/// The exit-time dump target for `--dump-ept [FILE]` (`None`: the flag without a file).
pub fn dump_target(arg: Option<&std::path::Path>, format: DumpFormat) -> DumpTarget {
    let Some(arg) = arg else {
        return DumpTarget::File(PathBuf::from(format!("veil-dump.{}", format.extension())));
    };
    if arg.as_os_str() == "-" {
        DumpTarget::Stdout
    } else {
        DumpTarget::File(arg.to_path_buf())
    }
}

/// `--dump-ept [FILE]` / `--dump-format` of `veil run` (Veil guests and `--kernel` alike),
/// checked before the guest boots: a name whose extension is a format Veil cannot write is
/// refused; without a name, the chosen one is announced.
pub fn dump_config(args: &RunArgs) -> Result<Option<DumpConfig>, Failure> {
    let Some(d) = &args.dump_ept else {
        return Ok(None);
    };
    let format =
        crate::dump::format::resolve(args.dump_format, d.as_deref()).map_err(anyhow::Error::new)?;
    let target = dump_target(d.as_deref(), format);
    if args.json && target == DumpTarget::Stdout {
        return Err(anyhow::anyhow!(
            "--dump-ept - and --json both write to stdout; give --dump-ept a file name"
        )
        .into());
    }
    if let DumpTarget::File(p) = &target {
        check_output_path(p, "the stage-2 dump")?;
        if d.is_none() {
            replay::output::announce(&format!(
                "--dump-ept without a file name: the exit dump goes to {} ({}), guest-requested ones beside it",
                std::env::current_dir()
                    .map(|c| c.join(p))
                    .unwrap_or_else(|_| p.clone())
                    .display(),
                format.name()
            ));
        }
    }
    Ok(Some(DumpConfig { target, format }))
}

/// `veil run`.
pub fn cmd_run(args: &RunArgs, start: Instant) -> Result<i32, Failure> {
    if let Some(k) = &args.foreign.kernel {
        if args.control.is_some() {
            return Err(anyhow::anyhow!(
                "--control serves Veil guests only: a --kernel's machine has no session to inspect"
            )
            .into());
        }
        return crate::foreign::cli::cmd_run_kernel(args, k, start);
    }
    let selection = test_selection(&args.tests)?;
    let mut cfg = base_config(&args.guest, start)?;
    cfg.selection = selection;
    cfg.on_violation = args.on_violation;
    cfg.stage2 = args.stage2;
    if args.host_secretmem && args.stage2 != BackendKind::Mprotect {
        return Err(anyhow::Error::new(crate::vm::VmError::SecretMemNeedsMprotect).into());
    }
    cfg.host_secretmem = args.host_secretmem;
    cfg.verify_stage2 = args.verify_stage2;
    cfg.vcpus = args.vcpus;
    if args.dump_guest_core {
        cfg.core_dump = crate::memory::CoreDump::Include;
    }
    cfg.test_harness |= args.test_harness;
    if args.json && args.guest.console.is_none() {
        cfg.console = ConsoleSink::Stderr;
    }
    if args.quiet {
        replay::output::set_quiet(true);
        if args.guest.console.is_none() {
            cfg.console = ConsoleSink::Null;
        }
        cfg.echo_logs = false;
    }
    cfg.dump = dump_config(args)?;
    if let Some(p) = &args.junit {
        check_output_path(p, "the JUnit report")?;
    }
    if let Some(p) = &args.control {
        cfg.control = Some(std::sync::Arc::new(
            crate::control::ControlSocket::bind(p).map_err(anyhow::Error::new)?,
        ));
    }
    let mut runs = crate::report::repeat::repeat(args.repeat, |i| {
        let mut c = cfg.clone();
        if i > 0 {
            // Each run's boot and total figures count from its own start.
            c.start = Instant::now();
        }
        vm::run(c)
    })
    .map_err(|e| vm_error(e, &args.guest))?;
    let summary =
        (args.repeat > 1).then(|| crate::report::repeat::RepeatSummary::of(&runs, args.repeat));
    let Some(mut report) = runs.pop() else {
        return Err(anyhow::anyhow!("no run was made").into());
    };
    drop(runs);
    report.repeat = summary;
    let mut code = report.run_exit_code(args.fail_on_skip);
    let unknown = matches!(report.exit, crate::report::ExitInfo::UnknownTests { .. });
    if args.quiet && !args.json && !unknown {
        println!("{}", crate::report::ci::quiet_line(&report));
        for e in &report.dump_errors {
            say(&format!("error: {e}"));
        }
    } else {
        print_run(&report, args.json)?;
    }
    if code != report.run_exit_code(false) {
        say("--fail-on-skip: a test was skipped, so the run fails (exit 1)");
    }
    if let Some(p) = &args.junit {
        match crate::report::ci::write_junit(&report, p) {
            Ok(()) => replay::output::announce(&format!("wrote JUnit XML to {}", p.display())),
            Err(e) => {
                say(&format!("error: {e:#}"));
                if code == exit_code::OK {
                    code = exit_code::USAGE;
                }
            }
        }
    }
    Ok(code)
}

fn print_run(report: &RunReport, json: bool) -> Result<()> {
    if json {
        // Streamed: a storm's report is large, and need not exist twice in memory.
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, report).context("cannot write the report")?;
        writeln!(out).context("cannot write the report")?;
        drop(out);
        if let crate::report::ExitInfo::UnknownTests { .. } = report.exit {
            say(&report.exit.summary());
        }
        return Ok(());
    }
    if let crate::report::ExitInfo::UnknownTests { unknown, available } = &report.exit {
        say(&format!(
            "error: unknown test name(s) in --tests: {}",
            unknown.join(", ")
        ));
        say(&format!("available tests: {}", available.join(", ")));
        return Ok(());
    }
    print!("\n{}", report.table());
    const SHOW: usize = 20;
    if !report.violations.is_empty() {
        let groups = crate::report::group_violations(&report.violations);
        println!(
            "violations: {} exits in {} runs (consecutive exits of one instruction on contiguous bytes form a run){}:",
            report.violations_total,
            groups.len(),
            if groups.len() > SHOW { format!(", first {SHOW} runs") } else { String::new() }
        );
        for g in groups.iter().take(SHOW) {
            println!("  {}", report.violations[g.first].line(g));
        }
    }
    if let Some(line) = report.violations_summary.storm_line() {
        println!("{line}");
    }
    if !report.not_ram.is_empty() {
        println!(
            "not-RAM accesses (first {} of {}):",
            SHOW.min(report.not_ram.len()),
            report.not_ram_total
        );
        for a in report.not_ram.iter().take(SHOW) {
            println!(
                "  {:<5} {:>2} bytes at GPA {:#x}  rip {:#x}  test {}",
                a.access.name(),
                a.size,
                a.gpa,
                a.rip,
                a.test.as_deref().unwrap_or("-")
            );
        }
    }
    print!("{}", report.summary());
    if let Some(r) = &report.repeat {
        print!("{}", r.lines());
    }
    for e in &report.dump_errors {
        say(&format!("error: {e}"));
    }
    Ok(())
}

/// `veil list-tests`.
pub fn cmd_list(args: &GuestArgs, start: Instant) -> Result<i32, Failure> {
    let mut cfg = base_config(args, start)?;
    cfg.mode = BootMode::List;
    if args.console.is_none() {
        cfg.console = ConsoleSink::Null;
    }
    cfg.echo_logs = false;
    let report = vm::run(cfg).map_err(|e| vm_error(e, args))?;
    for name in &report.announced {
        println!("{name}");
    }
    if let crate::report::ExitInfo::Interrupted { signal, .. } = report.exit {
        say(&report.exit.summary());
        Ok(crate::signals::exit_code(signal))
    } else if report.exit.is_clean() {
        Ok(exit_code::OK)
    } else {
        say(&format!(
            "the guest did not list its tests cleanly: {}",
            report.exit.summary()
        ));
        Ok(if report.exit.is_crash() {
            exit_code::CRASH
        } else {
            exit_code::TEST_FAILURE
        })
    }
}

/// `veil caps`.
pub fn cmd_caps(args: &CapsArgs) -> Result<i32, Failure> {
    let kvm = kvm_ioctls::Kvm::new()
        .context("cannot open /dev/kvm (is KVM available and accessible?)")?;
    let caps = crate::caps::probe(&kvm);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&caps).context("cannot serialise caps")?
        );
    } else {
        print!("{caps}");
    }
    Ok(exit_code::OK)
}

/// Runs the parsed command line; returns the process exit code.
pub fn main_with(cli: Cli, start: Instant) -> i32 {
    let r = match &cli.command {
        Command::Run(a) => cmd_run(a, start),
        Command::ListTests(a) => cmd_list(a, start),
        Command::Caps(a) => cmd_caps(a),
        Command::Replay(a) => crate::replay_kvm::run(a).map_err(Failure::from),
        Command::Inspect(a) => crate::control::inspect::cmd_inspect(a),
        Command::Dump(a) => {
            crate::dump::cli::run(a).map_err(|e| Failure::from(anyhow::Error::new(e)))
        }
    };
    match r {
        Ok(code) => code,
        Err(f) => {
            say(&format!("error: {:#}", f.error));
            f.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("veil").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn dump_ept_with_and_without_file() {
        let Command::Run(a) = parse(&["run", "--dump-ept", "--dump-format", "svg"]).command else {
            panic!("not run")
        };
        assert_eq!(a.dump_ept, Some(None));
        assert_eq!(
            dump_target(None, dump_format(a.dump_format, None)),
            DumpTarget::File(PathBuf::from("veil-dump.svg"))
        );
        let Command::Run(a) = parse(&["run", "--dump-ept", "d/x.json"]).command else {
            panic!("not run")
        };
        let t = dump_target(a.dump_ept.unwrap().as_deref(), DumpFormat::Json);
        let cfg = DumpConfig {
            target: t,
            format: DumpFormat::Json,
        };
        assert_eq!(cfg.numbered_path(2).unwrap(), Path::new("d/x.2.json"));
        assert_eq!(
            dump_target(Some(Path::new("-")), DumpFormat::Text),
            DumpTarget::Stdout
        );
        let Command::Run(a) = parse(&["run"]).command else {
            panic!("not run")
        };
        assert_eq!(a.dump_ept, None);
    }

    #[test]
    fn dump_format_follows_the_file_name_unless_given() {
        let f = |explicit, file: Option<&str>| dump_format(explicit, file.map(Path::new));
        assert_eq!(f(None, None), DumpFormat::Text);
        assert_eq!(f(None, Some("ept.svg")), DumpFormat::Svg);
        assert_eq!(f(None, Some("d/ept.JSON")), DumpFormat::Json);
        assert_eq!(f(None, Some("ept.txt")), DumpFormat::Text);
        assert_eq!(f(None, Some("-")), DumpFormat::Text);
        assert_eq!(f(Some(DumpFormat::Json), Some("ept.svg")), DumpFormat::Json);
        assert_eq!(f(Some(DumpFormat::Svg), None), DumpFormat::Svg);
    }

    #[test]
    fn timeout_bounds_are_errors_not_panics() {
        assert_eq!(timeout(0.5).unwrap(), Some(Duration::from_millis(500)));
        for bad in [1e30, f64::MAX, f64::INFINITY, f64::NAN, -1.0, -0.0001] {
            let e = timeout(bad).unwrap_err().to_string();
            assert!(e.contains("--timeout"), "{bad}: {e}");
        }
        // A negative number reaches the check (not clap's "unexpected argument").
        let Command::Run(a) = parse(&["run", "--timeout", "-1"]).command else {
            panic!("not run")
        };
        assert!(timeout(a.guest.timeout).is_err());
    }

    #[test]
    fn test_selection_rejects_empty_and_bad_names_and_dedups() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            test_selection(&v(&["oom", " mapped_rw ", "oom"])).unwrap(),
            v(&["oom", "mapped_rw"])
        );
        assert!(test_selection(&[]).unwrap().is_empty());
        for bad in [
            &["a", "", "b"][..],
            &["", ""],
            &[" "],
            &["Mapped"],
            &["a-b"],
        ] {
            let e = test_selection(&v(bad)).unwrap_err().to_string();
            assert!(e.contains("--tests"), "{bad:?}: {e}");
        }
        // `--tests a,,b` and `--tests ,` reach the check as empty names.
        let Command::Run(a) = parse(&["run", "--tests", "a,,b"]).command else {
            panic!("not run")
        };
        assert!(test_selection(&a.tests).is_err());
        let Command::Run(a) = parse(&["run", "--tests", ","]).command else {
            panic!("not run")
        };
        assert!(test_selection(&a.tests).is_err());
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("veil-cli-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn output_paths_are_checked_without_side_effects() {
        let d = scratch("out");
        // A new file in an existing directory: fine, and not left behind.
        let new = d.join("new.txt");
        check_output_path(&new, "the dump").unwrap();
        assert!(!new.exists());
        // An existing file: fine, and its contents are kept.
        let old = d.join("old.txt");
        std::fs::write(&old, "keep").unwrap();
        check_output_path(&old, "the dump").unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "keep");
        // Missing directory, a directory, a path below a regular file, an empty name.
        let cases = [
            (d.join("missing/x.txt"), "does not exist"),
            (d.clone(), "is a directory"),
            (old.join("x.txt"), "does not exist"),
            (PathBuf::new(), "empty file name"),
        ];
        for (p, want) in cases {
            let e = format!("{:#}", check_output_path(&p, "the dump").unwrap_err());
            assert!(e.contains(want), "{}: {e}", p.display());
            assert!(e.contains("the dump"), "{e}");
        }
        // /dev/null is fine; a FIFO is refused while it has no reader (a write would block),
        // accepted once it has one; a socket is refused.
        check_output_path(Path::new("/dev/null"), "the dump").unwrap();
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = format!("{:#}", check_output_path(&fifo, "the dump").unwrap_err());
        assert!(e.contains("FIFO with no reader"), "{e}");
        use std::os::unix::fs::OpenOptionsExt;
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        check_output_path(&fifo, "the dump").unwrap();
        // Opening it for the output at run time does not block either, with or without reader.
        let mut w = replay::cli::create_output(&fifo).unwrap();
        std::io::Write::write_all(&mut w, b"x").unwrap();
        drop(reader);
        drop(w);
        let e = replay::cli::create_output(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO with no reader"), "{e}");
        let sock = d.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = format!("{:#}", check_output_path(&sock, "the dump").unwrap_err());
        assert!(e.contains("socket"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn guest_file_must_be_a_bounded_regular_file() {
        let d = scratch("guest");
        for p in [Path::new("/dev/zero"), d.as_path()] {
            let e = format!("{:#}", read_guest_file(p).unwrap_err());
            assert!(e.contains("not a regular file"), "{e}");
        }
        let e = format!("{:#}", read_guest_file(&d.join("none.elf")).unwrap_err());
        assert!(e.contains("cannot read guest image"), "{e}");
        let f = d.join("g.elf");
        std::fs::write(&f, b"\x7fELF").unwrap();
        assert_eq!(read_guest_file(&f).unwrap(), b"\x7fELF");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn run_options_parse() {
        let Command::Run(a) = parse(&[
            "run",
            "--tests",
            "a,b",
            "--mem",
            "1G",
            "--on-violation",
            "kill",
            "--timeout",
            "5",
        ])
        .command
        else {
            panic!("not run")
        };
        assert_eq!(a.tests, ["a", "b"]);
        assert_eq!(a.guest.mem, MemSize(1 << 30));
        assert_eq!(a.on_violation, ViolationPolicy::Kill);
        assert_eq!(
            timeout(a.guest.timeout).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(timeout(0.0).unwrap(), None);
        assert!(timeout(-1.0).is_err());
        assert!(Cli::try_parse_from(["veil", "run", "--mem", "3M"]).is_err());
        assert!(Cli::try_parse_from(["veil", "run", "--on-violation", "explode"]).is_err());
    }
}
