//! End-to-end ELF mutation: mutants of the default guest ELF (bit flips and boundary values in
//! the ELF and program headers, random bytes anywhere, truncations) booted through the `veil`
//! binary, two at a time. Each must end, within a test-side watchdog, either with a clear
//! error (exit code 2 and a `veil:` message) or with a run the VMM reported (exit code 0, 1
//! or 3); never with a panic.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

/// Mutants per run.
const MUTANTS: u64 = 1_000;
/// The seed (printed, so a failure reproduces).
const SEED: u64 = 0x00e1_f0de_ad5e_ed01;
/// How long one mutant may take before the test calls it a hang (the VMM's own --timeout
/// is 2 s).
const WATCHDOG: Duration = Duration::from_secs(30);

#[path = "../../tests/src/rng.rs"]
mod rng;
use rng::Rng;

/// Offsets of the interesting 8-byte fields of an ELF64 header and its program headers.
fn fields(elf: &[u8]) -> Vec<usize> {
    let mut f = vec![24, 32, 40]; // e_entry, e_phoff, e_shoff
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[56..58].try_into().unwrap()) as usize;
    for i in 0..phnum {
        let p = phoff + i * 56;
        f.extend([p + 8, p + 16, p + 24, p + 32, p + 40, p + 48]);
    }
    f.retain(|&o| o + 8 <= elf.len());
    f
}

/// Mutant number `n` of `base`, and what was done to it.
fn mutate(base: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut m = base.to_vec();
    let headers = 64 + 56 * u16::from_le_bytes(base[56..58].try_into().unwrap()) as u64;
    let what = match rng.below(6) {
        0 => {
            let i = rng.below(headers) as usize;
            let bit = rng.below(8);
            m[i] ^= 1 << bit;
            format!("flip bit {bit} of header byte {i:#x}")
        }
        1 => {
            let f = fields(base);
            let off = f[rng.below(f.len() as u64) as usize];
            let v = [
                0,
                1,
                u64::MAX,
                1 << 63,
                0x20_0000,
                0x1f_ffff,
                0x1000,
                rng.next_u64(),
                u64::from_le_bytes(m[off..off + 8].try_into().unwrap()).wrapping_add(1 << 30),
            ][rng.below(9) as usize];
            m[off..off + 8].copy_from_slice(&v.to_le_bytes());
            format!("set the field at {off:#x} to {v:#x}")
        }
        2 => {
            let i = 16 + rng.below(48) as usize;
            let v = rng.next_u64() as u8;
            m[i] = v;
            format!("set ELF header byte {i:#x} to {v:#x}")
        }
        3 => {
            let len = rng.below(m.len() as u64) as usize;
            m.truncate(len);
            format!("truncate to {len} bytes")
        }
        _ => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = rng.below(m.len() as u64) as usize;
                m[i] = rng.next_u64() as u8;
            }
            format!("{n} random byte(s) anywhere")
        }
    };
    (m, what)
}

/// What one mutant's run ended as.
enum End {
    Code(i32, String),
    Hang,
}

fn run_one(veil: &str, path: &Path) -> End {
    let mut child = Command::new(veil)
        .args(["run", "--tests", "mapped_rw", "--timeout", "2", "--guest"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn veil");
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return End::Code(st.code().unwrap_or(-1), err);
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            return End::Hang;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_thousand_mutants_of_the_default_guest_end_cleanly() {
    if !kvm_gate::kvm_available() {
        return;
    }
    eprintln!("ELF mutation: {MUTANTS} mutants, seed {SEED:#x}");
    let base = vmm::guest_image::DEFAULT_GUEST;
    let mut rng = Rng(SEED);
    let mutants: Vec<(Vec<u8>, String)> = (0..MUTANTS).map(|_| mutate(base, &mut rng)).collect();
    let dir = std::env::temp_dir().join(format!("veil-mutants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let veil = env!("CARGO_BIN_EXE_veil");
    let start = Instant::now();
    // Two at a time: one worker per half.
    let results: Vec<(usize, End)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (dir, mutants) = (&dir, &mutants);
                s.spawn(move || {
                    let mut out = Vec::new();
                    for i in (w..mutants.len()).step_by(2) {
                        let p = dir.join(format!("m{i}.elf"));
                        std::fs::write(&p, &mutants[i].0).unwrap();
                        out.push((i, run_one(veil, &p)));
                        let _ = std::fs::remove_file(&p);
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let _ = std::fs::remove_dir_all(&dir);
    let mut by_code = std::collections::BTreeMap::new();
    let mut bad = Vec::new();
    for (i, end) in &results {
        let what = &mutants[*i].1;
        match end {
            End::Hang => bad.push(format!("mutant {i} ({what}): no exit within {WATCHDOG:?}")),
            End::Code(code, err) => {
                *by_code.entry(*code).or_insert(0u32) += 1;
                if *code == 101 || err.contains("panicked") {
                    bad.push(format!("mutant {i} ({what}): panic: {err}"));
                } else if *code == 2 && !err.contains("veil:") {
                    bad.push(format!(
                        "mutant {i} ({what}): exit 2 without a message: {err}"
                    ));
                } else if ![0, 1, 2, 3].contains(code) {
                    bad.push(format!("mutant {i} ({what}): exit code {code}: {err}"));
                }
            }
        }
    }
    eprintln!(
        "ELF mutation: {} mutants in {:.1} s, exit codes {by_code:?}",
        results.len(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(results.len() as u64, MUTANTS);
    assert!(
        bad.is_empty(),
        "{} bad mutant(s):\n{}",
        bad.len(),
        bad.join("\n")
    );
    // Both kinds of ending were exercised.
    assert!(by_code.get(&2).copied().unwrap_or(0) > 0, "{by_code:?}");
    assert!(by_code.get(&0).copied().unwrap_or(0) > 0, "{by_code:?}");
}
