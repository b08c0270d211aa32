//! locus: keeps a deployed language model up to date by finding where new knowledge belongs
//! (per-layer gradient localization) and updating only those layers.

pub mod client;
pub mod compute;
pub mod error;
pub mod eval;
pub mod export;
pub mod infer;
pub mod learn;
pub mod live;
pub mod malloc;
pub mod memory;
pub mod model;
pub mod plot;
pub mod proto;
pub mod select;
pub mod server;
pub mod snapshot;
pub mod spans;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokenize;
pub mod trace;

pub use error::{Error, Result};
