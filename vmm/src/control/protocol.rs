//! The control socket's JSON-lines protocol: one request object per line in, one reply object
//! per line out. Parsing is total: any byte string becomes a [`Request`] or a
//! [`ProtocolError`] whose message goes back as `{"ok":false,"error":"..."}`.
//!
//! Requests (`docs/ARCHITECTURE.md` and the README have the reply fields):
//! `{"cmd":"dump","format":"text|json|svg"}` (format optional, default text),
//! `{"cmd":"stats"}`, `{"cmd":"violations"}`, `{"cmd":"vcpus"}`.

use serde_json::{json, Map, Value};

use crate::dump::DumpFormat;

/// Longest request line accepted, newline excluded: longer lines get an error reply and the
/// connection is closed (the rest of the line is never read).
pub const MAX_REQUEST_LINE: usize = 4096;

/// One request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The stage-2 dump, rendered as the exit dump is.
    Dump(DumpFormat),
    /// The report's counters so far.
    Stats,
    /// The violation records so far.
    Violations,
    /// Each vCPU's state and exits so far.
    Vcpus,
}

impl Request {
    /// The request's command name (`"dump"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Request::Dump(_) => "dump",
            Request::Stats => "stats",
            Request::Violations => "violations",
            Request::Vcpus => "vcpus",
        }
    }

    /// The request as one protocol line (with its newline): what `veil inspect` sends.
    pub fn to_line(self) -> String {
        let v = match self {
            Request::Dump(f) => json!({"cmd": "dump", "format": format_name(f)}),
            other => json!({"cmd": other.name()}),
        };
        format!("{v}\n")
    }
}

/// The wire name of a dump format.
pub fn format_name(f: DumpFormat) -> &'static str {
    match f {
        DumpFormat::Text => "text",
        DumpFormat::Json => "json",
        DumpFormat::Svg => "svg",
        DumpFormat::Png => "png",
    }
}

/// Why a request line was refused (the message is the reply's `error`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Longer than [`MAX_REQUEST_LINE`].
    #[error("request line longer than {MAX_REQUEST_LINE} bytes")]
    TooLong,
    /// Not UTF-8.
    #[error("request is not UTF-8 text")]
    NotUtf8,
    /// Not a JSON document.
    #[error("request is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("request must be a JSON object such as {{\"cmd\":\"stats\"}}")]
    NotObject,
    /// No `cmd`, or not a string.
    #[error("request has no \"cmd\" string (one of dump, stats, violations, vcpus)")]
    NoCmd,
    /// A `cmd` nobody knows.
    #[error("unknown cmd {0:?}: one of dump, stats, violations, vcpus")]
    UnknownCmd(String),
    /// A `format` that is not text, json or svg.
    #[error("unknown dump format {0}: one of text, json, svg")]
    BadFormat(String),
    /// A field the command does not take.
    #[error("unknown field {field:?} for cmd {cmd:?}")]
    UnknownField {
        /// The command.
        cmd: &'static str,
        /// The field.
        field: String,
    },
}

/// Parses one request line (without its newline; a trailing `\r` is allowed).
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    if line.len() > MAX_REQUEST_LINE {
        return Err(ProtocolError::TooLong);
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ProtocolError::NotObject);
    };
    let Some(Value::String(cmd)) = obj.get("cmd") else {
        return Err(ProtocolError::NoCmd);
    };
    let (req, allowed): (Request, &[&str]) = match cmd.as_str() {
        "dump" => (Request::Dump(dump_format(&obj)?), &["cmd", "format"]),
        "stats" => (Request::Stats, &["cmd"]),
        "violations" => (Request::Violations, &["cmd"]),
        "vcpus" => (Request::Vcpus, &["cmd"]),
        other => return Err(ProtocolError::UnknownCmd(truncate(other))),
    };
    if let Some(field) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ProtocolError::UnknownField {
            cmd: req.name(),
            field: truncate(field),
        });
    }
    Ok(req)
}

fn dump_format(obj: &Map<String, Value>) -> Result<DumpFormat, ProtocolError> {
    match obj.get("format") {
        None => Ok(DumpFormat::Text),
        Some(Value::String(s)) => match s.as_str() {
            "text" => Ok(DumpFormat::Text),
            "json" => Ok(DumpFormat::Json),
            "svg" => Ok(DumpFormat::Svg),
            _ => Err(ProtocolError::BadFormat(format!("{:?}", truncate(s)))),
        },
        Some(other) => Err(ProtocolError::BadFormat(truncate(&other.to_string()))),
    }
}

/// At most 64 characters of `s`, so an error reply never echoes a whole request.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// A success reply: `{"ok":true}` plus `fields` (an object), as one line with its newline.
pub fn ok_line(fields: Value) -> String {
    let mut obj = Map::new();
    obj.insert("ok".into(), Value::Bool(true));
    if let Value::Object(m) = fields {
        obj.extend(m);
    }
    format!("{}\n", Value::Object(obj))
}

/// An error reply `{"ok":false,"error":msg}` as one line with its newline.
pub fn error_line(msg: &str) -> String {
    format!("{}\n", json!({"ok": false, "error": msg}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_four_commands_parse() {
        let p = |s: &str| parse_request(s.as_bytes());
        assert_eq!(p(r#"{"cmd":"stats"}"#), Ok(Request::Stats));
        assert_eq!(p(r#" {"cmd" : "vcpus"} "#), Ok(Request::Vcpus));
        assert_eq!(p("{\"cmd\":\"violations\"}\r"), Ok(Request::Violations));
        assert_eq!(p(r#"{"cmd":"dump"}"#), Ok(Request::Dump(DumpFormat::Text)));
        for (f, want) in [
            ("text", DumpFormat::Text),
            ("json", DumpFormat::Json),
            ("svg", DumpFormat::Svg),
        ] {
            let line = format!(r#"{{"cmd":"dump","format":"{f}"}}"#);
            assert_eq!(p(&line), Ok(Request::Dump(want)));
        }
        // What the client sends parses back to the same request.
        for r in [
            Request::Stats,
            Request::Vcpus,
            Request::Violations,
            Request::Dump(DumpFormat::Svg),
        ] {
            let line = r.to_line();
            assert!(line.ends_with('\n'));
            assert_eq!(parse_request(line.trim_end().as_bytes()), Ok(r));
        }
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        let p = |s: &[u8]| parse_request(s);
        assert_eq!(p(b"\xff\xfe"), Err(ProtocolError::NotUtf8));
        assert!(matches!(p(b"stats"), Err(ProtocolError::NotJson(_))));
        assert!(matches!(p(b""), Err(ProtocolError::NotJson(_))));
        assert!(matches!(
            p(br#"{"cmd":"stats""#),
            Err(ProtocolError::NotJson(_))
        ));
        assert_eq!(p(b"[1,2]"), Err(ProtocolError::NotObject));
        assert_eq!(p(b"\"stats\""), Err(ProtocolError::NotObject));
        assert_eq!(p(b"{}"), Err(ProtocolError::NoCmd));
        assert_eq!(p(br#"{"cmd":7}"#), Err(ProtocolError::NoCmd));
        assert_eq!(
            p(br#"{"cmd":"reboot"}"#),
            Err(ProtocolError::UnknownCmd("reboot".into()))
        );
        assert!(matches!(
            p(br#"{"cmd":"dump","format":"pdf"}"#),
            Err(ProtocolError::BadFormat(_))
        ));
        assert!(matches!(
            p(br#"{"cmd":"dump","format":3}"#),
            Err(ProtocolError::BadFormat(_))
        ));
        assert_eq!(
            p(br#"{"cmd":"stats","format":"json"}"#),
            Err(ProtocolError::UnknownField {
                cmd: "stats",
                field: "format".into()
            })
        );
        let long = vec![b' '; MAX_REQUEST_LINE + 1];
        assert_eq!(p(&long), Err(ProtocolError::TooLong));
        // A long unknown name is not echoed whole.
        let name = "x".repeat(1000);
        let msg = p(format!(r#"{{"cmd":"{name}"}}"#).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn replies_are_one_json_line() {
        let ok = ok_line(json!({"a": 1}));
        assert_eq!(ok.matches('\n').count(), 1);
        assert!(ok.ends_with('\n'));
        let v: Value = serde_json::from_str(&ok).unwrap();
        assert_eq!(v, json!({"ok": true, "a": 1}));
        let err = error_line("bad \"thing\"\n");
        assert_eq!(err.matches('\n').count(), 1);
        let v: Value = serde_json::from_str(&err).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "bad \"thing\"\n");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic, and an error always renders as one reply line.
        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            match parse_request(&bytes) {
                Ok(r) => prop_assert!(bytes.len() <= MAX_REQUEST_LINE, "{r:?}"),
                Err(e) => {
                    let line = error_line(&e.to_string());
                    prop_assert_eq!(line.matches('\n').count(), 1);
                    let v: Value = serde_json::from_str(&line).unwrap();
                    prop_assert_eq!(&v["ok"], &Value::Bool(false));
                }
            }
        }

        /// JSON-shaped input with random commands, formats and extra fields.
        #[test]
        fn json_shaped_requests(cmd in "[a-z]{0,12}", format in proptest::option::of("[a-z]{0,6}"),
                                extra in proptest::option::of("[a-z]{1,6}")) {
            let mut obj = Map::new();
            obj.insert("cmd".into(), Value::String(cmd.clone()));
            if let Some(f) = &format {
                obj.insert("format".into(), Value::String(f.clone()));
            }
            if let Some(x) = &extra {
                obj.insert(x.clone(), Value::Null);
            }
            let line = Value::Object(obj).to_string();
            let r = parse_request(line.as_bytes());
            let known = ["dump", "stats", "violations", "vcpus"].contains(&cmd.as_str());
            if !known {
                prop_assert!(r.is_err());
            }
            if let Ok(req) = r {
                prop_assert_eq!(req.name(), cmd.as_str());
                let back = parse_request(req.to_line().trim_end().as_bytes());
                prop_assert_eq!(back, Ok(req));
            }
        }
    }
}
