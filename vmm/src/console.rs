//! The guest console: a 16550 UART (vm-superio) on [`SERIAL_PORT`] whose output goes to stdout,
//! stderr, a file or an in-memory buffer, kept apart from the VMM's own `veil: ` lines.

use std::io::{self, LineWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use veil_abi::SERIAL_PORT;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// Where guest console output goes.
#[derive(Clone, Debug, Default)]
pub enum ConsoleSink {
    /// The VMM's stdout (default).
    #[default]
    Stdout,
    /// The VMM's stderr (used with `--json`, which owns stdout).
    Stderr,
    /// A file, created or truncated.
    File(PathBuf),
    /// An in-memory buffer (library users and tests).
    Buffer(Arc<Mutex<Vec<u8>>>),
    /// Discarded.
    Null,
}

/// A writer for a [`ConsoleSink`].
pub struct ConsoleWriter(Box<dyn Write + Send>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

struct BufferWriter(Arc<Mutex<Vec<u8>>>);
impl Write for BufferWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.lock() {
            Ok(mut v) => v.extend_from_slice(buf),
            Err(p) => p.into_inner().extend_from_slice(buf),
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ConsoleSink {
    /// Opens the sink.
    pub fn open(&self) -> io::Result<ConsoleWriter> {
        Ok(ConsoleWriter(match self {
            ConsoleSink::Stdout => Box::new(io::stdout()),
            ConsoleSink::Stderr => Box::new(io::stderr()),
            ConsoleSink::File(p) => Box::new(LineWriter::new(replay::cli::create_output(p)?)),
            ConsoleSink::Buffer(b) => Box::new(BufferWriter(b.clone())),
            ConsoleSink::Null => Box::new(io::sink()),
        }))
    }
}

/// An interrupt line that goes nowhere: the guest polls the UART.
pub struct NoIrq;
impl Trigger for NoIrq {
    type E = ();
    fn trigger(&self) -> Result<(), ()> {
        Ok(())
    }
}

/// The UART and its output.
pub struct Console {
    serial: Serial<NoIrq, NoEvents, ConsoleWriter>,
}

impl Console {
    /// A UART writing to `sink`.
    pub fn new(sink: &ConsoleSink) -> io::Result<Console> {
        Ok(Console {
            serial: Serial::new(NoIrq, sink.open()?),
        })
    }

    /// Whether `port` belongs to the UART.
    pub fn owns(port: u16) -> bool {
        (SERIAL_PORT..SERIAL_PORT + 8).contains(&port)
    }

    /// A guest `out` to the UART.
    pub fn write(&mut self, port: u16, value: u8) {
        let _ = self.serial.write((port - SERIAL_PORT) as u8, value);
    }

    /// A guest `in` from the UART.
    pub fn read(&mut self, port: u16) -> u8 {
        self.serial.read((port - SERIAL_PORT) as u8)
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}
