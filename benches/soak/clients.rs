//! The soak's clients, each a loop until the deadline: one writer stream, the three queries, the
//! streams cancelled on purpose, a client that reconnects, and the sampler of the server.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use locus::client::{Client, ClientError};
use locus::proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::record::{Recorder, Sample};
use crate::server::{open_fds, rss_kib};
use crate::support::{batches, probes};

pub const INGEST: &str = "Learn.Ingest";
pub const SCORE: &str = "Query.Score";
pub const COMPLETE: &str = "Query.Complete";
pub const PERPLEXITY: &str = "Query.Perplexity";
pub const INFO: &str = "Admin.Info";
/// Connect on a new channel, then Score.
pub const RECONNECT: &str = "Reconnect";

/// Documents per ingest batch.
const BATCH: usize = 4;
/// Tokens of a Complete that runs to the end; one cancelled on purpose asks for more.
const COMPLETE_TOKENS: u32 = 16;
const CANCELLED_COMPLETE_TOKENS: u32 = 256;
/// How long a cancelled ingest stream waits for its batch's answer before it is dropped.
const INGEST_CANCEL_AFTER: Duration = Duration::from_millis(300);

/// What every loop shares: where to call, where to record, when to stop.
#[derive(Clone)]
pub struct Soak {
    pub client: Client,
    pub addr: String,
    pub rec: Arc<Recorder>,
    /// Pause of a query loop between calls.
    pub query_gap: Duration,
    pub deadline: Instant,
}

impl Soak {
    fn running(&self) -> bool {
        Instant::now() < self.deadline
    }

    /// Calls `call(i)` for i = 0, 1, … one at a time, `query_gap` apart, until the deadline,
    /// recording each.
    async fn repeat<F, Fut>(&self, rpc: &'static str, mut call: F)
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<(), ClientError>>,
    {
        let mut i = 0;
        while self.running() {
            let began = Instant::now();
            self.rec.record(rpc, began, call(i).await);
            i += 1;
            tokio::time::sleep(self.query_gap).await;
        }
    }

    /// Runs `tick` at `first`, then every `period`, until the deadline.
    async fn every<F, Fut>(&self, first: Duration, period: Duration, mut tick: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut at = tokio::time::Instant::now() + first;
        while at.into_std() < self.deadline {
            tokio::time::sleep_until(at).await;
            tick().await;
            at += period;
        }
    }
}

/// Query.Score over the drift probes, in a loop.
pub async fn scores(soak: Soak) {
    let probes = probes();
    let client = soak.client.clone();
    soak.repeat(SCORE, |i| {
        let (prompt, candidates) = probes[i % probes.len()].clone();
        let mut client = client.clone();
        async move { client.score(&prompt, &candidates).await.map(drop) }
    })
    .await;
}

/// Query.Perplexity of two probe sentences, in a loop.
pub async fn perplexities(soak: Soak) {
    let texts: Vec<String> = probes().into_iter().map(|(p, c)| p + &c[0]).collect();
    let client = soak.client.clone();
    soak.repeat(PERPLEXITY, |i| {
        let pair = vec![
            texts[i % texts.len()].clone(),
            texts[(i + 1) % texts.len()].clone(),
        ];
        let mut client = client.clone();
        async move { client.perplexity(pair).await.map(drop) }
    })
    .await;
}

/// Query.Complete, greedy, read to its last chunk, in a loop.
pub async fn completions(soak: Soak) {
    let probes = probes();
    let client = soak.client.clone();
    soak.repeat(COMPLETE, |i| {
        let request = completion(&probes[i % probes.len()].0, COMPLETE_TOKENS);
        let mut client = client.clone();
        async move {
            let mut chunks = client.complete(request).await?;
            while chunks.message().await?.is_some() {}
            Ok(())
        }
    })
    .await;
}

fn completion(prompt: &str, max_tokens: u32) -> pb::CompleteRequest {
    pb::CompleteRequest {
        prompt: prompt.to_string(),
        max_tokens,
        ..Default::default()
    }
}

/// The one writer: one Learn.Ingest stream, one batch in flight, so each latency is one batch
/// learned. A stream that fails is recorded and opened again.
pub async fn writer(soak: Soak) {
    let mut batches = batches("soak", BATCH).into_iter().cycle();
    let mut client = soak.client.clone();
    while soak.running() {
        let (tx, rx) = mpsc::channel(1);
        let began = Instant::now();
        let mut answers = match client.ingest(ReceiverStream::new(rx)).await {
            Ok(answers) => answers,
            Err(e) => {
                soak.rec.record(INGEST, began, Err(e));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while soak.running() {
            let began = Instant::now();
            let batch = batches.next().expect("the batches cycle");
            let answer = match tx.send(batch).await {
                Ok(()) => answers.message().await,
                Err(_) => Ok(None),
            };
            let outcome = match answer {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(ClientError::Status(tonic::Status::unknown(
                    "the ingest stream ended before answering its batch",
                ))),
                Err(status) => Err(status.into()),
            };
            let failed = outcome.is_err();
            soak.rec.record(INGEST, began, outcome);
            if failed {
                break;
            }
        }
        // Closing our side ends the stream; it must end with OK.
        drop(tx);
        let began = Instant::now();
        while let Some(result) = answers.message().await.transpose() {
            if let Err(status) = result {
                soak.rec.record(INGEST, began, Err(status.into()));
                break;
            }
        }
    }
}

/// Once a minute, half a minute in: an ingest stream dropped while its batch is being learned,
/// and a completion dropped after its first chunks.
pub async fn cancellations(soak: Soak) {
    let minute = Duration::from_secs(60);
    soak.every(minute / 2, minute, || {
        let soak = soak.clone();
        async move {
            drop_ingest(&soak).await;
            drop_completion(&soak).await;
        }
    })
    .await;
}

async fn drop_ingest(soak: &Soak) {
    let mut client = soak.client.clone();
    let (tx, rx) = mpsc::channel(1);
    let began = Instant::now();
    let mut answers = match client.ingest(ReceiverStream::new(rx)).await {
        Ok(answers) => answers,
        Err(e) => return soak.rec.record(INGEST, began, Err(e)),
    };
    let mut batch = batches("soak-cancelled", BATCH).swap_remove(0);
    batch.client_batch_id = format!("soak-cancelled-{:.0}", soak.rec.elapsed());
    if tx.send(batch).await.is_err() {
        return;
    }
    match tokio::time::timeout(INGEST_CANCEL_AFTER, answers.message()).await {
        // Answered before it could be cancelled: an ordinary call.
        Ok(answer) => soak
            .rec
            .record(INGEST, began, answer.map(drop).map_err(Into::into)),
        Err(_) => soak.rec.cancelled(INGEST),
    }
}

async fn drop_completion(soak: &Soak) {
    let mut client = soak.client.clone();
    let began = Instant::now();
    let request = completion("The history of the city begins", CANCELLED_COMPLETE_TOKENS);
    let mut chunks = match client.complete(request).await {
        Ok(chunks) => chunks,
        Err(e) => return soak.rec.record(COMPLETE, began, Err(e)),
    };
    for _ in 0..2 {
        match chunks.message().await {
            Ok(Some(chunk)) if chunk.finish_reason == 0 => {}
            // Finished before it could be cancelled: an ordinary call.
            Ok(_) => return soak.rec.record(COMPLETE, began, Ok(())),
            Err(status) => return soak.rec.record(COMPLETE, began, Err(status.into())),
        }
    }
    soak.rec.cancelled(COMPLETE);
}

/// Every 20 s: a new channel, one Score on it, and the channel dropped.
pub async fn reconnects(soak: Soak) {
    let period = Duration::from_secs(20);
    let (prompt, candidates) = probes().swap_remove(0);
    soak.every(period, period, || {
        let (soak, prompt, candidates) = (soak.clone(), prompt.clone(), candidates.clone());
        async move {
            let began = Instant::now();
            let outcome = async {
                let mut fresh = Client::connect(&soak.addr, None).await?;
                fresh.score(&prompt, &candidates).await.map(drop)
            };
            soak.rec.record(RECONNECT, began, outcome.await);
        }
    })
    .await;
}

/// Every 10 s: the server's RSS and open descriptors, and its version and steps.
pub async fn samples(soak: Soak, pid: u32) -> Vec<Sample> {
    let out = Arc::new(Mutex::new(Vec::new()));
    soak.every(Duration::ZERO, Duration::from_secs(10), || {
        let (soak, out) = (soak.clone(), Arc::clone(&out));
        async move {
            let began = Instant::now();
            let (rss_kib, fds) = (rss_kib(pid), open_fds(pid));
            let info = soak.client.clone().info().await;
            let fields = info.as_ref().ok();
            let sample = Sample {
                t_s: soak.rec.elapsed(),
                rss_kib,
                fds,
                version: fields.map(|i| i.version),
                steps: fields.map(|i| i.steps),
                queue_depth: fields.map(|i| i.queue_depth),
            };
            let mut out = out.lock().unwrap();
            // A progress line a minute, for long runs.
            if out.len() % 6 == 0 {
                eprintln!(
                    "soak: {}",
                    serde_json::to_string(&sample).unwrap_or_default()
                );
            }
            out.push(sample);
            soak.rec.record(INFO, began, info.map(drop));
        }
    })
    .await;
    let samples = std::mem::take(&mut *out.lock().unwrap());
    samples
}
