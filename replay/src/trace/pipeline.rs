//! The parallel loader: [`load_parallel`] gives the very [`Trace`] (or error) that
//! [`super::load_with_progress`] gives on the same reader, with parsing spread over two threads.
//!
//! - A **reader thread** reads the input (decompressing it, for a gzip reader) into buffers of
//!   whole lines with exactly [`LineReader`](crate::reader::LineReader)'s refill pattern: the
//!   same reads of the same sizes, the same cap on long lines and the same "skipping" steps
//!   inside them, so every byte count the give-up rule sees is the one the sequential loader
//!   sees. Each buffer of lines is a *chunk* with a sequence number.
//! - **Parsing a chunk** (its newlines and colons found 64 bytes at a time, then
//!   [`crate::parse::parse_line`] on each line, the gfp strings interned
//!   into a table of the chunk's own) turns it into compact 24-byte records. Either thread may
//!   parse any chunk: the reader thread parses the newest waiting chunk whenever two or more
//!   wait (or the queue is full), the calling thread parses the oldest whenever it has no parsed
//!   chunk to pair.
//! - **Pairing** (the [`Loader`]: pfn table, splits, statistics, events) runs on the calling
//!   thread, in file order, record by record, with the sequential loader's line numbers,
//!   malformed-line handling, `--strict`, give-up checks and progress calls at the same lines.
//!   A chunk's gfp ids are mapped to the trace's table once per distinct string, in order.
//!
//! At most [`IN_FLIGHT`] chunks (about 2.5 MiB) are between the threads.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{
    LoadOptions, Loader, Trace, TraceError, TraceStats, GIVE_UP_BYTES, GIVE_UP_LINES,
    PROGRESS_LINES,
};
use crate::gfp::GfpTable;
use crate::parse::masked::{self, Masks, COLON, NL};
use crate::parse::{parse_event_fast, parse_general, EventKind, Line, ParseError, RawEvent};
use crate::reader::{BUF, MAX_LINE};

/// The line buffer's size, as [`crate::reader::LineReader`]'s.
const CAP: usize = BUF + MAX_LINE + 1;

/// Pieces (chunks and markers) queued between the threads at most.
pub const IN_FLIGHT: usize = 8;

/// The reader thread parses a chunk itself only when this many wait unparsed: the decoder is
/// the bound, so its thread parses only what the caller's thread cannot keep up with (at 2
/// the reader thread parsed so eagerly that the caller's thread sat idle; 4-7 measured alike).
const HELP_AT: usize = 4;

/// With the queue full the reader thread cannot decode on, so it parses the newest waiting
/// chunk when this many wait (one is still left for the caller's thread) rather than idle
/// (measured alike with waiting for four, within the noise of this host).
const HELP_WHEN_FULL: usize = 2;

/// What a line was, in a [`Rec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Alloc,
    Free,
    FreeBatched,
    Blank,
    Comment,
    Other,
    Lost,
    Malformed,
    TooLong,
}

/// [`Rec::bits`]: the event has a pfn.
const HAS_PFN: u8 = 1;
/// [`Rec::bits`]: the event's timestamp is earlier than the chunk's previous event's.
const EARLIER: u8 = 2;
/// [`Rec::bits`]: the chunk's first event (its timestamp is [`Parsed::first_ts`]).
const FIRST: u8 = 4;

/// How often the pairing thread, waiting for input, checks for a stop request (a signal
/// may interrupt the wait instead of the reader thread's read).
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// No `order=` field.
const NO_ORDER: u8 = u8::MAX;

/// One parsed line (24 bytes).
#[derive(Clone, Copy, Debug)]
struct Rec {
    /// The pfn (events) or the lost-event count (`Lost`).
    val: u64,
    /// CPU of an event.
    cpu: u32,
    /// Offset just past the line (and its newline) from the chunk's first byte.
    end: u32,
    /// The chunk-local gfp id (allocations) or the index in [`Parsed::malformed`].
    aux: u32,
    kind: Kind,
    /// Order, or [`NO_ORDER`].
    order: u8,
    migratetype: u8,
    /// [`HAS_PFN`] | [`EARLIER`] | [`FIRST`].
    bits: u8,
}

impl Rec {
    fn plain(kind: Kind) -> Rec {
        Rec {
            val: 0,
            cpu: 0,
            end: 0,
            aux: 0,
            kind,
            order: NO_ORDER,
            migratetype: 0,
            bits: 0,
        }
    }
}

/// A buffer of whole lines: `buf[start..end]`.
struct Chunk {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The first line is the end of a line that was too long (the reader was skipping it).
    first_too_long: bool,
    /// Bytes of input consumed before `buf[start]`.
    base: u64,
}

/// A chunk's records.
#[derive(Default)]
struct Parsed {
    recs: Vec<Rec>,
    /// The chunk's distinct gfp strings: (offset, length) from the chunk's first byte.
    gfp: Vec<(u32, u32)>,
    /// Malformed lines: the error, the line's offset and length.
    malformed: Vec<(ParseError, u32, u32)>,
    /// Timestamps of the first and the last event.
    first_ts: u64,
    last_ts: u64,
    /// Open-addressing table over `gfp` (ids + 1; 0 is free), a power of two long.
    slots: Vec<u32>,
    /// The id + 1 of the gfp string interned last (0: none yet in this chunk): allocations
    /// come in runs of one kind, so most lines repeat the previous allocation's flags.
    last_gfp: u32,
    /// The class bits of the chunk's bytes, one [`Masks`] per 64 bytes: bit `i % 64` of
    /// class `k` of entry `i / 64` says whether byte `i` is in class `k`.
    classes: Vec<Masks>,
}

/// What the reader hands over, in input order.
// A piece moves a few times per chunk of thousands of lines: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Piece {
    /// A parsed chunk.
    Lines(Chunk, Parsed),
    /// One more buffer of an overlong line dropped; bytes consumed then.
    Skip(u64),
    /// The input ended inside an overlong line; bytes consumed then.
    TooLongAtEof(u64),
    /// The end of the input.
    Eof,
    /// A read failed.
    Err(io::Error),
}

enum Slot {
    /// A chunk waiting to be parsed.
    Raw(Chunk),
    /// Being parsed.
    Busy,
    /// Ready for pairing.
    Ready(Piece),
}

struct State {
    q: VecDeque<Slot>,
    /// Sequence number of `q[0]`.
    head: u64,
    /// `Raw` slots in `q`.
    raw: usize,
    /// Line buffers the caller is done with, oldest first. The reader thread takes the
    /// oldest: the decoder's writes to a buffer the other core read long ago find fewer of its
    /// lines still in that core's cache to invalidate (taking the newest measured ~0.3 ms of
    /// a 15 ms gzip load slower, here).
    spare_bufs: VecDeque<Vec<u8>>,
    spare_parsed: Vec<Parsed>,
    /// The caller is done: the reader stops.
    cancel: bool,
    /// The reader thread has returned (or panicked).
    ended: bool,
    /// Threads waiting on the condition variable (a wake-up costs a system call, so it is
    /// sent only when someone waits).
    waiters: u32,
    /// The reader thread is in a read of its input, holding [`State::tail`].
    reading: bool,
    /// While `reading`: the bytes the reader holds (a line not ended yet), whether it is
    /// skipping an overlong line, and the input's bytes consumed so far. A stop request the
    /// signal of which did not interrupt that read ends the input with them, as the sequential
    /// loader's stop would.
    tail: Vec<u8>,
    tail_skipping: bool,
    tail_read: u64,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            st: Mutex::new(State {
                q: VecDeque::with_capacity(IN_FLIGHT + 1),
                head: 0,
                raw: 0,
                spare_bufs: VecDeque::new(),
                spare_parsed: Vec::new(),
                cancel: false,
                ended: false,
                waiters: 0,
                reading: false,
                tail: Vec::new(),
                tail_skipping: false,
                tail_read: 0,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the queue inconsistent (every change is one step).
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, mut g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        g.waiters += 1;
        let mut g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        g.waiters -= 1;
        g
    }

    /// [`Shared::wait`], at most `d`.
    fn wait_timeout<'a>(
        &self,
        mut g: MutexGuard<'a, State>,
        d: std::time::Duration,
    ) -> MutexGuard<'a, State> {
        g.waiters += 1;
        let (mut g, _) = self
            .cv
            .wait_timeout(g, d)
            .unwrap_or_else(|e| e.into_inner());
        g.waiters -= 1;
        g
    }

    /// Unlocks, waking the other thread if it waits.
    fn release(&self, g: MutexGuard<'_, State>) {
        let wake = g.waiters > 0;
        drop(g);
        if wake {
            self.cv.notify_all();
        }
    }

    /// Stores a chunk parsed from slot `seq`.
    fn store(&self, seq: u64, ch: Chunk, p: Parsed) {
        let mut g = self.lock();
        let i = (seq - g.head) as usize;
        g.q[i] = Slot::Ready(Piece::Lines(ch, p));
        self.release(g);
    }

    fn cancel(&self) {
        self.lock().cancel = true;
        self.cv.notify_all();
    }
}

/// Takes the newest waiting chunk (the reader thread's choice) or the oldest (the caller's).
fn take_raw(g: &mut State, newest: bool) -> Option<(u64, Chunk, Parsed)> {
    if g.raw == 0 {
        return None;
    }
    let i = if newest {
        g.q.iter().rposition(|s| matches!(s, Slot::Raw(_)))?
    } else {
        g.q.iter().position(|s| matches!(s, Slot::Raw(_)))?
    };
    let Slot::Raw(ch) = std::mem::replace(&mut g.q[i], Slot::Busy) else {
        unreachable!("position found a Raw slot")
    };
    g.raw -= 1;
    let p = g.spare_parsed.pop().unwrap_or_default();
    Some((g.head + i as u64, ch, p))
}

/// Marks the reader's end however it returns, so the caller never waits for it in vain.
struct EndGuard<'a>(&'a Shared);

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().ended = true;
        self.0.cv.notify_all();
    }
}

/// The reader thread: [`crate::reader::LineReader`]'s refill loop, handing over whole buffers
/// of lines instead of one line at a time, and parsing chunks when they pile up.
fn produce<R: Read>(mut inner: R, sh: &Shared) {
    let _end = EndGuard(sh);
    let mut buf = vec![0u8; CAP];
    let (mut start, mut end) = (0usize, 0usize);
    let (mut eof, mut skipping) = (false, false);
    let mut read = 0u64;
    // Hands a piece over (a chunk to parse or a marker); false once the caller is done. Parses
    // waiting chunks first while the queue is full, and after pushing while enough wait.
    let push = |slot: Slot| -> bool {
        let mut g = sh.lock();
        loop {
            if g.cancel {
                return false;
            }
            if g.q.len() < IN_FLIGHT {
                break;
            }
            let help = if g.raw >= HELP_WHEN_FULL {
                take_raw(&mut g, true)
            } else {
                None
            };
            if let Some((seq, ch, mut p)) = help {
                drop(g);
                parse_chunk(&ch, &mut p);
                sh.store(seq, ch, p);
                g = sh.lock();
            } else {
                g = sh.wait(g);
            }
        }
        if matches!(slot, Slot::Raw(_)) {
            g.raw += 1;
        }
        g.q.push_back(slot);
        let help = if g.raw >= HELP_AT {
            take_raw(&mut g, true)
        } else {
            None
        };
        sh.release(g);
        if let Some((seq, ch, mut p)) = help {
            parse_chunk(&ch, &mut p);
            sh.store(seq, ch, p);
        }
        true
    };
    loop {
        // Every complete line in the buffer, at once.
        if let Some(i) = memchr::memrchr(b'\n', &buf[start..end]) {
            let stop = start + i + 1;
            let mut next = sh.lock().spare_bufs.pop_front().unwrap_or_default();
            next.resize(CAP, 0);
            next[..end - stop].copy_from_slice(&buf[stop..end]);
            let ch = Chunk {
                buf: std::mem::replace(&mut buf, next),
                start,
                end: stop,
                first_too_long: std::mem::take(&mut skipping),
                base: read - (end - start) as u64,
            };
            (start, end) = (0, end - stop);
            if !push(Slot::Raw(ch)) {
                return;
            }
        }
        // No newline within MAX_LINE bytes: drop what is buffered, skip to the next one.
        if end - start > MAX_LINE || (skipping && end > start) {
            let was = std::mem::replace(&mut skipping, true);
            start = end;
            if was && !push(Slot::Ready(Piece::Skip(read))) {
                return;
            }
        }
        if eof {
            if std::mem::take(&mut skipping) && !push(Slot::Ready(Piece::TooLongAtEof(read))) {
                return;
            }
            if start < end {
                // The last line, without a newline.
                let ch = Chunk {
                    buf: std::mem::take(&mut buf),
                    start,
                    end,
                    first_too_long: false,
                    base: read - (end - start) as u64,
                };
                if !push(Slot::Raw(ch)) {
                    return;
                }
            }
            if push(Slot::Ready(Piece::Eof)) {
                help_at_end(sh);
            }
            return;
        }
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        {
            let mut g = sh.lock();
            if g.cancel {
                return;
            }
            g.reading = true;
            g.tail.clear();
            g.tail.extend_from_slice(&buf[..end]);
            (g.tail_skipping, g.tail_read) = (skipping, read);
        }
        let got = loop {
            match inner.read(&mut buf[end..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        {
            let mut g = sh.lock();
            // The caller ended the input with the tail while this read blocked.
            if g.cancel {
                return;
            }
            g.reading = false;
        }
        match got {
            Ok(0) => eof = true,
            Ok(n) => {
                end += n;
                read += n as u64;
            }
            Err(e) => {
                push(Slot::Ready(Piece::Err(e)));
                return;
            }
        }
    }
}

/// With the input read, the reader thread parses the chunks that still wait, newest first,
/// while the caller's thread pairs (and parses) from the oldest: the load's last chunks are
/// then not all left to one core.
fn help_at_end(sh: &Shared) {
    loop {
        let mut g = sh.lock();
        if g.cancel {
            return;
        }
        let Some((seq, ch, mut p)) = take_raw(&mut g, true) else {
            return;
        };
        drop(g);
        parse_chunk(&ch, &mut p);
        sh.store(seq, ch, p);
    }
}

/// `a == b` for two slices of the same length, eight bytes at a time (gfp strings are short:
/// this beats a `memcmp` call).
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n < 8 {
        return a == b;
    }
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"));
    let mut diff = word(a, n - 8) ^ word(b, n - 8);
    let mut i = 0;
    while i + 8 <= n {
        diff |= word(a, i) ^ word(b, i);
        i += 8;
    }
    diff == 0
}

/// Interns `s` (at offset `off` of the chunk) into the chunk's gfp table.
#[inline]
fn local_gfp(p: &mut Parsed, data: &[u8], off: u32, s: &[u8]) -> u32 {
    let n = s.len();
    if p.last_gfp != 0 {
        let (o, l) = p.gfp[p.last_gfp as usize - 1];
        if l as usize == n && same_bytes(&data[o as usize..o as usize + n], s) {
            return p.last_gfp - 1;
        }
    }
    let id = local_gfp_lookup(p, data, off, s);
    p.last_gfp = id + 1;
    id
}

/// [`local_gfp`] through the hash table.
fn local_gfp_lookup(p: &mut Parsed, data: &[u8], off: u32, s: &[u8]) -> u32 {
    // Key: the length and the first and last eight bytes (the strings differ there).
    let n = s.len();
    let word = |b: &[u8]| {
        if let Some(w) = b.first_chunk::<8>() {
            return u64::from_le_bytes(*w);
        }
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let (a, b) = (word(s), word(&s[n.saturating_sub(8)..]));
    let h = (a ^ b.rotate_left(29) ^ n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if p.slots.is_empty() {
        p.slots.resize(64, 0);
    }
    let mask = p.slots.len() - 1;
    let mut i = (h >> 40) as usize & mask;
    loop {
        let e = p.slots[i];
        if e == 0 {
            break;
        }
        let (o, l) = p.gfp[e as usize - 1];
        if l as usize == n && same_bytes(&data[o as usize..o as usize + n], s) {
            return e - 1;
        }
        i = (i + 1) & mask;
    }
    let id = p.gfp.len() as u32;
    p.gfp.push((off, n as u32));
    p.slots[i] = id + 1;
    if p.gfp.len() * 2 > p.slots.len() {
        // Grow: rehash every string into a table twice the size.
        let len = p.slots.len() * 2;
        p.slots.clear();
        p.slots.resize(len, 0);
        let gfp = std::mem::take(&mut p.gfp);
        for (j, &(o, l)) in gfp.iter().enumerate() {
            let t = &data[o as usize..(o + l) as usize];
            let (a, b) = (word(t), word(&t[t.len().saturating_sub(8)..]));
            let h = (a ^ b.rotate_left(29) ^ t.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut k = (h >> 40) as usize & (len - 1);
            while p.slots[k] != 0 {
                k = (k + 1) & (len - 1);
            }
            p.slots[k] = j as u32 + 1;
        }
        p.gfp = gfp;
    }
    id
}

/// The byte-class bits of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn masks64(b: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{_mm_and_si128, _mm_cmpeq_epi8, _mm_cmpgt_epi8, _mm_movemask_epi8};
    use std::arch::x86_64::{_mm_set1_epi8, _mm_set_epi64x};
    let mut m = [0u64; 4];
    for k in 0..4 {
        let w = |i: usize| i64::from_le_bytes(b[16 * k + i..16 * k + i + 8].try_into().unwrap());
        let v = _mm_set_epi64x(w(8), w(0));
        let bits = |x| u64::from(_mm_movemask_epi8(x) as u16);
        let eq = |c: u8| bits(_mm_cmpeq_epi8(v, _mm_set1_epi8(c as i8)));
        // Signed compares: bytes of 0x80 and above are negative, so never digits.
        let above = _mm_cmpgt_epi8(v, _mm_set1_epi8(b'0' as i8 - 1));
        let dg = bits(_mm_and_si128(
            above,
            _mm_cmpgt_epi8(_mm_set1_epi8(b'9' as i8 + 1), v),
        ));
        put(&mut m, [eq(b'\n'), eq(b':'), eq(b' '), dg], 16 * k as u32);
    }
    m
}

/// The byte-class bits of 64 bytes at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bw")]
fn masks64_avx512(b: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{_mm512_cmpeq_epi8_mask, _mm512_cmpge_epu8_mask};
    use std::arch::x86_64::{_mm512_cmple_epu8_mask, _mm512_loadu_si512, _mm512_set1_epi8};
    // SAFETY: the 64-byte array; the load needs no alignment.
    let v = unsafe { _mm512_loadu_si512(b.as_ptr().cast()) };
    let set = |c: u8| _mm512_set1_epi8(c as i8);
    let eq = |c: u8| _mm512_cmpeq_epi8_mask(v, set(c));
    let digit = _mm512_cmpge_epu8_mask(v, set(b'0')) & _mm512_cmple_epu8_mask(v, set(b'9'));
    [eq(b'\n'), eq(b':'), eq(b' '), digit]
}

/// Ors the class bits of one piece of a 64-byte block, `shift` bytes into it, into `m`.
#[inline(always)]
fn put(m: &mut Masks, bits: Masks, shift: u32) {
    for (x, b) in m.iter_mut().zip(bits) {
        *x |= b << shift;
    }
}

/// The byte-class bits of 64 bytes, one byte at a time (the scan off x86-64, and the tests'
/// reference).
#[cfg(any(test, not(target_arch = "x86_64")))]
fn masks64_bytes(b: &[u8; 64]) -> Masks {
    let mut m = [0u64; 4];
    for (i, &c) in b.iter().enumerate() {
        let is = [c == b'\n', c == b':', c == b' ', c.is_ascii_digit()];
        put(&mut m, is.map(u64::from), i as u32);
    }
    m
}

/// The byte-class bits of 64 bytes, 32 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn masks64_avx2(b: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{__m256i, _mm256_and_si256, _mm256_cmpeq_epi8, _mm256_cmpgt_epi8};
    use std::arch::x86_64::{_mm256_loadu_si256, _mm256_movemask_epi8, _mm256_set1_epi8};
    let mut m = [0u64; 4];
    for k in 0..2 {
        // SAFETY: bytes 32k..32k+32 of the 64-byte array; the load needs no alignment.
        let v = unsafe { _mm256_loadu_si256(b.as_ptr().add(32 * k).cast::<__m256i>()) };
        let bits = |x| u64::from(_mm256_movemask_epi8(x) as u32);
        let eq = |c: u8| bits(_mm256_cmpeq_epi8(v, _mm256_set1_epi8(c as i8)));
        // Signed compares: bytes of 0x80 and above are negative, so never digits.
        let digit = _mm256_and_si256(
            _mm256_cmpgt_epi8(v, _mm256_set1_epi8(b'0' as i8 - 1)),
            _mm256_cmpgt_epi8(_mm256_set1_epi8(b'9' as i8 + 1), v),
        );
        put(
            &mut m,
            [eq(b'\n'), eq(b':'), eq(b' '), bits(digit)],
            32 * k as u32,
        );
    }
    m
}

/// Fills `p.classes` for `data` with `masks`.
#[inline(always)]
fn scan_bytes(data: &[u8], p: &mut Parsed, masks: impl Fn(&[u8; 64]) -> Masks) {
    // A local vector: its length stays in a register.
    let mut v = std::mem::take(&mut p.classes);
    v.clear();
    v.reserve(data.len().div_ceil(64));
    let mut blocks = data.chunks_exact(64);
    for b in &mut blocks {
        v.push(masks(b.try_into().expect("64 bytes")));
    }
    let rest = blocks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 64];
        last[..rest.len()].copy_from_slice(rest);
        v.push(masks(&last));
    }
    p.classes = v;
}

/// [`scan_bytes`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scan_bytes_avx2(data: &[u8], p: &mut Parsed) {
    scan_bytes(data, p, |b| masks64_avx2(b));
}

/// [`scan_bytes`] compiled for AVX-512 (byte compares straight to masks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bw")]
fn scan_bytes_avx512(data: &[u8], p: &mut Parsed) {
    scan_bytes(data, p, |b| masks64_avx512(b));
}

/// Fills `p`'s class bits for `data`.
fn find_bytes(data: &[u8], p: &mut Parsed) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512BW (checked just above).
            unsafe { scan_bytes_avx512(data, p) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { scan_bytes_avx2(data, p) };
            return;
        }
        // SAFETY: SSE2 is part of the x86-64 baseline, so every x86-64 CPU has it.
        scan_bytes(data, p, |b| unsafe { masks64(b) });
    }
    #[cfg(not(target_arch = "x86_64"))]
    scan_bytes(data, p, masks64_bytes);
}

/// The first byte of class `k` at or after `from` and before `to` (`from < to <= 64 *
/// bits.len()`).
#[inline]
fn next_bit(bits: &[Masks], k: usize, from: usize, to: usize) -> Option<usize> {
    let mut w = from / 64;
    let mut m = bits[w][k] & (u64::MAX << (from % 64));
    loop {
        if m != 0 {
            let i = w * 64 + m.trailing_zeros() as usize;
            return (i < to).then_some(i);
        }
        w += 1;
        if w * 64 >= to {
            return None;
        }
        m = bits[w][k];
    }
}

/// The record of event `ev` of chunk `data` (its gfp interned in `p`), with its timestamp's
/// order against the chunk's previous event (`last_ts`).
#[inline(always)]
fn event_rec(ev: RawEvent<'_>, p: &mut Parsed, data: &[u8], last_ts: &mut Option<u64>) -> Rec {
    let kind = match ev.kind {
        EventKind::Alloc => Kind::Alloc,
        EventKind::Free => Kind::Free,
        EventKind::FreeBatched => Kind::FreeBatched,
    };
    let mut bits = 0;
    match *last_ts {
        None => {
            bits |= FIRST;
            p.first_ts = ev.ts_ns;
        }
        Some(t) if ev.ts_ns < t => bits |= EARLIER,
        Some(_) => {}
    }
    *last_ts = Some(ev.ts_ns);
    let aux = if kind == Kind::Alloc && ev.pfn.is_some() {
        let off = (ev.gfp.as_ptr() as usize - data.as_ptr() as usize) as u32;
        local_gfp(p, data, off, ev.gfp)
    } else {
        0
    };
    Rec {
        val: ev.pfn.unwrap_or(0),
        cpu: ev.cpu,
        end: 0,
        aux,
        kind,
        order: ev.order.unwrap_or(NO_ORDER),
        migratetype: ev.migratetype,
        bits: bits | if ev.pfn.is_some() { HAS_PFN } else { 0 },
    }
}

/// Parses every line of `ch` into `p`'s records.
fn parse_chunk(ch: &Chunk, p: &mut Parsed) {
    p.recs.clear();
    p.gfp.clear();
    p.malformed.clear();
    p.slots.clear();
    p.last_gfp = 0;
    let data = &ch.buf[ch.start..ch.end];
    find_bytes(data, p);
    // One record per line, reserved at once for lines of 96 bytes or more (the kernel's are
    // 100-170): a fresh table then grows without copies.
    p.recs.reserve(data.len() / 96 + 1);
    let mut pos = 0usize;
    let mut first_too_long = ch.first_too_long;
    let mut last_ts: Option<u64> = None;
    while pos < data.len() {
        let stop = next_bit(&p.classes, NL, pos, data.len()).unwrap_or(data.len());
        let (line, next) = (&data[pos..stop], (stop + 1).min(data.len()));
        let mut r = if std::mem::take(&mut first_too_long) || line.len() > MAX_LINE {
            Rec::plain(Kind::TooLong)
        } else {
            let colon = next_bit(&p.classes, COLON, pos, stop).map(|c| c - pos);
            // The kernel's own layout straight to a record; anything else through the
            // general parser (the same result for every line the fast path takes).
            let fast = |c| {
                masked::parse_at(line, c, &p.classes, pos).or_else(|| parse_event_fast(line, c))
            };
            match colon.and_then(fast) {
                Some(ev) => event_rec(ev, p, data, &mut last_ts),
                None => match parse_general(line) {
                    Ok(Line::Event(ev)) => event_rec(ev, p, data, &mut last_ts),
                    Ok(Line::Blank) => Rec::plain(Kind::Blank),
                    Ok(Line::Comment) => Rec::plain(Kind::Comment),
                    Ok(Line::Other) => Rec::plain(Kind::Other),
                    Ok(Line::Lost { count, .. }) => Rec {
                        val: count,
                        ..Rec::plain(Kind::Lost)
                    },
                    Err(e) => {
                        let aux = p.malformed.len() as u32;
                        p.malformed.push((e, pos as u32, line.len() as u32));
                        Rec {
                            aux,
                            ..Rec::plain(Kind::Malformed)
                        }
                    }
                },
            }
        };
        r.end = next as u32;
        p.recs.push(r);
        pos = next;
    }
    if let Some(t) = last_ts {
        p.last_ts = t;
    }
}

impl Loader {
    /// Account one record of chunk `ch` (line `lineno`); `map` takes the chunk's gfp ids to
    /// the trace's (`u32::MAX`: not yet).
    #[inline(always)]
    fn feed_rec(
        &mut self,
        lineno: u64,
        r: &Rec,
        ch: &Chunk,
        p: &Parsed,
        map: &mut [u32],
    ) -> Result<(), TraceError> {
        self.trace.stats.lines += 1;
        let kind = match r.kind {
            Kind::Alloc => EventKind::Alloc,
            Kind::Free => EventKind::Free,
            Kind::FreeBatched => EventKind::FreeBatched,
            // The lines that are no events are counted as the sequential loader counts them.
            Kind::Blank => return self.accept(Line::Blank),
            Kind::Comment => return self.accept(Line::Comment),
            Kind::Other => return self.accept(Line::Other),
            Kind::Lost => {
                return self.accept(Line::Lost {
                    cpu: 0,
                    count: r.val,
                })
            }
            Kind::Malformed => {
                let (e, off, len) = p.malformed[r.aux as usize];
                let at = ch.start + off as usize;
                return self.malformed(lineno, e, &ch.buf[at..at + len as usize]);
            }
            Kind::TooLong => return self.malformed(lineno, ParseError::TooLong, b""),
        };
        let s = &mut self.trace.stats;
        if r.bits & FIRST != 0 {
            if self.last_ts.is_some_and(|last| p.first_ts < last) {
                s.out_of_order_timestamps += 1;
            }
            self.last_ts = Some(p.last_ts);
        } else if r.bits & EARLIER != 0 {
            s.out_of_order_timestamps += 1;
        }
        let pfn = (r.bits & HAS_PFN != 0).then_some(r.val);
        let order = (r.order != NO_ORDER).then_some(r.order);
        self.event(
            kind,
            r.cpu,
            pfn,
            order,
            r.migratetype,
            |t: &mut GfpTable| {
                let m = &mut map[r.aux as usize];
                if *m == u32::MAX {
                    let (o, l) = p.gfp[r.aux as usize];
                    let at = ch.start + o as usize;
                    *m = t.intern(&ch.buf[at..at + l as usize]);
                } else {
                    t.count(*m);
                }
                *m
            },
        )
    }
}

/// Ends the input with what the reader thread, blocked in a read, holds: queues the pieces its
/// end of input would have given (a last line without a newline, or the end inside an overlong
/// line) and the end, and cancels the reader.
fn end_with_tail(g: &mut State) {
    g.cancel = true;
    g.reading = false;
    let tail = std::mem::take(&mut g.tail);
    if g.tail_skipping {
        g.q.push_back(Slot::Ready(Piece::TooLongAtEof(g.tail_read)));
    } else if !tail.is_empty() {
        let (end, base) = (tail.len(), g.tail_read - tail.len() as u64);
        g.q.push_back(Slot::Raw(Chunk {
            buf: tail,
            start: 0,
            end,
            first_too_long: false,
            base,
        }));
        g.raw += 1;
    }
    g.q.push_back(Slot::Ready(Piece::Eof));
}

/// The caller's side: pairs pieces in order, parsing chunks itself when none is ready.
fn consume(
    sh: &Shared,
    opts: LoadOptions,
    progress: &mut dyn FnMut(&TraceStats),
) -> Result<Trace, TraceError> {
    let mut loader = Loader::new(opts);
    let mut lineno = 0u64;
    // The current run without an event: the events before it, its first line and byte.
    let (mut events, mut run_line, mut run_byte) = (0u64, 0u64, 0u64);
    let mut map: Vec<u32> = Vec::new();
    let mut g = sh.lock();
    loop {
        // The next piece in order, parsing while it is not ready.
        let piece = loop {
            match g.q.front() {
                Some(Slot::Ready(_)) => {
                    let Some(Slot::Ready(piece)) = g.q.pop_front() else {
                        unreachable!("the front is ready")
                    };
                    g.head += 1;
                    break piece;
                }
                Some(Slot::Raw(_)) => {
                    let Some(Slot::Raw(ch)) = g.q.pop_front() else {
                        unreachable!("the front is raw")
                    };
                    g.head += 1;
                    g.raw -= 1;
                    let mut p = g.spare_parsed.pop().unwrap_or_default();
                    sh.release(g);
                    parse_chunk(&ch, &mut p);
                    g = sh.lock();
                    break Piece::Lines(ch, p);
                }
                _ => {
                    if let Some((seq, ch, mut p)) = take_raw(&mut g, false) {
                        drop(g);
                        parse_chunk(&ch, &mut p);
                        sh.store(seq, ch, p);
                        g = sh.lock();
                    } else if g.ended {
                        drop(g);
                        return Err(TraceError::Io {
                            line: lineno,
                            source: io::Error::other("the trace reader thread ended early"),
                        });
                    } else {
                        g = sh.wait_timeout(g, STOP_POLL);
                        // A stop request ends the input (as `StopAtRequest` does for the
                        // sequential loader) also while the reader thread is blocked in a
                        // read the signal did not interrupt: what is queued is paired first,
                        // then what the reader holds, as if that read had returned the end.
                        // (A reader that is not in a read sees the request at its next one.)
                        if g.q.is_empty() && g.reading && crate::stop::requested().is_some() {
                            end_with_tail(&mut g);
                        }
                    }
                }
            }
        };
        sh.release(g);
        // As `load_with_progress`, a progress call before each line read (and each marker).
        let top = |lineno: u64, loader: &Loader, progress: &mut dyn FnMut(&TraceStats)| {
            if lineno > 0 && lineno.is_multiple_of(PROGRESS_LINES) {
                progress(&loader.trace.stats);
            }
        };
        match piece {
            Piece::Lines(ch, p) => {
                map.clear();
                map.resize(p.gfp.len(), u32::MAX);
                for r in &p.recs {
                    top(lineno, &loader, progress);
                    lineno += 1;
                    loader.feed_rec(lineno, r, &ch, &p, &mut map)?;
                    let consumed = ch.base + u64::from(r.end);
                    if loader.page_events != events {
                        (events, run_line, run_byte) = (loader.page_events, lineno, consumed);
                    } else if lineno - run_line >= GIVE_UP_LINES
                        || consumed - run_byte >= GIVE_UP_BYTES
                    {
                        return Err(loader.give_up(lineno, lineno - run_line, consumed - run_byte));
                    }
                }
                g = sh.lock();
                g.spare_bufs.push_back(ch.buf);
                g.spare_parsed.push(p);
            }
            Piece::Skip(consumed) => {
                top(lineno, &loader, progress);
                // Inside line `lineno + 1` still: count no line yet, but watch the bytes.
                if consumed - run_byte >= GIVE_UP_BYTES {
                    let run = lineno - run_line;
                    return Err(loader.give_up(lineno + 1, run, consumed - run_byte));
                }
                progress(&loader.trace.stats);
                g = sh.lock();
            }
            Piece::TooLongAtEof(consumed) => {
                top(lineno, &loader, progress);
                lineno += 1;
                loader.feed_too_long(lineno)?;
                if loader.page_events != events {
                    (events, run_line, run_byte) = (loader.page_events, lineno, consumed);
                } else if lineno - run_line >= GIVE_UP_LINES || consumed - run_byte >= GIVE_UP_BYTES
                {
                    return Err(loader.give_up(lineno, lineno - run_line, consumed - run_byte));
                }
                g = sh.lock();
            }
            Piece::Eof => {
                top(lineno, &loader, progress);
                return Ok(loader.finish());
            }
            Piece::Err(source) => {
                top(lineno, &loader, progress);
                return Err(TraceError::Io {
                    line: lineno,
                    source,
                });
            }
        }
    }
}

/// [`super::load_with_progress`] on two threads: the same [`Trace`], statistics, malformed
/// examples, errors and progress calls for the same reader (see the module doc). `r` is read on
/// a thread of its own, which a failed load leaves to end at its next read (so a blocked pipe
/// does not hold up the error).
pub fn load_parallel<R: Read + Send + 'static>(
    r: R,
    opts: LoadOptions,
    progress: &mut dyn FnMut(&TraceStats),
) -> Result<Trace, TraceError> {
    let sh = Arc::new(Shared::new());
    let theirs = Arc::clone(&sh);
    std::thread::Builder::new()
        .name("trace-reader".into())
        .spawn(move || produce(r, &theirs))
        .map_err(|source| TraceError::Io { line: 0, source })?;
    let res = consume(&sh, opts, progress);
    sh.cancel();
    res
}

/// [`load_parallel`] for a borrowed reader (a slice in memory, say): the reader thread is
/// scoped, so this returns once it has finished its current read.
pub fn load_parallel_scoped<R: Read + Send>(
    r: R,
    opts: LoadOptions,
    progress: &mut dyn FnMut(&TraceStats),
) -> Result<Trace, TraceError> {
    let sh = Shared::new();
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("trace-reader".into())
            .spawn_scoped(s, || produce(r, &sh))
            .map_err(|source| TraceError::Io { line: 0, source })?;
        let res = consume(&sh, opts, progress);
        sh.cancel();
        res
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every scan this CPU can run agrees with the reference: the SSE2 one (which a CPU
        /// with AVX2, the usual case, never runs in the loader), AVX2 and AVX-512 where
        /// present.
        #[test]
        fn every_scan_agrees_with_a_byte_loop(
            v in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b':'), Just(b' '), Just(b'0'), Just(b'9'),
                    Just(b'/'), Just(b':'), Just(0xb0), any::<u8>()],
                64,
            )
        ) {
            let b: [u8; 64] = v.try_into().unwrap();
            let want = masks64_bytes(&b);
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: SSE2 is part of the x86-64 baseline.
                prop_assert_eq!(unsafe { masks64(&b) }, want);
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    prop_assert_eq!(unsafe { masks64_avx2(&b) }, want);
                }
                if std::arch::is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU has AVX-512BW (checked just above).
                    prop_assert_eq!(unsafe { masks64_avx512(&b) }, want);
                }
            }
            // Elsewhere the byte loop is the scan itself: nothing to compare.
            #[cfg(not(target_arch = "x86_64"))]
            let _ = want;
        }
    }
}
