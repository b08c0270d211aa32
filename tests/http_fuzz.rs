//! A seeded, bounded fuzz of the OpenAI-style HTTP API against a real server on 127.0.0.1:0 with
//! the tiny Llama fixture and a query token: malformed and truncated JSON, wrong types, extreme
//! numbers, NaN and infinities (JSON has no spelling for them, so they are malformed too), invalid
//! UTF-8, oversized and truncated bodies, wrong content types, unknown paths and methods, missing
//! and bad auth, many stop strings, and completions dropped part-way. No answer may be a 5xx, come
//! without an OpenAI-style JSON error naming the problem, or miss its deadline; nothing in the
//! process may panic or log an error; afterwards a completion works.
//!
//! `LOCUS_FUZZ_SEED` and `LOCUS_FUZZ_CASES` replay a failure or run longer.

mod common;
mod serving;

use serving::draw::{pick, text};
use serving::watch::{assert_quiet, watch_panics_and_errors};
use serving::*;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use locus::server::{Auth, Config, Limits, Token};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SEED: u64 = 0x4774_f022;
const CASES: usize = 3000;
/// The random cases stop here even if fewer than `CASES` ran, so the test stays within a minute.
const TIME_BOX: Duration = Duration::from_secs(35);
/// Every request, its whole answer included, finishes within this or the server hangs.
const DEADLINE: Duration = Duration::from_secs(10);
const TOKEN: &str = "q-fuzz";
/// The server's `--send-timeout`: how long a request may take to arrive.
const PATIENCE: Duration = Duration::from_secs(2);

/// The API's endpoints with their methods.
const ENDPOINTS: [(&str, &str); 5] = [
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/tokenizer_info"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
];

/// One request as bytes on the wire.
struct Case {
    what: String,
    wire: Vec<u8>,
    /// Whether the client shuts its sending side after the bytes (so a short body ends there).
    half_close: bool,
    /// A HEAD request, whose answer has no body.
    head: bool,
}

/// What came back: the status, the content type and the body.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// How a body is framed on the wire.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Length,
    /// A `Content-Length` this many bytes past the body, which then ends (the client half-closes).
    Short(usize),
    /// A `Content-Length` this many bytes shorter than the body.
    Long(usize),
    Chunked,
    /// Chunked, without the last chunk (the client half-closes).
    ChunkedCut,
    /// No length and no chunks: an empty body.
    Unframed,
}

/// The wire bytes of a request, with `Connection: close` so the answer ends the exchange.
fn wire(
    method: &str,
    path: &str,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    framing: Framing,
) -> Vec<u8> {
    let mut out =
        format!("{method} {path} HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: ").as_bytes());
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    let length = |n: usize| format!("content-length: {n}\r\n\r\n").into_bytes();
    let chunked = |body: &[u8], last: bool| {
        let mut out = b"transfer-encoding: chunked\r\n\r\n".to_vec();
        for chunk in body.chunks(1000) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        if last {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        out
    };
    match framing {
        Framing::Length => out.extend(length(body.len())),
        Framing::Short(k) => out.extend(length(body.len() + k)),
        Framing::Long(k) => out.extend(length(body.len().saturating_sub(k))),
        Framing::Chunked => out.extend(chunked(body, true)),
        Framing::ChunkedCut => out.extend(chunked(body, false)),
        Framing::Unframed => {
            out.extend_from_slice(b"\r\n");
            return out;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A JSON value for a field that wants a number, from the edges of every type.
fn number(r: &mut StdRng) -> Value {
    match r.random_range(0..24) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(2),
        4 => json!(16),
        5 => json!(17),
        6 => json!(256),
        7 => json!(u64::MAX),
        8 => json!(i64::MIN),
        9 => json!(1.5),
        10 => json!(-0.0),
        11 => json!(1e-320),
        12 => json!(f64::MIN_POSITIVE),
        13 => json!(f64::MAX),
        14 => json!(-f64::MAX),
        15 => json!(9_007_199_254_740_993u64),
        16 => json!(0.5),
        17 => json!("5"),
        18 => json!(true),
        19 => json!([1]),
        20 => json!({"value": 1}),
        21 => json!(1e30),
        22 => json!(u32::MAX),
        _ => Value::Null,
    }
}

/// A `prompt` in any of the forms OpenAI takes, or in none of them.
fn prompt(r: &mut StdRng) -> Value {
    let id = |r: &mut StdRng| match r.random_range(0..6) {
        0 => number(r),
        _ => json!(r.random_range(0..300u32)),
    };
    match r.random_range(0..10) {
        0..4 => json!(text(r)),
        4 => json!((0..r.random_range(0..10))
            .map(|_| text(r))
            .collect::<Vec<_>>()),
        5 => json!((0..r.random_range(0..20))
            .map(|_| id(r))
            .collect::<Vec<_>>()),
        6 => {
            let seq = |r: &mut StdRng| (0..r.random_range(0..8)).map(|_| id(r)).collect();
            Value::Array(
                (0..r.random_range(0..10))
                    .map(|_| Value::Array(seq(r)))
                    .collect(),
            )
        }
        7 => json!([text(r), 5, null]),
        _ => number(r),
    }
}

/// A `stop` value: one string, a few, up to the limit, or far past it in count or bytes.
fn stop(r: &mut StdRng) -> Value {
    match r.random_range(0..8) {
        0 => json!(text(r)),
        1 => json!(["\n", ".", "é", "🦀", "a", "aa", "museum"]),
        2 => json!(vec!["é"; r.random_range(60..70)]),
        3 => json!(vec!["x".repeat(64); 64]),
        4 => json!(vec![""; 3]),
        5 => json!((0..r.random_range(1000..5000))
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()),
        6 => json!(["x".repeat(5000)]),
        _ => number(r),
    }
}

/// One of the JSON texts in `pool`, parsed.
fn literal(r: &mut StdRng, pool: &[&str]) -> Value {
    serde_json::from_str(pick(r, pool)).unwrap()
}

/// Draws one field's value.
type Draw = fn(&mut StdRng) -> Value;

/// A completion request's fields, each present or not, drawn from valid and invalid values.
fn completion(r: &mut StdRng) -> Value {
    let mut fields = Map::new();
    if r.random_bool(0.9) {
        fields.insert("prompt".into(), prompt(r));
    }
    let draws: [(&str, Draw); 12] = [
        ("max_tokens", |r| match r.random_bool(0.5) {
            true => json!(r.random_range(0..300)),
            false => number(r),
        }),
        ("temperature", number),
        ("top_p", number),
        ("stop", stop),
        ("seed", number),
        ("logprobs", |r| json!(r.random_range(-1..8))),
        ("echo", |r| literal(r, &["true", "false", "\"yes\"", "1"])),
        ("n", number),
        ("best_of", number),
        ("model", |r| {
            literal(r, &["\"locus\"", "\"gpt-4\"", "\"\"", "5"])
        }),
        ("stream", |r| literal(r, &["false", "true", "\"yes\""])),
        ("user", |r| json!(text(r))),
    ];
    for (name, draw) in draws {
        if r.random_bool(0.35) {
            fields.insert(name.into(), draw(r));
        }
    }
    Value::Object(fields)
}

/// The body for `path`: its own request's fields, or a value of the wrong shape.
fn body_for(r: &mut StdRng, path: &str) -> Vec<u8> {
    let value = match (path, r.random_range(0..10)) {
        (_, 0) => number(r),
        ("/tokenize", _) => json!({"prompt": prompt(r), "add_special_tokens": number(r)}),
        ("/detokenize", _) => json!({"tokens": prompt(r)}),
        ("/v1/completions", _) => completion(r),
        _ => return Vec::new(),
    };
    value.to_string().into_bytes()
}

/// `body` broken the ways a careless or hostile client breaks JSON.
fn mutate(r: &mut StdRng, mut body: Vec<u8>) -> Vec<u8> {
    let at = r.random_range(0..=body.len());
    match r.random_range(0..8) {
        0 => body.truncate(at),
        1 => {
            let bad: &[u8] = pick(
                r,
                &[b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"],
            );
            body.splice(at..at, bad.iter().copied());
        }
        2 => {
            // Inside a string, so that it is the decoder and not the parser that meets it.
            let quote = body.iter().position(|&b| b == b'"').map_or(at, |q| q + 1);
            body.splice(quote..quote, b"\xff\xfe".iter().copied());
        }
        3 => {
            let literal = pick(
                r,
                &[
                    "NaN",
                    "-Infinity",
                    "Infinity",
                    "1e999",
                    "-1e999",
                    "1e-999",
                    "0x10",
                    "01",
                    ".5",
                    "+1",
                    "123456789012345678901234567890",
                ],
            );
            let field = pick(
                r,
                &["temperature", "top_p", "max_tokens", "seed", "logprobs"],
            );
            body = format!("{{\"prompt\": \"a\", \"{field}\": {literal}}}").into_bytes();
        }
        4 => body = format!("[{}]", String::from_utf8_lossy(&body)).into_bytes(),
        5 => {
            body = b"{\"prompt\": \"a\", \"prompt\": [1], \"max_tokens\": 1, \"max_tokens\": -1}"
                .to_vec()
        }
        6 => body = (0..r.random_range(0..200)).map(|_| r.random()).collect(),
        _ => {
            let n = r.random_range(1..4);
            for _ in 0..n.min(body.len()) {
                let i = r.random_range(0..body.len());
                body[i] ^= 1 << r.random_range(0..8);
            }
        }
    }
    body
}

/// The `authorization` header: the right token mostly, else missing or wrong in some way.
fn authorization(r: &mut StdRng) -> Option<Vec<u8>> {
    if r.random_bool(0.85) {
        return Some(format!("Bearer {TOKEN}").into_bytes());
    }
    let long = format!("Bearer {}", "x".repeat(10_000));
    let bad: [&[u8]; 9] = [
        b"Bearer",
        b"Bearer ",
        b"Bearer nope",
        b"bearer q-fuzz",
        b"Basic cS1mdXp6",
        b"Bearer q-fuzz q-fuzz",
        b"Bearer q-fuz\xe9",
        b"Token q-fuzz",
        long.as_bytes(),
    ];
    match r.random_range(0..=bad.len()) {
        i if i < bad.len() => Some(bad[i].to_vec()),
        _ => None,
    }
}

/// A method and path: an endpoint's own mostly, else another method or a path it does not have.
fn route(r: &mut StdRng) -> (&'static str, String) {
    let (method, path) = pick(r, &ENDPOINTS);
    let method = match r.random_bool(0.8) {
        true => method,
        false => pick(
            r,
            &[
                "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW", "get",
            ],
        ),
    };
    let path = match r.random_range(0..10) {
        0 => pick(
            r,
            &[
                "/",
                "/v1",
                "/v1/completions/",
                "//v1/models",
                "/v1/%63ompletions",
                "/V1/MODELS",
                "/v1/models/locus",
                "/v1/completions%00",
                "/%ff%fe",
                "/v1/chat/completions",
                "/metrics",
            ],
        )
        .to_string(),
        1 => format!("{path}?stream=true&model=%ff"),
        2 => format!("/{}", "a".repeat(r.random_range(100..5000))),
        _ => path.to_string(),
    };
    (method, path)
}

/// One random request.
fn case(r: &mut StdRng, i: usize) -> Case {
    let (method, path) = route(r);
    let mut body = body_for(r, &path);
    if r.random_bool(0.25) {
        body = mutate(r, body);
    }
    if r.random_bool(0.03) {
        // Past the 64 KiB message limit of the test server.
        body.extend(std::iter::repeat_n(b' ', r.random_range(64_000..90_000)));
    }
    let framing = match r.random_range(0..20) {
        0 => Framing::Short(r.random_range(1..100)),
        1 => Framing::Long(r.random_range(1..10)),
        2 => Framing::Chunked,
        3 => Framing::ChunkedCut,
        4 => Framing::Unframed,
        _ => Framing::Length,
    };
    let mut headers = Vec::new();
    if let Some(value) = authorization(r) {
        headers.push(("authorization".to_string(), value));
    }
    let content_type: Option<&[u8]> = pick(
        r,
        &[
            Some(b"application/json".as_slice()),
            Some(b"application/json"),
            Some(b"text/plain"),
            Some(b"application/x-www-form-urlencoded"),
            Some(b"multipart/form-data; boundary=x"),
            Some(b"application/json; charset=latin1"),
            Some(b"}{"),
            None,
        ],
    );
    if let Some(value) = content_type {
        headers.push(("content-type".to_string(), value.to_vec()));
    }
    let half_close = matches!(framing, Framing::Short(_) | Framing::ChunkedCut);
    let shown: String = body.escape_ascii().to_string().chars().take(300).collect();
    Case {
        what: format!("case {i}: {method} {path:.80} {framing:?} {headers:?} {shown}"),
        wire: wire(method, &path, &headers, &body, framing),
        half_close,
        head: method == "HEAD",
    }
}

/// The reply in `bytes` once it is whole: a status line, headers, and `content-length` bytes.
fn parse(bytes: &[u8], head: bool) -> Option<Reply> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head_text = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head_text.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .map_or(Some(0), |n| n.parse().ok())?;
    let body = &bytes[end + 4..];
    if !head && body.len() < length {
        return None;
    }
    Some(Reply {
        status,
        content_type: headers.get("content-type").cloned(),
        body: body[..if head { 0 } else { length }].to_vec(),
    })
}

/// Sends `case` on a fresh connection and reads the reply. The bytes are written beside the
/// reading, so a server that answers before the whole body arrives is read all the same.
async fn exchange(addr: &str, case: &Case) -> Result<Reply, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut read, mut write) = stream.into_split();
    let (wire, half_close) = (case.wire.clone(), case.half_close);
    // The writer hands its half back: dropping it would shut the sending side.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&wire).await;
        if half_close {
            let _ = write.shutdown().await;
        }
        write
    });
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 16 << 10];
    let reply = loop {
        if let Some(reply) = parse(&bytes, case.head) {
            break Ok(reply);
        }
        match read.read(&mut buffer).await {
            Ok(0) => {
                break Err(format!(
                    "closed after {:?}",
                    bytes.escape_ascii().to_string()
                ))
            }
            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            Err(e) => break Err(format!("{e} after {:?}", bytes.escape_ascii().to_string())),
        }
    };
    drop(writer);
    reply
}

/// Outcomes by status and error code, printed at the end.
type Outcomes = BTreeMap<(u16, String), usize>;

/// Fails `case` unless it got a timely answer below 500: JSON with the version on success, else an
/// OpenAI-style error whose message says what was wrong and, for a bad field, names it. Returns
/// the status and the body (null for HEAD).
fn check(
    case: &Case,
    reply: Result<Result<Reply, String>, tokio::time::error::Elapsed>,
    outcomes: &mut Outcomes,
) -> (u16, Value) {
    let what = &case.what;
    let reply = reply.unwrap_or_else(|_| panic!("{what}: no answer within {DEADLINE:?}"));
    let reply = reply.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(reply.status < 500, "{what}: {reply:?}");
    assert_quiet(what);
    if case.head {
        *outcomes.entry((reply.status, "(HEAD)".into())).or_default() += 1;
        return (reply.status, Value::Null);
    }
    assert_eq!(
        reply.content_type.as_deref(),
        Some("application/json"),
        "{what}: {reply:?}"
    );
    let body: Value = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {reply:?}"));
    if reply.status == 200 {
        assert!(body["locus_version"].is_u64(), "{what}: {body}");
        *outcomes.entry((200, String::new())).or_default() += 1;
        return (200, body);
    }
    let error = &body["error"];
    let message = error["message"].as_str().unwrap_or_default();
    let code = error["code"].as_str().unwrap_or_default();
    assert!(!message.is_empty() && !code.is_empty(), "{what}: {body}");
    assert!(error["type"].is_string(), "{what}: {body}");
    if matches!(reply.status, 400 | 413)
        && ["invalid_argument", "resource_exhausted"].contains(&code)
    {
        let param = error["param"].as_str().unwrap_or_default();
        assert!(
            !param.is_empty() && message.starts_with(param),
            "{what}: {body}"
        );
    }
    *outcomes
        .entry((reply.status, code.to_string()))
        .or_default() += 1;
    (reply.status, body)
}

/// A completion dropped part-way: the connection closes while the server generates.
async fn drop_completion(addr: &str, r: &mut StdRng) {
    let prompts: Vec<&str> = (0..r.random_range(1..8)).map(|_| "The museum").collect();
    let body = json!({"prompt": prompts, "max_tokens": 256, "logprobs": 5, "echo": true});
    let request = post(body.to_string().as_bytes(), Framing::Length).wire;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(r.random_range(0..200))).await;
}

/// `case` with the client still connected after its bytes, as a slow client is.
fn stalled(case: Case) -> Case {
    Case {
        half_close: false,
        ..case
    }
}

/// The header that bears the query token.
fn authorized() -> Vec<(String, Vec<u8>)> {
    vec![(
        "authorization".to_string(),
        format!("Bearer {TOKEN}").into_bytes(),
    )]
}

/// A request, its status and the `param` its error must name.
type Known = (&'static str, Case, u16, Option<&'static str>);

/// A completion request with `body` framed as `framing`.
fn post(body: &[u8], framing: Framing) -> Case {
    Case {
        what: String::new(),
        wire: wire("POST", "/v1/completions", &authorized(), body, framing),
        half_close: matches!(framing, Framing::Short(_) | Framing::ChunkedCut),
        head: false,
    }
}

/// A request without a body.
fn bare(method: &str, path: &str, headers: Vec<(String, Vec<u8>)>) -> Case {
    Case {
        what: String::new(),
        wire: wire(method, path, &headers, b"", Framing::Length),
        half_close: false,
        head: false,
    }
}

/// Bodies whose answer is known: broken JSON, bad framing, past the limits.
fn known_bodies() -> Vec<Known> {
    let ok = br#"{"prompt": "The museum", "max_tokens": 2}"#;
    let stops = json!({"prompt": "a", "stop": vec!["é"; 5000]}).to_string();
    vec![
        (
            "NaN temperature",
            post(br#"{"prompt": "a", "temperature": NaN}"#, Framing::Length),
            400,
            Some("body"),
        ),
        (
            "1e999 top_p",
            post(br#"{"prompt": "a", "top_p": 1e999}"#, Framing::Length),
            400,
            Some("body"),
        ),
        (
            "invalid UTF-8 in the prompt",
            post(b"{\"prompt\": \"a\xff\"}", Framing::Length),
            400,
            Some("body"),
        ),
        (
            "5,000 stop strings",
            post(stops.as_bytes(), Framing::Length),
            413,
            Some("stop"),
        ),
        (
            "a body shorter than its length",
            post(ok, Framing::Short(10)),
            400,
            Some("body"),
        ),
        (
            "chunks without the last",
            post(ok, Framing::ChunkedCut),
            400,
            Some("body"),
        ),
        ("chunked", post(ok, Framing::Chunked), 200, None),
        (
            "a body that stops arriving",
            stalled(post(ok, Framing::Short(10))),
            408,
            None,
        ),
        (
            "a body past the limit",
            post(&[b' '; 70_000], Framing::Length),
            413,
            Some("body"),
        ),
    ]
}

/// Refusals before the body is read: auth, methods and paths.
fn known_refusals() -> Vec<Known> {
    vec![
        (
            "no token",
            bare("POST", "/v1/completions", vec![]),
            401,
            None,
        ),
        (
            "a wrong token",
            bare(
                "GET",
                "/v1/models",
                vec![("authorization".into(), b"Bearer nope".to_vec())],
            ),
            401,
            None,
        ),
        (
            "PUT",
            bare("PUT", "/v1/completions", authorized()),
            405,
            None,
        ),
        (
            "an unknown path",
            bare("GET", "/v1/chat/completions", authorized()),
            404,
            None,
        ),
    ]
}

/// A request whose headers stop arriving: the server hangs up once its patience is spent.
async fn headers_that_stop_arriving(addr: &str) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: fuzz\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "headers that stop arriving: still connected after {DEADLINE:?}"
    );
    assert!(
        start.elapsed() >= PATIENCE,
        "hung up after {:?}",
        start.elapsed()
    );
}

fn fuzz_config() -> Config {
    let base = config();
    Config {
        auth: Auth {
            write: None,
            query: Some(Token::new(TOKEN)),
        },
        // Long enough that a dropped completion is still generating when its client goes.
        limits: Limits {
            max_complete_tokens: 256,
            // Short, so that a request that stops arriving is answered within the deadline.
            send_timeout: PATIENCE,
            ..base.limits
        },
        ..base
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_http_request_gets_a_5xx_a_bare_error_or_a_hang() {
    watch_panics_and_errors();
    let seed = std::env::var("LOCUS_FUZZ_SEED").map_or(SEED, |s| s.parse().unwrap());
    let cases = std::env::var("LOCUS_FUZZ_CASES").map_or(CASES, |s| s.parse().unwrap());
    eprintln!("http fuzz: seed {seed}, {cases} cases at most, {TIME_BOX:?} at most");
    let http = start_http(fuzz_config(), true).await;
    let mut outcomes = Outcomes::new();
    for (what, mut case, status, param) in known_bodies().into_iter().chain(known_refusals()) {
        case.what = what.to_string();
        let reply = tokio::time::timeout(DEADLINE, exchange(&http.addr, &case)).await;
        let (got, body) = check(&case, reply, &mut outcomes);
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["param"].as_str(), param, "{what}: {body}");
    }
    headers_that_stop_arriving(&http.addr).await;
    let mut r = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut ran = 0;
    while ran < cases && start.elapsed() < TIME_BOX {
        if r.random_range(0..20) == 0 {
            drop_completion(&http.addr, &mut r).await;
        } else {
            let case = case(&mut r, ran);
            let reply = tokio::time::timeout(DEADLINE, exchange(&http.addr, &case)).await;
            check(&case, reply, &mut outcomes);
        }
        ran += 1;
    }
    eprintln!("http fuzz: {ran} cases in {:.1?}", start.elapsed());
    for ((status, code), n) in &outcomes {
        eprintln!("http fuzz: {n:5} {status} {code}");
    }

    // Dropped completions gave their query slots back: a normal completion is answered in time.
    let after = Case {
        what: "a completion after the fuzz".into(),
        ..post(
            br#"{"prompt": "The museum", "max_tokens": 8, "temperature": 0}"#,
            Framing::Length,
        )
    };
    let reply = tokio::time::timeout(DEADLINE, exchange(&http.addr, &after)).await;
    let (status, body) = check(&after, reply, &mut outcomes);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
    assert_quiet("after the fuzz");
    http.grpc.shutdown().await;
}
