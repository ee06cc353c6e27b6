//! The library's one error type: small, lower-case messages that name the file or value at
//! fault. Tensor code returns candle's `Result` (as candle-nn does) and converts at the boundary.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The OS error is part of the message, not a separate source, so it prints once.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// JSON that does not parse or does not fit; `what` is the file or the value.
    #[error("{what}: {err}")]
    Json { what: String, err: serde_json::Error },

    #[error("config {}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("model source {spec}: {msg}")]
    Source { spec: String, msg: String },

    /// Bad input data; `path` is the file (or folder) at fault.
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },

    /// A value outside what its format allows (a setting, a shape, a count).
    #[error("{0}")]
    Invalid(String),

    /// What was being done when `inner` happened (not a `source`: the message already holds it).
    #[error("{msg}: {inner}")]
    Context { msg: String, inner: Box<Error> },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data { path: path.into(), msg: msg.into() }
    }
    pub fn json(what: impl AsRef<std::path::Path>, err: serde_json::Error) -> Self {
        Error::Json { what: what.as_ref().display().to_string(), err }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Add what was being done to an error, as anyhow's `context` does.
pub trait Context<T> {
    fn context(self, msg: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, msg: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, msg: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context { msg: msg.into(), inner: Box::new(e.into()) })
    }
    fn with_context<S: Into<String>>(self, msg: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Context { msg: msg().into(), inner: Box::new(e.into()) })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, msg: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(msg.into()))
    }
    fn with_context<S: Into<String>>(self, msg: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(msg().into()))
    }
}

/// Return early with an [`Error::Invalid`] built like `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Invalid(format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_chains_into_one_line() {
        let r: std::result::Result<(), Error> = Err(Error::data("/x/book.txt", "not UTF-8"));
        let e = r.context("reading the corpus").unwrap_err().to_string();
        assert_eq!(e, "reading the corpus: /x/book.txt: not UTF-8");
        let none: Option<u8> = None;
        assert_eq!(none.context("no value").unwrap_err().to_string(), "no value");
    }
}
