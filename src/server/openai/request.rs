//! A `POST /v1/completions` body read field by field, so that a bad field is refused by its name
//! and the reason, and fields this server does not use are ignored as OpenAI's clients expect.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::MODEL;
use crate::server::ServerError;

/// One prompt: text, or token ids the client encoded itself (as lm-evaluation-harness does).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Prompt {
    /// Text, encoded by the served model's tokenizer.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// The `prompt` field in each of the forms OpenAI accepts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompts {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    Batch(Vec<Vec<u32>>),
}

/// The `stop` field: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A completion request.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Completion {
    /// Each prompt with the name of its field (`prompt`, or `prompt[i]` in a list).
    pub prompts: Vec<(String, Prompt)>,
    /// Tokens to generate after each prompt (0: none, for scoring with `echo`).
    pub max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Generation ends before the first of these.
    pub stop: Vec<String>,
    /// Seed of the sampler (none: a random one).
    pub seed: Option<u64>,
    /// Log-probabilities with this many alternatives a token (none: no log-probabilities).
    pub logprobs: Option<usize>,
    /// Whether the prompt is returned before the completion, with its log-probabilities.
    pub echo: bool,
}

/// The most alternatives a token OpenAI's API returns, and so this one.
pub(super) const MAX_LOGPROBS: usize = 5;

/// A request body's fields.
pub(super) fn object(body: &[u8]) -> Result<Map<String, Value>, ServerError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ServerError::invalid("body", format!("not JSON: {e}")))?;
    match value {
        Value::Object(fields) => Ok(fields),
        _ => Err(ServerError::invalid("body", "must be a JSON object")),
    }
}

/// Parses a completion request body.
pub(super) fn completion(body: &[u8]) -> Result<Completion, ServerError> {
    let fields = object(body)?;
    if let Some(model) = field::<String>(&fields, "model")? {
        if model != MODEL {
            return Err(ServerError::UnknownModel {
                asked: model,
                served: MODEL,
            });
        }
    }
    if field::<bool>(&fields, "stream")? == Some(true) {
        return Err(ServerError::invalid(
            "stream",
            "streaming is not offered here; the gRPC Query.Complete streams",
        ));
    }
    for one in ["n", "best_of"] {
        if field::<u64>(&fields, one)?.is_some_and(|n| n != 1) {
            return Err(ServerError::invalid(one, "only 1 is supported"));
        }
    }
    let logprobs = field::<usize>(&fields, "logprobs")?;
    if logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
        return Err(ServerError::invalid(
            "logprobs",
            format!("at most {MAX_LOGPROBS}"),
        ));
    }
    Ok(Completion {
        prompts: prompts(&fields)?,
        max_tokens: field(&fields, "max_tokens")?.unwrap_or(16),
        temperature: field(&fields, "temperature")?.unwrap_or(1.0),
        top_p: field(&fields, "top_p")?.unwrap_or(1.0),
        stop: match field(&fields, "stop")? {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        seed: field(&fields, "seed")?,
        logprobs,
        echo: field(&fields, "echo")?.unwrap_or(false),
    })
}

/// Field `name` as a `T`, which must be there.
pub(super) fn required<T: DeserializeOwned>(
    fields: &Map<String, Value>,
    name: &str,
) -> Result<T, ServerError> {
    field(fields, name)?.ok_or_else(|| ServerError::invalid(name, "required"))
}

/// Field `name` as a `T`; absent and `null` are `None`.
pub(super) fn field<T: DeserializeOwned>(
    fields: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, ServerError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v)
            .map(Some)
            .map_err(|e| ServerError::invalid(name, e.to_string())),
    }
}

/// The prompts, each named by its field.
fn prompts(fields: &Map<String, Value>) -> Result<Vec<(String, Prompt)>, ServerError> {
    let value: Value = required(fields, "prompt")?;
    let prompts = Prompts::deserialize(&value).map_err(|_| {
        ServerError::invalid(
            "prompt",
            "must be a string, a list of strings, a list of token ids or a list of such lists",
        )
    })?;
    let listed = |items: Vec<Prompt>| {
        if items.is_empty() {
            return Err(ServerError::invalid("prompt", "an empty list"));
        }
        Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("prompt[{i}]"), p))
            .collect())
    };
    match prompts {
        Prompts::One(text) => Ok(vec![("prompt".into(), Prompt::Text(text))]),
        Prompts::Tokens(ids) if !ids.is_empty() => Ok(vec![("prompt".into(), Prompt::Tokens(ids))]),
        Prompts::Tokens(_) => listed(Vec::new()),
        Prompts::Many(texts) => listed(texts.into_iter().map(Prompt::Text).collect()),
        Prompts::Batch(seqs) => listed(seqs.into_iter().map(Prompt::Tokens).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> String {
        completion(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn every_prompt_form_reads_with_its_field_name() {
        let r = completion(br#"{"prompt": "Hi", "max_tokens": 0, "echo": true, "logprobs": 1}"#)
            .unwrap();
        assert_eq!(
            r.prompts,
            vec![("prompt".into(), Prompt::Text("Hi".into()))]
        );
        assert_eq!((r.max_tokens, r.echo, r.logprobs), (0, true, Some(1)));
        let r = completion(br#"{"prompt": [[1, 2], [3]], "stop": "\n"}"#).unwrap();
        assert_eq!(r.prompts[1], ("prompt[1]".into(), Prompt::Tokens(vec![3])));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert_eq!(r.max_tokens, 16);
        let r = completion(br#"{"prompt": [5, 6], "logprobs": null, "user": "ignored"}"#).unwrap();
        assert_eq!(
            r.prompts,
            vec![("prompt".into(), Prompt::Tokens(vec![5, 6]))]
        );
        assert_eq!(r.logprobs, None);
    }

    #[test]
    fn a_bad_field_is_named_with_the_reason() {
        assert!(refused("{").starts_with("body: not JSON"));
        assert_eq!(refused("[1]"), "body: must be a JSON object");
        assert_eq!(refused("{}"), "prompt: required");
        assert_eq!(refused(r#"{"prompt": []}"#), "prompt: an empty list");
        assert!(refused(r#"{"prompt": 3}"#).starts_with("prompt: must be a string"));
        assert!(refused(r#"{"prompt": "a", "max_tokens": -1}"#)
            .starts_with("max_tokens: invalid value"));
        assert!(refused(r#"{"prompt": "a", "temperature": "hot"}"#)
            .starts_with("temperature: invalid type"));
        assert_eq!(
            refused(r#"{"prompt": "a", "logprobs": 6}"#),
            "logprobs: at most 5"
        );
        assert!(refused(r#"{"prompt": "a", "stream": true}"#).starts_with("stream: "));
        assert!(refused(r#"{"prompt": "a", "model": "gpt-4"}"#).contains("`gpt-4` is not served"));
    }
}
