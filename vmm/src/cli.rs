//! The `veil` command line (clap derive) and what each subcommand does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use veil_abi::BootMode;

use crate::console::ConsoleSink;
use crate::dump::DumpFormat;
use crate::memory::MemSize;
use crate::report::{exit_code, RunReport};
use crate::session::{DumpConfig, DumpTarget};
use crate::vm::{self, ViolationPolicy, VmConfig, VmError};

const ABOUT: &str =
    "Veil: a KVM testbed for direct-map removal (__GFP_UNMAPPED) enforced at stage 2";

const LONG_ABOUT: &str = "\
Veil boots a small guest kernel on /dev/kvm, owns the guest's physical memory through a buddy
page allocator with freetypes and pageblock flips (the kernel's __GFP_UNMAPPED series), and
removes \"unmapped\" pages from stage 2 by shaping KVM memslots. Any guest access to such a page
is caught and reported as a violation. The default guest runs an isolation test suite.";

const EXIT_CODES: &str = "\
Exit codes:
  0  every selected test passed (skipped tests do not fail a run); list-tests/caps succeeded
  1  a test failed or did not run, a violation happened outside any test, or the guest exited
     with a non-zero code
  2  usage or configuration error: bad option, bad --mem size, invalid guest ELF, unknown test
     name in --tests, /dev/kvm unavailable
  3  the guest crashed (exception, triple fault, emulation failure), was stopped by
     --on-violation kill or by a fetch without recovery point, or ran past --timeout

Output: guest console output goes to stdout (stderr with --json, or --console FILE); the VMM's
own messages go to stderr prefixed with 'veil: '.

Examples:
  veil run                              run the whole suite, print a table
  veil run --tests mapped_rw,unmapped_read_direct --json
  veil run --mem 1G --dump-ept dump.svg --dump-format svg
  veil run --guest my-kernel.elf --on-violation kill --timeout 10
  veil list-tests
  veil caps --json
  veil replay ../shared/data/<trace> --kvm";

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
    #[command(after_long_help = EXIT_CODES)]
    Run(RunArgs),
    /// Boot the guest in list mode and print the names of its tests, one per line.
    ListTests(GuestArgs),
    /// Print what this host's KVM offers that Veil cares about (memslots, sync regs, memory
    /// fault info, guest_memfd, memory attributes, binary stats) and whether it runs nested.
    Caps(CapsArgs),
    /// Replay a real Linux page-allocation trace (ftrace kmem events) through direct-map
    /// policies and compare their stage-2 cost; `--kvm` applies every memslot update to a real
    /// VM. Exit code 0 on success, 2 on a bad trace or option.
    Replay(replay::cli::ReplayArgs),
}

/// Options that say which guest to boot and how.
#[derive(Debug, Args, Clone)]
pub struct GuestArgs {
    /// Guest RAM size: bytes or a K/M/G suffix (binary units), a multiple of 2 MiB, at least
    /// 6M and at most 64G. RAM is mapped lazily (MAP_NORESERVE): a large size costs nothing
    /// until the guest touches it.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub mem: MemSize,

    /// Boot this ELF64 x86-64 executable instead of the embedded default guest. It must be
    /// ET_EXEC with PT_LOAD segments at or above 0x200000 inside RAM; it is entered in 64-bit
    /// mode with rdi = the boot info block (see the veil-abi crate).
    #[arg(long, value_name = "PATH")]
    pub guest: Option<PathBuf>,

    /// Stop the guest after SECS seconds of wall time (0 = never). A timeout exits with code 3.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub timeout: f64,

    /// Write the guest's console output to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
}

/// `veil run` options.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Run only these tests (comma-separated; default: all). Unknown names are an error that
    /// lists the available tests.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    pub tests: Vec<String>,

    /// Print one JSON document on stdout instead of the table: tests[], violations[], not_ram[],
    /// stage2 and allocator counters, timing, exit, and the exit-time stage-2 dump. The guest
    /// console then goes to stderr (or --console FILE).
    #[arg(long)]
    pub json: bool,

    /// What to do when the guest touches memory stage 2 does not expose. report: loads read
    /// 0xa5 bytes, stores are dropped, the guest runs on, and an instruction fetch resumes at
    /// the recovery point the test registered (or stops the VM if none). kill: stop at the
    /// first violation, print the report, exit 3.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = ViolationPolicy::Report)]
    pub on_violation: ViolationPolicy,

    /// Write stage-2 ("EPT") dumps: every GPA range with state, freetype, memslot and host
    /// address, the memslot table, allocator and engine counters, KVM's binary stats. The
    /// exit-time dump goes to FILE (default: veil-dump.txt / .json / .svg by format; "-" =
    /// stdout); each dump the guest requests (Hc::Dump) goes to a numbered file beside it:
    /// dump.json -> dump.1.json, dump.2.json, ...
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    pub dump_ept: Option<Option<PathBuf>>,

    /// Dump format: text (tables), json (for tools), svg (one cell per 2 MiB pageblock coloured
    /// by state, with a legend).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = DumpFormat::Text)]
    pub dump_format: DumpFormat,

    /// Which guest, how much memory, timeout, console.
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// `veil caps` options.
#[derive(Debug, Args, Clone)]
pub struct CapsArgs {
    /// Print JSON instead of text.
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

fn guest_bytes(args: &GuestArgs) -> Result<Vec<u8>> {
    match &args.guest {
        Some(p) => {
            std::fs::read(p).with_context(|| format!("cannot read guest image {}", p.display()))
        }
        None => Ok(crate::guest_image::DEFAULT_GUEST.to_vec()),
    }
}

fn timeout(secs: f64) -> Result<Option<Duration>> {
    if !secs.is_finite() || secs < 0.0 {
        bail!("--timeout must be a non-negative number of seconds, got {secs}");
    }
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

fn base_config(args: &GuestArgs, start: Instant) -> Result<VmConfig> {
    let mut cfg = VmConfig::new(guest_bytes(args)?);
    cfg.mem = args.mem;
    cfg.timeout = timeout(args.timeout)?;
    cfg.start = start;
    if let Some(p) = &args.console {
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

/// The exit-time dump target for `--dump-ept [FILE]` (`None`: the flag without a file).
pub fn dump_target(arg: Option<&std::path::Path>, format: DumpFormat) -> DumpTarget {
    let Some(arg) = arg else {
        let ext = match format {
            DumpFormat::Text => "txt",
            DumpFormat::Json => "json",
            DumpFormat::Svg => "svg",
        };
        return DumpTarget::File(PathBuf::from(format!("veil-dump.{ext}")));
    };
    if arg.as_os_str() == "-" {
        DumpTarget::Stdout
    } else {
        DumpTarget::File(arg.to_path_buf())
    }
}

/// `veil run`.
pub fn cmd_run(args: &RunArgs, start: Instant) -> Result<i32, Failure> {
    let mut cfg = base_config(&args.guest, start)?;
    cfg.selection = args
        .tests
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    cfg.on_violation = args.on_violation;
    if args.json && args.guest.console.is_none() {
        cfg.console = ConsoleSink::Stderr;
    }
    if let Some(d) = &args.dump_ept {
        let target = dump_target(d.as_deref(), args.dump_format);
        if args.json && target == DumpTarget::Stdout {
            return Err(anyhow::anyhow!(
                "--dump-ept - and --json both write to stdout; give --dump-ept a file name"
            )
            .into());
        }
        cfg.dump = Some(DumpConfig {
            target,
            format: args.dump_format,
        });
    }
    let report = vm::run(cfg).map_err(|e| vm_error(e, &args.guest))?;
    print_run(&report, args.json)?;
    Ok(report.exit_code())
}

fn print_run(report: &RunReport, json: bool) -> Result<()> {
    if json {
        let s = serde_json::to_string_pretty(report).context("cannot serialise the report")?;
        println!("{s}");
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
            let v = &report.violations[g.first];
            let what = if g.exits == 1 {
                format!("{} bytes", v.size)
            } else {
                format!("{} exits, {} bytes", g.exits, g.bytes)
            };
            println!(
                "  {:<5} {:<20} at GPA {:#011x}  rip {:#x}  {}  {}  test {}  -> {}",
                v.access.name(),
                what,
                v.gpa,
                v.rip,
                v.freetype.as_deref().unwrap_or("-"),
                v.owner,
                v.test.as_deref().unwrap_or("-"),
                v.action.name()
            );
        }
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
    for d in &report.dumps {
        if d != "-" {
            println!("dump written: {d}");
        }
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
    if report.exit.is_clean() {
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
            dump_target(None, a.dump_format),
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
