//! A deadline on the request message of every gRPC call that sends one: a client that opens a
//! unary call (Score, Info, ...) and never finishes its message would otherwise hold the stream,
//! and its slot among the connection's streams, for as long as it answers pings. Calls whose
//! requests are streams (Ingest, reflection) have their own idle bound or none, and pass through.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::Status;

use super::ServerError;
use crate::proto::v1::learn_server;

/// The layer's service: the request body of a call whose request is one message must end within
/// `limit` of the call's start, else the call ends with DEADLINE_EXCEEDED.
#[derive(Clone)]
pub struct MessageDeadline<S> {
    inner: S,
    limit: Duration,
}

impl<S> MessageDeadline<S> {
    /// Wraps the service stack.
    pub fn new(inner: S, limit: Duration) -> Self {
        MessageDeadline { inner, limit }
    }
}

/// Whether the call at `path` streams its requests (and so has no single message to wait for).
fn streams_requests(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(learn_server::SERVICE_NAME))
        .is_some_and(|method| method == "/Ingest")
        || path.ends_with("/ServerReflectionInfo")
}

impl<S, R> Service<http::Request<Body>> for MessageDeadline<S>
where
    S: Service<http::Request<Body>, Response = http::Response<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if streams_requests(request.uri().path()) {
            return self.inner.call(request);
        }
        let limit = self.limit;
        self.inner.call(request.map(|body| {
            Body::new(Deadline {
                inner: body,
                timer: Box::pin(tokio::time::sleep(limit)),
                limit,
            })
        }))
    }
}

/// A request body that fails once its deadline passes before its end.
struct Deadline {
    inner: Body,
    timer: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.timer.as_mut().poll(cx) {
            // tonic answers a body error that is a status with that status.
            Poll::Ready(()) => Poll::Ready(Some(Err(ServerError::SlowBody(self.limit).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calls_that_stream_their_requests_pass_without_a_deadline() {
        assert!(streams_requests("/locus.v1.Learn/Ingest"));
        assert!(streams_requests(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        for unary in [
            "/locus.v1.Query/Score",
            "/locus.v1.Query/Complete",
            "/locus.v1.Admin/Info",
            "/locus.v1.Learn/Trace",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(!streams_requests(unary), "{unary}");
        }
    }
}
