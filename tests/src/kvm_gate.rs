//! The `/dev/kvm` gate of Veil's end-to-end tests, shared by `veil-tests` and the `veil`
//! binary's tests (`vmm/tests/cli.rs` includes this file by path): without KVM a test says so
//! loudly and is skipped, and under `CI=true` it fails instead.

use std::fs::OpenOptions;

/// Whether `/dev/kvm` can be used. Prints a loud message when it cannot; with `CI=true` in the
/// environment a missing `/dev/kvm` is a test failure (panic) instead of a skip.
pub fn kvm_available() -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("################################################################");
            eprintln!("# /dev/kvm is not usable ({e}): end-to-end test SKIPPED");
            eprintln!("################################################################");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("/dev/kvm is required in CI (CI=true): {e}");
            }
            false
        }
    }
}
