//! An independent client: `examples/client.py` (Python grpcio, with health checking and
//! reflection) against the real server on 127.0.0.1:0. Skipped, with a note, where grpcio is not
//! importable.

mod common;

use std::process::Command;
use std::sync::Arc;

use candle_core::Device;
use common::fixture;
use locus::learn::LearnConfig;
use locus::model::load;
use locus::server::{self, Auth, Config, State, Token};
use serde_json::Value;

const MODULES: &str = "import grpc, grpc_tools, grpc_health.v1.health_pb2, grpc_reflection.v1alpha";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_talks_to_the_server() {
    let probe = Command::new("python3").args(["-c", MODULES]).output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        eprintln!(
            "note: skipping the Python client test: grpcio is not importable \
             (python3 -m pip install grpcio grpcio-tools grpcio-health-checking grpcio-reflection)"
        );
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = Config {
        learn: LearnConfig {
            lr: 1e-2,
            ..LearnConfig::default()
        },
        auth: Auth {
            write: Some(Token::new("py-secret")),
            query: None,
        },
        ..Config::default()
    };
    let state = State::new(config).await;
    let model = load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
    state.install(model).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, Arc::clone(&state), async {
        let _ = stopped.await;
    }));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/client.py");
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || Command::new("python3").arg(script).args(args).output())
    };
    let base = |token: Option<&str>| {
        let mut v = vec!["--addr".to_string(), addr.clone(), "--json".to_string()];
        if let Some(t) = token {
            v.extend(["--token".to_string(), t.to_string()]);
        }
        v
    };

    // Without the write token, Admin.Info is refused and the script says why.
    let denied = run(base(None)).await.unwrap().unwrap();
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");

    let mut args = base(Some("py-secret"));
    args.extend(
        [
            "--prompt",
            "The museum was opened by",
            "--candidates",
            " Ada Lovelace",
            " Charles Babbage",
            "--ingest",
            "On 3 May 2021, Ada Lovelace opened a museum in London.",
            "--salient",
            "Ada Lovelace",
        ]
        .map(String::from),
    );
    let out = run(args).await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["health"], "SERVING");
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "locus.v1.Learn",
        "locus.v1.Query",
        "locus.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&s), "{s} missing from {services:?}");
    }
    assert_eq!(v["info"]["architecture"], "llama");
    assert_eq!(v["score"]["version"], 0);
    assert_eq!(v["score"]["ranked"].as_array().unwrap().len(), 2);
    assert_eq!(v["complete"]["version"], 0);
    assert_eq!(v["complete"]["finish"], "FINISH_REASON_LENGTH");
    assert_eq!(v["complete"]["tokens"], 8);
    assert!(v["perplexity"]["perplexity"].as_f64().unwrap() > 1.0);
    assert_eq!(v["ingest"]["version"], 1);
    assert_eq!(v["ingest"]["accepted"], serde_json::json!([0]));
    assert!(!v["ingest"]["groups"].as_array().unwrap().is_empty());
    assert_eq!(v["score_after"]["version"], 1);
    assert_ne!(v["score_after"]["ranked"], v["score"]["ranked"]);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
