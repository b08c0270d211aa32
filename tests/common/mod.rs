//! Helpers shared by the integration tests: fixture paths, reference JSON and running the binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

/// What one run of the binary did.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Starts `command`, a `locus serve` given `--grpc-addr 127.0.0.1:0`, and returns it with the
/// address it bound, read from its stderr: no port is picked before the server holds it, so
/// tests running side by side cannot take each other's. Its stderr is drained from then on.
pub fn spawn_serving(command: &mut Command) -> (Child, String) {
    spawn_announcing(command, "locus: serving gRPC", false)
}

/// Starts `command`, a `locus serve`, and returns it with the address announced on the stderr line
/// that starts with `announce` (after its " on ", without `http://`, up to a space or a slash),
/// once that line has come and, when `loaded`, once the model is loaded too. Its stderr is drained
/// from then on.
pub fn spawn_announcing(command: &mut Command, announce: &str, loaded: bool) -> (Child, String) {
    let (child, mut addrs) = spawn_announcing_all(command, &[announce], loaded);
    (child, addrs.remove(0))
}

/// As [`spawn_announcing`], for several listeners: one address per prefix in `announce`, in order.
pub fn spawn_announcing_all(
    command: &mut Command,
    announce: &[&str],
    loaded: bool,
) -> (Child, Vec<String>) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running locus serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let announce: Vec<String> = announce.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        let mut addrs: Vec<Option<String>> = vec![None; announce.len()];
        let mut ready = !loaded;
        // Taken when the addresses are sent; the loop goes on draining stderr.
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            for (prefix, addr) in announce.iter().zip(addrs.iter_mut()) {
                if let Some(rest) = line.strip_prefix(prefix.as_str()) {
                    let after = rest.split(" on ").nth(1).unwrap_or_default();
                    let after = after.trim_start_matches("http://");
                    *addr = after.split([' ', '/']).next().map(String::from);
                }
            }
            ready |= line.contains("model loaded");
            if ready && addrs.iter().all(Option::is_some) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addrs.iter().flatten().cloned().collect::<Vec<_>>());
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addrs) => (child, addrs),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "locus serve did not say where it serves: {:?}",
                child.wait()
            );
        }
    }
}

/// Runs `locus` with `args`. `RUST_BACKTRACE=1` is forced so that a backtrace leaking into an error
/// message, or a panic, shows up; `LOCUS_MODEL` is cleared so nothing falls back to the default
/// model, and `LOCUS_DEVICE` so that every run is on the CPU unless it says otherwise.
pub fn locus(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("LOCUS_MODEL")
        .env_remove("LOCUS_DEVICE")
        .env_remove("RUST_LOG")
        .output()
        .expect("running the locus binary");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `locus` and insists that it succeeds.
pub fn ok(args: &[&str]) -> Run {
    let r = locus(args);
    assert_eq!(
        r.code,
        Some(0),
        "locus {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r
}

/// Runs `locus`, insists that it fails cleanly (exit status 1, no panic, one error line and no
/// backtrace), that the error names every `needle`, and returns the error line.
pub fn fails(args: &[&str], needles: &[&str]) -> String {
    fails_with(1, args, needles)
}

/// [`fails`] with another exit status (2 usage, 3 a server's error, 4 no connection).
pub fn fails_with(status: i32, args: &[&str], needles: &[&str]) -> String {
    let r = locus(args);
    assert!(
        !r.stderr.contains("panicked"),
        "locus {args:?} panicked:\n{}",
        r.stderr
    );
    assert_eq!(
        r.code,
        Some(status),
        "locus {args:?} should fail with status {status}:\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| !l.starts_with("locus: loaded "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "locus {args:?}: expected exactly one error line, got:\n{}",
        r.stderr
    );
    let line = lines[0];
    assert!(
        line.starts_with("locus: error: "),
        "locus {args:?}: not an error line: {line}"
    );
    for needle in needles {
        assert!(
            line.contains(needle),
            "locus {args:?}: error does not mention {needle:?}:\n{line}"
        );
    }
    line.to_string()
}

/// The directory of a committed fixture.
pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// The checkout's root. A test binary built on one machine and run on another
/// (scripts/gpu_check.sh) is told where the checkout is.
pub fn repo() -> PathBuf {
    std::env::var_os("LOCUS_REPO")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// Whether a tool the calling test needs is here (`found`). When it is not, the test fails under
/// `CI=true`, where .ci/run installs it, and elsewhere prints why `test` is skipped.
pub fn have(found: bool, test: &str, note: &str) -> bool {
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{note}");
        eprintln!("note: skipping the {test}: {note}");
    }
    found
}

/// Whether `python3` can import `module`.
pub fn python_module(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The tiny random HF models built by `scripts/reference/make_fixtures.py`.
pub const TINY: [&str; 5] = ["llama", "llama_untied_bf16", "gpt2", "gpt2_f16", "gpt_neo"];

#[derive(Deserialize)]
pub struct RefText {
    pub text: String,
    pub spans: Vec<(usize, usize)>,
}

#[derive(Deserialize)]
pub struct RefGroup {
    pub layer: usize,
    pub module: String,
    pub span_norm: f64,
    pub full_norm: f64,
    #[serde(default)]
    pub relative: f64,
}

#[derive(Deserialize)]
pub struct RefParam {
    pub span: f64,
    pub full: f64,
}

/// What transformers computed for a fixture's texts.
#[derive(Deserialize)]
pub struct Expected {
    pub texts: Vec<RefText>,
    pub token_ids: Vec<Vec<u32>>,
    pub span_targets: Vec<Vec<usize>>,
    #[serde(default)]
    pub logits: Vec<Vec<Vec<f32>>>,
    pub span_loss: Vec<f64>,
    pub full_loss: Vec<f64>,
    pub per_text: Vec<Vec<RefGroup>>,
    pub groups: Vec<RefGroup>,
    pub param_grad_norms: std::collections::BTreeMap<String, RefParam>,
}

/// Reads a reference JSON file.
pub fn expected(path: PathBuf) -> Expected {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `|a - b| / max(|b|, floor)`.
pub fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// The fixture's texts as trace input.
pub fn span_texts(e: &Expected) -> Vec<locus::spans::SpanText> {
    e.texts
        .iter()
        .enumerate()
        .map(|(i, t)| locus::spans::SpanText {
            line: i + 1,
            text: t.text.clone(),
            spans: t.spans.clone(),
        })
        .collect()
}

/// Asserts per-text losses within `loss_tol` and every group's norms within `norm_tol` (relative).
pub fn assert_trace_matches(
    name: &str,
    t: &locus::trace::Trace,
    e: &Expected,
    loss_tol: f64,
    norm_tol: f64,
) {
    for (i, s) in t.per_text.iter().enumerate() {
        assert!(
            rel_err(s.span_loss, e.span_loss[i]) < loss_tol,
            "{name} span loss {} vs {}",
            s.span_loss,
            e.span_loss[i]
        );
        assert!(
            rel_err(s.full_loss, e.full_loss[i]) < loss_tol,
            "{name} full loss {} vs {}",
            s.full_loss,
            e.full_loss[i]
        );
    }
    assert_eq!(t.groups.len(), e.groups.len(), "{name} group count");
    for (g, want) in t.groups.iter().zip(&e.groups) {
        let module = g.module.to_string();
        assert_eq!(
            (g.layer, module.as_str()),
            (want.layer, want.module.as_str()),
            "{name} group order"
        );
        for (what, a, b) in [
            ("span", g.span_norm, want.span_norm),
            ("full", g.full_norm, want.full_norm),
            ("relative", g.relative, want.relative),
        ] {
            assert!(
                rel_err(a, b) < norm_tol,
                "{name} {}.{module} {what}: {a} vs {b}",
                g.layer
            );
        }
    }
}
