//! What the live model's threads fail with; the server turns each into a status code.

use crate::store::StoreError;

/// A failure of the learner, publisher or follower.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A library error (bad input, a tensor failure, ...).
    #[error(transparent)]
    Locus(#[from] crate::Error),
    /// The data directory or the store of published versions failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A value the live model cannot use, such as a canary or a store of another history.
    #[error("{field}: {reason}")]
    Invalid {
        /// What is at fault, such as `canary[2]` or `store`.
        field: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// Learning is paused.
    #[error("learning is paused")]
    Paused,
    /// The learner's queue is closed.
    #[error("the learner is shutting down")]
    ShuttingDown,
    /// A version that is neither retained in memory nor restorable from disk.
    #[error("version {version} is not retained (retained: {retained})")]
    UnknownVersion {
        /// The version asked for.
        version: u64,
        /// The versions that are.
        retained: String,
    },
    /// A thread could not be started, or a blocking task died.
    #[error("{what}: {cause}")]
    Thread {
        /// What was being done, such as `starting the learner thread`.
        what: &'static str,
        /// Why it failed.
        cause: String,
    },
    /// The learner thread is gone, or dropped a job without answering it.
    #[error("the learner thread {0}")]
    Gone(&'static str),
    /// A job panicked; the thread goes on with the next.
    #[error("the learner panicked: {0}")]
    Panicked(String),
    /// A version in the store was made on another base model than this reader's.
    #[error("store {store}: version {version} was made on a base model with hash {found}, but this reader's is {ours}; start it with the writer's --model")]
    OtherBase {
        /// The store followed.
        store: String,
        /// The version at fault.
        version: u64,
        /// The base hash it was made on.
        found: String,
        /// This reader's base hash.
        ours: String,
    },
    /// A published version holds a tensor that is not a layer group's parameter of the model.
    #[error(
        "version {version} holds `{name}`, which is not a layer group's parameter of the model"
    )]
    UnknownTensor {
        /// The version at fault.
        version: u64,
        /// The tensor's name.
        name: String,
    },
    /// The base model file changed since the data directory was made on it.
    #[error("{path} now holds a model with hash {found}, not the base model ({hash}) this data directory was made on")]
    BaseChanged {
        /// Where the model was loaded from.
        path: String,
        /// The hash found there now.
        found: String,
        /// The hash the data directory was made with.
        hash: String,
    },
    /// A rollback took effect but its checkpoint failed.
    #[error("rolled back to {version} as version {next}, but it is not durable: {cause}")]
    NotDurable {
        /// The version restored.
        version: u64,
        /// The version it is served as.
        next: u64,
        /// Why the checkpoint failed.
        cause: Box<Error>,
    },
}

impl Error {
    /// An `Invalid` for `field`.
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Result with the live model's error.
pub type Result<T> = std::result::Result<T, Error>;
