//! The status page at `/` of the metrics listener, against a real in-process server with the tiny
//! Llama fixture and the forgetting guard on: over plain HTTP, and rendered by headless Chromium
//! (skipped, with a note, where `chromium` is not installed, except under `CI=true`, where that
//! fails).

mod common;
mod serving;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use locus::client::Client;
use locus::proto::v1 as pb;
use locus::server::{Config, Guard};
use serving::*;

fn guarded() -> Config {
    Config {
        guard: Some(Guard {
            canaries: vec!["The museum in London opened its doors in the spring.".to_string()],
            max_ratio: 1000.0,
        }),
        ..config()
    }
}

/// Ingests the facts as one batch; answers its single learning step.
async fn ingest_one(client: &mut Client, id: &str) -> pb::UpdateReport {
    let answers = ingest(client, vec![batch(id, facts())]).await.unwrap();
    let steps = &answers[0].steps;
    assert_eq!(steps.len(), 1, "{answers:?}");
    steps[0].clone()
}

/// The page's row of the step that made `version`.
fn update_row(page: &str, version: u64) -> &str {
    let start = format!("<tr class=\"step\" data-version=\"{version}\">");
    let at = page
        .find(&start)
        .unwrap_or_else(|| panic!("no row {start} in\n{page}"));
    let end = page[at..].find("</tr>").expect("the row ends");
    &page[at..at + end]
}

fn shows_version(page: &str, version: u64) -> bool {
    page.contains(&format!("<span id=\"version\">{version}</span>"))
}

/// `layer.module`, as the page names a group.
fn group_name(g: &pb::UpdatedGroup) -> String {
    let module = match pb::Module::try_from(g.module) {
        Ok(pb::Module::Attn) => "attn",
        Ok(pb::Module::Mlp) => "mlp",
        other => panic!("module {other:?}"),
    };
    format!("{}.{module}", g.layer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_version_and_each_new_update() {
    let server = start_with(guarded(), true).await;
    let metrics = serve_metrics(&server).await;
    let (code, page) = http_get(&metrics, "/").await;
    assert_eq!(code, 200);
    assert!(shows_version(&page, 0), "{page}");
    assert!(page.contains("<meta http-equiv=\"refresh\""), "{page}");
    assert!(page.contains("tgl-fp, per-batch localization"), "{page}");
    assert!(page.contains("No learning step yet."), "{page}");
    assert!(page.contains("canary perplexity"), "{page}");

    let mut client = server.client().await;
    let step = ingest_one(&mut client, "page-1").await;
    assert_eq!(step.version, 1);
    let (_, page) = http_get(&metrics, "/").await;
    assert!(shows_version(&page, 1), "{page}");
    let row = update_row(&page, 1);
    assert!(row.contains("served; canary "), "{row}");
    assert!(!step.groups.is_empty());
    for g in &step.groups {
        assert!(
            row.contains(&group_name(g)),
            "{} not in {row}",
            group_name(g)
        );
    }
    // The heat map has a column for the version, and a cell for each group it changed.
    assert!(page.contains("<svg id=\"heatmap\""), "{page}");
    for g in &step.groups {
        let cell = format!("<title>version 1, {}: updated", group_name(g));
        assert!(page.contains(&cell), "no cell {cell:?} in\n{page}");
    }

    ingest_one(&mut client, "page-2").await;
    let (_, page) = http_get(&metrics, "/").await;
    assert!(shows_version(&page, 2), "{page}");
    // Newest first.
    let (new, old) = (update_row(&page, 2), update_row(&page, 1));
    assert!(page.find(new) < page.find(old));
    server.shutdown().await;
}

/// The update rows of `page` (their versions, newest first) and what each says.
fn rows(page: &str) -> Vec<(u64, String)> {
    let start = "<tr class=\"step\" data-version=\"";
    page.match_indices(start)
        .map(|(at, _)| {
            let rest = &page[at + start.len()..];
            let version = rest[..rest.find('"').unwrap()].parse().unwrap();
            let row = &rest[..rest.find("</tr>").unwrap()];
            // The time a row shows is when the writer finished the step: the same everywhere.
            (version, row.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_and_a_restarted_writer_show_the_writers_updates() {
    let store = tempfile::tempdir().unwrap();
    let spec = format!("file://{}", store.path().display());
    let data = tempfile::tempdir().unwrap();
    // A checkpoint every second update, so a reader that starts late starts from one.
    let writer = start_with(writer_config(data.path(), &spec, 2, 2), true).await;
    let early = start_with(reader_config(&spec), true).await;
    let mut w = writer.client().await;
    for i in 0..3 {
        ingest_one(&mut w, &format!("b{i}")).await;
    }
    wait_for_published(&mut w, 3).await;
    let late = start_with(reader_config(&spec), true).await;
    let written = rows(&http_get(&serve_metrics(&writer).await, "/").await.1);
    assert_eq!(
        written.iter().map(|r| r.0).collect::<Vec<_>>(),
        [3, 2, 1],
        "{written:?}"
    );
    for reader in [&early, &late] {
        wait_for_version(&mut reader.client().await, 3).await;
        let page = http_get(&serve_metrics(reader).await, "/").await.1;
        assert_eq!(rows(&page), written, "a reader's rows:\n{page}");
    }
    early.shutdown().await;
    late.shutdown().await;

    // The final checkpoint keeps the rows; the restarted writer shows them, then its new steps.
    writer.shutdown().await;
    let writer = start_with(writer_config(data.path(), &spec, 2, 2), true).await;
    let metrics = serve_metrics(&writer).await;
    assert_eq!(rows(&http_get(&metrics, "/").await.1), written);
    ingest_one(&mut writer.client().await, "b3").await;
    let after = rows(&http_get(&metrics, "/").await.1);
    assert_eq!(after[0].0, 4);
    assert_eq!(&after[1..], &written[..]);
    writer.shutdown().await;
}

/// Where Chromium is, or why the test cannot run.
fn chromium() -> Option<&'static str> {
    let found = Command::new("chromium")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    let note = "chromium is not installed (apt-get install -y chromium)";
    common::have(found, "headless Chromium test", note).then_some("chromium")
}

/// Runs headless Chromium with `args` and a profile in `profile`, killed after a minute.
fn run_chromium(program: &str, profile: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium {args:?} ran for more than a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The DOM of `url` after Chromium loaded it.
async fn dom(program: &'static str, profile: &Path, url: &str) -> String {
    let (profile, url) = (profile.to_path_buf(), url.to_string());
    let out = tokio::task::spawn_blocking(move || {
        run_chromium(program, &profile, &["--dump-dom", url.as_str()])
    })
    .await
    .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_renders_the_page_and_its_new_updates() {
    let Some(program) = chromium() else {
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let server = start_with(guarded(), true).await;
    let url = format!("http://{}/", serve_metrics(&server).await);
    let page = dom(program, profile.path(), &url).await;
    assert!(shows_version(&page, 0), "{page}");
    assert!(page.contains("No learning step yet."), "{page}");

    let mut client = server.client().await;
    ingest_one(&mut client, "chromium").await;
    let page = dom(program, profile.path(), &url).await;
    assert!(shows_version(&page, 1), "{page}");
    let row = update_row(&page, 1);
    assert!(row.contains("served"), "{row}");
    assert!(page.contains("<svg id=\"heatmap\""), "{page}");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status_page.png");
    let (p, s) = (profile.path().to_path_buf(), shot.clone());
    tokio::task::spawn_blocking(move || {
        let arg = format!("--screenshot={}", s.display());
        run_chromium(program, &p, &[&arg, "--window-size=1280,900", &url])
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{} is no PNG", shot.display());
    eprintln!("the status page's screenshot: {}", shot.display());
    server.shutdown().await;
}
