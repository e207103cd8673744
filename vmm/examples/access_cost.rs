//! Repeatable per-call instruction counts for the checked accessor and the decoder, for
//! `valgrind --tool=callgrind`: `access_cost CASE N` runs CASE N times (CASE = raw8, raw64,
//! raw4096, checked8, checked64, checked4096, decode); the Ir difference between N and 0
//! runs, divided by N, is the cost per call.

#[path = "../benches/common/mod.rs"]
mod common;

use std::hint::black_box;

use vmm::decode::{memory_operands, CpuState};
use vmm::guest_view::GuestView;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(case), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse::<u64>().ok()))
    else {
        eprintln!("usage: access_cost CASE N (CASE: raw8|raw64|raw4096|checked8|checked64|checked4096|decode)");
        std::process::exit(2);
    };
    let (ram, engine) = common::fixture();
    let view = GuestView::new(&ram, &engine);
    let (regs, sregs) = common::fxsave_regs();
    let cpu = CpuState {
        regs: &regs,
        sregs: &sregs,
    };
    let mut buf = vec![0u8; 4096];
    let size = |s: &str| s.parse::<usize>().ok();
    for _ in 0..n {
        match case.as_str() {
            "decode" => {
                let mut tr = |va: u64| view.check(va, 1).is_ok().then_some(va);
                black_box(memory_operands(black_box(common::FXSAVE), &cpu, &mut tr).unwrap());
            }
            c if c.starts_with("raw") => {
                let len = size(&c[3..]).unwrap_or(8);
                ram.read(black_box(common::MAPPED_GPA), &mut buf[..len])
                    .unwrap();
            }
            c => {
                let len = size(c.trim_start_matches("checked")).unwrap_or(8);
                view.read(black_box(common::MAPPED_GPA), &mut buf[..len])
                    .unwrap();
            }
        }
        black_box(&buf);
    }
}
