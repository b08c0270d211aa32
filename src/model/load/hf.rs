//! Hugging Face model directories: `config.json`, `*.safetensors` (sharded or not), `tokenizer.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::gpt2::{Gpt2, GptShape};
use crate::model::gpt_neo::{GptNeo, GptNeoConfig};
use crate::model::llama::{Llama, LlamaConfig};
use crate::model::{Architecture, Model, ModelSource};
use crate::tokenize::{TextTokenizer, TokenizerInfo};

/// Loads a model directory; every tensor is converted to f32 on `device`.
pub fn load(dir: &Path, device: &Device) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| Error::model(dir, format!("cannot read config.json: {e}")))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(dir, format!("config.json is not valid JSON: {e}")))?;
    let arch = architecture(&cfg).map_err(|r| Error::model(dir, r))?;
    let tokenizer =
        TextTokenizer::from_file(&dir.join("tokenizer.json"))?.with_info(tokenizer_info(dir, &cfg));
    let prefix_gpt = matches!(arch.name(), "gpt2" | "gpt_neo");
    let mut tensors = BTreeMap::new();
    let mut dtypes = BTreeSet::new();
    for file in weight_files(dir)? {
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let loaded = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
            Error::model(
                &file,
                format!(
                    "corrupt or truncated safetensors file: {}",
                    crate::error::candle_reason(&e)
                ),
            )
        })?;
        for (name, t) in loaded {
            if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                return Err(Error::model(
                    &file,
                    format!(
                        "tensor {name} has dtype {:?}; only f32, f16 and bf16 are supported",
                        t.dtype()
                    ),
                ));
            }
            dtypes.insert(format!("{:?}", t.dtype()).to_lowercase());
            let name =
                if prefix_gpt && !name.starts_with("transformer.") && name != "lm_head.weight" {
                    format!("transformer.{name}")
                } else {
                    name
                };
            tensors.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    let source = ModelSource {
        path: dir.display().to_string(),
        format: "hf",
        stored_dtype: dtypes.into_iter().collect::<Vec<_>>().join(","),
    };
    Model::new(arch, tensors, tokenizer, source)
}

/// Builds the forward pass that `config.json`'s `model_type` names.
fn architecture(cfg: &serde_json::Value) -> std::result::Result<Box<dyn Architecture>, String> {
    let kind = cfg
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or("config.json: missing `model_type`")?;
    Ok(match kind {
        "llama" | "mistral" => Box::new(Llama::new(LlamaConfig::from_hf(cfg)?)?),
        "gpt2" => Box::new(Gpt2::new(GptShape::from_gpt2(cfg)?)?),
        "gpt_neo" => Box::new(GptNeo::new(GptNeoConfig::from_hf(cfg)?)),
        other => {
            return Err(format!(
                "model_type `{other}` is not supported (llama, mistral, gpt2, gpt_neo are)"
            ))
        }
    })
}

/// Special token ids from `config.json` and the chat template from `chat_template.jinja` or
/// `tokenizer_config.json`. Only an export reads them, so a damaged optional file costs what it
/// would add rather than the whole model.
fn tokenizer_info(dir: &Path, cfg: &serde_json::Value) -> TokenizerInfo {
    let id = |key: &str| cfg.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
    // transformers accepts one end-of-sequence id or a list of them.
    let eos = match cfg.get("eos_token_id") {
        Some(serde_json::Value::Array(ids)) => ids
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => id("eos_token_id").into_iter().collect(),
    };
    let chat_template = std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| {
            let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v.get("chat_template")?.as_str().map(String::from)
        });
    TokenizerInfo {
        bos: id("bos_token_id"),
        eos,
        pad: id("pad_token_id"),
        chat_template,
    }
}

/// The safetensors files of a directory: the shards an index names, else every `*.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::model(&index, "missing `weight_map`"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::model(
            dir,
            "no *.safetensors weights (pytorch_model.bin is not read)",
        ));
    }
    Ok(files)
}
