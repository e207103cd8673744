//! The table and summary `veil run` prints for people.

use std::fmt::Write as _;

use super::RunReport;

impl RunReport {
    /// The table `veil run` prints.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if self.tests.is_empty() {
            let _ = writeln!(
                s,
                "no tests ran; {} violations, {} not-RAM accesses",
                self.violations_total, self.not_ram_total
            );
            return s;
        }
        let w = self
            .tests
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            s,
            "{:<w$}  {:<7}  {:>10}  {:>10}  message",
            "test", "result", "violations", "time"
        );
        for t in &self.tests {
            let _ = writeln!(
                s,
                "{:<w$}  {:<7}  {:>10}  {:>8.1}ms  {}",
                t.name,
                t.result.name(),
                t.violations,
                t.time_ms,
                t.message
            );
        }
        let c = self.counts();
        let _ = writeln!(
            s,
            "{} passed, {} failed, {} skipped, {} not run; {} violations ({} outside tests), {} not-RAM accesses",
            c.passed, c.failed, c.skipped, c.not_run,
            self.violations_total, self.violations_outside_tests, self.not_ram_total
        );
        s.push_str(&self.reachability.table());
        s
    }

    /// The summary lines (timing, counters, exit).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let t = &self.timing;
        let ms =
            |v: Option<f64>, none: &str| v.map_or(none.to_string(), |ms| format!("{ms:.1} ms"));
        let _ = write!(
            s,
            "timing: first hypercall at {} after main() began, suite {}",
            ms(t.first_hypercall_ms, "- (none)"),
            ms(t.suite_ms, "-")
        );
        let _ = writeln!(
            s,
            ", guest run {:.1} ms, total {:.1} ms, {} exits ({} hypercalls, {} bare, {} mmio, {} memory faults, {} pio)",
            t.run_ms,
            t.total_ms,
            t.exits.total,
            t.exits.hypercalls,
            t.exits.bare,
            t.exits.mmio,
            t.exits.memory_faults,
            t.exits.pio
        );
        if let Some(rt) = &t.round_trip {
            let ns = match (rt.bare_ns, rt.hypercall_ns) {
                (Some(b), Some(h)) => format!(" ({h:.0} ns vs {b:.0} ns)"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "round trip: hypercall {:.0} cycles vs bare exit {:.0} cycles{ns} over {} iterations: ratio {:.3} (goal <= 1.2)",
                rt.hypercall_cycles_per_call, rt.bare_cycles_per_exit, rt.iterations, rt.ratio
            );
        }
        if let Some(r) = &t.revocation {
            let us = |v: Option<f64>, c: u64| match v {
                Some(us) => format!("{us:.1} µs"),
                None => format!("{c} cycles"),
            };
            let _ = writeln!(
                s,
                "revocation ({} backend): the revoke took {}, the reading vCPU's first violation came {} after the call; {} reads before, {} stale after the revoke returned (must be 0)",
                self.stage2_backend,
                us(r.revoke_us, r.revoke_cycles),
                us(r.first_violation_us, r.first_violation_cycles),
                r.reads,
                r.stale_reads
            );
        }
        if self.vcpus.count > 1 {
            let v = &self.vcpus;
            let _ = writeln!(
                s,
                "vCPUs: {}; stage-2 updates parked the others {} times with {} kicks ({:.2} kicks per park; the mprotect backend never parks)",
                v.count,
                v.parks.parks,
                v.parks.kicks,
                v.parks.kicks as f64 / v.parks.parks.max(1) as f64
            );
        }
        if self.vcpus.ve_injected > 0 {
            let _ = writeln!(
                s,
                "inject: {} #VE (vector 20) injected after load/store violations",
                self.vcpus.ve_injected
            );
        }
        let c = &self.stage2;
        let a = &self.allocator;
        let _ = writeln!(
            s,
            "stage 2 ({} backend): {} unmaps, {} maps, {} memslot updates, {} memslots in use (peak {}), {} mprotect calls, {} protection ranges (peak {}); allocator: {} flips to unmapped, {} to mapped, {}/{} pages free",
            self.stage2_backend,
            c.unmap_calls,
            c.map_calls,
            c.memslot_updates,
            c.memslots_in_use,
            c.peak_memslots,
            c.mprotect_calls,
            c.vmas_in_use,
            c.peak_vmas,
            a.flips_to_unmapped,
            a.flips_to_mapped,
            a.free_pages,
            a.managed_pages
        );
        let l = &self.memory_lock;
        let _ = writeln!(
            s,
            "host memory: unmapped pages {} (peak {} KiB locked{}), {} KiB resident at the end wiped; guest RAM {} core dumps",
            if l.held() { "locked against swap" } else { "NOT all locked against swap" },
            l.peak_locked_bytes >> 10,
            if l.held() {
                String::new()
            } else {
                format!(", {} KiB over the memlock limit", l.failed_bytes >> 10)
            },
            self.wiped_bytes >> 10,
            if self.guest_core_dump { "in" } else { "kept out of" }
        );
        s.push_str(&self.stage2_checks.lines());
        s.push_str(&self.asi.lines());
        let _ = writeln!(s, "exit: {}", self.exit.summary());
        if let Some(r) = self.exit.regs() {
            let _ = writeln!(s, "{r}");
        }
        s
    }
}
