//! A stop request (SIGINT/TERM/HUP in `veil replay`) while the parallel loader's reader thread
//! is blocked in a read that the signal did not interrupt (it went to another thread): the
//! loader ends the input with what the reader thread holds, a last line without its newline
//! included, and gives the very trace the sequential loader gives on the same bytes. (Its own
//! binary: the stop check is process-wide and installed once.)

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use replay::trace::{load, load_parallel, LoadOptions};

static STOP: AtomicBool = AtomicBool::new(false);

/// Hands out `data` in reads of `step` bytes, then requests a stop and blocks for good (a pipe
/// whose writer stays silent).
struct ThenBlock {
    data: Vec<u8>,
    at: usize,
    step: usize,
    never: mpsc::Receiver<()>,
}

impl Read for ThenBlock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at < self.data.len() {
            let n = buf.len().min(self.step).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        STOP.store(true, Ordering::SeqCst);
        let _ = self.never.recv();
        Ok(0)
    }
}

fn line(pfn: u64) -> String {
    format!(
        "           <...>-6607    [001] .....   408.542272: mm_page_alloc: page=00000000bbf8173a \
         pfn={pfn:#x} order=0 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE|__GFP_COMP"
    )
}

#[test]
fn a_stop_while_the_reader_blocks_keeps_the_last_line_it_holds() {
    replay::stop::set_check(|| STOP.load(Ordering::SeqCst).then_some((2, "SIGINT")));
    // Complete lines, then a last line without its newline; and, apart, the end inside an
    // overlong line (the reader is skipping it when the read blocks).
    let mut data = String::new();
    for pfn in 0x1000..0x1100 {
        data.push_str(&line(pfn));
        data.push('\n');
    }
    let complete = data.clone();
    data.push_str(&line(0x2000));
    let mut overlong = complete.clone().into_bytes();
    overlong.extend(std::iter::repeat_n(b'x', replay::reader::MAX_LINE + 5000));
    for (bytes, step) in [(data.as_bytes().to_vec(), 4096), (overlong, 100_000)] {
        STOP.store(false, Ordering::SeqCst);
        let (_keep, never) = mpsc::channel();
        let r = ThenBlock {
            data: bytes.clone(),
            at: 0,
            step,
            never,
        };
        let got = load_parallel(r, LoadOptions::default(), &mut |_| {}).expect("parallel");
        assert!(STOP.load(Ordering::SeqCst), "the reader blocked");
        let want = load(&bytes[..], LoadOptions::default()).expect("sequential");
        assert_eq!(
            (
                got.stats.lines,
                got.stats.alloc_events,
                got.stats.malformed_lines
            ),
            (
                want.stats.lines,
                want.stats.alloc_events,
                want.stats.malformed_lines
            ),
            "lines, events and malformed lines (step {step})"
        );
        assert!(got == want, "the whole trace (step {step})");
        std::mem::forget(_keep);
    }
    let t = load(data.as_bytes(), LoadOptions::default()).unwrap();
    assert_eq!(
        t.stats.alloc_events, 0x101,
        "the unended last line is an event"
    );
}
