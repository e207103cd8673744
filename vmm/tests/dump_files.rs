//! Dump and plot files as a person uses them through the `veil` binary (issue 18): `veil dump
//! diff` on real guest dumps taken before and after a flip and on bad input, formats from the
//! file name (PNG rendered, unwritable extensions refused before boot), and every file written
//! announced on stderr, with `--json` too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

#[path = "../../tests/src/kvm_gate.rs"]
mod kvm_gate;

use kvm_gate::kvm_available;
mod common;
use common::{scratch, text};

fn veil_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run veil")
}

/// A tiny guest: Hc::Dump, Hc::Alloc(order 0, GFP UNMAPPED) (a pageblock flips to unmapped),
/// Hc::Dump, Hc::Exit(0).
fn flip_guest() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xe0, 0x05]; // mov dx, 0x5e0 (the doorbell)
    code.extend_from_slice(&[0xb8, 13, 0, 0, 0, 0xef]); // mov eax, 13 (Hc::Dump); out dx, eax
    code.extend_from_slice(&[0xbf, 0, 0, 0, 0]); // mov edi, 0 (order)
    code.extend_from_slice(&[0xbe, 2, 0, 0, 0]); // mov esi, 2 (gfp::UNMAPPED)
    code.extend_from_slice(&[0xb8, 3, 0, 0, 0, 0xef]); // mov eax, 3 (Hc::Alloc); out dx, eax
    code.extend_from_slice(&[0xb8, 13, 0, 0, 0, 0xef]); // Hc::Dump
    code.extend_from_slice(&[0xbf, 0, 0, 0, 0]); // mov edi, 0
    code.extend_from_slice(&[0xb8, 20, 0, 0, 0, 0xef]); // mov eax, 20 (Hc::Exit); out dx, eax
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    vmm::elf::build_elf(veil_abi::IMAGE_MIN_GPA, &code, 0)
}

/// Runs the flip guest with `--dump-ept d.json` on `backend`; returns the scratch dir and the
/// run's stderr.
fn flip_dumps(name: &str, backend: &str, extra: &[&str]) -> (PathBuf, String) {
    let dir = scratch(name);
    std::fs::write(dir.join("flip.elf"), flip_guest()).unwrap();
    let mut args = vec![
        "run",
        "--guest",
        "flip.elf",
        "--mem",
        "64M",
        "--stage2",
        backend,
        "--dump-ept",
        "d.json",
    ];
    args.extend(extra);
    let out = veil_in(&dir, &args);
    let e = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{e}");
    (dir, e)
}

#[test]
fn dump_diff_of_real_dumps_before_and_after_a_flip() {
    if !kvm_available() {
        return;
    }
    for backend in ["slots", "mprotect"] {
        let (dir, stderr) = flip_dumps(&format!("diff-{backend}"), backend, &["--json"]);
        // Every file written is announced, with --json too.
        for f in ["d.1.json", "d.2.json", "d.json"] {
            assert!(
                stderr.contains(&format!(
                    "veil: wrote stage-2 dump to {}",
                    dir.join(f).display()
                )) || stderr.contains(&format!("veil: wrote stage-2 dump to {f} (json, ")),
                "{backend}: {f} not announced: {stderr}"
            );
        }
        let out = veil_in(&dir, &["dump", "diff", "d.1.json", "d.2.json", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let d: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
        let changed = d["changed"].as_array().unwrap();
        assert_eq!(changed.len(), 1, "{backend}: one pageblock flipped: {d:#}");
        let c = &changed[0];
        assert_eq!(
            c["end"].as_u64().unwrap() - c["start"].as_u64().unwrap(),
            2 << 20
        );
        assert_eq!(c["old"]["state"], "mapped", "{c}");
        assert_eq!(c["new"]["state"], "unmapped", "{c}");
        assert_eq!(c["new"]["restricted"], "none", "{c}");
        assert!(
            c["new"]["freetype"].as_str().unwrap().contains("unmapped"),
            "{c}"
        );
        let counter = |section: &str, name: &str| {
            d["counters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["section"] == section && x["name"] == name)
                .map(|x| x["delta"].as_f64().unwrap())
        };
        assert_eq!(
            counter("allocator", "flips_to_unmapped"),
            Some(1.0),
            "{d:#}"
        );
        assert_eq!(counter("totals", "unmapped_pages"), Some(512.0), "{d:#}");
        if backend == "slots" {
            // The hole splits the one memslot in two.
            assert_eq!(d["memslots_removed"].as_array().unwrap().len(), 1, "{d:#}");
            assert_eq!(d["memslots_added"].as_array().unwrap().len(), 2, "{d:#}");
        } else {
            assert!(d["memslots_added"].as_array().unwrap().is_empty(), "{d:#}");
        }
        // The text form says the same for people.
        let out = veil_in(&dir, &["dump", "diff", "d.1.json", "d.2.json"]);
        let t = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(t.contains("Ranges changed: 1 (512 pages, 2 MiB)"), "{t}");
        assert!(t.contains("-> unmapped "), "{t}");
        assert!(t.contains("allocator.flips_to_unmapped"), "{t}");
        // A dump against itself: no change.
        let out = veil_in(&dir, &["dump", "diff", "d.2.json", "d.2.json"]);
        assert!(text(&out.stdout).contains("Ranges: no change"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn dump_diff_bad_input_is_exit_2_with_the_reason() {
    if !kvm_available() {
        return;
    }
    let (dir, _) = flip_dumps("diff-bad", "mprotect", &[]);
    let good = std::fs::read_to_string(dir.join("d.json")).unwrap();
    let mut v: Value = serde_json::from_str(&good).unwrap();
    v["format_version"] = 99.into();
    std::fs::write(dir.join("v99.json"), v.to_string()).unwrap();
    let mut v: Value = serde_json::from_str(&good).unwrap();
    v["ram_size"] = (128u64 << 20).into();
    std::fs::write(dir.join("big.json"), v.to_string()).unwrap();
    std::fs::write(dir.join("other.json"), r#"{"hello": "world"}"#).unwrap();
    // A text dump is not JSON.
    let out = veil_in(
        &dir,
        &[
            "run",
            "--guest",
            "flip.elf",
            "--mem",
            "64M",
            "--dump-ept",
            "d.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let cases: [(&[&str], &str); 6] = [
        (&["d.txt", "d.json"], "d.txt is not JSON"),
        (&["d.json", "other.json"], "not a Veil stage-2 dump"),
        (&["d.json", "v99.json"], "schema version 99"),
        (
            &["d.json", "big.json"],
            "RAM size 64 MiB in d.json, 128 MiB in big.json",
        ),
        (&["d.json", "missing.json"], "cannot read missing.json"),
        (&["d.json", "."], "not a regular file"),
    ];
    for (files, want) in cases {
        let mut args = vec!["dump", "diff"];
        args.extend(files);
        let out = veil_in(&dir, &args);
        let e = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{files:?}: {e}");
        assert!(
            e.starts_with("veil: error: ") && e.contains(want),
            "{files:?}: {e}"
        );
        assert!(
            out.stdout.is_empty() && !e.contains("panicked"),
            "{files:?}: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_extension_veil_cannot_write_is_refused_before_boot() {
    let dir = scratch("ext");
    for name in ["d.pdf", "d.jpg", "d.html"] {
        let out = veil_in(&dir, &["run", "--dump-ept", name]);
        let e = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {e}");
        assert!(e.contains("cannot write ."), "{name}: {e}");
        assert!(
            e.contains("png (.png)") && e.contains("--dump-format"),
            "{e}"
        );
        assert!(!e.contains("veil-guest") && !dir.join(name).exists(), "{e}");
    }
    for name in ["p.pdf", "p.txt"] {
        let out = veil_in(&dir, &["replay", "t.txt", "--plot", name]);
        let e = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {e}");
        assert!(
            e.contains("for --plot") && e.contains("svg (.svg"),
            "{name}: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn png_dump_and_the_chosen_name_are_announced() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("png");
    std::fs::write(dir.join("flip.elf"), flip_guest()).unwrap();
    let out = veil_in(
        &dir,
        &[
            "run",
            "--guest",
            "flip.elf",
            "--mem",
            "64M",
            "--dump-ept",
            "d.png",
            "--json",
        ],
    );
    let e = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(
        e.contains("veil: wrote stage-2 dump to d.png (png, "),
        "{e}"
    );
    let png = std::fs::read(dir.join("d.png")).unwrap();
    let (w, h, px) = replay::output::decode_png(&png).expect("a PNG file");
    assert!(w > 1000 && w <= 3200 && h > 200, "{w} x {h}");
    // The flipped pageblock's cell is drawn in the unmapped colour, and more than one pixel.
    let red = px.iter().filter(|p| **p == [0xd3, 0x2f, 0x2f]).count();
    assert!(red > 100, "{red} unmapped-coloured pixels");
    // The numbered ones are PNG too.
    assert!(std::fs::read(dir.join("d.2.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));
    // --dump-ept without a name: the chosen name is said before the guest boots.
    let out = veil_in(
        &dir,
        &["run", "--guest", "flip.elf", "--mem", "64M", "--dump-ept"],
    );
    let e = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(
        e.contains("--dump-ept without a file name: the exit dump goes to")
            && e.contains("veil-dump.txt (text)"),
        "{e}"
    );
    assert!(
        e.contains("veil: wrote stage-2 dump to veil-dump.txt (text, "),
        "{e}"
    );
    assert!(dir.join("veil-dump.txt").exists());
    // An explicit format beats the extension.
    let out = veil_in(
        &dir,
        &[
            "run",
            "--guest",
            "flip.elf",
            "--mem",
            "64M",
            "--dump-ept",
            "x.pdf",
            "--dump-format",
            "svg",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(std::fs::read_to_string(dir.join("x.pdf"))
        .unwrap()
        .contains("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replay_plot_follows_its_extension() {
    let dir = scratch("plot");
    let mut body = String::new();
    for i in 0..100u64 {
        body.push_str(&format!("  t-1 [000] ..... 1.{i:03}: mm_page_alloc: page=x pfn={:#x} order=0 migratetype=0 gfp_flags=GFP_KERNEL_ACCOUNT\n", 0x1000 + i));
    }
    std::fs::write(dir.join("t.txt"), &body).unwrap();
    let out = veil_in(&dir, &["replay", "t.txt", "--plot", "p.png"]);
    let e = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(e.contains("veil: wrote plot to p.png (png, "), "{e}");
    let (w, h, _) = replay::output::decode_png(&std::fs::read(dir.join("p.png")).unwrap())
        .expect("a PNG, not SVG in a .png");
    assert!(w >= 960 && h >= 540, "{w} x {h}");
    let out = veil_in(&dir, &["replay", "t.txt", "--plot", "p", "-q"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(std::fs::read_to_string(dir.join("p"))
        .unwrap()
        .contains("<svg"));
    let out = veil_in(
        &dir,
        &["replay", "t.txt", "--plot", "p.pdf", "--plot-format", "png"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(std::fs::read(dir.join("p.pdf"))
        .unwrap()
        .starts_with(b"\x89PNG"));
    let _ = std::fs::remove_dir_all(&dir);
}
