//! The fast path of [`super::parse_line`]: a page-allocator event in the kernel's own layout,
//! parsed at the positions that layout puts its fields at.
//!
//! The kernel prints the three events as
//! `<task>-<pid> [<cpu>] <flags> <secs>.<frac>: mm_page_alloc: page=%p pfn=0x%lx order=%d
//! migratetype=%d gfp_flags=%s`, `...: mm_page_free: page=%p pfn=0x%lx order=%d` and
//! `...: mm_page_free_batched: page=%p pfn=0x%lx order=0` (older kernels: no `order=` on the
//! batched free, decimal pfns). This path finds the first colon once (`memchr`), requires the
//! event name right after it, reads the header from the right and the fields in that fixed
//! order, and parses the integers as it scans them. It returns `None` for anything it does not
//! recognise *exactly*, including every line the general parser would reject or read
//! differently (a task name with a colon, a record-tgid column, tabs, fields in another order,
//! extra fields, a pfn of `-1`, an out-of-range order, an overlong number, ...): the general
//! parser then decides. So a line it accepts gets the very result the general parser gives
//! (checked by a property test against it), and every malformed line is still counted and
//! reported by the general parser's typed error.

use super::{EventKind, Line, RawEvent, MAX_TRACE_ORDER};

/// Parse `line` if it is a page-allocator event in the kernel's layout (see the module doc).
#[inline]
pub(super) fn parse(line: &[u8]) -> Option<Line<'_>> {
    parse_at(line, memchr::memchr(b':', line)?)
}

/// [`parse`] given the index `c` of the line's first colon.
#[inline]
pub(super) fn parse_at(line: &[u8], c: usize) -> Option<Line<'_>> {
    let (head, body) = line.split_at(c);
    let (kind, start) = event(body)?;
    let (cpu, ts_ns) = header(head)?;
    // The general parser drops trailing whitespace (a `\r`, say) before anything else.
    fields(super::trim_end(body), start, kind, cpu, ts_ns)
}

/// Eight bytes of `b` at `i` as a little-endian word.
#[inline(always)]
pub(super) fn word(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// Eight bytes as a little-endian word (to compare with [`word`]).
pub(super) const fn w(s: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*s)
}

/// `: mm_page_<name>: page=`: the event and the index of the `page=` value (a word at a
/// time; overlapping words where a text is not a multiple of eight long).
#[inline(always)]
pub(super) fn event(body: &[u8]) -> Option<(EventKind, usize)> {
    if word(body, 0)? != w(b": mm_pag") {
        return None;
    }
    match word(body, 8)? {
        x if x == w(b"e_alloc:") && word(body, 14)? == w(b"c: page=") => {
            Some((EventKind::Alloc, 22))
        }
        x if x == w(b"e_free: ") && word(body, 13)? == w(b"e: page=") => {
            Some((EventKind::Free, 21))
        }
        x if x == w(b"e_free_b")
            && word(body, 16)? == w(b"atched: ")
            && word(body, 21)? == w(b"d: page=") =>
        {
            Some((EventKind::FreeBatched, 29))
        }
        _ => None,
    }
}

/// Whether `s[i..]` starts with `pat`.
#[inline(always)]
fn at(s: &[u8], i: usize, pat: &[u8]) -> bool {
    s.get(i..i + pat.len()) == Some(pat)
}

/// The fields after `page=` (at `i`), in the kernel's order, to the end of `b`.
#[inline]
fn fields(b: &[u8], mut i: usize, kind: EventKind, cpu: u32, ts_ns: u64) -> Option<Line<'_>> {
    // page=: only "(null)" matters (a failed allocation).
    let pe = match b.get(i..i + 17) {
        Some(v) if v[16] == b' ' && super::find_space(&v[..16]) == 16 => i + 16,
        _ => i + super::find_space(b.get(i..)?),
    };
    let page_null = &b[i..pe] == b"(null)";
    if !at(b, pe, b" pfn=") {
        return None;
    }
    i = pe + 5;
    let pfn;
    (pfn, i) = pfn_value(b, i)?;
    let mut order = None;
    let mut migratetype = 0;
    let mut gfp: &[u8] = b"";
    if i < b.len() || kind != EventKind::FreeBatched {
        if !at(b, i, b" order=") {
            return None;
        }
        let o;
        (o, i) = small_dec(b, i + 7)?;
        if o > u64::from(MAX_TRACE_ORDER) {
            return None;
        }
        order = Some(o as u8);
        if kind == EventKind::Alloc {
            if !at(b, i, b" migratetype=") {
                return None;
            }
            let m;
            (m, i) = small_dec(b, i + 13)?;
            migratetype = u8::try_from(m).ok()?;
            if !at(b, i, b" gfp_flags=") {
                return None;
            }
            gfp = &b[i + 11..];
            // The last field: a space in it would start another field.
            if gfp.is_empty() || has_space(gfp) {
                return None;
            }
        } else if i != b.len() {
            return None;
        }
    }
    Some(Line::Event(RawEvent {
        kind,
        cpu,
        ts_ns,
        // A failed allocation is traced with pfn = -1 (all ones) and a NULL page.
        pfn: pfn.filter(|_| !(page_null && kind == EventKind::Alloc)),
        order,
        migratetype,
        gfp,
    }))
}

/// Value of each hex digit, or 0xff.
const HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = match c as u8 {
            b'0'..=b'9' => c as u8 - b'0',
            b'a'..=b'f' => c as u8 - b'a' + 10,
            b'A'..=b'F' => c as u8 - b'A' + 10,
            _ => 0xff,
        };
        c += 1;
    }
    t
};

/// A pfn value at `i` up to the next space or the end: `0x` and 1-16 hex digits, or 1-19
/// decimal digits; `None` (a valid page: `Some(pfn)`) for the kernel's all-ones "no page".
/// Anything else (`-1`, more digits, another byte) is left to the general parser.
#[inline]
fn pfn_value(b: &[u8], i: usize) -> Option<(Option<u64>, usize)> {
    if at(b, i, b"0x") || at(b, i, b"0X") {
        if let Some((n, k)) = hex_word(b, i + 2) {
            return Some((Some(n), i + 2 + k));
        }
    }
    pfn_value_bytes(b, i)
}

/// Bytes with their high bit set where `v`'s bytes (all below 0x80) lie in `lo..=hi`.
#[inline(always)]
fn in_range(v: u64, lo: u8, hi: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    (v + ONES * u64::from(0x80 - lo)) & !(v + ONES * u64::from(0x7f - hi)) & (ONES << 7)
}

/// The common pfn, 1-7 hex digits and a space in the eight bytes at `i`, in one word: its
/// value and digit count; `None` for anything else (the byte loop decides then).
#[inline]
pub(super) fn hex_word(b: &[u8], i: usize) -> Option<(u64, usize)> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES << 7;
    let w = u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?);
    // The first space: the lowest zero byte of `w ^ spaces` (exact, no borrow between bytes).
    let x = w ^ (ONES * u64::from(b' '));
    let nonzero = (((x & !HIGH) + !HIGH) | x) & HIGH;
    let spaces = !nonzero & HIGH;
    let k = (spaces.trailing_zeros() / 8) as usize;
    if spaces == 0 || k == 0 {
        return None;
    }
    // The k digits (k <= 7), the other bytes zero.
    let d = w & ((1u64 << (8 * k)) - 1);
    let want = HIGH & ((1u64 << (8 * k)) - 1);
    if d & HIGH != 0
        || (in_range(d, b'0', b'9') | in_range(d | (ONES * 0x20), b'a', b'f')) & want != want
    {
        return None;
    }
    // Digit values ('0'-'9': the low nibble; letters: the low nibble + 9), most significant
    // first in memory: reversed into the low k bytes, then packed four bits each.
    let nib = (d & (ONES * 0x0f)) + ((d >> 6) & ONES) * 9;
    let mut r = nib.swap_bytes() >> (8 * (8 - k));
    r = (r | (r >> 4)) & 0x00ff_00ff_00ff_00ff;
    r = (r | (r >> 8)) & 0x0000_ffff_0000_ffff;
    r = (r | (r >> 16)) & 0xffff_ffff;
    Some((r, k))
}

/// [`pfn_value`] a byte at a time.
#[inline]
fn pfn_value_bytes(b: &[u8], mut i: usize) -> Option<(Option<u64>, usize)> {
    let mut n: u64 = 0;
    if at(b, i, b"0x") || at(b, i, b"0X") {
        i += 2;
        let s = i;
        while i < b.len() && b[i] != b' ' {
            let d = HEX[usize::from(b[i])];
            if d == 0xff {
                return None;
            }
            n = (n << 4) | u64::from(d);
            i += 1;
        }
        if i == s || i - s > 16 {
            return None;
        }
    } else {
        let s = i;
        while i < b.len() && b[i] != b' ' {
            let d = b[i].wrapping_sub(b'0');
            if d > 9 || i - s >= 19 {
                return None;
            }
            n = n * 10 + u64::from(d);
            i += 1;
        }
        if i == s {
            return None;
        }
    }
    Some(((n != u64::MAX).then_some(n), i))
}

/// 1-3 decimal digits at `i`, ending at a space or the end of `b`.
#[inline]
fn small_dec(b: &[u8], mut i: usize) -> Option<(u64, usize)> {
    let s = i;
    let mut n = 0u64;
    while i < b.len() && b[i] != b' ' {
        let d = b[i].wrapping_sub(b'0');
        if d > 9 || i - s >= 3 {
            return None;
        }
        n = n * 10 + u64::from(d);
        i += 1;
    }
    (i > s).then_some((n, i))
}

/// `<task>-<pid> [<cpu>] [<flags>] <timestamp>` (everything before the first colon), read from
/// the right as the general parser reads it; `None` for a record-tgid column, a tab, a line
/// starting with `#` (after spaces), or any number the general parser might read otherwise.
#[inline]
fn header(h: &[u8]) -> Option<(u32, u64)> {
    let (j, ts_ns) = match timestamp_usec(h) {
        Some(t) => t,
        None => timestamp_any(h)?,
    };
    let (k, cpu) = match flags_cpu_fixed(h, j) {
        Some(t) => t,
        None => flags_cpu_any(h, j)?,
    };
    // `task-pid`: the pid's digits right before the spaces, a dash before them.
    let mut p = rskip_spaces(h, k);
    let pe = p;
    while p > 0 && h[p - 1].is_ascii_digit() {
        p -= 1;
    }
    if p == pe || pe - p > 19 || p == 0 || h[p - 1] != b'-' {
        return None;
    }
    // A line whose first non-space byte is `#` is a comment; one starting with other
    // whitespace is left to the general parser.
    let first = super::find_non_space(h);
    if h[first] == b'#' || h[first].is_ascii_whitespace() {
        return None;
    }
    Some((cpu, ts_ns))
}

/// The kernel's `<secs>.<6 digits>` at the end of `h`: its start and nanoseconds (the six
/// digits in one word).
#[inline]
fn timestamp_usec(h: &[u8]) -> Option<(usize, u64)> {
    let n = h.len();
    if n < 8 || h[n - 7] != b'.' {
        return None;
    }
    let w = u64::from_le_bytes(h[n - 8..].try_into().ok()?);
    // The two bytes before the digits become leading zeros.
    let frac = digits8((w & !0xffff) | 0x3030)?;
    let se = n - 7;
    let mut j = se;
    while j > 0 && h[j - 1].is_ascii_digit() {
        j -= 1;
    }
    if j == se || se - j > 19 {
        return None;
    }
    Some((
        j,
        dec(&h[j..se])
            .checked_mul(1_000_000_000)?
            .checked_add(frac * 1000)?,
    ))
}

/// Eight ASCII digits in a little-endian word (the most significant first) as a number.
#[inline(always)]
pub(super) fn digits8(w: u64) -> Option<u64> {
    const HIGH: u64 = 0xf0f0_f0f0_f0f0_f0f0;
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    // Every byte 0x30..=0x39: high nibble 3, and adding 6 does not carry into it.
    if w & HIGH != ZEROS || (w.wrapping_add(0x0606_0606_0606_0606)) & HIGH != ZEROS {
        return None;
    }
    let v = w - ZEROS;
    let v = (v * 10) + (v >> 8);
    let v = (v & 0x0000_00ff_0000_00ff)
        .wrapping_mul(100 + (1_000_000 << 32))
        .wrapping_add(((v >> 16) & 0x0000_00ff_0000_00ff).wrapping_mul(1 + (10_000 << 32)))
        >> 32;
    Some(v)
}

/// Any timestamp the general parser takes (`<secs>.<1-9 digits>` or a raw counter).
fn timestamp_any(h: &[u8]) -> Option<(usize, u64)> {
    let mut j = h.len();
    while j > 0 && h[j - 1].is_ascii_digit() {
        j -= 1;
    }
    let ts_ns = if j > 0 && h[j - 1] == b'.' {
        let frac = &h[j..];
        j -= 1;
        let se = j;
        while j > 0 && h[j - 1].is_ascii_digit() {
            j -= 1;
        }
        let secs = &h[j..se];
        if frac.is_empty() || frac.len() > 9 || secs.is_empty() || secs.len() > 19 {
            return None;
        }
        let scale = 10u64.pow(9 - frac.len() as u32);
        dec(secs)
            .checked_mul(1_000_000_000)?
            .checked_add(dec(frac) * scale)?
    } else {
        let t = &h[j..];
        if t.is_empty() || t.len() > 19 {
            return None;
        }
        dec(t)
    };
    Some((j, ts_ns))
}

/// The kernel's ` [ddd] fffff ` before the timestamp starting at `j` (after its padding):
/// the start of `[` and the cpu.
#[inline]
fn flags_cpu_fixed(h: &[u8], j: usize) -> Option<(usize, u32)> {
    let e = rskip_spaces(h, j);
    if e == j || e < 12 {
        return None;
    }
    let f = &h[e - 12..e];
    if f[0] != b' '
        || f[1] != b'['
        || !f[2..5].iter().all(u8::is_ascii_digit)
        || f[5] != b']'
        || f[6] != b' '
        || f[7] == b'['
        || !f[7..12].iter().all(|&c| c > b' ')
    {
        return None;
    }
    Some((e - 11, dec(&f[2..5]) as u32))
}

/// Any flags-and-cpu columns the general parser takes: the flags token is optional, the cpu
/// any number of digits in brackets.
fn flags_cpu_any(h: &[u8], j: usize) -> Option<(usize, u32)> {
    let (mut k, mut tok) = token_before(h, j)?;
    if tok[0] != b'[' {
        (k, tok) = token_before(h, k)?;
    }
    let inner = tok.strip_prefix(b"[")?.strip_suffix(b"]")?;
    if inner.is_empty() || inner.len() > 9 || !inner.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((k, dec(inner) as u32))
}

/// The token ending at `j` (where `h[j]` is a space), after the spaces before `j`: its start and
/// the token. `None` unless it is preceded by a space (so it is not the line's start) and
/// the separators are plain spaces.
#[inline]
fn token_before(h: &[u8], j: usize) -> Option<(usize, &[u8])> {
    if j == 0 || h[j - 1] != b' ' {
        return None;
    }
    let mut e = j - 1;
    while e > 0 && h[e - 1] == b' ' {
        e -= 1;
    }
    let mut s = e;
    while s > 0 && h[s - 1] > b' ' {
        s -= 1;
    }
    if s == e || s == 0 || h[s - 1] != b' ' {
        return None;
    }
    Some((s, &h[s..e]))
}

/// Decimal digits the caller checked (at most 19, all digits) to a number.
#[inline]
pub(super) fn dec(s: &[u8]) -> u64 {
    let mut n = 0u64;
    let mut i = 0;
    while i < s.len() {
        n = n * 10 + u64::from(s[i].wrapping_sub(b'0'));
        i += 1;
    }
    n
}

/// Whether `s` has a space, eight bytes at a time without an early exit (`s` is short: the
/// gfp flags).
#[inline]
fn has_space(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES << 7;
    let n = s.len();
    if n < 8 {
        return s.contains(&b' ');
    }
    let word = |i: usize| {
        let w =
            u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes")) ^ (ONES * u64::from(b' '));
        // Non-zero iff some byte of `w` is zero (a space): exact for "any", which is all
        // that is asked (a borrow can only mark bytes above a real zero byte).
        w.wrapping_sub(ONES) & !w & HIGH
    };
    // The last eight bytes, overlapping the words before them.
    let mut acc = word(n - 8);
    let mut i = 0;
    while i + 8 <= n {
        acc |= word(i);
        i += 8;
    }
    acc != 0
}

/// `e` moved left past the spaces before it, eight bytes at a time.
#[inline]
fn rskip_spaces(h: &[u8], mut e: usize) -> usize {
    const SPACES: u64 = 0x2020_2020_2020_2020;
    while e >= 8 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&h[e - 8..e]);
        // Spaces become zero bytes; the highest non-zero byte is the last other byte.
        let x = u64::from_le_bytes(w) ^ SPACES;
        if x != 0 {
            return e - (x.leading_zeros() / 8) as usize;
        }
        e -= 8;
    }
    while e > 0 && h[e - 1] == b' ' {
        e -= 1;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// The word-at-a-time space test agrees with a scan.
        #[test]
        fn has_space_agrees_with_a_scan(b in proptest::collection::vec(prop_oneof![
            Just(b' '), Just(0xa0), Just(0x21), Just(0x1f), any::<u8>()], 0..40)) {
            prop_assert_eq!(has_space(&b), b.contains(&b' '));
        }

        /// The word-at-a-time pfn reads what the byte loop reads.
        #[test]
        fn hex_word_agrees_with_the_byte_loop(
            digits in proptest::collection::vec(prop_oneof![
                Just(b'0'), Just(b'9'), Just(b'a'), Just(b'f'), Just(b'A'), Just(b'F'),
                Just(b'g'), Just(b'G'), Just(b'/'), Just(b':'), Just(b'@'), Just(b'`'),
                Just(b' '), Just(0x10), Just(0x19), Just(0xb0), any::<u8>(), 0x30u8..0x3a,
                0x61u8..0x67,
            ], 0..20),
            prefix in prop_oneof![Just(&b"0x"[..]), Just(&b"0X"[..]), Just(&b""[..])],
        ) {
            let mut b = prefix.to_vec();
            b.extend_from_slice(&digits);
            prop_assert_eq!(pfn_value(&b, 0), pfn_value_bytes(&b, 0), "{:?}", String::from_utf8_lossy(&b));
        }
    }
}
