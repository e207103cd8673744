//! Streaming input: a plain or gzip trace (told apart by its magic bytes, not its name), or
//! standard input for `-`, read line by line without holding the text.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::stop::StopAtRequest;

/// Longest line the reader accepts; longer lines are reported as malformed and skipped.
pub const MAX_LINE: usize = 64 * 1024;

/// Read buffer size.
pub(crate) const BUF: usize = 256 * 1024;

/// Open `path` (or standard input for `-`) for the sequential loader
/// ([`crate::trace::load_with_progress`]), transparently decompressing gzip (a gzip file is
/// decompressed on a thread of its own, see [`Threaded`]). `veil replay` uses
/// [`open_input_parallel`].
pub fn open_input(path: &Path) -> io::Result<Box<dyn BufRead>> {
    // A stop request ends the input at the innermost read (an interrupted pipe read) and at the
    // outermost one (a gzip stream cut short is not an error then).
    if path.as_os_str() == "-" {
        let raw: Box<dyn Read> = Box::new(StopAtRequest(io::stdin().lock()));
        return Ok(Box::new(StopAtRequest(from_reader(raw)?)));
    }
    let raw: Box<dyn Read + Send> = Box::new(StopAtRequest(File::open(path)?));
    Ok(Box::new(StopAtRequest(from_reader_threaded(raw)?)))
}

/// Open `path` (or standard input for `-`) for [`crate::trace::load_parallel`], which reads
/// it on a thread of its own: the input as a `Read`, gzip decompressed by [`decoding`]. This
/// is what `veil replay` loads.
pub fn open_input_parallel(path: &Path) -> io::Result<Box<dyn Read + Send>> {
    // A stop request ends the input at the innermost read and at the outermost one, as in
    // [`open_input`].
    let raw: Box<dyn Read + Send> = if path.as_os_str() == "-" {
        Box::new(StopAtRequest(io::stdin()))
    } else {
        Box::new(StopAtRequest(File::open(path)?))
    };
    Ok(Box::new(StopAtRequest(decoding(raw)?)))
}

/// `raw`, decompressed when it starts with the gzip magic `1f 8b` (on the calling thread:
/// [`crate::trace::load_parallel`] runs it on its reader thread). Reads go straight to the
/// decoder, no buffer in between.
pub fn decoding(raw: Box<dyn Read + Send>) -> io::Result<Box<dyn Read + Send>> {
    Ok(Box::new(decode(raw)?))
}

/// A reader with its first bytes, read to tell gzip apart, put back in front.
type Peeked<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// An input told apart by its first bytes: as it is, or through the gzip decoder.
enum Decoded<R: Read> {
    Plain(Peeked<R>),
    Gzip(Box<GzipInput<MultiGzDecoder<BufReader<Peeked<R>>>>>),
}

impl<R: Read> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
        }
    }
}

/// `raw`, decompressed when it starts with the gzip magic `1f 8b` (the one place every
/// opener tells gzip apart).
fn decode<R: Read>(raw: R) -> io::Result<Decoded<R>> {
    let (gz, joined) = peek_gzip(raw)?;
    Ok(if gz {
        let inner = BufReader::with_capacity(BUF, joined);
        Decoded::Gzip(Box::new(GzipInput(MultiGzDecoder::new(inner))))
    } else {
        Decoded::Plain(joined)
    })
}

/// Reads the first bytes of `raw` (up to 2: a pipe may hand them out one at a time); whether
/// they are the gzip magic, and a reader that gives them back first.
fn peek_gzip<R: Read>(mut raw: R) -> io::Result<(bool, Peeked<R>)> {
    let mut head = [0u8; 2];
    let mut got = 0;
    while got < head.len() {
        match raw.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let gz = got == 2 && head == [0x1f, 0x8b];
    Ok((gz, io::Cursor::new(head[..got].to_vec()).chain(raw)))
}

/// [`from_reader`], with gzip decompressed on its own thread (the parse runs meanwhile).
pub fn from_reader_threaded(raw: Box<dyn Read + Send>) -> io::Result<Box<dyn BufRead>> {
    Ok(match decode(raw)? {
        gz @ Decoded::Gzip(_) => Box::new(Threaded::spawn(gz)),
        plain => Box::new(BufReader::with_capacity(BUF, plain)),
    })
}

/// Chunks a [`Threaded`] reader keeps in flight.
const IN_FLIGHT: usize = 4;

/// A reader run on a thread of its own: it fills `BUF`-sized chunks and hands them over a
/// bounded channel (empty chunks come back for reuse), so decompression and parsing overlap.
/// Dropping the reader ends the thread at its next chunk.
pub struct Threaded {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    back: std::sync::mpsc::SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Threaded {
    /// Start reading `r` on a new thread.
    pub fn spawn<R: Read + Send + 'static>(mut r: R) -> Threaded {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(IN_FLIGHT);
        let (back, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT + 2);
        std::thread::spawn(move || loop {
            let mut buf = spare.try_recv().unwrap_or_default();
            buf.resize(BUF, 0);
            let mut n = 0;
            while n < buf.len() {
                match r.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
            buf.truncate(n);
            if tx.send(Ok(buf)).is_err() || n == 0 {
                return;
            }
        });
        Threaded {
            rx,
            back,
            cur: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for Threaded {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Threaded {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.cur.len() && !self.done {
            let used = std::mem::take(&mut self.cur);
            let _ = self.back.try_send(used);
            self.pos = 0;
            match self.rx.recv() {
                Ok(Ok(b)) if b.is_empty() => self.done = true,
                Ok(Ok(b)) => self.cur = b,
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("the trace reader thread ended early"));
                }
            }
        }
        Ok(&self.cur[self.pos.min(self.cur.len())..])
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

/// Wrap any reader, decompressing it when it starts with the gzip magic `1f 8b`.
pub fn from_reader<'a>(raw: Box<dyn Read + 'a>) -> io::Result<Box<dyn BufRead + 'a>> {
    Ok(Box::new(BufReader::with_capacity(BUF, decode(raw)?)))
}

/// A gzip stream could not be decoded: the file is truncated, corrupt, or has data after its
/// last gzip member. The decoder's own error is the source.
#[derive(Debug, thiserror::Error)]
#[error("corrupt or truncated gzip input (or data after the last gzip member)")]
pub struct GzipError(#[source] pub io::Error);

/// A gzip decoder whose read errors say that the gzip input is at fault (flate2's bare
/// "unexpected end of file" or "invalid gzip header" do not).
struct GzipInput<R>(R);

impl<R: Read> Read for GzipInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::Interrupted => e,
            kind => io::Error::new(kind, GzipError(e)),
        })
    }
}

/// Result of reading one line.
pub enum NextLine<'a> {
    /// A line (without its newline).
    Line(&'a [u8]),
    /// A line longer than [`MAX_LINE`] was skipped.
    TooLong,
    /// Still inside a line longer than [`MAX_LINE`]: one more buffer of it was dropped (so that
    /// input without newlines, `/dev/zero` say, does not keep the reader from its caller).
    Skipping,
    /// End of input.
    Eof,
}

/// Reads lines into a buffer of its own, refilled with one large `read` at a time (so the
/// layers below, stop checks included, run once per 256 KiB, not once per line), handing out
/// slices of it. A line longer than [`MAX_LINE`] bytes is skipped without being kept.
pub struct LineReader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    eof: bool,
    /// Discarding the rest of a too-long line.
    skipping: bool,
    /// Bytes read from `inner` so far.
    read: u64,
}

impl<R: Read> LineReader<R> {
    /// Wrap a reader.
    pub fn new(inner: R) -> Self {
        LineReader {
            inner,
            buf: vec![0; BUF + MAX_LINE + 1],
            start: 0,
            end: 0,
            eof: false,
            skipping: false,
            read: 0,
        }
    }

    /// Bytes of input consumed so far (handed out as lines or skipped).
    pub fn consumed(&self) -> u64 {
        self.read - (self.end - self.start) as u64
    }

    /// Read more bytes after `end`, moving the unread ones to the front first.
    fn refill(&mut self) -> io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    self.read += n as u64;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Read the next line.
    pub fn next_line(&mut self) -> io::Result<NextLine<'_>> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
                let s = self.start;
                self.start += i + 1;
                if std::mem::take(&mut self.skipping) || i > MAX_LINE {
                    return Ok(NextLine::TooLong);
                }
                return Ok(NextLine::Line(&self.buf[s..s + i]));
            }
            if self.end - self.start > MAX_LINE || (self.skipping && self.end > self.start) {
                // No newline within MAX_LINE bytes: drop what is buffered, skip to the next one.
                let was = std::mem::replace(&mut self.skipping, true);
                self.start = self.end;
                if was {
                    return Ok(NextLine::Skipping);
                }
            }
            if self.eof {
                if std::mem::take(&mut self.skipping) {
                    return Ok(NextLine::TooLong);
                }
                if self.start < self.end {
                    let s = self.start;
                    self.start = self.end;
                    return Ok(NextLine::Line(&self.buf[s..self.end]));
                }
                return Ok(NextLine::Eof);
            }
            self.refill()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn lines(data: Vec<u8>) -> Vec<String> {
        let r = from_reader(Box::new(io::Cursor::new(data))).unwrap();
        let mut lr = LineReader::new(r);
        let mut out = Vec::new();
        loop {
            match lr.next_line().unwrap() {
                NextLine::Line(l) => out.push(String::from_utf8_lossy(l).into_owned()),
                NextLine::TooLong => out.push("<too long>".into()),
                NextLine::Skipping => {}
                NextLine::Eof => break,
            }
        }
        out
    }

    #[test]
    fn plain_and_gzip_give_the_same_lines() {
        let text = b"a b\nc\n\nlast-no-newline".to_vec();
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&text).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gz[..2], [0x1f, 0x8b]);
        let want = vec!["a b", "c", "", "last-no-newline"];
        assert_eq!(lines(text), want);
        assert_eq!(lines(gz), want);
    }

    #[test]
    fn threaded_gzip_gives_the_same_lines_and_errors() {
        let text: Vec<u8> = (0..100_000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&text).unwrap();
        let gz = enc.finish().unwrap();
        let read = |data: Vec<u8>| -> io::Result<Vec<u8>> {
            let mut r = from_reader_threaded(Box::new(io::Cursor::new(data)))?;
            let mut out = Vec::new();
            r.read_to_end(&mut out)?;
            Ok(out)
        };
        assert_eq!(read(gz.clone()).unwrap(), text);
        assert_eq!(read(text.clone()).unwrap(), text);
        // A truncated stream is the gzip error, from the thread.
        let e = read(gz[..gz.len() / 2].to_vec()).unwrap_err();
        assert!(e.get_ref().is_some_and(|i| i.is::<GzipError>()), "{e}");
    }

    #[test]
    fn long_lines_are_capped() {
        let mut text = vec![b'x'; MAX_LINE + 10];
        text.extend_from_slice(b"\nok\n");
        assert_eq!(lines(text), vec!["<too long>", "ok"]);
    }

    #[test]
    fn input_without_newlines_comes_back_buffer_by_buffer() {
        // An endless reader of one byte value: the reader hands control back while skipping.
        let mut lr = LineReader::new(io::repeat(b'x'));
        let mut skips = 0;
        while skips < 10 {
            match lr.next_line().unwrap() {
                NextLine::Skipping => skips += 1,
                NextLine::Line(_) | NextLine::TooLong | NextLine::Eof => panic!("no line ends"),
            }
        }
        assert!(lr.consumed() >= 10 * BUF as u64, "{}", lr.consumed());
        // And a very long line still counts once.
        let mut text = vec![b'y'; 5 * BUF];
        text.extend_from_slice(b"\nok");
        assert_eq!(lines(text), vec!["<too long>", "ok"]);
    }

    #[test]
    fn tiny_and_empty_inputs() {
        assert!(lines(Vec::new()).is_empty());
        assert_eq!(lines(b"\x1f".to_vec()), vec!["\u{1f}"]);
    }

    /// A reader that returns one byte per read, like a slow pipe.
    struct Trickle(Vec<u8>, usize);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1 >= self.0.len() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[self.1];
            self.1 += 1;
            Ok(1)
        }
    }

    #[test]
    fn gzip_detected_on_a_trickling_pipe() {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"one\ntwo\n").unwrap();
        let gz = enc.finish().unwrap();
        let r = from_reader(Box::new(Trickle(gz, 0))).unwrap();
        let mut lr = LineReader::new(r);
        let mut got = Vec::new();
        while let NextLine::Line(l) = lr.next_line().unwrap() {
            got.push(String::from_utf8_lossy(l).into_owned());
        }
        assert_eq!(got, vec!["one", "two"]);
    }
}
