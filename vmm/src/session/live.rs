//! What the control socket asks of a running session (`vmm/src/control/`), and the dump
//! SIGUSR1 asks for. Each answer is built under the session lock by the same calls the exit
//! report and the exit dump use: the dump renderers, the engine's and the allocator's
//! counters, the violation records, [`TestCounts::of`].

use serde_json::{json, Value};

use super::{vmm_line, Session, MAX_GUEST_DUMPS};
use crate::dump::DumpFormat;
use crate::report::TestCounts;

/// Most violation records one `violations` reply carries (the oldest ones; `total` and `kept`
/// say how many there are).
pub const MAX_REPLY_RECORDS: usize = 10_000;

impl Session {
    /// The `stats` reply: the report's counters as they stand now.
    pub fn live_stats(&self) -> Value {
        let since_run = self.run_start.map(|t| t.elapsed().as_secs_f64() * 1e3);
        json!({
            "running_test": self.current_name(),
            "tests_announced": self.announced.len(),
            "tests": TestCounts::of(self.results.values()),
            "violations_total": self.violations_total,
            "violations_outside_tests": self.violations_outside,
            "violations_kept": self.violations.len(),
            "not_ram_total": self.not_ram_total,
            "stage2_backend": self.engine(|e| e.backend().name()),
            "stage2": self.engine(|e| e.counters()),
            "allocator": self.alloc.snapshot(),
            "dumps": self.dumps,
            "run_ms": since_run,
        })
    }

    /// The `violations` reply: the records kept so far (the first [`MAX_REPLY_RECORDS`]).
    pub fn live_violations(&self) -> Value {
        let shown = self.violations.len().min(MAX_REPLY_RECORDS);
        json!({
            "total": self.violations_total,
            "kept": self.violations.len(),
            "outside_tests": self.violations_outside,
            "truncated": shown < self.violations.len(),
            "records": &self.violations[..shown],
        })
    }

    /// The `dump` reply: the stage-2 dump now, rendered as the exit dump is (`json`: the
    /// document itself; text and SVG: a string).
    pub fn live_dump(&self, format: DumpFormat) -> Value {
        const REASON: &str = "control socket request";
        let dump = match format {
            DumpFormat::Json => self.with_dump_input(REASON, crate::dump::to_json_value),
            _ => Value::String(self.with_dump_input(REASON, |i| crate::dump::render(i, format))),
        };
        json!({
            "format": crate::control::protocol::format_name(format),
            "dump": dump,
        })
    }

    /// SIGUSR1: writes the next numbered dump beside `--dump-ept` (the numbering guest
    /// requests use) and says so on stderr, or says why nothing was written.
    pub fn signal_dump(&mut self) {
        let Some(cfg) = self.dump.clone() else {
            vmm_line(
                "SIGUSR1: no stage-2 dump written: this run has no --dump-ept \
                 (run with --dump-ept FILE and SIGUSR1 writes FILE's numbered dumps beside it)",
            );
            return;
        };
        if !cfg.numbered_allowed() {
            vmm_line(
                "SIGUSR1: no stage-2 dump written: numbered dumps go only beside a regular \
                 file, and the exit dump's is not one",
            );
            return;
        }
        if self.guest_dumps >= MAX_GUEST_DUMPS {
            vmm_line(&format!(
                "SIGUSR1: no stage-2 dump written: this run already wrote {MAX_GUEST_DUMPS} \
                 numbered dumps, the most it may"
            ));
            return;
        }
        self.guest_dumps += 1;
        let n = self.guest_dumps;
        // One line for the request, in --quiet too: the writer's own announcement is off.
        let path = cfg.numbered_path(n);
        if let Some(bytes) = self.write_dump(&format!("SIGUSR1 #{n}"), path.clone(), false) {
            vmm_line(&signal_dump_line(n, path.as_deref(), cfg.format, bytes));
        }
    }
}

/// The one line a SIGUSR1 dump gets: `SIGUSR1: wrote stage-2 dump 1 to d.1.svg (svg, 312 KB)`.
fn signal_dump_line(
    n: u32,
    path: Option<&std::path::Path>,
    format: DumpFormat,
    bytes: u64,
) -> String {
    let what = format!("stage-2 dump {n}");
    let to = path.unwrap_or(std::path::Path::new("stdout"));
    format!(
        "SIGUSR1: {}",
        replay::output::written_line(&what, to, format.name(), bytes)
    )
}
