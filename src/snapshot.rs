//! Immutable snapshots of the weights that queries compute on, and the versions a server retains.
//!
//! The learner updates the model's variables in place, and a variable's detached tensor shares its
//! storage, so a snapshot holds *copies*: the first snapshot copies every weight, each later one
//! copies only the groups an update changed and shares every other tensor with its predecessor.
//! A query takes the current snapshot once and computes entirely on it, so its answer belongs to
//! exactly one version, whatever the learner does meanwhile.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use aho_corasick::{AhoCorasick, Input, MatchKind};
use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::cache::KvCache;
use crate::model::{GroupId, Model, ParamKind, Params};

/// How a snapshot came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The weights as loaded.
    Loaded,
    /// A learning step.
    Update,
    /// A rollback to the weights of the given version.
    Rollback(u64),
}

/// One immutable model version.
pub struct Snapshot {
    version: u64,
    /// Architecture and tokenizer; the weights are `tensors`, never the model's live variables.
    model: Arc<Model>,
    tensors: BTreeMap<String, Tensor>,
    params: Params,
    created: SystemTime,
    changed: Vec<GroupId>,
    origin: Origin,
}

impl Snapshot {
    fn build(
        version: u64,
        model: Arc<Model>,
        tensors: BTreeMap<String, Tensor>,
        changed: Vec<GroupId>,
        origin: Origin,
    ) -> Self {
        Snapshot {
            version,
            model,
            params: Params::from_map(tensors.clone()),
            tensors,
            created: SystemTime::now(),
            changed,
            origin,
        }
    }

    /// Copies every weight of `model` as version `version`.
    pub fn load(model: Arc<Model>, version: u64) -> Result<Self> {
        let tensors = model
            .vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_detached_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self::build(
            version,
            model,
            tensors,
            Vec::new(),
            Origin::Loaded,
        ))
    }

    /// The snapshot after an update that changed `changed`: those groups are copied from
    /// `weights` (the learner's weights as they now serve, adapters included), every other tensor
    /// is shared with `self`. Call it from the thread that updates the weights, between updates.
    pub fn after_update(
        &self,
        version: u64,
        changed: &[GroupId],
        weights: &Params,
    ) -> Result<Self> {
        let set: BTreeSet<GroupId> = changed.iter().copied().collect();
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let t = match self.model.arch.kind_of(name) {
                    Some(ParamKind::Group(g)) if set.contains(&g) => {
                        weights.get(name)?.detach().copy()?
                    }
                    _ => t.clone(),
                };
                Ok((name.clone(), t))
            })
            .collect::<Result<_>>()?;
        Ok(Self::build(
            version,
            Arc::clone(&self.model),
            tensors,
            set.into_iter().collect(),
            Origin::Update,
        ))
    }

    /// Writes this snapshot's weights back into the model's variables and returns the snapshot
    /// that serves them as `version`, sharing this one's tensors. `current` is the snapshot being
    /// replaced, to name the groups that differ. Call it from the thread that updates the variables.
    pub fn restore(&self, current: &Snapshot, version: u64) -> Result<Self> {
        for (name, var) in &self.model.vars {
            var.set(&self.tensors[name])?;
        }
        // Shared tensors are identical; a tensor that is not shared belongs to a changed group.
        let changed: BTreeSet<GroupId> = self
            .tensors
            .iter()
            .filter(|(name, t)| current.tensors.get(*name).map(Tensor::id) != Some(t.id()))
            .filter_map(|(name, _)| match self.model.arch.kind_of(name) {
                Some(ParamKind::Group(g)) => Some(g),
                _ => None,
            })
            .collect();
        Ok(Self::build(
            version,
            Arc::clone(&self.model),
            self.tensors.clone(),
            changed.into_iter().collect(),
            Origin::Rollback(self.version),
        ))
    }

    /// The tensors of `groups`, by parameter name.
    pub fn tensors_of(&self, groups: &[GroupId]) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(name, _)| {
                matches!(self.model.arch.kind_of(name),
                    Some(ParamKind::Group(g)) if groups.contains(&g))
            })
            .map(|(name, t)| (name.clone(), t.clone()))
            .collect()
    }

    /// Bytes of all its weights: what a full copy of the model would take.
    pub fn bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// The version number.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the snapshot was made.
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// Groups whose weights differ from the previous version.
    pub fn changed(&self) -> &[GroupId] {
        &self.changed
    }

    /// How the snapshot came to be.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The model the snapshot belongs to (architecture and tokenizer).
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The snapshot's tensor called `name` (tests compare versions through it).
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Negative log-likelihood of each target `j >= 1` of each sequence (each at least 2 tokens).
    pub fn target_nll(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if let Some(s) = seqs.iter().find(|s| s.len() < 2) {
            return Err(Error::Invalid(format!(
                "a sequence of {} token(s) has no target",
                s.len()
            )));
        }
        crate::eval::metrics::target_nll(&self.model, &self.params, seqs)
    }

    /// Summed log-probability of each continuation given `prompt` (at least one prompt token; a
    /// continuation may not be empty).
    pub fn logprobs(&self, prompt: &[u32], continuations: &[Vec<u32>]) -> Result<Vec<f64>> {
        if prompt.is_empty() || continuations.iter().any(Vec::is_empty) {
            return Err(Error::Invalid(
                "a prompt and every continuation need at least one token".into(),
            ));
        }
        let p = prompt.len();
        let seqs: Vec<Vec<u32>> = continuations.iter().map(|c| [prompt, c].concat()).collect();
        let nll = self.target_nll(&seqs)?;
        Ok(nll
            .iter()
            .zip(continuations)
            .map(|(row, c)| {
                -row[p - 1..p - 1 + c.len()]
                    .iter()
                    .map(|&v| f64::from(v))
                    .sum::<f64>()
            })
            .collect())
    }

    /// The log-probability of each token `j >= 1` of `seq` given the tokens before it, with the
    /// `top` most likely tokens at that position and their log-probabilities, most likely first.
    /// The token's own value and the alternatives come from one log-softmax, so a token that is
    /// the most likely one compares equal to the first alternative.
    pub fn token_logprobs(&self, seq: &[u32], top: usize) -> Result<Vec<TokenLogprob>> {
        let Some(targets) = seq.len().checked_sub(1).filter(|&n| n > 0) else {
            return Ok(Vec::new());
        };
        let device = self.model.device();
        let ids = Tensor::from_slice(seq, (1, seq.len()), device)?;
        let logits = self.model.arch.forward(&self.params, &ids)?;
        let logp =
            candle_nn::ops::log_softmax(&logits.squeeze(0)?.narrow(0, 0, targets)?, D::Minus1)?;
        let next = Tensor::from_slice(&seq[1..], (targets, 1), device)?;
        let chosen: Vec<f32> = logp.gather(&next, 1)?.squeeze(1)?.to_vec1()?;
        let rows: Vec<Vec<f32>> = if top == 0 {
            vec![Vec::new(); targets]
        } else {
            logp.to_vec2()?
        };
        Ok(chosen
            .into_iter()
            .zip(rows)
            .map(|(logprob, row)| TokenLogprob {
                logprob,
                top: most_likely(&row, top),
            })
            .collect())
    }

    /// Continues `prompt` token by token. `emit` receives each new piece of text with the number
    /// of tokens generated so far and returns false to cancel; text that could begin a stop string
    /// is held back until it is known not to.
    pub fn generate(
        &self,
        prompt: &[u32],
        sampling: &Sampling,
        mut emit: impl FnMut(&str, usize) -> bool,
    ) -> Result<Generated> {
        if prompt.is_empty() {
            return Err(Error::Invalid("the prompt has no tokens".into()));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(sampling.seed);
        let mut stops = Stops::new(&sampling.stop)?;
        let holdback = stops.longest.saturating_sub(1);
        let limit = self.model.arch.max_positions().unwrap_or(usize::MAX);
        // The prompt goes through once; then each new token alone, against the cached keys and values.
        let mut cache = KvCache::new(self.model.arch.num_layers());
        let mut input = prompt.to_vec();
        let mut generated: Vec<u32> = Vec::new();
        let mut sent = String::new();
        while generated.len() < sampling.max_tokens && cache.len() + input.len() <= limit {
            let ids = Tensor::from_vec(input.clone(), (1, input.len()), self.model.device())?;
            let logits = self
                .model
                .arch
                .forward_cached(&self.params, &ids, &mut cache)?;
            let last: Vec<f32> = logits
                .squeeze(0)?
                .get_on_dim(0, input.len() - 1)?
                .to_vec1()?;
            let next = sample(&last, sampling.temperature, sampling.top_p, &mut rng);
            input = vec![next];
            generated.push(next);
            let text = self.model.tokenizer.decode(&generated)?;
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
        let text = self.model.tokenizer.decode(&generated)?;
        if let Some(rest) = text.strip_prefix(sent.as_str()) {
            if !rest.is_empty() && !emit(rest, generated.len()) {
                return Ok(Generated::new(Finish::Cancelled, generated));
            }
        }
        Ok(Generated::new(Finish::Length, generated))
    }
}

/// How [`Snapshot::generate`] picks tokens and when it stops.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Softmax temperature; 0 or less is greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// Stop before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Seed of the sampler.
    pub seed: u64,
}

/// The stop strings of one generation as one automaton, searched only where the text can hold a
/// new match: a token then costs the same however many stop strings a request brings.
struct Stops {
    automaton: Option<AhoCorasick>,
    /// Bytes of the longest stop string.
    longest: usize,
    /// The text last searched, which holds no stop string.
    searched: String,
}

impl Stops {
    fn new(stop: &[String]) -> Result<Self> {
        let automaton = if stop.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(stop)
                    .map_err(|e| Error::Invalid(format!("stop strings: {e}")))?,
            )
        };
        Ok(Stops {
            automaton,
            longest: stop.iter().map(String::len).max().unwrap_or(0),
            searched: String::new(),
        })
    }

    /// Where the first stop string in `text` starts. Past their common prefix `text` may differ from
    /// the text searched before (a byte-level token can complete a character); a new match ends
    /// after that prefix, so it starts no more than `longest - 1` bytes before the prefix ends.
    fn find(&mut self, text: &str) -> Option<usize> {
        let automaton = self.automaton.as_ref()?;
        let common = self
            .searched
            .bytes()
            .zip(text.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let from = common.saturating_sub(self.longest.saturating_sub(1));
        let found = automaton
            .find(Input::new(text).span(from..text.len()))
            .map(|m| m.start());
        self.searched.clear();
        self.searched.push_str(text);
        found
    }
}

/// One position's log-probabilities: [`Snapshot::token_logprobs`].
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the token that is there.
    pub logprob: f32,
    /// The most likely tokens there and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The `k` largest entries of `row` as `(index, value)`, largest first.
fn most_likely(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let k = k.min(all.len());
    if k < all.len() {
        // A partial selection: the vocabulary is tens of thousands of entries and k a handful.
        all.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
        all.truncate(k);
    }
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    all
}

/// What [`Snapshot::generate`] produced.
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

/// Greedy when `temperature <= 0`, else a draw from the top-`top_p` mass of the tempered softmax.
fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (f64::from(l - max) / temperature).exp()))
        .filter(|(_, p)| p.is_finite())
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if probs.is_empty() || total.is_nan() || total <= 0.0 {
        return argmax();
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let keep = top_p.clamp(f64::MIN_POSITIVE, 1.0) * total;
    let mut mass = 0.0;
    let mut cut = probs.len();
    for (i, (_, p)) in probs.iter().enumerate() {
        mass += p;
        if mass >= keep {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mut draw = rng.random::<f64>() * mass;
    for &(id, p) in &probs {
        if draw < p {
            return id;
        }
        draw -= p;
    }
    probs[probs.len() - 1].0
}

/// The snapshot being served and the recent versions kept for rollback.
pub struct Snapshots {
    current: RwLock<Arc<Snapshot>>,
    history: Mutex<VecDeque<Arc<Snapshot>>>,
    keep: usize,
}

impl Snapshots {
    /// Serves `initial` and retains up to `keep` versions (at least the current one).
    pub fn new(initial: Snapshot, keep: usize) -> Self {
        let initial = Arc::new(initial);
        Snapshots {
            current: RwLock::new(Arc::clone(&initial)),
            history: Mutex::new(VecDeque::from([initial])),
            keep: keep.max(1),
        }
    }

    /// The snapshot to compute a query on; hold the `Arc` for the whole query.
    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `next` the served snapshot; versions only increase.
    pub fn publish(&self, next: Snapshot) -> Result<Arc<Snapshot>> {
        let next = Arc::new(next);
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
            if next.version <= current.version {
                return Err(Error::Invalid(format!(
                    "snapshot version {} does not follow the served version {}",
                    next.version, current.version
                )));
            }
            *current = Arc::clone(&next);
        }
        history.push_back(Arc::clone(&next));
        while history.len() > self.keep {
            history.pop_front();
        }
        Ok(next)
    }

    /// The retained versions, oldest first (the current one last).
    pub fn retained(&self) -> Vec<Arc<Snapshot>> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The retained snapshot of `version`, if any.
    pub fn get(&self, version: u64) -> Option<Arc<Snapshot>> {
        self.retained().into_iter().find(|s| s.version == version)
    }
}

#[cfg(test)]
mod tests {
    use super::Stops;

    fn stops(s: &[&str]) -> Stops {
        Stops::new(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_stop_string_is_found_across_the_texts_it_grows_through() {
        let mut s = stops(&["END", "xyzab", "za"]);
        for text in ["The E", "The EN", "The ENxy"] {
            assert_eq!(s.find(text), None, "{text}");
        }
        // "za" ends first, but "xyzab" starts first.
        assert_eq!(s.find("The ENxyzab"), Some(6));
    }

    #[test]
    fn a_text_that_changes_behind_its_end_is_searched_again_there() {
        let mut s = stops(&["é!"]);
        assert_eq!(s.find("caf\u{FFFD}"), None);
        assert_eq!(s.find("café!"), Some(3));
        assert_eq!(stops(&[]).find("anything"), None);
    }
}
