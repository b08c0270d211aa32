//! Status codes for faults that are not the server's: request bytes that do not decode are
//! INVALID_ARGUMENT, a full data directory is RESOURCE_EXHAUSTED, a corrupt checkpoint DATA_LOSS;
//! and no status message names a path on the server.

mod common;
mod serving;

use serving::*;

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use locus::server::Config;
use locus::store::Durability;
use tokio_stream::StreamExt;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};

/// The status of a unary call whose request message is `body`.
async fn unary(addr: &str, path: &'static str, body: &[u8]) -> Status {
    raw_client(addr)
        .await
        .unary(
            tonic::Request::new(body.to_vec()),
            PathAndQuery::from_static(path),
            Raw,
        )
        .await
        .expect_err("bytes that do not decode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bytes_that_do_not_decode_are_invalid_argument_with_the_reason() {
    let server = start().await;
    // Field 14 with wire type 6, which does not exist.
    let s = unary(&server.addr, "/locus.v1.Admin/Info", &[0x76, 0xc9, 0xc5]).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("wire type"), "{s:?}");
    // ScoreRequest.prompt (field 1, length-delimited) holding two bytes that are not UTF-8.
    let s = unary(
        &server.addr,
        "/locus.v1.Query/Score",
        &[0x0a, 0x02, 0xff, 0xfe],
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains("ScoreRequest.prompt") && s.message().contains("UTF-8"),
        "{s:?}"
    );
    // On a stream the handler reads the message itself: IngestRequest.client_batch_id (field 2).
    let batches = tokio_stream::iter(vec![vec![0x12, 0x01, 0xff]]);
    let mut answers = raw_client(&server.addr)
        .await
        .streaming(
            tonic::Request::new(batches),
            PathAndQuery::from_static("/locus.v1.Learn/Ingest"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let s = answers.next().await.unwrap().expect_err("an error status");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("UTF-8"), "{s:?}");
    // A status quoting a long request string is cut, so that it fits in the client's headers.
    let salient = "x".repeat(30_000);
    let text = locus::proto::v1::TraceText {
        text: "Ada Lovelace opened a museum.".into(),
        salient: vec![salient],
        ..Default::default()
    };
    let (c, message) = code(server.client().await.trace(vec![text]).await);
    assert_eq!(c, Code::InvalidArgument, "{message}");
    assert!(
        message.starts_with("texts[0].salient: \"xxx")
            && message.len() <= locus::server::MAX_CLIENT_MESSAGE + 3,
        "{} bytes",
        message.len()
    );
    // The server is unharmed.
    assert_eq!(score(&mut server.client().await).await.version, 0);
    server.shutdown().await;
}

/// A writer journaling to `dir` and checkpointing there after every update.
fn durable(dir: &Path, keep_versions: usize) -> Config {
    Config {
        durability: Some(Durability {
            dir: dir.to_path_buf(),
            checkpoint_every: 1,
            keep_checkpoints: 10,
        }),
        keep_versions,
        ..config()
    }
}

/// Asserts that no status message names `dir`, a path below the temporary folder, or the
/// temporary directory it is in.
fn names_no_path(dir: &Path, messages: &[String]) {
    let tmp = std::env::temp_dir();
    let unique = dir.strip_prefix(&tmp).unwrap().iter().next().unwrap();
    for m in messages {
        for needle in [dir.as_os_str(), tmp.as_os_str(), unique] {
            assert!(
                !m.contains(&*needle.to_string_lossy()),
                "a status names a server path ({needle:?}): {m}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_is_data_loss_and_names_no_path() {
    let data = tempfile::tempdir().unwrap();
    let server = start_with(durable(data.path(), 1), true).await;
    let mut c = server.client().await;
    let batches = vec![batch("b0", facts()), batch("b1", facts())];
    ingest(&mut c, batches).await.unwrap();
    assert_eq!(c.list_versions().await.unwrap().checkpoints, vec![1, 2]);
    // Version 1 is only a checkpoint now; damage its middle.
    let dir = locus::store::checkpoints_in(data.path());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&files[0], bytes).unwrap();

    let (code, message) = code(c.rollback(1).await);
    assert_eq!(code, Code::DataLoss, "{message}");
    assert!(message.contains("corrupt"), "{message}");
    names_no_path(data.path(), &[message]);
    server.shutdown().await;
}

/// A small tmpfs mounted on a temporary directory for as long as it lives.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None`, with the reason on stderr, where this process may not mount (not root, or a
    /// container without CAP_SYS_ADMIN); under `CI=true` that fails the test instead.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true, and mounting a tmpfs was refused: {why}"
        );
        eprintln!("SKIPPED: a full data directory needs a tmpfs to fill, and mounting one was refused: {why}");
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Takes every free byte with one file, which `free` removes.
    fn fill(&self) {
        let mut filler = File::create(self.filler()).unwrap();
        let chunk = vec![0u8; 64 << 10];
        loop {
            match filler.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::StorageFull => return,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a file the server left open must not keep the mount behind.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_is_resource_exhausted_and_names_no_path() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let data = disk.path().join("data");
    let server = start_with(durable(&data, 4), true).await;
    let mut c = server.client().await;
    // The journal is still empty, so the first record needs a page the full disk does not have.
    disk.fill();
    let ingested = ingest(&mut c, vec![batch("b0", facts())])
        .await
        .expect_err("no room for the journal");
    let checkpointed = status(c.checkpoint().await.expect_err("no room for a checkpoint"));
    let mut messages = Vec::new();
    for s in [ingested, checkpointed] {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert_eq!(s.message(), "data directory is full");
        messages.push(s.message().to_string());
    }
    names_no_path(&data, &messages);
    assert_eq!(
        c.info().await.unwrap().learning_blocked,
        "data directory is full"
    );
    // With room again the same batch is learned.
    disk.free();
    let answers = ingest(&mut c, vec![batch("b0", facts())]).await.unwrap();
    assert_eq!(answers[0].version, 1);
    assert_eq!(c.info().await.unwrap().learning_blocked, "");
    server.shutdown().await;
}
