//! `locus client` against a `locus serve` process (ingest, checkpoint, `--json`, exit statuses),
//! and the settings `locus serve` refuses at start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::{self, fails, fails_with, fixture, locus, spawn_serving};
use crate::{fixture_str, path_str, ref_texts, spans_form, write_lines};

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
    for (flag, value) in [("--beta1", "1"), ("--span-weight", "-1"), ("--lr", "0")] {
        let flag_value = format!("{flag}={value}");
        fails(
            &["serve", "--model", model, &flag_value],
            &[&format!("{flag} {value}"), "must be"],
        );
    }
}
