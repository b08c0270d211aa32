//! Black-box tests of the `locus` binary: `locus trace` and `locus select` on the tiny fixtures,
//! their outputs (JSON, table, heatmaps), and how every kind of bad input or model is refused;
//! `--device`; and `locus client ingest` and `checkpoint` against a `locus serve` process.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{expected, fails, fails_with, fixture, locus, ok, rel_err, spawn_serving, TINY};
use serde_json::{json, Value};
use tempfile::TempDir;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn fixture_str(name: &str) -> String {
    fixture(name).to_str().unwrap().to_string()
}

/// Writes `lines` (already serialized) to `dir/name` and returns the path.
fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(&p, s).unwrap();
    p
}

/// A fixture's reference texts with their character spans.
fn ref_texts(name: &str) -> Vec<(String, Vec<(usize, usize)>)> {
    expected(fixture(name).join("expected.json"))
        .texts
        .into_iter()
        .map(|t| (t.text, t.spans))
        .collect()
}

fn substring(text: &str, (s, e): (usize, usize)) -> String {
    text.chars().skip(s).take(e - s).collect()
}

/// The texts as `{"text", "spans"}` lines.
fn spans_form(texts: &[(String, Vec<(usize, usize)>)]) -> Vec<String> {
    texts
        .iter()
        .map(|(text, spans)| json!({"text": text, "spans": spans}).to_string())
        .collect()
}

/// The same texts as `{"text", "salient"}` lines, each salient string occurring exactly once so that
/// both forms denote the same ranges.
fn salient_form(texts: &[(String, Vec<(usize, usize)>)]) -> Vec<String> {
    texts
        .iter()
        .map(|(text, spans)| {
            let salient: Vec<String> = spans.iter().map(|&r| substring(text, r)).collect();
            for s in &salient {
                assert_eq!(text.matches(s.as_str()).count(), 1, "{s:?} in {text:?}");
            }
            json!({"text": text, "salient": salient}).to_string()
        })
        .collect()
}

/// `locus trace --json` on `input` with `model`, parsed.
fn trace_json(model: &str, input: &Path) -> Value {
    let r = ok(&[
        "trace",
        "--model",
        model,
        "--input",
        path_str(input),
        "--json",
    ]);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of `locus trace --json` is not one JSON object: {e}\n{}",
            r.stdout
        )
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// `(layer, module)` of a group object.
fn gid(v: &Value) -> (u64, String) {
    (
        v["layer"].as_u64().expect("layer"),
        v["module"].as_str().expect("module").to_string(),
    )
}

fn mean_relative(groups: &[Value]) -> f64 {
    groups.iter().map(|g| f(&g["relative"])).sum::<f64>() / groups.len() as f64
}

/// Checks everything `locus trace --json` promises about its output, for `n_texts` texts.
fn check_trace_json(name: &str, out: &Value, n_texts: usize) {
    let keys: BTreeSet<&str> = out
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for k in ["model", "texts", "groups", "other", "per_text", "selection"] {
        assert!(keys.contains(k), "{name}: no `{k}` in {keys:?}");
    }
    assert_eq!(out["texts"].as_u64(), Some(n_texts as u64), "{name}: texts");
    let layers = out["model"]["layers"].as_u64().expect("model.layers") as usize;
    assert!(layers > 0);

    let groups = out["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2 * layers, "{name}: two groups per layer");
    for (i, g) in groups.iter().enumerate() {
        let want_module = if i % 2 == 0 { "attn" } else { "mlp" };
        assert_eq!(
            gid(g),
            ((i / 2) as u64, want_module.to_string()),
            "{name}: group {i} out of order"
        );
        let (s, fl, r) = (f(&g["span_norm"]), f(&g["full_norm"]), f(&g["relative"]));
        assert!(
            s.is_finite() && fl.is_finite() && r.is_finite(),
            "{name}: {g}"
        );
        assert!(s > 0.0 && fl > 0.0, "{name}: zero norm in {g}");
        assert!(
            rel_err(r, s / fl) < 1e-12,
            "{name}: relative {r} != span_norm / full_norm {}",
            s / fl
        );
    }

    for o in out["other"].as_array().expect("other") {
        assert!(o["name"].is_string());
        for k in ["span_norm", "full_norm", "relative"] {
            assert!(f(&o[k]).is_finite(), "{name}: other {o}");
        }
    }

    let per_text = out["per_text"].as_array().expect("per_text");
    assert_eq!(per_text.len(), n_texts, "{name}: per_text");
    for t in per_text {
        let tokens = t["tokens"].as_u64().unwrap();
        let targets = t["span_targets"].as_u64().unwrap();
        assert!(targets >= 1 && targets < tokens, "{name}: {t}");
        assert!(f(&t["span_loss"]).is_finite() && f(&t["full_loss"]).is_finite());
    }

    let sel = &out["selection"];
    let mean = mean_relative(groups);
    assert!(
        rel_err(f(&sel["mean_relative"]), mean) < 1e-12,
        "{name}: mean"
    );
    let above: Vec<(u64, String)> = groups
        .iter()
        .filter(|g| f(&g["relative"]) > mean)
        .map(gid)
        .collect();
    let tgl_fp: Vec<(u64, String)> = sel["tgl_fp"].as_array().unwrap().iter().map(gid).collect();
    assert_eq!(
        tgl_fp, above,
        "{name}: tgl_fp must be exactly the groups above the mean"
    );
    assert!(
        !tgl_fp.is_empty() && tgl_fp.len() < groups.len(),
        "{name}: {tgl_fp:?}"
    );
    let scales = sel["alr_scales"].as_array().unwrap();
    assert_eq!(scales.len(), groups.len());
    for (s, g) in scales.iter().zip(groups) {
        assert_eq!(gid(s), gid(g), "{name}: alr_scales order");
        let want = f(&g["relative"]) / mean;
        assert!(
            rel_err(f(&s["scale"]), want) < 1e-12,
            "{name}: scale {} vs {want}",
            s["scale"]
        );
    }
}

/// The trace JSON without its timing, which differs between runs.
fn without_seconds(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("seconds");
    v
}

// ---------------------------------------------------------------------------------------------
// locus trace --json

#[test]
fn trace_json_has_groups_selection_and_reference_values() {
    let dir = TempDir::new().unwrap();
    for name in TINY {
        let texts = ref_texts(name);
        let input = write_lines(dir.path(), &format!("{name}.jsonl"), &spans_form(&texts));
        let out = trace_json(&fixture_str(name), &input);
        check_trace_json(name, &out, texts.len());

        // The CLI reports what transformers computed for the same texts.
        let e = expected(fixture(name).join("expected.json"));
        assert_eq!(
            out["model"]["layers"].as_u64().unwrap() as usize * 2,
            e.groups.len()
        );
        for (i, t) in out["per_text"].as_array().unwrap().iter().enumerate() {
            assert_eq!(t["tokens"].as_u64().unwrap() as usize, e.token_ids[i].len());
            assert_eq!(
                t["span_targets"].as_u64().unwrap() as usize,
                e.span_targets[i].len(),
                "{name} text {i}"
            );
            assert!(rel_err(f(&t["span_loss"]), e.span_loss[i]) < 1e-4, "{name}");
            assert!(rel_err(f(&t["full_loss"]), e.full_loss[i]) < 1e-4, "{name}");
        }
        for (g, want) in out["groups"].as_array().unwrap().iter().zip(&e.groups) {
            assert_eq!(gid(g), (want.layer as u64, want.module.clone()));
            assert!(
                rel_err(f(&g["span_norm"]), want.span_norm) < 1e-3,
                "{name} {g}"
            );
            assert!(
                rel_err(f(&g["full_norm"]), want.full_norm) < 1e-3,
                "{name} {g}"
            );
        }
    }
}

#[test]
fn spans_and_salient_forms_give_identical_traces() {
    let dir = TempDir::new().unwrap();
    for name in ["llama", "gpt2", "gpt_neo"] {
        let texts = ref_texts(name);
        let by_spans = write_lines(dir.path(), "spans.jsonl", &spans_form(&texts));
        let by_salient = write_lines(dir.path(), "salient.jsonl", &salient_form(&texts));
        let a = without_seconds(trace_json(&fixture_str(name), &by_spans));
        let b = without_seconds(trace_json(&fixture_str(name), &by_salient));
        assert_eq!(a, b, "{name}: spans and salient forms differ");
    }
}

#[test]
fn spans_and_salient_on_one_line_are_combined() {
    let dir = TempDir::new().unwrap();
    let texts = ref_texts("llama");
    let (text, spans) = &texts[0];
    assert!(spans.len() >= 2);
    let both = json!({
        "text": text,
        "spans": [spans[0]],
        "salient": spans[1..].iter().map(|&r| substring(text, r)).collect::<Vec<_>>(),
    });
    let mixed = write_lines(dir.path(), "mixed.jsonl", &[both.to_string()]);
    let plain = write_lines(dir.path(), "plain.jsonl", &spans_form(&texts[..1]));
    let m = fixture_str("llama");
    assert_eq!(
        without_seconds(trace_json(&m, &mixed)),
        without_seconds(trace_json(&m, &plain))
    );
}

#[test]
fn blank_lines_are_skipped_and_errors_keep_file_line_numbers() {
    let dir = TempDir::new().unwrap();
    let texts = ref_texts("llama");
    let lines = spans_form(&texts);
    let spaced = vec![
        String::new(),
        lines[0].clone(),
        "   ".to_string(),
        lines[1].clone(),
        lines[2].clone(),
    ];
    let input = write_lines(dir.path(), "spaced.jsonl", &spaced);
    let out = trace_json(&fixture_str("llama"), &input);
    check_trace_json("llama", &out, 3);

    // The fifth line of the file is the bad one, blank lines included.
    let mut bad = spaced.clone();
    bad.push(json!({"text": "Ada Lovelace", "spans": [[0, 99]]}).to_string());
    let input = write_lines(dir.path(), "bad.jsonl", &bad);
    fails(
        &[
            "trace",
            "--model",
            &fixture_str("llama"),
            "--input",
            path_str(&input),
        ],
        &["line 6", "field `spans`", "out of range"],
    );
}

// ---------------------------------------------------------------------------------------------
// The table and the heatmaps

#[test]
fn table_lists_every_layer_and_the_tgl_fp_line() {
    let dir = TempDir::new().unwrap();
    for name in ["llama", "llama_untied_bf16"] {
        let texts = ref_texts(name);
        let input = write_lines(dir.path(), "t.jsonl", &spans_form(&texts));
        let out = trace_json(&fixture_str(name), &input);
        let layers = out["model"]["layers"].as_u64().unwrap();
        let tgl_fp: Vec<String> = out["selection"]["tgl_fp"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| format!("{}.{}", g["layer"], g["module"].as_str().unwrap()))
            .collect();

        let r = ok(&[
            "trace",
            "--model",
            &fixture_str(name),
            "--input",
            path_str(&input),
        ]);
        let table = &r.stdout;
        assert!(
            table.starts_with(&format!("traced {} texts from", texts.len())),
            "{table}"
        );
        for layer in 0..layers {
            let row = table
                .lines()
                .find(|l| l.split_whitespace().next() == Some(layer.to_string().as_str()))
                .unwrap_or_else(|| panic!("{name}: no row for layer {layer}:\n{table}"));
            // Layer, then span, full and relative for attention and for the MLP.
            assert_eq!(row.split_whitespace().count(), 7, "{row}");
        }
        assert_eq!(
            table.matches('*').count() - 1, // the `TGL-FP (*)` legend
            tgl_fp.len(),
            "{name}: one star per selected group:\n{table}"
        );
        let line = table
            .lines()
            .find(|l| l.starts_with("TGL-FP"))
            .unwrap_or_else(|| panic!("{name}: no TGL-FP line:\n{table}"));
        assert!(
            line.contains(&format!("{} of {} groups", tgl_fp.len(), 2 * layers)),
            "{line}"
        );
        assert!(line.ends_with(&tgl_fp.join(" ")), "{line} vs {tgl_fp:?}");
    }
}

#[test]
fn plot_svg_has_one_titled_cell_per_group() {
    let dir = TempDir::new().unwrap();
    let name = "llama_untied_bf16";
    let input = write_lines(dir.path(), "t.jsonl", &spans_form(&ref_texts(name)));
    let svg_path = dir.path().join("heat.svg");
    let r = ok(&[
        "trace",
        "--model",
        &fixture_str(name),
        "--input",
        path_str(&input),
        "--json",
        "--plot",
        path_str(&svg_path),
    ]);
    let out: Value = serde_json::from_str(&r.stdout).unwrap();
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.contains("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    let groups = out["groups"].as_array().unwrap();
    let cells: Vec<&str> = svg
        .lines()
        .filter(|l| l.starts_with("<rect") && l.contains("<title>layer "))
        .collect();
    assert_eq!(cells.len(), groups.len(), "{svg}");
    for g in groups {
        let title = format!(
            "<title>layer {} {}: relative {:.3}",
            g["layer"],
            g["module"].as_str().unwrap(),
            f(&g["relative"])
        );
        assert_eq!(
            cells.iter().filter(|c| c.contains(&title)).count(),
            1,
            "{title} in\n{svg}"
        );
    }
    // TGL-FP groups are outlined, the others not.
    let outlined = cells
        .iter()
        .filter(|c| c.contains("stroke=\"red\""))
        .count();
    assert_eq!(
        outlined,
        out["selection"]["tgl_fp"].as_array().unwrap().len()
    );
    assert!(r.stderr.contains("wrote heatmap"), "{}", r.stderr);
}

#[test]
fn plot_png_is_a_png_sized_by_the_layers() {
    let dir = TempDir::new().unwrap();
    let name = "llama_untied_bf16";
    let input = write_lines(dir.path(), "t.jsonl", &spans_form(&ref_texts(name)));
    let png_path = dir.path().join("heat.PNG");
    ok(&[
        "trace",
        "--model",
        &fixture_str(name),
        "--input",
        path_str(&input),
        "--plot",
        path_str(&png_path),
    ]);
    let bytes = std::fs::read(&png_path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    // Three layers: 24-pixel columns, then a 12-pixel gap and a 16-pixel colour bar; two rows of 48.
    assert_eq!((width, height), (3 * 24 + 12 + 16, 96));
}

#[test]
fn plot_with_another_extension_fails_before_tracing() {
    let dir = TempDir::new().unwrap();
    let input = write_lines(dir.path(), "t.jsonl", &spans_form(&ref_texts("llama")));
    let txt = dir.path().join("x.txt");
    let args = [
        "trace",
        "--model",
        &fixture_str("llama"),
        "--input",
        path_str(&input),
        "--plot",
        path_str(&txt),
    ];
    fails(&args, &["--plot", "x.txt", ".svg or .png"]);
    assert!(locus(&args).stdout.is_empty(), "nothing is traced");
    assert!(!txt.exists());
}

// ---------------------------------------------------------------------------------------------
// Bad input

const GOOD: &str =
    r#"{"text": "On 3 May 2021, Ada Lovelace opened a museum.", "spans": [[3, 13]]}"#;

/// `locus trace` on the llama fixture with `content` as input must fail naming `needles`.
fn bad_input(content: &str, needles: &[&str]) -> String {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, content).unwrap();
    let mut all = vec!["in.jsonl"];
    all.extend_from_slice(needles);
    fails(
        &[
            "trace",
            "--model",
            &fixture_str("llama"),
            "--input",
            path_str(&input),
        ],
        &all,
    )
}

#[test]
fn invalid_json_names_the_line() {
    bad_input(
        &format!("{GOOD}\n{{\"text\": \"unterminated\n"),
        &["line 2", "invalid JSON"],
    );
    bad_input(
        &format!("{GOOD}\n{{\"text\": \"Ada\", \"spans\": [[0, \"3\"]]}}\n"),
        &["line 2", "invalid JSON"],
    );
}

#[test]
fn span_out_of_range_is_refused() {
    bad_input(
        &format!(
            "{GOOD}\n{GOOD}\n{}\n",
            r#"{"text": "Ada Lovelace", "spans": [[0, 13]]}"#
        ),
        &[
            "line 3",
            "field `spans`",
            "[0, 13]",
            "out of range",
            "12 characters",
        ],
    );
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[-1, 3]]}"#,
        &["line 1", "field `spans`", "out of range"],
    );
}

#[test]
fn inverted_or_empty_span_is_refused() {
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[0, 3], [5, 2]]}"#,
        &["line 1", "field `spans`", "span 1 [5, 2]", "inverted"],
    );
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[4, 4]]}"#,
        &["line 1", "field `spans`", "empty"],
    );
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[0, 3, 5]]}"#,
        &["line 1", "field `spans`", "[start, end]"],
    );
}

#[test]
fn salient_string_not_in_the_text_is_refused() {
    bad_input(
        &format!(
            "{GOOD}\n{}\n",
            r#"{"text": "Ada Lovelace met Babbage.", "salient": ["Lovelace", "Charles Babbage"]}"#
        ),
        &[
            "line 2",
            "field `salient`",
            "\"Charles Babbage\"",
            "does not occur",
        ],
    );
    bad_input(
        r#"{"text": "Ada Lovelace", "salient": [""]}"#,
        &["line 1", "field `salient`"],
    );
}

#[test]
fn a_span_on_the_first_token_alone_has_no_target() {
    // Character 0 lies in the first token, which is never a prediction target.
    bad_input(
        &format!(
            "{GOOD}\n{}\n",
            r#"{"text": "Ada Lovelace opened a museum.", "spans": [[0, 1]]}"#
        ),
        &["line 2", "field `spans`", "no target token"],
    );
}

#[test]
fn a_text_of_one_token_is_refused() {
    bad_input(
        r#"{"text": "A", "spans": [[0, 1]]}"#,
        &["line 1", "field `text`", "at least 2"],
    );
}

#[test]
fn no_spans_at_all_is_refused() {
    bad_input(
        r#"{"text": "Ada Lovelace opened a museum."}"#,
        &["line 1", "field `spans`", "no salient spans"],
    );
    bad_input(
        r#"{"text": "Ada Lovelace opened a museum.", "spans": []}"#,
        &["line 1", "field `spans`", "no salient spans"],
    );
}

#[test]
fn an_empty_file_is_refused() {
    bad_input("", &["no texts"]);
    bad_input("\n  \n\n", &["no texts"]);
}

#[test]
fn a_missing_text_field_is_refused() {
    bad_input(
        &format!("{GOOD}\n{}\n", r#"{"spans": [[0, 3]]}"#),
        &["line 2", "field `text`", "missing"],
    );
}

#[test]
fn an_unknown_field_is_refused() {
    bad_input(
        r#"{"text": "Ada Lovelace", "spans": [[0, 3]], "colour": "red"}"#,
        &["line 1", "unknown field `colour`"],
    );
}

#[test]
fn a_missing_input_file_is_refused() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("nope.jsonl");
    fails(
        &[
            "trace",
            "--model",
            &fixture_str("llama"),
            "--input",
            path_str(&missing),
        ],
        &["nope.jsonl", "No such file"],
    );
}

// ---------------------------------------------------------------------------------------------
// Bad models

/// A valid input file in `dir`.
fn good_input(dir: &Path) -> PathBuf {
    write_lines(dir, "in.jsonl", &spans_form(&ref_texts("llama")))
}

/// `locus trace` with `model` must fail naming `needles`.
fn bad_model(model: &Path, needles: &[&str]) -> String {
    let dir = TempDir::new().unwrap();
    let input = good_input(dir.path());
    fails(
        &[
            "trace",
            "--model",
            path_str(model),
            "--input",
            path_str(&input),
        ],
        needles,
    )
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
// locus select

/// A saved `locus trace --json` of the llama fixture.
fn saved_trace(dir: &Path) -> (PathBuf, Value) {
    let input = good_input(dir);
    let r = ok(&[
        "trace",
        "--model",
        &fixture_str("llama"),
        "--input",
        path_str(&input),
        "--json",
    ]);
    let p = dir.join("trace.json");
    std::fs::write(&p, &r.stdout).unwrap();
    (p, serde_json::from_str(&r.stdout).unwrap())
}

/// `locus select --from trace ...`, parsed; checks the echoed rule.
fn select(trace: &Path, rule: &str, extra: &[&str]) -> Value {
    let mut args = vec!["select", "--from", path_str(trace), "--rule", rule];
    args.extend_from_slice(extra);
    let r = ok(&args);
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("select output is not JSON: {e}\n{}", r.stdout));
    assert_eq!(v["rule"], json!(rule));
    v
}

fn picked(v: &Value) -> Vec<(u64, String)> {
    v["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(gid)
        .collect()
}

#[test]
fn select_rules_pick_the_defined_groups() {
    let dir = TempDir::new().unwrap();
    let (path, trace) = saved_trace(dir.path());
    let groups = trace["groups"].as_array().unwrap();
    let all: Vec<(u64, String)> = groups.iter().map(gid).collect();
    let mean = mean_relative(groups);

    // tgl-fp: exactly the groups above the mean, as `trace` reported.
    let fp = picked(&select(&path, "tgl-fp", &[]));
    let above: Vec<_> = groups
        .iter()
        .filter(|g| f(&g["relative"]) > mean)
        .map(gid)
        .collect();
    assert_eq!(fp, above);
    let reported: Vec<_> = trace["selection"]["tgl_fp"]
        .as_array()
        .unwrap()
        .iter()
        .map(gid)
        .collect();
    assert_eq!(fp, reported);
    // The default rule is tgl-fp.
    let r = ok(&["select", "--from", path_str(&path)]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(picked(&v), fp);

    // topk: the k highest relative norms, listed in layer order.
    let top = picked(&select(&path, "topk", &["--k", "2"]));
    let mut by_rel: Vec<&Value> = groups.iter().collect();
    by_rel.sort_by(|a, b| f(&b["relative"]).total_cmp(&f(&a["relative"])));
    let mut want: Vec<_> = by_rel[..2].iter().map(|g| gid(g)).collect();
    want.sort();
    assert_eq!(top, want);

    // all: every group in order.
    assert_eq!(picked(&select(&path, "all", &[])), all);

    // tgl-alr: one scale per group, relative / mean.
    let alr = select(&path, "tgl-alr", &[]);
    let scales = alr["scales"].as_array().unwrap();
    assert_eq!(scales.len(), groups.len());
    for (s, g) in scales.iter().zip(groups) {
        assert_eq!(gid(s), gid(g));
        assert!(rel_err(f(&s["scale"]), f(&g["relative"]) / mean) < 1e-12);
    }
}

#[test]
fn random_k_is_reproducible_and_depends_on_the_seed() {
    let dir = TempDir::new().unwrap();
    let (path, trace) = saved_trace(dir.path());
    let all: BTreeSet<(u64, String)> = trace["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(gid)
        .collect();
    let draw = |seed: u64| {
        picked(&select(
            &path,
            "random-k",
            &["--k", "3", "--seed", &seed.to_string()],
        ))
    };
    let one = draw(1);
    assert_eq!(one.len(), 3);
    let distinct: BTreeSet<_> = one.iter().cloned().collect();
    assert_eq!(distinct.len(), 3, "{one:?}");
    assert!(distinct.is_subset(&all), "{one:?}");
    let mut sorted = one.clone();
    sorted.sort();
    assert_eq!(one, sorted, "listed in layer order");
    assert_eq!(draw(1), one, "same seed, same draw");

    let draws: BTreeSet<Vec<(u64, String)>> = (0..8).map(draw).collect();
    assert!(draws.len() > 1, "every seed drew {one:?}");
    for d in &draws {
        assert_eq!(d.len(), 3);
    }
}

#[test]
fn select_without_k_or_with_an_unknown_rule_fails() {
    let dir = TempDir::new().unwrap();
    let (path, _) = saved_trace(dir.path());
    let from = path_str(&path);
    fails(
        &["select", "--from", from, "--rule", "topk"],
        &["rule `topk` needs --k"],
    );
    fails(
        &[
            "select", "--from", from, "--rule", "random-k", "--seed", "3",
        ],
        &["rule `random-k` needs --k"],
    );
    let line = fails(
        &["select", "--from", from, "--rule", "bogus", "--k", "2"],
        &["unknown selection rule `bogus`"],
    );
    for rule in ["tgl-fp", "topk", "random-k", "all", "tgl-alr"] {
        assert!(line.contains(rule), "{line} does not list {rule}");
    }
}

#[test]
fn select_from_a_file_that_is_not_a_trace_fails() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing.json");
    fails(&["select", "--from", path_str(&missing)], &["missing.json"]);
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{\"rule\": \"tgl-fp\"}").unwrap();
    fails(
        &["select", "--from", path_str(&junk)],
        &["junk.json", "not the JSON of `locus trace --json`"],
    );
    std::fs::write(
        &junk,
        r#"{"groups": [{"layer": 0, "module": "ffn", "span_norm": 1, "full_norm": 1, "relative": 1}]}"#,
    )
    .unwrap();
    fails(
        &["select", "--from", path_str(&junk)],
        &["junk.json", "unknown module `ffn`"],
    );
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
    let r = ok(&[
        "trace",
        "--model",
        &model,
        "--input",
        path_str(&input),
        "--json",
        "--device",
        "cpu",
    ]);
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
        let r = locus(&args);
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

// ---------------------------------------------------------------------------------------------
// locus client against a locus serve process

/// A `locus serve` process on the llama fixture, killed when dropped.
struct Serve {
    child: Child,
    addr: String,
    /// Its working directory, without a locus.toml.
    _cwd: TempDir,
}

impl Serve {
    /// Starts a server (with `--data-dir data` when given) and waits until it answers Info.
    fn start(data: Option<&Path>) -> Serve {
        let cwd = TempDir::new().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_locus"));
        command
            .args([
                "serve",
                "--model",
                &fixture_str("llama"),
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            // Every batch takes a step, so it makes a new version.
            .args(["--strategy", "full", "--checkpoint-every", "0"]);
        if let Some(data) = data {
            command.arg("--data-dir").arg(data);
        }
        command
            .env_remove("LOCUS_CONFIG")
            .env_remove("LOCUS_DATA_DIR")
            .env_remove("LOCUS_DEVICE")
            .current_dir(cwd.path());
        let (child, addr) = spawn_serving(&mut command);
        let mut serve = Serve {
            child,
            addr,
            _cwd: cwd,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = serve.client(&["info"]);
            if r.code == Some(0) {
                return serve;
            }
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!("locus serve exited with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the server did not come up: {}",
                r.stderr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `locus client --addr ADDR args`.
    fn client(&self, args: &[&str]) -> common::Run {
        let mut all = vec!["client", "--addr", &self.addr];
        all.extend(args);
        locus(&all)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `locus client ARGS` must succeed.
fn client_ok(serve: &Serve, args: &[&str]) -> common::Run {
    let r = serve.client(args);
    assert_eq!(
        r.code,
        Some(0),
        "locus client {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    r
}

/// The value after `key` on the line of `out` that starts with it.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{out}"))
        .trim()
}

#[test]
fn client_ingest_prints_batches_and_a_summary_then_checkpoint_writes_the_file() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let serve = Serve::start(Some(&data));

    let mut lines = spans_form(&ref_texts("llama"));
    // The server rejects this one, span past the end; the client names its line.
    lines.push(json!({"text": "Ada wrote.", "spans": [[0, 99]]}).to_string());
    let file = write_lines(tmp.path(), "docs.jsonl", &lines);
    let r = client_ok(&serve, &["ingest", path_str(&file), "--batch-size", "2"]);
    // stderr is not a terminal: no bar, no cursor movement, just the lines.
    assert!(
        !r.stderr.contains('\r') && !r.stderr.contains('\x1b'),
        "{:?}",
        r.stderr
    );
    let err: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(err.len(), 4, "{}", r.stderr);
    assert!(err[0].starts_with("[1/2] batch 0: version "), "{}", err[0]);
    assert!(err[0].contains("2 accepted, 0 rejected"), "{}", err[0]);
    assert!(err[1].starts_with("[2/2] batch 1: version "), "{}", err[1]);
    assert!(err[1].contains("1 accepted, 1 rejected"), "{}", err[1]);
    assert!(
        err[2].starts_with("  line 4: documents[1].spans"),
        "{}",
        err[2]
    );
    let summary = err[3];
    assert!(
        summary.starts_with(
            "locus: ingested 4 documents in 2/2 batches: 3 accepted, 1 rejected, model version "
        ),
        "{summary}"
    );
    let version: u64 = summary
        .split("model version ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {summary}"));

    let r = client_ok(&serve, &["checkpoint"]);
    assert_eq!(
        field(&r.stdout, "version"),
        version.to_string(),
        "{}",
        r.stdout
    );
    let path = PathBuf::from(field(&r.stdout, "path"));
    let bytes: u64 = field(&r.stdout, "bytes").parse().unwrap();
    assert!(
        path.starts_with(&data),
        "{} not in {}",
        path.display(),
        data.display()
    );
    let meta =
        std::fs::metadata(&path).unwrap_or_else(|e| panic!("checkpoint {}: {e}", path.display()));
    assert!(meta.is_file());
    assert_eq!(meta.len(), bytes);
    assert_ne!(
        field(&r.stdout, "groups"),
        "-",
        "every group changed under `full`"
    );
}

#[test]
fn client_checkpoint_without_a_data_directory_fails_cleanly() {
    let serve = Serve::start(None);
    let addr = serve.addr.clone();
    // The server's refusal: exit status 3.
    fails_with(
        3,
        &["client", "--addr", &addr, "checkpoint"],
        &["--data-dir"],
    );
}

#[test]
fn client_json_prints_the_answers_and_exit_statuses_tell_failures_apart() {
    let tmp = TempDir::new().unwrap();
    let serve = Serve::start(None);
    let line = |out: &str| -> Value { serde_json::from_str(out.trim()).unwrap() };

    let info = line(&client_ok(&serve, &["--json", "info"]).stdout);
    assert_eq!(info["version"], 0, "{info}");
    assert_eq!(info["strategy"], "full", "{info}");

    let lines = spans_form(&ref_texts("llama"));
    let file = write_lines(tmp.path(), "docs.jsonl", &lines);
    let r = client_ok(
        &serve,
        &["--json", "ingest", path_str(&file), "--batch-size", "2"],
    );
    let answers: Vec<Value> = r.stdout.lines().map(line).collect();
    assert_eq!(
        answers.len(),
        2,
        "one object per answered batch:\n{}",
        r.stdout
    );
    assert_eq!(answers[1]["version"], 2, "{}", answers[1]);
    let step = &answers[0]["steps"][0];
    assert!(
        step["groups"][0]["module"]
            .as_str()
            .unwrap()
            .starts_with("MODULE_"),
        "{step}"
    );
    assert_eq!(step["span_rules"][0], "SPAN_RULE_GIVEN", "{step}");

    let score = line(
        &client_ok(
            &serve,
            &["--json", "score", "--prompt", "Ada", " wrote", " ran"],
        )
        .stdout,
    );
    assert_eq!(score["version"], 2, "{score}");
    assert_eq!(score["ranked"].as_array().unwrap().len(), 2, "{score}");

    let r = client_ok(&serve, &["--json", "complete", "Ada", "--max-tokens", "3"]);
    let chunks: Vec<Value> = r.stdout.lines().map(line).collect();
    assert!(!chunks.is_empty(), "{}", r.stdout);
    let last = chunks.last().unwrap();
    assert!(
        last["finish_reason"]
            .as_str()
            .unwrap()
            .starts_with("FINISH_REASON_"),
        "{last}"
    );

    let versions = line(&client_ok(&serve, &["--json", "versions"]).stdout);
    assert_eq!(versions["current"], 2, "{versions}");
    let created = versions["versions"][0]["created"].as_str().unwrap();
    assert!(
        created.ends_with('Z') && created.contains('T'),
        "RFC 3339: {created}"
    );

    // Usage (2): a flag the client lacks, a file that is not JSONL. Server (3): a version it does
    // not keep. Connection (4): nothing listens there.
    let r = serve.client(&["--json", "info", "--no-such-flag"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    let bad = write_lines(tmp.path(), "bad.jsonl", &["{not json".to_string()]);
    let addr = serve.addr.clone();
    fails_with(
        2,
        &["client", "--addr", &addr, "ingest", path_str(&bad)],
        &["bad.jsonl line 1"],
    );
    fails_with(3, &["client", "--addr", &addr, "rollback", "999"], &["999"]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().to_string();
    drop(closed);
    fails_with(
        4,
        &["client", "--addr", &nowhere, "info"],
        &["cannot connect"],
    );
}

#[test]
fn bad_store_urls_and_follow_intervals_are_refused_at_start() {
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    for (url, why) in [
        ("ftp://host/locus", "Unable to recognise URL"),
        ("https://example.com/x", "use a directory"),
    ] {
        fails(
            &[
                "serve", "--model", model, "--role", "reader", "--store", url,
            ],
            &[&format!("--store {url}"), why],
        );
    }
    fails(
        &[
            "serve",
            "--model",
            model,
            "--role",
            "reader",
            "--store",
            "/tmp",
            "--follow-interval",
            "0",
        ],
        &["--follow-interval 0", "positive"],
    );
    fails(
        &[
            "serve",
            "--model",
            model,
            "--canary-max-ratio",
            "0.5",
            "--canary",
            "Cargo.toml",
        ],
        &["--canary-max-ratio 0.5"],
    );
}
