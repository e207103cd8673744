//! Builds the default guest kernel (`../guest`, its own cargo workspace) for
//! `x86_64-unknown-none` and leaves the ELF at `$OUT_DIR/veil-guest.elf` for `include_bytes!`.
//!
//! The nested cargo runs with its own target directory inside `OUT_DIR`, so it never waits on
//! the outer build's lock, and with the outer build's configuration removed from its
//! environment (rustflags, target, wrappers), so `cargo clippy`, coverage or cross settings of
//! the host build never leak into the guest. The guest is always built in release mode: its
//! ring-0 code is emulated instruction by instruction on nested hosts.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest's target triple.
const GUEST_TARGET: &str = "x86_64-unknown-none";
/// Name of the guest binary in its cargo package.
const GUEST_BIN: &str = "veil-guest";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf();
    let guest = root.join("guest");
    let abi = root.join("abi");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    for path in [
        guest.join("src"),
        guest.join("Cargo.toml"),
        guest.join("Cargo.lock"),
        guest.join("build.rs"),
        guest.join("linker.ld"),
        guest.join(".cargo/config.toml"),
        abi.join("src"),
        abi.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    if !target_installed(&rustc, &root) {
        add_target(&root);
        if !target_installed(&rustc, &root) {
            fail_target_missing();
        }
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let target_dir = out_dir.join("guest-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest) // so that guest/.cargo/config.toml applies
        .arg("build")
        .arg("--release")
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    scrub_env(&mut cmd);
    let output = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {cargo:?} to build the guest: {e}")));
    if !output.status.success() {
        // Cargo shows a failing build script's stderr: pass the nested build's output on.
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        fail(&format!(
            "building the guest kernel ({}) for {GUEST_TARGET} failed ({}); see the output above",
            guest.display(),
            output.status
        ));
    }

    let elf = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN);
    let dest = out_dir.join("veil-guest.elf");
    if let Err(e) = fs::copy(&elf, &dest) {
        fail(&format!(
            "cannot copy the guest ELF {} to {}: {e}",
            elf.display(),
            dest.display()
        ));
    }
}

/// Stops the build script with `msg` on stderr (which cargo shows) and no backtrace.
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// Removes the variables through which the outer build's configuration would reach the nested
/// cargo (and, through it, rustc).
fn scrub_env(cmd: &mut Command) {
    const EXACT: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTC_LINKER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_INCREMENTAL",
        "CARGO_LLVM_COV",
        "LLVM_PROFILE_FILE",
    ];
    const PREFIXES: &[&str] = &[
        "CARGO_BUILD_",
        "CARGO_TARGET_",
        "CARGO_PROFILE_",
        "CARGO_CFG_",
        "CARGO_FEATURE_",
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "DEP_",
    ];
    for (key, _) in env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if EXACT.contains(&k) || PREFIXES.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    for k in [
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
    ] {
        cmd.env_remove(k);
    }
}

/// Whether the guest's target is installed for the toolchain building this crate.
fn target_installed(rustc: &OsString, root: &Path) -> bool {
    let out = Command::new(rustc)
        .current_dir(root)
        .args(["--print", "target-libdir", "--target", GUEST_TARGET])
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            fs::read_dir(&dir)
                .map(|rd| {
                    rd.filter_map(Result::ok).any(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        name.starts_with("libcore-") && name.ends_with(".rlib")
                    })
                })
                .unwrap_or(false)
        }
        _ => false,
    }
}

/// Installs the target the way `.ci/run` does (rustup, else the offline archive), since
/// `rust-toolchain.toml` lists it but rustup does not add it where auto-install is off.
fn add_target(root: &Path) {
    let script = root.join(".ci/add-guest-target");
    if !script.is_file() {
        return;
    }
    println!("cargo:warning=the {GUEST_TARGET} target was missing; installing it with .ci/add-guest-target");
    let status = Command::new("bash").arg(&script).current_dir(root).status();
    if let Err(e) = status {
        eprintln!("cannot run {}: {e}", script.display());
    }
}

/// Fails the build with instructions when the guest's target is not installed.
fn fail_target_missing() -> ! {
    fail(&format!(
        "The Rust target `{GUEST_TARGET}` is not installed; the default guest kernel is \
         built for it.\nInstall it with:\n\n    rustup target add {GUEST_TARGET}\n\n\
         or, without network, from the offline archive (from the repository root; see \
         ../shared/toolchain/README.md):\n\n    \
         tar -xJf ../shared/toolchain/rust-std-1.95.0-{GUEST_TARGET}.tar.xz \\\n        \
         -C \"$(rustc +1.95.0 --print sysroot)/lib/rustlib/\"\n"
    ))
}
