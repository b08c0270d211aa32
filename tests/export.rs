//! `locus export --hf`: every fixture and the default model written as a Hugging Face directory
//! and loaded back give the same logits, token ids and configuration; dtypes, the Mistral
//! sliding window, replacing a target, and the command line with a data directory's checkpoints.
//! `write_exports_for_transformers` feeds scripts/reference/check_export.py, which loads the
//! same exports with transformers.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{expected, fails, fixture, locus, ok, TINY};
use locus::export::write_hf;
use locus::model::{load, Model};
use locus::store::checkpoint::{self, Checkpoints, Meta};
use serde_json::{json, Value};
use tempfile::TempDir;

fn load_path(path: &Path) -> Model {
    load::load(path.to_str().unwrap(), &Device::Cpu).unwrap()
}

fn logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = model.arch.forward(&model.params(|_| false), &t).unwrap();
    out.squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// The fixture's reference texts.
fn texts(name: &str) -> Vec<String> {
    expected(fixture(name).join("expected.json"))
        .texts
        .into_iter()
        .map(|t| t.text)
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Names in a directory, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

const FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// Asserts `back` (the export loaded again) computes what `model` does on `texts`: identical token
/// ids and decoding, logits within `tol`, the same configuration and special tokens.
fn assert_same_model(what: &str, model: &Model, back: &Model, texts: &[String], tol: f32) {
    assert_eq!(back.arch.name(), model.arch.name(), "{what}");
    assert_eq!(back.arch.describe(), model.arch.describe(), "{what} config");
    assert_eq!(
        back.tokenizer.info(),
        model.tokenizer.info(),
        "{what} tokens"
    );
    assert_eq!(
        back.vars.keys().collect::<Vec<_>>(),
        model.vars.keys().collect::<Vec<_>>(),
        "{what} parameter names"
    );
    for text in texts {
        let ids = model.tokenizer.encode(text).unwrap().ids;
        let again = back.tokenizer.encode(text).unwrap();
        assert_eq!(again.ids, ids, "{what}: token ids of {text:?}");
        assert_eq!(back.tokenizer.decode(&ids).unwrap(), *text, "{what}");
        let worst = max_diff(&logits(back, &ids), &logits(model, &ids));
        assert!(
            worst <= tol,
            "{what}: logits max abs diff {worst} on {text:?}"
        );
    }
}

/// Keys the exported `config.json` must carry with the original's value, per model type.
fn preserved_keys(model_type: &str) -> &'static [&'static str] {
    match model_type {
        "gpt2" => &[
            "model_type",
            "architectures",
            "n_embd",
            "n_inner",
            "n_layer",
            "n_head",
            "n_positions",
            "vocab_size",
            "layer_norm_epsilon",
            "activation_function",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
        ],
        "gpt_neo" => &[
            "model_type",
            "architectures",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "max_position_embeddings",
            "vocab_size",
            "layer_norm_epsilon",
            "activation_function",
            "attention_types",
            "window_size",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
        ],
        _ => &[
            "model_type",
            "architectures",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "hidden_act",
            "rms_norm_eps",
            "rope_parameters",
            "max_position_embeddings",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "bos_token_id",
            "eos_token_id",
        ],
    }
}

/// Every key of the exported `config.json` that the original has carries the same value (but the
/// dtype, which is the export's), and the keys that define the model are all there.
fn assert_config_preserved(name: &str, original: &Value, exported: &Value) {
    let model_type = original["model_type"].as_str().unwrap();
    for key in preserved_keys(model_type) {
        assert_eq!(
            exported.get(*key),
            original.get(*key),
            "{name} config.json `{key}`"
        );
    }
    for (key, v) in exported.as_object().unwrap() {
        if let Some(o) = original.get(key).filter(|_| key != "dtype") {
            assert_eq!(v, o, "{name} config.json `{key}`");
        }
    }
}

#[test]
fn every_fixture_round_trips_through_an_f32_export() {
    for name in TINY {
        let model = load_path(&fixture(name));
        let tmp = TempDir::new().unwrap();
        let out = tmp.path().join("out");
        let exported = write_hf(&model, &out, DType::F32, false).unwrap();
        assert_eq!(exported.tensors, model.vars.len(), "{name}");
        let mut names: Vec<&str> = exported.files.iter().map(|f| f.name).collect();
        names.sort();
        assert_eq!(names, FILES, "{name}");
        for f in &exported.files {
            assert_eq!(
                fs::metadata(out.join(f.name)).unwrap().len(),
                f.bytes,
                "{name} {}",
                f.name
            );
        }
        assert_eq!(entries(tmp.path()), ["out"], "{name}: nothing left beside");

        let back = load_path(&out);
        assert_eq!(back.source.stored_dtype, "f32", "{name}");
        assert_same_model(name, &model, &back, &texts(name), 1e-5);
        // The fixture's own reference ids, computed by transformers from the original tokenizer.
        let e = expected(fixture(name).join("expected.json"));
        for (t, ids) in e.texts.iter().zip(&e.token_ids) {
            assert_eq!(&back.tokenizer.encode(&t.text).unwrap().ids, ids, "{name}");
        }
        let original = read_json(&fixture(name).join("config.json"));
        let config = read_json(&out.join("config.json"));
        assert_config_preserved(name, &original, &config);
        assert_eq!(config["dtype"], "float32", "{name}");
        assert_eq!(
            read_json(&out.join("generation_config.json")),
            json!({"bos_token_id": 0, "eos_token_id": 0}),
            "{name}"
        );
        let tok_cfg = read_json(&out.join("tokenizer_config.json"));
        assert_eq!(tok_cfg["eos_token"], "<|endoftext|>", "{name}");
        assert_eq!(tok_cfg["tokenizer_class"], "PreTrainedTokenizerFast");
        let header = read_json_header(&out.join("model.safetensors"));
        assert_eq!(header["__metadata__"]["format"], "pt", "{name}");
    }
}

/// The JSON header of a safetensors file.
fn read_json_header(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[test]
fn half_precision_exports_store_the_requested_dtype() {
    // Weights that were stored in that dtype come back bit for bit.
    for (name, dtype, stored, hf) in [
        ("llama_untied_bf16", DType::BF16, "bf16", "bfloat16"),
        ("gpt2_f16", DType::F16, "f16", "float16"),
    ] {
        let model = load_path(&fixture(name));
        let tmp = TempDir::new().unwrap();
        let out = tmp.path().join("out");
        write_hf(&model, &out, dtype, false).unwrap();
        let back = load_path(&out);
        assert_eq!(back.source.stored_dtype, stored, "{name}");
        assert_eq!(read_json(&out.join("config.json"))["dtype"], hf, "{name}");
        assert_same_model(name, &model, &back, &texts(name), 0.0);
    }
    // f32 weights are rounded: close, not equal, and half the bytes.
    let model = load_path(&fixture("llama"));
    let tmp = TempDir::new().unwrap();
    let (full, half) = (tmp.path().join("f32"), tmp.path().join("f16"));
    let full_bytes = write_hf(&model, &full, DType::F32, false).unwrap().files[1].bytes;
    let half_bytes = write_hf(&model, &half, DType::F16, false).unwrap().files[1].bytes;
    assert!(
        half_bytes < full_bytes * 6 / 10,
        "{half_bytes} vs {full_bytes}"
    );
    let back = load_path(&half);
    assert_eq!(back.source.stored_dtype, "f16");
    let ids = model.tokenizer.encode(&texts("llama")[0]).unwrap().ids;
    let worst = max_diff(&logits(&back, &ids), &logits(&model, &ids));
    assert!(
        worst > 0.0 && worst < 1e-2,
        "f16 rounding moved logits by {worst}"
    );

    match write_hf(&model, &tmp.path().join("u8"), DType::U8, false) {
        Err(locus::Error::Invalid(m)) => assert!(m.contains("U8"), "{m}"),
        _ => panic!("an integer export dtype was accepted"),
    }
}

/// A copy of a fixture with its `config.json` edited.
fn edited_fixture(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> TempDir {
    let tmp = TempDir::new().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        fs::copy(fixture(name).join(f), tmp.path().join(f)).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut cfg = read_json(&path);
    edit(cfg.as_object_mut().unwrap());
    fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    tmp
}

#[test]
fn a_sliding_window_is_exported_as_mistral() {
    let src = edited_fixture("llama_untied_bf16", |c| {
        c.insert("model_type".into(), "mistral".into());
        c.insert("architectures".into(), json!(["MistralForCausalLM"]));
        c.insert("sliding_window".into(), 4.into());
    });
    let model = load_path(src.path());
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("out");
    write_hf(&model, &out, DType::F32, false).unwrap();
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["model_type"], "mistral");
    assert_eq!(config["architectures"], json!(["MistralForCausalLM"]));
    assert_eq!(config["sliding_window"], 4);
    assert!(config.get("attention_bias").is_none());
    let back = load_path(&out);
    assert_same_model("mistral", &model, &back, &texts("llama_untied_bf16"), 1e-5);
    // The window is in force: without it the same weights give other logits.
    let plain = load_path(&fixture("llama_untied_bf16"));
    let ids = model
        .tokenizer
        .encode(&texts("llama_untied_bf16")[0])
        .unwrap()
        .ids;
    assert!(max_diff(&logits(&back, &ids), &logits(&plain, &ids)) > 1e-3);

    // transformers' Mistral has no biases, and its Llama ignores the window: refused, not guessed.
    let biased = edited_fixture("llama", |c| {
        c.insert("sliding_window".into(), 4.into());
    });
    let model = load_path(biased.path());
    let target = tmp.path().join("biased");
    match write_hf(&model, &target, DType::F32, false) {
        Err(locus::Error::Invalid(m)) => assert!(m.contains("sliding"), "{m}"),
        _ => panic!("a biased model with a sliding window was exported"),
    }
    assert_eq!(
        entries(tmp.path()),
        ["out"],
        "the refused export left nothing"
    );
}

#[test]
fn an_occupied_target_is_replaced_only_when_asked() {
    let model = load_path(&fixture("gpt2"));
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    match write_hf(&model, &out, DType::F32, false) {
        Err(locus::Error::Invalid(m)) => assert!(m.contains("not empty"), "{m}"),
        _ => panic!("a non-empty directory was overwritten"),
    }
    assert_eq!(entries(&out), ["keep.txt"]);

    write_hf(&model, &out, DType::F32, true).unwrap();
    assert_eq!(entries(&out), FILES, "the old contents are gone");

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    write_hf(&model, &empty, DType::F32, false).unwrap();
    assert_eq!(entries(&empty), FILES);

    let file = tmp.path().join("file");
    fs::write(&file, "x").unwrap();
    assert!(matches!(
        write_hf(&model, &file, DType::F32, true),
        Err(locus::Error::Invalid(_))
    ));
    assert!(matches!(
        write_hf(&model, &file.join("out"), DType::F32, false),
        Err(locus::Error::Io { .. })
    ));
    assert_eq!(
        entries(tmp.path()),
        ["empty", "file", "out"],
        "no temporaries"
    );
}

#[test]
fn the_default_model_round_trips_with_identical_logits_and_tokens() {
    let path = load::default::ensure().unwrap();
    let model = load::gguf::load(&path, &Device::Cpu).unwrap();
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("smollm2");
    write_hf(&model, &out, DType::F32, false).unwrap();
    let back = load::hf::load(&out, &Device::Cpu).unwrap();

    let info = back.tokenizer.info();
    assert_eq!(
        (info.bos, info.eos.as_slice(), info.pad),
        (Some(1), &[2][..], Some(2))
    );
    assert!(info
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));
    let config = read_json(&out.join("config.json"));
    for (key, want) in [
        ("model_type", json!("llama")),
        ("num_hidden_layers", json!(30)),
        ("num_attention_heads", json!(9)),
        ("num_key_value_heads", json!(3)),
        ("rope_theta", json!(100000.0)),
        ("max_position_embeddings", json!(8192)),
        ("tie_word_embeddings", json!(true)),
        ("vocab_size", json!(49152)),
    ] {
        assert_eq!(config[key], want, "config.json `{key}`");
    }
    let mut texts: Vec<String> = expected(fixture("smollm2_reference.json"))
        .texts
        .into_iter()
        .map(|t| t.text)
        .collect();
    texts.extend(
        [
            "<|im_start|>user\nHi 12345<|im_end|>",
            "naïve café 東京 🙂  two  spaces",
        ]
        .map(String::from),
    );
    assert_same_model("SmolLM2", &model, &back, &texts, 1e-5);
}

// The command line.

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A checkpoint of `version` for `model` in which layer 1's MLP weights are the base plus one.
fn write_checkpoint(data: &Path, model: &Model, version: u64) -> BTreeMap<String, Tensor> {
    let tensors: BTreeMap<String, Tensor> = model
        .vars
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.1.mlp."))
        .map(|(n, v)| (n.clone(), (v.as_tensor() + 1.0).unwrap()))
        .collect();
    let meta = Meta {
        format: checkpoint::FORMAT,
        version,
        parent: None,
        base_hash: locus::store::model_hash(model).unwrap(),
        strategy: "full".into(),
        selection: vec!["1.mlp".into()],
        groups: vec!["1.mlp".into()],
        journal_seq: version,
        created_unix: 0,
        learner: None,
        step: None,
        recent: Vec::new(),
    };
    Checkpoints::open(data.join("checkpoints"))
        .unwrap()
        .write(&meta, &tensors)
        .unwrap();
    tensors
}

/// Every file under `dir` with its contents, to show that an export changed nothing there.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(tree(&path));
        } else {
            out.insert(path.clone(), fs::read(&path).unwrap());
        }
    }
    out
}

#[test]
fn cli_exports_a_model_and_refuses_to_overwrite_without_force() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("out");
    let model = fixture("gpt_neo");
    let r = ok(&["export", "--model", s(&model), "--hf", s(&out)]);
    for needle in [
        "version 0",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "total",
    ] {
        assert!(r.stdout.contains(needle), "{needle}:\n{}", r.stdout);
    }
    let back = load_path(&out);
    assert_same_model(
        "gpt_neo",
        &load_path(&model),
        &back,
        &texts("gpt_neo"),
        1e-5,
    );

    fs::write(out.join("notes.txt"), "keep").unwrap();
    fails(
        &["export", "--model", s(&model), "--hf", s(&out)],
        &[s(&out), "not empty", "--force"],
    );
    assert!(out.join("notes.txt").exists());
    ok(&[
        "export",
        "--model",
        s(&model),
        "--hf",
        s(&out),
        "--force",
        "--dtype",
        "bf16",
    ]);
    assert!(!out.join("notes.txt").exists());
    assert_eq!(load_path(&out).source.stored_dtype, "bf16");

    fails(
        &[
            "export",
            "--model",
            "/no/such/model",
            "--hf",
            s(&tmp.path().join("x")),
        ],
        &["/no/such/model"],
    );
    let file = tmp.path().join("file");
    fs::write(&file, "x").unwrap();
    let under_file = file.join("out");
    fails(
        &["export", "--model", s(&model), "--hf", s(&under_file)],
        &[s(&under_file)],
    );
    fails(
        &[
            "export",
            "--model",
            s(&model),
            "--data-dir",
            s(&tmp.path().join("nodata")),
            "--hf",
            s(&tmp.path().join("y")),
        ],
        &["--data-dir", "nodata"],
    );
}

#[test]
fn cli_applies_the_newest_good_checkpoint_without_touching_the_data_directory() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let model = load_path(&fixture("llama"));
    let changed = write_checkpoint(&data, &model, 3);
    let ckdir = data.join("checkpoints");
    // A newer checkpoint that fails verification, and a server's checkpoint being written.
    fs::write(ckdir.join(format!("{:020}.ckpt", 5)), b"LOCUSCK1 damaged").unwrap();
    fs::write(ckdir.join(format!("{:020}.tmp", 6)), b"half written").unwrap();
    fs::write(data.join("journal.log"), b"").unwrap();
    let before = tree(&data);

    let out = tmp.path().join("out");
    let r = ok(&[
        "export",
        "--model",
        s(&fixture("llama")),
        "--data-dir",
        s(&data),
        "--hf",
        s(&out),
    ]);
    assert_eq!(tree(&data), before, "the data directory is unchanged");
    for needle in [
        "version 3",
        "1 groups restored: 1.mlp",
        "1 newer checkpoints failed",
    ] {
        assert!(r.stdout.contains(needle), "{needle}:\n{}", r.stdout);
    }
    for needle in [
        "00000000000000000005.ckpt",
        "journal records after",
        "Admin.Checkpoint",
    ] {
        assert!(r.stderr.contains(needle), "{needle}:\n{}", r.stderr);
    }

    let back = load_path(&out);
    for (name, var) in &back.vars {
        let want = match changed.get(name) {
            Some(t) => values(t),
            None => values(model.vars[name].as_tensor()),
        };
        assert_eq!(values(var.as_tensor()), want, "{name}");
    }
    // The export computes what the base model with the checkpoint applied computes.
    for (name, t) in &changed {
        model.vars[name].set(t).unwrap();
    }
    assert_same_model("checkpointed", &model, &back, &texts("llama"), 1e-5);
}

#[test]
fn cli_refuses_checkpoints_of_another_model_or_none_that_verify() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    write_checkpoint(&data, &load_path(&fixture("llama")), 2);
    let out = tmp.path().join("out");
    let args = |model: &str| {
        vec![
            "export".to_string(),
            "--model".into(),
            s(&fixture(model)).into(),
            "--data-dir".into(),
            s(&data).into(),
            "--hf".into(),
            s(&out).into(),
        ]
    };
    let gpt2 = args("gpt2");
    let gpt2: Vec<&str> = gpt2.iter().map(String::as_str).collect();
    fails(
        &gpt2,
        &["hash", "--model", "--data-dir", "00000000000000000002.ckpt"],
    );
    assert!(!out.exists());

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    fails(
        &[
            "export",
            "--model",
            s(&fixture("llama")),
            "--data-dir",
            s(&empty),
            "--hf",
            s(&out),
        ],
        &["no checkpoints", "--data-dir"],
    );

    // Only a damaged checkpoint: warned about, then refused.
    let damaged = data.join("checkpoints").join(format!("{:020}.ckpt", 2));
    let mut bytes = fs::read(&damaged).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&damaged, &bytes).unwrap();
    let llama = args("llama");
    let llama: Vec<&str> = llama.iter().map(String::as_str).collect();
    let r = locus(&llama);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let last = r.stderr.lines().last().unwrap();
    assert!(
        last.starts_with("locus: error: ") && last.contains("none of its 1 checkpoints verifies"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("checksum mismatch"), "{}", r.stderr);
    assert!(damaged.exists(), "a damaged checkpoint is left where it is");
    assert!(!out.exists());
}

/// Where transformers finds the model an export was made from, unless it is a temporary copy.
fn model_source(src: &Path) -> Value {
    if !src.starts_with(env!("CARGO_MANIFEST_DIR")) && src.extension().is_none_or(|e| e != "gguf") {
        return Value::Null;
    }
    json!({"path": src, "format": if src.is_dir() { "hf" } else { "gguf" }})
}

/// Writes exports and locus's logits for scripts/reference/check_export.py into
/// `$LOCUS_EXPORT_CHECK_DIR`: every fixture, f16 and bf16 exports, a Mistral sliding window and
/// the default model.
#[test]
#[ignore = "feeds scripts/reference/check_export.py; set LOCUS_EXPORT_CHECK_DIR"]
fn write_exports_for_transformers() {
    let Some(root) = std::env::var_os("LOCUS_EXPORT_CHECK_DIR").map(PathBuf::from) else {
        eprintln!("LOCUS_EXPORT_CHECK_DIR is not set; nothing written");
        return;
    };
    fs::create_dir_all(&root).unwrap();
    let mistral = edited_fixture("llama_untied_bf16", |c| {
        c.insert("model_type".into(), "mistral".into());
        c.insert("sliding_window".into(), 4.into());
    });
    let default_texts: Vec<String> = expected(fixture("smollm2_reference.json"))
        .texts
        .into_iter()
        .map(|t| t.text)
        .chain(["<|im_start|>user\nHi 12345<|im_end|>".to_string()])
        .collect();
    let mut cases: Vec<(String, PathBuf, DType, Vec<String>)> = TINY
        .iter()
        .map(|n| (n.to_string(), fixture(n), DType::F32, texts(n)))
        .collect();
    cases.push((
        "llama_as_f16".into(),
        fixture("llama"),
        DType::F16,
        texts("llama"),
    ));
    cases.push((
        "llama_untied_as_bf16".into(),
        fixture("llama_untied_bf16"),
        DType::BF16,
        texts("llama_untied_bf16"),
    ));
    cases.push((
        "mistral_window".into(),
        mistral.path().to_path_buf(),
        DType::F32,
        texts("llama_untied_bf16"),
    ));
    let default = load::default::ensure().unwrap();
    cases.push(("default".into(), default, DType::F32, default_texts));

    for (name, src, dtype, texts) in cases {
        let model = load_path(&src);
        let out = root.join(&name);
        write_hf(&model, &out, dtype, true).unwrap();
        // Rounded weights are compared as they were written; f32 against the model itself.
        let (from, reference) = if dtype == DType::F32 {
            ("exported model", model)
        } else {
            ("export loaded back", load_path(&out))
        };
        let texts: Vec<Value> = texts
            .iter()
            .map(|t| {
                let ids = reference.tokenizer.encode(t).unwrap().ids;
                json!({"text": t, "logits": logits(&reference, &ids), "ids": ids})
            })
            .collect();
        let dtype = format!("{dtype:?}").to_lowercase();
        let doc = json!({
            "name": name,
            "dtype": dtype,
            "logits_from": from,
            "source": model_source(&src),
            "texts": texts,
        });
        fs::write(root.join(format!("{name}.json")), doc.to_string()).unwrap();
        eprintln!("wrote {}", out.display());
    }
}
