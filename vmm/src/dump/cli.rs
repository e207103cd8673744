//! `veil dump ...`: commands on dump files.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::diff;

/// `veil dump` options.
#[derive(Debug, Args, Clone)]
pub struct DumpArgs {
    /// What to do with dump files.
    #[command(subcommand)]
    pub command: DumpCommand,
}

/// The `veil dump` subcommands.
#[derive(Debug, Subcommand, Clone)]
pub enum DumpCommand {
    /// Compare two JSON stage-2 dumps (`veil run --dump-ept FILE.json`, or the numbered dumps
    /// a guest requests beside it): the GPA ranges whose state, freetype, owner or permission
    /// in either ASI view changed, the memslots added and removed, and every counter that
    /// changed (allocator, stage-2 engine, totals, KVM statistics).
    #[command(after_long_help = DIFF_AFTER)]
    Diff(DiffArgs),
}

const DIFF_AFTER: &str = "\
Memslot ids are not compared (the slots backend renumbers them on every split): a memslot is
added or removed when no slot of the other dump has its GPA, length and read-only flag.

Exit codes: 0 compared (whether or not the dumps differ); 2 a file cannot be read, is not JSON,
is JSON but not a stage-2 dump, has another dump schema version, or the two dumps have
different RAM, page or pageblock sizes.

Examples:
  veil run --dump-ept d.json --tests flip_unmapped   (writes d.json, d.1.json, ... )
  veil dump diff d.1.json d.json
  veil dump diff before.json after.json --json";

/// `veil dump diff` options.
#[derive(Debug, Args, Clone)]
pub struct DiffArgs {
    /// The first (older) JSON dump.
    #[arg(value_name = "A.json")]
    pub a: PathBuf,
    /// The second (newer) JSON dump.
    #[arg(value_name = "B.json")]
    pub b: PathBuf,
    /// Print the diff as one JSON document: a, b (path, reason, backend, ASI view),
    /// format_version, ram_size, changed[] ({ start, end, pages, old, new }, old/new:
    /// { state, freetype, owner?, restricted, full } or null), changed_pages,
    /// memslots_added[], memslots_removed[], counters[] ({ section, name, old, new, delta }).
    #[arg(long)]
    pub json: bool,
}

/// Runs `veil dump ...`; returns the exit code (errors: exit code 2).
pub fn run(args: &DumpArgs) -> Result<i32, diff::DiffError> {
    match &args.command {
        DumpCommand::Diff(d) => {
            let a = diff::read(&d.a)?;
            let b = diff::read(&d.b)?;
            let r = diff::diff(
                &d.a.display().to_string(),
                &a,
                &d.b.display().to_string(),
                &b,
            )?;
            let out = if d.json {
                diff::render_json(&r)
            } else {
                diff::render_text(&r)
            };
            use std::io::Write;
            // A closed stdout (`| head`) ends the output, not the command.
            let _ = std::io::stdout().lock().write_all(out.as_bytes());
            Ok(0)
        }
    }
}
