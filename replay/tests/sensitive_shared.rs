//! `--sensitive` on the shared real trace: the classification's counts, the CLI spelling,
//! and the ranges a view switch would toggle per placement (grouping stays flat, per-page
//! placement grows with the live sensitive pages).

use std::path::PathBuf;

use clap::Parser;
use replay::cli::{self, ReplayArgs};
use replay::policy::PolicyKind;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ReplayArgs,
}

fn args(extra: &[&str]) -> ReplayArgs {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/kmem-trace-cargo-small.txt.gz");
    assert!(p.exists(), "the shared trace {} is missing", p.display());
    let mut v = vec!["replay".to_string(), p.to_str().unwrap().to_string()];
    v.push("--quiet".into());
    v.extend(extra.iter().map(|s| s.to_string()));
    Cli::try_parse_from(v).unwrap().args
}

#[test]
fn sensitive_is_opt_in_and_defaults_to_gfp_user() {
    assert_eq!(args(&[]).sensitive, None);
    assert_eq!(
        args(&["--sensitive"]).sensitive,
        Some(vec!["GFP_USER".to_string()])
    );
    assert_eq!(
        args(&["--sensitive", "GFP_HIGHUSER_MOVABLE,__GFP_ZERO"]).sensitive,
        Some(vec![
            "GFP_HIGHUSER_MOVABLE".to_string(),
            "__GFP_ZERO".to_string()
        ])
    );
    let e = cli::load(&args(&["--sensitive", "GFP_USR"])).unwrap_err();
    assert!(e.to_string().contains("GFP_USR"), "{e}");
}

#[test]
fn view_switch_ranges_on_the_shared_trace() {
    let a = args(&["--sensitive"]);
    let l = cli::load(&a).unwrap();
    let r = cli::report(&a, &l, Vec::new(), false);
    let s = r.sensitive.as_ref().unwrap();
    let c = &s.classification;
    // GFP_USER's bits are in every user-page allocation (GFP_HIGHUSER_MOVABLE): 77,293, the
    // README's user-page count; 26 also carry GFP_KERNEL_ACCOUNT's bits and stay unmapped.
    assert_eq!(c.sensitive_allocs, 77_293);
    assert_eq!(c.also_unmapped, 26);
    assert_eq!(c.peak_live_sensitive_pages, 58_078);
    let kinds: Vec<_> = s.policies.iter().map(|p| p.policy).collect();
    assert_eq!(
        kinds,
        [
            PolicyKind::Freetype,
            PolicyKind::PerPage,
            PolicyKind::LinuxPlacement
        ],
        "unmapped-cache has no sensitive counterpart"
    );
    let by = |k| s.policies.iter().find(|p| p.policy == k).unwrap();
    let (f, p, lp) = (
        by(PolicyKind::Freetype),
        by(PolicyKind::PerPage),
        by(PolicyKind::LinuxPlacement),
    );
    for r in [f, p, lp] {
        assert_eq!(r.failures.total(), 0, "{:?}", r.policy);
        assert_eq!(r.sensitive_allocs, 77_293);
        assert!(r.ranges_end <= r.ranges_worst);
        assert!(r.ranges_mean <= r.ranges_worst as f64);
        assert!(r.ranges_over_time.len() > 100);
    }
    // Grouping: a handful of runs of sensitive pageblocks; per-page: thousands.
    assert!(f.ranges_worst <= 16, "{}", f.ranges_worst);
    assert!(f.flips_to_sensitive >= 100);
    assert_eq!(f.calls.make_sensitive, f.flips_to_sensitive);
    assert!(p.ranges_worst >= 100 * f.ranges_worst, "{}", p.ranges_worst);
    assert!(
        lp.ranges_worst >= 100 * f.ranges_worst,
        "{}",
        lp.ranges_worst
    );
    assert_eq!(
        p.calls.make_sensitive, 77_293,
        "one call per sensitive allocation"
    );
    // The price of grouping: whole pageblocks stay sensitive.
    assert!(f.sensitive_pages_end >= p.sensitive_pages_end);
    // And the report carries it: the text table and the JSON key.
    let text = replay::report::render_text(&r);
    assert!(text.contains("ASI view switches"), "{text}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(
        json["sensitive"]["policies"][0]["ranges_worst"],
        f.ranges_worst
    );
    let plain = cli::report(
        &args(&[]),
        &cli::load(&args(&[])).unwrap(),
        Vec::new(),
        false,
    );
    assert!(serde_json::to_value(&plain)
        .unwrap()
        .get("sensitive")
        .is_none());
}
