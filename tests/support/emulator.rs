//! What the object-store tests share: an emulated object store started by a helper script in
//! tests/support/ (which creates the buckets it is given, prints the endpoint on one line and
//! serves until its standard input closes), the runtime they run in, and the missing-bucket check.
//!
//! Each test sets the client's environment variables before any thread can read them, so each
//! lives alone in its own test binary (tests/object_store*.rs).
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Seek};
use std::process::{Child, Command, Stdio};

use candle_core::Device;
use locus::model::load;
use locus::server::State;

use crate::common::fixture;
use crate::serving::writer_config;

/// A running emulator; it ends when its standard input closes, on drop.
pub struct Emulator {
    child: Child,
    pub endpoint: String,
    script: String,
    buckets: Vec<String>,
}

impl Emulator {
    /// Runs `python3 tests/support/<script> <buckets>` once `probe` succeeds. Where it fails the
    /// emulator is not installed: `None` and a note with `install`, or a panic under CI.
    pub fn start(
        name: &str,
        probe: &[&str],
        install: &str,
        script: &str,
        buckets: &[&str],
    ) -> Option<Emulator> {
        let probed = Command::new(probe[0])
            .args(&probe[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(probed, Ok(s) if s.success()) {
            assert!(
                std::env::var_os("CI").is_none(),
                "{name} is not installed under CI: {install}"
            );
            eprintln!("note: skipping the {name} test: {install}");
            return None;
        }
        let script = format!("{}/tests/support/{script}", env!("CARGO_MANIFEST_DIR"));
        let args: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
        let (child, endpoint) = spawn(&script, &args);
        Some(Emulator {
            child,
            endpoint,
            script,
            buckets: args,
        })
    }

    /// Kills the emulator outright, as a crash or a lost network would take the store away.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the emulator again on its endpoint's port, its buckets created anew and empty
    /// (for scripts that take `--port`, such as s3_server.py).
    pub fn restart(&mut self) {
        self.kill();
        let port = self.endpoint.rsplit(':').next().unwrap().to_string();
        let args: Vec<String> = ["--port".to_string(), port]
            .into_iter()
            .chain(self.buckets.iter().cloned())
            .collect();
        let (child, endpoint) = spawn(&self.script, &args);
        assert_eq!(endpoint, self.endpoint, "the emulator came back elsewhere");
        self.child = child;
    }
}

/// Runs `python3 script args` and reads the endpoint it prints, or panics with what it said.
fn spawn(script: &str, args: &[String]) -> (Child, String) {
    // Errors go to a file rather than a pipe nobody drains, and into the panic if it fails.
    let mut errors = tempfile::tempfile().unwrap();
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(errors.try_clone().unwrap())
        .spawn()
        .expect("python3 starts");
    let mut endpoint = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut endpoint)
        .unwrap();
    let endpoint = endpoint.trim().to_string();
    if !endpoint.starts_with("http://") {
        let _ = child.wait();
        let mut said = String::new();
        errors.rewind().unwrap();
        errors.read_to_string(&mut said).unwrap();
        panic!("{script} printed {endpoint:?}, not an endpoint:\n{said}");
    }
    (child, endpoint)
}

impl Drop for Emulator {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The credentials the S3 tests give moto, distinct enough that a test can check that no client
/// is ever shown them.
pub const S3_KEY_ID: &str = "locus-test-key-id";
pub const S3_SECRET: &str = "locus-test-secret-key";

/// moto's S3-compatible server with `buckets`, where moto is installed.
pub fn moto(buckets: &[&str]) -> Option<Emulator> {
    Emulator::start(
        "S3 (moto)",
        &["python3", "-c", "import moto.server, boto3, flask"],
        "python3 -m pip install 'moto[server]'",
        "s3_server.py",
        buckets,
    )
}

/// Runs `test` with the environment an S3 client of `endpoint` reads, as [`run_with_env`].
pub fn run_with_s3<F: Future>(endpoint: &str, test: F) -> F::Output {
    let env = [
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", S3_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
    ];
    run_with_env(&env, test)
}

/// Sets `vars` (the object-store client reads them as a pod would) and runs `test` on a fresh
/// runtime. The variables are set before the runtime starts its threads, since setting one races
/// with any thread reading the environment.
pub fn run_with_env<F: Future>(vars: &[(&str, &str)], test: F) -> F::Output {
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test)
}

/// A writer whose bucket does not exist fails to start, naming `store`.
pub async fn missing_bucket_is_reported(store: &str) {
    let data = tempfile::tempdir().unwrap();
    let state = State::new(writer_config(data.path(), store, 2, 1)).await;
    let model = load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
    let e = state.install(model).await.expect_err("a missing bucket");
    assert!(e.to_string().contains(store), "{e}");
}
