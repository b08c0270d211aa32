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

/// Serving reads the default model's few-row products from the quantized blocks it was loaded
/// from: the same logits bit for bit and the same greedy text as from the f32 weights, and a
/// group that learning changes reads its f32 weights again.
#[test]
fn default_model_serves_from_its_quantized_blocks_exactly() {
    use std::sync::Arc;

    use locus::infer::{generate, Sampling};
    use locus::model::{GroupId, Module};
    use locus::snapshot::Snapshot;

    let path = load::default::ensure().unwrap();
    let model = Arc::new(load::gguf::load(&path, &Device::Cpu).unwrap());
    // Every projection (7 a layer) and the tied embedding are Q4_1 or Q8_0 in the file.
    assert_eq!(model.blocks.len(), 30 * 7 + 1);
    let mut plain = load::gguf::load(&path, &Device::Cpu).unwrap();
    plain.blocks.clear();
    let (blocks, plain) = (
        Snapshot::load(Arc::clone(&model), 0).unwrap(),
        Snapshot::load(Arc::new(plain), 0).unwrap(),
    );
    assert_eq!(blocks.quantized_weights(), 211);
    assert_eq!(plain.quantized_weights(), 0);
    let prompt = model
        .tokenizer
        .encode("The history of the city began")
        .unwrap();
    let ids = Tensor::new(prompt.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let bits = |s: &Snapshot| -> Vec<u32> {
        // A decoded token is one row: the few-row products.
        let mut cache = locus::model::cache::KvCache::new(30);
        let arch = &s.model().arch;
        arch.forward_cached(s.params(), &ids, &mut cache).unwrap();
        let next = Tensor::new(&[[260u32]], &Device::Cpu).unwrap();
        let logits = arch.forward_cached(s.params(), &next, &mut cache).unwrap();
        let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    assert!(bits(&blocks) == bits(&plain), "one token's logits differ");
    let sampling = Sampling {
        max_tokens: 24,
        temperature: 0.0,
        top_p: 1.0,
        stop: vec![],
        seed: 0,
    };
    let text = |s: &Snapshot| {
        generate(s, &prompt.ids, &sampling, |_, _| true)
            .unwrap()
            .tokens
    };
    assert_eq!(text(&blocks), text(&plain));

    // An update that changes layer 3's MLP: its new weights are read, not the stale blocks.
    let group = GroupId {
        layer: 3,
        module: Module::Mlp,
    };
    let changed = |s: &Snapshot| {
        let var = &s.model().vars["model.layers.3.mlp.up_proj.weight"];
        var.set(&(var.as_tensor() * 1.01).unwrap()).unwrap();
        s.after_update(1, &[group], &s.model().params(|_| false))
            .unwrap()
    };
    let (blocks, plain) = (changed(&blocks), changed(&plain));
    // Gate, up and down of layer 3 read their new f32 weights.
    assert_eq!(blocks.quantized_weights(), 211 - 3);
    assert!(
        bits(&blocks) == bits(&plain),
        "logits after an update differ"
    );
}
