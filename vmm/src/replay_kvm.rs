//! `veil replay`: the trace replay of the `replay` crate, optionally on a real VM's memslots.
//!
//! Without `--kvm` this is [`replay::cli::run`] (pure model). With `--kvm`, every policy gets a
//! fresh VM whose RAM matches the policy's layout (2 MiB reserved + managed memory, mapped
//! lazily: nothing is touched except what zeroing discards), and its stage-2 changes go through
//! [`Stage2Engine`] over the backend `--stage2` names: under `slots` every unmap/map really
//! deletes and re-creates memslots with `KVM_SET_USER_MEMORY_REGION`; under `mprotect` it is one
//! `mprotect` of the guest view of memfd RAM behind one memslot. No guest code runs: the point is the cost of the memslot
//! updates themselves, measured per update and in total, and whether the host's memslot limit
//! (`KVM_CAP_NR_MEMSLOTS`) holds the layout.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use kvm_ioctls::Kvm;
use replay::cli::{self, ReplayArgs};
use replay::policy::{self, KvmCost, KvmRepeat, MedMinMax, PolicyResult, RunOptions};

use crate::memory::{Backing, CoreDump, GuestRam, MemSize};
use crate::stage2::{KvmSlots, Mprotect, SlotTiming, Slots, Stage2Backend, Stage2Engine};

/// Run `veil replay`; returns the process exit code.
pub fn run(args: &ReplayArgs) -> anyhow::Result<i32> {
    replay::stop::set_check(|| crate::signals::pending().map(|s| (s, crate::signals::name(s))));
    if !args.kvm {
        return Ok(cli::run(args)?);
    }
    let kvm = Kvm::new().context("opening /dev/kvm (needed by --kvm)")?;
    let host_slots = u64::try_from(kvm.get_nr_memslots()).unwrap_or(0);
    let max_slots = host_slots.min(args.max_memslots);
    let l = cli::load(args)?;
    let mut results = Vec::new();
    for kind in cli::policies(args) {
        if replay::stop::requested().is_some() {
            break;
        }
        let r = match run_repeated(&kvm, args, &l, kind, max_slots) {
            Ok(r) => r,
            // A signal can break a KVM call half-way (EINTR): the run was asked to stop, so
            // the policies finished so far are the report, not an error that loses them.
            Err(e) if replay::stop::requested().is_some() => {
                eprintln!("replay: {kind}: abandoned on interrupt ({e:#})");
                break;
            }
            Err(e) => return Err(e.context(format!("replaying {kind} on KVM"))),
        };
        cli::progress_policy(args, &r);
        results.push(r);
    }
    let report = cli::report(args, &l, results, true);
    cli::emit(args, &report, &mut io::stdout().lock())?;
    Ok(report.exit_code())
}

/// `--repeat N`: replay `kind` N times, each on a fresh VM; the median run (by stage-2 time)
/// with the median, least and largest figures of all runs.
pub fn run_repeated(
    kvm: &Kvm,
    args: &ReplayArgs,
    l: &cli::Loaded,
    kind: policy::PolicyKind,
    max_slots: u64,
) -> anyhow::Result<PolicyResult> {
    let mut runs = Vec::new();
    for _ in 0..args.repeat.max(1) {
        if replay::stop::requested().is_some() && !runs.is_empty() {
            break;
        }
        runs.push(run_policy_on_kvm(kvm, args, l, kind, max_slots)?);
    }
    let cost = |r: &PolicyResult| r.kvm.unwrap_or_default();
    let col = |f: &dyn Fn(&KvmCost) -> u64| -> MedMinMax {
        MedMinMax::of(&mut runs.iter().map(|r| f(&cost(r))).collect::<Vec<_>>())
    };
    let repeat = KvmRepeat {
        runs: runs.len() as u32,
        s2_total_ns: col(&|k| k.update_ns + k.zero_ns),
        median_update_ns: col(&|k| k.median_update_ns),
        median_ioctl_ns: col(&|k| k.median_memslot_ioctl_ns),
        max_call_ns: col(&|k| k.max_call_ns),
    };
    runs.sort_by_key(|r| {
        let k = cost(r);
        k.update_ns + k.zero_ns
    });
    let mut r = runs.swap_remove(runs.len() / 2);
    if let Some(k) = &mut r.kvm {
        k.repeat = repeat;
    }
    Ok(r)
}

/// Replay one policy with a fresh VM as its stage 2.
pub fn run_policy_on_kvm(
    kvm: &Kvm,
    args: &ReplayArgs,
    l: &cli::Loaded,
    kind: policy::PolicyKind,
    max_slots: u64,
) -> anyhow::Result<PolicyResult> {
    let layout = cli::layout(args, kind, &l.trace)?;
    let mprotect = args.stage2 == "mprotect";
    let backing = if mprotect {
        Backing::Memfd
    } else {
        Backing::Anonymous
    };
    let ram = Arc::new(GuestRam::create(
        MemSize::new(layout.ram_bytes())?,
        CoreDump::Exclude,
        backing,
    )?);
    let ram_size = ram.size();
    let reserved = layout.base_pfn * 4096;
    let vm = Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);
    let opts = RunOptions {
        max_slots,
        timed: true,
        ..cli::run_options(args, &l.trace)
    };
    let t0 = Instant::now();
    // (result, counters, memslot ioctl timing, sorted ioctl durations, backend name)
    let (mut r, c, ioctl, durations, backend) = if mprotect {
        let mut b = Mprotect::new(vm, ram).context("the mprotect backend")?;
        b.lock_unmapped(false);
        let engine = Stage2Engine::new(b, ram_size, crate::addr::Gpa(reserved))
            .context("creating the stage-2 engine")?;
        // The whole-RAM slot made at setup is not the policy's work.
        let setup_slots = engine.counters().memslot_updates;
        let (r, engine) = policy::run(kind, &l.trace, layout, engine, &opts);
        let name = engine.backend().name();
        let mut c = engine.counters();
        c.memslot_updates -= setup_slots;
        (r, c, SlotTiming::default(), Vec::new(), name)
    } else {
        let mut slots = KvmSlots::new(vm, ram, u32::try_from(max_slots).unwrap_or(u32::MAX));
        slots.keep_durations(true);
        slots.lock_unmapped(false);
        let engine = Stage2Engine::new(
            Slots::new(slots, ram_size),
            ram_size,
            crate::addr::Gpa(reserved),
        )
        .context("creating the stage-2 engine")?;
        // The whole-RAM slot created at setup is not the policy's work: its ioctl is left out
        // of the counts and timings (a rule selecting nothing makes no ioctl).
        let setup_slots = engine.counters().memslot_updates;
        let setup_timed = engine.backend().table().durations_ns().len();
        let (r, engine) = policy::run(kind, &l.trace, layout, engine, &opts);
        let mut d = engine.backend().table().durations_ns()[setup_timed..].to_vec();
        let ioctl = SlotTiming {
            calls: d.len() as u64,
            total_ns: d.iter().map(|&x| u64::from(x)).sum(),
            max_ns: d.iter().copied().max().map_or(0, u64::from),
        };
        d.sort_unstable();
        let name = engine.backend().name();
        let mut c = engine.counters();
        c.memslot_updates -= setup_slots;
        (r, c, ioctl, d, name)
    };
    // The engines (and with them the VMs and RAM) are gone here.
    let replay_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    if let Some(c) = &mut r.compaction {
        // The failures without compaction, from the same replay on the model.
        cli::attach_without_compaction(c, kind, l, layout, &opts);
    }
    let t = r.timing.unwrap_or_default();
    let updates = r.stage2.updates();
    let update_ns = t.unmap_ns + t.map_ns;
    r.kvm = Some(KvmCost {
        backend,
        mprotect_calls: c.mprotect_calls,
        peak_vmas: c.peak_vmas,
        max_memslots: max_slots,
        memslot_updates: c.memslot_updates,
        peak_memslots: c.peak_memslots,
        update_ns,
        zero_ns: t.zero_ns,
        ns_per_update: if updates == 0 {
            0.0
        } else {
            update_ns as f64 / updates as f64
        },
        ns_per_memslot_ioctl: if ioctl.calls == 0 {
            0.0
        } else {
            ioctl.total_ns as f64 / ioctl.calls as f64
        },
        median_update_ns: t.median_update_ns,
        median_memslot_ioctl_ns: durations
            .get(durations.len() / 2)
            .map_or(0, |&d| u64::from(d)),
        max_call_ns: t.max_call_ns,
        replay_ns,
        repeat: KvmRepeat {
            runs: 1,
            ..KvmRepeat::default()
        },
    });
    if backend == "slots" && c.peak_memslots != r.peak_memslots && c.rejected_updates == 0 {
        log::warn!(
            "{kind}: engine peak memslots {} differ from the model's {}",
            c.peak_memslots,
            r.peak_memslots
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use replay::policy::PolicyKind;
    use replay::tracker::PureModel;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    fn args(extra: &[&str]) -> ReplayArgs {
        let trace = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/kmem-trace-cargo-small.txt.gz"
        );
        let mut v = vec!["replay", trace, "--quiet", "--kvm"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().args
    }

    /// The shared trace on real memslots gives exactly the model's stage-2 work and layout,
    /// and the measured costs are real (non-zero ioctls, per-page needing far more of them).
    #[test]
    fn shared_trace_on_kvm_matches_the_model() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let max = u64::try_from(kvm.get_nr_memslots()).unwrap();
        let a = args(&[]);
        let l = cli::load(&a).unwrap();
        let mut ioctls = Vec::new();
        for kind in PolicyKind::ALL {
            let r = run_policy_on_kvm(&kvm, &a, &l, kind, max).unwrap();
            let lay = cli::layout(&a, kind, &l.trace).unwrap();
            let (m, _) = policy::run(kind, &l.trace, lay, PureModel, &RunOptions::default());
            assert_eq!(r.failures.total(), 0, "{kind}: {:?}", r.failures);
            assert_eq!(r.stage2, m.stage2, "{kind}");
            assert_eq!(
                (r.peak_memslots, r.intact_blocks_worst),
                (m.peak_memslots, m.intact_blocks_worst)
            );
            let k = r.kvm.unwrap();
            // The engine's own count of live memslots agrees with the tracker's model.
            assert_eq!(k.peak_memslots, r.peak_memslots, "{kind}");
            assert!(
                k.memslot_updates >= r.stage2.updates(),
                "{kind}: every update touches a slot"
            );
            assert!(k.ns_per_memslot_ioctl > 0.0);
            ioctls.push(k.memslot_updates);
        }
        assert!(
            ioctls[1] > 100 * ioctls[0],
            "per-page {} vs freetype {}",
            ioctls[1],
            ioctls[0]
        );
    }

    /// The same trace through the mprotect backend: the same stage-2 work as the model, one
    /// memslot throughout, one mprotect per update.
    #[test]
    fn shared_trace_through_mprotect_matches_the_model() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let max = u64::try_from(kvm.get_nr_memslots()).unwrap();
        let a = args(&["--stage2", "mprotect"]);
        let l = cli::load(&a).unwrap();
        for kind in PolicyKind::ALL {
            let r = run_policy_on_kvm(&kvm, &a, &l, kind, max).unwrap();
            let lay = cli::layout(&a, kind, &l.trace).unwrap();
            let (m, _) = policy::run(kind, &l.trace, lay, PureModel, &RunOptions::default());
            assert_eq!(r.failures.total(), 0, "{kind}: {:?}", r.failures);
            assert_eq!(r.stage2, m.stage2, "{kind}");
            let k = r.kvm.unwrap();
            assert_eq!(k.backend, "mprotect");
            assert_eq!(k.peak_memslots, 1, "{kind}");
            assert_eq!(
                k.memslot_updates, 0,
                "{kind}: the initial slot is setup, not counted"
            );
            assert!(k.mprotect_calls >= r.stage2.updates(), "{kind}");
            assert!(k.peak_vmas >= 1, "{kind}");
        }
    }

    /// A rule that selects nothing makes no stage-2 update and no timed ioctl: the whole-RAM
    /// slot made at setup is not counted (it was: 0 updates, 1 ioctl).
    #[test]
    fn setup_slot_is_not_in_the_ioctl_statistics() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let max = u64::try_from(kvm.get_nr_memslots()).unwrap();
        let a = args(&["--unmapped-migratetype", "200"]);
        let l = cli::load(&a).unwrap();
        assert_eq!(l.classification.unmapped_allocs, 0);
        for kind in [PolicyKind::Freetype, PolicyKind::PerPage] {
            let r = run_policy_on_kvm(&kvm, &a, &l, kind, max).unwrap();
            let k = r.kvm.unwrap();
            assert_eq!(r.stage2.updates(), 0, "{kind}");
            assert_eq!(k.memslot_updates, 0, "{kind}");
            assert_eq!(
                (k.median_memslot_ioctl_ns, k.ns_per_memslot_ioctl),
                (0, 0.0),
                "{kind}"
            );
        }
    }

    /// `--repeat 3`: three runs behind every figure, the median run reported, its figures
    /// inside the range.
    #[test]
    fn repeat_reports_median_min_max_over_the_runs() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let max = u64::try_from(kvm.get_nr_memslots()).unwrap();
        let a = args(&["--repeat", "3", "-p", "per-page"]);
        let l = cli::load(&a).unwrap();
        let r = run_repeated(&kvm, &a, &l, PolicyKind::PerPage, max).unwrap();
        let k = r.kvm.unwrap();
        let rep = k.repeat;
        assert_eq!(rep.runs, 3);
        let t = rep.s2_total_ns;
        assert!(t.min <= t.median && t.median <= t.max && t.min > 0, "{t:?}");
        assert_eq!(
            k.update_ns + k.zero_ns,
            t.median,
            "the median run is the one reported"
        );
        let m = rep.median_update_ns;
        assert!(m.min <= k.median_update_ns && k.median_update_ns <= m.max);
        // Timed runs carry measured latencies per path for pageblock policies only.
        assert!(r.latency.is_none());
        let f = run_repeated(
            &kvm,
            &args(&["--repeat", "2"]),
            &l,
            PolicyKind::Freetype,
            max,
        )
        .unwrap();
        let lat = f.latency.unwrap();
        assert!(lat.fast.ns.unwrap().samples > 0);
        assert_eq!(lat.flip.ns.unwrap().samples, lat.flip.units.samples);
    }

    /// Running out of real memslots is a result: refused updates, failed allocations, a flag.
    #[test]
    fn memslot_limit_on_kvm_is_reported_not_fatal() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let a = args(&["--unmapped", "GFP_HIGHUSER_MOVABLE", "--max-memslots", "64"]);
        let l = cli::load(&a).unwrap();
        let r = run_policy_on_kvm(&kvm, &a, &l, PolicyKind::PerPage, 64).unwrap();
        assert!(r.exceeds_memslot_limit);
        assert!(r.stage2.out_of_slots > 0);
        assert!(r.failures.stage2 > 0, "{:?}", r.failures);
        let k = r.kvm.unwrap();
        assert!(k.peak_memslots <= 64, "{}", k.peak_memslots);
        // The freetype allocator needs a handful of slots for the same trace and fits.
        let f = run_policy_on_kvm(&kvm, &a, &l, PolicyKind::Freetype, 64).unwrap();
        assert!(!f.exceeds_memslot_limit);
        assert_eq!(f.failures.total(), 0);
    }
}
