//! Scale-out through object storage: the writer publishes to an S3 bucket (moto's S3-compatible
//! server on an ephemeral port, started by tests/support/s3_server.py) and two readers follow it.
//! Skipped, with a note, where moto is not importable, except under CI, where that is a failure.

mod common;
mod serving;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use candle_core::Device;
use locus::model::load;
use locus::server::{Config, State};
use serving::*;

const BUCKET: &str = "locus-published";

/// The S3-compatible server; it ends when its standard input closes.
struct S3 {
    child: Child,
    endpoint: String,
}

impl S3 {
    fn start() -> Option<S3> {
        let probe = Command::new("python3")
            .args(["-c", "import moto.server, boto3, flask"])
            .output();
        if !matches!(&probe, Ok(o) if o.status.success()) {
            assert!(
                std::env::var_os("CI").is_none(),
                "moto is not importable under CI: python3 -m pip install 'moto[server]'"
            );
            eprintln!("note: skipping the S3 test: python3 -m pip install 'moto[server]'");
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/s3_server.py");
        let mut child = Command::new("python3")
            .args([script, BUCKET])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 starts");
        let mut endpoint = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut endpoint)
            .unwrap();
        let endpoint = endpoint.trim().to_string();
        assert!(endpoint.starts_with("http://"), "moto said {endpoint:?}");
        Some(S3 { child, endpoint })
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

#[test]
fn readers_follow_the_writer_through_s3() {
    let Some(s3) = S3::start() else { return };
    // The object-store client reads these as a pod would; set before any thread of this test
    // binary can read the environment.
    for (k, v) in [
        ("AWS_ENDPOINT", s3.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ] {
        std::env::set_var(k, v);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        writer_and_two_readers(&format!("s3://{BUCKET}/models/smol")).await;

        // A bucket that does not exist is reported when the writer starts, with its URL.
        let data = tempfile::tempdir().unwrap();
        let state = State::new(Config {
            durability: Some(locus::store::Durability {
                dir: data.path().to_path_buf(),
                checkpoint_every: 2,
                keep_checkpoints: 1,
            }),
            store: Some("s3://no-such-bucket/x".into()),
            ..config()
        })
        .await;
        let model = load::load(common::fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
        let e = state.install(model).await.expect_err("a missing bucket");
        assert!(e.to_string().contains("s3://no-such-bucket/x"), "{e}");
    });
}
