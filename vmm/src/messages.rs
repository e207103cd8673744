//! The shape of the `veil` binary's stderr lines that do not come from the VMM's own code:
//! clap's usage errors and `log` records (`RUST_LOG`) are written as the VMM's messages are,
//! `veil: error: ...`, `veil: debug: module: ...`.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::{Duration, Instant};

use log::Level;

/// Parses the command line; on a usage error prints clap's message with the `veil: ` prefix
/// (its usage and tip lines kept) and exits with clap's code (2). `--help` and `--version` are
/// printed and exit 0 exactly as clap does it.
pub fn parse_cli() -> crate::cli::Cli {
    use clap::Parser;
    match crate::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if !is_usage_error(&e) {
                e.exit();
            }
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let text = usage_error_text(&e, colour);
            let _ = std::io::stderr().write_all(text.as_bytes());
            std::process::exit(e.exit_code());
        }
    }
}

/// Whether clap's "error" is a real one (not `--help`/`--version`, nor the help clap prints
/// for a bare `veil`, which it treats as an error of its own kind).
pub fn is_usage_error(e: &clap::Error) -> bool {
    use clap::error::ErrorKind;
    !matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    )
}

/// clap's rendering of `e` with the `veil: ` prefix: `veil: error: unexpected argument ...`,
/// then clap's usage and tip lines as they are (ANSI colours only if `colour`).
pub fn usage_error_text(e: &clap::Error, colour: bool) -> String {
    let r = e.render();
    let body = if colour {
        r.ansi().to_string()
    } else {
        r.to_string()
    };
    let mut s = format!("veil: {body}");
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// The word a log level is spelled with, as the VMM's own messages spell theirs.
pub fn level_word(level: Level) -> &'static str {
    match level {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

/// One log line: `veil: debug: stage2::mprotect: message` (the `vmm::` of Veil's own modules
/// left out; other crates keep their names, `kvm_ioctls: ...`), with `[+1.234567s] ` after the
/// prefix when `elapsed` is given. `style` wraps the level word (empty without colours).
pub fn log_line(
    level: Level,
    target: &str,
    msg: &std::fmt::Arguments<'_>,
    style: (&str, &str),
    elapsed: Option<Duration>,
) -> String {
    let mut s = String::from("veil: ");
    if let Some(t) = elapsed {
        let _ = write!(s, "[+{:.6}s] ", t.as_secs_f64());
    }
    let _ = write!(s, "{}{}{}: ", style.0, level_word(level), style.1);
    let module = target.strip_prefix("vmm::").unwrap_or(target);
    if module != "vmm" && !module.is_empty() {
        let _ = write!(s, "{module}: ");
    }
    let _ = write!(s, "{msg}");
    s
}

/// Installs the logger: `RUST_LOG` filters as usual (default `warn`); lines look like
/// [`log_line`]'s. No colours unless `RUST_LOG_STYLE` asks (`always`, or `auto` for a
/// terminal); `VEIL_LOG_TIME=1` adds the time since start to each line.
pub fn init_logger() {
    let env = env_logger::Env::default().default_filter_or("warn");
    let mut b = env_logger::Builder::from_env(env);
    if std::env::var_os("RUST_LOG_STYLE").is_none() {
        b.write_style(env_logger::WriteStyle::Never);
    }
    let start = Instant::now();
    let timed = std::env::var_os("VEIL_LOG_TIME").is_some_and(|v| !v.is_empty() && v != "0");
    b.format(move |buf, r| {
        let style = buf.default_level_style(r.level());
        let (on, off) = (style.render().to_string(), style.render_reset().to_string());
        let line = log_line(
            r.level(),
            r.target(),
            r.args(),
            (&on, &off),
            timed.then(|| start.elapsed()),
        );
        writeln!(buf, "{line}")
    });
    b.init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn usage_errors_get_the_prefix_and_keep_usage_and_tip() {
        let e = crate::cli::Cli::try_parse_from(["veil", "run", "--bogus"]).unwrap_err();
        assert!(is_usage_error(&e));
        assert_eq!(e.exit_code(), 2);
        let t = usage_error_text(&e, false);
        assert!(
            t.starts_with("veil: error: unexpected argument '--bogus' found\n"),
            "{t}"
        );
        assert!(t.contains("\nUsage: veil run [OPTIONS]\n"), "{t}");
        assert!(t.ends_with("For more information, try '--help'.\n"), "{t}");
        assert!(!t.contains('\x1b'), "{t}");
        let c = usage_error_text(&e, true);
        assert!(c.starts_with("veil: \x1b["), "{c:?}");
    }

    #[test]
    fn help_and_version_are_not_errors() {
        for a in [
            &["veil", "--help"][..],
            &["veil", "--version"],
            &["veil", "run", "-h"],
        ] {
            let e = crate::cli::Cli::try_parse_from(a).unwrap_err();
            assert!(!is_usage_error(&e), "{a:?}");
            assert_eq!(e.exit_code(), 0, "{a:?}");
        }
    }

    #[test]
    fn log_lines_look_like_the_vmms() {
        let l =
            |lvl, target: &str, t| log_line(lvl, target, &format_args!("x = {}", 1), ("", ""), t);
        assert_eq!(
            l(Level::Debug, "vmm::stage2::mprotect", None),
            "veil: debug: stage2::mprotect: x = 1"
        );
        assert_eq!(l(Level::Warn, "vmm", None), "veil: warning: x = 1");
        assert_eq!(
            l(Level::Info, "kvm_ioctls", None),
            "veil: info: kvm_ioctls: x = 1"
        );
        assert_eq!(
            l(
                Level::Error,
                "replay::cli",
                Some(Duration::from_micros(1500))
            ),
            "veil: [+0.001500s] error: replay::cli: x = 1"
        );
        assert_eq!(
            log_line(
                Level::Trace,
                "vmm::vm",
                &format_args!("m"),
                ("<", ">"),
                None
            ),
            "veil: <trace>: vm: m"
        );
    }
}
