//! Inference on one snapshot's weights, free of transport types: scoring known text and generating
//! new text.

mod generate;
mod score;
mod stops;

pub use generate::{generate, Finish, Generated, Sampling};
pub use score::{logprobs, target_nll, token_logprobs, TokenLogprob};
