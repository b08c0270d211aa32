//! The real default model (SmolLM2-135M-Instruct GGUF, fetched through pip as users get it) against
//! transformers' GGUF loader computing in float64: token ids identical, losses and every group norm
//! within 1e-3. f32 implementations scatter about 5e-4 around the float64 values on the most
//! sensitive norm (layer 0's attention), PyTorch's own f32 run included (scripts/reference/
//! default_model.py).
//! `LOCUS_DEVICE=cuda:0` checks the GPU path against the same fixture (a `--features cuda` build).

mod common;

use candle_core::{Device, Tensor};
use common::{assert_trace_matches, expected, fixture, span_texts};
use locus::model::{device, load};
use locus::trace::{prepare, trace};

#[test]
fn default_model_matches_transformers_gguf() {
    let e = expected(fixture("smollm2_reference.json"));
    let path = load::default::ensure().unwrap();
    let model = load::gguf::load(&path, &device::from_env().unwrap()).unwrap();
    assert_eq!(model.arch.num_layers(), 30);
    let texts = span_texts(&e);
    let prepared = prepare(&model, "reference", &texts).unwrap();
    for (i, p) in prepared.iter().enumerate() {
        assert_eq!(p.ids, e.token_ids[i], "token ids of text {i}");
    }
    assert_eq!(e.groups.len(), 60);
    assert_trace_matches(
        "SmolLM2",
        &trace(&model, &prepared).unwrap(),
        &e,
        1e-3,
        1e-3,
    );
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
