//! What a forward pass attends to besides its own tokens: the keys and values of past positions,
//! so generation feeds one new token per forward pass, or the packing of whole documents into rows.

use candle_core::{Result, Tensor};

use super::packing::Packing;

/// Per-layer keys and values `(b, kv_heads, past, head_dim)` of the positions already seen.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    packing: Option<Packing>,
}

impl KvCache {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            packing: None,
        }
    }

    /// An empty cache for one forward pass over whole documents packed into rows as `packing`
    /// lays them out: positions restart and attention stops at each document's beginning.
    pub fn packed(layers: usize, packing: Packing) -> Self {
        KvCache {
            layers: vec![None; layers],
            packing: Some(packing),
        }
    }

    /// How documents are packed into the rows, if they are.
    pub fn packing(&self) -> Option<&Packing> {
        self.packing.as_ref()
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values for `layer`; returns all keys and values so far.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("kv cache has no layer {layer}")))?;
        let all = match slot.take() {
            // A packed layout holds whole documents: nothing may follow them.
            Some(_) if self.packing.is_some() => {
                candle_core::bail!("a packed batch cannot be continued from the kv cache")
            }
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *slot = Some(all.clone());
        Ok(all)
    }
}
