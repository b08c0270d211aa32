//! GPT-Neo: GPT-2's block stack with separate Q/K/V projections, unscaled attention scores, and
//! layers alternating between global attention and local attention over `window_size` tokens.

use candle_core::{Result, Tensor};
use serde::Serialize;

use super::cache::KvCache;
use super::gpt2::{gpt_common_shapes, gpt_forward, gpt_kind_of, Activation, GptShape, GPT_HEAD};
use super::ops::{self, linear};
use super::{cfg_f64, cfg_usize, Architecture, ParamKind, Params};

/// GPT-Neo's sizes and its per-layer attention pattern.
#[derive(Debug, Clone, Serialize)]
pub struct GptNeoConfig {
    /// Sizes shared with GPT-2.
    pub shape: GptShape,
    /// For each layer, whether its attention is local (windowed).
    pub local: Vec<bool>,
    /// How far back a local-attention query sees.
    pub window_size: usize,
}

impl GptNeoConfig {
    /// Reads a Hugging Face GPT-Neo `config.json`, expanding `attention_types`.
    pub fn from_hf(cfg: &serde_json::Value) -> std::result::Result<Self, String> {
        let hidden = cfg_usize(cfg, "hidden_size")?;
        let layers = cfg_usize(cfg, "num_layers")?;
        let shape = GptShape {
            hidden,
            intermediate: cfg_usize(cfg, "intermediate_size").unwrap_or(4 * hidden),
            layers,
            heads: cfg_usize(cfg, "num_heads")?,
            vocab: cfg_usize(cfg, "vocab_size")?,
            positions: cfg_usize(cfg, "max_position_embeddings")?,
            eps: cfg_f64(cfg, "layer_norm_epsilon").unwrap_or(1e-5),
            activation: Activation::from_hf(
                cfg.get("activation_function")
                    .and_then(|v| v.as_str())
                    .unwrap_or("gelu_new"),
            )?,
        };
        let local = expand_attention_types(cfg.get("attention_types"))?;
        if local.len() != layers {
            return Err(format!(
                "config.json: attention_types describe {} layers but num_layers is {layers}",
                local.len()
            ));
        }
        shape.validate()?;
        Ok(GptNeoConfig {
            shape,
            local,
            window_size: cfg_usize(cfg, "window_size")?,
        })
    }
}

/// `[[["global", "local"], 12]]` becomes 24 flags, true for local layers.
fn expand_attention_types(v: Option<&serde_json::Value>) -> std::result::Result<Vec<bool>, String> {
    let bad = || {
        "config.json: `attention_types` must look like [[[\"global\", \"local\"], n]]".to_string()
    };
    let mut out = Vec::new();
    for entry in v.and_then(|v| v.as_array()).ok_or_else(bad)? {
        let pair = entry.as_array().filter(|p| p.len() == 2).ok_or_else(bad)?;
        let kinds = pair[0].as_array().ok_or_else(bad)?;
        let repeat = pair[1].as_u64().ok_or_else(bad)?;
        for _ in 0..repeat {
            for k in kinds {
                match k.as_str() {
                    Some("global") => out.push(false),
                    Some("local") => out.push(true),
                    _ => return Err(bad()),
                }
            }
        }
    }
    Ok(out)
}

/// The inverse of [`expand_attention_types`]: the shortest repeating pattern of the flags and its
/// repeat count, so `[global, local] x 12` is written back as it is usually read.
fn compress_attention_types(local: &[bool]) -> serde_json::Value {
    let n = local.len();
    let Some(period) =
        (1..=n).find(|&p| n.is_multiple_of(p) && (0..n).all(|i| local[i] == local[i % p]))
    else {
        return serde_json::json!([]);
    };
    let kinds: Vec<&str> = local[..period]
        .iter()
        .map(|&l| if l { "local" } else { "global" })
        .collect();
    serde_json::json!([[kinds, n / period]])
}

/// GPT-Neo's forward pass.
pub struct GptNeo {
    cfg: GptNeoConfig,
}

impl GptNeo {
    /// Wraps a parsed configuration.
    pub fn new(cfg: GptNeoConfig) -> Self {
        GptNeo { cfg }
    }
}

impl Architecture for GptNeo {
    fn name(&self) -> &'static str {
        "gpt_neo"
    }

    fn num_layers(&self) -> usize {
        self.cfg.shape.layers
    }

    fn vocab_size(&self) -> usize {
        self.cfg.shape.vocab
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.cfg.shape.positions)
    }

    fn head_name(&self) -> &'static str {
        GPT_HEAD
    }

    fn hidden_cached(&self, p: &Params, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let s = &self.cfg.shape;
        let w = |l: usize, name: &str| p.get(&format!("transformer.h.{l}.{name}"));
        let attn = |l: usize, h: &Tensor, cache: &mut KvCache| -> Result<Tensor> {
            let proj = |n: &str| -> Result<Tensor> {
                ops::split_heads(
                    &linear(h, w(l, &format!("attn.attention.{n}.weight"))?, None)?,
                    s.heads,
                )
            };
            let window = self.cfg.local[l].then_some(self.cfg.window_size);
            // GPT-Neo does not scale attention scores by 1/sqrt(head_dim).
            let (k, v) = cache.append(l, proj("k_proj")?, proj("v_proj")?)?;
            let a = ops::attention(&proj("q_proj")?, &k, &v, 1.0, window, cache.packing())?;
            linear(
                &a,
                w(l, "attn.attention.out_proj.weight")?,
                Some(w(l, "attn.attention.out_proj.bias")?),
            )
        };
        let mlp = |l: usize, h: &Tensor| -> Result<Tensor> {
            let up = linear(h, w(l, "mlp.c_fc.weight")?, Some(w(l, "mlp.c_fc.bias")?))?;
            linear(
                &s.activation.apply(&up)?,
                w(l, "mlp.c_proj.weight")?,
                Some(w(l, "mlp.c_proj.bias")?),
            )
        };
        gpt_forward(p, ids, s, cache, attn, mlp)
    }

    fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let s = &self.cfg.shape;
        let (h, i) = (s.hidden, s.intermediate);
        let mut out = gpt_common_shapes(s);
        for l in 0..s.layers {
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push((
                    format!("transformer.h.{l}.attn.attention.{n}.weight"),
                    vec![h, h],
                ));
            }
            out.push((
                format!("transformer.h.{l}.attn.attention.out_proj.bias"),
                vec![h],
            ));
            for (m, rows, cols) in [("mlp.c_fc", i, h), ("mlp.c_proj", h, i)] {
                out.push((format!("transformer.h.{l}.{m}.weight"), vec![rows, cols]));
                out.push((format!("transformer.h.{l}.{m}.bias"), vec![rows]));
            }
        }
        out
    }

    fn kind_of(&self, name: &str) -> Option<ParamKind> {
        gpt_kind_of(name)
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
    }

    fn hf_config(&self) -> std::result::Result<serde_json::Value, String> {
        let s = &self.cfg.shape;
        Ok(serde_json::json!({
            "model_type": "gpt_neo",
            "architectures": ["GPTNeoForCausalLM"],
            "hidden_size": s.hidden,
            "intermediate_size": s.intermediate,
            "num_layers": s.layers,
            "num_heads": s.heads,
            "vocab_size": s.vocab,
            "max_position_embeddings": s.positions,
            "layer_norm_epsilon": s.eps,
            "activation_function": s.activation.hf_name(),
            "attention_types": compress_attention_types(&self.cfg.local),
            "window_size": self.cfg.window_size,
            "tie_word_embeddings": true,
        }))
    }
}
