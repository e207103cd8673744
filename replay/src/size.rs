//! The one size parser of the `veil` command line: `veil run --mem` and `veil replay --mem`
//! share its syntax (bytes, or a K/M/G/T suffix in binary units, with an optional `B` or `iB`:
//! `512M`, `512MB`, `512MiB` alike) and its error wording; each caller states its own bounds
//! ([`Limits`]). Errors name the bound ("at most 64G", "at least 6M") and, for a bare number that
//! is no valid byte count, suggest the unit ("did you mean 3G?").
//!
//! It lives here because `vmm` depends on `replay` (not the other way round).

use std::ffi::OsStr;
use std::fmt;

/// Bytes per 2 MiB pageblock, the alignment `veil run --mem` needs.
const PAGEBLOCK: u64 = 2 << 20;

/// Bounds a command puts on a size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Smallest size accepted, in bytes.
    pub min: u64,
    /// Largest size accepted, in bytes.
    pub max: u64,
    /// The size must be a multiple of this many bytes (1: any byte count).
    pub multiple: u64,
}

/// `veil run --mem`: 6M (the smallest reserved area plus one managed pageblock) to 64G, whole
/// 2 MiB pageblocks.
pub const RUN_MEM: Limits = Limits {
    min: 6 << 20,
    max: 64 << 30,
    multiple: PAGEBLOCK,
};

/// `veil replay --mem`: 4M (two pageblocks) to 64G, any byte count (rounded up to 2 MiB later).
pub const REPLAY_MEM: Limits = Limits {
    min: 4 << 20,
    max: 64 << 30,
    multiple: 1,
};

/// No bounds: any byte count that fits 64 bits (the syntax alone).
pub const ANY: Limits = Limits {
    min: 0,
    max: u64::MAX,
    multiple: 1,
};

/// What is wrong with a size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Not a whole number with an optional unit.
    Syntax,
    /// Above [`Limits::max`] (or beyond 64 bits).
    TooLarge {
        /// The bound.
        max: u64,
    },
    /// Below [`Limits::min`].
    TooSmall {
        /// The bound.
        min: u64,
    },
    /// Not a multiple of [`Limits::multiple`].
    NotMultiple {
        /// The size in bytes.
        bytes: u64,
        /// The required multiple.
        multiple: u64,
    },
}

/// A size that was refused: the problem and, where one fits, valid sizes the user may have meant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SizeError {
    /// The problem.
    pub problem: Problem,
    /// The input had no unit (a bare byte count); then a problem's text says "N bytes".
    pub bare: bool,
    /// Valid sizes the user may have meant, in the input's spelling (`3G`, `6M`).
    pub suggestions: Vec<String>,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            Problem::Syntax => write!(
                f,
                "not a size: expected bytes or a whole number with a K, M, G or T suffix \
                 (binary units: 1G = 1024M; KB and KiB alike), e.g. 512M or 4G"
            )?,
            Problem::TooLarge { max } => write!(f, "at most {}", human(*max))?,
            Problem::TooSmall { min } => write!(f, "at least {}", human(*min))?,
            Problem::NotMultiple { bytes, multiple } => {
                if self.bare {
                    let s = if *bytes == 1 { "" } else { "s" };
                    write!(f, "{bytes} byte{s}")?;
                } else {
                    write!(f, "{}", human(*bytes))?;
                }
                write!(f, " is not a multiple of {}", human_spaced(*multiple))?;
            }
        }
        if let Some((last, rest)) = self.suggestions.split_last() {
            // "6M or 8G"; "6M, 8M or 8G".
            let head = rest.join(", ");
            let or = if rest.is_empty() { "" } else { " or " };
            write!(f, "; did you mean {head}{or}{last}?")?;
        }
        Ok(())
    }
}

/// `n` with the largest binary unit that divides it: `64G`, `6M`, `4097K`, `3` (bytes).
pub fn human(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// `n` as in prose: `2 MiB`, `4 KiB`, `3 bytes`.
fn human_spaced(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n != 0 && n.is_multiple_of(1 << shift) {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} bytes")
}

/// Splits `s` into its number and the unit's shift (`None`: no unit). Case-insensitive; `B`,
/// `KB`, `KiB`, ... are accepted; blanks around the number and before the unit are ignored.
fn split(s: &str) -> Result<(u64, Option<u32>), Problem> {
    let t = s.trim();
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(end);
    if digits.is_empty() {
        return Err(Problem::Syntax);
    }
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" => None,
        "b" => Some(0),
        "k" | "kb" | "kib" => Some(10),
        "m" | "mb" | "mib" => Some(20),
        "g" | "gb" | "gib" => Some(30),
        "t" | "tb" | "tib" => Some(40),
        _ => return Err(Problem::Syntax),
    };
    // All digits: the only parse failure left is a number beyond 64 bits.
    let n = digits
        .parse::<u64>()
        .map_err(|_| Problem::TooLarge { max: 0 })?;
    Ok((n, shift))
}

impl Limits {
    /// Parses `s` and checks it against these bounds: the size in bytes, or why not.
    pub fn parse(&self, s: &str) -> Result<u64, SizeError> {
        let err = |problem, bare| SizeError {
            problem,
            bare,
            suggestions: Vec::new(),
        };
        let (n, shift) = split(s).map_err(|p| match p {
            Problem::TooLarge { .. } => err(Problem::TooLarge { max: self.max }, false),
            p => err(p, false),
        })?;
        let Some(bytes) = n.checked_mul(1 << shift.unwrap_or(0)) else {
            return Err(err(Problem::TooLarge { max: self.max }, false));
        };
        let bare = shift.is_none();
        match self.check(bytes) {
            Ok(()) => Ok(bytes),
            Err(p) => {
                let mut e = err(p, bare);
                if bare {
                    // A bare number too small or misaligned as bytes is most likely a forgotten
                    // unit: say which units would make it valid, and say why in its own terms.
                    e.suggestions = [(20, "M"), (30, "G"), (40, "T")]
                        .iter()
                        .filter(|(sh, _)| n.checked_mul(1 << sh).is_some_and(|b| self.ok(b)))
                        .map(|(_, u)| format!("{n}{u}"))
                        .collect();
                    let small = matches!(e.problem, Problem::TooSmall { .. });
                    if small && !bytes.is_multiple_of(self.multiple.max(1)) {
                        e.problem = Problem::NotMultiple {
                            bytes,
                            multiple: self.multiple,
                        };
                    }
                } else if let Problem::NotMultiple { multiple, .. } = e.problem {
                    let down = bytes / multiple * multiple;
                    e.suggestions = [Some(down), down.checked_add(multiple)]
                        .into_iter()
                        .flatten()
                        .filter(|b| self.ok(*b))
                        .map(human)
                        .collect();
                }
                Err(e)
            }
        }
    }

    /// Checks a size in bytes against these bounds: the largest first, then the smallest, then
    /// the multiple (`--mem 3M` is "at least 6M", whatever its alignment).
    pub fn check(&self, bytes: u64) -> Result<(), Problem> {
        if bytes > self.max {
            Err(Problem::TooLarge { max: self.max })
        } else if bytes < self.min {
            Err(Problem::TooSmall { min: self.min })
        } else if !bytes.is_multiple_of(self.multiple.max(1)) {
            Err(Problem::NotMultiple {
                bytes,
                multiple: self.multiple,
            })
        } else {
            Ok(())
        }
    }

    fn ok(&self, bytes: u64) -> bool {
        self.check(bytes).is_ok()
    }

    /// A clap value parser for an option with these bounds; its errors read
    /// `error: --mem 100T: at most 64G`, then clap's usage and help tip.
    pub fn value_parser(self) -> SizeParser {
        SizeParser(self)
    }
}

/// A clap value parser for sizes (see [`Limits::value_parser`]); the value is in bytes.
#[derive(Clone, Copy, Debug)]
pub struct SizeParser(pub Limits);

impl clap::builder::TypedValueParser for SizeParser {
    type Value = u64;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<u64, clap::Error> {
        let shown = value.to_string_lossy();
        let name = arg
            .and_then(|a| a.get_long())
            .map(|l| format!("--{l} "))
            .unwrap_or_default();
        let problem = match value.to_str() {
            Some(s) => match self.0.parse(s) {
                Ok(b) => return Ok(b),
                Err(e) => e.to_string(),
            },
            None => "not valid UTF-8".to_string(),
        };
        let mut cmd = cmd.clone();
        Err(clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("{name}{shown}: {problem}"),
        )
        .format(&mut cmd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str) -> String {
        RUN_MEM.parse(s).unwrap_err().to_string()
    }

    fn replay(s: &str) -> String {
        REPLAY_MEM.parse(s).unwrap_err().to_string()
    }

    #[test]
    fn syntax() {
        for (s, b) in [
            ("256M", 256u64 << 20),
            ("1G", 1 << 30),
            ("1g", 1 << 30),
            ("8192K", 8 << 20),
            ("268435456", 256 << 20),
            ("64GiB", 64 << 30),
            ("8MB", 8 << 20),
            ("8mib", 8 << 20),
            (" 512 M ", 512 << 20),
            ("6291456B", 6 << 20),
        ] {
            assert_eq!(RUN_MEM.parse(s), Ok(b), "{s}");
        }
        assert_eq!(REPLAY_MEM.parse("4194305"), Ok((4 << 20) + 1));
        assert_eq!(REPLAY_MEM.parse("300MiB"), Ok(300 << 20));
        let t = ANY;
        assert_eq!(t.parse("2T"), Ok(2 << 40));
        assert_eq!(t.parse("3TiB"), Ok(3 << 40));
        assert_eq!(t.parse("0"), Ok(0));
    }

    #[test]
    fn syntax_errors_say_what_is_expected() {
        let want = "not a size: expected bytes or a whole number with a K, M, G or T suffix \
                    (binary units: 1G = 1024M; KB and KiB alike), e.g. 512M or 4G";
        for s in [
            "", "M", "12X", "-1M", "1.5G", "garbage", "0x100000", "1 G B",
        ] {
            assert_eq!(run(s), want, "{s:?}");
            assert_eq!(replay(s), want, "{s:?}");
        }
    }

    #[test]
    fn bounds_are_named_in_the_same_words() {
        assert_eq!(run("100T"), "at most 64G");
        assert_eq!(run("65G"), "at most 64G");
        assert_eq!(run("99999999999999999999"), "at most 64G");
        assert_eq!(run("99999999999999999999G"), "at most 64G");
        assert_eq!(run("99999999999G"), "at most 64G");
        assert_eq!(replay("100T"), "at most 64G");
        assert_eq!(run("3M"), "at least 6M");
        assert_eq!(run("2M"), "at least 6M");
        assert_eq!(run("4096K"), "at least 6M");
        assert_eq!(replay("3M"), "at least 4M");
        assert_eq!(replay("1M"), "at least 4M");
        assert_eq!(run("0"), "at least 6M");
        assert_eq!(replay("0"), "at least 4M");
        assert_eq!(RUN_MEM.parse("6M"), Ok(6 << 20));
        assert_eq!(RUN_MEM.parse("64G"), Ok(64 << 30));
        assert_eq!(REPLAY_MEM.parse("4M"), Ok(4 << 20));
    }

    #[test]
    fn bare_numbers_suggest_a_unit() {
        assert_eq!(
            run("3"),
            "3 bytes is not a multiple of 2 MiB; did you mean 3G?"
        );
        assert_eq!(
            run("1"),
            "1 byte is not a multiple of 2 MiB; did you mean 1G?"
        );
        assert_eq!(
            run("512"),
            "512 bytes is not a multiple of 2 MiB; did you mean 512M?"
        );
        assert_eq!(
            run("8"),
            "8 bytes is not a multiple of 2 MiB; did you mean 8M or 8G?"
        );
        // Aligned but too small as bytes: the bound, and the unit.
        assert_eq!(run("2097152"), "at least 6M");
        assert_eq!(
            run("4"),
            "4 bytes is not a multiple of 2 MiB; did you mean 4G?"
        );
        assert_eq!(replay("100"), "at least 4M; did you mean 100M?");
        assert_eq!(replay("3"), "at least 4M; did you mean 3G?");
        // Nothing fits: no suggestion.
        assert_eq!(run("5000000000000"), "at most 64G");
        assert_eq!(run("7340033"), "7340033 bytes is not a multiple of 2 MiB");
    }

    #[test]
    fn misaligned_sizes_suggest_the_neighbours() {
        assert_eq!(
            run("7M"),
            "7M is not a multiple of 2 MiB; did you mean 6M or 8M?"
        );
        assert_eq!(run("4097K"), "at least 6M");
        assert_eq!(
            run("6145K"),
            "6145K is not a multiple of 2 MiB; did you mean 6M or 8M?"
        );
        assert_eq!(
            run("65535M"),
            "65535M is not a multiple of 2 MiB; did you mean 65534M or 64G?"
        );
    }

    #[test]
    fn clap_errors_name_the_option_and_value() {
        use clap::{Arg, Command};
        let cmd = Command::new("veil-test").arg(
            Arg::new("mem")
                .long("mem")
                .value_parser(RUN_MEM.value_parser()),
        );
        let e = cmd
            .clone()
            .try_get_matches_from(["veil-test", "--mem", "100T"])
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        assert!(
            text.starts_with("error: --mem 100T: at most 64G\n"),
            "{text}"
        );
        assert!(text.contains("Usage: veil-test"), "{text}");
        assert!(
            text.contains("For more information, try '--help'."),
            "{text}"
        );
        let m = cmd
            .try_get_matches_from(["veil-test", "--mem", "1G"])
            .unwrap();
        assert_eq!(m.get_one::<u64>("mem"), Some(&(1 << 30)));
    }
}
