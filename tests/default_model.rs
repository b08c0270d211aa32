//! The real default model (SmolLM2-135M-Instruct GGUF, fetched through pip as users get it) against
//! transformers' GGUF loader: token ids identical, losses and every group norm within 1e-3.

mod common;

use candle_core::{Device, Tensor};
use common::{expected, fixture, rel_err};
use locus::model::load;
use locus::spans::SpanText;
use locus::trace::{prepare, trace};

#[test]
fn default_model_matches_transformers_gguf() {
    let e = expected(fixture("smollm2_reference.json"));
    let path = load::default::ensure().unwrap();
    let model = load::gguf::load(&path, &Device::Cpu).unwrap();
    assert_eq!(model.arch.num_layers(), 30);
    let texts: Vec<SpanText> = e
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| SpanText {
            line: i + 1,
            text: t.text.clone(),
            spans: t.spans.clone(),
        })
        .collect();
    let prepared = prepare(&model, "reference", &texts).unwrap();
    for (i, p) in prepared.iter().enumerate() {
        assert_eq!(p.ids, e.token_ids[i], "token ids of text {i}");
    }
    let t = trace(&model, &prepared).unwrap();
    for (i, s) in t.per_text.iter().enumerate() {
        assert!(
            rel_err(s.span_loss, e.span_loss[i]) < 1e-3,
            "span loss {} vs {}",
            s.span_loss,
            e.span_loss[i]
        );
        assert!(
            rel_err(s.full_loss, e.full_loss[i]) < 1e-3,
            "full loss {} vs {}",
            s.full_loss,
            e.full_loss[i]
        );
    }
    assert_eq!(t.groups.len(), 60);
    for (g, want) in t.groups.iter().zip(&e.groups) {
        assert_eq!(
            (g.layer, g.module.to_string()),
            (want.layer, want.module.clone())
        );
        assert!(
            rel_err(g.span_norm, want.span_norm) < 1e-3,
            "{}.{} span {} vs {}",
            g.layer,
            g.module,
            g.span_norm,
            want.span_norm
        );
        assert!(
            rel_err(g.full_norm, want.full_norm) < 1e-3,
            "{}.{} full {} vs {}",
            g.layer,
            g.module,
            g.full_norm,
            want.full_norm
        );
    }
}

#[test]
fn default_model_tokenizer_handles_special_and_unusual_text() {
    let path = load::default::ensure().unwrap();
    let model = load::gguf::load(&path, &Device::Cpu).unwrap();
    let tok = &model.tokenizer;
    for text in [
        "<|im_start|>user\nHi 12345<|im_end|>",
        "naïve café 東京 🙂  two  spaces",
        "x",
    ] {
        let enc = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&enc.ids).unwrap(), text);
    }
    let special = tok.encode("<|im_start|>").unwrap();
    assert_eq!(special.ids.len(), 1, "chat control token is one token");
    let ids = Tensor::new(&[1u32, 2, 3], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.arch.forward(&model.params(|_| false), &ids).unwrap();
    assert_eq!(logits.dims(), &[1, 3, 49152]);
}
