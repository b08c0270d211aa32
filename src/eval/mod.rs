//! `locus eval`: continual pretraining on a drift set under each strategy from the same starting
//! weights, and the uptake-versus-forgetting metrics of the continual-learning literature.

pub mod data;
pub mod metrics;
pub mod run;
