//! `locus trace`: relative gradient norms per layer group, as a table, JSON and a heatmap.

use std::path::PathBuf;

use clap::Args;
use locus::select;
use locus::spans::parse_jsonl;
use locus::trace::{prepare, trace, Trace};

/// The sample of drifted texts traced when no `--input` is given.
const SAMPLE: &str = include_str!("../../data/sample/trace.jsonl");

/// Arguments of `locus trace`.
#[derive(Args)]
pub struct TraceArgs {
    /// A Hugging Face model directory, a .gguf file, or `default` (SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, default_value = "default", env = "LOCUS_MODEL")]
    model: String,
    #[command(flatten)]
    device: super::DeviceArg,
    /// JSONL of `{"text", "spans": [[start, end], ...]}` or `{"text", "salient": ["..."]}`; the bundled sample if omitted.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Write a heatmap of the relative norms (.svg or .png).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Runs `locus trace`.
pub fn run(a: TraceArgs) -> anyhow::Result<()> {
    let device = a.device.open()?;
    // Refuse a plot name we cannot write before the model is loaded and traced, not after.
    if let Some(p) = &a.plot {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !ext.eq_ignore_ascii_case("svg") && !ext.eq_ignore_ascii_case("png") {
            anyhow::bail!("--plot {}: use a .svg or .png file name", p.display());
        }
    }
    let (name, content) = match &a.input {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|e| locus::Error::io(p, e))?,
        ),
        None => ("bundled sample".to_string(), SAMPLE.to_string()),
    };
    let texts = parse_jsonl(&name, &content)?;
    let model = super::load_model(&a.model, &device)?;
    let prepared = prepare(&model, &name, &texts)?;
    let start = std::time::Instant::now();
    let result = trace(&model, &prepared)?;
    let secs = start.elapsed().as_secs_f64();
    let selection = select::report(&result.groups);
    if a.json {
        let out = serde_json::json!({
            "model": model.info(),
            "texts": result.texts,
            "groups": result.groups,
            "other": result.other,
            "per_text": result.per_text,
            "selection": selection,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&result, &selection, &name, secs);
    }
    if let Some(p) = &a.plot {
        let title = format!(
            "relative gradient norm, {} ({} texts)",
            model.arch.name(),
            result.texts
        );
        locus::plot::write_heatmap(p, &result.groups, &selection.tgl_fp, &title)?;
        eprintln!("locus: wrote heatmap {}", p.display());
    }
    Ok(())
}

fn print_table(t: &Trace, sel: &select::SelectionReport, source: &str, secs: f64) {
    let n = t.per_text.len() as f64;
    let mean = |f: fn(&locus::trace::TextStat) -> f64| t.per_text.iter().map(f).sum::<f64>() / n;
    println!(
        "traced {} texts from {source} in {secs:.1} s; mean span loss {:.3}, mean full loss {:.3}",
        t.texts,
        mean(|s| s.span_loss),
        mean(|s| s.full_loss)
    );
    println!(
        "{:>5}  {:>10} {:>10} {:>8}   {:>10} {:>10} {:>8}",
        "layer", "attn span", "attn full", "attn rel", "mlp span", "mlp full", "mlp rel"
    );
    for pair in t.groups.chunks(2) {
        let mark = |g: &locus::trace::GroupStat| {
            if sel.tgl_fp.contains(&g.id()) {
                '*'
            } else {
                ' '
            }
        };
        if let [a, m] = pair {
            println!(
                "{:>5}  {:>10.4} {:>10.4} {:>7.3}{}   {:>10.4} {:>10.4} {:>7.3}{}",
                a.layer,
                a.span_norm,
                a.full_norm,
                a.relative,
                mark(a),
                m.span_norm,
                m.full_norm,
                m.relative,
                mark(m)
            );
        }
    }
    for o in &t.other {
        println!(
            "{:>5}  span {:.4} full {:.4} relative {:.3} (not a layer group)",
            o.name, o.span_norm, o.full_norm, o.relative
        );
    }
    let list: Vec<String> = sel.tgl_fp.iter().map(|g| g.to_string()).collect();
    println!(
        "TGL-FP (*): {} of {} groups above the mean relative norm {:.3}: {}",
        sel.tgl_fp.len(),
        t.groups.len(),
        sel.mean_relative,
        list.join(" ")
    );
}
