//! Input that is not a kmem trace ends the load with a reason instead of being read forever:
//! endless garbage lines, endless bytes without a newline, a real trace followed by garbage;
//! a long run of non-event lines below the limit is read as before.

use std::io::{self, BufReader, Read};

use replay::trace::{load, load_with_progress, LoadOptions, TraceError, GIVE_UP_BYTES};
use replay::trace::{GIVE_UP_LINES, PROGRESS_LINES};

/// An endless reader of seeded random bytes: printable junk with a newline every 37 bytes or so
/// (`lines`), or any byte value (`!lines`, newlines as often as chance has them). It counts
/// what it hands out.
struct Garbage {
    state: u64,
    lines: bool,
    given: u64,
}

impl Garbage {
    fn new(seed: u64, lines: bool) -> Self {
        Garbage {
            state: seed | 1,
            lines,
            given: 0,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Read for Garbage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for chunk in buf.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            for (b, &x) in chunk.iter_mut().zip(&r) {
                *b = if !self.lines {
                    x
                } else if x < 7 {
                    b'\n'
                } else {
                    // Printable, with the trace's own punctuation among it.
                    b" -:[]().=0123456789abcdefxpgnmo_"[usize::from(x) % 32]
                };
            }
        }
        self.given += buf.len() as u64;
        Ok(buf.len())
    }
}

fn not_a_trace(e: TraceError) -> (u64, u64, u64, u64) {
    match e {
        TraceError::NotATrace {
            line,
            run_lines,
            run_mib,
            malformed,
            ..
        } => (line, run_lines, run_mib, malformed),
        other => panic!("not NotATrace: {other}"),
    }
}

#[test]
fn endless_garbage_lines_give_up_after_the_line_limit() {
    let mut g = Garbage::new(7, true);
    let e = load(BufReader::new(&mut g), LoadOptions::default()).unwrap_err();
    let msg = e.to_string();
    let (line, run, _, malformed) = not_a_trace(e);
    assert_eq!((line, run), (GIVE_UP_LINES, GIVE_UP_LINES), "{msg}");
    assert!(malformed > GIVE_UP_LINES / 2, "{msg}");
    assert!(
        msg.contains("not a kmem trace") && msg.contains("malformed"),
        "{msg}"
    );
    // It stopped: about 40 bytes a line were read, not more.
    assert!(g.given < GIVE_UP_LINES * 100, "{}", g.given);
}

#[test]
fn endless_random_bytes_give_up() {
    // /dev/urandom's kind of input, bounded by the limits alone.
    let mut g = Garbage::new(11, false);
    let e = load(BufReader::new(&mut g), LoadOptions::default()).unwrap_err();
    let (line, run, mib, _) = not_a_trace(e);
    assert!(
        run == GIVE_UP_LINES || mib >= GIVE_UP_BYTES >> 20,
        "{run} {mib}"
    );
    assert!(line <= GIVE_UP_LINES);
    assert!(g.given <= GIVE_UP_BYTES + (4 << 20), "{}", g.given);
}

#[test]
fn endless_input_without_newlines_gives_up_by_bytes() {
    let mut calls = 0;
    let e = load_with_progress(
        BufReader::new(io::repeat(b'x')),
        LoadOptions::default(),
        &mut |_| calls += 1,
    )
    .unwrap_err();
    let (line, run, mib, _) = not_a_trace(e);
    assert_eq!((line, run), (1, 0));
    assert_eq!(mib, GIVE_UP_BYTES >> 20);
    // The progress callback ran while the reader skipped (a progress line every second).
    assert!(calls > 100, "{calls}");
}

const ALLOC: &str = "           <...>-6607    [001] .....   408.542370: mm_page_alloc: page=000000006f764635 pfn=0x104e3c order=0 migratetype=0 gfp_flags=GFP_KERNEL\n";

#[test]
fn a_trace_followed_by_garbage_gives_up_after_its_last_event() {
    let trace = ALLOC.repeat(10);
    let mut g = Garbage::new(3, true);
    let e = load(
        BufReader::new(trace.as_bytes().chain(&mut g)),
        LoadOptions::default(),
    )
    .unwrap_err();
    let (line, run, _, _) = not_a_trace(e);
    assert_eq!((line, run), (10 + GIVE_UP_LINES, GIVE_UP_LINES));
}

#[test]
fn a_run_just_below_the_limit_is_read() {
    // GIVE_UP_LINES - 1 lines of other kinds (blank, comment, another tracepoint), then an
    // event, twice: the limit is on a run, not on the file.
    let mut text = String::from(ALLOC);
    for _ in 0..2 {
        for i in 0..GIVE_UP_LINES - 1 {
            text.push_str(match i % 3 {
                0 => "\n",
                1 => "# comment\n",
                _ => "  kworker/0:1-9 [000] ..... 5.0: sched_switch: prev_comm=a\n",
            });
        }
        text.push_str(ALLOC);
    }
    let mut last = 0;
    let t = load_with_progress(text.as_bytes(), LoadOptions::default(), &mut |s| {
        last = s.lines
    })
    .unwrap();
    assert_eq!(t.stats.alloc_events, 3);
    assert_eq!(t.stats.lines, 2 * GIVE_UP_LINES + 1);
    assert_eq!(last % PROGRESS_LINES, 0);
    assert!(last > 0);
    // One more line in the run and it gives up.
    let e = load(
        format!("{ALLOC}{}{ALLOC}", "\n".repeat(GIVE_UP_LINES as usize)).as_bytes(),
        LoadOptions::default(),
    )
    .unwrap_err();
    assert_eq!(not_a_trace(e).0, 1 + GIVE_UP_LINES);
}
