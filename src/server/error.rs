//! The one place where errors become gRPC status codes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::{Code, Status};

use crate::error::Error;

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
    /// A version that is not retained.
    #[error("version {version} is not retained (retained: {retained})")]
    UnknownVersion {
        /// The version asked for.
        version: u64,
        /// The versions that are.
        retained: String,
    },
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
            ServerError::Limit { .. } => Code::ResourceExhausted,
            ServerError::Paused | ServerError::Reader { .. } => Code::FailedPrecondition,
            ServerError::NotLoaded | ServerError::ShuttingDown => Code::Unavailable,
            ServerError::UnknownVersion { .. } => Code::NotFound,
            ServerError::Internal(_) | ServerError::Transport(_) => Code::Internal,
        }
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "request failed");
        }
        Status::new(code, e.to_string())
    }
}

/// A status from the transport (a stream read) as the server reports it: tonic answers an
/// oversized message with OUT_OF_RANGE, which is a configured limit here.
pub fn from_transport(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        ServerError::limit("message", status.message().to_string()).into()
    } else {
        status
    }
}

/// Rewrites tonic's OUT_OF_RANGE answer to an oversized request message, which tonic sends before
/// any handler runs, as RESOURCE_EXHAUSTED: the code this server gives every exceeded limit.
#[derive(Clone)]
pub struct OversizeAsLimit<S> {
    inner: S,
}

impl<S> OversizeAsLimit<S> {
    /// Wraps the service stack.
    pub fn new(inner: S) -> Self {
        OversizeAsLimit { inner }
    }
}

impl<S, B, R> Service<http::Request<B>> for OversizeAsLimit<S>
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
            let headers = response.headers_mut();
            // A trailers-only answer carries its status in the headers.
            let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
            let too_large = headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .is_some_and(|m| {
                    m.contains("length%20too%20large") || m.contains("length too large")
                });
            if out_of_range && too_large {
                let code = (Code::ResourceExhausted as i32).to_string();
                if let Ok(v) = http::HeaderValue::from_str(&code) {
                    headers.insert("grpc-status", v);
                }
            }
            Ok(response)
        })
    }
}
