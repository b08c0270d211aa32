//! A real server on 127.0.0.1:0 with the tiny Llama fixture against clients that stop reading,
//! never send, open more streams than allowed or answer no ping, and against batches built to
//! blow up the loss: every resource such a client holds is given back after its bound, no
//! non-finite value reaches the served weights, and the server stays healthy.

mod common;
mod serving;

use serving::frames::{self, Connection};
use serving::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use locus::client::Client;

use locus::proto::v1 as pb;
use locus::proto::v1::learn_client::LearnClient;
use locus::server::{Config, Guard, Limits};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// How long the tests' server waits for a client to take an answer.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A server under the test configuration with `limits` changed by `change`.
async fn start_limited(change: impl FnOnce(&mut Limits)) -> Running {
    let mut config = config();
    change(&mut config.limits);
    start_with(config, true).await
}

/// A connection whose client reads nothing: a 16-byte stream window it never opens further, so
/// the server can send it only the start of one answer.
async fn never_reading(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(Some(16))
        .connect()
        .await
        .unwrap()
}

/// A completion that runs to its length limit unless stopped.
fn long_completion() -> pb::CompleteRequest {
    pb::CompleteRequest {
        prompt: "The museum".into(),
        max_tokens: 256,
        temperature: 1.0,
        seed: Some(7),
        ..Default::default()
    }
}

/// Reads `stream` to its end: the answers, and the status it ended with.
async fn drain<T>(mut stream: tonic::Streaming<T>) -> (Vec<T>, Option<tonic::Status>) {
    let mut answers = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(a) => answers.push(a),
            Err(s) => return (answers, Some(s)),
        }
    }
    (answers, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_nobody_reads_give_their_query_slots_back_after_the_send_timeout() {
    let server = start_limited(|l| {
        l.query_concurrency = 2;
        l.query_wait = Duration::from_secs(20);
        l.send_timeout = SEND_TIMEOUT;
        l.max_complete_tokens = 256;
    })
    .await;
    // Two clients that give the server no window to send in: each completion holds a slot and
    // cannot finish.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut c = Connection::open_with(&server.addr, &[(frames::INITIAL_WINDOW_SIZE, 0)]).await;
        let request = long_completion().encode_to_vec();
        c.call(1, "/locus.v1.Query/Complete", &request).await;
        stalled.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A score gets a slot once the send timeout ends them, long before it would give up waiting.
    let start = Instant::now();
    let scored = score(&mut server.client().await).await;
    let waited = start.elapsed();
    assert!(scored.ranked.iter().all(|c| c.logprob.is_finite()));
    assert!(
        waited >= SEND_TIMEOUT / 2 && waited < Duration::from_secs(10),
        "the score waited {waited:?}"
    );
    // Both have met the send timeout by now (the second may have stalled later than the first).
    tokio::time::sleep(SEND_TIMEOUT * 3).await;
    // Once read, each stalled stream holds the chunks generated before it stalled, no final chunk,
    // and its end.
    for mut c in stalled {
        c.open_window(0, 1 << 20).await;
        c.open_window(1, 1 << 20).await;
        let (frames, _) = c.read_for(Duration::from_secs(1)).await;
        let chunks: Vec<_> = frames::messages(&frames, 1)
            .iter()
            .map(|m| pb::CompleteChunk::decode(&m[..]).unwrap())
            .collect();
        assert!(
            !chunks.is_empty() && chunks.len() < 64,
            "{} chunks",
            chunks.len()
        );
        assert!(chunks.iter().all(|c| c.finish_reason == 0), "{chunks:?}");
        let ended = frames.iter().any(|f| {
            f.stream == 1 && f.kind == frames::HEADERS && f.flags & frames::END_STREAM != 0
        });
        assert!(ended, "{frames:?}");
    }
    // A completion whose client reads runs to its end.
    let mut reader = server.client().await;
    let (chunks, status) = drain(reader.complete(long_completion()).await.unwrap()).await;
    assert!(status.is_none(), "{status:?}");
    assert_ne!(chunks.last().unwrap().finish_reason, 0);
    assert_eq!(health(&server.addr).await, ServingStatus::Serving);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_stream_whose_client_stops_reading_is_ended_after_the_send_timeout() {
    let server = start_limited(|l| l.send_timeout = SEND_TIMEOUT).await;
    let mut learn = LearnClient::new(never_reading(&server.addr).await);
    let batches: Vec<_> = (0..12)
        .map(|i| batch(&format!("b{i}"), facts()[..1].to_vec()))
        .collect();
    let stream = learn
        .ingest(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    // Learning the batches the server took takes well under a second with the tiny model; then
    // their answers wait for the client for the send timeout.
    tokio::time::sleep(SEND_TIMEOUT * 5).await;
    let (answers, status) = drain(stream).await;
    let status = status.expect("a stalled ingest stream ends with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--send-timeout"), "{status:?}");
    assert!(
        !answers.is_empty() && answers.len() < 12,
        "{} answers",
        answers.len()
    );
    // The server stopped reading the stream; what it had taken was learned all the same.
    let mut client = server.client().await;
    let learned = client.info().await.unwrap().version;
    assert!(learned >= answers.len() as u64, "version {learned}");
    let more = ingest(&mut client, vec![batch("after", facts())]).await;
    assert!(more.unwrap()[0].version > learned);
    assert_eq!(health(&server.addr).await, ServingStatus::Serving);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_stream_that_sends_nothing_is_ended_after_the_idle_bound() {
    let idle = Duration::from_millis(500);
    let server = start_limited(|l| l.ingest_idle = idle).await;
    let mut client = server.client().await;
    for first in [None, Some(batch("b0", facts()))] {
        let answered = first.is_some() as usize;
        let batches = tokio_stream::iter(first).chain(tokio_stream::pending());
        let start = Instant::now();
        let (answers, status) = drain(client.ingest(batches).await.unwrap()).await;
        let took = start.elapsed();
        let status = status.expect("an idle ingest stream ends with a status");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains("--ingest-idle"), "{status:?}");
        assert_eq!(answers.len(), answered);
        assert!(took >= idle && took < idle * 10, "ended after {took:?}");
    }
    assert_eq!(health(&server.addr).await, ServingStatus::Serving);
    server.shutdown().await;
}

/// Sends `path` a gRPC request whose body begins a 100-byte message and then sends nothing
/// more, without ending; the `grpc-status` the server answers with, and when.
async fn unfinished_call(addr: &str, path: &str) -> (String, String, Duration) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 100]))))
        .await
        .unwrap();
    let request = hyper::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    let start = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(request))
        .await
        .expect("the server answers an unfinished call")
        .unwrap();
    let header =
        |h: &hyper::HeaderMap, name: &str| h.get(name).map(|v| v.to_str().unwrap().to_string());
    let (parts, body) = response.into_parts();
    let trailers = match header(&parts.headers, "grpc-status") {
        Some(_) => parts.headers,
        None => body.collect().await.unwrap().trailers().cloned().unwrap(),
    };
    drop(tx);
    let message = header(&trailers, "grpc-message").unwrap_or_default();
    (
        header(&trailers, "grpc-status").unwrap(),
        message,
        start.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_request_never_ends_is_ended_after_the_send_timeout() {
    let server = start_limited(|l| l.send_timeout = SEND_TIMEOUT).await;
    for path in [
        "/locus.v1.Query/Score",
        "/locus.v1.Admin/Info",
        "/locus.v1.Query/Complete",
    ] {
        let (status, message, took) = unfinished_call(&server.addr, path).await;
        assert_eq!(
            status,
            (Code::DeadlineExceeded as i32).to_string(),
            "{path}: {message}"
        );
        assert!(message.contains("--send-timeout"), "{path}: {message}");
        assert!(
            took >= SEND_TIMEOUT && took < SEND_TIMEOUT * 10,
            "{path}: after {took:?}"
        );
    }
    // An ingest stream streams its requests: a first batch later than the send timeout is learned.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        tokio::time::sleep(SEND_TIMEOUT * 2).await;
        tx.send(batch("late", facts())).await.unwrap();
    });
    let mut client = server.client().await;
    let stream = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let (answers, status) = drain(stream).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(answers.len(), 1);
    score(&mut client).await;
    assert_eq!(health(&server.addr).await, ServingStatus::Serving);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_connection_limit_are_refused_and_silent_ones_ended() {
    let server = start_limited(|l| {
        l.max_concurrent_streams = 2;
        l.ingest_idle = Duration::from_millis(500);
    })
    .await;
    let mut c = Connection::open(&server.addr).await;
    for stream in [1, 3, 5, 7] {
        c.open_call(stream, "/locus.v1.Learn/Ingest").await;
    }
    let (frames, closed) = c.read_for(Duration::from_secs(3)).await;
    assert!(!closed, "the connection stays open");
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| f.reset_code() == Some(frames::REFUSED_STREAM))
        .map(|f| f.stream)
        .collect();
    assert_eq!(refused, [5, 7], "{frames:?}");
    // The two streams admitted sent no batch: each got its trailers after the idle bound.
    let ended = |frames: &[frames::Frame], stream: u32| {
        frames.iter().any(|f| {
            f.stream == stream && f.kind == frames::HEADERS && f.flags & frames::END_STREAM != 0
        })
    };
    assert!(ended(&frames, 1) && ended(&frames, 3), "{frames:?}");
    // Their places are free again.
    c.open_call(9, "/locus.v1.Learn/Ingest").await;
    let (frames, _) = c.read_for(Duration::from_secs(2)).await;
    assert!(
        frames
            .iter()
            .all(|f| f.reset_code() != Some(frames::REFUSED_STREAM)),
        "{frames:?}"
    );
    assert!(ended(&frames, 9), "{frames:?}");
    assert_eq!(health(&server.addr).await, ServingStatus::Serving);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_no_ping_is_disconnected() {
    let server = start_limited(|l| {
        l.keepalive_interval = Some(Duration::from_millis(300));
        l.keepalive_timeout = Duration::from_millis(300);
    })
    .await;
    let mut c = Connection::open(&server.addr).await;
    c.open_call(1, "/locus.v1.Learn/Ingest").await;
    let start = Instant::now();
    let (frames, closed) = c.read_for(Duration::from_secs(5)).await;
    assert!(closed, "the connection is still open: {frames:?}");
    assert!(frames.iter().any(|f| f.kind == frames::PING), "{frames:?}");
    eprintln!("closed after {:?}", start.elapsed());
    // A client that answers pings keeps its connection.
    let mut client = server.client().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    score(&mut client).await;
    assert_eq!(health(&server.addr).await, ServingStatus::Serving);
    server.shutdown().await;
}

/// Scores and perplexities, one after another until `stop`, each checked finite; how many ran.
fn finite_queries_until(addr: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut client = Client::connect(&addr, None).await.unwrap();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let s = score(&mut client).await;
            assert!(s.ranked.iter().all(|c| c.logprob.is_finite()), "{s:?}");
            let p = client.perplexity(vec![CANARIES[0].into()]).await.unwrap();
            assert!(p.texts[0].perplexity.is_finite(), "{p:?}");
            n += 1;
        }
        n
    })
}

const CANARIES: [&str; 2] = [
    "The river flows past the old mill every spring.",
    "Bread is baked early in the morning.",
];

/// Ingests `batches` on one stream and checks that every step was applied or skipped with its
/// reason; the reasons of the skipped ones.
async fn learned_or_skipped(client: &mut Client, batches: Vec<pb::IngestRequest>) -> Vec<String> {
    let answers = ingest(client, batches).await.unwrap();
    let steps: Vec<_> = answers.iter().flat_map(|a| &a.steps).collect();
    assert!(!steps.is_empty());
    steps
        .iter()
        .filter(|s| !s.applied)
        .map(|s| {
            assert!(!s.skipped.is_empty(), "{s:?}");
            s.skipped.clone()
        })
        .collect()
}

/// Ingests batches built to blow up the loss into a server under `config` while queries run beside
/// them, all of whose answers must be finite; after it, answers are finite and health SERVING.
/// The reasons of the steps skipped.
async fn blow_up(config: Config) -> Vec<String> {
    let server = start_with(config, true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let queries = finite_queries_until(server.addr.clone(), Arc::clone(&stop));
    let mut client = server.client().await;
    // One rare token repeated to the token limit, over and over (thousands of tokens in all), and
    // text that no model predicts.
    let rare = doc(&"\u{2603}".repeat(20), &[]);
    let noise = doc(&"zq\u{1f}x\u{7f}~`|^".repeat(6), &[]);
    let batches = (0..16)
        .map(|i| batch(&format!("b{i}"), vec![rare.clone(), noise.clone()]))
        .collect();
    let skipped = learned_or_skipped(&mut client, batches).await;
    stop.store(true, Ordering::SeqCst);
    let ran = queries.await.unwrap();
    assert!(ran > 0, "no query ran beside learning");
    let s = score(&mut client).await;
    assert!(s.ranked.iter().all(|c| c.logprob.is_finite()), "{s:?}");
    let p = client
        .perplexity(CANARIES.iter().map(|c| c.to_string()).collect())
        .await
        .unwrap();
    assert!(p.texts.iter().all(|t| t.perplexity.is_finite()), "{p:?}");
    assert_eq!(health(&server.addr).await, ServingStatus::Serving);
    server.shutdown().await;
    skipped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_built_to_blow_up_the_loss_never_reach_the_served_weights() {
    // With clipped steps of a sane size, they are learned.
    let skipped = blow_up(config()).await;
    assert!(skipped.is_empty(), "{skipped:?}");

    // Steps far too large, unclipped, blow the weights up to infinities: the forgetting guard
    // undoes the update whose canary perplexity is not a number, and the weights served stay
    // those before it.
    let mut config = config();
    config.learn.lr = 1e35;
    config.learn.clip = 0.0;
    config.guard = Some(Guard {
        canaries: CANARIES.iter().map(|c| c.to_string()).collect(),
        max_ratio: 1.5,
    });
    let skipped = blow_up(config).await;
    assert_eq!(skipped.len(), 16, "{skipped:?}");
    assert!(
        skipped
            .iter()
            .all(|s| s.starts_with("forgetting guard: canary perplexity")),
        "{skipped:?}"
    );
}
