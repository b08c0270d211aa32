//! The OpenAI-style HTTP API against a real server on 127.0.0.1:0 with the tiny Llama fixture:
//! completions on the gRPC Complete path, echoed log-probabilities that match Score, the version
//! of every answer, auth, and each kind of refusal as OpenAI-style JSON.

mod common;
mod serving;

use serving::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use locus::proto::v1 as pb;
use locus::server::{self, Auth, Config, Tls, Token};
use locus::tokenize::TextTokenizer;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

/// What one request got: the status, the `x-locus-version` header and the JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    version: Option<u64>,
    body: Value,
}

impl Http {
    async fn send(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> Answer {
        send(&self.addr, method, path, token, body).await
    }

    async fn complete(&self, request: Value) -> Answer {
        self.send("POST", "/v1/completions", None, &request.to_string())
            .await
    }
}

/// Sends one request to `addr` over a fresh HTTP/1.1 connection.
async fn send(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    send_over(stream, addr, method, path, token, body).await
}

/// Sends one request to `addr` over `io`, a fresh connection (plain or TLS).
async fn send_over<I>(
    io: I,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Answer
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json");
    if let Some(t) = token {
        request = request.header("authorization", format!("Bearer {t}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let version = response
        .headers()
        .get(server::VERSION_HEADER)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    Answer {
        status,
        version,
        body,
    }
}

/// Asserts an OpenAI-style error with `status`, naming `param` (if any) in a message that
/// contains `needle`.
fn refused(a: &Answer, status: u16, param: Option<&str>, needle: &str) {
    assert_eq!(a.status, status, "{a:?}");
    let e = &a.body["error"];
    assert_eq!(e["param"].as_str(), param, "{a:?}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert!(e["type"].is_string() && e["code"].is_string(), "{a:?}");
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(&common::fixture("llama").join("tokenizer.json")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_follow_the_grpc_complete_path_and_name_their_version() {
    let http = start_http(config(), true).await;
    let a = http
        .complete(
            json!({"model": "locus", "prompt": "The museum", "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.version, Some(0));
    assert_eq!(a.body["system_fingerprint"], "locus-v0");
    assert_eq!(a.body["locus_version"], 0);
    assert_eq!(a.body["object"], "text_completion");
    assert_eq!(a.body["model"], "locus");
    let choice = &a.body["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(a.body["usage"]["completion_tokens"], 8);
    assert_eq!(
        a.body["usage"]["total_tokens"],
        a.body["usage"]["prompt_tokens"].as_u64().unwrap() + 8
    );

    // Greedy decoding on the same snapshot gives what gRPC Complete streams.
    let mut client = http.grpc.client().await;
    let mut stream = client
        .complete(pb::CompleteRequest {
            prompt: "The museum".into(),
            max_tokens: 8,
            temperature: 0.0,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut streamed = String::new();
    while let Some(chunk) = stream.next().await {
        streamed.push_str(&chunk.unwrap().text);
    }
    assert_eq!(choice["text"], streamed);

    // Several prompts, one choice each; a seed reproduces a sample.
    let sampled = json!({"prompt": ["The museum", "London"], "max_tokens": 4, "seed": 7});
    let (one, two) = (
        http.complete(sampled.clone()).await,
        http.complete(sampled).await,
    );
    assert_eq!(one.body["choices"].as_array().unwrap().len(), 2);
    assert_eq!(one.body["choices"][1]["index"], 1);
    assert_eq!(one.body["choices"], two.body["choices"]);

    let models = http.send("GET", "/v1/models", None, "").await;
    assert_eq!((models.status, models.version), (200, Some(0)));
    assert_eq!(models.body["data"][0]["id"], "locus");
    assert_eq!(models.body["data"][0]["architecture"], "llama");

    // The tokenizer, as vLLM serves it to lm-evaluation-harness.
    let info = http.send("GET", "/tokenizer_info", None, "").await;
    assert_eq!(info.status, 200, "{info:?}");
    assert!(info.body.as_object().unwrap().contains_key("eos_token"));
    let ids = tokenizer().encode("The museum").unwrap().ids;
    let body = json!({"prompt": "The museum", "add_special_tokens": false}).to_string();
    let encoded = http.send("POST", "/tokenize", None, &body).await;
    assert_eq!(encoded.body["tokens"], json!(ids));
    let body = json!({ "tokens": ids }).to_string();
    let decoded = http.send("POST", "/detokenize", None, &body).await;
    assert_eq!(
        (decoded.version, &decoded.body["prompt"]),
        (Some(0), &json!("The museum"))
    );
    http.grpc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_logprobs_match_score_and_follow_the_version() {
    let http = start_http(config(), true).await;
    let tok = tokenizer();
    let prompt = "The museum was opened by";
    let candidates = [" Ada Lovelace", " Charles Babbage"];
    let mut client = http.grpc.client().await;
    let scored = client
        .score(prompt, &candidates.map(String::from))
        .await
        .unwrap();
    let p = tok.encode(prompt).unwrap().ids;
    // As lm-evaluation-harness asks: token ids, the prompt echoed, nothing generated.
    let batch: Vec<Vec<u32>> = candidates
        .iter()
        .map(|c| [p.clone(), tok.encode(c).unwrap().ids].concat())
        .collect();
    let a = http
        .complete(json!({"prompt": batch, "echo": true, "max_tokens": 0, "logprobs": 1, "temperature": 0}))
        .await;
    assert_eq!((a.status, a.version), (200, Some(0)), "{a:?}");
    for (i, ids) in batch.iter().enumerate() {
        let lp = &a.body["choices"][i]["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), ids.len());
        assert_eq!(lp["text_offset"].as_array().unwrap().len(), ids.len());
        let values = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(values[0], Value::Null);
        assert_eq!(lp["top_logprobs"][0], Value::Null);
        let text: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(a.body["choices"][i]["text"], text);
        let sum: f64 = values[p.len()..].iter().map(|v| v.as_f64().unwrap()).sum();
        let want = logprob(&scored, i as u32);
        assert!(
            (sum - want).abs() < 1e-4 * want.abs().max(1.0),
            "{sum} vs Score's {want}"
        );
        for (v, top) in values[1..]
            .iter()
            .zip(&lp["top_logprobs"].as_array().unwrap()[1..])
        {
            let best = top
                .as_object()
                .unwrap()
                .values()
                .next()
                .unwrap()
                .as_f64()
                .unwrap();
            assert!(
                v.as_f64().unwrap() <= best,
                "{v} above the most likely {best}"
            );
        }
    }
    assert_eq!(a.body["usage"]["completion_tokens"], 0);

    // A text prompt is encoded by the served tokenizer; offsets count characters.
    let text = http
        .complete(json!({"prompt": "Ada Lovelace", "echo": true, "max_tokens": 0, "logprobs": 0}))
        .await;
    let lp = &text.body["choices"][0]["logprobs"];
    assert_eq!(text.body["choices"][0]["text"], "Ada Lovelace");
    assert_eq!(lp["text_offset"][0], 0);
    assert!(lp["top_logprobs"][1].as_object().unwrap().is_empty());

    // After an update the answers come from the new version and differ.
    ingest(&mut client, vec![batch_of_facts()]).await.unwrap();
    wait_for_version(&mut client, 1).await;
    let b = http
        .complete(json!({"prompt": batch, "echo": true, "max_tokens": 0, "logprobs": 1}))
        .await;
    assert_eq!(
        (b.version, &b.body["system_fingerprint"]),
        (Some(1), &json!("locus-v1"))
    );
    assert_ne!(
        b.body["choices"][0]["logprobs"]["token_logprobs"],
        a.body["choices"][0]["logprobs"]["token_logprobs"]
    );

    // Generated tokens are reported after the echoed prompt (lm-evaluation-harness asks for one).
    let g = http
        .complete(json!({"prompt": [p.clone()], "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0}))
        .await;
    let tokens = g.body["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap();
    assert_eq!(tokens.len(), p.len() + 1, "{g:?}");
    http.grpc.shutdown().await;
}

fn batch_of_facts() -> pb::IngestRequest {
    batch("facts", facts())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_token_guards_the_api() {
    let http = start_http(
        Config {
            auth: Auth {
                write: Some(Token::new("w-secret")),
                query: Some(Token::new("q-secret")),
            },
            ..config()
        },
        true,
    )
    .await;
    let body = json!({"prompt": "The museum", "max_tokens": 1}).to_string();
    let send = |token| http.send("POST", "/v1/completions", token, &body);
    refused(&send(None).await, 401, None, "missing `authorization");
    let wrong = send(Some("nope")).await;
    refused(&wrong, 401, None, "invalid bearer token");
    assert_eq!(wrong.body["error"]["type"], "authentication_error");
    assert_eq!(send(Some("q-secret")).await.status, 200);
    assert_eq!(send(Some("w-secret")).await.status, 200);
    refused(
        &http.send("GET", "/v1/models", None, "").await,
        401,
        None,
        "Bearer <token>",
    );
    http.grpc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_by_field_with_openai_errors() {
    let http = start_http(config(), true).await;
    let h = &http;
    let post =
        move |body: String| async move { h.send("POST", "/v1/completions", None, &body).await };
    let c = move |v: Value| post(v.to_string());
    let a = post("{\"prompt\": ".into()).await;
    refused(&a, 400, Some("body"), "not JSON");
    assert_eq!(a.body["error"]["type"], "invalid_request_error");
    assert_eq!(a.body["error"]["code"], "invalid_argument");
    assert_eq!(
        a.version,
        Some(0),
        "an error names the version being served"
    );
    refused(
        &c(json!({"prompt": "a", "temperature": "hot"})).await,
        400,
        Some("temperature"),
        "invalid type",
    );
    refused(
        &c(json!({"prompt": "a", "temperature": -1})).await,
        400,
        Some("temperature"),
        "positive",
    );
    refused(
        &c(json!({"max_tokens": 1})).await,
        400,
        Some("prompt"),
        "required",
    );
    refused(
        &c(json!({"prompt": ""})).await,
        400,
        Some("prompt"),
        "at least 1",
    );
    refused(
        &c(json!({"prompt": [1, 2, 99999]})).await,
        400,
        Some("prompt[2]"),
        "vocabulary",
    );
    refused(
        &c(json!({"prompt": "a", "stop": ["x", ""]})).await,
        400,
        Some("stop[1]"),
        "empty",
    );
    refused(
        &c(json!({"prompt": "a", "n": 2})).await,
        400,
        Some("n"),
        "only 1",
    );
    let model = c(json!({"prompt": "a", "model": "gpt-4"})).await;
    refused(&model, 404, None, "`gpt-4` is not served");
    // Limits are those of gRPC queries: 413, naming the field.
    let limits = config().limits;
    let over = limits.max_complete_tokens + 1;
    refused(
        &c(json!({"prompt": "a", "max_tokens": over})).await,
        413,
        Some("max_tokens"),
        "at most",
    );
    let stops: Vec<String> = (0..=limits.max_stop_strings)
        .map(|i| format!("s{i}"))
        .collect();
    refused(
        &c(json!({"prompt": "a", "stop": stops})).await,
        413,
        Some("stop"),
        "strings",
    );
    let long = "word ".repeat(limits.max_document_tokens * 2);
    refused(
        &c(json!({"prompt": long})).await,
        413,
        Some("prompt"),
        "tokens",
    );
    let many = vec!["a"; limits.max_documents + 1];
    refused(
        &c(json!({"prompt": many})).await,
        413,
        Some("prompt"),
        "prompts",
    );
    let huge = json!({"prompt": "a".repeat(limits.max_message_bytes)}).to_string();
    refused(&post(huge).await, 413, Some("body"), "bytes");
    refused(
        &http.send("GET", "/v1/completions", None, "").await,
        405,
        None,
        "POST",
    );
    refused(
        &http.send("GET", "/v2/nothing", None, "").await,
        404,
        None,
        "not found",
    );
    http.grpc.shutdown().await;

    // No model yet: 503, and no version to name.
    let loading = start_http(config(), false).await;
    let a = loading.complete(json!({"prompt": "a"})).await;
    refused(&a, 503, None, "not loaded");
    assert_eq!(
        (a.version, &a.body["error"]["type"]),
        (None, &json!("server_error"))
    );
    loading.grpc.shutdown().await;
}

#[test]
fn serve_http_addr_starts_the_listener() {
    let (mut child, addr) = common::spawn_announcing(
        std::process::Command::new(env!("CARGO_BIN_EXE_locus"))
            .args(["serve", "--grpc-addr", "127.0.0.1:0", "--model"])
            .arg(common::fixture("llama"))
            .env_remove("LOCUS_CONFIG")
            .env("LOCUS_HTTP_ADDR", "127.0.0.1:0"),
        "locus: OpenAI-style API",
        true,
    );
    let models = tokio::runtime::Runtime::new().unwrap().block_on(send(
        &addr,
        "GET",
        "/v1/models",
        None,
        "",
    ));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        (models.status, models.version),
        (200, Some(0)),
        "{models:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_the_api_speaks_https_and_refuses_plaintext() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let tls = Tls {
        cert_pem: cert.cert.pem().into_bytes(),
        key_pem: cert.signing_key.serialize_pem().into_bytes(),
    };
    let http = start_http(
        Config {
            tls: Some(tls),
            ..config()
        },
        true,
    )
    .await;

    locus::tls::choose_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = tokio::net::TcpStream::connect(&http.addr).await.unwrap();
    let io = connector.connect(name, tcp).await.unwrap();
    let models = send_over(io, &http.addr, "GET", "/v1/models", None, "").await;
    assert_eq!(models.status, 200, "{models:?}");
    assert_eq!(models.body["data"][0]["id"], server::OPENAI_MODEL);
    assert_eq!(models.version, Some(0));

    // A plaintext request gets no HTTP answer from the TLS port.
    let tcp = tokio::net::TcpStream::connect(&http.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/v1/models")
        .header("host", &http.addr)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        sender.send_request(request),
    )
    .await
    .expect("the TLS port closes a plaintext connection instead of waiting");
    assert!(answer.is_err(), "{answer:?}");
}
