//! Causal scaled dot-product attention as one CPU op with its own backward, flash-attention style.
//!
//! Composed from primitives, attention costs a dozen autograd nodes per layer, each with a zeroed
//! accumulator, plus copies of the key/value heads for grouped-query attention. Here the forward
//! keeps only the output and each query's log-sum-exp; the backward recomputes the probabilities one
//! block of queries at a time, so no `(t, s)` matrix per head outlives its block. Query head `h`
//! reads key/value head `h / (heads / kv_heads)` in place, and the key/value gradients sum over the
//! query heads that share them.

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::exp_in_place;
use super::fused::{cpu_data, slice};
use super::packing::Packing;
use super::tile::{dot, matmul, View};

/// Query rows per tile: enough rows for the matrix kernel to run at speed, few enough that a
/// tile's scores and probabilities stay in cache at any sequence length.
const BLOCK: usize = 32;

/// Attention of `(b, heads, t, d)` queries over `(b, kv_heads, s, d)` keys and values, `s >= t`
/// (the last `t` keys are the queries' own positions); the output is `(b, t, heads * d)`, the
/// layout the output projection reads, so no transpose follows. Under a [`Packing`] each query
/// sees only the keys of its own document.
pub struct FusedAttention {
    scale: f32,
    window: Option<usize>,
    packing: Option<Packing>,
    /// Per `(b, head, query)` log-sum-exp of the scaled scores, set by the forward for the backward.
    lse: OnceLock<Vec<f32>>,
}

impl FusedAttention {
    /// Scores scaled by `scale`; with a `window`, each query sees only that many keys ending at its
    /// own; with a `packing`, only those of its own document.
    pub fn new(scale: f32, window: Option<usize>, packing: Option<Packing>) -> Self {
        FusedAttention {
            scale,
            window,
            packing,
            lse: OnceLock::new(),
        }
    }
}

/// Sizes of one application, validated once.
#[derive(Clone, Copy)]
struct Geometry<'p> {
    b: usize,
    heads: usize,
    kv: usize,
    t: usize,
    s: usize,
    d: usize,
    window: Option<usize>,
    /// Per `(b, query)`, the first key of the query's document (see [`Packing::starts`]).
    starts: Option<&'p [u32]>,
}

impl<'p> Geometry<'p> {
    fn new(
        q: &Layout,
        k: &Layout,
        v: &Layout,
        window: Option<usize>,
        packing: Option<&'p Packing>,
    ) -> Result<Self> {
        let (b, heads, t, d) = q.shape().dims4()?;
        let (kb, kv, s, kd) = k.shape().dims4()?;
        if v.shape() != k.shape() {
            bail!(
                "attention: values {:?} differ from keys {:?}",
                v.shape(),
                k.shape()
            );
        }
        if kb != b || kd != d {
            bail!(
                "attention: keys {:?} do not fit queries {:?}",
                k.shape(),
                q.shape()
            );
        }
        if kv == 0 || heads % kv != 0 {
            bail!("attention: {heads} query heads are not a multiple of {kv} key/value heads");
        }
        if s < t {
            bail!("attention: {s} keys for {t} queries");
        }
        if window == Some(0) {
            bail!("attention: a window of 0 keys leaves nothing to attend to");
        }
        if let Some(p) = packing {
            p.check(b, t, s)?;
        }
        Ok(Geometry {
            b,
            heads,
            kv,
            t,
            s,
            d,
            window,
            starts: packing.map(Packing::starts),
        })
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv
    }

    /// Keys visible to query `i` of batch row `b`: up to its own position `i + s - t`, at most
    /// `window` of them, none before its document.
    fn visible(&self, b: usize, i: usize) -> Range<usize> {
        let own = i + self.s - self.t;
        let first = self.window.map_or(0, |w| (own + 1).saturating_sub(w));
        let first = self
            .starts
            .map_or(first, |s| first.max(s[b * self.t + i] as usize));
        first..own + 1
    }

    /// Keys visible to any query of `rows` of batch row `b` (a later query's first key is never
    /// earlier, its document's beginning neither).
    fn keys(&self, b: usize, rows: &Range<usize>) -> Range<usize> {
        self.visible(b, rows.start).start..self.visible(b, rows.end - 1).end
    }

    /// Query blocks of at most `BLOCK` rows.
    fn blocks(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.t)
            .step_by(BLOCK)
            .map(|i| i..(i + BLOCK).min(self.t))
    }

    /// Query head `h` of batch row `b`, `(t, d)`.
    fn q_head<'a>(&self, q: &'a [f32], b: usize, h: usize) -> &'a [f32] {
        let len = self.t * self.d;
        &q[(b * self.heads + h) * len..][..len]
    }

    /// The key (or value) head that query head `h` of batch row `b` reads, `(s, d)`.
    fn kv_head<'a>(&self, k: &'a [f32], b: usize, h: usize) -> &'a [f32] {
        let len = self.s * self.d;
        &k[(b * self.kv + h / self.group()) * len..][..len]
    }

    /// Head `h` of batch row `b` in the `(b, t, heads, d)` output layout: rows `heads * d` apart.
    fn out_head<'a>(&self, out: &'a [f32], b: usize, h: usize) -> &'a [f32] {
        &out[(b * self.t * self.heads + h) * self.d..]
    }

    /// Distance between consecutive query rows of one head in the output layout.
    fn out_stride(&self) -> usize {
        self.heads * self.d
    }
}

/// Softmax of `row` over its `visible` entries and zero elsewhere; returns the log-sum-exp.
fn softmax_row(row: &mut [f32], visible: Range<usize>) -> f32 {
    row[..visible.start].fill(0.0);
    row[visible.end..].fill(0.0);
    let live = &mut row[visible];
    let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_in_place(live, max, 1.0);
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// The probabilities the forward computed, recovered from the scores and the log-sum-exp.
fn probs_row(row: &mut [f32], visible: Range<usize>, lse: f32) {
    row[..visible.start].fill(0.0);
    row[visible.end..].fill(0.0);
    exp_in_place(&mut row[visible], lse, 1.0);
}

fn relative(r: Range<usize>, origin: usize) -> Range<usize> {
    r.start - origin..r.end - origin
}

/// One query head with the key/value head it reads, and that head's output and upstream gradient
/// (both in the strided output layout) for the backward.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
}

impl FusedAttention {
    /// Scaled scores of query rows `rows` against `keys`, `(rows, keys)` row-major in `scores`.
    fn scores(
        &self,
        g: &Geometry,
        q: &[f32],
        k: &[f32],
        rows: &Range<usize>,
        keys: &Range<usize>,
        scores: &mut Vec<f32>,
    ) {
        let (d, n) = (g.d, keys.len());
        scores.resize(rows.len() * n, 0.0);
        let qb = View::rows(&q[rows.start * d..rows.end * d], rows.len(), d, d);
        let kb = View::rows(&k[keys.start * d..keys.end * d], n, d, d);
        matmul(scores, n, qb, kb.t(), self.scale, false);
    }

    /// One head's output `(t, d)` and per-query log-sum-exp.
    fn forward_head(
        &self,
        g: &Geometry,
        b: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let d = g.d;
        let (mut out, mut lse) = (vec![0f32; g.t * d], vec![0f32; g.t]);
        let mut probs = Vec::new();
        for rows in g.blocks() {
            let keys = g.keys(b, &rows);
            let n = keys.len();
            self.scores(g, q, k, &rows, &keys, &mut probs);
            for (r, row) in probs.chunks_mut(n).enumerate() {
                let i = rows.start + r;
                lse[i] = softmax_row(row, relative(g.visible(b, i), keys.start));
            }
            let pb = View::rows(&probs, rows.len(), n, n);
            let vb = View::rows(&v[keys.start * d..keys.end * d], n, d, d);
            matmul(
                &mut out[rows.start * d..rows.end * d],
                d,
                pb,
                vb,
                1.0,
                false,
            );
        }
        (out, lse)
    }

    /// Adds one query head's share to its key/value head's gradients and writes its query gradient:
    /// with `p` the probabilities and `D_i = dout_i . out_i`, `dv += p^T dout`,
    /// `ds = p * (dout v^T - D)`, `dq = scale * ds k`, `dk += scale * ds^T q`.
    fn backward_head(
        &self,
        g: &Geometry,
        b: usize,
        x: &Head,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (d, stride) = (g.d, g.out_stride());
        let delta: Vec<f32> = (0..g.t)
            .map(|i| dot(&x.out[i * stride..][..d], &x.dout[i * stride..][..d]))
            .collect();
        let (mut probs, mut dprobs) = (Vec::new(), Vec::new());
        for rows in g.blocks() {
            let (keys, m) = (g.keys(b, &rows), rows.len());
            let n = keys.len();
            self.scores(g, x.q, x.k, &rows, &keys, &mut probs);
            for (r, row) in probs.chunks_mut(n).enumerate() {
                let i = rows.start + r;
                probs_row(row, relative(g.visible(b, i), keys.start), x.lse[i]);
            }
            let pb = View::rows(&probs, m, n, n);
            let dob = View::rows(&x.dout[rows.start * stride..], m, d, stride);
            let qb = View::rows(&x.q[rows.start * d..rows.end * d], m, d, d);
            let kb = View::rows(&x.k[keys.start * d..keys.end * d], n, d, d);
            let vb = View::rows(&x.v[keys.start * d..keys.end * d], n, d, d);
            let kv_rows = keys.start * d..keys.end * d;
            matmul(&mut dv[kv_rows.clone()], d, pb.t(), dob, 1.0, true);
            dprobs.resize(m * n, 0.0);
            matmul(&mut dprobs, n, dob, vb.t(), 1.0, false);
            for (r, (ds, p)) in dprobs.chunks_mut(n).zip(probs.chunks(n)).enumerate() {
                let di = delta[rows.start + r];
                ds.iter_mut()
                    .zip(p)
                    .for_each(|(ds, &p)| *ds = p * (*ds - di));
            }
            let dsb = View::rows(&dprobs, m, n, n);
            matmul(
                &mut dq[rows.start * d..rows.end * d],
                d,
                dsb,
                kb,
                self.scale,
                false,
            );
            matmul(&mut dk[kv_rows], d, dsb.t(), qb, self.scale, true);
        }
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "locus-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1, l2, l3, self.window, self.packing.as_ref())?;
        let (q, k, v) = (
            slice(s1, l1, "q")?,
            slice(s2, l2, "k")?,
            slice(s3, l3, "v")?,
        );
        let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..g.b * g.heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / g.heads, bh % g.heads);
                self.forward_head(
                    &g,
                    b,
                    g.q_head(q, b, h),
                    g.kv_head(k, b, h),
                    g.kv_head(v, b, h),
                )
            })
            .collect();
        // Heads are computed apart (one task each) and interleaved here into the output layout.
        let mut out = vec![0f32; g.b * g.t * g.heads * g.d];
        let mut lse = Vec::with_capacity(g.b * g.heads * g.t);
        for (bh, (head, head_lse)) in heads.into_iter().enumerate() {
            let (b, h) = (bh / g.heads, bh % g.heads);
            for (i, row) in head.chunks(g.d).enumerate() {
                let at = ((b * g.t + i) * g.heads + h) * g.d;
                out[at..at + g.d].copy_from_slice(row);
            }
            lse.extend(head_lse);
        }
        if self.lse.set(lse).is_err() {
            bail!("fused attention: one op instance applied twice");
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.t, g.heads * g.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else {
            bail!("fused attention: backward before forward")
        };
        let g = Geometry::new(
            q.layout(),
            k.layout(),
            v.layout(),
            self.window,
            self.packing.as_ref(),
        )?;
        let grad = grad.contiguous()?;
        let guards = [q, k, v, out, &grad].map(|t| t.storage_and_layout());
        let data = |i: usize, what: &str| cpu_data(&guards[i].0, guards[i].1, what);
        let (qd, kd, vd) = (data(0, "q")?, data(1, "k")?, data(2, "v")?);
        let (od, gd) = (data(3, "attention output")?, data(4, "attention gradient")?);
        let (group, kv_len) = (g.group(), g.s * g.d);
        let mut dq = vec![0f32; qd.len()];
        let (mut dk, mut dv) = (vec![0f32; kd.len()], vec![0f32; vd.len()]);
        // One task per key/value head: it owns that head's dk and dv and the dq of its query heads.
        dq.par_chunks_mut(group * g.t * g.d)
            .zip(dk.par_chunks_mut(kv_len).zip(dv.par_chunks_mut(kv_len)))
            .enumerate()
            .for_each(|(bk, (dq, (dk, dv)))| {
                let b = bk / g.kv;
                for (r, dq) in dq.chunks_mut(g.t * g.d).enumerate() {
                    let h = (bk % g.kv) * group + r;
                    let head = Head {
                        q: g.q_head(qd, b, h),
                        k: g.kv_head(kd, b, h),
                        v: g.kv_head(vd, b, h),
                        out: g.out_head(od, b, h),
                        dout: g.out_head(gd, b, h),
                        lse: &lse[(b * g.heads + h) * g.t..][..g.t],
                    };
                    self.backward_head(&g, b, &head, dq, dk, dv);
                }
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
