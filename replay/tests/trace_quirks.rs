//! Loader cases for every quirk of the ftrace kmem format (see ../shared/data/README.md).

use std::io::Write;

use flate2::write::GzEncoder;
mod common;

use common::assert_accounted;
use replay::reader::from_reader;
use replay::trace::{load, Event, LoadOptions, Trace, TraceError};

fn load_str(s: &str) -> Trace {
    load(s.as_bytes(), LoadOptions::default()).unwrap()
}

fn alloc(task: &str, cpu: u32, ts: &str, pfn: u64, order: u8) -> String {
    format!("{task:>16}-6607    [{cpu:03}] .....   {ts}: mm_page_alloc: page=00000000bbf8173a pfn={pfn:#x} order={order} migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE|__GFP_COMP\n")
}

fn free(cpu: u32, ts: &str, pfn: u64, order: u8) -> String {
    format!("           <...>-6607    [{cpu:03}] .....   {ts}: mm_page_free: page=00000000c6e60b5f pfn={pfn:#x} order={order}\n")
}

fn batched(cpu: u32, ts: &str, pfn: u64) -> String {
    format!("           <...>-6607    [{cpu:03}] ...2.   {ts}: mm_page_free_batched: page=00000000c6e60b5f pfn={pfn:#x} order=0\n")
}

#[test]
fn task_names_with_spaces_dashes_and_placeholders() {
    let mut s = String::new();
    for (i, task) in [
        "<...>",
        "opt cgu.0",
        "build-script-bu",
        "memfd:sealed-91",
        "tokio-runtime-w",
    ]
    .iter()
    .enumerate()
    {
        s += &alloc(task, 0, &format!("1.{i:06}"), 0x1000 + i as u64, 0);
    }
    let t = load_str(&s);
    assert_eq!(t.stats.allocs, 5);
    assert_eq!(t.stats.malformed_lines, 0);
    assert_accounted(&t);
}

#[test]
fn batched_free_after_its_free_is_a_duplicate() {
    // As in the shared trace: mm_page_free first, then mm_page_free_batched for the same page.
    let s = alloc("a", 1, "1.0", 0x10, 0) + &free(1, "1.1", 0x10, 0) + &batched(1, "1.1", 0x10);
    let t = load_str(&s);
    assert_eq!(
        (
            t.stats.frees_matched,
            t.stats.batched_duplicates,
            t.stats.unmatched_frees
        ),
        (1, 1, 0)
    );
    assert_eq!(t.events.len(), 2);
    assert_accounted(&t);
}

#[test]
fn batched_free_before_its_free_is_handled_too() {
    let s = alloc("a", 1, "1.0", 0x10, 0) + &batched(1, "1.1", 0x10) + &free(1, "1.1", 0x10, 0);
    let t = load_str(&s);
    assert_eq!(
        (
            t.stats.batched_matched,
            t.stats.free_duplicates,
            t.stats.unmatched_frees
        ),
        (1, 1, 0)
    );
    assert_eq!(
        t.events.to_vec(),
        vec![
            Event::Alloc {
                pfn: 0x10,
                gfp: 0,
                order: 0,
                migratetype: 1,
                flags: 0
            },
            Event::Free {
                alloc: 0,
                order: 0,
                flags: 0
            },
        ]
    );
    // A re-allocation of the page starts a new life: its free is not mistaken for a duplicate.
    let s2 = s + &alloc("a", 1, "1.2", 0x10, 0) + &free(1, "1.3", 0x10, 0);
    let t = load_str(&s2);
    assert_eq!(
        (
            t.stats.frees_matched,
            t.stats.batched_matched,
            t.stats.live_at_end
        ),
        (1, 1, 0)
    );
    assert_accounted(&t);
}

#[test]
fn frees_of_pages_allocated_before_the_capture_are_skipped() {
    let s = free(0, "1.0", 0x99, 10) + &batched(0, "1.0", 0x99) + &alloc("a", 0, "1.1", 0x10, 0);
    let t = load_str(&s);
    // The free counts once as pre-capture; its batched twin is its duplicate, not another one.
    assert_eq!(
        (t.stats.unmatched_frees, t.stats.batched_duplicates),
        (1, 1)
    );
    assert_eq!(t.events.len(), 1);
    assert_eq!((t.stats.live_at_end, t.stats.live_pages_at_end), (1, 1));
    assert_accounted(&t);
}

#[test]
fn malformed_lines_are_counted_with_line_numbers_or_fatal_when_strict() {
    let s = alloc("a", 0, "1.0", 0x10, 0)
        + "garbage line\n"
        + "           <...>-6607    [001] .....   1.2: mm_page_free: page=x pfn=0xZZ order=0\n"
        + &free(0, "1.3", 0x10, 0);
    let t = load_str(&s);
    assert_eq!(t.stats.malformed_lines, 2);
    let lines: Vec<u64> = t.stats.malformed_examples.iter().map(|m| m.line).collect();
    assert_eq!(lines, vec![2, 3]);
    assert!(t.stats.malformed_examples[1].reason.contains("pfn"));
    assert_eq!(t.stats.frees_matched, 1);
    assert_accounted(&t);
    let strict = load(
        s.as_bytes(),
        LoadOptions {
            strict: true,
            ..LoadOptions::default()
        },
    );
    match strict {
        Err(TraceError::Malformed { line, .. }) => assert_eq!(line, 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gzip_and_plain_load_the_same_trace() {
    let s =
        alloc("a", 0, "1.0", 0x10, 0) + &alloc("b c", 1, "0.9", 0x20, 2) + &free(0, "1.1", 0x10, 0);
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(s.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let a = load(
        from_reader(Box::new(s.as_bytes())).unwrap(),
        LoadOptions::default(),
    )
    .unwrap();
    let b = load(
        from_reader(Box::new(&gz[..])).unwrap(),
        LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(a.events, b.events);
    assert_eq!(a.stats, b.stats);
    assert_eq!(a.stats.allocs, 2);
}

#[test]
fn unsorted_timestamps_are_counted_and_replayed_in_file_order() {
    // CPU 1's buffer was read after CPU 0's: its earlier timestamps come later in the file.
    let s = alloc("a", 0, "2.000000", 0x10, 0)
        + &alloc("a", 0, "2.000005", 0x11, 0)
        + &alloc("b", 1, "1.999990", 0x12, 0)
        + &free(1, "1.999995", 0x12, 0)
        + &free(0, "2.000010", 0x10, 0);
    let t = load_str(&s);
    assert_eq!(t.stats.out_of_order_timestamps, 1);
    assert_eq!(t.stats.cpus, 2);
    let pfns: Vec<u64> = t
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Alloc { pfn, .. } => Some(pfn),
            _ => None,
        })
        .collect();
    assert_eq!(pfns, vec![0x10, 0x11, 0x12]);
    assert_accounted(&t);
}

#[test]
fn comments_lost_markers_failed_allocs_and_other_events() {
    let s = "# tracer: nop\n#\n\n".to_string()
        + "CPU:1 [LOST 17 EVENTS]\n"
        + "       kworker/0:1-9     [000] .....  1.0: sched_switch: prev_comm=x prev_pid=1\n"
        + "           <...>-6607    [001] .....   1.0: mm_page_alloc: page=(null) pfn=0xffffffffffffffff order=3 migratetype=0 gfp_flags=GFP_NOWAIT\n"
        + &alloc("a", 0, "1.1", 0x10, 0)
        + &alloc("a", 0, "1.2", 0x10, 0) // lost free: re-allocation of a live pfn
        + &free(0, "1.3", 0x10, 1); // order differs from the allocation's
    let t = load_str(&s);
    let st = &t.stats;
    assert_eq!(
        (
            st.comment_lines,
            st.blank_lines,
            st.lost_markers,
            st.lost_events
        ),
        (2, 1, 1, 17)
    );
    assert_eq!(
        (st.other_events, st.failed_allocs_in_trace, st.allocs),
        (1, 1, 2)
    );
    assert_eq!(
        (st.implicit_frees, st.order_mismatches, st.live_at_end),
        (1, 1, 0)
    );
    assert_accounted(&t);
}

#[test]
fn random_bytes_never_panic_the_loader() {
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..200 {
        let n = (x % 2000) as usize;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            x = replay::classify::splitmix64(x);
            v.push(if x.is_multiple_of(7) {
                b'\n'
            } else {
                (x >> 8) as u8
            });
        }
        let t = load(&v[..], LoadOptions::default()).unwrap();
        assert_accounted(&t);
    }
}

/// The Free events in file order: (allocation id, order).
fn frees(t: &Trace) -> Vec<(u32, u8)> {
    t.events
        .iter()
        .filter_map(|e| match e {
            Event::Free { alloc, order, .. } => Some((alloc, order)),
            _ => None,
        })
        .collect()
}

#[test]
fn split_page_tail_frees_free_the_allocation_not_pre_capture_pages() {
    // An order-2 allocation freed as four order-0 pages (split_page), each page also batched,
    // and another one whose tail pages are freed before its head.
    let mut s = alloc("a", 0, "1.0", 0x10, 2);
    for (i, p) in [0x10, 0x11, 0x12, 0x13].iter().enumerate() {
        s += &free(0, &format!("1.{}", i + 1), *p, 0);
        s += &batched(0, &format!("1.{}", i + 1), *p);
    }
    s += &alloc("a", 0, "2.0", 0x20, 1);
    s += &free(0, "2.1", 0x21, 0);
    s += &free(0, "2.2", 0x20, 0);
    let t = load_str(&s);
    let st = &t.stats;
    assert_eq!(st.unmatched_frees, 0, "no tail is a pre-capture page");
    assert_eq!(st.batched_duplicates, 4);
    assert_eq!((st.split_allocations, st.split_piece_frees), (2, 3 + 1));
    assert_eq!(st.frees_matched, 2, "the last piece frees each allocation");
    assert_eq!(st.order_mismatches, 0);
    assert_eq!((st.live_at_end, st.live_pages_at_end), (0, 0));
    // One Free per allocation, whole, after its last piece.
    assert_eq!(frees(&t), vec![(0, 2), (1, 1)]);
    assert!(matches!(
        t.events.get(1).unwrap(),
        Event::Free { alloc: 0, .. }
    ));
    assert_accounted(&t);
    // Before the fix the pieces after the first were frees of pre-capture pages: with the
    // head freed last the allocation stays live until then (pages live at its peak: 4 + 2).
    assert_eq!(st.peak_live_pages, 4);
}

#[test]
fn allocation_overlapping_a_live_range_off_its_head_frees_it() {
    // After lost events: 0x10 order 2 is live; an order-0 allocation of 0x12 (inside it, not at
    // its head) and an order-3 allocation at 0x18 that covers the head of a live order-0 page.
    let s = alloc("a", 0, "1.0", 0x10, 2)
        + &alloc("a", 0, "1.1", 0x1a, 0)
        + "CPU:0 [LOST 5 EVENTS]\n"
        + &alloc("a", 0, "1.2", 0x12, 0)
        + &alloc("a", 0, "1.3", 0x18, 3)
        + &free(0, "1.4", 0x12, 0)
        + &free(0, "1.5", 0x18, 3);
    let t = load_str(&s);
    let st = &t.stats;
    assert_eq!(st.implicit_frees, 2);
    // 0x10/2 is freed before 0x12's allocation, 0x1a/0 before 0x18/3's.
    assert_eq!(frees(&t), vec![(0, 2), (1, 0), (2, 0), (3, 3)]);
    assert!(matches!(
        t.events.get(2).unwrap(),
        Event::Free { alloc: 0, .. }
    ));
    assert_eq!(
        (st.unmatched_frees, st.live_at_end, st.live_pages_at_end),
        (0, 0, 0)
    );
    assert_eq!(st.peak_live_pages, 1 + 8, "0x12 and 0x18/3 live together");
    assert_accounted(&t);
}

#[test]
fn freed_pieces_reused_while_the_rest_is_live() {
    // split_page, then the buddy allocator hands the freed first pieces out again while the
    // rest of the first allocation is still live: both are tracked apart.
    let s = alloc("a", 0, "1.0", 0x100, 5)
        + &free(0, "1.1", 0x100, 2)
        + &alloc("a", 0, "1.2", 0x100, 2)
        + &free(0, "1.3", 0x104, 2)
        + &free(0, "1.4", 0x100, 2)
        + &free(0, "1.5", 0x108, 3)
        + &free(0, "1.6", 0x110, 4);
    let t = load_str(&s);
    let st = &t.stats;
    assert_eq!((st.implicit_frees, st.unmatched_frees), (0, 0));
    assert_eq!(frees(&t), vec![(1, 2), (0, 5)]);
    assert_eq!((st.live_at_end, st.live_pages_at_end), (0, 0));
    assert_accounted(&t);
}
