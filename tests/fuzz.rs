//! A seeded, bounded fuzz of every RPC against a real server on 127.0.0.1:0 with the tiny Llama
//! fixture: random and mutated request bytes (truncated messages, wrong wire types, invalid UTF-8),
//! valid requests with extreme values, and calls and streams dropped part-way. No answer may be
//! INTERNAL or UNKNOWN or miss its deadline, nothing in the process may panic or log an error, and
//! afterwards the server is healthy, scores and learns.
//!
//! `LOCUS_FUZZ_SEED` and `LOCUS_FUZZ_CASES` replay a failure or run longer.

mod common;
mod serving;

use serving::draw::{pick, text, SENTENCES};
use serving::watch::{assert_quiet, watch_panics_and_errors};
use serving::*;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use locus::proto::v1 as pb;
use locus::server::Config;
use locus::store::Durability;
use prost::encoding::encode_varint;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{http, Service};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const SEED: u64 = 0x10c5_f022;
const CASES: usize = 3000;
/// Every call, its whole answer stream included, finishes within this or the server hangs.
const DEADLINE: Duration = Duration::from_secs(10);

/// How an RPC carries its messages.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Unary,
    ServerStreaming,
    Bidi,
}

/// One RPC the fuzz calls.
struct Rpc {
    path: &'static str,
    shape: Shape,
    /// Field-number paths, through nested messages, to the request's string fields.
    strings: &'static [&'static [u32]],
    /// A valid request, encoded, with values drawn from the edges of their types.
    valid: fn(&mut StdRng) -> Vec<u8>,
}

const INGEST: usize = 0;
const SCORE: usize = 2;
const COMPLETE: usize = 3;

const RPCS: [Rpc; 12] = [
    Rpc {
        path: "/locus.v1.Learn/Ingest",
        shape: Shape::Bidi,
        strings: &[&[1, 1], &[1, 3], &[1, 4], &[2]],
        valid: |r| ingest_request(r).encode_to_vec(),
    },
    Rpc {
        path: "/locus.v1.Learn/Trace",
        shape: Shape::Unary,
        strings: &[&[1, 1], &[1, 3]],
        valid: |r| {
            let texts = many(r, |r| {
                let (text, spans, salient) = marked(r);
                pb::TraceText {
                    text,
                    spans,
                    salient,
                }
            });
            pb::TraceRequest { texts }.encode_to_vec()
        },
    },
    Rpc {
        path: "/locus.v1.Query/Score",
        shape: Shape::Unary,
        strings: &[&[1], &[2]],
        valid: |r| {
            let request = pb::ScoreRequest {
                prompt: text(r),
                candidates: many(r, text),
            };
            request.encode_to_vec()
        },
    },
    Rpc {
        path: "/locus.v1.Query/Complete",
        shape: Shape::ServerStreaming,
        strings: &[&[1], &[5]],
        valid: |r| complete_request(r).encode_to_vec(),
    },
    Rpc {
        path: "/locus.v1.Query/Perplexity",
        shape: Shape::Unary,
        strings: &[&[1]],
        valid: |r| {
            pb::PerplexityRequest {
                texts: many(r, text),
            }
            .encode_to_vec()
        },
    },
    Rpc {
        path: "/locus.v1.Admin/Info",
        shape: Shape::Unary,
        strings: &[],
        valid: |_| Vec::new(),
    },
    Rpc {
        path: "/locus.v1.Admin/Pause",
        shape: Shape::Unary,
        strings: &[],
        valid: |_| Vec::new(),
    },
    Rpc {
        path: "/locus.v1.Admin/Resume",
        shape: Shape::Unary,
        strings: &[],
        valid: |_| Vec::new(),
    },
    Rpc {
        path: "/locus.v1.Admin/ListVersions",
        shape: Shape::Unary,
        strings: &[],
        valid: |_| Vec::new(),
    },
    Rpc {
        path: "/locus.v1.Admin/Rollback",
        shape: Shape::Unary,
        strings: &[],
        valid: |r| {
            pb::RollbackRequest {
                version: edge_u64(r),
            }
            .encode_to_vec()
        },
    },
    Rpc {
        path: "/locus.v1.Admin/Checkpoint",
        shape: Shape::Unary,
        strings: &[],
        valid: |_| Vec::new(),
    },
    Rpc {
        path: "/grpc.health.v1.Health/Check",
        shape: Shape::Unary,
        strings: &[&[1]],
        valid: |r| {
            let service = pick(r, &["", "locus.v1.Query", "locus.v1.Nope", "\u{0}"]).to_string();
            HealthCheckRequest { service }.encode_to_vec()
        },
    },
];

/// Reflection is fuzzed too: it reads client-chosen names from the same connection.
const REFLECTION: Rpc = Rpc {
    path: "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    shape: Shape::Bidi,
    strings: &[&[1], &[3], &[4], &[7]],
    valid: |r| {
        let name = text(r);
        let message_request = match r.random_range(0..3) {
            0 => MessageRequest::ListServices(name),
            1 => MessageRequest::FileByFilename(name),
            _ => MessageRequest::FileContainingSymbol(name),
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message_request),
        };
        request.encode_to_vec()
    },
};

fn edge_u64(r: &mut StdRng) -> u64 {
    pick(
        r,
        &[
            0,
            1,
            2,
            3,
            7,
            u64::from(u32::MAX),
            i64::MAX as u64,
            u64::MAX,
        ],
    )
}

fn edge_u32(r: &mut StdRng) -> u32 {
    pick(r, &[0, 1, 2, 15, 16, 17, 1000, i32::MAX as u32, u32::MAX])
}

fn edge_f32(r: &mut StdRng) -> f32 {
    pick(
        r,
        &[
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -f32::MAX,
            -1.0,
            -0.0,
            0.0,
            f32::from_bits(1),
            f32::MIN_POSITIVE,
            1e-30,
            0.5,
            1.0,
            1.000_000_1,
            2.0,
            1e30,
            f32::MAX,
        ],
    )
}

fn span(r: &mut StdRng) -> pb::Span {
    pb::Span {
        start: edge_u64(r),
        end: edge_u64(r),
    }
}

/// A text to learn or trace with its spans and salient strings: half the time a sentence marked
/// where it can be, else each part drawn on its own.
fn marked(r: &mut StdRng) -> (String, Vec<pb::Span>, Vec<String>) {
    if r.random_bool(0.5) {
        let text = pick(r, &[SENTENCES[0], SENTENCES[3]]);
        let words: Vec<&str> = text.split(' ').collect();
        let salient: Vec<String> = (0..r.random_range(0..3))
            .map(|_| pick(r, &words).to_string())
            .collect();
        // Characters 3..8 are a word or part of one in both sentences.
        let spans = match salient.is_empty() || r.random_bool(0.5) {
            true => vec![pb::Span { start: 3, end: 8 }],
            false => Vec::new(),
        };
        return (text.to_string(), spans, salient);
    }
    (text(r), many(r, span), many(r, text))
}

/// A few of `item`; now and then none, or thousands of empty ones (small enough to fit in a
/// message, and far past every count limit).
fn many<T: Default + Clone>(r: &mut StdRng, item: impl Fn(&mut StdRng) -> T) -> Vec<T> {
    match r.random_range(0..10) {
        0 => Vec::new(),
        1 => vec![T::default(); r.random_range(1000..20_000)],
        _ => (0..r.random_range(1..4)).map(|_| item(r)).collect(),
    }
}

fn ingest_request(r: &mut StdRng) -> pb::IngestRequest {
    let documents = many(r, |r| {
        let (body, spans, salient) = marked(r);
        pb::Document {
            text: body,
            spans,
            salient,
            source: text(r),
            timestamp: r.random_bool(0.5).then(|| prost_types::Timestamp {
                seconds: pick(r, &[i64::MIN, -1, 0, 1_620_000_000, i64::MAX]),
                nanos: pick(r, &[i32::MIN, -1, 0, 999_999_999, 1_000_000_000, i32::MAX]),
            }),
        }
    });
    pb::IngestRequest {
        documents,
        client_batch_id: text(r),
    }
}

fn complete_request(r: &mut StdRng) -> pb::CompleteRequest {
    pb::CompleteRequest {
        prompt: text(r),
        max_tokens: edge_u32(r),
        temperature: edge_f32(r),
        top_p: edge_f32(r),
        stop: many(r, text),
        seed: r.random_bool(0.8).then(|| edge_u64(r)),
    }
}

/// Byte sequences that are not UTF-8: a stray byte, an overlong form, a surrogate, a cut
/// character, a lone continuation byte, and a valid prefix before them.
fn not_utf8(r: &mut StdRng) -> Vec<u8> {
    let bad = pick(
        r,
        &[
            &[0xff][..],
            &[0xc0, 0x80],
            &[0xed, 0xa0, 0x80],
            &[0xe2, 0x82],
            &[0x80],
            &[0xf4, 0x90, 0x80, 0x80],
        ],
    );
    let mut out = b"Ada ".repeat(r.random_range(0..3));
    out.extend_from_slice(bad);
    out
}

/// `payload` as the length-delimited field at `path`, each step a message inside the last.
fn nested(path: &[u32], payload: Vec<u8>) -> Vec<u8> {
    path.iter().rev().fold(payload, |inner, &field| {
        let mut out = Vec::new();
        encode_varint(u64::from(field << 3 | 2), &mut out);
        encode_varint(inner.len() as u64, &mut out);
        out.extend(inner);
        out
    })
}

fn random_bytes(r: &mut StdRng, max: usize) -> Vec<u8> {
    (0..r.random_range(0..=max)).map(|_| r.random()).collect()
}

/// One request message for `rpc` and what was done to it.
fn request(r: &mut StdRng, rpc: &Rpc) -> (Vec<u8>, &'static str) {
    let mut bytes = (rpc.valid)(r);
    let what = match r.random_range(0..10) {
        0 => return (random_bytes(r, 64), "random bytes"),
        1 => return (random_bytes(r, 4096), "random bytes"),
        2..5 => "valid",
        5 => {
            bytes.truncate(r.random_range(0..=bytes.len()));
            "truncated"
        }
        6 => {
            for _ in 0..r.random_range(1..4) {
                if !bytes.is_empty() {
                    let at = r.random_range(0..bytes.len());
                    bytes[at] = r.random();
                }
            }
            "bytes overwritten"
        }
        7 => {
            // A field of the request (or just past its fields) with any of the eight wire types,
            // six of which are wrong for it and two of which do not exist.
            let mut field = Vec::new();
            let number = r.random_range(1..8u64);
            encode_varint(number << 3 | r.random_range(0..8u64), &mut field);
            field.extend(random_bytes(r, 16));
            bytes.extend(field);
            "wrong wire type"
        }
        8 if !rpc.strings.is_empty() => {
            let path = pick(r, rpc.strings);
            bytes.extend(nested(path, not_utf8(r)));
            "invalid UTF-8"
        }
        _ => {
            // An unknown field that takes the message past the server's 64 KiB limit.
            bytes.extend(nested(&[1000], vec![0; 70_000]));
            "over the message limit"
        }
    };
    (bytes, what)
}

/// Calls `rpc` with `messages` (one unless it streams requests) and collects every answer.
async fn call(
    grpc: &Grpc<Channel>,
    rpc: &Rpc,
    messages: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>, Status> {
    let mut grpc = grpc.clone();
    grpc.ready()
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let path = PathAndQuery::from_static(rpc.path);
    let mut stream = match rpc.shape {
        Shape::Unary => {
            let one = messages.into_iter().next().unwrap();
            let answer = grpc.unary(Request::new(one), path, Raw).await?;
            return Ok(vec![answer.into_inner()]);
        }
        Shape::ServerStreaming => {
            let one = messages.into_iter().next().unwrap();
            grpc.server_streaming(Request::new(one), path, Raw).await?
        }
        Shape::Bidi => {
            let requests = tokio_stream::iter(messages);
            grpc.streaming(Request::new(requests), path, Raw).await?
        }
    }
    .into_inner();
    let mut answers = Vec::new();
    while let Some(answer) = stream.next().await {
        answers.push(answer?);
    }
    Ok(answers)
}

/// How often each RPC answered with each code, printed at the end to show what the cases reached.
static OUTCOMES: Mutex<BTreeMap<(&str, &str), usize>> = Mutex::new(BTreeMap::new());

/// A request body of gRPC frames around `messages`: now and then a frame flagged compressed
/// (no encoding was agreed), a length that claims more or less than follows, or the body cut.
fn frames(r: &mut StdRng, messages: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    for m in messages {
        let flag = match r.random_bool(0.2) {
            true => pick(r, &[1u8, 2, 0x80, 0xff]),
            false => 0,
        };
        let length = match r.random_range(0..8) {
            0 => m.len() + r.random_range(1..100),
            1 => m.len().saturating_sub(r.random_range(1..10)),
            2 => pick(r, &[70_000, u32::MAX as usize]),
            _ => m.len(),
        };
        body.push(flag);
        body.extend((length as u32).to_be_bytes());
        body.extend(m);
    }
    if r.random_bool(0.2) {
        body.truncate(r.random_range(0..=body.len()));
    }
    body
}

/// The content type and, now and then, gRPC headers with values from their edges.
fn grpc_headers(r: &mut StdRng) -> Vec<(&'static str, &'static str)> {
    let mut headers = vec![(
        "content-type",
        pick(
            r,
            &[
                "application/grpc",
                "application/grpc",
                "application/grpc+proto",
                "application/grpc+json",
                "application/json",
                "text/plain",
            ],
        ),
    )];
    if r.random_bool(0.3) {
        let timeout = [
            "0n",
            "1n",
            "1m",
            "99999999H",
            "100000000S",
            "-1S",
            "1x",
            "",
            "S",
        ];
        headers.push(("grpc-timeout", pick(r, &timeout)));
    }
    if r.random_bool(0.3) {
        let encoding = ["identity", "gzip", "zstd", "deflate", "x", ""];
        headers.push(("grpc-encoding", pick(r, &encoding)));
    }
    if r.random_bool(0.2) {
        let accepted = ["gzip", "identity,gzip,zstd", ",,,", "*"];
        headers.push(("grpc-accept-encoding", pick(r, &accepted)));
    }
    headers
}

/// Calls `rpc` with `body` as the HTTP/2 request body, framed or not, and reads the status
/// wherever it comes: in the headers of a trailers-only answer or in the trailers. A failure
/// of the call itself is the status tonic's client would report (the channel also honours
/// `grpc-timeout`, and a short one expires on this side as CANCELLED).
async fn call_framed(
    channel: &Channel,
    rpc: &Rpc,
    headers: &[(&'static str, &'static str)],
    body: Vec<u8>,
) -> Result<Vec<Vec<u8>>, Status> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(rpc.path)
        .header("te", "trailers");
    for &(name, value) in headers {
        request = request.header(name, value);
    }
    let request = request
        .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
        .unwrap();
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let answer = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (head, body) = answer.into_parts();
    let status = match Status::from_header_map(&head.headers) {
        Some(status) => status,
        None => {
            let body = body.collect().await?;
            let trailers = body.trailers().expect("trailers with the status");
            Status::from_header_map(trailers).expect("a grpc-status trailer")
        }
    };
    match status.code() {
        Code::Ok => Ok(Vec::new()),
        _ => Err(status),
    }
}

/// Fails unless `result`, the outcome of `case`, is an answer or the client's fault, and was in
/// time; answers that carry numbers must not carry NaN.
fn check(
    case: &str,
    rpc: &Rpc,
    result: Result<Result<Vec<Vec<u8>>, Status>, tokio::time::error::Elapsed>,
) {
    let answers = match result {
        Err(_) => panic!("{case}: no answer within {DEADLINE:?}"),
        Ok(Err(s)) => {
            let code = s.code().description();
            *OUTCOMES
                .lock()
                .unwrap()
                .entry((rpc.path, code))
                .or_default() += 1;
            assert!(
                !matches!(s.code(), Code::Internal | Code::Unknown),
                "{case}: {s:?}"
            );
            return;
        }
        Ok(Ok(answers)) => answers,
    };
    *OUTCOMES
        .lock()
        .unwrap()
        .entry((rpc.path, "ok"))
        .or_default() += 1;
    for bytes in answers {
        let numbers: Vec<f64> = match rpc.path {
            "/locus.v1.Query/Score" => pb::ScoreResponse::decode(&bytes[..])
                .unwrap()
                .ranked
                .iter()
                .map(|c| c.logprob)
                .collect(),
            "/locus.v1.Query/Perplexity" => pb::PerplexityResponse::decode(&bytes[..])
                .unwrap()
                .texts
                .iter()
                .flat_map(|t| [t.perplexity, t.mean_nll])
                .collect(),
            _ => Vec::new(),
        };
        assert!(!numbers.iter().any(|n| n.is_nan()), "{case}: {numbers:?}");
    }
    assert_quiet(case);
}

fn hex(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(48).map(|b| format!("{b:02x}")).collect();
    format!(
        "{shown}{} ({} bytes)",
        if bytes.len() > 48 { "…" } else { "" },
        bytes.len()
    )
}

/// A batch the learner takes: the documents the other tests learn.
fn learnable(id: usize) -> Vec<u8> {
    batch(&format!("fuzz-{id}"), facts()).encode_to_vec()
}

/// Ingest batches the learner takes, then the stream dropped, as a client that dies does: after
/// the first answer or while the batches are still being learned.
async fn drop_ingest(grpc: &Grpc<Channel>, r: &mut StdRng, case: &str) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut grpc = grpc.clone();
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static(RPCS[INGEST].path);
    let answers = tokio::time::timeout(
        DEADLINE,
        grpc.streaming(Request::new(ReceiverStream::new(rx)), path, Raw),
    )
    .await;
    let mut answers = match answers {
        Ok(Ok(a)) => a.into_inner(),
        other => return check(case, &RPCS[INGEST], other.map(|a| a.map(|_| Vec::new()))),
    };
    for id in 0..r.random_range(1..4) {
        tx.send(learnable(id)).await.unwrap();
    }
    if r.random_bool(0.5) {
        let first = tokio::time::timeout(DEADLINE, answers.next()).await;
        let first = first.map(|a| a.expect("an answer or a status").map(|a| vec![a]));
        check(case, &RPCS[INGEST], first);
    }
    // The answers go first, so the server sees a reset, not a request stream that ended.
    drop(answers);
    drop(tx);
}

/// A completion dropped after its first chunk, or before any.
async fn drop_complete(grpc: &Grpc<Channel>, r: &mut StdRng, case: &str) {
    let rpc = &RPCS[COMPLETE];
    let request = pb::CompleteRequest {
        prompt: "The museum".into(),
        max_tokens: 16,
        temperature: pick(r, &[0.0, 0.7, 1.5]),
        seed: Some(r.random()),
        ..Default::default()
    };
    let mut grpc = grpc.clone();
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static(rpc.path);
    let started = grpc.server_streaming(Request::new(request.encode_to_vec()), path, Raw);
    if r.random_bool(0.2) {
        // Not even polled: the request may or may not have left.
        return drop(started);
    }
    let first = tokio::time::timeout(DEADLINE, async {
        let mut chunks = started.await?.into_inner();
        let first = chunks.next().await.expect("a first chunk")?;
        Ok(vec![first])
    })
    .await;
    check(case, rpc, first);
}

/// A unary query abandoned after a random few milliseconds, usually mid-computation.
async fn drop_unary(grpc: &Grpc<Channel>, r: &mut StdRng, case: &str) {
    let rpc = &RPCS[pick(r, &[1, 2, 4])];
    let message = (rpc.valid)(r);
    let patience = Duration::from_micros(r.random_range(0..20_000));
    if let Ok(result) = tokio::time::timeout(patience, call(grpc, rpc, vec![message])).await {
        check(case, rpc, Ok(result));
    }
}

/// The edges issue 13 names, each with the one code it must get.
fn extremes() -> Vec<(&'static str, usize, Vec<u8>, Code)> {
    let complete = |temperature: f32, top_p: f32, max_tokens: u32| {
        let request = pb::CompleteRequest {
            prompt: "The museum".into(),
            max_tokens,
            temperature,
            top_p,
            seed: Some(1),
            ..Default::default()
        };
        request.encode_to_vec()
    };
    let score = |prompt: &str, candidates: Vec<String>| {
        let request = pb::ScoreRequest {
            prompt: prompt.into(),
            candidates,
        };
        request.encode_to_vec()
    };
    let tiny = f32::from_bits(1);
    let a = || vec![" a".to_string()];
    vec![
        (
            "NaN temperature",
            COMPLETE,
            complete(f32::NAN, 0.0, 4),
            Code::InvalidArgument,
        ),
        (
            "infinite temperature",
            COMPLETE,
            complete(f32::INFINITY, 0.0, 4),
            Code::InvalidArgument,
        ),
        (
            "negative temperature",
            COMPLETE,
            complete(-1.0, 0.0, 4),
            Code::InvalidArgument,
        ),
        (
            "subnormal temperature",
            COMPLETE,
            complete(tiny, 0.0, 4),
            Code::Ok,
        ),
        (
            "largest temperature",
            COMPLETE,
            complete(f32::MAX, 1.0, 4),
            Code::Ok,
        ),
        (
            "NaN top_p",
            COMPLETE,
            complete(1.0, f32::NAN, 4),
            Code::InvalidArgument,
        ),
        (
            "top_p above 1",
            COMPLETE,
            complete(1.0, 1.000_000_1, 4),
            Code::InvalidArgument,
        ),
        (
            "negative top_p",
            COMPLETE,
            complete(1.0, -0.5, 4),
            Code::InvalidArgument,
        ),
        (
            "subnormal top_p",
            COMPLETE,
            complete(1.0, tiny, 4),
            Code::Ok,
        ),
        (
            "u32::MAX max_tokens",
            COMPLETE,
            complete(0.0, 0.0, u32::MAX),
            Code::ResourceExhausted,
        ),
        (
            "an empty prompt",
            SCORE,
            score("", a()),
            Code::InvalidArgument,
        ),
        (
            "a 40 KB prompt",
            SCORE,
            score(&"word ".repeat(8000), a()),
            Code::ResourceExhausted,
        ),
        (
            "16,000 candidates",
            SCORE,
            score("The museum", vec![" a".into(); 16_000]),
            Code::ResourceExhausted,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_makes_the_server_fail_hang_or_panic() {
    watch_panics_and_errors();
    let seed = std::env::var("LOCUS_FUZZ_SEED").map_or(SEED, |s| s.parse().unwrap());
    let cases = std::env::var("LOCUS_FUZZ_CASES").map_or(CASES, |s| s.parse().unwrap());
    eprintln!("fuzz: seed {seed}, {cases} cases");
    let data = tempfile::tempdir().unwrap();
    // A data directory, so that Checkpoint and Rollback to the base model do their work.
    let config = Config {
        durability: Some(Durability {
            dir: data.path().to_path_buf(),
            checkpoint_every: 8,
            keep_checkpoints: 2,
        }),
        ..config()
    };
    let server = start_with(config, true).await;
    let channel = channel(&server.addr).await;
    let grpc = Grpc::new(channel.clone());
    let mut client = server.client().await;
    for (what, rpc, message, expected) in extremes() {
        // Within the message limit, so that the handler sees it.
        assert!(message.len() < 64 << 10, "{what}: {} bytes", message.len());
        let answer = tokio::time::timeout(DEADLINE, call(&grpc, &RPCS[rpc], vec![message])).await;
        let answer = answer.unwrap_or_else(|_| panic!("{what}: no answer within {DEADLINE:?}"));
        let code = answer.map_or_else(|s| s.code(), |_| Code::Ok);
        assert_eq!(code, expected, "{what}");
    }
    let mut r = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    for i in 0..cases {
        let kind = r.random_range(0..20);
        let rpc = match kind {
            0 => &REFLECTION,
            _ => &RPCS[r.random_range(0..RPCS.len())],
        };
        if kind == 1 || rpc.path == RPCS[INGEST].path {
            // A fuzzed Admin.Pause may have stopped learning, which Ingest would refuse.
            client.resume().await.unwrap();
        }
        match kind {
            1 => drop_ingest(&grpc, &mut r, &format!("case {i}: Ingest dropped")).await,
            2 => drop_complete(&grpc, &mut r, &format!("case {i}: Complete dropped")).await,
            3 => drop_unary(&grpc, &mut r, &format!("case {i}: a query dropped")).await,
            4 => {
                let n = r.random_range(0..4);
                let (messages, what): (Vec<_>, Vec<_>) =
                    (0..n).map(|_| request(&mut r, rpc)).unzip();
                let body = frames(&mut r, &messages);
                let headers = grpc_headers(&mut r);
                let case = format!(
                    "case {i}: {} framed {what:?} {headers:?} {}",
                    rpc.path,
                    hex(&body)
                );
                let framed = call_framed(&channel, rpc, &headers, body);
                let result = tokio::time::timeout(DEADLINE, framed).await;
                check(&case, rpc, result);
            }
            _ => {
                let n = if rpc.shape == Shape::Bidi {
                    r.random_range(1..4)
                } else {
                    1
                };
                let (messages, what): (Vec<_>, Vec<_>) =
                    (0..n).map(|_| request(&mut r, rpc)).unzip();
                let case = format!(
                    "case {i}: {} {what:?} {:?}",
                    rpc.path,
                    messages.iter().map(|m| hex(m)).collect::<Vec<_>>()
                );
                let result = tokio::time::timeout(DEADLINE, call(&grpc, rpc, messages)).await;
                check(&case, rpc, result);
            }
        }
    }
    eprintln!("fuzz: {cases} cases in {:.1?}", start.elapsed());
    for ((path, code), n) in OUTCOMES.lock().unwrap().iter() {
        eprintln!("fuzz: {n:5} {path} {code}");
    }

    // Batches of dropped streams are still learned; then the server must be whole.
    wait_for_info(&mut client, "an empty learning queue", |i| {
        i.queue_depth == 0
    })
    .await;
    assert_quiet("after the fuzz");
    let mut health = HealthClient::new(channel);
    for service in ["", "locus.v1.Learn", "locus.v1.Query", "locus.v1.Admin"] {
        let check = HealthCheckRequest {
            service: service.into(),
        };
        let s = health.check(check).await.unwrap().into_inner();
        assert_eq!(s.status(), ServingStatus::Serving, "{service:?}");
    }
    let scored = score(&mut client).await;
    assert!(
        scored
            .ranked
            .iter()
            .all(|c| c.logprob.is_finite() && c.logprob < 0.0),
        "{scored:?}"
    );
    client.resume().await.unwrap();
    let learned = ingest(&mut client, vec![batch("after", facts())])
        .await
        .unwrap();
    assert_eq!(learned[0].accepted, [0, 1, 2]);
    assert_quiet("after the fuzz");
    server.shutdown().await;
}
