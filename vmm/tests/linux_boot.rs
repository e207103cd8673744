//! Boots a real Linux kernel (a Debian cloud kernel fetched by `.ci/fetch-linux.sh` with
//! `apt-get download`) through `veil run --kernel` with a `--secret` range, to its first console
//! line. Ignored by default (a download and about half a minute or more on a host that emulates
//! guest ring-0 code): `cargo test --release -p vmm --test linux_boot -- --ignored --nocapture`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

/// How long the kernel may take to print its first line.
const FIRST_LINE_LIMIT: Duration = Duration::from_secs(150);

#[test]
#[ignore = "downloads a Debian kernel package; slow on hosts without EPT"]
fn linux_reaches_its_first_console_line() {
    if !kvm_gate::kvm_available() {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(repo.join(".ci/fetch-linux.sh"))
        .output()
        .expect("run .ci/fetch-linux.sh");
    if out.status.code() == Some(77) {
        eprintln!(
            "##### Linux boot SKIPPED: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert!(
        out.status.success(),
        "fetch-linux failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vmlinux = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let console = std::env::temp_dir().join(format!("veil-linux-{}.console", std::process::id()));
    // Not a real initramfs: Linux reserves it early ("RAMDISK: [mem ...]") long before it
    // would unpack it.
    let initrd = console.with_extension("initrd");
    std::fs::write(&initrd, vec![0u8; 64 << 10]).unwrap();
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["run", "--kernel", &vmlinux, "--mem", "512M", "--timeout"])
        .arg(FIRST_LINE_LIMIT.as_secs().to_string())
        .args([
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr",
        ])
        .args(["--cpuid-mask", "cx16,xsave,avx,avx2,avx512f"])
        .args([
            "--secret",
            "0x8000000,16M",
            "--secret-fill",
            "0x5a",
            "--json",
        ])
        .arg("--initrd")
        .arg(&initrd)
        .arg("--console")
        .arg(&console)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start veil");
    let mut first_line = None;
    let mut e820_reserved = false;
    let mut ramdisk = false;
    while t0.elapsed() < FIRST_LINE_LIMIT + Duration::from_secs(10) {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if first_line.is_none() && text.contains("Linux version") {
            first_line = Some(t0.elapsed());
        }
        e820_reserved |= text.contains("[mem 0x0000000008000000-0x0000000008ffffff] reserved");
        ramdisk |= text.contains("RAMDISK: [mem ");
        if first_line.is_some() && e820_reserved && ramdisk {
            break;
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM: veil stops the guest and still prints its report.
    // SAFETY: kill(2) on the pid of the child this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().expect("wait veil");
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&initrd);
    eprintln!("veil said: {}", String::from_utf8_lossy(&out.stderr).trim());
    eprintln!(
        "console (first 1,500 bytes):\n{}",
        &text[..text.len().min(1500)]
    );
    let t =
        first_line.unwrap_or_else(|| panic!("no 'Linux version' line within {FIRST_LINE_LIMIT:?}"));
    eprintln!("first console line after {:.1} s", t.as_secs_f64());
    assert!(
        ramdisk,
        "Linux did not reserve the --initrd (no RAMDISK line)"
    );
    assert!(
        e820_reserved,
        "the --secret range is not reserved in Linux's e820 map"
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(j["kernel"], "vmlinux");
    assert_eq!(j["secrets_intact"], true, "{j}");
}
