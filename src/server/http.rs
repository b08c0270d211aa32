//! The HTTP/1.1 listeners beside gRPC (metrics and probes, the OpenAI-style API): one accept
//! loop, each connection on a task of its own, optionally behind TLS.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Answers every request on `listener` with `respond` until the task is dropped; `what` names the
/// listener in the log. With `tls`, each connection's handshake comes first. A client that has
/// not finished the handshake, or sent its request's headers, after `patience` is disconnected.
pub(super) async fn serve<F, A>(
    listener: TcpListener,
    what: &'static str,
    patience: Duration,
    tls: Option<TlsAcceptor>,
    respond: F,
) where
    F: Fn(Request<Incoming>) -> A + Clone + Send + Sync + 'static,
    A: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Running out of file descriptors is transient; back off instead of spinning.
                tracing::warn!(error = %e, "{what} listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A reply must not wait for the client's delayed ACK (as on the gRPC listener).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "{what} listener: TCP_NODELAY");
        }
        let respond = respond.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                return connection(stream, what, patience, respond).await;
            };
            match tokio::time::timeout(patience, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => connection(stream, what, patience, respond).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "{what} connection: TLS handshake"),
                Err(_) => {
                    tracing::debug!("{what} connection: no TLS handshake within {patience:?}")
                }
            }
        });
    }
}

/// Serves the requests of one connection, plain or decrypted.
async fn connection<I, F, A>(io: I, what: &'static str, patience: Duration, respond: F)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> A + Clone + Send + Sync + 'static,
    A: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let answer = respond(request);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(patience)
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(error = %e, "{what} connection");
    }
}
