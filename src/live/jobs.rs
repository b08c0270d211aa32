//! What the server asks of the learner thread, and what the thread reports back.

use std::collections::BTreeMap;

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::Result;
use crate::learn::{Doc, UpdateReport};
use crate::model::GroupId;
use crate::spans::SpanText;
use crate::store::{Restored, Written};
use crate::trace::Trace;

/// A reply channel for a job's result.
pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// Work for the learner thread.
pub(crate) enum Job {
    /// Learn from documents in steps of at most `batch_size`, journaling them first.
    Learn {
        batch_id: String,
        docs: Vec<Doc>,
        /// The submitting RPC's span, the parent of the learning spans on this thread.
        span: tracing::Span,
        reply: Reply<Vec<UpdateReport>>,
    },
    /// Measure gradient norms without updating; answers with the version measured.
    Trace {
        texts: Vec<SpanText>,
        reply: Reply<(u64, Trace)>,
    },
    /// Restore a retained version as a new one; answers `(new version, restored version)`.
    Rollback {
        version: u64,
        reply: Reply<(u64, u64)>,
    },
    /// Apply journal records left after the restored checkpoint; answers the steps taken.
    Replay {
        restored: Box<Restored>,
        reply: Reply<usize>,
    },
    /// Write a checkpoint now; answers `None` when the server keeps no data directory.
    Checkpoint { reply: Reply<Option<Written>> },
    /// Publish a checkpoint for a store that missed a file, when a try is due (writers).
    Repair { reply: Reply<()> },
    /// Serve a version a writer published: these groups' tensors, on top of the current ones.
    Follow {
        version: u64,
        groups: Vec<GroupId>,
        tensors: BTreeMap<String, Tensor>,
        reply: Reply<()>,
    },
}

/// What the learner has done, for Admin.Info.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    /// Groups the strategy selects now.
    pub selection: Vec<GroupId>,
    /// Learning steps taken.
    pub steps: u64,
    /// Why batches cannot be learned now (the data directory is full, say), as a client is told.
    pub blocked: Option<String>,
}
