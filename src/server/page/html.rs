//! The status page's HTML: a summary table, the heat map and the table of recent updates. Every
//! string that comes from the server's data is escaped; styles are inline, so the page needs
//! nothing but itself.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{heatmap, Overview, Step};
use crate::plot::escape;

/// Seconds between the page's reloads.
const REFRESH_SECONDS: u32 = 3;

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
    table{border-collapse:collapse;margin-bottom:1.5em}\
    th,td{padding:.25em .7em;text-align:left;border-bottom:1px solid #ddd;vertical-align:top}\
    td.n{text-align:right;font-variant-numeric:tabular-nums}\
    tr.skipped{color:#888}.warn{color:#b00}.legend{font-size:small;color:#555}";

/// The whole page for `o`, its times relative to `now`.
pub(super) fn page(o: &Overview, now: SystemTime) -> String {
    let title = format!("locus: version {}", o.version);
    let mut body = format!("<h1>{}</h1>\n", escape(&title));
    body += &summary(o);
    body += "<h2>Layer groups &times; versions</h2>\n";
    body += &heatmap::render(&o.groups, &o.selection, &o.steps);
    let _ = write!(
        body,
        "<h2>Recent updates</h2>\n<p>The last {} learning steps, newest first; times in UTC.</p>\n",
        crate::learn::history::KEPT
    );
    body += &updates(o, now);
    document(&title, &body)
}

/// The page while the model loads.
pub(super) fn loading() -> String {
    document(
        "locus: loading",
        "<h1>locus</h1>\n<p>The model is loading; this page reloads until it is served.</p>\n",
    )
}

fn document(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        escape(title)
    )
}

fn summary(o: &Overview) -> String {
    let mut rows = vec![
        (
            "model",
            format!("{} ({})", escape(&o.model), escape(&o.architecture)),
        ),
        (
            "version",
            format!("<span id=\"version\">{}</span>", o.version),
        ),
        (
            "strategy",
            format!(
                "{}, {} localization",
                escape(&o.strategy),
                escape(o.localization)
            ),
        ),
        ("role", escape(o.role)),
        ("queue depth", format!("{} batches waiting", o.queue)),
        ("learning", learning(o)),
    ];
    rows.push(match o.store {
        Some((published, behind)) => (
            "store",
            format!("version {published}; reader lag {behind} versions"),
        ),
        None => ("store", "none (this server publishes nowhere)".to_string()),
    });
    if let Some(max_ratio) = o.guard {
        rows.push(("canary perplexity", canary(&o.steps, max_ratio)));
    }
    let mut s = String::from("<table id=\"summary\">\n");
    for (name, value) in rows {
        let _ = writeln!(s, "<tr><th>{name}</th><td>{value}</td></tr>");
    }
    s + "</table>\n"
}

fn learning(o: &Overview) -> String {
    match (&o.blocked, o.paused) {
        (Some(why), _) => format!("<span class=\"warn\">blocked: {}</span>", escape(why)),
        (None, true) => "paused".to_string(),
        (None, false) => "running".to_string(),
    }
}

/// The canary perplexity of the version served, from the newest step the guard checked.
fn canary(steps: &[Step], max_ratio: f64) -> String {
    let served = steps.iter().rev().find_map(|s| {
        let c = s.canary?;
        Some(if s.applied() { c.after } else { c.before })
    });
    let limit =
        format!("the guard undoes an update that raises it more than {max_ratio:.3}&times;");
    match served {
        Some(ppl) => format!("{ppl:.3} ({limit})"),
        None => format!("not measured yet; the first update measures it ({limit})"),
    }
}

fn updates(o: &Overview, now: SystemTime) -> String {
    if o.steps.is_empty() {
        return "<p id=\"no-updates\">No learning step yet.</p>\n".to_string();
    }
    let mut s = String::from(
        "<table id=\"updates\">\n<tr><th>time</th><th>version</th><th>documents</th>\
         <th>tokens</th><th>loss before</th><th>loss after</th><th>groups (relative norm)</th>\
         <th>seconds</th><th>outcome</th></tr>\n",
    );
    for step in o.steps.iter().rev() {
        s += &row(step, now);
    }
    s + "</table>\n"
}

fn row(step: &Step, now: SystemTime) -> String {
    let groups: Vec<String> = step
        .groups
        .iter()
        .map(|(g, relative)| match relative {
            Some(r) => format!("{g} ({r:.2})"),
            None => g.to_string(),
        })
        .collect();
    let mut outcome = match &step.skipped {
        Some(why) => escape(why),
        None => "served".to_string(),
    };
    if let Some(c) = step.canary {
        let _ = write!(outcome, "; canary {:.3} &rarr; {:.3}", c.before, c.after);
    }
    let class = if step.applied() {
        "step"
    } else {
        "step skipped"
    };
    format!(
        "<tr class=\"{class}\" data-version=\"{}\"><td>{}</td><td class=\"n\">{}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.4}</td>\
         <td class=\"n\">{}</td><td>{}</td><td class=\"n\">{:.2}</td><td>{outcome}</td></tr>\n",
        step.version,
        clock(step.at, now),
        step.version,
        step.documents,
        step.tokens,
        step.loss_before,
        step.loss_after
            .map_or("&ndash;".to_string(), |l| format!("{l:.4}")),
        groups.join(" "),
        step.seconds,
    )
}

/// `HH:MM:SS` in UTC, and how long before `now`.
fn clock(at: SystemTime, now: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86_400;
    let ago = now.duration_since(at).map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02} ({ago} s ago)",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GroupId, Module};

    fn overview(model: &str, strategy: &str) -> Overview {
        Overview {
            model: model.to_string(),
            architecture: "llama".to_string(),
            version: 3,
            strategy: strategy.to_string(),
            localization: "per-batch",
            role: "writer",
            queue: 0,
            paused: false,
            blocked: Some("disk <full>".to_string()),
            store: None,
            guard: Some(1.5),
            groups: vec![GroupId {
                layer: 0,
                module: Module::Attn,
            }],
            selection: Vec::new(),
            steps: Vec::new(),
        }
    }

    #[test]
    fn strings_from_the_data_are_escaped() {
        let html = page(
            &overview("/models/<script>alert(1)</script>", "tgl\"fp'&"),
            SystemTime::now(),
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("/models/&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("tgl&quot;fp&#39;&amp;"));
        assert!(html.contains("blocked: disk &lt;full&gt;"));
    }

    fn step(version: u64, skipped: Option<&str>, before: f64, after: f64) -> Step {
        Step {
            at: SystemTime::now(),
            version,
            skipped: skipped.map(str::to_string),
            documents: 1,
            tokens: 10,
            loss_before: 3.0,
            loss_after: None,
            groups: Vec::new(),
            canary: Some(crate::learn::history::Check { before, after }),
            seconds: 0.1,
        }
    }

    #[test]
    fn the_canary_perplexity_is_that_of_the_version_served() {
        let served = step(1, None, 10.0, 11.0);
        assert!(canary(std::slice::from_ref(&served), 2.0).starts_with("11.000 "));
        // An update the guard undid leaves the version before it served.
        let undone = step(1, Some("forgetting guard: ..."), 11.0, 40.0);
        assert!(canary(&[served, undone], 2.0).starts_with("11.000 "));
        assert!(canary(&[], 2.0).starts_with("not measured yet"));
    }

    #[test]
    fn the_clock_is_utc_and_counts_back_from_now() {
        let at = UNIX_EPOCH + std::time::Duration::from_secs(86_400 * 3 + 3600 * 13 + 60 * 5 + 9);
        let now = at + std::time::Duration::from_secs(42);
        assert_eq!(clock(at, now), "13:05:09 (42 s ago)");
    }
}
