//! The Learn service: streamed ingest with per-document validation, and Trace.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert;
use super::error::from_codec;
use super::outbox::{outbox, Answers};
use super::{Limits, ServerError, State};
use crate::error::Error;
use crate::learn::{Doc, UpdateReport};
use crate::live::{self, Job};
use crate::model::Model;
use crate::proto::v1 as pb;
use crate::proto::v1::learn_server::Learn;
use crate::spans::{spans_of, SpanText};

/// Responses a stream may have waiting to be sent; together with the learner queue this bounds
/// how far a client can run ahead of the learner.
const IN_FLIGHT_PER_STREAM: usize = 2;

/// The Learn service.
pub struct LearnService {
    state: Arc<State>,
}

impl LearnService {
    /// The service over the shared state.
    pub fn new(state: Arc<State>) -> Self {
        LearnService { state }
    }
}

/// A batch after validation: the documents to learn and the ones refused.
struct Validated {
    client_batch_id: String,
    accepted: Vec<u32>,
    rejected: Vec<pb::Rejection>,
    docs: Vec<Doc>,
}

impl Validated {
    fn response(self, steps: &[UpdateReport], version: u64) -> pb::IngestResponse {
        pb::IngestResponse {
            client_batch_id: self.client_batch_id,
            accepted: self.accepted,
            rejected: self.rejected,
            steps: steps.iter().map(convert::report).collect(),
            version,
        }
    }
}

/// The longest text in tokens the model and the limits allow.
fn token_limit(model: &Model, limits: &Limits) -> usize {
    model
        .arch
        .max_positions()
        .map_or(limits.max_document_tokens, |p| {
            p.min(limits.max_document_tokens)
        })
}

/// Checks a batch as a whole (a limit or an empty batch fails the stream) and each document on its
/// own (a bad document is refused with its reason and the rest go on).
fn validate(
    req: pb::IngestRequest,
    model: &Model,
    limits: &Limits,
) -> Result<Validated, ServerError> {
    let n = req.documents.len();
    if n == 0 {
        return Err(ServerError::invalid(
            "documents",
            "a batch needs at least one document",
        ));
    }
    ServerError::at_most("documents", n, "documents", limits.max_documents)?;
    let label = limits.max_label_bytes;
    ServerError::at_most("client_batch_id", req.client_batch_id.len(), "bytes", label)?;
    for (i, d) in req.documents.iter().enumerate() {
        let field = format!("documents[{i}]");
        ServerError::at_most(&format!("{field}.source"), d.source.len(), "bytes", label)?;
        check_counts(&field, &d.spans, &d.salient, limits)?;
    }
    let max_tokens = token_limit(model, limits);
    let mut out = Validated {
        client_batch_id: req.client_batch_id,
        accepted: Vec::new(),
        rejected: Vec::new(),
        docs: Vec::new(),
    };
    for (i, d) in req.documents.into_iter().enumerate() {
        match check_document(&d, model, max_tokens) {
            Ok(spans) => {
                tracing::debug!(index = i, source = %d.source, "document accepted");
                out.accepted.push(i as u32);
                out.docs.push(Doc {
                    text: d.text,
                    spans,
                });
            }
            Err((field, reason)) => {
                tracing::debug!(index = i, field, %reason, "document rejected");
                out.rejected.push(pb::Rejection {
                    index: i as u32,
                    field: format!("documents[{i}].{field}"),
                    reason,
                });
            }
        }
    }
    Ok(out)
}

/// Checks how many spans and salient strings the document or text `field` brings: each one is
/// searched for or checked against the text, so their number is a cost, not just a size.
fn check_counts(
    field: &str,
    spans: &[pb::Span],
    salient: &[String],
    limits: &Limits,
) -> Result<(), ServerError> {
    ServerError::at_most(
        &format!("{field}.spans"),
        spans.len(),
        "spans",
        limits.max_spans,
    )?;
    ServerError::at_most(
        &format!("{field}.salient"),
        salient.len(),
        "strings",
        limits.max_salient,
    )
}

/// Character ranges of salient spans.
type Spans = Vec<(usize, usize)>;

/// The document's salient spans (`None`: the learner finds them), or the field at fault and why.
fn check_document(
    d: &pb::Document,
    model: &Model,
    max_tokens: usize,
) -> Result<Option<Spans>, (&'static str, String)> {
    if d.text.trim().is_empty() {
        return Err(("text", "empty".into()));
    }
    let spans = if d.spans.is_empty() && d.salient.is_empty() {
        None
    } else {
        Some(spans_of(
            &d.text,
            Some(&convert::spans(&d.spans)),
            Some(&d.salient),
        )?)
    };
    let tokens = model
        .tokenizer
        .encode(&d.text)
        .map_err(|e| ("text", e.to_string()))?
        .ids
        .len();
    if tokens > max_tokens {
        return Err((
            "text",
            format!("{tokens} tokens; the limit is {max_tokens}"),
        ));
    }
    if tokens < 2 {
        return Err(("text", format!("{tokens} token(s); at least 2 are needed")));
    }
    Ok(spans)
}

/// A response a stream owes its client, in order.
enum Pending {
    /// Nothing to learn: every document was refused.
    Ready(pb::IngestResponse),
    /// Waiting for the learner.
    Learning(
        Validated,
        oneshot::Receiver<live::Result<Vec<UpdateReport>>>,
    ),
    /// The stream ends with this status.
    Fail(Status),
}

type IngestStream = Answers<pb::IngestResponse>;

#[tonic::async_trait]
impl Learn for LearnService {
    type IngestStream = IngestStream;

    #[tracing::instrument(skip_all, name = "Ingest")]
    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<IngestStream>, Status> {
        let state = Arc::clone(&self.state);
        state.writable("documents")?;
        let loaded = state.loaded()?;
        if *state.shutting_down().borrow() {
            return Err(ServerError::ShuttingDown.into());
        }
        if loaded.paused.load(Ordering::SeqCst) {
            return Err(ServerError::Paused.into());
        }
        let mut inbound = request.into_inner();
        let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(IN_FLIGHT_PER_STREAM);
        let limits = &state.config.limits;
        let (mut out_tx, out_rx) = outbox(IN_FLIGHT_PER_STREAM, limits.send_timeout);
        let idle = limits.ingest_idle;
        let reader_state = Arc::clone(&state);
        // The batches' learning spans hang under this RPC's span, on the learner thread too.
        tokio::spawn(
            async move {
                let state = reader_state;
                let mut stop = state.shutting_down();
                loop {
                    let message = tokio::select! {
                        m = tokio::time::timeout(idle, inbound.message()) => {
                            m.unwrap_or_else(|_| Err(ServerError::Idle(idle).into()))
                        }
                        _ = stop.wait_for(|&s| s) => {
                            // Batches already read are finished; the client learns where the
                            // stream ended.
                            Err(ServerError::ShuttingDown.into())
                        }
                    };
                    let next = match message {
                        Ok(Some(req)) => read_batch(&state, req).await,
                        Ok(None) => break,
                        Err(status) => Pending::Fail(from_codec(status)),
                    };
                    let failed = matches!(next, Pending::Fail(_));
                    if pending_tx.send(next).await.is_err() || failed {
                        break;
                    }
                }
            }
            .instrument(tracing::Span::current()),
        );
        tokio::spawn(async move {
            while let Some(p) = pending_rx.recv().await {
                let item = match p {
                    Pending::Ready(r) => Ok(r),
                    Pending::Learning(v, answer) => match answer.await {
                        Ok(Ok(steps)) => {
                            let version = steps.last().map_or(0, |s| s.version);
                            Ok(v.response(&steps, version))
                        }
                        Ok(Err(e)) => Err(ServerError::from(e).into()),
                        Err(_) => Err(ServerError::Internal(
                            "the learner thread dropped a batch".into(),
                        )
                        .into()),
                    },
                    Pending::Fail(s) => Err(s),
                };
                let failed = item.is_err();
                // A client gone or not reading ends the stream; dropping `pending_rx` stops the
                // reader, and the batches it handed over are learned all the same.
                if !out_tx.send(item).await || failed {
                    break;
                }
            }
        });
        Ok(Response::new(out_rx))
    }

    #[tracing::instrument(skip_all, name = "Trace")]
    async fn trace(
        &self,
        request: Request<pb::TraceRequest>,
    ) -> Result<Response<pb::TraceResponse>, Status> {
        let loaded = self.state.loaded()?;
        let limits = &self.state.config.limits;
        let texts = request.into_inner().texts;
        if texts.is_empty() {
            return Err(ServerError::invalid("texts", "nothing to trace").into());
        }
        ServerError::at_most("texts", texts.len(), "texts", limits.max_documents)?;
        for (i, t) in texts.iter().enumerate() {
            check_counts(&format!("texts[{i}]"), &t.spans, &t.salient, limits)?;
        }
        let max_tokens = token_limit(&loaded.model, limits);
        let mut span_texts = Vec::with_capacity(texts.len());
        for (i, t) in texts.into_iter().enumerate() {
            let spans = spans_of(&t.text, Some(&convert::spans(&t.spans)), Some(&t.salient))
                .map_err(|(field, reason)| {
                    ServerError::invalid(format!("texts[{i}].{field}"), reason)
                })?;
            let tokens = loaded
                .model
                .tokenizer
                .encode(&t.text)
                .map_err(ServerError::from)?
                .ids
                .len();
            if tokens > max_tokens {
                return Err(ServerError::limit(
                    format!("texts[{i}].text"),
                    format!("{tokens} tokens; the limit is {max_tokens}"),
                )
                .into());
            }
            span_texts.push(SpanText {
                line: i + 1,
                text: t.text,
                spans,
            });
        }
        let start = Instant::now();
        let (version, trace) = loaded
            .learner
            .ask(|reply| Job::Trace {
                texts: span_texts,
                reply,
            })
            .await
            .map_err(|e| match e {
                // `prepare` numbers texts from 1 as lines; the API indexes them from 0.
                live::Error::Locus(Error::Input {
                    line,
                    field,
                    reason,
                    ..
                }) => ServerError::invalid(format!("texts[{}].{field}", line - 1), reason),
                e => e.into(),
            })?;
        let selection = crate::select::report(&trace.groups);
        Ok(Response::new(convert::trace(
            version,
            &trace,
            &selection,
            start.elapsed().as_secs_f64(),
        )))
    }
}

/// Validates one request and hands its documents to the learner, waiting while its queue is full.
async fn read_batch(state: &Arc<State>, req: pb::IngestRequest) -> Pending {
    let Ok(loaded) = state.loaded() else {
        return Pending::Fail(ServerError::NotLoaded.into());
    };
    if loaded.paused.load(Ordering::SeqCst) {
        return Pending::Fail(ServerError::Paused.into());
    }
    let model = Arc::clone(&loaded.model);
    let limits = state.config.limits.clone();
    // Tokenizing a few megabytes of text is blocking work.
    let mut validated = match tokio::task::spawn_blocking(move || validate(req, &model, &limits))
        .await
    {
        Ok(Ok(v)) => {
            state.metrics.documents(v.accepted.len(), v.rejected.len());
            v
        }
        Ok(Err(e)) => return Pending::Fail(e.into()),
        Err(e) => return Pending::Fail(ServerError::Internal(format!("validation: {e}")).into()),
    };
    if validated.docs.is_empty() {
        let version = loaded.snapshots.current().version();
        return Pending::Ready(validated.response(&[], version));
    }
    let (reply, answer) = oneshot::channel();
    let job = Job::Learn {
        batch_id: validated.client_batch_id.clone(),
        docs: std::mem::take(&mut validated.docs),
        span: tracing::Span::current(),
        reply,
    };
    match loaded.learner.submit(job).await {
        Ok(()) => Pending::Learning(validated, answer),
        Err(e) => Pending::Fail(ServerError::from(e).into()),
    }
}
