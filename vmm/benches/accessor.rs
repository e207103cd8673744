//! Cost per call of the stage-2-checked accessor ([`vmm::guest_view::GuestView`]) against the
//! raw [`vmm::memory::GuestRam`] read, for 8, 64 and 4096 bytes, and of decoding one
//! emulation failure (iced-x86 decode + operand addresses + checked translation).

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use vmm::decode::memory_operands;

fn reads(c: &mut Criterion) {
    let fx = common::Fixture::new();
    let (ram, view) = (&fx.ram, fx.view());
    let mut g = c.benchmark_group("read");
    for size in [8usize, 64, 4096] {
        let mut buf = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("raw", size), &size, |b, _| {
            b.iter(|| ram.read(black_box(common::MAPPED_GPA), &mut buf).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("checked", size), &size, |b, _| {
            b.iter(|| view.read(black_box(common::MAPPED_GPA), &mut buf).unwrap())
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let fx = common::Fixture::new();
    let (view, cpu) = (fx.view(), fx.cpu());
    c.bench_function("decode_fxsave_on_hole", |b| {
        b.iter(|| {
            let mut tr = |va: u64| view.check(va, 1).is_ok().then_some(va);
            memory_operands(black_box(common::FXSAVE), &cpu, &mut tr).unwrap()
        })
    });
}

criterion_group!(benches, reads, decode);
criterion_main!(benches);
