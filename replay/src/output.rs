//! Output files of `veil`: which format a file name asks for, SVG to PNG, and the one line
//! that announces every file written.
//!
//! Shared by `veil replay --plot` (here) and `veil run --dump-ept` (the `vmm` crate, which
//! depends on this one: so the renderer lives here and neither crate imports the other's
//! front end). PNG comes from [`resvg`] (pure Rust: usvg parses, tiny-skia rasterises),
//! with text drawn in the host's system fonts (none found: shapes only, text left out, and a
//! warning on stderr once per process).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Extensions that name a format no `veil` output is written in: such a file name is refused
/// (with the list of formats that can be written) rather than filled with something else.
pub const UNWRITABLE_EXTENSIONS: &[&str] = &[
    "pdf", "jpg", "jpeg", "jpe", "gif", "bmp", "webp", "tif", "tiff", "ico", "avif", "heic",
    "html", "htm", "xhtml", "eps", "ps", "svgz", "xml", "csv", "tsv", "yaml", "yml", "toml", "md",
    "dot", "gz", "zip", "xz", "bz2", "zst", "tar", "doc", "docx", "odt", "xls", "xlsx",
];

/// A file name's extension, lower-cased (None: no extension).
pub fn extension(path: &Path) -> Option<String> {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
}

/// Why a file name or a picture cannot be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// The extension names a format this output is not written in.
    #[error("{path}: veil cannot write .{ext} files{what}; it writes {can} (or give {option} to choose the format whatever the name)")]
    UnwritableExtension {
        /// The file.
        path: String,
        /// Its extension.
        ext: String,
        /// The output (" for --plot").
        what: String,
        /// The formats it can write, with their extensions.
        can: String,
        /// The option that overrides the extension.
        option: String,
    },
    /// The SVG could not be rasterised.
    #[error("cannot render the picture as PNG: {0}")]
    Png(String),
}

impl OutputError {
    /// The error for `path`, whose extension `ext` names no format `option` can write.
    pub fn unwritable(path: &Path, ext: &str, what: &str, can: &str, option: &str) -> Self {
        OutputError::UnwritableExtension {
            path: path.display().to_string(),
            ext: ext.to_string(),
            what: what.to_string(),
            can: can.to_string(),
            option: option.to_string(),
        }
    }
}

/// Format of a `--plot` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PlotFormat {
    /// SVG (vector).
    Svg,
    /// PNG, rasterised from the SVG.
    Png,
}

impl PlotFormat {
    /// Lower-case name ("svg", "png").
    pub const fn name(self) -> &'static str {
        match self {
            PlotFormat::Svg => "svg",
            PlotFormat::Png => "png",
        }
    }
}

/// The `--plot` file's format: `explicit` if given; else `.svg` or no extension is SVG and
/// `.png` PNG; any other extension is refused.
pub fn plot_format(explicit: Option<PlotFormat>, path: &Path) -> Result<PlotFormat, OutputError> {
    if let Some(f) = explicit {
        return Ok(f);
    }
    match extension(path).as_deref() {
        None | Some("svg") => Ok(PlotFormat::Svg),
        Some("png") => Ok(PlotFormat::Png),
        Some(ext) => Err(OutputError::unwritable(
            path,
            ext,
            " for --plot",
            "svg (.svg or no extension) and png (.png)",
            "--plot-format svg|png",
        )),
    }
}

/// Pixels per SVG unit in PNG output (2: sharp text on a high-density screen, and the
/// dump's 10 px cells become 20 px).
pub const PNG_SCALE: f32 = 2.0;

/// Largest PNG side in pixels (a picture larger than this is scaled down to fit).
pub const PNG_MAX_SIDE: u32 = 8192;

/// Rasterises an SVG document to PNG bytes at [`PNG_SCALE`] (capped at [`PNG_MAX_SIDE`]).
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>, OutputError> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    if let Some(w) = no_font_warning(opt.fontdb.len(), svg.contains("<text")) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| eprintln!("veil: warning: {w}"));
    }
    let tree = usvg::Tree::from_str(svg, &opt).map_err(|e| OutputError::Png(e.to_string()))?;
    let size = tree.size();
    let longest = size.width().max(size.height()).max(1.0);
    let scale = PNG_SCALE.min(PNG_MAX_SIDE as f32 / longest);
    let (w, h) = (
        ((size.width() * scale).ceil() as u32).max(1),
        ((size.height() * scale).ceil() as u32).max(1),
    );
    let mut pixmap = tiny_skia::Pixmap::new(w, h)
        .ok_or_else(|| OutputError::Png(format!("cannot allocate a {w} x {h} picture")))?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| OutputError::Png(e.to_string()))
}

/// The warning for a PNG whose text cannot be drawn: `fonts` system fonts found, `has_text`
/// whether the picture has any text.
fn no_font_warning(fonts: usize, has_text: bool) -> Option<&'static str> {
    (fonts == 0 && has_text).then_some(
        "no system font found: PNG pictures are written without their text (install a font, \
         e.g. Debian's fonts-dejavu-core, or write SVG, which any browser shows with its own)",
    )
}

/// Decodes a PNG into (width, height, RGB pixels row by row), for checking what was drawn.
pub fn decode_png(png: &[u8]) -> Option<(u32, u32, Vec<[u8; 3]>)> {
    let p = resvg::tiny_skia::Pixmap::decode_png(png).ok()?;
    let px = p
        .pixels()
        .iter()
        .map(|c| {
            let c = c.demultiply();
            [c.red(), c.green(), c.blue()]
        })
        .collect();
    Some((p.width(), p.height(), px))
}

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences (or restores) [`announce`] for the rest of the process (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether announcements are silenced.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A size as the announcement shows it ("812 B", "312 KB", "5.6 MB": decimal units, as `ls -h`
/// users compare file sizes).
pub fn file_size(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{} KB", bytes.div_ceil(1_000)),
        _ => format!("{:.1} MB", bytes as f64 / 1e6),
    }
}

/// The line announcing a written file: "wrote stage-2 dump to d.svg (svg, 312 KB)".
pub fn written_line(what: &str, path: &Path, format: &str, bytes: u64) -> String {
    format!(
        "wrote {what} to {} ({format}, {})",
        path.display(),
        file_size(bytes)
    )
}

/// Announces on stderr, as `veil: ...`, a file just written (unless [`set_quiet`]).
pub fn announce_written(what: &str, path: &Path, format: &str, bytes: u64) {
    announce(&written_line(what, path, format, bytes));
}

/// Prints `veil: MSG` on stderr unless [`set_quiet`]: the one route of every announcement.
pub fn announce(msg: &str) {
    if !quiet() {
        eprintln!("veil: {msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_png_without_fonts_for_its_text_is_warned_about() {
        assert!(no_font_warning(0, true).is_some_and(|w| w.contains("without their text")));
        assert_eq!(no_font_warning(0, false), None, "no text, nothing lost");
        assert_eq!(no_font_warning(3, true), None);
    }

    #[test]
    fn the_plot_format_follows_the_extension_unless_given() {
        let f = |p: &str| plot_format(None, Path::new(p)).map_err(|e| e.to_string());
        assert_eq!(f("a.svg").unwrap(), PlotFormat::Svg);
        assert_eq!(f("dir/a").unwrap(), PlotFormat::Svg);
        assert_eq!(f("a.PNG").unwrap(), PlotFormat::Png);
        for bad in ["a.pdf", "a.jpg", "a.html", "a.txt"] {
            let e = f(bad).unwrap_err();
            assert!(
                e.contains("cannot write") && e.contains("png (.png)"),
                "{e}"
            );
        }
        assert_eq!(
            plot_format(Some(PlotFormat::Png), Path::new("a.pdf")).unwrap(),
            PlotFormat::Png
        );
    }

    #[test]
    fn sizes_and_the_announcement() {
        assert_eq!(file_size(812), "812 B");
        assert_eq!(file_size(311_500), "312 KB");
        assert_eq!(file_size(5_600_000), "5.6 MB");
        assert_eq!(
            written_line("stage-2 dump", Path::new("d.svg"), "svg", 311_500),
            "wrote stage-2 dump to d.svg (svg, 312 KB)"
        );
    }

    #[test]
    fn an_svg_becomes_a_png_of_twice_its_size_with_its_colours() {
        let svg = r##"<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="40" height="20" fill="white"/><rect x="20" y="0" width="20" height="20" fill="#d32f2f"/></svg>"##;
        let png = svg_to_png(svg).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let img = resvg::tiny_skia::Pixmap::decode_png(&png).unwrap();
        assert_eq!((img.width(), img.height()), (80, 40));
        let px = |x: u32, y: u32| {
            let p = img.pixel(x, y).unwrap();
            (p.red(), p.green(), p.blue())
        };
        assert_eq!(px(10, 20), (255, 255, 255));
        assert_eq!(px(60, 20), (0xd3, 0x2f, 0x2f));
        assert!(svg_to_png("<not svg").is_err());
    }
}
