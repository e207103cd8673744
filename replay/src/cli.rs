//! Command-line arguments of `veil replay` and the steps the command runs.
//!
//! `vmm` embeds [`ReplayArgs`] as a subcommand; without `--kvm` it calls [`run`], with `--kvm` it
//! uses the same steps ([`load`], [`layout`], [`run_options`], [`report`], [`emit`]) around its
//! own KVM-backed stage 2.

use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::classify::{classify, Classification, ClassifyError, Rules};
use crate::flush::Arch;
use crate::policy::compaction::CompactionReport;
use crate::policy::{
    self, Layout, PolicyKind, PolicyResult, RunOptions, DEFAULT_FLUSH_BATCH, DEFAULT_HEADROOM_PCT,
};
use crate::report::{render_text, Report};
use crate::sweep::{Sweep, SweepKey, SweepReport, SweepRow};
use crate::trace::{self, LoadOptions, Trace, TraceError};
use crate::tracker::{PureModel, DEFAULT_MAX_MEMSLOTS};

/// `veil replay`: replay a Linux page-allocation trace through direct-map policies.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// ftrace kmem trace (mm_page_alloc / mm_page_free / mm_page_free_batched as the kernel
    /// prints them), plain or gzip (detected by content), or `-` for standard input. Input
    /// with 2^20 lines or 256 MiB in a row without one such event is not a kmem trace: the
    /// replay gives up there (exit code 2).
    pub trace: PathBuf,

    /// Policies to run, comma separated, each once (default: all but freetype-pcp, in this
    /// order; `--pcp` adds that one).
    #[arg(long, short, value_enum, value_delimiter = ',', default_values_t = PolicyKind::ALL.to_vec())]
    pub policy: Vec<PolicyKind>,

    /// An allocation is unmapped if its gfp flags contain ALL these names. Names are compared
    /// by the bits they stand for (Linux 6.18 definitions), so GFP_KERNEL_ACCOUNT also matches
    /// `GFP_HIGHUSER|__GFP_ACCOUNT`. Default when no rule is given: GFP_KERNEL_ACCOUNT, the
    /// memcg-accounted kernel allocations made for a user process (page tables, kernel stacks,
    /// pipe/socket buffers): they hold one process's data inside the kernel, are unmovable and
    /// scattered, and match the kernel series' only unmapped freetype (unmovable|unmapped).
    #[arg(long, value_delimiter = ',', value_name = "GFPNAME[,..]")]
    pub unmapped: Vec<String>,

    /// Also report what ASI view switches would cost: an allocation is sensitive (mapped in
    /// the full view only) if its gfp flags contain ALL these names, compared by bits like
    /// --unmapped; given without a value: GFP_USER, which ASI makes imply __GFP_SENSITIVE
    /// (so GFP_HIGHUSER_MOVABLE user pages too). Allocations --unmapped selects stay unmapped.
    /// Prints, per policy, the ranges (maximal runs of sensitive pages) one switch between
    /// the restricted and the full view would toggle: at the end, at worst and the mean over
    /// the replay (pure model, also with --kvm; unmapped-cache has no sensitive counterpart).
    #[arg(long, value_delimiter = ',', value_name = "GFPNAME[,..]", num_args = 0..=1, default_missing_value = crate::sensitive::DEFAULT_SENSITIVE)]
    pub sensitive: Option<Vec<String>>,

    /// An allocation is unmapped if its gfp flags contain ANY of these names.
    #[arg(long, value_delimiter = ',', value_name = "NAME[,..]")]
    pub unmapped_gfp_any: Vec<String>,

    /// An allocation is unmapped if its trace migratetype is N (0 unmovable, 1 movable, 2 reclaimable).
    #[arg(long, value_name = "N")]
    pub unmapped_migratetype: Option<u8>,

    /// Unmap this fraction (0 to 1 inclusive, e.g. 0.1) of the allocations the other rules
    /// select (of all, if alone), chosen by a seeded hash of the allocation's index:
    /// deterministic for a given --seed.
    #[arg(long, value_name = "F")]
    pub unmapped_fraction: Option<f64>,

    /// Seed for --unmapped-fraction (an unsigned 64-bit integer).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Memory to replay on: bytes or a K/M/G/T suffix (binary units: 1G = 1024M; KB and KiB
    /// alike), at least 4M and at most 64G, e.g. 512M or 1G; rounded up to 2 MiB. Default: the trace's peak live pages plus --headroom.
    /// linux-placement always uses the trace's own PFN span. Too little memory shows up as
    /// allocation failures in the report, not as an error.
    #[arg(long, value_parser = crate::size::REPLAY_MEM.value_parser(), value_name = "SIZE")]
    pub mem: Option<u64>,

    /// Headroom over the peak live pages when sizing memory, in percent.
    #[arg(long, default_value_t = DEFAULT_HEADROOM_PCT, value_name = "PCT")]
    pub headroom: u32,

    /// Fail (exit code 2) on the first malformed line, naming its line number, instead of
    /// counting it and reporting the first few.
    #[arg(long)]
    pub strict: bool,

    /// Print the report as one JSON document on stdout instead of the text table.
    #[arg(long)]
    pub json: bool,

    /// Write a plot of intact 2 MiB blocks over time, one line per policy, to FILE (checked
    /// before the trace is read). The format follows the extension: .svg or none = SVG, .png =
    /// PNG (rendered from the SVG); any other extension is refused unless --plot-format says
    /// which to write.
    #[arg(long, value_name = "FILE.svg|FILE.png")]
    pub plot: Option<PathBuf>,

    /// The --plot file's format whatever its name: `svg` or `png`.
    #[arg(
        long,
        value_enum,
        value_name = "svg|png",
        requires = "plot",
        hide_possible_values = true
    )]
    pub plot_format: Option<crate::output::PlotFormat>,

    /// No progress lines on stderr (reading progress, one line per policy, plot written).
    #[arg(long, short)]
    pub quiet: bool,

    /// Apply every policy's stage-2 changes to a real VM's memslots and measure their cost.
    #[arg(long)]
    pub kvm: bool,

    /// With --kvm: the stage-2 backend the updates go through, as `veil run --stage2`:
    /// `slots` (memslot holes, one ioctl per slot created or deleted) or `mprotect` (one memslot
    /// over a second mapping of memfd RAM, one mprotect per update; its limit is
    /// vm.max_map_count, not the memslot count).
    #[arg(long, value_name = "slots|mprotect", value_parser = ["slots", "mprotect"], default_value = "slots", requires = "kvm", hide_possible_values = true)]
    pub stage2: String,

    /// Memslot limit to compare layouts against (at least 1). With --kvm the VM enforces the
    /// lower of this and the host's KVM_CAP_NR_MEMSLOTS: updates beyond it fail (counted as
    /// stage-2 failures).
    #[arg(long, default_value_t = DEFAULT_MAX_MEMSLOTS, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_memslots: u64,

    /// freetype policy: allocations whose gfp lacks __GFP_DIRECT_RECLAIM (GFP_NOWAIT,
    /// GFP_ATOMIC) may not flip pageblocks, as in the kernel.
    #[arg(long)]
    pub honour_atomic: bool,

    /// Whose TLB-flush rules turn stage-2 changes into shootdowns: x86 (removals flush,
    /// additions do not) or arm64 (break-before-make: removals and additions flush).
    #[arg(long, value_enum, default_value_t = Arch::X86, value_name = "x86|arm64", hide_possible_values = true)]
    pub arch: Arch,

    /// CPUs a shootdown reaches: each costs N-1 IPIs in the report (1 to 65536; default: the
    /// number of CPUs the trace recorded).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub cpus: Option<u32>,

    /// per-page-batched: removals share one shootdown per N pages (at least 1); a page whose
    /// removal is still waiting is flushed before it is reused.
    #[arg(long, default_value_t = DEFAULT_FLUSH_BATCH, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub flush_batch: u64,

    /// freetype: when a request finds no whole free pageblock of the other kind to flip,
    /// migrate the movable allocations (trace migratetype 1) out of the cheapest block and
    /// retry; the report gives failures with and without it and the pages migrated.
    #[arg(long)]
    pub compaction: bool,

    /// One replay per value, sharing the parsed trace, in one table (and one plot with
    /// --plot): `headroom=0,5,10,25,50` or `unmapped-fraction=0.1,0.5,1`.
    #[arg(long, value_name = "KEY=V1,V2,..", value_parser = crate::sweep::parse_sweep, conflicts_with = "kvm")]
    pub sweep: Option<Sweep>,

    /// Also replay `freetype-pcp`: the freetype policy on the allocator for several CPUs, one
    /// per-CPU cache set per trace CPU, each allocation and free on the CPU the trace recorded
    /// it on (its row beside freetype's shows the caches' effect on flips, updates, failures).
    #[arg(long)]
    pub pcp: bool,

    /// With --kvm: replay each policy N times (1 to 1000), each on a fresh VM, and report the
    /// median, least and largest stage-2 figures with the sample counts (one --kvm run alone
    /// is not trustworthy on a shared host). The other figures are the median run's.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "kvm", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
}

/// Why `veil replay` failed.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// Could not open or write a file (the path, or "stdout").
    #[error("{0}")]
    Io(String, #[source] io::Error),
    /// The trace could not be read.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The classification rules are invalid.
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    /// JSON output failed.
    #[error("cannot write the JSON report")]
    Json(#[from] serde_json::Error),
    /// A policy's memory would be too large to model.
    #[error("{policy}: {gib} GiB of memory to model, above the 64 GiB the replay supports (the trace's PFN span or --headroom is too large; choose other policies with --policy)")]
    TooLarge {
        /// The policy.
        policy: PolicyKind,
        /// Its memory in GiB.
        gib: u64,
    },
    /// The input holds no page-allocator event at all: not a kmem trace (or an empty one).
    #[error("{path} holds no mm_page_alloc, mm_page_free or mm_page_free_batched event ({lines} line{}, {malformed} malformed{}): is it an ftrace kmem trace? (see `veil replay --help`)", if *lines == 1 { "" } else { "s" }, first.as_ref().map(|m| format!("; line {}: {}", m.line, m.reason)).unwrap_or_default())]
    NoEvents {
        /// The input.
        path: String,
        /// Lines read.
        lines: u64,
        /// Malformed lines among them.
        malformed: u64,
        /// The first malformed line.
        first: Option<crate::trace::Malformed>,
    },
    /// `--kvm` needs the `veil` binary.
    #[error("--kvm needs a VM: run it as `veil replay --kvm`")]
    KvmUnavailable,
    /// The `--plot` file's name asks for a format that cannot be written, or PNG failed.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
}

/// The classification rules the arguments give.
pub fn rules(a: &ReplayArgs) -> Rules {
    Rules {
        all_of: a.unmapped.clone(),
        any_of: a.unmapped_gfp_any.clone(),
        migratetype: a.unmapped_migratetype,
        fraction: a.unmapped_fraction,
        seed: a.seed,
    }
}

/// A parsed and classified trace.
#[derive(Debug)]
pub struct Loaded {
    /// The events.
    pub trace: Trace,
    /// Which allocations are unmapped.
    pub classification: Classification,
}

fn progress(a: &ReplayArgs, msg: std::fmt::Arguments<'_>) {
    if !a.quiet {
        eprintln!("replay: {msg}");
    }
}

/// Checks what can be checked before the trace is read, so that a long load is not wasted:
/// the `--unmapped-fraction` range and that the `--plot` file can be written (an existing file
/// is opened for appending and left as it is; a new one is created and removed again).
pub fn check_args(a: &ReplayArgs) -> Result<(), ReplayError> {
    if let Some(f) = a.unmapped_fraction {
        if !(0.0..=1.0).contains(&f) {
            return Err(ClassifyError::BadFraction(f).into());
        }
    }
    if let Some(p) = &a.plot {
        crate::output::plot_format(a.plot_format, p)?;
        check_output_path(p).map_err(|e| {
            ReplayError::Io(format!("cannot write plot {} (--plot)", p.display()), e)
        })?;
    }
    Ok(())
}

/// Whether `path` can be written as an output file, without changing an existing file.
pub fn check_output_path(path: &Path) -> io::Result<()> {
    if path.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty file name",
        ));
    }
    if path.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "it is a directory",
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        ));
    }
    if let Ok(meta) = fs::metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if meta.is_file() {
            // A regular file must be writable (opened for appending: contents kept).
            fs::OpenOptions::new().append(true).open(path)?;
        } else if ft.is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a socket (writing to it would block or fail): give a regular file",
            ));
        } else if ft.is_fifo() {
            // Opening a FIFO for writing blocks until it has a reader; without O_NONBLOCK's
            // answer (ENXIO: no reader) the run would hang before it starts.
            open_nonblocking(fs::OpenOptions::new().write(true), path)?;
        }
        // Character devices (/dev/null, a terminal) are taken as they are.
    } else {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        fs::remove_file(path)?;
    }
    Ok(())
}

/// Opens `path` with `opts` plus `O_NONBLOCK`: a FIFO without a reader is then an error
/// (`ENXIO`, reported as such) instead of an open that blocks until one comes.
fn open_nonblocking(opts: &mut fs::OpenOptions, path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    opts.custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => io::Error::new(
                io::ErrorKind::WouldBlock,
                "it is a FIFO with no reader (writing to it would block): start the reader \
                 first, or give a regular file",
            ),
            _ => e,
        })
}

/// Creates or truncates the output file `path` without blocking on a FIFO that has no reader
/// (the error says so); writes to the file then block normally.
pub fn create_output(path: &Path) -> io::Result<fs::File> {
    use std::os::fd::AsRawFd;
    let f = open_nonblocking(
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true),
        path,
    )?;
    // SAFETY: fcntl on a descriptor this function owns; only the O_NONBLOCK status flag changes.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// Read, parse and classify the trace (after [`check_args`]), with a progress line on stderr
/// about every second of a long load.
pub fn load(a: &ReplayArgs) -> Result<Loaded, ReplayError> {
    check_args(a)?;
    let t0 = Instant::now();
    if a.trace.as_os_str() == "-" && io::stdin().is_terminal() {
        progress(
            a,
            format_args!("reading the trace from standard input (a terminal); end it with Ctrl-D"),
        );
    }
    let input = crate::reader::open_input_parallel(&a.trace)
        .map_err(|e| ReplayError::Io(format!("cannot open trace {}", a.trace.display()), e))?;
    let mut last = t0;
    let mut trace = trace::load_parallel(
        input,
        LoadOptions {
            strict: a.strict,
            ..LoadOptions::default()
        },
        &mut |st| {
            let now = Instant::now();
            if now.duration_since(last).as_secs_f64() >= 1.0 {
                last = now;
                progress(a, format_args!("{}", trace::progress_line(st, now - t0)));
            }
        },
    )?;
    let s = &trace.stats;
    if s.alloc_events + s.free_events + s.batched_events == 0 && crate::stop::requested().is_none()
    {
        return Err(ReplayError::NoEvents {
            path: a.trace.display().to_string(),
            lines: s.lines,
            malformed: s.malformed_lines,
            first: s.malformed_examples.first().cloned(),
        });
    }
    if let Some(m) = s.malformed_examples.first() {
        progress(
            a,
            format_args!(
                "warning: {} malformed lines skipped (first: line {}: {}); --strict makes them fatal",
                s.malformed_lines, m.line, m.reason
            ),
        );
    }
    let classification = classify(&mut trace, &rules(a))?;
    progress(
        a,
        format_args!(
            "loaded {} lines, {} events in {:.2} s",
            trace.stats.lines,
            trace.events.len(),
            t0.elapsed().as_secs_f64()
        ),
    );
    if let Some(names) = &a.sensitive {
        // Unknown names are an error now, before any replay; [`report`] runs the analysis.
        crate::sensitive::classify(&trace, names)?;
    }
    Ok(Loaded {
        trace,
        classification,
    })
}

/// The `--sensitive` analysis (see [`crate::sensitive`]): classify, then replay each selected
/// policy that has a sensitive counterpart on the pure two-view model. [`load`] has checked
/// the rule; a policy whose memory is too large to model is skipped (the main replay reports
/// that error).
pub fn sensitive_report(
    a: &ReplayArgs,
    trace: &Trace,
    names: &[String],
) -> Result<crate::sensitive::SensitiveReport, ReplayError> {
    let c = crate::sensitive::classify(trace, names)?;
    let mut policies = Vec::new();
    for kind in dedup(&a.policy) {
        if crate::stop::requested().is_some() {
            break;
        }
        let Ok(lay) = layout(a, kind, trace) else {
            continue;
        };
        if let Some(r) = crate::sensitive::run_policy(
            kind,
            trace,
            &c,
            lay,
            a.honour_atomic,
            RunOptions::default().samples,
        ) {
            progress(
                a,
                format_args!(
                    "{kind} (--sensitive): {} ranges at the end, {} at worst",
                    r.ranges_end, r.ranges_worst
                ),
            );
            policies.push(r);
        }
    }
    Ok(crate::sensitive::SensitiveReport {
        classification: c,
        policies,
    })
}

/// The layout a policy replays on; an error if it exceeds [`policy::MAX_MANAGED_PAGES`].
pub fn layout(a: &ReplayArgs, kind: PolicyKind, trace: &Trace) -> Result<Layout, ReplayError> {
    let pages = a.mem.map(|b| policy::round_up_blocks(b.div_ceil(4096)));
    let l = policy::layout_for(kind, trace, pages, a.headroom);
    if l.nr_pages > policy::MAX_MANAGED_PAGES {
        return Err(ReplayError::TooLarge {
            policy: kind,
            gib: l.nr_pages / (1 << 18),
        });
    }
    Ok(l)
}

/// How each policy runs on `trace` (`--cpus` defaults to the trace's CPU count).
pub fn run_options(a: &ReplayArgs, trace: &Trace) -> RunOptions {
    RunOptions {
        max_slots: a.max_memslots,
        honour_atomic: a.honour_atomic,
        arch: a.arch,
        flush_batch: a.flush_batch,
        cpus: a.cpus.unwrap_or(trace.stats.cpus.max(1)),
        compaction: a.compaction,
        ..RunOptions::default()
    }
}

/// Print one policy's progress line.
pub fn progress_policy(a: &ReplayArgs, r: &PolicyResult) {
    progress(
        a,
        format_args!(
            "{}: {} events in {:.1} ms ({:.2} M events/s), {} stage-2 updates",
            r.policy,
            r.events,
            r.replay_ns as f64 / 1e6,
            r.events_per_sec / 1e6,
            r.stage2.updates()
        ),
    );
}

/// Replay every selected policy on the pure model.
pub fn run_model(a: &ReplayArgs, l: &Loaded) -> Result<Vec<PolicyResult>, ReplayError> {
    let opts = run_options(a, &l.trace);
    let mut out = Vec::new();
    for kind in policies(a) {
        if crate::stop::requested().is_some() {
            break;
        }
        let lay = layout(a, kind, &l.trace)?;
        let (mut r, _) = policy::run(kind, &l.trace, lay, PureModel, &opts);
        if let Some(c) = &mut r.compaction {
            attach_without_compaction(c, kind, l, lay, &opts);
        }
        progress_policy(a, &r);
        out.push(r);
    }
    Ok(out)
}

/// `--compaction`: the same replay without it, for the report's failures with and without.
pub fn attach_without_compaction(
    c: &mut CompactionReport,
    kind: PolicyKind,
    l: &Loaded,
    lay: Layout,
    opts: &RunOptions,
) {
    let plain = RunOptions {
        compaction: false,
        timed: false,
        ..*opts
    };
    let (w, _) = policy::run(kind, &l.trace, lay, PureModel, &plain);
    c.failures_without = w.failures;
    c.failures_by_kind_without = w.failures_by_kind;
}

/// `--sweep`: one replay per value on the trace parsed once (re-classified for
/// `unmapped-fraction`).
pub fn run_sweep(a: &ReplayArgs, sw: &Sweep, l: &mut Loaded) -> Result<SweepReport, ReplayError> {
    let mut rows = Vec::new();
    for &v in &sw.values {
        if crate::stop::requested().is_some() {
            break;
        }
        let mut b = a.clone();
        b.sweep = None;
        match sw.key {
            SweepKey::Headroom => b.headroom = v as u32,
            SweepKey::UnmappedFraction => {
                b.unmapped_fraction = Some(v);
                l.classification = classify(&mut l.trace, &rules(&b))?;
            }
        }
        progress(a, format_args!("sweep {}={v}", sw.key.name()));
        let policies = run_model(&b, l)?;
        rows.push(SweepRow {
            value: v,
            unmapped_allocs: l.classification.unmapped_allocs,
            policies,
        });
    }
    Ok(SweepReport {
        sweep: sw.clone(),
        rows,
    })
}

/// Print a sweep (text or JSON) and write its plot if asked.
pub fn emit_sweep(a: &ReplayArgs, r: &SweepReport, out: &mut dyn Write) -> Result<(), ReplayError> {
    let w = |e| ReplayError::Io("cannot write the report to stdout".into(), e);
    let mut buf = io::BufWriter::with_capacity(1 << 16, out);
    if a.json {
        serde_json::to_writer_pretty(&mut buf, r)?;
        writeln!(buf).map_err(w)?;
    } else {
        buf.write_all(crate::sweep::render_text(r).as_bytes())
            .map_err(w)?;
    }
    buf.flush().map_err(w)?;
    if let Some(path) = &a.plot {
        let title = format!("Failed allocations across {}", r.sweep.key.name());
        write_plot(a, path, &crate::sweep::render_svg(r, &title))?;
    }
    Ok(())
}

/// The policies to run: `--policy` in order, each once, then `freetype-pcp` with `--pcp`.
pub fn policies(a: &ReplayArgs) -> Vec<PolicyKind> {
    let mut v = dedup(&a.policy);
    if a.pcp && !v.contains(&PolicyKind::FreetypePcp) {
        v.push(PolicyKind::FreetypePcp);
    }
    v
}

/// Policies in the order given, each once.
pub fn dedup(p: &[PolicyKind]) -> Vec<PolicyKind> {
    let mut v: Vec<PolicyKind> = Vec::new();
    for k in p {
        if !v.contains(k) {
            v.push(*k);
        }
    }
    v
}

/// Assemble the report.
pub fn report(a: &ReplayArgs, l: &Loaded, policies: Vec<PolicyResult>, kvm: bool) -> Report {
    let s = &l.trace.stats;
    let mut sizing = crate::report::Sizing::default();
    if policies
        .iter()
        .any(|p| p.policy != PolicyKind::LinuxPlacement)
    {
        let pages = policy::layout_for(
            PolicyKind::Freetype,
            &l.trace,
            a.mem.map(|b| policy::round_up_blocks(b.div_ceil(4096))),
            a.headroom,
        )
        .nr_pages;
        sizing.managed = Some(crate::report::ManagedSizing {
            pages,
            bytes: pages.saturating_mul(4096),
            source: if a.mem.is_some() {
                "mem"
            } else {
                "peak_live_headroom"
            },
            peak_live_pages: s.peak_live_pages,
            headroom_percent: a.headroom,
        });
    }
    if let Some(p) = policies
        .iter()
        .find(|p| p.policy == PolicyKind::LinuxPlacement)
    {
        sizing.linux_placement = Some(crate::report::PfnSpanSizing {
            pages: p.layout.nr_pages,
            bytes: p.layout.nr_pages.saturating_mul(4096),
            min_pfn: s.min_pfn,
            end_pfn: s.end_pfn,
        });
    }
    Report {
        input: a.trace.display().to_string(),
        trace: s.clone(),
        classification: l.classification.clone(),
        sizing,
        kvm,
        policies,
        interrupted: crate::stop::requested(),
        sensitive: a
            .sensitive
            .as_ref()
            .and_then(|names| sensitive_report(a, &l.trace, names).ok()),
    }
}

/// Print the report (text or JSON) to `out` and write the plot if asked.
pub fn emit(a: &ReplayArgs, r: &Report, out: &mut dyn Write) -> Result<(), ReplayError> {
    let w = |e| ReplayError::Io("cannot write the report to stdout".into(), e);
    // One buffer for the whole document: serde_json writes token by token.
    let mut buf = io::BufWriter::with_capacity(1 << 16, &mut *out);
    if a.json {
        serde_json::to_writer_pretty(&mut buf, r)?;
        writeln!(buf).map_err(w)?;
    } else {
        buf.write_all(render_text(r).as_bytes()).map_err(w)?;
    }
    buf.flush().map_err(w)?;
    drop(buf);
    if let Some(path) = &a.plot {
        let title = format!(
            "Intact 2 MiB blocks; {} unmapped allocations ({})",
            r.classification.unmapped_allocs, r.classification.rule
        );
        write_plot(a, path, &crate::plot::render_svg(&r.policies, &title))?;
    }
    Ok(())
}

/// Writes the `--plot` file in the format its name (or `--plot-format`) asks for, and
/// announces it on stderr.
fn write_plot(a: &ReplayArgs, path: &Path, svg: &str) -> Result<(), ReplayError> {
    let format = crate::output::plot_format(a.plot_format, path)?;
    let png;
    let bytes = match format {
        crate::output::PlotFormat::Svg => svg.as_bytes(),
        crate::output::PlotFormat::Png => {
            png = crate::output::svg_to_png(svg)?;
            &png
        }
    };
    create_output(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| ReplayError::Io(format!("cannot write plot {}", path.display()), e))?;
    if !a.quiet {
        crate::output::announce_written("plot", path, format.name(), bytes.len() as u64);
    }
    Ok(())
}

/// `veil replay` without `--kvm`: load, replay on the model, report. Returns the exit code.
pub fn run(a: &ReplayArgs) -> Result<i32, ReplayError> {
    if a.kvm {
        return Err(ReplayError::KvmUnavailable);
    }
    let mut l = load(a)?;
    if let Some(sw) = &a.sweep {
        let r = run_sweep(a, sw, &mut l)?;
        let stdout = io::stdout();
        emit_sweep(a, &r, &mut stdout.lock())?;
        return Ok(crate::stop::requested().map_or(0, |i| i.exit_code()));
    }
    let results = run_model(a, &l)?;
    let r = report(a, &l, results, false);
    let stdout = io::stdout();
    emit(a, &r, &mut stdout.lock())?;
    Ok(r.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    #[test]
    fn args_parse() {
        let c = Cli::try_parse_from([
            "x",
            "t.gz",
            "--policy",
            "freetype,per-page",
            "--unmapped",
            "GFP_KERNEL,__GFP_ZERO",
            "--mem",
            "512M",
        ])
        .unwrap();
        assert_eq!(
            c.args.policy,
            vec![PolicyKind::Freetype, PolicyKind::PerPage]
        );
        assert_eq!(c.args.unmapped, vec!["GFP_KERNEL", "__GFP_ZERO"]);
        assert_eq!(c.args.mem, Some(512 << 20));
        let c = Cli::try_parse_from(["x", "-"]).unwrap();
        assert_eq!(c.args.policy, PolicyKind::ALL.to_vec());
        assert!(Cli::try_parse_from(["x", "t", "--policy", "nope"]).is_err());
        assert!(Cli::try_parse_from(["x", "t", "--mem", "1K"]).is_err());
    }

    #[test]
    fn bad_outputs_and_fractions_fail_before_reading() {
        // The trace does not exist: every error below must come from check_args, not the read.
        let dir = std::env::temp_dir().join(format!("replay-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let existing = dir.join("old.svg");
        std::fs::write(&existing, "keep").unwrap();
        let d = dir.to_str().unwrap();
        let missing = dir.join("no/p.svg");
        let below_file = existing.join("p.svg");
        let cases: [(&[&str], &str); 5] = [
            (&["--plot", missing.to_str().unwrap()], "does not exist"),
            (&["--plot", below_file.to_str().unwrap()], "does not exist"),
            (&["--plot", d], "is a directory"),
            (&["--unmapped-fraction", "2"], "between 0 and 1"),
            (&["--unmapped-fraction", "NaN"], "between 0 and 1"),
        ];
        for (extra, want) in cases {
            let mut v = vec!["x", "/nonexistent/trace.txt", "-q"];
            v.extend_from_slice(extra);
            let a = Cli::try_parse_from(v).unwrap().args;
            let e = load(&a).unwrap_err();
            let mut msg = e.to_string();
            if let Some(s) = std::error::Error::source(&e) {
                msg = format!("{msg}: {s}");
            }
            assert!(msg.contains(want), "{extra:?}: {msg}");
            assert!(
                !msg.contains("trace.txt"),
                "{extra:?} read the trace first: {msg}"
            );
        }
        // A writable plot path passes and leaves no file; an existing one is kept as it is.
        let new = dir.join("new.svg");
        for p in [&new, &existing] {
            let a = Cli::try_parse_from(["x", "t", "--plot", p.to_str().unwrap()])
                .unwrap()
                .args;
            check_args(&a).unwrap();
        }
        assert!(!new.exists());
        assert_eq!(std::fs::read_to_string(&existing).unwrap(), "keep");
        assert!(Cli::try_parse_from(["x", "t", "--max-memslots", "0"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn input_without_events_is_an_error() {
        let dir = std::env::temp_dir().join(format!("replay-noevents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body, want) in [
            ("empty.txt", "", "0 lines, 0 malformed)"),
            (
                "passwd.txt",
                "root:x:0:0::/root:/bin/sh\n",
                "(1 line, 1 malformed; line 1: no ftrace header",
            ),
            (
                "comments.txt",
                "# tracer: nop\n#\n",
                "2 lines, 0 malformed)",
            ),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            let a = Cli::try_parse_from(["x", p.to_str().unwrap(), "-q"])
                .unwrap()
                .args;
            let e = load(&a).unwrap_err();
            assert!(matches!(e, ReplayError::NoEvents { .. }), "{name}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(want) && msg.contains(name), "{name}: {msg}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_sweeps_cpus_0_and_unknown_arches_are_usage_errors() {
        for bad in [
            &["--sweep", "headroom"][..],
            &["--sweep", "headroom=1,x"],
            &["--sweep", "mem=1G"],
            &["--sweep", "unmapped-fraction=2"],
            &["--cpus", "0"],
            &["--cpus", "x"],
            &["--arch", "riscv"],
            &["--flush-batch", "0"],
            &["--repeat", "3"],
            &["--kvm", "--repeat", "0"],
            &["--kvm", "--sweep", "headroom=0,5"],
        ] {
            let mut v = vec!["x", "t"];
            v.extend_from_slice(bad);
            let e = Cli::try_parse_from(v)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} parsed"));
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
        let c = Cli::try_parse_from([
            "x",
            "t",
            "--arch",
            "arm64",
            "--cpus",
            "4",
            "--sweep",
            "headroom=0,5,10,25,50",
            "--pcp",
            "--compaction",
        ])
        .unwrap()
        .args;
        assert_eq!((c.arch, c.cpus), (Arch::Arm64, Some(4)));
        assert_eq!(c.sweep.as_ref().unwrap().values.len(), 5);
        assert_eq!(*policies(&c).last().unwrap(), PolicyKind::FreetypePcp);
    }

    #[test]
    fn sizes() {
        let mem = |v: &str| Cli::try_parse_from(["x", "t", "--mem", v]).map(|c| c.args.mem);
        assert_eq!(mem("1G").unwrap(), Some(1 << 30));
        assert_eq!(mem("300MiB").unwrap(), Some(300 << 20));
        assert_eq!(mem("4194304").unwrap(), Some(4 << 20));
        // The shared parser's wording, with this command's bounds (crate::size has every case).
        for (v, want) in [
            ("2M", "--mem 2M: at least 4M"),
            ("100T", "--mem 100T: at most 64G"),
            ("3", "--mem 3: at least 4M; did you mean 3G?"),
            ("12X", "--mem 12X: not a size"),
        ] {
            let e = mem(v).unwrap_err().to_string();
            assert!(e.starts_with(&format!("error: {want}")), "{v}: {e}");
        }
    }

    #[test]
    fn outlying_pfns_are_an_error_not_a_crash() {
        let path = std::env::temp_dir().join(format!("replay-outlier-{}.txt", std::process::id()));
        std::fs::write(
            &path,
            "t-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x10 order=0 migratetype=0 gfp_flags=GFP_KERNEL\n\
             t-1 [000] ..... 1.1: mm_page_alloc: page=x pfn=0xfffffffffff0 order=0 migratetype=0 gfp_flags=GFP_KERNEL\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let a = Cli::try_parse_from(["x", p, "-q"]).unwrap().args;
        let l = load(&a).unwrap();
        assert!(matches!(
            run_model(&a, &l),
            Err(ReplayError::TooLarge {
                policy: PolicyKind::LinuxPlacement,
                ..
            })
        ));
        let a = Cli::try_parse_from(["x", p, "-q", "-p", "freetype,per-page"])
            .unwrap()
            .args;
        let r = run_model(&a, &l).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].failures.total(), 0);
        std::fs::remove_file(&path).unwrap();
    }
}
