//! `locus trace`: its JSON against the reference values, the spans and salient forms, the table
//! and the heatmaps.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::{expected, fails, fixture, locus, ok, rel_err, TINY};
use crate::{
    f, fixture_str, gid, mean_relative, path_str, ref_texts, spans_form, trace_args, trace_json,
    without_seconds, write_lines,
};

fn substring(text: &str, (s, e): (usize, usize)) -> String {
    text.chars().skip(s).take(e - s).collect()
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
        &trace_args(&fixture_str("llama"), &input, &[]),
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

        let r = ok(&trace_args(&fixture_str(name), &input, &[]));
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
    let r = ok(&trace_args(
        &fixture_str(name),
        &input,
        &["--json", "--plot", path_str(&svg_path)],
    ));
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
    ok(&trace_args(
        &fixture_str(name),
        &input,
        &["--plot", path_str(&png_path)],
    ));
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
    let model = fixture_str("llama");
    let args = trace_args(&model, &input, &["--plot", path_str(&txt)]);
    fails(&args, &["--plot", "x.txt", ".svg or .png"]);
    assert!(locus(&args).stdout.is_empty(), "nothing is traced");
    assert!(!txt.exists());
}
