//! The live model: the learner thread that alone changes the weights, the publisher that sends a
//! writer's versions to the store, a reader's follower, the forgetting guard and the learner's CPU
//! priority, and the same update path on the caller's thread for `locus eval`. No transport here;
//! the server turns requests into `Job`s and [`Error`]s into status codes.
//!
//! candle's work is blocking and CPU-bound, so the learner runs on its own OS thread fed by a
//! bounded tokio queue; a full queue makes ingest streams wait, which pushes back on their
//! clients. Every update is followed by a new snapshot, so queries see whole updates or none.

mod counters;
mod durable;
mod error;
mod follow;
mod guard;
mod inline;
mod jobs;
mod learner;
mod priority;
mod publisher;
mod repair;
mod rollback;
mod store_health;
mod update;

pub(crate) use counters::Counters;
pub(crate) use durable::open_store;
pub use error::{Error, Result};
pub(crate) use follow::Follower;
pub use guard::Guard;
pub use inline::Inline;
pub(crate) use jobs::Job;
pub(crate) use learner::{Handle, Setup};
pub(crate) use repair::keep_store_repaired;
pub(crate) use store_health::StoreHealth;
