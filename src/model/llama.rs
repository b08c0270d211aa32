//! The Llama family (Llama 2/3, Mistral, SmolLM2): RMS norm, rotary positions, grouped-query
//! attention, SwiGLU MLP, tied or untied head.

use candle_core::{Result, Tensor};
use serde::Serialize;

use super::cache::KvCache;
use super::ops::{self, rms_norm};
use super::{cfg_f64, cfg_usize, layer_group, Architecture, ParamKind, Params, UnitSlices};

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, Serialize)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` under grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Positions it was trained for (`max_position_embeddings`), if known; rotary positions set
    /// no hard limit, so only an export uses it.
    pub max_positions: Option<usize>,
    /// Rotary base frequency.
    pub rope_theta: f64,
    /// RMS norm epsilon.
    pub eps: f64,
    /// Whether the output head reuses the token embedding.
    pub tied_head: bool,
    /// Whether the attention projections carry biases.
    pub attention_bias: bool,
    /// Whether the MLP projections carry biases.
    pub mlp_bias: bool,
    /// Mistral's sliding attention window, if any.
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` of model type llama or mistral.
    pub fn from_hf(cfg: &serde_json::Value) -> std::result::Result<Self, String> {
        // transformers 5 nests rotary settings under `rope_parameters`; older configs keep them at the top.
        let rope = cfg
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .unwrap_or(cfg);
        let scaling = cfg.get("rope_scaling").filter(|v| !v.is_null());
        let rope_type = rope
            .get("rope_type")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        if scaling.is_some() || rope_type != "default" {
            return Err(format!(
                "config.json: rotary scaling ({}) is not supported; only plain rotary embeddings are",
                scaling.map(|v| v.to_string()).unwrap_or_else(|| rope_type.to_string())
            ));
        }
        let hidden = cfg_usize(cfg, "hidden_size")?;
        let heads = cfg_usize(cfg, "num_attention_heads")?;
        let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool());
        Ok(LlamaConfig {
            hidden,
            intermediate: cfg_usize(cfg, "intermediate_size")?,
            layers: cfg_usize(cfg, "num_hidden_layers")?,
            heads,
            kv_heads: cfg_usize(cfg, "num_key_value_heads").unwrap_or(heads),
            head_dim: cfg_usize(cfg, "head_dim").unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
            vocab: cfg_usize(cfg, "vocab_size")?,
            max_positions: cfg_usize(cfg, "max_position_embeddings").ok(),
            rope_theta: cfg_f64(rope, "rope_theta").unwrap_or(10000.0),
            eps: cfg_f64(cfg, "rms_norm_eps")?,
            tied_head: flag("tie_word_embeddings").unwrap_or(false),
            attention_bias: flag("attention_bias").unwrap_or(false),
            mlp_bias: flag("mlp_bias").unwrap_or(false),
            sliding_window: cfg_usize(cfg, "sliding_window").ok(),
        })
    }

    /// Checks the shape relations the forward pass relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be positive and even for rotary embeddings",
                self.head_dim
            ));
        }
        Ok(())
    }
}

/// A Llama-family model's forward pass.
pub struct Llama {
    cfg: LlamaConfig,
}

impl Llama {
    /// Wraps a validated configuration.
    pub fn new(cfg: LlamaConfig) -> std::result::Result<Self, String> {
        cfg.validate()?;
        Ok(Llama { cfg })
    }
}

impl Architecture for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn num_layers(&self) -> usize {
        self.cfg.layers
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab
    }

    fn max_positions(&self) -> Option<usize> {
        None
    }

    fn hidden_cached(&self, p: &Params, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.cfg;
        let (_, t) = ids.dims2()?;
        let dev = ids.device();
        let embed = p.get("model.embed_tokens.weight")?;
        let mut x = ops::embed(embed, ids)?;
        let (cos, sin) = match cache.packing() {
            Some(packing) => {
                ops::rope_tables_at(&packing.positions(dev)?, c.head_dim, c.rope_theta)?
            }
            None => ops::rope_tables(cache.len(), t, c.head_dim, c.rope_theta, dev)?,
        };
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let bias = |has: bool, name: String| -> Result<Option<&Tensor>> {
            if has {
                p.get(&name).map(Some)
            } else {
                Ok(None)
            }
        };
        for l in 0..c.layers {
            let at = |proj: &str| format!("model.layers.{l}.self_attn.{proj}");
            let mp = |proj: &str| format!("model.layers.{l}.mlp.{proj}");
            let h = rms_norm(
                &x,
                p.get(&format!("model.layers.{l}.input_layernorm.weight"))?,
                c.eps,
            )?;
            let names = ["q_proj", "k_proj", "v_proj"].map(|name| at(&format!("{name}.weight")));
            let biases = ["q_proj", "k_proj", "v_proj"]
                .map(|name| bias(c.attention_bias, at(&format!("{name}.bias"))));
            let [bq, bk, bv] = biases;
            let [q, k, v]: [Tensor; 3] = p
                .linears(&h, &[(&names[0], bq?), (&names[1], bk?), (&names[2], bv?)])?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("llama: three projections expected".into()))?;
            let q = ops::rope(&ops::split_heads(&q, c.heads)?, &cos, &sin)?;
            let k = ops::rope(&ops::split_heads(&k, c.kv_heads)?, &cos, &sin)?;
            let v = ops::split_heads(&v, c.kv_heads)?;
            let (k, v) = cache.append(l, k, v)?;
            let a = ops::attention(&q, &k, &v, scale, c.sliding_window, cache.packing())?;
            let o = p.linear(
                &a,
                &at("o_proj.weight"),
                bias(c.attention_bias, at("o_proj.bias"))?,
            )?;
            x = (x + o)?;
            let h = rms_norm(
                &x,
                p.get(&format!("model.layers.{l}.post_attention_layernorm.weight"))?,
                c.eps,
            )?;
            let weight = |name: &str| -> Result<(String, Option<&Tensor>)> {
                Ok((
                    mp(&format!("{name}.weight")),
                    bias(c.mlp_bias, mp(&format!("{name}.bias")))?,
                ))
            };
            let ((gate, b_gate), (up, b_up)) = (weight("gate_proj")?, weight("up_proj")?);
            let gated = p.gated_up(&h, (&gate, b_gate), (&up, b_up))?;
            let (down, b_down) = weight("down_proj")?;
            x = (x + p.linear(&gated, &down, b_down)?)?;
        }
        rms_norm(&x, p.get("model.norm.weight")?, c.eps)
    }

    fn head_name(&self) -> &'static str {
        if self.cfg.tied_head {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
    }

    fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.cfg;
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![c.vocab, c.hidden],
            ),
            ("model.norm.weight".to_string(), vec![c.hidden]),
        ];
        if !c.tied_head {
            out.push(("lm_head.weight".into(), vec![c.vocab, c.hidden]));
        }
        for l in 0..c.layers {
            out.push((
                format!("model.layers.{l}.input_layernorm.weight"),
                vec![c.hidden],
            ));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                vec![c.hidden],
            ));
            let projections = [
                ("self_attn.q_proj", q, c.hidden, c.attention_bias),
                ("self_attn.k_proj", kv, c.hidden, c.attention_bias),
                ("self_attn.v_proj", kv, c.hidden, c.attention_bias),
                ("self_attn.o_proj", c.hidden, q, c.attention_bias),
                ("mlp.gate_proj", c.intermediate, c.hidden, c.mlp_bias),
                ("mlp.up_proj", c.intermediate, c.hidden, c.mlp_bias),
                ("mlp.down_proj", c.hidden, c.intermediate, c.mlp_bias),
            ];
            for (name, rows, cols, bias) in projections {
                out.push((format!("model.layers.{l}.{name}.weight"), vec![rows, cols]));
                if bias {
                    out.push((format!("model.layers.{l}.{name}.bias"), vec![rows]));
                }
            }
        }
        out
    }

    fn kind_of(&self, name: &str) -> Option<ParamKind> {
        if let Some(g) = layer_group(name, "model.layers.", "self_attn.", "mlp.") {
            return Some(ParamKind::Group(g));
        }
        if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
            return Some(ParamKind::Norm);
        }
        match name {
            "model.embed_tokens.weight" => Some(ParamKind::Embedding),
            "lm_head.weight" => Some(ParamKind::Head),
            _ => None,
        }
    }

    fn unit_slices(&self, name: &str) -> Option<UnitSlices> {
        let c = &self.cfg;
        let (_, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
        let (proj, kind) = tail.rsplit_once('.')?;
        let slices = |axis, width, share| UnitSlices { axis, width, share };
        // A unit is a query head or an MLP neuron; o_proj and down_proj biases add to every
        // output whatever the unit, so no unit owns them.
        match (proj, kind) {
            ("self_attn.q_proj", _) => Some(slices(0, c.head_dim, 1)),
            ("self_attn.k_proj" | "self_attn.v_proj", _) => {
                Some(slices(0, c.head_dim, c.heads / c.kv_heads))
            }
            ("self_attn.o_proj", "weight") => Some(slices(1, c.head_dim, 1)),
            ("mlp.gate_proj" | "mlp.up_proj", _) => Some(slices(0, 1, 1)),
            ("mlp.down_proj", "weight") => Some(slices(1, 1, 1)),
            _ => None,
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
    }

    fn hf_config(&self) -> std::result::Result<serde_json::Value, String> {
        let c = &self.cfg;
        let mut v = serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": c.hidden,
            "intermediate_size": c.intermediate,
            "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab,
            "hidden_act": "silu",
            "rms_norm_eps": c.eps,
            // transformers 5 reads `rope_parameters`, 4.x the top-level `rope_theta`.
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "tie_word_embeddings": c.tied_head,
            "attention_bias": c.attention_bias,
            "mlp_bias": c.mlp_bias,
        });
        if let Some(n) = c.max_positions {
            v["max_position_embeddings"] = n.into();
        }
        if let Some(window) = c.sliding_window {
            // transformers' Llama ignores `sliding_window`; its Mistral honours it but has no biases.
            if c.attention_bias || c.mlp_bias {
                return Err(
                    "a sliding attention window together with projection biases has no transformers architecture"
                        .into(),
                );
            }
            let m = v.as_object_mut().expect("a JSON object");
            m.remove("attention_bias");
            m.remove("mlp_bias");
            m.insert("model_type".into(), "mistral".into());
            m.insert(
                "architectures".into(),
                serde_json::json!(["MistralForCausalLM"]),
            );
            m.insert("sliding_window".into(), window.into());
        }
        Ok(v)
    }
}
