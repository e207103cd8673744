//! Checks shared by the replay's integration tests.

use replay::trace::{Event, Trace};

/// Every line is accounted for exactly once, every free once, every allocation freed or live.
pub fn assert_accounted(t: &Trace) {
    let s = &t.stats;
    assert_eq!(
        s.lines,
        s.blank_lines
            + s.comment_lines
            + s.other_events
            + s.lost_markers
            + s.malformed_lines
            + s.alloc_events
            + s.free_events
            + s.batched_events
    );
    assert_eq!(s.alloc_events, s.allocs + s.failed_allocs_in_trace);
    assert_eq!(
        s.free_events + s.batched_events,
        s.frees_matched
            + s.batched_matched
            + s.batched_duplicates
            + s.free_duplicates
            + s.unmatched_frees
            + s.split_piece_frees
    );
    let frees = t
        .events
        .iter()
        .filter(|e| matches!(e, Event::Free { .. }))
        .count() as u64;
    assert_eq!(
        frees,
        s.frees_matched + s.batched_matched + s.implicit_frees
    );
    assert_eq!(s.allocs, s.live_at_end + frees);
}
