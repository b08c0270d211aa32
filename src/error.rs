//! The library's one error type.

use std::path::PathBuf;

/// Everything that can go wrong inside locus, with enough context to tell the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying failure (not a `source`, so it is printed once).
        cause: std::io::Error,
    },
    /// A model path that does not hold a usable model.
    #[error("{path} is not a usable model: {reason}")]
    Model {
        /// The path given as the model.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// A line of user input that is malformed.
    #[error("{source_name} line {line}: field `{field}`: {reason}")]
    Input {
        /// The input file (or stream) name.
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// The offending field.
        field: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Input that is wrong as a whole (an empty file, an unknown option value).
    #[error("{0}")]
    Invalid(String),
    /// The default model could not be fetched or verified.
    #[error("default model: {0}")]
    DefaultModel(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor computation failed.
    #[error("tensor: {0}")]
    Tensor(String),
}

/// Result with the library's error.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A `Model` error for `path`.
    pub fn model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An `Io` error for `path`.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Tensor(candle_reason(&e))
    }
}

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is set:
/// thirty frames of stack bury the reason a user needs.
pub fn candle_reason(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_reason(inner),
        e => e.to_string(),
    }
}
