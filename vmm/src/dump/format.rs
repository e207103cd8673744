//! Which dump format a `--dump-ept` file name asks for.

use std::path::Path;

use replay::output::{extension, OutputError, UNWRITABLE_EXTENSIONS};

use super::DumpFormat;

/// What `--dump-ept` can write, for error messages.
pub const WRITABLE: &str = "text (.txt or no extension), json (.json), svg (.svg) and png (.png)";

/// The dump format for `file`: `explicit` (`--dump-format`) if given; else its extension
/// (`.json`, `.svg`, `.png`; `.txt`, none, "-" or one that names no format: text). An
/// extension that names a format Veil cannot write (`.pdf`, `.jpg`, `.html`, ...:
/// [`UNWRITABLE_EXTENSIONS`]) is refused.
pub fn resolve(
    explicit: Option<DumpFormat>,
    file: Option<&Path>,
) -> Result<DumpFormat, OutputError> {
    if let Some(f) = explicit {
        return Ok(f);
    }
    let Some(path) = file else {
        return Ok(DumpFormat::Text);
    };
    match extension(path).as_deref() {
        Some("json") => Ok(DumpFormat::Json),
        Some("svg") => Ok(DumpFormat::Svg),
        Some("png") => Ok(DumpFormat::Png),
        Some(ext) if UNWRITABLE_EXTENSIONS.contains(&ext) => Err(OutputError::unwritable(
            path,
            ext,
            " for --dump-ept",
            WRITABLE,
            "--dump-format text|json|svg|png",
        )),
        _ => Ok(DumpFormat::Text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_decides_unless_a_format_is_given() {
        let f = |e: Option<DumpFormat>, p: Option<&str>| resolve(e, p.map(Path::new));
        assert_eq!(f(None, None).unwrap(), DumpFormat::Text);
        assert_eq!(f(None, Some("d.txt")).unwrap(), DumpFormat::Text);
        assert_eq!(f(None, Some("d")).unwrap(), DumpFormat::Text);
        assert_eq!(f(None, Some("-")).unwrap(), DumpFormat::Text);
        assert_eq!(f(None, Some("d.log")).unwrap(), DumpFormat::Text);
        assert_eq!(f(None, Some("x/d.JSON")).unwrap(), DumpFormat::Json);
        assert_eq!(f(None, Some("d.svg")).unwrap(), DumpFormat::Svg);
        assert_eq!(f(None, Some("d.png")).unwrap(), DumpFormat::Png);
        for bad in ["d.pdf", "d.jpg", "d.html", "d.JPEG", "d.gif"] {
            let e = f(None, Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("cannot write") && e.contains(WRITABLE) && e.contains("--dump-format"),
                "{e}"
            );
        }
        assert_eq!(
            f(Some(DumpFormat::Svg), Some("d.pdf")).unwrap(),
            DumpFormat::Svg
        );
    }
}
