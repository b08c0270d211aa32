//! `locus trace` refusing bad models (Hugging Face directories and GGUF files), and `--device`
//! on every command that loads a model.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::{fails, fixture, ok};
use crate::{fixture_str, good_input, path_str, trace_args, trace_json, without_seconds};

/// `locus trace` with `model` must fail naming `needles`.
fn bad_model(model: &Path, needles: &[&str]) -> String {
    let dir = TempDir::new().unwrap();
    let input = good_input(dir.path());
    fails(&trace_args(path_str(model), &input, &[]), needles)
}

/// A copy of a fixture directory in a fresh temp dir.
fn copy_fixture(name: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

/// Rewrites `config.json` of a model directory.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(&p, cfg.to_string()).unwrap();
}

#[test]
fn a_model_path_that_does_not_exist_is_refused() {
    let tmp = TempDir::new().unwrap();
    bad_model(
        &tmp.path().join("no-such-model"),
        &["no-such-model", "no such file or directory"],
    );
}

#[test]
fn a_directory_without_config_json_is_refused() {
    let tmp = TempDir::new().unwrap();
    bad_model(tmp.path(), &["not a usable model", "config.json"]);
}

#[test]
fn a_directory_without_weights_or_tokenizer_is_refused() {
    let (_tmp, dir) = copy_fixture("llama");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    bad_model(&dir, &["not a usable model", "safetensors"]);
    let (_tmp, dir) = copy_fixture("llama");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    bad_model(&dir, &["tokenizer.json"]);
}

#[test]
fn a_truncated_safetensors_file_is_refused() {
    let (_tmp, dir) = copy_fixture("llama");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    bad_model(&dir, &["model.safetensors", "corrupt or truncated"]);
}

#[test]
fn an_invalid_config_json_is_refused() {
    let (_tmp, dir) = copy_fixture("llama");
    std::fs::write(dir.join("config.json"), "{\"model_type\": ").unwrap();
    bad_model(&dir, &["config.json is not valid JSON"]);
}

#[test]
fn an_unsupported_model_type_is_refused() {
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), json!("bert"));
    });
    bad_model(&dir, &["model_type `bert` is not supported"]);
    edit_config(&dir, |c| {
        c.remove("model_type");
    });
    bad_model(&dir, &["missing `model_type`"]);
}

#[test]
fn a_config_with_zero_heads_is_refused() {
    for name in ["llama", "gpt2", "gpt_neo"] {
        let (_tmp, dir) = copy_fixture(name);
        let key = match name {
            "llama" => "num_attention_heads",
            "gpt2" => "n_head",
            _ => "num_heads",
        };
        edit_config(&dir, |c| {
            c.insert(key.into(), json!(0));
        });
        bad_model(&dir, &["not a usable model"]);
    }
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_refused() {
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |c| {
        c.insert("num_hidden_layers".into(), json!(3));
    });
    bad_model(&dir, &["missing weight model.layers.2."]);
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |c| {
        c.insert("vocab_size".into(), json!(100));
    });
    bad_model(
        &dir,
        &["model.embed_tokens.weight has shape [320, 32] but the configuration implies [100, 32]"],
    );
    let (_tmp, dir) = copy_fixture("llama");
    edit_config(&dir, |c| {
        c.insert("intermediate_size".into(), json!(48));
    });
    bad_model(
        &dir,
        &["mlp.gate_proj.weight has shape [64, 32] but the configuration implies [48, 32]"],
    );
}

#[test]
fn a_gguf_file_of_random_bytes_is_refused() {
    let tmp = TempDir::new().unwrap();
    let p = tmp.path().join("x.gguf");
    std::fs::write(&p, [0x3b, 0x9e, 0x07, 0xd1, 0x55, 0xc2, 0x18]).unwrap();
    bad_model(&p, &["x.gguf", "not a GGUF file"]);
    std::fs::write(&p, []).unwrap();
    bad_model(&p, &["x.gguf", "not a GGUF file"]);
}

#[test]
fn a_gguf_magic_followed_by_garbage_is_refused() {
    let tmp = TempDir::new().unwrap();
    let p = tmp.path().join("x.gguf");
    let garbage: Vec<u8> = (0u32..64).map(|i| (i * 97 + 13) as u8).collect();
    std::fs::write(&p, [b"GGUF".as_slice(), &garbage].concat()).unwrap();
    bad_model(&p, &["x.gguf", "not a GGUF file, or a corrupt one"]);
    // A valid version, then counts the file cannot hold.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&1000u64.to_le_bytes());
    bytes.extend_from_slice(&1000u64.to_le_bytes());
    bytes.extend_from_slice(&garbage);
    std::fs::write(&p, &bytes).unwrap();
    bad_model(&p, &["x.gguf", "not a GGUF file, or a corrupt one"]);
}

/// Writes a GGUF file with Llama metadata (one layer, `heads` heads) and a single embedding tensor.
fn write_gguf(path: &Path, arch: &str, heads: u32) {
    let meta = [
        ("general.architecture", GgufValue::String(arch.into())),
        ("llama.embedding_length", GgufValue::U32(32)),
        ("llama.attention.head_count", GgufValue::U32(heads)),
        ("llama.feed_forward_length", GgufValue::U32(64)),
        ("llama.block_count", GgufValue::U32(1)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
        ("llama.vocab_size", GgufValue::U32(320)),
    ];
    let meta: Vec<(&str, &GgufValue)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let embd = Tensor::ones((320, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let embd = QTensor::quantize(&embd, GgmlDType::F32).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &[("token_embd.weight", &embd)]).unwrap();
}

#[test]
fn a_truncated_gguf_file_is_refused() {
    let tmp = TempDir::new().unwrap();
    let p = tmp.path().join("model.gguf");
    write_gguf(&p, "llama", 4);
    let bytes = std::fs::read(&p).unwrap();
    // The header survives; the tensor data does not.
    std::fs::write(&p, &bytes[..bytes.len() - 20_000]).unwrap();
    bad_model(
        &p,
        &[
            "model.gguf",
            "tensor token_embd.weight",
            "truncated or corrupt",
        ],
    );
    // Cut inside the header.
    std::fs::write(&p, &bytes[..40]).unwrap();
    bad_model(&p, &["model.gguf", "not a GGUF file, or a corrupt one"]);
}

#[test]
fn a_gguf_file_with_bad_metadata_is_refused() {
    let tmp = TempDir::new().unwrap();
    let p = tmp.path().join("model.gguf");
    write_gguf(&p, "falcon", 4);
    bad_model(&p, &["GGUF architecture `falcon` is not supported"]);
    write_gguf(&p, "llama", 0);
    bad_model(
        &p,
        &["model.gguf", "not a usable model", "num_attention_heads 0"],
    );
    let mut f = std::fs::File::create(&p).unwrap();
    gguf_file::write(&mut f, &[], &[]).unwrap();
    drop(f);
    bad_model(&p, &["GGUF metadata lacks `general.architecture`"]);
}

// ---------------------------------------------------------------------------------------------
// --device

/// Every subcommand that loads a model, with the arguments it needs besides `--device`.
fn model_commands(dir: &Path) -> Vec<Vec<String>> {
    let model = fixture_str("llama");
    let out = dir.join("export").to_str().unwrap().to_string();
    let m = |cmd: &str, rest: &[&str]| {
        let mut v = vec![cmd.to_string(), "--model".to_string(), model.clone()];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    vec![
        m("trace", &[]),
        m("eval", &[]),
        m("demo", &[]),
        m("export", &["--hf", &out]),
        m("serve", &["--grpc-addr", "127.0.0.1:0"]),
    ]
}

#[test]
fn device_cpu_gives_the_default_trace() {
    let dir = TempDir::new().unwrap();
    let input = good_input(dir.path());
    let model = fixture_str("llama");
    let r = ok(&trace_args(&model, &input, &["--json", "--device", "cpu"]));
    assert!(r.stderr.contains(" on cpu in "), "{}", r.stderr);
    let on_cpu: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        without_seconds(on_cpu),
        without_seconds(trace_json(&model, &input))
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn device_cuda_without_the_feature_is_refused_before_loading() {
    let dir = TempDir::new().unwrap();
    for command in model_commands(dir.path()) {
        let mut args: Vec<&str> = command.iter().map(String::as_str).collect();
        args.extend(["--device", "cuda:0"]);
        let r = crate::common::locus(&args);
        assert!(
            !r.stderr.contains("locus: loaded "),
            "{args:?} loaded the model first:\n{}",
            r.stderr
        );
        fails(
            &args,
            &[
                "--device cuda:0",
                "built without the `cuda` feature",
                "--features cuda",
                "deploy/Dockerfile.cuda",
            ],
        );
    }
}

#[test]
fn an_unknown_device_is_refused_naming_the_flag() {
    let dir = TempDir::new().unwrap();
    for command in model_commands(dir.path()) {
        let mut args: Vec<&str> = command.iter().map(String::as_str).collect();
        args.extend(["--device", "tpu"]);
        fails(&args, &["--device tpu", "`cpu`", "`cuda:N`"]);
    }
    let model = fixture_str("llama");
    for bad in ["cuda", "cuda:", "cuda:x", "cuda:-1", "gpu:0", "CPU", ""] {
        fails(
            &["trace", "--model", &model, "--device", bad],
            &[&format!("--device {bad}:"), "`cpu`", "`cuda:N`"],
        );
    }
    // From the environment too.
    let out = Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(["trace", "--model", &model])
        .env("LOCUS_DEVICE", "tpu")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--device tpu:"), "{stderr}");
}
