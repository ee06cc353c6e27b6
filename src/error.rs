//! The library's error type: small, lower-case messages that name the file or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The OS error is part of the message, not a separate source, so it prints once.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    #[error("config {}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("model source {spec}: {msg}")]
    Source { spec: String, msg: String },

    /// Bad input data; `path` is the file (or folder) at fault.
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data { path: path.into(), msg: msg.into() }
    }
}
