//! What the boot-a-guest benchmark harnesses (`vcpus`, `mermap`) share: the start-up checks and
//! the median/min/max summary.

/// Rounds to run (`VEIL_ROUNDS`, else `default_rounds`), or `None` when the harness must not
/// run: `cargo test --benches` listing tests, or no usable `/dev/kvm` (loud; a failure under
/// `CI=true`).
pub fn start(name: &str, default_rounds: usize) -> Option<usize> {
    if std::env::args().any(|a| a == "--list") {
        return None; // `cargo test --benches` asks for a list: there are no Criterion tests here.
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("{name}: /dev/kvm is not usable ({e}): benchmark SKIPPED");
        if std::env::var("CI").as_deref() == Ok("true") {
            std::process::exit(1);
        }
        return None;
    }
    Some(
        std::env::var("VEIL_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(default_rounds),
    )
}

/// (median, min, max) of `v`, which must not be empty.
pub fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}
