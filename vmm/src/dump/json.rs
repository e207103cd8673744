//! The JSON dump: [`super::DumpData`] serialized with its documented field names.

use super::DumpData;

/// The dump as a JSON value.
pub fn to_value(data: &DumpData) -> serde_json::Value {
    // Serializing plain structs of numbers, strings and options cannot fail.
    serde_json::to_value(data).unwrap_or(serde_json::Value::Null)
}

/// The dump as pretty-printed JSON text (with a trailing newline).
pub fn render(data: &DumpData) -> String {
    let mut s = serde_json::to_string_pretty(data).unwrap_or_else(|_| "null".into());
    s.push('\n');
    s
}
