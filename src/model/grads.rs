//! A backward pass that writes each weight gradient once, or keeps only its norm.
//!
//! candle's `Tensor::backward` sums every gradient into a zeroed buffer of its own: `zeros_like`,
//! then `add` into a fresh tensor, two weight-sized allocations for every weight, and for the
//! tied embedding of a 49152-token vocabulary four buffers of 113 MB (the head's gradient, its
//! zeroed sum, the lookup's `index_add` copy, the total) whose pages fault in on every step. In a
//! [`backward`] call the fused linear, head and embedding ops hand their weight gradients here
//! instead: the first is kept as it is, the embedding's rows are added into the head's gradient
//! in place, and the gradient store gets them at the end.
//!
//! The paper's measurement needs only the norms of a text's gradients. In a [`backward_norms`]
//! call the fused linear layers and the head hand over the squared norm of their weight's
//! gradient and never build the gradient: for a short text, from the Gram matrices of its rows, a
//! fraction of the product, and without the weight-sized buffer whose pages would fault in
//! (`linear_grad`). The embedding lookup then adds its rows' part to the tied head's norm.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::rc::Rc;

use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, InplaceOp3, Layout, Result, Tensor, TensorId};

use super::fused::{slice, slice_mut, u32_slice};
use super::linear_grad::Gram;

/// What the fused ops of a running [`backward`] or [`backward_norms`] call handed over.
#[derive(Default)]
struct Sink {
    /// Weight gradients.
    grads: HashMap<TensorId, Tensor>,
    /// What a [`backward_norms`] call takes in place of gradients.
    norms: Option<NormSink>,
}

/// The norms a [`backward_norms`] call took in place of gradients.
#[derive(Default)]
struct NormSink {
    /// Squared norms of weight gradients.
    squared: HashMap<TensorId, f64>,
    /// The head's part of a tied embedding's gradient, for the lookup's rows to complete the
    /// norm of.
    head_rows: HashMap<TensorId, HeadRows>,
    /// The latest Gram matrices of linear layers' inputs over a gradient's live rows, newest
    /// last, for the other layers that read the same input.
    input_grams: Vec<InputGram>,
}

/// The Gram matrix of a linear layer's input over the live rows of its output's gradient.
struct InputGram {
    input: TensorId,
    live: Vec<Range<usize>>,
    gram: Rc<Gram>,
}

/// How many input Gram matrices a norms-only backward keeps: the layers that share an input
/// (gate and up; query, key and value) run their backward one after another.
const INPUT_GRAMS: usize = 2;

/// The head's part `H = d^T x` of a tied embedding's gradient, kept as its factors: the logit
/// gradients `d (l, vocab)` and hidden states `x (l, h)` of the head's live rows.
pub(crate) struct HeadRows {
    /// `(l, vocab)`.
    pub d: Vec<f32>,
    /// `(l, h)`.
    pub x: Vec<f32>,
    /// The vocabulary size.
    pub vocab: usize,
}

thread_local! {
    /// The sink of the backward call running on this thread, if any. candle runs every op's
    /// backward on the thread that called `backward`.
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// Clears this thread's sink when a backward call ends, by error or panic included.
struct Scope;

impl Drop for Scope {
    fn drop(&mut self) {
        SINK.with(|s| s.borrow_mut().take());
    }
}

/// The gradients of `loss` with respect to every variable it depends on, as
/// `Tensor::backward` gives them, with the fused ops' weight gradients written once.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    Ok(run(loss, false)?.0)
}

/// The gradients of `loss` as [`backward`] gives them, except that on the CPU the weights of the
/// fused linear layers, the head and the embedding get only the squared norms of their gradients.
pub fn backward_norms(loss: &Tensor) -> Result<Norms> {
    let (grads, squared) = run(loss, true)?;
    if squared.keys().any(|&id| grads.get_id(id).is_some()) {
        bail!("a linear layer's weight also read by another op: the norm of its gradient needs the gradient itself");
    }
    Ok(Norms { grads, squared })
}

/// One backward pass with this thread's sink in place; the squared norms it took, with `norms`.
fn run(loss: &Tensor, norms: bool) -> Result<(GradStore, HashMap<TensorId, f64>)> {
    SINK.with(|s| {
        *s.borrow_mut() = Some(Sink {
            norms: norms.then(NormSink::default),
            ..Sink::default()
        })
    });
    let scope = Scope;
    let mut grads = loss.backward()?;
    let sink = SINK.with(|s| s.borrow_mut().take()).unwrap_or_default();
    drop(scope);
    for (id, g) in sink.grads {
        // A weight that some composed op also read has part of its gradient in the store.
        let g = match grads.get_id(id) {
            Some(other) => (other + g)?,
            None => g,
        };
        grads.insert_id(id, g);
    }
    Ok((grads, sink.norms.unwrap_or_default().squared))
}

/// What a [`backward_norms`] call gives: the gradients, and the squared norms of those it did
/// not build.
pub struct Norms {
    grads: GradStore,
    squared: HashMap<TensorId, f64>,
}

/// Squared L2 norms of the gradients a backward pass left.
pub trait GradNorms {
    /// The squared norm of the gradient of `t`, 0 where it got none.
    fn squared_norm(&self, t: &Tensor) -> Result<f64>;
}

impl GradNorms for GradStore {
    fn squared_norm(&self, t: &Tensor) -> Result<f64> {
        self.get(t).map_or(Ok(0.0), super::ops::squared_sum)
    }
}

impl GradNorms for Norms {
    fn squared_norm(&self, t: &Tensor) -> Result<f64> {
        match self.squared.get(&t.id()) {
            Some(&sq) => Ok(sq),
            None => self.grads.squared_norm(t),
        }
    }
}

/// Whether the backward call running on this thread wants only the squared norm of the gradient
/// of `w`, a variable.
pub(crate) fn norm_only(w: &Tensor) -> bool {
    w.is_variable() && SINK.with(|s| s.borrow().as_ref().is_some_and(|s| s.norms.is_some()))
}

/// Records the squared norm of the gradient of the weight `id`, for which [`norm_only`] holds,
/// and for a tied head the factors of its gradient, which the embedding lookup completes
/// ([`add_rows_norm`]).
pub(crate) fn offer_norm(id: TensorId, squared: f64, head: Option<HeadRows>) -> Result<()> {
    SINK.with(|s| {
        let mut sink = s.borrow_mut();
        let Some(norms) = sink.as_mut().and_then(|s| s.norms.as_mut()) else {
            bail!("a gradient norm offered outside a norms-only backward");
        };
        if let Some(head) = head {
            norms.head_rows.insert(id, head);
        }
        if norms.squared.insert(id, squared).is_some() {
            bail!("a weight read by two ops: the norm of its gradient needs the gradient itself");
        }
        Ok(())
    })
}

/// In a [`backward_norms`] call, the Gram matrix of the linear input `input` over the rows `live`,
/// if another layer reading that input took it.
pub(crate) fn input_gram(input: TensorId, live: &[Range<usize>]) -> Option<Rc<Gram>> {
    SINK.with(|s| {
        let sink = s.borrow();
        let grams = &sink.as_ref()?.norms.as_ref()?.input_grams;
        grams
            .iter()
            .find(|g| g.input == input && g.live == live)
            .map(|g| Rc::clone(&g.gram))
    })
}

/// In a [`backward_norms`] call, keeps the Gram matrix of the linear input `input` over the rows
/// `live` for the other layers that read it, in place of the oldest kept.
pub(crate) fn keep_input_gram(input: TensorId, live: &[Range<usize>], gram: Rc<Gram>) {
    SINK.with(|s| {
        let mut sink = s.borrow_mut();
        let Some(norms) = sink.as_mut().and_then(|s| s.norms.as_mut()) else {
            return;
        };
        if norms.input_grams.len() == INPUT_GRAMS {
            norms.input_grams.remove(0);
        }
        norms.input_grams.push(InputGram {
            input,
            live: live.to_vec(),
            gram,
        });
    })
}

/// In a [`backward_norms`] call, adds the lookup's rows `rows (n, h)` at `ids (n)` into the norm
/// of the gradient of the embedding `table`: completing the tied head's, or as the whole
/// gradient of an untied one. False, with nothing done, outside one or where the table's gradient
/// is being built.
pub(crate) fn add_rows_norm(table: &Tensor, ids: &Tensor, rows: &Tensor) -> Result<bool> {
    if !table.is_variable() || !table.device().is_cpu() {
        return Ok(false);
    }
    let h = table.dim(1)?;
    SINK.with(|s| {
        let mut sink = s.borrow_mut();
        let Some(Sink {
            grads,
            norms: Some(norms),
        }) = sink.as_mut()
        else {
            return Ok(false);
        };
        if grads.contains_key(&table.id()) {
            return Ok(false);
        }
        let head = norms.head_rows.remove(&table.id());
        if head.is_none() && norms.squared.contains_key(&table.id()) {
            bail!(
                "an embedding read by two ops: the norm of its gradient needs the gradient itself"
            );
        }
        let (ids, rows) = (
            ids.flatten_all()?.to_vec1::<u32>()?,
            rows.flatten_all()?.to_vec1::<f32>()?,
        );
        if rows.len() != ids.len() * h {
            bail!(
                "embedding norm: {} ids for {} values of width {h}",
                ids.len(),
                rows.len()
            );
        }
        // The lookup's gradient, summed per id; in id order, so that the norm adds its terms in
        // the same order in every run (a hash map's order changes from process to process).
        let mut sums: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for (&id, row) in ids.iter().zip(rows.chunks_exact(h.max(1))) {
            let sum = sums.entry(id).or_insert_with(|| vec![0.0; h]);
            sum.iter_mut()
                .zip(row)
                .for_each(|(s, &r)| *s += f64::from(r));
        }
        // |H + S|^2 = |H|^2 + sum over the ids r of 2 <H_r, S_r> + |S_r|^2, H_r = d[:, r]^T x.
        let mut added = 0f64;
        for (&id, sum) in &sums {
            added += sum.iter().map(|s| s * s).sum::<f64>();
            let Some(head) = &head else { continue };
            let r = id as usize;
            if r >= head.vocab {
                bail!(
                    "embedding norm: id {id} outside a vocabulary of {}",
                    head.vocab
                );
            }
            let mut hr = vec![0f64; h];
            for (d, x) in head
                .d
                .chunks_exact(head.vocab)
                .zip(head.x.chunks_exact(h.max(1)))
            {
                let w = f64::from(d[r]);
                hr.iter_mut()
                    .zip(x)
                    .for_each(|(a, &v)| *a += w * f64::from(v));
            }
            added += 2.0 * hr.iter().zip(sum).map(|(a, b)| a * b).sum::<f64>();
        }
        *norms.squared.entry(table.id()).or_insert(0.0) += added;
        Ok(true)
    })
}

/// Takes the gradient `g` of the variable `w` when a [`backward`] call is running on this thread;
/// gives it back otherwise (for candle to accumulate), and for a `w` that is not a variable, whose
/// gradient flows on to the variables it was computed from.
pub(crate) fn offer(w: &Tensor, g: Tensor) -> Result<Option<Tensor>> {
    if !w.is_variable() {
        return Ok(Some(g));
    }
    SINK.with(|s| {
        let mut sink = s.borrow_mut();
        let Some(sink) = sink.as_mut().map(|s| &mut s.grads) else {
            return Ok(Some(g));
        };
        match sink.remove(&w.id()) {
            Some(prev) => sink.insert(w.id(), (prev + g)?),
            None => sink.insert(w.id(), g),
        };
        Ok(None)
    })
}

/// Adds `rows (n, h)` into rows `ids (n)` of the gradient of the variable `w (vocab, h)` in place,
/// where a [`backward`] call running on this thread already holds one (the tied head's); false,
/// with nothing done, otherwise.
pub(crate) fn add_rows(w: &Tensor, ids: &Tensor, rows: &Tensor) -> Result<bool> {
    if !w.is_variable() || !w.device().is_cpu() {
        return Ok(false);
    }
    SINK.with(
        |s| match s.borrow().as_ref().and_then(|sink| sink.grads.get(&w.id())) {
            Some(g) if g.is_contiguous() => {
                g.inplace_op3(ids, &rows.contiguous()?, &AddRows)?;
                Ok(true)
            }
            _ => Ok(false),
        },
    )
}

/// `g[ids[i]] += rows[i]` on a contiguous f32 CPU tensor `g (vocab, h)`.
struct AddRows;

impl InplaceOp3 for AddRows {
    fn name(&self) -> &'static str {
        "locus-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (vocab, h) = l1.shape().dims2()?;
        let g = slice_mut(s1, l1, "embedding gradient")?;
        let ids = u32_slice(s2, l2, "embedding ids")?;
        let rows = slice(s3, l3, "embedding rows")?;
        if rows.len() != ids.len() * h {
            bail!(
                "add rows: {} ids for {} values of width {h}",
                ids.len(),
                rows.len()
            );
        }
        for (&id, row) in ids.iter().zip(rows.chunks_exact(h.max(1))) {
            let Some(dst) = g.get_mut(id as usize * h..(id as usize + 1) * h) else {
                bail!("add rows: id {id} outside a vocabulary of {vocab}");
            };
            dst.iter_mut().zip(row).for_each(|(d, r)| *d += r);
        }
        Ok(())
    }
}
