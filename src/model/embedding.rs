//! The token embedding lookup with a backward that adds its rows into the weight's gradient (the
//! tied head's, in a [`super::grads::backward`] call), or into its norm (in a
//! [`super::grads::backward_norms`] call), rather than building a dense one of its own.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::fused::{slice, u32_slice};

/// Rows `ids (n)` of a table `(vocab, h)`, as `(n, h)`.
pub struct Embedding;

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "locus-embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = u32_slice(s1, l1, "embedding ids")?;
        let (vocab, h) = l2.shape().dims2()?;
        let table = slice(s2, l2, "embedding table")?;
        let mut out = Vec::with_capacity(ids.len() * h);
        for &id in ids {
            let Some(row) = table.get(id as usize * h..(id as usize + 1) * h) else {
                bail!("embedding: id {id} outside a vocabulary of {vocab}");
            };
            out.extend_from_slice(row);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), h))))
    }

    fn bwd(
        &self,
        ids: &Tensor,
        table: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !table.track_op()
            || super::grads::add_rows(table, ids, grad)?
            || super::grads::add_rows_norm(table, ids, grad)?
        {
            return Ok((None, None));
        }
        let dense = table.zeros_like()?.index_add(ids, &grad.contiguous()?, 0)?;
        Ok((None, super::grads::offer(table, dense)?))
    }
}
