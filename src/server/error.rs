//! The one place where errors become gRPC status codes.

use std::error::Error as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::{Code, Status};

use crate::error::Error;
use crate::live;
use crate::store::StoreError;

/// What a request can fail with, beyond the library's errors.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A library error (bad input, a tensor failure, ...).
    #[error(transparent)]
    Locus(#[from] Error),
    /// A malformed request field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field at fault, such as `documents[2].spans`.
        field: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A configured limit was exceeded.
    #[error("{field}: {reason}")]
    Limit {
        /// The field or resource at fault.
        field: String,
        /// The limit and the value that broke it.
        reason: String,
    },
    /// Every query slot stayed busy for as long as a query may wait for one.
    #[error("queries: {0}")]
    Busy(String),
    /// A request without a bearer token this service admits.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A model name this server does not serve.
    #[error("model `{asked}` is not served here; this server serves `{served}`")]
    UnknownModel {
        /// The name asked for.
        asked: String,
        /// The name it serves.
        served: &'static str,
    },
    /// Learning is paused.
    #[error("learning is paused; resume it with Admin.Resume")]
    Paused,
    /// This server is a reader: it follows a writer and neither learns nor changes versions.
    #[error("this server is a reader following {store}; send {what} to the writer")]
    Reader {
        /// The store it follows.
        store: String,
        /// What was asked of it.
        what: &'static str,
    },
    /// The model is still loading.
    #[error("the model is not loaded yet")]
    NotLoaded,
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The client took no answer of a stream for as long as the server waits (`--send-timeout`).
    #[error(
        "the client read no answer for {0:?} (the server's --send-timeout); the stream was ended"
    )]
    Stalled(std::time::Duration),
    /// An HTTP request body that did not arrive whole within `--send-timeout`.
    #[error("body: not whole after {0:?} (the server's --send-timeout); the request was ended")]
    SlowBody(std::time::Duration),
    /// An ingest stream sent no batch for as long as the server waits (`--ingest-idle`).
    #[error("no batch for {0:?} (the server's --ingest-idle); the stream was ended")]
    Idle(std::time::Duration),
    /// A version that is not retained.
    #[error("version {version} is not retained (retained: {retained})")]
    UnknownVersion {
        /// The version asked for.
        version: u64,
        /// The versions that are.
        retained: String,
    },
    /// The data directory or the store of published versions failed. Its message names server
    /// paths, which go to the log; a client is told only what happened (`client_message`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A failure inside the server (a task or thread that died).
    #[error("internal: {0}")]
    Internal(String),
    /// The listener or HTTP/2 transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl ServerError {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ServerError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A `Limit` for `field`.
    pub fn limit(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ServerError::Limit {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A `Limit` for `field` when `count` (of `unit`) is more than `max`.
    pub fn at_most(field: &str, count: usize, unit: &str, max: usize) -> Result<(), Self> {
        if count > max {
            return Err(ServerError::limit(
                field,
                format!("{count} {unit}, at most {max}"),
            ));
        }
        Ok(())
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ServerError::Locus(e) => match e {
                Error::Input { .. } | Error::Invalid(_) | Error::Tokenizer(_) => {
                    Code::InvalidArgument
                }
                Error::Model { .. } | Error::DefaultModel(_) => Code::Unavailable,
                Error::Io { .. } | Error::Tensor(_) => Code::Internal,
            },
            ServerError::InvalidArgument { .. } => Code::InvalidArgument,
            ServerError::Limit { .. } | ServerError::Busy(_) => Code::ResourceExhausted,
            ServerError::Unauthenticated(_) => Code::Unauthenticated,
            ServerError::Paused | ServerError::Reader { .. } => Code::FailedPrecondition,
            ServerError::NotLoaded | ServerError::ShuttingDown => Code::Unavailable,
            ServerError::Stalled(_) | ServerError::Idle(_) | ServerError::SlowBody(_) => {
                Code::DeadlineExceeded
            }
            ServerError::UnknownVersion { .. } | ServerError::UnknownModel { .. } => Code::NotFound,
            ServerError::Store(e) => match e {
                StoreError::Io { .. } if e.is_full() => Code::ResourceExhausted,
                StoreError::Io { .. } | StoreError::Tensor(_) => Code::Internal,
                // A checkpoint or journal record that fails its checksum is lost, not retried.
                StoreError::Corrupt { .. } => Code::DataLoss,
                StoreError::Mismatch(_) | StoreError::Location { .. } => Code::FailedPrecondition,
                StoreError::Remote { .. } => Code::Unavailable,
            },
            ServerError::Internal(_) | ServerError::Transport(_) => Code::Internal,
        }
    }

    /// The HTTP status of this error: its gRPC code's, where a busy server (429, worth a retry)
    /// differs from a request past a limit (413, which a retry repeats).
    pub(crate) fn http_status(&self) -> u16 {
        if matches!(self, ServerError::Busy(_)) {
            return 429;
        }
        match self.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::ResourceExhausted => 413,
            // A client too slow to send or take its request: its fault, not the server's.
            Code::DeadlineExceeded => 408,
            Code::Unavailable => 503,
            _ => 500,
        }
    }

    /// Logs the errors a client's answer does not explain: the server's own faults and store
    /// failures, whose paths the client is not told.
    pub(crate) fn log(&self) {
        if self.code() == Code::Internal || matches!(self, ServerError::Store(_)) {
            tracing::error!(error = %self, "request failed");
        }
    }

    /// What a client is told: the message, less the server's paths, cut to
    /// [`MAX_CLIENT_MESSAGE`] bytes.
    pub(crate) fn client_message(&self) -> String {
        let mut message = match self {
            ServerError::Store(e) => e.client_message(),
            e => e.to_string(),
        };
        if message.len() > MAX_CLIENT_MESSAGE {
            let mut end = MAX_CLIENT_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        message
    }
}

/// The longest status message a client is sent. It travels in an HTTP/2 header, and a message
/// that quotes a long request string (a salient string not found in its text) past the client's
/// header-list limit (16 KiB in h2) made the client reset the stream: INTERNAL, for bad input.
pub const MAX_CLIENT_MESSAGE: usize = 1024;

impl From<live::Error> for ServerError {
    fn from(e: live::Error) -> Self {
        match e {
            live::Error::Locus(e) => ServerError::Locus(e),
            live::Error::Store(e) => ServerError::Store(e),
            live::Error::Invalid { field, reason } => {
                ServerError::InvalidArgument { field, reason }
            }
            live::Error::Paused => ServerError::Paused,
            live::Error::ShuttingDown => ServerError::ShuttingDown,
            live::Error::UnknownVersion { version, retained } => {
                ServerError::UnknownVersion { version, retained }
            }
            e @ (live::Error::Thread { .. }
            | live::Error::Gone(_)
            | live::Error::Panicked(_)
            | live::Error::OtherBase { .. }
            | live::Error::UnknownTensor { .. }
            | live::Error::BaseChanged { .. }
            | live::Error::NotDurable { .. }) => ServerError::Internal(e.to_string()),
        }
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        e.log();
        let mut status = Status::new(e.code(), e.client_message());
        // Marks the status as this server's own, logged above; see `from_codec`.
        status.set_source(Arc::new(e));
        status
    }
}

/// A status from tonic's codec (a request that did not read) as this server reports it: an
/// oversized message is RESOURCE_EXHAUSTED, the code of every exceeded limit, and bytes that do not
/// decode are the client's INVALID_ARGUMENT, with the decoder's reason, where tonic says INTERNAL,
/// which this server keeps for its own faults. Any other status passes unchanged.
pub fn from_codec(status: Status) -> Status {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("message length too large") => {
            ServerError::limit("message", message.to_string()).into()
        }
        Code::Internal if CLIENT_FAULTS.iter().any(|f| message.starts_with(f)) => {
            ServerError::invalid("request", message.to_string()).into()
        }
        Code::Internal if !status.source().is_some_and(|s| s.is::<ServerError>()) => {
            tracing::error!(error = %message, "request failed in the transport");
            status
        }
        _ => status,
    }
}

/// How tonic's INTERNAL answers to request bytes that do not decode begin.
const CLIENT_FAULTS: [&str; 4] = [
    "failed to decode Protobuf message",
    "Missing request message",
    "Unexpected EOF decoding stream",
    "protocol error: received message with",
];

/// Applies [`from_codec`] to the answers tonic gives before any handler runs: a unary request's
/// message is read, and fails, before its handler is called, and the status travels in the
/// headers of a trailers-only response.
#[derive(Clone)]
pub struct CodecErrors<S> {
    inner: S,
}

impl<S> CodecErrors<S> {
    /// Wraps the service stack.
    pub fn new(inner: S) -> Self {
        CodecErrors { inner }
    }
}

impl<S, B, R> Service<http::Request<B>> for CodecErrors<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            // tonic keeps the status it answered with, its source included, beside the headers.
            let status = response.extensions().get::<Status>().cloned();
            let headers = response.headers_mut();
            let Some(status) = status.or_else(|| Status::from_header_map(headers)) else {
                return Ok(response);
            };
            let code = status.code();
            let mapped = from_codec(status);
            if mapped.code() != code {
                headers.remove(Status::GRPC_MESSAGE);
                headers.remove(Status::GRPC_STATUS_DETAILS);
                if let Err(e) = mapped.add_header(headers) {
                    tracing::error!(error = %e, "cannot rewrite a codec status");
                }
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn io(kind: io::ErrorKind) -> StoreError {
        StoreError::Io {
            path: "/srv/locus/data/journal.log".into(),
            cause: io::Error::from(kind),
        }
    }

    /// The status a client gets for `e`, which must not name the server's paths.
    fn answer(e: StoreError) -> Status {
        let status = Status::from(ServerError::from(e));
        assert!(!status.message().contains("/srv"), "{status:?}");
        status
    }

    #[test]
    fn store_failures_have_codes_and_client_messages_without_paths() {
        for kind in [io::ErrorKind::StorageFull, io::ErrorKind::QuotaExceeded] {
            let s = answer(io(kind));
            assert_eq!(
                (s.code(), s.message()),
                (Code::ResourceExhausted, "data directory is full")
            );
        }
        let s = answer(io(io::ErrorKind::PermissionDenied));
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().starts_with("data directory: "), "{s:?}");
        let s = answer(StoreError::Corrupt {
            path: "/srv/locus/data/checkpoints/00000000000000000003.ckpt".into(),
            reason: "checksum mismatch".into(),
        });
        assert_eq!(s.code(), Code::DataLoss);
        assert_eq!(
            s.message(),
            "data directory: 00000000000000000003.ckpt is corrupt: checksum mismatch"
        );
        // A directory store's client names its paths, an object store's its endpoint and keys;
        // `answer` checks that no path reaches the client.
        for (file, store, source) in [
            (
                "s3://bucket/locus/deltas/1.delta",
                "S3",
                "connection refused",
            ),
            (
                "/srv/locus/published/deltas/1.delta",
                "LocalFileSystem",
                "/srv/locus/published/deltas: permission denied",
            ),
        ] {
            let s = answer(StoreError::Remote {
                file: file.into(),
                cause: Box::new(object_store::Error::Generic {
                    store,
                    source: source.into(),
                }),
            });
            assert_eq!(s.code(), Code::Unavailable);
            let told =
                format!("published store: a request to {store} failed (the log has details)");
            assert_eq!(s.message(), told);
        }
        // The operator's view keeps the path.
        let e = ServerError::from(io(io::ErrorKind::StorageFull));
        assert!(e.to_string().contains("/srv/locus/data/journal.log"), "{e}");
    }

    #[test]
    fn http_statuses_follow_the_codes_and_tell_a_busy_server_from_a_large_request() {
        assert_eq!(ServerError::Busy("slots".into()).http_status(), 429);
        assert_eq!(
            ServerError::limit("prompt", "600 tokens").http_status(),
            413
        );
        assert_eq!(ServerError::invalid("top_p", "2").http_status(), 400);
        assert_eq!(ServerError::Unauthenticated("no").http_status(), 401);
        assert_eq!(ServerError::NotLoaded.http_status(), 503);
        let slow = ServerError::SlowBody(std::time::Duration::from_secs(30));
        assert_eq!(slow.http_status(), 408);
        assert_eq!(
            ServerError::Internal("a thread died".into()).http_status(),
            500
        );
    }

    #[test]
    fn client_messages_are_cut_on_a_character_boundary() {
        let long = ServerError::invalid("salient", "é".repeat(MAX_CLIENT_MESSAGE));
        let message = Status::from(long).message().to_string();
        assert!(
            message.len() <= MAX_CLIENT_MESSAGE + '…'.len_utf8(),
            "{}",
            message.len()
        );
        assert!(message.starts_with("salient: é") && message.ends_with('…'));
    }

    #[test]
    fn codec_failures_are_the_clients_and_keep_the_decoders_reason() {
        let s = from_codec(Status::internal(
            "failed to decode Protobuf message: invalid wire type value: 6",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("invalid wire type value: 6"), "{s:?}");
        let s = from_codec(Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        ));
        assert_eq!(s.code(), Code::ResourceExhausted);
        // The server's own faults stay INTERNAL.
        let s = from_codec(ServerError::Internal("a thread died".into()).into());
        assert_eq!(s.code(), Code::Internal);
    }
}
