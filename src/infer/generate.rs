//! Text generation on one snapshot: the prompt once, then token by token against the KV cache,
//! streamed out as text that has settled, until a length, a stop string or the receiver ends it.

use candle_core::Tensor;
use candle_transformers::generation::LogitsProcessor;

use super::stops::Stops;
use crate::error::{Error, Result};
use crate::model::cache::KvCache;
use crate::model::on_compute_threads;
use crate::snapshot::Snapshot;

/// Continues `prompt` token by token. `emit` receives each new piece of text with the number
/// of tokens generated so far and returns false to cancel; text that could begin a stop string
/// is held back until it is known not to.
pub fn generate(
    snapshot: &Snapshot,
    prompt: &[u32],
    sampling: &Sampling,
    mut emit: impl FnMut(&str, usize) -> bool,
) -> Result<Generated> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    // candle-transformers' sampler: greedy below a temperature of 1e-7, else top-p, seeded.
    let mut picker = LogitsProcessor::new(
        sampling.seed,
        Some(sampling.temperature),
        Some(sampling.top_p),
    );
    let mut stops = Stops::new(&sampling.stop)?;
    let holdback = stops.longest.saturating_sub(1);
    let limit = snapshot.model().arch.max_positions().unwrap_or(usize::MAX);
    // The prompt goes through once; then each new token alone, against the cached keys and values.
    let mut cache = KvCache::new(snapshot.model().arch.num_layers());
    let mut input = prompt.to_vec();
    let mut generated: Vec<u32> = Vec::new();
    let mut sent = String::new();
    while generated.len() < sampling.max_tokens && cache.len() + input.len() <= limit {
        let ids = Tensor::from_vec(input.clone(), (1, input.len()), snapshot.model().device())?;
        let logits = on_compute_threads(|| {
            snapshot
                .model()
                .arch
                .forward_cached(snapshot.params(), &ids, &mut cache)
        })?;
        let last = logits.squeeze(0)?.get_on_dim(0, input.len() - 1)?;
        let next = picker.sample(&last)?;
        input = vec![next];
        generated.push(next);
        let text = snapshot.model().tokenizer.decode(&generated)?;
        if !text.starts_with(&sent) {
            // A byte-level token split a character; wait for the text to settle.
            continue;
        }
        if let Some(at) = stops.find(&text) {
            let piece = text.get(sent.len()..at).unwrap_or("");
            if !piece.is_empty() && !emit(piece, generated.len()) {
                return Ok(Generated::new(Finish::Cancelled, generated));
            }
            return Ok(Generated::new(Finish::Stop, generated));
        }
        // Hold back a possible stop-string prefix and an incomplete character.
        let mut end = text.len().saturating_sub(holdback).max(sent.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let settled = text[..end].trim_end_matches('\u{FFFD}');
        if settled.len() > sent.len() {
            if !emit(&settled[sent.len()..], generated.len()) {
                return Ok(Generated::new(Finish::Cancelled, generated));
            }
            sent = settled.to_string();
        }
    }
    let text = snapshot.model().tokenizer.decode(&generated)?;
    if let Some(rest) = text.strip_prefix(sent.as_str()) {
        if !rest.is_empty() && !emit(rest, generated.len()) {
            return Ok(Generated::new(Finish::Cancelled, generated));
        }
    }
    Ok(Generated::new(Finish::Length, generated))
}

/// How [`generate`] picks tokens and when it stops.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Softmax temperature; below 1e-7 is greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// Stop before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Seed of the sampler.
    pub seed: u64,
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Why it ended.
    pub finish: Finish,
    /// Every token sampled, those that made up a stop string included.
    pub tokens: Vec<u32>,
}

impl Generated {
    fn new(finish: Finish, tokens: Vec<u32>) -> Self {
        Generated { finish, tokens }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` or the model's position limit was reached.
    Length,
    /// A stop string was produced.
    Stop,
    /// The receiver asked to stop.
    Cancelled,
}
