//! The shared data folder for unit tests: `$HYPERSPHERE_DATA`, else `../shared/data` beside the
//! checkout. A test that needs it fails, naming the folder, when it is missing: a missing data
//! folder must not pass as a green test.

use std::path::{Path, PathBuf};

/// The data root holding `books/`, `senteval/` and `sts/`.
pub fn root() -> PathBuf {
    let root = std::env::var_os("HYPERSPHERE_DATA")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(
        root.join("senteval").is_dir() && root.join("books").is_dir(),
        "the shared data folder {} is missing (it needs books/ and senteval/): set HYPERSPHERE_DATA or put shared/data beside the checkout",
        root.display()
    );
    root
}
