//! The served tokenizer over HTTP as vLLM offers it (`/tokenizer_info`, `/tokenize`,
//! `/detokenize`), which lm-evaluation-harness's `local-completions` finds and uses
//! (`tokenizer_backend=remote`), so an evaluation needs no tokenizer files of its own.

use serde_json::{json, Value};

use super::completions::known;
use super::request::{field, object, required};
use crate::server::{ServerError, State};
use crate::snapshot::Snapshot;

/// `GET /tokenizer_info`: the special tokens, the chat template and the longest prompt.
pub(super) fn info(state: &State, s: &Snapshot) -> Value {
    let tokenizer = &s.model().tokenizer;
    let info = tokenizer.info();
    let name = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id));
    json!({
        "eos_token": name(info.eos.first().copied()),
        "bos_token": name(info.bos),
        "pad_token": name(info.pad),
        "chat_template": info.chat_template,
        "max_model_len": crate::server::query::max_tokens(s, state),
    })
}

/// `POST /tokenize` of `{"prompt", "add_special_tokens"}`: the token ids, with the
/// beginning-of-sequence token first when asked for and the model has one.
pub(super) fn tokenize(state: &State, s: &Snapshot, body: &[u8]) -> Result<Value, ServerError> {
    let fields = object(body)?;
    let prompt: String = required(&fields, "prompt")?;
    let tokenizer = &s.model().tokenizer;
    let mut tokens = tokenizer.encode(&prompt)?.ids;
    if field(&fields, "add_special_tokens")?.unwrap_or(false) {
        tokens.splice(0..0, tokenizer.info().bos);
    }
    Ok(json!({
        "count": tokens.len(),
        "tokens": tokens,
        "max_model_len": crate::server::query::max_tokens(s, state),
    }))
}

/// `POST /detokenize` of `{"tokens"}`: their text.
pub(super) fn detokenize(s: &Snapshot, body: &[u8]) -> Result<Value, ServerError> {
    let tokens: Vec<u32> = required(&object(body)?, "tokens")?;
    let tokens = known(s, "tokens", &tokens)?;
    Ok(json!({"prompt": s.model().tokenizer.decode(&tokens)?}))
}
