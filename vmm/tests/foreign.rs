//! End-to-end tests of `veil run --kernel` with tiny hand-assembled multiboot kernels on real
//! `/dev/kvm`: the multiboot contract, the exit port, `--secret` ranges (violations, poison,
//! dropped stores, kill, both stage-2 backends), the `--dump-ept` of a foreign kernel and the
//! usage errors for bad kernels and ranges.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

use kvm_gate::kvm_available;
mod common;
use common::{scratch, veil};

const SECRET: u32 = 0x0100_0000;

/// `veil run --kernel K --mem 64M --timeout 20` followed by `extra`.
fn run_kernel(k: &str, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--kernel", k, "--mem", "64M", "--timeout", "20"];
    args.extend_from_slice(extra);
    veil(&args)
}

/// A multiboot kernel with the address fields (flag 16) loaded at 1 MiB, entered at `code`.
fn kernel(code: &[u8]) -> Vec<u8> {
    let magic = 0x1bad_b002u32;
    let flags = 1u32 << 16;
    let sum = 0u32.wrapping_sub(magic).wrapping_sub(flags);
    let mut v = Vec::new();
    for w in [magic, flags, sum, 0x100000, 0x100000, 0, 0, 0x100020] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.extend_from_slice(code);
    v
}

fn le(x: u32) -> [u8; 4] {
    x.to_le_bytes()
}

/// Exit port value `0` if EAX (multiboot magic) and the info block's flags look right, `1`
/// otherwise; then hlt.
fn check_contract() -> Vec<u8> {
    let mut c = vec![0x3d]; // cmp eax, 0x2badb002
    c.extend_from_slice(&le(0x2bad_b002));
    c.extend_from_slice(&[0x75, 0x0e]); // jne fail
    c.extend_from_slice(&[0x8b, 0x43, 0x08]); // mov eax, [ebx+8] (mem_upper)
    c.extend_from_slice(&[0x3d]); // cmp eax, 1024 (at least 1 MiB above 1 MiB)
    c.extend_from_slice(&le(1024));
    c.extend_from_slice(&[0x72, 0x04]); // jb fail
    c.extend_from_slice(&[0x31, 0xc0]); // xor eax, eax
    c.extend_from_slice(&[0xeb, 0x05]); // jmp out
    c.extend_from_slice(&[0xb8]); // fail: mov eax, 1
    c.extend_from_slice(&le(1));
    c.extend_from_slice(&[0x66, 0xba, 0xf4, 0x00, 0xef, 0xf4]); // out: mov dx,0xf4; out dx,eax; hlt
    c
}

/// Reads the secret's first dword, stores it 8 bytes further, exits 0 if it read poison.
fn touch_secret() -> Vec<u8> {
    let mut c = vec![0xa1];
    c.extend_from_slice(&le(SECRET)); // mov eax, [SECRET]
    c.push(0xa3);
    c.extend_from_slice(&le(SECRET + 8)); // mov [SECRET+8], eax
    c.push(0x3d);
    c.extend_from_slice(&le(0xa5a5_a5a5)); // cmp eax, poison
    c.extend_from_slice(&[0x75, 0x08]); // jne fail
    c.extend_from_slice(&[0x31, 0xc0, 0x66, 0xba, 0xf4, 0x00, 0xef, 0xf4]);
    c.push(0xb8);
    c.extend_from_slice(&le(1));
    c.extend_from_slice(&[0x66, 0xba, 0xf4, 0x00, 0xef, 0xf4]);
    c
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn multiboot_contract_and_exit_port() {
    if !kvm_available() {
        return;
    }
    let d = scratch("contract");
    let k = write(&d, "k.bin", &kernel(&check_contract()));
    let out = run_kernel(&k, &["--json"]);
    let j = json(&out);
    assert_eq!(out.status.code(), Some(0), "{j}");
    assert_eq!(j["exit"]["kind"], "debug_exit");
    assert_eq!(j["exit"]["value"], 0);
    assert_eq!(j["exit"]["qemu_status"], 1);
    assert_eq!(j["result"], "pass");
    assert_eq!(j["kernel"], "multiboot");
}

#[test]
fn secret_ranges_are_violations_on_both_backends() {
    if !kvm_available() {
        return;
    }
    let d = scratch("secret");
    let k = write(&d, "k.bin", &kernel(&touch_secret()));
    for backend in ["slots", "mprotect"] {
        let out = run_kernel(
            &k,
            &[
                "--json",
                "--stage2",
                backend,
                "--secret",
                "0x1000000,64K",
                "--secret-fill",
                "0x5a",
            ],
        );
        let j = json(&out);
        // The guest read poison (value 0) but touched the secret: a failing run.
        assert_eq!(j["exit"]["value"], 0, "{backend}: {j}");
        assert_eq!(out.status.code(), Some(1), "{backend}: {j}");
        assert_eq!(j["violations_total"], 2, "{backend}: {j}");
        let v = j["violations"].as_array().unwrap();
        assert_eq!(v[0]["access"], "read");
        assert_eq!(v[0]["gpa"], u64::from(SECRET));
        assert_eq!(v[0]["action"], "poisoned");
        assert_eq!(v[1]["access"], "write");
        assert_eq!(v[1]["gpa"], u64::from(SECRET + 8));
        assert_eq!(v[1]["action"], "dropped");
        assert_eq!(j["secrets_intact"], true, "the store must not land: {j}");
        assert_eq!(j["secrets"][0][0], u64::from(SECRET));
        let hole: Vec<&Value> = j["stage2_ranges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] != "mapped" && r["state"] != "reserved")
            .collect();
        assert_eq!(hole.len(), 1, "{backend}: one unmapped range: {j}");
        assert_eq!(hole[0]["start"], u64::from(SECRET));
        assert_eq!(hole[0]["end"], u64::from(SECRET) + 0x10000);
    }
    // Without --secret the load reads the RAM's zero: the kernel reports failure (value 1).
    let out = run_kernel(&k, &["--json"]);
    let j = json(&out);
    assert_eq!(j["exit"]["value"], 1, "{j}");
    assert_eq!(j["violations_total"], 0);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn dump_ept_shows_the_secret_ranges_unreachable() {
    if !kvm_available() {
        return;
    }
    let d = scratch("dump");
    let k = write(&d, "k.bin", &kernel(&check_contract()));
    for backend in ["slots", "mprotect"] {
        let dump = d.join(format!("x-{backend}.json"));
        let dump_s = dump.display().to_string();
        let out = run_kernel(
            &k,
            &[
                "--json",
                "--stage2",
                backend,
                "--secret",
                "0x1000000,64K",
                "--dump-ept",
                &dump_s,
            ],
        );
        let j = json(&out);
        assert_eq!(out.status.code(), Some(0), "{backend}: {j}");
        assert_eq!(j["dumps"][0], dump_s.as_str(), "{backend}: {j}");
        let text = std::fs::read_to_string(&dump).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["stage2_backend"], backend);
        assert_eq!(v["ram_size"], 64u64 << 20);
        // No allocator: its sections are absent, every freetype is unmanaged or reserved.
        for key in ["managed", "allocator", "free_by_freetype"] {
            assert!(v.get(key).is_none(), "{backend}: {key} in {v}");
        }
        let ranges = v["ranges"].as_array().unwrap();
        assert!(ranges
            .iter()
            .all(|r| r["freetype"] == "unmanaged" || r["freetype"] == "reserved"));
        let secret: Vec<&Value> = ranges.iter().filter(|r| r.get("owner").is_some()).collect();
        assert_eq!(secret.len(), 1, "{backend}: one labelled range: {v}");
        let r = secret[0];
        assert_eq!(r["owner"], "secret");
        assert_eq!(r["start"], u64::from(SECRET));
        assert_eq!(r["end"], u64::from(SECRET) + 0x10000);
        assert_eq!(r["pages"], 16);
        assert_eq!(r["state"], "unmapped", "{backend}: {r}");
        assert_eq!(r["restricted"], "none", "{backend}: unreachable: {r}");
        assert_eq!(r["full"], "none", "{backend}: unreachable: {r}");
        assert_eq!(v["totals"]["unmapped_pages"], 16);
        // Everything else is reachable.
        assert!(ranges
            .iter()
            .filter(|r| r.get("owner").is_none())
            .all(|r| r["restricted"] == "read_write"));
        let end = ranges.last().unwrap()["end"].as_u64().unwrap();
        assert_eq!(end, 64 << 20, "the ranges cover RAM");
    }
    // Text and SVG through the file's extension, without --json.
    for (name, needle) in [
        ("x.txt", "secret (--secret: unreachable in both views)"),
        ("x.svg", "owner secret"),
    ] {
        let dump = d.join(name);
        let dump_s = dump.display().to_string();
        let out = run_kernel(&k, &["--secret", "0x1000000,64K", "--dump-ept", &dump_s]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("veil: wrote stage-2 dump to {dump_s} (")),
            "{stderr}"
        );
        let text = std::fs::read_to_string(&dump).unwrap();
        assert!(text.contains(needle), "{name}: {text}");
        if name == "x.txt" {
            assert!(text.contains("no allocator"), "{text}");
            assert!(!text.contains("\nAllocator\n"), "{text}");
            assert!(text.contains("0x0000000001000000  0x0000000001010000  unmapped"));
        }
    }
}

#[test]
fn secret_kill_stops_at_the_first_access() {
    if !kvm_available() {
        return;
    }
    let d = scratch("kill");
    let k = write(&d, "k.bin", &kernel(&touch_secret()));
    let out = run_kernel(
        &k,
        &[
            "--json",
            "--stage2",
            "slots",
            "--secret",
            "0x1000000,64K",
            "--on-violation",
            "kill",
        ],
    );
    let j = json(&out);
    assert_eq!(out.status.code(), Some(3), "{j}");
    assert_eq!(j["exit"]["kind"], "killed");
    assert_eq!(j["exit"]["violation"]["access"], "read");
    assert_eq!(j["violations_total"], 1);
}

/// Exit port value = CPUID.1:ECX bit 13 (CX16) as the guest sees it.
fn cx16_bit() -> Vec<u8> {
    vec![
        0xb8, 1, 0, 0, 0, // mov eax, 1
        0x31, 0xc9, // xor ecx, ecx
        0x0f, 0xa2, // cpuid
        0x89, 0xc8, // mov eax, ecx
        0xc1, 0xe8, 0x0d, // shr eax, 13
        0x83, 0xe0, 0x01, // and eax, 1
        0x66, 0xba, 0xf4, 0x00, 0xef, 0xf4, // mov dx, 0xf4; out dx, eax; hlt
    ]
}

#[test]
fn cpuid_mask_hides_the_feature() {
    if !kvm_available() {
        return;
    }
    let d = scratch("cpuid");
    let k = write(&d, "k.bin", &kernel(&cx16_bit()));
    let seen = |mask: &[&str]| {
        let mut a = vec![
            "run",
            "--kernel",
            &k,
            "--mem",
            "64M",
            "--timeout",
            "20",
            "--json",
        ];
        a.extend_from_slice(mask);
        json(&veil(&a))["exit"]["value"].as_u64()
    };
    let host = seen(&[]);
    assert_eq!(seen(&["--cpuid-mask", "cx16,xsave"]), Some(0));
    if host != Some(1) {
        eprintln!("this host's KVM does not offer CX16: the unmasked half is not checked");
    }
}

#[test]
fn bad_kernels_ranges_and_options_are_usage_errors() {
    if !kvm_available() {
        return;
    }
    let d = scratch("bad");
    let good = write(&d, "k.bin", &kernel(&check_contract()));
    let junk = write(&d, "junk.bin", b"this is not a kernel at all");
    let mut bad_flags = kernel(&check_contract());
    bad_flags[4..8].copy_from_slice(&((1u32 << 16) | (1 << 5)).to_le_bytes());
    let sum = 0u32
        .wrapping_sub(0x1bad_b002)
        .wrapping_sub((1 << 16) | (1 << 5));
    bad_flags[8..12].copy_from_slice(&sum.to_le_bytes());
    let bad_flags = write(&d, "flags.bin", &bad_flags);
    let mut past_end = kernel(&check_contract());
    past_end[20..24].copy_from_slice(&0x0200_0000u32.to_le_bytes()); // load_end past the file
    let past_end = write(&d, "end.bin", &past_end);
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(64, 0);
    let fake_elf = write(&d, "vmlinux", &elf);
    let mut bz = vec![0u8; 0x400];
    bz[0x1fe] = 0x55;
    bz[0x1ff] = 0xaa;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let fake_bz = write(&d, "bzImage", &bz);
    let long = "x".repeat(5000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--kernel", &junk], "not a multiboot v1 kernel"),
        (vec!["--kernel", &bad_flags], "requires features"),
        (vec!["--kernel", &past_end], "past the end of the file"),
        (vec!["--kernel", "/nonexistent/kernel"], "cannot read"),
        (
            vec!["--kernel", &good, "--module", "/nonexistent/mod"],
            "cannot read the --module",
        ),
        (vec!["--kernel", &good, "--cmdline", &long], "command line"),
        (
            vec!["--kernel", &good, "--initrd", &good],
            "--initrd is for Linux",
        ),
        (
            vec!["--kernel", &good, "--secret", "0x1000001,4K"],
            "multiples of 4 KiB",
        ),
        (
            vec!["--kernel", &good, "--secret", "0x1000000"],
            "expected START,SIZE",
        ),
        (
            vec!["--kernel", &good, "--secret", "0x3ff0000,1M"],
            "outside guest RAM",
        ),
        (
            vec![
                "--kernel",
                &good,
                "--secret",
                "0x1000000,1M",
                "--secret",
                "0x1080000,1M",
            ],
            "overlap",
        ),
        (
            vec!["--kernel", &good, "--secret", "0x100000,4K"],
            "overlaps a --secret range",
        ),
        (
            vec!["--kernel", &good, "--cpuid-mask", "cx16,nosuch"],
            "unknown feature",
        ),
        (vec!["--kernel", &good, "--tests", "mapped_rw"], "--tests"),
        (vec!["--kernel", &fake_elf], "linux: cannot load the kernel"),
        (vec!["--kernel", &fake_bz], "linux: cannot load the kernel"),
        (
            vec!["--kernel", &fake_elf, "--module", &good],
            "--module is for multiboot",
        ),
        (
            vec!["--kernel", &good, "--guest", &good],
            "cannot be used with",
        ),
        (vec!["--cmdline", "x"], "--kernel"),
    ];
    for (args, want) in cases {
        let mut a = vec!["run", "--mem", "64M", "--timeout", "10"];
        a.extend_from_slice(&args);
        let out = veil(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// 100 mutants of a tiny multiboot kernel (header fields and code): every run ends with one of
/// Veil's exit codes, never a panic or a hang.
#[test]
fn mutated_kernels_never_panic() {
    if !kvm_available() {
        return;
    }
    let d = scratch("mutants");
    let base = kernel(&touch_secret());
    let mut seed = 0x1616_1616_u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..100 {
        let mut k = base.clone();
        for _ in 0..1 + next() % 4 {
            let at = next() % k.len();
            k[at] = next() as u8;
        }
        let p = write(&d, "m.bin", &k);
        let out = veil(&[
            "run",
            "--kernel",
            &p,
            "--mem",
            "64M",
            "--timeout",
            "3",
            "--console",
            "/dev/null",
            "--secret",
            "0x1000000,64K",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        assert!(
            matches!(code, Some(0..=3)) && !err.contains("panicked"),
            "mutant {i}: exit {code:?}: {err}"
        );
        *codes.entry(code.unwrap_or(-1)).or_insert(0) += 1;
    }
    eprintln!("exit codes of 100 mutants: {codes:?}");
}

/// A multiboot ELF64 (no address fields: loaded by its program header at 1 MiB) whose code is
/// `touch_secret` after the multiboot header, with a symbol table naming both.
fn touch_secret_elf() -> Vec<u8> {
    let magic = 0x1bad_b002u32;
    let sum = 0u32.wrapping_sub(magic);
    let mut code = Vec::new();
    for w in [magic, 0, sum] {
        code.extend_from_slice(&w.to_le_bytes());
    }
    let body = touch_secret();
    code.extend_from_slice(&body);
    let gpa = 0x10_0000u64;
    let mut elf = vmm::elf::build_elf(gpa, &code, 0);
    elf[24..32].copy_from_slice(&(gpa + 12).to_le_bytes()); // e_entry: past the header
    vmm::symbols::add_symbols(
        elf,
        gpa,
        code.len() as u64,
        &[
            ("mb_header", 0, 12),
            ("touch_secret", 12, body.len() as u64),
        ],
    )
}

#[test]
fn violation_rips_are_named_from_the_kernel_elf() {
    if !kvm_available() {
        return;
    }
    let d = scratch("symbols");
    let k = write(&d, "k.elf", &touch_secret_elf());
    let out = run_kernel(&k, &["--json", "--secret", "0x1000000,64K"]);
    let j = json(&out);
    assert_eq!(j["violations_total"], 2, "{j}");
    let v = j["violations"].as_array().unwrap();
    // Each RIP (the load is touch_secret's first instruction; a store's RIP is as KVM reports
    // it) is named as its offset into touch_secret, which starts at 0x10000c.
    assert_eq!(v[0]["rip_symbol"], "touch_secret+0x0", "{j}");
    for r in v {
        let rip = r["rip"].as_u64().unwrap();
        assert!(
            (0x10000c..0x10000c + touch_secret().len() as u64).contains(&rip),
            "{j}"
        );
        assert_eq!(
            r["rip_symbol"],
            format!("touch_secret+{:#x}", rip - 0x10000c),
            "{j}"
        );
    }
    // The text form names them too; a flat binary of the same code has no names.
    let out = run_kernel(&k, &["--secret", "0x1000000,64K"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("(rip 0x10000c (touch_secret+0x0), vCPU 0)"),
        "{err}"
    );
    let flat = write(&d, "k.bin", &kernel(&touch_secret()));
    let j = json(&run_kernel(&flat, &["--json", "--secret", "0x1000000,64K"]));
    assert_eq!(j["violations"][0]["rip_symbol"], Value::Null, "{j}");
}
