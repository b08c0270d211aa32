//! `POST /v1/completions` on the Query service's path: the same snapshot, slots, limits, sampling
//! and generation, answered in OpenAI's shape.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::request::{Completion, Prompt};
use crate::infer::{self, Finish, Generated};
use crate::server::query::{bounded, max_tokens, on_snapshot, sampling, tokens};
use crate::server::{ServerError, State};
use crate::snapshot::Snapshot;

/// One prompt's choice and its token counts.
struct Choice {
    body: Value,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// Answers a completion request on one snapshot: its version and the `choices` and `usage`.
pub(super) async fn complete(
    state: &Arc<State>,
    request: Completion,
) -> Result<(u64, Value), ServerError> {
    let limits = &state.config.limits;
    ServerError::at_most(
        "prompt",
        request.prompts.len(),
        "prompts",
        limits.max_documents,
    )?;
    let sampling = sampling(
        limits,
        request.max_tokens,
        request.temperature,
        request.top_p,
        request.stop.clone(),
        request.seed,
    )?;
    let shared = Arc::clone(state);
    let (version, choices) = on_snapshot(state, move |s| {
        let max = max_tokens(s, &shared);
        request
            .prompts
            .iter()
            .enumerate()
            .map(|(index, (field, prompt))| {
                let ids = match prompt {
                    Prompt::Text(text) => tokens(s, field, text, 1, max)?,
                    Prompt::Tokens(ids) => bounded(field, known(s, field, ids)?, 1, max)?,
                };
                let mut text = String::new();
                let generated = infer::generate(s, &ids, &sampling, |piece, _| {
                    text.push_str(piece);
                    true
                })?;
                choice(s, index, &request, &ids, text, &generated)
            })
            .collect::<Result<Vec<Choice>, ServerError>>()
    })
    .await?;
    let prompt_tokens: usize = choices.iter().map(|c| c.prompt_tokens).sum();
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let body = json!({
        "choices": choices.into_iter().map(|c| c.body).collect::<Vec<_>>(),
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    });
    Ok((version, body))
}

/// `ids` when the model has every one of them.
pub(super) fn known(s: &Snapshot, field: &str, ids: &[u32]) -> Result<Vec<u32>, ServerError> {
    let vocab = s.model().arch.vocab_size();
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(i) => Err(ServerError::invalid(
            format!("{field}[{i}]"),
            format!(
                "token id {} is not below the vocabulary size {vocab}",
                ids[i]
            ),
        )),
        None => Ok(ids.to_vec()),
    }
}

/// The choice for the prompt `ids` and what was generated after it: `text`, from the sampled
/// tokens of `generation`.
fn choice(
    s: &Snapshot,
    index: usize,
    request: &Completion,
    ids: &[u32],
    text: String,
    generation: &Generated,
) -> Result<Choice, ServerError> {
    let (generated, finish) = (generation.tokens.as_slice(), generation.finish);
    let tokenizer = &s.model().tokenizer;
    let prompt_text = match &request.prompts[index].1 {
        Prompt::Text(t) => t.clone(),
        Prompt::Tokens(_) => tokenizer.decode(ids)?,
    };
    let logprobs = match request.logprobs {
        None => Value::Null,
        Some(top) => {
            let sequence = [ids, generated].concat();
            let mut pieces = pieces(s, &sequence)?;
            // A stop string ends the text inside the sampled tokens; the tokens reported are those
            // that begin before it ends.
            let kept = pieces[ids.len()..]
                .iter()
                .scan(0, |at, p| {
                    let start = *at;
                    *at += p.len();
                    Some(start)
                })
                .take_while(|&start| finish != Finish::Stop || start < text.len())
                .count();
            pieces.truncate(ids.len() + kept);
            let from = if request.echo { 0 } else { ids.len() };
            logprobs(s, &sequence[..pieces.len()], pieces, top, from)?
        }
    };
    let body = json!({
        "index": index,
        "text": if request.echo { prompt_text + &text } else { text },
        "logprobs": logprobs,
        "finish_reason": if finish == Finish::Stop { "stop" } else { "length" },
    });
    Ok(Choice {
        body,
        prompt_tokens: ids.len(),
        completion_tokens: generated.len(),
    })
}

/// The text each token of `ids` adds to the text before it. A token is decoded after the few
/// before it, because a tokenizer may decode a token differently at the start of a text (a
/// leading space dropped) and a character may span tokens; a token that completes no character
/// is decoded alone.
fn pieces(s: &Snapshot, ids: &[u32]) -> Result<Vec<String>, ServerError> {
    /// Tokens of left context: enough for any character of UTF-8 (4 bytes).
    const CONTEXT: usize = 4;
    let tokenizer = &s.model().tokenizer;
    (0..ids.len())
        .map(|i| {
            let from = i.saturating_sub(CONTEXT);
            let before = tokenizer.decode(&ids[from..i])?;
            let through = tokenizer.decode(&ids[from..=i])?;
            Ok(match through.strip_prefix(before.as_str()) {
                Some(piece) if !before.ends_with('\u{FFFD}') => piece.to_string(),
                _ => tokenizer.decode(&ids[i..=i])?,
            })
        })
        .collect()
}

/// OpenAI's `logprobs` object for the tokens of `sequence` from `from` on, each with the text it
/// adds (`pieces`) and `top` alternatives; offsets count characters from the start of the prompt.
fn logprobs(
    s: &Snapshot,
    sequence: &[u32],
    pieces: Vec<String>,
    top: usize,
    from: usize,
) -> Result<Value, ServerError> {
    let scored = infer::token_logprobs(s, sequence, top)?;
    let tokenizer = &s.model().tokenizer;
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut offsets = Vec::new();
    let mut at = 0;
    for (j, piece) in pieces.into_iter().enumerate() {
        let start = at;
        at += piece.chars().count();
        if j < from {
            continue;
        }
        offsets.push(start);
        tokens.push(piece);
        // The first token of a sequence has no context to be predicted from.
        let Some(scored) = j.checked_sub(1).map(|k| &scored[k]) else {
            token_logprobs.push(Value::Null);
            top_logprobs.push(Value::Null);
            continue;
        };
        token_logprobs.push(json!(scored.logprob));
        let mut alternatives = Map::new();
        for &(id, logprob) in &scored.top {
            alternatives.insert(tokenizer.decode(&[id])?, json!(logprob));
        }
        top_logprobs.push(Value::Object(alternatives));
    }
    Ok(json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }))
}
