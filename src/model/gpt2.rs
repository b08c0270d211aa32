//! GPT-2: learned positions, pre-norm blocks with layer norm, fused QKV `Conv1D` attention,
//! GELU MLP, head tied to the token embedding. The block skeleton is shared with GPT-Neo.

use candle_core::{Result, Tensor};
use serde::Serialize;

use super::cache::KvCache;
use super::ops::{self, conv1d, layer_norm};
use super::{cfg_f64, cfg_usize, layer_group, Architecture, ParamKind, Params};

/// The MLP activations GPT-style configs name.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// Exact GELU (`gelu`).
    GeluErf,
    /// ReLU.
    Relu,
}

impl Activation {
    /// Parses a Hugging Face `activation_function` value.
    pub fn from_hf(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::GeluErf),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "config.json: activation_function `{other}` is not supported"
            )),
        }
    }

    /// The Hugging Face `activation_function` name, the inverse of [`Activation::from_hf`] (the
    /// tanh spellings compute one function, so `gelu_new` stands for all of them).
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::GeluTanh => "gelu_new",
            Activation::GeluErf => "gelu",
            Activation::Relu => "relu",
        }
    }

    /// Applies the activation elementwise.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluTanh => ops::gelu_new(x),
            Activation::GeluErf => x.gelu_erf(),
            Activation::Relu => x.relu(),
        }
    }
}

/// Sizes shared by GPT-2 and GPT-Neo.
#[derive(Debug, Clone, Serialize)]
pub struct GptShape {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Number of learned positions.
    pub positions: usize,
    /// Layer norm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub activation: Activation,
}

/// The GPT block stack: embeddings, `layers` pre-norm blocks whose attention is `attn`, and the
/// final norm (the head is tied to the token embedding, [`GPT_HEAD`]). `attn(l, h, cache)` maps
/// the normed hidden state of layer `l` to its output, appending its keys and values to the cache;
/// positions continue after the cache.
pub(super) fn gpt_forward(
    p: &Params,
    ids: &Tensor,
    s: &GptShape,
    cache: &mut KvCache,
    attn: impl Fn(usize, &Tensor, &mut KvCache) -> Result<Tensor>,
    mlp: impl Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, t) = ids.dims2()?;
    let start = cache.len();
    if start + t > s.positions {
        candle_core::bail!(
            "sequence of {} tokens exceeds the model's {} positions",
            start + t,
            s.positions
        );
    }
    let tok = ops::embed(p.get(GPT_HEAD)?, ids)?;
    let wpe = p.get("transformer.wpe.weight")?;
    let pos = match cache.packing() {
        Some(packing) => ops::embed(wpe, &packing.positions(ids.device())?)?,
        None => wpe.narrow(0, start, t)?,
    };
    let mut x = tok.broadcast_add(&pos)?;
    let ln = |name: String, x: &Tensor| -> Result<Tensor> {
        layer_norm(
            x,
            p.get(&format!("{name}.weight"))?,
            p.get(&format!("{name}.bias"))?,
            s.eps,
        )
    };
    for l in 0..s.layers {
        let h = ln(format!("transformer.h.{l}.ln_1"), &x)?;
        x = (&x + attn(l, &h, cache)?)?;
        let h = ln(format!("transformer.h.{l}.ln_2"), &x)?;
        x = (&x + mlp(l, &h)?)?;
    }
    ln("transformer.ln_f".into(), &x)
}

/// The output head of GPT-2 and GPT-Neo: the token embedding.
pub(super) const GPT_HEAD: &str = "transformer.wte.weight";

/// Shapes of the parameters outside the blocks' attention and MLP, shared by GPT-2 and GPT-Neo.
pub(super) fn gpt_common_shapes(s: &GptShape) -> Vec<(String, Vec<usize>)> {
    let mut out = vec![
        (GPT_HEAD.to_string(), vec![s.vocab, s.hidden]),
        (
            "transformer.wpe.weight".to_string(),
            vec![s.positions, s.hidden],
        ),
    ];
    let norms = (0..s.layers)
        .flat_map(|l| {
            [
                format!("transformer.h.{l}.ln_1"),
                format!("transformer.h.{l}.ln_2"),
            ]
        })
        .chain(std::iter::once("transformer.ln_f".to_string()));
    for n in norms {
        out.push((format!("{n}.weight"), vec![s.hidden]));
        out.push((format!("{n}.bias"), vec![s.hidden]));
    }
    out
}

/// How GPT-2 and GPT-Neo parameter names map to groups and roles.
pub(super) fn gpt_kind_of(name: &str) -> Option<ParamKind> {
    if let Some(g) = layer_group(name, "transformer.h.", "attn.", "mlp.") {
        return Some(ParamKind::Group(g));
    }
    if name.starts_with("transformer.wte.") || name.starts_with("transformer.wpe.") {
        return Some(ParamKind::Embedding);
    }
    if name.starts_with("transformer.ln_f.") || name.contains(".ln_") {
        return Some(ParamKind::Norm);
    }
    None
}

impl GptShape {
    /// Reads the GPT-2 spelling of the sizes from `config.json`.
    pub fn from_gpt2(cfg: &serde_json::Value) -> std::result::Result<Self, String> {
        let hidden = cfg_usize(cfg, "n_embd")?;
        Ok(GptShape {
            hidden,
            intermediate: cfg_usize(cfg, "n_inner").unwrap_or(4 * hidden),
            layers: cfg_usize(cfg, "n_layer")?,
            heads: cfg_usize(cfg, "n_head")?,
            vocab: cfg_usize(cfg, "vocab_size")?,
            positions: cfg_usize(cfg, "n_positions")?,
            eps: cfg_f64(cfg, "layer_norm_epsilon").unwrap_or(1e-5),
            activation: Activation::from_hf(
                cfg.get("activation_function")
                    .and_then(|v| v.as_str())
                    .unwrap_or("gelu_new"),
            )?,
        })
    }

    /// Checks that the heads divide the hidden size.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return Err(format!(
                "hidden size {} must be a multiple of the {} heads",
                self.hidden, self.heads
            ));
        }
        Ok(())
    }
}

/// GPT-2's forward pass.
pub struct Gpt2 {
    shape: GptShape,
}

impl Gpt2 {
    /// Wraps validated sizes.
    pub fn new(shape: GptShape) -> std::result::Result<Self, String> {
        shape.validate()?;
        Ok(Gpt2 { shape })
    }
}

impl Architecture for Gpt2 {
    fn name(&self) -> &'static str {
        "gpt2"
    }

    fn num_layers(&self) -> usize {
        self.shape.layers
    }

    fn vocab_size(&self) -> usize {
        self.shape.vocab
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.shape.positions)
    }

    fn head_name(&self) -> &'static str {
        GPT_HEAD
    }

    fn hidden_cached(&self, p: &Params, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let s = &self.shape;
        let scale = 1.0 / ((s.hidden / s.heads) as f64).sqrt();
        let w = |l: usize, name: &str| p.get(&format!("transformer.h.{l}.{name}"));
        let attn = |l: usize, h: &Tensor, cache: &mut KvCache| -> Result<Tensor> {
            let qkv = conv1d(h, w(l, "attn.c_attn.weight")?, w(l, "attn.c_attn.bias")?)?;
            let part =
                |i: usize| ops::split_heads(&qkv.narrow(2, i * s.hidden, s.hidden)?, s.heads);
            let (k, v) = cache.append(l, part(1)?, part(2)?)?;
            let a = ops::attention(&part(0)?, &k, &v, scale, None, cache.packing())?;
            conv1d(&a, w(l, "attn.c_proj.weight")?, w(l, "attn.c_proj.bias")?)
        };
        let mlp = |l: usize, h: &Tensor| -> Result<Tensor> {
            let up = conv1d(h, w(l, "mlp.c_fc.weight")?, w(l, "mlp.c_fc.bias")?)?;
            conv1d(
                &s.activation.apply(&up)?,
                w(l, "mlp.c_proj.weight")?,
                w(l, "mlp.c_proj.bias")?,
            )
        };
        gpt_forward(p, ids, s, cache, attn, mlp)
    }

    fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let s = &self.shape;
        let (h, i) = (s.hidden, s.intermediate);
        let mut out = gpt_common_shapes(s);
        for l in 0..s.layers {
            // Conv1D weights are stored (in, out).
            for (m, rows, cols) in [
                ("attn.c_attn", h, 3 * h),
                ("attn.c_proj", h, h),
                ("mlp.c_fc", h, i),
                ("mlp.c_proj", i, h),
            ] {
                out.push((format!("transformer.h.{l}.{m}.weight"), vec![rows, cols]));
                out.push((format!("transformer.h.{l}.{m}.bias"), vec![cols]));
            }
        }
        out
    }

    fn kind_of(&self, name: &str) -> Option<ParamKind> {
        gpt_kind_of(name)
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::to_value(&self.shape).unwrap_or_default()
    }

    fn hf_config(&self) -> std::result::Result<serde_json::Value, String> {
        let s = &self.shape;
        Ok(serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": s.hidden,
            "n_inner": s.intermediate,
            "n_layer": s.layers,
            "n_head": s.heads,
            "vocab_size": s.vocab,
            "n_positions": s.positions,
            "layer_norm_epsilon": s.eps,
            "activation_function": s.activation.hf_name(),
            "tie_word_embeddings": true,
            // transformers' defaults, written out because they are what this forward pass computes.
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
        }))
    }
}
