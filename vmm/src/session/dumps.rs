//! Stage-2 dumps of a run: where they go, the exit dump and the ones the guest asks for.

use std::path::PathBuf;

use veil_abi::Status;

use super::{vmm_line, Session, MAX_GUEST_DUMPS};
use crate::dump::{DumpFormat, DumpInput, DumpSource};
use crate::run_types::GuestBackend;

/// Where stage-2 dumps go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DumpTarget {
    /// Standard output.
    Stdout,
    /// This file for the exit dump; guest-requested dump N goes to `<stem>.<N>.<ext>` beside it.
    File(PathBuf),
}

/// `--dump-ept` / `--dump-format`.
#[derive(Clone, Debug)]
pub struct DumpConfig {
    /// Where.
    pub target: DumpTarget,
    /// Text, JSON, SVG or PNG.
    pub format: DumpFormat,
}

impl DumpConfig {
    /// Whether guest-requested numbered dumps may be written: only beside a regular file (or
    /// one not created yet), never beside a device, FIFO or a symlink to one (`/dev/null` as
    /// the exit dump would otherwise scatter numbered files next to it).
    pub fn numbered_allowed(&self) -> bool {
        match &self.target {
            DumpTarget::Stdout => true,
            DumpTarget::File(p) => match std::fs::metadata(p) {
                Ok(m) => m.is_file(),
                Err(_) => std::fs::symlink_metadata(p).is_err(),
            },
        }
    }

    /// The path of guest-requested dump `n` (1-based), or None for stdout.
    pub fn numbered_path(&self, n: u32) -> Option<PathBuf> {
        match &self.target {
            DumpTarget::Stdout => None,
            DumpTarget::File(p) => {
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "veil-dump".into());
                let name = match p.extension() {
                    Some(ext) => format!("{stem}.{n}.{}", ext.to_string_lossy()),
                    None => format!("{stem}.{n}"),
                };
                Some(p.with_file_name(name))
            }
        }
    }
}

/// Writes a rendered dump in `format` to `path` (None: stdout) and, if `announce`, announces a
/// file on stderr ([`announce_dump`]); returns the name the report lists ("-" for stdout) and
/// the bytes written, or the error message. Shared by Veil guests and foreign kernels.
pub fn write_out(
    bytes: &[u8],
    format: DumpFormat,
    path: Option<&std::path::Path>,
    announce: bool,
) -> Result<(String, u64), String> {
    match path {
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            if format != DumpFormat::Png && !bytes.ends_with(b"\n") {
                let _ = out.write_all(b"\n");
            }
            Ok(("-".into(), bytes.len() as u64))
        }
        // Never blocks on a FIFO whose reader went away since the check before boot.
        Some(p) => replay::cli::create_output(p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, bytes))
            .map(|()| {
                if announce {
                    announce_dump(p, format, bytes.len() as u64);
                }
                (p.display().to_string(), bytes.len() as u64)
            })
            .map_err(|e| format!("cannot write dump {}: {e}", p.display())),
    }
}

/// Announces on stderr a dump file just written: `veil: wrote stage-2 dump to PATH (svg,
/// 312 KB)`, also with `--json`; silenced by [`replay::output::set_quiet`].
pub fn announce_dump(path: &std::path::Path, format: DumpFormat, bytes: u64) {
    replay::output::announce_written("stage-2 dump", path, format.name(), bytes);
}

/// Renders a dump for its file and writes it ([`write_out`]); a PNG that cannot be rendered
/// is an error message like a failed write.
pub fn render_and_write<B: crate::stage2::Stage2Backend>(
    input: &DumpInput<'_, B>,
    format: DumpFormat,
    path: Option<&std::path::Path>,
    announce: bool,
) -> Result<(String, u64), String> {
    let bytes = crate::dump::render_bytes(input, format).map_err(|e| {
        let name = path.map_or("-".into(), |p| p.display().to_string());
        format!("cannot write dump {name}: {e}")
    })?;
    write_out(&bytes, format, path, announce)
}

/// The exit dump's path for `target` (None: stdout).
pub fn exit_path(target: &DumpTarget) -> Option<PathBuf> {
    match target {
        DumpTarget::Stdout => None,
        DumpTarget::File(p) => Some(p.clone()),
    }
}

impl Session {
    /// Calls `f` with everything a dump is gathered from (KVM's stats are read now).
    pub(super) fn with_dump_input<T>(
        &self,
        reason: &str,
        f: impl FnOnce(&DumpInput<GuestBackend>) -> T,
    ) -> T {
        let stats = crate::kvm_stats::read_vm_stats(&self.vm).ok();
        let base = self.ram.host_base();
        let host_addr = move |gpa: u64| base + gpa;
        f(&DumpInput {
            source: DumpSource::Allocator(&self.alloc),
            owners: &[],
            kvm_stats: stats.as_deref(),
            reason,
            host_addr: &host_addr,
            mermap: self.mermap.as_ref(),
        })
    }

    fn render_and_write(
        &self,
        reason: &str,
        format: DumpFormat,
        path: Option<&std::path::Path>,
        announce: bool,
    ) -> Result<(String, u64), String> {
        self.with_dump_input(reason, |input| {
            render_and_write(input, format, path, announce)
        })
    }

    /// The exit-time dump as JSON.
    pub(super) fn dump_json(&self) -> serde_json::Value {
        self.with_dump_input("exit", crate::dump::to_json_value)
    }

    /// Writes a dump to `path` (announced on stderr if `announce`); its size if written.
    pub(super) fn write_dump(
        &mut self,
        reason: &str,
        path: Option<PathBuf>,
        announce: bool,
    ) -> Option<u64> {
        let cfg = self.dump.clone()?;
        match self.render_and_write(reason, cfg.format, path.as_deref(), announce) {
            Ok((name, bytes)) => {
                self.dumps.push(name);
                Some(bytes)
            }
            Err(msg) => {
                vmm_line(&msg);
                self.dump_errors.push(msg);
                None
            }
        }
    }

    /// Hc::Dump: writes dump number N; returns N (0 if dumps are off).
    pub(super) fn guest_dump(&mut self) -> Result<u64, Status> {
        let Some(cfg) = self.dump.clone() else {
            return Ok(0);
        };
        if self.guest_dumps >= MAX_GUEST_DUMPS {
            return Err(Status::BadState);
        }
        if !cfg.numbered_allowed() {
            if !self.numbered_refused {
                self.numbered_refused = true;
                vmm_line(
                    "guest-requested dumps are not written: the exit dump is not a regular file",
                );
            }
            return Ok(0);
        }
        self.guest_dumps += 1;
        let n = self.guest_dumps;
        let reason = format!("guest request #{n}");
        self.write_dump(&reason, cfg.numbered_path(n), true);
        Ok(u64::from(n))
    }
}
