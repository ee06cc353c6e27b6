//! The data flow's first stages: pair sources (books, files) -> the epoch order -> batches.

pub mod batch;
pub mod books;
pub mod dataset;
pub mod files;
pub mod order;
pub mod source;

use std::path::Path;

use crate::error::{Error, Result};

/// A UTF-8 text file's contents. A folder, a binary file (NUL bytes) and invalid UTF-8 are
/// errors that name the file and say what to do.
pub fn read_text(path: &Path) -> Result<String> {
    if path.is_dir() {
        return Err(Error::data(path, "is a folder; give a text file"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    text_from_bytes(path, bytes)
}

/// A file's bytes as text (see [`read_text`]); `path` names it in errors.
pub fn text_from_bytes(path: &Path, bytes: Vec<u8>) -> Result<String> {
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return Err(Error::data(
            path,
            "a binary file (NUL bytes), not text; give UTF-8 text, one paragraph or sentence per line",
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        Error::data(
            path,
            format!("not valid UTF-8 at byte {at}; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"),
        )
    })
}
