//! The in-process server the server and object-store tests start, the requests they send, and
//! the scale-out scenario both run on their own stores.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut};
use candle_core::Device;
use locus::client::{Client, ClientError};
use locus::learn::{LearnConfig, Localization, Strategy};
use locus::model::load;
use locus::proto::v1 as pb;
use locus::server::{self, Config, Limits, ServerError, State};
use locus::store::location::Location;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use crate::common::fixture;

pub mod draw;
pub mod frames;
pub mod watch;

/// A running test server.
pub struct Running {
    pub addr: String,
    pub state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Running {
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr, None).await.unwrap()
    }

    pub async fn client_with(&self, token: &str) -> Client {
        Client::connect(&self.addr, Some(token)).await.unwrap()
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// Sends and receives messages as the bytes given, so a test can send what no client would.
#[derive(Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// A connection to the server at `addr`, for clients other than locus's own.
pub async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn raw_client(addr: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let mut grpc = tonic::client::Grpc::new(channel(addr).await);
    grpc.ready().await.unwrap();
    grpc
}

pub fn config() -> Config {
    Config {
        learn: LearnConfig {
            strategy: Strategy::parse("tgl-fp").unwrap(),
            localization: Localization::PerBatch {
                ema: 0.9,
                reselect_every: 4,
            },
            lr: 1e-2,
            ..LearnConfig::default()
        },
        batch_size: 4,
        limits: Limits {
            max_document_tokens: 128,
            max_documents: 8,
            max_candidates: 4,
            max_complete_tokens: 16,
            max_message_bytes: 64 << 10,
            ..Limits::default()
        },
        shutdown_grace: Duration::from_secs(10),
        ..Config::default()
    }
}

/// Starts a server; `install` false leaves it without a model.
pub async fn start_with(config: Config, install: bool) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let state = State::new(config).await;
    if install {
        let model = load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
        state.install(model).await.unwrap();
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run(listener, Arc::clone(&state), async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        state,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A server with the OpenAI-style listener beside gRPC.
pub struct Http {
    pub grpc: Running,
    pub addr: String,
}

/// Starts a server as [`start_with`] does, with the OpenAI-style listener on a port of its own.
pub async fn start_http(config: Config, install: bool) -> Http {
    let grpc = start_with(config, install).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(server::serve_openai(listener, Arc::clone(&grpc.state)).unwrap());
    Http { grpc, addr }
}

pub async fn start() -> Running {
    start_with(config(), true).await
}

pub fn doc(text: &str, salient: &[&str]) -> pb::Document {
    pb::Document {
        text: text.into(),
        salient: salient.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn facts() -> Vec<pb::Document> {
    vec![
        doc(
            "On 3 May 2021, Ada Lovelace opened a museum in London.",
            &["Ada Lovelace"],
        ),
        doc(
            "The new museum director, Ada Lovelace, spoke on 4 May 2021.",
            &["Ada Lovelace"],
        ),
        doc(
            "Visitors queued for hours to see the engines of Charles Babbage.",
            &[],
        ),
    ]
}

pub fn batch(id: &str, documents: Vec<pb::Document>) -> pb::IngestRequest {
    pb::IngestRequest {
        documents,
        client_batch_id: id.into(),
    }
}

/// Sends `batches` on one stream and collects every answer.
pub async fn ingest(
    client: &mut Client,
    batches: Vec<pb::IngestRequest>,
) -> Result<Vec<pb::IngestResponse>, tonic::Status> {
    let mut stream = client
        .ingest(tokio_stream::iter(batches))
        .await
        .map_err(status)?;
    let mut out = Vec::new();
    while let Some(r) = stream.next().await {
        out.push(r?);
    }
    Ok(out)
}

pub fn status(e: ClientError) -> tonic::Status {
    match e {
        ClientError::Status(s) => s,
        e => panic!("not a status: {e}"),
    }
}

pub fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (Code, String) {
    let s = status(r.expect_err("expected an error status"));
    (s.code(), s.message().to_string())
}

pub async fn score(client: &mut Client) -> pb::ScoreResponse {
    client
        .score(
            "The museum was opened by",
            &[" Ada Lovelace".to_string(), " Charles Babbage".to_string()],
        )
        .await
        .unwrap()
}

pub fn logprob(r: &pb::ScoreResponse, index: u32) -> f64 {
    r.ranked.iter().find(|c| c.index == index).unwrap().logprob
}

/// Polls `client` until it serves `version`.
pub async fn wait_for_version(client: &mut Client, version: u64) -> pb::InfoResponse {
    wait_for_info(client, &format!("version {version}"), |i| {
        i.version == version
    })
    .await
}

/// Polls `client`'s Admin.Info for 10 s until `done` holds; `what` names the wait when it times
/// out.
pub async fn wait_for_info(
    client: &mut Client,
    what: &str,
    done: impl Fn(&pb::InfoResponse) -> bool,
) -> pb::InfoResponse {
    wait_for_info_within(client, what, Duration::from_secs(10), done).await
}

/// Polls `client`'s Admin.Info every 50 ms until `done` holds, for at most `limit`.
pub async fn wait_for_info_within(
    client: &mut Client,
    what: &str,
    limit: Duration,
    done: impl Fn(&pb::InfoResponse) -> bool,
) -> pb::InfoResponse {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let info = client.info().await.unwrap();
        if done(&info) {
            return info;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("the server did not reach {what} within {limit:?}: {info:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A writer that journals and checkpoints to `data` and publishes to `store`.
pub fn writer_config(data: &Path, store: &str, checkpoint_every: u64, keep: usize) -> Config {
    Config {
        durability: Some(locus::store::Durability {
            dir: data.to_path_buf(),
            checkpoint_every,
            keep_checkpoints: keep,
        }),
        store: Some(store.to_string()),
        ..config()
    }
}

/// A reader following `store`, polling it every 50 ms.
pub fn reader_config(store: &str) -> Config {
    Config {
        role: server::Role::Reader,
        store: Some(store.to_string()),
        follow_interval: Duration::from_millis(50),
        ..config()
    }
}

/// Candidate log-probabilities of the score probe, as exact bits, and the version.
pub async fn score_bits(client: &mut Client) -> (u64, Vec<(String, u64)>) {
    let s = score(client).await;
    let bits = s
        .ranked
        .iter()
        .map(|c| (c.candidate.clone(), c.logprob.to_bits()))
        .collect();
    (s.version, bits)
}

/// Polls the writer behind `client` until its store holds `version` (publishing runs beside
/// learning, so an answered batch may not be in the store yet).
pub async fn wait_for_published(client: &mut Client, version: u64) {
    let what = format!("published version {version}");
    wait_for_info(client, &what, |i| i.published_version >= version).await;
}

/// Names and sizes of the deltas in the store `spec`, read the way readers read it.
pub async fn published_deltas(spec: &str) -> Vec<(String, u64)> {
    let spec = spec.to_string();
    tokio::task::spawn_blocking(move || {
        let at = Location::parse(&spec).unwrap();
        let names = at.list("deltas").unwrap();
        names
            .into_iter()
            .map(|n| {
                let size = at.get(&format!("deltas/{n}")).unwrap().len() as u64;
                (n, size)
            })
            .collect()
    })
    .await
    .unwrap()
}

/// One writer publishing to `store` and two readers following it (one started after deltas were
/// pruned): both converge to the writer's version, score bit-identically, refuse changes, and
/// follow a rollback.
pub async fn writer_and_two_readers(store: &str) {
    let data = tempfile::tempdir().unwrap();
    let writer = start_with(writer_config(data.path(), store, 2, 1), true).await;
    let early = start_with(reader_config(store), true).await;
    let mut w = writer.client().await;
    let mut r1 = early.client().await;
    assert_eq!(r1.info().await.unwrap().version, 0);

    let batches = (0..3)
        .map(|i| batch(&format!("b{i}"), facts()))
        .collect::<Vec<_>>();
    ingest(&mut w, batches).await.unwrap();
    let version = w.info().await.unwrap().version;
    assert_eq!(version, 3);
    // Version 2 was checkpointed and published; keeping one checkpoint pruned deltas 1 and 2, so
    // a reader starting now must start from the checkpoint and apply delta 3.
    wait_for_published(&mut w, version).await;
    let deltas = published_deltas(store).await;
    let names: Vec<_> = deltas.iter().map(|d| d.0.clone()).collect();
    assert_eq!(names, vec![format!("{:020}.delta", 3)]);
    let late = start_with(reader_config(store), true).await;
    let mut r2 = late.client().await;

    for r in [&mut r1, &mut r2] {
        let info = wait_for_version(r, version).await;
        assert_eq!(info.role, "reader");
        assert_eq!((info.published_version, info.behind), (version, 0));
    }
    let expected = score_bits(&mut w).await;
    assert_eq!(expected.0, version);
    assert_eq!(score_bits(&mut r1).await, expected);
    assert_eq!(score_bits(&mut r2).await, expected);

    // A delta holds only the groups one update changed.
    let delta = deltas[0].1;
    let full: u64 = load::load(fixture("llama").to_str().unwrap(), &Device::Cpu)
        .unwrap()
        .vars
        .values()
        .map(|v| 4 * v.elem_count() as u64)
        .sum();
    assert!(delta < full / 2, "delta {delta} bytes, model {full} bytes");

    // Readers change nothing themselves.
    let refused = ingest(&mut r1, vec![batch("x", facts())])
        .await
        .expect_err("a reader takes no documents");
    let (c, message) = (refused.code(), refused.message().to_string());
    assert_eq!(c, Code::FailedPrecondition);
    assert!(message.contains("reader"), "{message}");
    assert_eq!(code(r2.rollback(1).await).0, Code::FailedPrecondition);
    assert_eq!(code(r2.pause().await).0, Code::FailedPrecondition);

    // A rollback is published as a checkpoint, and readers follow it too.
    let rolled = w.rollback(1).await.unwrap();
    assert_eq!(rolled.version, version + 1);
    for r in [&mut r1, &mut r2] {
        wait_for_version(r, rolled.version).await;
    }
    let expected = score_bits(&mut w).await;
    assert_eq!(score_bits(&mut r1).await, expected);
    assert_eq!(score_bits(&mut r2).await, expected);

    early.shutdown().await;
    late.shutdown().await;
    writer.shutdown().await;
}

/// A file larger than one upload part, given as bytes and as a local file, reads back whole from
/// `store` (so both go up in parts).
pub async fn large_file_round_trips(store: &str) {
    let store = store.to_string();
    tokio::task::spawn_blocking(move || {
        let at = Location::parse(&store).unwrap();
        let bytes: Vec<u8> = (0..80u32 << 20).map(|i| (i % 251) as u8).collect();
        at.put("large/bytes", bytes.clone()).unwrap();
        let local = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(local.path(), &bytes).unwrap();
        assert_eq!(
            at.put_file("large/file", local.path()).unwrap(),
            bytes.len() as u64
        );
        let mut names = at.list("large").unwrap();
        names.sort();
        assert_eq!(names, ["bytes", "file"]);
        for name in ["large/bytes", "large/file"] {
            assert!(at.get(name).unwrap() == bytes, "{store}/{name} differs");
            at.delete(name).unwrap();
        }
    })
    .await
    .unwrap();
}

/// GET `path` over plain HTTP/1.1: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// Serves the metrics listener (metrics, probes, the status page) of `running` on a free port;
/// answers its address.
pub async fn serve_metrics(running: &Running) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(server::serve_metrics(listener, Arc::clone(&running.state)));
    addr
}

/// The whole server's health as its health service reports it.
pub async fn health(addr: &str) -> tonic_health::pb::health_check_response::ServingStatus {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    health.check(request).await.unwrap().into_inner().status()
}
