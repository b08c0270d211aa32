//! The learning engine: continual pretraining steps whose updates go where the new knowledge is.
//!
//! No transport types here; the service and `locus eval` both drive a [`engine::Learner`].

pub mod batch;
pub mod engine;
pub mod history;
pub mod optimizer;
pub mod rehearsal;
pub mod strategy;
pub mod units;

pub use engine::{Doc, Learner, UpdateReport};
pub use strategy::{LearnConfig, Localization, Strategy};
