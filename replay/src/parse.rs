//! Parser for one line of an ftrace `kmem` page-allocation trace, as the kernel prints it.
//!
//! A line looks like
//! `<task>-<pid> [<cpu>] <flags> <timestamp>: <event>: <field>=<value> ...`, for example
//! `   <...>-6607    [001] .....   408.542370: mm_page_alloc: page=00000000bbf8173a pfn=0x11b07a
//! order=0 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE|__GFP_COMP`.
//!
//! Task names may contain spaces, dashes and colons (`opt cgu.0`, `build-script-bu`, `<...>`), so
//! the header is parsed from the right: timestamp, optional irq-flags column, optional `(tgid)`
//! column, `[cpu]`, and finally `task-pid` split at the last dash. The parser works on bytes,
//! allocates nothing, and returns a typed error for anything it does not understand: it never
//! panics, whatever the input.

use thiserror::Error;

/// Highest buddy order a trace event may carry (x86-64 Linux: `MAX_PAGE_ORDER` = 10).
pub const MAX_TRACE_ORDER: u8 = allocator::MAX_ORDER;

/// Which page-allocator event a line records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `mm_page_alloc`: a successful (or, with `pfn=-1`, failed) allocation.
    Alloc,
    /// `mm_page_free`: every page freed, batched or not.
    Free,
    /// `mm_page_free_batched`: a page freed through a batch (it also gets an `mm_page_free`).
    FreeBatched,
}

/// One parsed page-allocator event; borrows the gfp flag text from the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent<'a> {
    /// Event type.
    pub kind: EventKind,
    /// CPU whose buffer recorded the event.
    pub cpu: u32,
    /// Timestamp in nanoseconds (the trace clock's seconds.fraction, or its raw counter).
    pub ts_ns: u64,
    /// Page frame number; `None` for an allocation the kernel traced as failed (`pfn=-1`).
    pub pfn: Option<u64>,
    /// Buddy order (`None` when the event has no `order=` field, e.g. old batched frees).
    pub order: Option<u8>,
    /// `migratetype=` (allocations only).
    pub migratetype: u8,
    /// `gfp_flags=` text, e.g. `GFP_KERNEL_ACCOUNT|__GFP_ZERO` (allocations only).
    pub gfp: &'a [u8],
}

/// What a line holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A page-allocator event.
    Event(RawEvent<'a>),
    /// An empty or whitespace-only line.
    Blank,
    /// A `#` header/comment line (the `trace` file prints these; `trace_pipe` does not).
    Comment,
    /// `CPU:N [LOST M EVENTS]`: the ring buffer overflowed and dropped `count` events.
    Lost {
        /// CPU whose buffer overflowed.
        cpu: u32,
        /// Number of events lost.
        count: u64,
    },
    /// A well-formed event line of another tracepoint (ignored by the replay).
    Other,
}

/// Why a line could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ParseError {
    /// No `<timestamp>: <event>:` separator with a valid header before it.
    #[error("no ftrace header (task-pid [cpu] flags timestamp:)")]
    NoHeader,
    /// The event name is not followed by `: `.
    #[error("no event name")]
    NoEventName,
    /// A required field is missing.
    #[error("missing field {0}=")]
    MissingField(&'static str),
    /// A field's value is not a valid number.
    #[error("bad value for {0}=")]
    BadNumber(&'static str),
    /// `order=` is larger than the replay supports.
    #[error("order {0} out of range (max 10)")]
    OrderOutOfRange(u64),
    /// The line is longer than the reader accepts.
    #[error("line too long")]
    TooLong,
    /// `gfp_flags=` is empty.
    #[error("empty gfp_flags")]
    EmptyGfp,
}

mod fast;
pub(crate) mod masked;

/// Parse one line (without or with its trailing newline).
///
/// A page-allocator event in the kernel's own layout takes a fast path that parses its fields
/// where that layout puts them (`parse/fast.rs`); anything else, malformed lines included,
/// goes through the general parser below, which gives the same result for what the fast
/// path accepts.
#[inline]
pub fn parse_line(line: &[u8]) -> Result<Line<'_>, ParseError> {
    match fast::parse(line) {
        Some(l) => Ok(l),
        None => parse_general(line),
    }
}

/// The fast path of [`parse_line`] alone, for a caller that has found the line's first colon
/// (the parallel loader, for a whole chunk at once): the event, if `line` is one in the
/// kernel's own layout; `None` leaves the line to [`parse_general`], which then gives what
/// [`parse_line`] gives.
#[inline(always)]
pub(crate) fn parse_event_fast(line: &[u8], colon: usize) -> Option<RawEvent<'_>> {
    debug_assert_eq!(Some(colon), memchr::memchr(b':', line));
    match fast::parse_at(line, colon)? {
        Line::Event(e) => Some(e),
        _ => None,
    }
}

/// The general parser: any header layout, fields in any order, typed errors.
pub(crate) fn parse_general(line: &[u8]) -> Result<Line<'_>, ParseError> {
    let line = trim_end(line);
    let start = line.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = start else {
        return Ok(Line::Blank);
    };
    let body = &line[start..];
    if body[0] == b'#' {
        return Ok(Line::Comment);
    }
    if let Some(lost) = parse_lost(body) {
        return Ok(lost);
    }
    // Find the header/body split: the first ": " whose prefix parses as a header.
    let mut from = 0;
    while let Some(off) = find(&line[from..], b": ") {
        let split = from + off;
        if let Some((cpu, ts_ns)) = parse_header(&line[..split]) {
            return parse_body(&line[split + 2..], cpu, ts_ns);
        }
        from = split + 2;
    }
    Err(ParseError::NoHeader)
}

/// `CPU:1 [LOST 123 EVENTS]`.
fn parse_lost(body: &[u8]) -> Option<Line<'static>> {
    let rest = body.strip_prefix(b"CPU:")?;
    let (cpu, rest) = take_digits(rest)?;
    let rest = trim_start(rest).strip_prefix(b"[LOST ")?;
    let (count, rest) = take_digits(rest)?;
    if !rest.starts_with(b" EVENTS]") {
        return None;
    }
    Some(Line::Lost {
        cpu: u32::try_from(cpu).ok()?,
        count,
    })
}

/// Parse `<task>-<pid> [(tgid)] [<cpu>] [<flags>] <timestamp>` from the right; returns cpu and ns.
fn parse_header(h: &[u8]) -> Option<(u32, u64)> {
    let h = trim_end(h);
    let (rest, ts) = split_last_token(h)?;
    let ts_ns = parse_timestamp(ts)?;
    let (mut rest, mut tok) = split_last_token(trim_end(rest))?;
    if !tok.starts_with(b"[") {
        // irq-info flags column, e.g. `.....` or `d..2.`
        (rest, tok) = split_last_token(trim_end(rest))?;
    }
    let cpu = tok.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let cpu = parse_dec(cpu)?;
    let mut rest = trim_end(rest);
    if rest.ends_with(b")") {
        // record-tgid column: `(  6604)` or `(-------)`
        let open = rest.iter().rposition(|&b| b == b'(')?;
        rest = trim_end(&rest[..open]);
    }
    // task-pid: the pid follows the last dash; the task name may be anything before it.
    let dash = rest.iter().rposition(|&b| b == b'-')?;
    parse_dec(&rest[dash + 1..])?;
    Some((u32::try_from(cpu).ok()?, ts_ns))
}

/// Parse `<event>: <fields>`.
fn parse_body(b: &[u8], cpu: u32, ts_ns: u64) -> Result<Line<'_>, ParseError> {
    let colon = find(b, b":").ok_or(ParseError::NoEventName)?;
    let name = &b[..colon];
    let kind = match name {
        b"mm_page_alloc" => EventKind::Alloc,
        b"mm_page_free" => EventKind::Free,
        b"mm_page_free_batched" => EventKind::FreeBatched,
        _ => {
            if name.is_empty() || name.iter().any(|c| c.is_ascii_whitespace()) {
                return Err(ParseError::NoEventName);
            }
            return Ok(Line::Other);
        }
    };
    let mut pfn = None;
    let mut page_null = false;
    let mut order = None;
    let mut migratetype = None;
    let mut gfp: Option<&[u8]> = None;
    // Fields are `key=value` separated by spaces: one forward scan over the field text. The
    // keys the replay needs are recognised by their first bytes without a scan, and a value's
    // end is found eight bytes at a time ([`find_space`]).
    let f = &b[colon + 1..];
    let n = f.len();
    let mut i = 0;
    while i < n {
        if f[i] == b' ' {
            i += 1;
            continue;
        }
        let rest = &f[i..];
        let (key, klen): (&[u8], usize) = if rest.starts_with(b"pfn=") {
            (b"pfn", 4)
        } else if rest.starts_with(b"page=") {
            (b"page", 5)
        } else if rest.starts_with(b"order=") {
            (b"order", 6)
        } else if rest.starts_with(b"migratetype=") {
            (b"migratetype", 12)
        } else if rest.starts_with(b"gfp_flags=") {
            (b"gfp_flags", 10)
        } else {
            // Another field (or a token without `=`): skip it.
            i += find_space(rest);
            continue;
        };
        let vs = i + klen;
        let ve = vs + find_space(&f[vs..]);
        let val = &f[vs..ve];
        i = ve;
        match key {
            b"pfn" => pfn = Some(parse_pfn(val).ok_or(ParseError::BadNumber("pfn"))?),
            b"page" => page_null = val == b"(null)",
            b"order" => {
                let o = parse_dec(val).ok_or(ParseError::BadNumber("order"))?;
                if o > u64::from(MAX_TRACE_ORDER) {
                    return Err(ParseError::OrderOutOfRange(o));
                }
                order = Some(o as u8);
            }
            b"migratetype" => {
                let m = parse_dec(val).ok_or(ParseError::BadNumber("migratetype"))?;
                migratetype =
                    Some(u8::try_from(m).map_err(|_| ParseError::BadNumber("migratetype"))?);
            }
            _ => gfp = Some(val),
        }
    }
    let pfn = pfn.ok_or(ParseError::MissingField("pfn"))?;
    // A failed allocation is traced with pfn = -1 (printed as all ones) and a NULL page.
    let pfn = match pfn {
        PfnValue::Valid(p) if !(page_null && kind == EventKind::Alloc) => Some(p),
        _ => None,
    };
    if kind == EventKind::Free && order.is_none() {
        return Err(ParseError::MissingField("order"));
    }
    let (migratetype, gfp) = if kind == EventKind::Alloc {
        if order.is_none() {
            return Err(ParseError::MissingField("order"));
        }
        let mt = migratetype.ok_or(ParseError::MissingField("migratetype"))?;
        let g = gfp.ok_or(ParseError::MissingField("gfp_flags"))?;
        if g.is_empty() {
            return Err(ParseError::EmptyGfp);
        }
        (mt, g)
    } else {
        (0, &b""[..])
    };
    Ok(Line::Event(RawEvent {
        kind,
        cpu,
        ts_ns,
        pfn,
        order,
        migratetype,
        gfp,
    }))
}

/// Index of the first space in `s` (or its length), eight bytes at a time.
#[inline]
fn find_space(s: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while i + 8 <= s.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        // Bytes equal to b' ' become zero; the lowest zero byte is the first space.
        let x = u64::from_le_bytes(w) ^ (ONES * u64::from(b' '));
        let z = x.wrapping_sub(ONES) & !x & HIGH;
        if z != 0 {
            return i + (z.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    if i < s.len() && s.len() >= 8 {
        // The last bytes as one word overlapping the ones already seen.
        let j = s.len() - 8;
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[j..]);
        let x = u64::from_le_bytes(w) ^ (ONES * u64::from(b' '));
        let z = x.wrapping_sub(ONES) & !x & HIGH;
        return if z != 0 {
            j + (z.trailing_zeros() / 8) as usize
        } else {
            s.len()
        };
    }
    while i < s.len() && s[i] != b' ' {
        i += 1;
    }
    i
}

/// Index of the first byte of `s` that is not a space (or its length), eight bytes at a time.
#[inline]
fn find_non_space(s: &[u8]) -> usize {
    const SPACES: u64 = 0x2020_2020_2020_2020;
    let mut i = 0;
    while i + 8 <= s.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        // Spaces become zero bytes; the lowest non-zero byte is the first other byte.
        let x = u64::from_le_bytes(w) ^ SPACES;
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < s.len() && s[i] == b' ' {
        i += 1;
    }
    i
}

/// A pfn field value: a frame number or the kernel's `-1` for "no page".
#[derive(Clone, Copy, PartialEq, Eq)]
enum PfnValue {
    Valid(u64),
    Invalid,
}

/// `0x1a2b` (hex), `123` (decimal), `-1` or `0xffffffffffffffff` (no page).
fn parse_pfn(v: &[u8]) -> Option<PfnValue> {
    if v == b"-1" {
        return Some(PfnValue::Invalid);
    }
    let n = if let Some(hex) = v.strip_prefix(b"0x").or_else(|| v.strip_prefix(b"0X")) {
        parse_hex(hex)?
    } else {
        parse_dec(v)?
    };
    Some(if n == u64::MAX {
        PfnValue::Invalid
    } else {
        PfnValue::Valid(n)
    })
}

/// `408.542263` → ns; a timestamp without a dot is taken as a raw counter.
fn parse_timestamp(t: &[u8]) -> Option<u64> {
    match t.iter().position(|&c| c == b'.') {
        None => parse_dec(t),
        Some(dot) => {
            let secs = parse_dec(&t[..dot])?;
            let frac = &t[dot + 1..];
            if frac.is_empty() || frac.len() > 9 {
                return None;
            }
            let f = parse_dec(frac)?;
            let scale = 10u64.pow(9 - frac.len() as u32);
            secs.checked_mul(1_000_000_000)?.checked_add(f * scale)
        }
    }
}

/// Decimal digits only, no sign, no overflow.
fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

/// Hex digits only, no overflow.
fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        n = (n << 4) | u64::from(d);
    }
    Some(n)
}

/// Leading decimal digits and the rest.
fn take_digits(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    Some((parse_dec(&s[..n])?, &s[n..]))
}

/// Split off the last space-separated token (the input has no trailing whitespace).
fn split_last_token(s: &[u8]) -> Option<(&[u8], &[u8])> {
    if s.is_empty() {
        return None;
    }
    let sp = s.iter().rposition(|c| c.is_ascii_whitespace());
    Some(match sp {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (&s[..0], s),
    })
}

fn trim_end(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &s[..n]
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(s.len());
    &s[n..]
}

/// First occurrence of `needle` in `hay` (a short needle: scan for its first byte with memchr).
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    memchr::memchr_iter(first, hay).find(|&i| hay[i + 1..].starts_with(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(line: &str) -> RawEvent<'_> {
        match parse_line(line.as_bytes()) {
            Ok(Line::Event(e)) => e,
            other => panic!("{line:?} -> {other:?}"),
        }
    }

    #[test]
    fn alloc_line() {
        let e = ev("            bash-6604    [000] .....   408.542263: mm_page_alloc: page=00000000ec238fc3 pfn=0x12a27b order=0 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE|__GFP_COMP\n");
        assert_eq!(e.kind, EventKind::Alloc);
        assert_eq!(e.cpu, 0);
        assert_eq!(e.ts_ns, 408_542_263_000);
        assert_eq!(e.pfn, Some(0x12a27b));
        assert_eq!(e.order, Some(0));
        assert_eq!(e.migratetype, 1);
        assert_eq!(e.gfp, b"GFP_HIGHUSER_MOVABLE|__GFP_COMP");
    }

    #[test]
    fn task_names_with_spaces_dashes_and_placeholders() {
        for task in [
            "<...>",
            "opt cgu.0",
            "build-script-bu",
            "memfd:sealed-91",
            "a-b c-d",
            "x: y",
        ] {
            let line = format!("{task:>16}-6607    [001] ...2.   408.542447: mm_page_free_batched: page=00000000d39cce89 pfn=0x11b072 order=0");
            let e = ev(&line);
            assert_eq!(e.kind, EventKind::FreeBatched, "{task}");
            assert_eq!(e.cpu, 1);
            assert_eq!(e.pfn, Some(0x11b072));
        }
    }

    #[test]
    fn header_variants() {
        // No irq-flags column, and a record-tgid column.
        let e = ev("bash-1 [003] 1.5: mm_page_free: page=0 pfn=16 order=2");
        assert_eq!(
            (e.cpu, e.ts_ns, e.pfn, e.order),
            (3, 1_500_000_000, Some(16), Some(2))
        );
        let e = ev(
            "  bash-6604  (   6604) [000] d..1. 7.000001: mm_page_free: page=x pfn=0x10 order=1",
        );
        assert_eq!((e.cpu, e.ts_ns, e.pfn), (0, 7_000_001_000, Some(16)));
        // Raw counter clock.
        let e = ev("k-2 [001] .... 123456789: mm_page_free: page=x pfn=0x10 order=0");
        assert_eq!(e.ts_ns, 123_456_789);
    }

    #[test]
    fn failed_allocation_has_no_pfn() {
        let e = ev("t-1 [000] ..... 1.0: mm_page_alloc: page=(null) pfn=0xffffffffffffffff order=3 migratetype=0 gfp_flags=GFP_NOWAIT");
        assert_eq!(e.pfn, None);
    }

    #[test]
    fn special_lines() {
        assert_eq!(parse_line(b"   \n"), Ok(Line::Blank));
        assert_eq!(parse_line(b"# tracer: nop"), Ok(Line::Comment));
        assert_eq!(
            parse_line(b"CPU:1 [LOST 42 EVENTS]"),
            Ok(Line::Lost { cpu: 1, count: 42 })
        );
        assert_eq!(
            parse_line(b"  kworker/0:1-9 [000] ..... 5.0: sched_switch: prev_comm=a b: c"),
            Ok(Line::Other)
        );
    }

    #[test]
    fn malformed_lines() {
        assert_eq!(parse_line(b"garbage"), Err(ParseError::NoHeader));
        assert_eq!(
            parse_line(b"t-1 [000] ..... 1.0: mm_page_free: page=x order=0"),
            Err(ParseError::MissingField("pfn"))
        );
        assert_eq!(
            parse_line(b"t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0xzz order=0"),
            Err(ParseError::BadNumber("pfn"))
        );
        assert_eq!(
            parse_line(b"t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=11"),
            Err(ParseError::OrderOutOfRange(11))
        );
        assert_eq!(
            parse_line(b"t-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x1 order=0 migratetype=0"),
            Err(ParseError::MissingField("gfp_flags"))
        );
        assert_eq!(
            parse_line(b"t-1 [000] ..... 1.0.0: mm_page_free: pfn=0x1 order=0"),
            Err(ParseError::NoHeader)
        );
        // Truncated mid-line (e.g. a capture cut short).
        assert_eq!(
            parse_line(b"t-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x1 ord"),
            Err(ParseError::MissingField("order"))
        );
    }

    #[test]
    fn decimal_bounds() {
        assert_eq!(
            parse_dec(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_dec(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_dec(b"18446744073709551616"), None);
        assert_eq!(parse_dec(b"12a"), None);
        assert_eq!(parse_dec(b"1/"), None);
        assert_eq!(parse_dec(b""), None);
    }

    #[test]
    fn find_space_agrees_with_a_scan() {
        for len in 0..40 {
            for at in 0..=len {
                let mut v = vec![b'x'; len];
                if at < len {
                    v[at] = b' ';
                }
                // High bytes next to the space must not look like it.
                if at + 1 < len {
                    v[at + 1] = 0xa0;
                }
                if at > 0 {
                    v[at - 1] = 0x21;
                }
                assert_eq!(find_space(&v), at.min(len), "{len} {at}");
            }
        }
    }

    #[test]
    fn fields_in_any_order_and_unknown_fields() {
        let e = ev("t-1 [000] ..... 1.0: mm_page_alloc: gfp_flags=GFP_KERNEL x order=2 odd=1=2 pfn=0x20 migratetype=2 page=(null)x");
        assert_eq!((e.pfn, e.order, e.migratetype), (Some(0x20), Some(2), 2));
        assert_eq!(e.gfp, b"GFP_KERNEL");
        assert_eq!(
            parse_line(b"t-1 [000] ..... 1.0: mm_page_free: xpfn=0x1 order=0"),
            Err(ParseError::MissingField("pfn"))
        );
    }

    #[test]
    fn batched_without_order_is_accepted() {
        let e = ev("t-1 [000] ..... 1.0: mm_page_free_batched: page=x pfn=0x1");
        assert_eq!((e.kind, e.order), (EventKind::FreeBatched, None));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// One line of each event as the kernel prints it, and variants the fast path takes.
    const FAST_CASES: &[&str] = &[
        GOOD,
        "           <...>-6607    [001] .....   408.542447: mm_page_free: page=00000000d39cce89 pfn=0x11b072 order=0",
        "           <...>-6607    [001] ...2.   408.542447: mm_page_free_batched: page=00000000d39cce89 pfn=0x11b072 order=0",
        "bash-1 [003] 1.5: mm_page_free_batched: page=0 pfn=16",
        "t-1 [000] ..... 1.0: mm_page_alloc: page=(null) pfn=0xffffffffffffffff order=3 migratetype=0 gfp_flags=GFP_NOWAIT",
        "k-2 [001] .... 123456789: mm_page_free: page=x pfn=0X1F order=10\r",
    ];

    #[test]
    fn pfns_and_timestamps_at_their_limits() {
        for (pfn, want) in [
            ("1234567890123456789", Some(1_234_567_890_123_456_789)),
            ("0xfffffffffffffffe", Some(u64::MAX - 1)),
            ("0xffffffffffffffff", None),
            ("0", Some(0)),
        ] {
            let l = format!("t-1 [000] ..... 1.000001: mm_page_free: page=x pfn={pfn} order=0");
            let f = fast::parse(l.as_bytes()).unwrap_or_else(|| panic!("{l}"));
            assert_eq!(Ok(f), parse_general(l.as_bytes()), "{l}");
            let Line::Event(e) = f else { panic!() };
            assert_eq!(e.pfn, want, "{l}");
        }
        for (ts, ns) in [
            ("0.000000", 0),
            ("1.999999", 1_999_999_000),
            ("99999.123456", 99_999_123_456_000),
            ("18446744073.709551", 18_446_744_073_709_551_000),
        ] {
            let l = format!("t-1 [000] ..... {ts}: mm_page_free: page=x pfn=0x1 order=0");
            let f = fast::parse(l.as_bytes()).unwrap_or_else(|| panic!("{l}"));
            assert_eq!(Ok(f), parse_general(l.as_bytes()), "{l}");
            let Line::Event(e) = f else { panic!() };
            assert_eq!(e.ts_ns, ns, "{l}");
        }
    }

    #[test]
    fn fast_path_takes_the_kernel_layout() {
        for l in FAST_CASES {
            let f = fast::parse(l.as_bytes());
            assert!(f.is_some(), "{l}");
            assert_eq!(Ok(f.unwrap()), parse_general(l.as_bytes()), "{l}");
        }
        // And leaves the rest to the general parser (which may still accept them).
        for l in [
            "  a: b-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=0",
            "# t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=0",
            "\tt-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=0",
            "t-1 (  1) [000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=0",
            "t-1 [000]\t..... 1.0: mm_page_free: page=x pfn=0x1 order=0",
            "t-1 [000] ..... 1.0: mm_page_free: page=x pfn=-1 order=0",
            "t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=11",
            "t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x1  order=0",
            "t-1 [000] ..... 1.0: mm_page_free: page=x order=0 pfn=0x1",
            "t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=0 extra=1",
            "t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x1",
            "t-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x1 order=0 migratetype=0 gfp_flags=",
            "t-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x1 order=0 migratetype=0 gfp_flags=A B",
            "t-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x1 order=0 migratetype=256 gfp_flags=A",
            "t-1 [000] ..... 1.0000000001: mm_page_free: page=x pfn=0x1 order=0",
            "t-1 [000] ..... 18446744073.709551616: mm_page_free: page=x pfn=0x1 order=0",
            "t-x [000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=0",
            "t-1 [000] ..... 1.0: mm_page_free: page=x pfn=99999999999999999999 order=0",
            "t-1 [000] ..... 1.0: mm_page_free: page=x pfn=0x11111111111111111 order=0",
            "[000] ..... 1.0: mm_page_free: page=x pfn=0x1 order=0",
            "t-1 [000] ..... 1.0: sched_switch: prev=a",
        ] {
            assert_eq!(fast::parse(l.as_bytes()), None, "{l}");
        }
    }

    const GOOD: &str = "           <...>-6607    [001] .....   408.542370: mm_page_alloc: page=000000006f764635 pfn=0x104e3c order=0 migratetype=0 gfp_flags=GFP_KERNEL_ACCOUNT|__GFP_ZERO|__GFP_COMP";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes never panic.
        #[test]
        fn random_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_line(&b);
        }

        /// Random edits of a valid line never panic, and what parses keeps a sane order.
        #[test]
        fn mutated_lines(edits in proptest::collection::vec((0usize..200, any::<u8>(), 0u8..3), 1..8)) {
            let mut b = GOOD.as_bytes().to_vec();
            for (pos, byte, op) in edits {
                let p = pos % (b.len() + 1);
                match op {
                    0 => b.insert(p, byte),
                    1 if p < b.len() => { b.remove(p); }
                    _ if p < b.len() => b[p] = byte,
                    _ => {}
                }
            }
            if let Ok(Line::Event(e)) = parse_line(&b) {
                prop_assert!(e.order.is_none_or(|o| o <= MAX_TRACE_ORDER));
            }
        }

        /// The fast path accepts only what the general parser reads the same way: edits of
        /// each event's kernel layout (mostly still on the fast path) and random bytes.
        #[test]
        fn fast_path_agrees_with_the_general_parser(
            which in 0usize..FAST_CASES.len(),
            edits in proptest::collection::vec((0usize..200, prop_oneof![
                any::<u8>(), Just(b' '), Just(b':'), Just(b'-'), Just(b'#'), Just(b'\t'),
                Just(b'0'), Just(b'9'), Just(b'f'), Just(b'x'), Just(b'['), Just(b']'),
                Just(b'.'), Just(b'('), Just(b')'), Just(b'\r'), Just(b'='),
            ], 0u8..3), 0..4),
        ) {
            let mut b = FAST_CASES[which].as_bytes().to_vec();
            for (pos, byte, op) in edits {
                let p = pos % (b.len() + 1);
                match op {
                    0 => b.insert(p, byte),
                    1 if p < b.len() => { b.remove(p); }
                    _ if p < b.len() => b[p] = byte,
                    _ => {}
                }
            }
            if let Some(l) = fast::parse(&b) {
                prop_assert_eq!(Ok(l), parse_general(&b), "{:?}", String::from_utf8_lossy(&b));
            }
        }

        /// Random bytes: the same check.
        #[test]
        fn fast_path_agrees_on_random_bytes(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(l) = fast::parse(&b) {
                prop_assert_eq!(Ok(l), parse_general(&b));
            }
        }

        /// Random structured-ish lines made of trace tokens never panic.
        #[test]
        fn token_soup(toks in proptest::collection::vec(prop_oneof![
            Just("mm_page_alloc:"), Just("mm_page_free:"), Just("mm_page_free_batched:"), Just(": "),
            Just("pfn="), Just("order="), Just("0x"), Just("-"), Just("[001]"), Just("1.5:"),
            Just("gfp_flags="), Just("migratetype="), Just(" "), Just("99999999999999999999"),
            Just("ffffffffffffffffff"), Just("="), Just("CPU:"), Just("[LOST "), Just(" EVENTS]"),
        ], 0..30)) {
            let s: String = toks.concat();
            let _ = parse_line(s.as_bytes());
        }
    }
}
