//! Tokenizers: a Hugging Face `tokenizer.json`, or a byte-level BPE rebuilt from GGUF metadata.

use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::{Error, Result};

/// Token ids of a text with each token's character range (Unicode scalar offsets, end exclusive).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids, no special tokens added.
    pub ids: Vec<u32>,
    /// `(start, end)` character range of each token in the text.
    pub offsets: Vec<(usize, usize)>,
}

/// What a `tokenizer.json` alone does not say: which tokens begin, end and pad a sequence, and
/// the chat template, where the model's files say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerInfo {
    /// Beginning-of-sequence token id.
    pub bos: Option<u32>,
    /// End-of-sequence token ids (some models stop on several).
    pub eos: Vec<u32>,
    /// Padding token id.
    pub pad: Option<u32>,
    /// The Jinja chat template.
    pub chat_template: Option<String>,
}

/// A tokenizer as the rest of locus uses it.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    info: TokenizerInfo,
}

/// GGUF token types that llama.cpp marks as control (special) tokens.
const GGUF_CONTROL: i32 = 3;
/// GGUF token types for user-defined added tokens.
const GGUF_USER_DEFINED: i32 = 4;

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::model(path, format!("tokenizer.json: {e}")))?;
        Ok(TextTokenizer {
            inner,
            info: TokenizerInfo::default(),
        })
    }

    /// Rebuilds the byte-level BPE a GGUF file describes (`tokenizer.ggml.model = gpt2`):
    /// digits split individually, then GPT-2 byte-level pre-tokenization, as Hugging Face does.
    pub fn from_gguf_bpe(
        tokens: Vec<String>,
        merges: Vec<String>,
        types: Vec<i32>,
    ) -> std::result::Result<Self, String> {
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("tokenizer.ggml.merges: malformed merge `{m}`"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| format!("tokenizer.ggml: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let pre: Vec<PreTokenizerWrapper> = vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ];
        inner.with_pre_tokenizer(Some(Sequence::new(pre)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.with_post_processor(Some(ByteLevel::new(false, false, true)));
        let added = |kind: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == kind)
                .map(|(tok, _)| AddedToken::from(tok.clone(), special))
                .collect()
        };
        inner.add_special_tokens(&added(GGUF_CONTROL, true));
        inner.add_tokens(&added(GGUF_USER_DEFINED, false));
        Ok(TextTokenizer {
            inner,
            info: TokenizerInfo::default(),
        })
    }

    /// The same tokenizer with `info` attached.
    pub fn with_info(self, info: TokenizerInfo) -> Self {
        TextTokenizer { info, ..self }
    }

    /// Special token ids and chat template, where the model's files say.
    pub fn info(&self) -> &TokenizerInfo {
        &self.info
    }

    /// The tokenizer as `tokenizer.json` text, which `tokenizers` and transformers load as is.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The string of token `id`, if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Encodes `text` without adding special tokens, with character offsets.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self
            .inner
            .encode_char_offsets(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Turns ids back into text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Number of tokens including added ones.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
