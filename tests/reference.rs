//! Exactness against PyTorch/transformers: logits, losses and every group and parameter gradient
//! norm of tiny random models of each architecture (fixtures from scripts/reference/make_fixtures.py).

mod common;

use candle_core::{Device, Tensor};
use common::{assert_trace_matches, expected, fixture, rel_err, span_texts, Expected, TINY};
use locus::model::device;
use locus::model::{grads, load, Model};
use locus::trace::{param_squared_norms, prepare, span_and_full_loss, trace};
use std::collections::BTreeMap;

fn dev() -> Device {
    device::from_env().unwrap()
}

/// The largest absolute difference between paired values.
fn largest_difference<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    a.into_iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

fn load_tiny(name: &str) -> (Model, Expected) {
    let dir = fixture(name);
    let model = load::load(dir.to_str().unwrap(), &dev()).unwrap();
    (model, expected(dir.join("expected.json")))
}

#[test]
fn token_ids_and_span_targets_match_transformers() {
    for name in TINY {
        let (model, e) = load_tiny(name);
        let prepared = prepare(&model, name, &span_texts(&e)).unwrap();
        for (i, p) in prepared.iter().enumerate() {
            assert_eq!(p.ids, e.token_ids[i], "{name} text {i} ids");
            let targets: Vec<usize> = p
                .targets
                .iter()
                .enumerate()
                .filter(|(_, &b)| b)
                .map(|(j, _)| j + 1)
                .collect();
            assert_eq!(targets, e.span_targets[i], "{name} text {i} span targets");
        }
    }
}

#[test]
fn logits_match_transformers() {
    for name in TINY {
        let (model, e) = load_tiny(name);
        let params = model.params(|_| false);
        for (i, ids) in e.token_ids.iter().enumerate() {
            let t = Tensor::new(ids.as_slice(), &dev())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.arch.forward(&params, &t).unwrap().squeeze(0).unwrap();
            let got: Vec<Vec<f32>> = logits.to_vec2().unwrap();
            let mut worst = 0f32;
            for (row, want) in got.iter().zip(&e.logits[i]) {
                for (a, b) in row.iter().zip(want) {
                    worst = worst.max((a - b).abs());
                }
            }
            assert!(
                worst <= 1e-4,
                "{name} text {i}: logits max abs diff {worst}"
            );
        }
    }
}

#[test]
fn losses_and_group_norms_match_transformers() {
    for name in TINY {
        let (model, e) = load_tiny(name);
        let prepared = prepare(&model, name, &span_texts(&e)).unwrap();
        assert_trace_matches(name, &trace(&model, &prepared).unwrap(), &e, 1e-4, 1e-3);
    }
}

/// Per-parameter span and full gradient norms of every fixture text, averaged over texts, against
/// the reference; `norms_only` takes them from `grads::backward_norms`, as the trace does.
fn assert_parameter_norms(norms_only: bool) {
    for name in TINY {
        let (model, e) = load_tiny(name);
        let params = model.params(|_| true);
        let prepared = prepare(&model, name, &span_texts(&e)).unwrap();
        let mut means: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for p in &prepared {
            let n = p.ids.len();
            let ids = Tensor::new(p.ids.as_slice(), &dev())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            // The loss path training uses (Llama's fused head on the CPU).
            let nll = model.arch.next_token_nll(&params, &ids).unwrap();
            let mask: Vec<f32> = p
                .targets
                .iter()
                .map(|&b| if b { 1.0 } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, (1, n - 1), &dev()).unwrap();
            let (span, full) = span_and_full_loss(&nll, &mask).unwrap();
            let norms = |loss: &Tensor| match norms_only {
                true => param_squared_norms(&model, &params, &grads::backward_norms(loss).unwrap()),
                false => param_squared_norms(&model, &params, &grads::backward(loss).unwrap()),
            };
            let (span_sq, full_sq) = (norms(&span).unwrap(), norms(&full).unwrap());
            for (pname, sq) in full_sq {
                assert!(sq > 0.0, "{name}: {pname} received no gradient");
                let e = means.entry(pname.clone()).or_default();
                e.0 += span_sq[&pname].sqrt() / prepared.len() as f64;
                e.1 += sq.sqrt() / prepared.len() as f64;
            }
        }
        assert_eq!(
            means.len(),
            e.param_grad_norms.len(),
            "{name}: parameter count"
        );
        for (pname, (span, full)) in means {
            let want = e
                .param_grad_norms
                .get(&pname)
                .unwrap_or_else(|| panic!("{name}: no reference for {pname}"));
            assert!(
                rel_err(span, want.span) < 1e-3,
                "{name} {pname} span (norms only: {norms_only}): {span} vs {}",
                want.span
            );
            assert!(
                rel_err(full, want.full) < 1e-3,
                "{name} {pname} full (norms only: {norms_only}): {full} vs {}",
                want.full
            );
        }
    }
}

#[test]
fn every_parameter_gets_the_reference_gradient() {
    assert_parameter_norms(false);
}

#[test]
fn gradient_norms_without_the_gradients_match_the_reference() {
    assert_parameter_norms(true);
}

/// Two rows of 64 pseudo-random ids and a span mask on the first targets of each, so that every
/// row ends in a long run of positions without gradient.
fn early_spans(vocab: usize) -> (Tensor, Tensor) {
    let (rows, seq) = (2, 64);
    let ids: Vec<u32> = (0..rows * seq)
        .map(|i| ((i as u64 * 2654435761) % vocab as u64) as u32)
        .collect();
    let mask: Vec<f32> = (0..rows * (seq - 1))
        .map(|i| f32::from(u8::from(i % (seq - 1) < 10 + 7 * (i / (seq - 1)))))
        .collect();
    (
        Tensor::from_vec(ids, (rows, seq), &dev()).unwrap(),
        Tensor::from_vec(mask, (rows, seq - 1), &dev()).unwrap(),
    )
}

#[test]
fn gradients_written_once_equal_candles_accumulated_ones() {
    for name in TINY {
        let (model, _) = load_tiny(name);
        let params = model.params(|_| true);
        let (ids, mask) = early_spans(model.arch.vocab_size());
        let nll = model.arch.next_token_nll(&params, &ids).unwrap();
        let (span, full) = span_and_full_loss(&nll, &mask).unwrap();
        for (which, loss) in [("span", &span), ("full", &full)] {
            let (once, candle) = (grads::backward(loss).unwrap(), loss.backward().unwrap());
            for (pname, var) in &model.vars {
                let (a, b) = (
                    once.get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{name} {which}: no gradient for {pname}")),
                    candle.get(var.as_tensor()).unwrap(),
                );
                let (a, b) = (
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let diff = largest_difference(&a, &b);
                assert!(
                    diff / scale < 1e-5,
                    "{name} {which} {pname}: differs by {diff} at scale {scale}"
                );
            }
        }
    }
}

#[test]
fn packed_documents_have_the_losses_and_gradients_they_have_alone() {
    use locus::model::packing::Packing;
    for name in TINY {
        let (model, e) = load_tiny(name);
        let params = model.params(|_| true);
        // Whole texts and prefixes of them, so that some rows hold several documents (and
        // GPT-Neo's local layers see documents shorter and longer than their window).
        let docs: Vec<&[u32]> = vec![
            &e.token_ids[0],
            &e.token_ids[1][..12],
            &e.token_ids[2][..20],
            &e.token_ids[1][..3],
            &e.token_ids[2],
            &e.token_ids[0][..9],
        ];
        let lengths: Vec<usize> = docs.iter().map(|d| d.len()).collect();
        let (packing, at) = Packing::pack(&lengths, 0);
        assert!(packing.rows() < docs.len(), "{name}: nothing was packed");
        let (b, t) = (packing.rows(), packing.len());
        let mut ids = vec![0u32; b * t];
        let mut weight = vec![0f32; b * (t - 1)];
        for (d, p) in docs.iter().zip(&at) {
            ids[p.row * t + p.offset..][..d.len()].copy_from_slice(d);
            weight[p.row * (t - 1) + p.offset..][..d.len() - 1].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (b, t), &dev()).unwrap();
        let weight = Tensor::from_vec(weight, (b, t - 1), &dev()).unwrap();
        let packed = model
            .arch
            .next_token_nll_packed(&params, &ids, &packing)
            .unwrap();
        let rows: Vec<Vec<f32>> = packed.to_vec2().unwrap();
        let mut alone_total: Option<Tensor> = None;
        for (i, (d, p)) in docs.iter().zip(&at).enumerate() {
            let one = Tensor::new(*d, &dev()).unwrap().unsqueeze(0).unwrap();
            let nll = model.arch.next_token_nll(&params, &one).unwrap();
            let want: Vec<f32> = nll.squeeze(0).unwrap().to_vec1().unwrap();
            let got = &rows[p.row][p.offset..][..d.len() - 1];
            let diff = largest_difference(got, &want);
            assert!(diff < 1e-5, "{name} document {i}: losses differ by {diff}");
            let sum = nll.sum_all().unwrap();
            alone_total = Some(match alone_total {
                Some(t) => (t + sum).unwrap(),
                None => sum,
            });
        }
        let packed_total = (packed * weight).unwrap().sum_all().unwrap();
        let (a, b) = (
            grads::backward(&packed_total).unwrap(),
            grads::backward(&alone_total.unwrap()).unwrap(),
        );
        for (pname, var) in &model.vars {
            let flat = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
                g.get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (a, b) = (flat(&a), flat(&b));
            let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let diff = largest_difference(&a, &b);
            assert!(
                diff / scale < 1e-5,
                "{name} {pname}: packed gradient differs by {diff} at scale {scale}"
            );
        }
    }
}

#[test]
fn cached_incremental_forward_matches_the_whole_sequence() {
    use locus::model::cache::KvCache;
    for name in TINY {
        let (model, e) = load_tiny(name);
        let params = model.params(|_| false);
        let ids = &e.token_ids[2];
        let all = Tensor::new(ids.as_slice(), &dev())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want: Vec<Vec<f32>> = model
            .arch
            .forward(&params, &all)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut cache = KvCache::new(model.arch.num_layers());
        let split = 5;
        let mut got: Vec<Vec<f32>> = Vec::new();
        let prefix = all.narrow(1, 0, split).unwrap();
        got.extend(
            model
                .arch
                .forward_cached(&params, &prefix, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
        );
        for j in split..ids.len() {
            let step = all.narrow(1, j, 1).unwrap();
            got.extend(
                model
                    .arch
                    .forward_cached(&params, &step, &mut cache)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), ids.len());
        let worst = largest_difference(got.iter().flatten(), want.iter().flatten());
        assert!(worst < 1e-4, "{name}: cached logits differ by {worst}");
    }
}

#[test]
fn losses_from_a_later_position_match_those_of_the_whole_sequence() {
    for name in TINY {
        let (model, e) = load_tiny(name);
        let ids = &e.token_ids[2];
        let all = sequence_nll(&model, ids, 0);
        for from in [1, 4, all.len() - 1] {
            let tail = sequence_nll(&model, ids, from);
            assert_eq!(tail.len(), all.len() - from, "{name}: from {from}");
            let worst = largest_difference(&tail, &all[from..]);
            assert!(worst < 1e-5, "{name}: from {from} differs by {worst}");
        }
    }
}

/// The next-token losses of one sequence from position `from` on, as the model computes them for
/// training and evaluation.
fn sequence_nll(model: &Model, ids: &[u32], from: usize) -> Vec<f32> {
    let ids = Tensor::new(ids, &dev()).unwrap().unsqueeze(0).unwrap();
    model
        .arch
        .next_token_nll_from(&model.params(|_| false), &ids, from)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn continuation_scores_match_the_losses_of_whole_sequences() {
    use locus::snapshot::Snapshot;
    use std::sync::Arc;
    for name in TINY {
        let (model, e) = load_tiny(name);
        let model = Arc::new(model);
        let ids = &e.token_ids[2];
        // Prompts of one and five tokens; continuations of 1 to 4 tokens, scored in one batch.
        for p in [1, 5] {
            let prompt = &ids[..p];
            let continuations: Vec<Vec<u32>> =
                (1..=4).map(|c| ids[p + 4 - c..p + 4].to_vec()).collect();
            let snapshot = Snapshot::load(Arc::clone(&model), 0).unwrap();
            let got = locus::infer::logprobs(&snapshot, prompt, &continuations).unwrap();
            for (c, got) in continuations.iter().zip(got) {
                let nll = sequence_nll(&model, &[prompt, c].concat(), 0);
                let want = -nll[p - 1..].iter().map(|&v| f64::from(v)).sum::<f64>();
                assert!(
                    (got - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{name}: prompt {p}, continuation {c:?}: {got} against {want}"
                );
            }
        }
    }
}

#[test]
fn a_trace_repeats_bit_for_bit() {
    // Runs of one trace agree exactly (`locus trace` outputs are compared across runs): no sum
    // may take its order from hashing or from how threads split the work.
    let (model, e) = load_tiny("llama");
    let prepared = prepare(&model, "llama", &span_texts(&e)).unwrap();
    let first = format!("{:?}", trace(&model, &prepared).unwrap());
    for run in 1..40 {
        let again = format!("{:?}", trace(&model, &prepared).unwrap());
        assert_eq!(again, first, "run {run} of the same trace differs");
    }
}
