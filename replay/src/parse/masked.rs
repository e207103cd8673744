//! The parallel loader's first try at a line: the kernel's usual line read from the
//! chunk's space and digit bits and from whole words, where the fast path ([`super::fast`])
//! scans bytes.
//!
//! The loader's scan marks, for every byte of a chunk, whether it is a space and whether it
//! is an ASCII digit (with the newlines and colons it needs anyway). Each field boundary of
//! the header (`<task>-<pid> [<cpu>] <flags> <secs>.<usec>`) is then the highest set bit of
//! a masked word, each "these bytes are digits / spaces" check one mask compare, and the
//! fixed texts of the fields (` pfn=0x`, ` order=`, ` migratetype=`, ` gfp_flags=`) word
//! compares. Only the usual shape is taken — the header within the line's first 63 bytes,
//! the timestamp in microseconds, the cpu in three digits and a flags column (as the fast
//! path's `timestamp_usec` and `flags_cpu_fixed` take them), a 16-character page, a hex pfn
//! of 1-7 digits, a one-digit order and migratetype; any other line returns `None` and goes
//! to the fast path, which decides as before. So for every line this accepts it gives the
//! fast path's event (property tests hold the two together), and the fast path the general
//! parser's.

use super::fast::{self, w, word};
#[cfg(test)]
use super::Line;
use super::{EventKind, RawEvent, MAX_TRACE_ORDER};

/// The class bits of 64 bytes of a chunk, in this order: newlines, colons, spaces, ASCII
/// digits.
pub(crate) type Masks = [u64; 4];
/// Index of the newlines' bits in [`Masks`].
pub(crate) const NL: usize = 0;
/// Index of the colons' bits in [`Masks`].
pub(crate) const COLON: usize = 1;
/// Index of the spaces' bits in [`Masks`].
pub(crate) const SPACE: usize = 2;
/// Index of the digits' bits in [`Masks`].
pub(crate) const DIGIT: usize = 3;

/// Bits `at..at + 64` of class `k` of a chunk's masks (zero past their end).
#[inline(always)]
fn window(cls: &[Masks], k: usize, at: usize) -> u64 {
    let (w, s) = (at / 64, at % 64);
    match cls.get(w..w + 2) {
        // `<< 1 << (63 - s)` is `<< (64 - s)` without its undefined case: 0 for s = 0.
        Some(two) => (two[0][k] >> s) | (two[1][k] << 1 << (63 - s)),
        None => cls.get(w).map_or(0, |m| m[k] >> s),
    }
}

/// The index just past the highest set bit of `m` (0 if none).
#[inline(always)]
fn past_last(m: u64) -> usize {
    (64 - m.leading_zeros()) as usize
}

/// The event on `line` (at offset `at` of the chunk whose class bits are `cls`), whose first
/// colon is at `c`, if its header is the kernel's usual one; `None` leaves the line to the
/// fast path.
#[inline(always)]
pub(crate) fn parse_at<'a>(
    line: &'a [u8],
    c: usize,
    cls: &[Masks],
    at: usize,
) -> Option<RawEvent<'a>> {
    let body = &line[c..];
    let (kind, start) = fast::event(body)?;
    let (cpu, ts_ns) = header(line, c, window(cls, SPACE, at), window(cls, DIGIT, at))?;
    let (pfn, order, migratetype, gfp) = fields(body, start, kind, cls, at + c)?;
    Some(RawEvent {
        kind,
        cpu,
        ts_ns,
        pfn: Some(pfn),
        order: Some(order),
        migratetype,
        gfp,
    })
}

/// The kernel's usual fields after `page=` (at `i`) of `body` (the line from its first
/// colon, at chunk offset `at`): a 16-character page, `pfn=0x` and 1-7 hex digits, a
/// one-digit order and, for an allocation, a one-digit migratetype and the gfp flags. The
/// pfn, order, migratetype and flags, as the fast path's `fields` reads them; `None` for
/// anything else (the fast path decides then).
#[inline(always)]
fn fields<'a>(
    body: &'a [u8],
    i: usize,
    kind: EventKind,
    cls: &[Masks],
    at: usize,
) -> Option<(u64, u8, u8, &'a [u8])> {
    // The general parser drops trailing whitespace (a `\r`, say) before anything else.
    let b = super::trim_end(body);
    let end = b.len();
    // The page: 16 bytes that are not spaces, then a space (so never "(null)").
    if window(cls, SPACE, at + i) & 0x1_ffff != 0x1_0000 {
        return None;
    }
    let i = i + 16;
    if word(b, i)? & 0xff_ffff_ffff_ffff != w(b" pfn=0x\0") {
        return None;
    }
    let (pfn, k) = fast::hex_word(b, i + 7)?;
    let i = i + 7 + k;
    // ` order=` and one digit, then the end (frees) or the allocation's two fields.
    let o = word(b, i)?;
    let order = ((o >> 56) as u8).wrapping_sub(b'0');
    if o & 0x00ff_ffff_ffff_ffff != w(b" order=\0") || order > 9 || order > MAX_TRACE_ORDER {
        return None;
    }
    let i = i + 8;
    if kind != EventKind::Alloc {
        return (i == end).then_some((pfn, order, 0, &b""[..]));
    }
    // ` migratetype=` and one digit, ` gfp_flags=` (bytes i..i+33, the digit at i+13).
    let t = word(b, i + 8)?;
    let migratetype = ((t >> 40) as u8).wrapping_sub(b'0');
    if word(b, i)? != w(b" migrate")
        || t & !(0xff << 40) != w(b"type=\0 g")
        || migratetype > 9
        || word(b, i + 16)? != w(b"fp_flags")
        || b.get(i + 24) != Some(&b'=')
    {
        return None;
    }
    // The flags: the rest of the line, not empty, no space in it.
    let g = i + 25;
    if g >= end {
        return None;
    }
    let mut pos = g;
    while pos < end {
        let n = end - pos;
        let m = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        if window(cls, SPACE, at + pos) & m != 0 {
            return None;
        }
        pos += 64;
    }
    Some((pfn, order, migratetype, &b[g..]))
}

/// The cpu and the timestamp of header `h` (the line before its first colon), given the
/// space bits `sp` and digit bits `dg` of the line's first 64 bytes: the fast path's
/// `timestamp_usec`, `flags_cpu_fixed`, pid and first-byte checks, with the same result.
///
/// Every index below is a bit position of a 64-bit mask, so the bytes are read from the
/// line's first 72 as an array with the index masked to 0..64 (no bounds checks: a kernel
/// event line is longer), and the index arithmetic wraps where the test before it rules out
/// a wrap.
#[inline(always)]
fn header(line: &[u8], n: usize, sp: u64, dg: u64) -> Option<(u32, u64)> {
    let h: &[u8; 72] = line.get(..72)?.try_into().ok()?;
    let at = |i: usize| h[i & 63];
    let word = |i: usize| u64::from_le_bytes(h[i & 63..(i & 63) + 8].try_into().unwrap());
    if !(20..64).contains(&n) || at(n - 7) != b'.' {
        return None;
    }
    // Bits from `n` on belong to the body or to the next line.
    let keep = (1u64 << n) - 1;
    let (sp, dg) = (sp & keep, dg & keep);
    // `<secs>.<6 digits>`: the six after the dot in one word (the two bytes before them
    // become leading zeros), 1-19 digits before it.
    let frac = fast::digits8((word(n - 8) & !0xffff) | 0x3030)?;
    let se = n - 7;
    let j = past_last(!dg & ((1u64 << se) - 1));
    let k = se.wrapping_sub(j);
    if k == 0 || k > 19 {
        return None;
    }
    let secs = if k <= 8 {
        // The run is the last k bytes of the word ending at `se` (se >= 13); the bytes before
        // it become leading zeros.
        let low = (1u64 << (8 * (8 - k))) - 1;
        fast::digits8((word(se - 8) & !low) | (0x3030_3030_3030_3030 & low))?
    } else {
        fast::dec(&line[j..se])
    };
    let ts_ns = secs.checked_mul(1_000_000_000)?.checked_add(frac * 1000)?;
    // ` [ddd] fffff ` before the spaces that pad the timestamp: spaces at 0 and 6, digits at
    // 2-4, brackets at 1 and 5, five flags above ' ' the first of which is not '['.
    let e = past_last(!sp & ((1u64 << j) - 1));
    if e == j || e < 12 {
        return None;
    }
    let t = e.wrapping_sub(12);
    let f = word(e.wrapping_sub(8));
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Bit 7 of each byte above ' ': 0x21-0x7f carry into it when 0x5f is added to their low
    // seven bits (no byte carries into the next), 0x80 and up have it already.
    let above = (((f & LOW7) + 0x5f5f_5f5f_5f5f_5f5f) | f) & HIGH;
    // The bracket and digit bytes t+1..t+5 of the word at e-12 (bytes 1-5 of `g`).
    let g = word(t);
    if (sp >> t) & 0x41 != 0x41
        || (dg >> t) & 0x1c != 0x1c
        || (g >> 8) as u8 != b'['
        || (g >> 40) as u8 != b']'
        || (f >> 24) as u8 == b'['
        || above >> 24 != HIGH >> 24
    {
        return None;
    }
    let cpu = ((g >> 16) & 0xf) * 100 + ((g >> 24) & 0xf) * 10 + ((g >> 32) & 0xf);
    // `<task>-<pid>`: 1-19 digits after a dash, then spaces up to the `[`.
    let pe = past_last(!sp & ((1u64 << (e - 11)) - 1));
    let p = past_last(!dg & ((1u64 << pe) - 1));
    let digits = pe.wrapping_sub(p);
    if digits == 0 || digits > 19 || p == 0 || at(p.wrapping_sub(1)) != b'-' {
        return None;
    }
    // A line whose first non-space byte is `#` is a comment; one starting with other
    // whitespace is the general parser's.
    let first = at((!sp & keep).trailing_zeros() as usize);
    if first == b'#' || first.is_ascii_whitespace() {
        return None;
    }
    Some((cpu as u32, ts_ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The class bits of `line` placed at offset `at` of an otherwise empty chunk, by a byte
    /// loop.
    fn classes(line: &[u8], at: usize) -> Vec<Masks> {
        let mut v = vec![[0u64; 4]; (at + line.len()).div_ceil(64) + 1];
        for (i, &b) in line.iter().enumerate() {
            let k = at + i;
            let classes = [b == b'\n', b == b':', b == b' ', b.is_ascii_digit()];
            for (c, is) in classes.into_iter().enumerate() {
                v[k / 64][c] |= u64::from(is) << (k % 64);
            }
        }
        v
    }

    /// What this module reads from `line` at chunk offset `at`, if anything.
    fn masked(line: &[u8], at: usize) -> Option<RawEvent<'_>> {
        let c = memchr::memchr(b':', line)?;
        parse_at(line, c, &classes(line, at), at)
    }

    const ALLOC: &[u8] = b"            bash-6604    [000] .....   408.542263: mm_page_alloc: page=00000000ec238fc3 pfn=0x12a27b order=0 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE|__GFP_COMP";
    const FREE: &[u8] =
        b"           <...>-6607    [001] d..1.   408.551309: mm_page_free: page=000000008e2f6c7d pfn=0x11f7cf order=3";
    const BATCHED: &[u8] =
        b"          cc1plus-123456  [015] ..s2. 98765.000001: mm_page_free_batched: page=000000008e2f6c7d pfn=0x1f7cf0 order=0";

    #[test]
    fn reads_the_kernel_lines_at_every_offset() {
        for line in [ALLOC, FREE, BATCHED] {
            let want = fast::parse(line);
            assert!(matches!(want, Some(Line::Event(_))));
            for at in 0..130 {
                assert_eq!(masked(line, at).map(Line::Event), want, "offset {at}");
            }
        }
    }

    #[test]
    fn leaves_other_lines_to_the_fast_path() {
        const HEAD: &str = "            bash-6604    [000] .....   408.542263";
        for line in [
            // nanoseconds, a bare counter, no flags column, a long cpu, a comment
            "            bash-6604    [000] .....   408.542263123: mm_page_free: page=00000000ec238fc3 pfn=0x12a27b order=0",
            "            bash-6604    [000] .....   408542263: mm_page_free: page=00000000ec238fc3 pfn=0x12a27b order=0",
            "            bash-6604    [000]   408.542263: mm_page_free: page=00000000ec238fc3 pfn=0x12a27b order=0",
            "            bash-6604    [0000] .....   408.542263: mm_page_free: page=00000000ec238fc3 pfn=0x12a27b order=0",
            "#           bash-6604    [000] .....   408.542263: mm_page_free: page=00000000ec238fc3 pfn=0x12a27b order=0",
            // a failed allocation, a decimal pfn, two-digit order and migratetype, an old
            // batched free, a short page
            &format!("{HEAD}: mm_page_alloc: page=(null) pfn=0xffffffffffffffff order=0 migratetype=0 gfp_flags=GFP_KERNEL"),
            &format!("{HEAD}: mm_page_free: page=00000000ec238fc3 pfn=1221243 order=0"),
            &format!("{HEAD}: mm_page_free: page=00000000ec238fc3 pfn=0x12a27b order=10"),
            &format!("{HEAD}: mm_page_alloc: page=00000000ec238fc3 pfn=0x12a27b order=0 migratetype=10 gfp_flags=GFP_KERNEL"),
            &format!("{HEAD}: mm_page_free_batched: page=00000000ec238fc3 pfn=1221243"),
            &format!("{HEAD}: mm_page_free: page=ec238fc3 pfn=0x12a27b order=0"),
        ] {
            let line = line.as_bytes();
            assert!(super::super::parse_line(line).is_ok(), "{}", String::from_utf8_lossy(line));
            assert_eq!(masked(line, 5), None, "{}", String::from_utf8_lossy(line));
        }
    }

    /// Bytes that move the fields' boundaries or break their syntax.
    fn header_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(b' '),
            Just(b'a'),
            Just(b'f'),
            Just(b'g'),
            Just(b'x'),
            Just(b'='),
            Just(b'('),
            Just(b'\r'),
            Just(b'0'),
            Just(b'9'),
            Just(b'-'),
            Just(b'['),
            Just(b']'),
            Just(b'.'),
            Just(b'#'),
            Just(b'\t'),
            Just(b'/'),
            Just(b':'),
            Just(0x20 - 1),
            Just(0x21),
            Just(0x80),
            Just(0xff),
            any::<u8>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20000))]

        /// Kernel lines with bytes replaced, inserted or removed anywhere, at any chunk
        /// offset: whatever this module reads, the fast path reads the same.
        #[test]
        fn agrees_with_the_fast_path(
            which in 0usize..3,
            edits in proptest::collection::vec((0usize..170, header_byte(), 0u8..3), 0..6),
            at in 0usize..200,
        ) {
            let mut line = [ALLOC, FREE, BATCHED][which].to_vec();
            for (i, b, op) in edits {
                let i = i.min(line.len() - 1);
                match op {
                    0 => line[i] = b,
                    1 => line.insert(i, b),
                    _ => { line.remove(i); }
                }
            }
            if let Some(e) = masked(&line, at) {
                prop_assert_eq!(Some(Line::Event(e)), fast::parse(&line), "{}", String::from_utf8_lossy(&line));
            }
        }

        /// Headers of the kernel's shape with random widths, tasks, pids, cpus, flags and
        /// timestamps, one byte perhaps replaced, before a kernel body: whatever this module
        /// reads, the fast path reads the same, and an unchanged header short enough for
        /// this module (under 64 bytes) is read.
        #[test]
        fn agrees_on_kernel_shaped_headers(
            pad in 0usize..14,
            task in proptest::collection::vec(prop_oneof![Just(b'-'), Just(b' '), Just(b'<'), Just(b'9'), 0x21u8..0x7f], 1..17),
            pid in 0u64..10_000_000,
            gap in 1usize..5,
            cpu in 0u32..1000,
            flags in proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'd'), Just(b's'), Just(b'1'), Just(b'N')], 5),
            secs_pad in 1usize..5,
            secs in 0u64..100_000_000_000,
            usec in 0u32..1_000_000,
            edit in proptest::option::of((0usize..64, header_byte())),
            at in 0usize..200,
        ) {
            let mut line = vec![b' '; pad];
            line.extend_from_slice(&task);
            line.extend_from_slice(format!("-{pid}").as_bytes());
            line.extend(std::iter::repeat_n(b' ', gap));
            line.extend_from_slice(format!("[{cpu:03}] ").as_bytes());
            line.extend_from_slice(&flags);
            line.extend(std::iter::repeat_n(b' ', secs_pad));
            line.extend_from_slice(format!("{secs}.{usec:06}").as_bytes());
            let head = line.len();
            line.extend_from_slice(b": mm_page_free: page=000000008e2f6c7d pfn=0x11f7cf order=3");
            if let Some((i, b)) = edit {
                let i = i.min(line.len() - 1);
                line[i] = b;
            }
            let got = masked(&line, at);
            if let Some(e) = got {
                prop_assert_eq!(Some(Line::Event(e)), fast::parse(&line), "{}", String::from_utf8_lossy(&line));
            }
            if edit.is_none() && head < 64 && matches!(fast::parse(&line), Some(Line::Event(_))) {
                prop_assert!(got.is_some(), "not read: {}", String::from_utf8_lossy(&line));
            }
        }
    }
}
