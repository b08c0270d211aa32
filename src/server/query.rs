//! The Query service: Score, Complete and Perplexity, each computed on one snapshot.
//!
//! candle's forward passes block, so they run on tokio's blocking pool, at most
//! `Limits::query_concurrency` at a time.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Response, Status};

use super::outbox::{outbox, Answers};
use super::{Limits, Loaded, ServerError, State};
use crate::infer::{self, Finish, Sampling};
use crate::proto::v1 as pb;
use crate::proto::v1::query_server::Query;
use crate::snapshot::Snapshot;

/// The Query service.
pub struct QueryService {
    state: Arc<State>,
}

impl QueryService {
    /// The service over the shared state.
    pub fn new(state: Arc<State>) -> Self {
        QueryService { state }
    }
}

impl Loaded {
    /// A query slot, waiting at most `query_wait` for one.
    async fn slot(&self, state: &State) -> Result<OwnedSemaphorePermit, ServerError> {
        let wait = state.config.limits.query_wait;
        match tokio::time::timeout(wait, Arc::clone(&self.queries).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ServerError::ShuttingDown),
            Err(_) => Err(ServerError::Busy(format!(
                "all {} query slots stayed busy for {wait:?}",
                state.config.limits.query_concurrency
            ))),
        }
    }
}

/// Runs blocking work on the snapshot current now, holding a query slot.
pub(super) async fn on_snapshot<T: Send + 'static>(
    state: &State,
    work: impl FnOnce(&Snapshot) -> Result<T, ServerError> + Send + 'static,
) -> Result<(u64, T), ServerError> {
    let loaded = state.loaded()?;
    let permit = loaded.slot(state).await?;
    let snapshot = loaded.snapshots.current();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work(&snapshot).map(|v| (snapshot.version(), v))
    })
    .await
    .map_err(|e| ServerError::Internal(format!("query task: {e}")))?
}

/// Token ids of `text`, at least `min` and at most `max` of them, or an error naming `field`.
pub(super) fn tokens(
    snapshot: &Snapshot,
    field: &str,
    text: &str,
    min: usize,
    max: usize,
) -> Result<Vec<u32>, ServerError> {
    bounded(
        field,
        snapshot.model().tokenizer.encode(text)?.ids,
        min,
        max,
    )
}

/// `ids` when there are at least `min` and at most `max` of them, else an error naming `field`.
pub(super) fn bounded(
    field: &str,
    ids: Vec<u32>,
    min: usize,
    max: usize,
) -> Result<Vec<u32>, ServerError> {
    if ids.len() > max {
        return Err(ServerError::limit(
            field,
            format!("{} tokens; the limit is {max}", ids.len()),
        ));
    }
    if ids.len() < min {
        return Err(ServerError::invalid(
            field,
            format!("{} token(s); at least {min} needed", ids.len()),
        ));
    }
    Ok(ids)
}

/// The longest text in tokens a query may bring.
pub(super) fn max_tokens(snapshot: &Snapshot, state: &State) -> usize {
    let limit = state.config.limits.max_document_tokens;
    snapshot
        .model()
        .arch
        .max_positions()
        .map_or(limit, |p| p.min(limit))
}

/// Checked sampling settings of a completion of at most `max_tokens` new tokens; `top_p` 0 means
/// 1 (an unset field of the gRPC request), and without a seed one is drawn.
pub(super) fn sampling(
    limits: &Limits,
    max_tokens: usize,
    temperature: f64,
    top_p: f64,
    stop: Vec<String>,
    seed: Option<u64>,
) -> Result<Sampling, ServerError> {
    ServerError::at_most(
        "max_tokens",
        max_tokens,
        "tokens",
        limits.max_complete_tokens,
    )?;
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ServerError::invalid(
            "temperature",
            "must be 0 (greedy) or positive",
        ));
    }
    if !(top_p.is_finite() && (0.0..=1.0).contains(&top_p)) {
        return Err(ServerError::invalid(
            "top_p",
            "must be in (0, 1], or 0 for 1",
        ));
    }
    // Stop strings are matched after every generated token; their number and size bound what
    // that matching costs.
    ServerError::at_most("stop", stop.len(), "strings", limits.max_stop_strings)?;
    let stop_bytes = stop.iter().map(String::len).sum();
    ServerError::at_most("stop", stop_bytes, "bytes in all", limits.max_stop_bytes)?;
    if let Some(i) = stop.iter().position(String::is_empty) {
        return Err(ServerError::invalid(format!("stop[{i}]"), "empty"));
    }
    Ok(Sampling {
        max_tokens,
        temperature,
        top_p: if top_p == 0.0 { 1.0 } else { top_p },
        stop,
        seed: seed.unwrap_or_else(rand::random),
    })
}

/// Chunks of a completion generated ahead of the client's reading.
const CHUNKS_UNREAD: usize = 16;

type CompleteStream = Answers<pb::CompleteChunk>;

#[tonic::async_trait]
impl Query for QueryService {
    #[tracing::instrument(skip_all, name = "Score")]
    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let _timer = self.state.metrics.query_timer("Score");
        let r = request.into_inner();
        let limits = &self.state.config.limits;
        if r.candidates.is_empty() {
            return Err(ServerError::invalid("candidates", "nothing to score").into());
        }
        ServerError::at_most(
            "candidates",
            r.candidates.len(),
            "candidates",
            limits.max_candidates,
        )?;
        let state = Arc::clone(&self.state);
        let (version, ranked) = on_snapshot(&self.state, move |s| {
            let max = max_tokens(s, &state);
            let prompt = tokens(s, "prompt", &r.prompt, 1, max)?;
            let continuations = r
                .candidates
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    tokens(
                        s,
                        &format!("candidates[{i}]"),
                        c,
                        1,
                        max - prompt.len().min(max),
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let logprobs = infer::logprobs(s, &prompt, &continuations)?;
            let mut ranked: Vec<pb::CandidateScore> = r
                .candidates
                .into_iter()
                .zip(logprobs)
                .zip(&continuations)
                .enumerate()
                .map(|(i, ((candidate, logprob), ids))| pb::CandidateScore {
                    index: i as u32,
                    candidate,
                    logprob,
                    tokens: ids.len() as u32,
                })
                .collect();
            ranked.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
            Ok(ranked)
        })
        .await?;
        Ok(Response::new(pb::ScoreResponse { version, ranked }))
    }

    type CompleteStream = CompleteStream;

    #[tracing::instrument(skip_all, name = "Complete")]
    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<CompleteStream>, Status> {
        // Moved into the generating task, so the latency covers the whole stream.
        let timer = self.state.metrics.query_timer("Complete");
        let r = request.into_inner();
        let limits = &self.state.config.limits;
        let max_new = match r.max_tokens as usize {
            0 => limits.max_complete_tokens.min(64),
            n => n,
        };
        let sampling = sampling(
            limits,
            max_new,
            f64::from(r.temperature),
            f64::from(r.top_p),
            r.stop,
            r.seed,
        )?;
        let loaded = self.state.loaded()?;
        let permit = loaded.slot(&self.state).await?;
        let snapshot = loaded.snapshots.current();
        let version = snapshot.version();
        // Check the prompt before the stream starts, so a bad one is an error status, not a chunk.
        let prompt = tokens(
            &snapshot,
            "prompt",
            &r.prompt,
            1,
            max_tokens(&snapshot, &self.state),
        )?;
        let (mut tx, rx) = outbox(CHUNKS_UNREAD, limits.send_timeout);
        tokio::task::spawn_blocking(move || {
            // Dropped when generation ends, stopped by a client gone or not reading included.
            let _permit = permit;
            let _timer = timer;
            let chunk = |text: &str, tokens: usize, finish: pb::FinishReason| pb::CompleteChunk {
                version,
                text: text.to_string(),
                tokens: tokens as u32,
                finish_reason: finish as i32,
            };
            let mut count = 0;
            let finish = infer::generate(&snapshot, &prompt, &sampling, |text, n| {
                count = n;
                tx.blocking_send(Ok(chunk(text, n, pb::FinishReason::Unspecified)))
            });
            let last = match finish.map(|g| g.finish) {
                Ok(Finish::Length) => Ok(chunk("", count, pb::FinishReason::Length)),
                Ok(Finish::Stop) => Ok(chunk("", count, pb::FinishReason::Stop)),
                Ok(Finish::Cancelled) => return,
                Err(e) => Err(Status::from(ServerError::from(e))),
            };
            tx.blocking_send(last);
        });
        Ok(Response::new(rx))
    }

    #[tracing::instrument(skip_all, name = "Perplexity")]
    async fn perplexity(
        &self,
        request: Request<pb::PerplexityRequest>,
    ) -> Result<Response<pb::PerplexityResponse>, Status> {
        let _timer = self.state.metrics.query_timer("Perplexity");
        let texts = request.into_inner().texts;
        let limits = &self.state.config.limits;
        if texts.is_empty() {
            return Err(ServerError::invalid("texts", "nothing to score").into());
        }
        ServerError::at_most("texts", texts.len(), "texts", limits.max_documents)?;
        let state = Arc::clone(&self.state);
        let (version, texts) = on_snapshot(&self.state, move |s| {
            let max = max_tokens(s, &state);
            let seqs = texts
                .iter()
                .enumerate()
                .map(|(i, t)| tokens(s, &format!("texts[{i}]"), t, 2, max))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(infer::target_nll(s, &seqs)?
                .iter()
                .map(|row| {
                    let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / row.len() as f64;
                    pb::TextPerplexity {
                        perplexity: mean.exp(),
                        mean_nll: mean,
                        tokens: (row.len() + 1) as u64,
                    }
                })
                .collect())
        })
        .await?;
        Ok(Response::new(pb::PerplexityResponse { version, texts }))
    }
}
