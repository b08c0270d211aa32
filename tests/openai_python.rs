//! An independent client: `examples/openai_client.py` (the `openai` Python package) against the
//! real server's OpenAI-style listener on 127.0.0.1:0. Skipped, with a note, where `openai` is not
//! importable, except under `CI=true`, where that fails.

mod common;
mod serving;

use std::process::Command;
use std::sync::Arc;

use locus::server::{self, Auth, Config, Token};
use serde_json::Value;
use serving::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_completes_and_scores() {
    let note = "the openai Python package is not importable (python3 -m pip install openai)";
    if !common::have(common::python_module("openai"), "OpenAI client test", note) {
        return;
    }
    let grpc = start_with(
        Config {
            auth: Auth {
                write: None,
                query: Some(Token::new("py-query")),
            },
            ..config()
        },
        true,
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(server::serve_openai(listener, Arc::clone(&grpc.state)).unwrap());

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/openai_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--base-url", &base, "--token", "py-query"])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"], serde_json::json!(["locus"]));
    let c = &v["complete"];
    assert_eq!(c["version_header"], "0");
    assert_eq!(c["system_fingerprint"], "locus-v0");
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(c["usage"]["completion_tokens"], 8);

    // The Score path's log-probability of the continuation, from the echoed prompt's tokens.
    let e = &v["echo"];
    assert_eq!(e["locus_version"], 0);
    let tokens = e["tokens"].as_array().unwrap();
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, "The museum was opened by Ada Lovelace");
    assert_eq!(e["token_logprobs"][0], Value::Null);
    let mut client = grpc.client_with("py-query").await;
    let scored = score(&mut client).await;
    let p = tokens.len() - scored.ranked.iter().find(|c| c.index == 0).unwrap().tokens as usize;
    let sum: f64 = e["token_logprobs"].as_array().unwrap()[p..]
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    let want = logprob(&scored, 0);
    assert!(
        (sum - want).abs() < 1e-4 * want.abs().max(1.0),
        "{sum} vs {want}"
    );

    let errors = &v["errors"];
    assert_eq!(errors["bad_temperature"]["status"], 400);
    assert_eq!(errors["bad_temperature"]["class"], "BadRequestError");
    assert_eq!(errors["bad_temperature"]["error"]["param"], "temperature");
    assert_eq!(errors["unknown_model"]["class"], "NotFoundError");
    assert_eq!(errors["no_token"]["class"], "AuthenticationError");
    grpc.shutdown().await;
}
