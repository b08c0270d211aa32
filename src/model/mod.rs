//! Causal language models with a forward pass that is differentiable end to end.

pub mod cache;
pub mod device;
mod embedding;
mod exp;
pub mod fused;
pub mod fused_attention;
pub mod fused_head;
pub mod fused_mlp;
pub mod gpt2;
pub mod gpt_neo;
pub mod grads;
mod linear_grad;
pub mod llama;
pub mod load;
pub mod ops;
pub mod packing;
pub mod quant;
mod tile;
pub mod turns;
mod weight_product;

pub use turns::on_compute_threads;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use quant::QuantRows;

/// Which half of a transformer block a layer group covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Module {
    /// Every attention projection weight and bias of the layer.
    Attn,
    /// Every MLP weight and bias of the layer.
    Mlp,
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Module::Attn => "attn",
            Module::Mlp => "mlp",
        })
    }
}

/// One layer group: the unit that tracing measures and strategies select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId {
    /// 0-based layer index.
    pub layer: usize,
    /// Attention or MLP.
    pub module: Module,
}

impl GroupId {
    /// Parses `layer.module` as [`fmt::Display`] writes it (`12.attn`, `3.mlp`).
    pub fn parse(s: &str) -> Option<GroupId> {
        let (layer, module) = s.split_once('.')?;
        let module = match module {
            "attn" => Module::Attn,
            "mlp" => Module::Mlp,
            _ => return None,
        };
        Some(GroupId {
            layer: layer.parse().ok()?,
            module,
        })
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.layer, self.module)
    }
}

/// What a parameter belongs to; only `Group` parameters count as layer groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamKind {
    /// A layer group's parameter.
    Group(GroupId),
    /// Token or position embeddings (and a head tied to them).
    Embedding,
    /// Layer norms and RMS norms.
    Norm,
    /// An untied output head.
    Head,
}

/// Where a parameter's units lie: consecutive runs of `width` indices along `axis` (0: rows of an
/// `[out, in]` weight or a bias, 1: columns), run `r` shared by units `r * share .. (r + 1) * share`
/// (a key/value head serving several query heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitSlices {
    /// 0 for rows, 1 for columns.
    pub axis: usize,
    /// Indices per run.
    pub width: usize,
    /// Units per run.
    pub share: usize,
}

/// Named weights as the forward pass sees them: each entry is tracked (a variable) or detached.
#[derive(Clone, Default)]
pub struct Params {
    map: BTreeMap<String, Tensor>,
    /// Quantized blocks that some of the weights equal exactly.
    blocks: BTreeMap<String, Arc<QuantRows>>,
}

impl Params {
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.map
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing weight {name}")))
    }

    /// Weights from a name-to-tensor map (an immutable serving snapshot, say).
    pub fn from_map(map: BTreeMap<String, Tensor>) -> Self {
        Self::with_blocks(map, BTreeMap::new())
    }

    /// Weights from a name-to-tensor map and the quantized blocks that some of them equal
    /// exactly (checked by whoever builds it: [`QuantRows::matches`]).
    pub fn with_blocks(
        map: BTreeMap<String, Tensor>,
        blocks: BTreeMap<String, Arc<QuantRows>>,
    ) -> Self {
        Params { map, blocks }
    }

    /// `x @ w^T + b` for the weight called `name`, from its quantized blocks where it has them
    /// and the product has few rows.
    pub fn linear(
        &self,
        x: &Tensor,
        name: &str,
        b: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        ops::linear_from(x, self.get(name)?, b, self.blocks.get(name))
    }

    /// [`Params::linear`] for each of the weights `names` (with their biases, if any), which
    /// read one input: [`ops::linears_from`].
    pub fn linears(
        &self,
        x: &Tensor,
        names: &[(&str, Option<&Tensor>)],
    ) -> candle_core::Result<Vec<Tensor>> {
        let weights = names
            .iter()
            .map(|&(name, b)| Ok((self.get(name)?, b, self.blocks.get(name))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        ops::linears_from(x, &weights)
    }

    /// [`ops::gated_up`] with the weights called `gate` and `up` and their biases, if any.
    pub fn gated_up(
        &self,
        x: &Tensor,
        (gate, b_gate): (&str, Option<&Tensor>),
        (up, b_up): (&str, Option<&Tensor>),
    ) -> candle_core::Result<Tensor> {
        ops::gated_up(
            x,
            (self.get(gate)?, b_gate),
            (self.get(up)?, b_up),
            (self.blocks.get(gate), self.blocks.get(up)),
        )
    }
}

/// The architecture-specific part of a model: its forward pass and how its parameters group.
pub trait Architecture: Send + Sync {
    /// Short architecture name (`llama`, `gpt2`, `gpt_neo`).
    fn name(&self) -> &'static str;
    /// Number of transformer blocks.
    fn num_layers(&self) -> usize;
    /// Vocabulary size of the output logits.
    fn vocab_size(&self) -> usize;
    /// Longest sequence the model accepts, if it has a hard limit (learned positions).
    fn max_positions(&self) -> Option<usize>;
    /// The final normed hidden states `(batch, seq, hidden)`, before the output head, for token ids
    /// `(batch, seq)` that follow the positions held in `cache`, whose keys and values this call
    /// appends.
    fn hidden_cached(
        &self,
        params: &Params,
        ids: &Tensor,
        cache: &mut cache::KvCache,
    ) -> candle_core::Result<Tensor>;
    /// Name of the output head's weight `(vocab, hidden)` (the token embedding where it is tied).
    fn head_name(&self) -> &'static str;
    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)` that follow the positions held in
    /// `cache`, whose keys and values this call appends.
    fn forward_cached(
        &self,
        params: &Params,
        ids: &Tensor,
        cache: &mut cache::KvCache,
    ) -> candle_core::Result<Tensor> {
        let x = self.hidden_cached(params, ids, cache)?;
        params.linear(&x, self.head_name(), None)
    }
    /// Logits `(batch, seq, vocab)` for whole sequences of token ids `(batch, seq)`.
    fn forward(&self, params: &Params, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_cached(params, ids, &mut cache::KvCache::new(self.num_layers()))
    }
    /// Next-token negative log-likelihoods `(batch, seq - 1)` for whole sequences of token ids
    /// `(batch, seq)`: the losses of training and evaluation, without materialising the logits on
    /// the CPU.
    fn next_token_nll(&self, params: &Params, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.next_token_nll_from(params, ids, 0)
    }
    /// The same losses for the predictions of positions `from..seq - 1` only, `(batch, seq - 1 -
    /// from)`: a continuation's score needs no vocabulary projection of its prompt. `from + 1`
    /// must be less than `seq`.
    fn next_token_nll_from(
        &self,
        params: &Params,
        ids: &Tensor,
        from: usize,
    ) -> candle_core::Result<Tensor> {
        let x = self.hidden_cached(params, ids, &mut cache::KvCache::new(self.num_layers()))?;
        let kept = ids.dim(1)?.saturating_sub(from);
        ops::head_nll(
            &x.narrow(1, from, kept)?,
            params.get(self.head_name())?,
            &ids.narrow(1, from, kept)?,
        )
    }
    /// Next-token negative log-likelihoods `(rows, len - 1)` of whole documents packed into rows
    /// of token ids `(rows, len)` as `packing` lays them out, each document's the losses it has
    /// alone in a row. A loss whose target begins the next document, or is padding, means nothing.
    fn next_token_nll_packed(
        &self,
        params: &Params,
        ids: &Tensor,
        packing: &packing::Packing,
    ) -> candle_core::Result<Tensor> {
        let mut cache = cache::KvCache::packed(self.num_layers(), packing.clone());
        let x = self.hidden_cached(params, ids, &mut cache)?;
        ops::head_nll(&x, params.get(self.head_name())?, ids)
    }
    /// Name and shape of every parameter the forward pass reads.
    fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)>;
    /// The group or other role of a parameter.
    fn kind_of(&self, name: &str) -> Option<ParamKind>;
    /// How a layer-group parameter splits into its group's units (attention heads, MLP neurons);
    /// `None` for a parameter no single unit owns, and for every parameter of an architecture
    /// without unit-level localization.
    fn unit_slices(&self, _name: &str) -> Option<UnitSlices> {
        None
    }
    /// The configuration as JSON, for reports.
    fn describe(&self) -> serde_json::Value;
    /// The configuration as a Hugging Face `config.json` (model type, architecture class and
    /// every size and switch the forward pass uses), or why transformers has no equivalent.
    fn hf_config(&self) -> std::result::Result<serde_json::Value, String>;
}

/// Parses `{prefix}{layer}.{segment}...` names into a group, shared by all architectures.
fn layer_group(name: &str, prefix: &str, attn: &str, mlp: &str) -> Option<GroupId> {
    let rest = name.strip_prefix(prefix)?;
    let (layer, tail) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let module = if tail.starts_with(attn) {
        Module::Attn
    } else if tail.starts_with(mlp) {
        Module::Mlp
    } else {
        return None;
    };
    Some(GroupId { layer, module })
}

/// A loaded model: architecture, weights held as variables, and tokenizer.
pub struct Model {
    /// Forward pass and parameter grouping.
    pub arch: Box<dyn Architecture>,
    /// Every weight as a variable, so training updates them in place.
    pub vars: BTreeMap<String, Var>,
    /// The tokenizer that belongs to the weights.
    pub tokenizer: crate::tokenize::TextTokenizer,
    /// Where the model came from, for reports.
    pub source: ModelSource,
    /// The quantized blocks weights were loaded from (GGUF), for serving snapshots to read while
    /// a weight still equals them.
    pub blocks: BTreeMap<String, Arc<QuantRows>>,
}

/// Provenance of a loaded model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSource {
    /// The path it was loaded from.
    pub path: String,
    /// `hf` or `gguf`.
    pub format: &'static str,
    /// The stored weight dtype(s), before conversion to f32.
    pub stored_dtype: String,
}

impl Model {
    /// Whether learning never writes the parameter `name` (it is in no layer group: embeddings,
    /// norms, an untied head), so snapshots may share the variable's own storage. Only layer
    /// groups are trained, restored, followed and rolled back.
    pub fn never_written(&self, name: &str) -> bool {
        matches!(
            self.arch.kind_of(name),
            Some(ParamKind::Embedding | ParamKind::Norm | ParamKind::Head)
        )
    }

    /// The variables learning writes (every layer group's parameters), by name.
    pub fn written_vars(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars
            .iter()
            .filter(|(name, _)| !self.never_written(name))
    }

    /// The variable `name` if learning writes it; `None` for a never-written or unknown name.
    pub fn written_var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name).filter(|_| !self.never_written(name))
    }

    /// Builds a model after checking that every weight the architecture reads is present.
    pub fn new(
        arch: Box<dyn Architecture>,
        mut tensors: BTreeMap<String, Tensor>,
        tokenizer: crate::tokenize::TextTokenizer,
        source: ModelSource,
    ) -> Result<Self> {
        let shapes = arch.parameter_shapes();
        for (name, shape) in &shapes {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::model(&source.path, format!("missing weight {name}")))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::model(
                    &source.path,
                    format!(
                        "weight {name} has shape {:?} but the configuration implies {shape:?}",
                        t.dims()
                    ),
                ));
            }
        }
        let mut vars = BTreeMap::new();
        for (name, _) in shapes {
            if let Some(t) = tensors.remove(&name) {
                vars.insert(name, Var::from_tensor(&t)?);
            }
        }
        Ok(Model {
            arch,
            vars,
            tokenizer,
            source,
            blocks: BTreeMap::new(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.vars
            .values()
            .next()
            .map(|v| v.device())
            .unwrap_or(&Device::Cpu)
    }

    /// A view of the weights in which exactly the parameters accepted by `tracked` record gradients.
    pub fn params(&self, tracked: impl Fn(&str) -> bool) -> Params {
        let map = self
            .vars
            .iter()
            .map(|(name, var)| {
                let t = if tracked(name) {
                    var.as_tensor().clone()
                } else {
                    var.as_detached_tensor()
                };
                (name.clone(), t)
            })
            .collect();
        Params::from_map(map)
    }

    /// Every layer group in order: layer ascending, attention before MLP.
    pub fn groups(&self) -> Vec<GroupId> {
        (0..self.arch.num_layers())
            .flat_map(|layer| [Module::Attn, Module::Mlp].map(|module| GroupId { layer, module }))
            .collect()
    }

    /// Summary of the model for reports.
    pub fn info(&self) -> serde_json::Value {
        let n: usize = self.vars.values().map(|v| v.elem_count()).sum();
        serde_json::json!({
            "architecture": self.arch.name(),
            "layers": self.arch.num_layers(),
            "parameters": n,
            "vocab_size": self.arch.vocab_size(),
            "config": self.arch.describe(),
            "source": self.source,
        })
    }
}

/// Reads an f64 field from a JSON config, naming it when absent.
fn cfg_f64(cfg: &serde_json::Value, key: &str) -> std::result::Result<f64, String> {
    cfg.get(key)
        .and_then(|v| v.as_f64())
        .ok_or_else(|| format!("config.json: missing or non-numeric `{key}`"))
}

/// Reads an unsigned integer field from a JSON config, naming it when absent.
fn cfg_usize(cfg: &serde_json::Value, key: &str) -> std::result::Result<usize, String> {
    cfg.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| format!("config.json: missing or non-integer `{key}`"))
}
