//! The learning engine on tiny models: only selected groups change, frozen changes nothing, a
//! non-finite step changes nothing, seeds reproduce, TGL-ALR scales follow their definition,
//! `locus eval`'s path learns what the server learns.

mod common;
mod serving;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::fixture;
use locus::learn::strategy::Localization;
use locus::learn::{Doc, LearnConfig, Learner, Strategy};
use locus::live::Inline;
use locus::model::{load, GroupId, Model, ParamKind};
use locus::proto::v1 as pb;
use locus::spans::find_all;

fn tiny() -> Arc<Model> {
    Arc::new(load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap())
}

fn docs() -> Vec<Doc> {
    [
        "On 3 May 2021, Ada Lovelace opened a museum in London.",
        "The new museum director, Ada Lovelace, spoke on 4 May 2021.",
        "Visitors queued for hours to see the engines of Charles Babbage.",
    ]
    .iter()
    .map(|t| Doc {
        text: t.to_string(),
        spans: None,
    })
    .collect()
}

fn snapshot(m: &Model) -> BTreeMap<String, Vec<u32>> {
    m.vars
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

fn config(strategy: &str) -> LearnConfig {
    LearnConfig {
        strategy: Strategy::parse(strategy).unwrap(),
        lr: 1e-2,
        ..LearnConfig::default()
    }
}

fn changed(before: &BTreeMap<String, Vec<u32>>, m: &Model) -> Vec<String> {
    let after = snapshot(m);
    before
        .iter()
        .filter(|(n, v)| after[*n] != **v)
        .map(|(n, _)| n.clone())
        .collect()
}

#[test]
fn tgl_fp_changes_exactly_the_selected_groups() {
    let model = tiny();
    let before = snapshot(&model);
    let mut l = Learner::new(model.clone(), config("tgl-fp"), vec![], 0).unwrap();
    let r = l.step(&docs()).unwrap();
    assert!(r.applied && r.traced, "{r:?}");
    let selected: Vec<GroupId> = l.selection().unwrap().to_vec();
    assert!(!selected.is_empty() && selected.len() < model.groups().len());
    let reported: Vec<GroupId> = r.groups.iter().map(|g| g.id()).collect();
    assert_eq!(reported, selected);
    for name in model.vars.keys() {
        let in_selection =
            matches!(model.arch.kind_of(name), Some(ParamKind::Group(g)) if selected.contains(&g));
        let did_change = changed(&before, &model).contains(name);
        assert_eq!(
            did_change, in_selection,
            "{name}: changed {did_change}, selected {in_selection}"
        );
    }
    assert_eq!(r.version, 1);
    assert!(r.loss_after.unwrap() < r.loss_before, "{r:?}");
}

#[test]
fn frozen_changes_nothing() {
    let model = tiny();
    let before = snapshot(&model);
    let mut l = Learner::new(model.clone(), config("frozen"), vec![], 0).unwrap();
    let r = l.step(&docs()).unwrap();
    assert!(!r.applied);
    assert_eq!(r.version, 0);
    assert!(changed(&before, &model).is_empty());
}

#[test]
fn non_finite_loss_leaves_every_weight_bit_identical() {
    let model = tiny();
    let norm = &model.vars["model.norm.weight"];
    let mut poisoned = norm.to_vec1::<f32>().unwrap();
    poisoned[0] = f32::NAN;
    norm.set(&Tensor::new(poisoned, &Device::Cpu).unwrap())
        .unwrap();
    let before = snapshot(&model);
    let mut l = Learner::new(model.clone(), config("full"), vec![], 7).unwrap();
    let r = l.step(&docs()).unwrap();
    assert!(!r.applied, "{r:?}");
    assert!(r.skipped.as_deref().unwrap_or("").contains("non-finite"));
    assert_eq!(r.version, 7);
    assert!(changed(&before, &model).is_empty());
}

#[test]
fn the_same_seed_reproduces_the_same_weights() {
    let run = |seed| {
        let model = tiny();
        let cfg = LearnConfig {
            seed,
            ..config("mix-review+random-k")
        };
        let replay = vec![
            "Bread is baked from flour, water and yeast.".to_string(),
            "Rivers carry water to the sea.".into(),
            "Owls hunt at night.".into(),
        ];
        let mut l = Learner::new(model.clone(), cfg, replay, 0).unwrap();
        for _ in 0..2 {
            l.step(&docs()).unwrap();
        }
        snapshot(&model)
    };
    assert_eq!(run(3), run(3));
}

#[test]
fn alr_scales_are_relative_over_mean_relative() {
    let model = tiny();
    let cfg = LearnConfig {
        localization: Localization::Static,
        ..config("tgl-alr")
    };
    let mut l = Learner::new(model.clone(), cfg, vec![], 0).unwrap();
    let r = l.step(&docs()).unwrap();
    assert_eq!(r.groups.len(), model.groups().len());
    let mean = r.groups.iter().map(|g| g.relative.unwrap()).sum::<f64>() / r.groups.len() as f64;
    for g in &r.groups {
        assert!(
            (g.lr_scale - g.relative.unwrap() / mean).abs() < 1e-12,
            "{g:?}"
        );
    }
}

#[test]
fn per_batch_localization_traces_every_batch() {
    let model = tiny();
    let cfg = LearnConfig {
        localization: Localization::PerBatch {
            ema: 0.5,
            reselect_every: 1,
        },
        ..config("tgl-fp")
    };
    let mut l = Learner::new(model, cfg, vec![], 0).unwrap();
    for i in 0..3 {
        let r = l.step(&docs()).unwrap();
        assert!(r.traced && r.applied, "batch {i}: {r:?}");
        assert_eq!(r.version, i + 1);
    }
}

#[test]
fn lora_trains_adapters_on_the_selected_groups_only() {
    let model = tiny();
    let before = snapshot(&model);
    let mut l = Learner::new(model.clone(), config("lora+tgl-fp"), vec![], 0).unwrap();
    let first = l.step(&docs()).unwrap();
    let second = l.step(&docs()).unwrap();
    assert!(first.applied && second.applied, "{first:?} {second:?}");
    assert!(
        second.loss_before < first.loss_before,
        "adapters take effect in the forward pass"
    );
    assert!(
        changed(&before, &model).is_empty(),
        "base weights stay untouched until merged"
    );
    l.merge_adapters().unwrap();
    let selected = l.selection().unwrap().to_vec();
    for name in changed(&before, &model) {
        let g = match model.arch.kind_of(&name) {
            Some(ParamKind::Group(g)) => g,
            other => panic!("{name} ({other:?}) changed"),
        };
        assert!(
            selected.contains(&g) && name.ends_with(".weight"),
            "{name} changed"
        );
    }
    assert!(!changed(&before, &model).is_empty());
}

/// The bits of every weight as the learner serves it (adapters included).
fn served(l: &Learner) -> BTreeMap<String, Vec<u32>> {
    let params = l.current_params().unwrap();
    l.model()
        .vars
        .keys()
        .map(|n| (n.clone(), bits(params.get(n).unwrap())))
        .collect()
}

/// The bits of every optimizer moment, with its step count, by parameter.
fn moments(l: &Learner) -> BTreeMap<String, (i32, Vec<u32>)> {
    let state = l.export_state().unwrap();
    state
        .moments
        .into_iter()
        .map(|(n, m)| (n, (m.steps, bits(&m.state))))
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_reverted_update_leaves_weights_and_moments_as_before_it() {
    for strategy in ["full", "lora+tgl-fp"] {
        let mut l = Learner::new(tiny(), config(strategy), vec![], 0).unwrap();
        l.set_revertible(true);
        let d = docs();
        assert!(l.step(&d[..2]).unwrap().applied, "{strategy}");
        let (weights, state) = (served(&l), moments(&l));
        let second = l.step(&d[2..]).unwrap();
        assert!(second.applied && second.version == 2, "{second:?}");
        assert_ne!(served(&l), weights, "{strategy}");
        l.revert().unwrap();
        assert_eq!(l.version(), 1);
        assert_eq!(served(&l), weights, "{strategy}");
        assert_eq!(moments(&l), state, "{strategy}");
        assert!(l.revert().is_err(), "an update reverts once");
    }
    let mut l = Learner::new(tiny(), config("full"), vec![], 0).unwrap();
    assert!(l.step(&docs()).unwrap().applied);
    assert!(l.revert().is_err(), "nothing kept unless asked");
}

/// Three AdamW steps on a parameter of `start` values with gradients `grads[t]`, against
/// torch.optim.AdamW written out in f64.
fn check_adamw(start: &[f32], grads: &[Vec<f32>]) {
    use locus::learn::optimizer::AdamW;
    let (lr, b1, b2, eps, wd) = (0.1f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let n = start.len();
    let var = candle_core::Var::new(start, &Device::Cpu).unwrap();
    let mut opt = AdamW::new((b1, b2), eps, wd);
    let mut w: Vec<f64> = start.iter().map(|&x| f64::from(x)).collect();
    let (mut m, mut v) = (vec![0f64; n], vec![0f64; n]);
    for (t, g) in grads.iter().enumerate() {
        opt.update(
            "w",
            &var,
            &Tensor::new(g.as_slice(), &Device::Cpu).unwrap(),
            lr,
        )
        .unwrap();
        for i in 0..n {
            let gi = f64::from(g[i]);
            w[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let mh = m[i] / (1.0 - b1.powi(t as i32 + 1));
            let vh = v[i] / (1.0 - b2.powi(t as i32 + 1));
            w[i] -= lr * mh / (vh.sqrt() + eps);
        }
        let got = var.to_vec1::<f32>().unwrap();
        for i in 0..n {
            assert!(
                (f64::from(got[i]) - w[i]).abs() < 1e-5,
                "step {t} element {i} of {n}: {} vs {}",
                got[i],
                w[i]
            );
        }
    }
}

#[test]
fn adamw_follows_torch_adamw_step_for_step() {
    let grads = [[0.3f32, -0.1, 2.0], [0.2, 0.4, -1.0], [-0.5, 0.0, 0.25]];
    check_adamw(&[1.0, -2.0, 0.5], &grads.map(|g| g.to_vec()));
    // A parameter the optimizer's passes split into several pieces run on different threads.
    let n = 100_003;
    let wave = |seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 0.5)
            .collect()
    };
    check_adamw(&wave(0), &[wave(1), wave(2), wave(3)]);
}

fn recipe() -> LearnConfig {
    LearnConfig {
        rehearse: 2,
        span_weight: 1.0,
        measure_after: false,
        ..config("tgl-fp")
    }
}

#[test]
fn documents_come_back_at_spaced_later_steps() {
    let model = tiny();
    let mut l = Learner::new(model, recipe(), vec![], 0).unwrap();
    let d = docs();
    // Rehearsal at 1 and 3 steps after a document was first learned.
    let rehearsed: Vec<usize> = (0..5)
        .map(|i| l.step(&d[i % 3..i % 3 + 1]).unwrap().rehearsed)
        .collect();
    assert_eq!(rehearsed, [0, 1, 1, 2, 2]);
    let r = l.step(&d[..1]).unwrap();
    assert!(r.loss_after.is_none(), "not measured unless asked: {r:?}");
}

#[test]
fn rehearsal_state_survives_export_and_import() {
    let (a, b) = (tiny(), tiny());
    let mut first = Learner::new(a.clone(), recipe(), vec![], 0).unwrap();
    let d = docs();
    first.step(&d[..2]).unwrap();
    let state = first.export_state().unwrap();
    assert_eq!(state.rehearsal.len(), 2);
    // The second learner starts from the first one's weights and state.
    for (n, v) in &a.vars {
        b.vars[n].set(&v.as_detached_tensor()).unwrap();
    }
    let mut second = Learner::new(b.clone(), recipe(), vec![], 1).unwrap();
    second.import_state(state).unwrap();
    let (x, y) = (first.step(&d[2..]).unwrap(), second.step(&d[2..]).unwrap());
    assert_eq!((x.rehearsed, y.rehearsed), (2, 2));
    assert_eq!(snapshot(&a), snapshot(&b), "the same step on both");
}

#[test]
fn trending_counts_the_documents_before_the_step_and_resumes_with_them() {
    let raw = |text: &str| Doc {
        text: text.into(),
        spans: None,
    };
    let cfg = |window| LearnConfig {
        auto_spans: locus::spans::SpanRule::Trending,
        trending_window: window,
        measure_after: false,
        ..config("tgl-fp")
    };
    let earlier = raw("Quentin Varga spoke at noon. Quentin Varga left by train.");
    let later = raw("At noon Marta Lind met Quentin Varga in Oslo.");
    // Counted with the earlier document, Quentin Varga is the name the stream repeats.
    let (a, b) = (tiny(), tiny());
    let mut first = Learner::new(a.clone(), cfg(1), vec![], 0).unwrap();
    first.step(std::slice::from_ref(&earlier)).unwrap();
    let state = first.export_state().unwrap();
    assert_eq!(state.recent, [earlier.text.as_str()]);
    for (n, v) in &a.vars {
        b.vars[n].set(&v.as_detached_tensor()).unwrap();
    }
    let mut resumed = Learner::new(b.clone(), cfg(1), vec![], 1).unwrap();
    resumed.import_state(state).unwrap();
    let (x, y) = (
        first.step(std::slice::from_ref(&later)).unwrap(),
        resumed.step(std::slice::from_ref(&later)).unwrap(),
    );
    assert_eq!(x.spans, [["Quentin Varga"]]);
    assert_eq!(y.spans, x.spans);
    assert_eq!(snapshot(&a), snapshot(&b), "the same step on both");
    assert_eq!(first.export_state().unwrap().recent, [later.text.as_str()]);
    // Without the window every name of the later document is mentioned once: a tie that goes
    // to the name the document mentions first.
    let mut alone = Learner::new(tiny(), cfg(0), vec![], 0).unwrap();
    alone.step(std::slice::from_ref(&earlier)).unwrap();
    assert!(alone.export_state().unwrap().recent.is_empty());
    let z = alone.step(std::slice::from_ref(&later)).unwrap();
    assert_eq!(z.spans, [["Marta Lind"]]);
}

#[test]
fn a_span_on_the_first_token_alone_falls_back_to_the_automatic_rules() {
    let model = tiny();
    let mut l = Learner::new(model, config("tgl-fp"), vec![], 0).unwrap();
    let text = "Spain won UEFA Euro 2024, beating England 2 to 1 in the final in Berlin.";
    let r = l
        .step(&[Doc {
            text: text.into(),
            spans: Some(vec![(0, 1)]),
        }])
        .unwrap();
    assert!(r.applied && r.traced, "{r:?}");
    assert_eq!(r.span_fallbacks, 1);
    assert_eq!(r.span_rules, [locus::spans::SpanRule::Entity]);
}

#[test]
fn span_weight_changes_the_update() {
    let run = |w: f64| {
        let model = tiny();
        let cfg = LearnConfig {
            span_weight: w,
            ..config("full")
        };
        let mut l = Learner::new(model.clone(), cfg, vec![], 0).unwrap();
        l.step(&docs()).unwrap();
        snapshot(&model)
    };
    assert_eq!(run(0.0), run(0.0));
    assert_ne!(run(0.0), run(3.0));
}

#[test]
fn a_trace_without_span_gradients_measures_the_same_norms() {
    // Without a span weight the span backward keeps only the linear layers' norms; with one it
    // builds the gradients the update adds. The first step's norms come before any update.
    let relative = |w: f64| {
        let cfg = LearnConfig {
            span_weight: w,
            ..config("tgl-fp")
        };
        let mut l = Learner::new(tiny(), cfg, vec![], 0).unwrap();
        let r = l.step(&docs()).unwrap();
        assert!(r.traced, "{r:?}");
        r.groups
            .iter()
            .map(|g| g.relative.unwrap())
            .collect::<Vec<_>>()
    };
    let (norms_only, gradients) = (relative(0.0), relative(1.0));
    assert_eq!(norms_only.len(), gradients.len());
    for (a, b) in norms_only.iter().zip(&gradients) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} against {b}");
    }
}

#[test]
fn trending_weighs_down_the_names_it_passes_over() {
    use locus::learn::batch::{Kind, Row, RowRules};
    use locus::spans::{Mentions, SpanRule};
    let model = tiny();
    // Leo XIV and Francis are both mentioned twice: Leo XIV, named first, is the target and
    // Pope Francis is passed over like Rome, which the step mentions once.
    let docs = [
        "In 2025 Leo XIV succeeded Pope Francis in Rome.",
        "As Leo XIV he succeeded Francis.",
    ];
    let mentions = Mentions::of(docs);
    let row = |minor_weight: f32| {
        let rules = RowRules {
            max_tokens: 256,
            auto: SpanRule::Trending,
            mentions: &mentions,
            minor_weight,
        };
        let doc = Doc {
            text: docs[0].into(),
            spans: None,
        };
        Row::document(&model.tokenizer, &doc, &rules, Kind::Fresh, 0).unwrap()
    };
    assert!(row(1.0).weights.iter().all(|&w| w == 1.0));
    let enc = model.tokenizer.encode(docs[0]).unwrap();
    let minor: Vec<(usize, usize)> = ["Pope Francis", "Rome"]
        .iter()
        .flat_map(|n| find_all(docs[0], n))
        .collect();
    let expected: Vec<f32> = enc.offsets[1..]
        .iter()
        .map(|&(a, b)| match minor.iter().any(|&(s, e)| a < e && s < b) {
            true => 0.25,
            false => 1.0,
        })
        .collect();
    assert!(expected.contains(&0.25) && expected.contains(&1.0));
    let weighed = row(0.25);
    assert_eq!(weighed.weights, expected);
    assert_eq!(weighed.span_texts(&model.tokenizer).unwrap(), ["Leo XIV"]);
}

/// The tiny Llama's head width, query heads and key/value heads, from its configuration.
fn heads(model: &Model) -> (usize, usize, usize) {
    let c = model.arch.describe();
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    (n("head_dim"), n("heads"), n("kv_heads"))
}

/// Whether element `(row, col)` of `name` belongs to a selected unit, worked out from the unit
/// definitions independently of the library's masks.
fn owned_by_selected(model: &Model, name: &str, row: usize, col: usize, chosen: &[bool]) -> bool {
    let (d, h, kv) = heads(model);
    let proj = name.rsplit('.').nth(1).unwrap();
    let is_bias = name.ends_with(".bias");
    match proj {
        "q_proj" => chosen[row / d],
        "k_proj" | "v_proj" => {
            let rep = h / kv;
            chosen[row / d * rep..(row / d + 1) * rep].contains(&true)
        }
        "o_proj" => !is_bias && chosen[col / d],
        "gate_proj" | "up_proj" => chosen[row],
        "down_proj" => !is_bias && chosen[col],
        other => panic!("{name}: unexpected projection {other}"),
    }
}

/// Units chosen per group, elements changed and elements of the selected groups, checking that since
/// `before` only elements of the units `l` selects now changed.
type UnitChanges = (BTreeMap<GroupId, Vec<bool>>, usize, usize);

fn changed_within_units(before: &BTreeMap<String, Vec<u32>>, l: &Learner) -> UnitChanges {
    let model = l.model();
    let groups = l.selection().unwrap().to_vec();
    let norms = l.units().unwrap().norms().unwrap();
    let after = snapshot(model);
    let (mut chosen_by_group, mut changed, mut in_groups) = (BTreeMap::new(), 0, 0);
    for (name, old) in before {
        let new = &after[name];
        let group = match model.arch.kind_of(name) {
            Some(ParamKind::Group(g)) if groups.contains(&g) => g,
            _ => {
                assert_eq!(old, new, "{name} is outside the selected groups");
                continue;
            }
        };
        // Above the mean relative norm of the group's units.
        let rel: Vec<f64> = norms[&group]
            .iter()
            .map(|&(s, f)| if f > 0.0 { s / f } else { 0.0 })
            .collect();
        let mean = rel.iter().sum::<f64>() / rel.len() as f64;
        let chosen: Vec<bool> = rel.iter().map(|&r| r > mean).collect();
        let cols = model.vars[name].dims().get(1).copied().unwrap_or(1);
        in_groups += old.len();
        for (i, (o, n)) in old.iter().zip(new).enumerate() {
            let owned = owned_by_selected(model, name, i / cols, i % cols, &chosen);
            assert!(
                owned || o == n,
                "{name}[{i}] changed outside the selected units"
            );
            changed += usize::from(o != n);
        }
        chosen_by_group.insert(group, chosen);
    }
    (chosen_by_group, changed, in_groups)
}

#[test]
fn units_change_only_the_selected_heads_and_neurons() {
    let model = tiny();
    // Reselecting on every batch moves units out of the selection with momentum left over.
    let cfg = LearnConfig {
        localization: Localization::PerBatch {
            ema: 0.0,
            reselect_every: 1,
        },
        ..config("tgl-fp+units")
    };
    let mut l = Learner::new(model.clone(), cfg, vec![], 0).unwrap();
    let d = docs();
    let mut selections = Vec::new();
    for batch in [&d[..], &d[2..]] {
        let before = snapshot(&model);
        let r = l.step(batch).unwrap();
        let (selected, total) = r.units.unwrap();
        assert!(
            r.applied && r.traced && 0 < selected && selected < total,
            "{r:?}"
        );
        let (chosen, changed, in_groups) = changed_within_units(&before, &l);
        assert!(
            0 < changed && changed < in_groups / 2,
            "{changed} of {in_groups}"
        );
        selections.push(chosen);
    }
    assert_ne!(selections[0], selections[1]);
}

#[test]
fn unit_norms_are_the_norms_of_their_slices() {
    use locus::learn::units::UnitLayout;
    use locus::model::{ops, Module};
    let model = tiny();
    let params = model.params(|_| true);
    let ids = Tensor::new(&[[5u32, 17, 3, 44, 9, 120, 7, 61]], &Device::Cpu).unwrap();
    let logits = model.arch.forward(&params, &ids).unwrap();
    let loss = ops::next_token_nll(&logits, &ids)
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let got = UnitLayout::of(&model)
        .unwrap()
        .squared_norms(&model, &grads)
        .unwrap();
    let grad = |name: &str| {
        grads
            .get(model.vars[name].as_tensor())
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
    };
    let sq = |t: Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (d, h, _) = heads(&model);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-12);
    for layer in 0..model.arch.num_layers() {
        let at = |p: &str| format!("model.layers.{layer}.self_attn.{p}");
        let mlp = |p: &str| grad(&format!("model.layers.{layer}.mlp.{p}.weight"));
        let neurons = &got[&GroupId {
            layer,
            module: Module::Mlp,
        }];
        for (i, &n) in neurons.iter().enumerate() {
            let want = sq(mlp("gate_proj").get(i).unwrap())
                + sq(mlp("up_proj").get(i).unwrap())
                + sq(mlp("down_proj").narrow(1, i, 1).unwrap());
            assert!(close(n, want), "layer {layer} neuron {i}: {n} vs {want}");
        }
        let attn = &got[&GroupId {
            layer,
            module: Module::Attn,
        }];
        assert_eq!(attn.len(), h);
        // Shared key/value heads count towards no query head.
        for (head, &n) in attn.iter().enumerate() {
            let want = sq(grad(&at("q_proj.weight")).narrow(0, head * d, d).unwrap())
                + sq(grad(&at("q_proj.bias")).narrow(0, head * d, d).unwrap())
                + sq(grad(&at("o_proj.weight")).narrow(1, head * d, d).unwrap());
            assert!(close(n, want), "layer {layer} head {head}: {n} vs {want}");
        }
    }
}

#[test]
fn units_are_refused_for_an_architecture_without_them() {
    let gpt2 = Arc::new(load::load(fixture("gpt2").to_str().unwrap(), &Device::Cpu).unwrap());
    let err = Learner::new(gpt2, config("full+units"), vec![], 0)
        .err()
        .expect("gpt2 has no units")
        .to_string();
    assert!(err.contains("gpt2") && err.contains("units"), "{err}");
    let lora = Strategy::parse("lora+units").unwrap_err().to_string();
    assert!(lora.contains("lora+units"), "{lora}");
}

#[test]
fn unit_selection_survives_export_and_import() {
    let (a, b) = (tiny(), tiny());
    let mut first = Learner::new(a.clone(), config("tgl-fp+units"), vec![], 0).unwrap();
    let d = docs();
    first.step(&d[..2]).unwrap();
    let state = first.export_state().unwrap();
    assert!(state.unit_norms.is_some());
    for (n, v) in &a.vars {
        b.vars[n].set(&v.as_detached_tensor()).unwrap();
    }
    let mut second = Learner::new(b.clone(), config("tgl-fp+units"), vec![], 1).unwrap();
    second.import_state(state).unwrap();
    let (x, y) = (first.step(&d[2..]).unwrap(), second.step(&d[2..]).unwrap());
    assert!(!x.traced && !y.traced, "units measured once, then kept");
    assert_eq!(x.units, y.units);
    assert_eq!(snapshot(&a), snapshot(&b), "the same units on both");
}

/// The learner's document for an ingested one, as the server makes it from salient strings.
fn learned(d: &pb::Document) -> Doc {
    Doc {
        text: d.text.clone(),
        spans: (!d.salient.is_empty()).then(|| {
            d.salient
                .iter()
                .flat_map(|s| find_all(&d.text, s))
                .collect()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_learns_through_the_server_path_bit_for_bit() {
    let config = serving::config();
    let mut five = serving::facts();
    five.extend(serving::facts().into_iter().take(2));
    // The five-document batch takes two steps at batch size 4, on both paths.
    let batches = [serving::facts(), five, serving::facts()[1..].to_vec()];

    let server = serving::start().await;
    let mut client = server.client().await;
    let base = serving::score_bits(&mut client).await.1;
    let requests = batches
        .iter()
        .enumerate()
        .map(|(i, b)| serving::batch(&i.to_string(), b.clone()))
        .collect();
    let answers = serving::ingest(&mut client, requests).await.unwrap();
    let steps: usize = answers.iter().map(|a| a.steps.len()).sum();
    let (version, by_server) = serving::score_bits(&mut client).await;
    server.shutdown().await;
    assert_eq!((steps, version), (4, 4));
    assert_ne!(by_server, base, "learning changed the scores");

    let model = tiny();
    let mut engine = Inline::new(
        Arc::clone(&model),
        config.learn.clone(),
        config.replay.clone(),
        config.batch_size,
        |_| {},
    )
    .unwrap();
    for b in &batches {
        engine
            .learn(&b.iter().map(learned).collect::<Vec<_>>())
            .unwrap();
    }
    assert_eq!(engine.current().version(), 4);
    drop(engine);
    // Scored by a server of its own, so both sides go through the same Score code.
    let trained = Arc::try_unwrap(model).ok().expect("the engine is gone");
    let scorer = serving::start_with(config, false).await;
    scorer.state.install(trained).await.unwrap();
    let by_eval = serving::score_bits(&mut scorer.client().await).await.1;
    scorer.shutdown().await;
    assert_eq!(by_eval, by_server);
}
