//! GGUF files (llama.cpp's format): tensors dequantized to f32, names mapped to the Hugging Face
//! layout, Q/K rows un-permuted, and the tokenizer rebuilt from the metadata.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::llama::{Llama, LlamaConfig};
use crate::model::quant::{Format, QuantRows};
use crate::model::{Model, ModelSource};
use crate::tokenize::{TextTokenizer, TokenizerInfo};

/// Loads a Llama-family GGUF file.
pub fn load(path: &Path, device: &Device) -> Result<Model> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| {
        Error::model(
            path,
            format!(
                "not a GGUF file, or a corrupt one: {}",
                crate::error::candle_reason(&e)
            ),
        )
    })?;
    let meta = Meta {
        path,
        content: &content,
    };
    let arch = meta.str("general.architecture")?;
    if arch != "llama" {
        return Err(Error::model(
            path,
            format!("GGUF architecture `{arch}` is not supported (llama is)"),
        ));
    }
    let cfg = llama_config(&meta)?;
    // Before any tensor is read: un-permuting Q/K rows divides by the head counts.
    cfg.validate().map_err(|r| Error::model(path, r))?;
    let mut tensors = BTreeMap::new();
    let mut dtypes = std::collections::BTreeSet::new();
    let mut blocks = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        dtypes.insert(format!("{:?}", content.tensor_infos[name].ggml_dtype).to_lowercase());
        let q = content.tensor(&mut reader, name, device).map_err(|e| {
            Error::model(
                path,
                format!(
                    "tensor {name}: truncated or corrupt: {}",
                    crate::error::candle_reason(&e)
                ),
            )
        })?;
        let t = q.dequantize(device)?;
        let hf =
            hf_name(name).ok_or_else(|| Error::model(path, format!("unexpected tensor {name}")))?;
        let heads = if name.ends_with("attn_q.weight") {
            Some(cfg.heads)
        } else if name.ends_with("attn_k.weight") {
            Some(cfg.kv_heads)
        } else {
            None
        };
        if device.is_cpu() {
            if let Some(b) = quant_rows(&q, heads)? {
                blocks.push((hf.clone(), b));
            }
        }
        let t = match heads {
            Some(h) => unpermute(&t, h)?,
            None => t,
        };
        tensors.insert(hf, t);
    }
    let cfg = LlamaConfig {
        tied_head: !tensors.contains_key("lm_head.weight"),
        ..cfg
    };
    let tokenizer = gguf_tokenizer(&meta)?;
    let arch = Llama::new(cfg).map_err(|r| Error::model(path, r))?;
    let source = ModelSource {
        path: path.display().to_string(),
        format: "gguf",
        stored_dtype: dtypes.into_iter().collect::<Vec<_>>().join(","),
    };
    let mut model = Model::new(Box::new(arch), tensors, tokenizer, source)?;
    model.blocks = QuantRows::into_one_buffer(blocks)
        .into_iter()
        .map(|(name, b)| (name, Arc::new(b)))
        .collect();
    Ok(model)
}

/// The blocks of a Q4_1 or Q8_0 matrix, its rows in the order [`unpermute`] gives them for a Q/K
/// projection of `heads` heads; `None` for other formats and shapes.
fn quant_rows(q: &QTensor, heads: Option<usize>) -> Result<Option<QuantRows>> {
    let Some(format) = Format::of(q.dtype()) else {
        return Ok(None);
    };
    let Ok((rows, cols)) = q.shape().dims2() else {
        return Ok(None);
    };
    let Some(b) = QuantRows::new(format, rows, cols, q.data()?.into_owned()) else {
        return Ok(None);
    };
    let Some(heads) = heads else {
        return Ok(Some(b));
    };
    // The file's row index of every un-permuted row: `unpermute` applied to the indices.
    let index = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.reshape((rows, 1))?;
    let order: Vec<u32> = unpermute(&index, heads)?.flatten_all()?.to_vec1()?;
    let order: Vec<usize> = order.into_iter().map(|r| r as usize).collect();
    Ok(b.reorder_rows(&order))
}

/// Typed access to GGUF metadata with errors that name the key.
struct Meta<'a> {
    path: &'a Path,
    content: &'a Content,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::model(self.path, format!("GGUF metadata lacks `{key}`")))
    }

    fn bad(&self, key: &str, e: candle_core::Error) -> Error {
        Error::model(self.path, format!("GGUF metadata `{key}`: {e}"))
    }

    fn str(&self, key: &str) -> Result<String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|e| self.bad(key, e))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| self.bad(key, e))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .to_f32()
            .map(f64::from)
            .map_err(|e| self.bad(key, e))
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.get(key)?.to_vec().map_err(|e| self.bad(key, e))
    }
}

fn llama_config(m: &Meta) -> Result<LlamaConfig> {
    let hidden = m.usize("llama.embedding_length")?;
    let heads = m.usize("llama.attention.head_count")?;
    let vocab = match m.usize("llama.vocab_size") {
        Ok(v) => v,
        Err(_) => m.array("tokenizer.ggml.tokens")?.len(),
    };
    Ok(LlamaConfig {
        hidden,
        intermediate: m.usize("llama.feed_forward_length")?,
        layers: m.usize("llama.block_count")?,
        heads,
        kv_heads: m.usize("llama.attention.head_count_kv").unwrap_or(heads),
        head_dim: m
            .usize("llama.rope.dimension_count")
            .unwrap_or_else(|_| hidden.checked_div(heads).unwrap_or(0)),
        vocab,
        max_positions: m.usize("llama.context_length").ok(),
        rope_theta: m.f64("llama.rope.freq_base").unwrap_or(10000.0),
        eps: m.f64("llama.attention.layer_norm_rms_epsilon")?,
        tied_head: true,
        attention_bias: false,
        mlp_bias: false,
        sliding_window: None,
    })
}

fn gguf_tokenizer(m: &Meta) -> Result<TextTokenizer> {
    let kind = m.str("tokenizer.ggml.model")?;
    if kind != "gpt2" {
        return Err(Error::model(
            m.path,
            format!("GGUF tokenizer `{kind}` is not supported (byte-level BPE `gpt2` is)"),
        ));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        m.array(key)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| m.bad(key, e)))
            .collect()
    };
    let types = match m.array("tokenizer.ggml.token_type") {
        Ok(a) => a
            .iter()
            .map(|v| {
                v.to_i32()
                    .map_err(|e| m.bad("tokenizer.ggml.token_type", e))
            })
            .collect::<Result<Vec<_>>>()?,
        Err(_) => Vec::new(),
    };
    let id = |key: &str| m.usize(key).ok().map(|v| v as u32);
    let info = TokenizerInfo {
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad: id("tokenizer.ggml.padding_token_id"),
        chat_template: m.str("tokenizer.chat_template").ok(),
    };
    Ok(TextTokenizer::from_gguf_bpe(
        strings("tokenizer.ggml.tokens")?,
        strings("tokenizer.ggml.merges")?,
        types,
    )
    .map_err(|r| Error::model(m.path, r))?
    .with_info(info))
}

/// Maps llama.cpp tensor names to the Hugging Face Llama names.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's row permutation of Q/K weights (made for interleaved rotary embeddings),
/// so the weights match the Hugging Face layout and its half-rotation rotary embedding.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))
}
