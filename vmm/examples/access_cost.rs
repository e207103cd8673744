//! Repeatable per-call instruction counts for the checked accessor and the decoder, for
//! `valgrind --tool=callgrind`: `access_cost CASE N` runs CASE N times (CASE = raw8, raw64,
//! raw4096, checked8, checked64, checked4096, decode); the Ir difference between N and 0
//! runs, divided by N, is the cost per call.

#[path = "../benches/common/mod.rs"]
mod common;

use std::hint::black_box;

use vmm::decode::memory_operands;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(case), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse::<u64>().ok()))
    else {
        eprintln!("usage: access_cost CASE N (CASE: raw8|raw64|raw4096|checked8|checked64|checked4096|decode)");
        std::process::exit(2);
    };
    let fx = common::Fixture::new();
    let (ram, view, cpu) = (&fx.ram, fx.view(), fx.cpu());
    let mut buf = vec![0u8; 4096];
    // Parse the case once: the loop holds only the call measured.
    let (kind, len) = match case.as_str() {
        "decode" => ("decode", 0),
        c => match (c.strip_prefix("raw"), c.strip_prefix("checked")) {
            (Some(n), _) => ("raw", n.parse().unwrap_or(8)),
            (_, Some(n)) => ("checked", n.parse().unwrap_or(8)),
            _ => {
                eprintln!("unknown case {c}");
                std::process::exit(2);
            }
        },
    };
    let buf = &mut buf[..len.min(4096)];
    match kind {
        "decode" => {
            for _ in 0..n {
                let mut tr = |va: u64| view.check(va, 1).is_ok().then_some(va);
                black_box(memory_operands(black_box(common::FXSAVE), &cpu, &mut tr).unwrap());
            }
        }
        "raw" => {
            for _ in 0..n {
                ram.read(black_box(common::MAPPED_GPA), buf).unwrap();
                black_box(&buf);
            }
        }
        _ => {
            for _ in 0..n {
                view.read(black_box(common::MAPPED_GPA), buf).unwrap();
                black_box(&buf);
            }
        }
    }
}
