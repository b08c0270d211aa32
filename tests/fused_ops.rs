//! The fused CPU kernels give the same values and gradients as the composed differentiable ops.

use candle_core::{DType, Device, Tensor, Var};
use locus::model::fused_head;
use locus::model::ops::{self, composed};
use locus::model::packing::Packing;

fn randn(shape: &[usize], seed: u64) -> Var {
    // A deterministic spread of values; no RNG state shared between tests.
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = ((i as u64 + 1) * 2654435761 + seed * 97) % 10007;
            (x as f32 / 10007.0 - 0.5) * 4.0
        })
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The largest magnitude in `t`, at least 1: differences are compared relative to it.
fn scale(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0)
}

/// Compares outputs and the gradients of `sum(out * probe)` for every input.
fn check(name: &str, inputs: &[&Var], fused: impl Fn() -> Tensor, composed: impl Fn() -> Tensor) {
    let (a, b) = (fused(), composed());
    assert!(
        max_diff(&a, &b) / scale(&b) < 1e-5,
        "{name}: outputs differ by {}",
        max_diff(&a, &b)
    );
    let probe = randn(a.dims(), 7);
    let ga = (a * probe.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (b * probe.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (x, y) = (
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(x, y) / scale(y) < 1e-5,
            "{name}: gradient of input {i} differs by {}",
            max_diff(x, y)
        );
    }
}

#[test]
fn rms_norm_matches_composed() {
    let (x, w) = (randn(&[2, 5, 16], 1), randn(&[16], 2));
    check(
        "rms_norm",
        &[&x, &w],
        || ops::rms_norm(&x, &w, 1e-5).unwrap(),
        || composed::rms_norm(&x, &w, 1e-5).unwrap(),
    );
}

#[test]
fn linear_matches_composed() {
    let (x, w, b) = (randn(&[2, 5, 16], 3), randn(&[8, 16], 4), randn(&[8], 5));
    check(
        "linear",
        &[&x, &w, &b],
        || ops::linear(&x, &w, Some(&b)).unwrap(),
        || composed::linear(&x, &w, Some(&b)).unwrap(),
    );
}

#[test]
fn split_heads_matches_reshape_transpose_copy() {
    let x = randn(&[2, 5, 12], 6);
    check(
        "split heads",
        &[&x],
        || ops::split_heads(&x, 3).unwrap(),
        || {
            x.reshape((2, 5, 3, 4))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        },
    );
    assert!(ops::split_heads(&x, 5).is_err());
}

#[test]
fn linear_matches_composed_for_one_few_and_many_rows() {
    // Rows, outputs, inputs: one row (generation), a partial group of four, an input width that
    // is no multiple of the vector width, a few rows under a deep weight, and a general product.
    for (i, &(m, n, k)) in [
        (1, 300, 70),
        (3, 64, 64),
        (5, 257, 33),
        (20, 40, 96),
        (40, 24, 16),
        (70, 30, 20),
    ]
    .iter()
    .enumerate()
    {
        let seed = 10 + 3 * i as u64;
        let (x, w, b) = (
            randn(&[m, k], seed),
            randn(&[n, k], seed + 1),
            randn(&[n], seed + 2),
        );
        check(
            &format!("linear {m}x{k} by {n}x{k}"),
            &[&x, &w, &b],
            || ops::linear(&x, &w, Some(&b)).unwrap(),
            || composed::linear(&x, &w, Some(&b)).unwrap(),
        );
    }
}

#[test]
fn attention_matches_composed_for_grouped_and_plain_heads_windows_and_cached_keys() {
    // (batch, query heads, key/value heads, queries, keys, head dim, window); 70 queries span three
    // query blocks of the kernel, and more keys than queries is generation against a KV cache.
    for (b, h, kv, t, s, d, window) in [
        (2, 6, 2, 70, 70, 8, None),
        (2, 6, 2, 70, 70, 8, Some(5)),
        (1, 4, 4, 9, 9, 16, None),
        (1, 4, 4, 3, 40, 16, None),
        (2, 6, 3, 35, 40, 8, Some(4)),
        (1, 3, 1, 1, 37, 8, None),
    ] {
        let (q, k, v) = (
            randn(&[b, h, t, d], 10),
            randn(&[b, kv, s, d], 11),
            randn(&[b, kv, s, d], 12),
        );
        check(
            &format!("attention {h}/{kv} heads, {t}/{s} keys, window {window:?}"),
            &[&q, &k, &v],
            || ops::attention(&q, &k, &v, 0.3, window, None).unwrap(),
            || composed::attention(&q, &k, &v, 0.3, window, None).unwrap(),
        );
    }
}

#[test]
fn attention_rejects_heads_that_do_not_group_and_more_queries_than_keys() {
    let (q, k) = (randn(&[1, 5, 4, 8], 1), randn(&[1, 2, 4, 8], 2));
    let err = ops::attention(&q, &k, &k, 1.0, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a multiple of 2 key/value heads"), "{err}");
    let (q, k) = (randn(&[1, 2, 6, 8], 1), randn(&[1, 2, 4, 8], 2));
    let err = ops::attention(&q, &k, &k, 1.0, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 keys for 6 queries"), "{err}");
}

#[test]
fn rope_matches_candle_rope_slow() {
    let x = randn(&[2, 3, 6, 8], 8);
    let (cos, sin) = ops::rope_tables(0, 6, 8, 10000.0, &Device::Cpu).unwrap();
    for (name, composed) in [
        (
            "rope",
            candle_nn::rotary_emb::rope_slow as fn(&_, &_, &_) -> _,
        ),
        ("composed rope", composed::rope),
    ] {
        check(
            name,
            &[&x],
            || ops::rope(&x, &cos, &sin).unwrap(),
            || composed(&x, &cos, &sin).unwrap(),
        );
    }
}

#[test]
fn packed_attention_and_rope_match_composed_and_keep_documents_apart() {
    // Rows of 70 (three query blocks): documents of 40, 30, 25, 20, 9 and 6 tokens, so blocks
    // straddle documents and one row ends in padding.
    let (packing, _) = Packing::pack(&[70, 40, 30, 25, 20, 9, 6], 0);
    assert_eq!((packing.rows(), packing.len()), (3, 70));
    let (b, h, kv, t, d) = (3, 6, 2, 70, 8);
    let pos = packing.positions(&Device::Cpu).unwrap();
    let (cos, sin) = ops::rope_tables_at(&pos, d, 10000.0).unwrap();
    let x = randn(&[b, h, t, d], 13);
    check(
        "per-row rope",
        &[&x],
        || ops::rope(&x, &cos, &sin).unwrap(),
        || composed::rope(&x, &cos, &sin).unwrap(),
    );
    let (q, k, v) = (
        randn(&[b, h, t, d], 10),
        randn(&[b, kv, t, d], 11),
        randn(&[b, kv, t, d], 12),
    );
    for window in [None, Some(5)] {
        check(
            &format!("packed attention, window {window:?}"),
            &[&q, &k, &v],
            || ops::attention(&q, &k, &v, 0.3, window, Some(&packing)).unwrap(),
            || composed::attention(&q, &k, &v, 0.3, window, Some(&packing)).unwrap(),
        );
    }
    // A document packed after another attends as it does alone in a row: the 30-token one sits
    // at offset 40 of row 1.
    let alone = |x: &Var| x.narrow(0, 1, 1).unwrap().narrow(2, 40, 30).unwrap();
    let packed = ops::attention(&q, &k, &v, 0.3, None, Some(&packing)).unwrap();
    let want = ops::attention(&alone(&q), &alone(&k), &alone(&v), 0.3, None, None).unwrap();
    let got = packed.narrow(0, 1, 1).unwrap().narrow(1, 40, 30).unwrap();
    assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
    let err = ops::attention(&q, &k, &v, 0.3, None, Some(&Packing::pack(&[5], 0).0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("for a layout of 1 rows of 5"), "{err}");
}

#[test]
fn cross_entropy_matches_log_softmax_gather() {
    let logits = randn(&[2, 6, 11], 9);
    let ids = Tensor::new(&[[1u32, 4, 10, 0, 3, 3], [7, 7, 2, 9, 1, 0]], &Device::Cpu).unwrap();
    check(
        "next_token_nll",
        &[&logits],
        || ops::next_token_nll(&logits, &ids).unwrap(),
        || composed::next_token_nll(&logits, &ids).unwrap(),
    );
}

#[test]
fn cross_entropy_rejects_out_of_vocabulary_targets() {
    let logits = Tensor::zeros((1, 3, 5), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 9, 2]], &Device::Cpu).unwrap();
    let err = ops::next_token_nll(&logits, &ids).unwrap_err().to_string();
    assert!(err.contains("outside a vocabulary"), "{err}");
}

#[test]
fn swiglu_matches_silu_times_up() {
    let (gate, up) = (randn(&[2, 5, 24], 10), randn(&[2, 5, 24], 11));
    check(
        "swiglu",
        &[&gate, &up],
        || ops::swiglu(&gate, &up).unwrap(),
        || composed::swiglu(&gate, &up).unwrap(),
    );
}

#[test]
fn gated_up_matches_swiglu_of_two_linears_for_few_and_many_rows_and_a_frozen_weight() {
    let (wg, wu) = (randn(&[24, 16], 20), randn(&[24, 16], 21));
    let composed = |x: &Tensor, wg: &Tensor, wu: &Tensor| {
        composed::swiglu(
            &composed::linear(x, wg, None).unwrap(),
            &composed::linear(x, wu, None).unwrap(),
        )
        .unwrap()
    };
    for (i, rows) in [1, 3, 40].into_iter().enumerate() {
        let x = randn(&[2, rows, 16], 22 + i as u64);
        check(
            &format!("gated_up, {rows} rows a sequence"),
            &[&x, &wg, &wu],
            || ops::gated_up(&x, (&wg, None), (&wu, None), (None, None)).unwrap(),
            || composed(&x, &wg, &wu),
        );
    }
    // A frozen gate weight gets no gradient; the input's still sums both projections.
    let (x, frozen) = (randn(&[2, 40, 16], 25), wg.as_tensor().detach());
    check(
        "gated_up, gate weight frozen",
        &[&x, &wu],
        || ops::gated_up(&x, (&frozen, None), (&wu, None), (None, None)).unwrap(),
        || composed(&x, &frozen, &wu),
    );
}

#[test]
fn gated_up_without_a_backward_matches_swiglu_of_two_linears() {
    // Nothing tracked, so no backward follows and the activation runs inside the product: rows
    // on and off the kernel's 32-row panels, widths on and off its 6-column gated tiles.
    for (i, &(rows, n, k)) in [(40, 24, 16), (70, 26, 19), (3, 10, 8)].iter().enumerate() {
        let seed = 60 + 3 * i as u64;
        let x = randn(&[2, rows, k], seed).as_tensor().detach();
        let wg = randn(&[n, k], seed + 1).as_tensor().detach();
        let wu = randn(&[n, k], seed + 2).as_tensor().detach();
        let fused = ops::gated_up(&x, (&wg, None), (&wu, None), (None, None)).unwrap();
        let want = composed::swiglu(
            &composed::linear(&x, &wg, None).unwrap(),
            &composed::linear(&x, &wu, None).unwrap(),
        )
        .unwrap();
        assert!(
            max_diff(&fused, &want) / scale(&want) < 1e-5,
            "{rows} rows, {n} x {k}: outputs differ by {}",
            max_diff(&fused, &want)
        );
    }
}

#[test]
fn projections_of_one_input_match_each_linear_alone() {
    // Query, key and value projections of different widths share one packed input.
    let x = randn(&[2, 40, 20], 70);
    let ws = [
        randn(&[36, 20], 71),
        randn(&[12, 20], 72),
        randn(&[13, 20], 73),
    ];
    let bs = [randn(&[36], 74), randn(&[12], 75), randn(&[13], 76)];
    for i in 0..ws.len() {
        check(
            &format!("projection {i} of three"),
            &[&x, &ws[i], &bs[i]],
            || {
                let weights: Vec<ops::Projection> = ws
                    .iter()
                    .zip(&bs)
                    .map(|(w, b)| (w.as_tensor(), Some(b.as_tensor()), None))
                    .collect();
                ops::linears_from(&x, &weights).unwrap().remove(i)
            },
            || composed::linear(&x, &ws[i], Some(&bs[i])).unwrap(),
        );
    }
}

#[test]
fn gated_up_rejects_weights_of_different_shapes() {
    let (x, wg, wu) = (
        randn(&[2, 5, 16], 26),
        randn(&[24, 16], 27),
        randn(&[12, 16], 28),
    );
    let err = ops::gated_up(&x, (&wg, None), (&wu, None), (None, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("differ in shape"), "{err}");
}

#[test]
fn swiglu_rejects_mismatched_shapes() {
    let (gate, up) = (randn(&[2, 6], 12), randn(&[3, 4], 13));
    let err = ops::swiglu(&gate, &up).unwrap_err().to_string();
    assert!(err.contains("differ in shape"), "{err}");
}

fn head_ids() -> Tensor {
    Tensor::new(
        &[[1u32, 4, 10, 0, 3, 3, 8], [7, 7, 2, 9, 1, 0, 10]],
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn head_nll_matches_projection_then_cross_entropy() {
    let (hidden, w, ids) = (randn(&[2, 7, 16], 14), randn(&[11, 16], 15), head_ids());
    check(
        "head_nll",
        &[&hidden, &w],
        || ops::head_nll(&hidden, &w, &ids).unwrap(),
        || composed::next_token_nll(&composed::linear(&hidden, &w, None).unwrap(), &ids).unwrap(),
    );
}

/// The fused head in chunks of `chunk` rows, on `(b, t, h)` hidden states, keeping its logits
/// for the backward or not.
fn chunked_head_nll(hidden: &Tensor, w: &Tensor, ids: &Tensor, chunk: usize, keep: bool) -> Tensor {
    let (b, t, h) = hidden.dims3().unwrap();
    let x = hidden.narrow(1, 0, t - 1).unwrap().contiguous().unwrap();
    let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let op = fused_head::HeadNll::new(targets.to_vec1().unwrap(), chunk, keep);
    x.reshape((b * (t - 1), h))
        .unwrap()
        .apply_op2(w, op)
        .unwrap()
        .reshape((b, t - 1))
        .unwrap()
}

#[test]
fn head_nll_in_small_chunks_with_rows_outside_the_loss_matches_composed() {
    // Chunks of 1, 4, 5 (12 rows cut into three chunks of 4) and more than all rows; the mask
    // zeroes the gradient of some rows, which the backward skips.
    let (hidden, w, ids) = (randn(&[2, 7, 16], 16), randn(&[11, 16], 17), head_ids());
    let mask = Tensor::new(
        &[[0f32, 1., 1., 0., 0., 1.], [1., 0., 0., 0., 1., 1.]],
        &Device::Cpu,
    )
    .unwrap();
    for (chunk, keep) in [
        (1, false),
        (4, false),
        (5, false),
        (64, false),
        (5, true),
        (64, true),
    ] {
        check(
            &format!("chunked head_nll, {chunk} rows a chunk, logits kept: {keep}"),
            &[&hidden, &w],
            || (chunked_head_nll(&hidden, &w, &ids, chunk, keep) * &mask).unwrap(),
            || {
                let logits = composed::linear(&hidden, &w, None).unwrap();
                (composed::next_token_nll(&logits, &ids).unwrap() * &mask).unwrap()
            },
        );
    }
}

#[test]
fn head_nll_rejects_out_of_vocabulary_targets_mismatched_widths_and_empty_rows() {
    let hidden = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 9, 2]], &Device::Cpu).unwrap();
    let w = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
    let err = ops::head_nll(&hidden, &w, &ids).unwrap_err().to_string();
    assert!(err.contains("outside a vocabulary"), "{err}");
    let narrow = Tensor::zeros((10, 3), DType::F32, &Device::Cpu).unwrap();
    let err = ops::head_nll(&hidden, &narrow, &ids)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hidden width 4 does not match head width 3"),
        "{err}"
    );
    let empty = Tensor::zeros((1, 0, 4), DType::F32, &Device::Cpu).unwrap();
    let none = Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap();
    let err = ops::head_nll(&empty, &w, &none).unwrap_err().to_string();
    assert!(err.contains("no positions"), "{err}");
}

/// An op of an input and a weight.
type Op = fn(&Tensor, &Tensor) -> Tensor;

/// `sum(out * probe)`'s gradient of `x`, and whether any gradient reached `w`, for an op of `x`
/// and a frozen (detached) copy of `w`.
fn frozen_grads(x: &Var, w: &Var, op: impl Fn(&Tensor, &Tensor) -> Tensor) -> (Tensor, bool) {
    let frozen = w.as_detached_tensor();
    let out = op(x.as_tensor(), &frozen);
    let probe = randn(out.dims(), 9);
    let grads = (out * probe.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let reached = grads.get(&frozen).is_some() || grads.get(w.as_tensor()).is_some();
    (grads.get(x.as_tensor()).unwrap().clone(), reached)
}

#[test]
fn a_frozen_weight_gets_no_gradient_and_the_input_the_composed_one() {
    let x = randn(&[2, 7, 16], 21);
    let cases: [(&str, Var, Op, Op); 3] = [
        (
            "linear",
            randn(&[8, 16], 22),
            |x, w| ops::linear(x, w, None).unwrap(),
            |x, w| composed::linear(x, w, None).unwrap(),
        ),
        (
            "rms_norm",
            randn(&[16], 23),
            |x, w| ops::rms_norm(x, w, 1e-5).unwrap(),
            |x, w| composed::rms_norm(x, w, 1e-5).unwrap(),
        ),
        (
            "head_nll",
            randn(&[11, 16], 24),
            |x, w| ops::head_nll(x, w, &head_ids()).unwrap(),
            |x, w| {
                composed::next_token_nll(&composed::linear(x, w, None).unwrap(), &head_ids())
                    .unwrap()
            },
        ),
    ];
    for (name, w, fused, reference) in cases {
        let (fused_dx, reached) = frozen_grads(&x, &w, fused);
        let (composed_dx, _) = frozen_grads(&x, &w, reference);
        assert!(!reached, "{name}: the frozen weight got a gradient");
        assert!(
            max_diff(&fused_dx, &composed_dx) < 1e-5,
            "{name}: input gradient differs by {}",
            max_diff(&fused_dx, &composed_dx)
        );
    }
}

#[test]
fn squared_sum_matches_the_sum_of_squares_in_f64() {
    // Long enough to run in parallel blocks, with a tail shorter than a lane group; and a
    // transposed view, which takes the composed path.
    for t in [
        randn(&[70_001], 21).as_tensor().clone(),
        randn(&[37, 29], 22).as_tensor().t().unwrap(),
    ] {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let got = ops::squared_sum(&t).unwrap();
        assert!(
            ((got - want) / want).abs() < 1e-6,
            "{got} against {want} for {:?}",
            t.dims()
        );
    }
}
